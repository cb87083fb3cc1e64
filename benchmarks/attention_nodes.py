"""Attention nodes on this machine: decode step time and per-node KV memory vs context length.

For each context length (``--contexts``), one request with a prompt of that many tokens is
prefilled and then decoded for ``--decode-steps`` steps; the median decode step time is
reported for the single-node engine (the peer: KV on the compute rank) and for β = 1, 2
attention nodes, in-process and distributed (one rank per node, gloo on loopback). Per-node
KV memory is what each node reports holding (tokens × bytes per token) at the end of the
prefill, and the bytes per decode step are the compute rank's counters. Usage:

    python benchmarks/attention_nodes.py [--contexts 1024 2048 ... 32768] [--decode-steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

CONFIGS = {
    "single node": {},
    "β=1 in-process": dict(attention_nodes=1, attention_transport="in-process"),
    "β=2 in-process": dict(attention_nodes=2, attention_transport="in-process"),
    "β=1 distributed": dict(attention_nodes=1),
    "β=2 distributed": dict(attention_nodes=2),
}


def make_checkpoint(path: str, args: argparse.Namespace) -> None:
    """A small Llama whose decode time at long contexts is mostly attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=4096,
        max_position_embeddings=max(args.contexts) + args.decode_steps + 8,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def add_node_model_args(p: argparse.ArgumentParser) -> None:
    """The flags ``make_checkpoint`` reads (with --contexts and --decode-steps), and the
    node and prefill chunk sizes."""
    p.add_argument("--kv-chunk-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1024, help="prefill tokens per step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)


def measure(path: str, engine_args: dict, args: argparse.Namespace) -> list[dict]:
    from shardlm import LLM, SamplingParams

    rows = []
    pool = max(args.contexts) + args.decode_steps + 16
    with LLM(
        path,
        device="cpu",
        skip_tokenizer_init=True,
        kv_cache_tokens=pool,  # per node with attention nodes: room for the longest context
        max_num_seqs=1,
        max_num_batched_tokens=args.chunk,
        kv_chunk_size=args.kv_chunk_size,
        **engine_args,
    ) as llm:
        engine = llm.engine
        per_token = engine.runner.kv_bytes_per_token()
        for n, context in enumerate(args.contexts):
            prompt = [(7 * i) % 4000 + 3 for i in range(context)]
            params = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 1)
            engine.add_request(str(n), prompt, params)
            times, node_mib, traffic = [], [], None
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                engine.step()
                elapsed = time.perf_counter() - start
                seq = engine.scheduler.running[0] if engine.scheduler.running else None
                if seq is not None and seq.num_output_tokens == 1 and not node_mib:
                    nodes = engine.attention_node_stats()
                    node_mib = [x.kv_tokens * per_token / 2**20 for x in nodes]
                elif seq is not None and seq.num_output_tokens > 1:
                    times.append(elapsed)
                    traffic = engine.attention_traffic
            rows.append(
                {
                    "context": context,
                    "ms": 1e3 * statistics.median(times),
                    "node_mib": node_mib or [context * per_token / 2**20],
                    "bytes": (
                        (traffic.last_step_bytes_to_nodes, traffic.last_step_bytes_from_nodes)
                        if traffic
                        else None
                    ),
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add_node_model_args(p)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args)
        results = {}
        for name in args.configs:
            start = time.perf_counter()
            results[name] = measure(path, CONFIGS[name], args)
            print(f"  measured {name} in {time.perf_counter() - start:.0f} s", flush=True)

    print(
        f"\nrandom Llama: hidden {args.hidden}, {args.layers} layers, {args.heads}q/"
        f"{args.kv_heads}kv heads, vocab 4096; float32, CPU ({torch.get_num_threads()} "
        f"threads), kv_chunk_size {args.kv_chunk_size}; median of {args.decode_steps} decode "
        "steps, batch 1"
    )
    names = list(results)
    peer = names[0]
    print("\ndecode step time, ms (× the first column)")
    print(f"{'context':>8}" + "".join(f"{n:>18}" for n in names))
    for i, context in enumerate(args.contexts):
        base = results[peer][i]["ms"]
        cells = "".join(
            f"{results[n][i]['ms']:>9.2f} ({results[n][i]['ms'] / base:4.2f}×)" for n in names
        )
        print(f"{context:>8}{cells}")
    print("\nKV held per node at the end of the prefill, MiB (all layers)")
    print(f"{'context':>8}" + "".join(f"{n:>18}" for n in names))
    for i, context in enumerate(args.contexts):
        cells = "".join(
            f"{' / '.join(f'{m:.1f}' for m in results[n][i]['node_mib']):>18}" for n in names
        )
        print(f"{context:>8}{cells}")
    print("\nbytes per decode step, compute rank → nodes / nodes → compute rank")
    print(f"{'context':>8}" + "".join(f"{n:>18}" for n in names[1:]))
    for i, context in enumerate(args.contexts):
        cells = "".join(
            f"{'{} / {}'.format(*results[n][i]['bytes']):>18}"
            if results[n][i]["bytes"]
            else f"{'-':>18}"
            for n in names[1:]
        )
        print(f"{context:>8}{cells}")


if __name__ == "__main__":
    main()
