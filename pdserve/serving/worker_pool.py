"""The router's view of its workers: who serves which role, picked round robin.

Workers are registered by URL; ``refresh`` asks each for ``/health`` and keeps the ones that
answer. Routing policies beyond round robin (least loaded, prefix-aware) plug in here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Worker:
    url: str
    role: str
    healthy: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class WorkerPool:
    def __init__(self, prefill: list[str], decode: list[str], both: list[str]) -> None:
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
            except (httpx.HTTPError, ValueError):
                worker.healthy = False

    def pick(self, *roles: str) -> Worker | None:
        """The next healthy worker serving one of ``roles`` (round robin), or None."""
        for role in roles:
            candidates = [w for w in self.workers if w.healthy and w.role == role]
            if candidates:
                return candidates[next(self._turns[role]) % len(candidates)]
        return None

    def pick_other(self, *roles: str, exclude: set[str]) -> Worker | None:
        """A healthy worker of ``roles`` whose URL is not in ``exclude`` (for a retry), or None."""
        for role in roles:
            candidates = [w for w in self.workers if w.healthy and w.role == role and w.url not in exclude]
            if candidates:
                return candidates[next(self._turns[role]) % len(candidates)]
        return None

    def model_names(self) -> list[str]:
        return sorted({str(w.info["model"]) for w in self.workers if w.healthy and "model" in w.info})

    def max_model_len(self) -> int:
        lengths = [int(w.info["max_model_len"]) for w in self.workers if w.healthy and "max_model_len" in w.info]
        return min(lengths) if lengths else 2048
