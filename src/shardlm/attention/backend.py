"""The one interface between the model and whoever owns the KV cache for a step.

The model calls ``attend`` (or, when ``fuses_rope``, ``rope_attend``) once per layer; the
runner calls ``begin_step`` before the forward, with the step's plain tensors, and each
backend builds its own metadata from them (slot mappings, masks, which node owns which row).
``release``, ``traffic`` and ``local_nodes`` are what the engine asks of any backend, so
nothing outside the runner that creates them needs to know which one it holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardlm.attention.node import AttentionNode
    from shardlm.attention.sharded import AttentionTraffic
    from shardlm.step_inputs import StepInputs


class AttentionBackend:
    """Base of PagedAttention, ContiguousAttention and ShardedAttention."""

    # True: the backend rotates q, k itself and writes k, v into its cache in one kernel,
    # so the model calls ``rope_attend`` with the fused projection output.
    fuses_rope: bool = False

    def begin_step(self, inputs: StepInputs) -> None:
        """Prepare this step's metadata (the inputs are on the model's device; their host
        copy is ``inputs.on_host``)."""
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the step's k, v [T, Hkv, D] into the cache, attend q [T, Hq, D] → [T, Hq, D]."""
        raise NotImplementedError

    def rope_attend(
        self,
        layer: int,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary,
        num_heads: int,
        num_kv_heads: int,
        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """``attend`` from the fused projection output [T, (Hq + 2·Hkv)·D], RoPE included;
        ``qk_norm`` = (q weight [D], k weight [D], eps): per-head RMSNorms before RoPE
        (Qwen3), or None."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse RoPE")

    def release(self, seq_ids: list[int]) -> None:
        """Sequences the scheduler freed (finished, aborted, preempted). Backends whose blocks
        the driver's BlockManager owns have nothing to do."""

    @property
    def traffic(self) -> AttentionTraffic | None:
        """Bytes moved to and from attention nodes; None where there are none."""
        return None

    def local_nodes(self) -> list[AttentionNode]:
        """Attention nodes living in this process (their statistics are read directly)."""
        return []
