"""``EngineConfig``: every engine option, declared once, grouped by concern.

    LLM("ckpt", block_size=32, tensor_parallel_size=2)          # flat keyword arguments
    EngineConfig.from_kwargs(model="ckpt", block_size=32)       # the same, as one object
    config.cache.block_size, config.parallel.world_size         # grouped access

Each field (shardlm/options.py) carries its type, default, help and check; the keyword
arguments of ``LLM`` / ``LLMEngine``, the CLI flags (``add_engine_arguments``), the workers'
configuration (``to_json`` / ``from_json``: one serialised form, sent once at spawn) and the
options table in docs/configuration.md all come from it.

``resolve()`` turns what the user asked for into what runs: the built-in model when none is
given, ``dtype``/``device`` "auto", ``max_model_len`` from the checkpoint, the tensor-parallel
size under torchrun, the calibration file ARM smoothing reads. A resolved configuration
resolves to itself, so the driver and every worker agree. ``attention_backend`` stays as
asked: each rank resolves "auto" on its own device (and falls back alone if the kernels fail).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardlm.attention.node import node_name
from shardlm.cache.kv_quant import KV_CACHE_DTYPES
from shardlm.config import ModelConfig
from shardlm.demo import demo_checkpoint, demo_draft_checkpoint
from shardlm.distributed.torchrun import torchrun_rank, under_torchrun
from shardlm.errors import ParamError
from shardlm.kernels import ATTENTION_BACKENDS, triton_available
from shardlm.layers.arm import ARM_MODES
from shardlm.layers.quant import QUANTIZATIONS
from shardlm.loader import DTYPES, LOAD_FORMATS, resolve_device, resolve_dtype
from shardlm.models.llama import check_tensor_parallel
from shardlm.models.transforms import WeightTransforms
from shardlm.options import (
    add_arguments,
    check_fields,
    flat_values,
    from_kwargs,
    int_in,
    kwargs_from,
    number_in,
    option,
)
from shardlm.speculative_config import BUILTIN_DRAFT, DEFAULT_DISABLE_BY_BATCH, SpeculativeConfig
from shardlm.speculative_config import check as check_speculative_config
from shardlm.speculative_config import parse as parse_speculative_config

ATTENTION_TRANSPORTS = ("distributed", "in-process")
ATTENTION_LINKS = ("gloo", "nccl")
# memory_utilization when not given, by device type (runtime/kv_sizing.py applies it).
DEFAULT_MEMORY_UTILIZATION = {"cuda": 0.9, "cpu": 0.3}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _device(name: str):
    def check(value: Any) -> None:
        if not isinstance(value, str):
            raise ParamError(
                name, f"{name} must be a string (auto, cpu, cuda, cuda:N), got {value!r}"
            )
        try:
            resolve_device(value)
        except ValueError as e:
            raise ParamError(name, f"{name}: {e}" if name != "device" else str(e)) from None

    return check


def _dtype(value: Any) -> None:
    if not isinstance(value, str) or (value != "auto" and value not in DTYPES):
        raise ParamError(
            "dtype", f"dtype {value!r} is not supported; allowed: {', '.join(DTYPE_CHOICES)}"
        )


def _path(name: str):
    def check(value: Any) -> None:
        if not isinstance(value, str):
            raise ParamError(name, f"{name} must be a path, got {type(value).__name__}")

    return check


@dataclass(frozen=True)
class ModelOptions:
    """Which checkpoint, in which precision, on which device."""

    model: str | None = option(
        None,
        "Hugging Face checkpoint directory",
        check=_path("model"),
        default_text="the built-in model, tiny-code",
    )
    tokenizer: str | None = option(
        None, "tokenizer directory", check=_path("tokenizer"), default_text="the model's"
    )
    dtype: str = option(
        "auto",
        "auto (the checkpoint's dtype on GPU, float32 on CPU) | float32 | bfloat16 | float16",
        check=_dtype,
    )
    device: str = option(
        "auto", "auto (CUDA when available) | cpu | cuda | cuda:N", check=_device("device")
    )
    seed: int = option(0, "seed of requests that bring none", check=int_in(0, 2**63 - 1))
    max_model_len: int | None = option(
        None,
        "longest sequence, prompt + output",
        check=int_in(1, 2**31),
        default_text="max_position_embeddings (YaRN: original × factor)",
    )
    skip_tokenizer_init: bool = option(
        False, "no tokenizer: prompts and outputs are token ids only"
    )
    load_format: str = option(
        "auto", "auto: the checkpoint's safetensors; dummy: random weights", choices=LOAD_FORMATS
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CacheOptions:
    """The paged KV pool and its prefix cache."""

    kv_cache_tokens: int | None = option(
        None,
        "exact KV pool size in tokens (with attention nodes: of each node)",
        check=int_in(1, 2**40),
        default_text="from memory_utilization",
    )
    memory_utilization: float | None = option(
        None,
        "fraction of free memory (after the weights) for the KV pool",
        check=number_in(0, 1, open_low=True),
        aliases=("gpu_memory_utilization",),
        flags=("--gpu-memory-utilization",),
        default_text=(
            f"{DEFAULT_MEMORY_UTILIZATION['cuda']} on GPU, "
            f"{DEFAULT_MEMORY_UTILIZATION['cpu']} of available RAM on CPU"
        ),
    )
    block_size: int = option(16, "tokens per KV block", check=int_in(1, 1024))
    enable_prefix_caching: bool = option(
        True, "reuse the KV of full blocks shared with earlier prompts"
    )
    kv_cache_dtype: str = option(
        "auto",
        "how K/V are stored: auto (the model's dtype); int8 (a float32 scale per token and "
        "KV head, beside it); fp8 (float8_e4m3fn, a scale per layer for K and for V: "
        "2·max|x|/448 from the model's calibration (shardlm calibrate) if it has KV "
        "statistics, else 1.0)",
        choices=KV_CACHE_DTYPES,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ParamError(
                "kv_cache_tokens",
                f"kv_cache_tokens must be an integer in [{self.block_size}, {2**40}] (at least "
                f"one block of block_size), got {self.kv_cache_tokens}",
            )


@dataclass(frozen=True)
class SchedulerOptions:
    """What one step may hold."""

    max_num_batched_tokens: int = option(
        2048, "tokens per step (decodes + prefill chunks)", check=int_in(1, 2**20)
    )
    max_num_seqs: int = option(256, "sequences running at once", check=int_in(1, 2**16))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ParallelOptions:
    """Tensor parallelism (figure 1) and attention nodes (figure 2)."""

    tensor_parallel_size: int = option(
        1,
        "split the model over N processes",
        check=int_in(1, 1024),
        flags=("--tp",),
        default_text="1; the CLI under torchrun: WORLD_SIZE / (α + β)",
    )
    tp_timeout_s: float = option(
        60.0,
        "seconds before a dead or hung rank is reported",
        check=number_in(1, 3600),
        flags=("--tp-timeout",),
    )
    attention_nodes: int = option(
        0,
        "β: R-shard the KV cache over β attention nodes per head group (0: none)",
        check=int_in(0, 1024),
    )
    kv_chunk_size: int = option(
        16,
        "tokens per R-shard chunk: position p lives on node (p // c) % β",
        check=int_in(1, 2**20),
    )
    attention_device: str | None = option(
        None,
        "device of the attention nodes' KV",
        check=_device("attention_device"),
        default_text="the compute device",
    )
    attention_transport: str = option(
        "distributed",
        "attention nodes (and compute nodes) as their own ranks, or as objects in the "
        "tensor-parallel ranks (a test aid)",
        choices=ATTENTION_TRANSPORTS,
    )
    compute_nodes: int = option(
        1,
        "α: compute nodes, each t ranks holding the dense weights, sharing the attention "
        "nodes; each runs its own sequences' decodes and its share of every prefill",
        check=int_in(1, 64),
    )
    compute_chunk_size: int = option(
        16,
        "prefill positions are dealt to compute nodes in runs: position p goes to compute "
        "node (p // size) % α",
        check=int_in(1, 2**20),
    )
    attention_link: str = option(
        "gloo",
        "how compute and attention-node ranks exchange tensors: gloo (through host memory, "
        "pinned on a CUDA compute side) or nccl (GPU to GPU, both sides on CUDA, a GPU per "
        "rank; not yet run on GPUs)",
        choices=ATTENTION_LINKS,
    )
    node_microbatches: int = option(
        1,
        "m: with attention nodes, cut each step into up to m micro-batches of whole "
        "sequences that ping-pong between the compute side and the nodes (1: no overlap)",
        check=int_in(1, 16),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.attention_device is not None and not self.attention_nodes:
            raise ParamError("attention_device", "attention_device needs attention_nodes ≥ 1")
        if self.attention_link == "nccl" and not self.remote_nodes:
            raise ParamError(
                "attention_link",
                "attention_link='nccl' links attention-node ranks: it needs attention_nodes ≥ 1 "
                "with attention_transport='distributed'",
            )
        if self.compute_nodes > 1 and not self.attention_nodes:
            raise ParamError(
                "compute_nodes",
                f"compute_nodes={self.compute_nodes} needs attention_nodes ≥ 1: compute nodes "
                "share the KV cache that the attention nodes hold",
            )

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def remote_nodes(self) -> bool:
        """Attention and compute nodes are ranks of their own (the distributed transport);
        in-process, the t tensor-parallel ranks host them all."""
        return self.attention_nodes > 0 and self.attention_transport == "distributed"

    @property
    def compute_ranks(self) -> int:
        """Ranks of the compute side: α·t when compute nodes are ranks, else t."""
        return self.tp_size * (self.compute_nodes if self.remote_nodes else 1)

    @property
    def world_size(self) -> int:
        """Ranks in the job: α·t compute ranks, then t·β attention nodes (distributed
        transport); t ranks in-process."""
        nodes = self.tp_size * self.attention_nodes if self.remote_nodes else 0
        return self.compute_ranks + nodes

    def compute_rank(self, compute_node: int, tp_rank: int) -> int:
        return compute_node * self.tp_size + tp_rank

    def node_rank(self, head_group: int, shard: int) -> int:
        return self.compute_ranks + head_group * self.attention_nodes + shard

    def role_of(self, rank: int) -> str:
        """How a rank is named in logs and errors."""
        if rank < self.compute_ranks:
            a, r = divmod(rank, self.tp_size)
            if self.compute_nodes == 1 or not self.remote_nodes:
                return f"tensor-parallel rank {rank}"
            return f"compute node {a}, tensor-parallel rank {r} (rank {rank})"
        g, s = divmod(rank - self.compute_ranks, self.attention_nodes)
        return f"{node_name(g, s)} (rank {rank})"


@dataclass(frozen=True)
class KernelOptions:
    """Which code runs the step on a GPU."""

    attention_backend: str = option(
        "auto",
        "torch: PyTorch (SDPA); triton: the Triton kernels; auto: triton on CUDA when they fit",
        choices=ATTENTION_BACKENDS,
    )
    enforce_eager: bool = option(False, "no CUDA graphs: every decode step runs eagerly")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class QuantizationOptions:
    """W8A8 quantization and the activation redistribution module (figure 3, docs/arm.md)."""

    quantization: str | None = option(
        None,
        "quantization of the MLP down projection: W8A8 int8 or fp8, or int8 weight-only",
        choices=(None, *QUANTIZATIONS),
    )
    quantize_all_linears: bool = option(
        False, "quantize QKV/O/gate/up and the LM head too (a tied embedding table stays float)"
    )
    arm: str = option(
        "none", "activation redistribution in front of the down projection", choices=ARM_MODES
    )
    arm_calibration: str | None = option(
        None,
        "statistics for arm smooth|both",
        check=_path("arm_calibration"),
        default_text="your calibration of the model if any (shardlm calibrate), else "
        "MODEL/arm_calibration.safetensors",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.quantize_all_linears and self.quantization is None:
            raise ParamError(
                "quantize_all_linears",
                "quantize_all_linears=True needs a quantization (int8, fp8 or int8_weight_only)",
            )
        if self.arm_calibration is not None and self.arm not in ("smooth", "both"):
            raise ParamError(
                "arm_calibration",
                f"arm_calibration is only used with arm='smooth' or 'both', not {self.arm!r}",
            )

    @property
    def transforms(self) -> WeightTransforms:
        return WeightTransforms(
            self.arm, self.arm_calibration, self.quantization, self.quantize_all_linears
        )


@dataclass(frozen=True)
class SpeculativeOptions:
    """Speculative decoding (docs/architecture.md, "Speculative decoding"); off by default."""

    speculative_config: str | None = option(
        None,
        "speculative decoding as JSON in vLLM's shape: "
        '{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": N, '
        '"prompt_lookup_min": N0} or {"method": "draft_model", "model": PATH|"builtin", '
        '"num_speculative_tokens": K}; optional "disable_by_batch_size" (default '
        f"{DEFAULT_DISABLE_BY_BATCH})",
        check=check_speculative_config,
        default_text="off",
    )

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):  # LLM(speculative_config={...})
            spec = parse_speculative_config(self.speculative_config)
            object.__setattr__(self, "speculative_config", spec.to_json())
        check_fields(self)

    @property
    def config(self) -> SpeculativeConfig | None:
        return parse_speculative_config(self.speculative_config)


GROUP_TITLES = {
    "model": "Model and loading",
    "cache": "KV cache",
    "scheduler": "Scheduler",
    "parallel": "Parallelism",
    "kernels": "Kernels",
    "quantization": "Quantization and ARM",
    "speculative": "Speculative decoding",
}


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the engine, by concern (see the module docstring)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    kernels: KernelOptions = field(default_factory=KernelOptions)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)

    def __post_init__(self) -> None:
        backend, nodes = self.kernels.attention_backend, self.parallel.attention_nodes
        if backend == "triton" and nodes:
            raise ParamError(
                "attention_backend",
                "attention_backend='triton' is for the local paged pool; attention nodes "
                "compute with the reference primitive (use attention_backend='torch' with them)",
            )
        bs = self.cache.block_size
        if backend == "triton" and bs & (bs - 1):
            raise ParamError(
                "attention_backend",
                f"attention_backend='triton' needs a power-of-two block_size, got {bs}",
            )

    # -- building --
    @classmethod
    def from_kwargs(cls, caller: str = "LLM", /, **kwargs: Any) -> EngineConfig:
        """From flat keyword arguments (``LLM(model, **kwargs)``); a torch.dtype is taken by
        name."""
        if isinstance(kwargs.get("dtype"), torch.dtype):
            kwargs["dtype"] = _dtype_name(kwargs["dtype"])
        return from_kwargs(cls, kwargs, caller)

    def replace(self, **kwargs: Any) -> EngineConfig:
        """A copy with some options changed (flat names)."""
        return EngineConfig.from_kwargs("EngineConfig.replace", **{**self.flat(), **kwargs})

    def flat(self) -> dict[str, Any]:
        return flat_values(self)

    def to_json(self) -> str:
        return json.dumps(self.flat())

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        return cls.from_kwargs("the worker configuration", **json.loads(text))

    # -- resolving --
    def resolve(self) -> EngineConfig:
        """What runs (module docstring). Reads config.json; raises before anything loads."""
        m, p = self.model, self.parallel
        path = Path(m.model) if m.model is not None else demo_checkpoint()
        if not path.is_dir():
            raise ParamError(
                "model", f"model {str(m.model)!r} is not a directory (expected a checkpoint dir)"
            )
        config = ModelConfig.from_pretrained(path)
        limit = config.max_context
        if m.max_model_len is not None and m.max_model_len > limit:
            source = "YaRN's original × factor" if limit > config.max_position_embeddings else ""
            raise ParamError(
                "max_model_len",
                f"max_model_len must be an integer in [1, {limit}] "
                f"({source or 'max_position_embeddings'}), got {m.max_model_len}",
            )
        tp = p.tensor_parallel_size
        check_tensor_parallel(config, tp)
        device = resolve_device(m.device)
        dtype = resolve_dtype(m.dtype, config.torch_dtype, device)
        self._check_kernels(device)
        attention_device = None
        if p.attention_device is not None:
            attention_device = str(resolve_device(p.attention_device))
        check_attention_device(p, attention_device, device)
        check_attention_link(p.attention_link, device, attention_device)
        q = self.quantization
        transforms = WeightTransforms.resolve(
            path, q.arm, q.arm_calibration, q.quantization, q.quantize_all_linears
        )
        spec = self.speculative.config
        if spec is not None and spec.model is not None:
            spec = dataclasses.replace(spec, model=str(resolve_draft_path(spec.model)))
        return self.replace(
            model=str(path),
            speculative_config=None if spec is None else spec.to_json(),
            dtype=_dtype_name(dtype),
            device=str(device),
            max_model_len=m.max_model_len or limit,
            attention_device=attention_device,
            arm_calibration=transforms.calibration,
        )

    def _check_kernels(self, device: torch.device) -> None:
        """The Triton kernels need triton and a CUDA device (or, for tests on CPU, Triton's
        interpreter: TRITON_INTERPRET=1)."""
        if self.kernels.attention_backend != "triton":
            return
        if not triton_available():
            raise ParamError(
                "attention_backend",
                "attention_backend='triton' needs triton installed (pip install triton)",
            )
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ParamError(
                "attention_backend",
                "attention_backend='triton' runs on CUDA devices; on CPU only in Triton's "
                "interpreter (TRITON_INTERPRET=1, for tests)",
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The resolved dtype (after ``resolve``)."""
        return DTYPES[self.model.dtype]

    @property
    def uses_cuda_graphs(self) -> bool:
        """Decode graphs are possible: one CUDA rank, not turned off. (They also need the
        Triton kernels, which each rank resolves on its own.)"""
        return (
            torch.device(self.model.device).type == "cuda"
            and self.parallel.world_size == 1
            and not self.kernels.enforce_eager
        )


def resolve_draft_path(model: str) -> Path:
    """A draft model's checkpoint directory ("builtin": the built-in model's draft)."""
    path = demo_draft_checkpoint() if model == BUILTIN_DRAFT else Path(model)
    if not (path / "config.json").is_file():
        raise ParamError(
            "speculative_config.model",
            f"speculative_config.model {model!r} is not a checkpoint directory (no config.json)",
        )
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ParamError(
            "dtype", f"dtype {dtype} is not supported; allowed: {', '.join(DTYPE_CHOICES)}"
        )
    return name


def tensor_parallel_size(
    requested: int | None, compute_nodes: int, attention_nodes: int, transport: str
) -> int:
    """The given size, or under torchrun what the job's WORLD_SIZE implies (they must agree
    when both are given): WORLD_SIZE = α·t compute ranks + t·β attention-node ranks when the
    nodes are distributed, else t."""
    if not under_torchrun():
        return requested or 1
    world = torchrun_rank()[1]
    remote = attention_nodes > 0 and transport == "distributed"
    per_tp_rank = compute_nodes + attention_nodes if remote else 1
    if world % per_tp_rank or requested not in (None, world // per_tp_rank):
        tp = "t" if requested is None else str(requested)
        raise ParamError(
            "tensor_parallel_size",
            f"torchrun's WORLD_SIZE {world} does not fit t = {tp} tensor-parallel ranks × "
            f"(α = {compute_nodes} compute nodes + β = {attention_nodes if remote else 0} "
            "attention nodes); WORLD_SIZE must be t·(α + β) with distributed attention "
            "nodes, else t (tensor_parallel_size)",
        )
    return world // per_tp_rank


def check_attention_device(
    p: ParallelOptions, attention_device: str | None, compute_device: torch.device
) -> None:
    """Refuse, before anything starts, an attention device that cannot work
    (``attention_device``: the resolved one)."""
    dev = torch.device(attention_device) if attention_device is not None else compute_device
    if p.remote_nodes and dev.type == "cuda":
        if attention_device is not None and dev.index is not None:
            raise ParamError(
                "attention_device",
                f"attention_device={attention_device!r}: distributed attention nodes each take "
                "the GPU of their local rank; give 'cuda' without an index",
            )
        ranks = p.world_size
        if not under_torchrun() and torch.cuda.device_count() < ranks:
            raise ParamError(
                "attention_nodes",
                f"attention_nodes={p.attention_nodes} on CUDA with the distributed transport needs "
                f"one GPU per rank ({ranks}), this machine has {torch.cuda.device_count()}; "
                "use attention_device='cpu' or attention_transport='in-process'",
            )


def check_attention_link(
    link: str, compute_device: torch.device, attention_device: str | None
) -> None:
    """Refuse an ``attention_link`` (the torch.distributed backend of the compute ↔
    attention-node tensors) that cannot work where the two sides live."""
    node_device = torch.device(attention_device) if attention_device else compute_device
    if link == "nccl" and not (compute_device.type == "cuda" and node_device.type == "cuda"):
        raise ParamError(
            "attention_link",
            f"attention_link='nccl' moves tensors GPU to GPU: it needs the compute side and the "
            f"attention nodes on CUDA (compute on {compute_device.type}, attention nodes on "
            f"{node_device.type}); use 'gloo'",
        )


# -- the command line --
def add_engine_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """The engine's flags, generated from the options (``--help`` shows each default)."""
    add_arguments(parser, EngineConfig, exclude=exclude, titles=GROUP_TITLES)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line, as ``LLM`` keyword arguments. Under
    torchrun every rank runs the same command, so the job's WORLD_SIZE fixes the tensor-
    parallel size (checked against --tp when both are given). The Python API does not infer
    it: ``LLM()`` in a torchrun script is one standalone engine per rank unless told."""
    given = kwargs_from(args, EngineConfig)
    if under_torchrun():
        defaults = ParallelOptions()
        given["tensor_parallel_size"] = tensor_parallel_size(
            given.get("tensor_parallel_size"),
            given.get("compute_nodes", defaults.compute_nodes),
            given.get("attention_nodes", defaults.attention_nodes),
            given.get("attention_transport", defaults.attention_transport),
        )
    return given
