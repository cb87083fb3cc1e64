"""Shared fixtures: tiny random Hugging Face checkpoints made with transformers' save_pretrained.

transformers is the oracle: tests compare shardlm's logits and greedy tokens with it. Each
checkpoint directory also gets the byte-level tokenizer files, so text prompts work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Calibrations of read-only checkpoints (and of the built-in model) go to a per-user cache
# (shardlm calibrate): tests, and the processes they start, never touch the real one.
os.environ.setdefault("SHARDLM_CACHE_DIR", tempfile.mkdtemp(prefix="shardlm-test-cache-"))

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
)

# name → (architecture, config overrides). Every variant the foundation promises to support.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-head-dim": ("llama", {"head_dim": 32}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": (
        "llama",
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    # YaRN as Qwen2.5 / Qwen3 checkpoints switch it on for long contexts.
    "qwen2-rope-yarn": (
        "qwen2",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "mistral-sliding": ("mistral", {"sliding_window": 16, "head_dim": 16}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-sliding": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    ),
    # Qwen3: head_dim 32 ≠ hidden / heads = 16, per-head q/k norms.
    "qwen3-head-dim": ("qwen3", {"head_dim": 32}),
    "qwen3-tied-sliding": (
        "qwen3",
        {
            "head_dim": 32,
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 1,
        },
    ),
}


def hf_classes(arch: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[arch]


def make_checkpoint(
    path: Path, arch: str, overrides: dict | None = None, seed: int = 0, **save_kwargs
) -> torch.nn.Module:
    """Save a random HF model (and byte tokenizer) to ``path``; return the HF model."""
    from shardlm.byte_tokenizer import BYTE_VOCAB_SIZE, build_byte_level_tokenizer

    config_cls, model_cls = hf_classes(arch)
    config = config_cls(**{**BASE, "vocab_size": BYTE_VOCAB_SIZE, **(overrides or {})})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # A larger init than HF's default 0.02 keeps logits well separated, so greedy argmax is
    # not decided by float rounding noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Qwen3's per-head norms start at 1: random, and different for q and k, so a
                # weight ignored or swapped changes the output.
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **save_kwargs)
    build_byte_level_tokenizer(path)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """All variants, built once per test session."""
    out = {}
    for name, (arch, overrides) in VARIANTS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_checkpoint(path, arch, overrides))
    return out


@pytest.fixture(scope="session")
def llama_ckpt(checkpoints) -> tuple[Path, torch.nn.Module]:
    return checkpoints["llama-gqa"]
