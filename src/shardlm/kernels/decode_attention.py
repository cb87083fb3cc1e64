"""Paged decode attention in Triton, split along the context (split-KV), returning (out, lse).

One decode query per sequence attends over that sequence's cached keys, found through its
block table. A long context leaves most of the GPU idle if one program walks it alone, so
the context is cut into ``num_splits`` contiguous ranges of KV blocks; program (b, g, s)
computes, for every query head that uses KV head g (GQA: its keys are read once for all of
them), the partial attention of sequence b over range s, as ``partial_attention`` defines it:

    out_s = Σ_j softmax_j(q·k_j·scale) v_j over the range's visible keys,
    lse_s = log Σ_j exp(q·k_j·scale)            (−inf, out_s = 0 if it sees none)

with an online softmax over the range's tiles (running max m, running sum l, accumulator
rescaled by exp(m_old − m_new) whenever the max grows). The S partials are then combined by
a second kernel, ``merge_splits``: the exact log-sum-exp merge of ``merge_partials``, which
attention nodes use:

    lse = log Σ_s exp(lse_s),   out = Σ_s exp(lse_s − lse) · out_s

so split-KV and R-sharding are one primitive. Query head h uses KV head h // (Hq / Hkv).
Sliding windows mask keys at positions ≤ p − window (p = context_len − 1).

A quantized pool (kv_cache_dtype, cache/kv_quant.py) is dequantized as it is read: int8
keys k_j = q8_j · s_j with a scale per (slot, KV head), so q·k_j = (q·q8_j) · s_j scales
the tile's scores, and s_j multiplies the softmax weight of v_j; fp8 with one scale per layer
folds s_k into the softmax scale and s_v into the output. Scores and sums stay float32.

Kernels are tested against the PyTorch reference on CPU through Triton's interpreter
(TRITON_INTERPRET=1); this module imports triton only when called.
"""

from __future__ import annotations

import functools

import torch

from shardlm.kernels import next_power_of_two


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # Sizes that change as contexts grow are not specialised on (Triton would otherwise compile
    # a variant whenever one of them is 1 or a multiple of 16, mid-serving).
    @triton.jit(do_not_specialize=["window", "max_blocks", "num_splits", "min_split_blocks"])
    def split_kv_decode(
        q_ptr,  # [B, Hq, D]
        k_ptr,  # [slots, Hkv, D] (model dtype, int8 or float8_e4m3fn)
        v_ptr,
        k_scale_ptr,  # int8: [slots, Hkv] float32; fp8: [] float32; else unused
        v_scale_ptr,
        block_tables_ptr,  # [B, max_blocks] int32 or int64
        context_lens_ptr,  # [B] int32 or int64; 0 = a padding row (sees nothing)
        out_ptr,  # [B, Hq, S, D] float32 (q's dtype when S = 1: then it is the output)
        lse_ptr,  # [B, Hq, S] float32
        scale,
        window,  # keys at positions ≤ last − window are invisible; ≤ 0 = no window
        max_blocks,
        num_splits,
        min_split_blocks,
        stride_kslot,
        stride_khead,
        stride_sslot,  # int8 scales: this stride per slot
        KV_QUANT: tl.constexpr,  # 0 plain, 1 int8 (per row), 2 fp8 (per layer)
        GROUP: tl.constexpr,  # Hq // Hkv: query heads sharing one KV head
        GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # KV block size: one tile
    ):
        # One program per (sequence, KV head, split): the KV head's keys are read once for
        # all GROUP query heads that use it (GQA), rows g of every [GROUP_P, ·] tile.
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        s = tl.program_id(2)
        num_kv_heads = tl.num_programs(1)
        g = tl.arange(0, GROUP_P)
        g_ok = g < GROUP
        heads = kv_head * GROUP + g  # query heads of this group
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_rows = (b * num_kv_heads * GROUP + heads) * HEAD_DIM
        q_mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
        q = q.to(tl.float32)
        context_len = tl.load(context_lens_ptr + b).to(tl.int32)
        # Visible positions: lo < pos < limit. Bounds are scalars compared with the tile's
        # positions (no scalar booleans mixed into tensor masks: Triton's interpreter
        # mistypes those). Blocks past the table's width hold no position below `limit`.
        limit = tl.minimum(context_len, max_blocks * BLOCK_SIZE)
        lo = tl.where(window > 0, context_len - 1 - window, -1)
        n = tl.arange(0, BLOCK_SIZE)
        # This sequence's own split of its visible blocks [first, last): the ranges follow
        # each sequence's length, not the table's width, so a short context in a wide table
        # (a CUDA-graph bucket sized for max_model_len) loops over its own blocks only.
        first = tl.maximum(lo + 1, 0) // BLOCK_SIZE
        last = (limit + BLOCK_SIZE - 1) // BLOCK_SIZE
        span = tl.maximum(last - first, 0)
        per_split = tl.maximum((span + num_splits - 1) // num_splits, min_split_blocks)
        blk = first + s * per_split
        end = tl.minimum(blk + per_split, last)

        k_scale = scale
        v_scale = 1.0
        if KV_QUANT == 2:  # one scale per layer: into the softmax scale and the output
            k_scale = scale * tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        m = tl.full((GROUP_P,), float("-inf"), tl.float32)  # running max, per query head
        l_sum = tl.zeros((GROUP_P,), tl.float32)  # running Σ exp(score − m)
        acc = tl.zeros((GROUP_P, BLOCK_D), tl.float32)  # running Σ exp(score − m) · v
        # A while loop: Triton's interpreter cannot take a runtime bound in range().
        while blk < end:
            pos = blk * BLOCK_SIZE + n
            visible = (pos < limit) & (pos > lo)
            phys = tl.load(block_tables_ptr + b * max_blocks + blk)
            slot = phys.to(tl.int64) * BLOCK_SIZE + n  # 64-bit: pools past 2³¹ elements
            offs = slot[:, None] * stride_kslot + kv_head * stride_khead + d[None, :]
            kv_mask = visible[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * k_scale  # [G, N]
            if KV_QUANT == 1:  # each key's own scale
                srow = slot * stride_sslot + kv_head
                scores = scores * tl.load(k_scale_ptr + srow, mask=visible, other=0.0)[None, :]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet
            alpha = tl.exp(m - m_safe)  # rescales what was summed under the old max
            p = tl.exp(scores - m_safe[:, None])
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
            pv = p
            if KV_QUANT == 1:  # each value's own scale, on its weight
                pv = p * tl.load(v_scale_ptr + srow, mask=visible, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.sum(pv[:, :, None] * v[None, :, :], axis=1)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
            blk += 1

        rows = (b * num_kv_heads * GROUP + heads) * num_splits + s
        seen = l_sum > 0
        safe_l = tl.where(seen, l_sum, 1.0)
        out = tl.where(seen[:, None], acc * v_scale / safe_l[:, None], 0.0)
        lse = tl.where(seen, m + tl.log(safe_l), float("-inf"))
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], out, mask=q_mask)
        tl.store(lse_ptr + rows, lse, mask=g_ok)

    @triton.jit(do_not_specialize=["num_splits"])
    def merge_splits(
        part_ptr,  # [B·Hq, S, D] float32
        part_lse_ptr,  # [B·Hq, S] float32
        out_ptr,  # [B·Hq, D] in the query dtype
        lse_ptr,  # [B·Hq] float32
        num_splits,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLITS_P: tl.constexpr,  # num_splits rounded up to a power of two
    ):
        # merge_partials for one (sequence, query head): lse = log Σ_s exp(lse_s) and
        # out = Σ_s exp(lse_s − lse) · out_s, with splits that saw nothing (lse_s = −inf)
        # weighing 0, and a row where every split saw nothing giving out 0, lse −inf.
        row = tl.program_id(0)
        s = tl.arange(0, SPLITS_P)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < num_splits
        lses = tl.load(part_lse_ptr + row * num_splits + s, mask=s_ok, other=float("-inf"))
        top = tl.max(lses, axis=0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lses - top_safe)  # 0 for empty splits and padding
        total = tl.sum(w, axis=0)
        parts = tl.load(
            part_ptr + (row * num_splits + s[:, None]) * HEAD_DIM + d[None, :],
            mask=s_ok[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        )
        safe_total = tl.where(total > 0, total, 1.0)
        out = tl.sum(w[:, None] * parts, axis=0) / safe_total
        lse = tl.where(total > 0, top_safe + tl.log(safe_total), float("-inf"))
        tl.store(out_ptr + row * HEAD_DIM + d, out, mask=d < HEAD_DIM)
        tl.store(lse_ptr + row, lse)

    return split_kv_decode, merge_splits


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100's count, so tests split as a GPU would


def choose_splits(batch_heads: int, max_blocks: int, sms: int, min_split_blocks: int) -> int:
    """Splits per (sequence, KV head): enough programs for about two per SM, but no more
    than a full table could fill with splits of ``min_split_blocks``. Fixed for a given batch
    shape (a CUDA graph replays it); each sequence then divides its own blocks among them."""
    want = -(-2 * sms // max(1, batch_heads))
    return max(1, min(want, max_blocks // min_split_blocks))


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    min_split_blocks: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for B sequences: q [B, Hq, D]; k_pool / v_pool one layer's pool
    [slots, Hkv, D]; block_tables [B, max_blocks] and context_lens [B] (int32 or int64; a
    length counts the query's own key, already written; 0 marks a padding row, which gets
    out 0 and lse −inf). Returns out [B, Hq, D] in q's dtype and lse [B, Hq] float32, as
    ``batched_partial_attention`` does. No host synchronisation: CUDA-graph capturable.
    A quantized pool (int8 / float8_e4m3fn) comes with its scales (cache/kv_quant.py): int8
    [slots, Hkv] float32 each, fp8 the layer's [] float32."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(
            f"the Triton decode kernel needs a power-of-two block_size, got {block_size}"
        )
    kv_quant = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(k_pool.dtype, 0)
    if kv_quant and (k_scale is None or v_scale is None):
        raise ValueError(f"a {k_pool.dtype} KV pool needs its k_scale and v_scale")
    if not kv_quant:
        k_scale = v_scale = k_pool  # never read
    max_blocks = block_tables.shape[1]
    if min_split_blocks is None:
        min_split_blocks = max(1, 64 // block_size)  # splits of at least 64 keys
    if num_splits is None:
        sms = _multiprocessors(q.device)
        num_splits = choose_splits(b * hkv, max_blocks, sms, min_split_blocks)
    # One split: the kernel writes the final output directly, in q's dtype.
    part_dtype = q.dtype if num_splits == 1 else torch.float32
    out = torch.empty(b, hq, num_splits, d, dtype=part_dtype, device=q.device)
    lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    split_kv_decode, merge_splits = _kernels()
    split_kv_decode[(b, hkv, num_splits)](
        q.contiguous(),
        k_pool,
        v_pool,
        k_scale,
        v_scale,
        block_tables.contiguous(),
        context_lens.contiguous(),
        out,
        lse,
        scale,
        sliding_window or 0,
        max_blocks,
        num_splits,
        min_split_blocks,
        k_pool.stride(0),
        k_pool.stride(1),
        k_scale.stride(0) if kv_quant == 1 else 0,
        KV_QUANT=kv_quant,
        GROUP=hq // hkv,
        GROUP_P=next_power_of_two(hq // hkv),
        HEAD_DIM=d,
        BLOCK_D=next_power_of_two(d),
        BLOCK_SIZE=block_size,
    )
    if num_splits == 1:
        return out[:, :, 0], lse[:, :, 0]
    merged = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    merged_lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    merge_splits[(b * hq,)](
        out,
        lse,
        merged,
        merged_lse,
        num_splits,
        HEAD_DIM=d,
        BLOCK_D=next_power_of_two(d),
        SPLITS_P=next_power_of_two(num_splits),
    )
    return merged, merged_lse
