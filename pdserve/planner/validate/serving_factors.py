"""Unloaded serving factors: how much slower a worker runs inside a server than its profile.

A step profile (`calibrate/step_profile.py`) times ``engine.step()`` alone on an idle machine. A served
worker also runs its HTTP loop, streaming and detokenization, and on this 2-core machine it
shares its cores with the router and the load generator. (Until 2026-11-30 a two-thread worker
also stepped its engine on another thread than the one that loaded it, and ran 1.2-2.4x slower
than its profile: runtime/engine_loop.py. Since that fix the factors measured here are
0.85-1.2.) `pdserve bench compare` measures the first
target unloaded before any load (the median prompt's TTFT, one request's TPOT: the SLO
calibration, `bench/load/slo.py`). Dividing those by what the profile predicts for the same
request gives one factor for prefill and one for decode. :class:`PhaseScaledCost` then scales
the profile by them. They are fitted on that one unloaded request, never on a loaded point, so
the loaded points still test the simulator's queueing and batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.planner.cost.capacity import prefill_seconds
from pdserve.planner.cost.step_cost import StepCostModel


@dataclass(frozen=True)
class PhaseScaledCost:
    """``base`` with its prefill work scaled by ``prefill_factor`` and what decodes add to a step
    by ``decode_factor`` (a StepCostModel)."""

    base: StepCostModel
    prefill_factor: float
    decode_factor: float

    def step_seconds(self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        if not prefill_chunks:
            return self.decode_factor * self.base.step_seconds([], decode_contexts)
        prefill_alone = self.base.step_seconds(prefill_chunks, [])
        added_by_decodes = (self.base.step_seconds(prefill_chunks, decode_contexts) - prefill_alone
                            if decode_contexts else 0.0)
        return self.prefill_factor * prefill_alone + self.decode_factor * added_by_decodes

    def kv_bytes_per_token(self) -> int:
        return self.base.kv_bytes_per_token()


@dataclass(frozen=True)
class UnloadedMeasurement:
    """One target measured alone: a prompt's TTFT and one request's TPOT over its answer."""

    prompt_tokens: int
    ttft: float
    tpot: float
    decode_tokens: int = 32
    """Tokens the TPOT request generated (the SLO calibration's 32)."""


def serving_factors(cost: StepCostModel, unloaded: UnloadedMeasurement, token_budget: int) -> tuple[float, float]:
    """(prefill factor, decode factor): measured over predicted, for the same request alone.
    The TPOT request decodes at a context from the prompt to the prompt + its answer; the middle
    stands for it."""
    if unloaded.prompt_tokens < 1 or unloaded.ttft <= 0 or unloaded.tpot <= 0:
        raise ValueError(f"an unloaded measurement needs a prompt and positive times, got {unloaded}")
    prefill = prefill_seconds(cost, unloaded.prompt_tokens, token_budget)
    decode = cost.step_seconds([], [unloaded.prompt_tokens + unloaded.decode_tokens // 2])
    return unloaded.ttft / prefill, unloaded.tpot / decode
