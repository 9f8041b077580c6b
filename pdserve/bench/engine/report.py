"""The engine benchmark's JSON report: both sides' results, the decode floor each side's weights
set at the measured copy bandwidth, pdserve / HF ratios, and the speed targets met or not."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from pdserve.bench.engine.plan import BenchPlan

DECODE_BATCH1_TARGET = 80.0
"""tokens/s."""
DECODE_BATCH32_RATIO_TARGET = 3.0
"""pdserve / HF tokens/s at batch 32."""
PREFILL_2048_RATIO_TARGET = 1.0
"""pdserve / HF bfloat16 tokens/s for a 2,048-token prompt."""


def decode_floor(weight_bytes: int, bytes_per_second: float) -> dict[str, float]:
    """A batch-1 decode step reads every weight once (the tied embedding once, as the LM head),
    so weight_bytes / bandwidth bounds its time from below and its tokens/s from above."""
    seconds = weight_bytes / bytes_per_second
    return {
        "weight_bytes": weight_bytes,
        "seconds_per_step": seconds,
        "batch1_tokens_per_second_ceiling": 1.0 / seconds,
    }


def find_entry(entries: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first entry with these fields (a prefill by ``prompt_tokens``, a decode by ``batch_size``)."""
    return next((e for e in entries if all(e.get(k) == v for k, v in match.items())), None)


def _rate(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else float(entry["tokens_per_second"])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _target(goal: float, measured: float | None) -> dict[str, Any]:
    return {"target": goal, "measured": measured, "met": None if measured is None else measured >= goal}


def build_report(
    plan: BenchPlan,
    machine: dict[str, Any],
    bandwidth: dict[str, Any],
    ours: dict[str, Any],
    hf: dict[str, Any] | None,
) -> dict[str, Any]:
    bytes_per_second = bandwidth["bytes_per_second"]
    floors = {"pdserve": decode_floor(ours["weight_bytes"], bytes_per_second)}
    hf_prefill = hf["prefill"] if hf else []
    hf_decode = hf["decode"] if hf else []
    if hf:
        floors["hf"] = decode_floor(hf["weight_bytes"], bytes_per_second)

    def ours_prefill(length: int) -> float | None:
        return _rate(find_entry(ours["prefill"], prompt_tokens=length))

    def ours_decode(batch_size: int) -> float | None:
        return _rate(find_entry(ours["decode"], batch_size=batch_size))

    prefill_vs_bf16 = {
        str(n): _ratio(ours_prefill(n), _rate(find_entry(hf_prefill, prompt_tokens=n, dtype="bfloat16")))
        for n in plan.hf_bf16_prefill_lengths
    }
    decode_vs_hf = {
        str(b): _ratio(ours_decode(b), _rate(find_entry(hf_decode, batch_size=b))) for b in plan.batch_sizes
    }
    ratios = {
        "prefill_vs_hf_float32": {
            str(n): _ratio(ours_prefill(n), _rate(find_entry(hf_prefill, prompt_tokens=n, dtype="float32")))
            for n in plan.prefill_lengths
        },
        "prefill_vs_hf_bfloat16": prefill_vs_bf16,
        "decode_vs_hf_float32": decode_vs_hf,
        "decode_batch1_vs_bandwidth_ceiling": _ratio(
            ours_decode(1), floors["pdserve"]["batch1_tokens_per_second_ceiling"]
        ),
        "run_peak_rss_vs_hf": _ratio(
            ours["memory"]["run_peak_rss_bytes"], hf["memory"]["run_peak_rss_bytes"] if hf else None
        ),
    }
    targets = {
        "decode_batch1_tokens_per_second": _target(DECODE_BATCH1_TARGET, ours_decode(1)),
        "decode_batch32_vs_hf": _target(
            DECODE_BATCH32_RATIO_TARGET, decode_vs_hf.get("32")
        ),
        "prefill_2048_vs_hf_bfloat16": _target(
            PREFILL_2048_RATIO_TARGET, prefill_vs_bf16.get("2048")
        ),
    }
    return {
        "benchmark": "pdserve bench engine",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "plan": asdict(plan),
        "machine": machine,
        "bandwidth": bandwidth,
        "decode_floor": floors,
        "pdserve": ours,
        "hf": hf,
        "ratios": ratios,
        "targets": targets,
    }

