"""Speculative decoding's two pure pieces: proposing draft tokens by n-gram lookup in a
sequence's own context, and verifying a row's k drafts against the target model's k + 1
distributions so that what comes out is distributed exactly as the target alone would
produce (greedy: the very same tokens).

The engine (llm_engine.py) wires them: the scheduler reserves draft slots for a decode
(``ScheduledBatch.lookahead``), a proposer fills ``Sequence.draft_ids`` (``NgramProposer``
here, ``DraftModelProposer`` in draft_model.py), the step runs the drafts as extra decode rows
(batching.py), ``sample_and_verify`` turns the k + 1 rows of logits into the tokens to append,
and the engine rolls back what was rejected (scheduler.trim_blocks; attention nodes truncate
a sequence that continues before what they hold).

Verification, per row, drafts x_1..x_k and target distributions p_1..p_{k+1} (p_i is the
target's distribution for the token at draft position i, given the context and
x_1..x_{i−1}):

* greedy: accept x_i while x_i = argmax p_i; the first mismatch position i emits argmax p_i
  instead, and if all k match, argmax p_{k+1} follows (the "bonus" token). Exactly the
  tokens plain greedy decoding makes.
* random (Leviathan et al. 2023; Chen et al. 2023): x_i was drawn from the draft's q_i.
  Accept it with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection emit a
  token from the residual r(y) = max(0, p_i(y) − q_i(y)) / Σ_z max(0, p_i(z) − q_i(z)) and
  stop; if all k are accepted, draw the bonus token from p_{k+1}. Why the output is p_i:

      P(y) = q(y)·min(1, p(y)/q(y))  +  (1 − Σ_x q(x)·min(1, p(x)/q(x))) · r(y)
           = min(p(y), q(y))        +  Σ_x max(0, p(x) − q(x)) · r(y)
           = min(p(y), q(y))        +  max(0, p(y) − q(y))          = p(y),

  using 1 − Σ min(p, q) = Σ max(0, p − q). An n-gram draft is deterministic: q_i is
  one-hot at x_i, so x_i is accepted with probability p_i(x_i) and the residual is p_i
  without x_i, renormalised.

Random numbers come from each row's own generator (k uniforms, then one exponential race
over the vocabulary for the emitted token, as the sampler draws). How many drafts a step
verifies depends on the batch (its size, free blocks), and with it how much of the generator
the step uses: so the engine does not speculate for seeded sampled requests (can_speculate),
which keep their promise of the same tokens whatever shares their batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from shardlm.engine.logits_processors import has_constraints
from shardlm.engine.sampler import Logprob, SamplingRow, logprob_entries, sample, sampling_probs
from shardlm.engine.sampling_params import SamplingParams
from shardlm.speculative_config import SpeculativeConfig

if TYPE_CHECKING:
    from shardlm.engine.sequence import Sequence as Seq


def ngram_propose(tokens: Sequence[int], k: int, max_n: int, min_n: int = 1) -> list[int]:
    """Prompt lookup: for n from ``max_n`` down to ``min_n``, find the most recent earlier
    occurrence of the context's last n tokens and propose the (up to) k tokens that followed
    it; [] when no suffix of those lengths occurred before."""
    if k < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"need k ≥ 1 and 1 ≤ min_n ≤ max_n, got k={k}, {min_n}..{max_n}")
    length = len(tokens)
    if length < min_n + 1:
        return []
    context = torch.tensor(tokens, dtype=torch.long)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = context[length - n :]
        # Windows starting at 0 .. length − n − 1: every earlier occurrence (the suffix itself
        # starts at length − n and is left out).
        windows = context[: length - 1].unfold(0, n, 1)
        hits = torch.nonzero((windows == suffix).all(dim=1)).flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start : start + k].tolist()
    return []


@dataclass
class Verified:
    """Per row: the tokens to append (accepted drafts, then one more) and how many drafts
    were accepted."""

    tokens: list[list[int]]
    accepted: list[int]


def verify_greedy(target_argmax: torch.Tensor, drafts: list[list[int]]) -> Verified:
    """``target_argmax`` [B, k + 1]: the target's argmax at each draft position and after the
    last; rows may carry fewer than k drafts (their tail of ``target_argmax`` is unused)."""
    best = target_argmax.tolist()
    tokens, accepted = [], []
    for row, draft in zip(best, drafts, strict=True):
        n = 0
        while n < len(draft) and draft[n] == row[n]:
            n += 1
        tokens.append([*draft[:n], row[n]])
        accepted.append(n)
    return Verified(tokens, accepted)


def verify_random(
    target_probs: torch.Tensor,
    drafts: list[list[int]],
    generators: Sequence[torch.Generator | None],
    draft_probs: torch.Tensor | None = None,
) -> Verified:
    """``target_probs`` [B, k + 1, V] (the sampler's distributions, ``sampling_probs``, need
    not be normalised); ``drafts`` per row (≤ k tokens); ``draft_probs`` [B, k, V] the
    draft model's distributions, or None for deterministic (n-gram) drafts; each row's
    generator (None: the default one)."""
    p = target_probs.float()
    p = p / p.sum(dim=-1, keepdim=True)
    tokens, accepted = [], []
    for b, draft in enumerate(drafts):
        gen = generators[b]
        device = p.device
        u = torch.rand(len(draft), generator=gen, device=device) if draft else None
        out: list[int] = []
        residual = None
        for i, x in enumerate(draft):
            target = p[b, i]
            if draft_probs is None:
                q_x = 1.0
                q = None
            else:
                q = draft_probs[b, i].float()
                q = q / q.sum()
                q_x = float(q[x])
            # Accept with probability min(1, p(x) / q(x)): u < p(x) / q(x).
            if q_x > 0 and float(u[i]) * q_x < float(target[x]):
                out.append(x)
                continue
            if q is None:
                residual = target.clone()
                residual[x] = 0.0
            else:
                residual = (target - q).clamp_(min=0.0)
            if float(residual.sum()) <= 0.0:  # p ≤ q everywhere: only rounding got here
                residual = target
            break
        n = len(out)
        final = residual if residual is not None else p[b, n]
        out.append(draw(final, gen))
        tokens.append(out)
        accepted.append(n)
    return Verified(tokens, accepted)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised ``probs`` [V] by the sampler's exponential race."""
    e = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / e.clamp_(min=torch.finfo(e.dtype).tiny)).argmax())


# -- the engine's side --
def can_speculate(params: SamplingParams, has_grammar: bool) -> bool:
    """Whether a request may use drafts. Penalties, logit_bias / min_tokens /
    allowed_token_ids / bad_words and structured outputs change the distribution with every
    token appended (counts, banned continuations, grammar state), which the k + 1 rows of one
    verify step cannot see: such requests decode one token a step (in the same batch, exact).
    Seeded sampled requests too (see below). ``speculative=False`` opts a request out."""
    return (
        params.speculative
        and not has_grammar
        and not params.has_penalties
        and not has_constraints(params)
        # A seeded sampled request must give the same tokens whatever its neighbours; how
        # many drafts it gets (batch size, free blocks) decides how much of its generator a
        # step uses, so it decodes plainly. Seeded greedy requests use no random numbers.
        and (params.seed is None or params.greedy)
    )


def draft_slots(seq: Seq, spec: SpeculativeConfig, queued: int, max_model_len: int) -> int:
    """Drafts a decoding sequence may have this step: none when the sequences running or
    waiting (``queued``) reach ``disable_by_batch_size`` — counting the waiting ones too, so
    a burst of requests turns drafts off before the batch has filled, not after a ramp of
    steps that speculated — or when the request cannot speculate; never so many that the step
    could pass max_tokens or max_model_len (a step appends at most drafts + 1 tokens)."""
    limit = spec.disable_by_batch_size
    if (limit is not None and queued >= limit) or not can_speculate(
        seq.params, seq.grammar is not None
    ):
        return 0
    left = max_model_len - seq.num_tokens - 1
    if seq.params.max_tokens is not None:
        left = min(left, seq.params.max_tokens - seq.num_output_tokens - 1)
    return max(0, min(spec.num_speculative_tokens, left))


class Proposer(Protocol):
    """Fills ``seq.draft_ids`` (at most ``slots[seq]`` tokens) for the step's decodes; returns
    the draft distributions [k, V] of sampled (non-greedy) rows whose drafts were drawn
    from a model (None for deterministic drafts)."""

    def propose(self, slots: dict[Seq, int]) -> dict[Seq, torch.Tensor]: ...

    def release(self, seq_ids: list[int]) -> None: ...


class NgramProposer:
    """Prompt lookup (``ngram_propose``) in each sequence's own tokens; no state."""

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.max_n, self.min_n = spec.prompt_lookup_max, spec.prompt_lookup_min

    def propose(self, slots: dict[Seq, int]) -> dict[Seq, torch.Tensor]:
        for seq, k in slots.items():
            seq.draft_ids = ngram_propose(seq.token_ids, k, self.max_n, self.min_n)
        return {}

    def release(self, seq_ids: list[int]) -> None:
        pass


@dataclass
class SpecStats:
    """Counters of speculative decoding (engine.stats, /metrics)."""

    draft_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # of which accepted
    # accepted_per_position[i]: drafts accepted at position i + 1 (of draft_per_position[i])
    accepted_per_position: list[int] = field(default_factory=list)
    draft_per_position: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        grow = drafted - len(self.draft_per_position)
        if grow > 0:
            self.draft_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(drafted):
            self.draft_per_position[i] += 1
            self.accepted_per_position[i] += int(i < accepted)


@dataclass
class RowResult:
    """What one sampled sequence gets from a step: its new tokens (1, or accepted drafts
    + 1), their logprobs (or Nones), and how many drafts were accepted."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob] | None]
    accepted: int = 0


def sample_and_verify(
    logits: torch.Tensor,
    seqs: list[Seq],
    rows: list[SamplingRow],
    draft_probs: dict[Seq, torch.Tensor],
) -> list[RowResult]:
    """``logits`` [N, V]: per sequence in order, 1 + len(seq.draft_ids) rows (its token,
    then each draft). Sequences without drafts are sampled as usual (every sampler feature);
    those with drafts are verified (greedy or rejection sampling, module docstring), their
    logprobs read from the raw rows of the tokens emitted."""
    counts = [1 + len(s.draft_ids) for s in seqs]
    starts = [sum(counts[:i]) for i in range(len(seqs))]
    results: list[RowResult | None] = [None] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if not s.draft_ids]
    if plain:
        idx = torch.tensor([starts[i] for i in plain], device=logits.device)
        out = sample(logits[idx], [rows[i] for i in plain])
        for i, token, lps in zip(plain, out.token_ids.tolist(), out.logprobs, strict=True):
            results[i] = RowResult([token], [lps])
    drafted = [i for i, s in enumerate(seqs) if s.draft_ids]
    if not drafted:
        return results  # type: ignore[return-value]
    greedy_rows = [i for i in drafted if rows[i].params.greedy]
    if greedy_rows:
        flat = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in greedy_rows])
        best = logits[flat.to(logits.device)].argmax(dim=-1).tolist()
        at = 0
        for i in greedy_rows:
            row_best = best[at : at + counts[i]]
            at += counts[i]
            v = verify_greedy(torch.tensor([row_best]), [seqs[i].draft_ids])
            results[i] = RowResult(v.tokens[0], [], v.accepted[0])
    for i in drafted:
        if results[i] is not None:
            continue
        span = logits[starts[i] : starts[i] + counts[i]]
        probs = sampling_probs(span, [rows[i]] * counts[i])
        q = draft_probs.get(seqs[i])
        v = verify_random(
            probs[None], [seqs[i].draft_ids], [rows[i].generator], None if q is None else q[None]
        )
        results[i] = RowResult(v.tokens[0], [], v.accepted[0])
    for i in drafted:
        res, k = results[i], rows[i].params.logprobs
        if k is None:
            res.logprobs = [None] * len(res.tokens)
            continue
        span = logits[starts[i] : starts[i] + len(res.tokens)]
        tokens = torch.tensor(res.tokens, device=logits.device)
        res.logprobs = logprob_entries(
            torch.log_softmax(span, dim=-1), tokens, [k] * len(res.tokens)
        )
    return results  # type: ignore[return-value]
