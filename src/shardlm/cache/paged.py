"""The paged KV pool: per layer, one preallocated tensor of ``num_blocks × block_size`` slots.

A token's K/V lives at slot ``block_table[pos // block_size] * block_size + pos % block_size``
of its sequence. One more slot, past the blocks (``padding_slot``), takes the writes of the
padding rows of a CUDA-graph batch (runtime/cuda_graphs.py); nothing reads it.

With ``kv_cache_dtype`` int8 or fp8 the rows are stored in 8 bits and their scales beside
them (cache/kv_quant.py): int8 one float32 per (slot, KV head) in ``k_scale`` / ``v_scale``
[layers, slots, Hkv], fp8 one per layer [layers] (``fp8_scales``: calibrated, else 1.0; set
once here, and the kernels read them from these tensors). Readers go through ``keys(layer)`` /
``values(layer)``, which dequantize.

The pool is allocated with ``torch.empty``: pages are touched only as slots
are written, and no read ever looks at a slot that was not written (see attention/paged.py).
"""

from __future__ import annotations

import torch

from shardlm.cache.kv_quant import Fp8Scales, KVPool, kv_bytes_per_token, storage_dtype


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
        kv_cache_dtype: str = "auto",
        fp8_scales: Fp8Scales | None = None,
    ) -> None:
        shape = (num_layers, num_blocks * block_size + 1, num_kv_heads, head_dim)
        stored = storage_dtype(kv_cache_dtype, dtype)
        self.k = torch.empty(shape, dtype=stored, device=device)
        self.v = torch.empty(shape, dtype=stored, device=device)
        self.k_scale = self.v_scale = None
        if kv_cache_dtype == "int8":
            self.k_scale = torch.empty(shape[:3], dtype=torch.float32, device=device)
            self.v_scale = torch.empty(shape[:3], dtype=torch.float32, device=device)
        elif kv_cache_dtype == "fp8":
            scales = fp8_scales or Fp8Scales.unit(num_layers)
            if len(scales.k) != num_layers or len(scales.v) != num_layers:
                raise ValueError(
                    f"fp8_scales has {len(scales.k)} K and {len(scales.v)} V scales for "
                    f"{num_layers} layers"
                )
            self.k_scale = torch.tensor(scales.k, dtype=torch.float32, device=device)
            self.v_scale = torch.tensor(scales.v, dtype=torch.float32, device=device)
        self.dtype = dtype  # what readers get back
        self.kv_cache_dtype = kv_cache_dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.padding_slot = num_blocks * block_size

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def keys(self, layer: int) -> KVPool:
        return KVPool(
            self.k[layer], None if self.k_scale is None else self.k_scale[layer], self.dtype
        )

    def values(self, layer: int) -> KVPool:
        return KVPool(
            self.v[layer], None if self.v_scale is None else self.v_scale[layer], self.dtype
        )

    def zero_blocks(self, count: int) -> None:
        """Zero the first ``count`` blocks, rows and scales (finite, reading back as 0)."""
        n = count * self.block_size
        self.k[:, :n].zero_()
        self.v[:, :n].zero_()
        if self.k_scale is not None and self.k_scale.dim() == 3:
            self.k_scale[:, :n].zero_()
            self.v_scale[:, :n].zero_()

    @staticmethod
    def bytes_per_token(
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
    ) -> int:
        return kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype, kv_cache_dtype)
