"""The paged KV pool: per layer, one preallocated tensor of ``num_blocks × block_size`` slots.

A token's K/V lives at slot ``block_table[pos // block_size] * block_size + pos % block_size``
of its sequence. One more slot, past the blocks (``padding_slot``), takes the writes of the
padding rows of a CUDA-graph batch (runtime/cuda_graphs.py); nothing reads it.

The pool is allocated with ``torch.empty``: pages are touched only as slots
are written, and no read ever looks at a slot that was not written (see attention/paged.py).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks * block_size + 1, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.padding_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize
