"""How one request travels through the workers: reserve KV room on a decode worker, prefill
(on a prefill worker, or locally when that is cheaper), hand the KV over, stream the decode.

Degrades instead of failing:
- no live prefill worker, or one that fails: the decode worker prefills itself;
- a prompt whose uncached part is at most ``local_prefill_tokens``: the decode worker prefills
  it itself, and no transfer happens (the prefix index says what its cache probably holds);
- a decode worker that fails before any token was streamed: another one takes the request;
- one that fails after tokens were streamed: another one resumes the stream where it stopped
  (serving/resumption.py), with no gap or repeat for the client;
- no decode worker up at all: a prefill worker decodes (roles are a preference, worker_pool.py);
- repeated KV transfer failures from one prefill worker (``kv_failed`` events) or failures of a
  worker open that worker's circuit breaker, and requests go elsewhere until a probe succeeds.

Pipelined (``kv_pipeline``, the default): the prefill worker announces its offer (``offered``)
as the prefill starts, and the decode worker's pull starts then, while the prefill runs: over
``tcp`` each layer streams as it is computed; over ``shm`` the pull connects and reserves its
blocks early and copies them when the prefill ends. The router keeps reading the prefill's
stream in the background to its ``prefilled`` event (closing it would abort the prefill). A
prefill that fails after its announcement withdraws its offer: the pull fails and the decode
worker recomputes (a ``kv_failed`` event, counted against the prefill worker's breaker).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx

from pdserve.engine.block_manager import BlockHash, hash_full_blocks
from pdserve.serving.errors import APIError
from pdserve.serving.kv_ledger import KVLedger
from pdserve.serving.pipelined_prefill import PipelinedPrefill
from pdserve.serving.resumption import RequestFailed, Resumption, is_whole, resumable
from pdserve.serving.worker_events import worker_events
from pdserve.serving.worker_pool import ROLES, Worker, WorkerPool

log = logging.getLogger(__name__)

EventObserver = Callable[[dict[str, Any]], None]
"""Sees every worker event of a request (prefilled, kv_received, kv_failed, output), e.g. for metrics."""


@dataclass(frozen=True)
class DispatchConfig:
    kv_backend: str | None = None
    """How decode workers pull KV ("shm" when every worker shares this host); None: their default."""
    local_prefill_tokens: int = 0
    """A prompt whose uncached part is at most this long is prefilled on the decode worker."""
    queue_timeout: float = 30.0
    """Seconds a request may wait for KV room on a decode worker."""
    kv_pipeline: bool = True
    """Start the decode worker's pull when the prefill starts, not after it ends."""
    kv_codec: str | None = None
    """The codec decode workers ask for over tcp; None: their own default."""


@dataclass
class PreparedRequest:
    request_id: str
    prompt_ids: list[int]
    params: dict[str, Any]
    cache_salt: str | None = None
    redeem: dict[str, Any] | None = None
    """Two-phase form: {"kv_cache_id", "kv_address"} of a prefill done by ``/v1/prefill``."""
    reserve_output_tokens: int | None = None
    """Output positions to reserve decode KV for; None: all of max_tokens. A request that set no
    max_tokens reserves only what is likely (it may grow past it; the engine preempts if the
    pool runs out), so that it does not hold the whole context's blocks."""

    @property
    def reserve_tokens(self) -> int:
        """Positions the router reserves decode KV blocks for: the prompt and the output."""
        output = int(self.params["max_tokens"])
        if self.reserve_output_tokens is not None:
            output = min(output, self.reserve_output_tokens)
        return len(self.prompt_ids) + output

    def worker_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": self.request_id, "prompt": self.prompt_ids, "params": self.params}
        if self.cache_salt is not None:
            body["cache_salt"] = self.cache_salt
        return body


class Dispatcher:
    def __init__(self, pool: WorkerPool, ledger: KVLedger, config: DispatchConfig,
                 on_degraded: Callable[[str], None] = lambda how: None) -> None:
        self.pool = pool
        self.ledger = ledger
        self.config = config
        self.on_degraded = on_degraded

    def prefix_hashes(self, request: PreparedRequest) -> list[BlockHash]:
        return hash_full_blocks(request.prompt_ids, self.pool.block_size(), request.cache_salt)

    async def run(
        self, client: httpx.AsyncClient, request: PreparedRequest, observe: EventObserver | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The request's ``output`` events, from whichever workers serve it."""
        observe = observe or (lambda event: None)
        pool = self.pool
        num_tokens = request.reserve_tokens
        owner = request.request_id
        decode, blocks = await self.ledger.reserve(
            lambda fits: pool.pick(*pool.decoding_roles(), fits=fits, owner=owner), lambda: pool.available(*ROLES),
            num_tokens, self.config.queue_timeout,
        )
        if decode.role == "prefill":
            self.on_degraded("decode_on_prefill_worker")
        follower: PipelinedPrefill | None = None
        """Reads a pipelined prefill's stream while the decode worker pulls its KV."""
        try:
            hashes = self.prefix_hashes(request)
            local = request.worker_body()
            first_try, prefill = local, None
            if request.redeem is not None:
                first_try = {**local, "kv": self._pull(request.redeem["kv_address"], request.redeem["kv_cache_id"])}
            elif decode.role == "decode":
                first_try, prefill, follower = await self._maybe_prefill(client, request, decode, hashes, observe)
            log.info("routed", extra={
                "request_id": request.request_id, "decode": decode.url, "prefill": prefill.url if prefill else None,
                "prompt_tokens": len(request.prompt_ids), "reserved_blocks": blocks, "pipelined": follower is not None,
            })
            tried: set[str] = set()
            body = first_try
            last: dict[str, Any] | None = None
            """The last output event passed on: what the client has been sent."""
            resumption: Resumption | None = None
            while True:
                tried.add(decode.url)
                try:
                    async with aclosing(worker_events(client, decode, body)) as events:
                        async for event in events:
                            observe(event)
                            kind = event.get("event")
                            if kind == "output":
                                if any(choice.get("finish_reason") == "abort" for choice in event["outputs"]):
                                    # Never passed on as a normal finish: a cut answer must not look whole.
                                    raise APIError("the worker aborted the request", 503, retry_after=1)
                                last = event if resumption is None else resumption.continued(event)
                                yield last
                            elif kind == "kv_received" and prefill is not None:
                                prefill.breaker.record_success()
                            elif kind == "kv_failed" and prefill is not None:
                                prefill.breaker.record_failure()  # failures towards that peer
                                self.on_degraded("kv_transfer_failed")
                            elif kind == "error":
                                raise RequestFailed(str(event.get("message")), int(event.get("status", 503)))
                    decode.breaker.record_success()
                    pool.prefix.record(decode.url, hashes)
                    if follower is not None:  # its `prefilled` event is due (the KV landed)
                        await follower.end(wait=5.0)
                    return
                except APIError as error:
                    if error.status >= 500:
                        decode.breaker.record_failure()
                    if last is not None and is_whole(last):
                        return  # the worker died after its last event: the answer is whole
                    if error.status < 500 or (last is not None and not resumable(request.params, error)):
                        raise
                    # Another decode worker if any is left, else a prefill worker (roles are a preference).
                    replacement = pool.pick_other("decode", "both", "prefill", exclude=tried, owner=owner)
                    if replacement is None:
                        raise
                    await self.ledger.move(decode.url, replacement, blocks)
                    # Under an id of its own on the worker (the request's id plus the attempt): the
                    # worker that ran this request's prefill may still hold the plain id a moment.
                    local = {**local, "request_id": f"{request.request_id}:{len(tried) + 1}"}
                    if last is None:
                        log.warning("retrying on %s after: %s", replacement.url, error.message,
                                    extra={"request_id": request.request_id, "as": local["request_id"]})
                        self.on_degraded("decode_retry")
                        body = local
                    else:
                        resumption = Resumption.after(last)
                        log.warning("resuming on %s after %d streamed tokens: %s", replacement.url,
                                    len(resumption.token_ids), error.message,
                                    extra={"request_id": request.request_id, "as": local["request_id"]})
                        self.on_degraded("decode_resumed")
                        body = resumption.body(local)
                    decode, prefill = replacement, None
                    if decode.role == "prefill":
                        self.on_degraded("decode_on_prefill_worker")
                    if follower is not None:  # nobody pulls that KV now: abort the prefill
                        await follower.end(wait=0)
                        follower = None
        finally:
            if follower is not None:
                await follower.end(wait=0)
            # A breaker probe this request held and never judged (its client left, a 4xx) is
            # released, else that worker's breaker would stay half-open with no probe forever.
            for worker in pool.workers:
                worker.breaker.release(owner)
            await self.ledger.release(decode.url, blocks)

    async def prefill_only(
        self, client: httpx.AsyncClient, request: PreparedRequest, observe: EventObserver | None = None,
    ) -> dict[str, Any]:
        """Two-phase form, first phase: the ``prefilled`` event of a prefill whose KV is offered."""
        prefill = self.pool.pick(*self.pool.prefilling_roles(), prefix=self.prefix_hashes(request),
                                 num_tokens=len(request.prompt_ids), owner=request.request_id)
        if prefill is None:
            raise APIError("no worker is available to prefill", 503, retry_after=5)
        try:
            prefilled = await self._prefill(client, prefill, {**request.worker_body(), "kv": {"mode": "offer"}})
        finally:
            prefill.breaker.release(request.request_id)  # its verdict comes with the pull, later
        if prefilled is None:
            raise APIError(f"the prefill on {prefill.url} failed", 503, retry_after=1)
        (observe or (lambda event: None))(prefilled)
        self.pool.prefix.record(prefill.url, self.prefix_hashes(request))
        return prefilled

    async def _maybe_prefill(
        self, client: httpx.AsyncClient, request: PreparedRequest, decode: Worker, hashes: list[BlockHash],
        observe: EventObserver,
    ) -> tuple[dict[str, Any], Worker | None, PipelinedPrefill | None]:
        """The decode worker's first body (pull the KV from a prefill worker, or prefill locally),
        the prefill worker, and the reader of a pipelined prefill's stream."""
        local = request.worker_body()
        cached = self.pool.prefix.matched_blocks(decode.url, hashes) * self.pool.block_size()
        if len(request.prompt_ids) - cached <= self.config.local_prefill_tokens:
            self.on_degraded("local_prefill_below_threshold")
            return local, None, None
        prefill = self.pool.pick("prefill", prefix=hashes, num_tokens=len(request.prompt_ids), owner=request.request_id)
        if prefill is None:
            self.on_degraded("decode_side_prefill")
            return local, None, None

        def prefilled(event: dict[str, Any]) -> None:
            observe(event)
            self.pool.prefix.record(prefill.url, hashes)

        follower = None
        if self.config.kv_pipeline:
            backend = self.config.kv_backend or str(decode.info.get("kv_backend") or "tcp")
            # Capturing layers as they are computed pays only for a pull that streams them; shm
            # copies the held blocks at the end anyway.
            offer = {"mode": "offer", "pipelined": backend != "shm", "announce": True}
            follower = PipelinedPrefill(client, prefill, {**local, "kv": offer}, prefilled)
            event = await follower.announced()
        else:
            event = await self._prefill(client, prefill, {**local, "kv": {"mode": "offer"}})
            if event is not None:
                prefilled(event)
        if event is None:
            prefill.breaker.record_failure()
            self.on_degraded("decode_side_prefill")
            return local, None, None
        return {**local, "kv": self._pull(event["kv_address"], request.request_id)}, prefill, follower

    def _pull(self, address: str, kv_cache_id: str) -> dict[str, Any]:
        kv = {"mode": "pull", "address": address, "kv_cache_id": kv_cache_id}
        if self.config.kv_backend:
            kv["backend"] = self.config.kv_backend
        if self.config.kv_codec:
            kv["codec"] = self.config.kv_codec
        return kv

    async def _prefill(self, client: httpx.AsyncClient, worker: Worker, body: dict[str, Any]) -> dict[str, Any] | None:
        """The ``prefilled`` event, or None when the prefill worker failed (the decode side prefills)."""
        try:
            async with aclosing(worker_events(client, worker, body)) as events:
                async for event in events:
                    if event.get("event") == "prefilled":
                        return event
                    if event.get("event") == "error":
                        raise APIError(str(event.get("message")), int(event.get("status", 503)))
        except APIError as error:
            if error.status < 500:
                raise
            log.warning("prefill on %s failed, prefilling on the decode worker: %s", worker.url, error.message,
                        extra={"request_id": body.get("request_id")})
        return None
