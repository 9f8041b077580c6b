"""The shm connector's mappings of a sender's pool, under concurrent pulls and a dying sender.

A mapping closed under a copy unmaps memory a tensor still points into: the next read kills
the whole process with SIGSEGV (this once took down a decode worker in CI). These tests read
through borrowed mappings after the events that used to unmap them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import torch

from pdserve.engine.config import CacheConfig
from pdserve.engine.kv_cache import KVCachePool, KVLayout, allocate_pool
from pdserve.transfer.shm import PeerPools

LAYOUT = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
THREADS = 8


@pytest.fixture
def sender_pool() -> Iterator[KVCachePool]:
    pool = allocate_pool(LAYOUT, CacheConfig(allocator="shm"), torch.device("cpu"))
    pool.tensor.copy_(torch.arange(pool.tensor.numel(), dtype=torch.float32).view(LAYOUT.shape))
    yield pool
    pool.close()


def mappings(name: str) -> int:
    """How many times this process maps the segment (the sender's own pool is one of them)."""
    with open("/proc/self/maps") as maps:
        return sum(f"/dev/shm/{name}" in line for line in maps)


def test_concurrent_first_pulls_share_one_mapping(sender_pool: KVCachePool) -> None:
    name = sender_pool.shm_name
    assert name is not None
    peers = PeerPools(LAYOUT)
    arrived = threading.Barrier(THREADS)
    inside = threading.Barrier(THREADS)
    addresses: list[int] = []
    sums: list[float] = []

    def pull() -> None:
        arrived.wait(timeout=10)
        with peers.borrow(name, os.getpid()) as pool:
            inside.wait(timeout=10)  # every borrow overlaps every other
            addresses.append(pool.data_ptr())
            sums.append(float(pool.sum()))

    threads = [threading.Thread(target=pull) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(addresses) == THREADS
    assert len(set(addresses)) == 1, "each pull mapped the segment again"
    assert sums == [float(sender_pool.tensor.sum())] * THREADS
    assert mappings(name) == 2
    peers.close()
    assert mappings(name) == 1


def test_a_dead_senders_pool_stays_mapped_until_the_copy_ends(sender_pool: KVCachePool) -> None:
    name = sender_pool.shm_name
    assert name is not None
    expected = sender_pool.tensor[1, 1, 5].clone()
    peers = PeerPools(LAYOUT)
    with peers.borrow(name, os.getpid()) as pool:
        sender_pool.close()  # the sender exits: its segment is unlinked
        peers.detach_dead()
        assert peers.mapped() == [], "a dead sender's pool stays listed"
        assert torch.equal(pool[1, 1, 5], expected)  # still mapped: this read must not crash
        assert mappings(name) == 1  # the sender's own mapping went with it; ours stays
    assert mappings(name) == 0, "the dead sender's pool is still mapped after the copy"


def test_closing_the_connector_waits_for_copies_in_flight(sender_pool: KVCachePool) -> None:
    name = sender_pool.shm_name
    assert name is not None
    peers = PeerPools(LAYOUT)
    with peers.borrow(name, os.getpid()) as pool:
        peers.close()
        assert mappings(name) == 2
        assert torch.equal(pool, sender_pool.tensor)
    assert mappings(name) == 1
    with peers.borrow(name, os.getpid()) as pool:  # a pull after close maps it afresh
        assert torch.equal(pool, sender_pool.tensor)
    peers.close()
    assert mappings(name) == 1
