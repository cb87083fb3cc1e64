"""A compute node's forward over its rows in micro-batches that ping-pong with the attention
nodes (figure 2's overlap).

With one micro-batch every layer is a blocking round trip: the compute side waits while the
nodes attend, and the nodes wait while it runs the dense work. With m micro-batches the
compute side posts micro-batch i's queries and K/V of layer l, then — instead of waiting —
finishes layer l − 1 of micro-batch i + 1 and posts it, and so on around; it collects
micro-batch i's answer of layer l only when it comes back to it:

    for l in layers:
        for i in micro-batches:
            out = collect(i, l − 1);  x_i = rest of layer l − 1 (O, MLP)   # dense
            q, k, v = norm + QKV + RoPE of layer l (x_i);  post(i, l)         # dense

While the nodes attend (i, l), the compute side runs the dense work of the other m − 1
micro-batches. Micro-batches hold whole sequences (StepInputs.micro_batches), so a query
never needs another micro-batch's keys of the same layer, and every row goes through the
same ops in the same order as in the plain forward: the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardlm.attention.sharded import ShardedAttention
from shardlm.models.llama import LlamaForCausalLM


@dataclass
class _State:
    x: torch.Tensor  # the layer's input (the previous MLP output)
    residual: torch.Tensor | None
    positions: torch.Tensor


def forward_micro_batches(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention: ShardedAttention,
) -> torch.Tensor:
    """Hidden states [T, hidden] after the final norm for this compute node's T rows (in
    order), with the micro-batches ``attention.begin_step`` planned."""
    parts = attention.parts
    states = [_State(model.embed_tokens(input_ids[p.rows]), None, positions[p.rows]) for p in parts]
    layers = model.layers
    for index, layer in enumerate(layers):
        for part, state in zip(parts, states, strict=True):
            if index:
                out = attention.collect(part)
                state.x, state.residual = layers[index - 1].attention_outputs(out, state.residual)
            q, k, v, state.residual = layer.attention_inputs(
                state.x, state.residual, state.positions, model.rotary
            )
            attention.post(part, index, q, k, v)
    hidden = []
    for part, state in zip(parts, states, strict=True):
        out = attention.collect(part)
        x, residual = layers[-1].attention_outputs(out, state.residual)
        hidden.append(model.norm(x, residual)[0])
    return torch.cat(hidden) if len(hidden) != 1 else hidden[0]
