"""The built-in model: ``tiny-code``, a small Llama trained on the Python standard library.

It ships inside the package (``shardlm/assets/tiny-code``, made by ``tools/train_tiny.py``)
so ``shardlm generate`` / ``shardlm serve`` work on a fresh install with nothing downloaded,
and so quantization and ARM can be checked by perplexity (``shardlm eval``). It writes
Python-looking code and nothing else; point ``--model`` at a real checkpoint for real work.
"""

from __future__ import annotations

from pathlib import Path

from shardlm.errors import CheckpointError

BUILTIN_NAME = "tiny-code"
BUILTIN_DIR = Path(__file__).parent / "assets" / BUILTIN_NAME
DEMO_NOTICE = (
    f"note: using the built-in model {BUILTIN_NAME!r}, a 5.6M-parameter Llama trained for 25 "
    "minutes on the Python standard library: it writes Python-looking code, nothing more. "
    "Pass --model PATH (a Hugging Face checkpoint directory) for a real model."
)
DEFAULT_PROMPT = "def fibonacci(n):"


def demo_checkpoint() -> Path:
    """Path of the built-in checkpoint."""
    if not (BUILTIN_DIR / "model.safetensors").is_file():
        raise CheckpointError(
            f"the built-in model is missing from this install ({BUILTIN_DIR}); reinstall "
            "shardlm or pass --model PATH"
        )
    return BUILTIN_DIR


DRAFT_NAME = "tiny-code-draft"
DRAFT_DIR = Path(__file__).parent / "assets" / DRAFT_NAME


def demo_draft_checkpoint() -> Path:
    """Path of the built-in model's draft (speculative decoding, ``"model": "builtin"``):
    a much smaller model trained by tools/train_tiny.py with the same tokenizer."""
    if not (DRAFT_DIR / "model.safetensors").is_file():
        raise CheckpointError(
            f"the built-in draft model is missing from this install ({DRAFT_DIR}); reinstall "
            "shardlm or give speculative_config a draft model path"
        )
    return DRAFT_DIR
