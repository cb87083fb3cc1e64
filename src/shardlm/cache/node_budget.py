"""The driver's count of attention-node KV blocks, so the scheduler admits and preempts as if
the pool were local — and the block tables every attention node stores into.

Every attention node has a pool of the same size and stores its share of a sequence's
tokens, densely in arrival order, in the first blocks of the sequence's table
(attention/node.py). Under R-sharding node 0 owns each period's first chunk, so for any
sequence length it holds at least as many tokens as any other node: a table long enough for
node 0's share is long enough for every node's. ``blocks_needed(L)`` therefore counts node
0's share of L tokens, and when the scheduler's accounting fits, every node's does too.

Prefix caching: the ``j``-th block of a table is full on every node once the last node has
filled it, at ``RShard.block_end(j)``; its hash covers the tokens up to there (the tokens
its content depends on, on any node). A hit is taken only in whole prefix units
(``RShard.prefix_unit``): at such a length every node holds exactly whole blocks, so a
sequence that reuses them starts writing into a fresh block on every node.
"""

from __future__ import annotations

from shardlm.cache.block_manager import BlockManager
from shardlm.cache.rshard import RShard


class NodeBlockBudget(BlockManager):
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        rshard: RShard,
        enable_prefix_caching: bool = False,
    ) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.rshard = rshard
        self.prefix_unit = rshard.prefix_unit(block_size)
        self.hit_unit_blocks = self.prefix_unit // rshard.num_shards // block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-self.rshard.count(num_tokens, 0) // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.rshard.max_length(self.num_blocks * self.block_size)

    def block_span(self, block: int) -> tuple[int, int]:
        start = self.rshard.block_end(block - 1, self.block_size) if block else 0
        return start, self.rshard.block_end(block, self.block_size)

    def cacheable_tokens(self, num_tokens: int) -> int:
        return num_tokens // self.prefix_unit * self.prefix_unit
