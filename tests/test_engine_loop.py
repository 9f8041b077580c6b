"""EngineLoop builds its engine on its own thread and runs every engine call there.

Why it matters (engine_loop.py): a second OpenMP team in the process made a two-thread worker's
steps 1.2-2.4x slower (benchmarks/results/engine_thread_ab.json). Timing is for benchmarks;
these tests pin the structure that avoids it, with the real model.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
from fixtures_model import make_float32_llm

from pdserve.engine.config import CacheConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import Checkpoint
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.runtime.engine_loop import EngineLoop
from pdserve.runtime.engine_service import EngineService
from pdserve.transfer.config import TransferConfig


class _Recorder:
    """A build function that records the thread it ran on, and an output callback likewise."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.build_thread: int | None = None
        self.output_threads: set[int] = set()
        self.finished = threading.Event()

    def build(self) -> LLMEngine:
        self.build_thread = threading.get_ident()
        return make_float32_llm(self.checkpoint, CacheConfig(num_blocks=16)).engine

    def on_output(self, output: RequestOutput) -> None:
        self.output_threads.add(threading.get_ident())
        if output.finished:
            self.finished.set()


def test_the_engine_is_built_stepped_and_called_on_the_loop_thread(checkpoint: Checkpoint) -> None:
    recorder = _Recorder(checkpoint)
    loop = EngineLoop(recorder.build, recorder.on_output)
    engine = loop.start()
    try:
        assert recorder.build_thread is not None and recorder.build_thread != threading.get_ident()
        assert loop.engine is engine
        assert loop.call(lambda _: threading.get_ident()).result(30) == recorder.build_thread
        loop.call(lambda e: e.add_request([1, 2, 3, 4], SamplingParams(max_tokens=3), "r")).result(30)
        assert recorder.finished.wait(60)
        assert recorder.output_threads == {recorder.build_thread}, "steps ran on another thread than the build"
    finally:
        loop.stop()
        engine.close()


def test_a_failed_build_is_raised_by_start_and_leaves_no_thread() -> None:
    def build() -> LLMEngine:
        raise FileNotFoundError("no such model file: /nowhere.gguf")

    loop = EngineLoop(build, lambda _: None)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        loop.start()
    assert not any(t.name == "engine-loop" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="has not built its engine"):
        _ = loop.engine
    loop.stop()  # harmless after a failed start


def test_the_service_builds_its_engine_on_the_loop_thread(checkpoint: Checkpoint) -> None:
    """Workers and engine processes hand EngineService a build function, never an engine."""
    recorder = _Recorder(checkpoint)
    service = EngineService(recorder.build, TransferConfig())
    try:
        assert service.loop.call(lambda _: threading.get_ident()).result(30) == recorder.build_thread
        assert service.engine is service.loop.engine
    finally:
        service.close()


def _open_pipes() -> int:
    fd_dir = "/proc/self/fd"
    count = 0
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor)
            count += os.readlink(os.path.join(fd_dir, name)).startswith("pipe:")
    return count


def test_a_service_whose_engine_cannot_be_built_raises_and_leaves_no_pipe() -> None:
    """A worker given a bad model file fails with the loader's error, not a hang or a leak."""

    def build() -> LLMEngine:
        raise FileNotFoundError("no such model file: /nowhere.gguf")

    before = _open_pipes()
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        EngineService(build, TransferConfig())
    assert _open_pipes() == before


def test_a_stuck_engine_loop_turns_the_worker_unhealthy(checkpoint: Checkpoint) -> None:
    """A loop held inside one round of work past ``wedged_after`` makes /health a 503 (the router
    then stops routing there); once it moves again, /health is 200 again."""
    from fastapi.testclient import TestClient

    from pdserve.serving.worker_app import create_worker_app

    recorder = _Recorder(checkpoint)
    service = EngineService(recorder.build, TransferConfig())
    release = threading.Event()
    try:
        app = create_worker_app(service, "both", wedged_after=0.3)
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            stuck = service.loop.call(lambda _: release.wait(30))
            deadline = time.monotonic() + 10
            while service.loop.busy_seconds() <= 0.3:
                assert time.monotonic() < deadline and not stuck.done()
                time.sleep(0.05)
            response = client.get("/health")
            assert response.status_code == 503 and "stuck" in response.json()["error"]["message"]
            release.set()
            assert stuck.result(30) is True
            while service.loop.busy_seconds() > 0:  # the round ends just after the call returns
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert client.get("/health").status_code == 200
    finally:
        release.set()
        service.close()
