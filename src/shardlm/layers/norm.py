"""RMSNorm, computed in float32 whatever the activation dtype (as the reference models do)."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w · x / sqrt(mean(x²) + eps); the statistics in float32 so bf16 inputs keep accuracy."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def qk_rms_norm(
    qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_q: int, eps: float
) -> torch.Tensor:
    """Qwen3's per-head norms on q and k side by side, qk [T, Hq + Hkv, D]: rms_norm over
    each head's D channels, with q's weight [D] on the first ``num_q`` heads and k's on the
    rest. One call for both, as RoPE then rotates both in one call."""
    weight = torch.cat(
        [q_weight.expand(num_q, -1), k_weight.expand(qk.shape[1] - num_q, -1)]
    )  # [Hq + Hkv, D], broadcast over the tokens
    return rms_norm(qk, weight, eps)


class RMSNorm(nn.Module):
    """``forward(x)`` → rms_norm(x); ``forward(x, residual)`` → (rms_norm(x + residual),
    x + residual): the decoder adds each sublayer's output to the residual stream right
    before the next norm, so the add and the norm are one fused kernel when ``use_kernel``
    is set (kernels/fused.py; the same math, this module is its reference)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.use_kernel = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.use_kernel:
            from shardlm.kernels import fused

            if residual is None:
                return fused.rms_norm(x, self.weight, self.eps)
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        total = x + residual
        return rms_norm(total, self.weight, self.eps), total
