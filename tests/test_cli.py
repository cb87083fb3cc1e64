"""The shardlm command: streaming generate, the built-in demo, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

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
