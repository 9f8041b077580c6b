"""The router's Prometheus metrics, in a registry of their own (no global state).

Latencies are the client's view: from the moment the request was admitted (after its queue
wait, which has its own histogram) to tokens leaving the router. See docs/metrics.md.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from pdserve.serving.request_timing import LATENCY_BUCKETS, LatencyHistograms, RequestTiming

_BYTES_BUCKETS = tuple(2.0**k for k in range(16, 32, 2))  # 64 KiB .. 1 GiB


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdserve_router_requests", "Finished API requests", ["endpoint", "status"], registry=r
        )
        self.latency = LatencyHistograms("pdserve_router", r)
        self.queue_seconds = Histogram(
            "pdserve_router_queue_seconds", "Wait for a slot in the router's admission queue",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_seconds = Histogram(
            "pdserve_router_prefill_seconds", "From dispatch to the prefill worker's 'prefilled' event",
            buckets=LATENCY_BUCKETS, registry=r)
        self.kv_transfer_seconds = Histogram(
            "pdserve_router_kv_transfer_seconds", "KV pull time reported by the decode worker",
            buckets=LATENCY_BUCKETS, registry=r)
        self.kv_transfer_bytes = Histogram(
            "pdserve_router_kv_transfer_bytes", "KV bytes pulled per request", buckets=_BYTES_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdserve_router_prompt_tokens", "Prompt tokens of dispatched requests", registry=r)
        self.generation_tokens = Counter("pdserve_router_generation_tokens", "Output tokens streamed", registry=r)
        self.degraded = Counter(
            "pdserve_router_degraded", "Requests served another way than planned", ["how"], registry=r
        )

    def timer(self, queue_seconds: float, prompt_tokens: int) -> RouterRequestTimer:
        self.queue_seconds.observe(queue_seconds)
        self.prompt_tokens.inc(prompt_tokens)
        return RouterRequestTimer(self)


class RouterRequestTimer(RequestTiming):
    """One request's timing at the router; ``on_event`` sees every worker event."""

    def __init__(self, metrics: RouterMetrics) -> None:
        super().__init__(metrics.latency)
        self.metrics = metrics
        self.all_choices_tokens = 0

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "output":
            self.on_output(event)
            total = sum(len(choice.get("token_ids", ())) for choice in event.get("outputs", ()))
            self.metrics.generation_tokens.inc(max(total - self.all_choices_tokens, 0))
            self.all_choices_tokens = max(total, self.all_choices_tokens)
        elif kind == "prefilled":
            self.metrics.prefill_seconds.observe(time.monotonic() - self.started)
        elif kind == "kv_received":
            self.metrics.kv_transfer_seconds.observe(float(event.get("seconds", 0.0)))
            self.metrics.kv_transfer_bytes.observe(float(event.get("num_bytes", 0)))
