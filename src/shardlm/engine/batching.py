"""Flattening a scheduled batch into the step's plain tensors (driver side)."""

from __future__ import annotations

import torch

from shardlm.engine.scheduler import ScheduledBatch
from shardlm.engine.sequence import Sequence
from shardlm.step_inputs import StepInputs


def build_step_inputs(
    batch: ScheduledBatch, compute_nodes: int = 1, compute_chunk_size: int = 16
) -> tuple[StepInputs, list[Sequence]]:
    """Flatten a scheduled batch (driver side) into host tensors: they are broadcast to
    workers as they are, and copied to the device once. Also returns the sequences whose
    logits are computed (they reached the end of their known tokens), in row order.

    With α = ``compute_nodes`` > 1 every row gets its compute node: a decode its sequence's,
    a prefill token at position p node (p // compute_chunk_size) % α, so a long prompt's
    dense work is divided α ways whatever sequence it belongs to."""
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
        row_groups=(
            row_groups(batch, pos, compute_nodes, compute_chunk_size) if compute_nodes > 1 else None
        ),
    )
    return inputs, to_sample


def row_groups(
    batch: ScheduledBatch, positions: list[int], compute_nodes: int, run: int
) -> torch.Tensor:
    """The compute node of each row: decodes on their sequence's, prefill positions dealt in
    runs of ``run``."""
    groups = torch.tensor(positions, dtype=torch.long) // run % compute_nodes
    b = len(batch.decodes)
    groups[:b] = torch.tensor([s.compute_node or 0 for s in batch.decodes], dtype=torch.long)
    return groups
