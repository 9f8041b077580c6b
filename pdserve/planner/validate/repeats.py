"""Repeated runs of the same load: is a prediction as close to the measurement as the runs are
to each other?

A rate point of 8 requests has a p90 that is close to its slowest request, so two runs of the
very same command (same seed, same arrivals, same lengths) can differ by more than the 20% the
planner is judged by. Points of several runs with the same workload, target and rate are grouped
here, and each percentile is judged by the wider of two bands:

- the tolerance (20%) of the measurements' median, or
- the spread of the runs: their maximum minus their minimum;

a prediction passes when the median of its predictions (each run's requests replayed) is at
most that far from the median of the measurements.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.planner.validate.replay import Comparison, PointResult


@dataclass(frozen=True)
class RepeatedComparison:
    """One percentile of one metric over the repeated runs of a point."""

    metric: str
    quantile: int
    measured: tuple[float, ...]
    """One value per run, in the order of the runs."""
    predicted: tuple[float, ...]

    @property
    def measured_median(self) -> float:
        return _median(self.measured)

    @property
    def predicted_median(self) -> float:
        return _median(self.predicted)

    @property
    def spread(self) -> float:
        """Largest minus smallest measurement (0 for one run; NaN when a run has no value)."""
        if not all(math.isfinite(v) for v in self.measured) or not self.measured:
            return math.nan
        return max(self.measured) - min(self.measured)

    def allowed_error(self, tolerance: float) -> float:
        """How far (seconds) the prediction may be from the measured median."""
        return max(tolerance * self.measured_median, self.spread)

    @property
    def relative_error(self) -> float:
        """Of the predicted median against the measured one, as a single run's (NaN if missing)."""
        return Comparison(self.metric, self.quantile, self.measured_median, self.predicted_median).relative_error

    def within(self, tolerance: float) -> bool:
        allowed = self.allowed_error(tolerance)
        error = self.predicted_median - self.measured_median
        return math.isfinite(allowed) and math.isfinite(error) and abs(error) <= allowed


@dataclass(frozen=True)
class RepeatedPoint:
    """One workload, target and rate, measured in several runs."""

    workload: str
    target: str
    rate: float
    sources: tuple[str, ...]
    comparisons: tuple[RepeatedComparison, ...]

    def misses(self, tolerance: float) -> list[str]:
        return [f"{c.metric} p{c.quantile}" for c in self.comparisons if not c.within(tolerance)]


def group_repeats(results: Sequence[PointResult]) -> list[RepeatedPoint]:
    """Points of the same workload, target and rate from different runs, in first-seen order.
    Points that replayed no request are left out (they have nothing to compare)."""
    groups: dict[tuple[str, str, float], list[PointResult]] = {}
    for result in results:
        if result.num_replayed:
            groups.setdefault((result.workload, result.target, result.rate), []).append(result)
    repeated = []
    for (workload, target, rate), points in groups.items():
        comparisons = tuple(
            RepeatedComparison(first.metric, first.quantile,
                               tuple(p.comparisons[i].measured for p in points),
                               tuple(p.comparisons[i].predicted for p in points))
            for i, first in enumerate(points[0].comparisons)
        )
        repeated.append(RepeatedPoint(workload, target, rate, tuple(p.source for p in points), comparisons))
    return repeated


def _median(values: Sequence[float]) -> float:
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan
    return float(statistics.median(values))
