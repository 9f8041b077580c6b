"""Soak: minutes of mixed load on `pdserve serve` with a kill -9 every so often (a script, not CI).

    python benchmarks/soak.py --minutes 30 --out benchmarks/results/soak [--seed 0] [--streams 8]
                              [--kill-every 60] [--kinds router,prefill,decode]

``--streams`` clients each send their next request when the last ended: greedy or sampled, a
short prompt or a long one (``pdserve.bench.prompt_set``), streamed or whole. Greedy answers must
equal the answer the same request got on the idle server at the start; every answer must be whole
(``ignore_eos``: exactly ``max_tokens``) or an explicit error before its deadline. Every
``--kill-every`` seconds the load pauses until nothing is in flight, each worker's ``/debug`` must
show its KV pool idle (the leak check), the load resumes, and a random process (the router, a
prefill or a decode worker; ``pdserve.bench.chaos``) is SIGKILLed a few seconds later. Every
~10 s the RSS and open files of each process are sampled; the report fits an RSS slope to each
process lifetime (a restarted worker is a new lifetime) after its warm-up, and per role gives the
span-weighted mean and the maximum of those slopes. It ends with ``report.json`` and
``report.md`` (summaries only) in ``--out``; serve's own output goes to ``serve.log`` there.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from pdserve.bench.chaos import (
    KINDS,
    OUTCOMES,
    Answer,
    Ask,
    Recovery,
    ask,
    check_leaks,
    classify,
    kill_one,
    recover,
)
from pdserve.bench.prompt_set import TEXT_PROMPTS, long_prompt
from pdserve.bench.serve_process import ServeProcess, segments_of

SERVE_FLAGS = "--decode 2 --weight-format dense --kv-memory-mb 512 --log-level WARNING"
"""Two decode workers, so a decode kill leaves one serving; dense weights everywhere, so greedy
answers do not depend on which worker prefilled; warnings only, so serve.log stays small."""
LONG_SHARE, GREEDY_SHARE, STREAM_SHARE = 0.15, 0.5, 0.7
GREEDY_TOKENS = {"short": 48, "long": 16}
SAMPLED_TOKENS = (16, 48, 128)
SAMPLE_EVERY = 10.0
WARMUP = 30.0
"""Seconds after a process is ready left out of its RSS fit: its first requests' allocations (and,
for a worker, never the model loading before it)."""
MIN_FIT_SPAN = 60.0
FAULT_GRACE = 2.0
"""Seconds after a recovery during which an error still counts as the fault's."""
MAX_REQUESTS = 200_000


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    seed: int
    out: Path
    kill_every: float
    num_streams: int
    kinds: tuple[str, ...]
    serve_flags: tuple[str, ...]
    deadline: float = 120.0
    """Seconds a client waits for its whole answer; later is a hang."""
    recovery_timeout: float = 180.0


@dataclass(frozen=True)
class Done:
    """One finished request, kept in memory for the summaries only."""

    mode: str
    outcome: str
    error: str | None
    started: float
    ended: float


@dataclass(frozen=True)
class Sample:
    """One process at one moment."""

    at: float
    """Seconds since the load started."""
    rss: float
    """Resident MiB: includes shared pages, such as the prefill's KV pool a decode worker reads."""
    anon: float
    """Private anonymous resident MiB (the heap): where a leak shows, free of shared mappings."""
    fds: int


@dataclass
class KillRecord:
    kind: str
    pid: int
    at: float
    recovery: Recovery | None = None
    """None until it recovered (or failed to)."""


class State:
    """What the threads share: the current serve (a new one after a router kill) and the tallies."""

    def __init__(self, serve: ServeProcess) -> None:
        self.serve = serve
        self.lock = threading.Lock()
        self.done: list[Done] = []
        self.kills: list[KillRecord] = []
        self.samples: dict[tuple[str, int], list[Sample]] = {}
        """(role, pid) -> its samples, in time order."""
        self.started = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.started


class Load:
    """Closed-loop clients; ``hold`` stops new requests and waits for those in flight."""

    def __init__(self, config: SoakConfig, state: State, references: dict[tuple[str, int], Answer]) -> None:
        self.config, self.state, self.references = config, state, references
        self.go = threading.Event()
        self.go.set()
        self.stop = threading.Event()
        self.in_flight = 0
        self.idle = threading.Condition()
        self.threads = [threading.Thread(target=self._client, args=(i,), name=f"client {i}", daemon=True)
                        for i in range(config.num_streams)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def hold(self, timeout: float) -> bool:
        self.go.clear()
        with self.idle:
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout)

    def resume(self) -> None:
        self.go.set()

    def _client(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        long_text = long_prompt()
        while not self.stop.is_set() and len(self.state.done) < MAX_REQUESTS:
            if not self.go.wait(0.5):
                continue
            with self.idle:
                self.in_flight += 1
            try:
                mode, request = choose(rng, long_text)
                serve, started = self.state.serve, self.state.now()
                answer = ask(serve, request, self.config.deadline)
                reference = (
                    self.references.get((request.prompt, request.max_tokens)) if request.temperature == 0 else None
                )
                outcome = classify(answer, request.max_tokens, reference.text if reference else None)
                with self.state.lock:
                    self.state.done.append(Done(mode, outcome, answer.error, started, self.state.now()))
            finally:
                with self.idle:
                    self.in_flight -= 1
                    self.idle.notify_all()


def choose(rng: random.Random, long_text: str) -> tuple[str, Ask]:
    """A random request of the mix, and its mode label (greedy|sampled / short|long / stream|whole)."""
    length = "long" if rng.random() < LONG_SHARE else "short"
    prompt = long_text if length == "long" else rng.choice(TEXT_PROMPTS)
    stream = rng.random() < STREAM_SHARE
    if rng.random() < GREEDY_SHARE:
        request = Ask(prompt, GREEDY_TOKENS[length], stream=stream)
    else:
        request = Ask(prompt, rng.choice(SAMPLED_TOKENS), temperature=0.8, seed=rng.randrange(2**31), stream=stream)
    mode = f"{'greedy' if request.temperature == 0 else 'sampled'}/{length}/{'stream' if stream else 'whole'}"
    return mode, request


def references(serve: ServeProcess, deadline: float) -> dict[tuple[str, int], Answer]:
    """Each greedy request of the mix alone on the idle server: what it must answer under load."""
    found = {}
    for length, prompt in [("long", long_prompt()), *(("short", p) for p in TEXT_PROMPTS)]:
        answer = ask(serve, Ask(prompt, GREEDY_TOKENS[length]), deadline)
        if classify(answer, GREEDY_TOKENS[length]) != "complete":
            raise RuntimeError(f"no whole reference answer on the idle server for {prompt[:40]!r}: {answer}")
        found[(prompt, GREEDY_TOKENS[length])] = answer
    return found


def sample_forever(state: State, stop: threading.Event, progress: Any) -> None:
    """Every SAMPLE_EVERY s: each ready process's RSS and open fds, and a progress line."""
    ready_at: dict[int, float] = {}
    """pid -> when it was first seen ready (a worker: healthy at the router; the router: serving)."""
    while not stop.wait(SAMPLE_EVERY):
        serve = state.serve
        try:
            healthy = {w["url"].rsplit(":", 1)[1] for w in serve.workers() if w["healthy"]}
            processes = [(psutil.Process(serve.pid), "router", True)]
            for child in serve.children():
                role, port = worker_of(child)
                if role is not None:
                    processes.append((child, role, port in healthy))
        except (psutil.Error, httpx.HTTPError, ValueError):  # the router was just killed
            processes = []
        for process, role, ready in processes:
            if ready:
                ready_at.setdefault(process.pid, state.now())
            if state.now() - ready_at.get(process.pid, state.now()) < WARMUP:
                continue
            try:
                sample = Sample(state.now(), process.memory_info().rss / 2**20, anonymous_mib(process.pid),
                                process.num_fds())
            except (psutil.Error, OSError):
                continue
            with state.lock:
                state.samples.setdefault((role, process.pid), []).append(sample)
        progress()


def anonymous_mib(pid: int) -> float:
    """RssAnon of /proc/PID/status (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no RssAnon for pid {pid}")


def worker_of(process: psutil.Process) -> tuple[str | None, str | None]:
    """A worker's --role and --port; (None, None) for helpers (multiprocessing's resource tracker)."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return None, None
    if "worker" not in argv or "--role" not in argv[:-1] or "--port" not in argv[:-1]:
        return None, None
    return argv[argv.index("--role") + 1], argv[argv.index("--port") + 1]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


METRICS = {"rss": "RSS MiB", "anon": "anonymous RSS MiB", "fds": "open fds"}


def memory_summary(samples: dict[tuple[str, int], list[Sample]]) -> dict[str, Any]:
    """Per role and metric: the slope per hour fitted to each process lifetime, span-weighted
    mean and maximum over the lifetimes, and the largest value seen."""
    lifetimes: dict[str, list[list[Sample]]] = {}
    for (role, _pid), series in sorted(samples.items()):
        lifetimes.setdefault(role, []).append(series)
    roles: dict[str, Any] = {}
    for role, series_list in lifetimes.items():
        fitted = [s for s in series_list if len(s) >= 3 and s[-1].at - s[0].at >= MIN_FIT_SPAN]
        spans = [s[-1].at - s[0].at for s in fitted]
        entry: dict[str, Any] = {"lifetimes": len(series_list), "fitted_lifetimes": len(fitted),
                                 "fitted_hours": round(sum(spans) / 3600, 3)}
        for metric in METRICS:
            slopes = [slope([(x.at / 3600, float(getattr(x, metric))) for x in s]) for s in fitted]
            entry[metric] = {
                "per_hour": (
                    round(sum(w * k for w, k in zip(spans, slopes, strict=True)) / sum(spans), 1) if fitted else None
                ),
                "max_per_hour": round(max(slopes), 1) if fitted else None,
                "max": round(max(float(getattr(x, metric)) for s in series_list for x in s), 1),
            }
        roles[role] = entry
    return roles


@dataclass
class LeakLog:
    num_checks: int = 0
    num_leaking_workers: int = 0
    max_leaked_blocks: int = 0
    num_unreached: int = 0
    """Idle moments not reached: requests still in flight after the deadline, workers unhealthy."""
    examples: list[dict[str, Any]] = field(default_factory=list)

    def check(self, load: Load, state: State, config: SoakConfig) -> None:
        quiet = load.hold(config.deadline + 10) and state.serve.wait_healthy(config.recovery_timeout)
        try:
            if not quiet:
                self.num_unreached += 1
                return
            leaks = check_leaks(state.serve)
            self.num_checks += 1
            self.num_leaking_workers += len(leaks)
            self.max_leaked_blocks = max([self.max_leaked_blocks, *(leak.num_leaked_blocks for leak in leaks)])
            self.examples += [asdict(leak) | {"at_s": round(state.now())} for leak in leaks][: 5 - len(self.examples)]
        finally:
            load.resume()


def kill_and_recover(rng: random.Random, load: Load, state: State, config: SoakConfig, log: IO[bytes]) -> None:
    serve, kind = state.serve, rng.choice(config.kinds)
    if kind == "router":
        load.go.clear()  # no new requests to a dead router; those in flight see it die
    at = state.now()
    try:
        kill = kill_one(rng, serve, kind)
    except httpx.HTTPError:  # the router did not say where its workers are: try again next time
        kill = None
    if kill is None:  # or every worker of that role is restarting
        load.resume()
        return
    record = KillRecord(kill.kind, kill.pid, at)
    with state.lock:
        state.kills.append(record)
    progress_line(state, f"killed the {kill.kind} (pid {kill.pid})")
    if kill.kind == "router":
        load.hold(config.deadline + 10)
    try:
        state.serve, recovery = recover(serve, kill, config.recovery_timeout, log)
    except RuntimeError as error:  # no new serve: nothing left to load, report what we have
        record.recovery = Recovery(False, state.now() - at)
        raise SoakAborted(f"no serve after the router kill: {error}") from error
    finally:
        load.resume()
    record.recovery = recovery
    progress_line(state, f"{'recovered' if recovery.recovered else 'NOT recovered'} in {recovery.seconds:.1f} s")


class SoakAborted(RuntimeError):
    pass


def progress_line(state: State, message: str) -> None:
    print(f"[soak {state.now() / 60:5.1f} min] {message}", flush=True)


def progress(state: State) -> None:
    with state.lock:
        outcomes = Counter(d.outcome for d in state.done)
        kills = Counter(k.kind for k in state.kills)
        latest = {key: series[-1].rss for key, series in state.samples.items() if series[-1].at > state.now() - 15}
    rss = ", ".join(f"{role} {rss:.0f}" for (role, _pid), rss in sorted(latest.items()))
    progress_line(state, f"{sum(outcomes.values())} requests ({', '.join(f'{o} {outcomes[o]}' for o in OUTCOMES)}); "
                         f"kills {dict(kills)}; RSS MiB: {rss or '-'}")


def run(config: SoakConfig) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    log = (config.out / "serve.log").open("ab")
    state = State(ServeProcess(config.serve_flags, ready_timeout=config.recovery_timeout, log=log))
    progress_line(state, f"serve ready at {state.serve.url}; computing the greedy references")
    sampler_stop = threading.Event()
    leaks, aborted = LeakLog(), None
    try:
        load = Load(config, state, references(state.serve, config.deadline))
        state.started = time.monotonic()
        threading.Thread(target=sample_forever, args=(state, sampler_stop, lambda: progress(state)),
                         name="sampler", daemon=True).start()
        load.start()
        try:
            drive(rng, load, state, leaks, config, log)
        except SoakAborted as error:
            aborted = str(error)
            progress_line(state, f"aborted: {aborted}")
        load.stop.set()
        load.resume()
        deadline = time.monotonic() + config.deadline + 10
        for thread in load.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        stuck = [thread.name for thread in load.threads if thread.is_alive()]
    finally:
        sampler_stop.set()
        final_orphans = state.serve.stop()
        leftover = segments_of(state.serve.seen_pids)
        log.close()
    return summarise(config, state, leaks, stuck, final_orphans, leftover) | {"aborted": aborted}


def drive(rng: random.Random, load: Load, state: State, leaks: LeakLog, config: SoakConfig, log: IO[bytes]) -> None:
    """Until the end: every kill_every s a leak check at an idle moment, then a kill under load."""
    end, next_kill = config.minutes * 60, config.kill_every
    while state.now() < end:
        # A kill needs time left to recover before the end, else the end measures the fault.
        if state.now() >= next_kill and end - state.now() > 45:
            leaks.check(load, state, config)
            time.sleep(rng.uniform(1.0, min(10.0, config.kill_every / 2)))  # under load again
            kill_and_recover(rng, load, state, config, log)
            next_kill = state.now() + config.kill_every
        time.sleep(0.5)
    leaks.check(load, state, config)


def summarise(config: SoakConfig, state: State, leaks: LeakLog, stuck: list[str], final_orphans: list[int],
              leftover: list[str]) -> dict[str, Any]:
    # A kill still recovering when the run ended (it aborted) has no Recovery: it lasted to the end.
    recoveries = [k.recovery or Recovery(False, state.now() - k.at) for k in state.kills]
    windows = [(k.at, k.at + r.seconds + FAULT_GRACE) for k, r in zip(state.kills, recoveries, strict=True)]
    during: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    for d in state.done:
        if d.outcome == "error":
            hit = any(d.started <= stop and d.ended >= start for start, stop in windows)
            (during if hit else outside)[d.error or "?"] += 1
    by_mode: dict[str, Counter[str]] = {}
    for d in state.done:
        by_mode.setdefault(d.mode, Counter())[d.outcome] += 1
    outcomes = Counter(d.outcome for d in state.done)
    outcomes["hung"] += len(stuck)
    return {
        "config": {"minutes": config.minutes, "seed": config.seed, "kill_every_s": config.kill_every,
                   "streams": config.num_streams, "kinds": list(config.kinds),
                   "serve_flags": shlex.join(config.serve_flags), "deadline_s": config.deadline},
        "ran_minutes": round(state.now() / 60, 2),
        "requests": len(state.done),
        "outcomes": {o: outcomes[o] for o in OUTCOMES},
        "outcomes_by_mode": {mode: {o: c[o] for o in OUTCOMES} for mode, c in sorted(by_mode.items())},
        "errors_during_faults": dict(during.most_common()),
        "errors_outside_faults": dict(outside.most_common()),
        "kills": dict(Counter(k.kind for k in state.kills)),
        "recovery_s": {"max": round(max((r.seconds for r in recoveries), default=0), 1),
                       "not_recovered": sum(not r.recovered for r in recoveries)},
        "router_kills": {"orphans": sum(len(r.orphans) for r in recoveries),
                         "leftover_segments": sum(len(r.leftover_segments) for r in recoveries)},
        "leaks": asdict(leaks),
        "memory": memory_summary(state.samples),
        "end": {"stuck_clients": stuck, "orphans": final_orphans, "leftover_segments": leftover},
    }


def markdown(report: dict[str, Any]) -> str:
    c, o = report["config"], report["outcomes"]
    lines = [
        f"# Soak: {report['ran_minutes']} min, {c['streams']} streams, a kill every {c['kill_every_s']:.0f} s",
        "", f"`pdserve serve {c['serve_flags']}`, seed {c['seed']}, deadline {c['deadline_s']:.0f} s per request.", "",
        f"**{report['requests']} requests**: " + ", ".join(f"{k} {v}" for k, v in o.items()),
        f"(truncated, wrong and hung must be 0). Kills: {report['kills'] or 'none'}; slowest recovery "
        f"{report['recovery_s']['max']} s, not recovered {report['recovery_s']['not_recovered']}.", "",
        "| mode | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|",
        *(f"| {mode} | " + " | ".join(str(n) for n in row.values()) + " |"
          for mode, row in report["outcomes_by_mode"].items()),
        "", "Errors by kind, during a fault (from its kill to its recovery) / outside any:", "",
        f"- during: {report['errors_during_faults'] or 'none'}",
        f"- outside: {report['errors_outside_faults'] or 'none'}", "",
        "## Leaks", "",
        f"- KV blocks at idle moments: {report['leaks']['num_checks']} checks, "
        f"{report['leaks']['num_leaking_workers']} leaking worker(s), max {report['leaks']['max_leaked_blocks']} "
        f"blocks; {report['leaks']['num_unreached']} idle moment(s) not reached",
        f"- router kills: {report['router_kills']['orphans']} orphaned worker(s), "
        f"{report['router_kills']['leftover_segments']} KV pool(s) left by the killed group",
        f"- at the end: {len(report['end']['orphans'])} orphan(s), {len(report['end']['leftover_segments'])} "
        f"shared-memory segment(s) left, {len(report['end']['stuck_clients'])} stuck client(s)", "",
        "## Memory", "",
        f"Slopes per hour fitted to each process lifetime (a restarted worker or a new router is a new "
        f"lifetime) from {WARMUP:.0f} s after it was ready, lifetimes of {MIN_FIT_SPAN:.0f} s or more; per role "
        "the span-weighted mean and the maximum over its lifetimes. RSS includes shared pages: a KV pool's "
        "first use shows as growth (the prefill's shared pool in the prefill and in the decode workers that "
        "read it), up to the pool's size; the anonymous part (the heap) is the one a leak grows.", "",
        "| role | lifetimes (fitted) | fitted h | " + " | ".join(
            f"{name}/h (mean, max) | max {name}" for name in METRICS.values()) + " |",
        "|---" * (3 + 2 * len(METRICS)) + "|",
        *(f"| {role} | {m['lifetimes']} ({m['fitted_lifetimes']}) | {m['fitted_hours']} | " + " | ".join(
            f"{m[k]['per_hour']}, {m[k]['max_per_hour']} | {m[k]['max']}" for k in METRICS) + " |"
          for role, m in report["memory"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to load (default: 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"),
                        help="where report.json, report.md and serve.log go")
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="SECONDS",
                        help="seconds between kills (default: 60)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="what may be killed (default: router,prefill,decode)")
    parser.add_argument("--serve-flags", default=SERVE_FLAGS, help=f"pdserve serve's flags (default: {SERVE_FLAGS})")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS) or args.minutes <= 0 or args.streams < 1 or args.kill_every <= 0:
        parser.error(f"--kinds must name some of {', '.join(KINDS)}; --minutes, --streams, --kill-every positive")
    config = SoakConfig(args.minutes, args.seed, args.out, args.kill_every, args.streams, kinds,
                        tuple(shlex.split(args.serve_flags)))
    report = run(config)
    (config.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (config.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    bad = report["outcomes"]["truncated"] + report["outcomes"]["wrong"] + report["outcomes"]["hung"]
    return 1 if bad or report["leaks"]["num_leaking_workers"] or report["end"]["leftover_segments"] else 0


if __name__ == "__main__":
    sys.exit(main())
