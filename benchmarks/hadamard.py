"""The online Hadamard of ARM: bounded-radix fast transform vs the radix-2 butterfly and a
dense matmul by H, per call, for one decode token and for a 64-token batch. Usage:

    python benchmarks/hadamard.py [--widths 256,1024,4096,8192] [--rows 1,64]
"""

from __future__ import annotations

import argparse

import torch

from common import per_call_us
from shardlm.layers.hadamard import fwht, hadamard_matrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="256,1024,4096,8192")
    p.add_argument("--rows", default="1,64")
    args = p.parse_args()
    print(f"{'width':>6}{'rows':>6}{'radix≤64 µs':>13}{'radix 2 µs':>12}{'dense x·H µs':>14}")
    for b in (int(w) for w in args.widths.split(",")):
        dense = hadamard_matrix(b, torch.float32)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, b)
            fast = per_call_us(lambda x=x, b=b: fwht(x, b))
            butterfly = per_call_us(lambda x=x, b=b: fwht(x, b, max_radix=2))
            matmul = per_call_us(lambda x=x, d=dense: x @ d)
            print(f"{b:6d}{rows:6d}{fast:13.1f}{butterfly:12.1f}{matmul:14.1f}")


if __name__ == "__main__":
    main()
