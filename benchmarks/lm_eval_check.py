"""lm-evaluation-harness against ``shardlm serve`` and lm-eval's own hf backend.

Runs three small local tasks (``benchmarks/lm_eval_tasks``: multiple choice,
loglikelihood_rolling, generate_until; data from local JSONL files, found with
``TaskManager(include_path=...)``) with lm-eval's ``local-completions`` model against a
``shardlm serve`` subprocess, and with lm-eval's ``hf`` model (transformers) on the same
checkpoint, both in float32 on the CPU:

* ``tokenizer_backend=huggingface`` (tokenizer=PATH, ``add_bos_token=True``: token ids
  start with BOS, as shardlm's tokenizer encodes text) against hf ``add_bos_token=True``;
  once one request at a time, once with 8 prompts per request and 2 concurrent requests;
* ``tokenizer_backend=auto``, which probes ``/tokenizer_info`` and ``/tokenize`` and must
  pick lm-eval's remote tokenizer (it never adds BOS), against hf ``add_bos_token=False``.
  lm-eval 0.4.13's remote backend turns a BOS of id 0 into EOS as the prefix of
  loglikelihood_rolling (its own bug, see ``make_completions_lm``); the check pins it to BOS.

Prints, for each pairing, task, metric, the shardlm value, the hf value and |difference|,
plus per-request checks (largest loglikelihood difference, is_greedy flags, generations),
and exits 1 if accuracy / exact match / a generation differ at all, a perplexity differs by
more than 1e-3 relative, or a request's loglikelihood by more than 1e-3.

    pip install "lm-eval[api,hf]"     # 0.4.13 checked; leaves torch alone
    .venv/bin/python benchmarks/lm_eval_check.py [--model PATH] [--limit N] [-v]

Without ``--model`` it uses the built-in checkpoint (``shardlm.demo``: a 5.6M Llama with a
real BPE tokenizer). Nothing is downloaded (HF_HUB_OFFLINE). About 20 s on 2 cores (the
first run, compiling lm-eval's modules and caching the datasets, takes up to 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ["shardlm_python_mc", "shardlm_python_ppl", "shardlm_python_gen"]
EXACT = {"acc", "acc_norm", "exact_match"}  # must be identical
RELATIVE = {"word_perplexity", "byte_perplexity", "bits_per_byte"}  # within --rtol
SERVED_NAME = "shardlm-lm-eval"
# (name, tokenizer_backend, batch_size, num_concurrent) of the local-completions runs; the
# huggingface backend sends BOS (add_bos_token=True), lm-eval's remote one never does.
SHARDLM_RUNS = [
    ("shardlm hf-tokenizer", "huggingface", 1, 1),
    ("shardlm remote", "auto", 1, 1),
    ("shardlm hf-tokenizer batched", "huggingface", 8, 2),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def shardlm_server(model: str, port: int, log: Path) -> Iterator[str]:
    """``shardlm serve`` in a subprocess; yields its base URL once /health answers 200."""
    cmd = [sys.executable, "-m", "shardlm", "serve", "--model", model, "--port", str(port)]
    cmd += ["--dtype", "float32", "--device", "cpu", "--served-model-name", SERVED_NAME]
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"shardlm serve exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"shardlm serve not healthy after 180 s:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    """The tasks' ``data_files`` are relative paths, which datasets resolves from the cwd."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def evaluate(lm, limit: int | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    with chdir(TASKS_DIR):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=TASKS,
            task_manager=tm,
            limit=limit,
            bootstrap_iters=0,
            log_samples=True,
            random_seed=0,
        )
    return out


def make_completions_lm(base: str, model: str, backend: str, batch: int = 1, concurrent: int = 1):
    from lm_eval.api.registry import get_model

    args = {
        "base_url": f"{base}/v1/completions",
        "model": SERVED_NAME,
        "tokenizer_backend": backend,
        "tokenized_requests": True,
        "batch_size": batch,
        "num_concurrent": concurrent,
        "max_retries": 1,
        "add_bos_token": True,
        "timeout": 120,
    }
    if backend == "huggingface":
        args["tokenizer"] = model
    lm = get_model("local-completions")(**args)
    if backend == "auto":
        from lm_eval.utils import RemoteTokenizer

        # lm-eval falls back to the huggingface backend when the probe fails: say so.
        if not isinstance(lm.tokenizer, RemoteTokenizer):
            raise RuntimeError(
                "tokenizer_backend=auto did not choose lm-eval's remote tokenizer: shardlm's "
                f"/tokenizer_info or /tokenize probe failed (got {type(lm.tokenizer).__name__})"
            )
        # lm-eval 0.4.13's remote backend takes `bos_token_id or eos_token_id` as the prefix
        # of empty contexts (models/api_models.py:392), so a BOS with id 0 (as here) becomes
        # EOS, while hf uses BOS: loglikelihood_rolling would differ by that first token's
        # conditioning alone. Pin the prefix to BOS, as lm-eval means it to be.
        bos = lm.tokenizer.bos_token_id
        if bos == 0:
            print("note: lm-eval remote tokenizer: BOS id 0 would be replaced by EOS; pinned")
            lm.custom_prefix_token_id = bos
            lm.__dict__.pop("prefix_token_id", None)  # a cached_property
    return lm


def make_hf_lm(model: str, add_bos: bool):
    from lm_eval.api.registry import get_model

    return get_model("hf")(
        pretrained=model, dtype="float32", device="cpu", batch_size=1, add_bos_token=add_bos
    )


def metrics_of(out: dict) -> dict[tuple[str, str], float]:
    res = {}
    for task in TASKS:
        for key, value in out["results"][task].items():
            name, _, filt = key.partition(",")
            if filt and "stderr" not in name and isinstance(value, (int, float)):
                res[(task, name)] = float(value)
    return res


def per_request(a: dict, b: dict) -> list[tuple[str, str, str, bool]]:
    """Compare the logged samples request by request: (task, check, value, ok)."""
    rows = []
    for task in TASKS:
        sa = {s["doc_id"]: s for s in a["samples"][task]}
        sb = {s["doc_id"]: s for s in b["samples"][task]}
        assert sa.keys() == sb.keys(), task
        lls, greedy_diff, greedy_n, gen_diff, gen_n = [], 0, 0, [], 0
        for doc_id in sorted(sa):
            for ra, rb in zip(sa[doc_id]["resps"], sb[doc_id]["resps"], strict=True):
                ra, rb = ra[0], rb[0]
                if isinstance(ra, str):
                    gen_n += 1
                    if ra != rb:
                        gen_diff.append((doc_id, ra, rb))
                elif isinstance(ra, (list, tuple)):
                    lls.append(abs(ra[0] - rb[0]))
                    greedy_n += 1
                    greedy_diff += bool(ra[1]) != bool(rb[1])
                else:
                    lls.append(abs(ra - rb))
        if lls:
            worst = max(lls)
            rows.append((task, "max |Δ loglik| / request", f"{worst:.2e}", worst <= 1e-3))
        if greedy_n:
            rows.append((task, "is_greedy differs", f"{greedy_diff}/{greedy_n}", greedy_diff == 0))
        if gen_n:
            rows.append((task, "generations differ", f"{len(gen_diff)}/{gen_n}", not gen_diff))
            for doc_id, ga, gb in gen_diff[:5]:
                print(f"  {task} doc {doc_id}: shardlm {ga!r} hf {gb!r}")
    return rows


def print_row(task: str, metric: str, a: str, b: str, diff: str, ok: bool) -> None:
    print(f"{task:<20} {metric:<26} {a:>12} {b:>12} {diff:>10}  {'ok' if ok else 'FAIL'}")


def compare(label: str, a: dict, b: dict, rtol: float) -> bool:
    ma, mb = metrics_of(a), metrics_of(b)
    ok_all = True
    print(f"\n== {label} ==")
    print(f"{'task':<20} {'metric':<26} {'shardlm':>12} {'hf':>12} {'|diff|':>10}  ok?")
    for key in sorted(ma.keys() | mb.keys()):
        task, metric = key
        va, vb = ma.get(key, math.nan), mb.get(key, math.nan)
        diff = abs(va - vb)
        if metric in EXACT:
            ok = va == vb
        elif metric in RELATIVE:
            ok = diff <= rtol * abs(vb)
        else:
            ok = diff <= rtol * max(1.0, abs(vb))
        ok_all &= ok
        print_row(task, metric, f"{va:.6f}", f"{vb:.6f}", f"{diff:.2e}", ok)
    for task, check, value, ok in per_request(a, b):
        ok_all &= ok
        print_row(task, check, value, "", "", ok)
    return ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance")
    parser.add_argument("-v", "--verbose", action="store_true", help="show lm-eval's stderr")
    parser.add_argument("--save", help="write both runs' metrics and samples to this JSON file")
    args = parser.parse_args()

    import lm_eval

    if args.model:
        model = str(Path(args.model).resolve())
    else:
        from shardlm.demo import demo_checkpoint

        model = str(demo_checkpoint())
    port = args.port or free_port()
    print(f"lm_eval {lm_eval.__version__}, model {model}, {datetime.date.today()}")

    runs: dict[str, dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        serve_log, eval_log = Path(tmp) / "serve.log", Path(tmp) / "lm_eval.log"
        with open(eval_log, "w") as eval_out:
            quiet = (
                contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(eval_out)
            )
            try:
                with quiet, shardlm_server(model, port, serve_log) as base:
                    for name, backend, batch, concurrent in SHARDLM_RUNS:
                        lm = make_completions_lm(base, model, backend, batch, concurrent)
                        runs[name] = evaluate(lm, args.limit)
                with quiet:
                    for add_bos in (True, False):
                        runs[f"hf bos={add_bos}"] = evaluate(make_hf_lm(model, add_bos), args.limit)
            except Exception:
                eval_out.flush()
                for what, path in (("lm-eval stderr", eval_log), ("shardlm serve", serve_log)):
                    if path.exists():
                        print(f"--- {what} (end) ---\n{path.read_text()[-6000:]}")
                raise
    print(f"\nevaluated in {time.perf_counter() - t0:.0f} s")

    ok = True
    for name, backend, batch, concurrent in SHARDLM_RUNS:
        add_bos = backend == "huggingface"
        label = (
            f"local-completions tokenizer_backend={backend} batch_size={batch} "
            f"num_concurrent={concurrent}  vs  hf add_bos_token={add_bos}"
        )
        ok &= compare(label, runs[name], runs[f"hf bos={add_bos}"], args.rtol)
    if args.save:
        keep = {k: {"results": v["results"], "samples": v["samples"]} for k, v in runs.items()}
        Path(args.save).write_text(json.dumps(keep, indent=1, default=str))
    print("\nOK: shardlm serve and lm-eval's hf backend agree" if ok else "\nMISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
