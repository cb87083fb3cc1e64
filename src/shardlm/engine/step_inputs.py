"""One step's model inputs as plain integer tensors: built by the driver from the scheduled
sequences, sent unchanged to tensor-parallel workers, and turned into attention metadata
identically on every rank.

Nothing here refers to sequences or requests, so a worker needs no scheduler state: the
block tables travel with the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardlm.attention.paged import PagedStep, PrefillChunk, decode_write_slots, sequence_slots
from shardlm.engine.scheduler import ScheduledBatch
from shardlm.engine.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] decodes first, then prefill chunks
    positions: torch.Tensor  # [T]
    decode_tables: torch.Tensor  # [B, W] block tables of decode sequences, padded with block 0
    decode_lens: torch.Tensor  # [B] context length including the new token
    prefill_meta: torch.Tensor  # [P, 2] (tokens in chunk, context length after it)
    prefill_tables: list[torch.Tensor]  # P block tables
    sample_rows: torch.Tensor  # [R] rows of the batch whose logits are needed
    seq_ids: torch.Tensor  # [B + P] the scheduled sequences (attention nodes key KV by them)
    # Longest decode context, read while decode_lens is still on the host (reading it from a
    # device tensor would sync the device every step).
    max_decode_len: int = -1

    def __post_init__(self) -> None:
        if self.max_decode_len < 0:
            self.max_decode_len = int(self.decode_lens.max()) if self.num_decodes else 0

    @property
    def num_decodes(self) -> int:
        return self.decode_lens.shape[0]

    def token_counts(self) -> list[int]:
        """Tokens each scheduled sequence brings this step (decodes 1, then prefill chunks)."""
        return [1] * self.num_decodes + self.prefill_meta[:, 0].tolist()

    def paged_step(self, block_size: int, gather_decode_keys: bool = True) -> PagedStep:
        """Slot mapping and per-sequence key slots for the paged attention backend.
        ``gather_decode_keys`` False (the Triton decode kernel, which reads the block tables
        itself): only each decode's write slot, not the [B, Lmax] slots of all its keys."""
        slot_mapping = []
        decode_slots = decode_lens = None
        if self.num_decodes:
            decode_lens = self.decode_lens
            last = decode_lens - 1
            if gather_decode_keys:
                p = torch.arange(self.max_decode_len, device=decode_lens.device)
                slots = self.decode_tables[:, p // block_size] * block_size + p % block_size
                # Padding points at position 0's slot: always written, so never garbage.
                decode_slots = torch.where(p[None, :] < decode_lens[:, None], slots, slots[:, :1])
                slot_mapping.append(slots.gather(1, last[:, None]).squeeze(1))
            else:
                slot_mapping.append(decode_write_slots(self.decode_tables, last + 1, block_size))
        chunks = []
        start = self.num_decodes
        for (n, context_len), table in zip(
            self.prefill_meta.tolist(), self.prefill_tables, strict=True
        ):
            slots = sequence_slots(table, context_len, block_size)
            slot_mapping.append(slots[context_len - n :])
            chunks.append(PrefillChunk(start, start + n, context_len, slots))
            start += n
        return PagedStep(
            slot_mapping=torch.cat(slot_mapping),
            num_decodes=self.num_decodes,
            decode_slots=decode_slots,
            decode_context_lens=decode_lens,
            prefills=chunks,
            decode_block_tables=self.decode_tables if self.num_decodes else None,
        )

    # -- flat encoding for the driver → worker broadcast --
    def header(self) -> list[int]:
        """Sizes a receiver needs to split the payload: [T, B, W, P, R]."""
        return [
            self.input_ids.shape[0],
            self.num_decodes,
            self.decode_tables.shape[1] if self.num_decodes else 0,
            len(self.prefill_tables),
            self.sample_rows.shape[0],
        ]

    def payload(self) -> torch.Tensor:
        parts = [
            self.input_ids,
            self.positions,
            self.decode_tables.reshape(-1),
            self.decode_lens,
            self.prefill_meta.reshape(-1),
            torch.tensor([t.shape[0] for t in self.prefill_tables], dtype=torch.long),
            *self.prefill_tables,
            self.sample_rows,
            self.seq_ids,
        ]
        return torch.cat(parts)

    def to(self, device: torch.device) -> StepInputs:
        """The same inputs on ``device`` (prefill_meta stays on the host: it is read there)."""
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return StepInputs(
            input_ids=move(self.input_ids),
            positions=move(self.positions),
            decode_tables=move(self.decode_tables),
            decode_lens=move(self.decode_lens),
            prefill_meta=self.prefill_meta,
            prefill_tables=[move(t) for t in self.prefill_tables],
            sample_rows=move(self.sample_rows),
            seq_ids=self.seq_ids,
            max_decode_len=self.max_decode_len,
        )

    @classmethod
    def decode(cls, header: list[int], payload: torch.Tensor) -> StepInputs:
        """Inverse of ``header()`` + ``payload()``; host tensors."""
        t, b, w, p, r = header
        sizes = [t, t, b * w, b, 2 * p, p]
        ids, pos, tables, lens, meta, table_lens, rest = payload.split(
            [*sizes, payload.numel() - sum(sizes)]
        )
        rest, seq_ids = rest.split([rest.numel() - b - p, b + p])
        prefill_tables = list(rest[: rest.numel() - r].split(table_lens.tolist()))
        return cls(
            input_ids=ids,
            positions=pos,
            decode_tables=tables.view(b, w),
            decode_lens=lens,
            prefill_meta=meta.view(p, 2),
            prefill_tables=prefill_tables,
            sample_rows=rest[rest.numel() - r :],
            seq_ids=seq_ids,
        )


def build_step_inputs(batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence]]:
    """Flatten a scheduled batch (driver side) into host tensors: they are broadcast to
    workers as they are, and copied to the device once. Also returns the sequences whose
    logits are computed (they reached the end of their known tokens), in row order."""
    ids: list[int] = []
    pos: list[int] = []
    rows: list[int] = []
    to_sample: list[Sequence] = []
    for i, s in enumerate(batch.decodes):
        ids.append(s.token_ids[s.num_computed_tokens])
        pos.append(s.num_computed_tokens)
        rows.append(i)
        to_sample.append(s)
    width = max((len(s.block_table) for s in batch.decodes), default=0)
    tables = [
        s.block_table + [s.block_table[0]] * (width - len(s.block_table)) for s in batch.decodes
    ]
    meta = []
    prefill_tables = []
    for seq, n in batch.prefills:
        c = seq.num_computed_tokens
        ids.extend(seq.token_ids[c : c + n])
        pos.extend(range(c, c + n))
        meta.append((n, c + n))
        prefill_tables.append(torch.tensor(seq.block_table, dtype=torch.long))
        if c + n == seq.num_tokens:
            rows.append(len(ids) - 1)
            to_sample.append(seq)
    long = dict(dtype=torch.long)
    inputs = StepInputs(
        input_ids=torch.tensor(ids, **long),
        positions=torch.tensor(pos, **long),
        decode_tables=torch.tensor(tables, **long).view(len(tables), width),
        decode_lens=torch.tensor([s.num_computed_tokens + 1 for s in batch.decodes], **long),
        prefill_meta=torch.tensor(meta, **long).view(len(meta), 2),
        prefill_tables=prefill_tables,
        sample_rows=torch.tensor(rows, **long),
        seq_ids=torch.tensor(
            [s.seq_id for s in batch.decodes] + [s.seq_id for s, _ in batch.prefills], **long
        ),
    )
    return inputs, to_sample
