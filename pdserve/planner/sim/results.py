"""What a simulation measured: a record per request (the load generator's, so the same
statistics apply) and, per pool, how busy it was and how long its queue grew."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.planner.sim.instance import SimInstance
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import SLO, Summary, summarize


@dataclass(frozen=True)
class PoolStats:
    role: str
    """``prefill``, ``decode`` or ``colocated``."""
    num_instances: int
    utilization: float
    """Busy fraction of the pool's instance-seconds over the simulated duration."""
    mean_queue_length: float
    """Requests on the pool's instances that were not running (waiting, preempted, waiting
    for KV room), averaged over time."""
    max_queue_length: int
    num_steps: int
    num_preemptions: int


@dataclass(frozen=True)
class SimulationResult:
    records: list[RequestRecord]
    """One per request, in arrival order; a rejected request has an ``error`` and no tokens."""
    pools: dict[str, PoolStats]
    duration: float
    """Simulated seconds from the first arrival to the last event."""

    def summary(self, slo: SLO | None = None) -> Summary:
        """TTFT, TPOT, ITL and E2E percentiles; with an SLO, attainment and goodput."""
        return summarize(self.records, slo)


class PoolMonitor:
    """Integrates one pool's queue length over simulated time."""

    def __init__(self, role: str, instances: Sequence[SimInstance]) -> None:
        self.role = role
        self.instances = list(instances)
        self._area = 0.0
        self._max = 0

    def advance(self, start: float, end: float) -> None:
        """The pool's state held unchanged from ``start`` to ``end``."""
        length = sum(instance.queue_length for instance in self.instances)
        self._area += length * (end - start)
        self._max = max(self._max, length)

    def stats(self, duration: float) -> PoolStats:
        busy = sum(instance.busy_seconds for instance in self.instances)
        capacity = duration * len(self.instances)
        return PoolStats(
            role=self.role,
            num_instances=len(self.instances),
            utilization=busy / capacity if capacity > 0 else 0.0,
            mean_queue_length=self._area / duration if duration > 0 else 0.0,
            max_queue_length=self._max,
            num_steps=sum(instance.num_steps for instance in self.instances),
            num_preemptions=sum(instance.scheduler.num_preemptions for instance in self.instances),
        )
