"""ARM's Hadamard over the full MLP width against the block-diagonal one it replaced: int8
accuracy with planted outliers, and the online transform's cost per call.

The checkpoint is arm_quant.py's (random Llama, ``--outliers`` channels of every layer's
down-projection input planted at 50–100×, calibrated on argparse.py). Its default MLP width,
1536 = 12·128, gets the full-width H_12 ⊗ H_128; the block-diagonal rows force the previous
transform (blocks of the largest power of two dividing the width, 512 here) by replacing the
plan ARM asks for. Prints, per configuration, the MLP output error against float32 (mean over
layers, all MLPs fed the same inputs) and the share of float32 greedy tokens predicted
(teacher-forced); then µs per call of both transforms at ``--time-widths``. Usage:

    python benchmarks/arm_hadamard_width.py [--outliers 4] [--time-widths 1536,11008,14336]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch

from arm_quant import calibrate_and_reference, make_outlier_checkpoint
from common import add_model_args, per_call_us

CONFIGS: dict[str, tuple[dict, bool]] = {  # name → (engine kwargs, block-diagonal H)
    "int8 down": (dict(quantization="int8"), False),
    "int8 + hadamard, block-diagonal": (dict(quantization="int8", arm="hadamard"), True),
    "int8 + hadamard, full width": (dict(quantization="int8", arm="hadamard"), False),
    "int8 + both, block-diagonal": (dict(quantization="int8", arm="both"), True),
    "int8 + both, full width": (dict(quantization="int8", arm="both"), False),
}


def block_diagonal(n: int):
    """The transform before full-width plans: Sylvester blocks of the largest power of two."""
    from shardlm.layers.hadamard import HadamardPlan

    return HadamardPlan(1, n & -n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--outliers", type=int, default=4, help="planted channels per layer")
    p.add_argument("--init-std", type=float, default=0.04)
    p.add_argument("--positions", type=int, default=64, help="greedy tokens compared")
    p.add_argument("--time-widths", default="1536,11008,14336")
    p.add_argument("--time-rows", default="1,64")
    add_model_args(p, vocab=False)
    args = p.parse_args()

    from shardlm import LLM
    from shardlm.layers import arm
    from shardlm.layers.hadamard import hadamard_layout, hadamard_transform
    from shardlm.quality import mlp_output_errors, token_agreement

    work = Path(tempfile.mkdtemp())
    try:
        make_outlier_checkpoint(work, args)
        with LLM(work, dtype="float32", enable_prefix_caching=False) as base:
            tokens, prompt, target, inputs = calibrate_and_reference(base, work, args.positions)
            rows = []
            for name, (kwargs, blocks) in CONFIGS.items():
                plan = block_diagonal if blocks else hadamard_layout
                with mock.patch.object(arm, "hadamard_layout", plan):
                    llm = LLM(work, dtype="float32", **kwargs)
                with llm:
                    h = llm.runner.model.layers[0].mlp.hadamard
                    errors = mlp_output_errors(base, llm, inputs)
                    agree = token_agreement(llm, prompt, target)
                    rows.append((name, str(h or "-"), statistics.mean(errors), agree))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nrandom Llama (hidden {args.hidden}, MLP width {args.intermediate}, {args.layers} "
        f"layers); {args.outliers} outlier channels/layer at 50–100×; calibration {tokens} "
        f"tokens; prompt {len(prompt)} tokens"
    )
    print(f"{'configuration':34}{'H':>8}{'MLP err':>10}{'agree':>8}")
    for name, h, err, agree in rows:
        print(f"{name:34}{h:>8}{err:10.4f}{agree:8.3f}")

    print(f"\n{'width':>6}{'rows':>6}{'plan':>10}{'full µs':>9}{'blocks':>8}{'blocks µs':>11}")
    for n in (int(w) for w in args.time_widths.split(",")):
        full, blocks = hadamard_layout(n), block_diagonal(n)
        for r in (int(v) for v in args.time_rows.split(",")):
            x = torch.randn(r, n)
            t_full = per_call_us(lambda x=x, pl=full: hadamard_transform(x, pl))
            t_blocks = per_call_us(lambda x=x, pl=blocks: hadamard_transform(x, pl))
            print(f"{n:6d}{r:6d}{full!s:>10}{t_full:9.1f}{blocks.block:8d}{t_blocks:11.1f}")


if __name__ == "__main__":
    main()
