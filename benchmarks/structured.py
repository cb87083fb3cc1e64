"""What structured outputs cost: decode tokens/s with and without a JSON schema, and the
grammar's compile time.

Each row runs the same prompts for the same number of tokens twice: free (ignore_eos), and
constrained by a schema that cannot close within max_tokens (an array of at least 100
records), so both runs take exactly the same steps at the same batch size and the difference
is the grammar's work (each row's bitmask filled by its matcher on the CPU, copied to the
device and applied, then each token accepted). Greedy; the two alternate, best of --repeats.
Models: the built-in tiny-code (5.6M, vocabulary 4,096) and, with --random-model, a ~124M
random Llama whose 32,000-wide LM head is wider than the tiny-code tokenizer it is given (the
mask's padding ids). Usage:

    python benchmarks/structured.py [--device cpu] [--batch-sizes 1,32] [--random-model]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import make_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
                    "name": {"type": "string", "maxLength": 16},
                    "kind": {"enum": ["module", "class", "function"]},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "name", "kind", "ok"],
            },
        }
    },
    "required": ["records"],
}
PROMPT = "def load(path):\n    return "


def random_model(root: str) -> str:
    """A ~124M Llama (hidden 768, 12 layers, vocabulary 32,000) with the tiny-code tokenizer."""
    from shardlm.demo import demo_checkpoint

    shape = argparse.Namespace(
        hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000
    )
    path = str(Path(root) / "random-124m")
    make_checkpoint(path, shape, init_std=0.05)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_checkpoint() / name, Path(path) / name)
    return path


def decode_rates(llm, batch: int, max_tokens: int, repeats: int) -> tuple[float, float]:
    """Generated tokens/s (free, with the schema) for ``batch`` prompts of ``max_tokens``
    tokens each: the two alternate, best run of each (a busy machine slows some runs)."""
    from shardlm import SamplingParams, StructuredOutputs

    free = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    schema = SamplingParams(
        temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputs(json=SCHEMA)
    )
    prompts = [PROMPT + " " * (i % 4) for i in range(batch)]
    best = [0.0, 0.0]
    for _ in range(repeats):
        for k, params in enumerate((free, schema)):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == batch * max_tokens, "a run ended early: the schema must not close"
            best[k] = max(best[k], tokens / elapsed)
    return best[0], best[1]


def mask_ms(llm, batch: int, repeats: int = 50) -> float:
    """Milliseconds per step of the sampler's grammar call alone (fill + copy + apply)."""
    from shardlm import StructuredOutputs
    from shardlm.structured.masks import apply_grammar_masks

    cache = llm.engine.grammars
    states = [cache.state(StructuredOutputs(json=SCHEMA)) for _ in range(batch)]
    prefix = llm.engine.tokenizer.encode('{"records": [{"id": 1', add_special_tokens=False)
    for s in states:
        s.future.result()
        for t in prefix:
            s.accept(t)
    logits = torch.randn(batch, llm.engine.config.vocab_size, device=llm.engine.device)
    apply_grammar_masks(logits, states)
    if logits.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        apply_grammar_masks(logits, states)
    if logits.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def compile_ms(llm) -> tuple[float, float, float]:
    """(TokenizerInfo build, cold compile, cached lookup) in ms, on a fresh cache."""
    from shardlm import StructuredOutputs
    from shardlm.structured.compiler import GrammarCache
    from shardlm.structured.tokenizer_info import build_tokenizer_info

    e = llm.engine
    start = time.perf_counter()
    build_tokenizer_info(e.tokenizer, e.config.vocab_size, e.eos_token_ids)
    info = time.perf_counter() - start
    cache = GrammarCache(e.tokenizer, e.config.vocab_size, e.eos_token_ids)
    cache.compile(StructuredOutputs(regex="warm"))  # the TokenizerInfo, outside the timing
    start = time.perf_counter()
    cache.compile(StructuredOutputs(json=SCHEMA))
    cold = time.perf_counter() - start
    start = time.perf_counter()
    cache.compile(StructuredOutputs(json=SCHEMA))
    cached = time.perf_counter() - start
    cache.shutdown()
    return info * 1e3, cold * 1e3, cached * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random-model", action="store_true", help="also the ~124M model")
    args = parser.parse_args()
    try:
        start = time.perf_counter()
        import xgrammar  # noqa: F401
    except ImportError:
        print("xgrammar is not installed (pip install 'shardlm[structured]'): skipped")
        return 0
    import_s = time.perf_counter() - start

    from shardlm import LLM
    from shardlm.demo import demo_checkpoint

    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = [("tiny-code 5.6M", str(demo_checkpoint()))]
        if args.random_model:
            models.append(("random 124M", random_model(tmp)))
        rows, compiles = [], []
        for name, path in models:
            with LLM(path, dtype=args.dtype, device=args.device, kv_cache_tokens=16384) as llm:
                vocab = llm.engine.config.vocab_size
                compiles.append((name, vocab, *compile_ms(llm)))
                decode_rates(llm, 2, 4, 1)  # warm-up: the grammar compiled and cached
                for b in batches:
                    free, json_rate = decode_rates(llm, b, args.max_tokens, args.repeats)
                    rows.append((name, b, free, json_rate, mask_ms(llm, b)))
                    print(f"  {name} batch {b}: {free:.0f} / {json_rate:.0f} tok/s", flush=True)

    setup = f"{args.device}, {args.dtype}, {args.max_tokens} tokens a sequence"
    print(f"\nstructured decoding, {setup}")
    print(f"xgrammar import: {import_s:.2f} s (once per process, on the first grammar)\n")
    print("| model | batch | free tok/s | JSON schema tok/s | schema / free | mask ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, b, free, rate, mask in rows:
        print(f"| {name} | {b} | {free:.0f} | {rate:.0f} | {rate / free:.2f} | {mask:.2f} |")
    print("\n| model | vocabulary | TokenizerInfo ms | schema compile ms (cold) | cached ms |")
    print("|---|---:|---:|---:|---:|")
    for name, vocab, info, cold, cached in compiles:
        print(f"| {name} | {vocab} | {info:.1f} | {cold:.1f} | {cached:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
