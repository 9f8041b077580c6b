"""A worker's request metrics (its own view: from a request's arrival at this worker), and gauges
of its engine read at scrape time. The KV transfer metrics live beside them (transfer/metrics.py).

Prefill vs decode time, for the prefill/decode time ratio: on a ``prefill`` worker a request's
whole stay is prefill; on ``decode`` and ``both`` workers the time to its first token counts as
prefill (including, on a decode worker, the KV pull) and the rest as decode. The counters sum
request-seconds, so concurrent requests add up: compare their rates, not wall time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.serving.request_timing import LATENCY_BUCKETS, LatencyHistograms, RequestTiming


class WorkerMetrics:
    def __init__(self, role: str, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = LatencyHistograms("pdserve_worker", r)
        self.prefill_seconds = Histogram(
            "pdserve_worker_prefill_seconds", "On a prefill worker: from arrival to the KV being ready to send",
            buckets=LATENCY_BUCKETS, registry=r)
        self.phase_seconds = Counter(
            "pdserve_worker_phase_seconds", "Request-seconds spent in each phase (see docs/metrics.md)",
            ["phase"], registry=r)
        self.requests = Counter("pdserve_worker_requests", "Requests ended, by how", ["outcome"], registry=r)
        r.register(_EngineGauges(engine_stats))

    def request(self) -> WorkerRequestTimer:
        return WorkerRequestTimer(self)


class WorkerRequestTimer(RequestTiming):
    def __init__(self, metrics: WorkerMetrics) -> None:
        super().__init__(metrics.latency)
        self.metrics = metrics
        self.prefilled_at: float | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "output":
            self.on_output(event)
        elif kind == "prefilled":
            self.prefilled_at = self.clock()
            self.metrics.prefill_seconds.observe(self.prefilled_at - self.started)

    def end(self, outcome: str) -> None:
        """``outcome``: finished, aborted or error."""
        if self.finished:
            return
        self.finish()
        self.metrics.requests.labels(outcome).inc()
        now = self.clock()
        phases = self.metrics.phase_seconds
        if self.metrics.role == "prefill":
            phases.labels("prefill").inc((self.prefilled_at or now) - self.started)
        elif self.first_token_at is not None:
            phases.labels("prefill").inc(self.first_token_at - self.started)
            phases.labels("decode").inc(now - self.first_token_at)
        else:
            phases.labels("prefill").inc(now - self.started)


class _EngineGauges(Collector):
    """KV usage and queue lengths, read from the engine when Prometheus scrapes."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine_stats()
        except Exception:  # a scrape must not fail because the engine is busy or closing
            return
        total, free = int(stats["num_blocks"]), int(stats["num_free_blocks"])
        yield GaugeMetricFamily("pdserve_worker_kv_blocks", "KV blocks in the pool", value=total)
        yield GaugeMetricFamily("pdserve_worker_kv_blocks_used", "KV blocks referenced by requests",
                                value=total - free)
        yield GaugeMetricFamily("pdserve_worker_kv_usage_ratio", "Share of the KV pool in use",
                                value=(total - free) / total if total else 0.0)
        yield GaugeMetricFamily("pdserve_worker_running_requests", "Requests being computed",
                                value=int(stats["num_running"]))
        yield GaugeMetricFamily("pdserve_worker_waiting_requests", "Requests queued in the engine",
                                value=int(stats["num_waiting"]))
        yield GaugeMetricFamily("pdserve_worker_prefix_cache_hit_ratio", "Prompt tokens found in the prefix cache",
                                value=float(stats.get("prefix_cache_hit_rate", 0.0)))

    def describe(self) -> Iterator[Metric]:
        return iter(())

