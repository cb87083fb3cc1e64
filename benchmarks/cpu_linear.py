"""Which product streams a weight fastest on this CPU, per dtype and rows of x: what shardlm's
Linear uses (split-K for float32, oneDNN's packed weight for bfloat16) against the other
ways torch offers, on weights cycled past the caches as a decode step streams them.

    python benchmarks/cpu_linear.py [--shape 1024 5632] [--rows 1 4 16] [--mib 256]

Prints µs per product and GB/s of weight streamed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timed(make, call, nbytes: int, mib: int) -> float | None:
    """Seconds per call of ``call(w)`` over enough weights ``make()`` to defeat the caches."""
    weights = [make() for _ in range(max(2, mib * 2**20 // nbytes))]
    try:
        for w in weights:
            call(w)
    except RuntimeError:
        return None  # not supported by this build / CPU
    start = time.perf_counter()
    for _ in range(3):
        for w in weights:
            call(w)
    return (time.perf_counter() - start) / (3 * len(weights))


def candidates(k: int, n: int, rows: int):
    """(name, weight factory, product, bytes per weight)."""
    from shardlm.layers.linear import choose_splits, split_k_matmul

    s = choose_splits(k, torch.device("cpu"))
    x32 = torch.randn(rows, k)
    x16 = x32.bfloat16()
    scales = torch.rand(n).bfloat16()
    return [
        (
            "float32 split-K (shardlm)",
            lambda: torch.randn(k, n),
            lambda w: split_k_matmul(x32, w, s),
            4,
        ),
        ("float32 F.linear", lambda: torch.randn(n, k), lambda w: F.linear(x32, w), 4),
        (
            "bfloat16 split-K",
            lambda: torch.randn(k, n).bfloat16(),
            lambda w: split_k_matmul(x16, w, s),
            2,
        ),
        ("bfloat16 F.linear", lambda: torch.randn(n, k).bfloat16(), lambda w: F.linear(x16, w), 2),
        (
            "bfloat16 oneDNN packed (shardlm)",
            lambda: torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).bfloat16(), 1),
            lambda w: torch.ops.mkldnn._linear_pointwise(x16, w, None, "none", [], ""),
            2,
        ),
        (
            "int8 weight-only (_weight_int8pack_mm, bf16 x)",
            lambda: torch.randint(-127, 128, (n, k), dtype=torch.int8),
            lambda w: torch._weight_int8pack_mm(x16, w, scales),
            1,
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=[1024, 5632], metavar=("IN", "OUT"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--mib", type=int, default=256, help="weight bytes cycled per candidate")
    args = p.parse_args()
    k, n = args.shape
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight {k}×{n}")
    print("| product | rows | µs | GB/s of weight |")
    print("|---|---:|---:|---:|")
    for rows in args.rows:
        for name, make, call, width in candidates(k, n, rows):
            t = timed(make, call, k * n * width, args.mib)
            if t is None:
                print(f"| {name} | {rows} | n/a | n/a |")
                continue
            print(f"| {name} | {rows} | {t * 1e6:.0f} | {k * n * width / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
