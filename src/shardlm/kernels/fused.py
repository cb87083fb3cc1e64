"""Fused elementwise kernels of the decoder layer, in Triton (one row per program):

* ``add_rms_norm``: residual ← x + residual, then y = w · residual / √(mean(residual²) + ε),
  one read of each input and one write of each output instead of the three passes of
  ``x + r`` then ``rms_norm``. Statistics in float32, as layers/norm.py computes them.
* ``silu_and_mul``: SiLU(gate) ⊙ up of the fused [gate | up] projection output, in one pass
  (layers/activation.py is the reference).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, n_cols, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
        r = tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0)
        total = x + r  # in the activation dtype, as `x + residual` is
        tl.store(new_res_ptr + row * n_cols + cols, total, mask=ok)
        t32 = total.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(t32 * t32, axis=0) / n_cols + eps)
        normed = (t32 * inv).to(total.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, w * normed, mask=ok)

    @triton.jit
    def silu_and_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(out_ptr + row * n_cols + cols, silu * up, mask=ok)

    return add_rms_norm_kernel, silu_and_mul_kernel


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, H]."""
    t, h = x.shape
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x)
    kernel, _ = _kernels()
    block = 1 << (h - 1).bit_length()
    kernel[(t,)](
        x.contiguous(), residual.contiguous(), weight, out, new_residual, h, eps, BLOCK=block
    )
    return out, new_residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) ⊙ up for gate_up [T, 2I] = [gate | up]."""
    t, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    _, kernel = _kernels()
    block = 1024
    kernel[(t, -(-i // block))](gate_up.contiguous(), out, i, BLOCK=block)
    return out
