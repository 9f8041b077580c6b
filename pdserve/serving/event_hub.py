"""Carries an EngineService's events from its threads to the asyncio tasks streaming them.

The service emits every event into one thread-safe queue (and pokes a pipe); one hub thread
drains it and hands each event to the subscriber of its request, on that subscriber's event
loop. Events of a request nobody subscribes to are dropped (the request was abandoned).
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import threading
from typing import Any

from pdserve.runtime.engine_service import EngineService


class EventHub:
    def __init__(self, service: EngineService) -> None:
        self._service = service
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def subscribe(self, request_id: str) -> asyncio.Queue[dict[str, Any]]:
        """Call from the event loop that will read the queue, before submitting the request."""
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
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
                    loop.call_soon_threadsafe(events.put_nowait, event)
