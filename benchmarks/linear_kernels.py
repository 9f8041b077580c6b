"""Time dense fp32 vs torch's int8 and int4 kernels on SmolLM2-135M's matrix shapes.

Prints median (or --min) microseconds per call for each (threads, shape, batch), the three
formats run interleaved in every round so machine noise hits them alike; then the cost of
dequantizing each shape to fp32 (what a routed layer pays per call above its crossover rows);
with --model, whole 30-layer stacks per format, routed ones included. The crossover rows the
engine uses are measured by crossover_rows.py.

Weights are cold, as in a real forward pass where ~30 layers of weights stream through a cache
far smaller than the model: each format cycles through enough copies of a matrix to overflow
the last-level cache (--warm times one cache-resident copy instead, which flatters dense fp32
on the small matrices).

    python benchmarks/linear_kernels.py                  # per-shape tables (~1.5 minutes)
    python benchmarks/linear_kernels.py --model          # plus whole-model stacks (~5 minutes)
    python benchmarks/linear_kernels.py --threads 1 --batches 1 8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from pdserve.engine.layers.linear import DenseLinear, DequantizedLinear, Linear
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear

FORMATS = ("dense", "int8", "int4")
ROUTED_ROWS = {"int8": 24, "int4": 32}
"""Rows up to which the routed variants of --model run the quantized kernel."""


def make_layer(weight: torch.Tensor, weight_format: str, routed_rows: int | None = None) -> Linear:
    """dense: F.linear; int8/int4: torch's kernel, routed to a dequantized GEMM above routed_rows."""
    if weight_format == "dense":
        return DenseLinear(weight.clone())  # a copy of its own, as each quantized layer has
    quantized = TorchQuantizedLinear(weight, weight_format, keep_nibbles=routed_rows is not None)
    return quantized if routed_rows is None else RowRouted(quantized, DequantizedLinear(quantized), routed_rows)

# (name, out_features, in_features) of SmolLM2-135M's GEMMs.
SHAPES = (
    ("gate_up", 3072, 576),
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
)
BATCHES = (1, 8, 32, 64, 512)
MODEL_BATCHES = (1, 8, 16, 32, 64, 512)
NUM_LAYERS = 30
COLD_BYTES = 96 << 20
"""Bytes of copies each format cycles through: 3x this machine's 32 MiB L3."""


class Rotation:
    """Calls copies of one layer in turn, so successive calls find no weight in cache."""

    def __init__(self, make: Callable[[], Linear], x: torch.Tensor, cold_bytes: int) -> None:
        # Each copy built anew: a deep copy would share the tensors its kernel closure binds.
        layer = make()
        num_copies = max(1, -(-cold_bytes // layer.kernel_bytes))
        self.layers = [layer] + [make() for _ in range(num_copies - 1)]
        self.x = x
        self.next_index = 0

    def set_input(self, x: torch.Tensor) -> None:
        self.x = x

    def __call__(self) -> torch.Tensor:
        layer = self.layers[self.next_index]
        self.next_index = (self.next_index + 1) % len(self.layers)
        return layer(self.x)


@dataclasses.dataclass(frozen=True)
class Timer:
    budget_s: float
    """Seconds to spend per table cell (at least 3 rounds either way)."""
    max_repeats: int
    use_min: bool
    """Report the fastest round instead of the median: steadier on a machine shared with others."""

    @property
    def label(self) -> str:
        return "min" if self.use_min else "median"

    def time_us(self, functions: Sequence[Callable[[], object]]) -> list[float]:
        """Wall time of each function, called round-robin so noise hits them all alike."""
        for function in functions:
            function()  # warm-up: first-call allocations and lazy init
        start = time.perf_counter()
        for function in functions:
            function()
        round_s = time.perf_counter() - start
        repeats = max(3, min(self.max_repeats, int(self.budget_s / max(round_s, 1e-9))))
        samples: list[list[float]] = [[] for _ in functions]
        for _ in range(repeats):
            for function, times in zip(functions, samples, strict=True):
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
        statistic = min if self.use_min else statistics.median
        return [statistic(times) * 1e6 for times in samples]


def kernel_table(batches: list[int], timer: Timer, warm: bool) -> None:
    print(f"{timer.label} us per call (speed-up over dense fp32)")
    print(f"{'shape':<18}{'T':>5}{'dense':>10}{'int8':>18}{'int4':>18}")
    for name, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.02
        empty = torch.empty(0)
        rotations = [
            Rotation(functools.partial(make_layer, weight, fmt), empty, 0 if warm else COLD_BYTES)
            for fmt in FORMATS
        ]
        for batch in batches:
            x = torch.randn(batch, in_features)
            for rotation in rotations:
                rotation.set_input(x)
            times = timer.time_us(rotations)
            cells = [f"{t:>8.0f} ({times[0] / t:4.2f}x)" for t in times[1:]]
            label = f"{name} {out_features}x{in_features}"
            print(f"{label:<18}{batch:>5}{times[0]:>10.0f}{cells[0]:>18}{cells[1]:>18}")


def dequantize_table(timer: Timer) -> None:
    print(f"dequantize to fp32 (a routed layer's extra cost per dense call), {timer.label} us")
    print(f"{'shape':<18}{'int8':>10}{'int4':>10}")
    for name, out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.02
        layers = [TorchQuantizedLinear(weight, fmt, keep_nibbles=True) for fmt in ("int8", "int4")]
        times = timer.time_us([layer.dequantize for layer in layers])
        label = f"{name} {out_features}x{in_features}"
        print(f"{label:<18}{times[0]:>10.0f}{times[1]:>10.0f}")


MODEL_VARIANTS: tuple[tuple[str, str, int | None], ...] = (
    ("dense", "dense", None),
    ("int8", "int8", None),
    ("int4", "int4", None),
    ("int8 routed", "int8", ROUTED_ROWS["int8"]),
    ("int4 routed", "int4", ROUTED_ROWS["int4"]),
)


def build_model_stacks() -> list[list[Linear]]:
    """Per variant, the 30 layers' four GEMMs in the order a forward step runs them."""
    stacks = []
    for _, weight_format, routed_rows in MODEL_VARIANTS:
        shapes = [(out_f, in_f) for _, out_f, in_f in SHAPES[:-1]]  # the LM head runs once per step
        weights = [torch.randn(out_f, in_f) * 0.02 for out_f, in_f in shapes]
        # Each layer built anew: a deep copy would share the tensors its kernel closure binds.
        stacks.append([make_layer(weight, weight_format, routed_rows) for _ in range(NUM_LAYERS) for weight in weights])
    return stacks


def model_table(stacks: list[list[Linear]], batches: list[int], timer: Timer) -> None:
    print(
        f"{NUM_LAYERS} layers x (qkv, o, gate_up, down), {timer.label} ms per step "
        f"(speed-up over dense); routed variants take the kernel up to {ROUTED_ROWS} rows"
    )
    print(f"{'T':>5}" + "".join(f"{name:>18}" for name, _, _ in MODEL_VARIANTS))
    megabytes = [sum(layer.kernel_bytes for layer in stack) / 1e6 for stack in stacks]
    print(f"{'MB/1':>5}" + "".join(f"{size:>18.0f}" for size in megabytes))
    for batch in batches:
        inputs = {size: torch.randn(batch, size) for size in (576, 1536)}
        # At or below its rows a routed variant runs exactly its kernel: not timed again.
        timed = [
            i
            for i, (_, _, routed_rows) in enumerate(MODEL_VARIANTS)
            if routed_rows is None or batch > routed_rows
        ]
        steps = [functools.partial(run_stack, stacks[i], inputs) for i in timed]
        times = dict(zip(timed, timer.time_us(steps), strict=True))
        cells = [
            f"{times[i] / 1e3:>10.1f} ({times[0] / times[i]:4.2f}x)" if i in times else f"{'-':>18}"
            for i in range(len(MODEL_VARIANTS))
        ]
        print(f"{batch:>5}" + "".join(cells))


def run_stack(stack: list[Linear], inputs: dict[int, torch.Tensor]) -> None:
    for layer in stack:
        layer(inputs[layer.in_features])


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    timer = Timer(args.budget, args.max_repeats, args.min)
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{'warm' if args.warm else 'cold'} weights"
    )
    stacks = build_model_stacks() if args.model else []
    for num_threads in args.threads:
        torch.set_num_threads(num_threads)
        print(f"\n== threads={num_threads}, load average {os.getloadavg()[0]:.2f}")
        kernel_table(args.batches, timer, args.warm)
        print()
        dequantize_table(timer)
        if stacks:
            print()
            model_table(stacks, args.model_batches, timer)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per table cell")
    parser.add_argument("--max-repeats", type=int, default=31)
    parser.add_argument("--min", action="store_true", help="report min instead of median")
    parser.add_argument("--warm", action="store_true", help="one cache-resident copy per format")
    parser.add_argument(
        "--model", action="store_true", help="also time whole 30-layer stacks (~1 GB, slower)"
    )
    parser.add_argument("--model-batches", type=int, nargs="+", default=list(MODEL_BATCHES))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
