"""Summary statistics of a load run: latency percentiles, throughput, SLO attainment, goodput.

Goodput is DistServe's: completed requests per second that met *both* the time-to-first-token
and the time-per-output-token SLO. SLO attainment is the share of all requests (failures
included, as misses) that met both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.traffic.records import RequestRecord

PERCENTILES = (50, 90, 99)
ATTAINMENT_GOAL = 0.9
"""The share of requests that must meet the SLO for a rate to count as served."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class SLO:
    ttft: float
    """Seconds to the first token."""
    tpot: float
    """Seconds per output token after the first."""

    def met_by(self, record: RequestRecord) -> bool:
        return _meets(record, self.ttft, self.tpot)


@dataclass(frozen=True)
class LengthScaledSLO:
    """A second SLO pair: the TTFT budget of ``base`` scales with the prompt above
    ``reference_tokens`` (the workload's median prompt); the TPOT SLO stays as it is.
    Why and how it is used: ``bench/load/length_scaled.py``."""

    base: SLO
    reference_tokens: int

    def ttft_budget(self, prompt_tokens: int) -> float:
        return self.base.ttft * max(1.0, prompt_tokens / self.reference_tokens)

    def met_by(self, record: RequestRecord) -> bool:
        return _meets(record, self.ttft_budget(record.prompt_tokens), self.base.tpot)


def _meets(record: RequestRecord, ttft: float, tpot: float) -> bool:
    if not record.ok or record.ttft is None or record.ttft > ttft:
        return False
    measured = record.tpot
    return measured is None or measured <= tpot  # a one-token answer has no TPOT to miss


@dataclass(frozen=True)
class Distribution:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        mean = sum(values) / len(values) if values else math.nan
        return cls(mean, *(percentile(values, q) for q in PERCENTILES))


@dataclass(frozen=True)
class Summary:
    requests: int
    completed: int
    failed: int
    duration: float
    """From the first send to the last response."""
    request_throughput: float
    output_throughput: float
    """Output tokens per second."""
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    slo: SLO | LengthScaledSLO | None
    slo_attainment: float | None
    goodput: float | None
    """Requests per second meeting the SLO."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """The completed requests' TTFTs, TPOTs, inter-token gaps and end-to-end times (seconds)."""
    done = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [gap for r in done for gap in r.inter_token_latencies()],
        "e2e": [r.e2e for r in done if r.e2e is not None],
    }


def summarize(records: Sequence[RequestRecord], slo: SLO | LengthScaledSLO | None = None) -> Summary:
    done = [r for r in records if r.ok]
    values = latencies(records)
    starts = [r.sent for r in records]
    ends = [r.end for r in records if r.end is not None]
    duration = (max(ends) - min(starts)) if ends and starts else 0.0
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: math.nan)
    met = sum(slo.met_by(r) for r in records) if slo else None
    return Summary(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration=duration,
        request_throughput=per_second(len(done)),
        output_throughput=per_second(sum(r.output_tokens for r in done)),
        ttft=Distribution.of(values["ttft"]),
        tpot=Distribution.of(values["tpot"]),
        itl=Distribution.of(values["itl"]),
        e2e=Distribution.of(values["e2e"]),
        slo=slo,
        slo_attainment=(met / len(records) if records else math.nan) if met is not None else None,
        goodput=per_second(met) if met is not None else None,
    )


def max_rate_meeting_goal(points: Sequence[dict[str, Any]], goal: float = ATTAINMENT_GOAL) -> float | None:
    """The highest rate whose SLO attainment is at least ``goal`` (None if none is)."""
    meeting = [p["rate"] for p in points if p["slo_attainment"] is not None and p["slo_attainment"] >= goal]
    return max(meeting) if meeting else None
