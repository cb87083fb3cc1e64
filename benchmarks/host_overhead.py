"""Host time per decode step: the engine's Python work (schedule, step inputs, staging,
sampling bookkeeping, outputs) with the model's forward replaced by ready-made logits, against
the full step measured in the same run.

A decode step's GPU work at batch 1 on a 1B model is ~0.8 ms at the bandwidth roofline; the
host's share is added to it, since the next step's inputs depend on this step's tokens. So
this is the part of the gap to the roofline that no kernel can close.

    .venv/bin/python benchmarks/host_overhead.py                 # CPU: tiny shape
    python3 benchmarks/host_overhead.py --shape llama-1b         # on a GPU (with graphs)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shardlm.engine.llm_engine import LLMEngine
from shardlm.entrypoints.bench import SHAPES, shape_checkpoint, start_decoding, sync


def decode_step_time(engine: LLMEngine, batch: int, steps: int) -> float:
    """Seconds per step of ``steps`` decode steps of ``batch`` sequences (prefill excluded)."""
    start_decoding(engine, batch, 64, steps + 8, "host")
    for _ in range(3):
        engine.step()
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def stub_forward(engine: LLMEngine) -> None:
    """Replace the model's forward by zero logits, keeping everything around it: with decode
    graphs, their staging and copies run and only the replay is skipped."""
    runner = engine.runner
    vocab = engine.config.vocab_size
    zeros = torch.zeros(max(runner.decode_graphs.buckets) if runner.decode_graphs else 1, vocab)
    zeros = zeros.to(engine.device)
    if runner.decode_graphs is not None:
        graphs = runner.decode_graphs
        graphs.graphs = {}  # run() then calls _forward instead of replaying
        graphs._forward = lambda n: zeros[:n]
    real_run = runner.run

    def run(inputs):
        if runner.decode_graphs is not None and runner.decode_graphs.can_run(inputs):
            return real_run(inputs)
        if inputs.num_decodes and not inputs.prefill_tables:
            return torch.zeros(inputs.sample_rows.shape[0], vocab, device=engine.device)
        return real_run(inputs)  # prefills: the real model (not timed)

    runner.run = run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        path = shape_checkpoint(args.shape, Path(scratch), 64 + args.steps + 32)
        kwargs = dict(
            dtype=args.dtype,
            device=args.device,
            skip_tokenizer_init=True,
            load_format="dummy",
            kv_cache_tokens=max(batches) * (64 + args.steps + 32),
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(2048, 64 * max(batches)),
            enable_prefix_caching=False,
        )
        full = LLMEngine(path, **kwargs)
        full_times = [decode_step_time(full, b, args.steps) for b in batches]
        graphs = full.runner.decode_graphs is not None
        full.shutdown()
        host = LLMEngine(path, **kwargs)
        stub_forward(host)
        host_times = [decode_step_time(host, b, args.steps) for b in batches]
        host.shutdown()
    print(
        f"shape {args.shape}, {host.dtype}, {host.device}, "
        f"{'CUDA graphs' if graphs else 'eager'}: decode step, µs"
    )
    print(f"{'batch':>6}{'host only':>11}{'per seq':>9}{'full step':>11}{'host share':>12}")
    for b, h, f in zip(batches, host_times, full_times, strict=True):
        print(f"{b:6d}{1e6 * h:11.1f}{1e6 * h / b:9.1f}{1e6 * f:11.1f}{100 * h / f:11.1f}%")


if __name__ == "__main__":
    main()
