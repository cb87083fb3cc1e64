"""``shardlm bench``: decode speed against the memory-bandwidth roofline.

A decode step must read every weight once (an untied input-embedding table excepted: only B
rows of it are read; a tied one is read in full as the LM head) and every cached K/V it
attends to, so

    roofline tokens/s = B / ((weight bytes + KV bytes read per step) / copy bandwidth)

where the copy bandwidth is measured here, on this device, as (bytes read + bytes written) /
time of copying a large tensor. Named shapes (``--shape llama-1b``) need no checkpoint: the
model is built with random weights (``load_format="dummy"``). With ``--compare-hf``,
transformers' ``generate`` on the same shape runs in the same process — eager, and (on CUDA)
with a static cache, which makes ``generate`` compile the decode step with torch.compile —
and the table gives the ratios. Start-up is reported as the weights' load and the CUDA-graph
capture; transformers' compile time as the first generate call's.

One run's rate is not to be trusted: the first steps at a batch size pay one-time costs
(kernel selection, the first graph replay, allocator growth) and runs vary. So each batch size
first runs --warmup-steps untimed decode steps, then --repeats timed runs; the table gives the
median and the min–max of the runs, for shardlm and transformers alike, and ratios of medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from shardlm.engine_config import add_engine_arguments, engine_kwargs
from shardlm.loader import resolve_device

SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        tie_word_embeddings=False,
    ),
    "llama-1b": dict(  # Llama-3.2-1B
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-8b": dict(  # Llama-3-8B
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


WARMUP_STEPS = 16
# The median of 5 runs is right with up to two bad ones; of 3, with one. Four runs of the
# same batch-1 bench once gave 88, 456, 315 and 308 tok/s: two bad runs in four.
REPEATS = 5


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="decode tokens/s against the memory-bandwidth roofline")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a checkpoint directory (its real weights)")
    where.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape")
    b.add_argument("--batch-sizes", default="1,8,64", help="comma-separated (default 1,8,64)")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=256)
    b.add_argument(
        "--compare-hf",
        nargs="?",
        const="auto",
        default=None,
        help="also time transformers: a comma list of eager, static (static cache + "
        "torch.compile); alone: eager, plus static on CUDA",
    )
    b.add_argument(
        "--hf-output-len",
        type=int,
        default=None,
        help="new tokens per transformers run (default --output-len; its rate is per token)",
    )
    b.add_argument(
        "--warmup-steps",
        type=int,
        default=WARMUP_STEPS,
        help=f"untimed decode steps at each batch size before it is timed (default {WARMUP_STEPS})",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"timed runs per measurement, shown as median (min–max) (default {REPEATS})",
    )
    b.add_argument("--json", default=None, help="also write the rows to this file")
    # Every other engine option (dtype, device, kernels, quantization, parallelism, ...).
    add_engine_arguments(b, exclude=BENCH_SETS)
    b.set_defaults(func=cmd_bench)


def shape_checkpoint(shape: str, directory: Path, max_positions: int) -> Path:
    """A checkpoint directory holding only the config of a named shape."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        **SHAPES[shape],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    n = (512 if device.type == "cuda" else 64) * 2**20  # float32 elements
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / min(times[1:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_decoding(engine, batch: int, input_len: int, max_tokens: int, name: str) -> None:
    """Add ``batch`` greedy requests of ``input_len`` random tokens and step until every one
    has its prompt computed: what follows are decode steps (the profiling scripts')."""
    from shardlm.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        ids = torch.randint(2, engine.config.vocab_size, (input_len,), generator=gen).tolist()
        engine.add_request(f"{name}-{batch}-{i}", ids, params)
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()


Clock = Callable[[], float]


class DecodeRun(NamedTuple):
    """One timed decode: its seconds, engine steps and tokens generated."""

    seconds: float
    steps: int
    tokens: int


def decode_run(
    engine,
    batch: int,
    input_len: int,
    output_len: int,
    vocab: int,
    clock: Clock = time.perf_counter,
) -> DecodeRun:
    """``batch`` requests of ``input_len`` random tokens (the same ones at every call) and
    ``output_len`` new tokens each; the prefill is run first, untimed, then the decode steps
    are timed with ``clock`` (injectable, so tests can count what falls inside it)."""
    from shardlm.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(2, vocab, (input_len,), generator=gen).tolist()
        engine.add_request(f"bench-{batch}-{i}", ids, params)
    produced = dict.fromkeys(range(batch), 0)

    def step() -> int:
        new = 0
        for out in engine.step():
            k = int(out.request_id.rsplit("-", 1)[1])
            n = sum(len(c.token_ids) for c in out.outputs)
            produced[k] += n
            new += n
        return new

    while min(produced.values()) == 0:  # prefill (not timed)
        step()
    sync(engine.device)
    start = clock()
    steps = tokens = 0
    while engine.has_unfinished_requests():
        tokens += step()
        steps += 1
    sync(engine.device)
    return DecodeRun(clock() - start, steps, tokens)


def warm_up(engine, batch: int, input_len: int, output_len: int, steps: int, vocab: int) -> None:
    """``steps`` untimed decode steps at this batch size (in runs no longer than the timed
    ones, which the KV pool and max_model_len are sized for)."""
    while steps > 0:
        n = min(steps, output_len - 1)
        decode_run(engine, batch, input_len, n + 1, vocab)
        steps -= n


def decode_runs(
    engine, batch: int, args: argparse.Namespace, vocab: int, clock: Clock
) -> list[DecodeRun]:
    """The warm-up, then ``args.repeats`` timed runs at one batch size."""
    warm_up(engine, batch, args.input_len, args.output_len, args.warmup_steps, vocab)
    return [
        decode_run(engine, batch, args.input_len, args.output_len, vocab, clock)
        for _ in range(args.repeats)
    ]


def spread(key: str, values: list[float]) -> dict:
    """``key``: the median of the runs (what ratios and % of roofline use), with its min, max
    and every run, so a reader sees how far one run is from the next."""
    return {
        key: statistics.median(values),
        f"{key}_min": min(values),
        f"{key}_max": max(values),
        f"{key}_runs": list(values),
    }


HF_MODES = ("eager", "static")


def hf_modes(value: str | None, device: torch.device) -> list[str]:
    if value is None:
        return []
    if value == "auto":
        return ["eager", "static"] if device.type == "cuda" else ["eager"]
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in HF_MODES]
    if not modes or bad:
        raise ValueError(f"--compare-hf takes a comma list of {', '.join(HF_MODES)}, got {value!r}")
    return modes


def build_hf_model(config_dir: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device(device):  # built in place, directly in dtype (not the config's)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def hf_decode_rates(
    model,
    mode: str,
    batch: int,
    input_len: int,
    output_len: int,
    device: torch.device,
    repeats: int,
    clock: Clock = time.perf_counter,
) -> tuple[list[float], float]:
    """(decode tokens/s of each of ``repeats`` runs, seconds of the first call) of
    transformers' generate on ``model``: "eager" (its default attention, SDPA, dynamic cache)
    or "static" (a StaticCache sized for the run, with which generate compiles the decode
    step: the first call's time is mostly that compile). The first call is the warm-up and is
    not in the rates; the prefill (generate for one token, timed ``repeats`` times: the median)
    is removed from each run."""
    ids = torch.randint(2, model.config.vocab_size, (batch, input_len), device=device)
    kwargs: dict = dict(do_sample=False, pad_token_id=0)
    cache = None
    if mode == "static":
        from transformers import StaticCache

        # One cache shape for every call below, so the decode step compiles once.
        cache = StaticCache(config=model.config, max_cache_len=input_len + output_len)

    def timed(new: int) -> float:
        if cache is not None:
            cache.reset()
            kwargs["past_key_values"] = cache
        sync(device)
        start = clock()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(device)
        return clock() - start

    first = timed(output_len)  # warm-up (and the compile, for "static")
    prefills, totals = [], []
    for _ in range(repeats):
        prefills.append(timed(1))
        totals.append(timed(output_len))
    # One prefill estimate for every run: a run's own short prefill timing is as noisy as the
    # difference it is subtracted from.
    prefill = statistics.median(prefills)
    return [batch * (output_len - 1) / max(t - prefill, 1e-9) for t in totals], first


# Engine options bench sets itself: the model comes from --model / --shape, the KV pool and
# batch from --batch-sizes and the lengths, and prefix caching is off (every prompt is new).
BENCH_SETS = (
    "model",
    "skip_tokenizer_init",
    "load_format",
    "max_model_len",
    "kv_cache_tokens",
    "max_num_seqs",
    "enable_prefix_caching",
)


def cmd_bench(args: argparse.Namespace) -> int:
    from shardlm.engine.llm_engine import LLMEngine

    try:
        batches = [int(x) for x in str(args.batch_sizes).split(",") if x.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    if args.input_len < 1:
        raise ValueError(f"--input-len must be ≥ 1, got {args.input_len}")
    if args.output_len < 2:
        raise ValueError(
            f"--output-len must be ≥ 2 (decode steps follow the first token), got {args.output_len}"
        )
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be ≥ 0, got {args.warmup_steps}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.hf_output_len is not None and not 2 <= args.hf_output_len <= args.output_len:
        raise ValueError(
            f"--hf-output-len must be in [2, --output-len={args.output_len}], "
            f"got {args.hf_output_len}"
        )
    options = engine_kwargs(args)
    modes = hf_modes(args.compare_hf, resolve_device(options.get("device", "auto")))
    total = args.input_len + args.output_len
    with tempfile.TemporaryDirectory() as scratch:
        path = (
            Path(args.model)
            if args.model
            else shape_checkpoint(args.shape, Path(scratch), total + 16)
        )
        start = time.perf_counter()
        engine = LLMEngine(
            path,
            **options,
            skip_tokenizer_init=True,
            load_format="dummy" if args.shape else "auto",
            max_model_len=total + 1 if args.model else None,
            kv_cache_tokens=max(batches) * (total + 16),
            max_num_seqs=max(batches),
            enable_prefix_caching=False,
        )
        graphs = engine.runner.decode_graphs
        record = {
            "shape": args.shape,
            "model": args.model,
            "parameters": engine.runner.num_parameters,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": str(engine.device),
            "attention_backend": engine.runner.attention_backend,
            "cuda_graphs": graphs is not None,
            "startup_s": time.perf_counter() - start,
            "load_s": engine.runner.load_seconds,
            "capture_s": graphs.capture_seconds if graphs is not None else 0.0,
            "warmup_steps": args.warmup_steps,
            "repeats": args.repeats,
        }
        dtype, device = engine.dtype, engine.device
        try:
            record["rows"] = measure(engine, batches, args)
        finally:
            engine.shutdown()
        # transformers gets the device to itself: shardlm's weights, KV pool and graphs go.
        del engine, graphs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if modes:
            measure_hf(record["rows"], modes, args, path, dtype, device)
    print_table(record, args)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


def measure(
    engine, batches: list[int], args: argparse.Namespace, clock: Clock = time.perf_counter
) -> list[dict]:
    """One row per batch size: tokens/s of the timed runs (median, min, max, each run), the
    median ms per step, and the roofline of that batch."""
    model = engine.runner.model
    weights = model.streamed_weight_bytes
    per_token_kv = engine.runner.kv_bytes_per_token()
    bandwidth = copy_bandwidth(engine.device)
    vocab = engine.config.vocab_size
    rows = []
    for batch in batches:
        runs = decode_runs(engine, batch, args, vocab, clock)
        mean_context = args.input_len + args.output_len / 2
        step_bytes = weights + batch * mean_context * per_token_kv
        rows.append(
            {
                "batch": batch,
                **spread("tok_s", [r.tokens / max(r.seconds, 1e-9) for r in runs]),
                "ms_step": statistics.median(1e3 * r.seconds / max(r.steps, 1) for r in runs),
                "timed_steps": [r.steps for r in runs],
                "step_mb": step_bytes / 1e6,
                "roofline": batch * bandwidth / step_bytes,
                "bandwidth": bandwidth,
            }
        )
    return rows


def measure_hf(
    rows: list[dict], modes: list[str], args: argparse.Namespace, path: Path, dtype, device
) -> None:
    """transformers on the same shape and batches, after shardlm's engine is gone (the two
    never share the device's memory)."""
    model = build_hf_model(path, dtype, device)
    new = args.hf_output_len or args.output_len
    for mode in modes:
        for row in rows:
            rates, first = hf_decode_rates(
                model, mode, row["batch"], args.input_len, new, device, args.repeats
            )
            row.update(spread(f"hf_{mode}", rates))
            row[f"hf_{mode}_ratio"] = row["tok_s"] / row[f"hf_{mode}"]  # of medians
            row[f"hf_{mode}_first_s"] = first


def print_table(record: dict, args: argparse.Namespace) -> None:
    rows = record["rows"]
    what = f"shape {args.shape} (random weights)" if args.shape else str(args.model)
    graphs = "CUDA graphs" if record["cuda_graphs"] else "eager"
    print(
        f"{what}: {record['parameters'] / 1e6:,.1f}M parameters, {record['dtype']}, "
        f"{record['device']}, {record['attention_backend']} kernels, {graphs}; copy bandwidth "
        f"{rows[0]['bandwidth'] / 1e9:.1f} GB/s; start-up {seconds(record['startup_s'])} (load "
        f"{seconds(record['load_s'])}, capture {seconds(record['capture_s'])}); "
        f"{args.input_len} prompt + {args.output_len} new tokens"
    )
    modes = [m for m in HF_MODES if f"hf_{m}" in rows[0]]
    print(timing_note(record, modes, args.output_len))
    head = f"{'batch':>6}{'tok/s (min–max)':>24}{'ms/step':>9}{'MB/step':>9}{'roofline':>10}"
    head += f"{'% roof':>8}"
    for m in modes:
        head += f"{f'HF {m} (min–max)':>24}{'ratio':>7}"
    print(head)
    for r in rows:
        line = (
            f"{r['batch']:6d}{rate_cell(r, 'tok_s'):>24}{r['ms_step']:9.2f}{r['step_mb']:9.1f}"
            f"{r['roofline']:10.1f}{100 * r['tok_s'] / r['roofline']:7.1f}%"
        )
        for m in modes:
            line += f"{rate_cell(r, f'hf_{m}'):>24}{r[f'hf_{m}_ratio']:6.2f}×"
        print(line)
    for m in modes:
        firsts = ", ".join(f"{r[f'hf_{m}_first_s']:.1f}" for r in rows)
        print(f"HF {m}: first generate call per batch, s (static: compiles there): {firsts}")
    if len(rows) > 1:
        pct = [100 * r["tok_s"] / r["roofline"] for r in rows]
        print(f"median % of roofline: {statistics.median(pct):.1f}%")


def timing_note(record: dict, modes: list[str], output_len: int) -> str:
    """What the table's rates are: how much was warm-up, how many runs, which statistic."""
    note = (
        f"each batch: {record['warmup_steps']} untimed warm-up decode steps, then "
        f"{record['repeats']} timed runs of {output_len - 1} decode steps; tok/s = median "
        "(min–max) of the runs, ms/step = median"
    )
    if modes:
        note += "; HF: one untimed generate call, then as many runs; ratio = median / median"
    return note


def rate_cell(row: dict, key: str) -> str:
    """``312 (305–320)``: the median and the range of the runs, one precision for all three."""
    digits = 0 if row[key] >= 100 else 1
    low, mid, high = (f"{row[k]:,.{digits}f}" for k in (f"{key}_min", key, f"{key}_max"))
    return f"{mid} ({low}–{high})"


def seconds(value: float) -> str:
    """A duration with a precision that does not round start-up times below 0.05 s to 0."""
    return f"{value:.1f} s" if value >= 1 else f"{1e3 * value:.0f} ms"
