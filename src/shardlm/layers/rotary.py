"""Rotary position embeddings (RoPE) with the ``linear`` and ``llama3`` frequency scalings.

Each pair of channels (i, i + d/2) of a head is rotated by the angle pos · inv_freq[i]. The
scalings only change inv_freq:
  linear: every frequency divided by ``factor`` (positions stretched uniformly);
  llama3: long wavelengths (low frequencies) divided by ``factor``, short ones kept, and the band
          in between interpolated smoothly between the two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardlm.config import RopeConfig


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies (float32, length head_dim/2) for the given scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


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
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape [tokens, heads, head_dim] by each token's position."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
