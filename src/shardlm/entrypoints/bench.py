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
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shardlm.attention.paged import ATTENTION_BACKENDS
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="decode tokens/s against the memory-bandwidth roofline")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a checkpoint directory (its real weights)")
    where.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape")
    b.add_argument("--batch-sizes", default="1,8,64", help="comma-separated (default 1,8,64)")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=256)
    b.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    b.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS))
    b.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
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
    b.add_argument("--json", default=None, help="also write the rows to this file")
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


def decode_run(engine, batch: int, input_len: int, output_len: int, vocab: int) -> tuple:
    """(decode seconds, decode steps, tokens generated while decoding) for ``batch``
    requests of ``input_len`` random tokens and ``output_len`` new tokens each."""
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
    start = time.perf_counter()
    steps = tokens = 0
    while engine.has_unfinished_requests():
        tokens += step()
        steps += 1
    sync(engine.device)
    return time.perf_counter() - start, steps, tokens


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


def hf_decode_rate(
    model, mode: str, batch: int, input_len: int, output_len: int, device: torch.device
) -> tuple[float, float]:
    """(decode tokens/s, seconds of the first call) of transformers' generate on ``model``:
    "eager" (its default attention, SDPA, dynamic cache) or "static" (a StaticCache sized for
    the run, with which generate compiles the decode step: the first call's time is mostly
    that compile). The prefill is timed on its own and removed."""
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
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(device)
        return time.perf_counter() - start

    first = timed(output_len)  # warm-up (and the compile, for "static")
    prefill = timed(1)
    total = timed(output_len)
    return batch * (output_len - 1) / max(total - prefill, 1e-9), first


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
    if args.hf_output_len is not None and not 2 <= args.hf_output_len <= args.output_len:
        raise ValueError(
            f"--hf-output-len must be in [2, --output-len={args.output_len}], "
            f"got {args.hf_output_len}"
        )
    modes = hf_modes(args.compare_hf, resolve_device(args.device))  # refused before loading
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
            dtype=args.dtype,
            device=args.device,
            skip_tokenizer_init=True,
            load_format="dummy" if args.shape else "auto",
            max_model_len=total + 1 if args.model else None,
            kv_cache_tokens=max(batches) * (total + 16),
            max_num_seqs=max(batches),
            enable_prefix_caching=False,
            attention_backend=args.attention_backend,
            enforce_eager=args.enforce_eager,
        )
        graphs = engine.runner.decode_graphs
        record = {
            "shape": args.shape,
            "model": args.model,
            "parameters": sum(p.numel() for p in engine.runner.model.parameters()),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": str(engine.device),
            "attention_backend": engine.runner.attention_backend,
            "cuda_graphs": graphs is not None,
            "startup_s": time.perf_counter() - start,
            "load_s": engine.runner.load_seconds,
            "capture_s": graphs.capture_seconds if graphs is not None else 0.0,
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


def measure(engine, batches: list[int], args: argparse.Namespace) -> list[dict]:
    model = engine.runner.model
    weights = sum(p.nbytes for n, p in model.named_parameters() if not n.startswith("embed_"))
    per_token_kv = engine.runner.kv_bytes_per_token()
    bandwidth = copy_bandwidth(engine.device)
    vocab = engine.config.vocab_size
    decode_run(engine, 1, 4, 4, vocab)  # warm-up
    rows = []
    for batch in batches:
        seconds, steps, tokens = decode_run(engine, batch, args.input_len, args.output_len, vocab)
        mean_context = args.input_len + args.output_len / 2
        step_bytes = weights + batch * mean_context * per_token_kv
        roofline = batch * bandwidth / step_bytes
        row = {
            "batch": batch,
            "tok_s": tokens / seconds,
            "ms_step": 1e3 * seconds / max(steps, 1),
            "step_mb": step_bytes / 1e6,
            "roofline": roofline,
            "bandwidth": bandwidth,
        }
        rows.append(row)
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
            rate, first = hf_decode_rate(model, mode, row["batch"], args.input_len, new, device)
            row[f"hf_{mode}"] = rate
            row[f"hf_{mode}_first_s"] = first


def print_table(record: dict, args: argparse.Namespace) -> None:
    rows = record["rows"]
    what = f"shape {args.shape} (random weights)" if args.shape else str(args.model)
    graphs = "CUDA graphs" if record["cuda_graphs"] else "eager"
    print(
        f"{what}: {record['parameters'] / 1e6:,.1f}M parameters, {record['dtype']}, "
        f"{record['device']}, {record['attention_backend']} kernels, {graphs}; copy bandwidth "
        f"{rows[0]['bandwidth'] / 1e9:.1f} GB/s; start-up {record['startup_s']:.1f} s (load "
        f"{record['load_s']:.1f} s, capture {record['capture_s']:.1f} s); "
        f"{args.input_len} prompt + {args.output_len} new tokens"
    )
    modes = [m for m in HF_MODES if f"hf_{m}" in rows[0]]
    head = f"{'batch':>6}{'tok/s':>11}{'ms/step':>9}{'MB/step':>9}{'roofline':>10}{'% roof':>8}"
    for m in modes:
        head += f"{'HF ' + m:>11}{'ratio':>7}"
    print(head)
    for r in rows:
        line = (
            f"{r['batch']:6d}{r['tok_s']:11.1f}{r['ms_step']:9.2f}{r['step_mb']:9.1f}"
            f"{r['roofline']:10.1f}{100 * r['tok_s'] / r['roofline']:7.1f}%"
        )
        for m in modes:
            line += f"{r[f'hf_{m}']:11.1f}{r['tok_s'] / r[f'hf_{m}']:6.2f}×"
        print(line)
    for m in modes:
        firsts = ", ".join(f"{r[f'hf_{m}_first_s']:.1f}" for r in rows)
        print(f"HF {m}: first generate call per batch, s (static: compiles there): {firsts}")
    if len(rows) > 1:
        pct = [100 * r["tok_s"] / r["roofline"] for r in rows]
        print(f"median % of roofline: {statistics.median(pct):.1f}%")
