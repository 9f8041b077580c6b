"""A worker's request metrics (its own view: from a request's arrival at this worker), and gauges
of its engine read at scrape time. The KV transfer metrics live beside them (transfer/metrics.py).

Prefill vs decode time, for the prefill/decode time ratio: on a ``prefill`` worker a request's
whole stay is prefill; on ``decode`` and ``both`` workers the time to its first token counts as
prefill (including, on a decode worker, the KV pull) and the rest as decode. The counters sum
request-seconds, so concurrent requests add up: compare their rates, not wall time.

Times are the events' own ``time`` stamps (taken by the engine service when it emitted them, on
this host's monotonic clock), so a busy event loop handing several events over at once does not
squeeze their gaps; the clock is read directly only when an event has no stamp or the client left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.serving.request_timing import LATENCY_BUCKETS, LatencyHistograms, RequestTiming

_BYTES_BUCKETS = tuple(2.0**k for k in range(16, 32, 2))  # 64 KiB .. 1 GiB (as the router's)


class WorkerMetrics:
    def __init__(self, role: str, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = LatencyHistograms("pdserve_worker", r)
        self.prefill_seconds = Histogram(
            "pdserve_worker_prefill_seconds", "On a prefill worker: from arrival to the KV being ready to send",
            buckets=LATENCY_BUCKETS, registry=r)
        self.kv_received_seconds = Histogram(
            "pdserve_worker_kv_received_seconds",
            "On a decode worker: from starting a KV pull to the KV landing (its 'kv_received' event)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.kv_received_bytes = Histogram(
            "pdserve_worker_kv_received_bytes", "KV bytes pulled per request (its 'kv_received' event)",
            buckets=_BYTES_BUCKETS, registry=r)
        self.phase_seconds = Counter(
            "pdserve_worker_phase_seconds", "Request-seconds spent in each phase (see docs/metrics.md)",
            ["phase"], registry=r)
        self.requests = Counter("pdserve_worker_requests", "Requests ended, by how", ["outcome"], registry=r)
        r.register(_EngineGauges(engine_stats))

    def request(self, clock: Callable[[], float] = time.monotonic) -> WorkerRequestTimer:
        """A timer for a request arriving now; make it before submitting the request to the engine."""
        return WorkerRequestTimer(self, clock)


class WorkerRequestTimer(RequestTiming):
    def __init__(self, metrics: WorkerMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._read_clock = clock
        self._event_time: float | None = None  # the stamp of the event being observed
        super().__init__(metrics.latency, self._now)
        self.metrics = metrics
        self.prefilled_at: float | None = None

    def _now(self) -> float:
        return self._event_time if self._event_time is not None else self._read_clock()

    def on_event(self, event: dict[str, Any]) -> None:
        stamp = event.get("time")
        self._event_time = float(stamp) if isinstance(stamp, (int, float)) else None
        kind = event.get("event")
        if kind == "output":
            self.on_output(event)
        elif kind == "prefilled":
            self.prefilled_at = self._now()
            self.metrics.prefill_seconds.observe(self.prefilled_at - self.started)
        elif kind == "kv_received":
            self.metrics.kv_received_seconds.observe(float(event.get("seconds", 0.0)))
            self.metrics.kv_received_bytes.observe(float(event.get("num_bytes", 0)))

    def end(self, outcome: str) -> None:
        """``outcome``: finished, aborted or error. Finished and error end at the last event's
        stamp; aborted (the client went away, no last event) at the clock."""
        if self.finished:
            return
        if outcome == "aborted":
            self._event_time = None
        self.finish()
        self.metrics.requests.labels(outcome).inc()
        now = self._now()
        phases = self.metrics.phase_seconds
        if self.metrics.role == "prefill":
            phases.labels("prefill").inc(max((self.prefilled_at or now) - self.started, 0.0))
        elif self.first_token_at is not None:
            phases.labels("prefill").inc(max(self.first_token_at - self.started, 0.0))
            phases.labels("decode").inc(max(now - self.first_token_at, 0.0))
        else:
            phases.labels("prefill").inc(max(now - self.started, 0.0))


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
        yield from _step_work_counters(stats.get("step_work", {}))

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _step_work_counters(step_work: dict[str, dict[str, float]]) -> Iterator[Metric]:
    """The engine's step counters (engine/step_counters.py) by step kind: prefill, decode, mixed."""
    steps = CounterMetricFamily("pdserve_worker_engine_steps", "Engine steps run, by kind", labels=["kind"])
    seconds = CounterMetricFamily(
        "pdserve_worker_engine_step_seconds", "Wall time of engine steps, by kind", labels=["kind"])
    tokens = CounterMetricFamily(
        "pdserve_worker_engine_tokens", "Tokens computed in engine steps, by step kind and phase",
        labels=["kind", "phase"])
    attended = CounterMetricFamily(
        "pdserve_worker_engine_attended_positions",
        "Sum over computed tokens of the positions each attended to, by step kind and phase",
        labels=["kind", "phase"])
    for kind, work in step_work.items():
        steps.add_metric([kind], work["steps"])
        seconds.add_metric([kind], work["seconds"])
        tokens.add_metric([kind, "prefill"], work["prefill_tokens"])
        tokens.add_metric([kind, "decode"], work["decode_tokens"])
        attended.add_metric([kind, "prefill"], work["prefill_attention_pairs"])
        attended.add_metric([kind, "decode"], work["decode_context_tokens"])
    yield from (steps, seconds, tokens, attended)

