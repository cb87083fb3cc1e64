"""The compute node's attention backend when the KV cache lives on attention nodes.

Per layer, for each of its β nodes the compute node sends the step's queries (all of them:
any query may see keys on any node) and the new keys/values of the tokens that node owns
(R-sharding, cache/rshard.py); each node answers (out_i, lse_i) over the keys it holds,
and the partials are merged exactly (reference.merge_partials):

    lse = log Σ_i exp(lse_i),    out = Σ_i exp(lse_i − lse) · out_i

A node's answer therefore has the size of the queries, never of the context: the bytes per
decode step stay constant as sequences grow (counted in ``traffic``).

With α compute nodes (figure 2), each compute node is one ShardedAttention (``group`` a)
over its own rows of the step: it sends only its rows' queries and K/V, and each node
answers it for those rows once every compute node has posted the layer
(AttentionNode.attend_groups).

With m micro-batches (StepInputs.micro_batches) the exchange is per (layer, micro-batch):
``post`` sends and returns at once, ``collect`` waits for the answer, so the compute side
can run another micro-batch's dense work in between (runtime/micro_batches.py). Node ranks
answer in (layer, micro-batch) order, the order every compute node posts in; an in-process
shared node answers a (layer, micro-batch) as soon as its last compute node has posted.

Three transports behind one ``NodeLink`` interface: ``LocalLink`` calls an AttentionNode
object in this process (possibly on another device), ``RemoteLink`` exchanges the same
tensors with a node rank over torch.distributed point-to-point messages, and ``GroupLink``
reaches an in-process node shared by α in-process compute nodes (``SharedNode``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from shardlm.attention.backend import AttentionBackend
from shardlm.attention.node import AttentionNode
from shardlm.attention.reference import merge_partials
from shardlm.cache.rshard import RShard
from shardlm.step_inputs import MicroBatch, StepInputs


class AttentionNodeUnreachable(RuntimeError):
    """A remote attention node did not answer within the failure timeout."""


class NodeLink(Protocol):
    name: str
    node: AttentionNode | None  # the node object itself, when it lives in this process

    def begin_step(self, host: StepInputs, micro_batches: list[MicroBatch]) -> None: ...

    def post(self, mb: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Send micro-batch ``mb``'s queries and this node's new K/V of ``layer``; returns
        without waiting for the answer."""

    def collect(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of the last ``post`` of micro-batch ``mb``, waiting for it."""

    def release(self, seq_ids: list[int]) -> None: ...


class LocalLink:
    """An attention node living in this process (in-process transport): it attends when
    posted to."""

    def __init__(self, node: AttentionNode, compute_device: torch.device) -> None:
        self.node = node
        self.name = node.name
        self.compute_device = compute_device
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_step(self, host: StepInputs, micro_batches: list[MicroBatch]) -> None:
        self.node.begin_step(host, micro_batches)

    def post(self, mb: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        dev = self.node.device
        self._results[mb] = self.node.attend(layer, q.to(dev), k.to(dev), v.to(dev), mb)

    def collect(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self._results.pop(mb)
        return out.to(self.compute_device), lse.to(self.compute_device)

    def release(self, seq_ids: list[int]) -> None:
        self.node.release(seq_ids)


class SharedNode:
    """An in-process attention node serving α in-process compute nodes (the test aid of
    runtime/lockstep.py): it keeps each compute node's post of a (layer, micro-batch) and,
    when the last compute node with rows in that micro-batch is in, attends them all at once
    (AttentionNode.attend_groups). A compute node collecting an answer that is not ready
    passes the turn (``wait``) until the others have posted."""

    def __init__(self, node: AttentionNode, wait: Callable[[], None]) -> None:
        self.node = node
        self.wait = wait
        self._expected: list[set[int]] = []
        self._posted: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        self._results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.posts = 0  # progress, for the deadlock check in ``collect``

    def begin_step(self, host: StepInputs, micro_batches: list[MicroBatch]) -> None:
        self.node.begin_step(host, micro_batches)
        self._expected = [set(self.node.group_sizes(i)) for i in range(len(micro_batches))]
        self._posted, self._results = {}, {}

    def post(self, group: int, mb: int, layer: int, q, k, v) -> None:
        posted = self._posted.setdefault(mb, {})
        posted[group] = (q, k, v)
        self.posts += 1
        if set(posted) == self._expected[mb]:
            del self._posted[mb]
            for a, answer in self.node.attend_groups(layer, posted, mb).items():
                self._results[a, mb] = answer

    def collect(self, group: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        while (group, mb) not in self._results:
            before = self.posts
            self.wait()  # every other compute node runs until it waits or finishes
            if self.posts == before and (group, mb) not in self._results:
                raise RuntimeError(
                    f"{self.node.name}: compute node {group} waits for micro-batch {mb}, "
                    "which no other compute node will post"
                )
        return self._results.pop((group, mb))


class GroupLink:
    """In-process compute node ``group``'s link to a SharedNode. The runner begins the
    shared node's step once for all compute nodes."""

    def __init__(self, shared: SharedNode, group: int, compute_device: torch.device) -> None:
        self.shared = shared
        self.node = shared.node
        self.name = shared.node.name
        self.group = group
        self.compute_device = compute_device

    def begin_step(self, host: StepInputs, micro_batches: list[MicroBatch]) -> None:
        pass

    def post(self, mb: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        dev = self.node.device
        self.shared.post(self.group, mb, layer, q.to(dev), k.to(dev), v.to(dev))

    def collect(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.shared.collect(self.group, mb)
        return out.to(self.compute_device), lse.to(self.compute_device)

    def release(self, seq_ids: list[int]) -> None:
        self.node.release(seq_ids)


class RemoteLink:
    """An attention node running as its own rank (distributed transport).

    The node already has the step's metadata (the driver's control broadcast reaches every
    rank), so per layer and micro-batch only tensors travel: one message q|k|v to the node,
    two back (out in the model dtype, lse in float32). Messages go through host memory
    (gloo); from a CUDA compute rank they are staged in pinned buffers, so the copies to and
    from the device are asynchronous.
    """

    def __init__(
        self,
        rank: int,
        name: str,
        groups: tuple[dist.ProcessGroup, dist.ProcessGroup],
        timeout: datetime.timedelta,
        compute_device: torch.device,
        on_device: bool = False,
    ) -> None:
        self.rank = rank
        self.name = name
        self.out_group, self.back_group = groups
        self.timeout = timeout
        self.compute_device = compute_device
        self.on_device = on_device
        self.pin = compute_device.type == "cuda" and not on_device
        self.node = None  # it lives in its own process
        # Per micro-batch: the works in flight and the tensors they use (alive until done).
        self._pending: dict[int, tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = {}

    def begin_step(self, host: StepInputs, micro_batches: list[MicroBatch]) -> None:
        pass

    def _buffer(self, shape, dtype) -> torch.Tensor:
        """A message buffer: on the device for NCCL, else in (pinned) host memory."""
        if self.on_device:
            return torch.empty(shape, dtype=dtype, device=self.compute_device)
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def post(self, mb: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        flat = torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)])
        if self.on_device or flat.device.type == "cpu":
            message = flat
        else:
            message = self._buffer(flat.shape, flat.dtype)
            message.copy_(flat)  # synchronous: gloo reads the host buffer right away
        out = self._buffer(q.shape, q.dtype)
        lse = self._buffer(q.shape[:2], torch.float32)
        works = [
            dist.isend(message, dst=self.rank, group=self.out_group),
            dist.irecv(out, src=self.rank, group=self.back_group),
            dist.irecv(lse, src=self.rank, group=self.back_group),
        ]
        self._pending[mb] = (works, (message, out, lse))

    def collect(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        works, (_, out, lse) = self._pending.pop(mb)
        try:
            for work in works:
                work.wait(self.timeout)
        except Exception as e:
            self._pending.clear()
            raise AttentionNodeUnreachable(
                f"{self.name} (rank {self.rank}) did not answer: {str(e).splitlines()[0]}"
            ) from e
        return (
            out.to(self.compute_device, non_blocking=True),
            lse.to(self.compute_device, non_blocking=True),
        )

    def release(self, seq_ids: list[int]) -> None:
        pass  # the driver's RELEASE broadcast reaches the node itself


@dataclass
class AttentionTraffic:
    """Bytes between this compute node and its attention nodes (payload tensors only), and
    how long it waited for their answers."""

    bytes_to_nodes: int = 0
    bytes_from_nodes: int = 0
    steps: int = 0
    last_step_bytes_to_nodes: int = 0
    last_step_bytes_from_nodes: int = 0
    wait_us: int = 0  # blocked in ``collect``: the nodes' time the dense work did not hide
    last_step_wait_us: int = 0


@dataclass
class _Part:
    """This compute node's share of one micro-batch: a run of its rows, and which of those
    each attention node owns (R-sharding: it stores their K/V)."""

    index: int  # the micro-batch
    rows: slice  # into this compute node's rows of the step
    owned: list[torch.Tensor]  # per node: indices into ``rows``


class ShardedAttention(AttentionBackend):
    """AttentionBackend for a compute rank whose KV cache is on β attention nodes: compute
    node ``group``'s rows of each step, in up to ``micro_batches`` micro-batches. The model
    runs through runtime/micro_batches.py (``post`` / ``collect`` per part), not ``attend``."""

    def __init__(
        self,
        rshard: RShard,
        links: list[NodeLink],
        device: torch.device,
        group: int = 0,
        micro_batches: int = 1,
    ) -> None:
        self.rshard = rshard
        self.links = links
        self.device = device
        self.group = group
        self.micro_batches = micro_batches
        self._traffic = AttentionTraffic()
        self.parts: list[_Part] = []

    @property
    def traffic(self) -> AttentionTraffic:
        return self._traffic

    def local_nodes(self) -> list[AttentionNode]:
        return [link.node for link in self.links if link.node is not None]

    def begin_step(self, inputs: StepInputs) -> None:
        """Cut the step into micro-batches and plan, on the host copy, which of this compute
        node's rows fall in each and which of those each node owns."""
        host = inputs.on_host
        micro = host.micro_batches(self.micro_batches)
        rows = host.rows_of(self.group)
        self.parts = []
        for i, mb in enumerate(micro):
            lo, hi = torch.searchsorted(rows, torch.tensor([mb.rows.start, mb.rows.stop]))
            if hi == lo:
                continue  # no rows of this compute node in the micro-batch
            owner = self.rshard.owner(host.positions[rows[lo:hi]])
            owned = [
                torch.nonzero(owner == s).flatten().to(self.device) for s in range(len(self.links))
            ]
            self.parts.append(_Part(i, slice(int(lo), int(hi)), owned))
        for link in self.links:
            link.begin_step(host, micro)
        t = self._traffic
        t.steps += 1
        t.last_step_bytes_to_nodes = t.last_step_bytes_from_nodes = t.last_step_wait_us = 0

    def post(self, part: _Part, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        sent = 0
        for link, owned in zip(self.links, part.owned, strict=True):
            k_s, v_s = k[owned], v[owned]
            link.post(part.index, layer, q, k_s, v_s)
            sent += q.nbytes + k_s.nbytes + v_s.nbytes
        t = self._traffic
        t.bytes_to_nodes += sent
        t.last_step_bytes_to_nodes += sent

    def collect(self, part: _Part) -> torch.Tensor:
        """The merged attention output of ``part``'s last posted layer."""
        start = time.perf_counter()
        answers = [link.collect(part.index) for link in self.links]
        waited = int((time.perf_counter() - start) * 1e6)
        received = sum(out.nbytes + lse.nbytes for out, lse in answers)
        t = self._traffic
        t.bytes_from_nodes += received
        t.last_step_bytes_from_nodes += received
        t.wait_us += waited
        t.last_step_wait_us += waited
        if len(answers) == 1:
            return answers[0][0]
        out, _ = merge_partials([o for o, _ in answers], [lse for _, lse in answers])
        return out

    def release(self, seq_ids: list[int]) -> None:
        for link in self.links:
            link.release(seq_ids)
