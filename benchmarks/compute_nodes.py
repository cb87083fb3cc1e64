"""Figure 2's compute nodes on this machine: how the work divides, what moves, what it costs.

Three tables, each for α = 1, 2, 3 compute nodes sharing β attention nodes (distributed
transport: every compute and attention node a process of its own, gloo on loopback):

1. work per compute node in one mixed step (``--decodes`` running decodes plus a
   ``--chunk``-token prefill chunk), as the ranks count it: tokens and dense GFLOPs each;
2. bytes to and from the attention nodes per layer over a whole generation, against the
   formula of docs/architecture.md (every row's query to all β nodes, its K/V to its owner;
   out and a float32 lse back from every node);
3. the prefill time of one ``--prefill``-token prompt (time to first token), α = 1 against 2.

On a 2-core machine the processes share the cores, so (3) shows the cost of the exchange,
not the speed-up α nodes on α machines would give. Usage:

    python benchmarks/compute_nodes.py [--prefill 8192] [--attention-nodes 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import add_model_args, make_checkpoint


def engine_args(alpha: int, args: argparse.Namespace) -> dict:
    return dict(
        device="cpu",
        skip_tokenizer_init=True,
        compute_nodes=alpha,
        attention_nodes=args.attention_nodes,
        kv_cache_tokens=args.prefill + 256,
        max_num_batched_tokens=max(args.chunk + args.decodes, 2048),
    )


def work_per_node(path: str, alpha: int, args: argparse.Namespace) -> list:
    """The counters of the step that runs ``--decodes`` decodes and one prefill chunk."""
    from shardlm import LLM, SamplingParams

    with LLM(path, **engine_args(alpha, args)) as llm:
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        for i in range(args.decodes):
            engine.add_request(f"d{i}", [3 + i, 5, 7, 11], params)
        engine.step()  # their prefills
        engine.add_request("long", [(7 * i) % 4000 + 3 for i in range(args.chunk)], params)
        engine.step()  # decodes + the chunk
        return engine.compute_node_stats()


def bytes_per_layer(path: str, alpha: int, args: argparse.Namespace, config) -> tuple:
    """(measured bytes to nodes, formula, measured from nodes, formula) per layer."""
    from shardlm import LLM, SamplingParams

    with LLM(path, **engine_args(alpha, args)) as llm:
        prompts = [[(5 * i + j) % 4000 + 3 for i in range(40 + 30 * j)] for j in range(4)]
        llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
        stats = llm.engine.compute_node_stats()
        rows = llm.engine.stats.prefill_tokens + llm.engine.stats.decode_tokens
    layers, beta = config.num_hidden_layers, args.attention_nodes
    d = config.hidden_size // config.num_attention_heads
    hq, hkv, e = config.num_attention_heads, config.num_key_value_heads, 4
    to_nodes = sum(s.bytes_to_attention_nodes for s in stats) / layers
    from_nodes = sum(s.bytes_from_attention_nodes for s in stats) / layers
    return (
        to_nodes,
        rows * (beta * hq * d * e + 2 * hkv * d * e),
        from_nodes,
        rows * beta * hq * (d * e + 4),
    )


def prefill_seconds(path: str, alpha: int, args: argparse.Namespace) -> float:
    from shardlm import LLM, SamplingParams

    prompt = [(7 * i) % 4000 + 3 for i in range(args.prefill)]
    with LLM(path, **engine_args(alpha, args)) as llm:
        llm.generate([prompt[:64]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--attention-nodes", type=int, default=2)
    parser.add_argument("--decodes", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    add_model_args(parser)
    parser.set_defaults(layers=4, kv_heads=2, vocab=4096)  # the figures in docs/benchmarks.md
    args = parser.parse_args()
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args, max_positions=args.prefill + 64)
        config = AutoConfig.from_pretrained(path)
        beta = args.attention_nodes
        print(f"## 1. one step: {args.decodes} decodes + a {args.chunk}-token prefill chunk")
        print("| α | compute node | tokens | dense GFLOPs |")
        print("|---:|---:|---:|---:|")
        for alpha in args.alphas:
            for s in work_per_node(path, alpha, args):
                gflops = s.dense_flops_last_step / 1e9
                print(f"| {alpha} | {s.compute_node} | {s.tokens_last_step} | {gflops:.3f} |")
        print(f"\n## 2. bytes per layer to / from the β = {beta} attention nodes, whole run")
        print("| α | to nodes | formula | from nodes | formula |")
        print("|---:|---:|---:|---:|---:|")
        for alpha in args.alphas:
            to, to_f, back, back_f = bytes_per_layer(path, alpha, args, config)
            print(f"| {alpha} | {to:,.0f} | {to_f:,} | {back:,.0f} | {back_f:,} |")
        print(f"\n## 3. prefill of a {args.prefill}-token prompt (median of {args.repeats})")
        print("| α | seconds | ratio to α = 1 |")
        print("|---:|---:|---:|")
        base = None
        for alpha in [a for a in args.alphas if a <= 2]:
            t = prefill_seconds(path, alpha, args)
            base = base or t
            print(f"| {alpha} | {t:.2f} | {base / t:.2f}× |")


if __name__ == "__main__":
    main()
