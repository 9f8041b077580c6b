"""The router's worker choice (pure logic over the workers' last reported health and load)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.block_manager import hash_full_blocks
from pdserve.serving.errors import APIError
from pdserve.serving.kv_ledger import KVLedger
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


def test_least_loaded_prefill_goes_by_queued_prompt_tokens() -> None:
    workers = pool("least_loaded")
    p0, p1 = workers.workers[:2]
    p0.load = {"num_waiting": 1, "num_queued_prompt_tokens": 3000}
    p1.load = {"num_waiting": 4, "num_queued_prompt_tokens": 200}
    assert workers.pick("prefill", num_tokens=1000) is p1  # fewer tokens queued, though more requests
    assert workers.pick("prefill", num_tokens=1000) is p1  # 1,200 < 3,000
    assert workers.pick("prefill", num_tokens=1000) is p1  # 2,200 < 3,000
    assert workers.pick("prefill", num_tokens=1000) is p0  # 3,200 > 3,000


def test_fallback_roles_and_unknown_policy() -> None:
    workers = pool("round_robin")
    for worker in workers.workers[2:]:
        worker.healthy = False
    assert workers.pick("decode") is None
    assert workers.pick("decode", "prefill") is not None
    with pytest.raises(ValueError, match="least_loaded"):
        WorkerPool(["http://p"], [], [], "random")
    with pytest.raises(ValueError, match="unknown role"):
        WorkerPool().add("http://x", "leader")


def test_workers_register_and_deregister_at_run_time() -> None:
    workers = WorkerPool()
    assert workers.pick("decode") is None
    added = workers.add("http://d9/", "decode")
    assert added.url == "http://d9" and workers.pick("decode") is None, "unused until a health check passes"
    added.healthy = True
    assert workers.pick("decode") is added
    with pytest.raises(ValueError, match="already registered"):
        workers.add("http://d9", "decode")
    with pytest.raises(ValueError, match="http://"):
        workers.add("d8:80", "decode")
    workers.prefix.record("http://d9", [b"h"])
    assert workers.remove("http://d9") is added and workers.pick("decode") is None
    assert len(workers.prefix) == 0
    with pytest.raises(KeyError):
        workers.remove("http://d9")


def test_prefix_aware_sends_a_prompt_where_its_prefix_is_cached_unless_that_worker_is_swamped() -> None:
    workers = pool("prefix_aware")
    p0, p1 = workers.workers[:2]
    system = list(range(64))
    first = hash_full_blocks(system + [1, 2, 3] * 16, 16)
    second = hash_full_blocks(system + [7, 8] * 24, 16)
    assert first[:4] == second[:4] and first[4] != second[4]
    workers.prefix.record(p1.url, first)
    assert workers.pick("prefill", prefix=second) is p1  # 4 shared blocks
    p0.load, p1.load = {"num_waiting": 0}, {"num_waiting": 10}
    assert workers.pick("prefill", prefix=second) is p0  # too busy: least loaded wins
    unknown = hash_full_blocks([5] * 64, 16)
    p1.load = {"num_waiting": 0}
    assert workers.pick("prefill", prefix=unknown) in (p0, p1)
    workers.eject(p1)
    assert workers.prefix.matched_blocks(p1.url, first) == 0


def test_a_worker_with_an_open_circuit_breaker_is_skipped() -> None:
    workers = pool("round_robin")
    p0, p1 = workers.workers[:2]
    for _ in range(p0.breaker.threshold):
        p0.breaker.record_failure()
    assert {workers.pick("prefill").url for _ in range(4)} == {p1.url}  # type: ignore[union-attr]
    assert workers.available("prefill")
    for _ in range(p1.breaker.threshold):
        p1.breaker.record_failure()
    assert workers.pick("prefill") is None and not workers.available("prefill")


def test_the_kv_ledger_reserves_prompt_plus_max_tokens_and_waits_for_room() -> None:
    async def scenario() -> None:
        workers = pool("round_robin")
        for worker in workers.workers[2:]:
            worker.load = {"num_blocks": 10, "block_size": 16}
        ledger = KVLedger()

        def choose(fits):  # type: ignore[no-untyped-def]
            return workers.pick("decode", fits=fits)

        def available() -> bool:
            return workers.available("decode")

        taken = [await ledger.reserve(choose, available, 150, timeout=1) for _ in range(3)]  # 10 blocks each
        assert sorted(ledger.reserved.values()) == [10, 10, 10] and all(blocks == 10 for _, blocks in taken)
        with pytest.raises(APIError) as full:
            await ledger.reserve(choose, available, 1, timeout=0.2)
        assert full.value.status == 503 and full.value.retry_after
        waiter = asyncio.create_task(ledger.reserve(choose, available, 20, timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await ledger.release(taken[1][0].url, 10)
        worker, blocks = await asyncio.wait_for(waiter, 1)
        assert worker is taken[1][0] and blocks == 2
        huge = KVLedger()
        assert huge.blocks_for(worker, 10_000) == 10, "capped at capacity: runs alone rather than never"
        for w in workers.workers[2:]:
            w.healthy = False
        with pytest.raises(APIError, match="no worker is available"):
            await ledger.reserve(choose, available, 1, timeout=5)

    asyncio.run(scenario())


def test_roles_are_a_preference_not_a_wall() -> None:
    workers = pool("round_robin")
    assert workers.decoding_roles() == ("decode", "both") and workers.prefilling_roles() == ("prefill", "both")
    for worker in workers.workers[2:]:
        worker.healthy = False  # every decode worker down: the prefill workers decode
    assert workers.decoding_roles() == ("prefill",)
    assert workers.pick(*workers.decoding_roles()).role == "prefill"  # type: ignore[union-attr]
    assert workers.max_sequence_tokens() is None  # no load reported yet, by any of them
    workers.workers[2].healthy = True
    assert workers.decoding_roles() == ("decode", "both")
    for worker in workers.workers[:2]:
        worker.breaker.threshold = 1
        worker.breaker.record_failure()  # every prefill worker's breaker open: the decode workers prefill
    assert workers.prefilling_roles() == ("decode",)
