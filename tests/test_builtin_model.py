"""The built-in model (tiny-code, trained by tools/train_tiny.py on the Python stdlib) and
`shardlm eval`: it is a real Hugging Face checkpoint, it has learnt something, and the
training tool reproduces a loadable checkpoint deterministically."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.demo import BUILTIN_DIR, DEFAULT_PROMPT, demo_checkpoint
from shardlm.entrypoints.cli import main as cli_main
from shardlm.quality import perplexity

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = STDLIB / "heapq.py"  # one of tools/train_tiny.py's HELD_OUT files


def test_builtin_model_is_shipped_and_small():
    path = demo_checkpoint()
    assert path == BUILTIN_DIR
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 20 * 2**20
    log = json.loads((path / "training.json").read_text())
    assert "heapq.py" in log["held_out_files"]


def test_held_out_perplexity_is_far_below_chance():
    """A model that learnt nothing scores about the vocabulary size (4096); the threshold is
    a tenth of that, and the trained model is far below it."""
    held_out = json.loads((BUILTIN_DIR / "training.json").read_text())["held_out_files"]
    with LLM(demo_checkpoint(), dtype="float32", device="cpu") as llm:
        documents = [llm.tokenizer.encode((STDLIB / f).read_text())[:2048] for f in held_out]
        result = perplexity(llm, documents, 512)
        vocab = llm.config.vocab_size
    print(f"\nheld-out perplexity of the built-in model: {result.value:.2f}")
    assert result.value < vocab / 10
    assert result.documents == 6


def test_transformers_agrees_on_greedy_tokens():
    from transformers import AutoModelForCausalLM

    path = demo_checkpoint()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with LLM(path, dtype="float32", device="cpu") as llm:
        prompt = llm.encode_prompt(DEFAULT_PROMPT)
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        ours = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32
        )
    assert ours == out[0, len(prompt) :].tolist()


def test_generate_defaults_to_the_builtin_model(capsys):
    assert cli_main(["generate", "--max-tokens", "24", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "tiny-code" in captured.err
    assert captured.out.startswith(DEFAULT_PROMPT) and len(captured.out) > len(DEFAULT_PROMPT) + 8


def test_eval_cli_reports_perplexity(capsys):
    argv = ["eval", "--data", str(HELD_OUT), "--max-tokens", "600", "--window", "300"]
    assert cli_main(argv) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ")
    assert "over 598 tokens (2 windows of ≤300, 1 documents)" in line
    assert cli_main([*argv, "--quantization", "int8", "--arm", "hadamard"]) == 0
    assert "arm=hadamard" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", str(HELD_OUT), "--attention-backend", "triton"], "do not apply to it"),
        (["--data", "/no/such/place"], "is neither a file nor a directory"),
        (["--data", str(ROOT / "docs" / "images")], "has no .py/.txt/.md files"),
        (["--data", str(HELD_OUT), "--window", "1"], "--window must be ≥ 2"),
    ],
)
def test_eval_cli_rejects_bad_input(capsys, argv, message):
    assert cli_main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_training_tool_is_deterministic_and_its_output_loads(tmp_path):
    """A miniature run of tools/train_tiny.py, twice: byte-identical checkpoints, which both
    engines load."""
    tiny = ["--max-files", "12", "--steps", "3", "--batch", "2", "--seq-len", "32"]
    tiny += ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2"]
    tiny += ["--kv-heads", "1", "--vocab", "300", "--tokenizer-mb", "0.05", "--warmup", "2"]
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "train_tiny.py"), "--out", str(out), *tiny],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with LLM(tmp_path / "a", dtype="float32", device="cpu") as llm:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate("def", params, use_tqdm=False)[0].outputs[0].token_ids) == 4
