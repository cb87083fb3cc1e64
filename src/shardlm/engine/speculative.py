"""Speculative decoding's two pure pieces: proposing draft tokens by n-gram lookup in a
sequence's own context, and verifying a row's k drafts against the target model's k + 1
distributions so that what comes out is distributed exactly as the target alone would
produce (greedy: the very same tokens).

Groundwork for issue 19: the engine does not call these yet (no verify step, no KV
rollback, no ``speculative_config``); they are tested on their own.

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
over the vocabulary for the emitted token, as the sampler draws), so a seeded request is
reproducible whatever shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
        out.append(_draw(final, gen))
        tokens.append(out)
        accepted.append(n)
    return Verified(tokens, accepted)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised ``probs`` [V] by the sampler's exponential race."""
    e = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / e.clamp_(min=torch.finfo(e.dtype).tiny)).argmax())
