"""`pdserve bench profile-workload`: the engine's step counters, their export, and the arithmetic
that turns them into phase shares, utilization and a prefill:decode ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from pdserve.bench.workload_profile import (
    ModelCosts,
    implied_ratio,
    split_phases,
    step_work_from_counters,
    utilization,
)
from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.step_counters import ChunkWork, StepCounters, StepWork
from pdserve.machine import MachinePeaks
from pdserve.serving.worker_metrics import WorkerMetrics
from pdserve.traffic.server_metrics import parse_metrics


def test_steps_are_classified_and_their_attention_work_counted() -> None:
    counters = StepCounters()
    # A fresh 4-token prompt: queries at positions 0..3 attend to 1+2+3+4 = 10 positions.
    counters.record([ChunkWork(4, 0, is_decode=False)], 0.5)
    # Its continuation chunk at positions 4, 5 beside a decode at position 9 (context 10).
    counters.record([ChunkWork(2, 4, is_decode=False), ChunkWork(1, 9, is_decode=True)], 0.25)
    counters.record([ChunkWork(1, 10, is_decode=True), ChunkWork(1, 6, is_decode=True)], 0.125)
    counters.record([], 1.0)  # an empty step is no step
    work = counters.by_kind
    assert work["prefill"] == StepWork(steps=1, seconds=0.5, prefill_tokens=4, prefill_attention_pairs=10)
    assert work["mixed"] == StepWork(steps=1, seconds=0.25, prefill_tokens=2, prefill_attention_pairs=5 + 6,
                                     decode_tokens=1, decode_context_tokens=10)
    assert work["decode"] == StepWork(steps=1, seconds=0.125, decode_tokens=2, decode_context_tokens=11 + 7)


def test_the_engine_counts_every_prompt_and_generated_token(checkpoint) -> None:
    llm = LLM(checkpoint=checkpoint)
    prompts = [list(range(100, 140)), list(range(200, 223))]
    llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    work = llm.engine.stats().step_work
    prefill_tokens = sum(w["prefill_tokens"] for w in work.values())
    decode_tokens = sum(w["decode_tokens"] for w in work.values())
    assert prefill_tokens == 40 + 23
    # The prefill samples each prompt's first token; the other 5 come from decode steps.
    assert decode_tokens == 2 * 5
    # Each decode token attends to the prompt plus the tokens generated before it, itself included.
    assert sum(w["decode_context_tokens"] for w in work.values()) == sum(
        n + k for n in (40, 23) for k in range(1, 6))
    assert all(w["seconds"] >= 0 for w in work.values()) and work["decode"]["steps"] >= 5


def test_the_counters_survive_the_prometheus_round_trip() -> None:
    step_work = {
        "prefill": {"steps": 2, "seconds": 1.5, "prefill_tokens": 300, "prefill_attention_pairs": 45150,
                    "decode_tokens": 0, "decode_context_tokens": 0},
        "decode": {"steps": 10, "seconds": 0.5, "prefill_tokens": 0, "prefill_attention_pairs": 0,
                   "decode_tokens": 20, "decode_context_tokens": 6000},
        "mixed": {"steps": 1, "seconds": 0.25, "prefill_tokens": 16, "prefill_attention_pairs": 200,
                  "decode_tokens": 3, "decode_context_tokens": 900},
    }
    stats = {"num_blocks": 10, "num_free_blocks": 10, "num_running": 0, "num_waiting": 0, "step_work": step_work}
    scrape = parse_metrics(generate_latest(WorkerMetrics("both", lambda: stats).registry).decode())
    work = step_work_from_counters([scrape.counters, scrape.counters])  # two workers: summed
    for kind, fields in step_work.items():
        assert {k: v * 2 for k, v in fields.items()} == pytest.approx(vars(work[kind]))
    step_work["decode"]["decode_tokens"] = 50
    later = parse_metrics(generate_latest(WorkerMetrics("both", lambda: stats).registry).decode())
    assert step_work_from_counters([later.minus(scrape).counters])["decode"].decode_tokens == 30


def _work(prefill: StepWork, decode: StepWork, mixed: StepWork) -> dict[str, StepWork]:
    return {"prefill": prefill, "decode": decode, "mixed": mixed}


def test_mixed_steps_are_split_by_the_pure_steps_per_token_costs() -> None:
    work = _work(
        StepWork(steps=2, seconds=1.0, prefill_tokens=100),  # 10 ms per prompt token
        StepWork(steps=10, seconds=0.5, decode_tokens=20),  # 25 ms per generated token
        # 10 prompt tokens ~ 100 ms, 2 decode tokens ~ 50 ms: 2/3 of its 0.3 s is prefill.
        StepWork(steps=1, seconds=0.3, prefill_tokens=10, decode_tokens=2),
    )
    phases = split_phases(work)
    assert phases["mixed_prefill_share"] == pytest.approx(2 / 3)
    assert phases["prefill_seconds"] == pytest.approx(1.2)
    assert phases["decode_seconds"] == pytest.approx(0.6)
    assert phases["prefill_share"] == pytest.approx(2 / 3)
    assert implied_ratio(phases["prefill_seconds"], phases["decode_seconds"]) == (2, 1)


def test_without_pure_steps_of_a_phase_mixed_steps_split_by_tokens() -> None:
    work = _work(StepWork(), StepWork(), StepWork(steps=1, seconds=1.0, prefill_tokens=3, decode_tokens=1))
    assert split_phases(work)["prefill_seconds"] == pytest.approx(0.75)


def test_implied_ratio_is_the_closest_small_ratio() -> None:
    assert implied_ratio(1.0, 3.0) == (1, 3)
    assert implied_ratio(0.3, 0.7) == (3, 7)
    assert implied_ratio(1.0, 100.0) == (1, 8)  # bounded by max_workers
    assert implied_ratio(2.0, 2.0) == (1, 1)  # fewest workers on a tie
    assert implied_ratio(0.0, 1.0) is None


def test_model_costs_and_utilization_by_hand() -> None:
    # hidden 8, 2 heads x head_dim 4 (q 8), 1 KV head (kv 4), intermediate 16, vocab 10, 2 layers, tied.
    arch = LlamaArchitecture(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                             max_position_embeddings=64, tie_word_embeddings=True)
    costs = ModelCosts.of(arch, weight_bytes_per_param=4, kv_bytes_per_element=2)
    # Per layer: qkv 8*(8+4+4) = 128, o 8*8 = 64, gate/up/down 3*8*16 = 384 -> 576; 2 layers 1152.
    assert costs.flops_per_token == 2 * 1152
    assert costs.lm_head_flops == 2 * 80
    assert costs.attention_flops_per_pair == 4 * 8 * 2
    assert costs.weight_bytes == (1152 + 80) * 4  # tied: the head is the embedding, read once
    assert costs.kv_bytes_per_position == 2 * 2 * 1 * 4 * 2  # K and V, 2 layers, 1 head, dim 4, 2 bytes

    work = _work(
        StepWork(steps=1, seconds=0.001, prefill_tokens=4, prefill_attention_pairs=10),
        StepWork(steps=2, seconds=0.002, decode_tokens=2, decode_context_tokens=11),
        StepWork(),
    )
    result = utilization(work, costs, MachinePeaks(flops_per_second=1e8, bytes_per_second=1e7))
    prefill_flops = 2 * 1152 * 4 + 64 * 10  # 9856
    assert result["prefill"]["flops_per_second"] == pytest.approx(prefill_flops / 0.001)
    assert result["prefill"]["compute_utilization"] == pytest.approx(prefill_flops / 0.001 / 1e8)
    decode_bytes = 2 * 4928 + 32 * 11  # the weights once per step, then the KV each token read
    assert result["decode"]["bytes_per_second"] == pytest.approx(decode_bytes / 0.002)
    assert result["decode"]["bandwidth_utilization"] == pytest.approx(decode_bytes / 0.002 / 1e7)
    assert result["decode"]["flops_per_second"] == pytest.approx(((2304 + 160) * 2 + 64 * 11) / 0.002)


def test_profile_workload_against_a_running_server(tmp_path: Path) -> None:
    from test_serving import Server

    server = Server()
    try:
        out = tmp_path / "profile.json"
        done = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "bench", "profile-workload", "--url", server.url,
             "--workload", "chat", "--num-requests", "3", "--concurrency", "3", "--time-limit", "120",
             "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.stop()
    result = json.loads(out.read_text())
    assert result["requests"] == {"sent": 3, "completed": 3}
    phases = result["phases"]
    assert phases["prefill_seconds"] > 0 and phases["decode_seconds"] > 0
    assert phases["prefill_share"] + phases["decode_share"] == pytest.approx(1)
    # Disaggregated: the prefill worker only prefills, so there are pure prefill steps to measure.
    assert result["work"]["prefill"]["prefill_tokens"] >= 3 * 64
    assert result["work"]["decode"]["decode_tokens"] >= 3 * 60
    assert result["utilization"]["decode"]["bandwidth_utilization"] > 0
    assert len(result["implied_prefill_to_decode"]) == 2
    markdown = out.with_suffix(".md").read_text()
    assert "Implied prefill:decode ratio" in markdown and "| decode |" in markdown
