"""Flattening a scheduled batch into the step's plain tensors (driver side)."""

from __future__ import annotations

import torch

from shardlm.engine.scheduler import ScheduledBatch
from shardlm.engine.sequence import Sequence
from shardlm.step_inputs import StepInputs


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
