"""Calibration and validation of the planner's step costs: the linear model and its fit, the
profile file, the roofline fit, replaying a compare.json through the simulator, and (the one
slow test, ``real_engine``) timing a tiny plan on the real engine."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pdserve.engine.config import ModelConfig
from pdserve.engine.step_counters import ChunkWork, StepCounters
from pdserve.planner.calibrate.engine_steps import (
    QUICK_PLAN,
    STANDARD_PLAN,
    CalibrationPlan,
    _observe,
)
from pdserve.planner.calibrate.roofline_fit import fit_roofline
from pdserve.planner.calibrate.step_profile import (
    FitQuality,
    LinearStepCost,
    RooflineFit,
    StepCoefficients,
    StepProfile,
    StepSample,
    attention_pairs,
    fit_linear,
    load_profile,
    nonnegative_least_squares,
    save_profile,
)
from pdserve.planner.catalogue.hardware import Accelerator
from pdserve.planner.catalogue.models import load_model_catalogue
from pdserve.planner.cost.roofline import Efficiency, RooflineCostModel
from pdserve.planner.validate.command import add_validate_arguments, run_validate
from pdserve.planner.validate.replay import (
    TARGET_LAYOUTS,
    ValidationSettings,
    cluster_for,
    validate_comparison,
)
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.stats import percentile

# Roughly this machine's magnitudes at one thread (seconds per unit).
TRUE = StepCoefficients(per_step_s=0.012, per_prefill_token_s=2.5e-3, per_attention_pair_s=3e-7,
                        per_decode_seq_s=6e-3, per_decode_context_token_s=2e-6)


Shape = tuple[tuple[tuple[int, int], ...], tuple[int, ...]]
"""(prefill chunks, decode contexts) of one step."""


def _plan_shapes(plan: CalibrationPlan = STANDARD_PLAN) -> list[Shape]:
    """One step per point of the plan (at its first decode context)."""
    shapes: list[Shape] = [(((n, s),), ()) for n, s in plan.prefill_points]
    shapes += [((), (c,) * b) for b, c in plan.decode_points]
    shapes += [(((n, 0),), (c,) * b) for b, c, n in plan.mixed_points]
    return shapes


def _plan_samples(coefficients: StepCoefficients, noise: float, seed: int = 0) -> list[StepSample]:
    """One sample per point of the standard plan, timed by ``coefficients`` with relative noise."""
    model = LinearStepCost(coefficients, kv_token_bytes=46080)
    rng = random.Random(seed)
    return [StepSample(chunks, contexts, model.step_seconds(chunks, contexts) * (1 + rng.gauss(0, noise)))
            for chunks, contexts in _plan_shapes()]


# -- the linear model -----------------------------------------------------------------------------

def test_linear_step_cost_by_hand() -> None:
    cost = LinearStepCost(StepCoefficients(0.01, 0.001, 1e-6, 0.002, 1e-5), kv_token_bytes=46080)
    # chunk (4 new after 2 cached): queries at positions 2..5 attend to 3+4+5+6 = 18 positions
    assert attention_pairs(4, 2) == 18
    expected = 0.01 + 0.001 * 4 + 1e-6 * 18 + 0.002 * 2 + 1e-5 * (10 + 20)
    assert cost.step_seconds([(4, 2)], [10, 20]) == pytest.approx(expected, rel=1e-12)
    assert cost.step_seconds([], [7]) == pytest.approx(0.01 + 0.002 + 7e-5, rel=1e-12)
    assert cost.step_seconds([], []) == 0.0  # the engine runs no empty step
    assert cost.kv_bytes_per_token() == 46080
    with pytest.raises(ValueError):
        cost.step_seconds([(0, 3)], [])
    with pytest.raises(ValueError):
        StepCoefficients(per_step_s=-1.0)


def test_attention_pairs_match_the_engine_step_counters() -> None:
    for new, cached in [(1, 0), (16, 0), (5, 7), (300, 1024)]:
        counters = StepCounters()
        counters.record([ChunkWork(new, cached, is_decode=False)], 0.1)
        assert counters.by_kind["prefill"].prefill_attention_pairs == attention_pairs(new, cached)


def test_nnls_satisfies_the_optimality_conditions() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        matrix = rng.normal(size=(30, 4))
        target = rng.normal(size=30)
        x = nonnegative_least_squares(matrix, target)
        gradient = matrix.T @ (matrix @ x - target)
        assert np.all(x >= 0)
        # KKT: zero gradient where positive, non-negative gradient where clamped at zero.
        assert np.all(np.abs(gradient[x > 0]) < 1e-8)
        assert np.all(gradient[x == 0] > -1e-8)
    assert nonnegative_least_squares(np.eye(2), np.array([1.0, -1.0])) == pytest.approx([1.0, 0.0])


def test_fit_recovers_known_coefficients_from_noisy_samples() -> None:
    samples = _plan_samples(TRUE, noise=0.01)
    fitted, quality = fit_linear(samples)
    for name, true_value in vars(TRUE).items():
        assert getattr(fitted, name) == pytest.approx(true_value, rel=0.1), name
    assert quality.num_samples == len(samples)
    assert quality.r_squared > 0.999
    assert quality.max_relative_error < 0.05


def test_fit_is_exact_without_noise_and_never_negative() -> None:
    fitted, quality = fit_linear(_plan_samples(TRUE, noise=0.0))
    assert fitted.as_array() == pytest.approx(TRUE.as_array(), rel=1e-6)
    assert quality.max_relative_error < 1e-9
    # A machine where decode context costs nothing: noise must not make it negative.
    free_context = StepCoefficients(0.012, 2.5e-3, 4e-8, 6e-3, 0.0)
    fitted, _ = fit_linear(_plan_samples(free_context, noise=0.02, seed=5))
    assert min(fitted.as_array()) >= 0.0


def test_plans_size_their_engine() -> None:
    for plan in (STANDARD_PLAN, QUICK_PLAN):
        config = plan.engine_config(ModelConfig())
        assert config.scheduler.max_num_batched_tokens >= max(n for n, _ in plan.prefill_points)
        assert config.scheduler.max_num_seqs > plan.max_batch()
        assert config.cache.num_blocks is not None and config.cache.num_blocks * 16 >= 16384
        assert all(s % 16 == 0 for _, s in plan.prefill_points)
    with pytest.raises(ValueError):
        CalibrationPlan(prefill_points=((0, 0),), decode_points=())


def test_observed_step_is_recovered_from_counter_deltas() -> None:
    # 300 new tokens after 1024 cached, beside three decodes at context 40.
    before = [10, 1000, 5, 500]
    after = [10 + 300, 1000 + attention_pairs(300, 1024), 5 + 3, 500 + 120]
    observed = _observe(0.5, before, after)
    assert observed.prefill_chunks == ((300, 1024),)
    assert observed.decode_contexts == (40, 40, 40)


# -- the profile file -----------------------------------------------------------------------------

def _profile(coefficients: StepCoefficients, threads: int = 1, kv_bytes: int = 1000,
             samples: tuple[StepSample, ...] = ()) -> StepProfile:
    return StepProfile(model="test-model", dtype="float32", threads=threads, kv_bytes_per_token=kv_bytes,
                       coefficients=coefficients, fit=FitQuality(len(samples), 1.0, 0.0, 0.0), samples=samples)


def test_profile_round_trip(tmp_path: Path) -> None:
    samples = tuple(_plan_samples(TRUE, noise=0.01)[:5])
    coefficients, fit = fit_linear(samples)
    roofline = RooflineFit(peak_flops_per_s=1e11, memory_bytes_per_s=2e10, compute=0.3, bandwidth=0.5,
                           step_overhead_s=0.01, fit=FitQuality(5, 0.9, 0.2, 0.1), model_spec={"name": "m"})
    profile = StepProfile(model="SmolLM2-135M-Instruct", dtype="float32", threads=2, kv_bytes_per_token=46080,
                          coefficients=coefficients, fit=fit, samples=samples, machine={"cpu_model": "x"},
                          created="2026-11-29T19:00:00+00:00", roofline=roofline)
    path = tmp_path / "profiles" / "p.json"
    save_profile(profile, path)
    assert load_profile(path) == profile
    assert json.loads(path.read_text())["format"] == "pdserve-step-profile"
    assert load_profile(path).cost_model().step_seconds([(16, 0)], []) == pytest.approx(
        profile.cost_model().step_seconds([(16, 0)], []))
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="p.json"):
        load_profile(path)


# -- the roofline, fitted -------------------------------------------------------------------------

def test_roofline_fit_recovers_known_efficiencies() -> None:
    model = load_model_catalogue()["SmolLM2-135M"]
    peaks = (100e9, 20e9)
    hardware = Accelerator.measured("cpu", peak_flops_per_s=peaks[0], memory_bytes_per_s=peaks[1],
                                    memory_bytes=1e12)
    truth = RooflineCostModel(model, hardware, dtype="float32",
                              efficiency=Efficiency(compute=0.3, bandwidth=0.5, step_overhead_s=0.01))
    samples = [StepSample(chunks, contexts, truth.step_seconds(chunks, contexts))
               for chunks, contexts in _plan_shapes()]
    fit = fit_roofline(samples, model, "float32", *peaks)
    assert fit.compute == pytest.approx(0.3, rel=0.05)
    assert fit.bandwidth == pytest.approx(0.5, rel=0.05)
    assert fit.step_overhead_s == pytest.approx(0.01, rel=0.2)
    assert fit.fit.max_relative_error < 0.1


# -- validation -----------------------------------------------------------------------------------

HAND = StepCoefficients(per_step_s=0.01, per_prefill_token_s=0.001, per_attention_pair_s=1e-6,
                        per_decode_seq_s=0.002, per_decode_context_token_s=0.0)
PROMPTS = (100, 200, 300)
OUTPUT_TOKENS = 5


def _alone_ttft(prompt: int) -> float:
    """One request alone on a colocated instance: its prompt fits one step (<= 512 tokens)."""
    return HAND.per_step_s + HAND.per_prefill_token_s * prompt + HAND.per_attention_pair_s * prompt * (prompt + 1) / 2


def _record(index: int, sent: float, prompt: int, ttft: float, tpot: float, error: str | None = None) -> dict[str, Any]:
    first = sent + ttft
    times = [first + k * tpot for k in range(OUTPUT_TOKENS)]
    return RequestRecord(index=index, kind="fixed", scheduled=sent, sent=sent, first_token=first, end=times[-1],
                         chunk_times=times, chunk_tokens=[1] * OUTPUT_TOKENS, prompt_tokens=prompt,
                         output_tokens=OUTPUT_TOKENS, max_tokens=OUTPUT_TOKENS, error=error).to_json()


def _compare_json(measured_ttft_scale: float = 1.0) -> dict[str, Any]:
    """Three requests 10 s apart (each alone in the system), a failed one, a peer and a skipped point."""
    decode_step = HAND.per_step_s + HAND.per_decode_seq_s
    records = [_record(i, 10.0 * i, p, _alone_ttft(p) * measured_ttft_scale, decode_step * 1.5)
               for i, p in enumerate(PROMPTS)]
    records.append({**_record(3, 35.0, 50, 0.1, 0.01), "error": "HTTP 503", "first_token": None, "end": None})
    points = [{"rate": 0.1, "records": records}, {"rate": 9.0, "skipped": "time budget"}]
    return {"rates": [0.1, 9.0], "targets": {
        "colocated": {"description": "", "points": points},
        "disaggregated": {"description": "", "points": points},
        "llama-cpp": {"description": "", "points": points},
    }}


def test_validation_predicts_hand_computed_latencies() -> None:
    profiles = {1: _profile(HAND, threads=1), 2: _profile(HAND, threads=2)}
    settings = ValidationSettings(link_bytes_per_s=1e6, link_latency_s=0.001)  # a transfer: 100-300 ms
    results, notes = validate_comparison("compare.json", _compare_json(measured_ttft_scale=1.1), profiles, settings)
    assert [(r.target, r.rate, r.num_replayed, r.num_skipped) for r in results] == [
        ("colocated", 0.1, 3, 1), ("disaggregated", 0.1, 3, 1)]
    assert any("llama-cpp" in note for note in notes) and any("skipped in the run" in n for n in notes)

    colocated, disaggregated = ({(c.metric, c.quantile): c for c in r.comparisons} for r in results)
    alone = [_alone_ttft(p) for p in PROMPTS]
    for q in (50, 90):
        assert colocated["ttft", q].predicted == pytest.approx(percentile(alone, q), rel=1e-9)
        # measured = 1.1 x predicted: the prediction is 1/1.1 - 1 = -9.1% off, within 20%
        assert colocated["ttft", q].relative_error == pytest.approx(1 / 1.1 - 1, rel=1e-6)
        # every later token is one decode step alone; measured at 1.5x: -33%, a miss
        assert colocated["tpot", q].predicted == pytest.approx(HAND.per_step_s + HAND.per_decode_seq_s, rel=1e-9)
        assert not colocated["tpot", q].within(0.2)
        # disaggregated: the first token after the prefill and the KV transfer (1000 B/token)
        with_transfer = [t + p * 1000 / 1e6 + 0.001 for t, p in zip(alone, PROMPTS, strict=True)]
        assert disaggregated["ttft", q].predicted == pytest.approx(percentile(with_transfer, q), rel=1e-9)
    assert results[0].misses(0.2) == ["tpot p50", "tpot p90"]


def test_phase_scaled_cost_and_serving_factors_by_hand() -> None:
    from pdserve.planner.validate.serving_factors import (
        PhaseScaledCost,
        UnloadedMeasurement,
        serving_factors,
    )

    base = LinearStepCost(HAND, kv_token_bytes=1000)
    scaled = PhaseScaledCost(base, prefill_factor=2.0, decode_factor=3.0)
    decode_only = HAND.per_step_s + 2 * HAND.per_decode_seq_s  # 14 ms
    assert scaled.step_seconds([], [50, 60]) == pytest.approx(3 * decode_only)
    prefill_only = _alone_ttft(100)  # 10 + 100 + 5.05 ms
    assert scaled.step_seconds([(100, 0)], []) == pytest.approx(2 * prefill_only)
    # A mixed step: the prefill alone (x2) plus what the decodes add to it, 2 x 2 ms (x3).
    assert scaled.step_seconds([(100, 0)], [50, 60]) == pytest.approx(2 * prefill_only + 3 * 0.004)
    assert scaled.kv_bytes_per_token() == 1000
    # Alone, a 100-token prompt took 1.5x its prediction and a token 2x one decode step.
    unloaded = UnloadedMeasurement(prompt_tokens=100, ttft=1.5 * prefill_only, tpot=2 * 0.012)
    assert serving_factors(base, unloaded, token_budget=512) == (pytest.approx(1.5), pytest.approx(2.0))
    with pytest.raises(ValueError, match="positive"):
        serving_factors(base, UnloadedMeasurement(100, 0.0, 0.01), token_budget=512)


def test_unloaded_correction_applies_to_the_target_measured_alone() -> None:
    profiles = {1: _profile(HAND, threads=1), 2: _profile(HAND, threads=2)}
    data = _compare_json()
    # The run measured colocated alone: a 200-token prompt 1.2x slower than the profile says,
    # one request's tokens 1.5x slower (as its records are).
    data["slo_basis"] = {"target": "colocated", "isolated_ttft": 1.2 * _alone_ttft(200),
                         "isolated_tpot": 1.5 * (HAND.per_step_s + HAND.per_decode_seq_s), "factor": 3.0,
                         "prompt_tokens": 200}
    settings = ValidationSettings(link_bytes_per_s=1e6, unloaded_correction=True)
    results, notes = validate_comparison("compare.json", data, profiles, settings)
    colocated, disaggregated = ({(c.metric, c.quantile): c for c in r.comparisons} for r in results)
    for q in (50, 90):
        # Corrected: TTFT 1.2x the profile's (measured at 1.0x: +20%), TPOT exactly as measured.
        assert colocated["ttft", q].relative_error == pytest.approx(0.2, rel=1e-6)
        assert colocated["tpot", q].relative_error == pytest.approx(0.0, abs=1e-9)
        # Not measured alone: as calibrated, and said so.
        assert disaggregated["tpot", q].predicted == pytest.approx(HAND.per_step_s + HAND.per_decode_seq_s)
    assert any("colocated: profile scaled" in n and "prefill x1.20, decode x1.50" in n for n in notes)
    assert any("disaggregated: not corrected" in n for n in notes)
    # Runs from before the prompt length was recorded are left as they are.
    del data["slo_basis"]["prompt_tokens"]
    _, notes = validate_comparison("compare.json", data, profiles, settings)
    assert any("colocated: not corrected" in n for n in notes)


def test_target_layouts_build_the_bench_clusters() -> None:
    profile = _profile(HAND, kv_bytes=46080)
    settings = ValidationSettings()
    replicas = cluster_for(TARGET_LAYOUTS["replicas"], profile, settings)
    assert len(replicas.colocated) == 2 and replicas.routing == "least_loaded"
    assert replicas.colocated[0].num_blocks == (512 << 20) // (46080 * 16)  # 728, as `pdserve serve`
    disaggregated = cluster_for(TARGET_LAYOUTS["disaggregated"], profile, settings)
    assert disaggregated.is_disaggregated and disaggregated.first_token_after_transfer
    assert TARGET_LAYOUTS["colocated"].threads == 2 and TARGET_LAYOUTS["colocated-1core"].threads == 1


def _validate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    return parser.parse_args(list(argv))


def test_validate_command_writes_the_report_and_fails_only_on_bad_input(tmp_path: Path) -> None:
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps(_compare_json()))
    p1, p2 = tmp_path / "p1.json", tmp_path / "p2.json"
    save_profile(_profile(HAND, threads=1), p1)
    save_profile(_profile(HAND, threads=2), p2)
    out = tmp_path / "out"
    args = _validate_args(str(compare), "--profile-1t", str(p1), "--profile-2t", str(p2), "--out", str(out))
    assert run_validate(args) == 0  # misses are findings, not errors
    text = (out / "validation.md").read_text()
    assert "| colocated | 0.1 | 3 (1) |" in text and "no: tpot p50, tpot p90" in text
    assert (out / "validation.png").stat().st_size > 1000
    assert len(json.loads((out / "validation.json").read_text())["points"]) == 2

    missing = _validate_args(str(tmp_path / "nope.json"), "--profile-1t", str(p1), "--out", str(out))
    assert run_validate(missing) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert run_validate(_validate_args(str(tmp_path / "bad.json"), "--profile-1t", str(p1))) == 2
    assert run_validate(_validate_args(str(compare))) == 2  # no profile


def test_validate_reports_the_repeats_of_two_runs(tmp_path: Path) -> None:
    sources = []
    for run, scale in (("run-1", 1.0), ("run-2", 1.6)):
        data = _compare_json(measured_ttft_scale=scale)
        data["workload"] = "fixed"
        path = tmp_path / run / "load-fixed" / "compare.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(data))
        sources.append(str(path))
    p1, p2 = tmp_path / "p1.json", tmp_path / "p2.json"
    save_profile(_profile(HAND, threads=1), p1)
    save_profile(_profile(HAND, threads=2), p2)
    out = tmp_path / "out"
    assert run_validate(_validate_args(*sources, "--profile-1t", str(p1), "--profile-2t", str(p2),
                                       "--out", str(out))) == 0
    text = (out / "validation.md").read_text()
    assert "## Repeated runs" in text and "| fixed | colocated | 0.1 | 2 |" in text
    assert "| colocated (run-2/load-fixed) | 0.1 |" in text
    report = json.loads((out / "validation.json").read_text())
    colocated = next(r for r in report["repeated"] if r["target"] == "colocated")
    ttft = next(c for c in colocated["comparisons"] if (c["metric"], c["quantile"]) == ("ttft", 50))
    # Measured 1.0x and 1.6x the prediction: median 1.3x, spread 0.6x of the prediction; the
    # prediction is 0.3x from the median, within the spread (TPOT is 1.5x in both: a miss).
    assert ttft["within"] and ttft["spread"] == pytest.approx(0.6 * ttft["predicted_median"], rel=1e-6)
    assert colocated["misses"] == ["tpot p50", "tpot p90"]


# -- the real engine (about 10-20 s: loads the default model) ------------------------------------

def test_measure_samples_on_the_real_engine(checkpoint: Any) -> None:
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.planner.calibrate.engine_steps import measure_samples

    plan = CalibrationPlan(prefill_points=((16, 0), (8, 32)), decode_points=((2, 24),),
                           mixed_points=((2, 24, 8),), repeats=2, time_budget_s=60.0)
    # num_threads None: leave torch's thread count to the rest of the session.
    engine = LLMEngine(plan.engine_config(ModelConfig(dtype="float32")), checkpoint=checkpoint)
    messages: list[str] = []
    try:
        samples = measure_samples(engine, plan, log=messages.append)
        assert not engine.has_unfinished_requests()
        assert engine.stats().num_held_kv == 0 and engine.stats().num_reserved_kv == 0
    finally:
        engine.close()
    by_kind = {s.kind: s for s in samples}
    assert sorted(s.kind for s in samples) == ["decode", "mixed", "prefill", "prefill"]
    prefill_chunks = sorted(s.prefill_chunks for s in samples if s.kind == "prefill")
    assert prefill_chunks == [((8, 32),), ((16, 0),)]  # the continuation hit the cached prefix
    # Two copies of a 23-token prompt: context 24 at the warm-up step, then 25 and 26.
    assert len(by_kind["decode"].decode_contexts) == 2 and by_kind["decode"].decode_contexts[0] in (25, 26)
    assert by_kind["mixed"].prefill_chunks == ((8, 0),) and len(by_kind["mixed"].decode_contexts) == 2
    assert all(len(s.timings_s) == 2 and s.seconds in s.timings_s and s.seconds > 0 for s in samples)
    assert len(messages) == 4
    coefficients, quality = fit_linear(samples)
    assert quality.num_samples == 4 and math.isfinite(coefficients.per_step_s)
