"""The built-in demo checkpoint: a small Llama with *random* weights, made on first use.

It lets ``shardlm generate`` run on a fresh install with nothing downloaded. The weights are
drawn from a fixed seed, so every machine builds the same checkpoint; the text it produces is
meaningless. Point ``--model`` at a real checkpoint for real text.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from shardlm.byte_tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, build_byte_level_tokenizer

DEMO_NAME = "demo-llama-random-v1"
DEMO_NOTICE = (
    "note: using the built-in demo model, whose weights are random, so its text is "
    "meaningless. Pass --model PATH (a Hugging Face checkpoint directory with config.json, "
    "*.safetensors and tokenizer.json) for real output."
)

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "float32",
}


def cache_dir() -> Path:
    """$SHARDLM_CACHE, else $XDG_CACHE_HOME/shardlm, else ~/.cache/shardlm."""
    if os.environ.get("SHARDLM_CACHE"):
        return Path(os.environ["SHARDLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shardlm"


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint, building it first if this machine has none yet."""
    target = cache_dir() / DEMO_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a scratch directory and rename, so a half-written checkpoint is never seen.
    scratch = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_checkpoint(scratch)
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_demo_checkpoint(out: Path) -> None:
    c = DEMO_CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    gen = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    tensors = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": torch.ones(h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(q, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    build_byte_level_tokenizer(out)
