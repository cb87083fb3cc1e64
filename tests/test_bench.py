"""`shardlm bench` and `load_format="dummy"`: the table, the JSON, the bytes-per-step formula
the roofline rests on, and what is timed (timings themselves are never asserted: a step-counting
clock stands in for time where the structure of a measurement is checked)."""

from __future__ import annotations

import json
import re
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.entrypoints.bench import (
    SHAPES,
    hf_decode_rates,
    measure,
    rate_cell,
    seconds,
    shape_checkpoint,
)
from shardlm.entrypoints.cli import main as cli_main

CELL = re.compile(r"([\d,.]+) \(([\d,.]+)–([\d,.]+)\)")  # median (min–max)


def cells(line: str) -> list[tuple[float, float, float]]:
    """The (median, min, max) cells of a table line, in order."""
    return [
        tuple(float(x.replace(",", "")) for x in m.groups())  # type: ignore[misc]
        for m in CELL.finditer(line)
    ]


def test_bench_prints_the_roofline_table_and_json(capsys, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--shape", "tiny", "--batch-sizes", "1,3", "--input-len", "8"]
    argv += ["--output-len", "6", "--device", "cpu", "--dtype", "float32", "--compare-hf"]
    argv += ["--warmup-steps", "2", "--repeats", "3", "--json", str(out)]
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "copy bandwidth" in lines[0] and "start-up" in lines[0]
    assert "torch kernels, eager" in lines[0] and "capture 0 ms" in lines[0]
    assert "2 untimed warm-up decode steps, then 3 timed runs" in lines[1]
    assert "median (min–max)" in lines[1]
    head = "batch tok/s (min–max) ms/step MB/step roofline % roof HF eager (min–max) ratio"
    assert " ".join(lines[2].split()) == head
    rows = [line.split() for line in lines[3:5]]
    assert [r[0] for r in rows] == ["1", "3"]
    record = json.loads(out.read_text())
    assert (record["warmup_steps"], record["repeats"]) == (2, 3)
    for line, row in zip(lines[3:5], record["rows"], strict=True):
        for key in ("tok_s", "hf_eager"):
            runs = row[f"{key}_runs"]
            assert len(runs) == 3
            assert (row[f"{key}_min"], row[key], row[f"{key}_max"]) == (
                min(runs),
                sorted(runs)[1],
                max(runs),
            )
        assert row["timed_steps"] == [5, 5, 5]  # output-len 6: the first token is the prefill's
        assert row["hf_eager_ratio"] == pytest.approx(row["tok_s"] / row["hf_eager"])
        shardlm_cell, hf_cell = cells(line)
        assert shardlm_cell[1] <= shardlm_cell[0] <= shardlm_cell[2]
        assert hf_cell[0] == pytest.approx(row["hf_eager"], rel=0.01, abs=0.1)
        assert float(line.split()[-1].rstrip("×")) == pytest.approx(row["hf_eager_ratio"], abs=0.01)
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
        assert abs(float(row[4]) - expected_mb) < 0.05


def test_warm_up_steps_are_run_and_not_timed(tmp_path):
    """A clock that reads the number of engine steps so far: each timed run must span exactly
    its decode steps (output_len − 1), and the warm-up's steps must have run outside them."""
    from shardlm.engine.llm_engine import LLMEngine

    path = shape_checkpoint("tiny", tmp_path, 64)
    engine = LLMEngine(
        path,
        dtype="float32",
        device="cpu",
        skip_tokenizer_init=True,
        load_format="dummy",
        enable_prefix_caching=False,
    )
    steps = {"all": 0, "timed": 0}
    real_step = engine.step
    readings = []

    def step():
        steps["all"] += 1
        return real_step()

    def clock() -> float:
        readings.append(steps["all"])
        if len(readings) % 2 == 0:
            steps["timed"] += readings[-1] - readings[-2]
        return float(steps["all"])

    engine.step = step
    args = Namespace(input_len=8, output_len=6, warmup_steps=3, repeats=2)
    try:
        rows = measure(engine, [1, 3], args, clock)
    finally:
        engine.shutdown()
    for row, batch in zip(rows, (1, 3), strict=True):
        assert row["timed_steps"] == [5, 5]
        # One "second" per step: tokens per second is tokens per step, the batch.
        assert row["tok_s_runs"] == [batch, batch]
        assert row["ms_step"] == 1000
    assert steps["timed"] == 2 * 2 * 5
    # Untimed: each run's prefill step, and the warm-up's own prefill and 3 decode steps.
    assert steps["all"] - steps["timed"] >= 2 * (2 + 1 + 3)


def test_transformers_warm_up_call_is_not_in_its_rates():
    """A fake model whose generate costs one clock unit per new token, and 100 more the first
    time (the compile): every rate must be the batch, the first call's time reported apart."""
    now = {"t": 0.0, "calls": 0}

    def generate(ids, max_new_tokens, min_new_tokens, **kwargs):
        now["t"] += max_new_tokens + (100 if now["calls"] == 0 else 0)
        now["calls"] += 1

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=50), generate=generate)
    cpu = torch.device("cpu")
    rates, first = hf_decode_rates(model, "eager", 4, 8, 11, cpu, 3, lambda: now["t"])
    assert rates == [4, 4, 4]
    assert first == 111
    assert now["calls"] == 1 + 2 * 3  # the warm-up, then a prefill and a full run per repeat


def test_cells_show_median_and_range_and_short_times_are_not_rounded_to_zero():
    row = {"tok_s": 312.4, "tok_s_min": 305.2, "tok_s_max": 1320.7}
    assert rate_cell(row, "tok_s") == "312 (305–1,321)"
    row = {"hf_eager": 13.72, "hf_eager_min": 13.5, "hf_eager_max": 14.04}
    assert rate_cell(row, "hf_eager") == "13.7 (13.5–14.0)"
    assert seconds(0.042) == "42 ms" and seconds(2.345) == "2.3 s"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-sizes", "0"], "--batch-sizes must be positive integers, got '0'"),
        (["--batch-sizes", "1,x"], "--batch-sizes must be positive integers, got '1,x'"),
        (["--output-len", "1"], "--output-len must be ≥ 2"),
        (["--input-len", "0"], "--input-len must be ≥ 1, got 0"),
        (["--hf-output-len", "9"], "--hf-output-len must be in [2, --output-len=4], got 9"),
        (["--compare-hf", "eager,jit"], "--compare-hf takes a comma list of eager, static"),
        (["--repeats", "0"], "--repeats must be ≥ 1, got 0"),
        (["--warmup-steps", "-1"], "--warmup-steps must be ≥ 0, got -1"),
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
