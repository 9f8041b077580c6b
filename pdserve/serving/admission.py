"""Back-pressure at the router: a bounded number of requests in flight, a bounded queue.

A request is admitted before any worker sees it — so no prefill runs for KV that no decode
worker could take now. Beyond ``max_concurrent`` requests in flight, up to ``max_queued``
wait (at most ``queue_timeout`` seconds). A request that finds the queue full is answered 429
(too many requests) with ``Retry-After``; one that waited its ``queue_timeout`` out, 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pdserve.serving.errors import APIError


class Admission:
    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout: float) -> None:
        if max_concurrent < 1 or max_queued < 0 or queue_timeout <= 0:
            raise ValueError("max_concurrent must be >= 1, max_queued >= 0, queue_timeout > 0")
        self._slots = asyncio.Semaphore(max_concurrent)
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.queued = 0

    async def acquire(self) -> None:
        if self._slots.locked():
            if self.queued >= self.max_queued:
                raise APIError("the server is at capacity; retry shortly", 429, retry_after=1, code="too_many_requests")
            self.queued += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
            except TimeoutError:
                raise APIError(
                    f"no capacity freed up within {self.queue_timeout:.0f} s; retry shortly", 503, retry_after=2
                ) from None
            finally:
                self.queued -= 1
        else:
            await self._slots.acquire()

    def release(self) -> None:
        self._slots.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
