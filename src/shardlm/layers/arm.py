"""ARM, the activation redistribution module of the third design figure.

The SwiGLU MLP computes y = h·W with h = SiLU(x·W_gate) ⊙ (x·W_up) and W = W_downᵀ (the
engine's [in, out] layout). In Llama-family models a few channels of h are 50–1000× larger
than the rest, so a per-token int8/fp8 scale set by them leaves the other channels a handful
of levels. ARM inserts an invertible T between h and the down projection:

    y = h·W = (h·T)·(T⁻¹·W),      T = diag(s)·H

* diag(s), smoothing (SmoothQuant's idea): s_j = w_jᶦ⁻ᵅ / a_jᵅ with a_j the calibrated
  max |h_j| and w_j the max |W[j, :]|. Large channels are divided down and their weight rows
  multiplied up by the same factor, sharing the range between activation and weight. Since
  h_j = SiLU(g_j)·u_j, scaling h_j is scaling u_j: s is folded into W_up's column j (and
  its bias), so it costs nothing at run time.
* H, a normalized Hadamard matrix (layers/hadamard.py), orthonormal: every output channel
  is a ±1/√b mix of b input channels, so an outlier's energy is spread evenly over them and
  the distribution becomes close to Gaussian. Over the full width when one can be built
  (n = K·2^m, H = H_K ⊗ H_(2^m) with a dense H_K: Paley or Goethals–Seidel), else
  block-diagonal. It runs online on h
  (a fast Walsh–Hadamard transform plus one small dense product, per token). H_K is not
  symmetric, so H⁻¹ = Hᵀ and the fold is W ← Hᵀ·diag(1/s)·W. Under tensor parallelism each
  rank transforms only its own slice of the intermediate features, with the plan of its
  slice's width (H never crosses ranks), so no communication is added.

In exact arithmetic the model's function is unchanged; in float32 the logits move by
rounding only. The weights are folded once, at load, before any quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardlm.layers.hadamard import HadamardPlan, hadamard_layout, hadamard_transform

ARM_MODES = ("none", "hadamard", "smooth", "both")
# SmoothQuant's migration strength: 0.5 splits the range evenly between h and W.
DEFAULT_ALPHA = 0.5


def check_arm_mode(arm: str) -> None:
    if arm not in ARM_MODES:
        raise ValueError(f"arm must be one of {', '.join(ARM_MODES)}, got {arm!r}")


def uses_smoothing(arm: str) -> bool:
    return arm in ("smooth", "both")


def uses_hadamard(arm: str) -> bool:
    return arm in ("hadamard", "both")


def smoothing_factors(
    act_absmax: torch.Tensor, weight_t: torch.Tensor, alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """s [in] for the down projection: s_j = w_j^(1−α) / a_j^α, float32.

    ``act_absmax`` a [in] is the calibrated max |h_j|; ``weight_t`` is the down projection
    [in, out], whose row j feeds on channel j. Channels that never fired in calibration
    (a_j ≈ 0) and all-zero weight rows are clamped so s stays finite.
    """
    a = act_absmax.float().clamp(min=1e-5 * float(act_absmax.max().clamp(min=1e-12)))
    w = weight_t.float().abs().amax(dim=1)
    w = w.clamp(min=1e-5 * float(w.max().clamp(min=1e-12)))
    return w.pow(1.0 - alpha) / a.pow(alpha)


@dataclass(frozen=True)
class ArmTransform:
    """T = diag(scale)·H for one layer's down-projection input on one rank.

    ``scale`` is None without smoothing; ``hadamard`` is H's plan, None without it.
    """

    scale: torch.Tensor | None
    hadamard: HadamardPlan | None

    @property
    def block(self) -> int:
        """H's block size (the width itself when H covers it), 0 without H."""
        return self.hadamard.block if self.hadamard is not None else 0

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """h·T, for measuring (the engine folds diag(s) into W_up and runs only H online)."""
        if self.scale is not None:
            h = h * self.scale.to(h)
        return hadamard_transform(h, self.hadamard) if self.hadamard is not None else h

    def fold_into_down(self, weight_t: torch.Tensor) -> torch.Tensor:
        """T⁻¹·W = Hᵀ·diag(1/s)·W for W [in, out] (H orthonormal, H⁻¹ = Hᵀ): rows scaled by
        1/s, then Hᵀ along the input dimension, computed as (Wᵀ·H)ᵀ since the transform
        multiplies its last dimension by H. Computed in at least float32, returned in W's
        dtype."""
        w = weight_t.to(torch.promote_types(weight_t.dtype, torch.float32))
        if self.scale is not None:
            w = w / self.scale.to(w.dtype)[:, None]
        if self.hadamard is not None:
            w = hadamard_transform(w.t(), self.hadamard).t()
        return w.to(weight_t.dtype)


def arm_transform(
    arm: str,
    intermediate: int,
    act_absmax: torch.Tensor | None,
    down_weight_t: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> ArmTransform:
    """The transform of one layer on one rank: ``intermediate`` is this rank's slice of the
    MLP width (H is planned for it), ``act_absmax`` this rank's slice of the calibration
    (needed for smoothing)."""
    scale = None
    if uses_smoothing(arm):
        if act_absmax is None:
            raise ValueError(f"arm={arm!r} needs calibration statistics")
        scale = smoothing_factors(act_absmax, down_weight_t, alpha)
    plan = hadamard_layout(intermediate) if uses_hadamard(arm) else None
    return ArmTransform(scale, plan)
