"""Allocation of fixed-size KV-cache blocks, with reference counts and prefix caching.

The KV pool is ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a list of
blocks (its block table). Prefix caching: once a block is full, its content is identified by
a hash of (parent block's hash, the block's token ids) — a chain, so equal hashes mean equal
*prefixes*, not just equal blocks. Another sequence whose tokens produce the same chain takes
the same blocks (reference count + 1) instead of recomputing them. Full blocks are never
written again, so sharing needs no copy-on-write.

A block whose count drops to zero keeps its content and hash and becomes *evictable*: it can
still be claimed by a matching prefix, and it is reused for new content only when no plainly
free block is left, least recently freed first (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when the pool cannot supply the blocks asked for."""


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Content id of a full block given its parent's id (None for the first block).

    SHA-256 over the parent's digest and the token ids: collisions are not a practical
    concern, so a hit can be trusted without comparing the whole prefix.
    """
    h = hashlib.sha256(parent or b"root")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


@dataclass
class BlockStats:
    """Counters for tests and metrics."""

    prefix_queries_tokens: int = 0  # tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which were found cached
    evictions: int = 0  # cached blocks reused for new content


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks ≥ 1 and block_size ≥ 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # content hash → block id
        # Free blocks with no cached content, reused first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Free blocks that still hold cached content, in LRU order (oldest first).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.stats = BlockStats()

    # -- queries --
    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out (plain free + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        """The longest sequence the whole pool can hold."""
        return self.num_blocks * self.block_size

    # -- allocation --
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks for new content (reference count 1)."""
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
                self.stats.evictions += 1
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block (a finished or preempted sequence's table)."""
        # Freed in reverse so a sequence's tail blocks are evicted before its head: the head
        # is the prefix other requests are most likely to share.
        for block in reversed(blocks):
            count = self.ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            self.ref_counts[block] = count
            if count == 0:
                if self.hashes[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # -- prefix caching --
    # A block's hash covers a span of token positions (the tokens its content depends on,
    # beyond those its parent's hash covers); hits come in whole units of blocks. Locally a
    # block is its own block_size tokens and any number of blocks is a hit; attention nodes
    # (cache/node_budget.py) widen both.
    hit_unit_blocks = 1

    def block_span(self, block: int) -> tuple[int, int]:
        """Token positions [start, end) that the ``block``-th block of a table adds to the
        prefix its hash identifies."""
        bs = self.block_size
        return block * bs, (block + 1) * bs

    def prefix_tokens(self, num_blocks: int) -> int:
        """Tokens covered by the first ``num_blocks`` blocks of a table."""
        return self.block_span(num_blocks - 1)[1] if num_blocks else 0

    def cacheable_tokens(self, num_tokens: int) -> int:
        """The longest prefix of ``num_tokens`` tokens that a hit could cover."""
        return num_tokens // self.block_size * self.block_size

    def acquire_prefix(
        self, token_ids: Sequence[int], max_tokens: int
    ) -> tuple[list[int], list[bytes]]:
        """Claim the cached blocks covering the longest cached prefix of ``token_ids`` that is
        at most ``max_tokens`` long. Returns (block ids, their hashes); each gets a reference."""
        if not self.enable_prefix_caching:
            return [], []
        limit = min(len(token_ids), max_tokens)
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = None
        while True:
            start, end = self.block_span(len(blocks))
            if end > limit:
                break
            h = block_hash(parent, token_ids[start:end])
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        keep = len(blocks) // self.hit_unit_blocks * self.hit_unit_blocks
        blocks, hashes = blocks[:keep], hashes[:keep]
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
        return blocks, hashes

    def record_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count a lookup that led to an admission (retries of a waiting one do not count)."""
        self.stats.prefix_queries_tokens += queried_tokens
        self.stats.prefix_hit_tokens += hit_tokens

    def register_full_block(
        self, block: int, parent: bytes | None, token_ids: Sequence[int]
    ) -> bytes:
        """Record that ``block`` now holds these (computed) tokens; returns its content hash.

        If the same content is already cached under another block, that mapping is kept and
        this block simply stays private to its sequence.
        """
        h = block_hash(parent, token_ids)
        if self.enable_prefix_caching and h not in self.cached:
            self.cached[h] = block
            self.hashes[block] = h
        return h

    def _forget(self, block: int) -> None:
        h = self.hashes[block]
        if h is not None:
            del self.cached[h]
            self.hashes[block] = None
