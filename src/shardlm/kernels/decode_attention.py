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
``merge_partials``, the exact log-sum-exp merge attention nodes use:

    lse = log Σ_s exp(lse_s),   out = Σ_s exp(lse_s − lse) · out_s

so split-KV and R-sharding are one primitive. Query head h uses KV head h // (Hq / Hkv).
Sliding windows mask keys at positions ≤ p − window (p = context_len − 1).

Kernels are tested against the PyTorch reference on CPU through Triton's interpreter
(TRITON_INTERPRET=1); this module imports triton only when called.
"""

from __future__ import annotations

import functools

import torch

from shardlm.attention.reference import merge_partials


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    # Sizes that change as contexts grow are not specialised on (Triton would otherwise compile
    # a variant whenever one of them is 1 or a multiple of 16, mid-serving).
    @triton.jit(do_not_specialize=["window", "max_blocks", "blocks_per_split", "num_splits"])
    def split_kv_decode(
        q_ptr,  # [B, Hq, D]
        k_ptr,  # [slots, Hkv, D]
        v_ptr,
        block_tables_ptr,  # [B, max_blocks] int32
        context_lens_ptr,  # [B] int32
        out_ptr,  # [B, Hq, S, D] float32
        lse_ptr,  # [B, Hq, S] float32
        scale,
        window,  # keys at positions ≤ last − window are invisible; ≤ 0 = no window
        max_blocks,
        blocks_per_split,
        num_splits,
        stride_kslot,
        stride_khead,
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
        context_len = tl.load(context_lens_ptr + b)
        # Visible positions: lo < pos < limit. Bounds are scalars compared with the tile's
        # positions (no scalar booleans mixed into tensor masks: Triton's interpreter
        # mistypes those). Blocks past the table's width hold no position below `limit`.
        limit = tl.minimum(context_len, max_blocks * BLOCK_SIZE)
        lo = tl.where(window > 0, context_len - 1 - window, -1)
        n = tl.arange(0, BLOCK_SIZE)

        m = tl.full((GROUP_P,), float("-inf"), tl.float32)  # running max, per query head
        l_sum = tl.zeros((GROUP_P,), tl.float32)  # running Σ exp(score − m)
        acc = tl.zeros((GROUP_P, BLOCK_D), tl.float32)  # running Σ exp(score − m) · v
        # A while loop: Triton's interpreter cannot take a runtime bound in range().
        blk = s * blocks_per_split
        end = blk + blocks_per_split
        while blk < end:
            pos = blk * BLOCK_SIZE + n
            visible = (pos < limit) & (pos > lo)
            phys = tl.load(block_tables_ptr + b * max_blocks + tl.minimum(blk, max_blocks - 1))
            slot = phys.to(tl.int64) * BLOCK_SIZE + n  # 64-bit: pools past 2³¹ elements
            offs = slot[:, None] * stride_kslot + kv_head * stride_khead + d[None, :]
            kv_mask = visible[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, N]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet
            alpha = tl.exp(m - m_safe)  # rescales what was summed under the old max
            p = tl.exp(scores - m_safe[:, None])
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
            blk += 1

        rows = (b * num_kv_heads * GROUP + heads) * num_splits + s
        seen = l_sum > 0
        safe_l = tl.where(seen, l_sum, 1.0)
        out = tl.where(seen[:, None], acc / safe_l[:, None], 0.0)
        lse = tl.where(seen, m + tl.log(safe_l), float("-inf"))
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], out, mask=q_mask)
        tl.store(lse_ptr + rows, lse, mask=g_ok)

    return split_kv_decode


def choose_splits(max_context: int, block_size: int, batch_heads: int, sms: int = 132) -> int:
    """Enough splits to give every SM a few programs, none shorter than 4 KV blocks."""
    blocks = -(-max_context // block_size)
    want = max(1, -(-2 * sms // max(1, batch_heads)))
    return max(1, min(want, blocks // 4 or 1))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for B sequences: q [B, Hq, D]; k_pool / v_pool one layer's pool
    [slots, Hkv, D]; block_tables [B, max_blocks] (int32); context_lens [B] (int32, ≥ 1, the
    query's own key already written). Returns out [B, Hq, D] in q's dtype and lse [B, Hq]
    float32, as ``batched_partial_attention`` does."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(
            f"the Triton decode kernel needs a power-of-two block_size, got {block_size}"
        )
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = choose_splits(max_blocks * block_size, block_size, b * hkv)
    per_split = -(-max_blocks // num_splits)
    out = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    _kernel()[(b, hkv, num_splits)](
        q.contiguous(),
        k_pool,
        v_pool,
        block_tables.to(torch.int32).contiguous(),
        context_lens.to(torch.int32).contiguous(),
        out,
        lse,
        scale,
        sliding_window or 0,
        max_blocks,
        per_split,
        num_splits,
        k_pool.stride(0),
        k_pool.stride(1),
        GROUP=hq // hkv,
        GROUP_P=1 << (hq // hkv - 1).bit_length(),
        HEAD_DIM=d,
        BLOCK_D=1 << (d - 1).bit_length(),
        BLOCK_SIZE=block_size,
    )
    if num_splits == 1:
        return out[:, :, 0].to(q.dtype), lse[:, :, 0]
    # [B, Hq, S, ·] → the merge's [S, B, Hq, ·]
    merged, merged_lse = merge_partials(out.permute(2, 0, 1, 3), lse.permute(2, 0, 1))
    return merged.to(q.dtype), merged_lse
