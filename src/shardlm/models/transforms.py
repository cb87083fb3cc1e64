"""What happens to a loaded model's weights before it serves: the ARM fold, then quantization.

Order matters: ARM changes the down projection's weights (T⁻¹·W) and the up projection's
(smoothing), so quantization must see the folded weights. Both run once per rank on that
rank's shard, right after ``load_weights``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shardlm.calibration import calibration_candidates, find_calibration, load_calibration
from shardlm.errors import ConfigError
from shardlm.layers.arm import ArmTransform, arm_transform, check_arm_mode, uses_smoothing
from shardlm.layers.hadamard import HadamardPlan
from shardlm.layers.linear import Linear
from shardlm.layers.quant import QUANTIZATIONS, fp8_supported, quantize_linear
from shardlm.models.llama import LlamaForCausalLM, LlamaMLP

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightTransforms:
    """The engine's ARM and quantization arguments, validated.

    ``calibration``: the file of per-channel statistics smoothing needs (``shardlm
    calibrate`` writes it beside the checkpoint, or in a per-user directory when it cannot:
    ``calibration.find_calibration`` looks in both).
    """

    arm: str = "none"
    calibration: str | None = None
    quantization: str | None = None
    quantize_all_linears: bool = False

    @classmethod
    def resolve(
        cls,
        model: str | Path,
        arm: str = "none",
        arm_calibration: str | Path | None = None,
        quantization: str | None = None,
        quantize_all_linears: bool = False,
    ) -> WeightTransforms:
        check_arm_mode(arm)
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                f"got {quantization!r}"
            )
        if not isinstance(quantize_all_linears, bool):
            raise ValueError(f"quantize_all_linears must be a bool, got {quantize_all_linears!r}")
        if quantize_all_linears and quantization is None:
            raise ValueError(
                "quantize_all_linears=True needs a quantization (int8, fp8 or int8_weight_only)"
            )
        if arm_calibration is not None and not isinstance(arm_calibration, (str, os.PathLike)):
            raise ValueError(
                f"arm_calibration must be a path, got {type(arm_calibration).__name__}"
            )
        if arm_calibration is not None and not uses_smoothing(arm):
            raise ValueError(
                f"arm_calibration is only used with arm='smooth' or 'both', not {arm!r}"
            )
        calibration = None
        if uses_smoothing(arm):
            calibration = str(calibration_file(model, arm, arm_calibration))
        return cls(arm, calibration, quantization, quantize_all_linears)

    def check_device(self, device: torch.device) -> None:
        if self.quantization == "fp8" and device.type == "cuda" and not fp8_supported(device):
            cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise ConfigError(
                f"quantization='fp8' needs a GPU of compute capability ≥ 8.9 (Ada, Hopper); "
                f"{device} has {cap}: use quantization='int8'"
            )

    def describe(self, model: LlamaForCausalLM | None = None) -> str:
        parts = []
        if self.arm != "none":
            plan = model.layers[0].mlp.hadamard if model is not None else None
            parts.append(
                f"arm={self.arm}" + (f" ({_describe_hadamard(plan, model)})" if plan else "")
            )
        if self.quantization:
            which = "all linears" if self.quantize_all_linears else "down_proj"
            parts.append(f"{self.quantization} {which}")
        return ", ".join(parts) or "no weight transforms"


def _describe_hadamard(plan: HadamardPlan, model: LlamaForCausalLM) -> str:
    """'Hadamard 12×16 over the MLP width' or 'Hadamard blocks of 64' (this rank's slice)."""
    if plan.block == model.layers[0].mlp.down_proj.in_features:
        return f"Hadamard {plan} over the MLP width"
    return f"Hadamard blocks of {plan.block}"


def calibration_file(model: str | Path, arm: str, given: str | os.PathLike | None) -> Path:
    """The statistics smoothing reads: the file given, else the model's own (the per-user one
    first, then the checkpoint's), refused with the command to run when there is none."""
    if given:
        path = Path(given)
        if not path.is_file():
            why = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(
                f"arm={arm!r} needs calibration statistics, and {path} {why}; "
                + _how_to_calibrate(model)
            )
        return path
    found = find_calibration(model)
    if found is None:
        user, beside = calibration_candidates(model)
        raise ConfigError(
            f"arm={arm!r} needs calibration statistics, and neither {beside} nor {user} "
            "exists; " + _how_to_calibrate(model)
        )
    return found


def _how_to_calibrate(model: str | Path) -> str:
    return (
        f"run `shardlm calibrate --model {model} --data FILE.txt` first (or use "
        "arm='hadamard', which needs none)"
    )


def apply_weight_transforms(model: LlamaForCausalLM, transforms: WeightTransforms) -> None:
    """Fold ARM into this rank's MLP weights, then quantize the chosen linears in place."""
    transforms.check_device(model.lm_head.weight_t.device)
    if transforms.arm != "none":
        absmax = None
        if transforms.calibration is not None:
            absmax = load_calibration(transforms.calibration, model.config)
        for n, layer in enumerate(model.layers):
            local = None
            if absmax is not None:  # the calibration covers the full width: take our slice
                i, r = model.shard.intermediate, model.tp.rank
                local = absmax[n][r * i : (r + 1) * i]
            fold_arm(layer.mlp, layer_arm(transforms.arm, layer.mlp, local))
    if transforms.quantization:
        for layer in model.layers:
            targets = [(layer.mlp, "down_proj")]
            if transforms.quantize_all_linears:
                targets += [
                    (layer.mlp, "gate_up_proj"),
                    (layer.self_attn, "qkv_proj"),
                    (layer.self_attn, "o_proj"),
                ]
            for owner, name in targets:
                linear = getattr(owner, name)
                setattr(owner, name, quantize_linear(linear, transforms.quantization))
        if transforms.quantize_all_linears:
            # The LM head too: at small models it is a large share of the bytes a decode step
            # reads. With tied embeddings the embedding keeps reading the float table (a
            # token's row is a gather, not a product) and the head gets a quantized copy.
            model.lm_head = quantize_linear(model.lm_head, transforms.quantization)


def layer_arm(arm: str, mlp: LlamaMLP, act_absmax: torch.Tensor | None) -> ArmTransform:
    """The ARM of one loaded MLP (this rank's slice)."""
    down: Linear = mlp.down_proj
    transform = arm_transform(arm, down.in_features, act_absmax, down.weight_t.detach())
    if transform.block == 1:  # an odd width: H_1 = [1] would change nothing
        _warn_no_hadamard(down.in_features, arm)
        transform = ArmTransform(transform.scale, None)
    return transform


@functools.cache  # once per width, not once per layer
def _warn_no_hadamard(width: int, arm: str) -> None:
    logger.warning(
        "MLP width %d (this rank's slice) has no Hadamard block (no power-of-two factor): "
        "the Hadamard part of arm=%s is the identity here",
        width,
        arm,
    )


@torch.no_grad()
def fold_arm(mlp: LlamaMLP, transform: ArmTransform) -> None:
    """Make ``mlp`` compute the same function through T: diag(s) into the up projection's
    columns (and bias), T⁻¹ = Hᵀ·diag(1/s) into the down projection, and the online Hadamard
    switched on (the MLP's ``hadamard`` holds the plan its forward runs)."""
    inter = mlp.down_proj.in_features
    if transform.scale is not None:
        s = transform.scale.to(mlp.gate_up_proj.weight_t.device)
        up = mlp.gate_up_proj.weight_t[:, inter:]  # [hidden, gate | up]: the up half
        up.copy_((up.float() * s).to(up.dtype))
        if mlp.gate_up_proj.bias is not None:
            bias = mlp.gate_up_proj.bias[inter:]
            bias.copy_((bias.float() * s).to(bias.dtype))
    w = mlp.down_proj.weight_t
    w.copy_(transform.fold_into_down(w))
    mlp.hadamard = transform.hadamard
