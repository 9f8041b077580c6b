"""``pdserve plan calibrate [--threads N] [--quick] [--out FILE]``: this machine's step profile.

Loads the engine at N threads (pinned to N cores, as ``pdserve serve`` pins its workers), times
the calibration plan's steps (engine_steps.py; progress on stderr), fits the linear step cost
(step_profile.py) and, unless --skip-roofline, measures this machine's GEMM and copy peaks and
fits the roofline's efficiencies to the same samples; writes the profile JSON and prints both
fits. Do not run it beside other CPU-heavy work: it measures the machine as it is. With
--neighbour-load, the engine decodes a batch on the remaining cores throughout, as the other
worker of a disaggregated pair or of two replicas does (neighbour_load.py); the profile records it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.planner.calibrate.engine_steps import CalibrationPlan
    from pdserve.planner.calibrate.neighbour_load import NeighbourLoad
    from pdserve.planner.calibrate.step_profile import StepProfile

PROFILE_DIR = Path("benchmarks/results/profiles")


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, and cores the process is pinned to (default: every usable core)")
    parser.add_argument("--quick", action="store_true", help="a smaller plan: about a minute instead of 2-5")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"profile JSON (default: {PROFILE_DIR}/<model>-<threads>t.json)")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the default model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype, as the workers run (default: auto)")
    parser.add_argument("--skip-roofline", action="store_true",
                        help="do not measure the machine's peaks nor fit the roofline's efficiencies")
    parser.add_argument("--neighbour-load", action="store_true",
                        help="keep the cores not calibrated busy with an engine decoding a batch, as the other "
                             "worker of a disaggregated pair or two replicas does (shared memory bandwidth "
                             "and cache); the profile says so")


def run_calibrate(args: argparse.Namespace) -> int:
    # Heavy imports (torch, the engine) only when the command runs.
    from pdserve.engine.config import ModelConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.planner.calibrate.engine_steps import QUICK_PLAN, STANDARD_PLAN
    from pdserve.planner.calibrate.neighbour_load import NeighbourLoad
    from pdserve.planner.calibrate.step_profile import save_profile

    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    if not 1 <= threads <= len(cores):
        print(f"pdserve plan calibrate: error: --threads must be 1..{len(cores)} (usable cores)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, cores[:threads])
    neighbour = None
    if args.neighbour_load:
        if threads == len(cores):
            print("pdserve plan calibrate: error: --neighbour-load needs a core that is not calibrated "
                  "(use --threads below the usable cores)", file=sys.stderr)
            return 2
        neighbour = NeighbourLoad(cores[threads:], args.model, args.dtype)
    plan = QUICK_PLAN if args.quick else STANDARD_PLAN
    engine = LLMEngine(plan.engine_config(ModelConfig(path=args.model, dtype=args.dtype, num_threads=threads)))
    try:
        with neighbour or contextlib.nullcontext():
            profile = _calibrated_profile(engine, plan, threads, cores, args.skip_roofline, neighbour)
    finally:
        engine.close()
    out = args.out or PROFILE_DIR / f"{_file_stem(profile.model)}-{threads}t.json"
    save_profile(profile, out)
    print(profile_summary(profile))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _calibrated_profile(engine: LLMEngine, plan: CalibrationPlan, threads: int, cores: list[int],
                        skip_roofline: bool, neighbour: NeighbourLoad | None) -> StepProfile:
    from pdserve.machine import machine_info
    from pdserve.planner.calibrate.engine_steps import measure_samples
    from pdserve.planner.calibrate.roofline_fit import fit_roofline, model_spec_of
    from pdserve.planner.calibrate.step_profile import StepProfile, fit_linear

    dtype = str(engine.model.dtype).removeprefix("torch.")
    layout = engine.kv_pool.layout
    beside = f", beside {neighbour.describe()}" if neighbour else ""
    print(f"calibrating {engine.model_name} ({dtype}) at {threads} thread(s) on core(s) "
          f"{','.join(map(str, cores[:threads]))}{beside}, budget {plan.time_budget_s:.0f} s", file=sys.stderr)
    samples = measure_samples(engine, plan)
    coefficients, fit = fit_linear(samples)
    roofline = None
    if not skip_roofline:
        from pdserve.machine import measure_peaks

        peaks = measure_peaks(threads)
        roofline = fit_roofline(samples, model_spec_of(engine), dtype, peaks.flops_per_second,
                                peaks.bytes_per_second)
    machine = machine_info(threads)
    if neighbour is not None:
        machine["neighbour_load"] = neighbour.describe()
    return StepProfile(
        model=engine.model_name, dtype=dtype, threads=threads,
        kv_bytes_per_token=layout.bytes_per_block // layout.block_size,
        coefficients=coefficients, fit=fit, samples=tuple(samples), machine=machine,
        created=datetime.now(UTC).isoformat(timespec="seconds"), roofline=roofline,
    )


def profile_summary(profile: StepProfile) -> str:
    """The fitted coefficients and both fits' quality, as a few lines of text."""
    c, fit = profile.coefficients, profile.fit
    lines = [
        f"{profile.model} ({profile.dtype}), {profile.threads} thread(s), {fit.num_samples} samples",
        f"  step = {c.per_step_s * 1e3:.2f} ms + {c.per_prefill_token_s * 1e3:.3f} ms/prompt token"
        f" + {c.per_attention_pair_s * 1e9:.2f} ns/attention pair + {c.per_decode_seq_s * 1e3:.3f} ms/decode"
        f" + {c.per_decode_context_token_s * 1e6:.3f} us/decode context token",
        f"  linear fit: R^2 {fit.r_squared:.4f}, relative error mean {fit.mean_relative_error:.1%}, "
        f"max {fit.max_relative_error:.1%}",
    ]
    roof = profile.roofline
    if roof is not None:
        lines.append(
            f"  roofline fit: peaks {roof.peak_flops_per_s / 1e9:.1f} GFLOP/s, "
            f"{roof.memory_bytes_per_s / 1e9:.1f} GB/s;"
            f" efficiency compute {roof.compute:.3f}, bandwidth {roof.bandwidth:.3f}, overhead "
            f"{roof.step_overhead_s * 1e3:.2f} ms; R^2 {roof.fit.r_squared:.4f}, relative error mean "
            f"{roof.fit.mean_relative_error:.1%}, max {roof.fit.max_relative_error:.1%}")
    return "\n".join(lines)


def _file_stem(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"
