"""Measure the crossover table: up to how many rows each small-batch kernel beats its large-batch
partner on this CPU, and write this CPU's section of ``pdserve/engine/layers/crossover_rows.json``
(its instruction-set level, or ``avx512_bf16`` for AVX-512 with bf16 hardware; the other
sections are kept, and so are this section's pairs the run did not measure).

The pairs are the ones the layer builder makes here (every weight format, float32 and bfloat16,
with and without the native kernels), so the table covers exactly what the engine can route.
Projection pairs are timed on one decoder layer of SmolLM2-135M (qkv, o, gate_up and down,
summed), head pairs on its 49,152 x 576 LM head; weights rotate through copies larger than the
caches, as in a decode step. A pair's crossover is the last batch size of the grid at which the
small kernel is at least as fast, before the first at which it is not.

    python benchmarks/crossover_rows.py [--threads 1] [--output PATH] [--dtype float32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.layers.build import LayerTarget, build_linear
from pdserve.engine.layers.formats import CROSSOVER_TABLE, WEIGHT_FORMATS
from pdserve.engine.layers.int8 import MAX_ROWS as INT8_MAX_ROWS
from pdserve.engine.layers.int8 import Int8Linear
from pdserve.engine.layers.linear import Linear
from pdserve.engine.layers.lm_head import build_lm_head
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.native_kernels import load_native_kernels

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
"""SmolLM2-135M's fused qkv, o, fused gate_up and down projections, [out, in]."""
HEAD_SHAPE = (49152, 576)
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
COLD_BYTES = 64 << 20
"""Weights rotated through per shape, beyond the caches of the CPUs measured."""


@dataclass
class Pair:
    """The layers of one (small kernel, large kernel) pair, a copy per rotation slot and shape."""

    small: str
    large: str
    is_head: bool
    dtype: torch.dtype
    """The model dtype the pair was built for: its activations' (a routed layer takes the
    model's activations whichever side runs them)."""
    copies: list[list[RowRouted]]
    """[shape][copy]"""


def no_table(small: str, large: str, level: str) -> int:
    """Route nothing: the script builds pairs whether or not the table has them yet."""
    return 0


def routed_pairs(layer: Linear) -> Iterator[RowRouted]:
    """Every RowRouted inside a built layer (a large side may be routed itself)."""
    if isinstance(layer, RowRouted):
        yield layer
        yield from routed_pairs(layer.small)
        yield from routed_pairs(layer.large)


def build_pairs(
    targets: list[LayerTarget], copies_for: Callable[[tuple[int, int]], int]
) -> dict[tuple[str, str], Pair]:
    pairs: dict[tuple[str, str], Pair] = {}
    for target in targets:
        for weight_format in WEIGHT_FORMATS:
            for is_head, shapes in ((False, LAYER_SHAPES), (True, (HEAD_SHAPE,))):
                for shape_index, shape in enumerate(shapes):
                    for _ in range(copies_for(shape)):
                        weight = torch.randn(*shape) * 0.05
                        if is_head:
                            layer: Linear = build_lm_head(weight.to(target.dtype), weight_format, target).layer
                        else:
                            layer = build_linear(weight, weight_format, target)
                        for routed in routed_pairs(layer):
                            key = (routed.small.kernel(1), routed.large.kernel(1))
                            pair = pairs.setdefault(key, Pair(*key, is_head, target.dtype, [[] for _ in shapes]))
                            if pair.is_head == is_head and len(pair.copies[shape_index]) < copies_for(shape):
                                pair.copies[shape_index].append(routed)
    return pairs


def time_side(layers: list[list[Linear]], x_by_shape: list[torch.Tensor], calls: int) -> float:
    """Median seconds of one pass over the shapes (one layer's projections), copies rotated."""
    times = []
    for call in range(calls):
        started = time.perf_counter()
        for shape_layers, x in zip(layers, x_by_shape, strict=True):
            shape_layers[call % len(shape_layers)](x)
        times.append(time.perf_counter() - started)
    return statistics.median(times[max(1, calls // 10):])


def measure(pair: Pair, calls: int, rows_grid: tuple[int, ...]) -> tuple[int, list[str]]:
    """The pair's crossover rows, and a line per batch size timed."""
    small_layers = [[routed.small for routed in shape] for shape in pair.copies]
    large_layers = [[routed.large for routed in shape] for shape in pair.copies]
    max_rows = INT8_MAX_ROWS if isinstance(pair.copies[0][0].small, Int8Linear) else rows_grid[-1]
    crossover, lines = 0, []
    for rows in (r for r in rows_grid if r <= max_rows):
        x_by_shape = [torch.randn(rows, shape[0].in_features).to(pair.dtype) for shape in pair.copies]
        budget = max(5, calls // max(1, rows // 8))
        small = time_side(small_layers, x_by_shape, budget)
        large = time_side(large_layers, x_by_shape, budget)
        lines.append(f"  {rows:>4} rows: {pair.small} {small * 1e6:10.1f} us   {pair.large} {large * 1e6:10.1f} us")
        if small > large:
            break
        crossover = rows
    return crossover, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a decode worker's)")
    parser.add_argument("--output", type=Path, default=CROSSOVER_TABLE, help="the table to update")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], action="append",
                        help="model dtypes whose pairs to measure (default: both)")
    parser.add_argument("--quick", action="store_true", help="few calls, small grid, no cold copies (for tests)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cpu = cpu_features()
    level = cpu.crossover_section(cpu.isa_levels()[0])
    native = load_native_kernels()
    dtypes = [getattr(torch, name) for name in (args.dtype or ["float32", "bfloat16"])]
    targets = [LayerTarget(dtype, torch.device("cpu"), kernels, isa=level, crossover=no_table)
               for dtype in dtypes for kernels in (native, None)]

    def copies_for(shape: tuple[int, int]) -> int:
        if args.quick or shape == HEAD_SHAPE:
            return 1
        return max(1, COLD_BYTES // (sum(out * inp for out, inp in LAYER_SHAPES) * 4))

    print(f"{cpu.describe()}, torch {torch.__version__}, {args.threads} thread(s); level {level}", flush=True)
    pairs = build_pairs(targets, copies_for)
    rows_grid = ROWS[:5] if args.quick else ROWS
    calls = 3 if args.quick else 30
    measured: dict[str, dict[str, int]] = {}
    for key in sorted(pairs):
        pair = pairs[key]
        print(f"{pair.small} vs {pair.large} ({'head' if pair.is_head else 'one layer'}):", flush=True)
        rows, lines = measure(pair, calls, rows_grid)
        print("\n".join(lines))
        print(f"  -> {pair.small} up to {rows} rows", flush=True)
        measured.setdefault(pair.small, {})[pair.large] = rows
    table = json.loads(args.output.read_text()) if args.output.exists() else {}
    rows_before = table.get(level, {}).get("rows", {})
    for small, larges in measured.items():  # pairs this run did not measure keep their numbers
        rows_before.setdefault(small, {}).update(larges)
    table[level] = {
        "cpu": f"{cpu.describe()}, torch {torch.__version__}, {args.threads} thread(s)",
        "measured_by": " ".join(["python benchmarks/crossover_rows.py", *sys.argv[1:]]),
        "rows": rows_before,
    }
    args.output.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote the {level} section of {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
