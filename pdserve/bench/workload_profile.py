"""Where a colocated engine's time goes on a workload: the arithmetic of `pdserve bench profile-workload`.

Input: the engine's step counters (engine/step_counters.py, exported by workers as
``pdserve_worker_engine_*``) over a load run, the model's shapes, and the machine's measured
peaks. Output: the share of engine time (and so of cost, on one kind of hardware) that goes to
prefill and to decode, what each phase achieves against the peaks, and the prefill:decode worker
ratio those shares imply.

Two choices worth knowing:
  * Mixed steps (a prefill chunk riding with decodes) have one clock for two phases. Their time is
    split by what the pure steps of this same run cost per token: the prefill share of a mixed
    step is ``c_prefill * prefill_tokens / (c_prefill * prefill_tokens + c_decode * decode_tokens)``.
  * The utilization proxies (FLOP/s, bytes/s) use pure steps only: a mixed step's bytes and FLOPs
    cannot be assigned to a phase honestly.

FLOPs count the matmuls (2 per weight per token; the LM head only for decode tokens, a prefill
samples one token per request, which is noise beside its prompt) and attention (4 * heads *
head_dim per query-key pair per layer). Bytes count one read of every weight per step plus the KV
each decode token reads; prefill's KV writes and activations are left out (small beside weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pdserve.engine.architecture import LlamaArchitecture
from pdserve.engine.step_counters import STEP_KINDS, StepWork
from pdserve.traffic.server_metrics import metric_key

if TYPE_CHECKING:
    from pdserve.machine import MachinePeaks

_STEP_FIELDS = {
    ("pdserve_worker_engine_steps_total", None): "steps",
    ("pdserve_worker_engine_step_seconds_total", None): "seconds",
    ("pdserve_worker_engine_tokens_total", "prefill"): "prefill_tokens",
    ("pdserve_worker_engine_tokens_total", "decode"): "decode_tokens",
    ("pdserve_worker_engine_attended_positions_total", "prefill"): "prefill_attention_pairs",
    ("pdserve_worker_engine_attended_positions_total", "decode"): "decode_context_tokens",
}


def step_work_from_counters(workers_counters: Iterable[dict[str, float]]) -> dict[str, StepWork]:
    """Sum the engine step counters of every worker, by step kind. Each dict is a worker's
    counters as `traffic/server_metrics.py` keys them (a :class:`Snapshot`'s, or the deltas of
    a load in `ServerMetricsRecorder.section`)."""
    totals = {kind: StepWork() for kind in STEP_KINDS}
    for counters in workers_counters:
        for kind, work in totals.items():
            for (name, phase), field in _STEP_FIELDS.items():
                labels = {"kind": kind} | ({"phase": phase} if phase else {})
                value = counters.get(metric_key(name, labels), 0.0)
                setattr(work, field, getattr(work, field) + (value if field == "seconds" else int(value)))
    return totals


@dataclass(frozen=True)
class ModelCosts:
    """Per-token and per-step costs of a model, from its shapes."""

    flops_per_token: float
    """Matmul FLOPs of one token through the layers (LM head excluded)."""
    lm_head_flops: float
    attention_flops_per_pair: float
    """FLOPs per query-key pair across all layers (scores and weighted sum)."""
    weight_bytes: float
    kv_bytes_per_position: float

    @classmethod
    def of(cls, arch: LlamaArchitecture, weight_bytes_per_param: float, kv_bytes_per_element: float) -> ModelCosts:
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        hidden = arch.hidden_size
        layer_params = hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * arch.intermediate_size
        layers_params = arch.num_layers * layer_params
        head_params = arch.vocab_size * hidden
        # The embedding is read once per step only when untied; a tied one is the LM head.
        weight_params = layers_params + head_params * (1 if arch.tie_word_embeddings else 2)
        return cls(
            flops_per_token=2.0 * layers_params,
            lm_head_flops=2.0 * head_params,
            attention_flops_per_pair=4.0 * q_size * arch.num_layers,
            weight_bytes=weight_params * weight_bytes_per_param,
            kv_bytes_per_position=arch.kv_bytes_per_token * kv_bytes_per_element,
        )

    def prefill_flops(self, work: StepWork) -> float:
        return self.flops_per_token * work.prefill_tokens + self.attention_flops_per_pair * work.prefill_attention_pairs

    def decode_flops(self, work: StepWork) -> float:
        return ((self.flops_per_token + self.lm_head_flops) * work.decode_tokens
                + self.attention_flops_per_pair * work.decode_context_tokens)

    def step_bytes(self, work: StepWork) -> float:
        return self.weight_bytes * work.steps + self.kv_bytes_per_position * work.decode_context_tokens


def split_phases(work: dict[str, StepWork]) -> dict[str, Any]:
    """Engine seconds per phase, the mixed steps apportioned by the pure steps' per-token costs."""
    prefill, decode, mixed = work["prefill"], work["decode"], work["mixed"]
    per_prefill_token = prefill.seconds / prefill.prefill_tokens if prefill.prefill_tokens else None
    per_decode_token = decode.seconds / decode.decode_tokens if decode.decode_tokens else None
    if mixed.steps == 0:
        prefill_share_of_mixed, method = 0.0, "no mixed steps"
    elif per_prefill_token is not None and per_decode_token is not None:
        prefill_cost = per_prefill_token * mixed.prefill_tokens
        decode_cost = per_decode_token * mixed.decode_tokens
        prefill_share_of_mixed = prefill_cost / (prefill_cost + decode_cost)
        method = "mixed steps split by the per-token seconds of this run's pure prefill and decode steps"
    else:
        # No pure steps of one kind to learn from: fall back to the token counts.
        total = mixed.prefill_tokens + mixed.decode_tokens
        prefill_share_of_mixed = mixed.prefill_tokens / total if total else 0.0
        method = "mixed steps split by token counts (this run had no pure steps of one phase)"
    prefill_seconds = prefill.seconds + prefill_share_of_mixed * mixed.seconds
    decode_seconds = decode.seconds + (1 - prefill_share_of_mixed) * mixed.seconds
    busy = prefill_seconds + decode_seconds
    return {
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "prefill_share": prefill_seconds / busy if busy else 0.0,
        "decode_share": decode_seconds / busy if busy else 0.0,
        "mixed_seconds": mixed.seconds,
        "mixed_prefill_share": prefill_share_of_mixed,
        "method": method,
    }


def utilization(work: dict[str, StepWork], costs: ModelCosts, peaks: MachinePeaks) -> dict[str, Any]:
    """Achieved FLOP/s and bytes/s of the pure prefill and pure decode steps against the peaks."""
    result: dict[str, Any] = {}
    for phase, flops in (("prefill", costs.prefill_flops(work["prefill"])),
                         ("decode", costs.decode_flops(work["decode"]))):
        steps = work[phase]
        if steps.seconds <= 0:
            result[phase] = None
            continue
        flops_per_second = flops / steps.seconds
        bytes_per_second = costs.step_bytes(steps) / steps.seconds
        result[phase] = {
            "steps": steps.steps,
            "seconds": steps.seconds,
            "flops_per_second": flops_per_second,
            "bytes_per_second": bytes_per_second,
            "compute_utilization": flops_per_second / peaks.flops_per_second,
            "bandwidth_utilization": bytes_per_second / peaks.bytes_per_second,
        }
    return result


def implied_ratio(prefill_seconds: float, decode_seconds: float, max_workers: int = 8) -> tuple[int, int] | None:
    """The prefill:decode worker ratio that gives each pool the engine time its phase used, in
    small whole numbers (each at most ``max_workers``): the closest in log scale, fewest workers
    on a tie."""
    if prefill_seconds <= 0 or decode_seconds <= 0:
        return None
    target = math.log(prefill_seconds / decode_seconds)
    pairs = ((p, d) for p in range(1, max_workers + 1) for d in range(1, max_workers + 1))
    return min(pairs, key=lambda pair: (round(abs(math.log(pair[0] / pair[1]) - target), 9), sum(pair)))


def profile(work: dict[str, StepWork], wall_seconds: float, costs: ModelCosts, peaks: MachinePeaks) -> dict[str, Any]:
    phases = split_phases(work)
    ratio = implied_ratio(phases["prefill_seconds"], phases["decode_seconds"])
    busy = phases["prefill_seconds"] + phases["decode_seconds"]
    return {
        "work": {kind: asdict(w) for kind, w in work.items()},
        "wall_seconds": wall_seconds,
        "engine_busy_fraction": busy / wall_seconds if wall_seconds > 0 else None,
        "phases": phases,
        "utilization": utilization(work, costs, peaks),
        "model_costs": asdict(costs),
        "peaks": asdict(peaks),
        "implied_prefill_to_decode": list(ratio) if ratio else None,
    }


def markdown(result: dict[str, Any]) -> str:
    phases = result["phases"]
    lines = [
        f"# Workload profile: {result.get('workload', '?')} on {result.get('target', 'a colocated server')}",
        "",
        f"Command: `{result.get('command', '')}`",
        "",
        f"{result['requests']['completed']} of {result['requests']['sent']} requests completed in "
        f"{result['wall_seconds']:.1f} s; the engine was busy {_percent(result['engine_busy_fraction'])} of it.",
        "",
        "| phase | engine seconds | share of engine time (= of cost, one kind of hardware) |",
        "|---|---:|---:|",
        f"| prefill | {phases['prefill_seconds']:.1f} | {_percent(phases['prefill_share'])} |",
        f"| decode | {phases['decode_seconds']:.1f} | {_percent(phases['decode_share'])} |",
        "",
        f"{phases['mixed_seconds']:.1f} s of steps mixed both phases; {phases['method']} "
        f"({_percent(phases['mixed_prefill_share'])} of their time counted as prefill).",
        "",
        "Utilization proxies (pure steps only; peaks measured on this machine: "
        f"{result['peaks']['flops_per_second'] / 1e9:.0f} GFLOP/s fp32 GEMM, "
        f"{result['peaks']['bytes_per_second'] / 1e9:.1f} GB/s copy):",
        "",
        "| phase | steps | GFLOP/s | of peak FLOP/s | GB/s | of peak bandwidth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase in ("prefill", "decode"):
        entry = result["utilization"].get(phase)
        if entry is None:
            lines.append(f"| {phase} | 0 | - | - | - | - |")
            continue
        lines.append(
            f"| {phase} | {entry['steps']} | {entry['flops_per_second'] / 1e9:.1f} | "
            f"{_percent(entry['compute_utilization'])} | {entry['bytes_per_second'] / 1e9:.1f} | "
            f"{_percent(entry['bandwidth_utilization'])} |"
        )
    ratio = result["implied_prefill_to_decode"]
    lines += ["", "**Implied prefill:decode ratio**: " + (
        f"{ratio[0]}:{ratio[1]} — give the prefill pool {ratio[0]} worker(s) for every {ratio[1]} "
        "decode worker(s), on this hardware, to match the engine time each phase used here. "
        "A dedicated decode pool batches more decodes per step than this colocated run did, so "
        "read it as an upper bound on the decode side."
        if ratio else "not defined (one phase used no engine time)."
    ), ""]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
