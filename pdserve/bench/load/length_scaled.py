"""A second SLO pair for comparisons, stated up front: the TTFT budget grows with the prompt.

The issue's SLO gives every request the TTFT budget of the median prompt (3x its unloaded
TTFT). On a workload whose prompts span 64 to 1,536 tokens (``mixed``), the long prompts miss it
on every target even unloaded, so attainment is capped near the share of short prompts and says
little about the targets. The second pair keeps the TPOT SLO and scales the TTFT budget with the
prompt's length above the median (:class:`LengthScaledSLO`):

    TTFT budget(n) = TTFT SLO x max(1, n / n_median)

with ``n_median`` the median prompt length (server-counted tokens) of the comparison's requests,
which every target receives alike. Prefill time grows about linearly with the prompt (plus a
fixed part and a small quadratic attention part), so a prompt k times the median's length gets
about k times the median's budget. It is computed from the raw per-request records, so any
``compare.json`` can be scored again (``pdserve bench report``).
"""

from __future__ import annotations

import statistics
from typing import Any

from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import (
    ATTAINMENT_GOAL,
    SLO,
    LengthScaledSLO,
    max_rate_meeting_goal,
    summarize,
)


def reference_tokens(result: dict[str, Any]) -> int | None:
    """The median prompt length over every recorded request of the comparison (None without
    records)."""
    lengths = [r["prompt_tokens"] for entry in result["targets"].values() for point in entry.get("points", [])
               for r in point.get("records", []) if r.get("prompt_tokens")]
    return round(statistics.median(lengths)) if lengths else None


def length_scaled_slo(result: dict[str, Any]) -> LengthScaledSLO | None:
    """The comparison's second SLO pair, or None when it has no SLO or no records."""
    slo, reference = result.get("slo"), reference_tokens(result)
    if not slo or reference is None:
        return None
    return LengthScaledSLO(SLO(slo["ttft"], slo["tpot"]), reference)


def rescore(result: dict[str, Any], slo: LengthScaledSLO) -> dict[str, list[dict[str, Any]]]:
    """Per target, per measured rate point: {"rate", "slo_attainment", "goodput"} under ``slo``."""
    scored: dict[str, list[dict[str, Any]]] = {}
    for name, entry in result["targets"].items():
        points = []
        for point in entry.get("points", []):
            if point.get("skipped") or "records" not in point:
                continue
            summary = summarize([RequestRecord.from_json(r) for r in point["records"]], slo)
            points.append({"rate": point["rate"], "slo_attainment": summary.slo_attainment,
                           "goodput": summary.goodput})
        scored[name] = points
    return scored


def length_scaled_markdown(result: dict[str, Any]) -> list[str]:
    """The second SLO pair's attainment table (empty when the comparison cannot be rescored)."""
    slo = length_scaled_slo(result)
    if slo is None:
        return []
    lines = ["", f"Second SLO pair, stated before the load: the TTFT budget scales with the prompt above the "
             f"median's length ({slo.reference_tokens} tokens): TTFT <= {slo.base.ttft * 1000:.0f} ms x "
             f"max(1, prompt tokens / {slo.reference_tokens}), TPOT <= {slo.base.tpot * 1000:.0f} ms. "
             f"Goal: {ATTAINMENT_GOAL:.0%} of requests within both.", "",
             "| target | " + " | ".join(f"{r:g} req/s" for r in result["rates"]) + " | max rate meeting SLO |",
             "|---|" + "---|" * (len(result["rates"]) + 1)]
    for name, points in rescore(result, slo).items():
        by_rate = {p["rate"]: p for p in points}
        cells = [f"{by_rate[r]['slo_attainment'] * 100:.0f}% / {by_rate[r]['goodput']:.2f}" if r in by_rate else "-"
                 for r in result["rates"]]
        best = max_rate_meeting_goal(points)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if best is None else f'{best:g} req/s'} |")
    return lines
