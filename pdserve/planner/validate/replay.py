"""Validation: replay a load run's real requests through the simulator with measured step costs,
and compare the predicted TTFT and TPOT percentiles with what the clients measured.

``pdserve bench compare`` runs targets on this machine (bench/load/targets.py); each becomes the
cluster it was, each instance timed by the calibrated profile (calibrate/step_profile.py) for its threads:

| target | simulated cluster |
|---|---|
| ``colocated`` | 1 colocated instance, the 2-thread profile |
| ``disaggregated`` | 1 prefill + 1 decode instance, the 1-thread profile, a shared-memory link (*) |
| ``replicas`` | 2 colocated instances, the 1-thread profile, least-loaded routing |
| ``colocated-1core`` | 1 colocated instance, the 1-thread profile |

(*) The client's first token comes after the KV transfer, as pdserve's router streams it today,
and the decode instance takes KV in only between its steps, as pdserve's decode worker does.

Every instance has the engine's default ``SchedulerConfig`` and the KV pool ``pdserve serve``
gives a worker by default (``--kv-memory-mb 512``: 512 MiB / (KV bytes per token x 16) blocks).
Each rate point replays its own request stream: every record's ``sent`` time as the arrival,
its ``prompt_tokens`` and ``output_tokens`` as the lengths. Records with an error (or no first
token or end) are skipped and counted. The prediction is judged per point on p50 and p90 of
TTFT and TPOT, by relative error; a miss is a finding, not a failure of the tool.

With ``unloaded_correction``, the target that fixed the run's SLOs (it was measured alone
before the load, and the run recorded its median prompt's length) is simulated with its profile
scaled by the unloaded serving factors (``serving_factors.py``). The other targets keep the
profile as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.config import SchedulerConfig
from pdserve.planner.calibrate.step_profile import StepProfile
from pdserve.planner.cost.step_cost import StepCostModel
from pdserve.planner.sim.config import ClusterSpec, InstanceSpec, LinkSpec
from pdserve.planner.sim.requests import SimRequest
from pdserve.planner.sim.simulator import simulate
from pdserve.planner.validate.serving_factors import (
    PhaseScaledCost,
    UnloadedMeasurement,
    serving_factors,
)
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import percentile

METRICS = ("ttft", "tpot")
QUANTILES = (50, 90)


@dataclass(frozen=True)
class TargetLayout:
    """How one bench target maps onto a simulated cluster."""

    threads: int
    """Which profile times its instances: torch threads per worker."""
    num_colocated: int = 0
    disaggregated: bool = False
    routing: str = "round_robin"


TARGET_LAYOUTS = {
    "colocated": TargetLayout(threads=2, num_colocated=1),
    "disaggregated": TargetLayout(threads=1, disaggregated=True),
    "replicas": TargetLayout(threads=1, num_colocated=2, routing="least_loaded"),
    "colocated-1core": TargetLayout(threads=1, num_colocated=1),
}


@dataclass(frozen=True)
class ValidationSettings:
    link_bytes_per_s: float = 10e9
    """Shared-memory KV copy between the two workers of ``disaggregated`` (one host)."""
    link_latency_s: float = 1e-3
    """Fixed cost of one transfer: the pull request, the handshake."""
    router_overhead_s: float = 0.0
    """Added to every request's arrival (HTTP hops, tokenization): 0 = count only steps."""
    kv_memory_bytes: int = 512 << 20
    """Per worker, as ``pdserve serve --kv-memory-mb 512`` (the default)."""
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The engine's defaults, as every ``pdserve serve`` worker runs them."""
    tolerance: float = 0.2
    """A prediction within this relative error of the measurement passes."""
    unloaded_correction: bool = False
    """Scale the SLO-fixing target's profile by its unloaded serving factors."""

    def __post_init__(self) -> None:
        if not (self.link_bytes_per_s > 0 and self.tolerance > 0 and self.kv_memory_bytes > 0):
            raise ValueError("link bandwidth, tolerance and KV memory must be positive")


def cluster_for(layout: TargetLayout, profile: StepProfile, settings: ValidationSettings,
                cost: StepCostModel | None = None) -> ClusterSpec:
    """The simulated cluster of a bench target, its instances timed by ``cost`` (default: the
    profile's own cost model)."""
    num_blocks = settings.kv_memory_bytes // (profile.kv_bytes_per_token * settings.block_size)
    instance = InstanceSpec(cost or profile.cost_model(), num_blocks=num_blocks, block_size=settings.block_size,
                            scheduler=settings.scheduler)
    if layout.disaggregated:
        return ClusterSpec(
            prefill=(instance,), decode=(instance,),
            link=LinkSpec(settings.link_bytes_per_s, settings.link_latency_s),
            routing=layout.routing, router_overhead_s=settings.router_overhead_s,
            first_token_after_transfer=True, imports_at_step_boundaries=True,
        )
    return ClusterSpec(colocated=(instance,) * layout.num_colocated, routing=layout.routing,
                       router_overhead_s=settings.router_overhead_s)


def replayable(records: Sequence[RequestRecord]) -> tuple[list[RequestRecord], int]:
    """The records that completed (replayed and compared), and how many were skipped."""
    kept = [r for r in records if r.ok and r.prompt_tokens >= 1 and r.output_tokens >= 1]
    return kept, len(records) - len(kept)


@dataclass(frozen=True)
class Comparison:
    """One percentile of one metric at one point."""

    metric: str
    """``ttft`` or ``tpot``."""
    quantile: int
    measured: float
    predicted: float

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured; NaN when either side has no value."""
        if not (math.isfinite(self.measured) and math.isfinite(self.predicted)) or self.measured <= 0:
            return math.nan
        return (self.predicted - self.measured) / self.measured

    def within(self, tolerance: float) -> bool:
        error = self.relative_error
        return math.isfinite(error) and abs(error) <= tolerance


@dataclass(frozen=True)
class PointResult:
    source: str
    """The compare.json it came from."""
    target: str
    rate: float
    num_replayed: int
    num_skipped: int
    comparisons: tuple[Comparison, ...]
    predicted_rejected: int = 0
    """Requests the simulated cluster refused (they could never fit its KV pool)."""
    workload: str = ""
    """The run's workload preset (repeated runs are grouped by workload, target and rate)."""

    def misses(self, tolerance: float) -> list[str]:
        return [f"{c.metric} p{c.quantile}" for c in self.comparisons if not c.within(tolerance)]


def validate_point(source: str, target: str, rate: float, records: Sequence[RequestRecord],
                   cluster: ClusterSpec, workload: str = "") -> PointResult:
    """Replay one rate point's requests on ``cluster`` and compare the percentiles."""
    kept, skipped = replayable(records)
    if not kept:
        empty = tuple(Comparison(m, q, math.nan, math.nan) for m in METRICS for q in QUANTILES)
        return PointResult(source, target, rate, 0, skipped, empty, workload=workload)
    shift = min(0.0, min(r.sent for r in kept))  # arrivals must be >= 0
    requests = [SimRequest(r.sent - shift, r.prompt_tokens, r.output_tokens, r.kind) for r in kept]
    predicted = simulate(cluster, requests).records
    comparisons = tuple(
        Comparison(metric, q, _percentile(kept, metric, q), _percentile(predicted, metric, q))
        for metric in METRICS for q in QUANTILES
    )
    rejected = sum(1 for r in predicted if r.error is not None)
    return PointResult(source, target, rate, len(kept), skipped, comparisons, rejected, workload)


def _percentile(records: Sequence[RequestRecord], metric: str, q: int) -> float:
    values = [v for v in (getattr(r, metric) for r in records if r.ok) if v is not None]
    return percentile(values, q)


def validate_comparison(source: str, data: Mapping[str, Any], profiles: Mapping[int, StepProfile],
                        settings: ValidationSettings) -> tuple[list[PointResult], list[str]]:
    """Every pdserve target's every point of one compare.json; notes on what was left out."""
    if "targets" not in data or "rates" not in data:
        raise ValueError(f"{source}: not a compare.json of `pdserve bench compare` (no targets and rates)")
    results: list[PointResult] = []
    notes: list[str] = []
    for name, entry in data["targets"].items():
        layout = TARGET_LAYOUTS.get(name)
        if layout is None:
            notes.append(f"{source}: {name}: not a pdserve target, not simulated")
            continue
        if "error" in entry:
            notes.append(f"{source}: {name}: the target failed in the run ({entry['error']})")
            continue
        profile = profiles.get(layout.threads)
        if profile is None:
            notes.append(f"{source}: {name}: no {layout.threads}-thread profile given, not simulated")
            continue
        cost: StepCostModel = profile.cost_model()
        if settings.unloaded_correction:
            unloaded = unloaded_measurement(data, name)
            if unloaded is None:
                notes.append(f"{source}: {name}: not corrected (not measured alone in this run)")
            else:
                factors = serving_factors(cost, unloaded, settings.scheduler.max_num_batched_tokens)
                cost = PhaseScaledCost(cost, *factors)
                notes.append(f"{source}: {name}: profile scaled by its unloaded serving factors: prefill "
                             f"x{factors[0]:.2f}, decode x{factors[1]:.2f} (a {unloaded.prompt_tokens}-token "
                             f"prompt alone: TTFT {unloaded.ttft * 1000:.0f} ms, TPOT {unloaded.tpot * 1000:.1f} ms)")
        cluster = cluster_for(layout, profile, settings, cost)
        for point in entry.get("points", []):
            if point.get("skipped"):
                notes.append(f"{source}: {name} at {point['rate']:g} req/s: skipped in the run ({point['skipped']})")
                continue
            records = [RequestRecord.from_json(r) for r in point.get("records", [])]
            results.append(validate_point(source, name, float(point["rate"]), records, cluster,
                                          str(data.get("workload", ""))))
    return results, notes


def unloaded_measurement(data: Mapping[str, Any], target: str) -> UnloadedMeasurement | None:
    """What the run measured of ``target`` alone (its SLO calibration), if it fixed the SLOs and
    recorded the prompt's length (runs before that field have no such measurement)."""
    basis = data.get("slo_basis")
    if not isinstance(basis, dict) or basis.get("target") != target or not basis.get("prompt_tokens"):
        return None
    return UnloadedMeasurement(int(basis["prompt_tokens"]), float(basis["isolated_ttft"]),
                               float(basis["isolated_tpot"]))
