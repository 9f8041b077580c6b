"""Live pool sizing: how many prefill and decode workers the traffic the router sees right now
needs, the basis for scaling each pool on its own.

The router's own counters give the arrival rate and the length mix over a window
(`LiveLoad.from_router_metrics`); a step cost model of the workers (this machine's calibrated
profile, or a roofline for GPUs) turns them into pool sizes:

    prefill  rate * (seconds to prefill a mean prompt, in chunks of the token budget)
             / target utilization
    decode   the largest batch B whose decode step fits the TPOT SLO serves
             B / ((O - 1) * step(B)) requests/s per worker; rate / that / target utilization

Two observations then override the model when they disagree with it, because the model cannot
see everything (long-prompt bursts, preemptions, a slow link): a prefill queue wait above a
share of the TTFT SLO asks for one prefill worker more than now, and decode KV usage above a
high-water mark asks for one decode worker more than now. Scaling down is one worker per call at
most, so a quiet window does not empty a pool at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.planner.cost.capacity import decode_rate, prefill_seconds
from pdserve.planner.cost.step_cost import StepCostModel
from pdserve.traffic.server_metrics import Snapshot
from pdserve.traffic.stats import SLO


@dataclass(frozen=True)
class LiveLoad:
    arrival_rate: float
    """Requests/s."""
    mean_input_tokens: float
    mean_output_tokens: float
    queue_p90_seconds: float = 0.0
    """Router queue wait before dispatch, p90."""
    decode_kv_usage: float = 0.0
    """Mean share of the decode pool's KV blocks in use, 0..1."""

    @classmethod
    def from_router_metrics(cls, before: Snapshot, after: Snapshot, window_seconds: float,
                            decode_kv_usage: float = 0.0) -> LiveLoad:
        """From two scrapes of the router's /metrics ``window_seconds`` apart."""
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        delta = after.minus(before)
        requests = sum(v for k, v in delta.counters.items() if k.startswith("pdserve_router_requests_total"))
        prompt = delta.counters.get("pdserve_router_prompt_tokens_total", 0.0)
        generated = delta.counters.get("pdserve_router_generation_tokens_total", 0.0)
        queue = delta.histograms.get("pdserve_router_queue_seconds")
        queue_p90 = queue.quantile(0.9) if queue is not None and queue.count else None
        return cls(
            arrival_rate=requests / window_seconds,
            mean_input_tokens=prompt / requests if requests else 0.0,
            mean_output_tokens=generated / requests if requests else 0.0,
            queue_p90_seconds=queue_p90 or 0.0,
            decode_kv_usage=decode_kv_usage,
        )


@dataclass(frozen=True)
class PoolSizes:
    prefill: int
    decode: int
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class SizingPolicy:
    target_utilization: float = 0.8
    """Busy share each pool is sized for: headroom for bursts."""
    max_batch: int = 256
    """Largest decode batch a worker runs (the engine's max_num_seqs)."""
    max_prefill_chunk: int = 2048
    """Tokens per prefill step (the engine's token budget)."""
    queue_share_of_ttft: float = 0.5
    kv_high_water: float = 0.85


def recommend_pools(load: LiveLoad, prefill_cost: StepCostModel, decode_cost: StepCostModel, slo: SLO,
                    current: PoolSizes | None = None, policy: SizingPolicy | None = None) -> PoolSizes:
    """The pool sizes for ``load`` (at least one worker each)."""
    policy = policy or SizingPolicy()
    reasons = []
    prompt = max(round(load.mean_input_tokens), 1)
    per_prompt = prefill_seconds(prefill_cost, prompt, policy.max_prefill_chunk)
    prefill = math.ceil(load.arrival_rate * per_prompt / policy.target_utilization - 1e-9)
    reasons.append(f"prefill: {load.arrival_rate:.3g} req/s x {per_prompt:.3g} s per {prompt}-token prompt "
                   f"at {policy.target_utilization:.0%} busy -> {max(prefill, 1)}")
    context = prompt + round(load.mean_output_tokens / 2)
    per_worker = decode_rate(decode_cost, context, load.mean_output_tokens, slo.tpot, policy.max_batch)
    if per_worker is not None:
        decode = math.ceil(load.arrival_rate / (per_worker.rate * policy.target_utilization) - 1e-9)
        reasons.append(f"decode: batches of {per_worker.batch} within TPOT {slo.tpot * 1000:.0f} ms serve "
                       f"{per_worker.rate:.3g} req/s per worker -> {max(decode, 1)}")
    else:
        decode = current.decode if current else 1
        reasons.append(f"decode: one sequence's step is over the TPOT SLO ({slo.tpot * 1000:.0f} ms) "
                       "on this hardware; no pool size meets it, more workers would not help")
    prefill, decode = max(prefill, 1), max(decode, 1)
    if current is not None:
        if load.queue_p90_seconds > policy.queue_share_of_ttft * slo.ttft and prefill <= current.prefill:
            prefill = current.prefill + 1
            reasons.append(f"prefill: queue p90 {load.queue_p90_seconds:.3g} s is over "
                           f"{policy.queue_share_of_ttft:.0%} of the TTFT SLO -> {prefill}")
        if load.decode_kv_usage > policy.kv_high_water and decode <= current.decode:
            decode = current.decode + 1
            reasons.append(f"decode: KV usage {load.decode_kv_usage:.0%} is over "
                           f"{policy.kv_high_water:.0%} -> {decode}")
        # Down one worker per call at most.
        prefill = max(prefill, current.prefill - 1)
        decode = max(decode, current.decode - 1)
    return PoolSizes(prefill, decode, tuple(reasons))
