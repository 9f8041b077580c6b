"""Steady-state capacity of one instance from its step costs: what the screening of fleets
(`plan/screen.py`) and the online pool sizing (`online.py`) both estimate.

Both work on any :class:`StepCostModel` (a roofline or a calibrated profile), so the planner and
the router's recommendation agree on what one worker can carry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdserve.planner.cost.step_cost import StepCostModel


@dataclass(frozen=True)
class BatchRate:
    """The requests/s a batch of ``batch`` running sequences sustains."""

    rate: float
    batch: int


def prefill_seconds(cost: StepCostModel, prompt_tokens: int, chunk: int) -> float:
    """One prompt alone, cut into chunks of at most ``chunk`` tokens as the scheduler does."""
    seconds, done = 0.0, 0
    while done < prompt_tokens:
        size = min(chunk, prompt_tokens - done)
        seconds += cost.step_seconds([(size, done)], [])
        done += size
    return seconds


def prefill_rate(cost: StepCostModel, prompt_tokens: int, budget: int) -> float:
    """Prompts per second with every step full: several whole prompts per step when they are
    shorter than the token budget, else one prompt over several steps."""
    if prompt_tokens <= budget:
        per_step = budget // prompt_tokens
        return per_step / cost.step_seconds([(prompt_tokens, 0)] * per_step, [])
    return 1.0 / prefill_seconds(cost, prompt_tokens, budget)


def best_rate(max_batch: int, step_seconds: Callable[[int], float], max_step_s: float,
              steps_per_request: float) -> BatchRate | None:
    """The most requests/s any batch up to ``max_batch`` sustains with steps within
    ``max_step_s`` (the TPOT SLO): batch / (steps per request x step time); None when even a
    batch of one is too slow. Not simply the largest batch: once compute-bound, attention makes
    a bigger batch slightly slower per token."""
    # Every batch size while small, then a few thousand evenly spaced (each is microseconds).
    stride = max(1, max_batch // 4000)
    best: BatchRate | None = None
    for batch in [*range(1, max_batch + 1, stride), max_batch]:
        seconds = step_seconds(batch)
        if seconds > max_step_s:
            break  # step time only grows with the batch
        rate = batch / (steps_per_request * seconds)
        if best is None or rate > best.rate:
            best = BatchRate(rate, batch)
    return best


def decode_rate(cost: StepCostModel, context: int, output_tokens: float, tpot: float,
                max_batch: int) -> BatchRate | None:
    """Requests/s one decode worker serves within the TPOT SLO, sequences at ``context`` tokens
    each generating ``output_tokens``; None when one sequence's step is over the SLO."""
    return best_rate(max_batch, lambda batch: cost.step_seconds([], [context] * batch), tpot,
                     max(output_tokens - 1, 1.0))
