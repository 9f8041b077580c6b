"""Checking one fleet against the SLOs with the simulator.

**A slice, not the whole fleet.** A simulation costs about 20 us of Python per generated
token, and what matters is each instance's steady state: at 100 req/s of 500-token answers a
fleet holds thousands of requests in flight, and reaching steady state takes a few request
lifetimes. So the simulator runs a slice of the fleet with the same load per instance: ``m``
instances of the smaller pool and ``floor(m * larger / smaller)`` of the larger one, receiving
the share ``m / smaller`` of the traffic. The larger pool is rounded *down*, so when the ratio
does not divide its instances carry a little more than in the whole fleet (conservative); a
slice also balances over fewer instances than the fleet's router does (conservative again).
``m`` is as large as the request budget allows while the slice still sees several lifetimes
of arrivals; often it is 1.

**Steady state only.** Requests that arrive in the first median lifetime (the cluster is still
filling up) or in the last half lifetime (it is draining) are left out of the statistics. A
slice that passes after fewer than 2.5 lifetimes of arrivals is simulated once more with
enough requests (up to 4x), because an overloaded instance's batch keeps growing for as long
as arrivals last and a short run cannot tell it from a loaded one.

KV transfers go over the *network* of the slower side's node, each instance getting its
share of the node's NIC (``network_bytes_per_s * tp / gpus_per_node``), at the link
efficiency: prefill and decode instances are on different nodes (they are different hardware
in most plans), and the simulator does not model link contention, so the share stands for it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from pdserve.planner.plan.fleet import Fleet, InstanceType
from pdserve.planner.plan.screen import EngineSettings, InstanceOption
from pdserve.planner.plan.workload import PlanWorkload
from pdserve.planner.sim.config import ClusterSpec, InstanceSpec, LinkSpec
from pdserve.planner.sim.simulator import simulate
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import SLO, latencies, percentile

# A slice should see this many request lifetimes of arrivals before it grows past one unit.
_WINDOW_LIFETIMES = 4.0
# Below this many lifetimes of arrivals, a passing verdict is flagged as possibly optimistic.
_SHORT_WINDOW_LIFETIMES = 2.5
# A short window is simulated again with at most this many times the requests.
_MAX_EXTENSION = 4


@dataclass(frozen=True)
class PlanGoal:
    """What the fleet must achieve."""

    rate: float
    """Requests per second."""
    slo: SLO
    percentile: float = 90.0
    """TTFT and TPOT are judged at this percentile of the measured requests."""
    attainment: float = 0.9
    """Share of requests that must meet both SLOs at once."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"the rate must be > 0 req/s, got {self.rate!r}")
        if not (self.slo.ttft > 0 and self.slo.tpot > 0):
            raise ValueError("the TTFT and TPOT SLOs must be > 0 s")
        if not 0 < self.percentile < 100:
            raise ValueError(f"the percentile must be in (0, 100), got {self.percentile!r}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"the attainment goal must be in (0, 1], got {self.attainment!r}")


@dataclass(frozen=True)
class SimSettings:
    num_requests: int = 1000
    """Requests per simulation (the cost of one is about proportional to their output tokens)."""
    seed: int = 0
    routing: str = "least_loaded"
    router_overhead_s: float = 0.002
    """Arrival at the router to arrival at an instance (HTTP hop, tokenization)."""
    link_latency_s: float = 1e-3
    """Fixed cost of one KV transfer (connection, the first byte's trip)."""
    first_token_after_transfer: bool = True
    """pdserve's router streams the decode worker's events, so the client's first token comes
    after the transfer; False is DistServe's accounting (first token at the prefill's end)."""
    imports_at_step_boundaries: bool = True
    """pdserve's decode worker reserves and adopts incoming KV between its steps."""

    def __post_init__(self) -> None:
        if self.num_requests < 10:
            raise ValueError(f"a simulation needs at least 10 requests, got {self.num_requests}")


@dataclass(frozen=True)
class FleetCheck:
    """One simulation of a fleet at a rate, and the verdict."""

    fleet: Fleet
    rate: float
    slice_label: str
    """What was simulated, e.g. "1 prefill + 6 decode at 50 req/s"."""
    slice_exact: bool
    """False when the larger pool was rounded down in the slice (then conservative)."""
    num_requests: int
    num_measured: int
    window_s: float
    """Simulated seconds of arrivals."""
    lifetime_s: float
    """Median end-to-end latency: how long a request stays in the cluster."""
    ttft: float
    """At the goal's percentile, seconds (inf when nothing completed)."""
    tpot: float
    attainment: float
    ttft_miss: float
    """Share of measured requests missing the TTFT SLO (failures included)."""
    tpot_miss: float
    num_failed: int
    utilization: tuple[tuple[str, float], ...]
    """(role, busy fraction) per pool over the whole simulation."""
    meets: bool
    reasons: tuple[str, ...]
    """Why it fails; empty when it meets the goal."""
    wall_seconds: float

    @property
    def short_window(self) -> bool:
        """The slice saw few lifetimes of arrivals: steady state is uncertain."""
        return self.window_s < _SHORT_WINDOW_LIFETIMES * self.lifetime_s

    def summary(self) -> str:
        head = (f"TTFT {self.ttft:.3f} s, TPOT {self.tpot * 1000:.1f} ms, "
                f"attainment {self.attainment:.1%}")
        return f"{head}: meets" if self.meets else f"{head}: fails ({'; '.join(self.reasons)})"


def kv_link(prefill: InstanceOption, decode: InstanceOption, latency_s: float) -> LinkSpec | None:
    """The link a KV transfer gets: the slower side's per-instance share of its node's network,
    at the link efficiency; None when a side's network is unknown."""
    shares = []
    for option in (prefill, decode):
        hardware = option.cost_model.hardware
        if hardware.network_bytes_per_s is None:
            return None
        per_instance = option.instance.tensor_parallel / hardware.gpus_per_node
        shares.append(hardware.network_bytes_per_s * min(1.0, per_instance))
    link_efficiency = prefill.cost_model.efficiency.link
    return LinkSpec(bandwidth_bytes_per_s=min(shares) * link_efficiency, latency_s=latency_s)


def slice_counts(fleet: Fleet, rate: float, num_requests: int, lifetime_s: float) -> tuple[tuple[int, ...], float]:
    """Instances per pool of the slice to simulate, and the share of the traffic it gets."""
    counts = [pool.count for pool in fleet.pools]
    smaller = min(counts)
    window_of_one = num_requests * smaller / rate  # seconds of arrivals with m = 1
    units = max(1, min(smaller, math.floor(window_of_one / (_WINDOW_LIFETIMES * lifetime_s))))
    return tuple(units * count // smaller for count in counts), units / smaller


def check_fleet(fleet: Fleet, rate: float, options: Mapping[InstanceType, InstanceOption],
                workload: PlanWorkload, goal: PlanGoal, engine: EngineSettings,
                settings: SimSettings) -> FleetCheck:
    """Simulate a slice of ``fleet`` at ``rate`` req/s and judge it against ``goal``."""
    started = time.perf_counter()
    check = _check(fleet, rate, options, workload, goal, engine, settings, settings.num_requests)
    if check.meets and check.short_window:
        # A pass from a cluster still filling up may not hold in steady state (an overloaded
        # instance's batch grows for as long as arrivals last): once, with a longer window.
        scale = _SHORT_WINDOW_LIFETIMES * check.lifetime_s / max(check.window_s, 1e-9)
        num_requests = min(math.ceil(settings.num_requests * scale * 1.1), _MAX_EXTENSION * settings.num_requests)
        check = _check(fleet, rate, options, workload, goal, engine, settings, num_requests)
    return replace(check, wall_seconds=time.perf_counter() - started)


def _check(fleet: Fleet, rate: float, options: Mapping[InstanceType, InstanceOption],
           workload: PlanWorkload, goal: PlanGoal, engine: EngineSettings, settings: SimSettings,
           num_requests: int) -> FleetCheck:
    started = time.perf_counter()
    expected_lifetime = goal.slo.ttft + max(workload.mean_output_tokens - 1, 0) * goal.slo.tpot
    counts, share = slice_counts(fleet, rate, num_requests, expected_lifetime)
    specs = [
        tuple([InstanceSpec(options[pool.instance].cost_model, options[pool.instance].num_blocks,
                            engine.block_size, engine.scheduler)] * count)
        for pool, count in zip(fleet.pools, counts, strict=True)
    ]
    if fleet.is_disaggregated:
        prefill, decode = (options[pool.instance] for pool in fleet.pools)
        link = kv_link(prefill, decode, settings.link_latency_s)
        if link is None:
            raise ValueError(f"{fleet.label}: no network bandwidth known for a KV link")
        cluster = ClusterSpec(prefill=specs[0], decode=specs[1], link=link, routing=settings.routing,
                              router_overhead_s=settings.router_overhead_s,
                              first_token_after_transfer=settings.first_token_after_transfer,
                              imports_at_step_boundaries=settings.imports_at_step_boundaries)
    else:
        cluster = ClusterSpec(colocated=specs[0], routing=settings.routing,
                              router_overhead_s=settings.router_overhead_s)
    requests = workload.requests(rate, share, num_requests, settings.seed)
    if len(requests) < 10:
        raise ValueError(f"{fleet.label}: only {len(requests)} requests of the trace reach a slice of "
                         "the fleet; use a longer trace")
    result = simulate(cluster, requests)
    roles = " + ".join(f"{n} {pool.role}" for n, pool in zip(counts, fleet.pools, strict=True))
    exact = all(n * min(p.count for p in fleet.pools) == p.count * min(counts)
                for n, p in zip(counts, fleet.pools, strict=True))
    return _judge(fleet, rate, f"{roles} at {rate * share:.3g} req/s", exact, result.records,
                  tuple((role, stats.utilization) for role, stats in result.pools.items()),
                  goal, time.perf_counter() - started)


def _judge(fleet: Fleet, rate: float, slice_label: str, slice_exact: bool,
           records: list[RequestRecord], utilization: tuple[tuple[str, float], ...],
           goal: PlanGoal, wall_seconds: float) -> FleetCheck:
    slo, q = goal.slo, goal.percentile
    start, end = records[0].scheduled, records[-1].scheduled
    window = end - start
    lifetimes = [r.e2e for r in records if r.ok and r.e2e is not None]
    lifetime = statistics.median(lifetimes) if lifetimes else math.inf
    warmup, cooldown = min(lifetime, 0.4 * window), min(lifetime / 2, 0.2 * window)
    measured = [r for r in records if start + warmup <= r.scheduled <= end - cooldown] or records
    values = latencies(measured)
    ttft = percentile(values["ttft"], q) if values["ttft"] else math.inf
    tpot = percentile(values["tpot"], q) if values["tpot"] else 0.0
    failed = sum(not r.ok for r in measured)
    ttft_miss = sum(not r.ok or (r.ttft or 0.0) > slo.ttft for r in measured) / len(measured)
    tpot_miss = sum(not r.ok or (r.tpot or 0.0) > slo.tpot for r in measured) / len(measured)
    attainment = sum(slo.met_by(r) for r in measured) / len(measured)
    reasons = []
    if failed:
        reasons.append(f"{failed} requests rejected (KV pool too small)")
    if ttft > slo.ttft:
        reasons.append(f"TTFT p{q:g} {ttft:.3f} s > {slo.ttft:g} s")
    if tpot > slo.tpot:
        reasons.append(f"TPOT p{q:g} {tpot * 1000:.1f} ms > {slo.tpot * 1000:g} ms")
    if attainment < goal.attainment:
        reasons.append(f"attainment {attainment:.1%} < {goal.attainment:.0%}")
    return FleetCheck(
        fleet=fleet, rate=rate, slice_label=slice_label, slice_exact=slice_exact,
        num_requests=len(records), num_measured=len(measured), window_s=window, lifetime_s=lifetime,
        ttft=ttft, tpot=tpot, attainment=attainment, ttft_miss=ttft_miss, tpot_miss=tpot_miss,
        num_failed=failed, utilization=utilization, meets=not reasons, reasons=tuple(reasons),
        wall_seconds=wall_seconds,
    )
