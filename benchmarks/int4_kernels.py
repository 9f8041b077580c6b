"""torch's int4 kernel against the native int4 x int8 kernel (layers/int4.py), side by side.

Same weights (4-bit groups of 32), bf16 activations, SmolLM2-135M's projection shapes. Weights
are cold, as in a forward pass: each kernel cycles through copies of a matrix worth 3x the
last-level cache. The two kernels alternate call by call, so the machine's drift hits both
alike. Prints the median microseconds a call, the weight bytes read per second, and the ratio.

    python benchmarks/int4_kernels.py [--threads 2] [--rows 1 2 4 8 12] [--calls 200]
    python benchmarks/int4_kernels.py --engine [--weight-format int4] [--batches 1 8]

``--engine`` times whole decode steps instead (512-token contexts): two engines of the same
weight format in one process, one with the native kernel in its int4 layers and one with
torch's (built with the kernel hidden from ``layers.build``), stepping in alternate rounds.

Where each kernel hands over to a dense GEMM is measured by ``crossover_rows.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.layers.int4 import Int4Linear, int4_linear_available
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.native_kernels import NativeKernels, load_native_kernels

SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536))
COLD_BYTES = 96 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--engine", action="store_true", help="time decode steps of two engines instead")
    parser.add_argument("--weight-format", default="int4", choices=["int4", "int4+w8a16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine:
        compare_engines(args)
        return
    native = _native_int4_kernels()
    print(f"threads={args.threads}, median us a call (weight GB/s), cold weights")
    print(f"{'shape':>16} {'rows':>4} {'torch int4':>18} {'native int4':>18} {'speed-up':>8}")
    for name, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.05
        copies = max(2, COLD_BYTES // (out_features * in_features // 2))
        torch_kernels = [TorchQuantizedLinear(weight, "int4") for _ in range(copies)]
        native_layers = [Int4Linear(weight, native) for _ in range(copies)]
        weight_bytes = native_layers[0].kernel_bytes
        for rows in args.rows:
            x = torch.randn(rows, in_features).bfloat16()
            times: dict[str, list[float]] = {"torch": [], "native": []}
            for call in range(args.calls):
                torch_kernel = torch_kernels[call % copies]
                native_call = native_layers[call % copies]
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


def compare_engines(args: argparse.Namespace) -> None:
    from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from pdserve.engine.layers import build as layer_build
    from pdserve.engine.llm import LLM
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    def build(native_int4: bool) -> LLMEngine:
        config = EngineConfig(
            model=ModelConfig(weight_format=args.weight_format, num_threads=args.threads),
            cache=CacheConfig(enable_prefix_caching=False, memory_bytes=(64 + 24 * max(args.batches)) << 20),
            show_progress=False,
        )
        available = layer_build.int4_linear_available
        if not native_int4:  # hidden for this build only: its int4 layers take torch's kernel
            layer_build.int4_linear_available = lambda native: False  # type: ignore[assignment]
        try:
            return LLM(config=config).engine
        finally:
            layer_build.int4_linear_available = available  # type: ignore[assignment]

    engines = {"torch int4": build(False), "native int4": build(True)}
    prompt = [(i * 7) % 1000 + 100 for i in range(512)]
    steps = 30
    print(
        f"{args.weight_format}, {args.threads} threads, decode step ms (median / p90), "
        f"{args.rounds} rounds of {steps}"
    )
    for batch in args.batches:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                for row in range(batch):
                    engine.add_request(
                        [t + row for t in prompt], SamplingParams(max_tokens=2 * batch + steps + 16, ignore_eos=True)
                    )
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
