"""Triton kernels for the GPU fast path, each beside the PyTorch function it must equal.

Nothing here imports triton at module import: the core runs without it (CPU installs), and
the kernels are compiled on first call. Tests run them on CPU through Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
