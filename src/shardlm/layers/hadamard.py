"""The normalized Walsh–Hadamard transform, block-diagonal, in O(n log n).

H_1 = [1] and H_2m = [[H_m, H_m], [H_m, -H_m]] / √2 (Sylvester), so H_b for b = 2^k is
orthonormal and symmetric: H_b⁻¹ = H_bᵀ = H_b. Sylvester matrices are Kronecker powers,
H_b = H_r1 ⊗ H_r2 ⊗ … for any r1·r2·… = b, which is what makes the transform fast: view the
length-b vector as a tensor [r1, r2, …] and multiply each axis by its small H_ri in turn. The
classic butterfly is r = 2 throughout (log₂ b stages of b additions). Here each stage takes a
radix of up to 64 (a small dense matmul), so b = 1024 is two stages of 32: more arithmetic
per stage, but 5× fewer stages, which is what decides the run time on a CPU or for a
PyTorch-level loop on a GPU (each stage is a kernel). With the radix bounded, the cost is
still O(b log b).

Sizes that are not a power of two use a block-diagonal H: the largest power of two that
divides n sets the block size, and each block of the vector is transformed on its own. A
block-diagonal H is still orthonormal and symmetric, so the transform is its own inverse.
"""

from __future__ import annotations

import functools
import math

import torch

# Largest stage of the transform: H_64 is a 16 KiB matrix in float32.
MAX_RADIX = 64


def hadamard_block_size(n: int) -> int:
    """The block of the block-diagonal transform of a length-``n`` vector: the largest power
    of two dividing ``n`` (n itself when it is a power of two; 1, the identity, when odd)."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    return n & -n


@functools.cache  # on the decode path: once per block size
def stage_radices(block: int, max_radix: int = MAX_RADIX) -> tuple[int, ...]:
    """Split log₂(block) into as few stages as ``max_radix`` allows, as evenly as possible
    (1024 → [32, 32], 8192 → [32, 16, 16])."""
    bits, max_bits = block.bit_length() - 1, max_radix.bit_length() - 1
    stages = -(-bits // max_bits)
    return tuple(1 << (bits // stages + (i < bits % stages)) for i in range(stages))


def fwht(x: torch.Tensor, block: int, max_radix: int = MAX_RADIX) -> torch.Tensor:
    """x·H along the last dimension, H block-diagonal with normalized Hadamard blocks of
    ``block`` (a power of two dividing the last dimension). Returns a new tensor.
    ``max_radix`` = 2 gives the textbook butterfly (the reference the tests compare with)."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing {n}")
    if block == 1:
        return x.clone()
    lead = x.shape[:-1]
    y = x.reshape(-1, block)
    stride = 1  # the axes already transformed are the innermost `stride` entries
    for r in stage_radices(block, max_radix):
        # Index within the block = (outer, j, inner) with j in [0, r): multiply axis j by H_r
        # (a plain GEMM when j is the innermost axis, as H_r is symmetric).
        h = _cached_hadamard(r, y.dtype, y.device)
        y = y.reshape(-1, r) @ h if stride == 1 else torch.matmul(h, y.reshape(-1, r, stride))
        stride *= r
    return y.reshape(*lead, n)


_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _cached_hadamard(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (r, dtype, device)
    if key not in _CACHE:
        _CACHE[key] = hadamard_matrix(r).to(dtype=dtype, device=device)
    return _CACHE[key]


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense normalized H_n (n a power of two), by Sylvester's construction; for tests
    and for folding into small weights, never on the decode path."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)
