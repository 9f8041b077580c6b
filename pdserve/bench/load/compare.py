"""``pdserve bench compare``: one workload, a range of request rates, several targets, one run.

The targets are started and stopped by the tool, one after another, on the same cores. The SLOs
are fixed first, on the first target unloaded (colocated by default: one engine on all the
cores; 3x its TTFT of the median prompt, 3x its TPOT: the hardware's own speed, see slo.py),
and the same SLOs judge every target. For each
target it reports goodput and SLO attainment at every rate, and the highest rate at which at
least 90% of requests met the SLO. ``time_budget`` bounds the whole comparison: each rate gets an
equal share of what is left, so a slow target cannot eat the others' time.

Every point keeps its requests' records (for the latency CDFs) and the server's own metrics over
its load (traffic/server_metrics.py); the report adds PNG plots beside compare.json (plots.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.bench.load.length_scaled import length_scaled_markdown
from pdserve.bench.load.loadgen import LoadConfig, run_load
from pdserve.bench.load.slo import Calibration, calibrate
from pdserve.bench.load.targets import RunningTarget, Target
from pdserve.traffic.server_metrics import ServerMetricsRecorder, headline
from pdserve.traffic.stats import ATTAINMENT_GOAL, SLO, max_rate_meeting_goal, summarize
from pdserve.traffic.workloads import RequestSpec

if TYPE_CHECKING:
    from pdserve.bench.load.plots import Plot


@dataclass(frozen=True)
class CompareConfig:
    rates: tuple[float, ...]
    duration: float = 60.0
    """Seconds of arrivals per rate (requests = rate x duration)."""
    time_budget: float = 3600.0
    seed: int = 0
    requests_per_rate: int | None = None
    """When set, every rate point sends this many requests (arrivals span requests / rate
    seconds) instead of rate x duration: low rates then get as many samples as high ones."""

    def point_size(self, rate: float) -> tuple[int, float]:
        """(requests, seconds of arrivals) of the point at ``rate``."""
        if self.requests_per_rate is not None:
            return self.requests_per_rate, self.requests_per_rate / rate
        return max(int(math.ceil(rate * self.duration)), 1), self.duration


def point_seed(seed: int, rate_index: int) -> int:
    """The prompts of one rate point: the same for every target (a fair comparison), different
    from the other points' (a server keeps its prefix cache from one point to the next, and a
    repeated prompt would be a cache hit) and from the SLO calibration's."""
    return seed + 1000 * (rate_index + 1)


def run_compare(
    targets: Sequence[Target], specs_for: Callable[[int, int], list[RequestSpec]], config: CompareConfig,
    out_dir: Path, log: Callable[[str], None], slo: SLO | None = None,
) -> dict[str, Any]:
    """Run every target over every rate; returns the comparison (also the JSON written)."""
    started = time.monotonic()
    runs_left = len(targets) * len(config.rates)
    result: dict[str, Any] = {"rates": list(config.rates), "targets": {}, "slo_basis": "given"}
    calibration: Calibration | None = None
    for target in targets:
        entry: dict[str, Any] = {"description": target.description, "points": []}
        result["targets"][target.name] = entry
        log(f"starting {target.name}: {target.description}")
        try:
            running = RunningTarget(target, out_dir / f"{target.name}.log")
        except RuntimeError as error:
            entry["error"] = str(error)
            log(f"  {error}")
            runs_left -= len(config.rates)
            continue
        try:
            base = LoadConfig(base_url=running.url, seed=config.seed)
            if slo is None:
                log("  calibrating the SLOs on this target, unloaded")
                calibration = asyncio.run(calibrate(base, specs_for(64, config.seed)))
                slo = calibration.slo
                result["slo_basis"] = {"target": target.name, **asdict(calibration)}
            result["slo"] = asdict(slo)
            for rate_index, rate in enumerate(config.rates):
                left = config.time_budget - (time.monotonic() - started)
                share = left / max(runs_left, 1)
                runs_left -= 1
                if share < 10:
                    log(f"  {rate:g} req/s: skipped, the time budget is spent")
                    entry["points"].append({"rate": rate, "skipped": "time budget", "slo_attainment": None})
                    continue
                count, arrivals = config.point_size(rate)
                limit = min(share, arrivals * 3)
                load = replace(base, rate=rate, time_limit=limit)
                with ServerMetricsRecorder(running.url) as server:
                    specs = specs_for(count, point_seed(config.seed, rate_index))
                    records = asyncio.run(run_load(load, specs, progress=False))
                summary = summarize(records, slo)
                point = {"rate": rate, "requests": count, "time_limit": limit, **summary.to_json(),
                         "server_metrics": server.section, "records": [r.to_json() for r in records]}
                entry["points"].append(point)
                log(f"  {rate:g} req/s: {summary.completed}/{count} done, SLO attainment "
                    f"{(summary.slo_attainment or 0) * 100:.0f}%, goodput {summary.goodput or 0:.2f} req/s, "
                    f"TTFT p90 {summary.ttft.p90 * 1000:.0f} ms, TPOT p90 {summary.tpot.p90 * 1000:.0f} ms")
        finally:
            running.stop()
        entry["max_rate_meeting_slo"] = max_rate_meeting_goal(entry["points"])
    result["elapsed"] = time.monotonic() - started
    return result


def is_comparison(data: dict[str, Any]) -> bool:
    """compare.json (targets over rates), as opposed to one run's RUN.json."""
    return "targets" in data and "rates" in data


def write_compare_report(path: Path, result: dict[str, Any]) -> str:
    """The plots (``<stem>-*.png``) and the Markdown (``<stem>.md``) of the comparison stored at
    ``path``; returns the Markdown."""
    # matplotlib loads slowly: only when rendering.
    from pdserve.bench.load.plots import compare_plots

    text = compare_markdown(result, compare_plots(result, path, ATTAINMENT_GOAL))
    path.with_suffix(".md").write_text(text)
    return text


def compare_markdown(result: dict[str, Any], plots: Sequence[Plot] = ()) -> str:
    slo = result.get("slo") or {}
    lines = [f"# Comparison: workload {result.get('workload', '?')}", ""]
    if result.get("command"):
        lines += [f"`{result['command']}` on {result.get('date', '?')}, {result['machine']['cpus']} CPUs, "
                  f"{result['elapsed']:.0f} s.", ""]
    if slo:
        basis = result.get("slo_basis")
        how = (f"3x the unloaded TTFT ({basis['isolated_ttft'] * 1000:.0f} ms) and TPOT "
               f"({basis['isolated_tpot'] * 1000:.1f} ms) of {basis['target']}") if isinstance(basis, dict) else basis
        lines += [f"SLO, fixed before the load: TTFT <= {slo['ttft'] * 1000:.0f} ms, TPOT <= "
                  f"{slo['tpot'] * 1000:.0f} ms ({how}). Goal: {ATTAINMENT_GOAL:.0%} of requests within both.", ""]
    lines += ["| target | " + " | ".join(f"{r:g} req/s" for r in result["rates"]) + " | max rate meeting SLO |",
              "|---|" + "---|" * (len(result["rates"]) + 1)]
    for name, entry in result["targets"].items():
        if "error" in entry:
            lines.append(f"| {name} | " + " | ".join("-" for _ in result["rates"]) + f" | failed: {entry['error']} |")
            continue
        cells = []
        for point in entry["points"]:
            if point.get("skipped"):
                cells.append("skipped")
            else:
                cells.append(f"{point['slo_attainment'] * 100:.0f}% / {point['goodput']:.2f}")
        best = entry.get("max_rate_meeting_slo")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if best is None else f'{best:g} req/s'} |")
    lines += ["", "Cells: SLO attainment / goodput (requests per second meeting both SLOs).", "",
              "| target | rate | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | ITL p90 (ms) | output tok/s |",
              "|---|---|---|---|---|---|"]
    for name, entry in result["targets"].items():
        for p in entry.get("points", []):
            if p.get("skipped"):
                continue
            lines.append(f"| {name} | {p['rate']:g} | {_ms(p['ttft']['p50'])} / {_ms(p['ttft']['p90'])} | "
                         f"{_ms(p['tpot']['p50'])} / {_ms(p['tpot']['p90'])} | {_ms(p['itl']['p90'])} | "
                         f"{p['output_throughput']:.1f} |")
    lines += length_scaled_markdown(result)
    lines += _server_table(result)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{plot.caption}]({plot.path.name})\n" for plot in plots]  # beside the .md
    return "\n".join(lines).rstrip("\n") + "\n"


def _server_table(result: dict[str, Any]) -> list[str]:
    """The servers' own view per point (pdserve targets), if any point recorded it."""
    rows = []
    for name, entry in result["targets"].items():
        for p in entry.get("points", []):
            if p.get("server_metrics", {}).get("router"):
                h = headline(p["server_metrics"])
                usage = "-" if h["kv_usage_mean"] is None else (
                    f"{h['kv_usage_mean'] * 100:.0f}% / {(h['kv_usage_max'] or 0) * 100:.0f}%")
                rows.append(f"| {name} | {p['rate']:g} | {_ms(h['queue_p90'])} | {_ms(h['prefill_p90'])} | "
                            f"{_ms(h['kv_transfer_p90'])} | {_ms(h['decode_mean'])} | {usage} |")
    if not rows:
        return []
    return ["", "Server-side, from the targets' /metrics over each load (p90s from histogram buckets):", "",
            "| target | rate | queue p90 (ms) | prefill p90 (ms) | KV transfer p90 (ms) | decode per request, "
            "mean (ms) | KV usage mean / max |", "|---|---|---|---|---|---|---|", *rows]


def _ms(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 1000:.0f}"
