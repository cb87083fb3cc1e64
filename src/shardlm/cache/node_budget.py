"""The driver's count of attention-node KV blocks, so the scheduler admits and preempts as if
the pool were local.

Every attention node allocates its own blocks (attention/node.py), lazily and with the same
block size. Under R-sharding, node 0 owns each period's first chunk, so for any sequence
length it holds at least as many tokens as any other node: its block count is the binding
one. This BlockManager therefore hands the scheduler "blocks" that stand for node 0's blocks
— ``blocks_needed(L)`` counts node 0's share of L tokens — and never more than one node's
pool: when the scheduler's accounting fits, every node's real allocation fits too. The ids
it returns are only counters; nodes never see them.

Prefix caching is off on this path: a node holds a strided part of each prefix, and a
cached-prefix hit would have to be reconciled across all β nodes (not built).
"""

from __future__ import annotations

from shardlm.cache.block_manager import BlockManager
from shardlm.cache.rshard import RShard


class NodeBlockBudget(BlockManager):
    def __init__(self, num_blocks: int, block_size: int, rshard: RShard) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching=False)
        self.rshard = rshard

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-self.rshard.count(num_tokens, 0) // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.rshard.max_length(self.num_blocks * self.block_size)
