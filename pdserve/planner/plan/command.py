"""``pdserve plan``: the cheapest fleet for a model, a workload, a rate and SLOs.

Reads the catalogues (plus the user's files), screens instance types with the roofline,
searches fleets with the simulator (progress on stderr), prints the ranked table and writes
plan.md, plan.json and two plots to --out.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.planner.catalogue.models import DTYPE_BYTES
from pdserve.traffic.workloads import WORKLOADS

if TYPE_CHECKING:
    from pdserve.planner.plan.workload import PlanWorkload

PRESET_WORKLOADS = tuple(w for w in WORKLOADS if w != "fixed")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a model of the catalogue, any case (e.g. llama-3.1-70b; see docs/planner.md)")
    parser.add_argument("--workload", choices=PRESET_WORKLOADS, default=None,
                        help="request lengths from a bench serve preset (default: chat)")
    parser.add_argument("--input-len", type=int, default=None, help="fixed prompt length instead of a preset")
    parser.add_argument("--output-len", type=int, default=None, help="fixed answer length instead of a preset")
    parser.add_argument("--trace", type=Path, default=None,
                        help="a Mooncake-format JSONL trace (timestamp ms, input_length, output_length) "
                        "instead of a preset; replayed at --rate, or at its own rate without --rate")
    parser.add_argument("--rate", type=float, default=None, help="target requests per second")
    parser.add_argument("--slo-ttft", type=float, required=True, help="time-to-first-token SLO, seconds")
    parser.add_argument("--slo-tpot", type=float, required=True, help="time-per-output-token SLO, seconds")
    parser.add_argument("--percentile", type=float, default=90.0,
                        help="TTFT and TPOT are judged at this percentile (default: 90)")
    parser.add_argument("--attainment", type=float, default=0.9,
                        help="share of requests that must meet both SLOs (default: 0.9)")
    parser.add_argument("--hardware", default=None,
                        help="comma-separated accelerators allowed, any case (default: every priced one)")
    parser.add_argument("--hardware-file", type=Path, default=None,
                        help="a hardware JSON merged over the shipped catalogue (prices, new accelerators)")
    parser.add_argument("--model-file", type=Path, default=None,
                        help="a models JSON merged over the shipped catalogue")
    parser.add_argument("--tensor-parallel", default="1,2,4,8",
                        help="tensor-parallel degrees to consider (default: 1,2,4,8)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES),
                        help="weights, activations and KV cache (default: bfloat16)")
    parser.add_argument("--max-instances", type=int, default=64,
                        help="most instances in one fleet, prefill + decode (default: 64)")
    parser.add_argument("--sim-requests", type=int, default=1000,
                        help="requests per simulation (default: 1000; fewer is faster and noisier)")
    parser.add_argument("--max-simulations", type=int, default=30,
                        help="simulations in the search, headroom aside (default: 30)")
    parser.add_argument("--headroom-steps", type=int, default=4,
                        help="bisection steps of the rate for each chosen fleet (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals (default: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: benchmarks/results/plan/<model>-<workload>-<time>/)")


def run_plan(args: argparse.Namespace) -> int:
    # Imported here so that building the CLI parser stays cheap (matplotlib, the simulator).
    from pdserve.planner.catalogue.hardware import load_hardware_catalogue
    from pdserve.planner.catalogue.models import load_model_catalogue
    from pdserve.planner.plan.fleet_check import PlanGoal, SimSettings
    from pdserve.planner.plan.optimizer import SearchSettings, plan
    from pdserve.planner.plan.report import impossible_message, table_text, verdict, write_report
    from pdserve.planner.plan.screen import EngineSettings
    from pdserve.traffic.stats import SLO

    models = load_model_catalogue(args.model_file)
    model = models[resolve_name(args.model, models, "model")]
    hardware = load_hardware_catalogue(args.hardware_file)
    if args.hardware:
        names = [
            resolve_name(name.strip(), hardware, "accelerator") for name in args.hardware.split(",") if name.strip()
        ]
        accelerators = [hardware[name] for name in dict.fromkeys(names)]
    else:
        accelerators = [a for a in hardware.values() if a.price is not None]
    workload = _workload(args)
    rate = args.rate if args.rate is not None else workload.native_rate
    if rate is None:
        raise ValueError("give --rate (requests per second), or a --trace to replay at its own rate")
    goal = PlanGoal(rate, SLO(args.slo_ttft, args.slo_tpot), args.percentile, args.attainment)
    search = SearchSettings(max_instances=args.max_instances, max_simulations=args.max_simulations,
                            headroom_steps=args.headroom_steps,
                            tensor_parallel=_integers(args.tensor_parallel, "--tensor-parallel"))
    result = plan(model, accelerators, workload, goal, EngineSettings(dtype=args.dtype),
                  SimSettings(num_requests=args.sim_requests, seed=args.seed), search, progress=_log)
    if not result.passing:
        raise ValueError(impossible_message(result))
    print(table_text(result))
    print()
    print(verdict(result))
    out = args.out or Path("benchmarks/results/plan") / (
        f"{_slug(model.name)}-{_slug(workload.name)}-{time.strftime('%Y%m%d-%H%M%S')}")
    written = write_report(result, out)
    _log(f"wrote {', '.join(str(path) for path in written)}")
    return 0


def resolve_name(name: str, known: Iterable[str], what: str) -> str:
    """A catalogue key from a name in any case; a unique prefix ("h100" -> "H100-SXM") works too."""
    keys = list(known)
    wanted = name.strip().lower()
    exact = [key for key in keys if key.lower() == wanted]
    if exact:
        return exact[0]
    prefixed = [key for key in keys if key.lower().startswith(wanted)] if wanted else []
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise ValueError(f"{what} {name!r} is ambiguous: {', '.join(prefixed)}")
    raise ValueError(f"unknown {what} {name!r}; known: {', '.join(keys)}")


def _workload(args: argparse.Namespace) -> PlanWorkload:
    from pdserve.planner.plan.workload import PlanWorkload
    from pdserve.traffic.workloads import fixed_preset

    fixed = args.input_len is not None or args.output_len is not None
    if sum([fixed, args.trace is not None, args.workload is not None]) > 1:
        raise ValueError("give one of --workload, --input-len/--output-len or --trace")
    if fixed:
        if args.input_len is None or args.output_len is None:
            raise ValueError("fixed lengths need both --input-len and --output-len")
        return PlanWorkload.from_preset("fixed", fixed_preset(args.input_len, args.output_len))
    if args.trace is not None:
        return PlanWorkload.from_trace(args.trace)
    return PlanWorkload.from_preset(args.workload or "chat")


def _integers(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value")
    return values


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _log(message: str) -> None:
    print(f"[plan {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
