"""Repeated runs in `pdserve plan validate`: grouping by workload, target and rate, and the
"within the tolerance or the runs' spread, whichever is wider" judgement, by hand."""

from __future__ import annotations

import math

import pytest

from pdserve.planner.validate.repeats import RepeatedComparison, group_repeats
from pdserve.planner.validate.replay import METRICS, QUANTILES, Comparison, PointResult


def _point(source: str, workload: str, target: str, rate: float, measured: float, predicted: float,
           num_replayed: int = 8) -> PointResult:
    """A point whose four percentiles all have the same measured and predicted value."""
    comparisons = tuple(Comparison(m, q, measured, predicted) for m in METRICS for q in QUANTILES)
    return PointResult(source, target, rate, num_replayed, 0, comparisons, workload=workload)


def test_the_spread_widens_the_band_when_the_runs_disagree() -> None:
    # Runs measured 1.0, 1.5 and 2.0 s: median 1.5, spread 1.0 (67% of the median, wider than 20%).
    runs = (1.0, 2.0, 1.5)
    close = RepeatedComparison("ttft", 90, runs, (2.4, 2.4, 2.4))
    assert close.measured_median == 1.5 and close.spread == pytest.approx(1.0)
    assert close.allowed_error(0.2) == pytest.approx(1.0)
    assert close.relative_error == pytest.approx(0.6)  # +60%: a miss by 20% alone...
    assert close.within(0.2)  # ...but 0.9 s from the median, within the runs' 1.0 s spread
    assert not RepeatedComparison("ttft", 90, runs, (2.6, 2.6, 2.6)).within(0.2)  # 1.1 s off
    # The prediction's median is what counts: one wild replay does not move it.
    assert RepeatedComparison("ttft", 90, runs, (0.1, 2.4, 2.45)).within(0.2)


def test_the_tolerance_is_the_band_when_the_runs_agree() -> None:
    # 1.0, 1.05, 1.1: spread 0.1 s, narrower than 20% of the median (0.21 s).
    runs = (1.0, 1.05, 1.1)
    assert RepeatedComparison("tpot", 50, runs, (1.25,) * 3).allowed_error(0.2) == pytest.approx(0.21)
    assert RepeatedComparison("tpot", 50, runs, (1.25,) * 3).within(0.2)
    assert RepeatedComparison("tpot", 50, runs, (0.85,) * 3).within(0.2)
    assert not RepeatedComparison("tpot", 50, runs, (1.27,) * 3).within(0.2)
    assert not RepeatedComparison("tpot", 50, runs, (0.83,) * 3).within(0.2)


def test_a_run_without_a_value_fails_the_number() -> None:
    missing = RepeatedComparison("ttft", 50, (1.0, math.nan, 1.2), (1.1, 1.1, 1.1))
    assert math.isnan(missing.spread) and not missing.within(0.2)


def test_points_are_grouped_by_workload_target_and_rate() -> None:
    results = [
        _point("run-1/load-mixed/compare.json", "mixed", "colocated", 0.1, 1.0, 1.3),
        _point("run-1/load-mixed/compare.json", "mixed", "colocated", 0.2, 2.0, 2.0),
        _point("run-1/load-summarize/compare.json", "summarize", "colocated", 0.1, 5.0, 5.0),
        _point("run-2/load-mixed/compare.json", "mixed", "colocated", 0.1, 1.5, 1.3),
        _point("run-2/load-mixed/compare.json", "mixed", "disaggregated", 0.1, 1.0, 1.0),
        _point("run-3/load-mixed/compare.json", "mixed", "colocated", 0.1, 2.0, 1.4),
        _point("run-3/load-mixed/compare.json", "mixed", "colocated", 0.2, 2.0, 2.0, num_replayed=0),
    ]
    groups = {(g.workload, g.target, g.rate): g for g in group_repeats(results)}
    assert sorted((key, len(g.sources)) for key, g in groups.items()) == [
        (("mixed", "colocated", 0.1), 3), (("mixed", "colocated", 0.2), 1),
        (("mixed", "disaggregated", 0.1), 1), (("summarize", "colocated", 0.1), 1)]
    mixed = groups["mixed", "colocated", 0.1]
    ttft_p50 = mixed.comparisons[0]
    assert (ttft_p50.metric, ttft_p50.quantile) == ("ttft", 50)
    assert ttft_p50.measured == (1.0, 1.5, 2.0) and ttft_p50.predicted == (1.3, 1.3, 1.4)
    # Median 1.5 against 1.3: -13%, within 20% (and within the spread of 1.0).
    assert mixed.misses(0.2) == []
    # One run alone: only the tolerance. 1.3 against 1.0 is +30%.
    alone = group_repeats(results[:1])[0]
    assert alone.misses(0.2) == ["ttft p50", "ttft p90", "tpot p50", "tpot p90"]

