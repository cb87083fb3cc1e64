"""Batch-1 decode speed: shardlm vs Hugging Face transformers on the same checkpoint.

Builds a random Llama-shaped checkpoint (default ~58M parameters, float32) with transformers'
save_pretrained, then times greedy generation of the same prompt in both engines in one run.
Prints a table and the ratio. Usage:

    python benchmarks/decode_vs_hf.py [--new-tokens 128] [--prompt-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from common import add_model_args, make_checkpoint, print_profile


def read_bandwidth() -> float:
    """Bytes/s of streaming a 512 MiB tensor (a sum): what a decode step's weight reads can hope
    for on this machine."""
    a = torch.ones(128 * 2**20)
    for _ in range(2):
        a.sum()
    start = time.perf_counter()
    for _ in range(5):
        a.sum()
    return a.nbytes * 5 / (time.perf_counter() - start)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    add_model_args(p)
    p.add_argument("--profile", action="store_true", help="also profile one shardlm run")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from shardlm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as path:
        n_params = make_checkpoint(path, args)
        prompt = torch.randint(
            0, args.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)
        ).tolist()
        n = args.new_tokens

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf_input = torch.tensor([prompt])

        def run_hf() -> list[int]:
            with torch.inference_mode():
                out = hf.generate(hf_input, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, len(prompt) :].tolist()

        llm = LLM(path, dtype="float32", device="cpu", skip_tokenizer_init=True)
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

        def run_ours() -> list[int]:
            return llm.generate([prompt], params)[0].outputs[0].token_ids

        same = run_hf() == run_ours()
        t_hf = time_it(run_hf, args.repeats)
        t_ours = time_it(run_ours, args.repeats)
        if args.profile:
            print_profile(run_ours)

    weight_bytes = n_params * 4
    bandwidth = read_bandwidth()
    roofline = bandwidth / weight_bytes
    print(
        f"model: {n_params / 1e6:.1f}M parameters, float32 ({weight_bytes / 2**20:.0f} MiB); "
        f"prompt {args.prompt_tokens} tokens, {n} new tokens, batch 1, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        f"roofline: {bandwidth / 1e9:.1f} GB/s read bandwidth / weight bytes = "
        f"{roofline:.0f} tokens/s"
    )
    print(f"{'engine':<14}{'seconds':>10}{'tokens/s':>12}{'% roofline':>12}")
    for name, t in (("transformers", t_hf), ("shardlm", t_ours)):
        print(f"{name:<14}{t:>10.3f}{n / t:>12.1f}{100 * n / t / roofline:>11.0f}%")
    print(f"ratio shardlm / transformers: {t_hf / t_ours:.2f}x   (greedy tokens identical: {same})")


if __name__ == "__main__":
    main()
