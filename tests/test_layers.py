"""The layer builder and its crossover table: every format builds on this machine with every pair
it routes in the table, the table's lookup falls back to the nearest level, and the script that
measures the table writes this level's section and keeps the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_native import seeded_randn

from pdserve.engine.cpu_features import ISA_LEVELS, CpuFeatures, cpu_features
from pdserve.engine.layers.build import LayerTarget, build_linear
from pdserve.engine.layers.formats import WEIGHT_FORMATS, crossover_rows, crossover_table
from pdserve.engine.layers.linear import Linear
from pdserve.engine.layers.lm_head import build_lm_head
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.native_kernels import NativeKernels, load_native_kernels

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _routed(layer: Linear) -> list[RowRouted]:
    if not isinstance(layer, RowRouted):
        return []
    return [layer, *_routed(layer.small), *_routed(layer.large)]


@pytest.mark.parametrize("weight_format", list(WEIGHT_FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_native", [True, False])
def test_every_format_builds_here_and_computes_its_projection(
    native: NativeKernels, weight_format: str, dtype: torch.dtype, with_native: bool
) -> None:
    """Building looks every routed pair up in the table (a missing pair raises KeyError), and the
    layer, whichever kernel a batch takes, computes x @ W.T within its format's error."""
    target = LayerTarget(dtype, CPU, native if with_native else None)
    weight = seeded_randn(64, 128) * 0.05
    layer = build_linear(weight, weight_format, target)
    head = build_lm_head(weight.to(dtype), weight_format, target)
    for rows in (1, 3, 70):
        x = seeded_randn(rows, 128, seed=rows).to(dtype)
        reference = x.double() @ weight.double().t()
        for name, got in (("layer", layer(x)), ("head", head(x))):
            assert got.shape == (rows, 64), name
            assert got.dtype == (torch.float32 if name == "head" else dtype), name
            error = float((got.double() - reference).norm() / reference.norm())
            # w8a8 keeps 8 bits of each activation row; int4 ~8% weight error (groups of 32).
            assert error < (0.12 if weight_format in ("int4", "int4+w8a16", "w8a8") else 0.03), (name, rows)
        assert layer.kernel_bytes > 0 and head.decode_bytes > 0
    for routed in _routed(layer) + _routed(head.layer):
        assert routed.kernel(1) == routed.small.kernel(1)
        assert routed.kernel(routed.small_rows + 1) == routed.large.kernel(routed.small_rows + 1)


def test_a_level_without_a_measurement_takes_the_nearest_levels() -> None:
    table = {"avx2": {"cpu": "x", "rows": {"native-int4": {"dequantized": 40}}},
             "avx512": {"cpu": "y", "rows": {"native-int4": {"onednn-bf16": 64, "dequantized": 20}}}}
    assert crossover_rows("native-int4", "dequantized", "avx2", table) == 40
    assert crossover_rows("native-int4", "dequantized", "avx512", table) == 20
    assert crossover_rows("native-int4", "onednn-bf16", "avx2", table) == 64  # measured on avx512 only
    assert crossover_rows("native-int4", "dequantized", "portable", table) == 40  # portable: avx2 first
    with pytest.raises(KeyError, match="no crossover measured"):
        crossover_rows("torch-int4", "w8a8", "avx2", table)


def test_avx512_cpus_with_and_without_bf16_hardware_read_their_own_sections() -> None:
    table = {"avx512_bf16": {"cpu": "x", "rows": {"native-int4": {"onednn-bf16": 64, "dequantized": 20}}},
             "avx512": {"cpu": "y", "rows": {"native-int4": {"dequantized": 48}}}}
    xeon_bf16 = CpuFeatures("xeon", "x86_64", frozenset({*ISA_LEVELS["avx512"].requires, "avx512_bf16"}))
    xeon = CpuFeatures("xeon", "x86_64", frozenset(ISA_LEVELS["avx512"].requires))
    assert xeon_bf16.crossover_section("avx512") == "avx512_bf16" and xeon.crossover_section("avx512") == "avx512"
    assert xeon.crossover_section("avx2") == "avx2"
    assert crossover_rows("native-int4", "dequantized", "avx512_bf16", table) == 20
    assert crossover_rows("native-int4", "dequantized", "avx512", table) == 48
    assert crossover_rows("native-int4", "onednn-bf16", "avx512", table) == 64  # the nearest section's


def test_the_shipped_table_names_its_machines() -> None:
    table = crossover_table()
    assert set(table) <= {"avx512_bf16", "avx512", "avx2", "portable"} and table
    for level, section in table.items():
        assert section["cpu"] and section["measured_by"], level
        for small, larges in section["rows"].items():
            assert all(isinstance(rows, int) and rows >= 0 for rows in larges.values()), (level, small)


def test_the_crossover_script_writes_this_levels_section(tmp_path: Path) -> None:
    output = tmp_path / "crossover_rows.json"
    other = {"cpu": "another machine", "measured_by": "hand", "rows": {"a": {"b": 7}}}
    cpu = cpu_features()
    level = cpu.crossover_section(cpu.isa_levels()[0])
    output.write_text(json.dumps({"elsewhere": other}))
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "crossover_rows.py"), "--quick", "--dtype", "float32",
         "--output", str(output)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads(output.read_text())
    assert table["elsewhere"] == other
    section = table[level]
    assert cpu_features().describe() in section["cpu"] and "--quick" in section["measured_by"]
    # Every pair the builder routes here for float32 models was measured, with its rows.
    native = load_native_kernels()
    routed = [pair for kernels in (native, None) for weight_format in WEIGHT_FORMATS
              for layer in (
                  build_linear(seeded_randn(64, 128), weight_format, LayerTarget(torch.float32, CPU, kernels)),
                  build_lm_head(seeded_randn(64, 128), weight_format, LayerTarget(torch.float32, CPU, kernels)).layer,
              )
              for pair in _routed(layer)]
    assert routed
    for pair in routed:
        assert section["rows"][pair.small.kernel(1)][pair.large.kernel(1)] >= 0
    assert " vs " in result.stdout and "-> " in result.stdout
