"""A load run's results: JSON (every request's record + the summary + how it was made), PNG plots
and the Markdown that links them."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.traffic.records import RequestRecord
from pdserve.traffic.server_metrics import KV_USAGE_RATIO
from pdserve.traffic.stats import Distribution, Summary

if TYPE_CHECKING:
    from pdserve.bench.load.plots import Plot


def environment() -> dict[str, Any]:
    import importlib.metadata as metadata

    versions: dict[str, str | None] = {}
    for package in ("pdserve", "torch", "httpx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["pdserve", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "system": platform.platform()},
        "versions": versions,
    }


def write_run(path: Path, run: dict[str, Any], records: list[RequestRecord], summary: Summary) -> str:
    """``run``: the configuration and anything else to keep (SLO calibration, target, server
    metrics). Writes the JSON, then the report beside it; returns the Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**environment(), **run, "summary": summary.to_json(), "records": [r.to_json() for r in records]}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return write_report(path, data)


def write_report(path: Path, data: dict[str, Any]) -> str:
    """The plots (``<stem>-*.png``) and the Markdown (``<stem>.md``) of the run stored at ``path``."""
    from pdserve.bench.load.plots import run_plots  # matplotlib loads slowly: only when rendering

    text = markdown(data, run_plots(data, path))
    path.with_suffix(".md").write_text(text)
    return text


def markdown(data: dict[str, Any], plots: Sequence[Plot] = ()) -> str:
    s = data["summary"]
    lines = [
        f"# Load run: {data.get('target', data.get('base_url', '?'))}, workload {data.get('workload', '?')}",
        "",
        f"`{data['command']}` on {data['date']}, {data['machine']['cpus']} CPUs ({data['machine']['processor']}).",
        "",
        f"- requests: {s['requests']} sent, {s['completed']} completed, {s['failed']} failed, "
        f"over {s['duration']:.1f} s",
        f"- throughput: {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s",
    ]
    if s.get("slo"):
        lines.append(f"- SLO: TTFT <= {s['slo']['ttft'] * 1000:.0f} ms and TPOT <= {s['slo']['tpot'] * 1000:.0f} ms"
                     + (f" ({data['slo_basis']})" if data.get("slo_basis") else ""))
        lines.append(f"- SLO attainment {s['slo_attainment'] * 100:.1f}%, goodput {s['goodput']:.2f} req/s")
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = Distribution(**s[name])
        lines.append(f"| {name.upper()} | " + " | ".join(_ms(v) for v in (d.mean, d.p50, d.p90, d.p99)) + " |")
    errors = sorted({r["error"] for r in data["records"] if r.get("error")})
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors[:10]]]
    if "server_metrics" in data:
        lines += server_metrics_markdown(data["server_metrics"])
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{plot.caption}]({plot.path.name})\n" for plot in plots]  # beside the .md
    return "\n".join(lines).rstrip("\n") + "\n"


# What the reports show, in the order a request meets it: (label, metric key, unit).
ROUTER_ROWS = (
    ("queue wait", "pdserve_router_queue_seconds", "ms"),
    ("prefill, dispatch to KV ready", "pdserve_router_prefill_seconds", "ms"),
    ("KV transfer", "pdserve_router_kv_transfer_seconds", "ms"),
    ("KV bytes per request", "pdserve_router_kv_transfer_bytes", "MiB"),
    ("time to first token", "pdserve_router_time_to_first_token_seconds", "ms"),
    ("time per output token", "pdserve_router_time_per_output_token_seconds", "ms"),
    ("end to end", "pdserve_router_request_seconds", "ms"),
)
WORKER_ROWS = (
    ("prefill, arrival to KV ready", "pdserve_worker_prefill_seconds", "ms"),
    ("KV pull", "pdserve_worker_kv_received_seconds", "ms"),
    ("KV bytes pulled per request", "pdserve_worker_kv_received_bytes", "MiB"),
    ("KV send", 'pdserve_kv_transfer_seconds{direction="send"}', "ms"),
    ("time to first token", "pdserve_worker_time_to_first_token_seconds", "ms"),
    ("time per output token", "pdserve_worker_time_per_output_token_seconds", "ms"),
)
_SCALE = {"ms": 1000.0, "MiB": 1 / 2**20, "%": 100.0}


def server_metrics_markdown(section: dict[str, Any]) -> list[str]:
    """The report's section: the server's own histograms over the load (p50/p90 from buckets)."""
    lines = ["", "## Server-side metrics (the target's /metrics, over the load)", ""]
    if not section.get("router"):
        return [*lines, "None: the target exports no pdserve metrics."]
    lines += ["Deltas between scrapes just before and after the load. Means are exact; p50/p90 are "
              "interpolated inside the histograms' buckets, so no finer than the buckets (the first "
              f"ends at 5 ms). KV usage: sampled every {section.get('sample_interval', 0):g} s during the load.", "",
              "| process | metric | count | mean | p50 | p90 |", "|---|---|---|---|---|---|"]
    processes = [("router", section["router"], ROUTER_ROWS),
                 *((f"{w['role']} {_host(w['url'])}", w, WORKER_ROWS) for w in section.get("workers", []))]
    for name, source, rows in processes:
        for label, key, unit in rows:
            if (h := source.get("histograms", {}).get(key)) is not None:
                cells = [_number(h[k], unit) for k in ("mean", "p50", "p90")]
                lines.append(f"| {name} | {label} ({unit}) | {h['count']:.0f} | " + " | ".join(cells) + " |")
        if decode := source.get("per_request", {}).get("decode_seconds"):
            lines.append(f"| {name} | decode time per request (ms) | - | {_number(decode, 'ms')} | - | - |")
        if (usage := source.get("gauges", {}).get(KV_USAGE_RATIO)) and "mean" in usage:
            cells = [_number(usage[k], "%") for k in ("mean", "p50", "p90")]
            lines.append(f"| {name} | KV usage (%; max {_number(usage['max'], '%')}) | {usage['samples']} samples | "
                         + " | ".join(cells) + " |")
    if section.get("unreachable"):
        lines += ["", "Not scraped (unreachable, or needing a secret): " + ", ".join(section["unreachable"])]
    return lines


def _number(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    scaled = value * _SCALE[unit]
    return f"{scaled:.2f}" if unit == "MiB" or abs(scaled) < 10 else f"{scaled:.0f}"


def _host(url: str) -> str:
    return url.split("//", 1)[-1].split("/", 1)[0]


def read_run(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f}"

