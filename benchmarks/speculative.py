"""Speculative decoding on this machine: output tokens/s with and without drafts, measured
in the same run, and the drafts' acceptance.

Workloads:
- ``builtin``: the built-in model (tiny-code) completing prompts cut from real Python source
  (held-out stdlib files, which it never trained on), greedy; drafts from n-gram lookup and
  from the built-in draft (assets/tiny-code-draft).
- ``large``: the built-in model inflated to --layers × --hidden (``inflate``: the same
  function, 16× the bytes per step, so decode is memory-bound as a real model's is), with
  the same prompts, n-gram and the built-in draft.

Per batch size B, max(B, 8) prompts run to completion through ``LLM.generate`` with at most
B running at once (batch 1: one after another); tokens/s is the output tokens over the wall
time. "same tokens": prompts whose greedy tokens equal those without speculation (in
float32 all must; in bfloat16 a step of k + 1 rows rounds differently from a step of one,
as any change of batch does, and a near-tie can flip). At batch ≥ disable_by_batch_size
(default 16) the engine itself turns speculation off; ``--force-large-batch`` also measures
it forced on, to show why. Usage:

    python benchmarks/speculative.py [--workload builtin large] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from common import add_model_args

SOURCES = ("textwrap.py", "heapq.py", "bisect.py", "shlex.py", "fnmatch.py", "colorsys.py")


def code_prompts(n: int, chars: int) -> list[str]:
    """``n`` prompts of about ``chars`` characters, each starting at a line of a held-out
    stdlib file (the built-in model never saw them), cycling through the files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text() for f in SOURCES]
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        lines = text.splitlines(keepends=True)
        start = (i // len(texts)) * 37 % max(1, len(lines) - 80) + 10
        prompt = ""
        for line in lines[start:]:
            if len(prompt) + len(line) > chars:
                break
            prompt += line
        out.append(prompt)
    return out


def run(
    path: str, spec: dict | None, prompts: list[str], batch: int, args: argparse.Namespace
) -> dict:
    from shardlm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(
        path,
        dtype=args.dtype,
        device=args.device,
        speculative_config=spec,
        max_num_seqs=batch,
        enable_prefix_caching=False,
    ) as llm:
        if args.verify_as_decode_rows:  # the Triton / CUDA-graph form, on PyTorch attention
            llm.engine.verify_as_chunks = False
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        before = llm.engine.stats
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = llm.engine.stats
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    drafted = stats.spec_draft_tokens - before.spec_draft_tokens
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    return dict(
        tok_s=tokens / seconds,
        acceptance=accepted / drafted if drafted else float("nan"),
        per_step=(tokens / (tokens - accepted)) if drafted else 1.0,
        ids=[o.outputs[0].token_ids for o in outs],
    )


def inflate(src: Path, out: str, args: argparse.Namespace) -> None:
    """The built-in model made --hidden wide and --layers deep without changing what it
    computes: its weights in the leading slices of zero matrices (the extra heads, MLP
    channels and layers contribute exact zeros to the residual stream), RMSNorm weights
    scaled by sqrt(old width / new width) since the padded dimensions (zeros) enter the
    norm's mean. Same tokens (up to the norm's epsilon), 16× the bytes per step: a target
    whose decode is memory-bound, with a draft that really agrees with it."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = small.config
    if args.heads * c.head_dim != args.hidden or args.heads % args.kv_heads:
        raise SystemExit("--heads × head_dim must equal --hidden, and --kv-heads divide --heads")
    if args.heads // args.kv_heads != c.num_attention_heads // c.num_key_value_heads:
        raise SystemExit("keep the built-in model's query heads per KV head")
    big_config = LlamaConfig(
        **{
            **c.to_dict(),
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads,
            "dtype": "float32",
        }
    )
    big = LlamaForCausalLM(big_config)
    scale = (c.hidden_size / args.hidden) ** 0.5
    old = small.state_dict()
    with torch.no_grad():
        for name, p in big.state_dict().items():
            p.zero_()
            if name not in old:
                continue  # a layer past the built-in model's: zero weights, an identity
            w = old[name]
            p[tuple(slice(0, n) for n in w.shape)] = w * (
                scale if name.endswith("norm.weight") else 1
            )
    big.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, out)


def workloads(args: argparse.Namespace, tmp: str) -> dict[str, tuple[str, dict[str, dict]]]:
    from shardlm.demo import BUILTIN_DIR

    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4}
    ngram["prompt_lookup_min"] = args.lookup_min
    out = {}
    if "builtin" in args.workload:
        builtin = {"method": "draft_model", "model": "builtin", "num_speculative_tokens": args.k}
        out["builtin"] = (str(BUILTIN_DIR), {"ngram": ngram, "draft": builtin})
    if "large" in args.workload:
        target = f"{tmp}/large"
        inflate(BUILTIN_DIR, target, args)
        builtin = {"method": "draft_model", "model": "builtin", "num_speculative_tokens": args.k}
        out["large"] = (target, {"ngram": ngram, "draft": builtin})
    return out


def row_cost(dtype: torch.dtype, rows: list[int], mib: int = 256) -> list[float]:
    """Time of one MLP up-projection (1024 → 5632, shardlm's split-K Linear) for x of each
    row count, cycling through enough weight copies to defeat the caches, as a decode step
    streams its weights; microseconds."""
    from shardlm.layers.linear import choose_splits, split_k_matmul

    k, n = 1024, 5632
    copies = max(2, mib * 2**20 // (k * n * torch.finfo(dtype).bits // 8))
    weights = [torch.randn(k, n).to(dtype) for _ in range(copies)]
    splits = choose_splits(k, torch.device("cpu"))
    out = []
    for r in rows:
        x = torch.randn(r, k).to(dtype)
        for w in weights:
            split_k_matmul(x, w, splits)
        start = time.perf_counter()
        for _ in range(3):
            for w in weights:
                split_k_matmul(x, w, splits)
        out.append((time.perf_counter() - start) / (3 * copies) * 1e6)
    return out


def print_row_cost(rows: list[int]) -> None:
    print("| dtype | " + " | ".join(f"{r} rows µs" for r in rows) + " | 5 rows / 1 row |")
    print("|---|" + "---|" * (len(rows) + 1))
    for dtype in (torch.float32, torch.bfloat16):
        t = row_cost(dtype, rows)
        ratio = t[rows.index(5)] / t[0] if 5 in rows else float("nan")
        print(f"| {str(dtype)[6:]} | " + " | ".join(f"{x:.0f}" for x in t) + f" | {ratio:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["builtin", "large"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-min", type=int, default=2, help="prompt_lookup_min")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-chars", type=int, default=600)
    p.add_argument("--force-large-batch", action="store_true")
    p.add_argument(
        "--verify-as-decode-rows",
        action="store_true",
        help="verify drafts as k + 1 single-query decode rows instead of one chunk",
    )
    p.add_argument(
        "--row-cost",
        action="store_true",
        help="only the cost of a matmul by rows of x (what verifying k drafts adds), then exit",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_model_args(p, vocab=False)
    p.set_defaults(hidden=1024, intermediate=2816, layers=8, heads=32, kv_heads=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.row_cost:
        print_row_cost([1, 2, 3, 5, 8, 16])
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, k = {args.k}, "
        f"prompt_lookup_min = {args.lookup_min}, greedy, {args.max_tokens} tokens per prompt"
    )
    print(
        "| workload | drafts | batch | tok/s off | tok/s on | speed-up | acceptance | "
        "tok/step | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, specs) in workloads(args, tmp).items():
            for batch in args.batches:
                prompts = code_prompts(max(batch, 8), args.prompt_chars)
                off = run(path, None, prompts, batch, args)
                for label, spec in specs.items():
                    variants = [(label, spec)]
                    if args.force_large_batch and batch >= 16:
                        variants.append(
                            (label + " (forced)", {**spec, "disable_by_batch_size": None})
                        )
                    for shown, s in variants:
                        on = run(path, s, prompts, batch, args)
                        same = sum(a == b for a, b in zip(on["ids"], off["ids"], strict=True))
                        print(
                            f"| {name} | {shown} | {batch} | {off['tok_s']:.1f} | "
                            f"{on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.2f}× | "
                            f"{on['acceptance']:.2f} | {on['per_step']:.2f} | "
                            f"{same}/{len(prompts)} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
