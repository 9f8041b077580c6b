"""Starting and stopping the worker processes of one machine: deliberately thin.

``ProcessGroup`` spawns commands, waits for each worker's ``/health``, and on ``stop`` sends
SIGTERM, then SIGKILL to whatever is left. Children also get the parent-death signal, so an
abruptly killed supervisor leaves no orphans. Multi-node deployment replaces this module (with
Ray actors), not the workers or the router.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx


@dataclass
class ManagedProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]


class ProcessGroup:
    def __init__(self) -> None:
        self.members: list[ManagedProcess] = []

    def spawn(self, name: str, url: str, argv: Sequence[str]) -> ManagedProcess:
        process = subprocess.Popen([sys.executable, *argv])
        member = ManagedProcess(name, url, process)
        self.members.append(member)
        return member

    def wait_healthy(self, timeout: float, log: Callable[[str], None]) -> None:
        """Block until every member answers /health; raises RuntimeError naming the laggard."""
        deadline = time.monotonic() + timeout
        pending = list(self.members)
        while pending:
            for member in list(pending):
                if member.process.poll() is not None:
                    raise RuntimeError(f"{member.name} exited with code {member.process.returncode} while starting")
                try:
                    if httpx.get(f"{member.url}/health", timeout=1.0).status_code == 200:
                        pending.remove(member)
                        log(f"{member.name} ready at {member.url}")
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(m.name for m in pending)} not ready within {timeout:.0f} s")
            if pending:
                time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> None:
        for member in self.members:
            if member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for member in self.members:
            try:
                member.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait(5)
