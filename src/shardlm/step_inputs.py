"""One step's model inputs as plain integer tensors: built by the driver from the scheduled
sequences (engine/batching.py), sent unchanged to the other ranks (the payload of
distributed/protocol.py), and turned into attention metadata by each rank's attention
backend (``AttentionBackend.begin_step``).

Nothing here refers to sequences or requests, so a worker needs no scheduler state: the
block tables travel with the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADER_FIELDS = 7  # len(StepInputs.header())


@dataclass(frozen=True)
class MicroBatch:
    """A contiguous run of a step's scheduled sequences and of its rows (figure 2's overlap:
    the attention nodes attend one micro-batch of a layer while the compute side runs the
    dense work of the next)."""

    seqs: slice  # [s0, s1) of the scheduled sequences (decodes first, then prefills)
    rows: slice  # [r0, r1) of the flat batch


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
    # [B] where each decode's new K/V goes, when the caller fixed it (CUDA graphs: padding
    # rows write to the pool's padding slot); None: from the block tables.
    decode_write_slots: torch.Tensor | None = None
    # The same inputs on the host, when these are a device copy (``to``): backends that
    # plan on the host (attention nodes) read them there without a device sync.
    host: StepInputs | None = None
    # [T] the compute node of each row (figure 2, α > 1; host). None: every row is compute
    # node 0's.
    row_groups: torch.Tensor | None = None
    # [S] prefill rows whose logits are needed too, for prompt logprobs (after sample_rows).
    score_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.max_decode_len < 0:
            self.max_decode_len = int(self.decode_lens.max()) if self.num_decodes else 0

    @property
    def on_host(self) -> StepInputs:
        return self.host if self.host is not None else self

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def logit_rows(self) -> torch.Tensor:
        """Rows whose logits the step returns: the sampled ones, then the scored ones."""
        if self.score_rows is None or not self.score_rows.numel():
            return self.sample_rows
        return torch.cat([self.sample_rows, self.score_rows])

    def rows_of(self, group: int) -> torch.Tensor:
        """Rows (host indices, ascending) that compute node ``group`` computes."""
        groups = self.on_host.row_groups
        if groups is None:
            n = self.num_tokens if group == 0 else 0
            return torch.arange(n)
        return torch.nonzero(groups == group).flatten()

    def active_groups(self) -> list[int]:
        """Compute nodes with at least one row this step."""
        groups = self.on_host.row_groups
        if groups is None:
            return [0] if self.num_tokens else []
        return sorted(set(groups.tolist()))

    @classmethod
    def static_decodes(
        cls,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        context_lens: torch.Tensor,
        write_slots: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> StepInputs:
        """A step of single-token decodes held in fixed buffers (CUDA graphs, the start-up
        kernel check): no host reads, the write slots given."""
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            input_ids=input_ids,
            positions=positions,
            decode_tables=block_tables,
            decode_lens=context_lens,
            prefill_meta=empty.view(0, 2),
            prefill_tables=[],
            sample_rows=empty,
            seq_ids=empty,
            max_decode_len=0,
            decode_write_slots=write_slots,
        )

    @classmethod
    def prompt(cls, num_tokens: int) -> StepInputs:
        """One whole prompt as a single prefill chunk, with no block table (scoring on a
        contiguous cache): positions 0..num_tokens-1."""
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            input_ids=empty,  # the caller passes the ids to the model itself
            positions=torch.arange(num_tokens),
            decode_tables=empty.view(0, 0),
            decode_lens=empty,
            prefill_meta=torch.tensor([[num_tokens, num_tokens]]),
            prefill_tables=[empty],
            sample_rows=empty,
            seq_ids=empty,
        )

    @property
    def num_decodes(self) -> int:
        return self.decode_lens.shape[0]

    def micro_batches(self, m: int) -> list[MicroBatch]:
        """The step cut into at most ``m`` micro-batches of whole sequences, contiguous and
        balanced by tokens: each cut falls where the running token count first reaches its
        share k·T/m, leaving at least one sequence for every micro-batch after it. A step
        with fewer sequences than ``m`` gets one micro-batch per sequence. Whole sequences,
        because a query sees its own sequence's new keys: split at sequence boundaries, no
        micro-batch needs another's keys of the same layer. Computed from the host copy, the
        same on every rank."""
        counts = self.on_host.token_counts()
        n = min(m, len(counts))
        if n <= 1:
            return [MicroBatch(slice(0, len(counts)), slice(0, self.num_tokens))]
        total = sum(counts)
        out, s0, r0, row = [], 0, 0, 0
        for s, c in enumerate(counts):
            row += c
            k = len(out) + 1  # the micro-batch this sequence would close
            sequences_left = len(counts) - (s + 1)
            if k < n and (row * n >= k * total or sequences_left == n - k):
                out.append(MicroBatch(slice(s0, s + 1), slice(r0, row)))
                s0, r0 = s + 1, row
        out.append(MicroBatch(slice(s0, len(counts)), slice(r0, row)))
        return out

    def select(self, mb: MicroBatch) -> StepInputs:
        """The host inputs of one micro-batch alone, its rows renumbered from 0."""
        host = self.on_host
        b = host.num_decodes
        s0, s1 = mb.seqs.start, mb.seqs.stop
        r0, r1 = mb.rows.start, mb.rows.stop
        d = slice(min(s0, b), min(s1, b))
        p = slice(max(s0 - b, 0), max(s1 - b, 0))

        def rebased(rows: torch.Tensor | None) -> torch.Tensor | None:
            if rows is None:
                return None
            return rows[(rows >= r0) & (rows < r1)] - r0

        return StepInputs(
            input_ids=host.input_ids[r0:r1],
            positions=host.positions[r0:r1],
            decode_tables=host.decode_tables[d],
            decode_lens=host.decode_lens[d],
            prefill_meta=host.prefill_meta[p],
            prefill_tables=host.prefill_tables[p],
            sample_rows=rebased(host.sample_rows),
            seq_ids=host.seq_ids[s0:s1],
            row_groups=None if host.row_groups is None else host.row_groups[r0:r1],
            score_rows=rebased(host.score_rows),
        )

    def token_counts(self) -> list[int]:
        """Tokens each scheduled sequence brings this step (decodes 1, then prefill chunks)."""
        return [1] * self.num_decodes + self.prefill_meta[:, 0].tolist()

    # -- flat encoding for the driver → worker broadcast --
    def header(self) -> list[int]:
        """Sizes a receiver needs to split the payload: [T, B, W, P, R, G, S] (G: whether the
        rows' compute nodes follow; S: scored rows)."""
        return [
            self.input_ids.shape[0],
            self.num_decodes,
            self.decode_tables.shape[1] if self.num_decodes else 0,
            len(self.prefill_tables),
            self.sample_rows.shape[0],
            int(self.row_groups is not None),
            0 if self.score_rows is None else self.score_rows.shape[0],
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
        if self.row_groups is not None:
            parts.append(self.row_groups)
        if self.score_rows is not None:
            parts.append(self.score_rows)
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
            decode_write_slots=(
                None if self.decode_write_slots is None else move(self.decode_write_slots)
            ),
            host=self.on_host,
            row_groups=self.row_groups,
            score_rows=None if self.score_rows is None else move(self.score_rows),
        )

    @classmethod
    def decode(cls, header: list[int], payload: torch.Tensor) -> StepInputs:
        """Inverse of ``header()`` + ``payload()``; host tensors. ``header`` may carry
        trailing padding (the protocol's fixed-size header)."""
        t, b, w, p, r, g, n_scored = header[:HEADER_FIELDS]
        score_rows = row_groups = None
        if n_scored:
            payload, score_rows = payload.split([payload.numel() - n_scored, n_scored])
        if g:
            payload, row_groups = payload.split([payload.numel() - t, t])
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
            row_groups=row_groups,
            score_rows=score_rows,
        )
