from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.engine.block_manager import BlockManager, hash_block_tokens, hash_full_blocks


def test_hashes_are_chained_salted_and_stable_across_processes() -> None:
    tokens = list(range(12))
    hashes = hash_full_blocks(tokens, 4)
    assert len(hashes) == 3
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[4:8])
    # The same block of tokens after a different prefix hashes differently.
    assert hash_full_blocks([9, 9, 9, 9] + tokens[4:8], 4)[1] != hashes[1]
    assert hash_full_blocks(tokens, 4, cache_salt="tenant-a") != hashes
    # A partial trailing block is not hashed; extending reuses known hashes.
    assert hash_full_blocks(tokens + [1, 2], 4, known=hashes[:1]) == hashes
    code = (
        "from pdserve.engine.block_manager import hash_full_blocks;"
        "print(hash_full_blocks(list(range(12)), 4)[2].hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == hashes[2].hex()


def test_allocate_and_free_return_every_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    assert manager.allocate("a", 9)
    assert manager.block_table("a") and len(manager.block_table("a")) == 3
    assert manager.num_free_blocks == 5
    assert manager.allocate("a", 12)  # still three blocks
    assert manager.num_free_blocks == 5
    assert not manager.allocate("b", 24)  # six blocks do not fit: nothing changes
    assert manager.num_free_blocks == 5 and not manager.has_table("b")
    manager.free("a")
    assert manager.num_free_blocks == 8


def test_prefix_cache_hit_shares_blocks_and_survives_free() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    hashes = hash_full_blocks(tokens, 4)
    manager.allocate("a", 10)
    manager.register_full_blocks("a", hashes, num_computed_tokens=10)
    assert manager.num_cached_blocks == 2
    hits = manager.find_cached_prefix(hashes, max_tokens=9)
    assert hits == manager.block_table("a")[:2]
    manager.allocate("b", 10, hits)
    assert manager.block_table("b")[:2] == hits
    assert manager.num_free_blocks == 8 - 3 - 1
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 8
    # Freed but still cached: a third request reuses them.
    assert manager.find_cached_prefix(hashes, max_tokens=9) == hits


def test_salt_keeps_tenants_apart() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    manager.allocate("a", 8)
    manager.register_full_blocks("a", hash_full_blocks(tokens, 4, "t1"), 8)
    assert manager.find_cached_prefix(hash_full_blocks(tokens, 4, "t2"), 8) == []
    assert len(manager.find_cached_prefix(hash_full_blocks(tokens, 4, "t1"), 8)) == 2


def test_lru_eviction_reuses_least_recently_freed_first() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    old, new = hash_full_blocks([1, 2], 2), hash_full_blocks([3, 4], 2)
    manager.allocate("old", 2)
    manager.register_full_blocks("old", old, 2)
    manager.allocate("new", 2)
    manager.register_full_blocks("new", new, 2)
    manager.free("old")
    manager.free("new")
    # Two never-used blocks go first, then the older cached block; the newer survives.
    manager.allocate("x", 6)
    assert manager.find_cached_prefix(old, 2) == []
    assert len(manager.find_cached_prefix(new, 2)) == 1
    assert manager.num_cached_blocks == 1


def test_unreferenced_cached_block_counts_against_capacity_when_revived() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    hashes = hash_full_blocks([1, 2, 3, 4], 2)
    manager.allocate("a", 4)
    manager.register_full_blocks("a", hashes, 4)
    manager.free("a")
    hits = manager.find_cached_prefix(hashes, 4)
    manager.allocate("filler", 2)  # one free block left besides the two cached ones
    assert manager.can_allocate("b", 6, hits)
    assert not manager.can_allocate("b", 8, hits)


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate("parent", 6)
    copy = manager.fork("parent", "child", 6)
    parent, child = manager.block_table("parent"), manager.block_table("child")
    assert child[0] == parent[0]
    assert copy == (parent[1], child[1]) and child[1] != parent[1]
    manager.free("parent")
    manager.free("child")
    assert manager.num_free_blocks == 8
    manager.allocate("aligned", 8)
    assert manager.fork("aligned", "twin", 8) is None


def test_fork_without_a_free_block_raises() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    manager.allocate("parent", 6)
    with pytest.raises(MemoryError):
        manager.fork("parent", "child", 6)
    manager.free("parent")
    assert manager.num_free_blocks == 2
