"""Decode tokens/s at long context with a quantized KV cache (kv_cache_dtype) against the
model's dtype, on one machine, in the same run.

A random model of a named shape (``shardlm bench``'s shapes, dummy weights) gets ``--batch``
prompts of ``--context`` random tokens; once every prompt is prefilled, ``--steps`` decode
steps are timed, ``--repeats`` times per configuration in turns, and the best time kept. At
long context a decode step reads the KV cache more than the weights, so the pool's bytes per
token set the step's cost; on CPU the PyTorch path gathers each sequence's blocks and
dequantizes them to the model's dtype before SDPA (an extra pass over the keys), on a GPU
the Triton kernel dequantizes in registers. Usage:

    python benchmarks/kv_quant.py [--shape tiny] [--context 2048 8192] [--batch 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shardlm.engine.llm_engine import LLMEngine
from shardlm.entrypoints.bench import SHAPES, shape_checkpoint, start_decoding, sync


def start_engine(
    path: Path, kind: str, context: int, batch: int, steps: int, device: str, dtype: str
) -> LLMEngine:
    """An engine whose ``batch`` sequences of ``context`` tokens are prefilled and have
    ``steps`` decode steps left."""
    engine = LLMEngine(
        str(path),
        load_format="dummy",
        device=device,
        dtype=dtype,
        kv_cache_dtype=kind,
        kv_cache_tokens=batch * (context + steps + 16),
        max_num_seqs=batch,
        max_model_len=context + steps + 16,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
    )
    start_decoding(engine, batch, context, steps + 2, kind)
    engine.step()  # one untimed decode step (warm-up)
    return engine


def timed_steps(engine: LLMEngine, steps: int) -> float:
    """Seconds of ``steps`` decode steps."""
    sync(engine.executor.device)
    begin = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.executor.device)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per configuration")
    parser.add_argument("--kinds", nargs="+", default=["auto", "int8", "fp8"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        longest = max(args.context) + args.steps * args.repeats + 16
        path = shape_checkpoint(args.shape, Path(tmp), longest)
        print(
            f"shape {args.shape}, batch {args.batch}, {args.steps} decode steps, "
            f"{args.dtype} on {args.device}"
        )
        print(
            f"{'context':>8} {'kv_cache_dtype':>14} {'bytes/token':>11} {'tok/s':>9} {'vs auto':>8}"
        )
        for context in args.context:
            # Every configuration's engine at once, timed in turns, best of --repeats:
            # machines shared with other work drift, and the turns share the drift.
            total = args.steps * args.repeats
            engines = {
                kind: start_engine(path, kind, context, args.batch, total, args.device, args.dtype)
                for kind in args.kinds
            }
            best = dict.fromkeys(args.kinds, float("inf"))
            try:
                for _ in range(args.repeats):
                    for kind, engine in engines.items():
                        best[kind] = min(best[kind], timed_steps(engine, args.steps))
            finally:
                for engine in engines.values():
                    engine.shutdown()
            base = args.batch * args.steps / best[args.kinds[0]]
            for kind in args.kinds:
                rate = args.batch * args.steps / best[kind]
                per_token = engines[kind].stats.kv_cache_bytes_per_token
                print(f"{context:>8} {kind:>14} {per_token:>11} {rate:>9.1f} {rate / base:>7.2f}×")


if __name__ == "__main__":
    main()
