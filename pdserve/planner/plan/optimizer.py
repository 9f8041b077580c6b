"""The cheapest fleet that meets the SLOs at a request rate: roofline bounds, then simulation.

1. **Screen** (screen.py): every accelerator x tensor-parallel degree whose weights fit
   beside the longest request's KV and whose lone steps are within the SLOs, with a fluid
   estimate of the requests/s one instance sustains as prefill, decode or colocated.
2. **Start** every *family* (colocated H/TP, or prefill H1/TP1 -> decode H2/TP2) at the counts
   those estimates imply: ``ceil(rate / per-instance rate)`` per pool. The estimates are
   optimistic, so a start costs no more than the family's cheapest passing fleet (up to the
   fluid model's approximations).
3. **Best first, bounded**: take the cheapest fleet of a kind (colocated or disaggregated)
   whose kind has no passing fleet at or below that cost yet, simulate it (fleet_check.py), and on
   a miss put it back with the pool at fault grown (one instance, or an eighth of the pool when
   it is large). The first passing fleet of a kind popped this way is that kind's cheapest, as
   far as the estimates bound from below. The number of simulations is capped.
4. **Headroom** of the best fleet of each kind only: a short bisection of the rate between the
   target and the lower of 2x the target and the fleet's roofline throughput (above which it
   fails without simulation); a lower bound at the resolution reached.

Which pool is at fault: TPOT misses grow decode; TTFT misses grow prefill when the prefill pool
is busy (over 70% of its time), else decode (prompts then wait for KV room on decode
instances, which pdserve's router counts in TTFT); a miss of attainment alone grows the side
with more misses.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.planner.catalogue.hardware import Accelerator
from pdserve.planner.catalogue.models import ModelSpec
from pdserve.planner.plan.fleet import Fleet, InstanceType, saving
from pdserve.planner.plan.fleet_check import FleetCheck, PlanGoal, SimSettings, check_fleet, kv_link
from pdserve.planner.plan.screen import EngineSettings, InstanceOption, Screening, screen
from pdserve.planner.plan.workload import PlanWorkload
from pdserve.traffic.stats import SLO

KINDS = ("colocated", "disaggregated")
# Above this busy fraction the prefill pool is the likely cause of a TTFT miss.
_BUSY_PREFILL = 0.7


@dataclass(frozen=True)
class SearchSettings:
    max_instances: int = 64
    """Most instances in one fleet (prefill + decode, or colocated)."""
    max_simulations: int = 30
    """Simulations of the search (headroom adds up to headroom_steps per chosen fleet)."""
    headroom_steps: int = 4
    tensor_parallel: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        if self.max_instances < 1 or self.max_simulations < 1 or self.headroom_steps < 0:
            raise ValueError("max_instances and max_simulations must be >= 1, headroom_steps >= 0")
        if not self.tensor_parallel or min(self.tensor_parallel) < 1:
            raise ValueError("tensor_parallel degrees must be >= 1")


@dataclass(frozen=True)
class Headroom:
    """How far above the target rate a fleet still meets the goal (a short bisection)."""

    max_rate: float
    """The highest rate that met the goal (the target rate at least)."""
    failing_rate: float | None
    """The lowest simulated rate that failed; None if every probe met the goal."""
    capacity_rate: float
    """The roofline's optimistic throughput for the fleet: rates above it are taken to fail
    without simulation."""

    @property
    def capped_by_roofline(self) -> bool:
        """Met the goal up to the roofline's throughput, above which nothing was simulated."""
        return self.failing_rate is None and self.max_rate >= self.capacity_rate * 0.999
    checks: tuple[FleetCheck, ...]
    """Every probe, the target rate's check included, by rate."""

    def fraction(self, target_rate: float) -> float:
        return self.max_rate / target_rate - 1.0


@dataclass(frozen=True)
class Unsimulated:
    """A family the search did not (or no longer) simulate, and why."""

    fleet: Fleet
    """Its smallest fleet not simulated (a start estimate, or the growth after its last miss)."""
    reason: str


@dataclass(frozen=True)
class Plan:
    model: str
    workload: PlanWorkload
    goal: PlanGoal
    engine: EngineSettings
    sim: SimSettings
    screening: Screening
    checks: tuple[FleetCheck, ...]
    """Every simulation of the search at the target rate, in the order run."""
    unsimulated: tuple[Unsimulated, ...]
    headroom: dict[str, Headroom]
    """By fleet label, for the best fleet of each kind."""
    stopped_early: bool
    """The simulation budget ran out before both kinds had a proven cheapest fleet."""
    wall_seconds: float

    @property
    def passing(self) -> list[FleetCheck]:
        """Fleets that met the goal at the target rate, cheapest first."""
        return sorted((c for c in self.checks if c.meets), key=_rank)

    def best(self, kind: str) -> FleetCheck | None:
        return next((c for c in self.passing if c.fleet.kind == kind), None)

    @property
    def closest_failing(self) -> list[FleetCheck]:
        """Per family, the largest fleet that failed, if the family never passed; closest first."""
        passed = {c.fleet.family for c in self.checks if c.meets}
        last: dict[str, FleetCheck] = {}
        for check in self.checks:
            if not check.meets and check.fleet.family not in passed:
                last[check.fleet.family] = check
        return sorted(last.values(), key=lambda c: (-c.attainment, c.fleet.usd_per_hour))

    def saving_vs_colocated(self, check: FleetCheck) -> float | None:
        baseline = self.best("colocated")
        return None if baseline is None else saving(check.fleet.usd_per_hour, baseline.fleet.usd_per_hour)

    @property
    def disaggregation_pays(self) -> bool | None:
        """True when the best disaggregated fleet is strictly cheaper than the best colocated
        one; None when a kind has no passing fleet to compare."""
        colocated, disaggregated = self.best("colocated"), self.best("disaggregated")
        if colocated is None or disaggregated is None:
            return None
        return disaggregated.fleet.usd_per_hour < colocated.fleet.usd_per_hour

    def usd_per_million_tokens(self, fleet: Fleet) -> float:
        return fleet.usd_per_million_output_tokens(self.goal.rate, self.workload.mean_output_tokens)


Progress = Callable[[str], None]


def plan(model: ModelSpec, accelerators: Sequence[Accelerator], workload: PlanWorkload, goal: PlanGoal,
         engine: EngineSettings | None = None, sim: SimSettings | None = None,
         search: SearchSettings | None = None, progress: Progress | None = None) -> Plan:
    engine, sim, search = engine or EngineSettings(), sim or SimSettings(), search or SearchSettings()
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    screening = screen(model, accelerators, workload, goal.slo, goal.percentile, engine,
                       search.tensor_parallel)
    say(f"screened {len(accelerators)} accelerators: {len(screening.options)} instance types hold "
        f"{model.name} and its longest request; {len(screening.exclusions)} types or roles ruled out")
    options = {option.instance: option for option in screening.options}
    search_state = _Search(goal, search, options, workload, engine, sim, say)
    search_state.start(screening.options)
    search_state.run()
    headroom = {}
    for kind in KINDS:
        best = next((c for c in sorted(search_state.checks, key=_rank)
                     if c.meets and c.fleet.kind == kind), None)
        if best is not None and search.headroom_steps:
            headroom[best.fleet.label] = search_state.headroom(best)
    return Plan(
        model=model.name, workload=workload, goal=goal, engine=engine, sim=sim, screening=screening,
        checks=tuple(search_state.checks), unsimulated=tuple(search_state.unsimulated()),
        headroom=headroom, stopped_early=search_state.stopped_early,
        wall_seconds=time.perf_counter() - started,
    )


def _rank(check: FleetCheck) -> tuple[float, int, bool, str]:
    # At equal cost and GPUs the colocated fleet ranks first: one pool, no KV transfers.
    fleet = check.fleet
    return (fleet.usd_per_hour, fleet.num_gpus, fleet.is_disaggregated, fleet.label)


@dataclass
class _Search:
    """The best-first search's mutable state (one per plan() call)."""

    goal: PlanGoal
    settings: SearchSettings
    options: dict[InstanceType, InstanceOption]
    workload: PlanWorkload
    engine: EngineSettings
    sim: SimSettings
    say: Progress
    checks: list[FleetCheck] = field(default_factory=list)
    stopped_early: bool = False
    _queues: dict[str, list[tuple[float, int, Fleet]]] = field(
        default_factory=lambda: {kind: [] for kind in KINDS})
    _abandoned: list[Unsimulated] = field(default_factory=list)
    _order: itertools.count = field(default_factory=itertools.count)
    _num_simulations: int = 0

    def start(self, options: Sequence[InstanceOption]) -> None:
        rate = self.goal.rate
        for option in options:
            if option.colocated_rate is not None:
                self._push(Fleet.colocated(option.instance, math.ceil(rate / option.colocated_rate)))
        for prefill in options:
            for decode in options:
                if prefill.prefill_rate is None or decode.decode_rate is None:
                    continue
                if kv_link(prefill, decode, self.sim.link_latency_s) is None:
                    continue
                self._push(Fleet.disaggregated(prefill.instance, math.ceil(rate / prefill.prefill_rate),
                                               decode.instance, math.ceil(rate / decode.decode_rate)))

    def run(self) -> None:
        while True:
            kind = self._next_kind()
            if kind is None:
                return
            if self._num_simulations >= self.settings.max_simulations:
                self.stopped_early = True
                self.say(f"stopping: the budget of {self.settings.max_simulations} simulations is spent")
                return
            _, _, fleet = heapq.heappop(self._queues[kind])
            check = self._simulate(fleet, self.goal.rate, f"{self._num_simulations + 1}/"
                                   f"{self.settings.max_simulations}")
            self.checks.append(check)
            if not check.meets:
                self._push(grow(check, self.goal.slo))

    def headroom(self, best: FleetCheck) -> Headroom:
        # Rates above the roofline's optimistic throughput fail without simulation (the batch
        # would grow without bound), so the bisection runs between the target and the lower
        # of twice the target and that capacity.
        target, capacity = self.goal.rate, self._capacity(best.fleet)
        low, high = target, None
        top = min(2 * target, capacity)
        probes = [best]
        if top <= target * 1.01:
            self.say(f"headroom of {best.fleet.label}: none beyond the target by the roofline "
                     f"({capacity:.3g} req/s)")
            return Headroom(low, None, capacity, tuple(probes))
        for step in range(self.settings.headroom_steps):
            rate = top if high is None else (low + high) / 2
            check = self._simulate(best.fleet, rate, f"headroom {step + 1}/{self.settings.headroom_steps}")
            probes.append(check)
            if check.meets:
                low = rate
                if high is None:
                    break  # meets at the top of the range: nothing left to bisect
            else:
                high = rate
        return Headroom(low, high, capacity, tuple(sorted(probes, key=lambda c: c.rate)))

    def unsimulated(self) -> list[Unsimulated]:
        best = {kind: self._best_cost(kind) for kind in KINDS}
        left = []
        for kind, queue in self._queues.items():
            for cost, _, fleet in sorted(queue):
                best_cost = best[kind]
                if best_cost is not None and cost >= best_cost:
                    why = f"costs at least ${cost:.2f}/h, not below the best {kind} fleet"
                else:
                    why = "the simulation budget ran out first"
                left.append(Unsimulated(fleet, why))
        return [*self._abandoned, *left]

    # -- internals -------------------------------------------------------------------------

    def _simulate(self, fleet: Fleet, rate: float, tag: str) -> FleetCheck:
        self.say(f"[{tag}] {fleet.label} (${fleet.usd_per_hour:.2f}/h) at {rate:.3g} req/s ...")
        check = check_fleet(fleet, rate, self.options, self.workload, self.goal, self.engine, self.sim)
        self._num_simulations += 1
        self.say(f"    {check.slice_label}, {check.num_requests} requests, {check.wall_seconds:.1f} s: "
                 f"{check.summary()}")
        return check

    def _capacity(self, fleet: Fleet) -> float:
        """The roofline's (optimistic) requests/s for the whole fleet: its slowest pool."""
        rates = []
        for pool in fleet.pools:
            option = self.options[pool.instance]
            per_instance = {"colocated": option.colocated_rate, "prefill": option.prefill_rate,
                            "decode": option.decode_rate}[pool.role]
            rates.append(pool.count * per_instance if per_instance is not None else 0.0)
        return min(rates)

    def _push(self, fleet: Fleet) -> None:
        if fleet.num_instances > self.settings.max_instances:
            self._abandoned.append(Unsimulated(
                fleet, f"needs more than --max-instances {self.settings.max_instances}"))
            return
        heapq.heappush(self._queues[fleet.kind], (fleet.usd_per_hour, next(self._order), fleet))

    def _best_cost(self, kind: str) -> float | None:
        costs = [c.fleet.usd_per_hour for c in self.checks if c.meets and c.fleet.kind == kind]
        return min(costs) if costs else None

    def _next_kind(self) -> str | None:
        """The kind whose cheapest queued fleet is cheapest, among kinds that could still improve."""
        heads = []
        for kind, queue in self._queues.items():
            best = self._best_cost(kind)
            if queue and (best is None or queue[0][0] < best):
                heads.append((queue[0][0], kind))
        return min(heads)[1] if heads else None


def grow(check: FleetCheck, slo: SLO) -> Fleet:
    """The next fleet of a family after a miss: the pool at fault grown (see the module doc)."""
    fleet = check.fleet
    if not fleet.is_disaggregated:
        return fleet.with_counts(_grown(fleet.pools[0].count))
    ttft_late, tpot_late = check.ttft > slo.ttft, check.tpot > slo.tpot
    prefill_busy = dict(check.utilization).get("prefill", 1.0) > _BUSY_PREFILL
    grow_prefill = ttft_late and prefill_busy
    grow_decode = tpot_late or (ttft_late and not prefill_busy)
    if not (grow_prefill or grow_decode):  # attainment alone, or rejections
        grow_prefill = check.ttft_miss >= check.tpot_miss
        grow_decode = check.tpot_miss >= check.ttft_miss
    prefill, decode = (pool.count for pool in fleet.pools)
    return fleet.with_counts(_grown(prefill) if grow_prefill else prefill,
                             _grown(decode) if grow_decode else decode)


def _grown(count: int) -> int:
    # One instance at a time while pools are small; an eighth of the pool when large, so a
    # poor estimate costs a few simulations, at the price of up to ~12% over the minimum.
    return count + max(1, math.ceil(count / 8))

