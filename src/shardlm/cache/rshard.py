"""R-sharding: which attention node holds which token of a sequence (second design figure).

Positions are cut into chunks of ``chunk`` tokens, dealt round-robin over ``num_shards`` nodes:

    owner(p) = (p // chunk) % num_shards

so a sequence's tokens spread evenly as it grows and every node's share of a long context is
within one chunk of 1/num_shards. A node stores its tokens densely in arrival order; its
local index of position p counts the positions it owns before p:

    period   = chunk · num_shards          (every period gives each node exactly one chunk)
    local(p) = (p // period) · chunk + p % chunk

and the inverse, for node s, is global(i) = (i // chunk) · period + s · chunk + i % chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RShard:
    num_shards: int
    chunk: int

    @property
    def period(self) -> int:
        return self.num_shards * self.chunk

    def owner(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions // self.chunk) % self.num_shards

    def global_position(self, local: torch.Tensor, shard: int) -> torch.Tensor:
        return (local // self.chunk) * self.period + shard * self.chunk + local % self.chunk

    def count(self, length: int, shard: int) -> int:
        """How many of positions [0, length) shard ``shard`` owns."""
        full, rest = divmod(length, self.period)
        return full * self.chunk + min(max(rest - shard * self.chunk, 0), self.chunk)

    def max_length(self, capacity: int) -> int:
        """The longest sequence whose busiest shard (shard 0: it gets each period's first
        chunk) holds at most ``capacity`` tokens."""
        full, rest = divmod(capacity, self.chunk)
        # ``full`` whole chunks on shard 0 cover ``full`` periods; a partial chunk ``rest``
        # can only be the start of the next period.
        # Otherwise shard 0 is full after period ``full`` − 1, whose other chunks (and nothing
        # more) still fit on the other shards.
        return full * self.period + rest
