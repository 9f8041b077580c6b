"""Back-pressure down to KV blocks: the decode pool's blocks, reserved per request by the router.

Before any prefill runs, the router reserves on a decode worker the blocks the request can grow
to (prompt + max_tokens, rounded up to blocks; a request that set no max_tokens reserves the
prompt and ``--reserve-output-tokens``, not the whole context). A request that fits nowhere waits, in the
router's bounded queue, for a reservation to end; so a decode worker is never handed KV it
has no room for, and no prefill runs for KV nobody can take. Capacity is the worker's own
``num_blocks`` (its ``/load``) times ``overcommit``: above 1 trades that guarantee for more
concurrency, the engine preempting (recomputing) when output lengths come out long.

The ledger is this router's: several routers in front of one pool each see only their own
reservations (then give each a share, with ``overcommit`` < 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable

from pdserve.serving.errors import APIError
from pdserve.serving.worker_pool import Worker


class KVLedger:
    def __init__(self, overcommit: float = 1.0) -> None:
        if overcommit <= 0:
            raise ValueError("overcommit must be positive")
        self.overcommit = overcommit
        self.reserved: dict[str, int] = {}
        """Worker URL -> blocks reserved by requests in flight."""
        self._changed = asyncio.Condition()

    def capacity(self, worker: Worker) -> int:
        return int(int(worker.load.get("num_blocks", 0)) * self.overcommit)

    def blocks_for(self, worker: Worker, num_tokens: int) -> int:
        """Blocks ``num_tokens`` positions need on ``worker``, capped at its capacity (so a huge
        request runs alone rather than never)."""
        block_size = int(worker.load.get("block_size", 0)) or 16
        return min(math.ceil(num_tokens / block_size), max(self.capacity(worker), 1))

    def fits(self, worker: Worker, num_tokens: int) -> bool:
        if "num_blocks" not in worker.load:  # no load report yet: nothing to go by
            return True
        return self.reserved.get(worker.url, 0) + self.blocks_for(worker, num_tokens) <= max(self.capacity(worker), 1)

    async def reserve(
        self, choose: Callable[[Callable[[Worker], bool]], Worker | None], available: Callable[[], bool],
        num_tokens: int, timeout: float,
    ) -> tuple[Worker, int]:
        """Wait (at most ``timeout`` s) until ``choose(fits)`` finds a worker with room; reserve there.

        ``choose`` picks among healthy workers by the routing policy, keeping those for which
        the filter it is given is true, or None; ``available`` says whether any worker is up at all
        (if not, waiting is pointless: a 503 at once).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            while True:
                worker = choose(lambda w: self.fits(w, num_tokens))
                if worker is not None:
                    blocks = self.blocks_for(worker, num_tokens)
                    self.reserved[worker.url] = self.reserved.get(worker.url, 0) + blocks
                    return worker, blocks
                if not available():
                    raise APIError("no worker is available to decode", 503, retry_after=5)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise APIError(
                        f"no decode worker had KV room for {num_tokens} tokens within {timeout:.0f} s; "
                        "retry shortly, or ask for fewer max_tokens", 503, retry_after=2,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def release(self, url: str, blocks: int) -> None:
        async with self._changed:
            left = self.reserved.get(url, 0) - blocks
            if left > 0:
                self.reserved[url] = left
            else:
                self.reserved.pop(url, None)
            self._changed.notify_all()

    async def move(self, old_url: str, new: Worker, blocks: int) -> None:
        """A retry moved the request to another worker: its reservation moves with it."""
        await self.release(old_url, blocks)
        async with self._changed:
            self.reserved[new.url] = self.reserved.get(new.url, 0) + blocks
