"""Prompt logprobs: each prompt token's log-probability given the tokens before it, from the
logits of the batched prefill itself (no second forward).

The row at position p of a prefill chunk predicts the token at p + 1, so the rows at
positions 0 .. P-2 of a P-token prompt score tokens 1 .. P-1 (token 0 has nothing before it:
None, as vLLM and OpenAI report it); the row at P-1 is the usual sampled one. The driver asks
for those rows' logits alongside the sampled rows' (StepInputs.score_rows), chunk by chunk,
under chunked prefill, tensor parallelism and attention or compute nodes alike. A request
that wants them does not take its prompt from the prefix cache: a cached prefix has no
logits left to score it with, so its prompt is computed in full (other requests still reuse
its blocks).
"""

from __future__ import annotations

import torch

from shardlm.engine.sampler import Logprob, logprob_entries, name_tokens
from shardlm.engine.sequence import Request, Sequence
from shardlm.tokenizer import Tokenizer


def score_prompt(
    logits: torch.Tensor, scored: list[tuple[Sequence, int]], tokenizer: Tokenizer | None
) -> None:
    """Fill ``seq.prompt_logprobs[position]`` for each scored row from its logits [S, V]."""
    targets = torch.tensor([seq.token_ids[pos] for seq, pos in scored], device=logits.device)
    ks = [seq.params.prompt_logprobs for seq, _ in scored]
    entries = logprob_entries(torch.log_softmax(logits.float(), dim=-1), targets, ks)
    for (seq, pos), entry in zip(scored, entries, strict=True):
        name_tokens(entry, tokenizer)
        seq.prompt_logprobs[pos] = entry


def take_prompt_logprobs(request: Request) -> list[dict[int, Logprob] | None] | None:
    """The request's prompt logprobs, once, as soon as its first sample has scored the whole
    prompt (None before, after, and for requests that did not ask)."""
    first = request.seqs[0]
    if request.prompt_logprobs_sent or first.prompt_logprobs is None:
        return None
    if None in first.prompt_logprobs[1:]:
        return None  # still prefilling (or aborted before the prompt was scored)
    request.prompt_logprobs_sent = True
    return list(first.prompt_logprobs)
