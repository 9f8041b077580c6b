"""Starting, restarting and stopping the worker processes of one machine: deliberately thin.

``ProcessGroup`` spawns commands and waits for each worker's ``/health``. Once started, a
watcher thread restarts a member that died, after a back-off that doubles with each quick
death (1 s up to 30 s) and resets once a member stayed up for a minute; the router's health
checks re-admit it when it answers again, proving the group's secret (so a process that took the
port during the back-off is never admitted). ``stop`` sends SIGTERM, then SIGKILL to whatever is
left. Children also get the parent-death signal, so an abruptly killed supervisor leaves no
orphans. Multi-node deployment replaces this module (with Ray actors), not the workers or the
router.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from pdserve.runtime.exit_status import describe_exit
from pdserve.serving.internal_auth import identity_challenge, proves_identity

MIN_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 1.0, 30.0, 60.0


@dataclass
class ManagedProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    argv: list[str]
    env: dict[str, str]
    started: float = 0.0
    backoff: float = MIN_BACKOFF
    restarts: int = 0


class ProcessGroup:
    def __init__(self, log: Callable[[str], None] = lambda _message: None, secret: str | None = None) -> None:
        self.members: list[ManagedProcess] = []
        self._log = log
        self._secret = secret
        """The members' internal secret: a member is ready only once its /health proves it."""
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def spawn(self, name: str, url: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> ManagedProcess:
        """Start ``python argv...``; ``env`` replaces the environment (secrets go there, never in
        argv, which every local user can read)."""
        member_env = dict(env if env is not None else os.environ)
        process = subprocess.Popen([sys.executable, *argv], env=member_env)
        member = ManagedProcess(name, url, process, list(argv), member_env, time.monotonic())
        self.members.append(member)
        return member

    def watch(self, interval: float = 0.5) -> None:
        """Restart members that die, from a background thread, until :meth:`stop`."""
        self._watcher = threading.Thread(target=self._watch, args=(interval,), name="supervisor", daemon=True)
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            for member in self.members:
                if member.process.poll() is None:
                    continue
                uptime = time.monotonic() - member.started
                member.backoff = MIN_BACKOFF if uptime > STABLE_AFTER else min(member.backoff * 2, MAX_BACKOFF)
                how = describe_exit(member.process.returncode)
                self._log(f"{member.name} ended ({how}); restarting in {member.backoff:.0f} s")
                if self._stopping.wait(member.backoff):
                    return
                member.process = subprocess.Popen([sys.executable, *member.argv], env=member.env)
                member.started = time.monotonic()
                member.restarts += 1

    def wait_healthy(self, timeout: float, log: Callable[[str], None]) -> None:
        """Block until every member answers /health; raises RuntimeError naming the laggard."""
        deadline = time.monotonic() + timeout
        pending = list(self.members)
        while pending:
            for member in list(pending):
                if member.process.poll() is not None:
                    raise RuntimeError(
                        f"{member.name} ended ({describe_exit(member.process.returncode)}) while starting"
                    )
                try:
                    challenge, headers = identity_challenge()
                    response = httpx.get(f"{member.url}/health", timeout=1.0, headers=headers)
                    if response.status_code == 200 and proves_identity(self._secret, challenge, response.headers):
                        pending.remove(member)
                        log(f"{member.name} ready at {member.url}")
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(m.name for m in pending)} not ready within {timeout:.0f} s")
            if pending:
                time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
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
