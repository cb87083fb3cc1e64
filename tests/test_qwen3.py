"""Qwen3 dense (Qwen3ForCausalLM): per-head q/k RMSNorm before RoPE, an explicit head_dim,
Qwen's sliding-window fields. transformers is the oracle, on tiny random checkpoints whose
q_norm / k_norm weights are random (conftest.make_checkpoint); the plain single-process
parity (logits and 64 greedy tokens) runs in test_model_parity.py over conftest.VARIANTS.
Here: tensor parallelism, attention nodes, ARM/int8, the Triton path, config parsing and bad
checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

DEVICE = os.environ.get("SHARDLM_KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    # Triton's interpreter runs the kernels on CPU; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shardlm import LLM, SamplingParams  # noqa: E402
from shardlm.config import ModelConfig  # noqa: E402
from shardlm.errors import CheckpointError, ConfigError  # noqa: E402
from shardlm.quality import greedy_tokens, token_agreement  # noqa: E402
from tests.conftest import make_checkpoint  # noqa: E402
from tests.test_model_parity import hf_greedy  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
# head_dim 32 while hidden / heads = 8; 8 query heads over 2 KV heads, so TP=2 splits both.
QWEN3 = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, 258, (n,), generator=g).tolist() for n in (40, 9, 23)]


def tokens(path, batch=None, **kwargs) -> list[list[int]]:
    batch = batch or prompts()
    with LLM(path, dtype="float32", device="cpu", **kwargs) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A Qwen3 checkpoint and transformers' greedy tokens for prompts()."""
    path = tmp_path_factory.mktemp("qwen3")
    hf = make_checkpoint(path, "qwen3", QWEN3, seed=3)
    return path, hf, [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts()]


def test_checkpoint_has_what_makes_it_qwen3(qwen3):
    """Guards the oracle: head_dim ≠ hidden / heads and random, distinct q/k norm weights."""
    path, hf, _ = qwen3
    attn = hf.model.layers[0].self_attn
    assert attn.head_dim == 32 != hf.config.hidden_size // hf.config.num_attention_heads
    assert not torch.equal(attn.q_norm.weight, attn.k_norm.weight)
    assert not torch.equal(attn.q_norm.weight, torch.ones(32))
    config = ModelConfig.from_pretrained(path)
    assert config.qk_norm and config.head_dim == 32
    assert not (config.qkv_bias or config.o_bias)


def test_attention_bias_is_honoured(tmp_path):
    """Qwen3's attention_bias puts biases on q, k, v and o (Llama's rule, not Qwen2's)."""
    hf = make_checkpoint(tmp_path, "qwen3", {**QWEN3, "attention_bias": True})
    with torch.no_grad():  # HF zero-initialises biases: make them matter
        for layer in hf.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    ids = prompts()[0]
    with LLM(tmp_path, dtype="float32", device="cpu") as llm:
        assert llm.config.qkv_bias and llm.config.o_bias
        ours = llm.prompt_logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_tensor_parallel_2_matches_transformers(qwen3):
    """q_norm / k_norm replicated on both ranks (each [head_dim]); heads and KV heads split."""
    path, _, want = qwen3
    assert tokens(path, tensor_parallel_size=2) == want
    with LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2) as llm:
        ours = llm.prompt_logits(prompts()[0])
    with LLM(path, dtype="float32", device="cpu") as one:
        ref = one.prompt_logits(prompts()[0])
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize(
    "node_args",
    [
        dict(attention_nodes=2, kv_chunk_size=5, attention_transport="in-process"),
        dict(
            attention_nodes=3,
            kv_chunk_size=1,
            tensor_parallel_size=2,
            attention_transport="in-process",
        ),
        dict(attention_nodes=2, kv_chunk_size=5),  # distributed: node processes over gloo
    ],
    ids=["in-process", "in-process-tp2", "distributed"],
)
def test_attention_nodes_match_transformers(qwen3, node_args):
    """The compute side normalises and rotates q, k before sending them to the nodes."""
    path, _, want = qwen3
    assert tokens(path, **node_args) == want


def test_sliding_window_with_attention_nodes_and_preemption(checkpoints):
    """Qwen3's window (layer 1 only) seen through global positions on every node; pools so
    small that sequences are preempted and recomputed."""
    path, _ = checkpoints["qwen3-tied-sliding"]
    g = torch.Generator().manual_seed(9)
    batch = [torch.randint(2, 258, (n,), generator=g).tolist() for n in (50, 33, 20)]
    want = tokens(path, batch, max_num_batched_tokens=24)
    with LLM(
        path,
        device="cpu",
        max_num_batched_tokens=24,
        attention_nodes=2,
        kv_chunk_size=5,
        kv_cache_tokens=64,
        attention_transport="in-process",
    ) as llm:
        outs = llm.generate(batch, GREEDY, use_tqdm=False)
        assert llm.engine.stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == want


def test_arm_keeps_the_float_function(qwen3):
    path, _, want = qwen3
    ids = prompts()[0]
    with LLM(path, dtype="float32", device="cpu") as llm:
        ref = llm.prompt_logits(ids)
    with LLM(path, dtype="float32", device="cpu", arm="hadamard") as llm:
        torch.testing.assert_close(llm.prompt_logits(ids), ref, rtol=0, atol=1e-4)
    assert tokens(path, arm="hadamard") == want


def test_int8_with_arm_agrees_with_float32(qwen3):
    """W8A8 int8 (down projection, then every linear) with ARM: runs, under TP=2 too, and
    predicts most of float32's greedy tokens (teacher-forced)."""
    path, _, _ = qwen3
    with LLM(path, dtype="float32", device="cpu") as base:
        prompt = prompts()[0]
        target = greedy_tokens(base, prompt, 48)
    configs = {
        "int8 down": dict(quantization="int8", arm="hadamard"),
        "int8 all": dict(quantization="int8", arm="hadamard", quantize_all_linears=True),
        "int8 tp2": dict(quantization="int8", arm="hadamard", tensor_parallel_size=2),
    }
    for name, kwargs in configs.items():
        with LLM(path, dtype="float32", device="cpu", **kwargs) as llm:
            agreement = token_agreement(llm, prompt, target)
        assert agreement >= 0.85, f"{name}: token agreement {agreement:.3f}"


# -- the Triton path (Triton's interpreter on CPU) --
HALF = [(torch.float16, 2e-3)] + ([(torch.bfloat16, 2e-2)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), *HALF])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (3, 1, 24), (2, 2, 8)])
def test_fused_rope_applies_the_qk_norm(dtype, tol, hq, hkv, d):
    """rope_and_store with qk_norm = qk_rms_norm, then RoPE, then the cache writes; d = 24
    leaves masked lanes (D/2 = 12 in 16) that must not enter a head's statistics."""
    pytest.importorskip("triton")
    from shardlm.config import RopeConfig
    from shardlm.kernels.fused import rope_and_store
    from shardlm.layers.norm import qk_rms_norm
    from shardlm.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(4)
    t, slots, eps = 5, 32, 0.1  # a large eps, so dropping it shows
    rotary = RotaryEmbedding(d, RopeConfig(theta=10000.0), 64, dtype).to(DEVICE)
    qkv = (3 * torch.randn(t, (hq + 2 * hkv) * d, generator=g)).to(dtype).to(DEVICE)
    q_w = (0.5 + torch.rand(d, generator=g)).to(dtype).to(DEVICE)
    k_w = (0.5 + torch.rand(d, generator=g)).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 3, 17, 40, 63], device=DEVICE)
    slot_mapping = torch.tensor([9, 0, 31, 4, 20], device=DEVICE)
    k_pool = torch.randn(slots, hkv, d, generator=g).to(dtype).to(DEVICE)
    v_pool = torch.randn(slots, hkv, d, generator=g).to(dtype).to(DEVICE)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()

    q = rope_and_store(
        qkv, positions, rotary.cos, rotary.sin, slot_mapping, k_pool, v_pool, hq, hkv,
        qk_norm=(q_w, k_w, eps),
    )  # fmt: skip

    qk = qk_rms_norm(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), q_w, k_w, hq, eps)
    qk = rotary(qk, positions)
    k_ref[slot_mapping] = qk[:, hq:]
    v_ref[slot_mapping] = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    torch.testing.assert_close(q, qk[:, :hq], rtol=tol, atol=tol)
    torch.testing.assert_close(k_pool, k_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(v_pool, v_ref, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["qwen3-head-dim", "qwen3-tied-sliding"])
def test_engine_with_the_triton_kernels_matches_transformers(checkpoints, variant):
    """attention_backend="triton": the fused RoPE + KV write normalises q, k itself; decodes
    through the split-KV kernel. Same greedy tokens as transformers (and the torch path)."""
    pytest.importorskip("triton")
    path, hf = checkpoints[variant]
    batch = [[5, 9, 200], list(range(30, 64)), [7] * 21]
    want = [hf_greedy(hf, p, 12) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(path, dtype="float32", device=DEVICE, block_size=4, attention_backend="triton") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        ours = llm.prompt_logits(batch[1]).cpu()  # scoring: the unfused path, kernels on
    assert got == want
    with torch.no_grad():
        ref = hf(torch.tensor([batch[1]])).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


# -- config.json --
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2},
        {"use_sliding_window": False, "sliding_window": 6, "max_window_layers": 0},
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0},
        {
            "use_sliding_window": True,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
    ],
)
def test_sliding_windows_are_what_transformers_uses(fields):
    """Per layer: transformers' Qwen3Attention window = config.sliding_window where
    layer_types says "sliding_attention" (both after Qwen3Config's defaults)."""
    from transformers import Qwen3Config

    hf = Qwen3Config(num_hidden_layers=4, architectures=["Qwen3ForCausalLM"], **fields)
    want = tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    assert ModelConfig.from_dict(hf.to_dict()).sliding_windows == want
    # A config.json of older transformers has no layer_types: max_window_layers decides.
    raw = {**hf.to_dict(), "layer_types": None, **fields}
    if "layer_types" not in fields:
        assert ModelConfig.from_dict(raw).sliding_windows == want


def base_config(**changes) -> dict:
    raw = {
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 258,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    }
    return {**raw, **changes}


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full"] * 2},
            "layer_types must list one of full_attention, sliding_attention for each of the 2",
        ),
        (
            {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention"]},
            "for each of the 2 layers",
        ),
        ({"use_sliding_window": True, "sliding_window": "8"}, "sliding_window must be a positive"),
        ({"head_dim": 31}, "head_dim must be an even integer ≥ 2, got 31"),
        ({"attention_bias": "yes"}, "attention_bias must be true or false, got 'yes'"),
    ],
)
def test_bad_config_fields_are_named(changes, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(base_config(**changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parameter_count_includes_the_qk_norms(qwen3):
    path, hf, _ = qwen3
    assert ModelConfig.from_pretrained(path).num_parameters() == sum(
        p.numel() for p in hf.parameters()
    )


# -- bad checkpoints --
@pytest.mark.parametrize("missing", ["q_norm", "k_norm"])
def test_missing_qk_norm_weight_is_named(qwen3, tmp_path, missing):
    src, _, _ = qwen3
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors[f"model.layers.1.self_attn.{missing}.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LLM(dst, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"'model.layers.1.self_attn.{missing}.weight'" in msg and "[32]" in msg


def test_qwen3_config_on_a_qwen2_checkpoint_names_the_norm(checkpoints, tmp_path):
    """A Qwen2 checkpoint relabelled Qwen3 (no q/k norms at all): the first missing tensor
    is named, not a shape error deep in the model."""
    src, _ = checkpoints["qwen2-bias"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    config["head_dim"] = 16
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'model\.layers\.0\.self_attn\.q_norm"
    ):
        LLM(dst, device="cpu")


def test_dropping_the_window_changes_the_output(checkpoints, tmp_path):
    """Guards the sliding-window parity in test_model_parity.py: with the window off, the
    same weights give other logits on a prompt longer than the window."""
    from tests.conftest import VARIANTS

    path, _ = checkpoints["qwen3-tied-sliding"]
    arch, overrides = VARIANTS["qwen3-tied-sliding"]
    make_checkpoint(tmp_path, arch, {**overrides, "use_sliding_window": False})
    ids = prompts()[0]
    with LLM(tmp_path, device="cpu") as plain, LLM(path, device="cpu") as windowed:
        assert plain.config.sliding_windows == (None, None)
        assert windowed.config.sliding_windows == (None, 16)
        assert (plain.prompt_logits(ids) - windowed.prompt_logits(ids)).abs().max() > 1e-3
