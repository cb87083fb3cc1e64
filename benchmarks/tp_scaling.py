"""Tensor-parallel scaling on this machine: decode speed, per-rank weights, AllReduce traffic.

For TP = 1, 2 (``--sizes``) on the same random Llama-shaped checkpoint (float32, CPU/gloo),
measures batch-1 and batch-8 greedy decode tokens/s, the weight bytes each rank holds, and the
AllReduces the driver made per decode step, next to the figure-1 formula
(2 per layer × hidden × batch × dtype bytes, plus one for the vocabulary-parallel embedding).
Usage:

    python benchmarks/tp_scaling.py [--sizes 1 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import add_model_args, make_checkpoint


def measure(path: str, tp: int, batch: int, new_tokens: int) -> dict:
    from shardlm import LLM, SamplingParams

    with LLM(path, device="cpu", tensor_parallel_size=tp, skip_tokenizer_init=True) as llm:
        prompts = [[3 + i, 4, 5, 6, 7, 8, 9, 10] for i in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        ctx = llm.engine.tp
        calls, nbytes = ctx.all_reduce_calls, ctx.all_reduce_bytes
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return {
            "tok_s": batch * new_tokens / seconds,
            "rank_bytes": llm.engine.rank_weight_bytes,
            "raw": (ctx.all_reduce_calls - calls, ctx.all_reduce_bytes - nbytes),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    add_model_args(p)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args)
        rows = []
        for tp in args.sizes:
            for batch in args.batches:
                rows.append((tp, batch, measure(path, tp, batch, args.new_tokens)))

    print(
        f"random Llama: hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}q/{args.kv_heads}kv heads, intermediate {args.intermediate}, "
        f"vocab {args.vocab}; float32, CPU, gloo; "
        f"{args.new_tokens} new tokens; {torch.get_num_threads()} cores shared by all ranks"
    )
    header = (
        f"{'TP':>3}{'batch':>7}{'tok/s':>9}{'vs TP=1':>9}{'MiB/rank':>10}"
        f"{'AllReduce/step':>16}{'formula':>9}{'KiB/step':>10}{'formula':>9}"
    )
    print(header)
    base = {b: r["tok_s"] for tp, b, r in rows if tp == 1}
    for tp, batch, r in rows:
        calls, nbytes = r["raw"]
        steps = args.new_tokens
        # Figure 1: two AllReduces per layer (after W^B and W^D), plus the embedding's.
        formula_calls = 2 * args.layers + 1 if tp > 1 else 0
        # Decode steps carry `batch` tokens; the prefill step carries the prompts' 8 each.
        tokens = batch * 8 + (steps - 1) * batch
        formula_bytes = formula_calls * args.hidden * 4 * tokens / steps
        ratio = r["tok_s"] / base[batch] if batch in base else float("nan")
        print(
            f"{tp:>3}{batch:>7}{r['tok_s']:>9.1f}{ratio:>8.2f}x"
            f"{max(r['rank_bytes']) / 2**20:>10.1f}"
            f"{calls / steps:>16.1f}{formula_calls:>9}"
            f"{nbytes / steps / 1024:>10.1f}{formula_bytes / 1024:>9.1f}"
        )


if __name__ == "__main__":
    main()
