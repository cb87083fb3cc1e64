"""Calibrated fp8 KV scales: `shardlm calibrate` records max |k| (after RoPE) and max |v| per
layer and KV head; kv_cache_dtype="fp8" then stores K/V at s = 2·max/448 per layer on every
pool (local, tensor-parallel ranks, attention nodes, scoring), else at 1.0 as before.

The "loud" checkpoint multiplies k_proj and v_proj by 2000 and divides q_proj and o_proj by
as much: the same function in exact arithmetic, with K/V ten times past e4m3's ±448."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardlm import LLM, SamplingParams
from shardlm.attention.contiguous import ContiguousAttention
from shardlm.cache.contiguous import ContiguousKVCache
from shardlm.cache.kv_quant import FP8_MAX, FP8_SCALE_MARGIN
from shardlm.calibration import (
    CALIBRATION_FILE,
    load_calibration,
    load_kv_absmax,
    save_calibration,
    token_windows,
)
from shardlm.config import ModelConfig
from shardlm.engine_config import EngineConfig
from shardlm.entrypoints.cli import main as cli_main
from shardlm.errors import CheckpointError
from shardlm.runtime.kv_scales import fp8_kv_scales
from shardlm.step_inputs import StepInputs
from tests.conftest import make_checkpoint

LOUD = 2000.0
SAMPLES, SEQ_LEN = 3, 48
CALIBRATE = ["--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), "--device", "cpu"]
CPU = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A per-user cache of the module's own (the real one is never read or written), a
    calibration text, and the loud checkpoint: uncalibrated, and calibrated (a copy)."""
    root = tmp_path_factory.mktemp("kv_scales")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARDLM_CACHE_DIR", str(root / "cache"))
        plain = root / "plain"
        make_checkpoint(plain, "llama", seed=3)
        weights = load_file(plain / "model.safetensors")
        for name in weights:
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                weights[name] = weights[name] * LOUD
            elif name.endswith(("q_proj.weight", "o_proj.weight")):
                weights[name] = weights[name] / LOUD
        save_file(weights, str(plain / "model.safetensors"), metadata={"format": "pt"})
        (root / "data.txt").write_text(Path(__file__).read_text())
        shutil.copytree(plain, root / "calibrated")
        argv = ["calibrate", "--model", str(root / "calibrated"), "--data", str(root / "data.txt")]
        assert cli_main(argv + CALIBRATE) == 0
        yield root


@pytest.fixture(autouse=True)
def cache_dir(work, monkeypatch) -> None:
    monkeypatch.setenv("SHARDLM_CACHE_DIR", str(work / "cache"))


def prompt() -> list[int]:
    return torch.randint(2, 258, (60,), generator=torch.Generator().manual_seed(5)).tolist()


def test_recorded_max_k_and_v_are_what_the_attention_receives(work):
    """max |k|, |v| per layer and head equal those an attention backend is handed (k after
    RoPE) over calibrate's windows, measured here by another route than calibrate's hook."""
    recorded = load_kv_absmax(
        work / "calibrated" / CALIBRATION_FILE, ModelConfig.from_pretrained(work / "plain")
    )
    assert recorded is not None
    with LLM(work / "plain", **CPU) as llm:
        text = (work / "data.txt").read_text()
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        windows = token_windows(ids, SEQ_LEN, SAMPLES)
        runner, c = llm.runner, llm.config
        seen = {which: [torch.zeros(c.num_key_value_heads)] * c.num_hidden_layers for which in "kv"}

        class Watching(ContiguousAttention):
            def attend(self, layer, q, k, v):
                for which, x in (("k", k), ("v", v)):
                    m = x.float().abs().amax(dim=(0, 2))
                    seen[which][layer] = torch.maximum(seen[which][layer], m)
                return super().attend(layer, q, k, v)

        for window in windows:
            n = len(window)
            cache = ContiguousKVCache(
                c.num_hidden_layers, c.num_key_value_heads, c.head_dim, n, torch.float32, "cpu"
            )
            attn = Watching(cache, runner.scale, c.sliding_windows)
            attn.begin_step(StepInputs.prompt(n))
            with torch.inference_mode():
                runner.model(torch.tensor(window), torch.arange(n), attn)
    for which, tables in zip("kv", recorded, strict=True):
        for layer, table in enumerate(tables):
            assert torch.allclose(table, seen[which][layer], rtol=1e-5), (which, layer)
    assert float(recorded[0][0].max()) > FP8_MAX  # the loud checkpoint is loud


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def test_calibrated_scales_store_what_unit_scales_saturate(work, caplog):
    """Unit scales clamp K/V at ±448 (logits ~100% off); calibrated ones keep fp8's few
    percent, in the scoring path and in the paged pool (prompt logprobs of a chunked prefill,
    which reads earlier chunks back from the pool)."""
    ids = prompt()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    chunked = dict(max_num_batched_tokens=16, enable_prefix_caching=False)

    def run(path: Path, **kw) -> tuple[torch.Tensor, torch.Tensor, LLM]:
        with LLM(path, **CPU, **chunked, **kw) as llm:
            logits = llm.prompt_logits(ids)
            out = llm.generate([ids], params, use_tqdm=False)[0]
            lp = torch.tensor(
                [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
            )
            cache = llm.runner.kv_cache
            scales = cache.k_scale, cache.v_scale  # None for the unquantized pool
        return logits, lp, scales

    ref_logits, ref_lp, _ = run(work / "plain")
    with caplog.at_level("INFO", logger="shardlm.runtime.kv_scales"):
        unit_logits, unit_lp, unit_scales = run(work / "plain", kv_cache_dtype="fp8")
        cal_logits, cal_lp, cal_scales = run(work / "calibrated", kv_cache_dtype="fp8")
    assert "scales 1.0 (no calibration file" in caplog.text
    assert f"calibrated scales from {work / 'calibrated' / CALIBRATION_FILE}" in caplog.text
    assert all(torch.equal(s, torch.ones(2)) for s in unit_scales)
    k_absmax, v_absmax = load_kv_absmax(
        work / "calibrated" / CALIBRATION_FILE, ModelConfig.from_pretrained(work / "plain")
    )
    for scale, absmax in zip(cal_scales, (k_absmax, v_absmax), strict=True):
        want = torch.tensor([FP8_SCALE_MARGIN * float(a.max()) / FP8_MAX for a in absmax])
        assert torch.equal(scale, want)
    assert relative_error(unit_logits, ref_logits) > 0.5
    assert relative_error(cal_logits, ref_logits) < 0.1
    # Mean |Δ log p| of the prompt's tokens (a log p near −5.5: the model is random).
    assert (unit_lp - ref_lp).abs().mean() > 0.3
    assert (cal_lp - ref_lp).abs().mean() < 0.05


def test_tensor_parallel_and_attention_nodes_use_the_same_scales(work):
    """Every rank's pool and every attention node's get the layer's scale (one for all KV
    heads), so TP=2 and nodes give TP=1's tokens; a rank left at 1.0 would saturate."""
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    path, fp8 = work / "calibrated", dict(kv_cache_dtype="fp8", **CPU)
    with LLM(path, **fp8) as llm:
        want = llm.generate([prompt()], greedy, use_tqdm=False)[0].outputs[0].token_ids
        scales = llm.runner.kv_cache.k_scale.clone()
    assert not torch.equal(scales, torch.ones_like(scales))
    with LLM(path, tensor_parallel_size=2, **fp8) as llm:
        assert llm.generate([prompt()], greedy, use_tqdm=False)[0].outputs[0].token_ids == want
    with LLM(path, attention_nodes=2, attention_transport="in-process", **fp8) as llm:
        for node in llm.runner.attention.local_nodes():
            assert torch.equal(node.cache.k_scale, scales)
        assert llm.generate([prompt()], greedy, use_tqdm=False)[0].outputs[0].token_ids == want


def test_old_calibration_files_load_and_leave_unit_scales(work, tmp_path):
    """A file from before KV statistics: smoothing still reads it; fp8 keeps 1.0 (as a
    draft model does: it runs with its own path, so its own calibration or none)."""
    config = ModelConfig.from_pretrained(work / "plain")
    tables = load_calibration(work / "calibrated" / CALIBRATION_FILE, config)
    old = tmp_path / "old"
    shutil.copytree(work / "plain", old)
    save_calibration(old / CALIBRATION_FILE, tables, {"tokens": 1})
    assert load_kv_absmax(old / CALIBRATION_FILE, config) is None
    assert len(load_calibration(old / CALIBRATION_FILE, config)) == config.num_hidden_layers
    engine = EngineConfig.from_kwargs(model=str(old), kv_cache_dtype="fp8", device="cpu").resolve()
    assert fp8_kv_scales(engine, config).is_unit
    assert fp8_kv_scales(engine.replace(kv_cache_dtype="int8"), config) is None  # not read
    # The file ARM smoothing was given is the one read: here the old one, so 1.0 again.
    given = EngineConfig.from_kwargs(
        model=str(work / "calibrated"),
        kv_cache_dtype="fp8",
        arm="smooth",
        arm_calibration=str(old / CALIBRATION_FILE),
        device="cpu",
    ).resolve()
    assert fp8_kv_scales(given, config).is_unit
    assert not fp8_kv_scales(given.replace(arm="none", arm_calibration=None), config).is_unit


def test_bad_kv_statistics_are_refused_naming_the_tensor(work, tmp_path):
    config = ModelConfig.from_pretrained(work / "plain")
    tables = load_calibration(work / "calibrated" / CALIBRATION_FILE, config)
    heads = config.num_key_value_heads
    partial = tmp_path / "partial.safetensors"
    save_calibration(partial, tables, {}, ([torch.ones(heads)], [torch.ones(heads)]))
    with pytest.raises(CheckpointError, match=r"no 'layers\.1\.self_attn\.k_absmax'"):
        load_kv_absmax(partial, config)
    shape = tmp_path / "shape.safetensors"
    save_calibration(shape, tables, {}, ([torch.ones(heads + 1)] * 2, [torch.ones(heads)] * 2))
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.k_absmax has shape \[3\]"):
        load_kv_absmax(shape, config)
    bad = tmp_path / "nan.safetensors"
    save_calibration(
        bad, tables, {}, ([torch.ones(heads)] * 2, [torch.full((heads,), float("nan"))] * 2)
    )
    with pytest.raises(CheckpointError, match=r"v_absmax has negative or non-finite"):
        load_kv_absmax(bad, config)
