"""``pdserve serve`` as a child process on loopback, for harnesses that kill parts of it.

It records every pid it ever ran (restarted workers included), so that a harness can tell
whose shared-memory KV pools must be gone once it stopped, and it calls the workers' internal
API with a per-run secret of its own, as the router does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import psutil

from pdserve.engine.shm_segments import PREFIX, SHM_DIRECTORY
from pdserve.serving.serve import free_port

BASE_FLAGS = ("--dtype", "float32", "--kv-memory-mb", "256")
"""Before the caller's flags (argparse lets a later flag win): float32 so that greedy answers are
comparable across batch sizes, a KV pool small enough for a shared machine."""


class ServeProcess:
    """``pdserve serve BASE_FLAGS flags...`` on loopback, ready once its /health answers 200.

    It runs with a per-run internal secret of ours in ``PDSERVE_INTERNAL_SECRET`` (serve uses a
    given one), so that we can call the workers' own ``/debug`` as the router does."""

    def __init__(self, flags: Sequence[str] = (), ready_timeout: float = 180.0, log: IO[bytes] | None = None) -> None:
        self.flags = tuple(flags)
        self.secret = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "serve", *BASE_FLAGS, "--port", str(self.port), *self.flags],
            env={**os.environ, "PDSERVE_INTERNAL_SECRET": self.secret}, stdout=log, stderr=log,
        )
        self.seen_pids: set[int] = {self.process.pid}
        """Every process this serve ran, restarted workers included: whose KV pools must go."""
        deadline = time.monotonic() + ready_timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve was not ready within {ready_timeout:.0f} s")
            time.sleep(0.5)
        self.children()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            self.model = self.client.models.list().data[0].id
        except openai.APIError:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def workers(self) -> list[dict[str, Any]]:
        """The router's view: ``[{"url", "role", "healthy", ...}]``."""
        return list(httpx.get(f"{self.url}/health", timeout=10).json().get("workers", []))

    def worker_get(self, url: str, path: str) -> dict[str, Any]:
        """GET a worker's internal API, as the router does (with the internal secret)."""
        response = httpx.get(f"{url}{path}", timeout=10, headers={"Authorization": f"Bearer {self.secret}"})
        response.raise_for_status()
        return dict(response.json())

    def children(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_pids |= {child.pid for child in found}
        return found

    def worker_pid(self, url: str) -> int | None:
        """The pid of the worker serving ``url`` (by its ``--port``), None while it restarts."""
        port = url.rsplit(":", 1)[1]
        for child in self.children():
            try:
                argv = child.cmdline()
            except psutil.Error:  # ended meanwhile
                continue
            if "--port" in argv[:-1] and argv[argv.index("--port") + 1] == port:
                return child.pid
        return None

    def wait_healthy(self, timeout: float) -> bool:
        """Until the router sees every worker healthy again (a restarted one re-admitted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                workers = self.workers()
                if workers and all(w["healthy"] for w in workers):
                    self.children()  # note the restarted workers' pids
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        return False

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGINT (serve stops its workers), then wait; returns the pids that outlived it (killed)."""
        group = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        return reap(group, 15.0)


def reap(processes: list[psutil.Process], timeout: float) -> list[int]:
    """Wait for ``processes`` to end; SIGKILL and return those still alive after ``timeout``."""
    _gone, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [process.pid for process in alive]


def segments_of(pids: Collection[int], directory: Path = SHM_DIRECTORY) -> list[str]:
    """The shared-memory KV pools that processes ``pids`` created and that still exist."""
    names = []
    for path in directory.glob(f"{PREFIX}*"):
        owner = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if owner.isdigit() and int(owner) in pids:
            names.append(path.name)
    return sorted(names)
