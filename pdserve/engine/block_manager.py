"""KV block accounting: block tables, reference counts, prefix caching and LRU eviction.

Plain Python with no torch dependency, so the planner's simulator runs this very policy. The
block manager only decides *which* block ids hold which tokens; the model runner owns the tensors.

Prefix caching: a full block is identified by a chained hash of its tokens, its parent block's
hash and a per-request ``cache_salt`` (sha256, so every process and the router compute the same
ids). A block whose reference count drops to zero keeps its hash and stays reusable until it is
evicted; free blocks are handed out least recently freed first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None = None
) -> BlockHash:
    """Chained hash of one full block: stable across processes and machines."""
    digest = hashlib.sha256()
    if parent_hash is None:
        # Only the first block carries the salt; the chain carries it on to every later block.
        digest.update(b"root:" + (cache_salt or "").encode("utf-8"))
    else:
        digest.update(parent_hash)
    digest.update(b"|" + ",".join(map(str, token_ids)).encode("ascii"))
    return digest.digest()


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``, extending the already computed ``known``."""
    hashes = list(known)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[start : start + block_size], cache_salt))
    return hashes


@dataclass
class CacheStats:
    """Prefix-cache counters since start."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Owns the mapping from sequences to KV block ids."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Free blocks in eviction order: the first is reused first (least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        # How many leading blocks of each table are already registered in the prefix cache.
        self._num_hashed: dict[str, int] = {}
        self.stats = CacheStats()

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that hold a reusable prefix (referenced or not)."""
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def has_table(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, block_hashes: Sequence[BlockHash], max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` covering ≤ ``max_tokens``."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for block_hash in block_hashes[: max_tokens // self.block_size]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq_id: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Whether ``seq_id`` could grow to hold ``num_tokens`` tokens now."""
        return self._num_new_blocks(seq_id, num_tokens, cached_blocks) <= self.num_free_blocks

    # -- mutations -------------------------------------------------------------------------

    def allocate(self, seq_id: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Grow ``seq_id``'s table to cover ``num_tokens`` tokens; False (and no change) if full.

        ``cached_blocks`` (from :meth:`find_cached_prefix`) may only be given for a sequence
        without a table yet; they are shared, not copied.
        """
        if cached_blocks and seq_id in self._tables:
            raise ValueError(f"{seq_id} already has blocks; a cached prefix only applies first")
        if self._num_new_blocks(seq_id, num_tokens, cached_blocks) > self.num_free_blocks:
            return False
        table = self._tables.setdefault(seq_id, [])
        for block in cached_blocks:
            self._take(block)
            table.append(block)
        self._num_hashed[seq_id] = max(self._num_hashed.get(seq_id, 0), len(cached_blocks))
        while len(table) < self.blocks_needed(num_tokens):
            block = self._free_head()
            self._take(block)
            table.append(block)
        return True

    def register_full_blocks(
        self, seq_id: str, block_hashes: Sequence[BlockHash], num_computed_tokens: int
    ) -> None:
        """Offer the full, computed blocks of ``seq_id`` to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        num_full = min(num_computed_tokens // self.block_size, len(block_hashes), len(table))
        for index in range(self._num_hashed.get(seq_id, 0), num_full):
            block, block_hash = table[index], block_hashes[index]
            if block_hash not in self._cached and self._block_hash[block] is None:
                self._block_hash[block] = block_hash
                self._cached[block_hash] = block
        self._num_hashed[seq_id] = max(self._num_hashed.get(seq_id, 0), num_full)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> tuple[int, int] | None:
        """Give ``child_id`` the parent's blocks for its first ``num_tokens`` tokens.

        Full blocks are shared; a partially filled last block is copied, since both sequences
        will write into it. Returns the ``(source, destination)`` block copy the runner must
        perform, or None. Raises MemoryError when no block is free for that copy.
        """
        if child_id in self._tables:
            raise ValueError(f"{child_id} already has blocks")
        parent = self._tables[parent_id]
        num_blocks = self.blocks_needed(num_tokens)
        num_full = num_tokens // self.block_size
        copy: tuple[int, int] | None = None
        if num_blocks > num_full and not self._free:
            raise MemoryError("no free KV block for a forked sequence's partial block")
        table: list[int] = []
        for block in parent[:num_full]:
            self._take(block)
            table.append(block)
        if num_blocks > num_full:
            destination = self._free_head()
            self._take(destination)
            table.append(destination)
            copy = (parent[num_full], destination)
        self._tables[child_id] = table
        self._num_hashed[child_id] = min(self._num_hashed.get(parent_id, 0), num_full)
        return copy

    def retain(self, seq_id: str, holder_id: str) -> None:
        """Give ``holder_id`` a read-only reference to every block of ``seq_id``.

        Used to keep a finished prefill's KV alive for a transfer after its sequence is freed;
        nothing writes a held block, so even a partial last block is shared, not copied.
        """
        if holder_id in self._tables:
            raise ValueError(f"{holder_id} already has blocks")
        table = list(self._tables[seq_id])
        for block in table:
            self._take(block)
        self._tables[holder_id] = table
        self._num_hashed[holder_id] = self._num_hashed.get(seq_id, 0)

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id``; cached ones stay reusable until evicted."""
        table = self._tables.pop(seq_id, None)
        self._num_hashed.pop(seq_id, None)
        if not table:
            return
        # Tail blocks first, so a sequence's later blocks are evicted before its prefix.
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def record_query(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queried_tokens += num_queried_tokens
        self.stats.hit_tokens += num_hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (e.g. after weights change)."""
        for block in self._free:
            block_hash = self._block_hash[block]
            if block_hash is not None:
                del self._cached[block_hash]
                self._block_hash[block] = None

    # -- internals -------------------------------------------------------------------------

    def _num_new_blocks(self, seq_id: str, num_tokens: int, cached_blocks: Sequence[int]) -> int:
        have = len(self._tables.get(seq_id, ())) + len(cached_blocks)
        # A cached block that is currently free must be taken out of the free pool too.
        revived = sum(1 for block in cached_blocks if self._ref_counts[block] == 0)
        return max(0, self.blocks_needed(num_tokens) - have) + revived

    def _free_head(self) -> int:
        block = next(iter(self._free))
        block_hash = self._block_hash[block]
        if block_hash is not None:
            # Evicting: the block's old contents are about to be overwritten.
            del self._cached[block_hash]
            self._block_hash[block] = None
        return block

    def _take(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            self._free.pop(block)
        self._ref_counts[block] += 1
