"""SwiGLU activation on the fused gate/up output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) ⊙ up, where the last dimension holds [gate | up] (one fused matmul made it)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
