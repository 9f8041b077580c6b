"""Kill -9 under load: the harness of ``tests/test_chaos.py`` and ``benchmarks/soak.py``.

``ServeProcess`` (serve_process.py) runs ``pdserve serve`` on loopback. ``ask`` sends one
completion with the official ``openai`` client (a dev dependency, as the tests') and ``classify``
judges its answer: complete, an explicit error, or one of the three failures a fault must never
cause, a silently short answer (truncated), a different one (wrong), or none before the deadline
(hung). ``kill_one`` SIGKILLs the router (the ``serve`` process itself), a prefill worker or a
decode worker; ``recover`` waits until the service is whole again: the supervisor restarts a
worker, but a dead router takes its workers with it (the parent-death signal), so after checking
they left no shared-memory KV pool behind a new ``serve`` starts. ``check_leaks`` asks each worker's
``/debug`` for KV still held once idle. ``ChaosRunner`` strings these into rounds of concurrent
greedy streams with one kill each, and ``ChaosReport`` serialises the outcome to JSON and Markdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import httpx
import openai
import psutil

from pdserve.bench.prompt_set import TEXT_PROMPTS
from pdserve.bench.serve_process import ServeProcess, reap, segments_of

KINDS = ("router", "prefill", "decode")
"""What ``kill_one`` can kill: the ``serve`` process (router and supervisor) or one worker."""
OUTCOMES = ("complete", "error", "truncated", "wrong", "hung")
"""An answer's fate: the last three are the bugs, an explicit error is an allowed one."""
# -- requests and their outcomes -----------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One completion request; ``ignore_eos`` so that a whole answer is exactly ``max_tokens`` long."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stream: bool = True
    logprobs: int | None = None
    request_id: str | None = None
    """Sent as ``X-Request-Id``, to find the request in the router's log."""


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int
    seconds: float
    error: str | None = None
    """The explicit error's kind (exception class, HTTP status), None if there was none."""
    timed_out: bool = False
    """No whole answer before the client's deadline."""


def ask(serve: ServeProcess, request: Ask, deadline: float, on_chunk: Callable[[Any], None] | None = None) -> Answer:
    """Send ``request``; every exception the client may see becomes an ``Answer.error``.
    ``on_chunk`` sees every chunk of a stream as it arrives (progress, logprobs)."""
    client = serve.client.with_options(timeout=deadline)
    started = time.monotonic()
    text, finish, tokens = "", None, 0
    params: dict[str, Any] = {"model": serve.model, "prompt": request.prompt, "max_tokens": request.max_tokens,
                              "temperature": request.temperature, "extra_body": {"ignore_eos": True}}
    if request.seed is not None:
        params["seed"] = request.seed
    if request.logprobs is not None:
        params["logprobs"] = request.logprobs
    if request.request_id is not None:
        params["extra_headers"] = {"X-Request-Id": request.request_id}
    try:
        if request.stream:
            for chunk in client.completions.create(**params, stream=True, stream_options={"include_usage": True}):
                if on_chunk is not None:
                    on_chunk(chunk)
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if time.monotonic() - started > deadline:  # the read timeout is per chunk, not total
                    return Answer(text, finish, tokens, time.monotonic() - started, timed_out=True)
        else:
            response = client.completions.create(**params)
            text, finish = response.choices[0].text, response.choices[0].finish_reason
            tokens = response.usage.completion_tokens if response.usage is not None else 0
    except openai.APITimeoutError:
        return Answer(text, finish, tokens, time.monotonic() - started, timed_out=True)
    except (openai.APIError, httpx.HTTPError) as error:
        # httpx's own too: older openai releases let those of a cut stream out unwrapped.
        return Answer(text, finish, tokens, time.monotonic() - started, error=error_kind(error))
    return Answer(text, finish, tokens, time.monotonic() - started)


def error_kind(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__} {status}" if status is not None else type(error).__name__


def classify(answer: Answer, max_tokens: int, expected_text: str | None = None) -> str:
    """One of ``OUTCOMES``; ``expected_text`` (greedy answers) also catches a whole but wrong one."""
    if answer.timed_out:
        return "hung"
    if answer.error is not None:
        return "error"
    if answer.finish_reason != "length" or answer.completion_tokens != max_tokens:
        return "truncated"
    if expected_text is not None and answer.text != expected_text:
        return "wrong"
    return "complete"


# -- kills, recovery, leaks ----------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    kind: str
    pid: int
    at: float
    """When, on ``time.monotonic()``: recovery counts from here."""
    url: str | None = None
    """A worker kill: the address its restarted successor must serve again."""
    group_pids: tuple[int, ...] = ()
    """A router kill: its children at that moment, which must die with it."""


def kill_one(rng: random.Random, serve: ServeProcess, kind: str) -> Kill | None:
    """SIGKILL the router or a random worker of role ``kind``; None if none is running now."""
    if kind == "router":
        group = tuple(child.pid for child in serve.children())
        os.kill(serve.pid, signal.SIGKILL)
        return Kill(kind, serve.pid, time.monotonic(), group_pids=group)
    urls = sorted(w["url"] for w in serve.workers() if w["role"] == kind)
    running = [(url, pid) for url in urls if (pid := serve.worker_pid(url)) is not None]
    if not running:
        return None
    url, victim = rng.choice(running)
    os.kill(victim, signal.SIGKILL)
    return Kill(kind, victim, time.monotonic(), url)


def kill_random(rng: random.Random, serve: ServeProcess, kinds: Sequence[str] = KINDS) -> Kill | None:
    return kill_one(rng, serve, rng.choice(list(kinds)))


@dataclass(frozen=True)
class Recovery:
    recovered: bool
    """Every worker healthy again, the killed one's successor too (a router kill: a new serve ready)."""
    seconds: float
    """From the kill."""
    orphans: tuple[int, ...] = ()
    """A router kill: children still alive well after it died (then killed by us)."""
    leftover_segments: tuple[str, ...] = ()
    """A router kill: KV pools its dead group left in /dev/shm."""


def recover(serve: ServeProcess, kill: Kill, timeout: float,
            log: IO[bytes] | None = None) -> tuple[ServeProcess, Recovery]:
    """Wait until the service is whole again; returns the (possibly new) serve and how it went."""
    if kill.kind != "router":
        if kill.url is None:
            raise ValueError(f"a {kill.kind} kill without the worker's address")
        deadline = time.monotonic() + timeout
        # The router may not have noticed the death yet: healthy counts once a successor serves.
        while serve.worker_pid(kill.url) in (None, kill.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        healthy = serve.wait_healthy(max(0.0, deadline - time.monotonic()))
        return serve, Recovery(healthy, time.monotonic() - kill.at)
    serve.process.wait(10)
    group = []
    for pid in kill.group_pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            group.append(psutil.Process(pid))
    # Workers get SIGTERM from the kernel and drain; with their router gone that is quick.
    orphans = tuple(reap(group, 60.0))
    leftover = tuple(segments_of({kill.pid, *kill.group_pids}))
    replacement = ServeProcess(serve.flags, ready_timeout=timeout, log=log)
    replacement.seen_pids |= serve.seen_pids
    return replacement, Recovery(True, time.monotonic() - kill.at, orphans, leftover)


@dataclass(frozen=True)
class WorkerLeak:
    url: str
    num_leaked_blocks: int
    num_held_kv: int
    num_reserved_kv: int
    num_running: int


def check_leaks(serve: ServeProcess, timeout: float = 20.0) -> list[WorkerLeak]:
    """The workers not idle within ``timeout`` (a lease of offered KV may need its TTL to lapse).
    A worker that does not answer is restarting: its pool is new, it has nothing to leak yet."""
    deadline = time.monotonic() + timeout
    leaks: list[WorkerLeak] = []
    for worker in serve.workers():
        while True:
            try:
                state = serve.worker_get(worker["url"], "/debug")
            except httpx.HTTPError:
                break
            leak = WorkerLeak(worker["url"], state["num_blocks"] - state["num_free_blocks"], state["num_held_kv"],
                              state["num_reserved_kv"], state["num_running"])
            if leak == WorkerLeak(worker["url"], 0, 0, 0, 0):
                break
            if time.monotonic() > deadline:
                leaks.append(leak)
                break
            time.sleep(0.2)
    return leaks


# -- rounds of concurrent streams, one kill each -------------------------------------------


@dataclass(frozen=True)
class ChaosConfig:
    flags: tuple[str, ...] = ("--decode", "2", "--weight-format", "dense")
    """serve's flags: two decode workers, so a decode kill leaves one; dense weights everywhere so
    that every worker's greedy tokens agree."""
    num_streams: int = 16
    max_tokens: int = 48
    deadline: float = 90.0
    """Seconds a client waits for its whole answer; later is a hang."""
    kill_window: tuple[float, float] = (0.2, 1.5)
    """The kill comes this many seconds (uniform) after the streams start."""
    recovery_timeout: float = 180.0
    idle_timeout: float = 20.0


@dataclass
class RoundReport:
    kind: str
    pid: int
    kill_after: float
    outcomes: dict[str, int]
    errors: dict[str, int]
    """Explicit errors by kind."""
    leaks: list[WorkerLeak]
    recovery: Recovery
    answers_seconds: float
    """From the first request to the last answer."""
    seconds: float
    """The whole round, recovery and leak check included."""

    @property
    def num_leaked_blocks(self) -> int:
        return sum(leak.num_leaked_blocks for leak in self.leaks)


@dataclass
class ChaosReport:
    rounds: list[RoundReport] = field(default_factory=list)
    final_orphans: list[int] = field(default_factory=list)
    """Processes still alive after the last serve was stopped."""
    leftover_segments: list[str] = field(default_factory=list)
    """KV pools of any process the runs started, left after the last serve exited."""

    @property
    def kills(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.rounds))

    @property
    def outcomes(self) -> dict[str, int]:
        return {o: sum(r.outcomes.get(o, 0) for r in self.rounds) for o in OUTCOMES}

    def to_json(self) -> str:
        body = {"kills": self.kills, "outcomes": self.outcomes, "rounds": [asdict(r) for r in self.rounds],
                "final_orphans": self.final_orphans, "leftover_segments": self.leftover_segments}
        return json.dumps(body, indent=2)

    def to_markdown(self) -> str:
        header = ["round", "kill", "pid", "at s", *OUTCOMES, "leaked blocks", "answers s", "recovery s", "errors"]
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for index, r in enumerate(self.rounds, 1):
            errors = ", ".join(f"{kind} ×{n}" for kind, n in sorted(r.errors.items())) or "-"
            lines.append(f"| {index} | {r.kind} | {r.pid} | {r.kill_after:.2f} | "
                         + " | ".join(str(r.outcomes.get(o, 0)) for o in OUTCOMES)
                         + f" | {r.num_leaked_blocks} | {r.answers_seconds:.1f} | "
                         f"{r.recovery.seconds:.1f} | {errors} |")
        lines += ["", f"Kills: {self.kills}. Outcomes: {self.outcomes}.",
                  f"After the last stop: {len(self.final_orphans)} orphaned process(es), "
                  f"{len(self.leftover_segments)} shared-memory segment(s) left."]
        return "\n".join(lines) + "\n"


class ChaosRunner:
    """One serve (a new one after each router kill) and its greedy references, round after round."""

    def __init__(self, config: ChaosConfig, seed: int = 0) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self.prompts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(config.num_streams)]
        self.serve = ServeProcess(config.flags, ready_timeout=config.recovery_timeout)
        self.report = ChaosReport()
        try:
            # Each prompt alone on an idle server: the answer every loaded stream must equal.
            self.expected = {p: ask(self.serve, Ask(p, config.max_tokens), config.deadline) for p in set(self.prompts)}
            short = {p: a for p, a in self.expected.items() if classify(a, config.max_tokens) != "complete"}
            if short:
                raise RuntimeError(f"no whole reference answer on an idle server: {short}")
        except BaseException:
            self.serve.stop()
            raise

    def run_round(self, kind: str) -> RoundReport:
        config, serve = self.config, self.serve
        started = time.monotonic()
        requests = [Ask(p, config.max_tokens) for p in self.prompts]
        pool = ThreadPoolExecutor(config.num_streams)
        try:
            running = [pool.submit(ask, serve, r, config.deadline) for r in requests]
            kill_after = self.rng.uniform(*config.kill_window)
            time.sleep(kill_after)
            kill = kill_one(self.rng, serve, kind)
            if kill is None:
                raise RuntimeError(f"no {kind} process to kill")
            answers = []
            for future in running:
                try:
                    answers.append(future.result(timeout=max(1.0, started + config.deadline + 10 - time.monotonic())))
                except FutureTimeout:
                    answers.append(Answer("", None, 0, config.deadline, timed_out=True))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        answers_seconds = time.monotonic() - started
        outcomes = Counter(
            classify(a, r.max_tokens, self.expected[r.prompt].text) for a, r in zip(answers, requests, strict=True)
        )
        errors = Counter(a.error for a in answers if a.error is not None and not a.timed_out)
        self.serve, recovery = recover(serve, kill, config.recovery_timeout)
        if not recovery.recovered:
            raise RuntimeError(f"serve did not recover from the {kind} kill within {config.recovery_timeout:.0f} s")
        leaks = check_leaks(self.serve, config.idle_timeout)
        result = RoundReport(kind, kill.pid, kill_after, {o: outcomes[o] for o in OUTCOMES}, dict(errors), leaks,
                             recovery, answers_seconds, time.monotonic() - started)
        self.report.rounds.append(result)
        return result

    def finish(self) -> ChaosReport:
        """Stop serve; count what outlived it: processes and KV pools of every pid ever seen."""
        self.report.final_orphans = self.serve.stop()
        self.report.leftover_segments = segments_of(self.serve.seen_pids)
        return self.report
