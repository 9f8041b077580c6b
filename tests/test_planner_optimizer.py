"""pdserve plan: fleet cost arithmetic by hand, the optimizer on toy catalogues whose answers are
known, seed 001's worked example, and the command end to end.

The toy accelerators serve SmolLM2-135M with 16-token answers, so a simulation is a few thousand
tokens (tens of milliseconds) whatever the request rate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from pdserve.planner.catalogue.hardware import Accelerator, GpuHourPrice, load_hardware_catalogue
from pdserve.planner.catalogue.models import load_model_catalogue
from pdserve.planner.plan.command import add_plan_arguments, resolve_name, run_plan
from pdserve.planner.plan.fleet import Fleet, InstanceType, Pool, saving
from pdserve.planner.plan.fleet_check import (
    FleetCheck,
    PlanGoal,
    SimSettings,
    check_fleet,
    slice_counts,
)
from pdserve.planner.plan.optimizer import Plan, SearchSettings, grow, plan
from pdserve.planner.plan.report import impossible_message, table_text, verdict
from pdserve.planner.plan.screen import EngineSettings, screen
from pdserve.planner.plan.workload import PlanWorkload
from pdserve.traffic.stats import SLO
from pdserve.traffic.workloads import fixed_preset

SMOL = load_model_catalogue()["SmolLM2-135M"]
SLO_50MS = SLO(ttft=0.5, tpot=0.05)


def toy(name: str, flops: float, bandwidth: float, memory: float = 2e9, price: float = 1.0) -> Accelerator:
    return Accelerator(
        name=name, vendor="toy", description="toy", flops_dtype="bf16", peak_flops_per_s=flops,
        memory_bytes_per_s=bandwidth, memory_bytes=memory, intra_node_link="toy",
        intra_node_bytes_per_s=10e9, network_bytes_per_s=10e9, gpus_per_node=1,
        price=GpuHourPrice(price, "toy", "https://example.org/pricing", "2026-11", verified=False),
    )


SLOW = toy("Slow", 2e12, 20e9)
FAST = toy("Fast", 4e12, 40e9)  # twice Slow in every figure, same price
TOO_SMALL = toy("Small", 2e12, 20e9, memory=0.2e9)  # SmolLM2 in bf16 is 0.27 GB


def toy_plan(accelerators: list[Accelerator], lengths: tuple[int, int], rate: float,
             slo: SLO = SLO_50MS, max_instances: int = 64) -> Plan:
    workload = PlanWorkload.from_preset("fixed", fixed_preset(*lengths))
    return plan(SMOL, accelerators, workload, PlanGoal(rate, slo), sim=SimSettings(num_requests=200),
                search=SearchSettings(max_instances=max_instances, headroom_steps=2, tensor_parallel=(1,)))


def accelerators_of(fleet: Fleet) -> set[str]:
    return {pool.instance.accelerator for pool in fleet.pools}


# -- fleet arithmetic ----------------------------------------------------------------------------


A100 = InstanceType("A100-80GB", 1, 2.4984)
L40S = InstanceType("L40S", 1, 1.9512)


def test_fleet_cost_per_hour_by_hand() -> None:
    assert InstanceType("H100-SXM", 4, 2.99).usd_per_hour == pytest.approx(11.96)
    colocated = Fleet.colocated(A100, 8)
    assert colocated.usd_per_hour == pytest.approx(19.9872)  # 8 * 2.4984
    disaggregated = Fleet.disaggregated(A100, 2, L40S, 12)
    assert disaggregated.usd_per_hour == pytest.approx(28.4112)  # 2 * 2.4984 + 12 * 1.9512
    assert disaggregated.num_gpus == 14 and disaggregated.num_instances == 14
    assert disaggregated.pd_ratio == "2:12" and colocated.pd_ratio == "-"
    assert disaggregated.label == "2x A100-80GB prefill + 12x L40S decode"
    assert Fleet.colocated(InstanceType("H100-SXM", 2, 2.99), 3).num_gpus == 6


def test_cost_per_million_output_tokens_by_hand() -> None:
    # 100 req/s * 500 tokens * 3600 s = 180e6 tokens per hour.
    colocated = Fleet.colocated(A100, 8)
    assert colocated.usd_per_million_output_tokens(100, 500) == pytest.approx(19.9872 / 180)
    disaggregated = Fleet.disaggregated(A100, 2, L40S, 12)
    assert disaggregated.usd_per_million_output_tokens(100, 500) == pytest.approx(28.4112 / 180)
    with pytest.raises(ValueError):
        colocated.usd_per_million_output_tokens(0, 500)


def test_saving_is_negative_when_the_fleet_costs_more() -> None:
    assert saving(6.0, 10.0) == pytest.approx(0.4)
    assert saving(28.4112, 19.9872) == pytest.approx(-0.42146, abs=1e-5)
    assert saving(10.0, 10.0) == 0.0


def test_fleets_are_validated() -> None:
    with pytest.raises(ValueError):
        Pool("colocated", A100, 0)
    with pytest.raises(ValueError):
        Fleet((Pool("decode", A100, 1), Pool("prefill", A100, 1)))
    with pytest.raises(ValueError):
        InstanceType("x", 1, 0.0)
    grown = Fleet.disaggregated(A100, 2, L40S, 12).with_counts(3, 12)
    assert grown.pd_ratio == "3:12" and grown.family == "A100-80GB -> L40S"


# -- the optimizer on toy catalogues -------------------------------------------------------------


def test_an_accelerator_twice_as_fast_at_the_same_price_is_chosen() -> None:
    result = toy_plan([SLOW, FAST], (32, 16), rate=400)
    options = {option.label: option for option in result.screening.options}
    fast_rate, slow_rate = options["Fast"].colocated_rate, options["Slow"].colocated_rate
    assert fast_rate is not None and slow_rate is not None
    # The roofline sees twice the throughput...
    assert fast_rate == pytest.approx(2 * slow_rate, rel=0.1)
    # ...and every best fleet is built of the fast one, at about half the slow family's cost.
    best = result.passing[0]
    assert accelerators_of(best.fleet) == {"Fast"}
    for kind in ("colocated", "disaggregated"):
        best_of_kind = result.best(kind)
        assert best_of_kind is not None and accelerators_of(best_of_kind.fleet) == {"Fast"}
    slow_start = math.ceil(400 / slow_rate)
    assert best.fleet.usd_per_hour < slow_start * 1.0


def test_an_accelerator_that_cannot_hold_the_weights_is_excluded() -> None:
    result = toy_plan([TOO_SMALL, SLOW], (32, 16), rate=100)
    reasons = {e.label: e.reason for e in result.screening.exclusions}
    assert "do not fit" in reasons["Small"]
    assert [option.label for option in result.screening.options] == ["Slow"]
    assert result.passing
    assert all("Small" not in accelerators_of(check.fleet) for check in result.checks)


def test_with_tiny_prompts_colocated_wins_or_ties() -> None:
    # 4-token prompts: prefill is nearly free inside a colocated decode step, while a
    # disaggregated fleet pays for a prefill instance of its own.
    result = toy_plan([SLOW], (4, 32), rate=200)
    colocated, disaggregated = result.best("colocated"), result.best("disaggregated")
    assert colocated is not None
    assert disaggregated is None or colocated.fleet.usd_per_hour <= disaggregated.fleet.usd_per_hour
    assert result.disaggregation_pays is not True
    assert result.passing[0].fleet.kind == "colocated"  # a tie ranks the simpler fleet first
    assert "does not pay" in verdict(result)


@pytest.fixture(scope="module")
def split_plan() -> Plan:
    """Long prompts, short answers; one card is all compute, the other all bandwidth, same price."""
    compute, memory = toy("Compute", 8e12, 10e9), toy("Memory", 1e12, 40e9)
    return toy_plan([compute, memory], (1024, 16), rate=40, slo=SLO(ttft=1.0, tpot=0.05))


def test_disaggregation_is_found_when_it_pays(split_plan: Plan) -> None:
    result = split_plan
    best = result.best("disaggregated")
    assert best is not None and result.disaggregation_pays is True
    assert [pool.instance.accelerator for pool in best.fleet.pools] == ["Compute", "Memory"]
    vs = result.saving_vs_colocated(best)
    assert vs is not None and vs > 0.3
    assert "Disaggregation pays" in verdict(result)
    # Headroom of the chosen fleets: a bisection above the target, the target's check first.
    headroom = result.headroom[best.fleet.label]
    assert headroom.max_rate >= 40 and headroom.checks[0].rate == 40
    assert [c.rate for c in headroom.checks] == sorted(c.rate for c in headroom.checks)
    if headroom.failing_rate is not None:
        assert headroom.failing_rate > headroom.max_rate
    assert headroom.max_rate <= headroom.capacity_rate * 1.001


def test_an_impossible_slo_says_why() -> None:
    # A decode step of SmolLM2 on Slow reads 0.27 GB at 16 GB/s: ~17 ms, above a 5 ms TPOT.
    result = toy_plan([SLOW], (32, 16), rate=10, slo=SLO(ttft=0.5, tpot=0.005))
    assert not result.passing and not result.checks  # nothing worth simulating
    assert all(option.decode_rate is None for option in result.screening.options)
    message = impossible_message(result)
    assert "one decode step alone" in message and "Slow" in message


def test_nothing_meeting_the_goal_names_the_closest_fleets_and_why() -> None:
    compute = toy("Compute", 8e12, 10e9)
    result = toy_plan([compute], (1024, 16), rate=40, slo=SLO(ttft=1.0, tpot=0.05), max_instances=9)
    assert not result.passing
    message = impossible_message(result)
    assert "closest fleets:\n  9x Compute colocated ($9.00/h): TPOT p90" in message
    assert "11x Compute colocated: needs more than --max-instances 9" in message


def test_a_slice_keeps_the_load_per_instance_and_rounds_the_larger_pool_down() -> None:
    fleet = Fleet.disaggregated(A100, 3, L40S, 11)
    counts, share = slice_counts(fleet, rate=300.0, num_requests=100, lifetime_s=10.0)
    assert counts == (1, 3) and share == pytest.approx(1 / 3)  # 11/3 decode rounded down to 3
    colocated = Fleet.colocated(A100, 8)
    assert slice_counts(colocated, rate=1.0, num_requests=1000, lifetime_s=1.0) == ((8,), 1.0)


def miss(fleet: Fleet, ttft: float, tpot: float, prefill_busy: float = 0.9, ttft_miss: float = 0.0,
         tpot_miss: float = 0.0) -> FleetCheck:
    utilization = (("prefill", prefill_busy), ("decode", 1.0)) if fleet.is_disaggregated else (("colocated", 1.0),)
    return FleetCheck(fleet=fleet, rate=1.0, slice_label="", slice_exact=True, num_requests=100, num_measured=50,
                      window_s=100.0, lifetime_s=1.0, ttft=ttft, tpot=tpot, attainment=0.5, ttft_miss=ttft_miss,
                      tpot_miss=tpot_miss, num_failed=0, utilization=utilization, meets=False, reasons=("x",),
                      wall_seconds=0.0)


def test_a_miss_grows_the_pool_at_fault() -> None:
    fleet = Fleet.disaggregated(A100, 2, L40S, 12)
    assert grow(miss(fleet, ttft=0.9, tpot=0.01), SLO_50MS).pd_ratio == "3:12"  # busy prefill: prefill
    assert grow(miss(fleet, ttft=0.1, tpot=0.09), SLO_50MS).pd_ratio == "2:14"  # TPOT: decode, +12/8
    assert grow(miss(fleet, ttft=0.9, tpot=0.09), SLO_50MS).pd_ratio == "3:14"
    # A late first token while the prefill pool idles: prompts wait for KV room on decode.
    assert grow(miss(fleet, ttft=0.9, tpot=0.01, prefill_busy=0.3), SLO_50MS).pd_ratio == "2:14"
    # Attainment alone: the side with more misses.
    assert grow(miss(fleet, ttft=0.1, tpot=0.01, ttft_miss=0.2), SLO_50MS).pd_ratio == "3:12"
    assert grow(miss(Fleet.colocated(A100, 4), ttft=0.9, tpot=0.01), SLO_50MS).pools[0].count == 5
    assert grow(miss(Fleet.colocated(A100, 20), ttft=0.9, tpot=0.01), SLO_50MS).pools[0].count == 23


# -- seed 001's worked example -------------------------------------------------------------------


def test_seed_example_disaggregation_does_not_pay_at_catalogue_prices() -> None:
    """100 req/s of Llama-3.1-8B, 100-token prompts and 500-token answers, A100-80GB and L40S.

    The seed claims 2x A100 prefill + 12x L40S decode is 40% cheaper than 8x A100 colocated.
    At the catalogue's prices that fleet costs 42% *more*. The planner's own answer: 5x A100
    colocated meets TTFT 0.5 s / TPOT 50 ms at p90, and no disaggregated fleet can beat it,
    because even the roofline's optimistic starting point of every disaggregated family costs
    more (docs/planner.md has the full run)."""
    hardware = load_hardware_catalogue()
    a100_price, l40s_price = hardware["A100-80GB"].price, hardware["L40S"].price
    assert a100_price is not None and l40s_price is not None
    a100_gpu = InstanceType("A100-80GB", 1, a100_price.usd_per_gpu_hour)
    seed_colocated = Fleet.colocated(a100_gpu, 8)
    seed_disaggregated = Fleet.disaggregated(a100_gpu, 2, InstanceType("L40S", 1, l40s_price.usd_per_gpu_hour), 12)
    assert saving(seed_disaggregated.usd_per_hour, seed_colocated.usd_per_hour) == pytest.approx(-0.421, abs=1e-3)

    model = load_model_catalogue()["Llama-3.1-8B"]
    workload = PlanWorkload.from_preset("fixed", fixed_preset(100, 500))
    goal = PlanGoal(100.0, SLO_50MS)
    engine = EngineSettings()
    screening = screen(model, [hardware["A100-80GB"], hardware["L40S"]], workload, goal.slo, 90, engine)
    options = {option.instance: option for option in screening.options}
    a100 = next(o for o in screening.options if o.label == "A100-80GB")
    assert a100.colocated_rate is not None and math.ceil(100 / a100.colocated_rate) == 5
    best_colocated = Fleet.colocated(a100.instance, 5)
    check = check_fleet(best_colocated, 100.0, options, workload, goal, engine, SimSettings(num_requests=560))
    assert check.meets, check.reasons
    cheapest_disaggregated_start = min(
        math.ceil(100 / p.prefill_rate) * p.instance.usd_per_hour
        + math.ceil(100 / d.decode_rate) * d.instance.usd_per_hour
        for p in screening.options for d in screening.options
        if p.prefill_rate is not None and d.decode_rate is not None)
    assert cheapest_disaggregated_start > best_colocated.usd_per_hour  # 14.44 > 12.49


# -- the command ---------------------------------------------------------------------------------


def _toy_entry(flops: float, bandwidth: float) -> dict[str, object]:
    return {
        "vendor": "toy", "description": "toy accelerator", "flops_dtype": "bf16",
        "peak_flops_per_s": flops, "memory_bytes_per_s": bandwidth, "memory_bytes": 2e9,
        "intra_node_link": "toy", "intra_node_bytes_per_s": 10e9, "network_bytes_per_s": 10e9,
        "gpus_per_node": 1, "sources": ["made up for a test"],
        "price": {"usd_per_gpu_hour": 1.0, "provider": "toy", "page": "https://example.org",
                  "date": "2026-11", "verified": False},
    }


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve plan")
    add_plan_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def toy_hardware(tmp_path: Path) -> Path:
    path = tmp_path / "hardware.json"
    path.write_text(json.dumps({"accelerators": {"Toy-Slow": _toy_entry(2e12, 20e9),
                                                 "Toy-Fast": _toy_entry(4e12, 40e9)}}))
    return path


SMALL_RUN = ("--tensor-parallel", "1", "--sim-requests", "200", "--headroom-steps", "2",
             "--slo-ttft", "0.5", "--slo-tpot", "0.05")


def test_plan_command_end_to_end(toy_hardware: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    args = _args("--model", "smollm2-135m", "--input-len", "32", "--output-len", "16", "--rate", "400",
                 "--hardware", "toy-fast,TOY-SLOW", "--hardware-file", str(toy_hardware), "--out", str(out),
                 *SMALL_RUN)
    assert run_plan(args) == 0
    captured = capsys.readouterr()
    assert "saving vs colocated" in captured.out and "2x Toy-Fast colocated" in captured.out
    assert "Cheapest fleet meeting the goal: 2x Toy-Fast colocated" in captured.out
    assert "[plan" in captured.err  # progress on stderr
    files = {path.name for path in out.iterdir()}
    assert files == {"plan.md", "plan.json", "cost_vs_rate.png", "attainment_vs_rate.png"}
    report = (out / "plan.md").read_text()
    assert "| 1 | 2x Toy-Fast colocated |" in report and "![SLO attainment vs rate]" in report
    data = json.loads((out / "plan.json").read_text())
    assert data["model"] == "SmolLM2-135M" and data["passing"][0]["fleet"]["usd_per_hour"] == 2.0
    assert (out / "cost_vs_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_command_replays_a_trace_at_its_own_rate(toy_hardware: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 10 * i, "input_length": 32 + i % 5,
                                         "output_length": 16}) + "\n" for i in range(300)))
    args = _args("--model", "SmolLM2-135M", "--trace", str(trace), "--hardware", "toy-slow",
                 "--hardware-file", str(toy_hardware), "--out", str(tmp_path / "r"), *SMALL_RUN)
    assert run_plan(args) == 0
    assert "at 100 req/s" in (tmp_path / "r" / "plan.md").read_text()  # 10 ms apart
    assert "meets" in capsys.readouterr().out


def test_unknown_names_are_clear_errors(toy_hardware: Path) -> None:
    common = ("--input-len", "32", "--output-len", "16", "--rate", "10", *SMALL_RUN)
    with pytest.raises(ValueError, match="unknown model 'gpt-9'; known: .*Llama-3.1-70B"):
        run_plan(_args("--model", "gpt-9", *common))
    with pytest.raises(ValueError, match="unknown accelerator 'B300'"):
        run_plan(_args("--model", "smollm2-135m", "--hardware", "B300", *common))
    with pytest.raises(ValueError, match="ambiguous: A100-80GB, A100-40GB"):
        run_plan(_args("--model", "smollm2-135m", "--hardware", "a100", *common))
    with pytest.raises(ValueError, match="one of --workload"):
        run_plan(_args("--model", "smollm2-135m", "--workload", "chat", *common))


def test_names_match_in_any_case_or_by_unique_prefix() -> None:
    models = load_model_catalogue()
    assert resolve_name("llama-3.1-70b", models, "model") == "Llama-3.1-70B"
    assert resolve_name("MISTRAL-7B", models, "model") == "Mistral-7B-v0.3"
    assert resolve_name("h100", load_hardware_catalogue(), "accelerator") == "H100-SXM"


def test_the_command_reports_an_impossible_slo(toy_hardware: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--model", "smollm2-135m", "--input-len", "32", "--output-len", "16", "--rate", "10",
                 "--hardware", "toy-slow", "--hardware-file", str(toy_hardware), "--tensor-parallel", "1",
                 "--slo-ttft", "0.5", "--slo-tpot", "0.005")
    with pytest.raises(ValueError, match="(?s)no fleet meets .*one decode step alone takes"):
        run_plan(args)


def test_a_family_that_never_passes_is_listed_with_its_reasons() -> None:
    # At most 9 instances: the compute card colocated fails at 8 and 9, and 11 is too many.
    compute, memory = toy("Compute", 8e12, 10e9), toy("Memory", 1e12, 40e9)
    result = toy_plan([compute, memory], (1024, 16), rate=40, slo=SLO(ttft=1.0, tpot=0.05), max_instances=9)
    assert result.best("colocated") is None and result.best("disaggregated") is not None
    lines = table_text(result).splitlines()
    assert lines[0].startswith("#  fleet")
    assert lines[2].startswith("1  3x Compute prefill + 1x Memory decode")
    assert lines[3].startswith("-  9x Compute colocated") and "fails: TPOT p90" in lines[3]
    assert "No colocated fleet met the goal" in verdict(result)
    assert any("--max-instances 9" in u.reason for u in result.unsimulated)
