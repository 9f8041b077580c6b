"""A worker's event stream for one request, as the router reads it (``POST /internal/generate``)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from pdserve.serving.errors import APIError
from pdserve.serving.output_deltas import DeltaDecoder
from pdserve.serving.worker_pool import Worker


async def worker_events(
    client: httpx.AsyncClient, worker: Worker, body: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """A worker's NDJSON event stream for one request (errors become APIError)."""
    try:
        async with client.stream("POST", f"{worker.url}/internal/generate", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise _worker_error(response)
            decoder = DeltaDecoder()  # outputs arrive as deltas (output_deltas.py)
            async for line in response.aiter_lines():
                if line:
                    try:
                        event = decoder.decode(json.loads(line))
                    except ValueError as error:
                        raise APIError(f"worker {worker.url} sent a broken event stream: {error}", 503) from None
                    yield event
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
