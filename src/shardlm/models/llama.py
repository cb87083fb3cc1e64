"""The Llama decoder (third design figure), which also serves Mistral, Qwen2 and Qwen3.

    x → RMSNorm → [q|k|v] → RoPE(q, k) → attention over the KV cache → O-proj → + x
      → RMSNorm → [gate|up] → SiLU(gate)·up → ARM → down → + residual

Qwen3 adds an RMSNorm over each head's channels of q and of k, between the projection and
RoPE (``qk_norm``). ARM (optional, layers/arm.py) is an online Hadamard transform whose
inverse and smoothing are folded into the weights (models/transforms.py).

The model sees a flat batch of tokens with their positions and an attention object that owns
the KV cache; it knows nothing about requests or how the cache is laid out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from shardlm.attention.backend import AttentionBackend
from shardlm.config import ModelConfig
from shardlm.distributed.parallel_state import TPContext
from shardlm.errors import ConfigError
from shardlm.layers.activation import silu_and_mul
from shardlm.layers.embedding import TiedEmbedding, VocabParallelEmbedding
from shardlm.layers.hadamard import HadamardPlan, hadamard_transform
from shardlm.layers.linear import Linear
from shardlm.layers.norm import RMSNorm, qk_rms_norm
from shardlm.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class WeightSource:
    """One checkpoint tensor feeding (part of) a parameter.

    ``shape`` is the tensor's full shape in the checkpoint (checked); ``narrow`` =
    (dim, start, length) is the slice this rank reads, through safetensors' lazy slicing.
    """

    name: str
    shape: tuple[int, ...]
    narrow: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class WeightSpec:
    """A parameter and the checkpoint tensors concatenated (along dim 0) to fill it; rows of
    the parameter beyond the sources (vocabulary padding) are zero.

    ``transposed``: the parameter holds the transpose of that concatenation (Linear's
    ``weight_t``), so the sources are concatenated along dim 1 of the parameter instead.
    """

    param: str
    sources: tuple[WeightSource, ...]
    transposed: bool = False


@dataclass(frozen=True)
class ShardLayout:
    """This rank's share of heads, MLP and vocabulary (figure 1).

    Query heads and the MLP's intermediate features divide evenly. KV heads divide when there
    are at least as many as ranks; otherwise (GQA/MQA with few KV heads) each rank keeps the
    one KV head its query heads use, replicated across the ranks that share it. The
    vocabulary is padded up to a multiple of the world size; padded rows are zero.
    """

    heads: int
    kv_heads: int
    kv_head_start: int
    intermediate: int
    vocab_start: int
    vocab_end: int

    @classmethod
    def for_rank(cls, config: ModelConfig, rank: int, world_size: int) -> ShardLayout:
        check_tensor_parallel(config, world_size)
        heads = config.num_attention_heads // world_size
        if config.num_key_value_heads >= world_size:
            kv_heads = config.num_key_value_heads // world_size
            kv_start = rank * kv_heads
        else:
            kv_heads = 1
            group = config.num_attention_heads // config.num_key_value_heads
            kv_start = rank * heads // group  # the KV head of this rank's first query head
        vocab_per_rank = -(-config.vocab_size // world_size)
        return cls(
            heads=heads,
            kv_heads=kv_heads,
            kv_head_start=kv_start,
            intermediate=config.intermediate_size // world_size,
            vocab_start=rank * vocab_per_rank,
            vocab_end=(rank + 1) * vocab_per_rank,
        )


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Refuse, before anything loads, a model that cannot be split over ``world_size``."""
    h, kv, i = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    problems = []
    if h % world_size:
        problems.append(f"num_attention_heads={h}")
    if kv >= world_size and kv % world_size:
        problems.append(f"num_key_value_heads={kv}")
    if kv < world_size and world_size % kv:
        problems.append(f"num_key_value_heads={kv} (fewer than ranks must divide the ranks)")
    if i % world_size:
        problems.append(f"intermediate_size={i}")
    if problems:
        raise ConfigError(
            f"tensor_parallel_size={world_size} does not divide the model: "
            f"{', '.join(problems)}; choose a size that divides them"
        )


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, shard: ShardLayout, tp: TPContext
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = shard.heads
        self.num_kv_heads = shard.kv_heads
        self.head_dim = config.head_dim
        self.q_size = shard.heads * config.head_dim
        self.kv_size = shard.kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias)
        # W^B of figure 1: row-parallel, its partial sums AllReduced.
        self.o_proj = Linear(
            self.q_size, config.hidden_size, config.o_bias, tp if tp.enabled else None
        )
        # Qwen3: RMSNorm over each head's channels of q and of k, before RoPE. Their weights
        # are per channel, the same for every head, so every rank holds them whole.
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def qk_norm(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(q weight, k weight, eps) of the per-head norms, or None where there are none: what
        the fused RoPE kernel applies before rotating."""
        if self.q_norm is None:
            return None
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if attn.fuses_rope:
            # The backend rotates q, k and writes k, v into its cache in one kernel.
            out = attn.rope_attend(
                self.layer_idx,
                qkv,
                positions,
                rotary,
                self.num_heads,
                self.num_kv_heads,
                qk_norm=self.qk_norm(),
            )
            return self.output(out)
        q, k, v = self.split_rotated(qkv, positions, rotary)
        return self.output(attn.attend(self.layer_idx, q, k, v))

    def project(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D], rotated: what goes to the attention."""
        return self.split_rotated(self.qkv_proj(x), positions, rotary)

    def split_rotated(
        self, qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = qkv.shape[0]
        # q and k sit side by side in the fused output: rotate both with one call.
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, -1)
        if self.q_norm is not None:
            qk = qk_rms_norm(
                qk, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.q_norm.eps
            )
        qk = rotary(qk, positions)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The attention's output [T, Hq, D] through W^B (AllReduced under TP)."""
        return self.o_proj(out.reshape(out.shape[0], self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardLayout, tp: TPContext) -> None:
        super().__init__()
        # W^C (gate|up) column-parallel, W^D (down) row-parallel + AllReduce.
        self.gate_up_proj = Linear(config.hidden_size, 2 * shard.intermediate, config.mlp_bias)
        self.down_proj = Linear(
            shard.intermediate, config.hidden_size, config.mlp_bias, tp if tp.enabled else None
        )
        # ARM (layers/arm.py): the online Hadamard on the down-projection input (its plan:
        # Kronecker factors, blocks), set when the transform is folded into the weights.
        self.hadamard: HadamardPlan | None = None
        self.use_kernel = False  # SiLU·mul in one Triton kernel (kernels/fused.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            from shardlm.kernels.fused import silu_and_mul as fused_silu_and_mul

            h = fused_silu_and_mul(self.gate_up_proj(x))
        else:
            h = silu_and_mul(self.gate_up_proj(x))
        if self.hadamard is not None:
            h = hadamard_transform(h, self.hadamard)
        return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, shard: ShardLayout, tp: TPContext
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, shard, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, shard, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it is added): the addition
        is left to the next norm, which fuses it (RMSNorm.forward). The sums are the plain
        x + attn(norm(x)), then + mlp(norm(·)), in the same order."""
        h, residual = self.norm_in(x, residual)
        h = self.self_attn(h, positions, rotary, attn)
        return self.finish(h, residual)

    def norm_in(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.input_layernorm(x), x
        return self.input_layernorm(x, residual)

    def finish(self, h: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the attention block's output to the layer's (MLP output, residual)."""
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    # The layer in two halves around the attention, for a caller that attends elsewhere
    # and in between runs other work (runtime/micro_batches.py): the same ops, same order.
    def attention_inputs(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v, residual) of this layer."""
        h, residual = self.norm_in(x, residual)
        return *self.self_attn.project(h, positions, rotary), residual

    def attention_outputs(
        self, out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (MLP output, residual) from the attention's output."""
        return self.finish(self.self_attn.output(out), residual)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        max_positions: int,
        dtype: torch.dtype,
        tp: TPContext | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp = tp or TPContext.single()
        self.shard = shard = ShardLayout.for_rank(config, tp.rank, tp.world_size)
        vocab_local = shard.vocab_end - shard.vocab_start
        self.lm_head = Linear(config.hidden_size, vocab_local)
        self.embed_tokens: nn.Module = (
            TiedEmbedding(self.lm_head, shard.vocab_start, shard.vocab_end, tp)
            if config.tie_word_embeddings
            else VocabParallelEmbedding(shard.vocab_start, shard.vocab_end, config.hidden_size, tp)
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, shard, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for a flat batch of T tokens."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, attn)
        return self.norm(x, residual)[0]

    def pack_for_cpu(self) -> int:
        """Half precision on CPU: every Linear on oneDNN's packed weight (layers/linear.py);
        the tied LM head keeps its plain weight too, which the embedding reads. Call after
        loading and the weight transforms. Returns how many layers were packed."""
        tied = isinstance(self.embed_tokens, TiedEmbedding)
        packed = 0
        for module in self.modules():
            if isinstance(module, Linear):
                packed += module.pack_for_cpu(keep_weight=tied and module is self.lm_head)
        return packed

    @property
    def weight_bytes(self) -> int:
        """Bytes of this shard's weights as they are held (packed copies included)."""
        held = sum(p.nbytes for p in self.parameters()) + sum(
            m.packed_bytes for m in self.modules() if isinstance(m, Linear)
        )
        if isinstance(self.embed_tokens, TiedEmbedding):
            table = self.embed_tokens.lm_head[0]
            if table is not self.lm_head:  # a quantized head: the float table is the embedding's
                held += table.weight_t.nbytes + table.packed_bytes
        return held

    @property
    def streamed_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every layer and the head, not the
        embedding table (a gather of a few rows) nor a float copy kept only for it."""
        held = self.weight_bytes
        emb = self.embed_tokens
        if isinstance(emb, TiedEmbedding):
            table = emb.lm_head[0]
            if table is not self.lm_head or table.packed is not None:
                held -= table.weight_t.nbytes  # read by the embedding only
            return held
        return held - sum(p.nbytes for p in emb.parameters())

    def use_triton_kernels(self, enabled: bool = True) -> None:
        """Fused Triton kernels for the norms (+ residual adds) and SiLU·mul
        (kernels/fused.py); RoPE + KV write is the attention backend's (PagedAttention)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaMLP)):
                module.use_kernel = enabled

    def compute_logits(
        self, hidden: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Float32 logits [N, vocab] for the selected hidden states, on the driver; each rank
        computes its vocabulary slice and the driver gathers them (None on other ranks).
        ``out``: a float32 [N, vocab] buffer to write them into (CUDA graphs' static output)."""
        logits = self.tp.gather_to_driver(self.lm_head(hidden))
        if logits is None:
            return None
        logits = logits[:, : self.config.vocab_size]
        return logits.float() if out is None else out.copy_(logits)

    def weight_specs(self) -> Iterator[WeightSpec]:
        """Where each of this rank's parameters comes from in a Hugging Face checkpoint."""
        c, shard, rank = self.config, self.shard, self.tp.rank
        h, d = c.hidden_size, c.head_dim
        q_rows = (rank * shard.heads * d, shard.heads * d)
        kv_rows = (shard.kv_head_start * d, shard.kv_heads * d)
        mlp_rows = (rank * shard.intermediate, shard.intermediate)
        vocab_rows = (
            shard.vocab_start,
            max(0, min(shard.vocab_end, c.vocab_size) - shard.vocab_start),
        )

        def src(
            name: str, shape: tuple[int, ...], dim: int | None = None, rows=None
        ) -> WeightSource:
            return WeightSource(name, shape, None if dim is None else (dim, *rows))

        def spec(param: str, *sources: WeightSource) -> WeightSpec:
            # Linear weights ([out, in] in the checkpoint) are stored transposed.
            return WeightSpec(param, sources, transposed=param.endswith(".weight_t"))

        embed = src("model.embed_tokens.weight", (c.vocab_size, h), 0, vocab_rows)
        if not c.tie_word_embeddings:
            yield spec("embed_tokens.weight", embed)
        for n in range(c.num_hidden_layers):
            pre, dst = f"model.layers.{n}", f"layers.{n}"
            attn, mlp = f"{pre}.self_attn", f"{pre}.mlp"
            yield spec(f"{dst}.input_layernorm.weight", src(f"{pre}.input_layernorm.weight", (h,)))
            yield spec(
                f"{dst}.post_attention_layernorm.weight",
                src(f"{pre}.post_attention_layernorm.weight", (h,)),
            )
            qkv = (
                ("q_proj", c.q_size, q_rows),
                ("k_proj", c.kv_size, kv_rows),
                ("v_proj", c.kv_size, kv_rows),
            )
            yield spec(
                f"{dst}.self_attn.qkv_proj.weight_t",
                *(src(f"{attn}.{name}.weight", (rows, h), 0, part) for name, rows, part in qkv),
            )
            if c.qkv_bias:
                yield spec(
                    f"{dst}.self_attn.qkv_proj.bias",
                    *(src(f"{attn}.{name}.bias", (rows,), 0, part) for name, rows, part in qkv),
                )
            if c.qk_norm:  # per channel of a head: every rank reads them whole
                for norm in ("q_norm", "k_norm"):
                    yield spec(f"{dst}.self_attn.{norm}.weight", src(f"{attn}.{norm}.weight", (d,)))
            yield spec(
                f"{dst}.self_attn.o_proj.weight_t",
                src(f"{attn}.o_proj.weight", (h, c.q_size), 1, q_rows),
            )
            if c.o_bias:
                yield spec(f"{dst}.self_attn.o_proj.bias", src(f"{attn}.o_proj.bias", (h,)))
            i = c.intermediate_size
            gate_up = ("gate_proj", "up_proj")
            yield spec(
                f"{dst}.mlp.gate_up_proj.weight_t",
                *(src(f"{mlp}.{name}.weight", (i, h), 0, mlp_rows) for name in gate_up),
            )
            if c.mlp_bias:
                yield spec(
                    f"{dst}.mlp.gate_up_proj.bias",
                    *(src(f"{mlp}.{name}.bias", (i,), 0, mlp_rows) for name in gate_up),
                )
            yield spec(
                f"{dst}.mlp.down_proj.weight_t", src(f"{mlp}.down_proj.weight", (h, i), 1, mlp_rows)
            )
            if c.mlp_bias:
                yield spec(f"{dst}.mlp.down_proj.bias", src(f"{mlp}.down_proj.bias", (h,)))
        yield spec("norm.weight", src("model.norm.weight", (h,)))
        # Tied checkpoints keep only the embedding (some also store an identical lm_head).
        head = (
            embed
            if c.tie_word_embeddings
            else src("lm_head.weight", (c.vocab_size, h), 0, vocab_rows)
        )
        yield spec("lm_head.weight_t", head)
