"""The router's Prometheus metrics, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdserve_router_requests", "Finished API requests", ["endpoint", "status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "pdserve_router_time_to_first_token_seconds", "From request to the first output",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.request_seconds = Histogram(
            "pdserve_router_request_seconds", "From request to the last output", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.degraded = Counter(
            "pdserve_router_degraded", "Requests served another way than planned", ["how"], registry=r
        )
