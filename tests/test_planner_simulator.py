"""The planner's discrete-event simulator, on cases small enough to work out by hand.

Times are sums of binary fractions wherever two events must coincide exactly, so float
rounding cannot reorder them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pdserve.engine.config import SchedulerConfig
from pdserve.planner.sim.config import ClusterSpec, InstanceSpec, LinkSpec
from pdserve.planner.sim.instance import SimInstance
from pdserve.planner.sim.requests import SimRequest, load_trace, poisson_requests
from pdserve.planner.sim.simulator import Simulator, simulate
from pdserve.traffic.arrivals import arrival_times
from pdserve.traffic.stats import SLO
from pdserve.traffic.workloads import PRESETS, LengthRange, Preset


@dataclass
class LinearCost:
    """step = overhead + per prompt token + a flat cost when the step decodes anything."""

    per_prefill_token: float = 0.0
    per_step: float = 0.0
    decode_step: float = 0.0
    kv_bytes: int = 0
    calls: list[tuple[list[tuple[int, int]], list[int]]] = field(default_factory=list)

    def step_seconds(self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        self.calls.append((list(prefill_chunks), list(decode_contexts)))
        prefill = self.per_prefill_token * sum(tokens for tokens, _ in prefill_chunks)
        return self.per_step + prefill + (self.decode_step if decode_contexts else 0.0)

    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes


def instance(cost: LinearCost, num_blocks: int = 1024, block_size: int = 16, **scheduler: int) -> InstanceSpec:
    return InstanceSpec(cost, num_blocks=num_blocks, block_size=block_size, scheduler=SchedulerConfig(**scheduler))


def colocated(*specs: InstanceSpec) -> ClusterSpec:
    return ClusterSpec(colocated=specs)


# -- no contention: the latencies are the sums of their parts ---------------------------------


def test_one_disaggregated_request_costs_prefill_plus_transfer_plus_decode_steps() -> None:
    prefill_cost = LinearCost(per_prefill_token=0.001, kv_bytes=1000)
    decode_cost = LinearCost(decode_step=0.02)
    cluster = ClusterSpec(
        prefill=(instance(prefill_cost),), decode=(instance(decode_cost),),
        link=LinkSpec(bandwidth_bytes_per_s=1e6, latency_s=0.01), router_overhead_s=0.005,
    )
    result = simulate(cluster, [(1.0, 100, 10)])

    prefill, transfer, decode = 0.1, 100 * 1000 / 1e6 + 0.01, 0.02
    record = result.records[0]
    assert record.ok and record.output_tokens == 10
    assert record.ttft == pytest.approx(0.005 + prefill)
    assert record.e2e == pytest.approx(0.005 + prefill + transfer + 9 * decode)
    assert record.tpot == pytest.approx((transfer + 9 * decode) / 9)
    assert record.inter_token_latencies() == pytest.approx([transfer + decode] + [decode] * 8)
    assert result.duration == pytest.approx(record.e2e)
    # The prefill computed the whole prompt in one step; decode steps saw the context grow.
    assert prefill_cost.calls == [([(100, 0)], [])]
    assert decode_cost.calls == [([], [context]) for context in range(101, 110)]
    assert result.pools["prefill"].utilization == pytest.approx(prefill / result.duration)
    assert result.pools["decode"].utilization == pytest.approx(9 * decode / result.duration)
    assert result.pools["decode"].max_queue_length == 0


def test_first_token_after_transfer_moves_ttft_not_e2e() -> None:
    def run(after_transfer: bool) -> tuple[float, float]:
        cluster = ClusterSpec(
            prefill=(instance(LinearCost(per_prefill_token=0.001, kv_bytes=1000)),),
            decode=(instance(LinearCost(decode_step=0.02)),),
            link=LinkSpec(1e6, latency_s=0.01), first_token_after_transfer=after_transfer,
        )
        record = simulate(cluster, [(0.0, 100, 4)]).records[0]
        assert record.ttft is not None and record.e2e is not None
        return record.ttft, record.e2e

    assert run(False) == pytest.approx((0.1, 0.1 + 0.11 + 3 * 0.02))
    assert run(True) == pytest.approx((0.1 + 0.11, 0.1 + 0.11 + 3 * 0.02))


def test_a_busy_decode_instance_takes_kv_in_only_between_its_steps() -> None:
    """pdserve's decode worker reserves and adopts imports on its engine thread, between steps.

    A (16 tokens at t=0): prefill 0-0.125, transfer to 0.15625, decode steps of 0.25 from there.
    B (16 tokens at t=0.25): prefill ends at 0.375, in the middle of A's step 0.15625-0.40625...
    """
    def b_first_token(at_boundaries: bool) -> float:
        cluster = ClusterSpec(
            prefill=(instance(LinearCost(per_prefill_token=0.0078125)),),
            decode=(instance(LinearCost(decode_step=0.25)),),
            link=LinkSpec(1e9, latency_s=0.03125), first_token_after_transfer=True,
            imports_at_step_boundaries=at_boundaries,
        )
        a, b = simulate(cluster, [(0.0, 16, 20), (0.25, 16, 4)]).records
        assert a.first_token == pytest.approx(0.15625)
        assert b.first_token is not None
        return b.first_token

    # ...so by default B's transfer starts at once and its KV is adopted when it lands.
    assert b_first_token(False) == pytest.approx(0.375 + 0.03125)
    # Between steps only: reserved when A's step ends (0.40625), landed at 0.4375 in the middle
    # of the next step, adopted (and its first token out) when that one ends at 0.65625.
    assert b_first_token(True) == pytest.approx(0.65625)


def test_a_long_prompt_is_chunked_by_the_engine_token_budget() -> None:
    cost = LinearCost(per_prefill_token=0.001, per_step=0.01)
    result = simulate(colocated(instance(cost, max_num_batched_tokens=32)), [(0.0, 100, 1)])
    assert [chunks for chunks, _ in cost.calls] == [[(32, 0)], [(32, 32)], [(32, 64)], [(4, 96)]]
    assert result.records[0].ttft == pytest.approx(4 * 0.01 + 0.1)
    assert result.records[0].e2e == result.records[0].ttft


def test_one_token_prompt_chunks_are_prefill_not_decode() -> None:
    cost = LinearCost(per_prefill_token=0.001, decode_step=0.01)
    simulate(colocated(instance(cost, max_num_batched_tokens=32)), [(0.0, 33, 2), (1.0, 1, 1)])
    assert cost.calls == [([(32, 0)], []), ([(1, 32)], []), ([], [34]), ([(1, 0)], [])]


# -- colocated batching -----------------------------------------------------------------------


def test_simultaneous_requests_prefill_together_and_decode_in_one_batch() -> None:
    cost = LinearCost(per_prefill_token=1 / 1024, decode_step=1 / 64)
    result = simulate(colocated(instance(cost)), [(0.0, 64, 5), (0.0, 64, 5)])
    prefill = 128 / 1024
    for record in result.records:
        assert record.ttft == prefill
        assert record.e2e == prefill + 4 / 64  # four batched decode steps, not eight
    assert cost.calls[0] == ([(64, 0), (64, 0)], [])
    assert cost.calls[1:] == [([], [c, c]) for c in range(65, 69)]


def test_a_prompt_arriving_mid_stream_joins_the_running_decodes_in_one_step() -> None:
    cost = LinearCost(per_prefill_token=1 / 1024, decode_step=1 / 64)
    # A's fourth token ends its step at 4/64 + 3/64; B arrives at that instant.
    result = simulate(colocated(instance(cost)), [(0.0, 64, 5), (7 / 64, 64, 2)])
    a, b = result.records
    assert cost.calls[4] == ([(64, 0)], [68])  # A's last decode and B's prompt, one step
    assert a.e2e == 12 / 64 and a.chunk_times[-2:] == [7 / 64, 12 / 64]
    assert b.ttft == 5 / 64 and b.e2e == 6 / 64


def test_queue_length_and_utilization_with_one_sequence_at_a_time() -> None:
    cost = LinearCost(per_prefill_token=1 / 64)
    result = simulate(colocated(instance(cost, max_num_seqs=1)), [(0.0, 64, 1), (0.0, 64, 1)])
    assert [r.e2e for r in result.records] == [1.0, 2.0]
    pool = result.pools["colocated"]
    # B waits through A's whole service: one queued request for half the run.
    assert pool.max_queue_length == 1 and pool.mean_queue_length == pytest.approx(0.5)
    assert pool.utilization == pytest.approx(1.0) and pool.num_steps == 2


# -- queueing theory --------------------------------------------------------------------------


def test_single_server_waiting_time_matches_pollaczek_khinchine() -> None:
    """M/D/1: Poisson arrivals, one request at a time, a fixed service time S = 1/mu.

    Each wait follows Lindley's recursion exactly, and their mean must match the
    Pollaczek-Khinchine mean Wq = rho / (2 mu (1 - rho)) within sampling error. Waits of
    successive requests are correlated, so the error comes from batch means: 20 batches of 600
    requests, each far longer than a busy period (mean S / (1 - rho) = 2 S), are close to
    independent. Over seeds, 12,000 requests give a standard error of 2.5-5 % of Wq.
    """
    service, rate, count = 1.0, 0.5, 12_000
    cost = LinearCost(per_prefill_token=0.8 / 100, decode_step=0.2)  # 0.8 s prompt + 1 decode
    arrivals = arrival_times(rate, count, seed=7)
    result = simulate(colocated(instance(cost, max_num_seqs=1)), [(t, 100, 2) for t in arrivals])
    waits = [r.e2e - service for r in result.records if r.e2e is not None]

    lindley, free = [], 0.0
    for arrival in arrivals:
        lindley.append(max(free - arrival, 0.0))
        free = arrival + lindley[-1] + service
    assert waits == pytest.approx(lindley, abs=1e-6)

    rho = rate * service
    expected = rho / (2 * (1 / service) * (1 - rho))
    batch_means = [statistics.fmean(waits[i : i + 600]) for i in range(0, count, 600)]
    standard_error = statistics.stdev(batch_means) / math.sqrt(len(batch_means))
    assert standard_error < 0.1 * expected  # the sample is big enough to mean something
    assert abs(statistics.fmean(waits) - expected) < 4 * standard_error
    assert result.pools["colocated"].utilization == pytest.approx(rho, rel=0.05)


# -- memory pressure --------------------------------------------------------------------------


def test_block_exhaustion_preempts_and_every_block_comes_back() -> None:
    cost = LinearCost(per_prefill_token=0.001, decode_step=0.01)
    # 12 blocks of 4 tokens; each request grows to 32 tokens (8 blocks): three cannot coexist.
    simulator = Simulator(colocated(instance(cost, num_blocks=12, block_size=4)))
    result = simulator.run([(0.0, 16, 16)] * 3)
    assert all(r.ok and r.output_tokens == 16 for r in result.records)
    assert result.pools["colocated"].num_preemptions > 0
    assert result.pools["colocated"].max_queue_length >= 1
    # A preempted sequence is recomputed: more prefill work than the three prompts.
    assert sum(tokens for chunks, _ in cost.calls for tokens, _ in chunks) > 3 * 16
    (engine,) = simulator.pools["colocated"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.scheduler.num_unfinished == 0


def test_queued_prompt_tokens_stay_exact_through_admission_and_preemption() -> None:
    engine = SimInstance("x", "colocated", instance(LinearCost(per_prefill_token=0.001, decode_step=0.01),
                                                    num_blocks=12, block_size=4, max_num_batched_tokens=8))

    def brute_force() -> int:
        sequences = (*engine.scheduler.waiting, *engine.scheduler.running)
        return sum(max(s.num_prompt_tokens - s.num_computed_tokens, 0) for s in sequences)

    for index in range(3):
        engine.add_prompt(f"r{index}", 16, 16, now=0.0, prefill_only=False)
    num_steps = 0
    while engine.scheduler.num_unfinished:
        assert engine.start_step() is not None
        assert engine.queued_prompt_tokens() == brute_force()
        engine.end_step()
        num_steps += 1
    assert engine.scheduler.num_preemptions > 0 and engine.queued_prompt_tokens() == 0
    assert num_steps < 200


def test_decode_without_room_makes_transfers_wait_and_the_prefill_holds_its_kv() -> None:
    prefill_cost = LinearCost(per_prefill_token=0.001, kv_bytes=100)
    decode_cost = LinearCost(decode_step=0.01)
    # 10 decode blocks of 4 tokens: two 16-token prompts fit, the third waits for room.
    simulator = Simulator(ClusterSpec(
        prefill=(instance(prefill_cost, num_blocks=64, block_size=4),),
        decode=(instance(decode_cost, num_blocks=10, block_size=4),),
        link=LinkSpec(1e6),
    ))
    result = simulator.run([(0.0, 16, 8)] * 3)
    assert all(r.ok and r.output_tokens == 8 for r in result.records)
    assert result.pools["decode"].max_queue_length >= 1
    first, _, third = result.records
    assert third.chunk_times[1] > first.chunk_times[1]  # third's KV arrived later
    (prefill,) = simulator.pools["prefill"]
    (decode,) = simulator.pools["decode"]
    for engine in (prefill, decode):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefill_blocks_stay_held_until_the_transfer_ends() -> None:
    # 8 prefill blocks of 4 tokens hold one 20-token prompt (+ its output) at a time; a slow
    # link keeps the first prompt's blocks busy, so the second prompt starts after the transfer.
    cluster = ClusterSpec(
        prefill=(instance(LinearCost(per_prefill_token=1 / 64, kv_bytes=64), num_blocks=8, block_size=4),),
        decode=(instance(LinearCost(decode_step=1 / 64)),),
        link=LinkSpec(bandwidth_bytes_per_s=1280.0),  # 20 tokens * 64 bytes: one second
    )
    first, second = simulate(cluster, [(0.0, 20, 2), (0.0, 20, 2)]).records
    assert first.ttft == 20 / 64
    assert second.ttft == 20 / 64 + 1.0 + 20 / 64


def test_a_sequence_that_preempted_itself_is_rescheduled_at_once() -> None:
    """The engine loop calls step() again while it has work: a step that only preempted is
    followed at once by another, not by an idle wait for the next transfer.

    6 decode blocks of 4 tokens; B's reservation (2 blocks, its transfer takes 1 s) leaves A
    no room to grow past 16 tokens, so A preempts itself; its recompute fits (chunks of 8
    tokens, no prefix cache) and runs before B's KV arrives, only to be preempted again.
    """
    decode = InstanceSpec(LinearCost(per_prefill_token=1 / 1024, decode_step=1 / 64), num_blocks=6,
                          block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=8),
                          enable_prefix_caching=False)
    cluster = ClusterSpec(prefill=(instance(LinearCost(per_prefill_token=1 / 1024, kv_bytes=1)),),
                          decode=(decode,), link=LinkSpec(1e9, latency_s=1.0))
    result = simulate(cluster, [(0.0, 8, 12), (0.5, 8, 4)])
    assert all(r.ok for r in result.records)
    assert result.pools["decode"].num_preemptions > 2  # one wait for B's KV would preempt twice


def test_a_request_no_instance_can_hold_is_rejected() -> None:
    result = simulate(colocated(instance(LinearCost(decode_step=0.01), num_blocks=4, block_size=4)),
                      [(0.0, 8, 4), (0.0, 30, 4)])
    ok, rejected = result.records
    assert ok.ok and not rejected.ok and rejected.error is not None
    assert result.summary().failed == 1


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("routing", "third_on_second_instance"), [("round_robin", False), ("least_loaded", True)])
def test_prefill_routing(routing: str, third_on_second_instance: bool) -> None:
    cluster = ClusterSpec(
        prefill=(instance(LinearCost(per_prefill_token=0.001)), instance(LinearCost(per_prefill_token=0.001))),
        decode=(instance(LinearCost(decode_step=0.01)),), link=LinkSpec(1e9), routing=routing,
    )
    records = simulate(cluster, [(0.0, 1000, 1), (0.0, 10, 1), (0.0, 10, 1)]).records
    # Least loaded by queued prompt tokens sends the third short prompt beside the second.
    expected = 0.02 if third_on_second_instance else 1.01
    assert records[2].ttft == pytest.approx(expected)


def test_heterogeneous_instances_each_use_their_own_cost_model() -> None:
    fast, slow = LinearCost(per_prefill_token=0.001), LinearCost(per_prefill_token=0.004)
    records = simulate(colocated(instance(fast), instance(slow)), [(0.0, 100, 1), (0.0, 100, 1)]).records
    assert [r.ttft for r in records] == pytest.approx([0.1, 0.4])


# -- summary ----------------------------------------------------------------------------------


def test_summary_goodput_counts_requests_meeting_both_slos() -> None:
    cost = LinearCost(per_prefill_token=1 / 64, decode_step=1 / 64)
    # Served one after the other: TTFTs 1 and 2 s (and 3 s), TPOT 1/64 s.
    result = simulate(colocated(instance(cost, max_num_seqs=1)), [(0.0, 64, 2)] * 3)
    summary = result.summary(SLO(ttft=2.1, tpot=0.02))
    assert summary.completed == 3 and summary.duration == result.duration
    assert summary.slo_attainment == pytest.approx(2 / 3)
    assert summary.goodput == pytest.approx(2 / result.duration)
    assert summary.ttft.p50 == pytest.approx(1 + 1 / 64 + 1)
    assert result.summary(SLO(ttft=2.1, tpot=0.01)).goodput == 0.0


# -- request streams --------------------------------------------------------------------------


def test_trace_file_in_mooncake_format(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 1500, "input_length": 300, "output_length": 20, "hash_ids": [1, 2]},
        {"timestamp": 0, "input_length": 6955, "output_length": 52.0, "hash_ids": [3]},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    assert load_trace(path) == [SimRequest(0.0, 6955, 52, "trace"), SimRequest(1.5, 300, 20, "trace")]
    assert [r.arrival_time for r in load_trace(path, speedup=3.0)] == [0.0, 0.5]
    assert len(load_trace(path, limit=1)) == 1

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"timestamp": 5, "input_length": 0,
                                                            "output_length": 3}) + "\n")
    with pytest.raises(ValueError, match=r"trace.jsonl:2"):
        load_trace(path)
    path.write_text('{"timestamp": 5, "input_length": 2.5, "output_length": 3}\n')
    with pytest.raises(ValueError, match=r":1"):
        load_trace(path)


def test_poisson_requests_draw_preset_lengths_reproducibly() -> None:
    stream = poisson_requests("mixed", rate=4.0, count=2000, seed=3)
    assert stream == poisson_requests("mixed", rate=4.0, count=2000, seed=3)
    assert stream != poisson_requests("mixed", rate=4.0, count=2000, seed=4)
    for request in stream:
        preset = PRESETS[request.kind]
        assert preset.input_tokens.low <= request.input_tokens <= preset.input_tokens.high
        assert preset.output_tokens.low <= request.output_tokens <= preset.output_tokens.high
    kinds = [r.kind for r in stream]
    assert 0.45 < kinds.count("chat") / len(kinds) < 0.55
    assert stream[-1].arrival_time / len(stream) == pytest.approx(1 / 4.0, rel=0.1)
    with pytest.raises(ValueError, match="unknown workload"):
        poisson_requests("poetry", rate=1.0, count=1)


def test_poisson_requests_with_fixed_lengths() -> None:
    fixed = Preset("fixed", "", LengthRange(100, 100), LengthRange(20, 20))
    stream = poisson_requests("fixed", rate=2.0, count=50, fixed=fixed)
    assert {(r.input_tokens, r.output_tokens, r.kind) for r in stream} == {(100, 20, "fixed")}
    with pytest.raises(ValueError, match="fixed"):
        poisson_requests("chat", rate=2.0, count=5, fixed=fixed)


def test_invalid_clusters_are_refused() -> None:
    spec = instance(LinearCost())
    with pytest.raises(ValueError, match="link"):
        ClusterSpec(prefill=(spec,), decode=(spec,))
    with pytest.raises(ValueError, match="either"):
        ClusterSpec(prefill=(spec,), colocated=(spec,))
    with pytest.raises(ValueError, match="routing"):
        ClusterSpec(colocated=(spec,), routing="random")
