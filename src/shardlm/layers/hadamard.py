"""The normalized Hadamard transform of ARM, over the full width where one can be built.

Sylvester: H_1 = [1] and H_2m = [[H_m, H_m], [H_m, -H_m]] / √2, so H_b for b = 2^k is
orthonormal and symmetric. Sylvester matrices are Kronecker powers, H_b = H_r1 ⊗ H_r2 ⊗ …
for any r1·r2·… = b, which is what makes the transform fast: view the length-b vector as a
tensor [r1, r2, …] and multiply each axis by its small H_ri in turn (``fwht``). The classic
butterfly is r = 2 throughout (log₂ b stages of b additions). Here each stage takes a radix of
up to 64 (a small dense matmul), so b = 1024 is two stages of 32: more arithmetic per stage,
but 5× fewer stages, which is what decides the run time on a CPU or for a PyTorch-level loop
on a GPU (each stage is a kernel). With the radix bounded, the cost is still O(b log b).

Other widths: n = K·2^m with K an order a dense construction reaches gets the full-width
H_n = H_K ⊗ H_(2^m), both factors normalized, so H_n is orthonormal: the vector viewed as
[K, 2^m] goes through ``fwht`` on the 2^m axis and one dense K×K product on the K axis
(``hadamard_transform``). The dense H_K (``dense_matrix``) comes from

* Paley's constructions (layers/paley.py: 12, 20, 28, 44, 52, 76, 108, 140, 148, 344, …),
* else the Goethals–Seidel array of four stored circulants (layers/goethals_seidel.py: 92,
  116, 156, 172 and the other orders 4n ≤ 1024 Paley misses that its search reached).

The smallest K that works is chosen (the dense part costs K multiply-adds per entry, the
Sylvester part a few): 11008 = 43·256 takes 172 × 64, not 344 × 32. H_K is *not* symmetric
in general (Paley I is I + a skew matrix, Goethals–Seidel has no symmetry), so H⁻¹ = Hᵀ,
not H: the transform computes x·H, and the weight fold (layers/arm.py) uses Hᵀ·W = H⁻¹·W.

Widths no construction covers within ``MAX_DENSE_ORDER`` (odd widths; 4n·2^j with n among
the odd parts layers/goethals_seidel.py lists as missing, such as 188 = 4·47 and 236 = 4·59;
1036 = 4·259, whose only candidate is beyond the bound) fall back to a block-diagonal H whose
blocks are the largest such orders dividing n (188 → blocks of 4, 940 = 20·47 → 20, 1036 →
148), with a warning once per width. A block-diagonal H of orthonormal blocks is still
orthonormal.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from shardlm.layers.goethals_seidel import goethals_seidel_matrix, has_goethals_seidel
from shardlm.layers.paley import paley_construction, paley_matrix

logger = logging.getLogger(__name__)

# Largest stage of the Sylvester transform: H_64 is a 16 KiB matrix in float32.
MAX_RADIX = 64
# Largest dense factor: K multiply-adds per entry, against the down projection's hidden-size
# ones (≥ 2048 in the models this engine serves, so at most about half of it and usually a
# few percent: 11008 = 172·64 against hidden 2048–4096). Covers every width listed in
# docs/arm.md, and Qwen2.5-72B's 29568 = 924·32.
MAX_DENSE_ORDER = 1024


@dataclass(frozen=True)
class HadamardPlan:
    """H = I ⊗ (H_k ⊗ H_pow2): blocks of ``k·pow2`` consecutive entries, each the Kronecker
    product of a dense normalized order-``k`` factor (1: none) and a Sylvester ``pow2``.
    One block of the whole width is the full-width transform."""

    k: int
    pow2: int

    @property
    def block(self) -> int:
        return self.k * self.pow2

    def __str__(self) -> str:
        return str(self.pow2) if self.k == 1 else f"{self.k}×{self.pow2}"


def dense_construction(k: int) -> str | None:
    """Which construction builds the dense ±1 H_k: "Paley I", "Paley II",
    "Goethals–Seidel", or None (also for k = 1, which needs none)."""
    kind = paley_construction(k)
    if kind is not None:
        return f"Paley {kind}"
    return "Goethals–Seidel" if has_goethals_seidel(k) else None


def _constructible(k: int) -> bool:
    """An order the dense factor can take (1 is the trivial one)."""
    return k == 1 or (k <= MAX_DENSE_ORDER and dense_construction(k) is not None)


def _smallest_factor(odd: int, twos: int) -> int | None:
    """The smallest constructible K = odd·2^j, j ≤ twos."""
    return next(
        (odd << j for j in range(twos + 1) if _constructible(odd << j)),
        None,
    )


@functools.cache  # a few widths per model, each asked once per layer and rank
def hadamard_plan(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with K·2^m = n and a full-width H_K ⊗ H_(2^m), K the smallest that works;
    None when no construction covers n."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    pow2 = n & -n
    odd, twos = n // pow2, pow2.bit_length() - 1
    k = _smallest_factor(odd, twos)
    return None if k is None else (k, n // k)


@functools.cache
def hadamard_layout(n: int) -> HadamardPlan:
    """The transform a length-``n`` vector gets: the full-width plan when there is one, else
    the block-diagonal fallback with the largest constructible block dividing n (logged
    once per width; block 1, the identity, for odd widths)."""
    full = hadamard_plan(n)
    if full is not None:
        return HadamardPlan(*full)
    pow2 = n & -n
    odd, twos = n // pow2, pow2.bit_length() - 1
    best = HadamardPlan(1, pow2)
    for d in range(3, odd, 2):  # the odd part of a block must divide n's
        k = _smallest_factor(d, twos) if odd % d == 0 else None
        if k is not None and d * pow2 > best.block:
            best = HadamardPlan(k, d * pow2 // k)
    if best.block > 1:
        logger.warning(
            "Hadamard width %d: no construction over the full width, so ARM uses a "
            "block-diagonal Hadamard with blocks of %d (%s)",
            n,
            best.block,
            best,
        )
    return best


@functools.cache  # on the decode path: once per block size
def stage_radices(block: int, max_radix: int = MAX_RADIX) -> tuple[int, ...]:
    """Split log₂(block) into as few stages as ``max_radix`` allows, as evenly as possible
    (1024 → [32, 32], 8192 → [32, 16, 16])."""
    bits, max_bits = block.bit_length() - 1, max_radix.bit_length() - 1
    stages = -(-bits // max_bits)
    return tuple(1 << (bits // stages + (i < bits % stages)) for i in range(stages))


def fwht(x: torch.Tensor, block: int, max_radix: int = MAX_RADIX) -> torch.Tensor:
    """x·H along the last dimension, H block-diagonal with normalized Sylvester blocks of
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
        h = _cached_factor("sylvester", r, y.dtype, y.device)
        y = y.reshape(-1, r) @ h if stride == 1 else torch.matmul(h, y.reshape(-1, r, stride))
        stride *= r
    return y.reshape(*lead, n)


def hadamard_transform(
    x: torch.Tensor, plan: HadamardPlan, max_radix: int = MAX_RADIX, inverse: bool = False
) -> torch.Tensor:
    """x·H along the last dimension for H = I ⊗ (H_k ⊗ H_pow2) (``plan``); a new tensor.
    ``inverse``: x·H⁻¹ = x·Hᵀ instead.

    Within a block the index is a·pow2 + b, a in [0, k), b in [0, pow2), and
    (H_k ⊗ H_pow2)[a·pow2 + b, a'·pow2 + b'] = H_k[a, a']·H_pow2[b, b'], so
    y[a', b'] = Σ_a H_k[a, a'] · (Σ_b x[a, b]·H_pow2[b, b']): fwht on the pow2 axis, then
    H_kᵀ applied to the k axis (transposed: H_k is not symmetric). Hᵀ = H_kᵀ ⊗ H_pow2 swaps
    H_k for H_kᵀ only."""
    n, k, pow2 = x.shape[-1], plan.k, plan.pow2
    if n % plan.block:
        raise ValueError(f"Hadamard plan {plan} (block {plan.block}) does not divide {n}")
    y = fwht(x, pow2, max_radix) if pow2 > 1 else x
    if k == 1:
        return y if pow2 > 1 else x.clone()
    h = _cached_factor("dense", k, y.dtype, y.device)
    h = h.t() if inverse else h
    rows = x.numel() // (k * pow2)
    if pow2 == 1:  # the k axis is the innermost: a plain GEMM by H_k
        return (y.reshape(rows, k) @ h).reshape(x.shape)
    return torch.matmul(h.t(), y.reshape(rows, k, pow2)).reshape(x.shape)


_CACHE: dict[tuple[str, int, torch.dtype, torch.device], torch.Tensor] = {}


def _cached_factor(kind: str, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A normalized factor on the transform's device, made once: Sylvester H_r or the dense
    H_r of a plan."""
    key = (kind, r, dtype, device)
    if key not in _CACHE:
        dense = sylvester_matrix(r) if kind == "sylvester" else dense_factor(r)
        _CACHE[key] = dense.to(dtype=dtype, device=device)
    return _CACHE[key]


def sylvester_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense normalized Sylvester H_n (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def dense_matrix(k: int) -> torch.Tensor:
    """The ±1 H_k (float64, H·Hᵀ = k·I) of ``dense_construction``; raises when there is none.
    Cached by the constructions: treat it as read-only."""
    kind = dense_construction(k)
    if kind is None:
        raise ValueError(f"no dense Hadamard construction of order {k}")
    return goethals_seidel_matrix(k) if has_goethals_seidel(k) else paley_matrix(k)


def dense_factor(k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense factor H_k of a plan, normalized (orthonormal, not symmetric in general)."""
    if k == 1:
        return torch.ones(1, 1, dtype=dtype)
    return (dense_matrix(k) / math.sqrt(k)).to(dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense normalized full-width H_n = H_K ⊗ H_(2^m) the transform of width ``n``
    applies (Sylvester's H_n for a power of two); for tests and small folds, never on the
    decode path. Raises when no construction covers n (see ``hadamard_layout``)."""
    plan = hadamard_plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard construction covers width {n}")
    k, pow2 = plan
    return torch.kron(dense_factor(k, dtype), sylvester_matrix(pow2, dtype))
