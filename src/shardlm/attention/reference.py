"""Plain-PyTorch attention: the reference every faster path is tested against.

``partial_attention`` attends a block of queries to *some* of the keys (a shard) and returns,
besides the normalised output, lse = log Σ_j exp(s_j) over the keys it saw (s = q·kᵀ·scale,
masked entries -inf). Two shards A and B of the same query merge exactly:

    lse   = log(exp(lse_A) + exp(lse_B))
    out   = exp(lse_A − lse) · out_A + exp(lse_B − lse) · out_B

because out_X = Σ_{j∈X} exp(s_j − lse_X) v_j, so exp(lse_X − lse) · out_X re-weights X's
softmax to the softmax over A ∪ B. A shard that sees no key has lse = −inf and weight 0.
"""

from __future__ import annotations

import torch


def visibility_mask(
    q_positions: torch.Tensor,
    kv_positions: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Bool [Tq, Tk]: query at position p sees key at position j iff j ≤ p (and j > p − window)."""
    q = q_positions[:, None]
    k = kv_positions[None, :]
    visible = k <= q
    if sliding_window is not None:
        visible &= k > q - sliding_window
    return visible


def sdpa_mask(
    start: int, end: int, sliding_window: int | None, device: torch.device | str
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA when queries at positions [start, end) attend to keys
    at positions [0, end).

    No mask tensor is built when SDPA can do without: queries from position 0 with no window
    cut are its own ``is_causal`` (top-left aligned, which is right only when start = 0), and
    a single query with no window cut sees every key.
    """
    uncut = sliding_window is None or end <= sliding_window
    if uncut and start == 0:
        return None, True
    if uncut and end - start == 1:
        return None, False
    q_pos = torch.arange(start, end, device=device)
    return visibility_mask(q_pos, torch.arange(end, device=device), sliding_window), False


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Tq, Hq, D] over k, v [Tk, Hkv, D] (Hq a multiple of Hkv: GQA/MQA).

    Returns out [Tq, Hq, D] in q's dtype and lse [Tq, Hq] in float32. Rows with no visible
    key get out = 0 and lse = −inf. Math in float32.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    # [Hkv, group·Tq, D] so each KV head multiplies with the query heads that share it.
    qg = q.float().reshape(tq, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * tq, d)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)) * scale  # [Hkv, group·Tq, Tk]
    scores = scores.view(hkv, group, tq, tk)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, group, Tq]
    # exp(s − lse) is the softmax; rows with lse = −inf would give NaN, so zero them instead.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))
    out = torch.bmm(probs.view(hkv, group * tq, tk), v.float().permute(1, 0, 2))
    out = out.view(hkv, group, tq, d).permute(2, 0, 1, 3).reshape(tq, hq, d)
    lse = lse.permute(2, 0, 1).reshape(tq, hq)
    return out.to(q.dtype), lse


def merge_partials(
    outs: torch.Tensor | list[torch.Tensor], lses: torch.Tensor | list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of S partial attentions: outs [S, Tq, H, D], lses [S, Tq, H] → (out, lse)."""
    outs = torch.stack(list(outs)) if isinstance(outs, list) else outs
    lses = torch.stack(list(lses)) if isinstance(lses, list) else lses
    lse = torch.logsumexp(lses, dim=0)  # −inf where every shard saw nothing
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - safe_lse.unsqueeze(0))  # exp(−inf) = 0 for empty shards
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse


def batched_partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    visible: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``partial_attention`` for B sequences at once, one query each (decode steps).

    q [B, Hq, D]; k, v [B, L, Hkv, D] (each sequence's keys, padded to L); visible [B, L].
    Returns out [B, Hq, D] in q's dtype and lse [B, Hq] float32 (−inf, out 0 where a row
    sees no key). Math in float32.
    """
    b, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, group]
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
    return out.reshape(b, hq, d).to(q.dtype), lse.reshape(b, hq)
