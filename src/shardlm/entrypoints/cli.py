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

from shardlm.distributed.torchrun import torchrun_rank, under_torchrun
from shardlm.engine_config import EngineConfig, add_engine_arguments, engine_kwargs
from shardlm.entrypoints import arm_tools, bench
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.errors import ShardlmError, WorkerFailure
from shardlm.options import add_arguments, from_kwargs, kwargs_from

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlm", description="LLM inference for Llama-family checkpoints."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion of one prompt to stdout")
    gen.add_argument("--prompt", default="def fibonacci(n):", help="text to continue")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--min-p", type=float, default=0.0)
    # Here --seed seeds this request (the engine's seed only reaches requests without one).
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    add_engine_arguments(gen, exclude=("seed",))
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI API over HTTP (needs shardlm[serve])")
    add_arguments(srv, ServerConfig, titles={"": "Server"})
    add_engine_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    ev = sub.add_parser(
        "eval", help="perplexity on text (any dtype, quantization, ARM, tensor parallelism)"
    )
    ev.add_argument("--data", required=True, help="a text file, or a directory of .py/.txt/.md")
    ev.add_argument(
        "--window", type=int, default=512, help="tokens per scored window (default 512)"
    )
    ev.add_argument(
        "--max-tokens", type=int, default=None, help="stop after about this many tokens"
    )
    add_engine_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    arm_tools.add_parsers(sub)
    bench.add_parser(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from shardlm.demo import DEMO_NOTICE
    from shardlm.engine.llm import LLM
    from shardlm.engine.sampling_params import SamplingParams

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
    if is_torchrun_worker():
        return run_torchrun_worker(engine_args)
    if engine_args.get("model") is None:
        print(DEMO_NOTICE, file=sys.stderr)
    with LLM(**engine_args) as llm:
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
    from shardlm.engine.llm import LLM
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
    given = engine_kwargs(args)
    if given.get("attention_backend") == "triton" or given.get("attention_nodes"):
        raise ValueError(
            "shardlm eval scores each window in one forward on the compute ranks' scoring "
            "path: --attention-backend and --attention-nodes do not apply to it"
        )
    # Scoring is the reference path: plain PyTorch, and no decode graphs to capture.
    kwargs = given | dict(attention_backend="torch", enforce_eager=True)
    if is_torchrun_worker():
        return run_torchrun_worker(kwargs)
    with LLM(**kwargs) as llm:
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
        transforms = llm.engine.engine_config.quantization.transforms.describe()
        name = llm.engine.model_path.name
    print(
        f"perplexity {result.value:.3f} over {result.tokens} tokens ({result.windows} windows "
        f"of ≤{window}, {result.documents} documents); {name}, {setup}, {transforms}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    engine_args = engine_kwargs(args)
    if is_torchrun_worker():
        return run_torchrun_worker(engine_args)
    try:
        from shardlm.entrypoints.openai.server import run_server
    except ImportError as e:
        raise ShardlmError(
            f"shardlm serve needs the serve extra ({e.name} is missing): "
            "pip install 'shardlm[serve]'"
        ) from None
    server = from_kwargs(ServerConfig, kwargs_from(args, ServerConfig), "shardlm serve")
    return run_server(engine_args, server, access_log=args.verbose)


def is_torchrun_worker() -> bool:
    """A rank > 0 of a torchrun job: it gets the driver's command line but only runs the
    model, serving rank 0 (which prints, serves HTTP or scores)."""
    return under_torchrun() and torchrun_rank()[0] > 0


def run_torchrun_worker(engine_args: dict) -> int:
    """A torchrun rank > 0: the driver's options, resolved alike, then serve the driver."""
    from shardlm.executor.ranks import run_torchrun_worker as serve_driver

    return serve_driver(EngineConfig.from_kwargs("shardlm", **engine_args))


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
