"""Pipelined and compressed KV transfer on the serving path: real worker processes (one prefill,
one decode) behind routers that differ only in their KV options (--kv-pipeline, --kv-backend,
--kv-codec), so one start of the workers serves every comparison."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from hf_reference import reference_greedy

from pdserve.bench.prompt_set import TEXT_PROMPTS, long_prompt
from pdserve.engine.loader import Checkpoint
from pdserve.serving.serve import free_port

SECRET = "kv serving path"
AUTH = {"Authorization": f"Bearer {SECRET}"}
NEW_TOKENS = 16
REFERENCE_TOKENS = 48  # the parity tests' length, so their cached references are reused
GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True}}


class Process:
    def __init__(self, *argv: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", *argv, "--port", str(self.port)], stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.url} exited with {self.process.returncode}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.url} not ready"
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Cluster:
    def __init__(self) -> None:
        common = ("--dtype", "float32", "--kv-memory-mb", "128", "--kv-backend", "tcp", "--internal-secret", SECRET)
        self.prefill = Process("worker", "--role", "prefill", "--cpus", "0", *common)
        self.decode = Process("worker", "--role", "decode", "--cpus", "1", *common)
        self.workers = (self.prefill, self.decode)
        for worker in self.workers:
            worker.wait_ready()
        base = ("router", "--worker-secret", SECRET, "--prefill", self.prefill.url, "--decode", self.decode.url)
        self.routers = {
            "pipelined": Process(*base, "--kv-backend", "tcp"),
            "unpipelined": Process(*base, "--kv-backend", "tcp", "--no-kv-pipeline"),
            "shm": Process(*base, "--kv-backend", "shm"),
            "int8": Process(*base, "--kv-backend", "tcp", "--kv-codec", "int8"),
        }
        for router in self.routers.values():
            router.wait_ready(30)

    def complete(self, router: str, prompt: str) -> str:
        url = self.routers[router].url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        return str(client.completions.create(model=model, prompt=prompt, **GREEDY).choices[0].text)

    def stop(self) -> None:
        for process in (*self.routers.values(), *self.workers):
            process.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    running = Cluster()
    try:
        yield running
    finally:
        running.stop()


def scrape(worker: Process) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{worker.url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def unique_long_prompt(tag: str) -> str:
    """~900 tokens with a prefix of its own: a prompt the prefill worker's prefix cache already
    held would leave little to compute, and so nothing to overlap."""
    return f"Request {tag}. " + long_prompt()[:4000]


EARLY = 'pdserve_kv_transfers_early_total{direction="send"}'
EARLY_BYTES = "pdserve_kv_transfer_early_bytes_total"


def test_every_kv_option_gives_the_reference_tokens(cluster: Cluster, checkpoint: Checkpoint) -> None:
    prompt = TEXT_PROMPTS[0]
    reference = reference_greedy(checkpoint.tokenizer.encode(prompt), REFERENCE_TOKENS)
    expected = checkpoint.tokenizer.decode(reference.token_ids[:NEW_TOKENS])
    for router in ("pipelined", "unpipelined", "shm"):
        assert cluster.complete(router, prompt) == expected, router
    long = unique_long_prompt("parity")
    answers = {router: cluster.complete(router, long) for router in ("unpipelined", "pipelined", "shm")}
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize(("router", "streams"), [("pipelined", True), ("shm", False), ("unpipelined", False)])
def test_the_pull_starts_while_the_prefill_runs_unless_told_not_to(
    cluster: Cluster, router: str, streams: bool
) -> None:
    before = scrape(cluster.prefill)
    cluster.complete(router, unique_long_prompt(f"overlap-{router}"))
    after = scrape(cluster.prefill)
    sent = sum(delta(before, after, name) for name in after if name.startswith("pdserve_kv_transfer_bytes_total"))
    assert sent > 0
    assert delta(before, after, EARLY) == (0 if router == "unpipelined" else 1), "when the pull connected"
    if streams:  # most of the KV left while the prefill still ran
        assert delta(before, after, EARLY_BYTES) > sent / 2, (delta(before, after, EARLY_BYTES), sent)
    else:
        assert delta(before, after, EARLY_BYTES) == 0


def test_int8_moves_about_a_quarter_of_float32_kv_and_answers_sanely(cluster: Cluster) -> None:
    received = 'pdserve_kv_transfer_bytes_total{codec="%s",direction="receive"}'
    prompt = unique_long_prompt("codec")
    before = scrape(cluster.decode)
    plain = cluster.complete("pipelined", prompt)
    middle = scrape(cluster.decode)
    compressed = cluster.complete("int8", prompt)
    after = scrape(cluster.decode)
    raw, encoded = delta(before, middle, received % "none"), delta(middle, after, received % "int8")
    # float32 KV: 4 bytes a value; int8: 1 byte a value plus an fp16 scale per 64-value row.
    assert raw > 0 and 0.2 < encoded / raw < 0.3, (raw, encoded)
    assert compressed.split()[:1] == plain.split()[:1], (plain, compressed)  # first token: sampled before encoding
    assert compressed.isprintable() or "\n" in compressed
