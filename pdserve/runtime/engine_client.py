"""The parent's handle on an engine process: spawn it, wait until ready, send ops, read events.

Single-threaded by design (one ZeroMQ DEALER socket, used by the caller's thread): events of
other requests that arrive while waiting for one are buffered, never dropped. Every wait has a
timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import IO, Any

import zmq

from pdserve.runtime.engine_process import READY_PREFIX, EngineProcessConfig
from pdserve.runtime.exit_status import describe_exit
from pdserve.runtime.protocol import is_last_event


class EngineProcessError(RuntimeError):
    """The engine process failed to start, died, or answered an op with an error."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class EngineProcess:
    def __init__(
        self,
        config: EngineProcessConfig,
        env: dict[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        """``command_prefix`` wraps the child's command line, e.g. ``("ip", "netns", "exec", "a")``
        to run it in a network namespace, or ``("taskset", "-c", "0")`` to pin it."""
        self.config = config
        self._env = env
        self._command_prefix = list(command_prefix)
        self._process: subprocess.Popen[str] | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: defaultdict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.control_address = ""
        self.kv_address = ""
        self.pid = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> EngineProcess:
        """Spawn the process and wait until it is ready."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> EngineProcess:
        """Spawn the process without waiting (start several, then :meth:`wait_ready` each)."""
        env = dict(os.environ if self._env is None else self._env)
        self._process = subprocess.Popen(
            [*self._command_prefix, sys.executable, "-m", "pdserve.runtime.engine_process",
             "--config", self.config.to_json()],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        return self

    def wait_ready(self, timeout: float = 180.0) -> EngineProcess:
        assert self._process is not None and self._process.stdout is not None, "launch() first"
        ready = _read_ready_line(self._process, self._process.stdout, timeout)
        self.control_address, self.kv_address, self.pid = ready["control"], ready["kv_address"], ready["pid"]
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.control_address)
        return self

    def __enter__(self) -> EngineProcess:
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """Ask the process to shut down; kill it if it does not within ``timeout``."""
        process = self._process
        if process is not None and process.poll() is None and self._socket is not None:
            with contextlib.suppress(EngineProcessError):
                self.call({"op": "shutdown"}, timeout=min(timeout, 5.0))
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._close_socket()
        if process is not None and process.stdout is not None:
            process.stdout.close()
        return None if process is None else process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests); the process gets no chance to clean up."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait(10)
        self._close_socket()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()

    # -- ops -------------------------------------------------------------------------------

    def send(self, op: dict[str, Any]) -> int:
        if self._socket is None:
            raise EngineProcessError("the engine process is not running")
        op_id = next(self._ids)
        self._socket.send(json.dumps({**op, "id": op_id}).encode())
        return op_id

    def call(self, op: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send an op and wait for its reply; raises EngineProcessError (with the status) on error."""
        op_id = self.send(op)
        deadline = time.monotonic() + timeout
        while op_id not in self._replies:
            self._receive(deadline, f"the reply to {op.get('op')}")
        reply = self._replies.pop(op_id)
        if not reply.get("ok"):
            raise EngineProcessError(str(reply.get("error")), int(reply.get("status", 500)))
        return dict(reply.get("result") or {})

    def generate(
        self, request_id: str, prompt: str | list[int], params: dict[str, Any] | None = None,
        kv: dict[str, Any] | None = None, timeout: float = 30.0,
    ) -> None:
        """Submit a request (its events follow: :meth:`next_event`, :meth:`wait_finished`)."""
        self.call(
            {"op": "generate", "request_id": request_id, "prompt": prompt, "params": params or {}, "kv": kv},
            timeout,
        )

    def next_event(self, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        queue = self._events[request_id]
        while not queue:
            self._receive(deadline, f"an event of {request_id}")
        return queue.popleft()

    def wait_finished(self, request_id: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Every event of a request up to its last (a finished output, ``prefilled``, or a
        ``kv_failed`` with fallback ``fail``)."""
        deadline = time.monotonic() + timeout
        events = []
        while True:
            event = self.next_event(request_id, max(0.0, deadline - time.monotonic()))
            events.append(event)
            if is_last_event(event):
                self._events.pop(request_id, None)
                return events

    def debug(self) -> dict[str, Any]:
        return self.call({"op": "debug"})

    def abort(self, request_id: str) -> bool:
        return bool(self.call({"op": "abort", "request_id": request_id})["aborted"])

    # -- internals -------------------------------------------------------------------------

    def _receive(self, deadline: float, what: str) -> None:
        assert self._socket is not None
        left = deadline - time.monotonic()
        if left <= 0 or not self._socket.poll(int(min(left, 0.5) * 1000)):
            if not self.is_alive():
                assert self._process is not None
                how = describe_exit(self._process.returncode)
                raise EngineProcessError(f"the engine process died ({how}) while waiting for {what}")
            if time.monotonic() >= deadline:
                raise EngineProcessError(f"timed out waiting for {what}", status=504)
            return
        message = json.loads(self._socket.recv())
        if message.get("event") == "reply":
            self._replies[int(message["id"])] = message
        else:
            self._events[str(message["request_id"])].append(message)

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None


def _read_ready_line(process: subprocess.Popen[str], stdout: IO[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            process.kill()
            raise EngineProcessError(f"the engine process was not ready within {timeout:.0f} s")
        readable, _, _ = select.select([stdout], [], [], min(left, 1.0))
        if readable:
            line = stdout.readline()
            if line.startswith(READY_PREFIX):
                return dict(json.loads(line[len(READY_PREFIX) :]))
            if line == "" and process.poll() is not None:
                raise EngineProcessError(
                    f"the engine process ended ({describe_exit(process.returncode)}) before it was ready"
                )
        elif process.poll() is not None:
            raise EngineProcessError(
                f"the engine process ended ({describe_exit(process.returncode)}) before it was ready"
            )
