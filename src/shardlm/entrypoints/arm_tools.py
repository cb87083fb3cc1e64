"""``shardlm calibrate`` and ``shardlm inspect``: the ARM's statistics and its figure.

Both load the checkpoint unmodified (one process; float32, or calibrate's --dtype) and watch
the down-projection inputs through forward hooks (calibration.down_proj_inputs); calibrate
also watches each attention's k and v (calibration.attention_kv), for the fp8 KV cache's
scales. ``inspect``
computes the after-ARM activations by applying the layer's transform T = diag(s)·H to the
captured ones: the same T the engine folds into the weights when ``arm`` is set.

Without --model both use the built-in model. calibrate never writes inside the installed
package: the built-in model's (or a read-only checkpoint's) calibration goes to a per-user
directory, where ``arm="smooth"|"both"`` and ``inspect`` look first (calibration.py).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError

from shardlm.cache.kv_quant import FP8_MAX, FP8_SCALE_MARGIN
from shardlm.calibration import (
    CALIBRATION_FILE,
    PACKAGE_DIR,
    AbsMaxRecorder,
    DistributionStats,
    KVAbsMaxRecorder,
    attention_kv,
    calibration_candidates,
    calibration_out_path,
    distribution_stats,
    down_proj_inputs,
    find_calibration,
    inside_package,
    load_calibration,
    save_calibration,
    token_windows,
)
from shardlm.errors import ShardlmError
from shardlm.layers.arm import ARM_MODES, uses_smoothing
from shardlm.models.transforms import layer_arm

MODEL_HELP = "Hugging Face checkpoint directory (default: the built-in model, tiny-code)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="record per-channel max |x| of each down-projection input (for arm=smooth|both) "
        "and max |k|, |v| of each layer (for kv_cache_dtype=fp8)",
    )
    cal.add_argument("--model", help=MODEL_HELP)
    cal.add_argument("--data", required=True, help="a UTF-8 text file to run through the model")
    cal.add_argument(
        "--samples", type=int, default=128, help="windows of text to use (default 128)"
    )
    cal.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    cal.add_argument(
        "--out",
        default=None,
        help=f"where to write (default: MODEL/{CALIBRATION_FILE}, or a per-user cache "
        "directory for the built-in model and checkpoints whose directory is read-only)",
    )
    cal.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    cal.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    cal.set_defaults(func=cmd_calibrate)

    ins = sub.add_parser(
        "inspect",
        help="histograms and statistics of one layer's down-projection input, before/after ARM",
    )
    ins.add_argument("--model", help=MODEL_HELP)
    ins.add_argument("--layer", type=int, required=True, help="decoder layer index (from 0)")
    ins.add_argument("--prompt", required=True, help="text whose tokens are measured")
    ins.add_argument(
        "--arm",
        default=None,
        choices=[m for m in ARM_MODES if m != "none"],
        help="transform to show (default: both if the checkpoint is calibrated, else hadamard)",
    )
    ins.add_argument(
        "--arm-calibration",
        default=None,
        help="default: the per-user calibration of MODEL if there is one (see calibrate), "
        f"else MODEL/{CALIBRATION_FILE}",
    )
    ins.add_argument("--out", default=None, help="write the two histograms here (PNG; matplotlib)")
    ins.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ins.set_defaults(func=cmd_inspect)


def _writable(flag: str, path: Path) -> None:
    """Refuse an output path up front, not after the model has run."""
    if path.is_dir():
        raise ShardlmError(f"{flag} {str(path)!r} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ShardlmError(f"{flag} {str(path)!r}: directory {str(path.parent)!r} does not exist")


def _model(args: argparse.Namespace) -> Path:
    """--model, else the built-in model (saying so on stderr, as generate does)."""
    from shardlm.demo import DEMO_NOTICE, demo_checkpoint

    if args.model is not None:
        return Path(args.model)
    print(DEMO_NOTICE, file=sys.stderr)
    return demo_checkpoint()


def _calibration_out(out: str | None, model: Path) -> Path:
    """Where calibrate writes, checked before the model runs: --out (never inside the
    installed package), else calibration_out_path's choice, its directory made here."""
    if out is not None:
        path = Path(out)
        if inside_package(path):
            raise ShardlmError(
                f"--out {out!r} is inside the installed shardlm package ({PACKAGE_DIR}), which "
                "is never written to; leave --out out to use the per-user cache directory"
            )
        _writable("--out", path)
        return path
    path = calibration_out_path(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardlmError(
            f"cannot create {str(path.parent)!r} for the calibration ({e.strerror}); set "
            "SHARDLM_CACHE_DIR to a writable directory, or pass --out FILE"
        ) from None
    return path


def _where_written(out: Path, model: Path) -> str:
    """Where the file went, and whether ``arm=smooth|both`` on this model will read it."""
    user, _ = calibration_candidates(model)
    found = find_calibration(model)
    if found is not None and found.resolve() == out.resolve():
        where = " (the per-user cache, where arm=smooth|both look first)" if out == user else ""
        return f"wrote {out}{where}"
    return (
        f"wrote {out}; arm=smooth|both on this model read {found} instead: pass "
        f"--arm-calibration {out}"
    )


def _positive(name: str, value: int, limit: int = 2**31) -> None:
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be in [1, {limit}], got {value}")


def collect_absmax(
    llm, windows: list[list[int]], kv: KVAbsMaxRecorder | None = None
) -> tuple[list[torch.Tensor], int]:
    """Run each window of token ids through ``llm`` (prefill only, one generated token) and
    return per layer the per-channel max |x| of the down-projection input, and the number of
    tokens seen; ``kv`` (if given) records max |k| and |v| meanwhile. ``llm`` must run in
    this process, without ARM, without prefix caching."""
    from shardlm.engine.sampling_params import SamplingParams

    model = llm.runner.model
    recorder = AbsMaxRecorder(llm.config.num_hidden_layers)
    watch_kv = attention_kv(model, kv) if kv is not None else nullcontext()
    with down_proj_inputs(model, recorder), watch_kv:
        llm.generate(windows, SamplingParams(max_tokens=1))
    return recorder.tables(), recorder.tokens


def cmd_calibrate(args: argparse.Namespace) -> int:
    from shardlm.engine.llm import LLM

    _positive("--samples", args.samples)
    _positive("--seq-len", args.seq_len)
    data = Path(args.data)
    if not data.is_file():
        raise ShardlmError(f"--data {args.data!r} is not a file")
    text = data.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ShardlmError(f"--data {args.data!r} has no text")
    model = _model(args)
    out = _calibration_out(args.out, model)
    # No prefix caching: a cached prefix would skip its tokens' forward, and their statistics.
    with LLM(model, dtype=args.dtype, device=args.device, enable_prefix_caching=False) as llm:
        seq_len = min(args.seq_len, llm.engine.max_model_len - 1)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        windows = token_windows(ids, seq_len, args.samples)
        kv = KVAbsMaxRecorder(llm.config.num_hidden_layers)
        tables, tokens = collect_absmax(llm, windows, kv)
    info = {"data": data.name, "windows": len(windows), "seq_len": seq_len, "tokens": tokens}
    k_absmax, v_absmax = kv.tables()
    try:
        save_calibration(out, tables, info, (k_absmax, v_absmax))
    except (OSError, SafetensorError) as e:
        raise ShardlmError(f"could not write --out {str(out)!r}: {e}") from None
    print(
        f"calibrated on {tokens} tokens ({len(windows)} windows of ≤{seq_len}) "
        f"from {data.name}; {_where_written(out, model)}"
    )
    print("layer  max|x|  median max|x|   ratio  max|k|  max|v|")
    for n, a in enumerate(tables):
        peak, median = float(a.max()), float(a.median())
        k, v = float(k_absmax[n].max()), float(v_absmax[n].max())
        ratio = peak / max(median, 1e-30)
        print(f"{n:5d}  {peak:7.3g}  {median:14.3g}  {ratio:6.1f}  {k:6.3g}  {v:6.3g}")
    print(
        "(x: the down-projection input, outlier channels stand out as a large ratio; k, v: "
        f"kv_cache_dtype=fp8 stores them at scale {FP8_SCALE_MARGIN:g}·max/{FP8_MAX:g})"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from shardlm.engine.llm import LLM

    model = _model(args)
    given = Path(args.arm_calibration) if args.arm_calibration else None
    calibration = given or find_calibration(model)
    calibrated = calibration is not None and calibration.is_file()
    arm = args.arm or ("both" if calibrated else "hadamard")
    if given and not uses_smoothing(arm):
        raise ShardlmError(f"--arm-calibration is only used with --arm smooth or both, not {arm}")
    if args.out:
        _writable("--out", Path(args.out))
    if uses_smoothing(arm) and not calibrated:
        user, beside = calibration_candidates(model)
        missing = f"{given} does not exist" if given else f"neither {beside} nor {user} exists"
        raise ShardlmError(
            f"--arm {arm} needs calibration statistics and {missing}; run `shardlm calibrate "
            f"--model {model} --data FILE.txt` (or use --arm hadamard)"
        )
    with LLM(model, dtype="float32", device=args.device, enable_prefix_caching=False) as llm:
        layers = llm.config.num_hidden_layers
        if not 0 <= args.layer < layers:
            raise ValueError(
                f"--layer must be in [0, {layers - 1}] for this model, got {args.layer}"
            )
        captured: list[torch.Tensor] = []

        def keep(layer: int, h: torch.Tensor) -> None:
            if layer == args.layer:
                captured.append(h)

        with down_proj_inputs(llm.runner.model, keep):
            llm.prompt_logits(args.prompt)
        before = torch.cat(captured).float().cpu()
        absmax = (
            load_calibration(calibration, llm.config)[args.layer] if uses_smoothing(arm) else None
        )
        mlp = llm.runner.model.layers[args.layer].mlp
        after = layer_arm(arm, mlp, absmax).apply(before.to(mlp.down_proj.weight_t.device)).cpu()
    stats = distribution_stats(before), distribution_stats(after)
    print(
        f"layer {args.layer} down-projection input: {before.shape[0]} tokens × "
        f"{before.shape[1]} channels, arm={arm}"
        + (f" (calibration {calibration})" if uses_smoothing(arm) else "")
    )
    print(format_stats(*stats))
    if args.out:
        plot_histograms(before, after, stats, arm, args.layer, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def format_stats(before: DistributionStats, after: DistributionStats) -> str:
    rows = [
        ("kurtosis (Gaussian: 3)", before.kurtosis, after.kurtosis, "{:12.1f}"),
        ("max |x| / RMS", before.max_over_rms, after.max_over_rms, "{:12.1f}"),
        ("int8 round-trip error", before.int8_error, after.int8_error, "{:12.5f}"),
    ]
    lines = [f"{'':24}{'before ARM':>12}{'after ARM':>12}"]
    lines += [f"{name:24}{fmt.format(b)}{fmt.format(a)}" for name, b, a, fmt in rows]
    return "\n".join(lines)


def plot_histograms(
    before: torch.Tensor,
    after: torch.Tensor,
    stats: tuple[DistributionStats, DistributionStats],
    arm: str,
    layer: int,
    out: Path,
) -> None:
    """The figure's two histograms, side by side, counts on a log axis so outliers show."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ShardlmError(
            "--out needs matplotlib, an optional extra: pip install 'shardlm[plot]'"
        ) from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = (
        (before, stats[0], "before ARM", "tab:red"),
        (after, stats[1], f"after ARM ({arm})", "tab:blue"),
    )
    for ax, (values, stat, title, colour) in zip(axes, panels, strict=True):
        ax.hist(values.flatten().numpy(), bins=200, color=colour, log=True)
        ax.set_title(f"{title}: max|x|/RMS = {stat.max_over_rms:.1f}")
        ax.set_xlabel("down-projection input value")
        ax.set_ylabel("count (log)")
    fig.suptitle(f"layer {layer}: the MLP's down-projection input, {before.shape[0]} tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
