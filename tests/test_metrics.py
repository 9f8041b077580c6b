"""Latency metrics on hand-built event sequences with a fake clock, the Grafana dashboard against
the metric names the router and the workers really expose, and one `pdserve serve` end to end."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pdserve.serving.request_timing import LatencyHistograms, RequestTiming
from pdserve.serving.router_metrics import RouterMetrics
from pdserve.serving.worker_metrics import WorkerMetrics
from pdserve.transfer.metrics import TransferMetrics

DASHBOARD = Path(__file__).parent.parent / "dashboards" / "grafana" / "pdserve.json"


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def output(*token_counts: int) -> dict:
    return {"event": "output", "outputs": [{"token_ids": [0] * n} for n in token_counts]}


def sample(registry: CollectorRegistry, name: str, labels: dict | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_request_timing_observes_ttft_gaps_tpot_and_e2e() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    timing = RequestTiming(LatencyHistograms("t", registry), clock)
    clock.now += 0.5
    timing.on_output(output(1))  # first token at +0.5
    clock.now += 0.1
    timing.on_output(output(2))  # gap 0.1
    clock.now += 0.3
    timing.on_output(output(4))  # two tokens at once: two gaps of 0.15
    timing.on_output(output(4))  # nothing new
    clock.now += 0.1
    timing.finish()
    timing.finish()  # once only
    assert sample(registry, "t_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample(registry, "t_inter_token_latency_seconds_count") == 3
    assert sample(registry, "t_inter_token_latency_seconds_sum") == pytest.approx(0.4)
    assert sample(registry, "t_time_per_output_token_seconds_sum") == pytest.approx(0.4 / 3)
    assert sample(registry, "t_request_seconds_sum") == pytest.approx(1.0)
    assert sample(registry, "t_request_seconds_count") == 1


def test_router_timer_counts_tokens_of_every_choice_and_the_transfer() -> None:
    metrics = RouterMetrics()
    timer = metrics.timer(queue_seconds=0.25, prompt_tokens=7)
    timer.on_event({"event": "prefilled"})
    timer.on_event({"event": "kv_received", "seconds": 0.02, "num_bytes": 1000})
    timer.on_event(output(1, 2))
    timer.on_event(output(3, 3))
    timer.finish()
    r = metrics.registry
    assert sample(r, "pdserve_router_generation_tokens_total") == 6
    assert sample(r, "pdserve_router_prompt_tokens_total") == 7
    assert sample(r, "pdserve_router_queue_seconds_sum") == pytest.approx(0.25)
    assert sample(r, "pdserve_router_kv_transfer_bytes_sum") == 1000
    assert sample(r, "pdserve_router_prefill_seconds_count") == 1


STATS = {"num_blocks": 100, "num_free_blocks": 75, "num_running": 2, "num_waiting": 1}


def test_worker_phases_split_at_the_first_token() -> None:
    decode = WorkerMetrics("decode", lambda: STATS)
    clock = Clock()
    timer = decode.request(clock)
    clock.now += 0.2
    timer.on_event(output(1))
    clock.now += 0.8
    timer.on_event(output(5))
    timer.end("finished")
    r = decode.registry
    assert sample(r, "pdserve_worker_phase_seconds_total", {"phase": "prefill"}) == pytest.approx(0.2)
    assert sample(r, "pdserve_worker_phase_seconds_total", {"phase": "decode"}) == pytest.approx(0.8)
    assert sample(r, "pdserve_worker_requests_total", {"outcome": "finished"}) == 1
    assert sample(r, "pdserve_worker_kv_usage_ratio") == pytest.approx(0.25)
    assert sample(r, "pdserve_worker_kv_blocks_used") == 25
    assert sample(r, "pdserve_worker_running_requests") == 2
    assert sample(r, "pdserve_worker_waiting_requests") == 1
    prefill = WorkerMetrics("prefill", lambda: STATS)
    timer = prefill.request(clock)
    clock.now += 0.3
    timer.on_event({"event": "prefilled"})
    timer.end("finished")
    assert sample(prefill.registry, "pdserve_worker_phase_seconds_total", {"phase": "prefill"}) == pytest.approx(0.3)
    assert sample(prefill.registry, "pdserve_worker_prefill_seconds_count") == 1


def test_worker_times_are_the_events_stamps_not_when_the_stream_read_them() -> None:
    metrics = WorkerMetrics("decode", lambda: STATS)
    clock = Clock()  # the stream reads every event late, all at once: at 20.0
    timer = metrics.request(clock)  # arrival at 10.0
    clock.now = 20.0
    timer.on_event({"event": "kv_received", "num_bytes": 4096, "seconds": 0.05, "time": 10.1})
    timer.on_event({**output(1), "time": 10.5})  # TTFT 0.5
    timer.on_event({**output(3), "time": 10.7})  # two tokens: two gaps of 0.1
    timer.on_event({**output(4), "finished": True, "time": 11.0})  # gap 0.3; e2e 1.0
    timer.end("finished")
    r = metrics.registry
    assert sample(r, "pdserve_worker_kv_received_seconds_sum") == pytest.approx(0.05)
    assert sample(r, "pdserve_worker_kv_received_bytes_sum") == 4096
    assert sample(r, "pdserve_worker_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample(r, "pdserve_worker_inter_token_latency_seconds_count") == 3
    assert sample(r, "pdserve_worker_inter_token_latency_seconds_sum") == pytest.approx(0.5)
    assert sample(r, "pdserve_worker_time_per_output_token_seconds_sum") == pytest.approx(0.5 / 3)
    assert sample(r, "pdserve_worker_request_seconds_sum") == pytest.approx(1.0)
    assert sample(r, "pdserve_worker_phase_seconds_total", {"phase": "prefill"}) == pytest.approx(0.5)
    assert sample(r, "pdserve_worker_phase_seconds_total", {"phase": "decode"}) == pytest.approx(0.5)


def test_an_aborted_worker_request_ends_at_the_clock() -> None:
    metrics = WorkerMetrics("both", lambda: STATS)
    clock = Clock()
    timer = metrics.request(clock)
    timer.on_event({**output(1), "time": 10.25})
    clock.now = 12.0  # the client went away; no last event
    timer.end("aborted")
    timer.end("finished")  # once only
    r = metrics.registry
    assert sample(r, "pdserve_worker_request_seconds_sum") == pytest.approx(2.0)
    assert sample(r, "pdserve_worker_phase_seconds_total", {"phase": "decode"}) == pytest.approx(1.75)
    assert sample(r, "pdserve_worker_requests_total", {"outcome": "aborted"}) == 1
    assert sample(r, "pdserve_worker_requests_total", {"outcome": "finished"}) == 0


def test_engine_gauges_skip_a_failed_read() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("engine closing")

    metrics = WorkerMetrics("decode", broken)
    assert metrics.registry.get_sample_value("pdserve_worker_kv_usage_ratio") is None
    assert sample(metrics.registry, "pdserve_worker_requests_total", {"outcome": "finished"}) == 0


def exposed_names() -> set[str]:
    registries = [RouterMetrics().registry, WorkerMetrics("both", lambda: {
        "num_blocks": 1, "num_free_blocks": 1, "num_running": 0, "num_waiting": 0}).registry,
        TransferMetrics().registry]
    names: set[str] = set()
    for registry in registries:
        for metric in registry.collect():
            names.update(sample.name for sample in metric.samples)
            if metric.type == "histogram":
                names.add(f"{metric.name}_bucket")
            if metric.type == "counter":
                names.add(f"{metric.name}_total")
    return names


def exprs(node: Any) -> Iterator[str]:
    """Every ``expr`` in the dashboard, wherever it sits (panels, rows' panels, variables)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)


def test_every_metric_the_dashboard_plots_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["panels"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
    exposed = exposed_names()
    used: set[str] = set()
    for expr in exprs(dashboard):
        used.update(re.findall(r"\bpdserve_[a-zA-Z0-9_:]+", expr))
    assert used and used <= exposed, f"not exposed: {sorted(used - exposed)}"
    wanted = {"pdserve_router_time_to_first_token_seconds_bucket", "pdserve_router_inter_token_latency_seconds_bucket",
              "pdserve_router_time_per_output_token_seconds_bucket", "pdserve_router_request_seconds_bucket",
              "pdserve_router_queue_seconds_bucket", "pdserve_router_prefill_seconds_bucket",
              "pdserve_router_kv_transfer_seconds_bucket", "pdserve_kv_transfer_bytes_total",
              "pdserve_router_requests_total", "pdserve_router_degraded_total",
              "pdserve_worker_kv_usage_ratio", "pdserve_worker_running_requests", "pdserve_worker_waiting_requests",
              "pdserve_worker_phase_seconds_total"}
    assert wanted <= used, f"not plotted: {sorted(wanted - used)}"


# One `pdserve serve` end to end (the Server pattern of test_serving.py).
