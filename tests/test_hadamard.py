"""The full-width Hadamard of ARM: Paley and Goethals–Seidel factors, their Kronecker
product with Sylvester's, the plan each width gets and the block-diagonal fallback.

The oracles are the defining identities (H·Hᵀ = n·I with ±1 entries; the Jacobsthal
identities Q·Qᵀ = q·I − J, Q·1 = 0; periodic autocorrelations of the stored sequences
summing to 0) and dense matrices the tests assemble themselves with torch.kron; the widths'
factorizations are arithmetic, written out below.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from shardlm.layers.arm import ArmTransform
from shardlm.layers.goethals_seidel import (
    SEQUENCES,
    goethals_seidel_array,
    goethals_seidel_matrix,
    goethals_seidel_orders,
    sequences,
)
from shardlm.layers.hadamard import (
    MAX_DENSE_ORDER,
    HadamardPlan,
    dense_construction,
    hadamard_layout,
    hadamard_matrix,
    hadamard_plan,
    hadamard_transform,
)
from shardlm.layers.paley import jacobsthal, paley_construction, paley_matrix, prime_power


def sylvester(n: int) -> torch.Tensor:
    """Normalized Sylvester H_n as the Kronecker power of H_2 (not the module's recursion)."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(n.bit_length() - 1):
        h = torch.kron(h, h2)
    return h


def factor(k: int) -> torch.Tensor:
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    dense = paley_matrix(k) if paley_construction(k) else goethals_seidel_matrix(k)
    return dense / math.sqrt(k)


# Real MLP widths (per model, or per rank under TP) and the smallest K with K·2^m = n.
REAL_WIDTHS = {
    # Llama-2-7B, Qwen2.5-3B: 11008 = 43·256; 172 = 4·43 (Goethals–Seidel) beats 344 = 7³ + 1
    11008: (172, 64),
    14336: (28, 512),  # Llama-3-8B, Mistral-7B: 28 = 3³ + 1, Paley I over GF(27)
    4864: (76, 64),  # Qwen2.5-0.5B: 76 = 2(37 + 1), Paley II
    18944: (148, 128),  # Qwen2.5-7B: 148 = 2(73 + 1), Paley II
    2816: (44, 64),  # 44 = 43 + 1
    1536: (12, 128),  # 12 = 11 + 1
    5632: (44, 128),
    8960: (140, 64),  # Qwen2.5-1.5B: 140 = 139 + 1
    13824: (108, 128),  # Llama-2-13B, Qwen2.5-14B: 108 = 107 + 1
    5504: (172, 32),  # 11008 at TP=2
    1792: (28, 64),  # 14336 at TP=8
    8192: (1, 8192),  # a power of two: Sylvester alone
}


# -- the finite fields and Paley's matrices --
def test_prime_powers():
    assert [prime_power(q) for q in (2, 13, 27, 25, 343, 49, 1024)] == [
        (2, 1),
        (13, 1),
        (3, 3),
        (5, 2),
        (7, 3),
        (7, 2),
        (2, 10),
    ]
    assert [prime_power(q) for q in (1, 12, 75, 85, 171, 0)] == [None] * 6


@pytest.mark.parametrize("q", [3, 7, 9, 11, 13, 25, 27, 49, 81, 125, 343])
def test_jacobsthal_identities(q):
    """Q·Qᵀ = q·I − J and Q·1 = 0 hold only if χ is the quadratic character of a field,
    so they check the GF(p^k) arithmetic too (the integers mod 27 would fail)."""
    s = jacobsthal(q).double()
    eye, ones = torch.eye(q, dtype=torch.float64), torch.ones(q, q, dtype=torch.float64)
    torch.testing.assert_close(s @ s.T, q * eye - ones, rtol=0, atol=0)
    assert not s.sum(1).any()
    sign = 1 if q % 4 == 1 else -1  # χ(−1): symmetric or skew
    torch.testing.assert_close(s.T, sign * s, rtol=0, atol=0)


PALEY_I = [4, 8, 12, 20, 24, 28, 32, 44, 48, 60, 68, 72, 84, 108, 140, 344]
PALEY_II = [36, 52, 76, 100, 148]


@pytest.mark.parametrize("order", PALEY_I + PALEY_II)
def test_paley_matrices_are_hadamard(order):
    h = paley_matrix(order)
    assert paley_construction(order) == ("I" if order in PALEY_I else "II")
    assert h.shape == (order, order) and bool((h.abs() == 1).all())
    torch.testing.assert_close(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_paley_i_is_not_symmetric_so_the_inverse_is_the_transpose():
    h = factor(12)
    assert not torch.equal(h, h.T)
    torch.testing.assert_close(h @ h.T, torch.eye(12, dtype=torch.float64))
    assert (h @ h - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # H⁻¹ ≠ H


@pytest.mark.parametrize("order", [16, 40, 156, 172, 92, 116])
def test_orders_paley_does_not_reach(order):
    """Powers of two and products such as 40 = 2·20 come from Kronecker products; 92 and
    116, 156 and 172 (Williamson type) have no Paley construction."""
    assert paley_construction(order) is None
    with pytest.raises(ValueError, match=f"no Paley construction .* order {order}"):
        paley_matrix(order)


# -- Goethals–Seidel matrices from the stored sequences --
GS_ORDERS = goethals_seidel_orders()


def test_the_four_requested_orders_are_stored():
    """92, 116, 156 and 172, which neither Paley construction reaches."""
    assert {92, 116, 156, 172} <= set(GS_ORDERS)
    assert all(o <= MAX_DENSE_ORDER and paley_construction(o) is None for o in GS_ORDERS)


@pytest.mark.parametrize("n", sorted(SEQUENCES))
def test_stored_sequences_have_complementary_periodic_autocorrelations(n):
    """Σ_i Σ_t x_i[t]·x_i[t + s] = 0 for every s ≠ 0 (and 4n at s = 0), in integers."""
    x = sequences(n)
    assert x.shape == (4, n) and bool((x.abs() == 1).all())
    assert all(int(h, 16) >> n == 0 for h in SEQUENCES[n]), "a set bit past the length"
    t = torch.arange(n)
    shifted = x[:, (t[None, :] + t[:, None]) % n]  # [4, s, t] = x_i[t + s]
    total = (x[:, None, :] * shifted).sum((0, 2))
    assert total.tolist() == [4 * n] + [0] * (n - 1)


@pytest.mark.parametrize("order", GS_ORDERS)
def test_goethals_seidel_matrices_are_hadamard(order):
    """±1 entries and H·Hᵀ = order·I exactly: the products are integers below 2^53, so
    float64 (a BLAS matmul, fast at order 1000) computes them without rounding."""
    h = goethals_seidel_matrix(order)
    assert dense_construction(order) == "Goethals–Seidel"
    assert h.shape == (order, order) and bool((h.abs() == 1).all())
    torch.testing.assert_close(
        h @ h.T, order * torch.eye(order, dtype=torch.float64), rtol=0, atol=0
    )
    assert not torch.equal(h, h.T)  # so the inverse is the transpose, not H


def test_the_array_signs_and_the_sequences_matter():
    """One block sign flipped in the array, or one sequence entry flipped, and H·Hᵀ is no
    longer 92·I: the identity checked above is not one any ±1 array of circulants has."""
    a, b, c, d = sequences(23)
    eye = 92 * torch.eye(92, dtype=torch.int64)
    h = goethals_seidel_array(a, b, c, d)
    assert torch.equal(h @ h.T, eye)
    flipped = h.clone()
    flipped[23:46, 69:92] *= -1  # −Cᵀ·R → +Cᵀ·R
    assert not torch.equal(flipped @ flipped.T, eye)
    b = b.clone()
    b[5] *= -1
    h = goethals_seidel_array(a, b, c, d)
    assert not torch.equal(h @ h.T, eye)


# -- plans --
@pytest.mark.parametrize("n", sorted(REAL_WIDTHS))
def test_real_widths_get_the_full_width_transform(n):
    assert hadamard_plan(n) == REAL_WIDTHS[n]
    assert hadamard_layout(n) == HadamardPlan(*REAL_WIDTHS[n])


# Widths whose smallest dense factor is a Goethals–Seidel matrix.
GS_WIDTHS = {
    92: (92, 1),  # 4·23
    116: (116, 1),  # 4·29
    156: (156, 1),  # 4·39
    172: (172, 1),  # 4·43
    184: (92, 2),
    232: (116, 2),
    624: (156, 4),  # smaller than 312 = 311 + 1 (Paley I) × 2
    1376: (172, 8),  # 11008 / 8
}


@pytest.mark.parametrize("n", sorted(GS_WIDTHS))
def test_goethals_seidel_widths_get_the_full_width_transform_without_a_warning(n, caplog):
    hadamard_layout.cache_clear()
    with caplog.at_level(logging.WARNING, logger="shardlm.layers.hadamard"):
        assert hadamard_plan(n) == GS_WIDTHS[n]
        assert hadamard_layout(n) == HadamardPlan(*GS_WIDTHS[n])
    assert not caplog.records
    k, pow2 = GS_WIDTHS[n]
    torch.testing.assert_close(
        hadamard_matrix(n), torch.kron(factor(k), sylvester(pow2)), rtol=0, atol=1e-15
    )


def test_arm_fold_is_exact_at_a_goethals_seidel_width():
    """156 = 4·39, one Goethals–Seidel block over the whole width (it used to be three
    Paley blocks of 52), with smoothing: (h·T)·(T⁻¹·W) = h·W, and the fold is Hᵀ·diag(1/s)·W
    (not H·…: H is not symmetric)."""
    torch.manual_seed(156)
    scale = torch.rand(156, dtype=torch.float64) * 10 + 0.1
    t = ArmTransform(scale, hadamard_layout(156))
    assert t.block == 156
    w = torch.randn(156, 24, dtype=torch.float64) / 156**0.5
    h = torch.randn(5, 156, dtype=torch.float64)
    want = h @ w
    assert (t.apply(h) @ t.fold_into_down(w) - want).norm() / want.norm() < 1e-12
    dense = factor(156)
    torch.testing.assert_close(t.fold_into_down(w), dense.T @ (w / scale[:, None]))
    assert (t.apply(h) @ (dense @ (w / scale[:, None])) - want).norm() > 0.1 * want.norm()


def test_every_small_width_with_a_plan_is_orthonormal():
    """H materialized as the transform of the identity, for every multiple of 4 up to 320."""
    for n in range(4, 321, 4):
        plan = hadamard_plan(n)
        if plan is None:
            # 4·47, 4·59: no Paley construction, and no Goethals–Seidel sequences stored.
            assert n in (188, 236), n
            continue
        k, pow2 = plan
        assert k * pow2 == n
        h = hadamard_transform(torch.eye(n, dtype=torch.float64), HadamardPlan(k, pow2))
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(h, torch.kron(factor(k), sylvester(pow2)))
        torch.testing.assert_close(hadamard_matrix(n), h)


@pytest.mark.parametrize("n", sorted(REAL_WIDTHS))
def test_fast_transform_on_real_widths(n):
    """Norm kept, the inverse recovers x, and a few columns equal the dense H_K ⊗ H_2^m."""
    k, pow2 = REAL_WIDTHS[n]
    plan = HadamardPlan(k, pow2)
    torch.manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64)
    y = hadamard_transform(x, plan)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(hadamard_transform(y, plan, inverse=True), x)
    hk, hs = factor(k), sylvester(pow2)
    for col in (0, 1, n // 2 + 3, n - 1):  # column a'·2^m + b' of H is H_K[:, a'] ⊗ H_S[:, b']
        column = torch.kron(hk[:, col // pow2], hs[:, col % pow2])
        torch.testing.assert_close(y[:, col], x @ column)
    if k > 1 and dense_construction(k) != "Paley II":  # applying H twice is not the inverse
        # (Paley I is I + skew, Goethals–Seidel has no symmetry; Paley II's C ⊗ A + I ⊗ D is
        # symmetric, as C, A and D are.)
        assert (hadamard_transform(y, plan) - x).norm() > 0.1 * x.norm()


def test_a_plan_transforms_as_its_dense_kronecker_product_at_any_radix():
    x = torch.randn(5, 2, 192, dtype=torch.float64)
    plan = HadamardPlan(12, 16)
    torch.testing.assert_close(
        hadamard_transform(x, plan), x @ torch.kron(factor(12), sylvester(16))
    )
    for radix in (2, 8):
        torch.testing.assert_close(hadamard_transform(x, plan, radix), hadamard_transform(x, plan))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_in_low_precision(dtype):
    x = torch.randn(4, 1536)
    plan = hadamard_layout(1536)
    y = hadamard_transform(x.to(dtype), plan)
    assert y.dtype == dtype and y.shape == x.shape
    ref = hadamard_transform(x.double(), plan)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (y.double() - ref).norm() / ref.norm() < tol


# -- the block-diagonal fallback --
@pytest.mark.parametrize(
    "n,plan",
    [
        (188, HadamardPlan(1, 4)),  # 4·47: only Sylvester's H_4 divides it
        (940, HadamardPlan(20, 1)),  # 4·5·47: blocks of 20 = 19 + 1
        # 4·7·37: 1036 is beyond MAX_DENSE_ORDER; blocks of 148 = 2(73 + 1) beat 28 = 3³ + 1.
        (1036, HadamardPlan(148, 1)),
    ],
)
def test_no_construction_falls_back_to_blocks_with_one_warning(n, plan, caplog):
    hadamard_layout.cache_clear()
    with caplog.at_level(logging.WARNING, logger="shardlm.layers.hadamard"):
        assert hadamard_plan(n) is None
        assert hadamard_layout(n) == plan
        assert hadamard_layout(n) == plan
    warnings = [r for r in caplog.records if r.name == "shardlm.layers.hadamard"]
    assert len(warnings) == 1
    assert f"width {n}" in warnings[0].getMessage()
    assert f"blocks of {plan.block}" in warnings[0].getMessage()
    x = torch.randn(3, n, dtype=torch.float64)
    blocks = torch.block_diag(
        *[torch.kron(factor(plan.k), sylvester(plan.pow2))] * (n // plan.block)
    )
    torch.testing.assert_close(hadamard_transform(x, plan), x @ blocks)
    torch.testing.assert_close(hadamard_transform(x @ blocks, plan, inverse=True), x)


def test_odd_width_is_the_identity_without_this_warning(caplog):
    hadamard_layout.cache_clear()
    with caplog.at_level(logging.WARNING, logger="shardlm.layers.hadamard"):
        assert hadamard_layout(75) == HadamardPlan(1, 1)
    assert not caplog.records  # the ARM fold says it (models/transforms.py)


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match=r"plan 12×8 \(block 96\) does not divide 100"):
        hadamard_transform(torch.zeros(2, 100), HadamardPlan(12, 8))
    with pytest.raises(ValueError, match="positive size"):
        hadamard_plan(0)
    with pytest.raises(ValueError, match="no Hadamard construction covers width 188"):
        hadamard_matrix(188)
