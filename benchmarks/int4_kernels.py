"""torch's int4 kernel against the native int4 x int8 kernel (int4_linear.py), side by side.

Same weights (4-bit groups of 32), bf16 activations, SmolLM2-135M's projection shapes. Weights
are cold, as in a forward pass: each kernel cycles through copies of a matrix worth 3x the
last-level cache. The two kernels alternate call by call, so the machine's drift hits both
alike. Prints the median microseconds a call, the weight bytes read per second, and the ratio.

    python benchmarks/int4_kernels.py [--threads 2] [--rows 1 2 4 8 12] [--calls 200]
    python benchmarks/int4_kernels.py --engine [--weight-format int4] [--batches 1 8]
    python benchmarks/int4_kernels.py --crossover [--rows 1 8 32 64 128 256 512]

``--engine`` times whole decode steps instead (512-token contexts): two engines of the same
weight format in one process, one with the native kernel in its int4 layers and one with
torch's (built with the kernel hidden from ``hybrid_linear``), stepping in alternate rounds.

``--crossover`` sets float32 models' threshold (``NATIVE_INT4_DENSE_ABOVE["float32"]``): the native
kernel on float32 rows against a float32 GEMM on the weights dequantized for the call (what a
float32 int4 layer runs above the threshold) and against a kept float32 weight (the dense model),
and prints the largest row count at which the kernel still wins, per shape.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.int4_linear import Int4Linear, int4_linear_available
from pdserve.engine.native_kernels import NativeKernels, load_native_kernels
from pdserve.engine.quantization import PackedLinear

SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536))
COLD_BYTES = 96 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--engine", action="store_true", help="time decode steps of two engines instead")
    parser.add_argument("--crossover", action="store_true",
                        help="the native kernel against float32 GEMMs, for float32 models' threshold")
    parser.add_argument("--weight-format", default="int4", choices=["int4", "int4+w8a16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine:
        compare_engines(args)
        return
    if args.crossover:
        crossover(args)
        return
    native = _native_int4_kernels()
    print(f"threads={args.threads}, median us a call (weight GB/s), cold weights")
    print(f"{'shape':>16} {'rows':>4} {'torch int4':>18} {'native int4':>18} {'speed-up':>8}")
    for name, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.05
        copies = max(2, COLD_BYTES // (out_features * in_features // 2))
        torch_kernels = [PackedLinear(weight, "int4").kernel for _ in range(copies)]
        native_layers = [Int4Linear(weight, native) for _ in range(copies)]
        weight_bytes = native_layers[0].kernel_bytes
        for rows in args.rows:
            x = torch.randn(rows, in_features).bfloat16()
            times: dict[str, list[float]] = {"torch": [], "native": []}
            for call in range(args.calls):
                torch_kernel = torch_kernels[call % copies]
                native_call = native_layers[call % copies]
                assert torch_kernel is not None
                started = time.perf_counter()
                torch_kernel(x)
                times["torch"].append(time.perf_counter() - started)
                started = time.perf_counter()
                native_call(x)
                times["native"].append(time.perf_counter() - started)
            medians = {side: statistics.median(values[args.calls // 10 :]) for side, values in times.items()}
            cells = [f"{medians[s] * 1e6:8.1f} ({weight_bytes / medians[s] / 1e9:5.1f})" for s in ("torch", "native")]
            print(f"{name + f' {out_features}x{in_features}':>16} {rows:>4} {cells[0]:>18} {cells[1]:>18} "
                  f"{medians['torch'] / medians['native']:7.2f}x")


def _native_int4_kernels() -> NativeKernels:
    native = load_native_kernels()
    if native is None or not int4_linear_available(native):
        raise SystemExit("the native int4 kernel is not built here on a vectorized path (see pdserve env)")
    print(f"{cpu_features().describe()}; int4_linear: {native.path('int4_linear')}")
    return native


def crossover(args: argparse.Namespace) -> None:
    native = _native_int4_kernels()
    sides = ("native int4", "dequantized", "float32")
    print(f"threads={args.threads}, median us a call, float32 x, cold weights")
    print(f"{'shape':>16} {'rows':>4} " + " ".join(f"{side:>12}" for side in sides))
    for name, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.05
        copies = max(2, COLD_BYTES // (out_features * in_features * 4))
        layers = [Int4Linear(weight, native) for _ in range(copies)]
        dense = [weight.clone() for _ in range(copies)]
        calls = {"native int4": [layer.__call__ for layer in layers], "dequantized": [layer.dense for layer in layers],
                 "float32": [functools.partial(torch.nn.functional.linear, weight=copy) for copy in dense]}
        wins = 0
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            times: dict[str, list[float]] = {side: [] for side in sides}
            budget = max(10, args.calls // max(1, rows // 8))
            for call in range(budget):
                for side in sides:
                    started = time.perf_counter()
                    calls[side][call % copies](x)
                    times[side].append(time.perf_counter() - started)
            medians = {side: statistics.median(values[budget // 10 :]) for side, values in times.items()}
            if medians["native int4"] < medians["dequantized"]:
                wins = rows
            print(f"{name + f' {out_features}x{in_features}':>16} {rows:>4} "
                  + " ".join(f"{medians[side] * 1e6:12.1f}" for side in sides))
        print(f"{name}: the native kernel wins up to {wins} rows (of those measured)")


def compare_engines(args: argparse.Namespace) -> None:
    from pdserve.engine import hybrid_linear
    from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from pdserve.engine.llm import LLM
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    def build(native_int4: bool) -> LLMEngine:
        config = EngineConfig(
            model=ModelConfig(weight_format=args.weight_format, num_threads=args.threads),
            cache=CacheConfig(enable_prefix_caching=False, memory_bytes=(64 + 24 * max(args.batches)) << 20),
            show_progress=False,
        )
        available = hybrid_linear.int4_linear_available
        if not native_int4:  # hidden for this build only: its int4 layers take torch's kernel
            hybrid_linear.int4_linear_available = lambda native: False  # type: ignore[assignment]
        try:
            return LLM(config=config).engine
        finally:
            hybrid_linear.int4_linear_available = available  # type: ignore[assignment]

    engines = {"torch int4": build(False), "native int4": build(True)}
    prompt = [(i * 7) % 1000 + 100 for i in range(512)]
    steps = 30
    print(f"{args.weight_format}, {args.threads} threads, decode step ms (median / p90), {args.rounds} rounds of {steps}")
    for batch in args.batches:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                for row in range(batch):
                    engine.add_request([t + row for t in prompt], SamplingParams(max_tokens=2 * batch + steps + 16, ignore_eos=True))
                while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
                    engine.step()
                for _ in range(3):
                    engine.step()
                for _ in range(steps):
                    assert len(engine.scheduler.running) == batch, "a step that does not decode the whole batch"
                    started = time.perf_counter()
                    engine.step()
                    times[name].append(time.perf_counter() - started)
                while engine.scheduler.running:
                    engine.step()
        cells = []
        for name, values in times.items():
            ordered = sorted(values)
            cells.append(f"{name} {statistics.median(values) * 1e3:.2f} / {ordered[int(0.9 * len(ordered))] * 1e3:.2f}")
        ratio = statistics.median(times["torch int4"]) / statistics.median(times["native int4"])
        print(f"batch {batch:>3}: {'   '.join(cells)}   native {ratio:.2f}x")


if __name__ == "__main__":
    main()
