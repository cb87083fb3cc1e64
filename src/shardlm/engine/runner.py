"""Builds the model on its device and runs one sequence at a time over a contiguous KV cache.

The foundation's execution path: prefill the prompt in one forward, then one forward per
generated token, each writing its K/V into the preallocated cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from shardlm.attention.contiguous import ContiguousAttention
from shardlm.cache.contiguous import ContiguousKVCache
from shardlm.config import ModelConfig
from shardlm.loader import load_weights
from shardlm.models.llama import LlamaForCausalLM
from shardlm.models.registry import model_class

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        path: str | Path,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.max_model_len = max_model_len
        start = time.perf_counter()
        self.model = build_model(config, dtype, device, max_model_len)
        load_weights(self.model, path, dtype)
        self.load_seconds = time.perf_counter() - start
        self.scale = config.head_dim**-0.5
        logger.info(
            "loaded %s (%.1fM parameters, %s) in %.2fs",
            path,
            config.num_parameters() / 1e6,
            dtype,
            self.load_seconds,
        )

    def _attention(self, capacity: int) -> ContiguousAttention:
        c = self.config
        cache = ContiguousKVCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            self.dtype,
            self.device,
        )
        return ContiguousAttention(cache, self.scale, c.sliding_windows)

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] at every prompt position (for scoring and tests)."""
        attn = self._attention(len(prompt_ids))
        attn.begin_step(0, len(prompt_ids))
        ids = torch.tensor(prompt_ids, device=self.device)
        hidden = self.model(ids, torch.arange(len(prompt_ids), device=self.device), attn)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` token ids; ``pick`` maps logits [V] to a token.

        The caller stops early simply by not asking for more (closing the generator).
        """
        n = len(prompt_ids)
        attn = self._attention(n + max_new_tokens)
        attn.begin_step(0, n)
        ids = torch.tensor(prompt_ids, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), attn)
        token = pick(self.model.compute_logits(hidden[-1:])[0])
        for step in range(max_new_tokens):
            yield int(token)  # the one host sync per step
            if step == max_new_tokens - 1:
                return
            pos = n + step
            attn.begin_step(pos, 1)
            hidden = self.model(token.view(1), torch.tensor([pos], device=self.device), attn)
            token = pick(self.model.compute_logits(hidden)[0])


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaForCausalLM:
    """Allocate the model's (uninitialised) parameters directly in dtype on device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = model_class(config)(config, max_positions, dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
