"""An attention node (second design figure): the KV cache of one head group for one token
shard, and the partial attention over it.

The node's pool is indexed by the driver's block tables, which travel with every step: the
driver allocates "node blocks" (cache/node_budget.py) and every node of the job stores its
share of a sequence's tokens, densely in arrival order, in the first blocks of the same
table. One allocator means a cached prefix (prefix caching) is the same block ids on every
node, and a node never runs out of blocks the driver did not count. The node learns what
to do from each step's metadata — which sequences run, at which positions, with which
tables — and is told when sequences are released (finished, aborted or preempted).

Per layer it receives the step's queries and the new keys/values it owns, writes those into
its pool and returns, for every query, the partial attention over the keys it holds:
out = softmax(q kᵀ·scale + m)·v and lse = log Σ exp(q kᵀ·scale + m), with lse = −inf
(out = 0) where it holds no key the query may see. The compute node merges the partials
exactly (reference.merge_partials). A step may come in micro-batches (StepInputs.
micro_batches): the node plans each separately and answers them in order.

The same class runs as an object inside the compute process (in-process transport) or
inside its own rank (distributed transport, executor/node_rank.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardlm.attention.reference import (
    batched_partial_attention,
    partial_attention,
    visibility_mask,
)
from shardlm.cache.kv_quant import Fp8Scales
from shardlm.cache.paged import PagedKVCache
from shardlm.cache.rshard import RShard
from shardlm.errors import ShardlmError
from shardlm.step_inputs import MicroBatch, StepInputs


class AttentionNodeError(ShardlmError):
    """The node was asked something inconsistent with what it holds (a protocol bug)."""


def node_name(head_group: int, shard: int) -> str:
    """How a node is named in logs and errors."""
    return f"attention node {shard} of head group {head_group}"


@dataclass
class NodeStats:
    """What one attention node holds, as the node itself counts it."""

    head_group: int  # the tensor-parallel rank whose KV heads it holds
    shard: int  # its token shard: positions p with (p // kv_chunk_size) % β == shard
    kv_tokens: int  # tokens it holds, summed over sequences (a shared prefix once per sequence)
    blocks_in_use: int  # distinct blocks those tokens occupy
    num_blocks: int
    sequences: int
    wait_on_compute_us_last_step: int = 0  # blocked waiting for the compute side's messages
    wait_on_compute_us: int = 0  # (distributed transport; 0 in-process)


@dataclass
class _Held:
    """What the node holds of one sequence: how many of its tokens, in which blocks."""

    length: int = 0
    block_table: list[int] = field(default_factory=list)


@dataclass
class _Chunk:
    rows: tuple[int, int]  # query rows [start, end) of the micro-batch
    key_slots: torch.Tensor  # [Lk] slots of the node's keys of this sequence
    masks: dict[int | None, torch.Tensor]  # window → visibility [rows, Lk]


@dataclass
class _Plan:
    """One micro-batch's metadata on this node."""

    write_slots: torch.Tensor | None  # slots of the owned rows' new K/V, in row order
    num_rows: int
    num_decodes: int
    decode_slots: torch.Tensor | None  # [B, W] the decodes' key slots, padded
    decode_masks: dict[int | None, torch.Tensor]
    chunks: list[_Chunk]
    # Per compute node with rows in the micro-batch (figure 2, α > 1): its rows, and which
    # of this node's owned rows (in owned-row order) are its.
    group_rows: dict[int, torch.Tensor]
    group_owned: dict[int, torch.Tensor]
    num_owned: int


class AttentionNode:
    def __init__(
        self,
        shard: int,
        rshard: RShard,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        scale: float,
        sliding_windows: tuple[int | None, ...],
        head_group: int = 0,
        name: str | None = None,
        kv_cache_dtype: str = "auto",
        fp8_scales: Fp8Scales | None = None,
    ) -> None:
        self.shard = shard
        self.head_group = head_group
        self.rshard = rshard
        self.name = name or node_name(head_group, shard)
        self.device = device
        self.scale = scale
        self.sliding_windows = sliding_windows
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A sequence this node does not hold may start past 0 only where a cached prefix
        # ends, and a hit is always a whole number of prefix units (cache/rshard.py).
        self.prefix_unit = rshard.prefix_unit(block_size)
        # kv_cache_dtype int8/fp8: K/V stored quantized (cache/kv_quant.py) and read back
        # dequantized; the messages to and from the compute side stay in the model's dtype.
        # fp8's per-layer scales are the compute side's (the same on every rank and node).
        self.cache = PagedKVCache(
            num_layers,
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            dtype,
            device,
            kv_cache_dtype,
            fp8_scales,
        )
        # Decode batches pad sequences that hold no key here with slot 0; masked, but its V
        # still enters a 0-weighted sum, so it must never hold NaN from torch.empty. Block 0
        # starts zeroed (rows and scales) and afterwards only ever holds real K/V (of
        # whichever sequence the driver gives it to): finite, and weighted 0.
        self.cache.zero_blocks(1)
        self.held: dict[int, _Held] = {}
        self._plans: list[_Plan] = []
        self.wait_us_last_step = 0  # set by the node's rank loop (executor/node_rank.py)
        self.wait_us = 0

    # -- bookkeeping --
    def release(self, seq_ids: list[int]) -> None:
        """Forget sequences that finished, were aborted or were preempted (the driver frees
        their blocks)."""
        for seq_id in seq_ids:
            self.held.pop(seq_id, None)

    @property
    def stats(self) -> NodeStats:
        bs = self.block_size
        blocks = set()
        for held in self.held.values():
            blocks.update(held.block_table[: -(-held.length // bs)])
        return NodeStats(
            head_group=self.head_group,
            shard=self.shard,
            kv_tokens=sum(h.length for h in self.held.values()),
            blocks_in_use=len(blocks),
            num_blocks=self.num_blocks,
            sequences=len(self.held),
            wait_on_compute_us_last_step=self.wait_us_last_step,
            wait_on_compute_us=self.wait_us,
        )

    def owned_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the step's batch whose new K/V this node stores (host tensor)."""
        return torch.nonzero(self.rshard.owner(positions) == self.shard).flatten()

    def _slots(self, held: _Held) -> torch.Tensor:
        """Slots of every token the node holds of a sequence, in local order."""
        bs = self.block_size
        local = torch.arange(held.length)
        return torch.tensor(held.block_table, dtype=torch.long)[local // bs] * bs + local % bs

    # -- the step --
    def begin_step(self, host: StepInputs, micro_batches: list[MicroBatch] | None = None) -> None:
        """Take in one step's metadata (host tensors): the scheduled sequences (decodes
        first) with their block tables, the position of each of the T tokens and (α > 1)
        which compute node computes each row; one plan per micro-batch (default: one)."""
        if micro_batches is None:
            micro_batches = host.micro_batches(1)
        self._plans = [self._plan(host.select(mb)) for mb in micro_batches]

    def _plan(self, step: StepInputs) -> _Plan:
        rs, bs = self.rshard, self.block_size
        positions, num_decodes = step.positions, step.num_decodes
        tables = [t.tolist() for t in step.decode_tables] + [
            t.tolist() for t in step.prefill_tables
        ]
        windows = set(self.sliding_windows)
        write_slots = []
        key_slots, key_lens = [], []
        chunks = []
        row = 0
        for i, (seq_id, n) in enumerate(
            zip(step.seq_ids.tolist(), step.token_counts(), strict=True)
        ):
            start = int(positions[row])
            expected = rs.count(start, self.shard)
            held = self._held(seq_id, start, expected)
            new_length = rs.count(start + n, self.shard)
            # The driver's table holds node 0's share (the largest); decode tables arrive
            # padded with their first block, so only that many entries are the table.
            need = -(-rs.count(start + n, 0) // bs)
            if len(tables[i]) < need:
                raise AttentionNodeError(
                    f"{self.name}: sequence {seq_id} at length {start + n} needs {need} "
                    f"blocks, its block table has {len(tables[i])}"
                )
            held.block_table = tables[i][:need]
            held.length = new_length
            slots = self._slots(held)
            # The node's tokens are dense in arrival order: the step's owned tokens are the
            # last ones, in row order (the order the compute rank sends their K/V).
            write_slots.append(slots[expected:])
            if i < num_decodes:
                key_slots.append(slots)
                key_lens.append(new_length)
            else:
                key_pos = rs.global_position(torch.arange(new_length), self.shard)
                rows = slice(row, row + n)
                masks = {
                    w: visibility_mask(positions[rows], key_pos, w).to(self.device) for w in windows
                }
                chunks.append(_Chunk((row, row + n), slots.to(self.device), masks))
            row += n
        decode_slots, decode_masks = None, {}
        if num_decodes and max(key_lens) > 0:
            width = max(key_lens)
            lens = torch.tensor(key_lens)
            j = torch.arange(width)
            valid = j[None, :] < lens[:, None]
            # Padding (masked) repeats the sequence's own first slot, so a bad value in one
            # sequence's KV cannot reach another's 0-weighted sum; a sequence holding nothing
            # here points at slot 0 (zeroed at start, real K/V after: finite either way).
            padded = torch.zeros(num_decodes, width, dtype=torch.long)
            for b, slots in enumerate(key_slots):
                if slots.numel():
                    padded[b] = slots[0]
                    padded[b, : slots.shape[0]] = slots
            decode_slots = padded.to(self.device)
            q_pos = positions[:num_decodes, None]
            key_pos = rs.global_position(j, self.shard)[None, :]
            for w in windows:
                visible = valid & (key_pos <= q_pos)
                if w is not None:
                    visible &= key_pos > q_pos - w
                decode_masks[w] = visible.to(self.device)
        group_rows, group_owned, num_owned = self._plan_groups(positions, step.row_groups)
        return _Plan(
            write_slots=torch.cat(write_slots).to(self.device) if write_slots else None,
            num_rows=step.num_tokens,
            num_decodes=num_decodes,
            decode_slots=decode_slots,
            decode_masks=decode_masks,
            chunks=chunks,
            group_rows=group_rows,
            group_owned=group_owned,
            num_owned=num_owned,
        )

    def _held(self, seq_id: int, start: int, expected: int) -> _Held:
        """The record of a sequence that continues at position ``start`` (``expected`` of
        its tokens here before it), checked against what the node holds of it."""
        held = self.held.get(seq_id)
        if held is None:
            # New here: from position 0, or after a cached prefix whose blocks every node
            # filled (the driver takes hits in whole prefix units only).
            if start % self.prefix_unit:
                raise AttentionNodeError(
                    f"{self.name}: new sequence {seq_id} starts at position {start}, not at a "
                    f"cached-prefix boundary (multiples of {self.prefix_unit})"
                )
            held = self.held[seq_id] = _Held(length=expected)
        elif held.length > expected:
            # A step that was interrupted after this node took it in (an error or Ctrl-C on
            # the compute side) runs again: what it added is overwritten.
            held.length = expected
        if held.length != expected:
            raise AttentionNodeError(
                f"{self.name}: sequence {seq_id} continues at position {start} but the "
                f"node holds {held.length} of its tokens (expected {expected})"
            )
        return held

    def _plan_groups(
        self, positions: torch.Tensor, row_groups: torch.Tensor | None
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
        owned = self.owned_rows(positions)
        if row_groups is None:  # one compute node: all rows, nothing to scatter (host only)
            return (
                {0: torch.arange(positions.shape[0])},
                {0: torch.arange(owned.numel())},
                (owned.numel()),
            )
        owners = row_groups[owned]
        group_rows, group_owned = {}, {}
        for a in sorted(set(row_groups.tolist())):
            group_rows[a] = torch.nonzero(row_groups == a).flatten().to(self.device)
            group_owned[a] = torch.nonzero(owners == a).flatten().to(self.device)
        return group_rows, group_owned, owned.numel()

    @property
    def num_micro_batches(self) -> int:
        return len(self._plans)

    def group_sizes(self, mb: int = 0) -> dict[int, tuple[int, int]]:
        """Per compute node with rows in micro-batch ``mb``: (its rows, the rows of those
        this node owns) — the sizes of its message q | k | v."""
        plan = self._plans[mb]
        return {
            a: (rows.numel(), plan.group_owned[a].numel()) for a, rows in plan.group_rows.items()
        }

    def attend_groups(
        self,
        layer: int,
        parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        mb: int = 0,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Figure 2's exchange, node side: every compute node's queries and new K/V of this
        layer and micro-batch (``parts[a]`` = q of its rows, k/v of its rows this node owns,
        in row order), all written before any query is answered — a query must see the keys
        the other compute nodes produced in the same layer — then each compute node gets
        (out, lse) of its own rows."""
        plan = self._plans[mb]
        if set(parts) != set(plan.group_rows):
            raise AttentionNodeError(
                f"{self.name}: layer {layer} micro-batch {mb} got parts of compute nodes "
                f"{sorted(parts)}, it has rows on {sorted(plan.group_rows)}"
            )
        if len(parts) == 1:
            ((a, (q, k, v)),) = parts.items()
            return {a: self.attend(layer, q, k, v, mb)}
        q0, k0, _ = next(iter(parts.values()))
        q = q0.new_empty(plan.num_rows, *q0.shape[1:])
        k = k0.new_empty(plan.num_owned, *k0.shape[1:])
        v = torch.empty_like(k)
        for a, (q_a, k_a, v_a) in parts.items():
            q[plan.group_rows[a]] = q_a
            k[plan.group_owned[a]] = k_a
            v[plan.group_owned[a]] = v_a
        out, lse = self.attend(layer, q, k, v, mb)
        return {a: (out[rows], lse[rows]) for a, rows in plan.group_rows.items()}

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, mb: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] for every row of micro-batch ``mb``; k_new, v_new [T_own, Hkv, D] for
        the rows this node owns (``owned_rows`` order). Returns (out [T, Hq, D], lse [T, Hq]
        float32)."""
        plan = self._plans[mb]
        k_pool, v_pool = self.cache.keys(layer), self.cache.values(layer)
        if plan.write_slots is not None and plan.write_slots.numel():
            k_pool.write(plan.write_slots, k_new)
            v_pool.write(plan.write_slots, v_new)
        window = self.sliding_windows[layer]
        t, hq, _ = q.shape
        out = torch.zeros_like(q)
        lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
        b = plan.num_decodes
        if plan.decode_slots is not None:
            out[:b], lse[:b] = batched_partial_attention(
                q[:b],
                k_pool.read(plan.decode_slots),
                v_pool.read(plan.decode_slots),
                self.scale,
                plan.decode_masks[window],
            )
        for chunk in plan.chunks:
            if chunk.key_slots.numel() == 0:
                continue
            r0, r1 = chunk.rows
            out[r0:r1], lse[r0:r1] = partial_attention(
                q[r0:r1],
                k_pool.read(chunk.key_slots),
                v_pool.read(chunk.key_slots),
                self.scale,
                chunk.masks[window],
            )
        return out, lse
