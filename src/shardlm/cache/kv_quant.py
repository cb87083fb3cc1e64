"""A quantized KV cache (``kv_cache_dtype``): K and V stored in 8 bits, read back in the
model's dtype.

* ``auto``: the model's dtype, no scales (K/V stored as computed).
* ``int8``: symmetric, one float32 scale per (token, KV head), computed when the row is
  written: s = max_d |x_d| / 127, q_d = round(x_d / s) ∈ [−127, 127], read as q_d · s. A
  row's error is at most s / 2 per channel, i.e. 1/254 of its own largest channel, whatever
  the other rows hold (an outlier token or head spoils only itself). The scales live in the
  pool beside the rows: [slots, Hkv] per layer, for K and for V.
* ``fp8``: float8_e4m3fn with one scale per layer for K and one for V (``Fp8Scales``):
  q = fp8(x / s), read as q · s. e4m3 keeps 3 mantissa bits, a relative error of at most
  2⁻⁴ per value whatever s is, and saturates at ±448 (values beyond are clamped); s only
  decides which magnitudes fit. Calibrated (``shardlm calibrate`` measured max |x| of the
  layer's K or V): s = margin · max |x| / 448, so the largest value seen lands at 448 / margin.
  Otherwise 1.0, vLLM's default without calibration: right while |x| stays below 448.

Quantizing computes in float32. ``fake_quant`` (quantize, then dequantize) gives exactly what
a reader of the pool gets for a row; paths that attend over K/V they never read back from the
pool (a prefill chunk with nothing cached, the scoring cache) use it, so every path sees the
same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_DEFAULT_SCALE = 1.0  # per layer, for K and V (vLLM's default without calibration)
# Headroom of calibrated fp8 scales: text the calibration never saw may exceed its max |x|,
# and is stored unclipped up to 2× that. The cost is only at the bottom of the range: e4m3's
# relative precision holds down to 2⁻⁶ (its smallest normal), i.e. to max |x| · 2⁻¹⁴ at
# this margin instead of · 2⁻¹⁵ — values that weigh nothing in q·k or in a weighted sum of v.
FP8_SCALE_MARGIN = 2.0
# A row of zeros gets this scale, so x / s stays 0 rather than 0 / 0.
_TINY = torch.finfo(torch.float32).tiny


def storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the pool's K/V rows are stored in (``dtype``: the model's)."""
    return {"auto": dtype, "int8": torch.int8, "fp8": FP8_DTYPE}[kv_cache_dtype]


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str
) -> int:
    """Bytes one token takes in a pool: K and V of every layer, with int8's float32 scale
    per KV head (fp8's per-layer scales are per pool, not per token)."""
    per_head = head_dim * storage_dtype(kv_cache_dtype, dtype).itemsize
    if kv_cache_dtype == "int8":
        per_head += 4
    return 2 * num_layers * num_kv_heads * per_head


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → (q int8 [..., D], scale float32 [...]), one scale per row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / INT8_MAX).clamp_min_(_TINY)
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x → float8_e4m3fn of x / scale (``scale`` a float32 scalar tensor), saturated."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows back in ``dtype``: int8 rows times their scales [...] (q [..., D]), fp8
    times the layer's scalar scale; unquantized rows as they are."""
    if q.dtype == torch.int8:
        return (q.float() * scale.unsqueeze(-1)).to(dtype)
    if q.dtype == FP8_DTYPE:
        return (q.float() * scale).to(dtype)
    return q


@dataclass(frozen=True)
class Fp8Scales:
    """An fp8 pool's scales: one per layer for K, one for V, and where they came from."""

    k: tuple[float, ...]
    v: tuple[float, ...]
    source: str = "unit"  # "unit", or the calibration file they were computed from

    @classmethod
    def unit(cls, num_layers: int) -> Fp8Scales:
        return cls((FP8_DEFAULT_SCALE,) * num_layers, (FP8_DEFAULT_SCALE,) * num_layers)

    @classmethod
    def calibrated(
        cls, k_absmax: Sequence[float], v_absmax: Sequence[float], source: str
    ) -> Fp8Scales:
        """s = FP8_SCALE_MARGIN · max |x| / 448 per layer (a layer measured all zero keeps 1.0:
        there is nothing to size the range on)."""

        def scale(absmax: float) -> float:
            return FP8_SCALE_MARGIN * absmax / FP8_MAX if absmax > 0 else FP8_DEFAULT_SCALE

        return cls(tuple(map(scale, k_absmax)), tuple(map(scale, v_absmax)), source)

    @property
    def is_unit(self) -> bool:
        return self.source == "unit"


@dataclass(frozen=True)
class KVPool:
    """One layer's keys (or values) as the pool stores them, and how to read them back."""

    data: torch.Tensor  # [slots, Hkv, D] in the storage dtype
    scale: torch.Tensor | None  # int8: [slots, Hkv] float32; fp8: [] float32; auto: None
    dtype: torch.dtype  # what readers get: the model's dtype

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store rows x [T, Hkv, D] at ``slots`` [T], quantized as the pool is."""
        if self.data.dtype == torch.int8:
            q, s = quantize_int8(x)
            self.data.index_copy_(0, slots, q)
            self.scale.index_copy_(0, slots, s)
        elif self.data.dtype == FP8_DTYPE:
            # index_copy_ has no float8 kernel on CPU: copy the bytes.
            q = quantize_fp8(x, self.scale).view(torch.uint8)
            self.data.view(torch.uint8).index_copy_(0, slots, q)
        else:
            self.data.index_copy_(0, slots, x)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at slot ``index`` (any shape of slot ids) → [*index.shape, Hkv, D] in dtype."""
        if self.data.dtype == torch.int8:
            return dequantize(self.data[index], self.scale[index], self.dtype)
        return dequantize(self.data[index], self.scale, self.dtype)

    def read_blocks(self, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
        """Whole blocks ``blocks`` [N] (one contiguous copy each, not an index per slot) →
        [N · block_size, Hkv, D] in dtype."""
        n = blocks.numel()
        row = self.data.shape[1:]
        data = self.data[: self.data.shape[0] - 1]  # the blocks, without the padding slot
        out = data.view(-1, block_size, *row).index_select(0, blocks).view(n * block_size, *row)
        scale = self.scale
        if self.data.dtype == torch.int8:
            scale = self.scale[: data.shape[0]].view(-1, block_size, row[0])
            scale = scale.index_select(0, blocks).view(n * block_size, row[0])
        return dequantize(out, scale, self.dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """x as a reader would get it back after ``write``: bit for bit the same values."""
        if self.data.dtype == torch.int8:
            return dequantize(*quantize_int8(x), self.dtype)
        if self.data.dtype == FP8_DTYPE:
            return dequantize(quantize_fp8(x, self.scale), self.scale, self.dtype)
        return x


def fake_quant(
    x: torch.Tensor, kv_cache_dtype: str, fp8_scale: float = FP8_DEFAULT_SCALE
) -> torch.Tensor:
    """``KVPool.fake_quant`` without a pool (the scoring cache; fp8 at the layer's scale)."""
    if kv_cache_dtype == "int8":
        return dequantize(*quantize_int8(x), x.dtype)
    if kv_cache_dtype == "fp8":
        scale = torch.tensor(fp8_scale, dtype=torch.float32, device=x.device)
        return dequantize(quantize_fp8(x, scale), scale, x.dtype)
    return x
