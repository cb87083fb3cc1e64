"""Drafts from a smaller model (speculative decoding, ``"method": "draft_model"``).

The draft runs on the driver only, unsharded, on the driver's device, whatever the target's
tensor parallelism or attention nodes: it is small, and its tokens are all the other ranks
need (they travel as decode rows of the verify step). It has its own paged KV pool and block
allocator, beside the target's: as many token slots as the target's pool (the KV of a
draft is a fraction of the target's per token), allocated after the target's, so on a GPU
it comes out of the memory ``memory_utilization`` left free (docs/architecture.md).

Each step, for every sequence with draft slots: one forward catches the draft up on the
sequence's tokens it has not seen (the whole prompt the first time; after a verify step the
accepted drafts and the new token) and yields draft 1; then k − 1 single-row decodes yield
the rest. The draft's K/V stays valid up to where its tokens equal the sequence's verified
tokens: min(what it computed, the target's computed tokens) — the rollback is that one
``min`` at the next step. A sequence the draft pool cannot hold gets no drafts that step;
one far behind (a long prompt) catches up over several steps, at most
``max_num_batched_tokens`` tokens a step, with no drafts until level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shardlm.cache.block_manager import BlockManager
from shardlm.config import ModelConfig
from shardlm.engine.batching import padded_tables
from shardlm.engine.sampler import SamplingRow, sampling_probs
from shardlm.engine.speculative import draw
from shardlm.engine_config import EngineConfig
from shardlm.errors import ParamError
from shardlm.runtime.runner import ModelRunner
from shardlm.step_inputs import StepInputs
from shardlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from shardlm.engine.sequence import Sequence

FIELD = "speculative_config.model"


@dataclass
class _DraftSeq:
    """What the draft holds of one sequence."""

    block_table: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose K/V is in the draft's pool


def check_draft(
    path: str, draft: ModelConfig, target: ModelConfig, tokenizer: Tokenizer | None
) -> None:
    """A draft must speak the target's vocabulary: same size, same tokenizer (its tokens are
    verified as the target's token ids)."""
    if draft.vocab_size != target.vocab_size:
        raise ParamError(
            FIELD,
            f"{FIELD}: the draft's vocab_size {draft.vocab_size} differs from the target's "
            f"{target.vocab_size}; a draft must share the target's tokenizer",
        )
    if tokenizer is None:
        return
    try:
        own = Tokenizer.from_pretrained(path)
    except Exception as e:  # no tokenizer files, or unreadable ones
        raise ParamError(FIELD, f"{FIELD}: cannot read the draft's tokenizer ({e})") from None
    mine = own.backend_tokenizer.get_vocab(with_added_tokens=True)
    theirs = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise ParamError(
            FIELD,
            f"{FIELD}: the draft's tokenizer differs from the target's ({differ} vocabulary "
            "entries differ); a draft must share the target's tokenizer",
        )


class DraftModelProposer:
    """The engine's proposer for ``"method": "draft_model"`` (see the module docstring)."""

    def __init__(
        self,
        engine: EngineConfig,
        target: ModelConfig,
        tokenizer: Tokenizer | None,
        device: torch.device,
        num_tokens: int,
    ) -> None:
        spec = engine.speculative.config
        path = spec.model
        draft = ModelConfig.from_pretrained(path)
        check_draft(path, draft, target, tokenizer)
        max_len = engine.model.max_model_len
        if draft.max_context < max_len:
            raise ParamError(
                FIELD,
                f"{FIELD}: the draft's longest context {draft.max_context} "
                f"is below the target's max_model_len {max_len}; lower max_model_len",
            )
        block_size = engine.cache.block_size
        config = EngineConfig.from_kwargs(
            "speculative_config",
            model=path,
            dtype=engine.model.dtype,
            device=str(device),
            max_model_len=max_len,
            block_size=block_size,
            kv_cache_dtype=engine.cache.kv_cache_dtype,  # the draft's KV as the target's
            attention_backend="torch",
        ).resolve()
        self.runner = ModelRunner(config, draft, device)
        num_blocks = max(1, num_tokens // block_size)
        self.runner.init_kv_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.state: dict[int, _DraftSeq] = {}
        # Tokens one step's catch-up forward may take (as the target's step budget).
        self.catch_up_budget = engine.scheduler.max_num_batched_tokens

    def release(self, seq_ids: list[int]) -> None:
        """Sequences the scheduler freed (finished, aborted, preempted): drop their K/V."""
        for seq_id in seq_ids:
            st = self.state.pop(seq_id, None)
            if st is not None:
                self.blocks.free(st.block_table)

    def propose(self, slots: dict[Sequence, int]) -> dict[Sequence, torch.Tensor]:
        """Fill each sequence's draft_ids (module docstring); the draft distributions [k, V]
        of the sampled rows."""
        active: list[tuple[Sequence, int, _DraftSeq]] = []
        behind: list[tuple[Sequence, int, _DraftSeq]] = []  # (seq, tokens to catch up, state)
        budget = self.catch_up_budget
        for seq, k in slots.items():
            seq.draft_ids = []
            st = self.state.setdefault(seq.seq_id, _DraftSeq())
            st.computed = min(st.computed, seq.num_computed_tokens)
            unseen = seq.num_tokens - st.computed
            # A long way behind (a new prompt): catch up in chunks of the step's token budget
            # over several steps, with no drafts until level, as the target prefills.
            end = seq.num_tokens + k - 1 if unseen <= budget else st.computed + budget
            need = self.blocks.blocks_needed(end) - len(st.block_table)
            if budget <= 0 or need > self.blocks.num_free_blocks:
                continue  # no room this step: this sequence decodes plainly
            if need > 0:
                st.block_table += self.blocks.allocate(need)
            if unseen <= budget:
                active.append((seq, k, st))
                budget -= unseen
            else:
                behind.append((seq, budget, st))
                budget = 0
        if not active and not behind:
            return {}
        rows = [SamplingRow(seq.params, seq.generator, (), ()) for seq, _, _ in active]
        probs: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq, _, _ in active}
        # Catch up on the tokens the draft has not seen; the last row of a sequence that is
        # level now yields its draft 1.
        logits = self.runner.run(_catch_up_step(active, behind))
        if active:
            self._take(logits, active, rows, probs)
        for seq, _, st in active:
            st.computed = seq.num_tokens
        for _, n, st in behind:
            st.computed += n
        for i in range(1, max((k for _, k, _ in active), default=1)):
            going = [j for j, (_, k, _) in enumerate(active) if k > i]
            logits = self.runner.run(_decode_step([active[j] for j in going]))
            self._take(logits, [active[j] for j in going], [rows[j] for j in going], probs)
            for j in going:
                active[j][2].computed += 1
        return {seq: torch.stack(qs) for seq, qs in probs.items() if qs}

    @staticmethod
    def _take(
        logits: torch.Tensor,
        active: list[tuple[Sequence, int, _DraftSeq]],
        rows: list[SamplingRow],
        probs: dict[Sequence, list[torch.Tensor]],
    ) -> None:
        """One draft token per row: the argmax for greedy requests, else a draw from the
        request's sampling distribution (kept: verification needs q)."""
        best = logits.argmax(dim=-1).tolist()
        for j, (seq, _, _) in enumerate(active):
            if rows[j].params.greedy:
                seq.draft_ids.append(best[j])
                continue
            q = sampling_probs(logits[j : j + 1], [rows[j]])[0]
            seq.draft_ids.append(draw(q, rows[j].generator))
            probs[seq].append(q)


def _catch_up_step(
    active: list[tuple[Sequence, int, _DraftSeq]], behind: list[tuple[Sequence, int, _DraftSeq]]
) -> StepInputs:
    """Each active sequence's unseen tokens as one prefill chunk (logits at its last row),
    then the next ``n`` unseen tokens of each sequence still behind (no logits)."""
    ids, pos, meta, tables, rows = [], [], [], [], []
    chunks = [(seq, st, seq.num_tokens - st.computed) for seq, _, st in active]
    chunks += [(seq, st, n) for seq, n, st in behind]
    for i, (seq, st, n) in enumerate(chunks):
        ids += seq.token_ids[st.computed : st.computed + n]
        pos += range(st.computed, st.computed + n)
        meta.append((n, st.computed + n))
        tables.append(torch.tensor(st.block_table, dtype=torch.long))
        if i < len(active):
            rows.append(len(ids) - 1)
    long = dict(dtype=torch.long)
    return StepInputs(
        input_ids=torch.tensor(ids, **long),
        positions=torch.tensor(pos, **long),
        decode_tables=torch.zeros(0, 0, **long),
        decode_lens=torch.zeros(0, **long),
        prefill_meta=torch.tensor(meta, **long).view(-1, 2),
        prefill_tables=tables,
        sample_rows=torch.tensor(rows, **long),
        seq_ids=torch.tensor([seq.seq_id for seq, _, _ in chunks], **long),
    )


def _decode_step(active: list[tuple[Sequence, int, _DraftSeq]]) -> StepInputs:
    """Each sequence's latest draft as one decode row."""
    long = dict(dtype=torch.long)
    pos = [st.computed for *_, st in active]
    return StepInputs(
        input_ids=torch.tensor([seq.draft_ids[-1] for seq, _, _ in active], **long),
        positions=torch.tensor(pos, **long),
        decode_tables=padded_tables([st.block_table for *_, st in active]),
        decode_lens=torch.tensor([p + 1 for p in pos], **long),
        prefill_meta=torch.zeros(0, 2, **long),
        prefill_tables=[],
        sample_rows=torch.arange(len(active)),
        seq_ids=torch.tensor([seq.seq_id for seq, _, _ in active], **long),
    )
