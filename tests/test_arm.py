"""ARM (activation redistribution) and W8A8 quantization: the third design figure.

The oracle is the unmodified float32 engine, itself checked against transformers elsewhere:
ARM must not change the float function, and int8 with ARM must stay close to it where int8
alone does not, on checkpoints with planted outlier channels in the down-projection input.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.calibration import CALIBRATION_FILE, load_calibration, save_calibration
from shardlm.config import ModelConfig
from shardlm.entrypoints.cli import main as cli_main
from shardlm.errors import CheckpointError, ConfigError
from shardlm.layers.arm import ARM_MODES, ArmTransform
from shardlm.layers.hadamard import (
    HadamardPlan,
    fwht,
    hadamard_layout,
    hadamard_matrix,
    hadamard_transform,
    stage_radices,
)
from shardlm.layers.linear import Linear
from shardlm.layers.quant import Fp8Linear, Int8Linear, quantize_int8
from shardlm.models.transforms import WeightTransforms, layer_arm
from shardlm.quality import greedy_tokens, mlp_inputs, mlp_output_errors, token_agreement
from tests.conftest import make_checkpoint

ARMS = [m for m in ARM_MODES if m != "none"]
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
WORDS = [
    "the",
    "model",
    "cache",
    "token",
    "layer",
    "shard",
    "rank",
    "node",
    "attention",
    "value",
    "key",
    "query",
]


@pytest.fixture(autouse=True, scope="module")
def private_cache_dir(tmp_path_factory):
    """calibrate writes, and arm=smooth|both read, a per-user directory too: the tests get
    their own, so a calibration in the real one can neither hide nor replace theirs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARDLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def calibration_text(seed: int = 0, words: int = 4000) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def calibrate(path: Path, tmp_path: Path, capsys=None) -> str:
    data = tmp_path / "calibration.txt"
    data.write_text(calibration_text())
    code = cli_main(
        [
            "calibrate",
            "--model",
            str(path),
            "--data",
            str(data),
            "--samples",
            "16",
            "--seq-len",
            "128",
        ]
    )
    assert code == 0
    assert (path / CALIBRATION_FILE).is_file()
    return capsys.readouterr().out if capsys else ""


def plant_outliers(hf_model, channels: int, seed: int) -> dict[int, list[int]]:
    """Scale ``channels`` rows of each layer's up_proj by 50–100×: those channels of the
    down-projection input become outliers, as in real Llama checkpoints."""
    g = torch.Generator().manual_seed(seed)
    planted = {}
    with torch.no_grad():
        for n, layer in enumerate(hf_model.model.layers):
            width = layer.mlp.up_proj.weight.shape[0]
            chosen = torch.randperm(width, generator=g)[:channels]
            factors = 50 + 50 * torch.rand(channels, generator=g)
            layer.mlp.up_proj.weight[chosen] *= factors[:, None]
            planted[n] = sorted(chosen.tolist())
    return planted


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory):
    """hidden 64, MLP width 256, 4 planted outlier channels per layer; calibrated."""
    path = tmp_path_factory.mktemp("arm-outliers")
    hf = make_checkpoint(path, "llama", {"intermediate_size": 256})
    planted = plant_outliers(hf, channels=4, seed=1)
    hf.save_pretrained(path)
    calibrate(path, tmp_path_factory.mktemp("data"))
    return path, planted


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """No planted outliers; MLP width 192 = 12·16, so the Hadamard is the full-width
    H_12 ⊗ H_16 with a Paley H_12 that is not symmetric (96 = 12·8 per rank at TP=2).
    Calibrated."""
    path = tmp_path_factory.mktemp("arm-plain")
    make_checkpoint(path, "llama", {"intermediate_size": 192})
    calibrate(path, tmp_path_factory.mktemp("data"))
    return path


@pytest.fixture(scope="module")
def bias_ckpt(tmp_path_factory):
    """MLP biases: smoothing must scale the up projection's bias too."""
    path = tmp_path_factory.mktemp("arm-bias")
    make_checkpoint(path, "llama", {"mlp_bias": True, "attention_bias": True})
    calibrate(path, tmp_path_factory.mktemp("data"))
    return path


def greedy(llm: LLM, n: int = 32) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.generate(PROMPT, params)[0].outputs[0].token_ids


# -- the transform itself --
@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 2048])
@pytest.mark.parametrize("max_radix", [2, 8, 64])
def test_fwht_equals_the_sylvester_matrix(n, max_radix):
    """Every radix split (2 = the textbook butterfly) is the same H."""
    x = torch.randn(3, 5, n, dtype=torch.float64)
    h = fwht(x, n, max_radix)
    torch.testing.assert_close(h, x @ hadamard_matrix(n), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(h, n, max_radix), x, rtol=1e-12, atol=1e-12)  # H·H = I


def test_stage_radices_split_the_block_evenly():
    assert stage_radices(1024) == (32, 32)
    assert stage_radices(8192) == (32, 16, 16)
    assert stage_radices(64) == (64,)
    assert stage_radices(1024, 2) == (2,) * 10


def test_block_diagonal_hadamard_for_other_sizes():
    x = torch.randn(4, 192, dtype=torch.float64)
    dense = torch.block_diag(*[hadamard_matrix(64)] * 3)
    torch.testing.assert_close(fwht(x, 64), x @ dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(x, 1), x)
    for bad in (3, 128, 0):
        with pytest.raises(ValueError, match="power of two dividing 192"):
            fwht(x, bad)


@pytest.mark.parametrize(
    "plan",
    [HadamardPlan(1, 32), HadamardPlan(12, 8), HadamardPlan(12, 4), HadamardPlan(1, 1), None],
    ids=str,
)
def test_arm_transform_times_its_fold_is_the_identity(plan):
    """(h·T)·(T⁻¹·W) = h·W for Sylvester blocks, the full-width Paley ⊗ Sylvester H of 96 and
    blocks of it."""
    torch.manual_seed(0)
    w = torch.randn(96, 40, dtype=torch.float64)
    h = torch.randn(7, 96, dtype=torch.float64)
    t = ArmTransform(torch.rand(96, dtype=torch.float64) * 10 + 0.1, plan)
    torch.testing.assert_close(t.apply(h) @ t.fold_into_down(w), h @ w, rtol=1e-10, atol=1e-10)
    assert t.block == (plan.block if plan else 0)


def test_the_fold_is_the_transpose_not_h_itself():
    """A Paley factor is not symmetric: folding H·W (as if H⁻¹ = H) would change the MLP."""
    torch.manual_seed(0)
    plan = HadamardPlan(12, 8)
    w = torch.randn(96, 40, dtype=torch.float64)
    h = torch.randn(7, 96, dtype=torch.float64)
    t = ArmTransform(None, plan)
    dense = hadamard_matrix(96)
    torch.testing.assert_close(t.fold_into_down(w), dense.T @ w)
    wrong = hadamard_transform(w.t(), plan, inverse=True).t()  # H·W
    assert (t.apply(h) @ wrong - h @ w).norm() > 0.1 * (h @ w).norm()


@pytest.mark.parametrize("width", [1536, 11008, 156])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_is_exact_at_real_widths(width, dtype):
    """The full-width H of real MLP widths (1536 = 12·128, 11008 = 172·64) and of 156 (one
    Goethals–Seidel block) with smoothing: h·W unchanged up to rounding."""
    torch.manual_seed(width)
    t = ArmTransform(torch.rand(width, dtype=dtype) * 10 + 0.1, hadamard_layout(width))
    assert t.block == width
    w = torch.randn(width, 24, dtype=dtype) / width**0.5
    h = torch.randn(5, width, dtype=dtype)
    want = h @ w
    got = t.apply(h) @ t.fold_into_down(w)
    assert (got - want).norm() / want.norm() < (1e-12 if dtype == torch.float64 else 1e-5)


# -- quantized linears --
def loaded_linear(k: int, n: int, bias: bool = False) -> Linear:
    lin = Linear(k, n, bias)
    with torch.no_grad():
        lin.weight_t.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def test_int8_roundtrip_is_within_half_a_step():
    x = torch.randn(6, 50) * torch.logspace(-2, 2, 50)
    q, scale = quantize_int8(x, dim=-1)
    assert q.dtype == torch.int8 and scale.shape == (6, 1)
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_linear_int_mm_equals_the_float_emulation(rows):
    torch.manual_seed(0)
    lin = loaded_linear(96, 48, bias=True)
    q = Int8Linear(lin)
    assert q.int_mm  # CPU has an int8 GEMM (torch._int_mm)
    x = torch.randn(rows, 96)
    fast = q(x)
    q.int_mm = False
    torch.testing.assert_close(fast, q(x), rtol=0, atol=1e-5)  # int32 sums are exact
    ref = lin(x)
    assert (fast - ref).norm() / ref.norm() < 0.02


def test_fp8_linear_emulation_matches_scaled_mm():
    torch.manual_seed(0)
    lin = loaded_linear(64, 32)
    q = Fp8Linear(lin)
    x = torch.randn(5, 64)
    emulated = q(x)
    assert (emulated - lin(x)).norm() / lin(x).norm() < 0.08
    q.scaled_mm = True  # the GPU path; this torch also runs _scaled_mm on CPU
    try:
        kernel = q(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm is not available on this build's CPU: {e}")
    torch.testing.assert_close(kernel, emulated, rtol=1e-2, atol=1e-2)  # bf16 output


def dense_linears(config: ModelConfig) -> dict[str, tuple[int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    return {
        "down_proj": (i, h),
        "gate_up_proj": (h, 2 * i),
        "qkv_proj": (h, config.q_size + 2 * config.kv_size),
        "o_proj": (config.q_size, h),
    }


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantization_shrinks_weight_memory_by_what_it_should(outlier_ckpt, scheme):
    path, _ = outlier_ckpt
    config = ModelConfig.from_pretrained(path)
    shapes = dense_linears(config)

    def saved(names) -> int:  # float32 weight → 1-byte weight plus a float32 scale per column
        return config.num_hidden_layers * sum(
            k * n * 4 - (k * n + n * 4) for k, n in (shapes[x] for x in names)
        )

    with LLM(path, dtype="float32") as llm:
        dense = llm.engine.rank_weight_bytes[0]
    with LLM(path, dtype="float32", quantization=scheme) as llm:
        assert llm.engine.rank_weight_bytes[0] == dense - saved(["down_proj"])
    k, n = config.hidden_size, config.vocab_size
    quantized_head = k * n + n * 4
    # The LM head too: its float weight goes, unless a tied embedding still reads it.
    head = quantized_head if config.tie_word_embeddings else quantized_head - k * n * 4
    with LLM(path, dtype="float32", quantization=scheme, quantize_all_linears=True) as llm:
        assert llm.engine.rank_weight_bytes[0] == dense - saved(shapes) + head
        assert (
            type(llm.runner.model.lm_head).__name__
            == type(llm.runner.model.layers[0].mlp.down_proj).__name__
        )
        kinds = {type(m).__name__ for m in llm.runner.model.layers[0].modules()}
        assert {"Int8Linear" if scheme == "int8" else "Fp8Linear"} <= kinds
        assert "Linear" not in kinds  # every linear of the layers was replaced


# -- ARM preserves the float function --
@pytest.mark.parametrize("arm", ARMS)
def test_arm_in_float32_keeps_logits_and_tokens(plain_ckpt, arm):
    with LLM(plain_ckpt, dtype="float32") as llm:
        ref_logits, ref_tokens = llm.prompt_logits(PROMPT), greedy(llm)
    with LLM(plain_ckpt, dtype="float32", arm=arm) as llm:
        model = llm.runner.model
        assert model.layers[0].mlp.hadamard == (HadamardPlan(12, 16) if arm != "smooth" else None)
        if arm != "smooth":
            assert f"arm={arm} (Hadamard 12×16 over the MLP width)" in WeightTransforms(
                arm=arm
            ).describe(model)
        torch.testing.assert_close(llm.prompt_logits(PROMPT), ref_logits, rtol=0, atol=1e-4)
        assert greedy(llm) == ref_tokens


@pytest.mark.parametrize("arm", ["hadamard", "both"])
def test_arm_with_tensor_parallelism_keeps_logits_and_tokens(plain_ckpt, arm):
    with LLM(plain_ckpt, dtype="float32") as llm:
        ref_logits, ref_tokens = llm.prompt_logits(PROMPT), greedy(llm)
    with LLM(plain_ckpt, dtype="float32", arm=arm, tensor_parallel_size=2) as llm:
        torch.testing.assert_close(llm.prompt_logits(PROMPT), ref_logits, rtol=0, atol=1e-4)
        assert greedy(llm) == ref_tokens


def test_smoothing_is_folded_into_the_up_projection_bias(bias_ckpt):
    with LLM(bias_ckpt, dtype="float32") as llm:
        ref_logits, ref_tokens = llm.prompt_logits(PROMPT), greedy(llm)
    with LLM(bias_ckpt, dtype="float32", arm="both") as llm:
        torch.testing.assert_close(llm.prompt_logits(PROMPT), ref_logits, rtol=0, atol=1e-4)
        assert greedy(llm) == ref_tokens


def test_engine_down_proj_input_is_the_transform_inspect_shows(outlier_ckpt):
    """What ``shardlm inspect`` plots as 'after ARM' is what the ARM engine feeds down_proj."""
    from shardlm.calibration import down_proj_inputs

    path, _ = outlier_ckpt

    def inputs(llm: LLM) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        with down_proj_inputs(llm.runner.model, seen.__setitem__):
            llm.prompt_logits(PROMPT)
        return [seen[n] for n in sorted(seen)]

    absmax = load_calibration(path / CALIBRATION_FILE, ModelConfig.from_pretrained(path))
    with LLM(path, dtype="float32") as llm:
        raw = inputs(llm)
        transforms = [
            layer_arm("both", layer.mlp, absmax[n])
            for n, layer in enumerate(llm.runner.model.layers)
        ]
    with LLM(path, dtype="float32", arm="both") as llm:
        online = inputs(llm)
    for h, t, h_arm in zip(raw, transforms, online, strict=True):
        expected = t.apply(h)
        assert (h_arm - expected).norm() / expected.norm() < 1e-5


# -- int8 accuracy with and without ARM --
def mlp_errors(path: Path, configs: dict[str, dict]) -> dict[str, list[float]]:
    """Per-layer MLP output error of each configuration against float32 (quality.py)."""
    with LLM(path, dtype="float32") as base:
        inputs = mlp_inputs(base, PROMPT)
        errors = {}
        for name, kwargs in configs.items():
            with LLM(path, dtype="float32", **kwargs) as llm:
                errors[name] = mlp_output_errors(base, llm, inputs)
    return errors


def token_agreements(path: Path, configs: dict[str, dict], positions: int = 64) -> dict:
    """Share of 64 float32 greedy tokens each configuration predicts (teacher-forced)."""
    with LLM(path, dtype="float32") as base:
        prompt = base.encode_prompt(PROMPT)
        target = greedy_tokens(base, prompt, positions)
    agreement = {}
    for name, kwargs in configs.items():
        with LLM(path, dtype="float32", **kwargs) as llm:
            agreement[name] = token_agreement(llm, prompt, target)
    return agreement


INT8 = {f"int8 arm={arm}": dict(quantization="int8", arm=arm) for arm in ARM_MODES}


def test_arm_rescues_int8_from_planted_outliers(outlier_ckpt):
    path, _ = outlier_ckpt
    errors = mlp_errors(path, INT8)
    agreement = token_agreements(path, INT8)
    print("\nplanted outliers (4 channels × 50–100×), int8 W8A8 down projection:")
    for name in INT8:
        errs = ", ".join(f"{e:.4f}" for e in errors[name])
        print(
            f"  {name:17} MLP rel. error per layer [{errs}]  token agreement {agreement[name]:.3f}"
        )
    none, arm = errors["int8 arm=none"], errors["int8 arm=both"]
    for layer, (e_none, e_arm) in enumerate(zip(none, arm, strict=True)):
        assert e_none >= 4 * e_arm, f"layer {layer}: ARM cut the error only {e_none / e_arm:.1f}×"
    assert agreement["int8 arm=both"] >= 0.9
    assert agreement["int8 arm=none"] < agreement["int8 arm=both"]


def test_arm_never_hurts_int8_much_without_outliers(plain_ckpt):
    errors = mlp_errors(plain_ckpt, INT8)
    print("\nno planted outliers, int8 W8A8 down projection, MLP rel. error per layer:")
    for name in INT8:
        print(f"  {name:17} [{', '.join(f'{e:.4f}' for e in errors[name])}]")
    for arm in ARMS:
        for layer, (e_arm, e_none) in enumerate(
            zip(errors[f"int8 arm={arm}"], errors["int8 arm=none"], strict=True)
        ):
            assert e_arm <= 1.1 * e_none, f"arm={arm} layer {layer}: {e_arm:.4f} vs {e_none:.4f}"


def test_int8_arm_with_tensor_parallelism_and_attention_nodes(outlier_ckpt):
    """The quantized ARM MLP behind the other two figures: TP=2 (Hadamard per rank's slice)
    and attention nodes give the float32 tokens at ≥ 90% of positions, and attention nodes
    change nothing about the MLP (same tokens as without them)."""
    path, _ = outlier_ckpt
    configs = {
        "tp2": dict(quantization="int8", arm="both", tensor_parallel_size=2),
        "nodes": dict(
            quantization="int8", arm="both", attention_nodes=2, attention_transport="in-process"
        ),
    }
    agreement = token_agreements(path, configs)
    assert agreement["tp2"] >= 0.9 and agreement["nodes"] >= 0.9
    with LLM(path, dtype="float32", **configs["nodes"]) as llm:
        with_nodes = greedy(llm)
    with LLM(path, dtype="float32", quantization="int8", arm="both") as llm:
        assert greedy(llm) == with_nodes


# -- calibrate / inspect --
def test_calibration_finds_the_planted_channels(outlier_ckpt):
    path, planted = outlier_ckpt
    tables = load_calibration(path / CALIBRATION_FILE, ModelConfig.from_pretrained(path))
    for n, absmax in enumerate(tables):
        assert sorted(absmax.topk(len(planted[n])).indices.tolist()) == planted[n]


def test_inspect_prints_statistics_and_draws_the_histograms(outlier_ckpt, tmp_path, capsys):
    path, _ = outlier_ckpt
    out = tmp_path / "hist.png"
    argv = ["inspect", "--model", str(path), "--layer", "1", "--prompt", PROMPT]
    assert cli_main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "arm=both" in text  # calibrated checkpoint: the full ARM by default
    rows = {line[:24].strip(): line[24:].split() for line in text.splitlines()[2:5]}
    before, after = (float(v) for v in rows["kurtosis (Gaussian: 3)"])
    assert before > 50 and after < 6
    before, after = (float(v) for v in rows["int8 round-trip error"])
    assert after * 3 < before
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--layer", "2"], "--layer must be in [0, 1] for this model, got 2"),
        (["--layer", "-1"], "--layer must be in [0, 1]"),
    ],
)
def test_inspect_rejects_a_layer_that_does_not_exist(outlier_ckpt, capsys, argv, message):
    path, _ = outlier_ckpt
    assert cli_main(["inspect", "--model", str(path), "--prompt", "x", *argv]) == 2
    assert message in capsys.readouterr().err


def test_calibrate_rejects_bad_data(plain_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for data, message in ((tmp_path / "missing.txt", "is not a file"), (empty, "has no text")):
        argv = ["calibrate", "--model", str(plain_ckpt), "--data", str(data)]
        assert cli_main(argv) == 2
        assert message in capsys.readouterr().err
    argv = ["calibrate", "--model", str(plain_ckpt), "--data", str(empty), "--samples", "0"]
    assert cli_main(argv) == 2
    assert "--samples must be in [1," in capsys.readouterr().err


def test_generate_cli_with_quantization_and_arm(outlier_ckpt, capsys):
    path, _ = outlier_ckpt
    argv = ["generate", "--model", str(path), "--prompt", "def", "--max-tokens", "8"]
    argv += ["--temperature", "0", "--ignore-eos", "--quantization", "int8", "--arm", "both"]
    assert cli_main(argv) == 0
    with LLM(path, dtype="float32", quantization="int8", arm="both") as llm:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        expected = llm.generate("def", params)[0].outputs[0].text
    assert capsys.readouterr().out == "def" + expected + "\n"


# -- bad arguments --
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(arm="rotate"), ValueError, "arm must be one of none, hadamard, smooth, both"),
        (
            dict(quantization="int4"),
            ValueError,
            "quantization must be one of int8, fp8, int8_weight_only or None",
        ),
        (dict(quantize_all_linears=True), ValueError, "needs a quantization"),
        (dict(arm_calibration="x"), ValueError, "only used with arm='smooth' or 'both'"),
        (
            dict(quantize_all_linears=1, quantization="int8"),
            ValueError,
            "quantize_all_linears must be True or False",
        ),
    ],
)
def test_bad_arguments_are_named(plain_ckpt, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(plain_ckpt, **kwargs)


def test_smoothing_without_calibration_says_what_to_run(tmp_path, outlier_ckpt):
    path = tmp_path / "uncalibrated"
    make_checkpoint(path, "llama")
    with pytest.raises(ConfigError, match="run `shardlm calibrate --model"):
        LLM(path, arm="smooth")
    # A calibration made for another model is refused with both shapes named.
    other, _ = outlier_ckpt
    with pytest.raises(CheckpointError, match=r"has shape \[256\], expected \[128\]"):
        LLM(path, arm="both", arm_calibration=other / CALIBRATION_FILE)
    bad = tmp_path / "bad.safetensors"
    save_calibration(bad, [torch.full((128,), float("nan")) for _ in range(2)], {})
    with pytest.raises(CheckpointError, match="non-finite"):
        LLM(path, arm="smooth", arm_calibration=bad)
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LLM(path, arm="smooth", arm_calibration=tmp_path / "junk.safetensors")


def test_fp8_is_refused_on_a_gpu_without_fp8(monkeypatch):
    from shardlm.models import transforms

    monkeypatch.setattr(transforms, "fp8_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(
        ConfigError, match=r"compute capability ≥ 8.9.*has 8.0: use quantization='int8'"
    ):
        transforms.WeightTransforms(quantization="fp8").check_device(torch.device("cuda"))
    transforms.WeightTransforms(quantization="int8").check_device(torch.device("cuda"))


def test_output_paths_are_checked_before_the_model_runs(plain_ckpt, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text(calibration_text())
    missing = str(tmp_path / "no" / "such" / "file")
    for argv in (
        ["calibrate", "--model", str(plain_ckpt), "--data", str(data), "--out", missing],
        ["calibrate", "--model", str(plain_ckpt), "--data", str(data), "--out", str(tmp_path)],
        ["inspect", "--model", str(plain_ckpt), "--layer", "0", "--prompt", "x", "--out", missing],
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "--out" in err and ("does not exist" in err or "is a directory" in err)
    argv = ["inspect", "--model", str(plain_ckpt), "--layer", "0", "--prompt", "x"]
    assert cli_main([*argv, "--arm", "hadamard", "--arm-calibration", str(data)]) == 2
    assert "only used with --arm smooth or both" in capsys.readouterr().err


def test_odd_mlp_width_gets_no_hadamard_and_a_warning(tmp_path, caplog):
    path = tmp_path / "odd"
    make_checkpoint(path, "llama", {"intermediate_size": 75})
    with caplog.at_level("WARNING"), LLM(path, dtype="float32", arm="hadamard") as llm:
        assert llm.runner.model.layers[0].mlp.hadamard is None
    assert "no power-of-two factor" in caplog.text
    with pytest.raises(ValueError, match="arm_calibration must be a path, got int"):
        LLM(path, arm="smooth", arm_calibration=123)


def test_tensor_parallel_ranks_smooth_their_own_slice(outlier_ckpt):
    """Each rank folds the calibration statistics of its own MLP channels: rank r of TP=2 ends
    with exactly the TP=1 folded weights of channels [r·I/2, (r+1)·I/2)."""
    from shardlm.distributed.parallel_state import TPContext
    from shardlm.loader import load_weights
    from shardlm.models.transforms import apply_weight_transforms
    from shardlm.runtime.runner import build_model

    path, _ = outlier_ckpt
    config = ModelConfig.from_pretrained(path)

    def folded(rank: int, world: int, arm: str = "smooth"):
        tp = TPContext(rank=rank, world_size=world)
        model = build_model(config, torch.float32, torch.device("cpu"), 64, tp)
        load_weights(model, path, torch.float32)
        apply_weight_transforms(model, WeightTransforms.resolve(path, arm=arm))
        return model

    full, plain = folded(0, 1), folded(0, 1, "none")
    width = config.intermediate_size
    half = width // 2
    for rank in (0, 1):
        part = folded(rank, 2)
        rows = slice(rank * half, (rank + 1) * half)
        for n in range(config.num_hidden_layers):
            mlp, ref, raw = part.layers[n].mlp, full.layers[n].mlp, plain.layers[n].mlp
            up, up_ref = mlp.gate_up_proj.weight_t[:, half:], ref.gate_up_proj.weight_t[:, width:]
            torch.testing.assert_close(up, up_ref[:, rows], rtol=0, atol=0)
            torch.testing.assert_close(
                mlp.down_proj.weight_t, ref.down_proj.weight_t[rows], rtol=0, atol=0
            )
            assert not torch.equal(up, raw.gate_up_proj.weight_t[:, width:][:, rows])


def test_tensor_parallel_ranks_use_the_plan_of_their_slice(plain_ckpt):
    """MLP width 192 at TP=2: each rank folds the full-width H of its own 96 channels,
    H_12 ⊗ H_8 (not a slice of the 192-wide H_12 ⊗ H_16): its down projection is Hᵀ·W_r."""
    from shardlm.distributed.parallel_state import TPContext
    from shardlm.loader import load_weights
    from shardlm.models.transforms import apply_weight_transforms
    from shardlm.runtime.runner import build_model

    config = ModelConfig.from_pretrained(plain_ckpt)

    def loaded(rank: int, world: int, arm: str):
        tp = TPContext(rank=rank, world_size=world)
        model = build_model(config, torch.float32, torch.device("cpu"), 64, tp)
        load_weights(model, plain_ckpt, torch.float32)
        apply_weight_transforms(model, WeightTransforms.resolve(plain_ckpt, arm=arm))
        return model

    plain = loaded(0, 1, "none")
    dense = torch.kron(hadamard_matrix(12), hadamard_matrix(8))  # H_12 ⊗ H_8
    for rank in (0, 1):
        part = loaded(rank, 2, "hadamard")
        rows = slice(rank * 96, (rank + 1) * 96)
        for n in range(config.num_hidden_layers):
            mlp = part.layers[n].mlp
            assert mlp.hadamard == HadamardPlan(12, 8)
            raw = plain.layers[n].mlp.down_proj.weight_t[rows].double()
            torch.testing.assert_close(
                mlp.down_proj.weight_t.double(), dense.T @ raw, rtol=1e-5, atol=1e-6
            )


def test_width_without_a_construction_gets_blocks_and_a_warning(tmp_path, caplog):
    """MLP width 940 = 4·5·47: no Hadamard of order 188 = 4·47 here, so blocks of 20 (Paley
    I over GF(19)), named in a warning; the float function is unchanged."""
    path = tmp_path / "w940"
    make_checkpoint(path, "llama", {"intermediate_size": 940})
    hadamard_layout.cache_clear()  # the warning is once per width and process
    with LLM(path, dtype="float32") as llm:
        ref_logits = llm.prompt_logits(PROMPT)
    with caplog.at_level("WARNING"), LLM(path, dtype="float32", arm="hadamard") as llm:
        assert llm.runner.model.layers[0].mlp.hadamard == HadamardPlan(20, 1)
        torch.testing.assert_close(llm.prompt_logits(PROMPT), ref_logits, rtol=0, atol=1e-4)
    assert "Hadamard width 940" in caplog.text and "blocks of 20" in caplog.text
    assert caplog.text.count("Hadamard width 940") == 1  # two layers, one warning


def test_quantized_lm_head_with_tied_embeddings(checkpoints):
    """quantize_all_linears quantizes the LM head; with tied embeddings the embedding keeps
    reading the float table and the head is an int8 copy: logits stay close to float32."""
    path, _ = checkpoints["llama-mha-tied"]
    with LLM(path, dtype="float32") as llm:
        want = llm.prompt_logits(PROMPT)
    with LLM(path, dtype="float32", quantization="int8", quantize_all_linears=True) as llm:
        model = llm.runner.model
        assert type(model.lm_head).__name__ == "Int8Linear"
        assert model.embed_tokens.lm_head[0].weight_t.numel() > 0  # the float table stays
        got = llm.prompt_logits(PROMPT)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
