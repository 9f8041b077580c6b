"""A prefill whose offer is announced, read in the background while the decode worker pulls.

The router asks the prefill worker for ``kv: {"mode": "offer", "announce": true, ...}``; the
worker emits ``offered`` (with its KV address) when the prefill starts computing, and
``prefilled`` when it ends. :meth:`PipelinedPrefill.announced` gives the first of them, so that
the decode worker's pull can start during the prefill; the stream is read on to ``prefilled``
meanwhile, because a worker aborts a request whose stream is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import httpx

from pdserve.serving.errors import APIError
from pdserve.serving.worker_events import worker_events
from pdserve.serving.worker_pool import Worker

log = logging.getLogger(__name__)


class PipelinedPrefill:
    def __init__(
        self, client: httpx.AsyncClient, worker: Worker, body: dict[str, Any],
        on_prefilled: Callable[[dict[str, Any]], None],
    ) -> None:
        """Starts reading at once (call it on the event loop); ``on_prefilled`` sees the
        ``prefilled`` event when it comes."""
        self.worker = worker
        self._announced: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(client, body, on_prefilled))

    async def announced(self) -> dict[str, Any] | None:
        """The ``offered`` event (or ``prefilled``, if the prefill never announced itself), or None
        if the prefill failed first; a 4xx about the request is raised, as for any prefill."""
        try:
            return await self._announced
        except BaseException:
            await self.end(wait=0)
            raise

    async def end(self, wait: float) -> None:
        """Let the stream finish within ``wait`` seconds, else close it: the prefill worker then
        aborts the prefill, if it still runs."""
        if self._task.done():
            return
        if wait > 0:
            await asyncio.wait({self._task}, timeout=wait)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)

    async def _follow(
        self, client: httpx.AsyncClient, body: dict[str, Any], on_prefilled: Callable[[dict[str, Any]], None]
    ) -> None:
        announced = self._announced
        try:
            async with aclosing(worker_events(client, self.worker, body)) as events:
                async for event in events:
                    kind = event.get("event")
                    if kind in ("offered", "prefilled") and not announced.done():
                        announced.set_result(event)
                    if kind == "prefilled":
                        on_prefilled(event)
                        return
                    if kind == "error":
                        raise APIError(str(event.get("message")), int(event.get("status", 503)))
        except APIError as error:
            if error.status < 500 and not announced.done():
                announced.set_exception(error)
                return
            # After the announcement the offer is withdrawn, so the pull fails and the decode
            # worker recomputes: its kv_failed event does the breaker's accounting.
            log.warning("pipelined prefill on %s failed: %s", self.worker.url, error.message,
                        extra={"request_id": body.get("request_id")})
        finally:
            if not announced.done():
                announced.set_result(None)
