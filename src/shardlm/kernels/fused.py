"""Fused elementwise kernels of the decoder layer, in Triton (programs over tokens).

At batch 1 a decode step is ~10 kernels per layer once these replace their PyTorch chains
(each of which launches 3–8 small kernels): launches, not bytes, would otherwise bound a
1B model's step.

* ``add_rms_norm``: residual ← x + residual, then y = w · residual / √(mean(residual²) + ε),
  one read of each input and one write of each output instead of the passes of ``x + r``
  then ``rms_norm``; ``rms_norm`` is the same without the residual. Statistics in float32,
  as layers/norm.py computes them.
* ``silu_and_mul``: SiLU(gate) ⊙ up of the fused [gate | up] projection output, in one pass
  (layers/activation.py is the reference).
* ``rope_and_store``: RoPE on q and k straight out of the fused [q | k | v] projection, q
  written out and k, v written into the paged KV pool at the token's slot — the rotation,
  the split and the two cache writes of layers/rotary.py + PagedAttention in one kernel.
  With Qwen3's per-head q/k norms it normalises each head first, in the same kernel (a
  head's D channels are already in registers for the rotation; layers/norm.py's
  qk_rms_norm is the reference). With a quantized pool (kv_cache_dtype int8/fp8) it
  quantizes k and v as it writes them, as cache/kv_quant.py does (the reference): int8 with
  each (token, head)'s scale, stored beside the row; fp8 with the layer's scale.
"""

from __future__ import annotations

import functools

import torch

from shardlm.kernels import next_power_of_two

# KV_QUANT of rope_and_store_kernel: how the pool stores K/V.
KV_PLAIN, KV_INT8, KV_FP8 = 0, 1, 2


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        new_res_ptr,
        n_cols,
        eps,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # 64-bit: row · n_cols may pass 2³¹
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        total = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0)
            total = total + r  # in the activation dtype, as `x + residual` is
            tl.store(new_res_ptr + row * n_cols + cols, total, mask=ok)
        t32 = total.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(t32 * t32, axis=0) / n_cols + eps)
        normed = (t32 * inv).to(total.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, w * normed, mask=ok)

    @triton.jit
    def silu_and_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit: row · 2·n_cols may pass 2³¹
        block = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(out_ptr + row * n_cols + cols, silu * up, mask=ok)

    @triton.jit
    def rope_and_store_kernel(
        qkv_ptr,  # [T, (Hq + 2·Hkv)·D]
        positions_ptr,  # [T]
        cos_ptr,  # [max_positions, D] (the two halves equal)
        sin_ptr,
        slots_ptr,  # [T] pool slot of each token's K/V
        q_ptr,  # [T, Hq, D] out
        k_pool_ptr,  # [slots, Hkv, D]
        v_pool_ptr,
        k_scale_ptr,  # int8: [slots, Hkv] float32 (written); fp8: [] (read); else unused
        v_scale_ptr,
        q_norm_ptr,  # [D] per-head q norm weight (read only when HAS_QK_NORM)
        k_norm_ptr,
        qkv_stride,
        stride_kslot,
        stride_khead,
        stride_sslot,  # int8 scales: [slots, Hkv], this stride per slot
        eps,
        FP8_MAX,
        HAS_QK_NORM: tl.constexpr,
        KV_QUANT: tl.constexpr,  # KV_PLAIN | KV_INT8 | KV_FP8
        NUM_Q: tl.constexpr,
        NUM_KV: tl.constexpr,
        HEADS_P: tl.constexpr,  # Hq + Hkv rounded up to a power of two
        KV_P: tl.constexpr,  # Hkv rounded up to a power of two
        HALF: tl.constexpr,  # D / 2
        HALF_P: tl.constexpr,
    ):
        # Channel pairs (i, i + D/2) of every q and k head are rotated by pos · inv_freq[i]:
        #   y_i = x_i cos − x_{i+D/2} sin,   y_{i+D/2} = x_{i+D/2} cos + x_i sin
        # (layers/rotary.py's x·cos + rotate_half(x)·sin, with its tables).
        t = tl.program_id(0).to(tl.int64)  # 64-bit: t · qkv_stride may pass 2³¹
        head_dim = 2 * HALF
        pos = tl.load(positions_ptr + t).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        h = tl.arange(0, HEADS_P)
        j = tl.arange(0, HALF_P)
        j_ok = j < HALF
        ok = (h < NUM_Q + NUM_KV)[:, None] & j_ok[None, :]
        src = qkv_ptr + t * qkv_stride + h[:, None] * head_dim + j[None, :]
        x1 = tl.load(src, mask=ok, other=0.0)
        x2 = tl.load(src + HALF, mask=ok, other=0.0)
        cos = tl.load(cos_ptr + pos * head_dim + j, mask=j_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * head_dim + j, mask=j_ok, other=0.0).to(tl.float32)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        if HAS_QK_NORM:
            # Each head's rms over its D channels (both halves), in float32; then, as
            # rms_norm does, the normalised head cast to the activation dtype and scaled by
            # q's weight (q heads) or k's (k heads) in that dtype.
            inv = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / head_dim + eps)
            is_q_head = (h < NUM_Q)[:, None]
            qw1 = tl.load(q_norm_ptr + j, mask=j_ok, other=0.0)[None, :]
            qw2 = tl.load(q_norm_ptr + HALF + j, mask=j_ok, other=0.0)[None, :]
            kw1 = tl.load(k_norm_ptr + j, mask=j_ok, other=0.0)[None, :]
            kw2 = tl.load(k_norm_ptr + HALF + j, mask=j_ok, other=0.0)[None, :]
            n1 = tl.where(is_q_head, qw1, kw1) * (a * inv[:, None]).to(x1.dtype)
            n2 = tl.where(is_q_head, qw2, kw2) * (b * inv[:, None]).to(x1.dtype)
            a = n1.to(tl.float32)
            b = n2.to(tl.float32)
        y1 = (a * cos[None, :] - b * sin[None, :]).to(x1.dtype)
        y2 = (b * cos[None, :] + a * sin[None, :]).to(x1.dtype)
        is_q = (h < NUM_Q)[:, None] & ok
        q_dst = q_ptr + (t * NUM_Q + h[:, None]) * head_dim + j[None, :]
        tl.store(q_dst, y1, mask=is_q)
        tl.store(q_dst + HALF, y2, mask=is_q)
        is_k = (h >= NUM_Q)[:, None] & ok
        k_dst = k_pool_ptr + slot * stride_kslot + (h[:, None] - NUM_Q) * stride_khead + j[None, :]
        # v: copied as it is (or quantized), in two halves like the rest.
        vh = tl.arange(0, KV_P)
        v_ok = (vh < NUM_KV)[:, None] & j_ok[None, :]
        v_src = qkv_ptr + t * qkv_stride + (NUM_Q + NUM_KV + vh[:, None]) * head_dim + j[None, :]
        v_dst = v_pool_ptr + slot * stride_kslot + vh[:, None] * stride_khead + j[None, :]
        v1 = tl.load(v_src, mask=v_ok, other=0.0)
        v2 = tl.load(v_src + HALF, mask=v_ok, other=0.0)
        if KV_QUANT == 1:
            # int8, as kv_quant.quantize_int8: per row s = max |x| / 127 (masked lanes are 0),
            # q = round(x / s), ties to even: x + 1.5·2²³ − 1.5·2²³ rounds a float32 of
            # magnitude < 2²² so (the interpreter has no rint).
            k1, k2 = y1.to(tl.float32), y2.to(tl.float32)
            ks = tl.max(tl.maximum(tl.abs(k1), tl.abs(k2)), axis=1) / 127.0
            ks = tl.maximum(ks, 1.1754943508222875e-38)[:, None]
            k1 = tl.minimum(tl.maximum((k1 / ks + 12582912.0) - 12582912.0, -127.0), 127.0)
            k2 = tl.minimum(tl.maximum((k2 / ks + 12582912.0) - 12582912.0, -127.0), 127.0)
            tl.store(k_dst, k1.to(tl.int8), mask=is_k)
            tl.store(k_dst + HALF, k2.to(tl.int8), mask=is_k)
            k_rows = slot * stride_sslot + h - NUM_Q
            tl.store(
                k_scale_ptr + k_rows, tl.max(ks, axis=1), mask=(h >= NUM_Q) & (h < NUM_Q + NUM_KV)
            )
            w1, w2 = v1.to(tl.float32), v2.to(tl.float32)
            vs = tl.max(tl.maximum(tl.abs(w1), tl.abs(w2)), axis=1) / 127.0
            vs = tl.maximum(vs, 1.1754943508222875e-38)[:, None]
            w1 = tl.minimum(tl.maximum((w1 / vs + 12582912.0) - 12582912.0, -127.0), 127.0)
            w2 = tl.minimum(tl.maximum((w2 / vs + 12582912.0) - 12582912.0, -127.0), 127.0)
            tl.store(v_dst, w1.to(tl.int8), mask=v_ok)
            tl.store(v_dst + HALF, w2.to(tl.int8), mask=v_ok)
            v_rows = slot * stride_sslot + vh
            tl.store(v_scale_ptr + v_rows, tl.max(vs, axis=1), mask=vh < NUM_KV)
        elif KV_QUANT == 2:
            # fp8 e4m3 of x / s, saturated at ±448 (kv_quant.quantize_fp8).
            ks = tl.load(k_scale_ptr)
            vs = tl.load(v_scale_ptr)
            fp8 = k_pool_ptr.dtype.element_ty
            k1 = tl.minimum(tl.maximum(y1.to(tl.float32) / ks, -FP8_MAX), FP8_MAX)
            k2 = tl.minimum(tl.maximum(y2.to(tl.float32) / ks, -FP8_MAX), FP8_MAX)
            tl.store(k_dst, k1.to(fp8), mask=is_k)
            tl.store(k_dst + HALF, k2.to(fp8), mask=is_k)
            w1 = tl.minimum(tl.maximum(v1.to(tl.float32) / vs, -FP8_MAX), FP8_MAX)
            w2 = tl.minimum(tl.maximum(v2.to(tl.float32) / vs, -FP8_MAX), FP8_MAX)
            tl.store(v_dst, w1.to(fp8), mask=v_ok)
            tl.store(v_dst + HALF, w2.to(fp8), mask=v_ok)
        else:
            tl.store(k_dst, y1, mask=is_k)
            tl.store(k_dst + HALF, y2, mask=is_k)
            tl.store(v_dst, v1, mask=v_ok)
            tl.store(v_dst + HALF, v2, mask=v_ok)

    return add_rms_norm_kernel, silu_and_mul_kernel, rope_and_store_kernel


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, H]."""
    t, h = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x)
    kernel = _kernels()[0]
    kernel[(t,)](
        x,
        residual,
        weight,
        out,
        new_residual,
        h,
        eps,
        BLOCK=next_power_of_two(h),
        HAS_RESIDUAL=True,
    )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers/norm.py's rms_norm for x [T, H], one pass."""
    t, h = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    block = next_power_of_two(h)
    _kernels()[0][(t,)](x, x, weight, out, out, h, eps, BLOCK=block, HAS_RESIDUAL=False)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) ⊙ up for gate_up [T, 2I] = [gate | up]."""
    t, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    kernel = _kernels()[1]
    block = 1024
    kernel[(t, -(-i // block))](gate_up.contiguous(), out, i, BLOCK=block)
    return out


def rope_and_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated q [T, Hq, D] from qkv [T, (Hq + 2·Hkv)·D]; rotated k and v are written into
    one layer's pools [slots, Hkv, D] at ``slot_mapping`` [T]. ``cos``/``sin``: RotaryEmbedding's
    tables [max_positions, D]. ``qk_norm``: (q weight [D], k weight [D], eps) of per-head
    RMSNorms applied to q and k before the rotation (Qwen3), or None. A quantized pool (int8
    or float8_e4m3fn, cache/kv_quant.py) comes with its scales: int8 [slots, Hkv] float32,
    written here; fp8 the layer's [] float32, read."""
    t = qkv.shape[0]
    d = cos.shape[1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    if qk_norm is None:
        q_weight = k_weight = qkv  # never read: HAS_QK_NORM is off
        eps = 0.0
    else:
        q_weight, k_weight, eps = qk_norm
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    kv_quant = {torch.int8: KV_INT8, torch.float8_e4m3fn: KV_FP8}.get(k_pool.dtype, KV_PLAIN)
    if kv_quant != KV_PLAIN and (k_scale is None or v_scale is None):
        raise ValueError(f"a {k_pool.dtype} KV pool needs its k_scale and v_scale")
    if kv_quant == KV_PLAIN:
        k_scale = v_scale = k_pool  # never read
    kernel = _kernels()[2]
    kernel[(t,)](
        qkv,
        positions,
        cos,
        sin,
        slot_mapping,
        q,
        k_pool,
        v_pool,
        k_scale,
        v_scale,
        q_weight,
        k_weight,
        qkv.stride(0),
        k_pool.stride(0),
        k_pool.stride(1),
        k_scale.stride(0) if kv_quant == KV_INT8 else 0,
        float(eps),
        float(torch.finfo(torch.float8_e4m3fn).max),
        HAS_QK_NORM=qk_norm is not None,
        KV_QUANT=kv_quant,
        NUM_Q=num_heads,
        NUM_KV=num_kv_heads,
        HEADS_P=next_power_of_two(num_heads + num_kv_heads),
        KV_P=next_power_of_two(num_kv_heads),
        HALF=d // 2,
        HALF_P=next_power_of_two(d // 2),
    )
    return q
