"""Who this process is in a tensor-parallel job, and the groups it talks through.

Two process groups span the same ranks:

* ``group`` carries the model's collectives (the AllReduces of figure 1, the embedding sum,
  the logits gather). Its timeout is the failure timeout: a rank that stops answering
  mid-step makes the others fail within it.
* ``control_group`` carries the driver's per-step broadcast. Workers wait on it between
  steps, possibly for a long time (an idle server), so its timeout is long.

With attention nodes on their own ranks (second design figure), the job also holds those
ranks, and with α compute nodes, α groups of t compute ranks: ``group`` then spans this
compute node's t ranks, the control group spans the whole job (``job_size`` ranks: nodes
follow the driver's steps too), and ``node_group`` (gloo, failure timeout, every rank)
carries the compute ↔ attention-node messages and the sampled rows' hidden states that
compute nodes send to compute node 0. ``link_out`` / ``link_back`` carry the attention
tensors, one direction each: two gloo groups, or (attention_link='nccl') two NCCL groups,
device to device.

A single-process run uses ``TPContext.single()``: every collective becomes a no-op.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPContext:
    rank: int = 0  # tensor-parallel rank within this compute node (attention nodes: job rank)
    world_size: int = 1  # tensor-parallel ranks of one compute node
    group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None
    job_size: int = 1  # every rank of the job: compute ranks, then attention nodes
    node_group: dist.ProcessGroup | None = None
    # The compute ↔ attention-node tensors, one group per direction (queries and K/V out,
    # answers back), gloo or NCCL (attention_link). NCCL needs the split: it runs a group's
    # sends and receives between two ranks in issue order on one stream, and a receive
    # posted early would hold up an answer queued behind it.
    link_out: dist.ProcessGroup | None = None
    link_back: dist.ProcessGroup | None = None
    # The failure timeout: how long the driver waits on any rank before declaring it lost.
    timeout: datetime.timedelta = datetime.timedelta(seconds=60)
    job_rank: int = 0  # rank in the whole job (torch.distributed's)
    compute_node: int = 0  # which of the α compute nodes this rank belongs to
    # Counters of the model's AllReduces (for benchmarks and tests).
    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0

    @classmethod
    def single(cls) -> TPContext:
        return cls()

    @property
    def is_driver(self) -> bool:
        return self.job_rank == 0

    @property
    def enabled(self) -> bool:
        """Whether the model is split (its collectives do something)."""
        return self.world_size > 1

    @property
    def has_peers(self) -> bool:
        """Whether other ranks follow the driver's commands (TP workers or node ranks)."""
        return self.job_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place (the partial sums of row-parallel layers)."""
        if self.enabled:
            dist.all_reduce(x, group=self.group)
            self.all_reduce_calls += 1
            self.all_reduce_bytes += x.nbytes
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` along the last dim on the driver (None elsewhere).
        Only compute node 0 (the driver's) computes logits."""
        if not self.enabled:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.is_driver else None
