"""Rotary position embeddings (RoPE) with the ``linear``, ``llama3`` and ``yarn`` scalings.

Each pair of channels (i, i + d/2) of a head is rotated by the angle pos · inv_freq[i]. The
scalings change inv_freq:
  linear: every frequency divided by ``factor`` (positions stretched uniformly);
  llama3: long wavelengths (low frequencies) divided by ``factor``, short ones kept, and the band
          in between interpolated smoothly between the two;
  yarn:   the same idea with the band set in rotations over the pretraining length (a pair
          that turns more than ``beta_fast`` times in it keeps its frequency, one that turns
          fewer than ``beta_slow`` times is divided by ``factor``, linear in the pair index
          between), and cos/sin scaled by an attention factor (0.1·ln(factor) + 1 unless
          given), which scales every q·k by its square: the paper's temperature (Peng et al.,
          2023, "YaRN: Efficient Context Window Extension of Large Language Models").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardlm.config import RopeConfig


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies (float32, length head_dim/2) for the given scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    wavelength_steps = rope.theta**exponents  # θ^(2i/d)
    inv_freq = 1.0 / wavelength_steps
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    if rope.rope_type == "yarn":
        return _yarn_scale(wavelength_steps, head_dim, rope)
    return inv_freq


def rope_attention_scale(rope: RopeConfig) -> float:
    """What cos and sin are multiplied by: 1, except YaRN's attention factor."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(weight: float = 1.0) -> float:
        return 1.0 if rope.factor <= 1 else 0.1 * weight * math.log(rope.factor) + 1.0

    if rope.mscale and rope.mscale_all_dim:  # DeepSeek's form: a ratio of two such factors
        return mscale(rope.mscale) / mscale(rope.mscale_all_dim)
    return mscale()


def _yarn_scale(wavelength_steps: torch.Tensor, head_dim: int, rope: RopeConfig) -> torch.Tensor:
    # Pair i turns old_len · inv_freq[i] / 2π times over the pretraining length; the pair index
    # where that count equals r is d · ln(old_len / (2π r)) / (2 ln θ). Between the indices for
    # beta_fast (fast pairs, kept) and beta_slow (slow pairs, divided by factor) the weight of
    # the kept frequency falls linearly.
    def index_for(rotations: float) -> float:
        old_len = rope.original_max_position_embeddings
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = index_for(rope.beta_fast), index_for(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a one-point band: avoid dividing by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # 1 for the fast pairs, 0 for the slow ones
    # 1 / (factor · θ^(2i/d)) rounded as transformers rounds it (not inv_freq / factor).
    divided, inv_freq = 1.0 / (rope.factor * wavelength_steps), 1.0 / wavelength_steps
    return divided * (1 - kept) + inv_freq * kept


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than old_len / low_freq_factor were never seen whole in training:
    # stretch them by ``factor``. Shorter than old_len / high_freq_factor: keep them.
    long_limit = old_len / rope.low_freq_factor
    short_limit = old_len / rope.high_freq_factor
    scaled = torch.where(wavelen > long_limit, inv_freq / rope.factor, inv_freq)
    # In between, blend linearly in (old_len / wavelen) from "fully scaled" to "unscaled".
    blend = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * scaled / rope.factor + blend * scaled
    in_band = (wavelen >= short_limit) & (wavelen <= long_limit)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables for all positions up to ``max_positions`` and applies them.

    The tables are computed once in float32 exactly as pos · inv_freq, then cast to the model
    dtype, so a lookup by position is all a step costs.
    """

    def __init__(
        self, head_dim: int, rope: RopeConfig, max_positions: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, rope)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        scale = rope_attention_scale(rope)
        self.register_buffer("cos", (angles.cos() * scale).to(dtype), persistent=False)
        self.register_buffer("sin", (angles.sin() * scale).to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape [tokens, heads, head_dim] by each token's position."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
