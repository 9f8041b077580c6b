"""The parent process of ``pdserve bench engine``: the machine and its copy bandwidth, each side in
a fresh interpreter (``__main__.py``), then the report, the table and the JSON."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.engine.measure import log
from pdserve.bench.engine.plan import BenchPlan
from pdserve.bench.engine.report import build_report
from pdserve.bench.engine.table import format_table
from pdserve.machine import (
    OtherCpuMeter,
    is_busy,
    load_average,
    machine_info,
    measure_copy_bandwidth,
    num_usable_cores,
)
from pdserve.runtime.exit_status import describe_exit


class SideFailedError(RuntimeError):
    """A side's subprocess exited without a result."""


def run_engine_benchmark(args: argparse.Namespace) -> int:
    """``pdserve bench engine``: measure, print the table, write the JSON report."""
    from pdserve.engine.loader import resolve_model_path

    started = time.perf_counter()
    if not args.skip_hf and importlib.util.find_spec("transformers") is None:
        raise ValueError(
            "the HF baseline needs transformers: pip install 'pdserve[reference]', or pass --skip-hf"
        )
    num_threads = args.threads or num_usable_cores()
    model_path = resolve_model_path(args.model)
    weight_format = getattr(args, "weight_format", "dense")
    plan = BenchPlan.create(
        str(model_path), args.dtype, weight_format, args.device, num_threads, args.quick,
        getattr(args, "attention", "auto"), getattr(args, "large_batch_float32", True),
    )
    torch.set_num_threads(num_threads)
    machine = machine_info(num_threads)
    if is_busy(machine):
        log("bench", f"WARNING: other processes use {machine['cpu_busy_percent_start']:.0f}% of the CPU")

    others = OtherCpuMeter()
    log("bench", f"measuring copy bandwidth on {plan.device}")
    bandwidth = measure_copy_bandwidth(plan.device, num_repeats=5 if args.quick else 10)
    log("bench", f"copy bandwidth {bandwidth['bytes_per_second'] / 1e9:.1f} GB/s")
    try:
        ours = _run_side("ours", plan)
        hf = None if args.skip_hf else _run_side("hf", plan)
    except SideFailedError as error:
        print(f"pdserve: error: {error}", file=sys.stderr)
        return 1
    machine["load_average_end"] = load_average()
    machine["other_cpu_percent_during_run"] = others.percent()

    report = build_report(plan, machine, bandwidth, ours, hf)
    report["args"] = dict(vars(args))
    report["command_line"] = shlex.join([sys.executable, *sys.argv])
    report["total_seconds"] = time.perf_counter() - started
    print(format_table(report), flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    log("bench", f"wrote {output} ({report['total_seconds']:.0f} s in all)")
    return 0


def _run_side(side: str, plan: BenchPlan) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its stdout joins our stderr, so ours holds the table."""
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as directory:
        result_path = Path(directory) / f"{side}.json"
        command = [
            sys.executable, "-m", "pdserve.bench.engine",
            "--side", side, "--plan", plan.to_json(), "--result", str(result_path),
        ]  # fmt: skip
        # transformers' GGUF reader draws a tqdm bar of its own; TQDM_DISABLE silences it.
        env = {**os.environ, "TQDM_DISABLE": "1"}
        others = OtherCpuMeter()
        completed = subprocess.run(command, stdout=sys.stderr.fileno(), env=env, check=False)
        if completed.returncode != 0 or not result_path.exists():
            raise SideFailedError(f"the {side} side of the benchmark failed ({describe_exit(completed.returncode)})")
        result: dict[str, Any] = json.loads(result_path.read_text())
    result["other_cpu_percent"] = others.percent()
    log("bench", f"other processes used {result['other_cpu_percent']:.0f}% of the CPU meanwhile")
    return result
