"""PNG plots of a load run and of a comparison (matplotlib's Agg renderer: no display needed).

Each plot function is pure: data in, one PNG written, its path returned. Figures are built with
matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), not pyplot, so nothing global (a
current figure, a process-wide backend) outlives a call. Latencies are drawn in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import SLO, latencies

METRICS = (("ttft", "time to first token"), ("tpot", "time per output token"),
           ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))
_DPI = 100


@dataclass(frozen=True)
class Plot:
    caption: str
    path: Path


def latency_cdfs(series: Mapping[str, Sequence[RequestRecord]], title: str, path: Path,
                 slo: SLO | None = None) -> Path:
    """CDFs of TTFT, TPOT, ITL and end-to-end latency, one panel each, one line per series
    (a single run: one series; a comparison: one per target)."""
    figure = _figure(title, (11, 7.5))
    axes = figure.subplots(2, 2).flatten()
    values = {name: latencies(records) for name, records in series.items()}
    slo_lines = {"ttft": slo.ttft, "tpot": slo.tpot} if slo else {}
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        for i, (name, of_series) in enumerate(values.items()):
            ordered = sorted(v * 1000 for v in of_series[metric])
            if ordered:  # from (fastest, 0): the curve starts on the axis, not at 1/n
                ax.step([ordered[0], *ordered], [0.0, *((k + 1) / len(ordered) for k in range(len(ordered)))],
                        where="post", color=f"C{i}", label=name or None)
        if metric in slo_lines:
            ax.axvline(slo_lines[metric] * 1000, color="red", linestyle="--",
                       label=f"SLO {slo_lines[metric] * 1000:.0f} ms")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("share of gaps at or below" if metric == "itl" else "share of completed requests at or below")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if not any(v[metric] for v in values.values()):
            _no_data(ax)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def latency_over_time(records: Sequence[RequestRecord], title: str, path: Path, slo: SLO | None = None) -> Path:
    """TTFT of each request against when it was sent, and every inter-token gap against when it
    ended: queues building up, stalls, and which part of the run they hit."""
    figure = _figure(title, (11, 7.5))
    top, bottom = figure.subplots(2, 1, sharex=True)
    done = [r for r in records if r.ok and r.ttft is not None]
    failed = len(records) - len(done)
    top.plot([r.sent for r in done], [(r.ttft or 0.0) * 1000 for r in done], "o", markersize=3, color="C0",
             label="one request")
    if slo:
        top.axhline(slo.ttft * 1000, color="red", linestyle="--", label=f"TTFT SLO {slo.ttft * 1000:.0f} ms")
    top.set_ylabel("time to first token (ms)")
    top.set_title(f"TTFT by send time ({failed} failed request{'s' * (failed > 1)} not shown)" if failed
                  else "TTFT by send time", fontsize=10)
    gaps = [point for r in done for point in r.timed_inter_token_latencies()]
    bottom.plot([t for t, _ in gaps], [gap * 1000 for _, gap in gaps], ".", markersize=2, alpha=0.5, color="C1",
                label="one token")
    bottom.set_ylabel("inter-token latency (ms)")
    bottom.set_xlabel("time since the run's start (s)")
    bottom.set_title("inter-token latency by token arrival time", fontsize=10)
    for ax, points in ((top, done), (bottom, gaps)):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if points:
            ax.legend(loc="upper left", fontsize=8)
        else:
            _no_data(ax)
    return _save(figure, path)


def attainment_vs_rate(result: Mapping[str, Any], path: Path, goal: float) -> Path:
    """SLO attainment per request rate, one line per target, with the goal."""
    figure = _figure(compare_title(result), (9, 5.5))
    ax = figure.subplots()
    for i, (name, points) in enumerate(_target_points(result)):
        ax.plot([p["rate"] for p in points], [p["slo_attainment"] * 100 for p in points], "o-", color=f"C{i}",
                label=name)
    ax.axhline(goal * 100, color="gray", linestyle="--", label=f"goal: {goal:.0%} of requests")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (% of requests meeting both SLOs)")
    ax.set_ylim(0, 105)
    _finish_rate_axes(ax)
    return _save(figure, path)


def goodput_vs_rate(result: Mapping[str, Any], path: Path) -> Path:
    """Goodput per request rate, one line per target; the offered rate is the ceiling."""
    figure = _figure(compare_title(result), (9, 5.5))
    ax = figure.subplots()
    for i, (name, points) in enumerate(_target_points(result)):
        ax.plot([p["rate"] for p in points], [p["goodput"] for p in points], "o-", color=f"C{i}", label=name)
    rates = [float(r) for r in result.get("rates", []) if math.isfinite(float(r))]
    if rates:
        ax.plot([0, max(rates)], [0, max(rates)], ":", color="gray", label="offered rate")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s meeting both SLOs)")
    ax.set_ylim(bottom=0)
    _finish_rate_axes(ax)
    return _save(figure, path)


def p90_vs_rate(result: Mapping[str, Any], path: Path) -> Path:
    """TTFT p90 and TPOT p90 per request rate, one line per target, with the SLOs (log scale:
    past saturation latencies grow by orders of magnitude)."""
    figure = _figure(compare_title(result), (11, 5))
    axes = figure.subplots(1, 2)
    slo = result.get("slo") or {}
    for ax, (metric, label) in zip(axes, METRICS[:2], strict=True):
        for i, (name, points) in enumerate(_target_points(result)):
            shown = [p for p in points if _finite(p[metric]["p90"]) and p[metric]["p90"] > 0]
            ax.plot([p["rate"] for p in shown], [p[metric]["p90"] * 1000 for p in shown], "o-", color=f"C{i}",
                    label=name)
        if slo.get(metric):
            ax.axhline(slo[metric] * 1000, color="red", linestyle="--", label=f"SLO {slo[metric] * 1000:.0f} ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 600, not 6 x 10^2
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_ylabel(f"{label}, p90 (ms)")
        ax.set_xlabel("request rate (req/s)")
        _finish_rate_axes(ax)
    return _save(figure, path)


def run_plots(data: Mapping[str, Any], json_path: Path) -> list[Plot]:
    """A run's figures (RUN.json data), written beside ``json_path`` as ``<stem>-*.png``."""
    records = [RequestRecord.from_json(r) for r in data.get("records", [])]
    slo = SLO(**data["summary"]["slo"]) if data.get("summary", {}).get("slo") else None
    title = run_title(data)
    return [
        Plot("Latency CDFs", latency_cdfs({"": records}, title, _beside(json_path, "cdf"), slo)),
        Plot("TTFT and inter-token latency over the run",
             latency_over_time(records, title, _beside(json_path, "timeline"), slo)),
    ]


def compare_plots(result: Mapping[str, Any], json_path: Path, goal: float) -> list[Plot]:
    """A comparison's figures (compare.json data), written beside ``json_path``."""
    plots = [
        Plot("SLO attainment by request rate", attainment_vs_rate(result, _beside(json_path, "attainment"), goal)),
        Plot("Goodput by request rate", goodput_vs_rate(result, _beside(json_path, "goodput"))),
        Plot("TTFT and TPOT p90 by request rate", p90_vs_rate(result, _beside(json_path, "p90"))),
    ]
    rate = cdf_rate(result)
    if rate is not None:
        series = {name: [RequestRecord.from_json(r) for r in point["records"]]
                  for name, entry in result["targets"].items()
                  for point in entry.get("points", []) if point["rate"] == rate and point.get("records")}
        slo = SLO(**result["slo"]) if result.get("slo") else None
        slo_line = _slo_text(result["slo"]) if result.get("slo") else "no SLO"
        title = f"workload {result.get('workload', '?')}, {rate:g} req/s (Poisson), every target\n{slo_line}"
        plots.append(Plot(f"Latency CDFs at {rate:g} req/s",
                          latency_cdfs(series, title, _beside(json_path, "cdf"), slo)))
    return plots


def cdf_rate(result: Mapping[str, Any]) -> float | None:
    """The rate whose latency CDFs best tell the targets apart: the highest at which some target
    still met the goal (past it, all are overloaded), else the lowest; only rates with records."""
    with_records = sorted({p["rate"] for entry in result.get("targets", {}).values()
                           for p in entry.get("points", []) if p.get("records")})
    if not with_records:
        return None
    met = [e["max_rate_meeting_slo"] for e in result["targets"].values() if e.get("max_rate_meeting_slo") is not None]
    candidates = [r for r in with_records if met and r <= max(met)]
    return max(candidates) if candidates else with_records[0]


def run_title(data: Mapping[str, Any]) -> str:
    config = data.get("config") or {}
    rate = config.get("rate")
    if rate is None:
        load = f"closed loop, {config.get('concurrency', 1)} concurrent"
    elif math.isinf(float(rate)):
        load = "all requests at once"
    else:
        burstiness = float(config.get("burstiness", 1.0))
        load = f"{float(rate):g} req/s " + ("(Poisson)" if burstiness == 1 else f"(gamma, burstiness {burstiness:g})")
    slo = (data.get("summary") or {}).get("slo")
    return (f"workload {data.get('workload', '?')}, {load}, target {data.get('target', '?')}\n"
            + (_slo_text(slo) if slo else "no SLO"))


def compare_title(result: Mapping[str, Any]) -> str:
    slo = result.get("slo")
    return f"workload {result.get('workload', '?')}, rate sweep\n" + (_slo_text(slo) if slo else "no SLO")


def _slo_text(slo: Mapping[str, float]) -> str:
    return f"SLO: TTFT ≤ {slo['ttft'] * 1000:.0f} ms and TPOT ≤ {slo['tpot'] * 1000:.0f} ms"


def _target_points(result: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every target with its measured points (skipped ones left out); failed targets too, marked,
    so that a target keeps its colour in every figure."""
    return [(f"{name} (failed)" if entry.get("error") else name,
             [p for p in entry.get("points", []) if not p.get("skipped") and p.get("slo_attainment") is not None])
            for name, entry in result.get("targets", {}).items()]


def _finish_rate_axes(ax: Axes) -> None:
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        _no_data(ax)


def _figure(title: str, size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=11)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI, format="png")
    return path


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")


def _beside(json_path: Path, kind: str) -> Path:
    return json_path.with_name(f"{json_path.stem}-{kind}.png")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
