"""An engine process's service without the process: for tests and benchmarks.

``InProcessWorker`` runs the very ``EngineService`` an engine process runs (engine loop thread,
KV connector with its server threads) and reads its event queue directly instead of over
ZeroMQ, so several workers can share one loaded checkpoint.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import Checkpoint
from pdserve.runtime.engine_service import EngineService
from pdserve.runtime.protocol import is_last_event
from pdserve.transfer.config import TransferConfig


class InProcessWorker:
    def __init__(
        self,
        checkpoint: Checkpoint,
        transfer: TransferConfig,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        dtype: str = "float32",
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(dtype=dtype),
            cache=cache or CacheConfig(memory_bytes=128 << 20),
            scheduler=scheduler or SchedulerConfig(),
            show_progress=False,
        )
        self.service = EngineService(lambda: LLMEngine(config, checkpoint), transfer)
        self.engine = self.service.engine
        self.kv_address = self.service.start()
        self._events: defaultdict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def generate(
        self, request_id: str, prompt: str | list[int], params: dict[str, Any] | None = None,
        kv: dict[str, Any] | None = None,
    ) -> None:
        self.service.handle(
            b"test", {"op": "generate", "request_id": request_id, "prompt": prompt, "params": params or {}, "kv": kv}
        )

    def abort(self, request_id: str) -> bool:
        reply = self.service.handle(b"test", {"op": "abort", "request_id": request_id}) or {}
        return bool(reply["aborted"])

    def next_event(self, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._events[request_id]:
                    event = self._events[request_id].popleft()
                    event["received_at"] = time.monotonic()
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no event for {request_id} within {timeout} s")
            try:
                _, event = self.service.events.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            event["received_at"] = time.monotonic()
            with self._lock:
                self._events[str(event["request_id"])].append(event)

    def wait_finished(self, request_id: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        events = []
        while True:
            event = self.next_event(request_id, max(0.01, deadline - time.monotonic()))
            events.append(event)
            if is_last_event(event):
                return events

    def debug(self) -> dict[str, Any]:
        return self.service.handle(b"test", {"op": "debug"}) or {}

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """The debug state once nothing is held, reserved, offered or pulled any more."""
        return wait_until_idle(self.debug, timeout)

    def close(self) -> None:
        self.service.close()


def wait_until_idle(debug: Callable[[], dict[str, Any]], timeout: float = 10.0) -> dict[str, Any]:
    """Poll a worker's debug state until it is idle or ``timeout`` passed; returns the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = debug()
        if is_idle(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def is_idle(state: dict[str, Any]) -> bool:
    """Nothing held, reserved, offered, pulled or running, and every block free (a debug state)."""
    return (
        state["num_free_blocks"] == state["num_blocks"]
        and state["num_held_kv"] == 0
        and state["num_reserved_kv"] == 0
        and state["num_offers"] == 0
        and state["num_pulls"] == 0
        and state["num_running"] == 0
        and state["num_waiting"] == 0
        and state["num_tracked_requests"] == 0
    )


def token_ids(events: list[dict[str, Any]]) -> list[int]:
    """The first choice's tokens from a request's final output event."""
    last = events[-1]
    assert last["event"] == "output" and last["finished"], last
    return list(last["outputs"][0]["token_ids"])


def failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "kv_failed"]
