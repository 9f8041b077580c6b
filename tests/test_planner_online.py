"""Live pool sizing (planner/online.py) against hand-computed cases."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pdserve.planner.cost.capacity import BatchRate, decode_rate, prefill_rate, prefill_seconds
from pdserve.planner.online import LiveLoad, PoolSizes, recommend_pools
from pdserve.traffic.server_metrics import parse_metrics
from pdserve.traffic.stats import SLO


class ToyCost:
    """Prefill 1 ms per token + 5 ms per step; decode 10 ms + 1 ms per sequence."""

    def step_seconds(self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        if prefill_chunks:
            return 0.005 + 0.001 * sum(n for n, _ in prefill_chunks)
        return 0.010 + 0.001 * len(decode_contexts)

    def kv_bytes_per_token(self) -> int:
        return 1


def test_sizes_follow_the_cost_model() -> None:
    cost = ToyCost()
    # 500 tokens in chunks of 200: 3 steps, 3 * 5 ms + 500 ms.
    assert prefill_seconds(cost, 500, 200) == pytest.approx(0.515)
    # Steps of 10 + B ms within 50 ms: B <= 40; 40 requests per (100 steps * 50 ms) = 8 req/s.
    assert decode_rate(cost, 550, 101, 0.050, 256) == BatchRate(pytest.approx(8.0), 40)
    assert decode_rate(cost, 550, 101, 0.010, 256) is None  # one sequence alone takes 11 ms
    # Prompts of 100 in a 512 budget: 5 per step of 5 + 500 ms; of 1000: 2 steps, 1.01 s.
    assert prefill_rate(cost, 100, 512) == pytest.approx(5 / 0.505)
    assert prefill_rate(cost, 1000, 512) == pytest.approx(1 / 1.010)
    load = LiveLoad(arrival_rate=2.0, mean_input_tokens=500, mean_output_tokens=101)
    sizes = recommend_pools(load, cost, cost, SLO(ttft=1.0, tpot=0.050))
    # Prefill: 2 req/s * 0.505 s (one chunk of 500 at the default 2048) / 0.8 = 1.26 -> 2.
    # Decode: 2 / (8 * 0.8) = 0.31 -> 1.
    assert (sizes.prefill, sizes.decode) == (2, 1)
    busier = recommend_pools(LiveLoad(20.0, 500, 101), cost, cost, SLO(1.0, 0.050))
    assert (busier.prefill, busier.decode) == (13, 4)  # 20 * 0.505 / 0.8 = 12.6; 20 / 6.4 = 3.1


def test_observations_override_the_model_and_scale_down_is_gradual() -> None:
    cost, slo = ToyCost(), SLO(ttft=1.0, tpot=0.050)
    congested = LiveLoad(2.0, 500, 101, queue_p90_seconds=0.8, decode_kv_usage=0.95)
    sizes = recommend_pools(congested, cost, cost, slo, current=PoolSizes(2, 1))
    assert (sizes.prefill, sizes.decode) == (3, 2)
    assert any("queue p90" in r for r in sizes.reasons) and any("KV usage" in r for r in sizes.reasons)
    quiet = recommend_pools(LiveLoad(0.01, 500, 101), cost, cost, slo, current=PoolSizes(5, 4))
    assert (quiet.prefill, quiet.decode) == (4, 3)


def test_an_unreachable_tpot_is_said_not_scaled() -> None:
    sizes = recommend_pools(LiveLoad(2.0, 500, 101), ToyCost(), ToyCost(), SLO(1.0, 0.005),
                            current=PoolSizes(2, 3))
    assert sizes.decode == 3 and any("no pool size meets it" in r for r in sizes.reasons)


def test_live_load_from_two_router_scrapes() -> None:
    def scrape(requests: int, prompt: int, generated: int, queue_le: tuple[int, int, int]) -> str:
        return f"""# TYPE pdserve_router_requests_total counter
pdserve_router_requests_total{{endpoint="completions",status="200"}} {requests}
# TYPE pdserve_router_prompt_tokens_total counter
pdserve_router_prompt_tokens_total {prompt}
# TYPE pdserve_router_generation_tokens_total counter
pdserve_router_generation_tokens_total {generated}
# TYPE pdserve_router_queue_seconds histogram
pdserve_router_queue_seconds_bucket{{le="0.1"}} {queue_le[0]}
pdserve_router_queue_seconds_bucket{{le="1.0"}} {queue_le[1]}
pdserve_router_queue_seconds_bucket{{le="+Inf"}} {queue_le[2]}
pdserve_router_queue_seconds_count {queue_le[2]}
pdserve_router_queue_seconds_sum 0
"""
    before = parse_metrics(scrape(10, 5000, 1000, (10, 10, 10)))
    after = parse_metrics(scrape(30, 15000, 3000, (20, 30, 30)))
    load = LiveLoad.from_router_metrics(before, after, window_seconds=10.0, decode_kv_usage=0.5)
    assert load.arrival_rate == pytest.approx(2.0)
    assert (load.mean_input_tokens, load.mean_output_tokens) == (500, 100)
    # 20 waits: 10 under 0.1 s, 10 in (0.1, 1]; p90 = rank 18 -> 0.1 + 0.9 * 8/10 = 0.82 s.
    assert load.queue_p90_seconds == pytest.approx(0.82)
    with pytest.raises(ValueError):
        LiveLoad.from_router_metrics(before, after, window_seconds=0)
