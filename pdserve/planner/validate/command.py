"""``pdserve plan validate COMPARE.json... --profile-1t P1 --profile-2t P2``: the simulator with
calibrated step costs against what ``pdserve bench compare`` measured (replay.py).

Writes validation.md (every point, measured beside predicted), validation.json and
validation.png (predicted against measured, log-log) to --out. Exits non-zero only for bad
input (a missing or malformed file); predictions that miss are findings, reported in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.planner.validate.repeats import RepeatedPoint
    from pdserve.planner.validate.replay import PointResult, ValidationSettings


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("compare", nargs="+", type=Path, metavar="COMPARE.json",
                        help="compare.json files of `pdserve bench compare`; points of several runs with the "
                        "same workload, target and rate are also judged as repeats (within the tolerance or "
                        "the runs' spread, whichever is wider)")
    parser.add_argument("--profile-1t", type=Path, default=None,
                        help="1-thread step profile (`pdserve plan calibrate --threads 1`): disaggregated, "
                        "replicas, colocated-1core")
    parser.add_argument("--profile-2t", type=Path, default=None,
                        help="2-thread step profile (`pdserve plan calibrate --threads 2`): colocated")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: benchmarks/results/validation/<YYYYmmdd-HHMMSS>/)")
    parser.add_argument("--tolerance", type=float, default=0.2,
                        help="relative error within which a prediction passes (default: 0.2)")
    parser.add_argument("--link-bandwidth", type=float, default=10e9,
                        help="KV link of the disaggregated target, bytes/s (default: 10e9, shared memory)")
    parser.add_argument("--link-latency", type=float, default=1e-3,
                        help="fixed seconds per KV transfer (default: 0.001)")
    parser.add_argument("--router-overhead", type=float, default=0.0,
                        help="seconds added to every arrival for HTTP hops and tokenization (default: 0)")
    parser.add_argument("--kv-memory-mb", type=int, default=512,
                        help="KV cache per worker, as the run's `pdserve serve --kv-memory-mb` (default: 512)")
    parser.add_argument("--unloaded-correction", action="store_true",
                        help="scale the profile of the target that fixed a run's SLOs by how much slower it "
                        "served its median prompt alone than the profile predicts (docs/planner.md)")


def run_validate(args: argparse.Namespace) -> int:
    from pdserve.planner.calibrate.step_profile import load_profile
    from pdserve.planner.validate.repeats import group_repeats
    from pdserve.planner.validate.replay import ValidationSettings, validate_comparison

    def fail(message: str) -> int:
        print(f"pdserve plan validate: error: {message}", file=sys.stderr)
        return 2

    if args.profile_1t is None and args.profile_2t is None:
        return fail("give --profile-1t and/or --profile-2t")
    try:
        settings = ValidationSettings(
            link_bytes_per_s=args.link_bandwidth, link_latency_s=args.link_latency,
            router_overhead_s=args.router_overhead, kv_memory_bytes=args.kv_memory_mb << 20,
            tolerance=args.tolerance, unloaded_correction=args.unloaded_correction,
        )
        profiles = {threads: load_profile(path)
                    for threads, path in ((1, args.profile_1t), (2, args.profile_2t)) if path is not None}
        for threads, profile in profiles.items():
            if profile.threads != threads:
                print(f"warning: the {threads}-thread profile was measured with {profile.threads} threads",
                      file=sys.stderr)
        results: list[PointResult] = []
        notes: list[str] = []
        for path in args.compare:
            data = json.loads(path.read_text())
            found, skipped = validate_comparison(str(path), data, profiles, settings)
            results += found
            notes += skipped
    except (OSError, ValueError, KeyError, TypeError) as error:
        return fail(str(error))
    out = args.out or Path("benchmarks/results/validation") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    repeats = [point for point in group_repeats(results) if len(point.sources) > 1]
    text = validation_markdown(results, notes, settings, [str(p) for p in args.compare], repeats)
    (out / "validation.md").write_text(text)
    (out / "validation.json").write_text(json.dumps(
        {"sources": [str(p) for p in args.compare], "settings": asdict(settings), "notes": notes,
         "points": [point_json(r, settings.tolerance) for r in results],
         "repeated": [repeated_json(r, settings.tolerance) for r in repeats]}, indent=1) + "\n")
    if results:
        scatter_plot(results, settings.tolerance, out / "validation.png")
    print(text)
    print(f"wrote {out}/validation.md, validation.json" + (", validation.png" if results else ""),
          file=sys.stderr)
    return 0


def validation_markdown(results: Sequence[PointResult], notes: Sequence[str], settings: ValidationSettings,
                        sources: Sequence[str], repeats: Sequence[RepeatedPoint] = ()) -> str:
    tolerance = settings.tolerance
    passed = sum(1 for r in results if r.num_replayed and not r.misses(tolerance))
    lines = ["# Simulator vs measurement", ""]
    if repeats:
        lines += repeats_markdown(repeats, tolerance) + ["", "## Every run's every point", ""]
    lines += [f"Sources: {', '.join(f'`{s}`' for s in sources)}. Each cell: measured / predicted ms "
              f"(relative error of the prediction). A point passes when all four are within "
              f"{tolerance:.0%}. {passed} of {len(results)} points pass.", "",
              "| target | rate | requests (skipped) | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | pass |",
              "|---|---|---|---|---|---|---|---|"]
    several = len(set(r.source for r in results)) > 1
    for r in results:
        cells = [f"{_ms(c.measured)} / {_ms(c.predicted)} ({_percent(c.relative_error)})" for c in r.comparisons]
        misses = r.misses(tolerance)
        verdict = "yes" if not misses else "no: " + ", ".join(misses)
        name = f"{r.target} ({_run_name(r.source)})" if several else r.target
        requests = f"{r.num_replayed} ({r.num_skipped})"
        if r.predicted_rejected:
            requests += f", {r.predicted_rejected} refused by the simulated KV pool"
        lines.append(f"| {name} | {r.rate:g} | {requests} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", f"Simulated with the engine's default scheduler (token budget "
              f"{settings.scheduler.max_num_batched_tokens}, {settings.scheduler.max_num_seqs} sequences), "
              f"{settings.kv_memory_bytes >> 20} MiB of KV per worker, a {settings.link_bytes_per_s / 1e9:g} GB/s "
              f"+ {settings.link_latency_s * 1000:g} ms link for disaggregated (first token after the transfer), "
              f"{settings.router_overhead_s * 1000:g} ms router overhead; profiles "
              + ("scaled by the unloaded serving factors where the run measured the target alone."
                 if settings.unloaded_correction else "as calibrated (no unloaded correction).")]
    if notes:
        lines += ["", "Notes (corrections, and what was not simulated):", "", *(f"- {note}" for note in notes)]
    if results:
        lines += ["", "![predicted vs measured](validation.png)"]
    return "\n".join(lines) + "\n"


def repeats_markdown(repeats: Sequence[RepeatedPoint], tolerance: float) -> list[str]:
    """The repeated points: each cell is the measured median [smallest-largest] / the predicted
    median (its error; the error allowed, the wider of the tolerance and the runs' spread)."""
    passed = sum(1 for r in repeats if not r.misses(tolerance))
    numbers = sum(1 for r in repeats for c in r.comparisons if c.within(tolerance))
    lines = ["## Repeated runs", "",
             f"Points measured in several runs of the same command. Each cell: measured median "
             f"[smallest-largest] / predicted median, ms (error of the prediction; error allowed: "
             f"{tolerance:.0%} of the measured median or the runs' spread, whichever is wider). "
             f"**{passed} of {len(repeats)} points pass; {numbers} of "
             f"{sum(len(r.comparisons) for r in repeats)} numbers are within.**", "",
             "| workload | target | rate | runs | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in repeats:
        cells = []
        for c in r.comparisons:
            low, high = (min(c.measured), max(c.measured)) if c.measured else (math.nan, math.nan)
            allowed = c.allowed_error(tolerance) / c.measured_median if c.measured_median > 0 else math.nan
            cells.append(f"{_ms(c.measured_median)} [{_ms(low)}-{_ms(high)}] / {_ms(c.predicted_median)} "
                         f"({_percent(c.relative_error)}; ±{_unsigned_percent(allowed)})")
        misses = r.misses(tolerance)
        verdict = "yes" if not misses else "no: " + ", ".join(misses)
        lines.append(f"| {r.workload} | {r.target} | {r.rate:g} | {len(r.sources)} | " + " | ".join(cells)
                     + f" | {verdict} |")
    return lines


def repeated_json(point: RepeatedPoint, tolerance: float) -> dict[str, Any]:
    return {
        "workload": point.workload, "target": point.target, "rate": point.rate, "sources": list(point.sources),
        "misses": point.misses(tolerance),
        "comparisons": [{"metric": c.metric, "quantile": c.quantile,
                         "measured": [_number(v) for v in c.measured], "predicted": [_number(v) for v in c.predicted],
                         "measured_median": _number(c.measured_median), "predicted_median": _number(c.predicted_median),
                         "spread": _number(c.spread), "allowed_error": _number(c.allowed_error(tolerance)),
                         "within": c.within(tolerance)} for c in point.comparisons],
    }


def point_json(result: PointResult, tolerance: float) -> dict[str, Any]:
    """One point as plain JSON (no NaN: a missing value is null)."""
    return {
        "source": result.source, "workload": result.workload, "target": result.target, "rate": result.rate,
        "num_replayed": result.num_replayed, "num_skipped": result.num_skipped,
        "predicted_rejected": result.predicted_rejected, "misses": result.misses(tolerance),
        "comparisons": [{"metric": c.metric, "quantile": c.quantile, "measured": _number(c.measured),
                         "predicted": _number(c.predicted), "relative_error": _number(c.relative_error),
                         "within_tolerance": c.within(tolerance)} for c in result.comparisons],
    }


def scatter_plot(results: Sequence[PointResult], tolerance: float, path: Path) -> Path:
    """Predicted against measured, one panel per metric, a colour per target, the y = x line and
    the tolerance band (log-log: latencies span milliseconds to seconds)."""
    # matplotlib loads slowly: only when rendering. Object API, no pyplot state (as bench plots).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Simulated (calibrated profiles) vs measured, p50 (o) and p90 (^)")
    targets = sorted({r.target for r in results})
    for ax, metric, label in zip(figure.subplots(1, 2), ("ttft", "tpot"),
                                 ("time to first token (ms)", "time per output token (ms)"), strict=True):
        values: list[float] = []
        for color, target in enumerate(targets):
            for quantile, marker in ((50, "o"), (90, "^")):
                pairs = [(c.measured * 1000, c.predicted * 1000) for r in results if r.target == target
                         for c in r.comparisons if c.metric == metric and c.quantile == quantile
                         and _positive(c.measured) and _positive(c.predicted)]
                if pairs:
                    ax.scatter(*zip(*pairs, strict=True), color=f"C{color}", marker=marker,
                               label=target if quantile == 50 else None)
                    values += [v for pair in pairs for v in pair]
        if values:
            low, high = min(values) / 1.5, max(values) * 1.5
            ax.plot([low, high], [low, high], color="black", linewidth=1)
            ax.fill_between([low, high], [low * (1 - tolerance), high * (1 - tolerance)],
                            [low * (1 + tolerance), high * (1 + tolerance)], color="grey", alpha=0.2,
                            label=f"within {tolerance:.0%}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # after set_*scale, which resets them: 200, not 2x10^2
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlim(low, high)
            ax.set_ylim(low, high)
            ax.set_aspect("equal")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path


def _run_name(source: str) -> str:
    """A compare.json by its directories: `run-2/load-mixed` for repeated runs' files."""
    return "/".join(Path(source).parent.parts[-2:]) or source


def _number(value: float) -> float | None:
    """A value for JSON: no NaN, a missing value is null."""
    return value if math.isfinite(value) else None


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value * 1000:.0f}" if value >= 0.1 else f"{value * 1000:.1f}"


def _percent(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.0%}"


def _unsigned_percent(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.0%}"
