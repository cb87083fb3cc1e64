"""The ``shardlm`` command. ``shardlm generate`` streams a completion to stdout;
``calibrate`` and ``inspect`` (entrypoints/arm_tools.py) serve the ARM.

Errors caused by the input (bad checkpoint, bad flag values) print one line and exit 2;
set SHARDLM_DEBUG=1 to see the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from shardlm.attention.paged import ATTENTION_BACKENDS
from shardlm.distributed.launch import torchrun_rank, under_torchrun
from shardlm.distributed.worker import run_torchrun_worker
from shardlm.entrypoints import arm_tools, bench
from shardlm.errors import ShardlmError, WorkerFailure
from shardlm.layers.arm import ARM_MODES
from shardlm.layers.quant import QUANTIZATIONS

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlm", description="LLM inference for Llama-family checkpoints."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion of one prompt to stdout")
    gen.add_argument(
        "--model",
        help="Hugging Face checkpoint directory (default: the built-in model, tiny-code)",
    )
    gen.add_argument("--prompt", default="def fibonacci(n):", help="text to continue")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI API over HTTP (needs shardlm[serve])")
    srv.add_argument(
        "--model",
        help="Hugging Face checkpoint directory (default: the built-in model, tiny-code)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: --model)"
    )
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $SHARDLM_API_KEY, else none)",
    )
    srv.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="answer 429 while this many sequences wait to start (default 1024)",
    )
    srv.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences running at once (default 256)"
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds in-flight requests get to finish before they are aborted",
    )
    srv.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling (default 0)")
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)

    ev = sub.add_parser(
        "eval", help="perplexity on text (any dtype, quantization, ARM, tensor parallelism)"
    )
    ev.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    ev.add_argument("--data", required=True, help="a text file, or a directory of .py/.txt/.md")
    ev.add_argument(
        "--window", type=int, default=512, help="tokens per scored window (default 512)"
    )
    ev.add_argument(
        "--max-tokens", type=int, default=None, help="stop after about this many tokens"
    )
    add_engine_args(ev)
    ev.set_defaults(func=cmd_eval)
    arm_tools.add_parsers(sub)
    bench.add_parser(sub)
    return parser


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """How the model is loaded and laid out: shared by generate and serve."""
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--tensor-parallel-size",
        "--tp",
        type=int,
        default=None,
        help="split the model over N processes (default 1; under torchrun: WORLD_SIZE)",
    )
    parser.add_argument(
        "--tp-timeout", type=float, default=60.0, help="seconds before a dead rank is reported"
    )
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="exact KV pool size in tokens (with attention nodes: of each node)",
    )
    parser.add_argument(
        "--attention-nodes",
        type=int,
        default=0,
        help="β: R-shard the KV cache over β attention nodes per head group (default 0: none)",
    )
    parser.add_argument(
        "--kv-chunk-size",
        type=int,
        default=16,
        help="tokens per R-shard chunk: position p lives on node (p // c) %% β (default 16)",
    )
    parser.add_argument(
        "--attention-device",
        default=None,
        help="device of the attention nodes' KV (default: the compute device)",
    )
    parser.add_argument(
        "--attention-transport",
        default="distributed",
        choices=["distributed", "in-process"],
        help="attention nodes as their own ranks (default) or as objects in the compute ranks",
    )
    parser.add_argument(
        "--attention-backend",
        default="auto",
        choices=list(ATTENTION_BACKENDS),
        help="torch: PyTorch (SDPA); triton: the Triton kernels (decode attention, RoPE + KV "
        "write, add + RMSNorm, SiLU·mul); auto (default): triton on CUDA when installed",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: run every decode step eagerly",
    )
    add_weight_transform_args(parser)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM/LLMEngine keyword arguments from the flags of add_engine_args."""
    return dict(
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        tensor_parallel_size=tensor_parallel_size(
            args.tensor_parallel_size, args.attention_nodes, args.attention_transport
        ),
        tp_timeout_s=args.tp_timeout,
        attention_nodes=args.attention_nodes,
        kv_chunk_size=args.kv_chunk_size,
        attention_device=args.attention_device,
        attention_transport=args.attention_transport,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        **weight_transform_kwargs(args),
    )


def add_weight_transform_args(parser: argparse.ArgumentParser) -> None:
    """--quantization / --arm and friends (docs/arm.md)."""
    parser.add_argument(
        "--quantization",
        default=None,
        choices=list(QUANTIZATIONS),
        help="W8A8 quantization of the MLP down projection (default: none)",
    )
    parser.add_argument(
        "--quantize-all-linears",
        action="store_true",
        help="quantize QKV/O/gate/up too (everything but the LM head)",
    )
    parser.add_argument(
        "--arm",
        default="none",
        choices=list(ARM_MODES),
        help="activation redistribution in front of the down projection (default: none)",
    )
    parser.add_argument(
        "--arm-calibration",
        default=None,
        help="statistics for --arm smooth|both (default: MODEL/arm_calibration.safetensors)",
    )


def weight_transform_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        quantization=args.quantization,
        quantize_all_linears=args.quantize_all_linears,
        arm=args.arm,
        arm_calibration=args.arm_calibration,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from shardlm import LLM, SamplingParams
    from shardlm.demo import DEMO_NOTICE, demo_checkpoint

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    engine_args = engine_kwargs(args)
    model = args.model
    if is_torchrun_worker():
        return run_torchrun_worker(model or demo_checkpoint(), **engine_args)
    if model is None:
        print(DEMO_NOTICE, file=sys.stderr)
        model = demo_checkpoint()
    with LLM(model, **engine_args) as llm:
        prompt_tokens = len(llm.encode_prompt(args.prompt))
        start = time.perf_counter()
        first = None
        generated = 0
        reason = None
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        for event in llm.stream(args.prompt, params):
            if first is None:
                first = time.perf_counter()
            generated += len(event.token_ids)
            reason = event.finish_reason
            if event.text_delta:
                sys.stdout.write(event.text_delta)
                sys.stdout.flush()
        end = time.perf_counter()
        sys.stdout.write("\n")
        decode_rate = (generated - 1) / (end - first) if first and generated > 1 else 0.0
        print(
            f"[shardlm] prompt tokens: {prompt_tokens}, generated tokens: {generated} "
            f"(finish: {reason}), time to first token: {(first or end) - start:.3f}s, "
            f"decode: {decode_rate:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


EVAL_SUFFIXES = (".py", ".txt", ".md")


def cmd_eval(args: argparse.Namespace) -> int:
    from shardlm import LLM
    from shardlm.demo import demo_checkpoint
    from shardlm.quality import perplexity

    data = Path(args.data)
    if data.is_dir():
        files = sorted(
            f
            for f in data.rglob("*")
            if f.suffix in EVAL_SUFFIXES
            and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(data).parts)
        )
    elif data.is_file():
        files = [data]
    else:
        raise ShardlmError(f"--data {args.data!r} is neither a file nor a directory")
    if not files:
        raise ShardlmError(f"--data {args.data!r} has no {'/'.join(EVAL_SUFFIXES)} files")
    if args.window < 2:
        raise ValueError(f"--window must be ≥ 2, got {args.window}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be ≥ 2, got {args.max_tokens}")
    if args.attention_backend == "triton" or args.attention_nodes:
        raise ValueError(
            "shardlm eval scores each window in one forward on the compute ranks' scoring "
            "path: --attention-backend and --attention-nodes do not apply to it"
        )
    model = args.model or demo_checkpoint()
    # Scoring is the reference path: plain PyTorch, and no decode graphs to capture.
    kwargs = engine_kwargs(args) | dict(attention_backend="torch", enforce_eager=True)
    if is_torchrun_worker():
        return run_torchrun_worker(model, **kwargs)
    with LLM(model, **kwargs) as llm:
        window = min(args.window, llm.engine.max_model_len)
        documents, total = [], 0
        for f in files:
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise ShardlmError(f"--data: cannot read {f}: {e.strerror}") from None
            ids = llm.tokenizer.encode(text)
            documents.append(ids)
            total += len(ids)
            if args.max_tokens is not None and total >= args.max_tokens:
                documents[-1] = ids[: len(ids) - (total - args.max_tokens)]
                break
        result = perplexity(llm, documents, window)
        setup = f"dtype {llm.engine.dtype}".replace("torch.", "")
        transforms = llm.engine.args.transforms.describe()
    print(
        f"perplexity {result.value:.3f} over {result.tokens} tokens ({result.windows} windows "
        f"of ≤{window}, {result.documents} documents); {Path(model).name}, {setup}, {transforms}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shardlm.demo import BUILTIN_NAME, DEMO_NOTICE, demo_checkpoint

    engine_args = engine_kwargs(args)
    engine_args["max_num_seqs"] = args.max_num_seqs  # every rank sizes its KV pool with it
    model = args.model
    if is_torchrun_worker():
        return run_torchrun_worker(model or demo_checkpoint(), **engine_args)
    try:
        from shardlm.entrypoints.openai.server import ServerConfig, run_server
    except ImportError as e:
        raise ShardlmError(
            f"shardlm serve needs the serve extra ({e.name} is missing): "
            "pip install 'shardlm[serve]'"
        ) from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be ≥ 1, got {args.max_waiting}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be ≥ 0, got {args.shutdown_timeout}")
    if model is None:
        print(DEMO_NOTICE, file=sys.stderr)
        model = demo_checkpoint()
    config = ServerConfig(
        model_name=args.served_model_name or str(args.model or BUILTIN_NAME),
        api_key=args.api_key or os.environ.get("SHARDLM_API_KEY") or None,
        max_waiting=args.max_waiting,
    )
    engine_args["seed"] = args.seed  # the driver's sampling only
    return run_server(model, engine_args, config, args.host, args.port, args.shutdown_timeout)


def is_torchrun_worker() -> bool:
    """A rank > 0 of a torchrun job: it gets the driver's command line but only runs the
    model, serving rank 0 (which prints, serves HTTP or scores)."""
    return under_torchrun() and torchrun_rank()[0] > 0


def tensor_parallel_size(requested: int | None, attention_nodes: int, transport: str) -> int:
    """--tp, or under torchrun what the job's WORLD_SIZE implies (they must agree when both
    are given): WORLD_SIZE = t compute ranks, plus t·β attention-node ranks when the nodes
    are distributed."""
    if not under_torchrun():
        return 1 if requested is None else requested
    world = torchrun_rank()[1]
    per_group = 1 + (attention_nodes if attention_nodes > 0 and transport == "distributed" else 0)
    if world % per_group or requested not in (None, world // per_group):
        tp = "t" if requested is None else str(requested)
        raise ValueError(
            f"torchrun's WORLD_SIZE {world} does not fit {tp} compute ranks × (1 + "
            f"{per_group - 1} attention-node ranks each); WORLD_SIZE must be t·(1 + β) with "
            "distributed attention nodes, else t (--tensor-parallel-size)"
        )
    return world // per_group


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ShardlmError, ValueError, WorkerFailure) as e:
        if os.environ.get("SHARDLM_DEBUG"):
            raise
        print(f"shardlm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
