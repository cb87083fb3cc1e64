"""A bounded load test of `shardlm serve` (loopback only; stops by itself within --limit s).

Builds a small random Llama (byte tokenizer), starts the server as a subprocess, and has
--concurrency clients stream --requests completions in total (each --max-tokens tokens,
ignore_eos). Reports requests/s, output tokens/s, p50/p99 time to first token and
inter-token latency (gaps between streamed chunks, as a client sees them). The peer is the
offline engine (`LLM.generate` of the same prompts, in this process while no server runs,
at most --concurrency sequences at a time; rounds interleaved), so the ratio is what HTTP, SSE, the
two processes (HTTP and engine) and the clients sharing the machine cost. Usage:

    python benchmarks/serve_load.py [--concurrency 16] [--requests 64] [--max-tokens 32]
        [--rounds 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from common import make_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int):
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            chunk = line.startswith("data: ") and line != "data: [DONE]"
            if chunk and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return start, stamps


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int):
    queue = list(enumerate(prompts))
    results = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            _, prompt = queue.pop()
            results.append(await one_request(client, url, prompt, max_tokens))

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def serve_round(work: str, args, prompts: list[str]) -> tuple[float, list]:
    """Start `shardlm serve`, run the load, stop it: (wall seconds, per-request stamps)."""
    port = free_port()
    argv = [sys.executable, "-m", "shardlm", "serve", "--model", work, "--port", str(port)]
    argv += ["--dtype", args.dtype, "--device", "cpu", "--kv-cache-tokens", "32768"]
    server = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SHARDLM_API_KEY": ""},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read()}")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/completions"
        start = time.perf_counter()
        results = asyncio.run(
            asyncio.wait_for(load(url, prompts, args.concurrency, args.max_tokens), args.limit)
        )
        return time.perf_counter() - start, results
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved server/offline rounds")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--limit", type=float, default=60, help="seconds before a round gives up")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    args = p.parse_args()

    from shardlm import LLM, SamplingParams

    prompts = [
        f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(args.requests)
    ]
    walls, offlines, ttft, itl = [], [], [], []
    with tempfile.TemporaryDirectory() as work:
        make_checkpoint(work, args, byte_vocab=True)
        # The peer runs at most as many sequences at once as the server had clients.
        with LLM(
            work,
            dtype=args.dtype,
            device="cpu",
            kv_cache_tokens=32768,
            max_num_seqs=args.concurrency,
        ) as llm:
            params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
            llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
            for _ in range(args.rounds):  # interleaved: the machine's drift hits both alike
                wall, results = serve_round(work, args, prompts)
                walls.append(wall)
                ttft += [stamps[0] - begin for begin, stamps in results if stamps]
                itl += [b - a for _, stamps in results for a, b in itertools.pairwise(stamps)]
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                offlines.append(time.perf_counter() - t0)

    wall, offline = statistics.median(walls), statistics.median(offlines)
    tokens = args.requests * args.max_tokens
    print(
        f"\n{args.requests} streamed completions × {args.max_tokens} tokens, concurrency "
        f"{args.concurrency}; random Llama hidden {args.hidden}, {args.layers} layers, CPU "
        f"{args.dtype}; medians of {args.rounds} interleaved rounds"
    )
    print(f"{'':28}{'server':>12}{'offline LLM':>14}")
    print(f"{'wall time, s':28}{wall:12.2f}{offline:14.2f}")
    print(f"{'requests/s':28}{args.requests / wall:12.2f}{args.requests / offline:14.2f}")
    print(f"{'output tokens/s':28}{tokens / wall:12.1f}{tokens / offline:14.1f}")
    for name, values in (("TTFT", ttft), ("ITL", itl)):
        p50, p99 = 1e3 * statistics.median(values), 1e3 * percentile(values, 0.99)
        print(f"{name + ' p50 / p99, ms':28}{p50:6.1f} / {p99:.1f}")
    ratios = ", ".join(f"{o / w:.2f}" for w, o in zip(walls, offlines, strict=True))
    print(f"server throughput / offline: {offline / wall:.2f}× (rounds: {ratios})")


if __name__ == "__main__":
    main()
