"""Calibration for ARM's smoothing and the fp8 KV cache's scales.

``shardlm calibrate`` runs text through the unmodified model, records for each layer n and
intermediate channel j the largest |h_j| seen over all tokens, and saves the table as
safetensors beside the checkpoint (``arm_calibration.safetensors``: one float32 tensor
``layers.{n}.mlp.down_proj.input_absmax`` of the full MLP width per layer). Tensor-parallel
ranks later read their own slice of it.

The same run records, per layer and KV head, the largest |k| (after RoPE, as k is written
to the KV cache) and |v|: ``layers.{n}.self_attn.k_absmax`` / ``v_absmax``, float32
[num_key_value_heads]. ``kv_cache_dtype="fp8"`` sizes its per-layer scales on them
(cache/kv_quant.py ``Fp8Scales``). Files written before these were recorded have none and
still load: ``load_kv_absmax`` returns None for them.

Where that file lives: beside the checkpoint when its directory can be written, else (the
built-in model, which is inside the installed package, or a read-only checkpoint) in a
per-user cache directory, keyed by the checkpoint's resolved path. Readers look in the
per-user place first (``find_calibration``).

Also here: the distribution statistics ``shardlm inspect`` prints (kurtosis, max/RMS, int8
round-trip error), measured on captured down-projection inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shardlm.config import ModelConfig
from shardlm.errors import CheckpointError

CALIBRATION_FILE = "arm_calibration.safetensors"
PACKAGE_DIR = Path(__file__).resolve().parent  # the installed shardlm package


def user_cache_dir() -> Path:
    """shardlm's per-user directory: $SHARDLM_CACHE_DIR, else $XDG_CACHE_HOME/shardlm, else
    ~/.cache/shardlm. Calibrations of checkpoints that cannot be written beside go here."""
    if os.environ.get("SHARDLM_CACHE_DIR"):
        return Path(os.environ["SHARDLM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "shardlm"


def user_calibration_path(model: str | os.PathLike) -> Path:
    """The per-user calibration of ``model``: one directory per resolved checkpoint path (its
    name for people, a hash so two checkpoints of the same name do not collide)."""
    resolved = Path(model).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return user_cache_dir() / "calibration" / f"{resolved.name}-{digest}" / CALIBRATION_FILE


def calibration_candidates(model: str | os.PathLike) -> tuple[Path, Path]:
    """Where a model's calibration is looked for, in order: the per-user one (written only
    when the checkpoint's directory could not be, so it is the newer), then the checkpoint's."""
    return user_calibration_path(model), Path(model) / CALIBRATION_FILE


def find_calibration(model: str | os.PathLike) -> Path | None:
    """The calibration ``arm="smooth"|"both"`` reads by default, or None if there is none:
    of the per-user file and the checkpoint's own, the one written last (a per-user file is
    keyed by the checkpoint's path, so a checkpoint replaced or recalibrated in place since
    must not lose to it)."""
    found = [p for p in calibration_candidates(model) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def inside_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is in the installed package: never written to (an upgrade or
    reinstall would replace it, and it may be shared or read-only)."""
    return Path(path).resolve().is_relative_to(PACKAGE_DIR)


def writable_beside(model: str | os.PathLike) -> bool:
    """Whether calibrate may write its file into the checkpoint's directory."""
    directory = Path(model)
    existing = directory / CALIBRATION_FILE
    if inside_package(directory) or not os.access(directory, os.W_OK):
        return False
    return not existing.exists() or os.access(existing, os.W_OK)


def calibration_out_path(model: str | os.PathLike) -> Path:
    """Where ``shardlm calibrate`` writes without --out: beside the checkpoint when it can and
    no per-user calibration of it exists, else the per-user place. The file just written is
    the newest, so ``find_calibration`` finds it."""
    user, beside = calibration_candidates(model)
    return beside if writable_beside(model) and not user.exists() else user


def tensor_name(layer: int) -> str:
    return f"layers.{layer}.mlp.down_proj.input_absmax"


def kv_tensor_name(layer: int, which: str) -> str:
    """The name of max |k| (``which`` = "k") or max |v| ("v") of one layer, per KV head."""
    return f"layers.{layer}.self_attn.{which}_absmax"


KVAbsMax = tuple[list[torch.Tensor], list[torch.Tensor]]  # per layer: max |k|, max |v| [Hkv]


def save_calibration(
    path: str | Path, absmax: list[torch.Tensor], info: dict, kv_absmax: KVAbsMax | None = None
) -> None:
    # Own copies (clone is contiguous): safetensors refuses tensors that share memory.
    tensors = {tensor_name(n): a.float().cpu().clone() for n, a in enumerate(absmax)}
    if kv_absmax is not None:
        for which, tables in zip("kv", kv_absmax, strict=True):
            for n, a in enumerate(tables):
                tensors[kv_tensor_name(n, which)] = a.float().cpu().clone()
    save_file(tensors, str(path), metadata={"shardlm": json.dumps(info)})


def _read(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a calibration file (a few KiB per layer), as float32."""
    try:
        return {name: t.float() for name, t in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"calibration {path} is not a readable safetensors file: {e}"
        ) from None


def _checked(path: str | Path, name: str, t: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """``t`` if it is [size], finite and non-negative, else a one-line error naming it."""
    if tuple(t.shape) != (size,):
        raise CheckpointError(
            f"calibration {path}: {name} has shape {list(t.shape)}, expected [{size}] ({what}); "
            "it was made for another model"
        )
    if not torch.isfinite(t).all() or (t < 0).any():
        raise CheckpointError(f"calibration {path}: {name} has negative or non-finite values")
    return t


def load_calibration(path: str | Path, config: ModelConfig) -> list[torch.Tensor]:
    """The per-layer tables, checked against the model they are applied to."""
    tensors = _read(path)
    tables = []
    for n in range(config.num_hidden_layers):
        name = tensor_name(n)
        if name not in tensors:
            raise CheckpointError(
                f"calibration {path} has no {name!r}: it was made for another model (this one "
                f"has {config.num_hidden_layers} layers); run `shardlm calibrate` for this "
                "checkpoint"
            )
        size = config.intermediate_size
        tables.append(_checked(path, name, tensors[name], size, "intermediate_size"))
    return tables


def load_kv_absmax(path: str | Path, config: ModelConfig) -> KVAbsMax | None:
    """Per layer, max |k| and max |v| of each KV head, checked against the model; None if
    the file has no KV statistics (written before ``calibrate`` recorded them)."""
    tensors = _read(path)
    names = [kv_tensor_name(n, w) for w in "kv" for n in range(config.num_hidden_layers)]
    present = [name in tensors for name in names]
    if not any(present):
        return None
    if not all(present):
        missing = names[present.index(False)]
        raise CheckpointError(
            f"calibration {path} has KV statistics but no {missing!r}: it was made for another "
            f"model (this one has {config.num_hidden_layers} layers); run `shardlm calibrate`"
        )
    heads = config.num_key_value_heads
    tables = [_checked(path, name, tensors[name], heads, "num_key_value_heads") for name in names]
    layers = config.num_hidden_layers
    return tables[:layers], tables[layers:]


@contextmanager
def _hooked(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Keep ``handles`` registered while the context is open, remove them on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def down_proj_inputs(
    model: torch.nn.Module, sink: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``sink(layer, h)`` with the input h [tokens, width] of every down projection the
    model runs while the context is open (forward pre-hooks, removed on exit)."""
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _module, args, n=n: sink(n, args[0].detach())
        )
        for n, layer in enumerate(model.layers)
    ]
    with _hooked(handles):
        yield


class AbsMaxRecorder:
    """Running per-channel max |h| for each layer (the ``sink`` of ``down_proj_inputs``)."""

    def __init__(self, num_layers: int) -> None:
        self.absmax: list[torch.Tensor | None] = [None] * num_layers
        self.tokens = 0

    def __call__(self, layer: int, h: torch.Tensor) -> None:
        m = h.float().abs().amax(dim=0).cpu()
        old = self.absmax[layer]
        self.absmax[layer] = m if old is None else torch.maximum(old, m)
        if layer == 0:
            self.tokens += h.shape[0]

    def tables(self) -> list[torch.Tensor]:
        if any(a is None for a in self.absmax):
            raise RuntimeError("no tokens went through the model")
        return [a for a in self.absmax if a is not None]


@contextmanager
def attention_kv(
    model: torch.nn.Module, sink: Callable[[int, torch.Tensor, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``sink(layer, k, v)`` with the k (after RoPE: what the KV cache stores) and v
    [tokens, Hkv, D] of every attention the model runs while the context is open. A forward
    pre-hook recomputes the layer's projection from its input, whichever attention backend
    runs (the fused kernel never hands k back): one extra QKV product, offline."""

    def hook(n: int) -> Callable:
        def pre(module: torch.nn.Module, args: tuple) -> None:
            x, positions, rotary = args[:3]
            _, k, v = module.project(x, positions, rotary)
            sink(n, k.detach(), v.detach())

        return pre

    handles = [
        layer.self_attn.register_forward_pre_hook(hook(n)) for n, layer in enumerate(model.layers)
    ]
    with _hooked(handles):
        yield


class KVAbsMaxRecorder:
    """Running max |k| and max |v| per layer and KV head (the ``sink`` of ``attention_kv``)."""

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for table, x in ((self.k, k), (self.v, v)):
            m = x.float().abs().amax(dim=(0, 2)).cpu()  # over tokens and channels → [Hkv]
            old = table[layer]
            table[layer] = m if old is None else torch.maximum(old, m)

    def tables(self) -> KVAbsMax:
        if any(a is None for a in self.k + self.v):
            raise RuntimeError("no tokens went through the model")
        return [a for a in self.k if a is not None], [a for a in self.v if a is not None]


def token_windows(ids: list[int], seq_len: int, samples: int) -> list[list[int]]:
    """Up to ``samples`` consecutive, non-overlapping windows of ``seq_len`` tokens (the
    last one may be shorter)."""
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)][:samples]


@dataclass(frozen=True)
class DistributionStats:
    """How quantization-friendly a set of activations is."""

    kurtosis: float  # E[(x−μ)⁴]/σ⁴ over all entries; 3 for a Gaussian, huge with outliers
    max_over_rms: float  # max |x| / RMS(x)
    int8_error: float  # ‖x − deq(q(x))‖ / ‖x‖ with per-token symmetric int8


def distribution_stats(h: torch.Tensor) -> DistributionStats:
    from shardlm.layers.quant import quantize_int8

    x = h.double()
    centred = x - x.mean()
    var = centred.pow(2).mean()
    q, scale = quantize_int8(h, dim=-1)
    roundtrip = q.double() * scale.double()
    return DistributionStats(
        kurtosis=float(centred.pow(4).mean() / var.pow(2)),
        max_over_rms=float(x.abs().max() / x.pow(2).mean().sqrt()),
        int8_error=float((x - roundtrip).norm() / x.norm()),
    )
