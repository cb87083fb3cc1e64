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

Three transports behind one ``NodeLink`` interface: ``LocalLink`` calls an AttentionNode
object in this process (possibly on another device), ``RemoteLink`` exchanges the same
tensors with a node rank over torch.distributed point-to-point messages, and ``GroupLink``
reaches an in-process node shared by α in-process compute nodes (``SharedNode``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from shardlm.attention.backend import AttentionBackend
from shardlm.attention.node import AttentionNode
from shardlm.attention.reference import merge_partials
from shardlm.cache.rshard import RShard
from shardlm.step_inputs import StepInputs


class AttentionNodeUnreachable(RuntimeError):
    """A remote attention node did not answer within the failure timeout."""


class NodeLink(Protocol):
    name: str
    node: AttentionNode | None  # the node object itself, when it lives in this process

    def begin_step(
        self, seq_ids: list[int], positions: torch.Tensor, num_decodes: int, counts: list[int]
    ) -> None: ...

    def post(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def release(self, seq_ids: list[int]) -> None: ...


class LocalLink:
    """An attention node living in this process (in-process transport)."""

    def __init__(self, node: AttentionNode, compute_device: torch.device) -> None:
        self.node = node
        self.name = node.name
        self.compute_device = compute_device
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_step(self, seq_ids, positions, num_decodes, counts) -> None:
        self.node.begin_step(seq_ids, positions, num_decodes, counts)

    def post(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        dev = self.node.device
        self._result = self.node.attend(layer, q.to(dev), k.to(dev), v.to(dev))

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self._result
        self._result = None
        return out.to(self.compute_device), lse.to(self.compute_device)

    def release(self, seq_ids: list[int]) -> None:
        self.node.release(seq_ids)


class SharedNode:
    """An in-process attention node serving α in-process compute nodes (the test aid of
    runtime/lockstep.py): it keeps each compute node's post of a layer and, when the last
    one is in, attends them all at once (AttentionNode.attend_groups)."""

    def __init__(self, node: AttentionNode) -> None:
        self.node = node
        self._expected: set[int] = set()
        self._posted: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_step(self, host: StepInputs) -> None:
        self.node.begin_step(
            host.seq_ids.tolist(),
            host.positions,
            host.num_decodes,
            host.token_counts(),
            host.row_groups,
        )
        self._expected = set(host.active_groups())
        self._posted, self._results = {}, {}

    def post(self, group: int, layer: int, q, k, v) -> None:
        self._posted[group] = (q, k, v)
        if set(self._posted) == self._expected:
            posted, self._posted = self._posted, {}
            self._results.update(self.node.attend_groups(layer, posted))

    def collect(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        if group not in self._results:
            raise RuntimeError(
                f"{self.node.name}: compute node {group} collected before every compute node "
                "posted the layer"
            )
        return self._results.pop(group)


class GroupLink:
    """In-process compute node ``group``'s link to a SharedNode. The runner begins the
    shared node's step once for all compute nodes."""

    def __init__(self, shared: SharedNode, group: int, compute_device: torch.device) -> None:
        self.shared = shared
        self.node = shared.node
        self.name = shared.node.name
        self.group = group
        self.compute_device = compute_device

    def begin_step(self, seq_ids, positions, num_decodes, counts) -> None:
        pass

    def post(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        dev = self.node.device
        self.shared.post(self.group, layer, q.to(dev), k.to(dev), v.to(dev))

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.shared.collect(self.group)
        return out.to(self.compute_device), lse.to(self.compute_device)

    def release(self, seq_ids: list[int]) -> None:
        self.node.release(seq_ids)


class RemoteLink:
    """An attention node running as its own rank (distributed transport).

    The node already has the step's metadata (the driver's control broadcast reaches every
    rank), so per layer only tensors travel: one message q|k|v to the node, two back
    (out in the model dtype, lse in float32). Messages go through host memory (gloo).
    """

    def __init__(
        self,
        rank: int,
        name: str,
        group: dist.ProcessGroup,
        timeout: datetime.timedelta,
        compute_device: torch.device,
    ) -> None:
        self.rank = rank
        self.name = name
        self.group = group
        self.timeout = timeout
        self.compute_device = compute_device
        self.node = None  # it lives in its own process
        self._pending: list[dist.Work] = []
        self._message = self._out = self._lse = None

    def begin_step(self, seq_ids, positions, num_decodes, counts) -> None:
        pass

    def post(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        message = torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)]).cpu()
        self._out = torch.empty(q.shape, dtype=q.dtype)
        self._lse = torch.empty(q.shape[:2], dtype=torch.float32)
        self._message = message  # alive until the send completes
        self._pending = [
            dist.isend(message, dst=self.rank, group=self.group),
            dist.irecv(self._out, src=self.rank, group=self.group),
            dist.irecv(self._lse, src=self.rank, group=self.group),
        ]

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            for work in self._pending:
                work.wait(self.timeout)
        except Exception as e:
            raise AttentionNodeUnreachable(
                f"{self.name} (rank {self.rank}) did not answer: {str(e).splitlines()[0]}"
            ) from e
        finally:
            self._pending = []
        return (
            self._out.to(self.compute_device, non_blocking=True),
            self._lse.to(self.compute_device, non_blocking=True),
        )

    def release(self, seq_ids: list[int]) -> None:
        pass  # the driver's RELEASE broadcast reaches the node itself


@dataclass
class AttentionTraffic:
    """Bytes between this compute node and its attention nodes (payload tensors only)."""

    bytes_to_nodes: int = 0
    bytes_from_nodes: int = 0
    steps: int = 0
    last_step_bytes_to_nodes: int = 0
    last_step_bytes_from_nodes: int = 0


class ShardedAttention(AttentionBackend):
    """AttentionBackend for a compute rank whose KV cache is on β attention nodes: compute
    node ``group``'s rows of each step. ``after_post`` runs once a layer is posted to every
    node (in-process compute nodes pass the turn there: runtime/lockstep.py)."""

    def __init__(
        self,
        rshard: RShard,
        links: list[NodeLink],
        device: torch.device,
        group: int = 0,
        after_post: Callable[[], None] | None = None,
    ) -> None:
        self.rshard = rshard
        self.links = links
        self.device = device
        self.group = group
        self.after_post = after_post
        self._traffic = AttentionTraffic()
        self._rows: list[torch.Tensor] = []

    @property
    def traffic(self) -> AttentionTraffic:
        return self._traffic

    def local_nodes(self) -> list[AttentionNode]:
        return [link.node for link in self.links if link.node is not None]

    def begin_step(self, inputs: StepInputs) -> None:
        """Which of this compute node's rows each node owns, planned on the host copy."""
        host = inputs.on_host
        seq_ids, positions = host.seq_ids.tolist(), host.positions
        num_decodes, counts = host.num_decodes, host.token_counts()
        owner = self.rshard.owner(positions[host.rows_of(self.group)])
        self._rows = [
            torch.nonzero(owner == s).flatten().to(self.device) for s in range(len(self.links))
        ]
        for link in self.links:
            link.begin_step(seq_ids, positions, num_decodes, counts)
        self._traffic.steps += 1
        self._traffic.last_step_bytes_to_nodes = 0
        self._traffic.last_step_bytes_from_nodes = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sent = 0
        for link, rows in zip(self.links, self._rows, strict=True):
            k_s, v_s = k[rows], v[rows]
            link.post(layer, q, k_s, v_s)
            sent += q.nbytes + k_s.nbytes + v_s.nbytes
        if self.after_post is not None:
            self.after_post()
        parts = [link.collect() for link in self.links]
        received = sum(out.nbytes + lse.nbytes for out, lse in parts)
        t = self._traffic
        t.bytes_to_nodes += sent
        t.bytes_from_nodes += received
        t.last_step_bytes_to_nodes += sent
        t.last_step_bytes_from_nodes += received
        if len(parts) == 1:
            return parts[0][0]
        out, _ = merge_partials([o for o, _ in parts], [lse for _, lse in parts])
        return out

    def release(self, seq_ids: list[int]) -> None:
        for link in self.links:
            link.release(seq_ids)
