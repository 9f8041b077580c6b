"""Time to first token through the router with the KV pull pipelined or not, over shm and tcp.

    python benchmarks/kv_pipeline_ab.py [--rounds 6] [--prompt-chars 4500]

One prefill worker (core 0) and one decode worker (core 1), as ``pdserve serve`` runs them, and
four routers over them that differ only in ``--kv-backend`` and ``--kv-pipeline``. Each round
sends every arm one fresh prompt (a prefix of its own, so no prefix cache helps) with
``max_tokens=2`` and times the first streamed token at the client. Arms alternate within a
round so that all see the same machine. Also reads the workers' JSON logs for the *visible
transfer*: from the prefill worker's ``finished: prefilled`` line to the decode worker's ``KV
received`` line of the same request (ms resolution). Prints medians per arm; writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pdserve.bench.prompt_set import long_prompt
from pdserve.serving.serve import free_port

SECRET = "kv-pipeline-ab"
ARMS = {
    "shm-after": ("--kv-backend", "shm", "--no-kv-pipeline"),
    "shm-pipelined": ("--kv-backend", "shm", "--kv-pipeline"),
    "tcp-after": ("--kv-backend", "tcp", "--no-kv-pipeline"),
    "tcp-pipelined": ("--kv-backend", "tcp", "--kv-pipeline"),
}


def _start(*argv: str, log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    stderr = log.open("w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *argv, "--port", str(port)], stderr=stderr)
    return process, f"http://127.0.0.1:{port}"


def _log_times(log: Path, message: str) -> dict[str, float]:
    """request_id -> the epoch seconds of its ``message`` line."""
    times = {}
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == message and record.get("request_id"):
            stamp = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
            times[record["request_id"]] = stamp.timestamp()
    return times


def _wait(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready")


def _ttft(url: str, prompt: str, request_id: str = "") -> float:
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    headers = {"X-Request-Id": request_id} if request_id else None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return time.monotonic() - started
    raise RuntimeError("no token streamed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-chars", type=int, default=4500)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="benchmarks/results/kv_pipeline_ab.json")  # results: kv_pipeline_ab-*.json
    args = parser.parse_args()
    arms = {arm: ARMS[arm] for arm in args.arms}
    common = ("--kv-memory-mb", "256", "--internal-secret", SECRET, "--exit-with-parent")
    logs = Path(tempfile.mkdtemp(prefix="kv-pipeline-ab-"))
    workers = [_start("worker", "--role", "prefill", "--cpus", "0", *common, log=logs / "prefill.log"),
               _start("worker", "--role", "decode", "--cpus", "1", *common, log=logs / "decode.log")]
    processes = [p for p, _ in workers]
    try:
        for _, url in workers:
            _wait(url, 180)
        routers = {}
        for arm, flags in arms.items():
            process, url = _start("router", "--worker-secret", SECRET, "--prefill", workers[0][1],
                                  "--decode", workers[1][1], *flags)
            processes.append(process)
            routers[arm] = url
        for url in routers.values():
            _wait(url, 60)
        text = long_prompt()[: args.prompt_chars]
        for arm, url in routers.items():  # warm-up: first requests pay for lazy set-up
            _ttft(url, f"Warm-up {arm}. {text[:400]}")
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for round_index in range(args.rounds):
            order = list(arms) if round_index % 2 == 0 else list(reversed(arms))
            for arm in order:
                times[arm].append(_ttft(routers[arm], f"Round {round_index}, {arm}. {text}", f"{arm}-{round_index}"))
            print(f"round {round_index + 1}: " + ", ".join(f"{a} {times[a][-1]:.3f} s" for a in arms), flush=True)
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
    prefilled, received = _log_times(logs / "prefill.log", "finished: prefilled"), _log_times(logs / "decode.log",
                                                                                            "KV received")
    visible = {arm: [received[f"{arm}-{r}"] - prefilled[f"{arm}-{r}"] for r in range(args.rounds)
                     if f"{arm}-{r}" in received and f"{arm}-{r}" in prefilled] for arm in arms}
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    visible_medians = {arm: statistics.median(values) if values else None for arm, values in visible.items()}
    for arm, median in medians.items():
        shown = visible_medians[arm]
        print(f"{arm:14s} median TTFT {median:.3f} s  (min {min(times[arm]):.3f}, max {max(times[arm]):.3f}); "
              f"visible transfer {'?' if shown is None else f'{shown * 1000:.0f} ms'}")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prompt_chars": args.prompt_chars,
              "rounds": args.rounds, "ttft_seconds": times, "median_ttft_seconds": medians,
              "visible_transfer_seconds": visible, "median_visible_transfer_seconds": visible_medians}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
