"""Quantized linears: W8A8 int8 or fp8 (e4m3) — weights and activations, float accumulation of
scales — and int8 weight-only (``Int8WeightOnlyLinear``, activations left as they are).

Both schemes quantize symmetrically with

* per-output-channel weight scales, fixed at load: w_scale[o] = max_i |W[i, o]| / QMAX, and
* per-token activation scales, computed every call: x_scale[t] = max_i |x[t, i]| / QMAX,

so y[t, o] = (Σ_i q(x)[t, i] · q(W)[i, o]) · x_scale[t] · w_scale[o]. One large entry in a
token row (an outlier channel) sets that token's scale and flattens every other entry of the
row to a few quantization levels; that is the failure the ARM (layers/arm.py) removes.

int8: the integer product runs in ``torch._int_mm`` (int8 × int8 → int32, exact), on CPU
(oneDNN) and CUDA alike (the CUDA path is written to cuBLAS's constraints but has not run on
a GPU yet). CUDA needs more than 16 rows and inner/outer sizes divisible by 8:
decode batches are zero-padded to 17 rows, and other shapes fall back to the same product in
float32 (exact while in_features·127² < 2²⁴, i.e. up to 1040 inputs; rounding-level beyond),
logged once.

fp8: ``torch._scaled_mm`` on CUDA GPUs with compute capability ≥ 8.9 (Ada, Hopper), which
applies both scale vectors inside the kernel. Elsewhere (CPU) the fp8 values are upcast and
multiplied in float32: what the GPU computes up to its bf16 output rounding, but not
faster; logged once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from shardlm.distributed.parallel_state import TPContext

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "fp8", "int8_weight_only")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# CUDA's int8 GEMM (torch._int_mm) wants more rows than this.
CUDA_INT_MM_MIN_ROWS = 17

_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.info(message)


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along ``dim`` (the reduced dimension): (q int8, scale float32) with
    x ≈ q·scale, the scale keeping its dimension for broadcasting."""
    xf = x.float()
    scale = xf.abs().amax(dim=dim, keepdim=True).clamp_(min=1e-12) / INT8_MAX
    q = (xf / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric float8_e4m3fn along ``dim``: (q, scale float32), x ≈ q·scale."""
    xf = x.float()
    scale = xf.abs().amax(dim=dim, keepdim=True).clamp_(min=1e-12) / FP8_MAX
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_supported(device: torch.device) -> bool:
    """Whether this device has fp8 tensor cores for ``torch._scaled_mm``."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class QuantizedLinear(nn.Module):
    """The quantized counterpart of layers.linear.Linear (same forward contract, including
    row-parallel AllReduce before the bias), built from a loaded Linear; the float weight is
    not kept, so weight memory shrinks to a quarter of float32."""

    scheme: str

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.tp: TPContext | None = linear.tp
        self.bias = linear.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x).to(x.dtype)
        if self.tp is not None:
            self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """W8A8 int8: int8 weight stored [out, in] row-major, i.e. the column-major [in, out]
    operand of ``torch._int_mm`` (the "NT" layout cuBLAS supports; CPU takes it too), with
    per-output-channel float32 scales."""

    scheme = "int8"

    def __init__(self, linear: nn.Module) -> None:
        super().__init__(linear)
        q, scale = quantize_int8(linear.weight_t.detach().t(), dim=1)
        self.weight_q = nn.Parameter(q.contiguous(), requires_grad=False)  # [out, in] int8
        self.weight_scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, out]
        dev = q.device
        k, n = self.in_features, self.out_features
        self.int_mm = dev.type == "cpu" or (dev.type == "cuda" and k % 8 == 0 and n % 8 == 0)
        if not self.int_mm:
            _say_once(
                f"int8 linear {k}x{n} on {dev.type}: no int8 GEMM for this shape; "
                "the integer product runs in float32 (correct, not faster)"
            )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        q, x_scale = quantize_int8(x, dim=-1)
        rows = q.shape[0]
        if not self.int_mm:
            acc = q.float() @ self.weight_q.float().t()
        else:
            if q.device.type == "cuda" and rows < CUDA_INT_MM_MIN_ROWS:
                q = torch.nn.functional.pad(q, (0, 0, 0, CUDA_INT_MM_MIN_ROWS - rows))
            acc = torch._int_mm(q, self.weight_q.t())[:rows].float()
        return acc * x_scale * self.weight_scale


class Fp8Linear(QuantizedLinear):
    """W8A8 fp8 e4m3: weight stored [out, in] row-major, which is the column-major [in, out]
    operand ``torch._scaled_mm`` requires; per-output-channel float32 scales."""

    scheme = "fp8"

    def __init__(self, linear: nn.Module) -> None:
        super().__init__(linear)
        q, scale = quantize_fp8(linear.weight_t.detach().t(), dim=1)
        self.weight_q = nn.Parameter(q.contiguous(), requires_grad=False)  # [out, in] fp8
        self.weight_scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, out]
        dev = q.device
        k, n = self.in_features, self.out_features
        self.scaled_mm = fp8_supported(dev) and k % 16 == 0 and n % 16 == 0
        if not self.scaled_mm:
            _say_once(
                f"fp8 linear {k}x{n} on {dev.type}: no fp8 GEMM here; the fp8 values are "
                "multiplied in float32 (same numbers, not faster)"
            )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        q, x_scale = quantize_fp8(x, dim=-1)
        if self.scaled_mm:
            # Row-wise scaling (one scale per token and per output channel) wants a bf16 out.
            return torch._scaled_mm(
                q,
                self.weight_q.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                out_dtype=torch.bfloat16,
            )
        return (q.float() @ self.weight_q.float().t()) * x_scale * self.weight_scale


class Int8WeightOnlyLinear(QuantizedLinear):
    """int8 weights, activations as they are (W8A16): per-output-channel scales, the product
    in ``torch._weight_int8pack_mm`` with bfloat16 activations on CPU (oneDNN; float32
    activations are cast to bfloat16 for it). No activation is quantized, so no outlier
    channel can flatten a token (ARM is not needed for it). On CPU it streams the int8
    weight as fast as W8A8 at one row and ~1.8× faster at four (benchmarks/cpu_linear.py);
    elsewhere the weight is dequantized into the product (correct, not faster), logged once."""

    scheme = "int8_weight_only"

    def __init__(self, linear: nn.Module) -> None:
        super().__init__(linear)
        q, scale = quantize_int8(linear.weight_t.detach().t(), dim=1)
        self.weight_q = nn.Parameter(q.contiguous(), requires_grad=False)  # [out, in] int8
        dev = q.device
        # The CPU kernel is only right for inner sizes that are multiples of 16 (others crash
        # the process or return garbage in torch 2.13): those take the dequantized product.
        self.kernel = (
            dev.type == "cpu"
            and hasattr(torch, "_weight_int8pack_mm")
            and self.in_features % 16 == 0
        )
        # The kernel takes scales in the activations' dtype (bfloat16).
        scale_dtype = torch.bfloat16 if self.kernel else torch.float32
        self.weight_scale = nn.Parameter(scale.flatten().to(scale_dtype), requires_grad=False)
        if not self.kernel:
            _say_once(
                f"int8 weight-only linear {self.in_features}x{self.out_features} on {dev.type}: "
                "no int8 weight-only kernel for it; the weight is dequantized into the product "
                "(correct, not faster)"
            )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight_q, self.weight_scale)
        w = self.weight_q.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return x @ w.t()


def quantize_linear(linear: nn.Module, scheme: str) -> QuantizedLinear:
    """A quantized copy of a loaded ``Linear`` (its weight quantized, its bias and
    tensor-parallel role kept)."""
    if scheme == "int8":
        return Int8Linear(linear)
    if scheme == "fp8":
        return Fp8Linear(linear)
    if scheme == "int8_weight_only":
        return Int8WeightOnlyLinear(linear)
    raise ValueError(
        f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got {scheme!r}"
    )
