"""Hadamard matrices whose order is not a power of two, by Paley's two constructions.

Both start from a finite field GF(q), q = p^k a prime power, and its quadratic character
χ(a) = 1 if a is a nonzero square, −1 if a is not a square, χ(0) = 0. The Jacobsthal matrix
Q[a, b] = χ(a − b) (rows and columns indexed by the q field elements) satisfies
Q·Qᵀ = q·I − J and Q·J = J·Q = 0 (J the all-ones matrix), and χ(−1) = (−1)^((q−1)/2) makes Q
skew-symmetric when q ≡ 3 (mod 4), symmetric when q ≡ 1 (mod 4) (Paley, 1933). Bordering Q
with a row and column of ones gives a C with zero diagonal and C·Cᵀ = q·I, from which:

* Paley I, q ≡ 3 (mod 4): C = [[0, 1ᵀ], [−1, Q]] is skew, so H = I + C has
  H·Hᵀ = I + C + Cᵀ + C·Cᵀ = (q + 1)·I: an order q + 1 (12, 20, 24, 28, 44, …).
* Paley II, q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] is symmetric, and
  H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]] has H·Hᵀ = 2(q + 1)·I (the cross terms
  cancel because the two 2×2 matrices are orthogonal and C is symmetric): 36, 52, 76, …

Paley II matrices are symmetric; Paley I matrices are not (H − I is skew), so code using
them must invert by the transpose.

A prime power that is not a prime (27, 25, 343, …) needs the field GF(p^k) itself, not the
integers mod q: elements are polynomials of degree < k over GF(p) (stored as the integer
whose base-p digits are the coefficients), multiplied modulo an irreducible polynomial.
Everything here is built once per order and cached; the decode path never sees it.
"""

from __future__ import annotations

import functools
import itertools

import torch


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime and k ≥ 1; None when q is not a prime power."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0 or d * d > q)
    if q % p:  # no divisor up to √q: q is prime
        return q, 1
    k = 0
    while q % p == 0:
        q, k = q // p, k + 1
    return (p, k) if q == 1 else None


def paley_construction(order: int) -> str | None:
    """ "I" or "II": which Paley construction builds an ``order`` × ``order`` Hadamard matrix;
    None when neither does (order − 1 and order/2 − 1 are not prime powers of the right
    residue mod 4)."""
    q = order - 1
    if prime_power(q) is not None and q % 4 == 3:
        return "I"
    if order % 2 == 0:
        q = order // 2 - 1
        if prime_power(q) is not None and q % 4 == 1:
            return "II"
    return None


def _poly_mod(r: list[int], modulus: list[int], p: int) -> list[int]:
    """r (coefficients, lowest degree first) modulo a monic polynomial, over GF(p)."""
    r = [c % p for c in r]
    k = len(modulus) - 1
    for d in range(len(r) - 1, k - 1, -1):
        c = r[d]
        if c:  # subtract c·x^(d−k)·modulus: clears degree d
            for i, m in enumerate(modulus):
                r[d - k + i] = (r[d - k + i] - c * m) % p
    return r[:k] if len(r) >= k else r + [0] * (k - len(r))


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic polynomial of degree k irreducible over GF(p) (lowest degree first):
    one with no monic factor of degree 1 … k/2."""
    for low in itertools.product(range(p), repeat=k):
        f = [*low, 1]
        if low[0] == 0 and k > 1:
            continue  # x divides it
        factors = (
            [*c, 1] for d in range(1, k // 2 + 1) for c in itertools.product(range(p), repeat=d)
        )
        if all(any(_poly_mod(f, g, p)) for g in factors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # never


def jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = χ(a − b) over GF(q), int64 [q, q] of 0/±1."""
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"GF(q) needs a prime power q, got {q}")
    p, k = pk
    # Element e ↔ its k base-p digits, the coefficients of a polynomial of degree < k.
    digits = torch.tensor([[(e // p**i) % p for i in range(k)] for e in range(q)])
    place = torch.tensor([p**i for i in range(k)])
    if k == 1:
        squares = {a * a % p for a in range(1, q)}
    else:
        modulus = _irreducible(p, k)

        def square(e: int) -> int:
            c = digits[e].tolist()
            prod = [0] * (2 * k - 1)
            for i, a in enumerate(c):
                for j, b in enumerate(c):
                    prod[i + j] += a * b
            return sum(d * p**i for i, d in enumerate(_poly_mod(prod, modulus, p)))

        squares = {square(e) for e in range(1, q)}
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[sorted(squares)] = 1
    # a − b digit by digit (addition in GF(p^k) is coefficient-wise mod p).
    diff = ((digits[:, None, :] - digits[None, :, :]) % p * place).sum(-1)
    return chi[diff]


@functools.cache
def paley_matrix(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of ``order`` (float64, H·Hᵀ = order·I, not normalized); raises
    when ``paley_construction`` has none. Cached: treat the result as read-only."""
    kind = paley_construction(order)
    if kind is None:
        raise ValueError(f"no Paley construction gives a Hadamard matrix of order {order}")
    q = order - 1 if kind == "I" else order // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = -1 if kind == "I" else 1
    c[1:, 1:] = jacobsthal(q).double()
    if kind == "I":
        return torch.eye(q + 1, dtype=torch.float64) + c
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    d2 = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), d2)
