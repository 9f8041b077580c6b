"""``pdserve router``: the OpenAI-compatible API in front of the workers.

The router tokenizes (with the workers' own tokenizer, fetched from one of them), so it can
count a prompt's tokens, hash its prefix blocks for prefix-aware routing, and reserve KV room
on a decode worker before any prefill runs. Then serving/dispatch.py takes the request through
the workers, and this module turns their events into OpenAI responses.

Every request has one id: the client's ``X-Request-Id`` (or one made up here). It is sent back
in the ``X-Request-Id`` response header, handed to every worker, and carried by every JSON log
line about the request, on the router and on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.engine.tokenizer import Tokenizer
from pdserve.serving.admission import Admission
from pdserve.serving.api_keys import ApiKey, tenant_of
from pdserve.serving.body_limit import BodySizeLimit
from pdserve.serving.dispatch import DispatchConfig, Dispatcher, PreparedRequest
from pdserve.serving.errors import APIError, error_body, error_response
from pdserve.serving.kv_ledger import KVLedger
from pdserve.serving.offer_book import OfferBook
from pdserve.serving.openai_format import StreamState, completion_body
from pdserve.serving.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    PrefillRequest,
    SamplingFields,
)
from pdserve.serving.router_metrics import RouterMetrics, RouterRequestTimer
from pdserve.serving.worker_pool import ROLES, WorkerPool

log = logging.getLogger(__name__)
HEALTH_INTERVAL = 2.0
"""Seconds between health checks: a failing worker is ejected, a recovered one re-admitted."""
T = TypeVar("T")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(frozen=True)
class RouterConfig:
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    both: tuple[str, ...] = ()
    api_keys: tuple[ApiKey, ...] = ()
    """When any, every /v1 request must send ``Authorization: Bearer <key>``; a key's tenant
    salts its prefix cache (serving/api_keys.py)."""
    admin_key: str | None = None
    """Required (as a Bearer token) by the /admin endpoints that add and remove workers; without
    it they are open to loopback clients only."""
    worker_secret: str | None = None
    """Sent as a Bearer token to workers whose internal API needs it (serving/internal_auth.py)."""
    kv_backend: str | None = None
    """How decode workers pull KV ("shm" when every worker shares this host); None: their default."""
    kv_pipeline: bool = True
    """Start the decode worker's pull when the prefill starts, not after it (serving/dispatch.py)."""
    kv_codec: str | None = None
    """The codec decode workers ask for over tcp (none, fp16, bf16, int8, fp8); None: their default."""
    request_timeout: float = 600.0
    routing: str = "round_robin"
    """Worker choice: round_robin, least_loaded or prefix_aware (serving/worker_pool.py)."""
    local_prefill_tokens: int = 0
    """Prompts whose uncached part is at most this many tokens are prefilled on the decode worker."""
    kv_overcommit: float = 1.0
    """Decode KV blocks the router may reserve, as a multiple of the pool (serving/kv_ledger.py)."""
    max_concurrent: int = 256
    """Requests in flight at once; more wait in a queue (serving/admission.py)."""
    max_queued: int = 512
    queue_timeout: float = 30.0
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (default: the model's context less one token)."""
    reserve_output_tokens: int = 1024
    """Decode KV reserved for the output of a request that sets no max_tokens (its budget is the
    rest of the context, which would hold the whole context's blocks per request)."""


def create_router_app(config: RouterConfig) -> FastAPI:
    pool = WorkerPool(config.prefill, config.decode, config.both, config.routing, worker_secret=config.worker_secret)
    metrics = RouterMetrics()
    dispatcher = Dispatcher(
        pool, KVLedger(config.kv_overcommit),
        DispatchConfig(config.kv_backend, config.local_prefill_tokens, config.queue_timeout, config.kv_pipeline,
                       config.kv_codec),
        on_degraded=lambda how: metrics.degraded.labels(how).inc(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        headers = {"Authorization": f"Bearer {config.worker_secret}"} if config.worker_secret else None
        timeout = httpx.Timeout(config.request_timeout, connect=5.0)
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            app.state.client = client
            await pool.refresh(client)
            checker = asyncio.create_task(_check_health(pool, client))
            try:
                yield
            finally:
                checker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checker

    app = FastAPI(title="pdserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of a disaggregated (prefill/decode) LLM server.")
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.dispatcher = dispatcher
    app.state.offers = OfferBook()
    app.state.tokenizer = None
    app.state.admission = Admission(config.max_concurrent, config.max_queued, config.queue_timeout)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)

    @app.middleware("http")
    async def request_id_and_count(request: Request, call_next: Any) -> Any:
        sent = request.headers.get("x-request-id")
        request.state.request_id = sent if sent and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
            log.info("answered %d", response.status_code, extra={
                "request_id": request.state.request_id, "path": request.url.path, "status": response.status_code,
            })
        return response

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(generate_latest(metrics.registry).decode())

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            return error_response(f"{where} is not supported by this server", 400, where, "unsupported_parameter")
        return error_response(
            f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", 400, where or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(str(error.detail), error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error", extra={"request_id": getattr(request.state, "request_id", None)})
        return error_response(f"internal error: {type(error).__name__}: {error}", 500)

    @app.get("/health")
    async def health(request: Request) -> Any:
        await pool.refresh(app.state.client)
        status = 200 if pool.available(*ROLES) else 503  # any worker decodes when it must (worker_pool.py)
        body: dict[str, Any] = {"status": "ok" if status == 200 else "unavailable"}
        # A keyed router tells the workers' addresses only to its admin: anyone may ask /health.
        if not config.api_keys or _is_admin(request, config):
            body["workers"] = [w.summary() for w in pool.workers]
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        tenant_of(config.api_keys, request.headers.get("authorization"))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pdserve"} for name in pool.model_names()
        ]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        tenant = tenant_of(config.api_keys, request.headers.get("authorization"))
        prompt = body.single_prompt()
        await _check_model(app, body.model)
        tokenizer = await _tokenizer(app)
        ids = await run_in_threadpool(tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
        return await _serve(app, config, request, body, ids, body.max_tokens, tenant, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        tenant = tenant_of(config.api_keys, request.headers.get("authorization"))
        messages = body.template_messages()
        await _check_model(app, body.model)
        ids = await run_in_threadpool((await _tokenizer(app)).chat_prompt_ids, messages)
        return await _serve(app, config, request, body, ids, body.requested_max_tokens(), tenant, chat=True)

    @app.post("/v1/prefill")
    async def prefill(body: PrefillRequest, request: Request) -> Any:
        """pdserve extension, the two-phase form: prefill now, redeem the KV in a later completion
        (``kv_transfer_params`` in its body) on any decode worker, within the prefill worker's lease."""
        tenant = tenant_of(config.api_keys, request.headers.get("authorization"))
        await _check_model(app, body.model)
        tokenizer = await _tokenizer(app)
        if body.messages is not None:
            ids = await run_in_threadpool(tokenizer.chat_prompt_ids, body.template_messages())
        else:
            prompt = body.single_prompt()
            ids = await run_in_threadpool(tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = _max_tokens(app, config, ids, body.max_tokens)
        prepared = PreparedRequest(request.state.request_id, ids, body.sampling_params(max_tokens), tenant)
        async with app.state.admission.slot():
            prefilled = await dispatcher.prefill_only(app.state.client, prepared)
        app.state.offers.record(prefilled["kv_cache_id"], prefilled["kv_address"], tenant)
        return {
            "id": prepared.request_id, "object": "prefill", "model": body.model,
            "kv_transfer_params": {"kv_cache_id": prefilled["kv_cache_id"], "kv_address": prefilled["kv_address"]},
            "usage": {"prompt_tokens": prefilled["num_prompt_tokens"],
                      "cached_tokens": prefilled.get("num_cached_tokens", 0)},
        }

    @app.get("/admin/workers")
    async def list_workers(request: Request) -> Any:
        _authorize_admin(request, config)
        return {"workers": [w.summary() for w in pool.workers]}

    @app.post("/admin/workers")
    async def add_worker(request: Request) -> Any:
        """Register a worker at run time: {"url": "http://host:port", "role": "prefill|decode|both"}."""
        _authorize_admin(request, config)
        body = await _json_object(request)
        try:
            worker = pool.add(str(body.get("url", "")), str(body.get("role", "")))
        except ValueError as error:
            raise APIError(str(error), param="url") from None
        await pool.refresh(app.state.client)
        log.info("registered %s worker %s", worker.role, worker.url)
        return JSONResponse(worker.summary(), status_code=201)

    @app.delete("/admin/workers")
    async def remove_worker(request: Request) -> Any:
        """Deregister a worker: {"url": ...}; requests it is serving finish, no new ones go there."""
        _authorize_admin(request, config)
        body = await _json_object(request)
        try:
            worker = pool.remove(str(body.get("url", "")))
        except KeyError:
            raise APIError(f"no worker {body.get('url')!r} is registered", 404, param="url") from None
        log.info("deregistered %s worker %s", worker.role, worker.url)
        return worker.summary()

    return app


async def _check_health(pool: WorkerPool, client: httpx.AsyncClient) -> None:
    while True:
        await asyncio.sleep(HEALTH_INTERVAL)
        await pool.refresh(client)


def _is_admin(request: Request, config: RouterConfig) -> bool:
    """Whether the request carries the admin key (never true without one)."""
    if config.admin_key is None:
        return False
    try:
        tenant_of((ApiKey(config.admin_key, "admin"),), request.headers.get("authorization"))
    except APIError:
        return False
    return True


def _authorize_admin(request: Request, config: RouterConfig) -> None:
    if config.admin_key is None:
        if request.client is None or not request.client.host.startswith("127."):
            raise APIError("the admin API is open to loopback clients only (set --admin-key)", 403)
        return
    tenant_of((ApiKey(config.admin_key, "admin"),), request.headers.get("authorization"))


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise APIError("the body must be JSON") from None
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object")
    return body


async def _check_model(app: FastAPI, model: str) -> None:
    pool: WorkerPool = app.state.pool
    if model not in pool.model_names():
        await pool.refresh(app.state.client)
        if model not in pool.model_names():
            raise APIError(f"the model {model!r} does not exist; this server serves {pool.model_names()}",
                           404, param="model", code="model_not_found")


async def _tokenizer(app: FastAPI) -> Tokenizer:
    """The workers' tokenizer, fetched once from a healthy worker."""
    if app.state.tokenizer is None:
        pool: WorkerPool = app.state.pool
        for worker in [w for w in pool.workers if w.healthy]:
            try:
                response = await app.state.client.get(f"{worker.url}/internal/tokenizer", timeout=30.0)
                response.raise_for_status()
                app.state.tokenizer = await run_in_threadpool(Tokenizer.from_wire, response.json())
                break
            except (httpx.HTTPError, ValueError, KeyError) as error:
                log.warning("could not fetch the tokenizer from %s: %s", worker.url, error)
        if app.state.tokenizer is None:
            raise APIError("no worker is available to tokenize the prompt", 503, retry_after=5)
    return app.state.tokenizer


def _max_tokens(app: FastAPI, config: RouterConfig, ids: list[int], requested: int | None) -> int:
    """Check the prompt's length; the output budget (default: the rest of the context)."""
    context = app.state.pool.max_model_len()
    limit = min(config.max_prompt_tokens or context - 1, context - 1)
    if not ids:
        raise APIError("prompt is empty", param="prompt")
    if len(ids) > limit:
        raise APIError(f"the prompt is {len(ids)} tokens, more than the {limit} this server accepts "
                       f"(the model's context is {context})", param="prompt", code="context_length_exceeded")
    if requested is None:
        # The rest of the context, but never more than a decode worker's whole KV pool holds
        # (a longer budget could only be refused); the answer ends "length" there.
        pool_tokens = app.state.pool.max_sequence_tokens()
        room = context if pool_tokens is None else min(context, pool_tokens)
        return max(room - len(ids), 1)
    if requested > context:
        raise APIError(f"max_tokens is {requested}, more than the model's context of {context} tokens",
                       param="max_tokens")
    return requested


def _redeem(app: FastAPI, body: SamplingFields, tenant: str | None) -> dict[str, Any] | None:
    """Where to pull a redeemed offer's KV from: this router's own record of the offer, never the
    address the client sent (offer_book.py). None (recompute) for an offer it cannot vouch for."""
    if body.kv_transfer_params is None:
        return None
    kv_cache_id = body.kv_transfer_params.kv_cache_id
    address = app.state.offers.redeem(kv_cache_id, tenant)
    if address is None:
        app.state.metrics.degraded.labels("unknown_kv_offer").inc()
        log.info("unknown KV offer %r: recomputing", kv_cache_id)
        return None
    return {"kv_cache_id": kv_cache_id, "kv_address": address}


async def _serve(
    app: FastAPI, config: RouterConfig, request: Request, body: SamplingFields, ids: list[int],
    requested_max_tokens: int | None, tenant: str | None, chat: bool,
) -> Any:
    max_tokens = _max_tokens(app, config, ids, requested_max_tokens)
    params = body.sampling_params(max_tokens)
    if params["seed"] is None:
        # Drawn here rather than by the worker, so that a stream resumed on another worker after
        # its own died (serving/resumption.py) samples what the first would have: sampling
        # depends only on (seed, choice, position).
        params["seed"] = secrets.randbits(63)
    prepared = PreparedRequest(
        request.state.request_id, ids, params, tenant,
        redeem=_redeem(app, body, tenant),
        reserve_output_tokens=config.reserve_output_tokens if requested_max_tokens is None else None,
    )
    admission: Admission = app.state.admission
    queued = time.monotonic()
    await admission.acquire()  # released when the response is complete (or abandoned)
    try:
        response = await _respond(app, request, body, prepared, chat, admission, time.monotonic() - queued)
    except BaseException:
        admission.release()
        raise
    return response


async def _respond(
    app: FastAPI, request: Request, body: SamplingFields, prepared: PreparedRequest, chat: bool,
    admission: Admission, queue_seconds: float,
) -> Any:
    metrics: RouterMetrics = app.state.metrics
    dispatcher: Dispatcher = app.state.dispatcher
    timer = metrics.timer(queue_seconds, len(prepared.prompt_ids))
    events = _timed(dispatcher.run(app.state.client, prepared, observe=timer.on_event), timer)
    created = int(time.time())
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{prepared.request_id}"
    # Every generator in the chain is closed explicitly (aclosing), so that a client that goes
    # away closes the stream to the worker at once, and the worker aborts the request.
    if not body.stream:
        last = await _unless_disconnected(request, _last_event(events))  # on error, _serve releases
        admission.release()
        return completion_body(response_id, body.model, created, chat, last)
    try:
        first = await _first(events)  # fail with a proper status before the stream starts
    except BaseException:
        await events.aclose()
        raise
    state = StreamState(response_id, body.model, created, chat)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        last = first
        try:
            for line in state.chunks(first):
                yield line
            async for event in events:
                last = event
                for line in state.chunks(event):
                    yield line
        except APIError as error:  # tokens were sent already: end the stream with the error
            yield f"data: {json.dumps(error_body(error.message, error.status))}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            # A client that hangs up cancels this task; shielded, closing the chain still
            # reaches the worker, which then aborts the request and frees its KV.
            with anyio.CancelScope(shield=True):
                await events.aclose()
            admission.release()
        if include_usage:
            yield state.usage_chunk(last)
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def _timed(
    events: AsyncGenerator[dict[str, Any], None], timer: RouterRequestTimer
) -> AsyncGenerator[dict[str, Any], None]:
    """The events, passed through; the request's totals are observed when it ends, however it ends."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    finally:
        timer.finish()


async def _last_event(events: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
    last: dict[str, Any] | None = None
    async with aclosing(events):
        async for event in events:
            last = event
    if last is None:
        raise APIError("the worker ended the request without output", 503)
    return last


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result; if the client hangs up first, ``work`` is cancelled, which closes the
    worker's stream, and the worker aborts the request (a non-streaming answer nobody will read
    must not keep generating). Raises an APIError (499) then.

    The body was read already, so the next ASGI message is the client's ``http.disconnect``:
    one waiter on it (``Request.is_disconnected`` polls with a cancelled receive, which never
    sees the message through the request-id middleware's wrapped receive)."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise APIError("the client closed the connection", 499)
    finally:
        for pending in (task, disconnected):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(events: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise APIError("the worker ended the request without output", 503) from None


__all__ = ["ROLES", "RouterConfig", "create_router_app"]
