"""Batched next-token selection: one call turns an engine step's logits [N, V] into N tokens.

Order of operations, as in vLLM: logprobs are read from the raw distribution; then penalties;
then the grammar masks of structured outputs (disallowed tokens to -inf); then greedy rows
take the argmax, and the others divide by temperature, apply top-k, top-p and min-p, and draw
with the exponential race (argmax of probs / q, q ~ Exp(1)). Each row's random numbers come
only from its own generator, one draw of V values per step, so a seeded request yields the
same tokens whatever else shares the batch. Everything stays on the logits' device;
the only host transfers are the per-row settings (and grammar bitmasks) going in and the
logprobs coming out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from shardlm.engine.logits_processors import RowConstraints, apply_constraints
from shardlm.engine.sampling_params import SamplingParams
from shardlm.structured.masks import apply_grammar_masks
from shardlm.structured.state import GrammarState

__all__ = [
    "Logprob",
    "SamplerOutput",
    "SamplingRow",
    "apply_penalties",
    "logprob_entries",
    "sample",
    "sampling_probs",
]


@dataclass
class Logprob:
    """One token's log-probability under the raw model distribution."""

    logprob: float
    rank: int  # 1 = most likely under the raw distribution (ties share a rank)
    decoded_token: str | None = None  # filled in by the engine, which owns the tokenizer


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the step."""

    params: SamplingParams
    generator: torch.Generator  # the request's own (seeded) or the engine's; on the logits' device
    prompt_ids: Sequence[int]  # for repetition_penalty
    output_ids: Sequence[int]  # generated so far, for all three penalties
    # logit_bias, min_tokens, allowed_token_ids, bad_words for this step (or None).
    constraints: RowConstraints | None = None
    grammar: GrammarState | None = None  # structured outputs: the tokens allowed next


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64, on the logits' device
    # Per row: None if params.logprobs is None, else {sampled id: Logprob, plus the top-k ids}.
    logprobs: list[dict[int, Logprob] | None]


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
    """Pick one token per row of ``logits`` [N, V] (float32) following each row's params.

    ``logits`` is not modified.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
    want_logprobs = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    # Logprobs describe what the model said, so they are taken before anything reshapes it.
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    logits = apply_penalties(logits, rows)
    logits = apply_constraints(logits, [row.constraints for row in rows])
    # Structured outputs: tokens the row's grammar forbids go to -inf (after the penalties,
    # before any choice, so temperature / top-k / top-p act on the allowed tokens only).
    logits = apply_grammar_masks(logits, [row.grammar for row in rows])

    random = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not random:
        token_ids = logits.argmax(dim=-1)
    elif len(random) == len(rows):
        token_ids = _sample_random(logits, rows)
    else:
        token_ids = logits.argmax(dim=-1)
        idx = torch.tensor(random, device=logits.device)
        token_ids[idx] = _sample_random(logits[idx], [rows[i] for i in random])

    logprobs: list[dict[int, Logprob] | None] = [None] * len(rows)
    if raw_logprobs is not None:
        _fill_logprobs(logprobs, raw_logprobs, token_ids, rows, want_logprobs)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Return ``logits`` [N, V] with each row's repetition / presence / frequency penalties.

    Repetition penalty r, on every token of prompt ∪ output: logit / r if logit > 0 else
    logit · r. Then, on output tokens: logit -= p·[count > 0] + f·count. Rows without penalties
    are returned bit for bit; when no row has any, ``logits`` itself is returned (no copy).
    """
    penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not penalised:
        return logits
    n_rows, vocab = len(penalised), logits.shape[1]
    device = logits.device
    sel = [rows[i] for i in penalised]

    # Occurrence counts via one scatter_add over flat indices (row · V + token), built from the
    # concatenated id lists: no padding, and no Python loop over tokens.
    counts = torch.zeros(n_rows * vocab, dtype=logits.dtype, device=device)
    out_idx = _flat_indices([row.output_ids for row in sel], vocab, device)
    counts.scatter_add_(0, out_idx, torch.ones_like(out_idx, dtype=logits.dtype))
    counts = counts.view(n_rows, vocab)
    seen = counts > 0
    # The prompt only matters to rows with a repetition penalty; leave the others' out.
    prompts = [row.prompt_ids if row.params.repetition_penalty != 1.0 else () for row in sel]
    if any(len(p) for p in prompts):
        in_prompt = torch.zeros(n_rows * vocab, dtype=torch.bool, device=device)
        in_prompt.index_fill_(0, _flat_indices(prompts, vocab, device), True)
        seen_any = seen | in_prompt.view(n_rows, vocab)
    else:
        seen_any = seen

    cfg = torch.tensor(
        [
            [r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty]
            for r in sel
        ],
        dtype=logits.dtype,
        device=device,
    )
    rep, presence, frequency = (c.unsqueeze(1) for c in cfg.unbind(1))

    idx = torch.tensor(penalised, device=device)
    x = logits[idx]
    x = torch.where(seen_any, torch.where(x > 0, x / rep, x * rep), x)
    x = x - (presence * seen + frequency * counts)
    return logits.index_copy(0, idx, x)


def _flat_indices(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Concatenate token ids of several rows as flat indices row · vocab + id (int64)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long)
    offsets = torch.arange(len(seqs), dtype=torch.long) * vocab
    return (ids + torch.repeat_interleave(offsets, lengths)).to(device)


def _sample_random(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Draw one token per row of the (penalised) logits [M, V] of non-greedy rows → [M] int64."""
    probs = sampling_probs(logits, rows)
    m, vocab = logits.shape
    # Exponential race: with q_i ~ Exp(1) independent, argmax_i p_i / q_i is distributed as p
    # (P(p_i / q_i is largest) = p_i / Σp), so unnormalised probs are fine. q is clamped away
    # from 0 so a removed token (p = 0) can never become 0/0 = NaN, which argmax would pick.
    q = _exponentials(rows, m, vocab, logits.device)
    return probs.div_(q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution each non-greedy row draws from, [M, V] (rows sum to 1 unless min_p
    removed mass): the (penalised) logits through temperature, top-k, top-p and min-p. What
    speculative decoding verifies drafts against (engine/speculative.py)."""
    vocab = logits.shape[1]
    params = [row.params for row in rows]
    # All per-row settings in one host→device copy. top_k 0 (off) becomes V; float32 holds any
    # realistic vocabulary size exactly.
    cfg = torch.tensor(
        [
            [p.temperature, p.top_k if 0 < p.top_k < vocab else vocab, p.top_p, p.min_p]
            for p in params
        ],
        dtype=torch.float32,
        device=logits.device,
    )
    temperature, top_k, top_p, min_p = (c.unsqueeze(1) for c in cfg.unbind(1))

    x = logits / temperature
    use_top_k = any(0 < p.top_k < vocab for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        x = _top_k_top_p(x, top_k.long() if use_top_k else None, top_p if use_top_p else None)
    probs = torch.softmax(x, dim=-1)
    if any(p.min_p > 0.0 for p in params):
        # min_p 0 gives threshold 0, which no probability is below: those rows are untouched.
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(
    x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    if top_k is not None:
        # Value-based cut: tokens tied with the k-th largest are kept too (as vLLM does).
        kth = sorted_x.gather(1, top_k - 1)
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_x, dim=-1)
        # Mass strictly before each token (exclusive cumsum). Keep a token iff it is < top_p;
        # the first token has 0 before it, so it is always kept. Rows with top_p = 1 are left
        # alone explicitly: float rounding can push a cumsum past 1 and drop a real tail.
        before = torch.zeros_like(probs)
        before[:, 1:] = probs.cumsum(dim=-1)[:, :-1]
        drop = (before >= top_p) & (top_p < 1.0)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    # Back to token-id order, so each row's random draw maps to the same token ids whether or not
    # the batch needed a sort: that keeps seeded rows independent of their neighbours.
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _exponentials(
    rows: Sequence[SamplingRow], m: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """q [M, V] ~ Exp(1), each row's values drawn from that row's generator only.

    Rows sharing a generator (the engine's) draw together in one call, in row order, which
    advances it just as consecutive per-row draws would; a seeded row draws its V values alone.
    """
    q = torch.empty(m, vocab, dtype=torch.float32, device=device)
    groups: dict[int, list[int]] = {}
    for j, row in enumerate(rows):
        groups.setdefault(id(row.generator), []).append(j)
    for members in groups.values():
        generator = rows[members[0]].generator
        if len(members) == 1:
            q[members[0]].exponential_(generator=generator)
        elif len(members) == m:
            q.exponential_(generator=generator)
        else:
            block = torch.empty(len(members), vocab, dtype=torch.float32, device=device)
            q[torch.tensor(members, device=device)] = block.exponential_(generator=generator)
    return q


def _fill_logprobs(
    out: list[dict[int, Logprob] | None],
    raw_logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    rows: Sequence[SamplingRow],
    want: list[int],
) -> None:
    """Fill ``out[i]`` for each row i in ``want`` with the sampled token and its top-k."""
    if len(want) == len(rows):
        lp, tok = raw_logprobs, token_ids
    else:
        idx = torch.tensor(want, device=raw_logprobs.device)
        lp, tok = raw_logprobs[idx], token_ids[idx]
    entries = logprob_entries(lp, tok, [rows[i].params.logprobs for i in want])
    for i, entry in zip(want, entries, strict=True):
        out[i] = entry


def name_tokens(entry: dict[int, Logprob], tokenizer) -> None:
    """Fill each entry's ``decoded_token`` with its token's own text (special tokens shown)."""
    if tokenizer is not None:
        for token, lp in entry.items():
            lp.decoded_token = tokenizer.decode([token], skip_special_tokens=False)


def logprob_entries(
    logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]
) -> list[dict[int, Logprob]]:
    """Per row of ``logprobs`` [N, V] (log-softmax of the raw logits): {token: Logprob} for
    the row's token and its top ``ks[row]`` tokens, each with its rank over the vocabulary.
    Used for the sampled tokens and for prompt tokens (prompt logprobs)."""
    k_max = max(ks)
    tok = token_ids.unsqueeze(1)
    tok_lp = logprobs.gather(1, tok)
    tok_rank = (logprobs > tok_lp).sum(dim=1, keepdim=True) + 1
    top_lp, top_ids = logprobs.topk(k_max, dim=-1)
    # Every token with a larger logprob than a top-k entry is itself in the top k, so counting
    # within the top k gives the rank over the whole vocabulary (ties share a rank).
    top_rank = (top_lp.unsqueeze(1) > top_lp.unsqueeze(2)).sum(dim=2) + 1

    # One device→host transfer for the whole batch. float64 holds float32 values and integer ids
    # and ranks (< 2**53) exactly.
    table = torch.cat(
        [t.to(torch.float64) for t in (tok, tok_lp, tok_rank, top_ids, top_lp, top_rank)], dim=1
    ).tolist()
    entries = []
    for k, r in zip(ks, table, strict=True):
        entry = {int(r[0]): Logprob(logprob=r[1], rank=int(r[2]))}
        ids, lps, ranks = r[3 : 3 + k_max], r[3 + k_max : 3 + 2 * k_max], r[3 + 2 * k_max :]
        for j in range(k):
            entry.setdefault(int(ids[j]), Logprob(logprob=lps[j], rank=int(ranks[j])))
        entries.append(entry)
    return entries
