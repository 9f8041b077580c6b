"""A worker's internal HTTP API: what the router calls. Not the public OpenAI API.

    POST /internal/generate  {"request_id", "prompt" | "messages", "params", "kv", "resume"}
                             -> application/x-ndjson: the request's events (runtime/protocol.py),
                                outputs as deltas (serving/output_deltas.py). ``resume``: the
                                output token ids a dead worker streamed already (n=1, kv local):
                                prefilled with the prompt, counted and reported as output, and
                                sampling goes on after them (LLMEngine.add_request)
    POST /internal/abort     {"request_id"}
    GET  /internal/tokenizer the model's tokenizer (tokenizer.json + config), for the router
    GET  /health             200 {"status": "ok", "role", "model", "kv_address", "kv_backend"} once warmed up;
                             503 once the engine loop is stuck in one round of work (WEDGED_AFTER)
    GET  /load               waiting/running requests, free KV blocks (for routing)
    GET  /debug              leak-check state (free/held/reserved blocks, fds, threads, children)
    GET  /metrics            Prometheus text: request latencies, engine gauges, KV transfers (docs/metrics.md)

A client that disconnects from a generate stream aborts the request, which frees its KV. Output
events go out as deltas (serving/output_deltas.py).
With an internal secret (always under serve, required off loopback), every path but /health and
/metrics needs it (serving/internal_auth.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool

from pdserve.runtime.engine_service import EngineService
from pdserve.runtime.protocol import is_last_event
from pdserve.serving.errors import error_response
from pdserve.serving.event_hub import EventHub, Mailbox
from pdserve.serving.internal_auth import (
    CHALLENGE_HEADER,
    PROOF_HEADER,
    InternalSecret,
    prove_identity,
)
from pdserve.serving.output_deltas import DeltaEncoder
from pdserve.serving.worker_metrics import WorkerMetrics, WorkerRequestTimer

_CLIENT = b"http"


WEDGED_AFTER = 120.0
"""Seconds an engine loop may stay in one round of work before /health calls it wedged: far
beyond a step's time (a 2,048-token prefill chunk takes seconds on one CPU core)."""


def create_worker_app(service: EngineService, role: str, internal_secret: str | None = None,
                      wedged_after: float = WEDGED_AFTER) -> FastAPI:
    hub = EventHub(service)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        hub.start()
        try:
            yield
        finally:
            hub.stop()

    app = FastAPI(title="pdserve worker (internal API)", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.hub = hub
    metrics = WorkerMetrics(role, lambda: service.handle(_CLIENT, {"op": "stats"}) or {})
    if internal_secret:
        app.add_middleware(InternalSecret, secret=internal_secret)

    @app.post("/internal/generate")
    async def generate(request: Request) -> Any:
        try:
            body = await request.json()
            request_id = str(body["request_id"])
        except (ValueError, KeyError, TypeError):
            return error_response("body must be a JSON object with a request_id", 400)
        timer = metrics.request()  # arrival: before the engine sees the request
        try:
            events = hub.subscribe(request_id)
        except ValueError as error:
            return error_response(str(error), 409)
        fields = ("request_id", "prompt", "messages", "params", "kv", "cache_salt", "resume")
        message = {"op": "generate", **{k: body[k] for k in fields if k in body}}
        try:
            await run_in_threadpool(service.handle, _CLIENT, message)
        except (ValueError, TypeError, KeyError) as error:
            hub.unsubscribe(request_id)
            return error_response(str(error), 400)
        stream = _stream(service, hub, request_id, events, timer)
        return StreamingResponse(stream, media_type="application/x-ndjson")

    @app.post("/internal/abort")
    async def abort(request: Request) -> Any:
        body = await request.json()
        reply = await run_in_threadpool(service.handle, _CLIENT, {"op": "abort", "request_id": str(body["request_id"])})
        return reply

    @app.get("/health")
    async def health(request: Request) -> Any:
        busy = service.loop.busy_seconds()
        if not service.loop.alive or busy > wedged_after:
            # The router stops sending here; the requests in flight time out at their clients.
            why = (
                "its engine loop has stopped" if not service.loop.alive else f"its engine loop is stuck ({busy:.0f} s)"
            )
            return error_response(f"worker unhealthy: {why}", 503)
        challenge = request.headers.get(CHALLENGE_HEADER)
        proof = {PROOF_HEADER: prove_identity(internal_secret, challenge)} if internal_secret and challenge else None
        return JSONResponse({
            "status": "ok", "role": role, "model": service.engine.model_name,
            "kv_address": service.connector.address, "kv_backend": service.transfer.backend,
            "max_model_len": service.engine.max_model_len,
            "weight_format": service.engine.config.model.weight_format,
        }, headers=proof)

    @app.get("/internal/tokenizer")
    async def tokenizer() -> Any:
        """The model's tokenizer, for the router (which holds no model) to count and hash prompts."""
        return await run_in_threadpool(service.engine.tokenizer.to_wire)

    @app.get("/load")
    async def load() -> Any:
        return await run_in_threadpool(service.handle, _CLIENT, {"op": "stats"})

    @app.get("/debug")
    async def debug() -> Any:
        return await run_in_threadpool(service.handle, _CLIENT, {"op": "debug"})

    @app.get("/metrics")
    async def prometheus() -> Any:
        def scrape() -> str:
            registries = (service.connector.metrics.registry, metrics.registry)
            return "".join(generate_latest(r).decode() for r in registries)

        return PlainTextResponse(await run_in_threadpool(scrape))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        return error_response(f"internal error: {error}", 500)

    return app


async def _stream(
    service: EngineService, hub: EventHub, request_id: str, events: Mailbox, timer: WorkerRequestTimer,
) -> AsyncIterator[bytes]:
    finished = False
    deltas = DeltaEncoder()  # outputs go out as deltas: linear in the output's length
    try:
        while True:
            event = await events.get()
            timer.on_event(event)
            yield (json.dumps(deltas.encode(event)) + "\n").encode()
            if is_last_event(event):
                finished = True
                timer.end("error" if event.get("event") in ("error", "kv_failed") else "finished")
                return
    finally:
        hub.unsubscribe(request_id)
        if not finished:  # the client went away: free the request's KV on this worker
            timer.end("aborted")
            # Shielded: a disconnect cancels this task, and an unshielded await would be
            # cancelled before the abort ever reached the engine.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(service.handle, _CLIENT, {"op": "abort", "request_id": request_id})
