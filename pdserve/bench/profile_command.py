"""``pdserve bench profile-workload``: measure before you migrate.

Runs a workload on a colocated pdserve (started here, or one already running at ``--url``),
reads its workers' engine step counters before and after, and reports the share of engine time
that went to prefill and to decode, what each phase achieved against this machine's measured
peaks, and the prefill:decode ratio that implies (bench/workload_profile.py does the arithmetic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.traffic.workloads import WORKLOADS


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="profile a pdserve router already running here (default: start a colocated one)")
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed", help="length preset (default: mixed)")
    parser.add_argument("--num-requests", type=int, default=24, help="requests to send (default: 24)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: clients (default: 4)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds the load may take (default: 300)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the peak measurements (default: the cores this process may use)")
    parser.add_argument("--model", default=None,
                        help="GGUF file or HF directory the server runs, for its shapes (default: the default model)")
    parser.add_argument("--worker-secret", default=None, help="Bearer token the workers' /metrics want, if any")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: benchmarks/results/profile/<workload>-<time>.json); .md beside it")


def run_profile_workload(args: argparse.Namespace) -> int:
    import os

    import torch

    from pdserve.bench.load.loadgen import LoadConfig, run_load
    from pdserve.bench.load.report import environment
    from pdserve.bench.load.targets import PDSERVE_TARGETS, RunningTarget
    from pdserve.bench.workload_profile import (
        ModelCosts,
        markdown,
        profile,
        step_work_from_counters,
    )
    from pdserve.engine.device import resolve_dtype
    from pdserve.engine.loader.checkpoint import read_model_architecture
    from pdserve.machine import measure_peaks
    from pdserve.traffic.server_metrics import ServerMetricsRecorder
    from pdserve.traffic.workloads import synthetic_requests

    if args.num_requests < 1:
        print("pdserve bench profile-workload: --num-requests must be >= 1", file=sys.stderr)
        return 2
    out = args.out or Path("benchmarks/results/profile") / f"{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    threads = args.threads or len(os.sched_getaffinity(0))
    print(f"measuring this machine's peaks ({threads} thread(s)): fp32 GEMM and memory copy...", file=sys.stderr)
    peaks = measure_peaks(threads)
    arch = read_model_architecture(args.model)
    element_bytes = resolve_dtype("auto", torch.device("cpu")).itemsize
    costs = ModelCosts.of(arch, element_bytes, element_bytes)

    server = None
    url = args.url
    if url is None:
        log_path = out.with_suffix(".server.log")
        print(f"starting a colocated pdserve (log: {log_path})...", file=sys.stderr)
        model_flags = ("--model", args.model) if args.model else ()
        server = RunningTarget(PDSERVE_TARGETS["colocated"], log_path, model_flags)
        url = server.url
    headers = {"Authorization": f"Bearer {args.worker_secret}"} if args.worker_secret else None
    try:
        specs = synthetic_requests(args.workload, args.num_requests, args.seed)
        config = LoadConfig(base_url=url, rate=args.rate, concurrency=args.concurrency or 4,
                            time_limit=args.time_limit, seed=args.seed)
        how = f"{args.rate:g} req/s" if args.rate is not None else f"{config.concurrency} concurrent"
        print(f"sending {len(specs)} {args.workload} requests, {how}...", file=sys.stderr)
        with ServerMetricsRecorder(url, headers=headers) as recorder:
            started = time.monotonic()
            records = asyncio.run(run_load(config, specs))
            wall = time.monotonic() - started
    finally:
        if server is not None:
            server.stop()
    workers = recorder.section.get("workers", [])
    if not workers:
        unreachable = ", ".join(recorder.section.get("unreachable", [])) or "none listed by the router"
        print(f"pdserve bench profile-workload: no worker's /metrics could be read ({unreachable})", file=sys.stderr)
        return 1

    result: dict[str, Any] = {
        **environment(),
        "workload": args.workload,
        "target": url if args.url else "pdserve colocated (one worker on this process's cores)",
        "load": asdict(config),
        "requests": {"sent": len(records), "completed": sum(r.ok for r in records)},
        **profile(step_work_from_counters(w["counters"] for w in workers), wall, costs, peaks),
        "command": "pdserve " + shlex.join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0 if result["requests"]["completed"] else 1

