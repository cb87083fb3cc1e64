"""CPU decode tokens/s: shardlm against llama.cpp on the same weights (issue 20's peer).

Builds a random Llama checkpoint with transformers' save_pretrained (default ~188M parameters:
hidden 1024, 12 layers, 16 query / 8 KV heads, intermediate 2304, vocab 32000, untied) and a
synthetic Llama-2-style tokenizer (byte-fallback BPE, "▁" word marker), which llama.cpp's
converter reads as a Llama SentencePiece vocabulary: no BPE pre-tokenizer hash to match. It
converts the checkpoint to GGUF f32, bf16 and q8_0 with convert_hf_to_gguf.py, then times decode
at batch 1, 8 and 32 after a 128-token prompt, 128 new tokens:

* llama.cpp: ``llama-bench -p 0 -n N -d P`` (tg N at depth P) at batch 1, and
  ``llama-batched-bench -npp P -ntg N -npl 8,32`` (its S_TG column) above;
* shardlm: ``shardlm bench --model CKPT --input-len P --output-len N`` (decode steps only, the
  prefill untimed) in float32, bfloat16, int8 W8A8 on every linear and the LM head
  (``--quantization int8 --quantize-all-linears``) and int8 weight-only; both int8 rows face
  llama.cpp's q8_0.

Runs interleave (llama.cpp f32, shardlm float32, llama.cpp bf16, shardlm bfloat16, ...); the
table gives the median (min–max) of the rounds and two ratios, of the medians and of the best
runs (on a shared machine the best run is the least disturbed); both engines get the same
thread count. llama.cpp comes from benchmarks/setup_llama_cpp.sh (built in its own venv, never
in shardlm's). Usage:

    bash benchmarks/setup_llama_cpp.sh                    # once, ~10 minutes
    .venv/bin/python benchmarks/vs_llama_cpp.py [--rounds 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_model_args, make_checkpoint

# shardlm variant -> (the GGUF type it is compared with, its `shardlm bench` flags).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "float32": ("f32", ["--dtype", "float32"]),
    "bfloat16": ("bf16", ["--dtype", "bfloat16"]),
    "int8": ("q8_0", ["--dtype", "float32", "--quantization", "int8", "--quantize-all-linears"]),
    "int8_weight_only": (
        "q8_0",
        ["--dtype", "float32", "--quantization", "int8_weight_only", "--quantize-all-linears"],
    ),
}

# Characters the synthetic merges are built from ("▁" marks a word start, as in Llama 2).
MERGE_ALPHABET = "▁etaoinshrdlucmfwypvbgkqjxzETAOINSHRDLUCMFWYPVBGKQJXZ0123456789.,;:!?'\"()-_"


def write_llama_tokenizer(path: Path, vocab_size: int) -> None:
    """A Llama-2-layout tokenizer.json of exactly ``vocab_size`` tokens: <unk>, <s>, </s>, the
    256 byte-fallback tokens <0x00>..<0xFF>, the merge alphabet, then merged pieces (every
    character followed by one that is not "▁", then those pieces followed by one, ...) in a fixed
    order. It tokenizes any text
    (unknown characters fall back to bytes); its merges are synthetic, not trained."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in MERGE_ALPHABET:
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    level = list(MERGE_ALPHABET)
    while len(vocab) < vocab_size:
        following = []
        for left in level:
            for ch in MERGE_ALPHABET[1:]:  # "▁" only starts a piece
                if len(vocab) >= vocab_size:
                    break
                piece = left + ch
                if piece not in vocab:
                    vocab[piece] = len(vocab)
                    merges.append((left, ch))
                    following.append(piece)
        level = following
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab {vocab_size} is too small for the {len(vocab)} base tokens")

    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 2048,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def prepare(work: Path, args: argparse.Namespace, llama: Path) -> tuple[Path, int]:
    """The checkpoint and its GGUF files under ``work`` (kept and reused when the shape
    matches); returns the checkpoint directory and its parameter count."""
    shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads")}
    shape.update(kv_heads=args.kv_heads, vocab=args.vocab)
    ckpt = work / "checkpoint"
    stamp = work / "shape.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("shape") == shape:
        n_params = json.loads(stamp.read_text())["parameters"]
    else:
        for f in work.glob("model-*.gguf"):
            f.unlink()
        ckpt.mkdir(parents=True, exist_ok=True)
        n_params = make_checkpoint(str(ckpt), args, max_positions=4096)
        write_llama_tokenizer(ckpt, args.vocab)
        stamp.write_text(json.dumps({"shape": shape, "parameters": n_params}))
    converter = llama / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
    for outtype in sorted({VARIANTS[v][0] for v in args.variants}):
        out = work / f"model-{outtype}.gguf"
        if not out.exists():
            print(f"converting to GGUF {outtype} ...", flush=True)
            python = str(llama / "bin/python")
            run([python, str(converter), str(ckpt), "--outtype", outtype, "--outfile", str(out)])
    return ckpt, n_params


def run(cmd: list[str], env: dict | None = None) -> str:
    """Run ``cmd``; return its stdout, or fail with the tail of what it printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{tail}")
    return proc.stdout


def llama_cpp_rates(llama: Path, gguf: Path, args: argparse.Namespace) -> dict[int, float]:
    """Decode tokens/s per batch: llama-bench's tg at depth P for batch 1, llama-batched-bench's
    S_TG (batch × N tokens over the N decode steps) for the others."""
    bin_dir = llama / "llama.cpp-build/bin"
    threads = str(args.threads)
    rates = {}
    if 1 in args.batches:
        tg = ["-p", "0", "-n", str(args.new_tokens), "-d", str(args.prompt_tokens)]
        bench = str(bin_dir / "llama-bench")
        out = run([bench, "-m", str(gguf), *tg, "-t", threads, "-r", "1", "-o", "json"])
        (test,) = [t for t in json.loads(out) if t["n_gen"] == args.new_tokens]
        rates[1] = float(test["avg_ts"])
    larger = [b for b in args.batches if b > 1]
    if larger:
        ctx = max(larger) * (args.prompt_tokens + args.new_tokens)
        lengths = ["-npp", str(args.prompt_tokens), "-ntg", str(args.new_tokens)]
        out = run(
            [
                str(bin_dir / "llama-batched-bench"),
                *("-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512"),
                *("-t", threads, "-tb", threads, *lengths),
                *("-npl", ",".join(map(str, larger)), "--output-format", "jsonl"),
            ]
        )
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                rates[int(row["pl"])] = float(row["speed_tg"])
    return rates


def shardlm_rates(ckpt: Path, variant: str, args: argparse.Namespace) -> dict[int, float]:
    """Decode tokens/s per batch from one ``shardlm bench`` process (one timed run a batch,
    after its untimed warm-up steps)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        lengths = ["--input-len", str(args.prompt_tokens), "--output-len", str(args.new_tokens)]
        run(
            [
                *(
                    sys.executable,
                    "-m",
                    "shardlm",
                    "bench",
                    "--model",
                    str(ckpt),
                    "--device",
                    "cpu",
                ),
                *("--batch-sizes", ",".join(map(str, args.batches)), *lengths),
                *("--repeats", "1", "--json", f.name, *VARIANTS[variant][1]),
            ],
            env=env,
        )
        rows = json.loads(Path(f.name).read_text())["rows"]
    return {int(r["batch"]): float(r["tok_s"]) for r in rows}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-cpp", default="/work/llamacpp-venv", help="setup_llama_cpp.sh's PREFIX")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS), help="shardlm side, comma list")
    p.add_argument("--workdir", default=None, help="keep the checkpoint and GGUFs here (reused)")
    p.add_argument("--quick", action="store_true", help="a ~10M model, one round")
    add_model_args(p)
    p.set_defaults(hidden=1024, intermediate=2304, layers=12, heads=16, kv_heads=8)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 256, 704, 4, 8, 4
        args.vocab, args.rounds = 4096, 1
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    llama = Path(args.llama_cpp)
    if not (llama / "llama.cpp-build/bin/llama-bench").exists():
        p.error(f"no llama.cpp under {llama}: run benchmarks/setup_llama_cpp.sh {llama} first")

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        ckpt, n_params = prepare(work, args, llama)
        load_before = load_average()
        start = time.perf_counter()
        ours: dict[str, list[dict[int, float]]] = {v: [] for v in args.variants}
        theirs: dict[str, list[dict[int, float]]] = {}
        for r in range(args.rounds):
            done_this_round = set()
            for v in args.variants:
                outtype = VARIANTS[v][0]
                if outtype not in done_this_round:
                    print(f"round {r + 1}: llama.cpp {outtype} ...", flush=True)
                    gguf = work / f"model-{outtype}.gguf"
                    theirs.setdefault(outtype, []).append(llama_cpp_rates(llama, gguf, args))
                    done_this_round.add(outtype)
                    print(f"  tok/s by batch: {theirs[outtype][-1]}", flush=True)
                print(f"round {r + 1}: shardlm {v} ...", flush=True)
                ours[v].append(shardlm_rates(ckpt, v, args))
                print(f"  tok/s by batch: {ours[v][-1]}", flush=True)
        minutes = (time.perf_counter() - start) / 60
        load_after = load_average()

    def median(runs: list[dict[int, float]], batch: int) -> float:
        return statistics.median(run[batch] for run in runs)

    def best(runs: list[dict[int, float]], batch: int) -> float:
        return max(run[batch] for run in runs)

    def cell(runs: list[dict[int, float]], batch: int) -> str:
        values = sorted(run[batch] for run in runs)
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{median(runs, batch):.1f} ({values[0]:.1f}–{values[-1]:.1f})"

    print()
    print(
        f"model: {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, intermediate {args.intermediate}, vocab "
        f"{args.vocab}, untied); prompt {args.prompt_tokens}, {args.new_tokens} new tokens; "
        f"{args.threads} threads each; median (min–max) of {args.rounds} interleaved round(s), "
        f"{minutes:.1f} min"
    )
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print(
        "| llama.cpp | shardlm | batch | llama.cpp tok/s | shardlm tok/s | "
        "ratio of medians | ratio of bests |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for v in args.variants:
        outtype = VARIANTS[v][0]
        for b in args.batches:
            mine, peer = ours[v], theirs[outtype]
            of_medians = median(mine, b) / median(peer, b)
            of_bests = best(mine, b) / best(peer, b)
            print(
                f"| {outtype} | {v} | {b} | {cell(peer, b)} | {cell(mine, b)} "
                f"| {of_medians:.2f}× | {of_bests:.2f}× |"
            )


if __name__ == "__main__":
    main()
