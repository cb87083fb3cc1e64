"""safetensors → model parameters, memory-mapped.

Each parameter is filled from the checkpoint tensors its ``WeightSpec`` names: a tensor is
read through safetensors' mmap (only its pages are touched), checked against the expected
shape, cast, and copied into place. Nothing else of the checkpoint is materialised.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from shardlm.errors import CheckpointError
from shardlm.models.llama import LlamaForCausalLM, WeightSource

INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Show a progress bar only when loading takes long enough to be worth watching.
PROGRESS_MIN_BYTES = 256 * 2**20

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(
    dtype: str | torch.dtype, config_dtype: str | None, device: torch.device
) -> torch.dtype:
    """``auto`` → the checkpoint's torch_dtype on accelerators, float32 on CPU (where half
    precision matmuls are slow or unsupported)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(
                f"dtype {dtype} is not supported; allowed: auto, float32, bfloat16, float16"
            )
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(str(config_dtype), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported; allowed: auto, float32, bfloat16, float16"
        )
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must exist on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (from the index when there is one)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists {f.name}, which is not in {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if pickles:
        raise CheckpointError(
            f"{path} has only pickle weights ({', '.join(pickles)}); shardlm loads safetensors "
            "only: convert with `transformers` (model.save_pretrained(dir, "
            "safe_serialization=True))"
        )
    raise CheckpointError(f"no *.safetensors weights in {path}")


def _read(source: WeightSource, where: dict, path: Path) -> torch.Tensor:
    """The tensor (or this rank's slice of it) named by ``source``, shape-checked."""
    if source.name not in where:
        raise CheckpointError(
            f"checkpoint {path} is missing tensor {source.name!r} "
            f"(expected shape {list(source.shape)})"
        )
    file, handle = where[source.name]
    lazy = handle.get_slice(source.name)
    shape = tuple(lazy.get_shape())
    if shape != source.shape:
        raise CheckpointError(
            f"tensor {source.name!r} in {file.name} has shape {list(shape)}, "
            f"expected {list(source.shape)}"
        )
    if source.narrow is None:
        return handle.get_tensor(source.name)
    dim, start, length = source.narrow
    index = (slice(None),) * dim + (slice(start, start + length),)
    return lazy[index]


def load_weights(model: LlamaForCausalLM, path: str | Path, dtype: torch.dtype) -> None:
    """Fill every parameter of ``model`` from the checkpoint at ``path``."""
    path = Path(path)
    files = checkpoint_files(path)
    params = dict(model.named_parameters())
    specs = list(model.weight_specs())
    total_bytes = sum(params[s.param].nbytes for s in specs)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt", device="cpu")) for f in files]
        where = {name: (f, h) for f, h in zip(files, handles, strict=True) for name in h.keys()}  # noqa: SIM118 (safe_open is no dict)
        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="Loading weights",
            disable=total_bytes < PROGRESS_MIN_BYTES,
        )
        with bar, torch.no_grad():
            for spec in specs:
                param = params[spec.param]
                row = 0
                for source in spec.sources:
                    tensor = _read(source, where, path).to(dtype)
                    rows = tensor.shape[0]
                    if spec.transposed:
                        param[:, row : row + rows].copy_(tensor.t())
                    else:
                        param[row : row + rows].copy_(tensor)
                    row += rows
                # Vocabulary padding beyond the checkpoint's rows (tensor parallelism).
                if spec.transposed:
                    param[:, row:].zero_()
                else:
                    param[row:].zero_()
                bar.update(param.nbytes)


LOAD_FORMATS = ("auto", "dummy")


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights instead of a checkpoint (``load_format="dummy"``, as vLLM calls it):
    for speed measurements of a model shape nobody has to download. Matrices ~ N(0, 0.02²),
    norm weights 1, biases 0, drawn on the parameter's device from a seeded generator."""
    gen = torch.Generator(model.lm_head.weight_t.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() > 1:
            param.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.zero_()
