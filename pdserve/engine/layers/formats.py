"""The weight formats, and the crossover table: up to how many rows one kernel beats another.

A projection may hold its weight twice, for a small-batch kernel and a large-batch one
(routing.py); which runs a batch is decided by one number per pair of kernels, the largest
batch at which the small one still wins. That number depends on the CPU, so the table has a
section per instruction-set level (cpu_features.py; AVX-512 CPUs with bf16 hardware have their
own, ``avx512_bf16``), each written by
``python benchmarks/crossover_rows.py`` on a machine of that level and naming the CPU it was
measured on. A pair not measured at this level takes the nearest level's number.

Kept free of torch imports: config.py and the CLI read WEIGHT_FORMATS.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

WEIGHT_FORMATS = {
    "dense": "the compute dtype's floats",
    "int8": "int8 weights (a scale per row) for decode batches, dense above",
    "int4": "4-bit groups of 32 (the GGUF's Q4_1 exactly) for decode batches, dense above",
    "w8a8": "int8 weights times activations quantized to one int8 digit per call",
    "w8a16": "int8 weights times activations carried as two int8 digits (about 15 bits)",
    "int4+w8a16": "int4 for decode batches and w8a16 above (CPUs with bf16 hardware; elsewhere w8a16)",
}
"""Every weight format, in the order the CLI lists them, with what it is."""

INT4_DECODE_W8A16 = "int4+w8a16"
ACTIVATION_DIGITS = {"w8a8": 1, "w8a16": 2, INT4_DECODE_W8A16: 2}
"""The formats that multiply in int8 (int4+w8a16: above its int4 decode batches), and the int8
digits each carries an activation in (w8a8.py)."""

CROSSOVER_TABLE = Path(__file__).with_name("crossover_rows.json")

_NEAREST_LEVELS = {
    "avx512_bf16": ("avx512_bf16", "avx512", "avx2", "portable"),
    "avx512": ("avx512", "avx512_bf16", "avx2", "portable"),
    "avx2": ("avx2", "avx512", "avx512_bf16", "portable"),
    "portable": ("portable", "avx2", "avx512", "avx512_bf16"),
}
"""Each section, then the sections tried for a pair it lacks, nearest first."""


@cache
def crossover_table(path: Path = CROSSOVER_TABLE) -> dict[str, Any]:
    """The table as stored: {level: {"cpu": ..., "rows": {small kernel: {large kernel: rows}}}}."""
    return dict(json.loads(path.read_text()))


def crossover_rows(small: str, large: str, isa: str, table: dict[str, Any] | None = None) -> int:
    """Rows up to which kernel ``small`` runs a batch rather than kernel ``large`` on a CPU of
    table section ``isa`` (CpuFeatures.crossover_section): that section's measurement, else the
    nearest section's. KeyError for a pair measured nowhere, which is a bug of the caller's
    (every pair the builder makes is in the table; tests/test_layers.py checks)."""
    table = crossover_table() if table is None else table
    for level in _NEAREST_LEVELS[isa]:
        rows = table.get(level, {}).get("rows", {}).get(small, {}).get(large)
        if rows is not None:
            return int(rows)
    raise KeyError(f"no crossover measured between {small!r} and {large!r} at any level")
