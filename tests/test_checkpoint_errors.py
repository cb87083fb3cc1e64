"""Bad checkpoints fail with one line naming the tensor/file and what was expected."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardlm import LLM
from shardlm.errors import CheckpointError, ConfigError, ParamError


@pytest.fixture
def ckpt_copy(llama_ckpt, tmp_path):
    src, _ = llama_ckpt
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


def test_missing_tensor_is_named(ckpt_copy):
    tensors = load_file(ckpt_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LLM(ckpt_copy, device="cpu")
    msg = one_line(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[128, 64]" in msg


def test_wrong_shape_is_named_with_both_shapes(ckpt_copy):
    tensors = load_file(ckpt_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LLM(ckpt_copy, device="cpu")
    msg = one_line(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "[16, 64]" in msg and "[32, 64]" in msg and "model.safetensors" in msg


def test_pickle_only_checkpoint_is_refused_by_name(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError) as e:
        LLM(ckpt_copy, device="cpu")
    msg = one_line(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg


def test_no_weights_at_all(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        LLM(ckpt_copy, device="cpu")


def test_index_listing_a_missing_shard(ckpt_copy):
    (ckpt_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        LLM(ckpt_copy, device="cpu")


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            "'GPT2LMHeadModel' is not supported; supported: "
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
        ),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope type 'longrope' is not supported; supported: default, linear, llama3, yarn",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": -2}},
            "rope scaling factor must be > 0, got -2",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4, "beta_fast": "fast"}},
            "rope beta_fast must be a number ≥ 0, got 'fast'",
        ),
        ({"rope_parameters": {"rope_type": "yarn"}}, "rope type 'yarn' needs a factor"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4, "attention_factor": 0}},
            "rope attention_factor must be a number > 0, got 0",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4}, "rope_theta": 1},
            "rope_theta must be a number > 1, got 1",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4,
                    "original_max_position_embeddings": 0,
                }
            },
            "rope original_max_position_embeddings must be an integer ≥ 1, got 0",
        ),
        (
            {
                "rope_parameters": {"rope_type": "linear", "factor": 2, "rope_theta": 1e6},
                "rope_scaling": {"rope_type": "yarn", "factor": 4},
            },
            "rope_parameters ('linear') and rope_scaling ('yarn') disagree; keep one of them",
        ),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ],
)
def test_unsupported_configs(ckpt_copy, change, expected):
    """One line naming the field, never a Python error from inside the math."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    config.update(change)
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        LLM(ckpt_copy, device="cpu")
    assert expected in one_line(e.value)


def test_missing_config_and_not_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        LLM(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="not a directory"):
        LLM(tmp_path / "nope", device="cpu")


def test_old_style_rope_scaling_is_read(ckpt_copy):
    """transformers < 5 wrote rope_theta + rope_scaling; both spellings must mean the same."""
    from shardlm.config import ModelConfig

    config = json.loads((ckpt_copy / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    cfg = ModelConfig.from_dict(config)
    assert (cfg.rope.theta, cfg.rope.rope_type, cfg.rope.factor) == (500000.0, "linear", 2.0)


def test_progress_bar_shows_for_large_checkpoints(llama_ckpt, monkeypatch, capsys):
    import shardlm.loader as loader

    path, _ = llama_ckpt
    LLM(path, device="cpu")
    assert "Loading weights" not in capsys.readouterr().err  # small: no bar
    monkeypatch.setattr(loader, "PROGRESS_MIN_BYTES", 0)
    LLM(path, device="cpu")
    assert "Loading weights" in capsys.readouterr().err


def test_yarn_extends_the_context_beyond_max_position_embeddings(ckpt_copy):
    """As Qwen2.5 ships it: max_position_embeddings is the pretraining length, and YaRN's
    factor is what makes the longer context usable (vLLM's rule)."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    plain = config["max_position_embeddings"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": plain}
    (ckpt_copy / "config.json").write_text(json.dumps({**config, "rope_scaling": yarn}))
    with LLM(ckpt_copy, device="cpu", max_model_len=4 * plain) as llm:
        assert llm.config.max_context == 4 * plain
        assert llm.runner.model.rotary.cos.shape[0] >= 4 * plain  # tables for every position
    with pytest.raises(ParamError) as e:
        LLM(ckpt_copy, device="cpu", max_model_len=4 * plain + 1)
    assert f"[1, {4 * plain}] (YaRN's original × factor)" in one_line(e.value)
    # The rope_scaling a user adds beside the rope_parameters transformers 5 saved (rope_type
    # "default", with rope_theta) is what counts, and keeps that rope_theta.
    assert "rope_parameters" in config and config["rope_parameters"]["rope_type"] == "default"
    with LLM(ckpt_copy, device="cpu") as llm:
        assert llm.config.rope.rope_type == "yarn"
        assert llm.config.rope.theta == config["rope_parameters"]["rope_theta"]
    # Other rope types keep max_position_embeddings.
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParamError):
        LLM(ckpt_copy, device="cpu", max_model_len=plain + 1)
