"""ARM's Hadamard over the full MLP width against the block-diagonal one it replaced: int8
accuracy with planted outliers, and the online transform's cost per call.

Two checkpoints. The default is arm_quant.py's (random Llama, ``--outliers`` channels of every
layer's down-projection input planted at 50–100× by scaling rows of up_proj, calibrated on
argparse.py); ``--intermediate`` sets its MLP width (1536 = 12·128 by default). ``--builtin``
plants the outliers into the trained built-in model instead (MLP width 768 = 3·256) and keeps
its function: row j of up_proj × f, column j of down_proj ÷ f, so float32 computes the same
model and only the quantized engines feel the outliers.

The block-diagonal rows force the previous transform (blocks of the largest power of two
dividing the width) by replacing the plan ARM asks for. Prints, per configuration, the MLP
output error against float32 (mean over layers, all MLPs fed the same inputs), the share of
float32's greedy tokens predicted teacher-forced, pooled over ``--prompts`` prompts of
``--positions`` tokens, with a 95% Wilson interval (positions of one prompt are not
independent, so read it as a lower bound on the noise), and the share generated free-running.
A bfloat16 row (no int8) shows how far rounding every layer alone moves the checkpoint's
tokens. Then, for both plans, the MLP error with only the rotated activation or only the
rotated weight in int8 (which side the remaining error comes from), and µs per call of both
transforms at ``--time-widths``. Usage:

    python benchmarks/arm_hadamard_width.py [--intermediate 1536] [--prompts 4] [--positions 128]
    python benchmarks/arm_hadamard_width.py --builtin --positions 200 --time-widths 768
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import statistics
import tempfile
import textwrap
from pathlib import Path
from unittest import mock

import torch

from arm_quant import calibrate_and_reference, make_outlier_checkpoint
from common import add_model_args, per_call_us
from kv_quant import ACCURACY_PROMPTS

CONFIGS: dict[str, tuple[dict, bool]] = {  # name → (engine kwargs, block-diagonal H)
    # Not int8 at all: how far rounding every layer to bfloat16 moves this checkpoint's greedy
    # tokens (a random model's top logits are close): a reference for the agreement column.
    "bfloat16, no int8": (dict(dtype="bfloat16"), False),
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


# Prompts for the random checkpoint (byte tokenizer): the opening of stdlib modules.
PROMPT_MODULES = ("textwrap", "string", "csv", "json.decoder", "shlex", "fnmatch", "heapq")


def stdlib_prompts(count: int) -> list[str]:
    if not 1 <= count <= len(PROMPT_MODULES):
        raise SystemExit(f"--prompts must be in 1..{len(PROMPT_MODULES)}, got {count}")
    modules = (importlib.import_module(name) for name in PROMPT_MODULES[:count])
    return [textwrap.dedent(Path(m.__file__).read_text()[:400]) for m in modules]


def builtin_outlier_checkpoint(path: Path, outliers: int) -> None:
    """The built-in model in float32 with ``outliers`` channels per layer of the down
    projection's input scaled by 50–100× and the matching down_proj columns divided by the
    same factor: h_j·f times W[:, j]/f is the same product, so the float model is unchanged."""
    from safetensors.torch import load_file, save_file

    from shardlm.calibration import CALIBRATION_FILE
    from shardlm.demo import demo_checkpoint

    source = demo_checkpoint()
    for f in source.iterdir():
        if f.name not in ("model.safetensors", CALIBRATION_FILE):
            shutil.copy(f, path / f.name)
    state = {k: v.float() for k, v in load_file(source / "model.safetensors").items()}
    g = torch.Generator().manual_seed(1)
    layer = 0
    while f"model.layers.{layer}.mlp.up_proj.weight" in state:
        up = state[f"model.layers.{layer}.mlp.up_proj.weight"]  # [width, hidden]
        down = state[f"model.layers.{layer}.mlp.down_proj.weight"]  # [hidden, width]
        chosen = torch.randperm(up.shape[0], generator=g)[:outliers]
        factors = 50 + 50 * torch.rand(outliers, generator=g)
        up[chosen] *= factors[:, None]
        down[:, chosen] /= factors[None, :]
        layer += 1
    save_file(state, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share hits/n."""
    p, zz = hits / n, z * z / n
    centre, half = (p + zz / 2) / (1 + zz), z * math.sqrt(p * (1 - p) / n + zz / (4 * n)) / (1 + zz)
    return centre - half, centre + half


def agreement(llm, prompts: list[list[int]], targets: list[list[int]]) -> tuple[int, int, int]:
    """(teacher-forced hits, free-running hits, positions) pooled over the prompts."""
    from shardlm.quality import greedy_tokens, token_agreement

    forced = free = total = 0
    for prompt, target in zip(prompts, targets, strict=True):
        forced += round(token_agreement(llm, prompt, target) * len(target))
        free += sum(
            a == b for a, b in zip(greedy_tokens(llm, prompt, len(target)), target, strict=True)
        )
        total += len(target)
    return forced, free, total


@torch.inference_mode()
def error_split(base, inputs: list[torch.Tensor], plan) -> tuple[float, float]:
    """Where int8 + Hadamard loses accuracy: the MLP output error (mean over layers) with only
    the rotated activation quantized, and with only the rotated weight (W' = Hᵀ·W), per-token
    and per-output-channel scales as quantization="int8" uses; float32 otherwise."""
    from shardlm.layers.hadamard import hadamard_transform
    from shardlm.layers.quant import quantize_int8

    act, weight = [], []
    for x, layer in zip(inputs, base.runner.model.layers, strict=True):
        mlp = layer.mlp
        gate, up = mlp.gate_up_proj(x).float().chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        w = mlp.down_proj.weight_t.float()  # [in, out]
        want = h @ w
        h_rot, w_rot = hadamard_transform(h, plan), hadamard_transform(w.t(), plan).t()
        q, s = quantize_int8(h_rot, dim=-1)
        act.append(float(((q.float() * s) @ w_rot - want).norm() / want.norm()))
        q, s = quantize_int8(w_rot, dim=0)
        weight.append(float((h_rot @ (q.float() * s) - want).norm() / want.norm()))
    return statistics.mean(act), statistics.mean(weight)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--outliers", type=int, default=4, help="planted channels per layer")
    p.add_argument("--init-std", type=float, default=0.04)
    p.add_argument("--builtin", action="store_true", help="plant into the built-in model")
    p.add_argument("--prompts", type=int, default=4, help="prompts (random checkpoint)")
    p.add_argument("--positions", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--time-widths", default="1536,11008,14336")
    p.add_argument("--time-rows", default="1,64")
    add_model_args(p, vocab=False)
    args = p.parse_args()

    from shardlm import LLM
    from shardlm.layers import arm
    from shardlm.layers.hadamard import hadamard_layout, hadamard_transform
    from shardlm.quality import mlp_inputs, mlp_output_errors

    work = Path(tempfile.mkdtemp())
    try:
        if args.builtin:
            builtin_outlier_checkpoint(work, args.outliers)
            texts = list(ACCURACY_PROMPTS)
        else:
            make_outlier_checkpoint(work, args)
            texts = stdlib_prompts(args.prompts)
        with LLM(work, dtype="float32", enable_prefix_caching=False) as base:
            tokens, prompts, targets = calibrate_and_reference(base, work, args.positions, texts)
            # MLP inputs over a whole reference sequence (prompt and continuation).
            inputs = mlp_inputs(base, prompts[0] + targets[0])
            width = base.runner.model.config.intermediate_size
            split = {
                kind: error_split(base, inputs, plan(width))
                for kind, plan in (
                    ("full width", hadamard_layout),
                    ("block-diagonal", block_diagonal),
                )
            }
            rows = []
            for name, (kwargs, blocks) in CONFIGS.items():
                plan = block_diagonal if blocks else hadamard_layout
                with mock.patch.object(arm, "hadamard_layout", plan):
                    llm = LLM(
                        work, **{"dtype": "float32", "enable_prefix_caching": False, **kwargs}
                    )
                with llm:
                    h = llm.runner.model.layers[0].mlp.hadamard
                    errors = mlp_output_errors(base, llm, inputs)
                    rows.append(
                        (
                            name,
                            str(h or "-"),
                            statistics.mean(errors),
                            *agreement(llm, prompts, targets),
                        )
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model = "built-in model (trained)" if args.builtin else f"random Llama (hidden {args.hidden}"
    model += f", MLP width {width}" + ("" if args.builtin else f", {args.layers} layers)")
    print(
        f"\n{model}; {args.outliers} outlier channels/layer at 50–100×; calibration {tokens} "
        f"tokens; {len(prompts)} prompts × {args.positions} greedy tokens"
    )
    print(
        f"{'configuration':34}{'H':>8}{'MLP err':>10}{'forced':>8}{'95% interval':>15}{'free':>7}"
    )
    for name, h, err, forced, free, n in rows:
        lo, hi = wilson(forced, n)
        print(f"{name:34}{h:>8}{err:10.4f}{forced / n:8.3f}   {lo:.3f}–{hi:.3f}{free / n:7.3f}")

    print("\nint8 + hadamard, MLP error with one side quantized (float32 otherwise):")
    for kind, (act, weight) in split.items():
        print(f"  {kind:16} activation only {act:.4f}   weight only {weight:.4f}")

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
