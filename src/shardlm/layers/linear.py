"""Linear layers whose weights are filled by the loader.

The weight is stored transposed, as ``weight_t`` [in_features, out_features], so the forward
is ``x @ weight_t``. For decode (one row of x), CPU BLAS streams that layout at about 1.5x
the bandwidth of x @ Wᵀ with W [out, in] (measured: 16 vs 11 GB/s on the dev machine, see
docs/benchmarks.md); on GPUs both layouts are equally fast.

Weights are created uninitialised (``torch.empty``): the loader overwrites every element, and
random initialisation of a multi-GB model would cost seconds for nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """y = x W (+ b). ``out_features`` may be the concatenation of several checkpoint
    projections (q|k|v or gate|up) so one matmul replaces several."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)
