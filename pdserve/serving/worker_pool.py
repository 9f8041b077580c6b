"""The router's view of its workers: who serves which role, and which one gets a request.

Workers are registered by URL; ``refresh`` asks each for ``/health`` (keeping the ones that
answer) and ``/load``. Policies, chosen by name:
    round_robin:  in turn.
    least_loaded: prefill: fewest queued requests; decode: fewest running + queued requests,
                  then most free KV blocks. Load is what the last refresh saw (every ~2 s) plus
                  the requests this router sent since, so a burst does not pile onto one worker.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx

POLICIES = ("round_robin", "least_loaded")


@dataclass
class Worker:
    url: str
    role: str
    healthy: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    """The worker's last ``/load`` (engine stats)."""
    sent_since_refresh: int = 0

    def busyness(self) -> tuple[int, int]:
        """Smaller is less busy: (requests in flight, -free KV blocks)."""
        queued = int(self.load.get("num_waiting", 0)) + self.sent_since_refresh
        if self.role != "prefill":
            queued += int(self.load.get("num_running", 0))
        return queued, -int(self.load.get("num_free_blocks", 0))


class WorkerPool:
    def __init__(self, prefill: list[str], decode: list[str], both: list[str], policy: str = "round_robin") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.workers = [Worker(u.rstrip("/"), "prefill") for u in prefill]
        self.workers += [Worker(u.rstrip("/"), "decode") for u in decode]
        self.workers += [Worker(u.rstrip("/"), "both") for u in both]
        if not self.workers:
            raise ValueError("the router needs at least one worker (--prefill/--decode or --both URLs)")
        self._turns = {role: itertools.count() for role in ("prefill", "decode", "both")}

    async def refresh(self, client: httpx.AsyncClient) -> None:
        for worker in self.workers:
            try:
                response = await client.get(f"{worker.url}/health", timeout=2.0)
                worker.healthy = response.status_code == 200
                worker.info = response.json() if worker.healthy else {}
                if worker.healthy and self.policy == "least_loaded":
                    worker.load = (await client.get(f"{worker.url}/load", timeout=2.0)).json()
                    worker.sent_since_refresh = 0
            except (httpx.HTTPError, ValueError):
                worker.healthy = False

    def pick(self, *roles: str) -> Worker | None:
        """The healthy worker serving the first of ``roles`` that has any, by policy; or None."""
        return self.pick_other(*roles, exclude=set())

    def pick_other(self, *roles: str, exclude: set[str]) -> Worker | None:
        """Like :meth:`pick`, leaving out the URLs in ``exclude`` (for a retry)."""
        for role in roles:
            candidates = [w for w in self.workers if w.healthy and w.role == role and w.url not in exclude]
            if not candidates:
                continue
            if self.policy == "least_loaded":
                chosen = min(candidates, key=Worker.busyness)
            else:
                chosen = candidates[next(self._turns[role]) % len(candidates)]
            chosen.sent_since_refresh += 1
            return chosen
        return None

    def model_names(self) -> list[str]:
        return sorted({str(w.info["model"]) for w in self.workers if w.healthy and "model" in w.info})

    def max_model_len(self) -> int:
        lengths = [int(w.info["max_model_len"]) for w in self.workers if w.healthy and "max_model_len" in w.info]
        return min(lengths) if lengths else 2048
