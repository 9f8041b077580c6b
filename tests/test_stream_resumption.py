"""Streams survive a decode worker: kill -9 of the decode worker serving concurrent streams of
`pdserve serve`, after tokens were streamed, and every client still gets its whole answer.

With two decode workers (dense weights everywhere, float32): each stream on the killed worker is
resumed on the other (serving/resumption.py) and continues token for token, greedy and seeded
alike: its text equals the same request's answer with no fault. Unseeded streams get a seed
drawn by the router, so they continue exactly too; no reference exists for them, so their check
is that no token is missing or repeated (their logprobs' tokens spell the text, 48 of them).
With the default shape (one prefill, one decode worker), the prefill worker takes over the
streams and every request sent while the supervisor restarts the decode worker: no 503.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from test_router import json_log_lines, scrape

from pdserve.bench.chaos import Answer, Ask, ask, classify
from pdserve.bench.prompt_set import TEXT_PROMPTS
from pdserve.bench.serve_process import ServeProcess
from pdserve.serving.errors import APIError
from pdserve.serving.resumption import RequestFailed, Resumption, is_whole, resumable

MAX_TOKENS = 48
DEADLINE = 90.0
"""Seconds a client waits for its whole answer."""
RESUMED = 'pdserve_router_degraded_total{how="decode_resumed"}'
ENGLISH = [p for p in TEXT_PROMPTS if p.isascii()]
"""Prompts whose tokens are whole characters, so that their logprobs' tokens spell the text."""


class Streams:
    """Concurrent asks, and how many text chunks (and logprob tokens) each has received so far."""

    def __init__(self, serve: ServeProcess, asks: list[Ask]) -> None:
        self.chunks = [0] * len(asks)
        self.tokens: list[list[str]] = [[] for _ in asks]
        self.pool = ThreadPoolExecutor(len(asks))
        self.futures = [
            self.pool.submit(ask, serve, request, DEADLINE, self._watch(i)) for i, request in enumerate(asks)
        ]

    def _watch(self, index: int) -> Any:
        def seen(chunk: Any) -> None:
            if chunk.choices and chunk.choices[0].text:
                self.chunks[index] += 1
            logprobs = chunk.choices[0].logprobs if chunk.choices else None
            if logprobs is not None and logprobs.tokens:
                self.tokens[index] += logprobs.tokens
        return seen

    def wait_streaming(self, chunks: int, streams: int, timeout: float = 60.0) -> int:
        """Until ``streams`` streams are under way (``chunks`` chunks of text received, not done);
        returns how many are."""
        deadline = time.monotonic() + timeout
        while (under_way := self.under_way(chunks)) < streams:
            assert time.monotonic() < deadline, f"streams did not start: {self.chunks}"
            time.sleep(0.02)
        return under_way

    def under_way(self, chunks: int) -> int:
        return sum(n >= chunks and not f.done() for n, f in zip(self.chunks, self.futures, strict=True))

    def answers(self) -> list[Answer]:
        try:
            return [future.result(timeout=DEADLINE + 10) for future in self.futures]
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


def spells(tokens: list[str], text: str) -> bool:
    """Whether the logprobs' tokens spell ``text``: special tokens show in logprobs only, and a
    token holding part of a character shows as U+FFFD (a run of them stands for 1+ characters)."""
    spelt = "".join(t for t in tokens if not (t.startswith("<|") and t.endswith("|>")))
    pattern = "".join(".+?" if part.startswith("\ufffd") else re.escape(part) for part in re.split("(\ufffd+)", spelt))
    return re.fullmatch(pattern, text, re.DOTALL) is not None


def test_a_resumption_continues_the_tokens_and_logprobs_the_client_was_sent() -> None:
    def output(token_ids: list[int], logprobs: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": "", "token_ids": token_ids, "logprobs": logprobs, "finish_reason": finish}
        return {"event": "output", "outputs": [choice]}

    last = output([5, 6], [{"token_id": 5}, {"token_id": 6}])
    resumption = Resumption.after(last)
    assert resumption.body({"request_id": "r:2", "prompt": [1]}) == {"request_id": "r:2", "prompt": [1],
                                                                     "resume": [5, 6]}
    # The new worker reports every token but logprobs only for those it drew; its lists grow in place.
    drawn = [{"token_id": 7}]
    first = resumption.continued(output([5, 6, 7], drawn))
    assert [e["token_id"] for e in first["outputs"][0]["logprobs"]] == [5, 6, 7]
    drawn.append({"token_id": 8})
    second = resumption.continued(output([5, 6, 7, 8], drawn, "length"))
    assert [e["token_id"] for e in second["outputs"][0]["logprobs"]] == [5, 6, 7, 8] and is_whole(second)
    assert not is_whole(last)
    cut = APIError("worker failed", 503)
    assert resumable({"n": 1}, cut) and not resumable({"n": 2}, cut)
    assert not resumable({"n": 1}, APIError("bad", 400)) and not resumable({"n": 1}, RequestFailed("NaN", 500))


@contextlib.contextmanager
def serving(log_path: Path, *flags: str) -> Iterator[ServeProcess]:
    with log_path.open("wb") as log:
        serve = ServeProcess(flags, log=log)
        try:
            yield serve
        finally:
            serve.stop()


def test_streams_of_a_killed_decode_worker_continue_token_for_token(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with serving(log_path, "--decode", "2", "--weight-format", "dense") as serve:
        greedy = [Ask(TEXT_PROMPTS[i], MAX_TOKENS) for i in range(8)]
        seeded = [Ask(ENGLISH[i], MAX_TOKENS, temperature=0.8, seed=100 + i) for i in range(4)]
        unseeded = [Ask(ENGLISH[i], MAX_TOKENS, temperature=0.8, logprobs=0) for i in range(4)]
        # No fault: the answers every greedy and seeded stream must equal (float32 answers do
        # not depend on the batch, so they are asked all at once).
        started = time.monotonic()
        references = Streams(serve, greedy + seeded).answers()
        print(f"references: {time.monotonic() - started:.1f} s")
        assert [classify(a, MAX_TOKENS) for a in references] == ["complete"] * 12, references
        # Interleaved, so that round-robin routing puts every kind on both decode workers.
        kinds = [("greedy", a) for a in greedy[:4]] + [("seeded", a) for a in seeded] + [
            ("unseeded", a) for a in unseeded] + [("greedy", a) for a in greedy[4:]]
        order = [kinds[i] for k in range(4) for i in (k, 4 + k, 8 + k, 12 + k)]
        asks = [replace(a, request_id=f"{kind}-{n}") for n, (kind, a) in enumerate(order)]
        streams = Streams(serve, asks)
        streams.wait_streaming(chunks=3, streams=len(asks))
        ids = {a.request_id for a in asks}
        routed = {line["request_id"]: line["decode"] for line in json_log_lines(log_path)
                  if line.get("message") == "routed" and line.get("request_id") in ids}
        assert len(routed) == len(asks), routed
        # The decode worker serving the most kinds (then streams) dies.
        served: dict[str, list[str]] = {}
        for request_id, url in routed.items():
            served.setdefault(url, []).append(request_id)
        victim = max(served, key=lambda url: (len({r.split("-")[0] for r in served[url]}), len(served[url])))
        pid = serve.worker_pid(victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        answers = streams.answers()
        print(f"fault round: {time.monotonic() - started:.1f} s")

        outcomes = {a.request_id: classify(answer, MAX_TOKENS) for a, answer in zip(asks, answers, strict=True)}
        assert set(outcomes.values()) == {"complete"}, (outcomes, answers)
        expected = {(a.prompt, a.seed): answer.text for a, answer in zip(greedy + seeded, references, strict=True)}
        for request, answer, tokens in zip(asks, answers, streams.tokens, strict=True):
            if request.temperature == 0 or request.seed is not None:
                assert answer.text == expected[(request.prompt, request.seed)], (request, answer)
            else:  # unseeded: every token once, none missing
                assert len(tokens) == MAX_TOKENS and spells(tokens, answer.text), (request, answer, tokens)
        resumed = {line["request_id"] for line in json_log_lines(log_path)
                   if str(line.get("message", "")).startswith("resuming on")}
        assert resumed == set(served[victim]), (resumed, served[victim])
        assert {r.split("-")[0] for r in resumed} == {"greedy", "seeded", "unseeded"}, resumed
        assert scrape(serve.url).get(RESUMED, 0.0) == len(resumed)


def test_the_default_serve_loses_no_stream_and_refuses_no_request_while_its_decode_worker_restarts(
    tmp_path: Path,
) -> None:
    with serving(tmp_path / "serve.log") as serve:  # one prefill worker, one decode worker
        decode = [w["url"] for w in serve.workers() if w["role"] == "decode"]
        assert len(decode) == 1 and len(serve.workers()) == 2
        streams = Streams(serve, [Ask(TEXT_PROMPTS[i], MAX_TOKENS, request_id=f"stream-{i}") for i in range(8)])
        # int4 decoding is quick: the first streams may be over before the last ones start.
        streams.wait_streaming(chunks=2, streams=4)
        pid = serve.worker_pid(decode[0])
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        under_way = streams.under_way(chunks=1)
        print(f"killed under {under_way} streams: {streams.chunks}")
        killed = time.monotonic()
        # While the supervisor restarts it (bounded: 30 requests, 120 s), every request is answered.
        during: list[Answer] = []
        while len(during) < 30 and time.monotonic() - killed < 120:
            during.append(ask(serve, Ask(ENGLISH[len(during) % len(ENGLISH)], 8, stream=len(during) % 2 == 0), 60))
            if serve.worker_pid(decode[0]) not in (None, pid) and serve.wait_healthy(0.1):
                break
        answers = streams.answers()
        print(f"{len(during)} requests answered during the restart")
        assert [classify(a, 8) for a in during] == ["complete"] * len(during), during
        assert [classify(a, MAX_TOKENS) for a in answers] == ["complete"] * 8, answers
        # Streams the kill caught before their first token were retried, not resumed.
        assert scrape(serve.url).get(RESUMED, 0.0) >= 1
        assert serve.wait_healthy(120), "the decode worker was not restarted"
