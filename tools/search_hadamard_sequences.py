"""Search four ±1 sequences of length n whose periodic autocorrelations sum to zero.

Such a quadruple gives four circulant matrices A, B, C, D with
A·Aᵀ + B·Bᵀ + C·Cᵀ + D·Dᵀ = 4n·I, and the Goethals–Seidel array (Goethals & Seidel 1970;
src/shardlm/layers/goethals_seidel.py) turns them into a Hadamard matrix of order 4n. The
quadruples stored in that module, for the orders 4n ≤ 1024 that neither Paley construction
nor a Kronecker product with Sylvester's reaches, come from this tool:

    .venv/bin/python tools/search_hadamard_sequences.py --seed 0 --max-orbits 24 --order \
        23 29 39 43 65 67 73 93 101 113 119 127 133 153 163 183 209 213 241

(111 s on one core; it prints the ``SEQUENCES`` entries, deterministic for a seed). Those
are the n of all 43 odd n ≤ 255 with 4n out of Paley's reach for which the same command
found a quadruple (with ``--max-seconds 90``; the others, listed in goethals_seidel.py, are
reported on stderr). Two methods, both exact (a hit is re-checked from scratch before it is
printed):

``--method orbits`` (the default): meet in the middle over sequences fixed by a multiplier.
Take a cyclic subgroup G = ⟨m⟩ of the units mod n and only sequences constant on the orbits
of t ↦ m·t on Z_n. For such x, PAF_x(m·s) = PAF_x(s), and PAF_x(−s) = PAF_x(s) always, so
the condition Σ_i PAF_i(s) = 0 (s ≠ 0) need only hold on one shift per orbit of ⟨m, −1⟩: a
handful of equations over 2^(#orbits) candidates per sequence (Djoković's approach to
Goethals–Seidel difference families). Filters, all necessary conditions:

* Row sums: Σ_s PAF_x(s) = (Σ_t x_t)², so the four row sums r_i satisfy Σ r_i² = 4n (odd
  n: all odd). Negating a sequence keeps its PAF, so only r_i > 0 are enumerated.
* Power spectral density: the DFT turns the condition into Σ_i |x̂_i(k)|² = 4n at every
  frequency k, so |x̂(k)|² ≤ 4n for each sequence, and ≤ 4n for the sum of a pair.

Then for a row-sum quadruple (r1, r2, r3, r4) the pairs (A, B) and (C, D) are keyed by their
summed PAFs on the representative shifts (a random linear hash; a collision is re-checked)
and joined where the keys cancel. Subgroups are tried from the fewest orbits up to
``--max-orbits``; pair lists longer than ``--max-pairs`` are randomly thinned (solutions are
plentiful, so a thinned join still finds one; it only decides which).

``--method anneal``: batched simulated annealing over unrestricted sequences, minimizing
E = Σ_(s≠0) (Σ_i PAF_i(s))², moving by a swap of a +1 and a −1 in one sequence (which keeps
its row sum). Flipping x_j changes PAF_x(s) by −2·x_j·(x_(j+s) + x_(j−s)) at every s ≠ 0;
flipping x_j and x_k adds the two, corrected by +4·x_j·x_k at s = ±(k − j) (that product
was counted as changing twice but stays). Fast for n ≤ 29; stalls at E = 64 for n = 39, 43
within minutes, which is why the orbit method is the default.

Output: per n, the four sequences as hex strings, bit t of the integer set iff x_t = +1
(the format of goethals_seidel.SEQUENCES).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import numpy as np

Quad = tuple[int, int, int, int]


def row_sum_quads(n: int) -> list[Quad]:
    """0 < r1 ≤ r2 ≤ r3 ≤ r4, all ≡ n (mod 2), with Σ r_i² = 4n: the row sums a solution
    can have, up to order and sign (a ±1 sequence of length n has a sum ≡ n mod 2)."""
    top = math.isqrt(4 * n)
    values = range(2 - n % 2, top + 1, 2)
    return [
        q
        for q in itertools.combinations_with_replacement(values, 4)
        if sum(r * r for r in q) == 4 * n
    ]


def paf(x: np.ndarray) -> np.ndarray:
    """Periodic autocorrelation along the last axis: out[..., s] = Σ_t x[t]·x[t + s]."""
    n = x.shape[-1]
    return np.stack([(x * np.roll(x, -s, axis=-1)).sum(-1) for s in range(n)], axis=-1)


def check(q: np.ndarray) -> bool:
    """From scratch: four ±1 rows whose PAFs sum to 0 at every nonzero shift."""
    return bool(q.shape[0] == 4 and np.all(np.abs(q) == 1) and not paf(q).sum(0)[1:].any())


def to_hex(x: np.ndarray) -> str:
    """Bit t set iff x_t = +1, as ⌈n/4⌉ hex digits."""
    value = sum(1 << t for t, v in enumerate(x) if v > 0)
    return f"{value:0{-(-len(x) // 4)}x}"


# -- the orbit method --
def orbits(n: int, m: int) -> list[list[int]]:
    """The orbits of t ↦ m·t (mod n) on Z_n, each in the order m generates it."""
    seen: set[int] = set()
    out = []
    for t in range(n):
        if t not in seen:
            orbit = [t]
            while (u := orbit[-1] * m % n) != t:
                orbit.append(u)
            seen.update(orbit)
            out.append(orbit)
    return out


def multipliers(n: int, max_orbits: int) -> list[tuple[int, int]]:
    """(orbit count, m) for one generator m of each cyclic subgroup ⟨m⟩ ≠ 1 of the units
    mod n with 4 … max_orbits orbits on Z_n, fewest orbits first."""
    found: dict[frozenset[int], int] = {}
    for m in range(2, n):
        if math.gcd(m, n) == 1:
            group, u = {1}, m
            while u != 1:
                group.add(u)
                u = u * m % n
            found.setdefault(frozenset(group), m)
    counts = [(len(orbits(n, m)), m) for m in found.values()]
    return sorted(c for c in counts if 4 <= c[0] <= max_orbits)


def _orbit_candidates(
    n: int, m: int, chunk: int = 1 << 14
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every sequence constant on the orbits of m with a positive sum that passes the PSD
    filter: (x [N, n], sums [N], psd [N, n//2 + 1], PAF on one shift per class [N, c])."""
    orbs = orbits(n, m)
    indicator = np.zeros((len(orbs), n), dtype=np.int64)
    for i, orbit in enumerate(orbs):
        indicator[i, orbit] = 1
    # One shift per orbit of ⟨m, −1⟩ on the nonzero shifts.
    reps, covered = [], set()
    for orbit in orbs:
        if orbit[0] and orbit[0] not in covered:
            reps.append(orbit[0])
            covered.update(orbit)
            covered.update((n - t) % n for t in orbit)
    keep_x, keep_psd = [], []
    for start in range(0, 1 << len(orbs), chunk):
        code = np.arange(start, min(start + chunk, 1 << len(orbs)))
        signs = 1 - 2 * ((code[:, None] >> np.arange(len(orbs))) & 1)
        x = signs @ indicator
        x = x[x.sum(1) > 0]
        f = np.fft.rfft(x, axis=1)
        psd = f.real**2 + f.imag**2
        ok = (psd <= 4 * n + 1e-6).all(1)
        keep_x.append(x[ok])
        keep_psd.append(psd[ok])
    x, psd = np.concatenate(keep_x), np.concatenate(keep_psd)
    classes = np.rint(np.fft.irfft(psd, n=n, axis=1)).astype(np.int64)[:, reps]
    return x, x.sum(1), psd, classes


def _pairs(
    ia: np.ndarray, ib: np.ndarray, psd: np.ndarray, n: int, cap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (a, b) of ia × ib whose PSDs sum to ≤ 4n everywhere; each side thinned at
    random first so that |ia|·|ib| ≤ cap."""
    while len(ia) * len(ib) > cap:
        if len(ia) >= len(ib):
            ia = rng.choice(ia, len(ia) // 2, replace=False)
        else:
            ib = rng.choice(ib, len(ib) // 2, replace=False)
    out_a, out_b = [], []
    step = max(1, (1 << 22) // max(1, len(ib) * psd.shape[1]))
    for s in range(0, len(ia), step):
        a = ia[s : s + step]
        good = ((psd[a][:, None, :] + psd[ib][None, :, :]) <= 4 * n + 1e-6).all(-1)
        ga, gb = np.nonzero(good)
        out_a.append(a[ga])
        out_b.append(ib[gb])
    return np.concatenate(out_a), np.concatenate(out_b)


def search_orbits(
    n: int, seed: int, max_orbits: int, max_pairs: int, max_seconds: float
) -> np.ndarray | None:
    """A [4, n] solution constant on the orbits of some multiplier, or None."""
    start = time.monotonic()
    rng = np.random.default_rng(seed)
    quads = row_sum_quads(n)
    for count, m in multipliers(n, max_orbits):
        if time.monotonic() - start > max_seconds:
            break
        x, sums, psd, classes = _orbit_candidates(n, m)
        # Random odd weights: the key of a PAF vector is linear, so key(A) + key(B) is the
        # key of PAF_A + PAF_B (int64 arithmetic wraps; a false hit is rejected by check).
        weights = rng.integers(1, 1 << 62, size=classes.shape[1]) | 1
        with np.errstate(over="ignore"):
            keys = classes @ weights
        print(f"# n={n} m={m}: {count} orbits, {len(x)} candidates", file=sys.stderr)
        for quad in quads:
            idx = [np.flatnonzero(sums == r) for r in quad]
            if any(len(i) == 0 for i in idx):
                continue
            # Pair the four sets so the larger side of the join is as small as possible.
            (a1, b1), (a2, b2) = min(
                (((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))),
                key=lambda p: max(len(idx[i]) * len(idx[j]) for i, j in p),
            )
            la, lb = _pairs(idx[a1], idx[b1], psd, n, max_pairs, rng)
            ra, rb = _pairs(idx[a2], idx[b2], psd, n, max_pairs, rng)
            if not len(la) or not len(ra):
                continue
            with np.errstate(over="ignore"):
                left, right = keys[la] + keys[lb], -(keys[ra] + keys[rb])
            order = np.argsort(right, kind="stable")
            pos = np.minimum(np.searchsorted(right[order], left), len(right) - 1)
            for h in np.flatnonzero(right[order][pos] == left):
                r = order[pos[h]]
                q = np.stack([x[la[h]], x[lb[h]], x[ra[r]], x[rb[r]]])
                if check(q):
                    print(
                        f"# n={n}: m={m}, row sums {quad}, {time.monotonic() - start:.1f} s",
                        file=sys.stderr,
                    )
                    return q
    return None


# -- the annealing method --
def _random_starts(rng: np.random.Generator, n: int, sums: np.ndarray) -> np.ndarray:
    """±1 sequences [B, 4, n] with row sums [B, 4]: (n + r)/2 entries +1, at random places."""
    order = rng.random((*sums.shape, n)).argsort(-1)  # a random permutation
    return np.where(order < (n + sums)[..., None] // 2, 1, -1).astype(np.int64)


def search_anneal(
    n: int, seed: int, chains: int, sweep: int, t_hot: float, t_cold: float, max_seconds: float
) -> np.ndarray | None:
    """Run the chains until one reaches energy 0; its [4, n] quadruple, or None on timeout."""
    rng = np.random.default_rng(seed)
    b, shifts = np.arange(chains), np.arange(n)
    quad_table = np.array(row_sum_quads(n), dtype=np.int64)
    cool = (t_cold / t_hot) ** (1.0 / sweep)
    x = np.empty((chains, 4, n), dtype=np.int64)
    p = np.empty((chains, n), dtype=np.int64)  # Σ_i PAF_i
    e = np.empty(chains, dtype=np.int64)
    temp = np.empty(chains)
    age = np.empty(chains, dtype=np.int64)

    def restart(rows: np.ndarray) -> None:
        sums = quad_table[rng.integers(len(quad_table), size=len(rows))]
        x[rows] = _random_starts(rng, n, sums)
        p[rows] = paf(x[rows]).sum(1)
        e[rows] = (p[rows, 1:] ** 2).sum(-1)
        temp[rows], age[rows] = t_hot, 0

    restart(b)
    age[:] = rng.integers(sweep, size=chains)  # staggered phases: restarts spread out
    temp[:] = t_hot * cool**age
    start = time.monotonic()
    while not (e == 0).any():
        if time.monotonic() - start > max_seconds:
            return None
        # One proposal per chain: in sequence i, flip a +1 at j and a −1 at k.
        i = rng.integers(4, size=chains)
        seq = x[b, i]
        r = rng.random((chains, n))
        j = np.where(seq > 0, r, -1.0).argmax(-1)
        k = np.where(seq < 0, r, -1.0).argmax(-1)
        rows = b[:, None]
        d = -2 * (seq[rows, (j[:, None] + shifts) % n] + seq[rows, (j[:, None] - shifts) % n])
        d += 2 * (seq[rows, (k[:, None] + shifts) % n] + seq[rows, (k[:, None] - shifts) % n])
        d[b, (k - j) % n] -= 4  # the +4·x_j·x_k correction, x_j·x_k = −1
        d[b, (j - k) % n] -= 4
        d[:, 0] = 0
        new_p = p + d
        new_e = (new_p[:, 1:] ** 2).sum(-1)
        delta = new_e - e
        accept = rng.random(chains) < np.exp(-np.maximum(delta, 0) / temp)
        a = np.flatnonzero(accept)
        x[a, i[a], j[a]], x[a, i[a], k[a]] = -1, 1
        p[a], e[a] = new_p[a], new_e[a]
        temp *= cool
        age += 1
        restart(np.flatnonzero(age >= sweep))
    print(f"# n={n}: annealed in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return x[np.flatnonzero(e == 0)[0]].copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--order", type=int, nargs="+", required=True, help="sequence lengths n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=("orbits", "anneal"), default="orbits")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="per n")
    ap.add_argument("--max-orbits", type=int, default=24, help="orbits: 2^this candidates")
    ap.add_argument("--max-pairs", type=int, default=1 << 22, help="orbits: join side size")
    ap.add_argument("--chains", type=int, default=512, help="anneal: chains run together")
    ap.add_argument("--sweep", type=int, default=20000, help="anneal: steps per cooling")
    ap.add_argument("--t-hot", type=float, default=64.0)
    ap.add_argument("--t-cold", type=float, default=8.0)
    args = ap.parse_args(argv)
    for name in ("max_seconds", "max_orbits", "max_pairs", "chains", "sweep", "t_hot", "t_cold"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    missing = []
    for n in args.order:
        if n < 3:
            ap.error(f"--order: n must be at least 3, got {n}")
        if not row_sum_quads(n):
            ap.error(f"4·{n} is not a sum of four squares of the right parity")
        t0 = time.monotonic()
        if args.method == "orbits":
            q = search_orbits(n, args.seed, args.max_orbits, args.max_pairs, args.max_seconds)
        else:
            q = search_anneal(
                n, args.seed, args.chains, args.sweep, args.t_hot, args.t_cold, args.max_seconds
            )
        if q is None:
            print(f"# n={n}: nothing found ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
            missing.append(n)
            continue
        assert check(q)
        hexes = ", ".join(f'"{to_hex(row)}"' for row in q)
        line = f"    {n}: ({hexes}),"
        if len(line) > 100:  # one sequence a line, as ruff format would put it
            line = f"    {n}: (\n" + "".join(f'        "{to_hex(r)}",\n' for r in q) + "    ),"
        print(line, flush=True)
    if missing:
        print(f"# not found: {missing}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
