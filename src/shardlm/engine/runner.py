"""Builds the model on its device and executes scheduled batches over the paged KV pool.

Each step flattens the scheduled sequences into one token batch (decodes first, then prefill
chunks) with positions and slot mappings, runs the model once, and returns the logits of the
sequences that need a new token.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from shardlm.attention.contiguous import ContiguousAttention
from shardlm.attention.paged import PagedAttention, PagedStep, PrefillChunk, sequence_slots
from shardlm.cache.contiguous import ContiguousKVCache
from shardlm.cache.paged import PagedKVCache
from shardlm.config import ModelConfig
from shardlm.engine.scheduler import ScheduledBatch
from shardlm.engine.sequence import Sequence
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

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        self.block_size = block_size
        self.kv_cache = PagedKVCache(
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
            self.dtype,
            self.device,
        )
        self.attention = PagedAttention(self.kv_cache, self.scale, c.sliding_windows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. Returns the sequences that reached the end of their known tokens (in
        batch order) and their next-token logits [N, vocab] (float32)."""
        step, input_ids, positions, sample_rows, to_sample = self._prepare(batch)
        self.attention.begin_step(step)
        hidden = self.model(input_ids, positions, self.attention)
        if not to_sample:
            return [], hidden.new_empty(0, self.config.vocab_size, dtype=torch.float32)
        return to_sample, self.model.compute_logits(hidden[sample_rows])

    def _prepare(self, batch: ScheduledBatch):
        """Flatten a scheduled batch into token/position tensors and attention metadata."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slot_mapping: list[torch.Tensor] = []
        rows: list[int] = []
        to_sample: list[Sequence] = []

        decode_slots = decode_lens = None
        if batch.decodes:
            lens = [s.num_computed_tokens + 1 for s in batch.decodes]
            width = max(len(s.block_table) for s in batch.decodes)
            tables = torch.tensor(
                [
                    s.block_table + [s.block_table[0]] * (width - len(s.block_table))
                    for s in batch.decodes
                ],
                device=dev,
            )
            decode_lens = torch.tensor(lens, device=dev)
            lmax = max(lens)
            p = torch.arange(lmax, device=dev)
            slots = tables[:, p // bs] * bs + p % bs  # [B, Lmax]
            # Padding points at position 0's slot: always written, so never garbage.
            decode_slots = torch.where(p[None, :] < decode_lens[:, None], slots, slots[:, :1])
            slot_mapping.append(slots.gather(1, (decode_lens - 1)[:, None]).squeeze(1))
            for i, s in enumerate(batch.decodes):
                ids.append(s.token_ids[s.num_computed_tokens])
                pos.append(s.num_computed_tokens)
                rows.append(i)
                to_sample.append(s)

        prefills = []
        for seq, n in batch.prefills:
            start = len(ids)
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c : c + n])
            pos.extend(range(c, c + n))
            table = torch.tensor(seq.block_table, device=dev)
            slots = sequence_slots(table, c + n, bs)
            slot_mapping.append(slots[c:])
            prefills.append(PrefillChunk(start, start + n, c + n, slots))
            if c + n == seq.num_tokens:
                rows.append(start + n - 1)
                to_sample.append(seq)

        step = PagedStep(
            slot_mapping=torch.cat(slot_mapping),
            num_decodes=len(batch.decodes),
            decode_slots=decode_slots,
            decode_context_lens=decode_lens,
            prefills=prefills,
        )
        input_ids = torch.tensor(ids, device=dev)
        positions = torch.tensor(pos, device=dev)
        return step, input_ids, positions, torch.tensor(rows, device=dev), to_sample

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] at every prompt position (for scoring and tests).

        Runs on a private contiguous cache, independent of the paged pool and the scheduler.
        """
        c = self.config
        n = len(prompt_ids)
        cache = ContiguousKVCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, n, self.dtype, self.device
        )
        attn = ContiguousAttention(cache, self.scale, c.sliding_windows)
        attn.begin_step(0, n)
        ids = torch.tensor(prompt_ids, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), attn)
        return self.model.compute_logits(hidden)


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
