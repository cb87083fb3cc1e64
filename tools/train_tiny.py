"""Train shardlm's built-in model: a small Llama-architecture code model on the Python standard
library's own source (PSF-licensed, present wherever Python is). Development tool only: the
engine never imports it.

    python tools/train_tiny.py [--out src/shardlm/assets/tiny-code] [--minutes 25] [--seed 0]

A draft model for speculative decoding must share its target's tokenizer id for id, so
--tokenizer DIR reuses DIR's tokenizer.json and tokenizer_config.json instead of learning one:

    python tools/train_tiny.py --tokenizer src/shardlm/assets/tiny-code \
        --out src/shardlm/assets/tiny-code-draft --hidden 128 --intermediate 384 --layers 2 \
        --heads 4 --kv-heads 1 --minutes 12 --threads 1

Steps, all deterministic given the seed, the thread count and the number of steps. A
--minutes budget sets the number of steps from the speed of the first 20 (recorded as
"steps" in training.json); to repeat a run exactly, pass that number: --steps N --minutes 1e9.

1. Corpus: every ``.py`` file under this interpreter's stdlib directory, in sorted order,
   except ``site-packages``, the test suites (``test/``, ``tests/``, ``idle_test/``) and the
   held-out files in HELD_OUT (used only for evaluation).
2. Tokenizer: byte-level BPE (shardlm.byte_tokenizer: ids 0/1 = BOS/EOS, 2..257 bytes, then
   merges learnt on the first --tokenizer-mb of the corpus) with --vocab entries in total; or,
   with --tokenizer DIR, DIR's tokenizer files copied as they are (--vocab and --tokenizer-mb
   then unused; BOS/EOS ids read from them).
3. Model: transformers' LlamaForCausalLM (RMSNorm, RoPE, GQA, SwiGLU; the architecture the
   engine serves), trained by the plain loop below: AdamW, linear warm-up then cosine decay,
   random windows of --seq-len tokens, for --minutes of wall time or --steps steps.
4. Output: config.json, model.safetensors (bfloat16, to keep the package small),
   tokenizer.json, tokenizer_config.json (with a chat template), and training.json (the
   arguments, data sizes, loss curve and held-out perplexity).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

# Held out from training, for perplexity: small, self-contained, ordinary Python.
HELD_OUT = ("bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "shlex.py", "textwrap.py")
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of this interpreter's stdlib, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_PARTS & set(rel.parts[:-1]):
            continue
        (held if str(rel) in HELD_OUT else train).append(f)
    return train, held


def read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def encode_all(tokenizer, texts: list[str], eos: int) -> torch.Tensor:
    """One long stream: each file's tokens (after BOS) followed by EOS."""
    ids: list[int] = []
    for batch_start in range(0, len(texts), 256):
        for enc in tokenizer.encode_batch(texts[batch_start : batch_start + 256]):
            ids.extend(enc.ids)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(src: Path, out: Path) -> dict[str, str]:
    """Copy ``src``'s tokenizer files into ``out`` byte for byte, so that a draft model and its
    target agree on every id, special token and chat template; returns name -> sha256 for the log.
    """
    digests = {}
    for name in TOKENIZER_FILES:
        if (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
        digests[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return digests


def special_id(tokenizer, config: dict, key: str) -> int:
    """Id of the ``bos_token``/``eos_token`` named in tokenizer_config.json (a string, or an
    AddedToken dict), so a copied tokenizer need not use shardlm's fixed ids."""
    token = config[key]
    token_id = tokenizer.token_to_id(token["content"] if isinstance(token, dict) else token)
    if token_id is None:
        raise SystemExit(f"{key} {token!r} is not in the tokenizer's vocabulary")
    return token_id


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the held-out stream."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(data) - 1, max_windows * seq_len), seq_len):
        window = data[start : start + seq_len + 1].long()[None]
        if window.shape[1] < 2:
            break
        logits = model(window[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += window.shape[1] - 1
    model.train()
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="src/shardlm/assets/tiny-code")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=25.0, help="wall-time budget for training")
    p.add_argument("--steps", type=int, default=100_000, help="upper bound on optimizer steps")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="directory whose tokenizer.json + tokenizer_config.json to reuse (e.g. a draft\n"
        "model's target) instead of learning a BPE",
    )
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokenizer-mb", type=float, default=8.0, help="corpus MB the BPE sees")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenizers import Tokenizer
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from shardlm.byte_tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, build_byte_level_tokenizer

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_files, held_files = stdlib_files()
    if args.max_files:
        train_files = train_files[: args.max_files]
    train_texts, held_texts = read(train_files), read(held_files)
    corpus_mb = sum(len(t) for t in train_texts) / 1e6
    print(f"corpus: {len(train_files)} files, {corpus_mb:.1f} MB; held out: {HELD_OUT}")

    start = time.perf_counter()
    if args.tokenizer is not None:
        tokenizer_log: dict[str, object] = {
            "source": str(args.tokenizer),
            "sha256": copy_tokenizer(args.tokenizer, out),
        }
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        tok_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        bos_id = special_id(tokenizer, tok_config, "bos_token")
        eos_id = special_id(tokenizer, tok_config, "eos_token")
    else:
        sample, size = [], 0
        for text in train_texts:  # the BPE learns on the first --tokenizer-mb of the corpus
            if size > args.tokenizer_mb * 1e6:
                break
            sample.append(text)
            size += len(text)
        build_byte_level_tokenizer(
            out, extra_merges_corpus="\n".join(sample), num_merges=args.vocab - BYTE_VOCAB_SIZE
        )
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        tokenizer_log = {"source": "learnt", "tokenizer_mb": args.tokenizer_mb}
        bos_id, eos_id = BOS_ID, EOS_ID
    vocab = tokenizer.get_vocab_size()
    train_ids = encode_all(tokenizer, train_texts, eos_id)
    held_ids = encode_all(tokenizer, held_texts, eos_id)
    print(
        f"tokenizer ({tokenizer_log['source']}): {vocab} entries in "
        f"{time.perf_counter() - start:.0f}s; "
        f"{len(train_ids) / 1e6:.1f}M training tokens, {len(held_ids) / 1e3:.0f}k held out"
    )

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    model = LlamaForCausalLM(config).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    budget = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[tuple[int, float]] = []
    bar = tqdm(total=args.steps, desc="training", unit="step")
    began = time.perf_counter()
    step = 0
    # The learning-rate schedule needs a length: estimated from the first 20 steps' speed.
    planned = args.steps
    while step < planned:
        if step == 20:
            per_step = (time.perf_counter() - began) / 20
            planned = min(args.steps, int(budget / per_step))
            bar.total = planned
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup:
            progress = (step - args.warmup) / max(1, planned - args.warmup)
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts]).long()
        batch = batch.to(args.device)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            losses.append((step, round(loss.item(), 4)))
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        bar.update(1)
    bar.close()
    minutes = (time.perf_counter() - began) / 60
    ppl = perplexity(model, held_ids.to(args.device), args.seq_len)
    print(f"trained {step} steps in {minutes:.1f} min; held-out perplexity {ppl:.2f}")

    model.to(torch.bfloat16).save_pretrained(out)
    log = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "tokenizer": tokenizer_log,
        "train_files": len(train_files),
        "train_tokens": len(train_ids),
        "held_out_files": list(HELD_OUT),
        "held_out_tokens": len(held_ids),
        "parameters": params,
        "steps": step,
        "minutes": round(minutes, 1),
        "held_out_perplexity_float32": round(ppl, 3),
        "loss_every_10_steps": losses,
    }
    (out / "training.json").write_text(json.dumps(log, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
