"""Attention for one sequence over a ContiguousKVCache, through torch's fused SDPA.

This is the fast single-device path of the foundation; it is tested against
``reference.partial_attention``. It scores prompts (``prompt_logits``, perplexity): with a
quantized KV cache (kv_cache_dtype) it attends over K/V as the paged pool would give them
back (``kv_quant.fake_quant``, fp8 at the pool's per-layer scales), so scores measure what
serving computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardlm.attention.backend import AttentionBackend
from shardlm.attention.reference import sdpa_mask
from shardlm.cache.contiguous import ContiguousKVCache
from shardlm.cache.kv_quant import Fp8Scales, fake_quant
from shardlm.step_inputs import StepInputs


class ContiguousAttention(AttentionBackend):
    """Per-step attention state: which cache rows the new tokens go to and what they see."""

    def __init__(
        self,
        cache: ContiguousKVCache,
        scale: float,
        sliding_windows: tuple[int | None, ...],
        kv_cache_dtype: str = "auto",
        fp8_scales: Fp8Scales | None = None,
    ) -> None:
        self.cache = cache
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8_scales = fp8_scales or Fp8Scales.unit(len(sliding_windows))  # one per layer
        self.scale = scale
        self.sliding_windows = sliding_windows
        self.start = 0
        self.end = 0
        self._masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}

    def begin_step(self, inputs: StepInputs) -> None:
        """One sequence's chunk: its (tokens, context length after it) from the host metadata."""
        ((num_tokens, context_len),) = inputs.on_host.prefill_meta.tolist()
        self.begin_chunk(context_len - num_tokens, num_tokens)

    def begin_chunk(self, start: int, num_tokens: int) -> None:
        """Prepare for tokens at positions [start, start + num_tokens)."""
        if start + num_tokens > self.cache.capacity:
            raise ValueError(
                f"sequence length {start + num_tokens} exceeds the KV cache capacity "
                f"{self.cache.capacity}"
            )
        self.start, self.end = start, start + num_tokens
        device = self.cache.k.device
        self._masks = {w: sdpa_mask(start, self.end, w, device) for w in set(self.sliding_windows)}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k, v [T, Hkv, D] into the cache; attend q [T, Hq, D]; → [T, Hq, D]."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        kind, scales = self.kv_cache_dtype, self.fp8_scales
        k_cache[:, self.start : self.end] = fake_quant(k, kind, scales.k[layer]).transpose(0, 1)
        v_cache[:, self.start : self.end] = fake_quant(v, kind, scales.v[layer]).transpose(0, 1)
        mask, causal = self._masks[self.sliding_windows[layer]]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k_cache[:, : self.end].unsqueeze(0),
            v_cache[:, : self.end].unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1)
