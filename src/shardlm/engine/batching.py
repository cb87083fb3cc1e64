"""Flattening a scheduled batch into the step's plain tensors (driver side)."""

from __future__ import annotations

import torch

from shardlm.engine.logits_processors import has_constraints, row_constraints
from shardlm.engine.sampler import SamplingRow
from shardlm.engine.scheduler import ScheduledBatch
from shardlm.engine.sequence import Sequence
from shardlm.step_inputs import StepInputs


def build_step_inputs(
    batch: ScheduledBatch,
    compute_nodes: int = 1,
    compute_chunk_size: int = 16,
    verify_as_chunks: bool = False,
) -> tuple[StepInputs, list[Sequence], list[tuple[Sequence, int]]]:
    """Flatten a scheduled batch (driver side) into host tensors: they are broadcast to
    workers as they are, and copied to the device once. Also returns the sequences whose
    logits are computed (they reached the end of their known tokens), in row order, and the
    scored rows (prompt logprobs): (sequence, position of the prompt token the row's logits
    predict), in ``score_rows`` order.

    A decode with k drafts (speculative decoding) computes its last token and the drafts, at
    consecutive positions, with logits at all k + 1 rows: each row sees keys up to its own
    position, so one forward gives the target's distribution after every draft prefix
    (engine/speculative.py). As k + 1 decode rows of the same sequence (the default: the
    rows write their K/V before any attends; the Triton decode kernel and CUDA graphs take
    them as they are), or, ``verify_as_chunks``, as one chunk of k + 1 tokens like a prefill
    chunk (on CPU one attention call over the sequence's keys gathered once is cheaper than
    k + 1 single-query ones: docs/benchmarks.md).

    With α = ``compute_nodes`` > 1 every row gets its compute node: a decode its sequence's
    node a, a prefill token at position p node (p // compute_chunk_size + a) % α, so a long
    prompt's dense work is divided α ways whatever sequence it belongs to."""
    ids: list[int] = []
    pos: list[int] = []
    rows: list[int] = []
    to_sample: list[Sequence] = []
    decode_seqs: list[Sequence] = []  # one per decode row
    chunks: list[tuple[Sequence, int]] = []  # verify chunks, then prefill chunks
    for s in batch.decodes:
        if s.draft_ids and verify_as_chunks:
            chunks.append((s, 1 + len(s.draft_ids)))
            continue
        c = s.num_computed_tokens
        run = [s.token_ids[c], *s.draft_ids]
        rows.extend(range(len(ids), len(ids) + len(run)))
        ids.extend(run)
        pos.extend(range(c, c + len(run)))
        decode_seqs.extend([s] * len(run))
        to_sample.append(s)
    tables = padded_tables([s.block_table for s in decode_seqs])
    meta = []
    prefill_tables = []
    score_rows: list[int] = []
    scored: list[tuple[Sequence, int]] = []
    for seq, n in chunks + batch.prefills:
        c = seq.num_computed_tokens
        if seq.draft_ids:  # a verify chunk: every row's logits
            rows.extend(range(len(ids), len(ids) + n))
            ids.extend([seq.token_ids[c], *seq.draft_ids])
            to_sample.append(seq)
        else:
            if seq.prompt_logprobs is not None:
                # The row at position p predicts the prompt token at p + 1 (if not known yet).
                for p in range(c, min(c + n, seq.num_prompt_tokens - 1)):
                    if seq.prompt_logprobs[p + 1] is None:
                        score_rows.append(len(ids) + p - c)
                        scored.append((seq, p + 1))
            ids.extend(seq.token_ids[c : c + n])
            if c + n == seq.num_tokens:
                rows.append(len(ids) - 1)
                to_sample.append(seq)
        pos.extend(range(c, c + n))
        meta.append((n, c + n))
        prefill_tables.append(torch.tensor(seq.block_table, dtype=torch.long))
    long = dict(dtype=torch.long)
    chunked = chunks + batch.prefills
    inputs = StepInputs(
        input_ids=torch.tensor(ids, **long),
        positions=torch.tensor(pos, **long),
        decode_tables=tables,
        decode_lens=torch.tensor([p + 1 for p in pos[: len(decode_seqs)]], **long),
        prefill_meta=torch.tensor(meta, **long).view(len(meta), 2),
        prefill_tables=prefill_tables,
        sample_rows=torch.tensor(rows, **long),
        seq_ids=torch.tensor(
            [s.seq_id for s in decode_seqs] + [s.seq_id for s, _ in chunked], **long
        ),
        row_groups=(
            row_groups(decode_seqs, chunked, pos, compute_nodes, compute_chunk_size)
            if compute_nodes > 1
            else None
        ),
        score_rows=torch.tensor(score_rows, **long) if score_rows else None,
    )
    return inputs, to_sample, scored


def padded_tables(tables: list[list[int]]) -> torch.Tensor:
    """Decode rows' block tables as one [B, W] tensor, each padded with its own first block
    (a valid block of the same sequence; the padding is never attended)."""
    width = max((len(t) for t in tables), default=0)
    rows = [t + [t[0]] * (width - len(t)) for t in tables]
    return torch.tensor(rows, dtype=torch.long).view(len(tables), width)


def row_groups(
    decode_rows: list[Sequence],
    prefills: list[tuple[Sequence, int]],
    positions: list[int],
    compute_nodes: int,
    run: int,
) -> torch.Tensor:
    """The compute node of each row: decode rows (a sequence's token and drafts) on their
    sequence's; prefill positions dealt in runs of ``run``, starting at the sequence's own
    node — so a prompt shorter than a run prefills where the sequence was placed (by load),
    and a batch of short prompts spreads like their sequences do."""
    home = [s.compute_node or 0 for s in decode_rows]
    for seq, n in prefills:
        home += [seq.compute_node or 0] * n
    pos = torch.tensor(positions, dtype=torch.long)
    groups = (pos // run + torch.tensor(home, dtype=torch.long)) % compute_nodes
    b = len(decode_rows)
    groups[:b] = torch.tensor(home[:b], dtype=torch.long)
    return groups


def sampling_rows(seqs: list[Sequence], stop_ids: set[int]) -> list[SamplingRow]:
    """The sampler's view of each sequence to sample. Token lists only for rows with
    penalties (the sampler reads them for no other): slicing every sequence's context each
    step would cost O(context) per token."""
    rows = []
    for s in seqs:
        params = s.params
        penalised = params.has_penalties
        rows.append(
            SamplingRow(
                params,
                s.generator,
                s.token_ids[: s.num_prompt_tokens] if penalised else (),
                s.output_ids if penalised else (),
                constraints=(
                    row_constraints(s, stop_ids, s.request.bad_words)
                    if has_constraints(params)
                    else None
                ),
                grammar=s.grammar,
            )
        )
    return rows
