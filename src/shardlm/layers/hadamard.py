"""The normalized Walsh–Hadamard transform, block-diagonal, in O(n log n).

H_1 = [1] and H_2m = [[H_m, H_m], [H_m, -H_m]] / √2 (Sylvester), so H_b for b = 2^k is
orthonormal and symmetric: H_b⁻¹ = H_bᵀ = H_b. A vector x of length b is transformed by k
butterfly stages; stage i pairs entries whose indices differ in bit i and replaces (a, c) by
(a + c, a − c). Each stage costs b additions, so the whole transform costs b·log₂(b) instead
of the b² of a matrix product.

Sizes that are not a power of two use a block-diagonal H: the largest power of two that
divides n sets the block size, and each block of the vector is transformed on its own. A
block-diagonal H is still orthonormal and symmetric, so the transform is its own inverse.
"""

from __future__ import annotations

import math

import torch


def hadamard_block_size(n: int) -> int:
    """The block of the block-diagonal transform of a length-``n`` vector: the largest power
    of two dividing ``n`` (n itself when it is a power of two; 1, the identity, when odd)."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    return n & -n


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x·H along the last dimension, H block-diagonal with normalized Hadamard blocks of
    ``block`` (a power of two dividing the last dimension). Returns a new tensor."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing {n}")
    if block == 1:
        return x.clone()
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        # Entries at distance h form pairs (a, c): view the block as [block/2h, 2, h].
        pairs = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, c = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2).view(y.shape)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).view(*lead, n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense normalized H_n (n a power of two), by Sylvester's construction; for tests
    and for folding into small weights, never on the decode path."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)
