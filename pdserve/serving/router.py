"""``pdserve router``: the OpenAI-compatible API in front of the workers.

Per request, disaggregated: a prefill worker prefills and offers the KV (its stream ends with a
``prefilled`` event carrying the prompt's token ids and its KV server's address); a decode
worker pulls that KV and streams the output, which the router turns into OpenAI responses.
Colocated (``both`` workers only): one worker does everything. With decode workers but no live
prefill worker, the decode worker prefills itself. The router holds no model and no tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.serving.admission import Admission
from pdserve.serving.errors import APIError, error_body, error_response
from pdserve.serving.openai_format import StreamState, completion_body
from pdserve.serving.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from pdserve.serving.router_metrics import RouterMetrics
from pdserve.serving.worker_pool import Worker, WorkerPool

log = logging.getLogger(__name__)
HEALTH_INTERVAL = 2.0
"""Seconds between health checks: a failing worker is ejected, a recovered one re-admitted."""


@dataclass(frozen=True)
class RouterConfig:
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    both: tuple[str, ...] = ()
    api_key: str | None = None
    """When set, every /v1 request must send ``Authorization: Bearer <api_key>``."""
    kv_backend: str | None = None
    """How decode workers pull KV ("shm" when every worker shares this host); None: their default."""
    request_timeout: float = 600.0
    routing: str = "round_robin"
    """Worker choice: round_robin or least_loaded (serving/worker_pool.py)."""
    max_concurrent: int = 256
    """Requests in flight at once; more wait in a queue (serving/admission.py)."""
    max_queued: int = 512
    queue_timeout: float = 30.0


def create_router_app(config: RouterConfig) -> FastAPI:
    pool = WorkerPool(list(config.prefill), list(config.decode), list(config.both), config.routing)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(config.request_timeout, connect=5.0)) as client:
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
    app.state.metrics = metrics = RouterMetrics()
    app.state.admission = Admission(config.max_concurrent, config.max_queued, config.queue_timeout)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
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
        return error_response(f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", 400, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(str(error.detail), error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        return error_response(f"internal error: {type(error).__name__}: {error}", 500)

    @app.get("/health")
    async def health() -> Any:
        await pool.refresh(app.state.client)
        workers = [{"url": w.url, "role": w.role, "healthy": w.healthy} for w in pool.workers]
        status = 200 if pool.pick("decode", "both") else 503
        return JSONResponse({"status": "ok" if status == 200 else "unavailable", "workers": workers}, status_code=status)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        _authorize(request, config)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pdserve"} for name in pool.model_names()
        ]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _authorize(request, config)
        prompt = body.single_prompt()
        max_tokens = body.max_tokens if body.max_tokens is not None else pool.max_model_len()
        return await _serve(app, config, body, {"prompt": prompt}, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _authorize(request, config)
        messages = body.template_messages()
        max_tokens = body.requested_max_tokens() or pool.max_model_len()
        return await _serve(app, config, body, {"messages": messages}, max_tokens, chat=True)

    return app


async def _check_health(pool: WorkerPool, client: httpx.AsyncClient) -> None:
    while True:
        await asyncio.sleep(HEALTH_INTERVAL)
        await pool.refresh(client)


def _authorize(request: Request, config: RouterConfig) -> None:
    if config.api_key is None:
        return
    if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
        raise APIError("invalid API key", 401, code="invalid_api_key")


async def _serve(
    app: FastAPI, config: RouterConfig, body: SamplingFields, prompt: dict[str, Any], max_tokens: int, chat: bool,
) -> Any:
    pool: WorkerPool = app.state.pool
    client: httpx.AsyncClient = app.state.client
    if body.model not in pool.model_names():
        await pool.refresh(client)
        if body.model not in pool.model_names():
            raise APIError(f"the model {body.model!r} does not exist; this server serves {pool.model_names()}",
                           404, param="model", code="model_not_found")
    context = pool.max_model_len()
    if max_tokens > context:
        raise APIError(f"max_tokens is {max_tokens}, more than the model's context of {context} tokens",
                       param="max_tokens")
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    params = body.sampling_params(max_tokens)
    admission: Admission = app.state.admission
    await admission.acquire()  # released when the response is complete (or abandoned)
    try:
        response = await _respond(app, config, body, prompt, params, request_id, chat, admission)
    except BaseException:
        admission.release()
        raise
    return response


async def _respond(
    app: FastAPI, config: RouterConfig, body: SamplingFields, prompt: dict[str, Any], params: dict[str, Any],
    request_id: str, chat: bool, admission: Admission,
) -> Any:
    pool: WorkerPool = app.state.pool
    client: httpx.AsyncClient = app.state.client
    metrics: RouterMetrics = app.state.metrics
    started = time.monotonic()
    events = _timed(_run(client, pool, config, request_id, prompt, params, metrics), metrics, started)
    created = int(time.time())
    # Every generator in the chain is closed explicitly (aclosing), so that a client that goes
    # away closes the stream to the worker at once, and the worker aborts the request.
    if not body.stream:
        last: dict[str, Any] | None = None
        async with aclosing(events):
            async for event in events:
                last = event
        assert last is not None
        admission.release()
        return completion_body(request_id, body.model, created, chat, last)
    try:
        first = await _first(events)  # fail with a proper status before the stream starts
    except BaseException:
        await events.aclose()
        raise
    state = StreamState(request_id, body.model, created, chat)
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
    events: AsyncGenerator[dict[str, Any], None], metrics: RouterMetrics, started: float
) -> AsyncGenerator[dict[str, Any], None]:
    first = True
    async with aclosing(events):
        async for event in events:
            if first:
                metrics.time_to_first_token.observe(time.monotonic() - started)
                first = False
            yield event
    metrics.request_seconds.observe(time.monotonic() - started)


async def _first(events: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise APIError("the worker ended the request without output", 503) from None


async def _run(
    client: httpx.AsyncClient, pool: WorkerPool, config: RouterConfig, request_id: str,
    prompt: dict[str, Any], params: dict[str, Any], metrics: RouterMetrics,
) -> AsyncGenerator[dict[str, Any], None]:
    """The request's output events, from whichever workers serve it.

    Degrades instead of failing: with no live prefill worker (or one that fails), the decode
    worker prefills itself; a decode worker that fails before any token was streamed is
    replaced by another one, which prefills locally.
    """
    local = {"request_id": request_id, **prompt, "params": params}
    first_try = local
    decode = pool.pick("decode", "both")
    if decode is None:
        raise APIError("no decode worker is available", 503, retry_after=5)
    prefill = pool.pick("prefill") if decode.role == "decode" else None
    if prefill is not None:
        prefilled = await _prefill(client, prefill, {**local, "kv": {"mode": "offer"}})
        if prefilled is not None:
            kv = {"mode": "pull", "address": prefilled["kv_address"], "kv_cache_id": request_id}
            if config.kv_backend:
                kv["backend"] = config.kv_backend
            local = {**local, "prompt": prefilled["prompt_token_ids"]}
            local.pop("messages", None)
            first_try = {**local, "kv": kv}
        else:
            metrics.degraded.labels("decode_side_prefill").inc()
    tried: set[str] = set()
    body = first_try
    while True:
        tried.add(decode.url)
        streamed = False
        try:
            async with aclosing(_worker_events(client, decode, body)) as worker_events:
                async for event in worker_events:
                    if event.get("event") == "output":
                        streamed = True
                        yield event
                    elif event.get("event") == "error":
                        raise APIError(str(event.get("message")), int(event.get("status", 503)))
            return
        except APIError as error:
            replacement = pool.pick_other("decode", "both", exclude=tried)
            if streamed or error.status < 500 or replacement is None:
                raise
            log.warning("retrying %s on %s after: %s", request_id, replacement.url, error.message)
            metrics.degraded.labels("decode_retry").inc()
            decode, body = replacement, local


async def _prefill(client: httpx.AsyncClient, worker: Worker, body: dict[str, Any]) -> dict[str, Any] | None:
    """The ``prefilled`` event, or None when the prefill worker failed (the decode side prefills)."""
    try:
        async with aclosing(_worker_events(client, worker, body)) as events:
            async for event in events:
                if event.get("event") == "prefilled":
                    return event
                if event.get("event") == "error":
                    raise APIError(str(event.get("message")), int(event.get("status", 503)))
    except APIError as error:
        if error.status < 500:
            raise
        log.warning("prefill on %s failed, prefilling on the decode worker: %s", worker.url, error.message)
    return None


async def _worker_events(
    client: httpx.AsyncClient, worker: Worker, body: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    try:
        async with client.stream("POST", f"{worker.url}/internal/generate", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise _worker_error(response)
            async for line in response.aiter_lines():
                if line:
                    yield json.loads(line)
    except httpx.HTTPError as error:
        worker.healthy = False
        raise APIError(f"worker {worker.url} failed: {error}", 503, retry_after=1) from None


def _worker_error(response: httpx.Response) -> APIError:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    status = response.status_code if 400 <= response.status_code < 500 else 503
    return APIError(message, status)
