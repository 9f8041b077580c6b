"""An :class:`LLMEngine` on a thread of its own, driven by calls from other threads.

The engine is not thread-safe, so everything that touches it — adding and aborting requests,
reserving and committing imported KV, releasing held KV — runs on the loop's thread, between
steps, through :meth:`EngineLoop.call`. The only work done off that thread is copying KV bytes
into reserved blocks or out of held ones, which no step touches.

The engine is also *built* on the loop's thread (``build``). On CPU every thread that runs a
parallel torch op gets an OpenMP team of its own, and once a process holds more OpenMP threads
than it has cores, libgomp stops spin-waiting between parallel regions: every parallel op then
pays for waking its team. Loading the model on the main thread and stepping on this one made a
two-thread engine's prefill steps 1.2-1.5x and its decode steps 1.4-2.4x slower than the same
engine stepped where it was loaded (``benchmarks/engine_thread_ab.py``; one-thread engines run no
parallel regions and are unaffected). One thread for all of the engine's compute keeps one team.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import RequestError, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLoop:
    def __init__(self, build: Callable[[], LLMEngine], on_output: Callable[[RequestOutput], None]) -> None:
        self._build = build
        self._engine: LLMEngine | None = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._on_output = on_output
        self._calls: deque[tuple[Callable[[LLMEngine], object], Future[object]]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._busy_since: float | None = None
        """When the loop began its current work (calls and a step), None while it waits."""
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> LLMEngine:
        """Start the loop's thread and build the engine on it; returns the engine once built
        (or raises what building it raised)."""
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error
        return self.engine

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("the engine loop has not built its engine (start it first)")
        return self._engine

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the loop thread before the next step; its result or exception
        lands in the returned future."""
        future: Future[T] = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(RuntimeError("the engine loop is stopped"))
                return future
            self._calls.append((fn, future))  # type: ignore[arg-type]
            self._wake.notify()
        return future

    def busy_seconds(self) -> float:
        """How long the loop has been inside its current round of calls and step (0 while it
        waits for work): a loop stuck far longer than any step takes is wedged."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._engine = self._build()
        except BaseException as error:  # start() re-raises it in the caller's thread
            self._build_error = error
            return
        finally:
            self._built.set()
        while True:
            with self._wake:
                while not self._stopping and not self._calls and not engine.has_work():
                    self._wake.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
                self._busy_since = time.monotonic()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(engine))
                    except BaseException as error:  # the caller gets it; the loop goes on
                        future.set_exception(error)
            # What the calls produced (a committed import's first token, an abort) goes out now,
            # not after the next step: in a decode worker under load that step is the longest
            # part of a hand-off's time to first token.
            for output in engine.take_pending_outputs():
                self._deliver(output)
            if engine.has_work():
                try:
                    outputs = engine.step()
                except Exception as error:
                    # Nothing pins it on one request: every request in flight ends, each with
                    # an explicit error to its client (never a normal finish).
                    log.exception("engine step failed; failing every request in flight")
                    outputs = self._fail_all(RequestError(f"engine step failed: {type(error).__name__}: {error}"))
                for output in outputs:
                    self._deliver(output)
            self._busy_since = None
        self._fail_pending_calls()

    def _deliver(self, output: RequestOutput) -> None:
        try:
            self._on_output(output)
        except Exception:
            log.exception("output callback failed for %s", output.request_id)

    def _fail_all(self, error: RequestError) -> list[RequestOutput]:
        engine = self.engine
        for request_id in list(engine.request_ids()):
            engine.fail(request_id, error)
        return engine.take_pending_outputs()

    def _fail_pending_calls(self) -> None:
        with self._wake:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the engine loop stopped"))
