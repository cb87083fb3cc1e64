"""An attention node (second design figure): the KV cache of one head group for one token
shard, and the partial attention over it.

The node keeps, per sequence, its own block table in its own paged pool, allocated with the
engine's BlockManager (prefix caching off: a node holds only a strided part of a prefix, so a
block's content is not a prefix by itself). It learns what to do from each step's metadata —
which sequences run, at which positions — and is told when sequences are released (finished,
aborted or preempted). Per layer it receives the step's queries and the new keys/values it
owns, writes those into its pool and returns, for every query, the partial attention over the
keys it holds: out = softmax(q kᵀ·scale + m)·v and lse = log Σ exp(q kᵀ·scale + m), with
lse = −inf (out = 0) where it holds no key the query may see. The compute node merges the
partials exactly (reference.merge_partials).

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
from shardlm.cache.block_manager import BlockManager, NoFreeBlocksError
from shardlm.cache.paged import PagedKVCache
from shardlm.cache.rshard import RShard
from shardlm.errors import ShardlmError


class AttentionNodeError(ShardlmError):
    """The node was asked something inconsistent with what it holds (a protocol bug) or ran
    out of blocks the driver promised it had."""


def node_name(head_group: int, shard: int) -> str:
    """How a node is named in logs and errors."""
    return f"attention node {shard} of head group {head_group}"


@dataclass
class NodeStats:
    """What one attention node holds, as the node itself counts it."""

    head_group: int  # the tensor-parallel rank whose KV heads it holds
    shard: int  # its token shard: positions p with (p // kv_chunk_size) % β == shard
    kv_tokens: int  # tokens whose K/V this node holds (all layers)
    blocks_in_use: int
    num_blocks: int
    sequences: int


@dataclass
class _Held:
    """What the node holds of one sequence: its blocks and how many of its tokens."""

    block_table: list[int] = field(default_factory=list)
    length: int = 0


@dataclass
class _Chunk:
    rows: tuple[int, int]  # query rows [start, end) of the step's flat batch
    key_slots: torch.Tensor  # [Lk] slots of the node's keys of this sequence
    masks: dict[int | None, torch.Tensor]  # window → visibility [rows, Lk]


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
    ) -> None:
        self.shard = shard
        self.head_group = head_group
        self.rshard = rshard
        self.name = name or node_name(head_group, shard)
        self.device = device
        self.scale = scale
        self.sliding_windows = sliding_windows
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.cache = PagedKVCache(
            num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device
        )
        # Decode batches pad sequences that hold no key here with slot 0; masked, but its V
        # still enters a 0-weighted sum, so it must never hold NaN from torch.empty. Block 0
        # starts zeroed and otherwise only ever holds real values.
        self.cache.k[:, :block_size].zero_()
        self.cache.v[:, :block_size].zero_()
        self.held: dict[int, _Held] = {}
        self._write_slots = torch.empty(0, dtype=torch.long)
        self._num_decodes = 0
        self._decode_slots: torch.Tensor | None = None
        self._decode_masks: dict[int | None, torch.Tensor] = {}
        self._chunks: list[_Chunk] = []
        # Per compute node this step (figure 2, α > 1): its rows of the step, and which of
        # this node's owned rows (in owned_rows order) are its.
        self._group_rows: dict[int, torch.Tensor] = {}
        self._group_owned: dict[int, torch.Tensor] = {}
        self._num_owned = 0

    # -- bookkeeping --
    def release(self, seq_ids: list[int]) -> None:
        """Free the blocks of sequences that finished, were aborted or were preempted."""
        for seq_id in seq_ids:
            held = self.held.pop(seq_id, None)
            if held is not None:
                self.blocks.free(held.block_table)

    @property
    def stats(self) -> NodeStats:
        return NodeStats(
            head_group=self.head_group,
            shard=self.shard,
            kv_tokens=sum(h.length for h in self.held.values()),
            blocks_in_use=self.blocks.num_used_blocks,
            num_blocks=self.blocks.num_blocks,
            sequences=len(self.held),
        )

    def _truncate(self, held: _Held, length: int) -> None:
        keep = -(-length // self.blocks.block_size)
        self.blocks.free(held.block_table[keep:])
        del held.block_table[keep:]
        held.length = length

    def owned_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the step's batch whose new K/V this node stores (host tensor)."""
        return torch.nonzero(self.rshard.owner(positions) == self.shard).flatten()

    def _slots(self, held: _Held) -> torch.Tensor:
        """Slots of every token the node holds of a sequence, in local order."""
        bs = self.blocks.block_size
        local = torch.arange(held.length)
        return torch.tensor(held.block_table, dtype=torch.long)[local // bs] * bs + local % bs

    # -- the step --
    def begin_step(
        self,
        seq_ids: list[int],
        positions: torch.Tensor,
        num_decodes: int,
        token_counts: list[int],
        row_groups: torch.Tensor | None = None,
    ) -> None:
        """Take in one step's metadata (host tensors): the scheduled sequences (decodes
        first), the position of each of the T tokens, how many tokens each sequence brings
        and (α > 1) which compute node computes each row. Allocates blocks for the node's
        new tokens and builds the attention masks."""
        self._plan_groups(positions, row_groups)
        rs, bs = self.rshard, self.blocks.block_size
        windows = set(self.sliding_windows)
        write_slots = []
        key_slots, key_lens = [], []
        self._chunks = []
        row = 0
        for i, (seq_id, n) in enumerate(zip(seq_ids, token_counts, strict=True)):
            start = int(positions[row])
            held = self.held.get(seq_id)
            if held is None:
                held = self.held[seq_id] = _Held()
            expected = rs.count(start, self.shard)
            if held.length > expected:
                # A step that was interrupted after this node took it in (an error or Ctrl-C
                # on the compute side) runs again: forget what it added.
                self._truncate(held, expected)
            if held.length != expected:
                raise AttentionNodeError(
                    f"{self.name}: sequence {seq_id} continues at position {start} but the "
                    f"node holds {held.length} of its tokens (expected {expected})"
                )
            new_length = rs.count(start + n, self.shard)
            need = -(-new_length // bs) - len(held.block_table)
            if need > 0:
                try:
                    held.block_table += self.blocks.allocate(need)
                except NoFreeBlocksError as e:
                    raise AttentionNodeError(
                        f"{self.name} is out of KV blocks ({self.blocks.num_blocks} blocks of "
                        f"{bs} tokens): {e}"
                    ) from None
            held.length = new_length
            slots = self._slots(held)
            # The node's tokens are dense in arrival order: the step's owned tokens are the
            # last ones, in row order (the order the compute rank sends their K/V).
            write_slots.append(slots[expected:])
            rows = slice(row, row + n)
            if i < num_decodes:
                key_slots.append(slots)
                key_lens.append(new_length)
            else:
                key_pos = rs.global_position(torch.arange(new_length), self.shard)
                masks = {
                    w: visibility_mask(positions[rows], key_pos, w).to(self.device) for w in windows
                }
                self._chunks.append(_Chunk((row, row + n), slots.to(self.device), masks))
            row += n
        self._write_slots = torch.cat(write_slots).to(self.device) if write_slots else None
        self._num_decodes = num_decodes
        self._decode_slots = None
        if num_decodes and max(key_lens) > 0:
            width = max(key_lens)
            lens = torch.tensor(key_lens)
            j = torch.arange(width)
            valid = j[None, :] < lens[:, None]
            # Padding (masked) repeats the sequence's own first slot, so a bad value in one
            # sequence's KV cannot reach another's 0-weighted sum; a sequence holding nothing
            # here points at slot 0, which starts zeroed.
            padded = torch.zeros(num_decodes, width, dtype=torch.long)
            for b, slots in enumerate(key_slots):
                if slots.numel():
                    padded[b] = slots[0]
                    padded[b, : slots.shape[0]] = slots
            self._decode_slots = padded.to(self.device)
            q_pos = positions[:num_decodes, None]
            key_pos = rs.global_position(j, self.shard)[None, :]
            self._decode_masks = {}
            for w in windows:
                visible = valid & (key_pos <= q_pos)
                if w is not None:
                    visible &= key_pos > q_pos - w
                self._decode_masks[w] = visible.to(self.device)

    def _plan_groups(self, positions: torch.Tensor, row_groups: torch.Tensor | None) -> None:
        owned = self.owned_rows(positions)
        self._num_owned = owned.numel()
        if row_groups is None:  # one compute node: all rows, nothing to scatter (host only)
            self._group_rows = {0: torch.arange(positions.shape[0])}
            self._group_owned = {0: torch.arange(self._num_owned)}
            return
        owners = row_groups[owned]
        self._group_rows, self._group_owned = {}, {}
        for a in sorted(set(row_groups.tolist())):
            self._group_rows[a] = torch.nonzero(row_groups == a).flatten().to(self.device)
            self._group_owned[a] = torch.nonzero(owners == a).flatten().to(self.device)

    def group_sizes(self) -> dict[int, tuple[int, int]]:
        """Per compute node with rows this step: (its rows, the rows of those this node
        owns) — the sizes of its message q | k | v."""
        return {
            a: (rows.numel(), self._group_owned[a].numel()) for a, rows in self._group_rows.items()
        }

    def attend_groups(
        self, layer: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Figure 2's exchange, node side: every compute node's queries and new K/V of this
        layer (``parts[a]`` = q of its rows, k/v of its rows this node owns, in row order),
        all written before any query is answered — a query must see the keys the other
        compute nodes produced in the same layer — then each compute node gets (out, lse)
        of its own rows."""
        if set(parts) != set(self._group_rows):
            raise AttentionNodeError(
                f"{self.name}: layer {layer} got parts of compute nodes {sorted(parts)}, "
                f"the step has rows on {sorted(self._group_rows)}"
            )
        if len(parts) == 1:
            ((a, (q, k, v)),) = parts.items()
            return {a: self.attend(layer, q, k, v)}
        q0, k0, _ = next(iter(parts.values()))
        t = sum(rows.numel() for rows in self._group_rows.values())
        q = q0.new_empty(t, *q0.shape[1:])
        k = k0.new_empty(self._num_owned, *k0.shape[1:])
        v = torch.empty_like(k)
        for a, (q_a, k_a, v_a) in parts.items():
            q[self._group_rows[a]] = q_a
            k[self._group_owned[a]] = k_a
            v[self._group_owned[a]] = v_a
        out, lse = self.attend(layer, q, k, v)
        return {a: (out[rows], lse[rows]) for a, rows in self._group_rows.items()}

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] for every row of the step; k_new, v_new [T_own, Hkv, D] for the rows
        this node owns (``owned_rows`` order). Returns (out [T, Hq, D], lse [T, Hq] float32)."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        if self._write_slots is not None and self._write_slots.numel():
            k_pool.index_copy_(0, self._write_slots, k_new)
            v_pool.index_copy_(0, self._write_slots, v_new)
        window = self.sliding_windows[layer]
        t, hq, _ = q.shape
        out = torch.zeros_like(q)
        lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
        b = self._num_decodes
        if self._decode_slots is not None:
            out[:b], lse[:b] = batched_partial_attention(
                q[:b],
                k_pool[self._decode_slots],
                v_pool[self._decode_slots],
                self.scale,
                self._decode_masks[window],
            )
        for chunk in self._chunks:
            if chunk.key_slots.numel() == 0:
                continue
            r0, r1 = chunk.rows
            out[r0:r1], lse[r0:r1] = partial_attention(
                q[r0:r1],
                k_pool[chunk.key_slots],
                v_pool[chunk.key_slots],
                self.scale,
                chunk.masks[window],
            )
        return out, lse
