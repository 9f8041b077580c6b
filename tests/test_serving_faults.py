"""Workers dying under `pdserve serve` (one prefill and two decode workers sharing the cores):
streams go on, later requests still complete, and live workers leak no KV."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from test_serving import WORKER_AUTH, Server

PROMPT = "Write a long story about a lighthouse keeper."


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server("--decode", "2")
    yield running
    running.stop()


def worker_pid(server: Server, url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "--port" in child.cmdline() and child.cmdline()[child.cmdline().index("--port") + 1] == port:
            return child.pid
    raise LookupError(url)


def roles(server: Server) -> dict[str, list[str]]:
    workers = httpx.get(f"{server.url}/health").json()["workers"]
    result: dict[str, list[str]] = {}
    for worker in workers:
        result.setdefault(worker["role"], []).append(worker["url"])
    return result


def complete(server: Server, max_tokens: int = 8) -> str:
    response = server.client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    text = response.choices[0].text
    assert text and response.usage is not None and response.usage.completion_tokens == max_tokens
    return text


def assert_no_leaks(urls: list[str]) -> None:
    deadline = time.monotonic() + 15
    for url in urls:
        while True:
            state = httpx.get(f"{url}/debug", timeout=5, headers=WORKER_AUTH).json()
            idle = state["num_free_blocks"] == state["num_blocks"] and state["num_held_kv"] == 0 \
                and state["num_reserved_kv"] == 0 and state["num_running"] == 0
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert idle, f"{url} leaked: {state}"


def test_a_decode_worker_killed_mid_stream_goes_on_on_the_other(server: Server) -> None:
    """The stream resumes on the surviving decode worker (serving/resumption.py) and ends whole.
    Its text is not compared: these decode workers are int4 and their prefill worker dense, so
    the resumed worker's KV for the prompt is not the one the dead worker had (that exactness is
    tests/test_stream_resumption.py's, on workers of one format)."""
    expected = complete(server)
    decode_urls = roles(server)["decode"]
    stream = server.client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    received = ""
    chunks = iter(stream)
    for _ in range(3):
        received += next(chunks).choices[0].text
    assert expected.startswith(received), (expected, received)
    busy = [u for u in decode_urls if httpx.get(f"{u}/load", headers=WORKER_AUTH).json()["num_running"] > 0]
    assert len(busy) == 1, busy
    os.kill(worker_pid(server, busy[0]), signal.SIGKILL)
    started = time.monotonic()
    finish, tokens = None, None
    for chunk in chunks:
        if chunk.choices:
            received += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert finish == "length" and tokens == 48, (finish, tokens, received)
    assert time.monotonic() - started < 30
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'pdserve_router_degraded_total{how="decode_resumed"} 1.0' in metrics
    # New requests go to the surviving decode worker and give the same answer.
    for _ in range(3):
        assert complete(server) == expected
    survivors = [u for u in decode_urls if u != busy[0]]
    assert_no_leaks(survivors + roles(server)["prefill"])


def test_without_a_prefill_worker_the_decode_side_prefills(server: Server) -> None:
    expected = complete(server)
    (prefill_url,) = roles(server)["prefill"]
    os.kill(worker_pid(server, prefill_url), signal.SIGKILL)
    for _ in range(2):
        assert complete(server) == expected
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'pdserve_router_degraded_total{how="decode_side_prefill"}' in metrics
    live = [w["url"] for w in httpx.get(f"{server.url}/health").json()["workers"] if w["healthy"]]
    assert prefill_url not in live
    assert_no_leaks(live)


def test_the_supervisor_restarts_dead_workers(server: Server) -> None:
    """Both workers killed above come back (after a back-off) and are re-admitted by the router."""
    deadline = time.monotonic() + 120
    while True:
        workers = httpx.get(f"{server.url}/health").json()["workers"]
        if all(w["healthy"] for w in workers) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(w["healthy"] for w in workers), workers
    assert complete(server)
    assert_no_leaks([w["url"] for w in workers])
