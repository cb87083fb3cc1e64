"""Attention over the paged KV pool, in plain PyTorch.

Two entry points:

* ``paged_partial_attention`` — the reference primitive on a paged cache: gathers one
  sequence's keys through its block table and returns ``partial_attention``'s (out, lse).
  Kernels and attention nodes are tested against it.
* ``PagedAttention`` — the engine's backend for a step: writes the step's K/V through the slot
  mapping, then attends all decode queries at once (keys gathered block by block into a
  padded batch, one SDPA call) and each prefill chunk on its own. Tested against the
  reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardlm.attention.backend import AttentionBackend
from shardlm.attention.reference import partial_attention, sdpa_mask, visibility_mask
from shardlm.cache.kv_quant import KVPool
from shardlm.cache.paged import PagedKVCache
from shardlm.step_inputs import StepInputs


def sequence_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Slots of positions [0, length) of a sequence, from its block table."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def paged_partial_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of queries q [Tq, Hq, D] at ``q_positions`` over one sequence's first
    ``context_len`` cached tokens. k_pool / v_pool: one layer's pool [slots, Hkv, D]."""
    slots = sequence_slots(block_table, context_len, block_size)
    kv_pos = torch.arange(context_len, device=q.device)
    visible = visibility_mask(q_positions, kv_pos, sliding_window)
    return partial_attention(q, k_pool[slots], v_pool[slots], scale, visible)


@dataclass
class PrefillChunk:
    """Tokens [start, end) of the flat batch: one sequence's chunk at positions
    [context_len − (end − start), context_len)."""

    start: int
    end: int
    context_len: int
    slots: torch.Tensor  # [context_len] slots of the sequence's positions 0..context_len-1


@dataclass
class PagedStep:
    """What one step's attention needs; built from StepInputs by ``paged_step``."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decodes: int  # the first num_decodes tokens are single-token decodes, one per sequence
    decode_slots: torch.Tensor | None  # [B, Lmax] slots of each decode sequence's keys
    decode_context_lens: torch.Tensor | None  # [B]
    prefills: list[PrefillChunk]
    decode_block_tables: torch.Tensor | None = None  # [B, W]: for the Triton decode kernel
    # [B, ⌈Lmax / block_size⌉] the blocks holding each decode's keys (PyTorch path): gathered
    # a block at a time, not a slot at a time (decode_slots is then None).
    decode_blocks: torch.Tensor | None = None


def decode_write_slots(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The slot of each decode's new token (position context_len − 1) from its block table."""
    last = context_lens - 1
    block = block_tables.gather(1, (last // block_size)[:, None]).squeeze(1)
    return block * block_size + last % block_size


def paged_step(inputs: StepInputs, block_size: int, gather_decode_keys: bool = True) -> PagedStep:
    """Slot mapping and per-sequence key slots of a step over the paged pool.
    ``gather_decode_keys`` False (the Triton decode kernel, which reads the block tables
    itself): only each decode's write slot, not the [B, Lmax] slots of all its keys."""
    if gather_decode_keys and inputs.num_decodes and inputs.decode_write_slots is not None:
        # Static decode steps (CUDA graphs) carry no key count to gather by.
        raise ValueError(
            "a static decode step (fixed write slots) needs the Triton decode kernel, which "
            "reads the block tables itself"
        )
    slot_mapping = []
    decode_lens = decode_blocks = None
    if inputs.num_decodes:
        decode_lens = inputs.decode_lens
        if inputs.decode_write_slots is not None:
            slot_mapping.append(inputs.decode_write_slots)
        else:
            slot_mapping.append(decode_write_slots(inputs.decode_tables, decode_lens, block_size))
        if gather_decode_keys:
            # Whole blocks: one contiguous copy each, not an index per slot.
            decode_blocks = inputs.decode_tables[:, : -(-inputs.max_decode_len // block_size)]
    chunks = []
    start = inputs.num_decodes
    for (n, context_len), table in zip(
        inputs.prefill_meta.tolist(), inputs.prefill_tables, strict=True
    ):
        slots = sequence_slots(table, context_len, block_size)
        slot_mapping.append(slots[context_len - n :])
        chunks.append(PrefillChunk(start, start + n, context_len, slots))
        start += n
    return PagedStep(
        slot_mapping=slot_mapping[0] if len(slot_mapping) == 1 else torch.cat(slot_mapping),
        num_decodes=inputs.num_decodes,
        decode_slots=None,
        decode_context_lens=decode_lens,
        prefills=chunks,
        decode_block_tables=inputs.decode_tables if inputs.num_decodes else None,
        decode_blocks=decode_blocks,
    )


class PagedAttention(AttentionBackend):
    """The attention backend for a batch of sequences over the paged pool. ``decode_backend``
    "triton" runs the decodes through kernels/decode_attention.py (split-KV over the block
    tables) instead of SDPA over gathered keys, and RoPE + the K/V writes through one fused
    kernel (``rope_attend``); prefill chunks always use SDPA.

    A quantized pool (kv_cache_dtype int8/fp8) is read dequantized: the gathered decode
    blocks and prefill keys here, inside the kernel on the Triton path; a prefill chunk that
    attends over its own k, v uses them as the pool would give them back (``fake_quant``),
    so a prompt sees the same K/V whether or not its prefix came from the cache."""

    def __init__(
        self,
        cache: PagedKVCache,
        scale: float,
        sliding_windows: tuple[int | None, ...],
        decode_backend: str = "torch",
    ) -> None:
        self.cache = cache
        self.scale = scale
        self.sliding_windows = sliding_windows
        self.decode_kernel = None
        # The model then calls rope_attend; the fused kernel quantizes as it writes.
        self.fuses_rope = decode_backend == "triton"
        if decode_backend == "triton":
            from shardlm.kernels.decode_attention import paged_decode_attention

            self.decode_kernel = paged_decode_attention
        self.step: PagedStep | None = None
        self._decode_masks: dict[int | None, torch.Tensor] = {}
        self._decode_unwritten: torch.Tensor | None = None
        self._prefill_masks: list[dict[int | None, tuple[torch.Tensor | None, bool]]] = []

    def begin_step(self, inputs: StepInputs) -> None:
        self.plan(paged_step(inputs, self.cache.block_size, self.decode_kernel is None))

    def plan(self, step: PagedStep) -> None:
        """Take a step's metadata as built (tests build PagedSteps directly)."""
        self.step = step
        windows = set(self.sliding_windows)
        self._decode_masks = {}
        self._decode_unwritten = None
        if step.num_decodes and self.decode_kernel is None:  # the kernel masks by itself
            lens = step.decode_context_lens
            if step.decode_blocks is not None:
                lmax = step.decode_blocks.shape[1] * self.cache.block_size
            else:
                lmax = step.decode_slots.shape[1]
            j = torch.arange(lmax, device=lens.device)[None, :]
            last = (lens - 1)[:, None]
            # Slots of a decode's blocks past its length may never have been written: their
            # rows in the flat [B · Lmax] gather.
            self._decode_unwritten = torch.nonzero((j > last).flatten()).flatten()
            for w in windows:
                visible = j <= last
                if w is not None:
                    visible &= j > last - w
                self._decode_masks[w] = visible[:, None, None, :]  # [B, 1, 1, Lmax]
        self._prefill_masks = [
            {
                w: sdpa_mask(
                    chunk.context_len - (chunk.end - chunk.start),
                    chunk.context_len,
                    w,
                    chunk.slots.device,
                )
                for w in windows
            }
            for chunk in step.prefills
        ]

    def _decode_keys(self, pool: KVPool) -> torch.Tensor:
        """Every decode's keys (or values) out of one layer's pool, [B, Lmax, Hkv, D]: whole
        blocks of its table, then the slots past its length zeroed — the pool is
        torch.empty, so a never-written slot could hold NaN, which even a 0 attention weight
        would carry into the sum (a masked score is −inf, but 0 · NaN is NaN). Quantized
        pools are dequantized first, so unwritten rows' garbage scales are zeroed too."""
        step = self.step
        if step.decode_blocks is None:  # a plan built with explicit slots
            return pool.read(step.decode_slots)
        bs = self.cache.block_size
        b, w = step.decode_blocks.shape
        out = pool.read_blocks(step.decode_blocks.reshape(-1), bs)
        out = out.index_fill_(0, self._decode_unwritten, 0)
        return out.view(b, w * bs, *out.shape[1:])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the step's k, v [T, Hkv, D] into the pool, then attend q [T, Hq, D]."""
        self.cache.keys(layer).write(self.step.slot_mapping, k)
        self.cache.values(layer).write(self.step.slot_mapping, v)
        return self._attend_cached(layer, q, k, v)

    def rope_attend(
        self,
        layer: int,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary,
        num_heads: int,
        num_kv_heads: int,
        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """``attend`` from the fused projection output qkv [T, (Hq + 2·Hkv)·D]: one kernel
        (normalises q and k per head when ``qk_norm`` is given,) rotates q and k and writes
        k, v into the pool (kernels/fused.py)."""
        from shardlm.kernels.fused import rope_and_store

        q = rope_and_store(
            qkv,
            positions,
            rotary.cos,
            rotary.sin,
            self.step.slot_mapping,
            self.cache.k[layer],
            self.cache.v[layer],
            num_heads,
            num_kv_heads,
            qk_norm,
            self.cache.keys(layer).scale,
            self.cache.values(layer).scale,
        )
        return self._attend_cached(layer, q, None, None)

    def _attend_cached(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of q over the pool, the step's K/V already written; k, v (when given)
        spare a chunk with nothing cached before it the gather of its own keys."""
        step = self.step
        k_pool, v_pool = self.cache.keys(layer), self.cache.values(layer)
        window = self.sliding_windows[layer]
        b = step.num_decodes
        decoded = None
        if b and self.decode_kernel is not None:
            decoded = self.decode_kernel(
                q[:b],
                k_pool.data,
                v_pool.data,
                step.decode_block_tables,
                step.decode_context_lens,
                self.cache.block_size,
                self.scale,
                window,
                k_scale=k_pool.scale,
                v_scale=v_pool.scale,
            )[0]
            if not step.prefills:
                return decoded  # a decode-only step (every CUDA-graph step): no copy
        out = torch.empty_like(q)
        if decoded is not None:
            out[:b] = decoded
        elif b:
            keys = self._decode_keys(k_pool).transpose(1, 2)  # [B, Hkv, Lmax, D]
            vals = self._decode_keys(v_pool).transpose(1, 2)
            out[:b] = F.scaled_dot_product_attention(
                q[:b].unsqueeze(2),  # [B, Hq, 1, D]
                keys,
                vals,
                attn_mask=self._decode_masks[window],
                scale=self.scale,
                enable_gqa=True,
            ).squeeze(2)
        for chunk, masks in zip(step.prefills, self._prefill_masks, strict=True):
            mask, causal = masks[window]
            if k is not None and chunk.context_len == chunk.end - chunk.start:
                # Nothing cached before this chunk: its own k, v are all the keys there are
                # (as the pool holds them).
                keys = k_pool.fake_quant(k[chunk.start : chunk.end])
                vals = v_pool.fake_quant(v[chunk.start : chunk.end])
            else:
                keys, vals = k_pool.read(chunk.slots), v_pool.read(chunk.slots)
            out[chunk.start : chunk.end] = (
                F.scaled_dot_product_attention(
                    q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0),
                    keys.transpose(0, 1).unsqueeze(0),
                    vals.transpose(0, 1).unsqueeze(0),
                    attn_mask=mask,
                    is_causal=causal,
                    scale=self.scale,
                    enable_gqa=True,
                )
                .squeeze(0)
                .transpose(0, 1)
            )
        return out
