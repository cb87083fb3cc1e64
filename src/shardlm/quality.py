"""How far one engine configuration is from another: the accuracy side of ARM/quantization.

Two measures, both against a reference engine (normally float32, no transforms):

* MLP output error per layer: every layer's MLP of both engines is fed the *same* input (the
  reference's post-attention-norm output), so the figure isolates what quantization does to
  that MLP, without the drift accumulated in earlier layers.
* Token agreement: the share of the reference's greedy tokens the candidate also predicts
  when fed the reference's sequence (teacher forcing: one early miss does not derail the rest
  of the comparison, as it would with free-running generation).

Both engines must run in this process (tensor_parallel_size=1) for the MLP measure, since it
calls the layers directly; token agreement works with any engine.

And one absolute measure, perplexity on text (``shardlm eval``): exp of the mean next-token
negative log-likelihood, over non-overlapping windows of each document scored independently
(the first token of a window is context only). Lower is better; a model that guesses
uniformly scores the vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardlm.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shardlm.engine.llm import LLM


def mlp_inputs(reference: LLM, prompt: str | list[int]) -> list[torch.Tensor]:
    """Each layer's MLP input [tokens, hidden] in ``reference`` for the prompt's tokens."""
    layers = reference.runner.model.layers
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            # The norm returns (normed, residual): the MLP sees the first.
            lambda _m, _a, out, n=n: seen.__setitem__(n, out[0].detach())
        )
        for n, layer in enumerate(layers)
    ]
    try:
        reference.prompt_logits(prompt)
    finally:
        for h in hooks:
            h.remove()
    return [seen[n] for n in range(len(layers))]


@torch.inference_mode()
def mlp_output_errors(reference: LLM, candidate: LLM, inputs: list[torch.Tensor]) -> list[float]:
    """‖y − y_ref‖ / ‖y_ref‖ of each layer's MLP output, both fed ``inputs``."""
    errors = []
    ref_layers, layers = reference.runner.model.layers, candidate.runner.model.layers
    for x, ref_layer, layer in zip(inputs, ref_layers, layers, strict=True):
        want = ref_layer.mlp(x)
        got = layer.mlp(x.to(candidate.engine.dtype))
        errors.append(float((got.float() - want.float()).norm() / want.float().norm()))
    return errors


def greedy_tokens(llm: LLM, prompt_ids: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.generate(prompt_ids, params, use_tqdm=False)[0].outputs[0].token_ids


def token_agreement(candidate: LLM, prompt_ids: list[int], target: list[int]) -> float:
    """Share of ``target`` (the reference's greedy continuation of ``prompt_ids``) that
    ``candidate`` predicts greedily at each position, fed prompt + target."""
    logits = candidate.prompt_logits(prompt_ids + target)
    predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1).cpu()
    return float((predicted == torch.tensor(target)).float().mean())


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int  # tokens predicted
    windows: int
    documents: int  # documents with at least one scored window


def perplexity(llm: LLM, documents: list[list[int]], window: int) -> Perplexity:
    """Perplexity of ``llm`` on tokenized documents, in windows of ``window`` tokens."""
    nll, tokens, windows, scored = 0.0, 0, 0, 0
    for ids in documents:
        scored += len(ids) >= 2
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                continue
            logits = llm.prompt_logits(chunk)[:-1]
            target = torch.tensor(chunk[1:], device=logits.device)
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            tokens += len(chunk) - 1
            windows += 1
    if tokens == 0:
        raise ValueError("the data has no window of at least 2 tokens to score")
    return Perplexity(math.exp(nll / tokens), tokens, windows, scored)
