"""Carries an EngineService's events from its threads to the asyncio tasks streaming them.

The service emits every event into one thread-safe queue (and pokes a pipe); one hub thread
drains it and hands each event to the subscriber of its request, on that subscriber's event
loop. Events of a request nobody subscribes to are dropped (the request was abandoned).

Each subscriber's mailbox is bounded by construction: an ``output`` event carries the request's
whole output so far, so a newer one replaces an unread older one. A reader slower than the
engine gets fewer, larger events, never a queue that grows with the output.
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import threading
from collections import deque
from typing import Any

from pdserve.runtime.engine_service import EngineService


class Mailbox:
    """One request's pending events, read by one asyncio task; written on its event loop."""

    def __init__(self) -> None:
        self._pending: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()

    def put(self, event: dict[str, Any]) -> None:
        pending = self._pending
        if event.get("event") == "output" and pending and pending[-1].get("event") == "output":
            pending[-1] = event  # cumulative: the newer output holds everything the older one did
        else:
            pending.append(event)
        self._ready.set()

    async def get(self) -> dict[str, Any]:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()

    def __len__(self) -> int:
        return len(self._pending)


class EventHub:
    def __init__(self, service: EngineService) -> None:
        self._service = service
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, Mailbox]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def subscribe(self, request_id: str) -> Mailbox:
        """Call from the event loop that will read the mailbox, before submitting the request."""
        events = Mailbox()
        with self._lock:
            if request_id in self._subscribers:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._subscribers[request_id] = (asyncio.get_running_loop(), events)
        return events

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._subscribers.pop(request_id, None)

    def _run(self) -> None:
        wake = self._service.wake_fd
        while not self._stop.is_set():
            readable, _, _ = select.select([wake], [], [], 0.2)
            if readable:
                try:
                    os.read(wake, 4096)
                except OSError:
                    return
            while True:
                try:
                    _, event = self._service.events.get_nowait()
                except queue.Empty:
                    break
                with self._lock:
                    subscriber = self._subscribers.get(str(event.get("request_id")))
                if subscriber is not None:
                    loop, events = subscriber
                    loop.call_soon_threadsafe(events.put, event)
