"""Where a decode step's time goes: kernel time per step by kind, against the step's wall time.

Runs decode steps of a named shape (random weights) under torch.profiler with the graphs
off (``enforce_eager``, so every kernel is seen as its own launch), then times the same
steps from CUDA graphs. Kernel time ÷ eager step time says how much of an eager step the
launches cost; the graph step time against the kernel sum says what graphs won back; the
kernel table says which kernels keep a step above its roofline.

    python benchmarks/decode_profile.py --shape llama-1b --batch 1     # on a GPU
    python benchmarks/decode_profile.py --shape tiny --device cpu      # smoke run (op times)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from shardlm.engine.llm_engine import LLMEngine
from shardlm.entrypoints.bench import SHAPES, shape_checkpoint, start_decoding, sync

KINDS = (
    ("attention", ("split_kv_decode", "merge_splits")),
    ("rope+kv write", ("rope_and_store",)),
    ("norm", ("rms_norm",)),
    ("silu·mul", ("silu_and_mul",)),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "matmul", "addmm", "mm")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def step_time(engine: LLMEngine, steps: int) -> float:
    sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    total = args.input_len + 2 * args.steps + 64
    with tempfile.TemporaryDirectory() as scratch:
        path = shape_checkpoint(args.shape, Path(scratch), total + 16)
        common = dict(
            dtype=args.dtype,
            device=args.device,
            skip_tokenizer_init=True,
            load_format="dummy",
            kv_cache_tokens=args.batch * (total + 16),
            max_num_seqs=args.batch,
            enable_prefix_caching=False,
        )
        engine = LLMEngine(path, enforce_eager=True, **common)
        start_decoding(engine, args.batch, args.input_len, 2 * args.steps + 8, "profile")
        step_time(engine, 3)  # warm-up
        eager = step_time(engine, args.steps)
        cuda = engine.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step_time(engine, args.steps)
        engine.shutdown()
        graphed = None
        if cuda:
            engine = LLMEngine(path, **common)
            if engine.runner.decode_graphs is not None:
                start_decoding(engine, args.batch, args.input_len, 2 * args.steps + 8, "profile")
                step_time(engine, 3)
                graphed = step_time(engine, args.steps)
            engine.shutdown()

    per_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        # On CUDA, kernels only: an aten op's self device time is its kernels' again.
        if cuda and evt.device_type != DeviceType.CUDA:
            continue
        device_us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if device_us > 0:
            per_kernel[evt.key] += device_us / args.steps
    if not cuda:  # CPU: leaf ops only, or parents count their children again
        per_kernel = {k: v for k, v in per_kernel.items() if k.startswith("aten::")}
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in per_kernel.items():
        by_kind[kind_of(name)] += us
    busy = sum(per_kernel.values())
    unit = "kernel" if cuda else "op"
    print(f"{args.shape}, batch {args.batch}, {args.dtype}, {engine.device}: {unit} time per step")
    print(f"{'kind':<16}{'µs/step':>10}{'share':>8}")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<16}{us:10.1f}{100 * us / busy:7.1f}%")
    print(f"{'all ' + unit + 's':<16}{busy:10.1f}")
    print(f"eager step {1e6 * eager:.1f} µs: {unit}s busy {100 * busy / (1e6 * eager):.0f}%")
    if graphed is not None:
        print(f"graph step {1e6 * graphed:.1f} µs ({eager / graphed:.2f}× the eager step)")
    print(f"\ntop {args.top} {unit}s (µs/step)")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{us:10.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
