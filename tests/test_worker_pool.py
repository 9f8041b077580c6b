"""The router's worker choice (pure logic over the workers' last reported health and load)."""

from __future__ import annotations

import pytest

from pdserve.serving.worker_pool import WorkerPool


def pool(policy: str) -> WorkerPool:
    workers = WorkerPool(["http://p0", "http://p1"], ["http://d0", "http://d1", "http://d2"], [], policy)
    for worker in workers.workers:
        worker.healthy = True
    return workers


def test_round_robin_takes_turns_and_skips_unhealthy_workers() -> None:
    workers = pool("round_robin")
    assert [workers.pick("decode").url for _ in range(3)] == ["http://d0", "http://d1", "http://d2"]  # type: ignore[union-attr]
    workers.workers[3].healthy = False  # d1
    assert {workers.pick("decode").url for _ in range(4)} == {"http://d0", "http://d2"}  # type: ignore[union-attr]


def test_least_loaded_prefers_idle_workers_and_counts_its_own_sends() -> None:
    workers = pool("least_loaded")
    d0, d1, d2 = workers.workers[2:]
    d0.load = {"num_running": 5, "num_waiting": 0, "num_free_blocks": 10}
    d1.load = {"num_running": 1, "num_waiting": 0, "num_free_blocks": 10}
    d2.load = {"num_running": 1, "num_waiting": 0, "num_free_blocks": 50}
    assert workers.pick("decode") is d2  # equal requests: more free KV wins
    assert workers.pick("decode") is d1  # d2 now has the request just sent
    assert workers.pick("decode") in (d1, d2)
    assert workers.pick_other("decode", exclude={d1.url, d2.url}) is d0


def test_fallback_roles_and_unknown_policy() -> None:
    workers = pool("round_robin")
    for worker in workers.workers[2:]:
        worker.healthy = False
    assert workers.pick("decode") is None
    assert workers.pick("decode", "prefill") is not None
    with pytest.raises(ValueError, match="least_loaded"):
        WorkerPool(["http://p"], [], [], "random")
    with pytest.raises(ValueError, match="at least one worker"):
        WorkerPool([], [], [])
