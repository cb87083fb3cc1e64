"""Figure 2's overlap on this machine: decode step time and wait times with m = 1, 2, 3
micro-batches, against local attention, at growing contexts.

For each context length, ``--batch`` requests with distinct prompts of that many tokens are
prefilled, then ``--decode-steps`` decode steps of the whole batch are timed. Per step the
engine's own counters give how long the compute side was blocked waiting for the attention
nodes' answers (ComputeNodeStats.wait_on_nodes_us_last_step, summed over compute ranks)
and how long each attention node was blocked waiting for the compute side's messages
(NodeStats.wait_on_compute_us_last_step, averaged over nodes). Attention nodes run as their
own ranks (gloo on loopback; from a CUDA compute rank through pinned host buffers).
Usage:

    python benchmarks/node_overlap.py [--contexts 1024 4096 16384] [--batch 4] [--beta 2]
    python benchmarks/node_overlap.py --device cuda --attention-device cpu   # one GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from attention_nodes import add_node_model_args, make_checkpoint


def configs(args: argparse.Namespace) -> dict[str, dict]:
    nodes = dict(attention_nodes=args.beta, compute_nodes=args.alpha)
    if args.attention_device:
        nodes["attention_device"] = args.attention_device
    out = {"local": {}}
    for m in args.microbatches:
        out[f"β={args.beta} m={m}"] = dict(nodes, node_microbatches=m)
    return out


def measure(path: str, engine_args: dict, args: argparse.Namespace) -> list[dict]:
    from shardlm import LLM, SamplingParams

    rows = []
    pool = args.batch * (max(args.contexts) + args.decode_steps + 16)
    with LLM(
        path,
        device=args.device,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        kv_cache_tokens=pool,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.chunk,
        kv_chunk_size=args.kv_chunk_size,
        enable_prefix_caching=False,
        **engine_args,
    ) as llm:
        engine = llm.engine
        nodes = bool(engine_args)
        params = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 2, ignore_eos=True)
        for context in args.contexts:
            for b in range(args.batch):
                prompt = [(7 * i + 13 * b) % 4000 + 3 for i in range(context)]
                engine.add_request(f"{context}-{b}", prompt, params)
            while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or (
                engine.scheduler.waiting
            ):
                engine.step()  # prefills
            times, compute_wait, node_wait = [], [], []
            for _ in range(args.decode_steps):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
                if nodes:
                    compute = engine.compute_node_stats()
                    attention = engine.attention_node_stats()
                    compute_wait.append(sum(c.wait_on_nodes_us_last_step for c in compute))
                    node_wait.append(
                        statistics.mean(n.wait_on_compute_us_last_step for n in attention)
                    )
            while engine.has_unfinished_requests():
                engine.step()
            rows.append(
                {
                    "context": context,
                    "ms": 1e3 * statistics.median(times),
                    "compute_wait_ms": statistics.median(compute_wait) / 1e3 if nodes else 0.0,
                    "node_wait_ms": statistics.median(node_wait) / 1e3 if nodes else 0.0,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--alpha", type=int, default=1)
    p.add_argument("--beta", type=int, default=2)
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--device", default="cpu", help="the compute side's device")
    p.add_argument(
        "--attention-device",
        default=None,
        help="the attention nodes' device (e.g. cpu beside a CUDA compute rank: pinned gloo)",
    )
    p.add_argument("--dtype", default="float32")
    add_node_model_args(p)
    args = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args)
        for name, engine_args in configs(args).items():
            start = time.perf_counter()
            results[name] = measure(path, engine_args, args)
            print(f"  measured {name} in {time.perf_counter() - start:.0f} s", flush=True)

    print(
        f"\nrandom Llama: hidden {args.hidden}, {args.layers} layers, {args.heads}q/"
        f"{args.kv_heads}kv heads; {args.dtype}, compute on {args.device}, nodes on "
        f"{args.attention_device or args.device} ({torch.get_num_threads()} threads); "
        f"α={args.alpha}, kv_chunk_size {args.kv_chunk_size}; batch {args.batch}; median of "
        f"{args.decode_steps} decode steps"
    )
    names = list(results)
    print("\ndecode step time, ms (× local attention)")
    print(f"{'context':>8}" + "".join(f"{n:>20}" for n in names))
    for i, context in enumerate(args.contexts):
        base = results["local"][i]["ms"]
        cells = "".join(
            f"{results[n][i]['ms']:>11.2f} ({results[n][i]['ms'] / base:4.2f}×)" for n in names
        )
        print(f"{context:>8}{cells}")
    waited = [n for n in names if n != "local"]
    print("\nwait per decode step, ms: compute side on the nodes / each node on the compute side")
    print(f"{'context':>8}" + "".join(f"{n:>20}" for n in waited))
    for i, context in enumerate(args.contexts):
        cells = "".join(
            f"{results[n][i]['compute_wait_ms']:>9.2f} / {results[n][i]['node_wait_ms']:<8.2f}"
            for n in waited
        )
        print(f"{context:>8}{cells}")


if __name__ == "__main__":
    main()
