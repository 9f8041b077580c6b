"""The load generator: streams completions from an OpenAI-compatible endpoint, timing every token.

Open loop (``rate``): requests leave at the arrival process's times whatever the server does, as
real users would; closed loop (``concurrency``): that many clients, each sending its next request
when the last one ended. Either way the run is bounded by ``num_requests`` and ``time_limit``:
requests not yet sent by then are not sent, requests still running are cancelled and recorded as
failures (so an overloaded server cannot make a run last forever, nor look better by it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from pdserve.traffic.arrivals import arrival_times
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.workloads import RequestSpec


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    """The server's root, e.g. http://127.0.0.1:8000 (requests go to /v1/completions)."""
    model: str | None = None
    """None: the first model of /v1/models."""
    rate: float | None = None
    """Requests per second (open loop; inf = all at once); None: closed loop at ``concurrency``."""
    concurrency: int = 1
    burstiness: float = 1.0
    time_limit: float = 300.0
    api_key: str | None = None
    ignore_eos: bool = True
    """Ask for exactly max_tokens (vLLM-style ``ignore_eos``), so every target does the same work."""
    seed: int = 0
    request_timeout: float = 600.0


async def run_load(config: LoadConfig, specs: Sequence[RequestSpec], progress: bool = True) -> list[RequestRecord]:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(config.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=config.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        model = config.model or await first_model(client)
        records = [RequestRecord(i, spec.kind, 0.0, max_tokens=spec.max_tokens) for i, spec in enumerate(specs)]
        bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not progress, leave=False)
        start = time.perf_counter()

        async def one(record: RequestRecord, spec: RequestSpec) -> None:
            await _stream_one(client, model, spec, record, config.ignore_eos, start)
            bar.update(1)

        if config.rate is not None:
            times = arrival_times(config.rate, len(specs), config.burstiness, config.seed)
            tasks = []
            for record, spec, at in zip(records, specs, times, strict=True):
                record.scheduled = at
                delay = at - (time.perf_counter() - start)
                if at > config.time_limit:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(record, spec)))
            sent = records[: len(tasks)]
        else:
            queue = list(zip(records, specs, strict=True))
            sent = []

            async def client_loop() -> None:
                while queue and time.perf_counter() - start < config.time_limit:
                    record, spec = queue.pop(0)
                    record.scheduled = time.perf_counter() - start
                    sent.append(record)
                    await one(record, spec)

            tasks = [asyncio.create_task(client_loop()) for _ in range(max(config.concurrency, 1))]
        remaining = config.time_limit - (time.perf_counter() - start)
        _, pending = await asyncio.wait(tasks, timeout=max(remaining, 0.0)) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
        for record in sent:
            if record.end is None and record.error is None:
                record.error = "cancelled at the time limit"
        return sorted(sent, key=lambda r: r.index)


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def _stream_one(
    client: httpx.AsyncClient, model: str, spec: RequestSpec, record: RequestRecord, ignore_eos: bool,
    start: float,
) -> None:
    body = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    record.sent = time.perf_counter() - start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter() - start
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return
                if chunk.get("usage"):
                    record.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                    record.output_tokens = int(chunk["usage"]["completion_tokens"])
                # A chunk with a choice carries output, even when its text is empty (a token that
                # decodes to nothing, like a special token, or the final chunk's finish_reason).
                if chunk.get("choices"):
                    if record.first_token is None:
                        record.first_token = now
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(1)
        record.end = time.perf_counter() - start
        if record.first_token is None:
            record.error = "no output"
        elif record.output_tokens == 0:  # a server without usage in streams: count chunks
            record.output_tokens = len(record.chunk_times)
    except (httpx.HTTPError, ValueError) as error:
        record.error = f"{type(error).__name__}: {error}"[:200]
