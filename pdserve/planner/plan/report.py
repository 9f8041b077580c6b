"""A plan as a ranked table (terminal), a Markdown report with two plots, and JSON.

Pure functions of a :class:`Plan`: nothing here simulates. The plots use matplotlib's object
API with the Agg canvas (as ``bench/load/plots.py`` does), so no display or global state.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pdserve.planner.plan.fleet import Fleet
from pdserve.planner.plan.fleet_check import FleetCheck
from pdserve.planner.plan.optimizer import Plan

COLUMNS = ("#", "fleet", "GPUs", "$/h", "$/Mtok", "P:D", "TTFT", "TPOT", "attain.", "headroom",
           "saving vs colocated", "verdict")


def table_rows(plan: Plan) -> list[tuple[str, ...]]:
    """Passing fleets cheapest first, then the closest failing fleet of each other family."""
    q = f"p{plan.goal.percentile:g}"
    rows: list[tuple[str, ...]] = []
    checks = [*plan.passing, *plan.closest_failing]
    for rank, check in enumerate(checks, 1):
        fleet = check.fleet
        vs = plan.saving_vs_colocated(check)
        rows.append((
            str(rank) if check.meets else "-",
            fleet.label,
            str(fleet.num_gpus),
            f"{fleet.usd_per_hour:.2f}",
            f"{plan.usd_per_million_tokens(fleet):.3f}",
            fleet.pd_ratio,
            f"{check.ttft:.3f} s {q}",
            f"{check.tpot * 1000:.1f} ms {q}",
            f"{check.attainment:.1%}",
            headroom_text(plan, fleet),
            "-" if vs is None or not fleet.is_disaggregated else f"{vs:+.1%}",
            ("meets*" if check.short_window else "meets") if check.meets else "fails: " + "; ".join(check.reasons),
        ))
    return rows


def headroom_text(plan: Plan, fleet: Fleet) -> str:
    headroom = plan.headroom.get(fleet.label)
    if headroom is None:
        return "-"
    fraction = headroom.fraction(plan.goal.rate)
    if headroom.capped_by_roofline:
        return f"+{fraction:.0%} (roofline)"
    return f">= +{fraction:.0%}" if headroom.failing_rate is None else f"+{fraction:.0%}"


SHORT_RUN_NOTE = ("\\* The simulated slice saw fewer than 2.5 request lifetimes of arrivals even after "
                  "a longer second run: it may not have reached steady state, so the pass may be "
                  "optimistic (raise --sim-requests to check).")


def table_text(plan: Plan) -> str:
    rows = table_rows(plan)
    widths = [max(len(column), *(len(row[i]) for row in rows)) if rows else len(column)
              for i, column in enumerate(COLUMNS)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    if any(c.meets and c.short_window for c in plan.checks):
        lines += ["", SHORT_RUN_NOTE.replace("\\*", "*")]
    return "\n".join(line.rstrip() for line in lines)


def verdict(plan: Plan) -> str:
    """One paragraph: which fleet to rent and whether disaggregation pays."""
    colocated, disaggregated = plan.best("colocated"), plan.best("disaggregated")
    if colocated is None and disaggregated is None:
        return "No fleet met the goal."
    parts = []
    best = min((c for c in (colocated, disaggregated) if c is not None), key=lambda c: c.fleet.usd_per_hour)
    parts.append(f"Cheapest fleet meeting the goal: {best.fleet.label}, ${best.fleet.usd_per_hour:.2f}/h, "
                 f"${plan.usd_per_million_tokens(best.fleet):.3f} per million output tokens.")
    if colocated is None or disaggregated is None:
        missing = "colocated" if colocated is None else "disaggregated"
        parts.append(f"No {missing} fleet met the goal within the search, so there is no comparison.")
    else:
        vs = plan.saving_vs_colocated(disaggregated)
        assert vs is not None
        if plan.disaggregation_pays:
            parts.append(f"Disaggregation pays: {disaggregated.fleet.label} saves {vs:.1%} against the best "
                         f"colocated fleet ({colocated.fleet.label}, ${colocated.fleet.usd_per_hour:.2f}/h).")
        else:
            parts.append(f"Disaggregation does not pay here: the best disaggregated fleet "
                         f"({disaggregated.fleet.label}, ${disaggregated.fleet.usd_per_hour:.2f}/h) costs "
                         f"{-vs:.1%} more than the best colocated one ({colocated.fleet.label}, "
                         f"${colocated.fleet.usd_per_hour:.2f}/h)." if vs < 0 else
                         f"Disaggregation does not pay here: the best disaggregated fleet "
                         f"({disaggregated.fleet.label}) costs the same as the best colocated one "
                         f"({colocated.fleet.label}, ${colocated.fleet.usd_per_hour:.2f}/h).")
    if plan.stopped_early:
        parts.append("The simulation budget ran out before the search finished: a cheaper fleet may "
                     "exist (raise --max-simulations).")
    return " ".join(parts)


def impossible_message(plan: Plan) -> str:
    """Why nothing met the goal: the closest fleets and the instance types ruled out."""
    goal = plan.goal
    lines = [f"no fleet meets TTFT {goal.slo.ttft:g} s and TPOT {goal.slo.tpot * 1000:g} ms "
             f"at p{goal.percentile:g} for {goal.attainment:.0%} of requests at {goal.rate:g} req/s"]
    closest = plan.closest_failing[:5]
    if closest:
        lines.append("closest fleets:")
        lines += [f"  {c.fleet.label} (${c.fleet.usd_per_hour:.2f}/h): {'; '.join(c.reasons)}" for c in closest]
    abandoned = [u for u in plan.unsimulated if "max-instances" in u.reason][:5]
    if abandoned:
        lines.append("grown past the size limit:")
        lines += [f"  {u.fleet.label}: {u.reason}" for u in abandoned]
    if plan.screening.exclusions:
        lines.append("ruled out by the roofline:")
        lines += [f"  {e.label}: {e.reason}" for e in plan.screening.exclusions]
    if not plan.screening.options:
        lines.append("no instance type can serve the model under these SLOs")
    return "\n".join(lines)


# -- Markdown --------------------------------------------------------------------------------


def markdown(plan: Plan, plots: dict[str, Path]) -> str:
    goal, workload, engine, sim = plan.goal, plan.workload, plan.engine, plan.sim
    eff = engine.efficiency
    lines = [
        f"# pdserve plan: {plan.model}, {workload.name} at {goal.rate:g} req/s",
        "",
        f"**Goal**: TTFT <= {goal.slo.ttft:g} s and TPOT <= {goal.slo.tpot * 1000:g} ms at p{goal.percentile:g}, "
        f"and >= {goal.attainment:.0%} of requests meeting both, at {goal.rate:g} requests/s.",
        f"**Workload**: {workload.name}, mean prompt {workload.mean_input_tokens:.0f} tokens, mean answer "
        f"{workload.mean_output_tokens:.0f} tokens (longest request {workload.max_request_tokens} tokens).",
        "",
        verdict(plan),
        "",
        "## Fleets",
        "",
        "Ranked by cost per hour; `$/Mtok` is the cost per hour over the output tokens per hour at the "
        "target rate. Failing rows are the largest fleet tried in each family that never passed.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(plan)]
    if any(c.meets and c.short_window for c in plan.checks):
        lines += ["", SHORT_RUN_NOTE]
    lines += ["", "## Headroom of the chosen fleets", ""]
    if not plan.headroom:
        lines.append("None: no fleet met the goal.")
    for label, headroom in plan.headroom.items():
        if headroom.capped_by_roofline:
            fail = "which is its roofline throughput (nothing above it was simulated)"
        elif headroom.failing_rate is None:
            fail = "no failing rate found up to twice the target"
        else:
            fail = f"fails at {headroom.failing_rate:.3g} req/s"
        lines.append(f"- **{label}**: meets up to {headroom.max_rate:.3g} req/s "
                     f"({headroom.fraction(goal.rate):+.0%}), {fail}; roofline capacity "
                     f"{headroom.capacity_rate:.3g} req/s. Probes: "
                     + ", ".join(f"{c.rate:.3g} req/s {'ok' if c.meets else 'miss'} ({c.attainment:.0%})"
                                 for c in headroom.checks))
    lines += ["", "## Simulations", "",
              "| fleet | rate | slice simulated | requests (measured) | window / lifetime | TTFT | TPOT | "
              "attain. | utilization | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for check in [*plan.checks, *(c for h in plan.headroom.values() for c in h.checks if c.rate != goal.rate)]:
        util = ", ".join(f"{role} {u:.0%}" for role, u in check.utilization)
        exact = "" if check.slice_exact else " (rounded down)"
        lines.append(f"| {check.fleet.label} | {check.rate:.3g} | {check.slice_label}{exact} | "
                     f"{check.num_requests} ({check.num_measured}) | "
                     f"{check.window_s:.0f} s / {check.lifetime_s:.1f} s | "
                     f"{check.ttft:.3f} s | {check.tpot * 1000:.1f} ms | {check.attainment:.1%} | {util} | "
                     f"{('meets*' if check.short_window else 'meets') if check.meets else 'fails'} |")
    if plan.unsimulated:
        lines += ["", "## Not simulated", ""]
        lines += [f"- {u.fleet.label} (${u.fleet.usd_per_hour:.2f}/h): {u.reason}" for u in plan.unsimulated[:10]]
        if len(plan.unsimulated) > 10:
            lines.append(f"- ... and {len(plan.unsimulated) - 10} more (all in plan.json)")
    lines += ["", "## Instance types (roofline screening)", "",
              "Requests/s one instance sustains by the roofline's fluid estimate (optimistic: the "
              "search starts from these and the simulator decides).", "",
              "| instance | $/h | KV tokens | prefill req/s | decode req/s | colocated req/s |",
              "|---|---|---|---|---|---|"]
    for option in plan.screening.options:
        lines.append(f"| {option.label} | {option.instance.usd_per_hour:.2f} | "
                     f"{option.num_blocks * engine.block_size:,} | {_rate(option.prefill_rate)} | "
                     f"{_rate(option.decode_rate)} | {_rate(option.colocated_rate)} |")
    if plan.screening.exclusions:
        lines += ["", "Ruled out:", ""]
        lines += [f"- {e.label}: {e.reason}" for e in plan.screening.exclusions]
    first_token = ("after the KV transfer (as pdserve routes today)" if sim.first_token_after_transfer
                   else "at the prefill end")
    lines += [
        "", "## Assumptions", "",
        f"- Roofline ({engine.dtype}): compute efficiency {eff.compute:g}, bandwidth {eff.bandwidth:g}, link "
        f"{eff.link:g}, step overhead {eff.step_overhead_s * 1000:g} ms; {engine.memory_fraction:.0%} of memory "
        "for weights + KV. Defaults, not calibrated measurements.",
        f"- Scheduler: {engine.scheduler.max_num_batched_tokens} tokens per step, at most "
        f"{engine.scheduler.max_num_seqs} sequences, blocks of {engine.block_size} tokens.",
        f"- Simulation: {sim.num_requests} requests per run (more when a passing run was short of steady "
        f"state), seed {sim.seed}, {sim.routing} routing, {sim.router_overhead_s * 1000:g} ms router overhead; "
        "KV over the slower node's network share per instance, "
        f"{sim.link_latency_s * 1000:g} ms per transfer; first token "
        f"{first_token}.",
        "- Prices are the catalogue's (none verified on the provider's page); see docs/planner.md.",
        f"- Search: {len(plan.checks)} simulations at the target rate, "
        f"{sum(len(h.checks) - 1 for h in plan.headroom.values())} for headroom, {plan.wall_seconds:.0f} s.",
    ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{caption}]({path.name})" for caption, path in plots.items()]
    return "\n".join(lines) + "\n"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# -- plots ------------------------------------------------------------------------------------


def cost_vs_rate_plot(plan: Plan, path: Path) -> Path:
    """$ per million output tokens against the request rate for the chosen fleets: a fleet's
    price is fixed, so its cost per token falls with load until the SLOs break."""
    figure = _figure("Cost per million output tokens vs request rate")
    ax = figure.subplots()
    mean_out, target = plan.workload.mean_output_tokens, plan.goal.rate
    for i, check in enumerate(_chosen(plan)):
        fleet = check.fleet
        headroom = plan.headroom.get(fleet.label)
        top = headroom.max_rate if headroom else target
        rates = [target * 0.25 + (top - target * 0.25) * k / 50 for k in range(51)]
        ax.plot(rates, [fleet.usd_per_million_output_tokens(r, mean_out) for r in rates], color=f"C{i}",
                label=f"{fleet.label} (${fleet.usd_per_hour:.2f}/h)")
        ax.plot([target], [fleet.usd_per_million_output_tokens(target, mean_out)], "o", color=f"C{i}")
        if headroom and headroom.failing_rate is not None:
            ax.plot([headroom.failing_rate], [fleet.usd_per_million_output_tokens(headroom.failing_rate, mean_out)],
                    "x", color=f"C{i}", markersize=9)
    ax.axvline(target, color="gray", linestyle=":", label=f"target {target:g} req/s")
    ax.set_xlabel("request rate (req/s)  -  line: meets the SLOs, x: first failing rate")
    ax.set_ylabel("$ per million output tokens")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(figure, path)


def attainment_plot(plan: Plan, path: Path) -> Path:
    """SLO attainment of the chosen fleets at every simulated rate."""
    figure = _figure("SLO attainment vs request rate")
    ax = figure.subplots()
    for i, check in enumerate(_chosen(plan)):
        headroom = plan.headroom.get(check.fleet.label)
        points = headroom.checks if headroom else (check,)
        ax.plot([c.rate for c in points], [c.attainment * 100 for c in points], "o-", color=f"C{i}",
                label=check.fleet.label)
        if headroom:
            # Above this rate the roofline says the batch grows without bound: not simulated.
            ax.axvline(headroom.capacity_rate, color=f"C{i}", linestyle="--", alpha=0.6,
                       label=f"its roofline capacity ({headroom.capacity_rate:.3g} req/s)")
    ax.axhline(plan.goal.attainment * 100, color="red", linestyle="--", label=f"goal {plan.goal.attainment:.0%}")
    ax.axvline(plan.goal.rate, color="gray", linestyle=":", label=f"target {plan.goal.rate:g} req/s")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests meeting both SLOs (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def _chosen(plan: Plan) -> list[FleetCheck]:
    return [c for c in (plan.best("colocated"), plan.best("disaggregated")) if c is not None]


def _figure(title: str) -> Figure:
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=11)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path


# -- files ------------------------------------------------------------------------------------


def plan_json(plan: Plan) -> dict[str, Any]:
    def check_json(check: FleetCheck) -> dict[str, Any]:
        data = asdict(check)
        data["fleet"] = fleet_json(check.fleet)
        return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in data.items()}

    def fleet_json(fleet: Fleet) -> dict[str, Any]:
        return {"label": fleet.label, "kind": fleet.kind, "usd_per_hour": fleet.usd_per_hour,
                "usd_per_million_output_tokens": plan.usd_per_million_tokens(fleet),
                "num_gpus": fleet.num_gpus, "pd_ratio": fleet.pd_ratio,
                "pools": [{"role": p.role, "accelerator": p.instance.accelerator,
                           "tensor_parallel": p.instance.tensor_parallel, "count": p.count,
                           "usd_per_gpu_hour": p.instance.usd_per_gpu_hour} for p in fleet.pools]}

    return {
        "model": plan.model,
        "workload": {"name": plan.workload.name, "mean_input_tokens": plan.workload.mean_input_tokens,
                     "mean_output_tokens": plan.workload.mean_output_tokens},
        "goal": {"rate": plan.goal.rate, "ttft_s": plan.goal.slo.ttft, "tpot_s": plan.goal.slo.tpot,
                 "percentile": plan.goal.percentile, "attainment": plan.goal.attainment},
        "verdict": verdict(plan),
        "disaggregation_pays": plan.disaggregation_pays,
        "passing": [check_json(c) for c in plan.passing],
        "checks": [check_json(c) for c in plan.checks],
        "headroom": {label: {"max_rate": h.max_rate, "failing_rate": h.failing_rate,
                             "capacity_rate": h.capacity_rate, "checks": [check_json(c) for c in h.checks]}
                     for label, h in plan.headroom.items()},
        "unsimulated": [{"fleet": fleet_json(u.fleet), "reason": u.reason} for u in plan.unsimulated],
        "exclusions": [asdict(e) for e in plan.screening.exclusions],
        "stopped_early": plan.stopped_early,
        "wall_seconds": plan.wall_seconds,
    }


def write_report(plan: Plan, out_dir: Path) -> list[Path]:
    """plan.md, plan.json and the two PNGs in ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    if _chosen(plan):
        plots["cost per million output tokens vs rate"] = cost_vs_rate_plot(plan, out_dir / "cost_vs_rate.png")
        plots["SLO attainment vs rate"] = attainment_plot(plan, out_dir / "attainment_vs_rate.png")
    report = out_dir / "plan.md"
    report.write_text(markdown(plan, plots), encoding="utf-8")
    data = out_dir / "plan.json"
    data.write_text(json.dumps(plan_json(plan), indent=2) + "\n", encoding="utf-8")
    return [report, data, *plots.values()]
