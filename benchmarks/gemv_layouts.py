"""Why shardlm's Linear stores W transposed and splits K on CPU: single-row matmul bandwidth.

For each weight shape of the ~58M benchmark model, times y = x·Wᵀ three ways on weights
cycled through enough copies to defeat the caches (as in a real decode step):

  F.linear   x @ Wᵀ, W stored [out, in]   (transformers' layout)
  x @ W      W stored [in, out]            (shardlm's ``weight_t``)
  split-K    [in, out] as S row blocks, one batched GEMM, partial sums added (shardlm on CPU)

Prints GB/s of weight streamed and the split-K / F.linear ratio. ``--rows`` repeats the table
for x with more rows (a decode batch or a prefill chunk), where split-K stops paying.
Usage:

    python benchmarks/gemv_layouts.py [--mib 200] [--rows 1 16 64 512]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from shardlm.layers.linear import split_k_matmul

SHAPES = [
    (512, 1024, "qkv"),
    (512, 512, "o"),
    (512, 3072, "gate|up"),
    (1536, 512, "down"),
    (512, 32000, "lm head"),
]


def bandwidth(fn, weights: list[torch.Tensor], repeats: int = 5) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds = (time.perf_counter() - start) / repeats
    return sum(w.nbytes for w in weights) / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=200, help="weight bytes cycled per shape")
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (default 1)")
    args = p.parse_args()
    splits = torch.get_num_threads()
    for rows in args.rows:
        table(rows, splits, args.mib)


def table(rows: int, splits: int, mib: int) -> None:
    print(f"{torch.get_num_threads()} threads, split-K S={splits}, float32, x has {rows} row(s)")
    print(f"{'weight':<10}{'in×out':>12}{'F.linear':>10}{'x @ W':>10}{'split-K':>10}{'ratio':>8}")
    for k, n, name in SHAPES:
        copies = max(1, mib * 2**20 // (k * n * 4))
        w_t = [torch.randn(k, n) for _ in range(copies)]  # [in, out]
        w = [t.t().contiguous() for t in w_t]  # [out, in]
        x = torch.randn(rows, k)
        linear = bandwidth(lambda x=x, w=w: [F.linear(x, m) for m in w], w)
        plain = bandwidth(lambda x=x, w_t=w_t: [x @ m for m in w_t], w_t)
        split = bandwidth(lambda x=x, w_t=w_t: [split_k_matmul(x, m, splits) for m in w_t], w_t)
        print(
            f"{name:<10}{f'{k}×{n}':>12}{linear:>9.1f}G{plain:>9.1f}G{split:>9.1f}G"
            f"{split / linear:>7.2f}x"
        )


if __name__ == "__main__":
    main()
