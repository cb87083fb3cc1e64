"""Per-request edits of the logits before a token is chosen: OpenAI's ``logit_bias`` and vLLM's
``min_tokens``, ``allowed_token_ids`` and ``bad_words``.

The engine turns a sequence's settings into a ``RowConstraints`` for the step (what to ban,
what to allow, what to add); the sampler applies them on the device after the penalties,
only to the rows that have any. Logprobs stay those of the raw model distribution (read
before), as vLLM reports them by default.

- ``logit_bias`` {token: b}, b in [-100, 100]: b is added to that token's logit (OpenAI: -100
  bans in practice, 100 all but forces).
- ``min_tokens`` m: EOS and ``stop_token_ids`` are banned while fewer than m tokens exist
  (not for structured outputs, whose grammar decides where output ends).
- ``allowed_token_ids``: every other token is banned.
- ``bad_words``: each word is tokenized as it would appear mid-text and at the start (with and
  without a leading space); a word's last token is banned when the tokens generated last
  are the word's other tokens (a one-token word is always banned).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardlm.engine.sampling_params import SamplingParams
from shardlm.errors import ParamError

if TYPE_CHECKING:  # the sampler (imported by sequence.py) imports this module
    from shardlm.engine.sequence import Sequence


@dataclass
class RowConstraints:
    banned: list[int]
    allowed: list[int] | None
    bias: dict[int, float]


def has_constraints(params: SamplingParams) -> bool:
    return bool(
        params.logit_bias or params.min_tokens or params.allowed_token_ids or params.bad_words
    )


def check_against_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """Token ids the request names must exist (the engine knows the vocabulary)."""
    for name, ids in (
        ("logit_bias", list(params.logit_bias or ())),
        ("allowed_token_ids", list(params.allowed_token_ids or ())),
    ):
        for t in ids:
            if not 0 <= t < vocab_size:
                raise ParamError(
                    name, f"{name}: token id {t} is outside the vocabulary [0, {vocab_size})"
                )


def bad_word_token_ids(words: Seq[str], tokenizer) -> list[list[int]]:
    """Every tokenization of each bad word the model could produce: alone and after a space."""
    if tokenizer is None:
        raise ParamError("bad_words", "bad_words need a tokenizer (skip_tokenizer_init was set)")
    seqs: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def row_constraints(
    seq: Sequence, stop_ids: set[int], bad_words: list[list[int]]
) -> RowConstraints:
    """What this sequence may not, must, or should rather produce next. Reads only the last
    few generated tokens (a bad word's length), not the whole output."""
    params = seq.params
    banned: list[int] = []
    # A grammar decides itself when output may end (it allows only stop tokens once complete):
    # min_tokens does not hold those back from a structured sequence.
    if params.min_tokens and seq.num_output_tokens < params.min_tokens and seq.grammar is None:
        banned.extend(sorted(stop_ids | set(params.stop_token_ids)))
    for word in bad_words:
        prefix = word[:-1]
        start = seq.num_tokens - len(prefix)
        if not prefix or (start >= seq.num_prompt_tokens and seq.token_ids[start:] == prefix):
            banned.append(word[-1])
    allowed = list(params.allowed_token_ids) if params.allowed_token_ids else None
    return RowConstraints(banned, allowed, dict(params.logit_bias or {}))


def apply_constraints(
    logits: torch.Tensor, constraints: Seq[RowConstraints | None]
) -> torch.Tensor:
    """``logits`` [N, V] with each row's constraints applied; ``logits`` itself (no copy)
    when no row has any."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    logits = logits.clone()
    device = logits.device
    for i in rows:
        c = constraints[i]
        row = logits[i]
        if c.allowed is not None:
            keep = torch.tensor(c.allowed, device=device)
            kept = row[keep].clone()
            row.fill_(float("-inf"))
            row[keep] = kept
        if c.bias:
            ids = torch.tensor(list(c.bias), device=device)
            row[ids] += torch.tensor(list(c.bias.values()), dtype=row.dtype, device=device)
        if c.banned:
            row[torch.tensor(c.banned, device=device)] = float("-inf")
    return logits
