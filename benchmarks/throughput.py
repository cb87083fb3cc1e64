"""Offline throughput: many requests through shardlm's engine vs transformers' batched generate.

64 requests (seeded) with prompt lengths in [32, 512] and output lengths in [32, 256], on a
random Llama-shaped checkpoint made with save_pretrained. shardlm gets every request at once
(continuous batching, each stops at its own max_tokens); transformers runs them as one padded
batch (left padding), generating the longest requested output for all. Throughput counts the
requested output tokens only, for both. Usage:

    python benchmarks/throughput.py [--num-requests 64] [--hf-batch 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from common import add_model_args, make_checkpoint, print_profile


def run_hf(
    path: str, prompts: list[list[int]], outputs: list[int], batch: int, dtype: str
) -> float:
    """Padded batches in arrival order; each batch generates its longest requested output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk, outs = prompts[i : i + batch], outputs[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(outs),
                do_sample=False,
                pad_token_id=0,
            )
    return time.perf_counter() - start


def run_shardlm(
    path: str, prompts: list[list[int]], outputs: list[int], dtype: str, profile: bool = False
) -> tuple[float, dict]:
    from shardlm import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, device="cpu", skip_tokenizer_init=True)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outputs]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    before = llm.engine.stats
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == outputs
    after = llm.engine.stats
    stats = {
        "prefill": after.prefill_tokens - before.prefill_tokens,
        "decode": after.decode_tokens - before.decode_tokens,
        "preemptions": after.preemptions - before.preemptions,
        "blocks": after.num_blocks,
    }
    if profile:
        print_profile(lambda: llm.generate(prompts, params, use_tqdm=False))
    return seconds, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=64, help="transformers batch size")
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-output", type=int, default=32)
    p.add_argument("--max-output", type=int, default=256)
    add_model_args(p)
    p.add_argument("--profile", action="store_true", help="also profile one shardlm run")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, args.vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        for _ in range(args.num_requests)
    ]
    outputs = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_requests)]
    useful = sum(outputs)

    with tempfile.TemporaryDirectory() as path:
        n_params = make_checkpoint(path, args)
        t_ours, stats = run_shardlm(path, prompts, outputs, args.dtype, args.profile)
        t_hf = None if args.skip_hf else run_hf(path, prompts, outputs, args.hf_batch, args.dtype)

    print(
        f"model: {n_params / 1e6:.1f}M parameters, {args.dtype}; {args.num_requests} requests, "
        f"prompts {args.min_prompt}-{args.max_prompt} tokens ({sum(map(len, prompts))} total), "
        f"outputs {args.min_output}-{args.max_output} ({useful} total); "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'engine':<28}{'seconds':>10}{'output tok/s':>14}")
    if t_hf is not None:
        print(f"{f'transformers (batch {args.hf_batch})':<28}{t_hf:>10.2f}{useful / t_hf:>14.1f}")
    print(f"{'shardlm':<28}{t_ours:>10.2f}{useful / t_ours:>14.1f}")
    print(
        f"shardlm engine: {stats['prefill']} prefill + {stats['decode']} decode tokens, "
        f"{stats['preemptions']} preemptions, {stats['blocks']} KV blocks"
    )
    if t_hf is not None:
        print(f"ratio shardlm / transformers: {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
