"""The router's view of its workers: who serves which role, and which one gets a request.

Workers are registered by URL (at start, or at run time through the router's admin API);
``refresh`` asks each for ``/health`` (keeping the ones that answer) and ``/load``. Policies,
chosen by name:
    round_robin:  in turn.
    least_loaded: prefill: fewest queued prompt tokens, then requests; decode: fewest running +
                  queued requests, then most free KV blocks. Load is what the last refresh saw
                  (every ~2 s) plus what this router sent since, so a burst does not pile onto
                  one worker.
    prefix_aware: prefill: the worker that probably holds the longest prefix of the prompt in
                  its cache (serving/prefix_index.py), unless it is busier than the least
                  loaded one by more than ``max_imbalance`` requests; ties by load. Decode:
                  least loaded.
A worker whose circuit breaker is open (serving/circuit_breaker.py) is skipped. With the
workers' secret, a worker counts as healthy only if its ``/health`` proves the secret.

Roles are a preference, not a wall: every worker holds the whole model and can run a request
from prompt to last token. Decoding goes to decode (and both) workers while any is up, and to
prefill workers only when none is (``decoding_roles``), so a dead decode worker leaves the
prefill worker serving whole requests while the supervisor restarts it, rather than a 503.
Prefilling falls back the other way (``prefilling_roles``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.engine.block_manager import BlockHash
from pdserve.serving.circuit_breaker import CircuitBreaker
from pdserve.serving.internal_auth import identity_challenge, proves_identity
from pdserve.serving.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
ROLES = ("prefill", "decode", "both")


@dataclass
class Worker:
    url: str
    role: str
    healthy: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    """The worker's last ``/load`` (engine stats)."""
    sent_since_refresh: int = 0
    tokens_sent_since_refresh: int = 0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    unproven: bool = False
    """It answered /health without proving the workers' secret (so it is not healthy)."""

    def busyness(self) -> tuple[int, int]:
        """Smaller is less busy. Prefill: (queued prompt tokens, queued requests); others:
        (requests in flight, -free KV blocks)."""
        queued = int(self.load.get("num_waiting", 0)) + self.sent_since_refresh
        if self.role == "prefill":
            return int(self.load.get("num_queued_prompt_tokens", 0)) + self.tokens_sent_since_refresh, queued
        queued += int(self.load.get("num_running", 0))
        return queued, -int(self.load.get("num_free_blocks", 0))

    def summary(self) -> dict[str, Any]:
        return {"url": self.url, "role": self.role, "healthy": self.healthy, "breaker": self.breaker.state}


class WorkerPool:
    def __init__(
        self, prefill: Sequence[str] = (), decode: Sequence[str] = (), both: Sequence[str] = (),
        policy: str = "round_robin", max_imbalance: int = 4, breaker: Callable[[], CircuitBreaker] = CircuitBreaker,
        worker_secret: str | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.max_imbalance = max_imbalance
        self.worker_secret = worker_secret
        """With a secret, a worker is admitted only if its /health proves it (internal_auth.py)."""
        self.prefix = PrefixIndex()
        self._new_breaker = breaker
        self.workers: list[Worker] = []
        for role, urls in (("prefill", prefill), ("decode", decode), ("both", both)):
            for url in urls:
                self.add(url, role)
        self._turns = {role: itertools.count() for role in ROLES}

    def add(self, url: str, role: str) -> Worker:
        """Register a worker (not used until a refresh finds it healthy)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a worker URL must start with http:// or https://, got {url!r}")
        if any(w.url == url for w in self.workers):
            raise ValueError(f"the worker {url} is already registered")
        worker = Worker(url, role, breaker=self._new_breaker())
        self.workers.append(worker)
        return worker

    def remove(self, url: str) -> Worker:
        """Deregister a worker: it gets no new requests (those in flight finish)."""
        url = url.rstrip("/")
        for worker in self.workers:
            if worker.url == url:
                self.workers.remove(worker)
                self.prefix.forget(url)
                return worker
        raise KeyError(url)

    async def refresh(self, client: httpx.AsyncClient) -> None:
        for worker in list(self.workers):
            was_healthy = worker.healthy
            try:
                challenge, headers = identity_challenge()
                response = await client.get(f"{worker.url}/health", timeout=2.0, headers=headers)
                worker.healthy = response.status_code == 200
                proven = proves_identity(self.worker_secret, challenge, response.headers)
                if worker.healthy and not proven and not worker.unproven:  # said once, not every refresh
                    log.warning("%s answers /health without proving the workers' secret: not admitted "
                                "(another process on its port?)", worker.url)
                worker.healthy, worker.unproven = worker.healthy and proven, worker.healthy and not proven
                worker.info = response.json() if worker.healthy else {}
                if worker.healthy:
                    worker.load = (await client.get(f"{worker.url}/load", timeout=2.0)).json()
                    worker.sent_since_refresh = worker.tokens_sent_since_refresh = 0
            except (httpx.HTTPError, ValueError):
                worker.healthy = False
            if was_healthy and not worker.healthy:
                self.eject(worker)

    def eject(self, worker: Worker) -> None:
        """``worker`` failed: no requests until a health check passes; its cache is presumed lost."""
        worker.healthy = False
        self.prefix.forget(worker.url)

    def pick(self, *roles: str, fits: Callable[[Worker], bool] | None = None,
             prefix: Sequence[BlockHash] = (), num_tokens: int = 0, owner: str = "") -> Worker | None:
        """The healthy worker serving the first of ``roles`` that has any, by policy; or None."""
        return self.pick_other(*roles, exclude=set(), fits=fits, prefix=prefix, num_tokens=num_tokens, owner=owner)

    def pick_other(
        self, *roles: str, exclude: set[str], fits: Callable[[Worker], bool] | None = None,
        prefix: Sequence[BlockHash] = (), num_tokens: int = 0, owner: str = "",
    ) -> Worker | None:
        """Like :meth:`pick`, leaving out the URLs in ``exclude`` (for a retry) and the workers
        ``fits`` refuses (no KV room). ``owner`` (a request id) holds the breaker's half-open probe
        if this pick is one, until it reports a verdict or releases it."""
        for role in roles:
            candidates = [
                w for w in self.workers
                if w.healthy and w.role == role and w.url not in exclude and w.breaker.allows()
                and (fits is None or fits(w))
            ]
            if not candidates:
                continue
            chosen = self._choose(role, candidates, prefix)
            chosen.sent_since_refresh += 1
            chosen.tokens_sent_since_refresh += num_tokens
            chosen.breaker.claim(owner)
            return chosen
        return None

    def decoding_roles(self) -> tuple[str, ...]:
        """The roles to decode on now: decode and both workers, prefill ones when none of those is up."""
        return ("decode", "both") if self.available("decode", "both") else ("prefill",)

    def prefilling_roles(self) -> tuple[str, ...]:
        """The roles to prefill on now: prefill and both workers, decode ones when none of those is up."""
        return ("prefill", "both") if self.available("prefill", "both") else ("decode",)

    def available(self, *roles: str) -> bool:
        """Is any worker of these roles up (healthy, breaker not open)?"""
        return any(w.healthy and w.role in roles and w.breaker.allows() for w in self.workers)

    def _choose(self, role: str, candidates: list[Worker], prefix: Sequence[BlockHash]) -> Worker:
        if self.policy == "round_robin":
            return candidates[next(self._turns[role]) % len(candidates)]
        least = min(candidates, key=Worker.busyness)
        if self.policy == "least_loaded" or role != "prefill" or not prefix:
            return least
        best = max(candidates, key=lambda w: (self.prefix.matched_blocks(w.url, prefix), [-x for x in w.busyness()]))
        if self.prefix.matched_blocks(best.url, prefix) == 0:
            return least
        queued = int(best.load.get("num_waiting", 0)) + best.sent_since_refresh
        least_queued = int(least.load.get("num_waiting", 0)) + least.sent_since_refresh
        if queued - least_queued > self.max_imbalance:
            return least
        return best

    def model_names(self) -> list[str]:
        return sorted({str(w.info["model"]) for w in self.workers if w.healthy and "model" in w.info})

    def max_model_len(self) -> int:
        lengths = [int(w.info["max_model_len"]) for w in self.workers if w.healthy and "max_model_len" in w.info]
        return min(lengths) if lengths else 2048

    def max_sequence_tokens(self) -> int | None:
        """The most positions one sequence can hold on the smallest decoding worker's KV pool, or
        None before any reported its load."""
        sizes = [int(w.load["num_blocks"]) * int(w.load["block_size"]) for w in self.workers
                 if w.healthy and w.role in self.decoding_roles()
                 and w.load.get("num_blocks") and w.load.get("block_size")]
        return min(sizes) if sizes else None

    def block_size(self) -> int:
        sizes = [int(w.load["block_size"]) for w in self.workers if w.healthy and w.load.get("block_size")]
        return min(sizes) if sizes else 16
