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

import math
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

    def prefix_unit(self, block_size: int) -> int:
        """The granularity of a cached prefix shared across nodes: the shortest P > 0 at
        which every node holds the same number of tokens and that number fills whole blocks.

        With one shard that is any multiple of the block. With β > 1 the shards hold equal
        counts only at whole periods: at P = n · period each holds n · chunk, which fills
        whole blocks when block_size divides n · chunk; the smallest such P is period ·
        lcm(chunk, block_size) / chunk = num_shards · lcm(chunk, block_size). A prefix of
        any other length would leave some node with a partly filled block (which the next
        token would write into, shared or not) or with tokens past the prefix."""
        if self.num_shards == 1:
            return block_size
        return self.num_shards * math.lcm(self.chunk, block_size)

    def block_end(self, block: int, block_size: int) -> int:
        """The shortest sequence length at which every node has filled its local block
        ``block``: the last shard (it gets each period's last chunk) fills its block last.
        A node's block holds keys of positions below this only, so its content depends on
        the tokens before it alone — the span a prefix-cache hash of the block covers.
        (global_position of the last shard's last local index in the block, plus one, in
        integers: this runs per sequence per step.)"""
        full, rest = divmod((block + 1) * block_size - 1, self.chunk)
        return full * self.period + (self.num_shards - 1) * self.chunk + rest + 1

    def max_length(self, capacity: int) -> int:
        """The longest sequence whose busiest shard (shard 0: it gets each period's first
        chunk) holds at most ``capacity`` tokens."""
        full, rest = divmod(capacity, self.chunk)
        # ``full`` whole chunks on shard 0 cover ``full`` periods; a partial chunk ``rest``
        # can only be the start of the next period.
        # Otherwise shard 0 is full after period ``full`` − 1, whose other chunks (and nothing
        # more) still fit on the other shards.
        return full * self.period + rest
