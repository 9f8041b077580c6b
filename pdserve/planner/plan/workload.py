"""The traffic a plan is made for: request lengths and how arrivals are drawn at any rate.

Either a ``pdserve bench serve`` preset (Poisson arrivals, lengths drawn from the preset's
ranges, or fixed lengths) or a Mooncake-format trace replayed at the rate asked for. The
optimizer simulates a *slice* of a fleet (see fleet_check.py), which receives a ``share`` of the
fleet's traffic: for Poisson arrivals that is a Poisson stream at ``rate * share``; a trace is
rescaled to the fleet's rate and thinned at random, which keeps its bursts as they are.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pdserve.planner.sim.requests import SimRequest, load_trace, poisson_requests
from pdserve.traffic.stats import percentile
from pdserve.traffic.workloads import WORKLOADS, Preset

# Enough draws that the means of the presets' uniform ranges are within a fraction of a percent.
_LENGTH_SAMPLE = 4000


@dataclass(frozen=True)
class PlanWorkload:
    name: str
    """How reports call it: "chat", "fixed 100/500", "trace.jsonl"."""
    preset: str | None = None
    """A ``bench serve`` workload: chat, code, summarize, mixed or fixed (then ``fixed``)."""
    fixed: Preset | None = None
    trace: tuple[SimRequest, ...] = field(default=(), repr=False)
    """A trace's requests in arrival order (its own times; rescaled when replayed)."""

    def __post_init__(self) -> None:
        if (self.preset is None) == (not self.trace):
            raise ValueError("a workload is either a preset or a trace")
        if self.preset is not None:
            if self.preset not in WORKLOADS:
                raise ValueError(f"unknown workload {self.preset!r}; known: {', '.join(WORKLOADS)}")
            if (self.preset == "fixed") != (self.fixed is not None):
                raise ValueError("the fixed workload needs its lengths, and only it takes them")
        elif len(self.trace) < 2 or self.trace[-1].arrival_time <= self.trace[0].arrival_time:
            raise ValueError("a trace needs at least two requests at different times to have a rate")

    @classmethod
    def from_preset(cls, workload: str, fixed: Preset | None = None) -> PlanWorkload:
        name = f"fixed {fixed.input_tokens.low}/{fixed.output_tokens.low}" if fixed else workload
        return cls(name=name, preset=workload, fixed=fixed)

    @classmethod
    def from_trace(cls, path: Path) -> PlanWorkload:
        return cls(name=path.name, trace=tuple(load_trace(path)))

    # -- lengths ---------------------------------------------------------------------------

    @cached_property
    def _lengths(self) -> tuple[tuple[int, int], ...]:
        if self.trace:
            requests = list(self.trace)
        else:
            assert self.preset is not None
            requests = poisson_requests(self.preset, 1.0, _LENGTH_SAMPLE, seed=0, fixed=self.fixed)
        return tuple((r.input_tokens, r.output_tokens) for r in requests)

    @property
    def mean_input_tokens(self) -> float:
        return sum(i for i, _ in self._lengths) / len(self._lengths)

    @property
    def mean_output_tokens(self) -> float:
        return sum(o for _, o in self._lengths) / len(self._lengths)

    @property
    def max_request_tokens(self) -> int:
        """The longest prompt + output: every instance's KV pool must hold one."""
        return max(i + o for i, o in self._lengths)

    def input_tokens_at(self, q: float) -> int:
        """The q-th percentile prompt length."""
        return math.ceil(percentile([float(i) for i, _ in self._lengths], q))

    @property
    def native_rate(self) -> float | None:
        """A trace's own mean rate (requests/s); None for a preset."""
        if not self.trace:
            return None
        span = self.trace[-1].arrival_time - self.trace[0].arrival_time
        return (len(self.trace) - 1) / span

    # -- arrivals --------------------------------------------------------------------------

    def requests(self, fleet_rate: float, share: float, count: int, seed: int) -> list[SimRequest]:
        """Up to ``count`` requests of the ``share`` of a fleet's traffic at ``fleet_rate``
        req/s that one slice of the fleet receives (fewer if a thinned trace runs out)."""
        if not (fleet_rate > 0 and 0 < share <= 1 and count >= 1):
            raise ValueError("need fleet_rate > 0, 0 < share <= 1 and count >= 1")
        if self.preset is not None:
            return poisson_requests(self.preset, fleet_rate * share, count, seed=seed, fixed=self.fixed)
        native = self.native_rate
        assert native is not None
        speedup = fleet_rate / native
        start = self.trace[0].arrival_time
        rng = random.Random(f"{seed}:thin")
        kept: list[SimRequest] = []
        for request in self.trace:
            if len(kept) >= count:
                break
            if share < 1 and rng.random() >= share:
                continue
            kept.append(request._replace(arrival_time=(request.arrival_time - start) / speedup))
        return kept
