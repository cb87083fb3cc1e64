"""`shardlm bench` and `load_format="dummy"`: the table, and the bytes-per-step formula the
roofline rests on (timings themselves are never asserted)."""

from __future__ import annotations

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.entrypoints.bench import SHAPES
from shardlm.entrypoints.cli import main as cli_main


def test_bench_prints_the_roofline_table(capsys):
    argv = ["bench", "--shape", "tiny", "--batch-sizes", "1,3", "--input-len", "8"]
    argv += ["--output-len", "6", "--device", "cpu", "--dtype", "float32", "--compare-hf"]
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "copy bandwidth" in lines[0] and "start-up" in lines[0]
    assert "torch kernels, eager" in lines[0] and "capture 0.0 s" in lines[0]
    assert lines[1].split() == [
        "batch",
        "tok/s",
        "ms/step",
        "MB/step",
        "roofline",
        "%",
        "roof",
        "HF",
        "eager",
        "ratio",
    ]
    rows = [line.split() for line in lines[2:4]]
    assert [r[0] for r in rows] == ["1", "3"]
    # Bytes per step: every weight but the embedding table, plus the KV cache at the mean
    # context (8 prompt + 6/2 new tokens) of each sequence.
    s = SHAPES["tiny"]
    h, i, layers, v = (
        s["hidden_size"],
        s["intermediate_size"],
        s["num_hidden_layers"],
        s["vocab_size"],
    )
    d = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    weights = 4 * (layers * per_layer + h + h * v)
    kv_per_token = 2 * layers * kv * 4
    for row, batch in zip(rows, (1, 3), strict=True):
        expected_mb = (weights + batch * 11 * kv_per_token) / 1e6
        assert abs(float(row[3]) - expected_mb) < 0.05


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-sizes", "0"], "--batch-sizes must be positive integers, got '0'"),
        (["--batch-sizes", "1,x"], "--batch-sizes must be positive integers, got '1,x'"),
        (["--output-len", "1"], "--output-len must be ≥ 2"),
        (["--input-len", "0"], "--input-len must be ≥ 1, got 0"),
        (["--hf-output-len", "9"], "--hf-output-len must be in [2, --output-len=4], got 9"),
        (["--compare-hf", "eager,jit"], "--compare-hf takes a comma list of eager, static"),
    ],
)
def test_bench_rejects_bad_arguments(capsys, flags, message):
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--output-len", "4", *flags]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_dummy_weights_need_no_checkpoint_files(tmp_path, llama_ckpt):
    path, _ = llama_ckpt
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with LLM(tmp_path, load_format="dummy") as llm:  # no *.safetensors here
        first = llm.generate("abc", params, use_tqdm=False)[0].outputs[0].token_ids
        norm = llm.runner.model.norm.weight
        assert torch.equal(norm, torch.ones_like(norm))
    with LLM(tmp_path, load_format="dummy") as llm:  # seeded: the same weights again
        assert llm.generate("abc", params, use_tqdm=False)[0].outputs[0].token_ids == first


def test_unknown_load_format_is_named(llama_ckpt):
    path, _ = llama_ckpt
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy, got 'pt'"):
        LLM(path, load_format="pt")
