"""The load generator's statistics against hand-computed cases, its arrival processes and
workloads, and one small bounded run against a real `pdserve serve`."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.traffic.arrivals import arrival_times
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import SLO, percentile, summarize
from pdserve.traffic.workloads import PRESETS, dataset_requests, fixed_preset, synthetic_requests


def test_percentiles_interpolate_between_closest_ranks() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15 and percentile(values, 100) == 50
    assert percentile(values, 50) == 35
    assert percentile(values, 90) == pytest.approx(46.0)  # rank 3.6: 40 + 0.6 * 10
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def record(index: int, sent: float, first: float, end: float, tokens: int, error: str | None = None) -> RequestRecord:
    times = [first + i * (end - first) / max(tokens - 1, 1) for i in range(tokens)]
    return RequestRecord(index, "chat", sent, sent=sent, first_token=first, end=end, chunk_times=times,
                         chunk_tokens=[1] * tokens, output_tokens=tokens, error=error)


def test_goodput_counts_requests_meeting_both_slos_per_second() -> None:
    records = [
        record(0, 0.0, 0.2, 1.1, 10),   # ttft 0.2, tpot 0.1: meets
        record(1, 1.0, 1.9, 2.8, 10),   # ttft 0.9: misses TTFT
        record(2, 2.0, 2.1, 4.0, 10),   # tpot 0.211: misses TPOT
        record(3, 3.0, 3.3, 4.2, 10),   # meets
        RequestRecord(4, "chat", 3.5, sent=3.5, error="HTTP 503"),  # a failure: a miss
    ]
    summary = summarize(records, SLO(ttft=0.5, tpot=0.15))
    assert (summary.requests, summary.completed, summary.failed) == (5, 4, 1)
    assert summary.duration == pytest.approx(4.2)
    assert summary.slo_attainment == pytest.approx(2 / 5)
    assert summary.goodput == pytest.approx(2 / 4.2)
    assert summary.request_throughput == pytest.approx(4 / 4.2)
    assert summary.output_throughput == pytest.approx(40 / 4.2)
    assert summary.ttft.p50 == pytest.approx(percentile([0.2, 0.9, 0.1, 0.3], 50))
    assert summary.tpot.mean == pytest.approx(statistics.mean([0.1, 0.1, 1.9 / 9, 0.1]))
    assert summary.itl.p50 == pytest.approx(0.1)
    assert summarize(records).goodput is None


def test_inter_token_latency_spreads_a_multi_token_chunk_over_its_tokens() -> None:
    r = RequestRecord(0, "chat", 0, sent=0, first_token=1.0, end=1.6, chunk_times=[1.0, 1.2, 1.6],
                      chunk_tokens=[1, 1, 2], output_tokens=4)
    assert r.inter_token_latencies() == pytest.approx([0.2, 0.2, 0.2])
    assert r.tpot == pytest.approx(0.2)


def test_poisson_arrivals_have_the_rate_and_repeat_with_the_seed() -> None:
    times = arrival_times(4.0, 4000, seed=1)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.07)  # exponential: CV 1
    assert arrival_times(4.0, 10, seed=1) == times[:10]
    assert arrival_times(4.0, 10, seed=2) != times[:10]
    assert arrival_times(math.inf, 3) == [0.0, 0.0, 0.0]


def test_gamma_burstiness_keeps_the_rate_and_sets_the_spread() -> None:
    for burstiness in (0.25, 4.0):
        times = arrival_times(2.0, 6000, burstiness=burstiness, seed=3)
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.06)
        cv2 = (statistics.stdev(gaps) / statistics.mean(gaps)) ** 2
        assert cv2 == pytest.approx(1 / burstiness, rel=0.12)  # gamma: CV^2 = 1/shape
    with pytest.raises(ValueError):
        arrival_times(0, 5)


def test_workloads_draw_lengths_from_their_presets() -> None:
    for name, preset in PRESETS.items():
        for spec in synthetic_requests(name, 50, seed=4):
            assert preset.input_tokens.low <= spec.approx_prompt_tokens <= preset.input_tokens.high
            assert preset.output_tokens.low <= spec.max_tokens <= preset.output_tokens.high
            assert len(spec.prompt.split()) == spec.approx_prompt_tokens
    kinds = [s.kind for s in synthetic_requests("mixed", 400, seed=5)]
    assert kinds.count("chat") / 400 == pytest.approx(0.5, abs=0.08)
    assert {s.prompt for s in synthetic_requests("chat", 5, seed=6)} == {
        s.prompt for s in synthetic_requests("chat", 5, seed=6)}
    shared = synthetic_requests("chat", 3, seed=7, shared_prefix_tokens=40)
    assert len({" ".join(s.prompt.split()[:40]) for s in shared}) == 1
    with pytest.raises(ValueError, match="unknown workload"):
        synthetic_requests("poetry", 1)
    fixed = synthetic_requests("fixed", 5, seed=8, fixed=fixed_preset(100, 7))
    assert {(s.approx_prompt_tokens, len(s.prompt.split()), s.max_tokens) for s in fixed} == {(100, 100, 7)}
    with pytest.raises(ValueError, match="needs its lengths"):
        synthetic_requests("fixed", 1)
    with pytest.raises(ValueError, match=">= 1"):
        fixed_preset(0, 5)


def test_dataset_files_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "max_tokens": 5}\n\n{"prompt": "Bye"}\n')
    specs = dataset_requests(path, 2)
    assert [(s.prompt, s.max_tokens) for s in specs] == [("Hello there", 5), ("Bye", 128)]
    assert len(dataset_requests(path, 7)) == 7
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        dataset_requests(path, 1)


def test_a_bounded_run_against_pdserve_serve(tmp_path: Path) -> None:
    from test_serving import Server

    server = Server()
    try:
        dataset = tmp_path / "tiny.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}.", "max_tokens": 8}) + "\n"
                                   for i in range(4)))
        out = tmp_path / "run.json"
        done = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "bench", "serve", "--url", server.url, "--dataset", str(dataset),
             "--num-requests", "8", "--rate", "4", "--time-limit", "120", "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.stop()
    run = json.loads(out.read_text())
    summary = run["summary"]
    assert summary["requests"] == 8 and summary["completed"] == 8, summary
    assert all(r["output_tokens"] == 8 and len(r["chunk_times"]) >= 1 for r in run["records"])
    assert 0 < summary["ttft"]["p50"] <= summary["e2e"]["p50"]
    assert summary["slo"]["ttft"] == pytest.approx(3 * run["calibration"]["isolated_ttft"])
    assert run["calibration"]["prompt_tokens"] >= 5  # the median prompt, as the server counted it
    assert 0 <= summary["slo_attainment"] <= 1 and summary["goodput"] >= 0
    assert run["command"].startswith("pdserve bench serve --url")
    assert run["server_metrics"]["router"]["histograms"]["pdserve_router_prefill_seconds"]["count"] > 0
    assert all(out.with_name(f"run-{kind}.png").read_bytes()[:4] == b"\x89PNG" for kind in ("cdf", "timeline"))
    markdown = out.with_suffix(".md").read_text()
    assert "| TTFT |" in markdown and "goodput" in markdown
    rerendered = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "report", str(out)],
                                capture_output=True, text=True, timeout=60)
    assert rerendered.returncode == 0 and "| TPOT |" in rerendered.stdout


def test_the_max_rate_meeting_the_goal_and_the_comparison_table() -> None:
    from pdserve.bench.load.compare import compare_markdown
    from pdserve.traffic.stats import max_rate_meeting_goal

    points = [{"rate": 0.5, "slo_attainment": 1.0}, {"rate": 1.0, "slo_attainment": 0.92},
              {"rate": 2.0, "slo_attainment": 0.4}, {"rate": 4.0, "skipped": "time budget", "slo_attainment": None}]
    assert max_rate_meeting_goal(points) == 1.0
    assert max_rate_meeting_goal(points, goal=0.95) == 0.5
    assert max_rate_meeting_goal(points[2:]) is None
    dist = {"mean": 0.1, "p50": 0.1, "p90": 0.2, "p99": 0.3}
    point = {"rate": 1.0, "slo_attainment": 0.92, "goodput": 0.88, "ttft": dist, "tpot": dist, "itl": dist,
             "output_throughput": 50.0}
    result = {"rates": [1.0], "slo": {"ttft": 0.6, "tpot": 0.3}, "elapsed": 1.0,
              "slo_basis": {"target": "colocated", "isolated_ttft": 0.2, "isolated_tpot": 0.1, "factor": 3.0},
              "targets": {"colocated": {"points": [point], "max_rate_meeting_slo": 1.0},
                          "vllm": {"error": "not installed", "points": []}}}
    text = compare_markdown(result)
    assert "| colocated | 92% / 0.88 | 1 req/s |" in text
    assert "failed: not installed" in text and "TTFT <= 600 ms" in text


def test_targets_run_on_their_cores_and_a_missing_peer_says_why(tmp_path: Path, monkeypatch) -> None:
    from pdserve.bench.load.targets import PEER_SCRIPTS, TARGETS, RunningTarget

    assert TARGETS["colocated-1core"].command(9000)[:3] == ["taskset", "-c", "0"]
    assert TARGETS["colocated"].command(9000)[1:] == ["-m", "pdserve.cli", "serve", "--port", "9000",
                                                      "--colocated", "--workers", "1"]
    assert TARGETS["vllm-cpu"].command(9000) == ["bash", str(PEER_SCRIPTS / "serve_vllm_cpu.sh"), "9000", "0"]
    assert TARGETS["vllm-cpu-2core"].command(9000)[2:] == ["9000", "0,1"]
    # Peers are never installed in CI; an empty cache stands for that here.
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("vllm-cpu", "llama-cpp"):
        with pytest.raises(RuntimeError, match=f"{name} ended \\(exit code .*install_"):
            RunningTarget(TARGETS[name], tmp_path / f"{name}.log", ready_timeout=30)


def test_calibration_and_rate_points_never_repeat_a_prompt() -> None:
    from pdserve.bench.load.compare import point_seed
    from pdserve.bench.load.slo import calibration_requests

    specs = synthetic_requests("summarize", 64, seed=0)
    prefills, decodes = calibration_requests(specs, repeats=3, decode_tokens=32)
    median = sorted(s.approx_prompt_tokens for s in specs)[32]
    # A repeated prompt would time a prefix-cache hit, not a prefill.
    assert len({s.prompt for s in prefills + decodes}) == 6
    assert {len(s.prompt.split()) for s in prefills + decodes} == {median}
    assert [s.max_tokens for s in prefills + decodes] == [1, 1, 1, 32, 32, 32]
    # Each rate point gets its own prompts (a server keeps its cache from one point to the next).
    points = [{s.prompt for s in synthetic_requests("summarize", 8, point_seed(0, i))} for i in range(3)]
    assert not (points[0] & points[1]) and not (points[1] & points[2])


def test_a_point_is_sized_by_duration_or_by_request_count() -> None:
    from pdserve.bench.load.compare import CompareConfig

    by_duration = CompareConfig(rates=(0.05, 0.4), duration=40)
    assert by_duration.point_size(0.05) == (2, 40) and by_duration.point_size(0.4) == (16, 40)
    # A fixed count gives a low rate as many samples as a high one: its arrivals just span longer.
    by_count = CompareConfig(rates=(0.05, 0.4), requests_per_rate=12)
    assert by_count.point_size(0.05) == (12, 240) and by_count.point_size(0.4) == (12, 30)


def test_compare_refuses_a_non_positive_rate_or_count() -> None:
    for extra in (["--rates", "0.1,0"], ["--requests-per-rate", "0"]):
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "compare", "--targets", "colocated",
                               *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "must be positive" in done.stderr


def test_the_length_scaled_slo_scales_the_ttft_budget_above_the_median() -> None:
    from pdserve.traffic.stats import LengthScaledSLO

    slo = LengthScaledSLO(SLO(ttft=1.0, tpot=0.1), reference_tokens=500)
    assert slo.ttft_budget(250) == 1.0 and slo.ttft_budget(1500) == 3.0

    def record(prompt_tokens: int, ttft: float, tpot: float) -> RequestRecord:
        # 11 tokens: the first at `ttft`, then 10 more at `tpot` each.
        return RequestRecord(index=0, kind="x", scheduled=0.0, sent=0.0, first_token=ttft, end=ttft + 10 * tpot,
                             prompt_tokens=prompt_tokens, output_tokens=11)

    assert slo.met_by(record(1500, 2.5, 0.05))  # within 3.0 s
    assert not slo.base.met_by(record(1500, 2.5, 0.05))  # the SLO: 1.0 s for every prompt
    assert not slo.met_by(record(400, 1.1, 0.05))  # below the median the budget stays 1.0 s
    assert not slo.met_by(record(1500, 2.5, 0.2))  # TPOT is not scaled


def test_a_comparison_is_rescored_under_the_length_scaled_slo() -> None:
    from pdserve.bench.load.compare import compare_markdown
    from pdserve.bench.load.length_scaled import length_scaled_slo, rescore

    def record(prompt_tokens: int, ttft: float) -> dict:
        return RequestRecord(index=0, kind="x", scheduled=0.0, sent=0.0, first_token=ttft, end=ttft + 1.0,
                             prompt_tokens=prompt_tokens, output_tokens=11).to_json()

    # Prompts 100, 300, 900 tokens (median 300); TTFT SLO 0.5 s: budgets 0.5, 0.5, 1.5 s.
    records = [record(100, 0.4), record(300, 0.6), record(900, 1.2)]
    dist = {"mean": 0.1, "p50": 0.1, "p90": 0.2, "p99": 0.3}
    point = {"rate": 1.0, "slo_attainment": 1 / 3, "goodput": 0.1, "ttft": dist, "tpot": dist, "itl": dist,
             "output_throughput": 5.0, "records": records}
    result = {"rates": [1.0], "slo": {"ttft": 0.5, "tpot": 0.2}, "elapsed": 1.0, "slo_basis": "given",
              "targets": {"colocated": {"points": [point], "max_rate_meeting_slo": None}}}
    slo = length_scaled_slo(result)
    assert slo is not None and slo.reference_tokens == 300
    # The 100- and 900-token requests meet it, the 300-token one (0.6 > 0.5 s) does not;
    # the run lasts 2.2 s (first send to last end).
    (scored,) = rescore(result, slo)["colocated"]
    assert scored["slo_attainment"] == pytest.approx(2 / 3)
    assert scored["goodput"] == pytest.approx(2 / 2.2)
    text = compare_markdown(result)
    assert "max(1, prompt tokens / 300)" in text and "| colocated | 67% / 0.91 | - |" in text
