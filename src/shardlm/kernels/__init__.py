"""Triton kernels for the GPU fast path, each beside the PyTorch function it must equal.

Nothing here imports triton at module import: the core runs without it (CPU installs), and
the kernels are compiled on first call. Tests run them on CPU through Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# attention_backend: "torch" (PyTorch, SDPA), "triton" (these kernels), "auto" (resolved below).
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def next_power_of_two(n: int) -> int:
    """Triton tiles (tl.arange) must be powers of two: the smallest one ≥ n."""
    return 1 << (n - 1).bit_length()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_attention_backend(
    backend: str, device: torch.device, block_size: int, attention_nodes: int
) -> str:
    """``"auto"`` → the Triton kernels where they are known to fit: a CUDA device of compute
    capability ≥ 8 (bf16 in Triton), triton installed, a power-of-two block size of at most
    32 (the decode kernel holds a [group, block, head_dim] tile in registers), the local
    paged pool; PyTorch everywhere else. Explicit choices are returned unchanged (LLMEngine
    checks them)."""
    if backend != "auto":
        return backend
    usable = (
        device.type == "cuda"
        and triton_available()
        and not block_size & (block_size - 1)
        and block_size <= 32
        and not attention_nodes
    )
    if usable:
        import torch

        usable = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return "triton" if usable else "torch"
