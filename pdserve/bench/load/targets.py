"""The servers a comparison starts and stops itself, one after another, on this machine's cores.

Every pdserve target is ``pdserve serve`` with other flags, so each gets the same cores (the
process's affinity) and the same model: disaggregated (1 prefill + 1 decode worker, one core
each), colocated (one worker on every core) and replicas (one colocated worker per core behind
the router). Peers (vLLM's CPU build, llama.cpp's server) plug in as more ``Target``s once their
set-up scripts exist; a peer that cannot be installed is reported, not dropped.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    serve_flags: tuple[str, ...]


PDSERVE_TARGETS = {
    "disaggregated": Target("disaggregated", "pdserve: 1 prefill + 1 decode worker, one core each",
                            ("--prefill", "1", "--decode", "1")),
    "colocated": Target("colocated", "pdserve: one colocated worker on both cores", ("--colocated", "--workers", "1")),
    "replicas": Target("replicas", "pdserve: two colocated workers, one core each, least-loaded routing",
                       ("--colocated", "--workers", "2", "--routing", "least_loaded")),
}


class RunningTarget:
    def __init__(self, target: Target, log_path: Path, extra_flags: tuple[str, ...] = (),
                 ready_timeout: float = 300.0) -> None:
        self.target = target
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(self.port), *target.serve_flags,
             *extra_flags],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{target.name} exited with {self.process.returncode}; see {log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{target.name} was not ready within {ready_timeout:.0f} s; see {log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
