"""Triton kernels for the GPU fast path, each beside the PyTorch function it must equal.

Nothing here imports triton at module import: the core runs without it (CPU installs), and
the kernels are compiled on first call. Tests run them on CPU through Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_attention_backend(
    backend: str, device_type: str, block_size: int, attention_nodes: int
) -> str:
    """``"auto"`` → the Triton kernels where they run (a CUDA device, triton installed, a
    power-of-two block size, the local paged pool), PyTorch everywhere else. Explicit
    choices are returned unchanged (LLMEngine checks them)."""
    if backend != "auto":
        return backend
    usable = (
        device_type == "cuda"
        and triton_available()
        and not block_size & (block_size - 1)
        and not attention_nodes
    )
    return "triton" if usable else "torch"
