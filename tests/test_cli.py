"""The shardlm command: streaming generate, the built-in demo, one-line errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardlm import LLM, SamplingParams


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 120):
    env = {**os.environ, **(env_extra or {})}
    env.pop("SHARDLM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "shardlm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_generate_streams_text_and_prints_summary(llama_ckpt):
    path, _ = llama_ckpt
    r = run_cli(
        "generate",
        "--model",
        str(path),
        "--prompt",
        "abc",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
    )
    assert r.returncode == 0, r.stderr
    with LLM(path, device="cpu") as llm:
        expected = (
            llm.generate("abc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
            .outputs[0]
            .text
        )
    assert r.stdout == "abc" + expected + "\n"
    summary = r.stderr.strip().splitlines()[-1]
    assert "prompt tokens: 4" in summary and "generated tokens: 12" in summary
    assert "tokens/s" in summary


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/ckpt"], "is not a directory"),
        (["--temperature", "-1"], "temperature must be a number ≥ 0, got -1.0"),
        (["--dtype", "int4"], "dtype 'int4' is not supported"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, llama_ckpt):
    path, _ = llama_ckpt
    full = ["generate", *(["--model", str(path)] if "--model" not in args else []), *args]
    r = run_cli(*full)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_demo_model_is_built_deterministically_and_says_it_is_random(tmp_path):
    def demo_run():
        cache = {"SHARDLM_CACHE": str(tmp_path / "a")}
        return run_cli("generate", "--max-tokens", "8", "--seed", "1", env_extra=cache)

    r = demo_run()
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr and "--model" in r.stderr
    assert r.stdout.startswith("Once upon a time")

    from shardlm.demo import DEMO_NAME, write_demo_checkpoint

    other = tmp_path / "b"
    other.mkdir()
    write_demo_checkpoint(other)

    def digest(d: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}

    built = tmp_path / "a" / DEMO_NAME
    assert digest(built) == digest(other)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(digest(built))
    # The second run reuses the cached checkpoint and, seeded, repeats the same text.
    assert demo_run().stdout == r.stdout


def test_demo_checkpoint_loads_in_transformers(tmp_path):
    """The demo is a genuine HF checkpoint: transformers loads it and agrees on greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardlm.demo import write_demo_checkpoint

    write_demo_checkpoint(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = [0, 72, 101, 108]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    with LLM(tmp_path, device="cpu") as llm:
        ours = llm.runner.prompt_logits(ids)[-1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
