"""ARM and W8A8 quantization: accuracy, weight memory and decode speed, each configuration
against float32 measured in the same run.

Builds a random Llama-shaped checkpoint (byte-level tokenizer) with ``--outliers`` channels
of every layer's down-projection input planted at 50–100× (rows of up_proj scaled, as real
Llama checkpoints have), calibrates it on a stdlib source file, then for each configuration
prints: weight MiB of the model, the MLP output error against float32 (mean over layers, all
MLPs fed the same inputs), the share of 64 float32 greedy tokens it also predicts
(teacher-forced), and batch-1 decode tokens/s. Usage:

    python benchmarks/arm_quant.py [--outliers 4] [--keep DIR] [model shape flags]

``--keep DIR`` saves the calibrated checkpoint there (for ``shardlm inspect``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common import add_model_args, make_checkpoint

CONFIGS: dict[str, dict] = {
    "float32": {},
    "bfloat16": dict(dtype="bfloat16"),
    "int8 down": dict(quantization="int8"),
    "int8 down + arm=hadamard": dict(quantization="int8", arm="hadamard"),
    "int8 down + arm=smooth": dict(quantization="int8", arm="smooth"),
    "int8 down + arm=both": dict(quantization="int8", arm="both"),
    "fp8 down (emulated on CPU)": dict(quantization="fp8"),
    "fp8 down + arm=both": dict(quantization="fp8", arm="both"),
    "int8 all linears": dict(quantization="int8", quantize_all_linears=True),
    "int8 all linears + arm=both": dict(quantization="int8", quantize_all_linears=True, arm="both"),
}


def make_outlier_checkpoint(path: Path, args: argparse.Namespace) -> None:
    def plant(model, g: torch.Generator) -> None:  # rows of up_proj × 50–100: outliers of h
        with torch.no_grad():
            for layer in model.model.layers:
                chosen = torch.randperm(args.intermediate, generator=g)[: args.outliers]
                factors = 50 + 50 * torch.rand(args.outliers, generator=g)
                layer.mlp.up_proj.weight[chosen] *= factors[:, None]

    make_checkpoint(str(path), args, byte_vocab=True, init_std=args.init_std, edit=plant)


def decode_rate(llm, prompt_ids: list[int], new_tokens: int, repeats: int) -> float:
    from shardlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt_ids, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompt_ids, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def calibrate_and_reference(
    base, work: Path, positions: int, prompt_texts: Sequence[str] | None = None
) -> tuple:
    """Calibrate ``base`` (the float32 model of the checkpoint in ``work``) on a stdlib module
    and save the statistics beside it; then the reference the configurations are compared
    with: (calibration tokens, prompt ids, float32 greedy tokens) — prompt ids and greedy
    tokens as lists, one per text of ``prompt_texts`` (default: textwrap.py's first 400
    characters)."""
    from shardlm.calibration import CALIBRATION_FILE, save_calibration, token_windows
    from shardlm.entrypoints.arm_tools import collect_absmax
    from shardlm.quality import greedy_tokens

    data = Path(argparse.__file__).read_text()  # calibration text: a stdlib module
    windows = token_windows(base.tokenizer.encode(data), 512, 32)
    tables, tokens = collect_absmax(base, windows)
    save_calibration(work / CALIBRATION_FILE, tables, {"tokens": tokens})
    if prompt_texts is None:
        prompt_texts = [textwrap.dedent(Path(textwrap.__file__).read_text()[:400])]
    prompts = [base.encode_prompt(text) for text in prompt_texts]
    targets = [greedy_tokens(base, prompt, positions) for prompt in prompts]
    return tokens, prompts, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--outliers", type=int, default=4, help="planted channels per layer")
    p.add_argument("--init-std", type=float, default=0.04)
    p.add_argument("--positions", type=int, default=64, help="greedy tokens compared")
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", default=None, help="save the calibrated checkpoint here")
    add_model_args(p, vocab=False)  # the byte tokenizer fixes the vocabulary
    args = p.parse_args()

    from shardlm import LLM
    from shardlm.quality import mlp_inputs, mlp_output_errors, token_agreement

    work = Path(tempfile.mkdtemp())
    try:
        make_outlier_checkpoint(work, args)
        with LLM(work, dtype="float32", enable_prefix_caching=False) as base:
            tokens, prompts, targets = calibrate_and_reference(base, work, args.positions)
            prompt, target = prompts[0], targets[0]
            inputs = mlp_inputs(base, prompt)
            rows = []
            for name, kwargs in CONFIGS.items():
                kwargs = {"dtype": "float32", **kwargs}
                with LLM(work, **kwargs) as llm:
                    errors = mlp_output_errors(base, llm, inputs)
                    rows.append(
                        (
                            name,
                            llm.engine.rank_weight_bytes[0] / 2**20,
                            statistics.mean(errors),
                            token_agreement(llm, prompt, target),
                            decode_rate(llm, prompt, args.new_tokens, args.repeats),
                        )
                    )
        shape = (
            f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
            f"{args.heads}/{args.kv_heads} heads, byte vocabulary"
        )
        print(f"\nrandom Llama ({shape}); {args.outliers} outlier channels/layer at 50–100×")
        print(f"calibration: {tokens} tokens of argparse.py; prompt: {len(prompt)} tokens")
        header = f"{'configuration':30}{'weights MiB':>12}{'MLP err':>10}{'agree':>8}"
        print(header + f"{'tok/s':>9}{'vs fp32':>9}")
        base_rate = rows[0][4]
        for name, mib, err, agree, rate in rows:
            print(f"{name:30}{mib:12.1f}{err:10.4f}{agree:8.3f}{rate:9.1f}{rate / base_rate:8.2f}×")
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
            print(f"calibrated checkpoint saved to {args.keep}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
