"""One rank's model: built on its device, with its KV pool (or its links to attention nodes),
running steps given as plain tensors (step_inputs.StepInputs).

The driver's executor (executor/driver.py) calls ``run`` after broadcasting the step; worker
ranks call the same ``run`` from their command loop (executor/compute_rank.py), so every
rank's forward pairs up its collectives.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from shardlm.attention.backend import AttentionBackend
from shardlm.attention.contiguous import ContiguousAttention
from shardlm.attention.node import AttentionNode, node_name
from shardlm.attention.paged import PagedAttention
from shardlm.attention.sharded import LocalLink, NodeLink, RemoteLink, ShardedAttention
from shardlm.cache.contiguous import ContiguousKVCache
from shardlm.cache.paged import PagedKVCache
from shardlm.cache.rshard import RShard
from shardlm.config import ModelConfig
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine_config import EngineConfig
from shardlm.kernels import resolve_attention_backend
from shardlm.loader import init_dummy_weights, load_weights
from shardlm.models.llama import LlamaForCausalLM
from shardlm.models.registry import model_class
from shardlm.models.transforms import apply_weight_transforms
from shardlm.runtime.compute_nodes import ComputeCounters, ComputeNodes
from shardlm.runtime.cuda_graphs import DecodeGraphs
from shardlm.runtime.kv_scales import fp8_kv_scales
from shardlm.runtime.micro_batches import forward_micro_batches
from shardlm.step_inputs import StepInputs

logger = logging.getLogger(__name__)


class ModelRunner:
    """Holds this rank's shard of the model and its attention backend, and runs steps."""

    def __init__(
        self,
        engine: EngineConfig,
        config: ModelConfig,
        device: torch.device,
        tp: TPContext | None = None,
    ) -> None:
        """``engine``: the resolved configuration (EngineConfig.resolve)."""
        self.config = config
        self.dtype = dtype = engine.torch_dtype
        self.device = device
        self.max_model_len = max_model_len = engine.model.max_model_len
        self.kv_cache_dtype = engine.cache.kv_cache_dtype
        # kv_cache_dtype fp8: every pool (local, attention nodes, scoring) gets these scales.
        self.fp8_scales = fp8_kv_scales(engine, config)
        self.tp = tp or TPContext.single()
        # "auto" is resolved here, on this rank's device: each rank may fall back alone.
        self.attention_backend = resolve_attention_backend(
            engine.kernels.attention_backend,
            device,
            engine.cache.block_size,
            engine.parallel.attention_nodes,
        )
        self.decode_graphs: DecodeGraphs | None = None
        self.kv_cache: PagedKVCache | None = None
        self.attention: AttentionBackend | None = None
        self.num_compute_nodes = engine.parallel.compute_nodes
        self.micro_batches = engine.parallel.node_microbatches
        self.uses_attention_nodes = False  # the forward then runs in micro-batches
        self.link_on_device = engine.parallel.attention_link == "nccl"
        self.compute_nodes: ComputeNodes | None = None  # α > 1 (runtime/compute_nodes.py)
        path = Path(engine.model.model)
        start = time.perf_counter()
        self.model = build_model(config, dtype, device, max_model_len, self.tp)
        if engine.model.load_format == "dummy":
            init_dummy_weights(self.model, seed=self.tp.rank)
        else:
            load_weights(self.model, path, dtype)
        self.transforms = engine.quantization.transforms
        apply_weight_transforms(self.model, self.transforms)
        attention_backend = self.attention_backend
        if attention_backend == "triton":
            self.model.use_triton_kernels()
        if self.transforms.quantization and device.type == "cuda":
            # Give the freed float weights back, so the KV pool sizing (free memory) sees them.
            gc.collect()
            torch.cuda.empty_cache()
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        # Half precision on CPU: oneDNN's packed weights (twice split-K's bandwidth here).
        self.packed_layers = self.model.pack_for_cpu()
        self.load_seconds = time.perf_counter() - start
        self.counters = ComputeCounters(self.num_compute_nodes, self)
        self.scale = config.head_dim**-0.5
        # Quantized weights are int8/fp8 parameters (plus their scales): this is real memory.
        self.weight_bytes = self.model.weight_bytes
        logger.info(
            "rank %d: loaded %s (%.1f MiB of weights in this shard, %s, %s) in %.2fs",
            self.tp.rank,
            path,
            self.weight_bytes / 2**20,
            dtype,
            self.transforms.describe(self.model),
            self.load_seconds,
        )

    # -- KV pool --
    def kv_bytes_per_token(self) -> int:
        c = self.config
        return PagedKVCache.bytes_per_token(
            c.num_hidden_layers,
            self.model.shard.kv_heads,
            c.head_dim,
            self.dtype,
            self.kv_cache_dtype,
        )

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        self.kv_cache = PagedKVCache(
            c.num_hidden_layers,
            num_blocks,
            block_size,
            self.model.shard.kv_heads,
            c.head_dim,
            self.dtype,
            self.device,
            self.kv_cache_dtype,
            self.fp8_scales,
        )
        self.attention = PagedAttention(
            self.kv_cache, self.scale, c.sliding_windows, self.attention_backend
        )

    @torch.inference_mode()
    def check_triton_kernels(self, fall_back: bool) -> None:
        """Compile and run every Triton kernel once, at start-up rather than at the first
        request: a one-row decode step on the padding slot, with a table as wide as
        max_model_len needs (so the split decode and its merge run too, as in a graph).

        If they fail and "auto" chose them (``fall_back``), use the PyTorch path instead, with
        a warning; if the user chose them, the error stands. A device fault (illegal address)
        leaves the CUDA context unusable, so it is raised either way. Under tensor
        parallelism each rank decides alone (identical GPUs fail alike)."""
        cache = self.kv_cache
        width = -(-self.max_model_len // cache.block_size)

        def scalar(value: int) -> torch.Tensor:  # own allocations: aligned as in serving
            return torch.tensor([value], device=self.device)

        step = StepInputs.static_decodes(
            scalar(0),
            scalar(0),
            scalar(0),
            scalar(cache.padding_slot),
            torch.zeros(1, width, dtype=torch.long, device=self.device),
        )
        sticky = getattr(torch, "AcceleratorError", ())
        try:
            self.attention.begin_step(step)
            hidden = self.model(scalar(0), scalar(0), self.attention)
            self.model.compute_logits(hidden)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # a compile or launch failure, surfaced here
            if not fall_back or (sticky and isinstance(e, sticky)):
                raise
            logger.warning(
                "the Triton kernels failed to run on %s (%s: %s); using the PyTorch path "
                "(attention_backend='torch')",
                self.device,
                type(e).__name__,
                e,
            )
            self.attention_backend = "torch"
            self.model.use_triton_kernels(False)
            self.attention = PagedAttention(cache, self.scale, self.config.sliding_windows, "torch")
            self.decode_graphs = None  # graphs hold the Triton path

    def init_decode_graphs(self, max_batch: int, capture: bool) -> None:
        """Run pure-decode steps of up to ``max_batch`` sequences from static buffers, padded
        to batch-size buckets, and (``capture``, CUDA) replay them from CUDA graphs
        (runtime/cuda_graphs.py). Needs the Triton kernels and the local paged pool. If the
        capture runs out of memory (the KV pool took it first), decode runs eagerly."""
        if self.attention_backend != "triton" or self.kv_cache is None:
            raise ValueError("decode graphs need attention_backend='triton' and a local KV pool")
        graphs = DecodeGraphs(
            self.model, self.attention, max_batch, self.max_model_len, self.device
        )
        if capture:
            failure = None
            try:
                graphs.capture()
            except (torch.OutOfMemoryError, RuntimeError) as e:
                # cudaGraphInstantiate and cuBLAS report memory shortage as RuntimeErrors.
                text = str(e)
                if not isinstance(e, torch.OutOfMemoryError) and not (
                    "out of memory" in text or "ALLOC_FAILED" in text
                ):
                    raise
                failure = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            if failure is not None:
                # Outside the except block: the traceback no longer holds the half-captured
                # graphs, so their memory can go back.
                del graphs
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning(
                    "out of GPU memory capturing decode graphs (%s): decode steps run eagerly "
                    "(lower memory_utilization or max_num_seqs to keep the graphs)",
                    failure,
                )
                return
        self.decode_graphs = graphs

    def init_attention_nodes(
        self,
        num_blocks: int,
        block_size: int,
        rshard: RShard,
        node_device: torch.device | None,
        node_ranks: list[int] | None = None,
    ) -> None:
        """Send attention to this rank's β attention nodes instead of a local pool: built
        here as objects on ``node_device`` (in-process), or reached at ``node_ranks``. With
        α > 1 compute nodes, this process runs all of them in-process, or its own one."""
        alpha = self.num_compute_nodes
        self.uses_attention_nodes = True
        if node_ranks is None:
            nodes = [
                self.make_attention_node(s, rshard, num_blocks, block_size, node_device)
                for s in range(rshard.num_shards)
            ]
            if alpha > 1:
                self.compute_nodes = ComputeNodes.in_process(self, rshard, nodes, alpha)
                self.attention = self.compute_nodes.attention[0]
                return
            links: list[NodeLink] = [LocalLink(node, self.device) for node in nodes]
            self.attention = ShardedAttention(rshard, links, self.device, 0, self.micro_batches)
            return
        links = [
            RemoteLink(
                rank,
                f"{node_name(self.tp.rank, s)} (rank {rank})",
                (self.tp.link_out, self.tp.link_back),
                self.tp.timeout,
                self.device,
                on_device=self.link_on_device,
            )
            for s, rank in enumerate(node_ranks)
        ]
        self.attention = ShardedAttention(
            rshard, links, self.device, self.tp.compute_node, self.micro_batches
        )
        if alpha > 1:
            self.compute_nodes = ComputeNodes.distributed(self, self.attention)

    def make_attention_node(
        self,
        shard: int,
        rshard: RShard,
        num_blocks: int,
        block_size: int,
        device: torch.device,
    ) -> AttentionNode:
        """The attention node (head group = this rank's KV heads, token shard ``shard``)."""
        c = self.config
        return AttentionNode(
            shard,
            rshard,
            c.num_hidden_layers,
            num_blocks,
            block_size,
            self.model.shard.kv_heads,
            c.head_dim,
            self.dtype,
            device,
            self.scale,
            c.sliding_windows,
            head_group=self.tp.rank,
            kv_cache_dtype=self.kv_cache_dtype,
            fp8_scales=self.fp8_scales,
        )

    def release(self, seq_ids: list[int]) -> None:
        """Every rank: sequences the scheduler freed (attention nodes drop their KV)."""
        self.attention.release(seq_ids)

    # -- steps --
    @torch.inference_mode()
    def run(self, host_inputs: StepInputs) -> torch.Tensor | None:
        """Every rank: one forward over the step's tokens; logits on the driver."""
        self.counters.begin_step()
        if self.decode_graphs is not None and self.decode_graphs.can_run(host_inputs):
            self.counters.add(0, host_inputs.num_tokens, None)
            return self.decode_graphs.run(host_inputs)
        inputs = host_inputs.to(self.device)
        if self.compute_nodes is not None:
            return self.compute_nodes.run(inputs)
        self.attention.begin_step(inputs)
        if self.uses_attention_nodes:
            hidden = forward_micro_batches(
                self.model, inputs.input_ids, inputs.positions, self.attention
            )
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.attention)
        self.counters.add(0, host_inputs.num_tokens, self.attention.traffic)
        return self.model.compute_logits(hidden[inputs.logit_rows])

    @torch.inference_mode()
    def score(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [T, vocab] at every position of one prompt (scoring and tests), on a
        private contiguous cache, independent of the paged pool and the scheduler."""
        c = self.config
        n = ids.shape[0]
        cache = ContiguousKVCache(
            c.num_hidden_layers, self.model.shard.kv_heads, c.head_dim, n, self.dtype, self.device
        )
        attn = ContiguousAttention(
            cache, self.scale, c.sliding_windows, self.kv_cache_dtype, self.fp8_scales
        )
        attn.begin_step(StepInputs.prompt(n))
        hidden = self.model(ids.to(self.device), torch.arange(n, device=self.device), attn)
        return self.model.compute_logits(hidden)


def build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPContext | None = None,
) -> LlamaForCausalLM:
    """Allocate this rank's (uninitialised) parameters directly in dtype on device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = model_class(config)(config, max_positions, dtype, tp)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
