"""A circuit breaker per worker: repeated failures towards it stop traffic for a while.

Closed (normal) -> ``threshold`` consecutive failures -> open: the worker gets no requests for
``cooldown`` seconds -> half-open: one request is let through as a probe; its success closes
the breaker, its failure opens it again for twice as long (up to ``max_cooldown``). A probe
that ends without a verdict (its client left, a 4xx about the request itself) is released by
its owner, so the next request probes instead of the breaker staying half-open forever.
Health checks are a separate, coarser signal: a worker whose ``/health`` fails is ejected
altogether; the breaker catches a worker that answers health checks but fails the work
(KV transfers that time out, pulls refused, streams that break).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    threshold: int = 3
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    current_cooldown: float = field(default=0.0)
    probe_owner: str | None = None
    """The request whose half-open probe is in flight: no other request passes until it reports."""

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at < self.current_cooldown:
            return "open"
        return "half_open"

    def allows(self) -> bool:
        """May a request go there now? (Does not claim the half-open probe: see :meth:`claim`.)"""
        state = self.state
        return state == "closed" or (state == "half_open" and self.probe_owner is None)

    @property
    def probing(self) -> bool:
        return self.probe_owner is not None

    def claim(self, owner: str = "") -> None:
        """The request :meth:`allows` let through is now sent (in half-open, ``owner`` is the probe)."""
        if self.state == "half_open":
            self.probe_owner = owner

    def release(self, owner: str) -> None:
        """``owner``'s request ended: if it was the probe and reported no verdict, the next request
        probes instead (a verdict already cleared it, and another request's probe is not touched)."""
        if self.probe_owner == owner:
            self.probe_owner = None

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.current_cooldown = 0.0
        self.probe_owner = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.opened_at is not None:  # the probe failed: open again, for longer
            self.current_cooldown = min(self.current_cooldown * 2, self.max_cooldown)
            self.opened_at = self.clock()
        elif self.failures >= self.threshold:
            self.current_cooldown = self.cooldown
            self.opened_at = self.clock()
        self.probe_owner = None
