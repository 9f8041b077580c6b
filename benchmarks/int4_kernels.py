"""torch's int4 kernel against the native int4 x int8 kernel (int4_linear.py), side by side.

Same weights (4-bit groups of 32), bf16 activations, SmolLM2-135M's projection shapes. Weights
are cold, as in a forward pass: each kernel cycles through copies of a matrix worth 3x the
last-level cache. The two kernels alternate call by call, so the machine's drift hits both
alike. Prints the median microseconds a call, the weight bytes read per second, and the ratio.

    python benchmarks/int4_kernels.py [--threads 2] [--rows 1 2 4 8 12] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdserve.engine.int4_linear import Int4Linear, int4_linear_available
from pdserve.engine.native_kernels import load_native_kernels
from pdserve.engine.quantization import PackedLinear

SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536))
COLD_BYTES = 96 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = load_native_kernels()
    if not int4_linear_available(native):
        raise SystemExit("the native int4 kernel is not built here (needs AVX512-VNNI)")
    assert native is not None
    print(f"threads={args.threads}, median us a call (weight GB/s), cold weights")
    print(f"{'shape':>16} {'rows':>4} {'torch int4':>18} {'native int4':>18} {'speed-up':>8}")
    for name, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.05
        torch_layer, native_layer = PackedLinear(weight, "int4"), Int4Linear(weight, native)
        copies = max(2, COLD_BYTES // (out_features * in_features // 2))
        torch_kernels = [PackedLinear(weight, "int4").kernel for _ in range(copies)]
        native_layers = [Int4Linear(weight, native) for _ in range(copies)]
        assert torch_layer.kernel is not None
        weight_bytes = native_layer.packed.numel()
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


if __name__ == "__main__":
    main()
