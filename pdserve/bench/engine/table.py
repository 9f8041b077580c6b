"""The engine benchmark's printed table: pdserve beside HF, the ratios and the targets, from a
report alone (so a saved JSON renders as well as a run)."""

from __future__ import annotations

from typing import Any

from pdserve.bench.engine.report import (
    DECODE_BATCH1_TARGET,
    DECODE_BATCH32_RATIO_TARGET,
    find_entry,
)
from pdserve.machine import is_busy


def _prefill_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['tokens_per_second']:,.0f} tok/s ({entry['median_seconds']:.2f} s)"


def _decode_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    p50, p90 = entry["median_step_seconds"] * 1e3, entry["p90_step_seconds"] * 1e3
    return f"{entry['tokens_per_second']:,.1f} tok/s (step {p50:.1f} / p90 {p90:.1f} ms)"


def _ratio_cell(ratio: float | None, label: str = "") -> str:
    return "-" if ratio is None else f"{ratio:.2f}x{label}"


def _target_cell(target: dict[str, Any], text: str) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
    return f"{text}: {verdict}"


def _gib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def format_table(report: dict[str, Any]) -> str:
    """One aligned Markdown table: pdserve beside HF, the ratios and the targets."""
    plan, ours, hf = report["plan"], report["pdserve"], report["hf"]
    ratios, targets = report["ratios"], report["targets"]
    hf_prefill = hf["prefill"] if hf else []
    hf_decode = hf["decode"] if hf else []
    missing = "-" if hf else "skipped"
    ours_dtype = ours["weight_dtype"] + (f" ({ours['dtype']})" if ours["dtype"] != ours["weight_dtype"] else "")
    if ours.get("weight_format", "dense") != "dense":
        ours_dtype += f", {ours['weight_format']} weights"
    if ours.get("decode_attention") == "native":
        ours_dtype += ", native decode attention"
    header = ["", f"pdserve {ours_dtype}", "HF sdpa float32", "HF sdpa bfloat16", "pdserve / HF", "target"]
    rows: list[list[str]] = []

    for length in plan["prefill_lengths"]:
        hf32 = find_entry(hf_prefill, prompt_tokens=length, dtype="float32")
        hf16 = find_entry(hf_prefill, prompt_tokens=length, dtype="bfloat16")
        ratio = _ratio_cell(ratios["prefill_vs_hf_float32"].get(str(length)), " fp32")
        if hf16 is not None:
            ratio += ", " + _ratio_cell(ratios["prefill_vs_hf_bfloat16"].get(str(length)), " bf16")
        target = _target_cell(targets["prefill_2048_vs_hf_bfloat16"], ">= 1x HF bf16") if length == 2048 else ""
        rows.append([
            f"prefill {length:,} tokens", _prefill_cell(find_entry(ours["prefill"], prompt_tokens=length)),
            _prefill_cell(hf32) if hf else missing, _prefill_cell(hf16) if hf else missing, ratio, target,
        ])  # fmt: skip

    for batch_size in plan["batch_sizes"]:
        target = ""
        if batch_size == 1:
            target = _target_cell(targets["decode_batch1_tokens_per_second"], f">= {DECODE_BATCH1_TARGET:.0f} tok/s")
        elif batch_size == 32:
            target = _target_cell(targets["decode_batch32_vs_hf"], f">= {DECODE_BATCH32_RATIO_TARGET:.0f}x HF")
        rows.append([
            f"decode batch {batch_size}, context {plan['context_length']}",
            _decode_cell(find_entry(ours["decode"], batch_size=batch_size)),
            _decode_cell(find_entry(hf_decode, batch_size=batch_size)) if hf else missing, "-",
            _ratio_cell(ratios["decode_vs_hf_float32"].get(str(batch_size))), target,
        ])  # fmt: skip

    floors = report["decode_floor"]

    def floor_cell(side: str) -> str:
        floor = floors.get(side)
        if floor is None:
            return missing
        return (
            f"{floor['batch1_tokens_per_second_ceiling']:,.1f} tok/s "
            f"({floor['weight_bytes'] / 1e6:,.0f} MB / step)"
        )

    ceiling_ratio = ratios["decode_batch1_vs_bandwidth_ceiling"]
    rows.append([
        "decode ceiling, batch 1 (weights / bandwidth)", floor_cell("pdserve"), floor_cell("hf"), "-",
        "-", "" if ceiling_ratio is None else f"pdserve batch 1 at {ceiling_ratio:.0%} of it",
    ])  # fmt: skip
    hf_memory = hf["memory"] if hf else {}
    rows.append([
        "peak RSS after loading (all phases)",
        f"{_gib(ours['memory']['run_peak_rss_bytes'])} (KV pool {_gib(ours['memory']['kv_pool_bytes'])})",
        _gib(hf_memory.get("run_peak_rss_bytes")) if hf else missing, "-",
        _ratio_cell(ratios["run_peak_rss_vs_hf"]), "",
    ])  # fmt: skip
    rows.append([
        "peak RSS while loading", _gib(ours["memory"]["load_peak_rss_bytes"]),
        _gib(hf_memory.get("load_peak_rss_bytes")) if hf else missing, "-", "-", "",
    ])  # fmt: skip
    rows.append([
        "load time", f"{ours['load_seconds']:.1f} s", f"{hf['load_seconds']:.1f} s" if hf else missing,
        "-", "-", "",
    ])  # fmt: skip

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    machine = report["machine"]
    notes = [
        f"{ours['model_name']} on {plan['device']} ({machine['cpu_model']}, {machine['num_usable_cores']} cores, "
        f"{plan['num_threads']} threads, flags {' '.join(machine['cpu_flags']) or 'none'}); torch {machine['torch']}"
        + (f", transformers {hf['transformers_version']}" if hf else ""),
        f"copy bandwidth {report['bandwidth']['bytes_per_second'] / 1e9:.1f} GB/s (read + write); "
        f"HF = LlamaForCausalLM, sdpa attention (faster than eager), DynamicCache, same weights",
        f"decode: {plan['num_decode_steps']} timed steps after {plan['num_warmup_steps']} warmup; "
        f"prefill: median of {plan['num_prefill_repeats']} distinct prompts, prefix caching off",
    ]
    if is_busy(machine):
        sides = [("pdserve", ours), ("HF", hf)] if hf else [("pdserve", ours)]
        during = ", ".join(f"{side['other_cpu_percent']:.0f}% during {name}" for name, side in sides)
        notes.append(
            f"WARNING: other processes used {machine['cpu_busy_percent_start']:.0f}% of the CPU at the "
            f"start, {during}: these numbers are noisy and low"
        )
    table = [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]
    return "\n".join([*table, "", *notes])
