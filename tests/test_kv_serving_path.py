"""Pipelined and compressed KV transfer on the serving path: real worker processes (one prefill,
one decode) behind routers that differ only in their KV options (--kv-pipeline, --kv-backend,
--kv-codec), so one start of the workers serves every comparison."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from hf_reference import reference_greedy
from test_router import Process, scrape

from pdserve.bench.prompt_set import TEXT_PROMPTS, long_prompt
from pdserve.engine.loader import Checkpoint

SECRET = "kv serving path"
NEW_TOKENS = 16
REFERENCE_TOKENS = 48  # the parity tests' length, so their cached references are reused
GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True}}


class Cluster:
    def __init__(self, log_dir: Path) -> None:
        common = ("--dtype", "float32", "--kv-memory-mb", "128", "--kv-backend", "tcp", "--internal-secret", SECRET)
        self.prefill = Process(log_dir, "prefill", "worker", "--role", "prefill", "--cpus", "0", *common)
        self.decode = Process(log_dir, "decode", "worker", "--role", "decode", "--cpus", "1", *common)
        self.workers = (self.prefill, self.decode)
        for worker in self.workers:
            worker.wait_ready()
        base = ("router", "--worker-secret", SECRET, "--prefill", self.prefill.url, "--decode", self.decode.url)
        self.routers = {
            "pipelined": Process(log_dir, "pipelined", *base, "--kv-backend", "tcp"),
            "unpipelined": Process(log_dir, "unpipelined", *base, "--kv-backend", "tcp", "--no-kv-pipeline"),
            "shm": Process(log_dir, "shm", *base, "--kv-backend", "shm"),
            "int8": Process(log_dir, "int8", *base, "--kv-backend", "tcp", "--kv-codec", "int8"),
            "auto": Process(log_dir, "auto", *base, "--kv-backend", "tcp", "--kv-codec", "auto"),
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
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("kv-serving-path"))
    try:
        yield running
    finally:
        running.stop()


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
    before = scrape(cluster.prefill.url)
    cluster.complete(router, unique_long_prompt(f"overlap-{router}"))
    after = scrape(cluster.prefill.url)
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
    before = scrape(cluster.decode.url)
    plain = cluster.complete("pipelined", prompt)
    middle = scrape(cluster.decode.url)
    compressed = cluster.complete("int8", prompt)
    after = scrape(cluster.decode.url)
    raw, encoded = delta(before, middle, received % "none"), delta(middle, after, received % "int8")
    # float32 KV: 4 bytes a value; int8: 1 byte a value plus an fp16 scale per 64-value row.
    assert raw > 0 and 0.2 < encoded / raw < 0.3, (raw, encoded)
    assert compressed.split()[:1] == plain.split()[:1], (plain, compressed)  # first token: sampled before encoding
    assert compressed.isprintable() or "\n" in compressed


def test_auto_keeps_kv_raw_on_a_link_that_keeps_up(cluster: Cluster, checkpoint: Checkpoint) -> None:
    """Loopback outruns any prefill: auto sends every layer raw, so greedy parity holds, and the
    prefill worker's metrics say which codec each layer took and why."""
    auto_layers = 'pdserve_kv_auto_codec_layers_total{codec="none",reason="%s"}'
    prompt = unique_long_prompt("auto")
    before = scrape(cluster.prefill.url)
    assert cluster.complete("auto", prompt) == cluster.complete("pipelined", prompt)
    after = scrape(cluster.prefill.url)
    raw = sum(delta(before, after, auto_layers % reason) for reason in ("link_keeps_up", "measuring", "fast_link"))
    assert raw >= 30, "every layer of the auto pull, raw"
    assert not any(delta(before, after, name) for name in after if 'codec="int8"' in name), "nothing compressed"
