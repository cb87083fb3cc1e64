"""Turning one row of logits into the next token, on the logits' device.

Greedy is argmax. Otherwise: divide by temperature, keep the top-k, drop the tail beyond
cumulative probability top_p and tokens below min_p × the top probability, then draw from
what is left with the request's generator (so a seeded request is reproducible).
"""

from __future__ import annotations

import torch

from shardlm.engine.sampling_params import SamplingParams


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [V] float32 → a 0-d token id tensor (still on device)."""
    if params.greedy:
        return logits.argmax()
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token if the mass strictly before it is < top_p (the first is always kept).
        before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(0)
