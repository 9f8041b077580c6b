"""The roofline fitted to a calibration's samples: the ``Efficiency`` (compute, bandwidth, step
overhead) that makes ``RooflineCostModel`` match the steps this machine measured, against its
measured peaks. Apart from the step measurement (engine_steps.py) because it needs only the samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from pdserve.planner.calibrate.step_profile import FitQuality, RooflineFit, StepSample
from pdserve.planner.catalogue.hardware import Accelerator
from pdserve.planner.catalogue.models import ModelSpec
from pdserve.planner.cost.roofline import Efficiency, RooflineCostModel

if TYPE_CHECKING:
    from pdserve.engine.llm_engine import LLMEngine


def model_spec_of(engine: LLMEngine) -> ModelSpec:
    """The planner's description of the engine's model (for the roofline)."""
    arch = engine.architecture
    return ModelSpec(
        name=engine.model_name, num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings, source="the calibrated engine",
    )


EFFICIENCY_GRID = np.geomspace(0.002, 1.0, 90)
"""Candidate compute and bandwidth efficiencies: from 0.2% of the peak (eager small ops) to 100%."""


def fit_roofline(samples: Sequence[StepSample], model: ModelSpec, dtype: str,
                 peak_flops_per_s: float, memory_bytes_per_s: float) -> RooflineFit:
    """The ``Efficiency`` (compute, bandwidth, step overhead) that makes RooflineCostModel best
    match the samples, against this machine's measured peaks, in relative error.

    The roofline is a max() of two roofs, so not linear: a coarse log grid over the two
    efficiencies, then a fine one around the best pair; for each pair the best non-negative
    overhead comes in closed form. Decode steps are memory-bound, so bandwidth and overhead
    trade against each other there; the prefill steps pin down compute.
    """
    if not samples:
        raise ValueError("no samples to fit")
    hardware = Accelerator.measured("this machine", peak_flops_per_s=peak_flops_per_s,
                                    memory_bytes_per_s=memory_bytes_per_s, memory_bytes=1e12)
    ideal = RooflineCostModel(model, hardware, dtype=dtype,
                              efficiency=Efficiency(compute=1.0, bandwidth=1.0, step_overhead_s=0.0))
    parts = [ideal.step_breakdown(s.prefill_chunks, s.decode_contexts) for s in samples]
    compute = np.array([p.compute_s for p in parts])
    memory = np.array([p.memory_s for p in parts])
    measured = np.array([s.seconds for s in samples])
    coarse = _best_efficiencies(compute, memory, measured, EFFICIENCY_GRID, EFFICIENCY_GRID)
    # Then a finer grid around the best pair (one coarse step either side).
    step = EFFICIENCY_GRID[1] / EFFICIENCY_GRID[0]
    fine = [np.clip(np.geomspace(value / step, value * step, 41), None, 1.0) for value in coarse[:2]]
    compute_eff, bandwidth_eff, overhead_s = _best_efficiencies(compute, memory, measured, *fine)
    predicted = np.maximum(compute / compute_eff, memory / bandwidth_eff) + overhead_s
    return RooflineFit(
        peak_flops_per_s=peak_flops_per_s, memory_bytes_per_s=memory_bytes_per_s,
        compute=compute_eff, bandwidth=bandwidth_eff, step_overhead_s=overhead_s,
        fit=FitQuality.of(predicted, measured), model_spec=asdict(model),
    )


def _best_efficiencies(compute: np.ndarray, memory: np.ndarray, measured: np.ndarray,
                       compute_grid: np.ndarray, bandwidth_grid: np.ndarray) -> tuple[float, float, float]:
    """(compute, bandwidth, overhead) minimising the summed squared relative error on the grids;
    for each pair the best overhead >= 0 is a weighted mean of the residuals (weights 1/measured^2)."""
    weights = 1.0 / measured**2
    best = (math.inf, 1.0, 1.0, 0.0)
    for compute_eff in compute_grid:
        # [bandwidth candidates, samples]
        roof = np.maximum(compute[None, :] / compute_eff, memory[None, :] / bandwidth_grid[:, None])
        overhead = np.maximum(((measured - roof) * weights).sum(axis=1) / weights.sum(), 0.0)
        errors = (((roof + overhead[:, None] - measured) / measured) ** 2).sum(axis=1)
        index = int(np.argmin(errors))
        if errors[index] < best[0]:
            best = (float(errors[index]), float(compute_eff), float(bandwidth_grid[index]), float(overhead[index]))
    return best[1], best[2], best[3]
