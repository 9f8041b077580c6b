"""Smoke test of ``pdserve bench engine --quick --skip-hf``: a real run, checked for shape only.

Speed targets are reported by the benchmark, never asserted here: timings on a shared CPU vary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pdserve.bench.engine.measure import decode_entry, prefill_entry
from pdserve.bench.engine.plan import BenchPlan
from pdserve.bench.engine.table import format_table
from pdserve.traffic.stats import percentile


def test_quick_run_writes_a_complete_report(tmp_path: Path) -> None:
    output = tmp_path / "engine.json"
    # One thread: two would fight any other job on a small machine and slow the smoke run down.
    completed = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "bench", "engine", "--quick", "--skip-hf",
         "--dtype", "float32", "--threads", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "| decode batch 8, context 512" in completed.stdout

    report = json.loads(output.read_text())
    assert report["quick"] is True and report["hf"] is None
    assert report["machine"]["num_threads"] == 1 and report["machine"]["torch"]
    assert report["args"]["dtype"] == "float32" and report["command_line"]
    assert report["bandwidth"]["bytes_per_second"] > 0
    assert report["total_seconds"] > 0

    ours = report["pdserve"]
    assert ours["weight_dtype"] == "float32" and ours["num_threads"] == 1
    assert ours["weight_bytes"] == 4 * ours["weight_numel"] > 0
    assert [e["prompt_tokens"] for e in ours["prefill"]] == [512]
    for entry in ours["prefill"]:
        assert entry["tokens_per_second"] > 0 and entry["median_seconds"] > 0
        assert entry["num_steps"] == [1] * len(entry["seconds"])  # the whole prompt in one step
    assert [e["batch_size"] for e in ours["decode"]] == [1, 8]
    for entry in ours["decode"]:
        assert len(entry["step_seconds"]) == report["plan"]["num_decode_steps"]
        assert 0 < entry["median_step_seconds"] <= entry["p90_step_seconds"]
        assert entry["tokens_per_second"] > 0
    memory = ours["memory"]
    assert memory["run_peak_rss_bytes"] > memory["kv_pool_bytes"] > 0

    floor = report["decode_floor"]["pdserve"]
    assert floor["weight_bytes"] == ours["weight_bytes"]
    assert floor["batch1_tokens_per_second_ceiling"] > 0
    targets = report["targets"]
    assert targets["decode_batch1_tokens_per_second"]["measured"] > 0
    assert targets["decode_batch32_vs_hf"]["met"] is None  # neither batch 32 nor HF in a quick run


def test_entries_take_the_p90_like_numpy() -> None:
    """Both sides' entries use the one percentile (traffic/stats.py): linear, as numpy's default."""
    assert percentile([3.0], 90) == 3.0
    entry = prefill_entry(512, "float32", [4.0, 1.0, 3.0, 2.0])
    assert entry["median_seconds"] == 2.5 and abs(entry["p90_seconds"] - 3.7) < 1e-12
    steps = decode_entry(1, 512, "float32", [float(v) for v in range(11)], peak_rss=0)
    assert abs(steps["p90_step_seconds"] - 9.0) < 1e-12


def test_plan_round_trips_through_json() -> None:
    plan = BenchPlan.create("model.gguf", "float32", "dense", "cpu", 2, quick=False)
    assert BenchPlan.from_json(plan.to_json()) == plan
    assert plan.batch_sizes == (1, 8, 32, 64) and plan.prefill_lengths == (512, 2048)
    assert plan.hf_bf16_prefill_lengths == (2048,)


def test_table_renders_without_hf() -> None:
    """The table needs only the report: it renders from a saved JSON as well as from a run."""
    plan = BenchPlan.create("model.gguf", "float32", "dense", "cpu", 2, quick=True)
    decode = {"batch_size": 1, "tokens_per_second": 50.0, "median_step_seconds": 0.02, "p90_step_seconds": 0.03}
    report: dict[str, Any] = {
        "plan": plan.__dict__,
        "pdserve": {
            "model_name": "m", "other_cpu_percent": 25.0, "dtype": "auto",
            "weight_dtype": "float32", "load_seconds": 1.0,
            "prefill": [{"prompt_tokens": 512, "tokens_per_second": 500.0, "median_seconds": 1.02}],
            "decode": [decode, {**decode, "batch_size": 8}],
            "memory": {"run_peak_rss_bytes": 2**30, "load_peak_rss_bytes": 2**30, "kv_pool_bytes": 2**28},
        },
        "hf": None,
        "ratios": {"prefill_vs_hf_float32": {}, "prefill_vs_hf_bfloat16": {}, "decode_vs_hf_float32": {},
                   "decode_batch1_vs_bandwidth_ceiling": 2.5, "run_peak_rss_vs_hf": None},
        "targets": {name: {"met": None} for name in
                    ("decode_batch1_tokens_per_second", "decode_batch32_vs_hf", "prefill_2048_vs_hf_bfloat16")},
        "decode_floor": {"pdserve": {"batch1_tokens_per_second_ceiling": 20.0, "weight_bytes": 5e8}},
        "machine": {"cpu_model": "cpu", "num_usable_cores": 2, "cpu_flags": [], "torch": "t",
                    "cpu_busy_percent_start": 50.0},
        "bandwidth": {"bytes_per_second": 1e10},
    }  # fmt: skip
    lines = format_table(report).splitlines()
    assert len({len(line) for line in lines if line.startswith("|")}) == 1  # aligned columns
    assert "WARNING: other processes used 50% of the CPU at the start, 25% during pdserve" in lines[-1]
    assert any("decode batch 1, context 512" in line and "50.0 tok/s" in line for line in lines)


def test_decode_floor_counts_what_the_quantized_kernels_read() -> None:
    import torch

    from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear

    weight = torch.randn(64, 128)
    int8 = TorchQuantizedLinear(weight, "int8")
    assert int8.kernel_bytes == 64 * 128 + 2 * 64 == int8.nbytes
    int4 = TorchQuantizedLinear(weight, "int4", group_size=32, keep_nibbles=True)
    # Half a byte per weight plus a bf16 scale and zero per group; the nibble copy for the
    # dense fallback is held (nbytes) but not read by the decode kernel.
    assert int4.kernel_bytes == 64 * 128 // 2 + 4 * 64 * (128 // 32) < int4.nbytes
