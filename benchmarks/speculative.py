"""Speculative decoding on this machine: output tokens/s with and without drafts, measured
in the same run, and the drafts' acceptance.

Workloads:
- ``builtin``: the built-in model (tiny-code) completing prompts cut from real Python source
  (held-out stdlib files, which it never trained on), greedy; drafts from n-gram lookup and
  from the built-in draft (assets/tiny-code-draft).
- ``large``: a random Llama of --hidden × --layers (byte vocabulary, so text prompts work)
  with a draft made of its own first --draft-layers layers (same embeddings, norm and head:
  a draft that agrees with it often, as a trained draft would); n-gram and that draft.

Per batch size B, B prompts run to completion through ``LLM.generate``; tokens/s is the
output tokens over the wall time. At batch ≥ disable_by_batch_size (default 16) the engine
itself turns speculation off; ``--force-large-batch`` also measures it forced on, to show
why. Usage:

    python benchmarks/speculative.py [--workload builtin large] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from common import add_model_args, make_checkpoint

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


def run(path: str, spec: dict | None, prompts: list[str], args: argparse.Namespace) -> dict:
    from shardlm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(
        path,
        dtype="float32",
        device="cpu",
        speculative_config=spec,
        max_num_seqs=max(args.batches),
        enable_prefix_caching=False,
    ) as llm:
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


def draft_of_first_layers(target: str, out: str, layers: int) -> None:
    """The target cut to its first ``layers`` layers (embeddings, norm, head kept)."""
    from transformers import LlamaForCausalLM

    from shardlm.byte_tokenizer import build_byte_level_tokenizer

    model = LlamaForCausalLM.from_pretrained(target)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(out)
    build_byte_level_tokenizer(out)


def workloads(args: argparse.Namespace, tmp: str) -> dict[str, tuple[str, dict[str, dict]]]:
    from shardlm.demo import BUILTIN_DIR

    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4}
    ngram["prompt_lookup_min"] = args.lookup_min
    out = {}
    if "builtin" in args.workload:
        builtin = {"method": "draft_model", "model": "builtin", "num_speculative_tokens": args.k}
        out["builtin"] = (str(BUILTIN_DIR), {"ngram": ngram, "draft": builtin})
    if "large" in args.workload:
        target, draft = f"{tmp}/large", f"{tmp}/large-draft"
        make_checkpoint(target, args, byte_vocab=True, init_std=0.06)
        draft_of_first_layers(target, draft, args.draft_layers)
        model = {"method": "draft_model", "model": draft, "num_speculative_tokens": args.k}
        out["large"] = (target, {"ngram": ngram, "draft": model})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["builtin", "large"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-min", type=int, default=2, help="prompt_lookup_min")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-chars", type=int, default=600)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--force-large-batch", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_model_args(p, vocab=False)
    p.set_defaults(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, k = {args.k}, greedy")
    print("| workload | drafts | batch | tok/s off | tok/s on | speed-up | acceptance | tok/step |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, specs) in workloads(args, tmp).items():
            for batch in args.batches:
                prompts = code_prompts(batch, args.prompt_chars)
                off = run(path, None, prompts, args)
                for label, spec in specs.items():
                    variants = [(label, spec)]
                    if args.force_large_batch and batch >= 16:
                        variants.append(
                            (label + " (forced)", {**spec, "disable_by_batch_size": None})
                        )
                    for shown, s in variants:
                        on = run(path, s, prompts, args)
                        same = "" if on["ids"] == off["ids"] else " (tokens differ!)"
                        print(
                            f"| {name} | {shown} | {batch} | {off['tok_s']:.1f} | "
                            f"{on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.2f}×{same} | "
                            f"{on['acceptance']:.2f} | {on['per_step']:.2f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
