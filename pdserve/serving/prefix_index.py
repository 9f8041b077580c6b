"""Which worker probably holds which prefix in its KV cache: the router's memory of where it sent
each prompt's full blocks.

Block hashes are the engine's own (``hash_full_blocks``: chained sha256 of the token ids, salted
per tenant), so the router and every worker name a block the same way. The index is approximate
by design: a worker may have evicted a block the router still remembers (then the request just
prefills more than hoped), and the router does not learn of blocks another router put there. It
is bounded (LRU over worker/block pairs) and a worker's entries are dropped when it is ejected,
because a restarted worker starts with an empty cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.engine.block_manager import BlockHash


class PrefixIndex:
    def __init__(self, capacity: int = 200_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, BlockHash], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, url: str, hashes: Sequence[BlockHash]) -> None:
        """``url`` now holds these blocks (the chain of one prompt, first block first)."""
        for block_hash in hashes:
            key = (url, block_hash)
            self._entries[key] = None
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def matched_blocks(self, url: str, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of the chain ``url`` probably holds."""
        matched = 0
        for block_hash in hashes:
            if (url, block_hash) not in self._entries:
                break
            matched += 1
        return matched

    def forget(self, url: str) -> None:
        for key in [key for key in self._entries if key[0] == url]:
            del self._entries[key]
