"""Block allocation, reference counts and prefix caching, on their own."""

from __future__ import annotations

import pytest

from shardlm.cache.block_manager import BlockManager, NoFreeBlocksError, block_hash


def fill(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """Allocate blocks for ``tokens`` and register the full ones, like the engine does."""
    blocks = bm.allocate(bm.blocks_needed(len(tokens)))
    hashes: list[bytes] = []
    for j in range(len(tokens) // bm.block_size):
        parent = hashes[-1] if hashes else None
        chunk = tokens[j * bm.block_size : (j + 1) * bm.block_size]
        hashes.append(bm.register_full_block(blocks[j], parent, chunk))
    return blocks, hashes


def test_allocate_and_free_count_references():
    bm = BlockManager(4, 2)
    a = bm.allocate(3)
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(2)
    bm.free(a)
    assert bm.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(a[:1])


def test_prefix_is_a_chain_not_a_bag_of_blocks():
    bm = BlockManager(16, 2)
    seq = [1, 2, 3, 4, 5, 6]
    blocks, _ = fill(bm, seq)
    got, _ = bm.acquire_prefix([1, 2, 3, 4, 9, 9], max_tokens=6)
    assert got == blocks[:2]  # shares the first two blocks only
    bm.free(got)
    # Same second block content after a different first block: no hit at all.
    got, _ = bm.acquire_prefix([7, 7, 3, 4], max_tokens=4)
    assert got == []
    assert block_hash(None, [3, 4]) != block_hash(block_hash(None, [1, 2]), [3, 4])


def test_max_tokens_leaves_room():
    bm = BlockManager(8, 4)
    tokens = list(range(8))
    blocks, _ = fill(bm, tokens)
    bm.free(blocks)
    got, hashes = bm.acquire_prefix(tokens, max_tokens=len(tokens) - 1)
    assert got == blocks[:1] and len(hashes) == 1  # the last block would leave nothing to compute
    assert bm.ref_counts[blocks[0]] == 1
    bm.record_prefix_lookup(4, 4)
    assert (bm.stats.prefix_hit_tokens, bm.stats.prefix_queries_tokens) == (4, 4)


def test_freed_cached_blocks_are_reused_last_and_lru():
    bm = BlockManager(4, 2)
    a, _ = fill(bm, [1, 1])
    b, _ = fill(bm, [2, 2])
    bm.free(a)
    bm.free(b)  # both evictable now, a older than b
    fresh = bm.allocate(2)
    assert set(fresh).isdisjoint(a + b)  # plainly free blocks first
    evicted = bm.allocate(1)
    assert evicted == a and bm.stats.evictions == 1
    assert bm.acquire_prefix([1, 1, 0], 3)[0] == []  # a's content is gone
    assert bm.acquire_prefix([2, 2, 0], 3)[0] == b  # b's survives


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    blocks, _ = fill(bm, [1, 2, 3, 4])
    bm.free(blocks)
    assert bm.acquire_prefix([1, 2, 3, 4, 5], 5) == ([], [])
    assert bm.num_cached_blocks == 0
