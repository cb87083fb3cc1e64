"""Hadamard matrices of order 4n from four circulants: the Goethals–Seidel array.

For orders Paley's constructions miss (92 = 4·23, 116 = 4·29, 156 = 4·39, 172 = 4·43, …).
Let a, b, c, d be ±1 sequences of length n whose periodic autocorrelations
PAF_x(s) = Σ_t x_t·x_(t+s) (indices mod n) sum to zero at every shift s ≠ 0. Their
circulants (A[i, j] = a_(j−i mod n), …) commute, and (A·Aᵀ)[i, i+s] = PAF_a(s), so the
condition is A·Aᵀ + B·Bᵀ + C·Cᵀ + D·Dᵀ = 4n·I (Williamson 1944 asked in addition for
symmetric circulants). With R the back-diagonal permutation (R[i, n−1−i] = 1), X·R is
symmetric for a circulant X and (X·R)·Yᵀ = Y·(X·R)ᵀ for circulants X, Y, which is what
makes the off-diagonal blocks of H·Hᵀ cancel in the Goethals–Seidel array (Goethals &
Seidel, "A skew Hadamard matrix of order 36", J. Austral. Math. Soc. 11, 1970):

    H = [[ A,    B·R,    C·R,    D·R ],
         [−B·R,  A,      Dᵀ·R,  −Cᵀ·R],
         [−C·R, −Dᵀ·R,   A,      Bᵀ·R],
         [−D·R,  Cᵀ·R,  −Bᵀ·R,   A   ]],   H·Hᵀ = 4n·I.

The signs were checked numerically (tests/test_hadamard.py: H·Hᵀ = 4n·I in integers for
every stored n, and a flipped sign breaks it); H is not symmetric, so invert by Hᵀ.

The sequences are not typed in from the literature: tools/search_hadamard_sequences.py
found them (sequences constant on the orbits of a multiplier t ↦ m·t mod n, joined in the
middle under power-spectral-density filters; its docstring has the details), in 111 s on
one CPU core, with

    .venv/bin/python tools/search_hadamard_sequences.py --seed 0 --max-orbits 24 --order \
        23 29 39 43 65 67 73 93 101 113 119 127 133 153 163 183 209 213 241

which prints the ``SEQUENCES`` entries below. Each sequence is a hex integer whose bit t is
set iff x_t = +1.

Still missing, so order 4n falls back to blocks in layers/hadamard.py (some of their
multiples are Paley I: 752 = 4·47·4, 648 = 4·81·2, 824 = 4·103·2): n = 47, 59, 81, 89, 103,
107, 109, 149, 151, 167, 179, 189, 191, 193, 219, 223, 233, 235, 239, 245, 247, 249, 251,
253. The multiplier search found no quadruple for them within 90 s per n, with thinned
joins — which does not mean none exists (for primes p with p − 1 = 2·prime the only
multiplier subgroups are ±1 and the squares, which leaves it little to work with).
"""

from __future__ import annotations

import functools

import torch

# n: (a, b, c, d), the first rows of A, B, C, D (bit t of the hex integer: x_t = +1).
SEQUENCES: dict[int, tuple[str, str, str, str]] = {
    23: ("0d7eb1", "7c663e", "1bc3d9", "6adb57"),
    29: ("0617fa19", "0ee5e9dd", "1bac0d76", "135e1eb3"),
    39: ("37d53839a4", "4bb3eb4437", "1bf969522e", "6e23f7cdd3"),
    43: ("154f786e6c1", "154f786e6c1", "4957e46e385", "176f79ef6e8"),
    65: ("0de84c9ef15b61985", "058f57fcccffabc68", "18f9ae1bf1524a9b4", "197ce93bbd61c05d4"),
    67: ("569c4cbda4feb8441", "7d93f8ef4f0857b32", "2bee67ab12f16429e", "371d5de2e2fdbb60a"),
    73: (
        "05cfc7ebc0eee62a801",
        "05cb966b58e5a72cca1",
        "05da8e7606f0b8b115f",
        "1feba67f65e4bee9a48",
    ),
    93: (
        "1ef7ecbeb6c26fa668b28420",
        "1feae736b4f878b66cc6aa01",
        "05cac777c0b9b8bf85473b5e",
        "1ef2ad736689ec3da1a7135e",
    ),
    101: (
        "1ef1937012475bae3f332ede52",
        "02b4dd1c15eff7c3590fb0af8b",
        "1f68248cf3b58955ccfdd7f860",
        "1b2d625c7677a392ed716adf41",
    ),
    113: (
        "18172bdbf6121e23d12348e4cebb9",
        "18bde89ae2965ff3c77918746eb95",
        "1036fb6bd61b9b18d10358e482afd",
        "0e6dd0b02aede5bf69bc1f4a5d747",
    ),
    119: (
        "16384f9535eec2664b77a8a9f01c69",
        "7ee9ecd3b8f4f60e9ad4ee24ea2800",
        "7febecdbb8f4e68f9ad4ea34e86880",
        "0116572c772b49f16f2f19db35d7fe",
    ),
    127: (
        "042119574382337b215f905d1f4f7bdf",
        "131f06ab147dcd9e57216fb6f1b6d6e8",
        "6ca59973d2833b5ea35dc15e1f9e76e8",
        "0153765b2e7d768e1ded2fe27b38d4e8",
    ),
    133: (
        "1afc307e366f5951e711484362aa7dc433",
        "1ba8763db1a0098a3f1a7501272f13b57f",
        "1e632412ec997b4de40f59599648f47e29",
        "1e2bed9539a1ef77b5e6cae54a5f5f04f2",
    ),
    153: (
        "16eb123f30c57de57dc3e08da5e7429482ba815",
        "1371cf1db6ad41ef7fa153590f6261acced8b07",
        "059eddf2c6fc640a00e8b2767b85332a4d743a7",
        "1a717fcdfe1907e77d2156594eead5e4e2ecb23",
    ),
    163: (
        "08ebd82c717b6bca17a07374a41d4368e26799ecd",
        "39ba41aa107f725a15ea9bfbed762eb4f06654ede",
        "7594419b0e87947c804a9f8b7be23e971cae460f7",
        "1a935f4e0913495cd7c6736e244f32be8be7aedff",
    ),
    183: (
        "03b86d2f9ef837431113257fa048d1ae7c147df4a61d47",
        "282cdae7d86a50560dda093dddedeb07989d1fe50254a3",
        "33dde73c9fbea7593919644a2eac1c9be52df098a49fec",
        "2397e72e979fb715790ba76eace61c89ef29e0d2ac8df5",
    ),
    209: (
        "1a1253fc5d3f73e8ad9c68bc0ce3b70ba6196b88c509370456de8",
        "19a46f8a1ab3bb597c8353bfcf87cff72b04fa6b77356147d8966",
        "0b5635f4d77c42b0831f7c6b6a69f358ae9b4199813f1e8217cac",
        "14a4de2a0c87b99ffcdb8394d586acb7056cffe67784c151ec14a",
    ),
    213: (
        "09f68dddd83da210febe4f139e22a828872e158a7e55f39b3c9ad7",
        "0a92ccfe8af33d94b5fdb14290b3bd3e3db19ed01f6ce3e07049ba",
        "09b8255b9877251c21bec691da96b52f8e99103bf9f8bbf132abeb",
        "17235b6d3fd45ce301c3f47dbbd9ebdc7049eede21362554d1464b",
    ),
    241: (
        "125c65e043ca84ca909a93f6bef5ac4e5c734ecee12f78750093e1783ecc3",
        "19abf83596247ab923457c4ccb0a51f9a28574b936d083ce6e251a975973b",
        "080bb58ede4efe38cb48701345424119aa0fcfb906dace8e876c7b57ee12b",
        "1f75da61b51523b717f741c4fb36fb65d7740077fd74b0ca7e371caf11ccd",
    ),
}


def goethals_seidel_orders() -> list[int]:
    """The orders 4n the stored sequences give, ascending."""
    return sorted(4 * n for n in SEQUENCES)


def has_goethals_seidel(order: int) -> bool:
    """Whether the stored sequences give a Hadamard matrix of ``order``."""
    return order % 4 == 0 and order // 4 in SEQUENCES


def sequences(n: int) -> torch.Tensor:
    """The stored quadruple of length n as an int64 [4, n] tensor of ±1."""
    rows = [int(h, 16) for h in SEQUENCES[n]]
    bits = torch.tensor([[(v >> t) & 1 for t in range(n)] for v in rows], dtype=torch.int64)
    return 2 * bits - 1


def circulant(row: torch.Tensor) -> torch.Tensor:
    """C[i, j] = row[(j − i) mod n]: each row is the previous one shifted right by one."""
    n = row.shape[-1]
    i = torch.arange(n)
    return row[(i[None, :] - i[:, None]) % n]


def goethals_seidel_array(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """The Goethals–Seidel array of the circulants of four first rows (see the module
    docstring); Hadamard exactly when their periodic autocorrelations sum to 0 off shift 0."""
    A, B, C, D = (circulant(x) for x in (a, b, c, d))

    def r(x: torch.Tensor) -> torch.Tensor:  # X·R: R reverses the column order
        return x.flip(-1)

    return torch.cat(
        [
            torch.cat([A, r(B), r(C), r(D)], 1),
            torch.cat([-r(B), A, r(D.T), -r(C.T)], 1),
            torch.cat([-r(C), -r(D.T), A, r(B.T)], 1),
            torch.cat([-r(D), r(C.T), -r(B.T), A], 1),
        ],
        0,
    )


@functools.cache
def goethals_seidel_matrix(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of ``order`` = 4n (float64, H·Hᵀ = order·I, not normalized);
    raises when no sequences of length n are stored. Cached: treat it as read-only."""
    if not has_goethals_seidel(order):
        raise ValueError(f"no Goethals–Seidel sequences give a Hadamard matrix of order {order}")
    return goethals_seidel_array(*sequences(order // 4)).double()
