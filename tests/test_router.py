"""The router's policies against real worker processes on loopback: request ids through the JSON
logs, tenants and their prefix caches, prefix-aware routing, the two-phase API, local prefill
under a threshold, KV-block back-pressure, limits, and workers added and removed at run time."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pdserve.serving.serve import free_port
from pdserve.serving.worker_pool import WorkerPool
from pdserve.transfer.fault_proxy import Fault, FaultProxy

SYSTEM = "You are a careful assistant who answers questions about geography in one short sentence. " * 4
GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}



class Process:
    """A `pdserve` command as a child process, its stderr (JSON log lines) in a file."""

    def __init__(self, log_dir: Path, name: str, *argv: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", *argv, "--port", str(self.port)], stderr=self.log_file,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.log_path.name} exited: {self.log_path.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.log_path.name} not ready"
            time.sleep(0.3)

    def log_lines(self) -> list[dict]:
        return json_log_lines(self.log_path)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


SECRET = "s3cret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class Workers:
    """Two prefill workers and a decode worker. The second prefill worker advertises its KV server
    through a fault proxy (pass-through until a test injects a fault); every worker guards its
    internal API with a secret (and proves it to the router), and the decode worker gives up on
    a silent KV link after 2 s."""

    def __init__(self, log_dir: Path) -> None:
        common = ("--dtype", "float32", "--kv-memory-mb", "64", "--kv-backend", "tcp", "--drain-timeout", "2",
                  "--kv-lease-ttl", "3",  # unredeemed /v1/prefill offers of earlier tests expire fast
                  "--internal-secret", SECRET)
        self.log_dir = log_dir
        kv_port = free_port()
        self.proxy = FaultProxy(("127.0.0.1", kv_port)).__enter__()
        advertised = f"{self.proxy.address[0]}:{self.proxy.address[1]}"
        self.prefill = [
            Process(log_dir, "prefill0", "worker", "--role", "prefill", "--cpus", "0", *common),
            Process(log_dir, "prefill1", "worker", "--role", "prefill", "--cpus", "1", *common,
                    "--kv-port", str(kv_port), "--kv-advertise", advertised),
        ]
        self.decode = Process(log_dir, "decode", "worker", "--role", "decode", "--cpus", "1", *common,
                              "--kv-io-timeout", "2")
        # A colocated worker for mixed mode; the last test drains it with SIGTERM.
        self.both = Process(log_dir, "both", "worker", "--role", "both", "--cpus", "0", *common,
                            "--drain-timeout", "60")
        for worker in (*self.prefill, self.decode, self.both):
            worker.wait_ready()
        self.routers: list[Process] = []

    def router(self, *flags: str, prefill: list[Process] | None = None, decode: bool = True) -> Process:
        urls = [w.url for w in (self.prefill if prefill is None else prefill)]
        argv = ["router", "--worker-secret", SECRET, *flags]
        if urls:
            argv += ["--prefill", *urls]
        if decode:
            argv += ["--decode", self.decode.url]
        router = Process(self.log_dir, f"router{len(self.routers)}", *argv)
        self.routers.append(router)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{router.url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert router.process.poll() is None and time.monotonic() < deadline, router.log_path.read_text()
                time.sleep(0.2)
        return router

    def stop(self) -> None:
        for process in (*self.routers, *self.prefill, self.decode, self.both):
            if process.process.poll() is None:
                process.stop()
        self.proxy.__exit__(None, None, None)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    running = Workers(tmp_path_factory.mktemp("router-logs"))
    try:
        yield running
    finally:
        running.stop()


def client(router: Process, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=60)


def model(router: Process, key: str = "unused") -> str:
    return str(client(router, key).models.list().data[0].id)


def prefill(router: Process, prompt: str, key: str = "unused", **fields: object) -> dict:
    response = httpx.post(
        f"{router.url}/v1/prefill", headers={"Authorization": f"Bearer {key}"},
        json={"model": model(router, key), "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
              **fields},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def metric(router: Process, name: str, label: str = "") -> float:
    for line in httpx.get(f"{router.url}/metrics").text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def offers_settled(url: str) -> bool:
    state = httpx.get(f"{url}/debug", timeout=5, headers=AUTH).json()
    return bool(state["num_offers"] == 0 and state["num_held_kv"] == 0 and state["num_running"] == 0)


def test_one_request_id_runs_through_every_log_line_and_the_response(workers: Workers) -> None:
    router = workers.router()
    response = httpx.post(
        f"{router.url}/v1/completions", headers={"X-Request-Id": "trace-42"},
        json={"model": model(router), "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "cmpl-trace-42"
    made_up = httpx.post(f"{router.url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert made_up.status_code == 404 and len(made_up.headers["x-request-id"]) == 32

    def traced(process: Process) -> list[dict]:
        return [line for line in process.log_lines() if line.get("request_id") == "trace-42"]

    assert wait_for(lambda: any(line["message"] == "KV sent" for w in workers.prefill for line in traced(w)))
    assert {line["message"] for line in traced(router)} >= {"routed", "answered 200"}
    assert {line["message"] for line in traced(workers.decode)} >= {"admitted", "KV received", "finished: output"}
    assert {"admitted", "KV sent"} <= {line["message"] for w in workers.prefill for line in traced(w)}
    for line in traced(router) + traced(workers.decode):
        assert {"time", "level", "component", "logger", "message"} <= set(line)


def test_chats_without_max_tokens_reserve_likely_kv_and_run_together(workers: Workers) -> None:
    """Four chats without max_tokens, sent at once: each reserves its prompt and
    --reserve-output-tokens of decode KV, not the rest of the context (which filled the pool and
    made the others wait, then 503); all four answer. Their budget is what the pool holds."""
    router = workers.router("--reserve-output-tokens", "32", "--queue-timeout", "1")
    # A question SmolLM2 answers in one short sentence, then EOS (its greedy answer to a bare
    # "Say hello" is an endless row of emoji).
    body = {"model": model(router), "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0}

    def chat(index: int) -> httpx.Response:
        return httpx.post(f"{router.url}/v1/chat/completions", json=body,
                          headers={"X-Request-Id": f"chat-{index}"}, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(chat, range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    load = httpx.get(f"{workers.decode.url}/load", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10).json()
    block_size = int(load["block_size"])
    assert wait_for(lambda: sum(line["message"] == "routed" for line in router.log_lines()) >= 4)
    for line in router.log_lines():
        if line["message"] == "routed" and str(line.get("request_id", "")).startswith("chat-"):
            assert line["reserved_blocks"] == math.ceil((line["prompt_tokens"] + 32) / block_size), line
    # An explicit max_tokens is reserved whole.
    response = httpx.post(f"{router.url}/v1/chat/completions", json={**body, "max_tokens": 100},
                          headers={"X-Request-Id": "chat-explicit"}, timeout=120)
    assert response.status_code == 200
    assert wait_for(lambda: any(line.get("request_id") == "chat-explicit" for line in router.log_lines()))
    (routed,) = [line for line in router.log_lines()
                 if line.get("request_id") == "chat-explicit" and line["message"] == "routed"]
    assert routed["reserved_blocks"] == math.ceil((routed["prompt_tokens"] + 100) / block_size)


def test_prefix_aware_routing_sends_a_shared_prefix_to_the_worker_that_caches_it(workers: Workers) -> None:
    router = workers.router("--routing", "prefix_aware")
    cached = [prefill(router, f"{SYSTEM} Question {i}: where is Lima?")["usage"]["cached_tokens"] for i in range(4)]
    assert cached[0] == 0 and all(c >= 32 for c in cached[1:]), cached
    spread = workers.router("--routing", "round_robin")
    cached = [prefill(spread, f"{SYSTEM} Query {i}: where is Oslo?")["usage"]["cached_tokens"] for i in range(2)]
    assert cached[1] == 0, "round robin sent the second prompt to the other worker, which had nothing cached"


def test_tenants_never_share_prefix_cache_blocks(workers: Workers) -> None:
    router = workers.router("--routing", "prefix_aware", "--api-key", "alpha=key-a", "--api-key", "beta=key-b")
    prompt = f"{SYSTEM} Where is Quito?"
    assert prefill(router, prompt, key="key-a")["usage"]["cached_tokens"] == 0
    assert prefill(router, prompt, key="key-a")["usage"]["cached_tokens"] > 0
    assert prefill(router, prompt, key="key-b")["usage"]["cached_tokens"] == 0, "tenant beta hit alpha's blocks"
    with pytest.raises(openai.AuthenticationError):
        client(router, "key-c").models.list()


def test_the_two_phase_form_prefill_then_redeem_gives_the_one_shot_answer(workers: Workers) -> None:
    router = workers.router()
    assert wait_for(lambda: all(offers_settled(w.url) for w in workers.prefill), 10)
    prompt = "Write the numbers from one to ten:"
    one_shot = client(router).completions.create(model=model(router), prompt=prompt, **GREEDY).choices[0].text
    prefilled = prefill(router, prompt)
    params = prefilled["kv_transfer_params"]
    assert params["kv_cache_id"] == prefilled["id"] and params["kv_address"]
    assert not all(offers_settled(w.url) for w in workers.prefill), "the KV waits to be redeemed"
    redeemed = client(router).completions.create(
        model=model(router), prompt=prompt, temperature=0, max_tokens=6,
        extra_body={"ignore_eos": True, "kv_transfer_params": params},
    )
    assert redeemed.choices[0].text == one_shot
    assert wait_for(lambda: all(offers_settled(w.url) for w in workers.prefill), 5), "the offer was not consumed"
    decode_lines = [line for line in workers.decode.log_lines() if line.get("request_id") == redeemed.id[5:]]
    assert any(line["message"] == "KV received" for line in decode_lines), decode_lines


def test_a_client_never_makes_a_worker_dial_an_address_of_its_choosing(workers: Workers) -> None:
    """kv_transfer_params naming a listener of the client's: a made-up offer is recomputed, a
    real one is pulled from the address the router's own prefill worker gave; the listener is
    never dialled, and both answers are the one-shot answer."""
    router = workers.router()
    prompt = "Count from one to five:"
    one_shot = client(router).completions.create(model=model(router), prompt=prompt, **GREEDY).choices[0].text
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        trap = f"127.0.0.1:{listener.getsockname()[1]}"
        real = prefill(router, prompt)["kv_transfer_params"]
        for params in ({"kv_cache_id": "made-up-offer", "kv_address": trap},
                       {"kv_cache_id": real["kv_cache_id"], "kv_address": trap}):
            answer = client(router).completions.create(
                model=model(router), prompt=prompt, temperature=0, max_tokens=6,
                extra_body={"ignore_eos": True, "kv_transfer_params": params})
            assert answer.choices[0].text == one_shot
            # A made-up offer runs as a new request (prefilled by a prefill worker of the router's
            # choosing); the real one is redeemed: no prefill worker saw that request.
            prefilled_anew = any(line.get("request_id") == answer.id[5:] and line["message"] == "admitted"
                                 for worker in workers.prefill for line in worker.log_lines())
            assert prefilled_anew == (params["kv_cache_id"] != real["kv_cache_id"])
        time.sleep(0.5)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody dialled the client's address
    # An offer is redeemed once: a second redemption is recomputed.
    again = client(router).completions.create(
        model=model(router), prompt=prompt, temperature=0, max_tokens=6,
        extra_body={"ignore_eos": True, "kv_transfer_params": real})
    assert again.choices[0].text == one_shot
    assert metric(router, "pdserve_router_degraded_total", 'how="unknown_kv_offer"') >= 2


def test_short_uncached_prompts_are_prefilled_on_the_decode_worker(workers: Workers) -> None:
    router = workers.router("--local-prefill-tokens", "16")
    short = client(router).completions.create(model=model(router), prompt="Hello there", **GREEDY)
    long = client(router).completions.create(model=model(router), prompt=f"{SYSTEM} Where is Rome?", **GREEDY)
    assert short.choices[0].text and long.choices[0].text
    assert metric(router, "pdserve_router_degraded_total", "local_prefill_below_threshold") == 1
    routed = [line for line in router.log_lines() if line["message"] == "routed"]
    assert [line["prefill"] is None for line in routed] == [True, False]


def test_no_prefill_runs_when_no_decode_worker_has_kv_room(workers: Workers) -> None:
    # Overcommit 0.01 leaves room for about one request's blocks on the decode worker.
    router = workers.router("--kv-overcommit", "0.01", "--queue-timeout", "1")
    stream = client(router).completions.create(
        model=model(router), prompt="Count slowly:", max_tokens=300, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    admitted_before = sum(line["message"] == "admitted" for w in workers.prefill for line in w.log_lines())
    with pytest.raises(openai.APIStatusError) as refused:
        client(router).completions.create(model=model(router), prompt="Hi", max_tokens=2)
    assert refused.value.status_code == 503 and "KV room" in refused.value.message
    assert refused.value.response.headers["retry-after"]
    admitted_after = sum(line["message"] == "admitted" for w in workers.prefill for line in w.log_lines())
    assert admitted_after == admitted_before, "a prefill ran for KV no decode worker could take"
    stream.close()
    assert wait_for(lambda: offers_settled(workers.decode.url))
    assert client(router).completions.create(model=model(router), prompt="Hi", max_tokens=2).choices


def test_with_no_decode_worker_a_prefill_worker_decodes(workers: Workers) -> None:
    """Roles are a preference, not a wall: every worker holds the whole model."""
    router = workers.router(decode=False)
    prompt = f"{SYSTEM} Where is Rome?"
    expected = client(workers.router()).completions.create(model=model(router), prompt=prompt, **GREEDY)
    answer = client(router).completions.create(model=model(router), prompt=prompt, **GREEDY)
    assert answer.choices[0].text == expected.choices[0].text and answer.choices[0].finish_reason == "length"
    assert metric(router, "pdserve_router_degraded_total", 'how="decode_on_prefill_worker"') == 1
    assert httpx.get(f"{router.url}/health").status_code == 200


def test_with_no_worker_at_all_the_router_is_unhealthy(workers: Workers) -> None:
    router = workers.router(prefill=[], decode=False)
    assert httpx.get(f"{router.url}/health").status_code == 503


def test_limits_on_body_size_and_prompt_length(workers: Workers) -> None:
    router = workers.router("--max-body-bytes", "2000", "--max-prompt-tokens", "20")
    name = model(router)
    big = httpx.post(f"{router.url}/v1/completions", json={"model": name, "prompt": "x" * 5000}, timeout=30)
    assert big.status_code == 413 and "larger than 2000 bytes" in big.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "' + name.encode() + b'", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    chunked = httpx.post(f"{router.url}/v1/completions", content=chunks(), timeout=30,
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    with pytest.raises(openai.BadRequestError) as long:
        client(router).completions.create(model=name, prompt="word " * 40, max_tokens=2)
    assert long.value.body["param"] == "prompt" and "20" in long.value.message  # type: ignore[index]


def test_workers_are_added_and_removed_at_run_time(workers: Workers) -> None:
    router = workers.router("--admin-key", "root", prefill=[])
    admin = {"Authorization": "Bearer root"}
    assert httpx.get(f"{router.url}/admin/workers").status_code == 401
    name = model(router)
    before = client(router).completions.create(model=name, prompt="Hi", max_tokens=3, temperature=0)
    assert [line["prefill"] for line in router.log_lines() if line["message"] == "routed"] == [None]
    added = httpx.post(f"{router.url}/admin/workers", headers=admin,
                       json={"url": workers.prefill[0].url, "role": "prefill"})
    assert added.status_code == 201 and added.json()["healthy"], added.text
    after = client(router).completions.create(model=name, prompt="Hi", max_tokens=3, temperature=0)
    assert after.choices[0].text == before.choices[0].text
    routed = [line["prefill"] for line in router.log_lines() if line["message"] == "routed"]
    assert routed[-1] == workers.prefill[0].url
    bad = httpx.post(f"{router.url}/admin/workers", headers=admin, json={"url": "nowhere", "role": "prefill"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
    removed = httpx.request("DELETE", f"{router.url}/admin/workers", headers=admin,
                            json={"url": workers.prefill[0].url})
    assert removed.status_code == 200
    assert [w["url"] for w in httpx.get(f"{router.url}/admin/workers", headers=admin).json()["workers"]] == [
        workers.decode.url
    ]
    client(router).completions.create(model=name, prompt="Hi", max_tokens=3, temperature=0)
    routed = [line["prefill"] for line in router.log_lines() if line["message"] == "routed"]
    assert routed[-1] is None
    gone = httpx.request("DELETE", f"{router.url}/admin/workers", headers=admin, json={"url": workers.prefill[0].url})
    assert gone.status_code == 404


def json_log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a process's log file (plain lines, e.g. a supervisor's, skipped)."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                lines.append(parsed)
    return lines


def scrape(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_the_internal_api_off_the_router_needs_the_secret(workers: Workers) -> None:
    decode = workers.decode.url
    assert httpx.get(f"{decode}/health").status_code == 200, "health stays open for probes"
    assert "pdserve_worker" in httpx.get(f"{decode}/metrics").text, "and so do metrics, for Prometheus"
    refused = httpx.post(f"{decode}/internal/generate", json={"request_id": "x", "prompt": [1, 2]})
    assert refused.status_code == 401 and "secret" in refused.json()["error"]["message"]
    assert httpx.get(f"{decode}/load").status_code == 401
    assert httpx.get(f"{decode}/load", headers=AUTH).status_code == 200


def test_only_a_worker_that_proves_the_secret_is_admitted(workers: Workers) -> None:
    """A process squatting on a worker's port (here: a plain HTTP server that answers /health like
    a worker) is never admitted, and neither is a real worker holding another secret."""
    squatter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LooksLikeAWorker)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    squatter_url = f"http://127.0.0.1:{squatter.server_address[1]}"

    async def admitted(secret: str, url: str) -> bool:
        pool = WorkerPool(decode=[url], worker_secret=secret)
        async with httpx.AsyncClient() as client:
            await pool.refresh(client)
        return pool.workers[0].healthy

    try:
        assert asyncio.run(admitted(SECRET, workers.decode.url))
        assert not asyncio.run(admitted("another secret", workers.decode.url))
        assert not asyncio.run(admitted(SECRET, squatter_url))
        assert httpx.get(f"{squatter_url}/health").status_code == 200  # it does answer, like a worker
    finally:
        squatter.shutdown()


class _LooksLikeAWorker(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        body = json.dumps({"status": "ok", "role": "decode", "model": "x", "kv_address": "127.0.0.1:1"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def test_router_and_workers_export_latency_metrics(workers: Workers) -> None:
    router = workers.router(prefill=workers.prefill[:1])
    for _ in range(2):
        chunks = list(client(router).completions.create(model=model(router), prompt="Once upon a time", stream=True,
                                                        **GREEDY))
        assert chunks
    ours = scrape(router.url)
    assert ours["pdserve_router_time_to_first_token_seconds_count"] == 2
    assert ours["pdserve_router_inter_token_latency_seconds_count"] == 2 * 5
    assert ours["pdserve_router_time_per_output_token_seconds_count"] == 2
    assert ours["pdserve_router_prefill_seconds_count"] == 2
    assert ours["pdserve_router_kv_transfer_bytes_count"] == 2 and ours["pdserve_router_kv_transfer_bytes_sum"] > 0
    assert ours["pdserve_router_generation_tokens_total"] == 12
    assert ours["pdserve_router_queue_seconds_count"] == 2
    decode, prefill = scrape(workers.decode.url), scrape(workers.prefill[0].url)
    assert decode["pdserve_worker_time_to_first_token_seconds_count"] >= 2
    assert decode['pdserve_worker_phase_seconds_total{phase="decode"}'] > 0
    assert 0 <= decode["pdserve_worker_kv_usage_ratio"] <= 1 and decode["pdserve_worker_kv_blocks"] > 0
    assert decode['pdserve_kv_transfers_completed_total{direction="receive"}'] >= 2
    assert prefill["pdserve_worker_prefill_seconds_count"] >= 2
    assert prefill['pdserve_worker_phase_seconds_total{phase="prefill"}'] > 0


def test_a_stalled_transfer_is_recomputed_within_the_deadline(workers: Workers) -> None:
    router = workers.router(prefill=workers.prefill[1:])  # the worker behind the proxy
    prompt = "The three primary colours are"
    clean = client(router).completions.create(model=model(router), prompt=prompt, **GREEDY).choices[0].text
    timeouts = 'pdserve_kv_transfers_failed_total{direction="receive",reason="timeout"}'
    before = scrape(workers.decode.url).get(timeouts, 0.0)
    workers.proxy.set_fault(Fault.stall(0))
    try:
        started = time.monotonic()
        stalled = client(router).completions.create(model=model(router), prompt=prompt, **GREEDY).choices[0].text
        elapsed = time.monotonic() - started
    finally:
        workers.proxy.set_fault(Fault.none())
    assert stalled == clean
    assert 2 <= elapsed < 2 + 6, f"took {elapsed:.1f} s with a 2 s I/O deadline"
    assert scrape(workers.decode.url).get(timeouts, 0.0) == before + 1
    assert wait_for(lambda: all(offers_settled(w.url) for w in (*workers.prefill, workers.decode)), 10)


def test_repeated_transfer_failures_open_the_breaker_until_a_probe_succeeds(workers: Workers) -> None:
    router = workers.router(prefill=workers.prefill[1:])
    name = model(router)

    def routed_prefills() -> list[str | None]:
        return [line["prefill"] for line in router.log_lines() if line["message"] == "routed"]

    def ask() -> str:
        return str(client(router).completions.create(model=name, prompt="Name a river:", **GREEDY).choices[0].text)

    reference = ask()
    workers.proxy.set_fault(Fault.drop(0))
    try:
        assert [ask() for _ in range(3)] == [reference] * 3  # each pull fails and is recomputed
        assert ask() == reference
    finally:
        workers.proxy.set_fault(Fault.none())
    assert routed_prefills()[1:] == [workers.prefill[1].url] * 3 + [None], "the 4th request avoided the peer"
    breaker = {w["url"]: w["breaker"] for w in httpx.get(f"{router.url}/health").json()["workers"]}
    assert breaker[workers.prefill[1].url] == "open"
    time.sleep(5.2)  # the cooldown: the next request is the half-open probe, which succeeds
    assert ask() == reference
    assert routed_prefills()[-1] == workers.prefill[1].url
    breaker = {w["url"]: w["breaker"] for w in httpx.get(f"{router.url}/health").json()["workers"]}
    assert breaker[workers.prefill[1].url] == "closed"


def test_mixed_mode_overflows_from_the_decode_pool_to_colocated_workers(workers: Workers) -> None:
    # Room for one request on the decode worker: a second one at the same time goes to `both`.
    router = workers.router("--kv-overcommit", "0.01", "--both", workers.both.url, prefill=workers.prefill[:1])
    name = model(router)
    prompt = "The tallest mountain on Earth is"
    alone = client(router).completions.create(model=name, prompt=prompt, **GREEDY).choices[0].text
    holder = client(router).completions.create(model=name, prompt="Count to fifty:", max_tokens=300, stream=True,
                                               temperature=0, extra_body={"ignore_eos": True})
    next(iter(holder))
    overflow = client(router).completions.create(model=name, prompt=prompt, **GREEDY).choices[0].text
    holder.close()
    assert overflow == alone
    routed = [(line["decode"], line["prefill"]) for line in router.log_lines() if line["message"] == "routed"]
    assert routed == [(workers.decode.url, workers.prefill[0].url)] * 2 + [(workers.both.url, None)], routed
    assert wait_for(lambda: all(offers_settled(w.url) for w in (workers.decode, workers.both, *workers.prefill)))


def test_sigterm_drains_a_worker_then_it_exits(workers: Workers) -> None:
    """Last in the module: the `both` worker stops taking work, finishes its stream, exits 0."""
    both = workers.both
    shm_name = httpx.get(f"{both.url}/debug", timeout=5, headers=AUTH).json()["shm_name"]
    assert shm_name and Path(f"/dev/shm/{shm_name}").exists()
    body = {"request_id": "drained", "prompt": "Count slowly:", "params": {"max_tokens": 40, "ignore_eos": True}}
    with httpx.stream("POST", f"{both.url}/internal/generate", json=body, timeout=60, headers=AUTH) as stream:
        lines = stream.iter_lines()
        events = [json.loads(next(lines))]
        both.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{both.url}/health", timeout=2)  # no new work while draining
        events += [json.loads(line) for line in lines if line]
    assert events[-1]["finished"] and events[-1]["outputs"][0]["num_tokens"] == 40
    assert sum(len(event["outputs"][0]["token_ids"]) for event in events if event["event"] == "output") == 40
    assert both.process.wait(20) == 0
    assert not Path(f"/dev/shm/{shm_name}").exists(), "the shared-memory KV pool was not unlinked"
