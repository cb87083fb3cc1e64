"""The Llama decoder (third design figure), which also serves Mistral and Qwen2.

    x → RMSNorm → [q|k|v] → RoPE(q, k) → attention over the KV cache → O-proj → + x
      → RMSNorm → [gate|up] → SiLU(gate)·up → down → + residual

The model sees a flat batch of tokens with their positions and an attention object that owns
the KV cache; it knows nothing about requests or how the cache is laid out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from shardlm.config import ModelConfig
from shardlm.layers.activation import silu_and_mul
from shardlm.layers.embedding import Embedding, TiedEmbedding
from shardlm.layers.linear import Linear
from shardlm.layers.norm import RMSNorm
from shardlm.layers.rotary import RotaryEmbedding


class AttentionBackend(Protocol):
    """What a decoder layer needs from the KV-cache owner for the current step."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class WeightSource:
    """One checkpoint tensor feeding (part of) a parameter, with the shape it must have."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightSpec:
    """A parameter and the checkpoint tensors concatenated (along dim 0) to fill it.

    ``transposed``: the parameter holds the transpose of that concatenation (Linear's
    ``weight_t``), so the sources are concatenated along dim 1 of the parameter instead.
    """

    param: str
    sources: tuple[WeightSource, ...]
    transposed: bool = False


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k sit side by side in the fused output: rotate both with one call.
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, -1)
        qk = rotary(qk, positions)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        out = attn.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, config.mlp_bias
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.embed_tokens: nn.Module = (
            TiedEmbedding(self.lm_head)
            if config.tie_word_embeddings
            else Embedding(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for a flat batch of T tokens."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rotary, attn)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the selected hidden states."""
        return self.lm_head(hidden).float()

    def weight_specs(self) -> Iterator[WeightSpec]:
        """Where each parameter comes from in a Hugging Face checkpoint."""
        c = self.config
        h, i = c.hidden_size, c.intermediate_size

        def one(param: str, name: str, shape: tuple[int, ...]) -> WeightSpec:
            # Linear weights ([out, in] in the checkpoint) are stored transposed.
            transposed = param.endswith(".weight_t")
            return WeightSpec(param, (WeightSource(name, shape),), transposed)

        if not c.tie_word_embeddings:
            yield one("embed_tokens.weight", "model.embed_tokens.weight", (c.vocab_size, h))
        for n in range(c.num_hidden_layers):
            src, dst = f"model.layers.{n}", f"layers.{n}"
            yield one(f"{dst}.input_layernorm.weight", f"{src}.input_layernorm.weight", (h,))
            yield one(
                f"{dst}.post_attention_layernorm.weight",
                f"{src}.post_attention_layernorm.weight",
                (h,),
            )
            qkv = (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size))
            for kind, has_bias in (("weight", True), ("bias", c.qkv_bias)):
                if has_bias:
                    yield WeightSpec(
                        f"{dst}.self_attn.qkv_proj.{_param_name(kind)}",
                        tuple(
                            WeightSource(
                                f"{src}.self_attn.{name}.{kind}",
                                (rows, h) if kind == "weight" else (rows,),
                            )
                            for name, rows in qkv
                        ),
                        transposed=kind == "weight",
                    )
            yield one(
                f"{dst}.self_attn.o_proj.weight_t", f"{src}.self_attn.o_proj.weight", (h, c.q_size)
            )
            if c.o_bias:
                yield one(f"{dst}.self_attn.o_proj.bias", f"{src}.self_attn.o_proj.bias", (h,))
            for kind, has in (("weight", True), ("bias", c.mlp_bias)):
                if has:
                    yield WeightSpec(
                        f"{dst}.mlp.gate_up_proj.{_param_name(kind)}",
                        tuple(
                            WeightSource(
                                f"{src}.mlp.{name}.{kind}", (i, h) if kind == "weight" else (i,)
                            )
                            for name in ("gate_proj", "up_proj")
                        ),
                        transposed=kind == "weight",
                    )
            yield one(f"{dst}.mlp.down_proj.weight_t", f"{src}.mlp.down_proj.weight", (h, i))
            if c.mlp_bias:
                yield one(f"{dst}.mlp.down_proj.bias", f"{src}.mlp.down_proj.bias", (h,))
        yield one("norm.weight", "model.norm.weight", (h,))
        # Tied checkpoints keep only the embedding (some also store an identical lm_head).
        head_source = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        yield one("lm_head.weight_t", head_source, (c.vocab_size, h))


def _param_name(kind: str) -> str:
    """Checkpoint ``weight`` → our transposed ``weight_t``; ``bias`` stays."""
    return "weight_t" if kind == "weight" else kind
