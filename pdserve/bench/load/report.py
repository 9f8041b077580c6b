"""A load run's results: JSON (every request's record + the summary + how it was made) and Markdown."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pdserve.bench.load.records import RequestRecord
from pdserve.bench.load.stats import Distribution, Summary


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


def write_run(path: Path, run: dict[str, Any], records: list[RequestRecord], summary: Summary) -> None:
    """``run``: the configuration and anything else to keep (SLO calibration, target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**environment(), **run, "summary": summary.to_json(), "records": [r.to_json() for r in records]}
    path.write_text(json.dumps(data, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(data))


def markdown(data: dict[str, Any]) -> str:
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
    return "\n".join(lines) + "\n"


def read_run(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f}"

