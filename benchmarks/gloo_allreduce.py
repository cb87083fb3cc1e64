"""Latency of one gloo AllReduce between two processes on this host (what each of the
2 × layers + 1 AllReduces of a tensor-parallel CPU decode step costs). Run with:

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gloo_allreduce.py
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for numel in (512, 4096, 65536):
        x = torch.randn(numel)
        for _ in range(50):
            dist.all_reduce(x)
        start = time.perf_counter()
        for _ in range(300):
            dist.all_reduce(x)
        seconds = (time.perf_counter() - start) / 300
        if dist.get_rank() == 0:
            print(f"all_reduce of {numel * 4 / 1024:>6.0f} KiB float32: {seconds * 1e6:>7.0f} µs")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
