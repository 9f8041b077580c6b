"""`pdserve serve` end to end: real router and worker processes on loopback, the official
`openai` client, answers checked against Hugging Face's greedy output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import hypothesis
import openai
import psutil
import pytest
import schemathesis
from fixtures_model import CAPITAL_PROMPT
from hf_reference import reference_greedy

from pdserve.bench.prompt_set import CHAT_MESSAGES, TEXT_PROMPTS
from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.loader import Checkpoint
from pdserve.serving.router import RouterConfig, create_router_app
from pdserve.serving.serve import free_port

WORKER_SECRET = "the workers' secret in these tests"
WORKER_AUTH = {"Authorization": f"Bearer {WORKER_SECRET}"}
"""`serve` draws its workers' secret per run unless $PDSERVE_INTERNAL_SECRET gives one: tests
give one, so that they may look into the workers (/debug, /load) directly."""
NEW_TOKENS = 24
REFERENCE_TOKENS = 48  # the parity tests' length, so their cached references are reused
GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True}}




def post_json(url: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON: a lone surrogate goes out as the escape ``\\ud800``, as any
    client may send it (httpx's own encoder would refuse to encode it)."""
    return httpx.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=60)


class Server:
    """`pdserve serve ...` as a child process, stopped (and checked for orphans) at the end."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "serve", "--dtype", "float32", "--port", str(self.port),
             "--kv-memory-mb", "256", *flags],
            env={**os.environ, "PDSERVE_INTERNAL_SECRET": WORKER_SECRET},
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"serve exited with {self.process.returncode}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve was not ready within 120 s"
            time.sleep(0.5)
        self.workers = [w["url"] for w in httpx.get(f"{self.url}/health").json()["workers"]]
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def stop(self) -> None:
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"orphaned worker processes: {alive}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # Every role dense: the configuration whose greedy output equals Hugging Face's.
    running = Server("--weight-format", "dense")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def colocated() -> Iterator[Server]:
    running = Server("--colocated")
    yield running
    running.stop()


def reference_text(checkpoint: Checkpoint, prompt_ids: list[int]) -> str:
    reference = reference_greedy(prompt_ids, REFERENCE_TOKENS)
    return checkpoint.tokenizer.decode(reference.token_ids[:NEW_TOKENS])


def chat_ids(checkpoint: Checkpoint) -> list[int]:
    text = checkpoint.tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True)
    return checkpoint.tokenizer.encode(text, add_special_tokens=False)


def test_completions_equal_the_reference(server: Server, checkpoint: Checkpoint) -> None:
    for prompt in TEXT_PROMPTS[:3]:
        response = server.client.completions.create(model=server.model, prompt=prompt, **GREEDY)
        ids = checkpoint.tokenizer.encode(prompt)
        assert response.choices[0].text == reference_text(checkpoint, ids), prompt
        assert response.choices[0].finish_reason == "length"
        assert response.usage is not None
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), NEW_TOKENS)


def test_chat_completion_equals_the_reference(server: Server, checkpoint: Checkpoint) -> None:
    response = server.client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, **GREEDY)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == reference_text(checkpoint, chat_ids(checkpoint))
    assert response.usage is not None and response.usage.prompt_tokens == len(chat_ids(checkpoint))


def test_streaming_yields_the_same_text_and_usage(server: Server) -> None:
    whole = server.client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, **GREEDY)
    stream = server.client.chat.completions.create(
        model=server.model, messages=CHAT_MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    text, finish, usage, roles = "", None, None, set()
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            roles.add(choice.delta.role)
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == "length" and "assistant" in roles
    assert usage is not None and usage.completion_tokens == NEW_TOKENS
    assert usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    pieces = [c.choices[0].text for c in server.client.completions.create(
        model=server.model, prompt=TEXT_PROMPTS[0], stream=True, **GREEDY) if c.choices]
    assert "".join(pieces) == server.client.completions.create(
        model=server.model, prompt=TEXT_PROMPTS[0], **GREEDY).choices[0].text


def test_stop_strings_and_max_tokens_are_honoured(server: Server) -> None:
    full = server.client.completions.create(model=server.model, prompt="The capital of France is", **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = server.client.completions.create(model=server.model, prompt="The capital of France is", stop=[stop], **GREEDY)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    short = server.client.completions.create(
        model=server.model, prompt="The capital of France is", temperature=0, max_tokens=3
    )
    assert short.usage is not None and short.usage.completion_tokens <= 3


def test_seeded_n2_is_reproducible(server: Server) -> None:
    def sample() -> list[str]:
        response = server.client.completions.create(
            model=server.model, prompt="Once upon a time", max_tokens=12, temperature=0.9, n=2, seed=1234
        )
        assert [c.index for c in response.choices] == [0, 1]
        return [c.text for c in response.choices]

    first = sample()
    assert sample() == first
    assert first[0] != first[1], "two seeded choices should differ"


def test_serve_gives_each_pool_the_format_of_its_phase() -> None:
    """By default prefill workers load dense weights (w8a16 on AVX-512 VNNI CPUs without bf16
    hardware) and decode workers int4 where the CPU has the native int4 kernel (role_formats.py);
    the pair still answers the capital question."""
    running = Server()
    try:
        formats = {}
        for url in running.workers:
            health = httpx.get(f"{url}/health", timeout=5).json()
            formats[health["role"]] = health["weight_format"]
        cpu = cpu_features()
        vectorized = cpu.isa_levels()[0] != "portable"
        int8_prefill = cpu.has("avx512_vnni") and not cpu.multiplies_bf16
        assert formats == {"prefill": "w8a16" if int8_prefill else "dense", "decode": "int4" if vectorized else "dense"}
        answer = running.client.completions.create(model=running.model, prompt=CAPITAL_PROMPT, max_tokens=4,
                                                   temperature=0)
        assert answer.choices[0].text.startswith(" Paris")
    finally:
        running.stop()


def test_colocated_mode_gives_the_same_tokens(server: Server, colocated: Server) -> None:
    for prompt in TEXT_PROMPTS[:2]:
        split = server.client.completions.create(model=server.model, prompt=prompt, **GREEDY)
        together = colocated.client.completions.create(model=colocated.model, prompt=prompt, **GREEDY)
        assert together.choices[0].text == split.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "MODEL", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "MODEL", "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "MODEL", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "MODEL", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "MODEL", "prompt": ""}, 400, "empty"),
        ({"model": "MODEL", "prompt": [7] * 9000}, 400, "context"),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "does not exist"),
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "MODEL", "prompt": [10**9]}, 400, "out of range"),
        ({"model": "MODEL", "prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias is not supported"),
        ({"model": "MODEL", "prompt": "hi", "echo": True}, 400, "echo"),
        ({"model": "MODEL", "prompt": "hi", "max_tokens": 2, "X": 1}, 400, "X is not supported"),
        ({"model": "MODEL", "prompt": "hi", "repetition_penalty": 1e-50}, 400, "repetition_penalty"),
        ({"model": "MODEL", "prompt": "\ud800"}, 400, "lone surrogate"),
        ({"model": "MODEL", "prompt": ["ok", "\udfff"]}, 400, "lone surrogate"),
        ({"model": "MODEL", "prompt": "hi", "stop": ["\ud800"]}, 400, "lone surrogate"),
        ({"model": "MODEL", "prompt": "hi", "stop": ["x" * 1001]}, 400, "stop"),
    ],
    ids=["negative-max-tokens", "huge-max-tokens", "negative-temperature", "wrong-type", "empty-prompt",
         "over-context", "unknown-model", "no-model", "bad-token-id", "unsupported-field", "echo", "unknown-field",
         "vanishing-repetition-penalty", "lone-surrogate", "surrogate-in-batch",
         "surrogate-stop", "long-stop"],
)
def test_bad_input_is_a_4xx_with_an_openai_error(server: Server, body: dict, status: int, needle: str) -> None:
    body = {k: (server.model if v == "MODEL" else v) for k, v in body.items()}
    response = post_json(f"{server.url}/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty"])
def test_non_finite_numbers_are_a_400(server: Server, literal: str, field: str) -> None:
    # Python's JSON parser reads these literals; no sampling number may be NaN or infinite.
    body = f'{{"model": "{server.model}", "prompt": "hi", "{field}": {literal}}}'.encode()
    response = httpx.post(f"{server.url}/v1/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and field in response.json()["error"]["message"], response.text


def test_a_lone_surrogate_in_a_chat_message_is_a_400(server: Server) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": "a \ud800 b"}]}
    response = post_json(f"{server.url}/v1/chat/completions", body)
    assert response.status_code == 400 and "lone surrogate" in response.json()["error"]["message"]


POISONS = [
    # Each valid JSON a client may send, with extreme numbers: a 4xx, or a sane 200.
    {"prompt": "hi", "repetition_penalty": 1e-50},
    {"prompt": "hi", "temperature": 1e-300, "max_tokens": 8},
    {"prompt": "\ud800"},
    {"prompt": "hi", "temperature": 2, "top_k": 10**9, "top_p": 1e-9, "min_p": 1.0, "seed": 2**63 - 1, "n": 4,
     "max_tokens": 16, "logprobs": 5, "presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 100},
    {"prompt": "hi", "repetition_penalty": 0.01, "max_tokens": 8, "min_tokens": 8, "stop": ["x" * 1000]},
    {"prompt": [0, 1, 2], "max_tokens": 1, "temperature": 1e-6, "top_p": 1e-30},
]


def test_poison_requests_beside_a_victim_stream_never_touch_it(server: Server) -> None:
    """The victim's stream equals its solo run token for token and ends with "length", while
    extreme requests run beside it; each of those gets a 4xx or a 200 with a normal finish."""

    def victim() -> tuple[str, str | None]:
        stream = server.client.completions.create(
            model=server.model, prompt=CAPITAL_PROMPT, max_tokens=120, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        text, finish = "", None
        for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    solo = victim()
    statuses = []
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(victim)
        for index in range(24):  # bounded: the victim takes a few seconds
            if running.done() and index >= len(POISONS):
                break
            body = {"model": server.model, **POISONS[index % len(POISONS)]}
            response = post_json(f"{server.url}/v1/completions", body)
            statuses.append(response.status_code)
            assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
            if response.status_code == 200:
                assert all(c["finish_reason"] in ("stop", "length") for c in response.json()["choices"])
            else:
                assert response.json()["error"]["message"]
        assert running.result(timeout=120) == solo
    assert solo[1] == "length" and 200 in statuses and 400 in statuses
    # The vanishing temperature is greedy, not gibberish.
    greedy = server.client.completions.create(model=server.model, prompt="hi", max_tokens=8, temperature=0)
    tiny = server.client.completions.create(model=server.model, prompt="hi", max_tokens=8, temperature=1e-300)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_malformed_json_is_a_400(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": server.model, "messages": []})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]


class Router:
    """A second router process in front of the server's workers, with its own options."""

    def __init__(self, server: Server, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([
            sys.executable, "-m", "pdserve.cli", "router", "--port", str(self.port), *flags,
            "--worker-secret", WORKER_SECRET, "--both", *server.workers[-1:],
        ])
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                return
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "router did not start"
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_a_router_with_an_api_key_refuses_other_keys(server: Server) -> None:
    router = Router(server, "--api-key", "sesame", "--admin-key", "boss")
    try:
        # /health is open to anyone: a keyed router tells the workers' addresses to its admin only.
        assert httpx.get(f"{router.url}/health").json() == {"status": "ok"}
        for key in ("sesame", "guess"):
            assert "workers" not in httpx.get(f"{router.url}/health", headers={"Authorization": f"Bearer {key}"}).json()
        admin = httpx.get(f"{router.url}/health", headers={"Authorization": "Bearer boss"}).json()
        assert [w["url"] for w in admin["workers"]] == server.workers[-1:]
        wrong = openai.OpenAI(base_url=f"{router.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{router.url}/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model=server.model, prompt="Hi", max_tokens=2).choices
    finally:
        router.stop()


def test_a_full_router_answers_429_with_retry_after(server: Server) -> None:
    router = Router(server, "--max-concurrent", "1", "--max-queued", "0")
    try:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=server.model, prompt="Hold on", max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the one slot is taken
        busy = httpx.post(f"{router.url}/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        assert "capacity" in busy.json()["error"]["message"]
        stream.close()
        deadline = time.monotonic() + 10  # the slot frees once the abandoned stream is closed
        while True:
            again = httpx.post(
                f"{router.url}/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2}
            )
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.status_code == 200, again.text
    finally:
        router.stop()


FUZZ_SCHEMA = schemathesis.openapi.from_dict(
    create_router_app(RouterConfig(both=("http://127.0.0.1:9",))).openapi()
)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_invalid_requests_get_a_4xx_never_a_5xx(server: Server, path: str) -> None:
    """Bodies generated from the OpenAPI schema to violate it (schemathesis, bounded)."""
    strategy = FUZZ_SCHEMA[path]["POST"].as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)

    @hypothesis.given(case=strategy)
    @hypothesis.settings(max_examples=40, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        assert 400 <= response.status_code < 500, (case.body, response.status_code, response.text)
        assert "error" in response.json()

    check()


def test_64_concurrent_streams_all_complete(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(number: int) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=server.model, prompt=f"Story {number}: once upon a time", max_tokens=8, temperature=0,
            stream=True, extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish

    async def everyone() -> list[tuple[str, str | None]]:
        return await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(64))), timeout=240)

    results = asyncio.run(everyone())
    assert all(finish == "length" and text for text, finish in results), results


def test_a_client_that_hangs_up_frees_the_request_on_every_worker(server: Server) -> None:
    stream = server.client.completions.create(
        model=server.model, prompt="Tell me everything about lighthouses.", max_tokens=2000, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    assert running_after(server, 10) == 0, "the abandoned request kept running"


def running_requests(server: Server) -> int:
    return sum(httpx.get(f"{url}/load", headers=WORKER_AUTH).json()["num_running"] for url in server.workers)


def running_after(server: Server, seconds: float) -> int:
    """The requests running on the workers once none are, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (running := running_requests(server)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running


def test_a_non_streaming_client_that_hangs_up_frees_the_request(server: Server) -> None:
    """Nobody will read a non-streaming answer whose client left: the router notices the
    disconnect and the workers abort the request, instead of generating 2,000 tokens."""
    body = json.dumps({"model": server.model, "prompt": "Tell me everything about lighthouses.",
                       "max_tokens": 2000, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                           + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while running_requests(server) == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.1)
    assert running_after(server, 10) == 0, "the abandoned non-streaming request kept running"


def test_no_kv_blocks_leak_on_any_worker(server: Server) -> None:
    deadline = time.monotonic() + 15
    for url in server.workers:
        while True:
            state = httpx.get(f"{url}/debug", headers=WORKER_AUTH).json()
            idle = state["num_free_blocks"] == state["num_blocks"] and state["num_held_kv"] == 0
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert idle, f"{url}: {state}"


# ---- logprobs ------------------------------------------------------------------------------------


def test_completion_logprobs_equal_the_reference(server: Server, checkpoint: Checkpoint) -> None:
    from hf_reference import reference_logprobs

    from pdserve.runtime.protocol import TokenTexts
    from pdserve.serving.openai_format import token_text_and_bytes

    prompt = TEXT_PROMPTS[0]
    response = server.client.completions.create(model=server.model, prompt=prompt, logprobs=3, **GREEDY)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert logprobs.text_offset is not None and response.usage is not None
    assert choice.finish_reason == "length" and len(logprobs.tokens) == response.usage.completion_tokens == NEW_TOKENS
    assert "".join(logprobs.tokens) == choice.text
    assert all(b > a for a, b in zip(logprobs.text_offset, logprobs.text_offset[1:], strict=False))
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and logprob <= 0
        assert top[token] == logprob == max(top.values())  # greedy: the sampled token is the best
    # The same tokens as Hugging Face's greedy run, with the logprobs of its log_softmax.
    ids = checkpoint.tokenizer.encode(prompt)
    reference = reference_greedy(ids, REFERENCE_TOKENS).token_ids[:NEW_TOKENS]
    texts = TokenTexts(checkpoint.tokenizer)
    assert logprobs.tokens == [token_text_and_bytes(texts.get(t))[0] for t in reference]
    expected = reference_logprobs(ids, reference)
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)


def test_chat_logprobs_streamed_equal_whole(server: Server) -> None:
    fields = {"model": server.model, "messages": CHAT_MESSAGES, "logprobs": True, "top_logprobs": 2, **GREEDY}
    whole = server.client.chat.completions.create(**fields)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    content = whole.choices[0].logprobs.content
    assert len(content) == NEW_TOKENS and all(len(c.top_logprobs) == 2 for c in content)
    assert bytes(b for c in content for b in c.bytes or []).decode() == whole.choices[0].message.content
    streamed, text = [], ""
    for chunk in server.client.chat.completions.create(**fields, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert text == whole.choices[0].message.content
    assert [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in streamed] == [
        (c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in content
    ]
    # Prefix caching may change the prompt's arithmetic a little between the two requests.
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_chat_top_logprobs_without_logprobs_is_a_400(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.chat.completions.create(model=server.model, messages=CHAT_MESSAGES, top_logprobs=2, max_tokens=4)
    assert "top_logprobs" in str(raised.value)
