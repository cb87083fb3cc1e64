"""The driver → worker control path: one fixed-size header, then one int64 payload.

Every step the driver broadcasts a 10-int64 header [command, payload length, sizes...] and,
if the payload is not empty, the payload itself, on the control group (gloo, CPU tensors).
Workers block on the header between steps. Two broadcasts of integer tensors per step, no
pickling: the metadata is small and its size is known before it is received.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist

from shardlm.distributed.parallel_state import TPContext

HEADER_SIZE = 10


class Command(enum.IntEnum):
    STEP = 1  # payload: StepInputs
    SCORE = 2  # payload: prompt token ids (prompt_logits)
    SHUTDOWN = 3
    RELEASE = 4  # payload: ids of sequences whose KV the attention nodes drop
    NODE_STATS = 5  # no payload; every rank joins a SUM of the attention nodes' stats
    COMPUTE_STATS = 6  # no payload; every rank joins a SUM of the compute nodes' counters


def send(tp: TPContext, command: Command, sizes: list[int], payload: torch.Tensor | None) -> None:
    """Driver side. Waits at most the failure timeout: the control group's own timeout is
    long (workers idle on it), so a stopped worker must not stall the driver for days."""
    n = 0 if payload is None else payload.numel()
    header = torch.zeros(HEADER_SIZE, dtype=torch.long)
    values = [int(command), n, *sizes]
    header[: len(values)] = torch.tensor(values)
    dist.broadcast(header, src=0, group=tp.control_group, async_op=True).wait(tp.timeout)
    if n:
        work = dist.broadcast(payload.contiguous(), src=0, group=tp.control_group, async_op=True)
        work.wait(tp.timeout)


def receive(tp: TPContext) -> tuple[Command, list[int], torch.Tensor | None]:
    """Worker side: blocks until the driver sends the next command."""
    header = torch.empty(HEADER_SIZE, dtype=torch.long)
    dist.broadcast(header, src=0, group=tp.control_group)
    command, n, *sizes = header.tolist()
    payload = None
    if n:
        payload = torch.empty(n, dtype=torch.long)
        dist.broadcast(payload, src=0, group=tp.control_group)
    return Command(command), sizes, payload
