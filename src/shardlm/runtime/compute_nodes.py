"""Figure 2's compute side: α compute nodes, each running the dense work of its own rows.

Every compute node holds the full dense weights (tensor-parallel over its t ranks) and no
per-sequence state: the KV cache lives on the attention nodes. A step's rows are dealt to
the compute nodes by the driver (StepInputs.row_groups: a decode on its sequence's compute
node, prefill positions in runs). Each compute node embeds its rows, and per layer sends
their queries and K/V to the attention nodes and merges the answers for its own rows
(ShardedAttention with ``group`` = the compute node); the attention nodes answer only once
every compute node has posted the layer. At the end only the sampled rows' hidden states
meet: each compute node hands them to compute node 0, whose ranks compute the LM head for
all of them (the driver, rank 0, gathers the logits and samples).

Two transports, as for attention nodes:

* distributed — each compute node is t ranks of its own; compute node a's rank r sends its
  sampled hidden states to rank r of compute node 0 (point-to-point on the exchange group);
* in-process (a test aid) — the α compute nodes share the t tensor-parallel processes and
  the weights, each a thread taking turns with the others (runtime/lockstep.py), around
  in-process attention nodes shared by all of them (attention/sharded.py SharedNode): a
  thread that needs an answer the others have not posted for yet passes the turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from shardlm.attention.node import AttentionNode
from shardlm.attention.sharded import AttentionTraffic, GroupLink, ShardedAttention, SharedNode
from shardlm.cache.rshard import RShard
from shardlm.runtime.lockstep import Lockstep
from shardlm.runtime.micro_batches import forward_micro_batches
from shardlm.step_inputs import StepInputs

if TYPE_CHECKING:
    from shardlm.runtime.runner import ModelRunner

# Columns of a compute node's counters (each rank counts its own share; the driver sums).
COMPUTE_FIELDS = (
    "tokens_last_step",
    "dense_flops_last_step",
    "tokens",
    "dense_flops",
    "bytes_to_attention_nodes_last_step",
    "bytes_from_attention_nodes_last_step",
    "bytes_to_attention_nodes",
    "bytes_from_attention_nodes",
    "hidden_bytes_to_compute_node_0",
    "wait_on_nodes_us_last_step",
    "wait_on_nodes_us",
)


def dense_flops_per_token(config) -> int:
    """The model's dense FLOPs per token, 2 per multiply-add of QKV, O, gate, up and down in
    every layer: the attention itself runs on the attention nodes, and the LM head (compute
    node 0, sampled rows only) is left out. Counted for the whole model once per compute node,
    not per rank, so K/V heads replicated over tensor-parallel ranks are not counted twice."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    per_layer = h * d * (hq + 2 * hkv) + hq * d * h + 3 * h * i
    return 2 * config.num_hidden_layers * per_layer


class ComputeCounters:
    """Each compute node's tokens and dense FLOPs (counted by its tensor-parallel rank 0),
    and the bytes it moved (counted by every rank: each sends its own head group's), as this
    rank counts them; the driver sums the ranks' tables."""

    def __init__(self, num_nodes: int, runner: ModelRunner) -> None:
        # Plain ints (this runs every step, also without nodes): a tensor only when reported.
        self.rows = [[0] * len(COMPUTE_FIELDS) for _ in range(num_nodes)]
        self.flops_per_token = dense_flops_per_token(runner.config)
        self.counts_work = runner.tp.rank == 0  # a node's t ranks compute the same tokens

    @property
    def table(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.long)

    def begin_step(self) -> None:
        """Zero the last-step columns (a compute node without rows this step adds nothing)."""
        for row in self.rows:
            row[0] = row[1] = row[4] = row[5] = row[9] = 0

    def add(self, node: int, tokens: int, traffic: AttentionTraffic | None) -> None:
        row = self.rows[node]
        if self.counts_work:
            flops = tokens * self.flops_per_token
            row[0] += tokens
            row[1] += flops
            row[2] += tokens
            row[3] += flops
        if traffic is not None:
            row[4] = traffic.last_step_bytes_to_nodes
            row[5] = traffic.last_step_bytes_from_nodes
            row[6] = traffic.bytes_to_nodes
            row[7] = traffic.bytes_from_nodes
            row[9] = traffic.last_step_wait_us
            row[10] = traffic.wait_us

    def sent_hidden(self, node: int, nbytes: int) -> None:
        self.rows[node][8] += nbytes


class ComputeNodes:
    """The α > 1 path of ModelRunner.run (module docstring)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.attention: dict[int, ShardedAttention] = {}  # the compute nodes in this process
        self.shared: list[SharedNode] = []
        self.lockstep: Lockstep | None = None

    @classmethod
    def in_process(
        cls, runner: ModelRunner, rshard: RShard, nodes: list[AttentionNode], num_nodes: int
    ) -> ComputeNodes:
        self = cls(runner)
        self.lockstep = Lockstep(runner.device)
        self.shared = [SharedNode(node, self.lockstep.pass_turn) for node in nodes]
        for a in range(num_nodes):
            links = [GroupLink(shared, a, runner.device) for shared in self.shared]
            self.attention[a] = ShardedAttention(
                rshard, links, runner.device, group=a, micro_batches=runner.micro_batches
            )
        return self

    @classmethod
    def distributed(cls, runner: ModelRunner, attention: ShardedAttention) -> ComputeNodes:
        self = cls(runner)
        self.attention[attention.group] = attention
        return self

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """One step on the compute nodes of this process; the logits of the sampled rows on
        the driver (None on other ranks)."""
        host = inputs.on_host
        active = [a for a in host.active_groups() if a in self.attention]
        if self.lockstep is not None:
            micro = host.micro_batches(self.runner.micro_batches)
            for shared in self.shared:
                shared.begin_step(host, micro)
            work = {a: (lambda a=a: self._forward(inputs, a)) for a in active}
            hidden = self.lockstep.run(work)
        else:
            hidden = {a: self._forward(inputs, a) for a in active}
        mine = next(iter(self.attention))
        if self.lockstep is None and mine != 0:
            self._send_sampled(hidden.get(mine))
            return None
        if self.lockstep is None:
            hidden.update(self._receive_sampled(inputs))
        return self.runner.model.compute_logits(self._assemble(inputs, hidden))

    def _forward(self, inputs: StepInputs, node: int) -> torch.Tensor:
        """Compute node ``node``'s forward over its rows: the hidden states of its sampled
        rows (in row order)."""
        host = inputs.on_host
        rows = host.rows_of(node)
        attention = self.attention[node]
        attention.begin_step(inputs)
        rows_dev = rows.to(self.runner.device)
        hidden = forward_micro_batches(
            self.runner.model, inputs.input_ids[rows_dev], inputs.positions[rows_dev], attention
        )
        self.runner.counters.add(node, rows.numel(), attention.traffic)
        local = torch.searchsorted(rows, logit_rows(host, node))
        return hidden[local.to(self.runner.device)]

    def _assemble(self, inputs: StepInputs, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """The logit rows' hidden states in order, from every compute node's part."""
        host = inputs.on_host
        wanted = host.logit_rows
        owners = host.row_groups[wanted]
        width = self.runner.config.hidden_size
        out = torch.empty(wanted.numel(), width, dtype=self.runner.dtype, device=self.runner.device)
        for node, part in hidden.items():
            out[(owners == node).to(self.runner.device)] = part
        return out

    def _send_sampled(self, hidden: torch.Tensor | None) -> None:
        if hidden is None or hidden.numel() == 0:
            return
        tp = self.runner.tp
        dist.isend(hidden.contiguous().cpu(), dst=tp.rank, group=tp.node_group).wait(tp.timeout)
        self.runner.counters.sent_hidden(tp.compute_node, hidden.nbytes)

    def _receive_sampled(self, inputs: StepInputs) -> dict[int, torch.Tensor]:
        """Compute node 0, rank r: the other compute nodes' sampled hidden states, from
        their rank r (job rank a·t + r)."""
        host, tp = inputs.on_host, self.runner.tp
        width = self.runner.config.hidden_size
        parts, works = {}, []
        for node in host.active_groups():
            n = logit_rows(host, node).numel()
            if node == 0 or n == 0:
                continue
            parts[node] = torch.empty(n, width, dtype=self.runner.dtype)
            src = node * tp.world_size + tp.rank
            works.append(dist.irecv(parts[node], src=src, group=tp.node_group))
        for work in works:
            work.wait(tp.timeout)
        return {a: part.to(self.runner.device) for a, part in parts.items()}


def logit_rows(host: StepInputs, node: int) -> torch.Tensor:
    """The step's logit rows (sampled, then scored) that compute node ``node`` computes, in
    logit-row order (each part ascending: ``searchsorted`` into the node's rows finds them)."""
    rows = host.logit_rows
    if host.row_groups is None:
        return rows if node == 0 else rows[:0]
    return rows[host.row_groups[rows] == node]
