"""Per-request latency bookkeeping shared by the router's and the workers' metrics.

Fed the request's events as they happen (output events are cumulative: each carries every token
so far), it observes into the histograms of a ``LatencyHistograms``:
time to first token, each inter-token gap (a gap spread evenly over the tokens that arrived
together), time per output token after the first, end-to-end time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class LatencyHistograms:
    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        r = registry
        self.time_to_first_token = Histogram(
            f"{prefix}_time_to_first_token_seconds", "From the request's arrival to its first output token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            f"{prefix}_inter_token_latency_seconds", "Gap between successive output tokens",
            buckets=TOKEN_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            f"{prefix}_time_per_output_token_seconds", "Per request: (end - first token) / (tokens - 1)",
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_seconds = Histogram(
            f"{prefix}_request_seconds", "From the request's arrival to its last output",
            buckets=LATENCY_BUCKETS, registry=r)


class RequestTiming:
    def __init__(self, histograms: LatencyHistograms, clock: Callable[[], float] = time.monotonic) -> None:
        self.histograms = histograms
        self.clock = clock
        self.started = clock()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens = 0
        self.finished = False

    def on_output(self, event: dict[str, Any]) -> None:
        """An ``output`` event arrived now."""
        now = self.clock()
        tokens = max((len(choice.get("token_ids", ())) for choice in event.get("outputs", ())), default=0)
        new = tokens - self.tokens
        if new <= 0:
            return
        h = self.histograms
        if self.first_token_at is None:
            self.first_token_at = now
            h.time_to_first_token.observe(now - self.started)
            new -= 1  # the first token has no gap before it
        elif self.last_token_at is not None:
            for _ in range(new):
                h.inter_token_latency.observe((now - self.last_token_at) / new)
        self.last_token_at = now
        self.tokens = tokens

    def finish(self) -> None:
        """The request ended (whatever way); observe its totals once."""
        if self.finished:
            return
        self.finished = True
        now = self.clock()
        self.histograms.request_seconds.observe(now - self.started)
        if self.first_token_at is not None and self.last_token_at is not None and self.tokens > 1:
            self.histograms.time_per_output_token.observe(
                (self.last_token_at - self.first_token_at) / (self.tokens - 1)
            )
