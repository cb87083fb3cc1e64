"""A single sequence's KV cache, preallocated for its whole length.

The ``more tokens`` of the first design figure: each decode step writes one new K/V row per
layer in place, at the sequence's current length. Layout [layers, kv_heads, capacity, head_dim]
keeps each head's keys contiguous, which is what the attention matmuls read.
"""

from __future__ import annotations

import torch


class ContiguousKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
