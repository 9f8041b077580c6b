"""Screening instance types with the roofline before any simulation.

For every accelerator and tensor-parallel degree this decides whether an instance can serve
the model at all (the weights must fit with room for the longest request's KV, and one step
alone must be within the SLOs), builds what the simulator needs (the cost model, the KV pool
in blocks), and estimates how many requests per second one instance sustains in each role.

The estimates are a *fluid* steady state, deliberately optimistic so that they bound the
instance counts from below. With mean prompt ``I``, mean output ``O`` and mean context during
decoding ``c = I + O/2``:

    decode     over batches B that fit the KV pool (B * c tokens) and whose decode step t(B)
               stays within the TPOT SLO, the best B / ((O - 1) * t(B)): a request needs
               O - 1 steps, each giving one token to B requests
    prefill    full steps of the token budget, as many whole prompts as fit: rate = k / t
    colocated  as decode, but each step also carries the prompts of the requests it admits,
               B * I / (O - 1) tokens, inside the same weight read (what makes colocation cheap
               when prompts are short), within the token budget and max_num_seqs
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.config import SchedulerConfig
from pdserve.planner.catalogue.hardware import Accelerator
from pdserve.planner.catalogue.models import ModelSpec
from pdserve.planner.cost import capacity
from pdserve.planner.cost.roofline import Efficiency, RooflineCostModel
from pdserve.planner.plan.fleet import InstanceType
from pdserve.planner.plan.workload import PlanWorkload
from pdserve.traffic.stats import SLO


def _default_scheduler() -> SchedulerConfig:
    # GPU-engine sizes, not the CPU engine's defaults (512 tokens, 64 sequences). The sequence
    # limit is set high on purpose: the simulator does not apply max_num_seqs to decode
    # instances (imports join through add_running, as in the engine), so a low limit would
    # cap colocated batches only and bias the comparison toward disaggregation.
    return SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=1024)


@dataclass(frozen=True)
class EngineSettings:
    """How every planned instance runs: precision, efficiency, memory and scheduler."""

    dtype: str = "bfloat16"
    """Weights, activations and KV cache."""
    efficiency: Efficiency = field(default_factory=Efficiency)
    memory_fraction: float = 0.9
    """Of each GPU's memory for weights + KV (the rest: activations, CUDA graphs, runtime)."""
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=_default_scheduler)


@dataclass(frozen=True)
class InstanceOption:
    """An instance type that can serve the model, and what the roofline expects of it."""

    instance: InstanceType
    cost_model: RooflineCostModel
    num_blocks: int
    """Its KV pool for the simulator: what fits beside the weights, in blocks."""
    prefill_rate: float | None
    """Requests/s one instance prefills; None when it cannot meet the TTFT SLO."""
    decode_rate: float | None
    """Requests/s one instance decodes within the TPOT SLO; None when it cannot."""
    colocated_rate: float | None
    """Requests/s one instance serves doing both phases; None when it cannot."""

    @property
    def label(self) -> str:
        return self.instance.label


@dataclass(frozen=True)
class Exclusion:
    """An instance type (or one of its roles) ruled out before simulation, and why."""

    label: str
    reason: str


@dataclass(frozen=True)
class Screening:
    options: tuple[InstanceOption, ...]
    exclusions: tuple[Exclusion, ...]


def screen(model: ModelSpec, accelerators: Sequence[Accelerator], workload: PlanWorkload, slo: SLO,
           percentile: float, settings: EngineSettings,
           tensor_parallel: Sequence[int] = (1, 2, 4, 8)) -> Screening:
    options: list[InstanceOption] = []
    exclusions: list[Exclusion] = []
    for accelerator in accelerators:
        if accelerator.price is None:
            exclusions.append(Exclusion(accelerator.name, "no price in the catalogue"))
            continue
        for tp in tensor_parallel:
            instance = InstanceType(accelerator.name, tp, accelerator.price.usd_per_gpu_hour)
            if tp > accelerator.gpus_per_node:
                continue  # not an option, not worth a line: TP stays inside one node
            option = _screen_one(model, accelerator, instance, workload, slo, percentile, settings,
                                 exclusions)
            if option is not None:
                options.append(option)
    return Screening(tuple(options), tuple(exclusions))


def _screen_one(model: ModelSpec, accelerator: Accelerator, instance: InstanceType,
                workload: PlanWorkload, slo: SLO, percentile: float, settings: EngineSettings,
                exclusions: list[Exclusion]) -> InstanceOption | None:
    label = instance.label
    try:
        cost = RooflineCostModel(model, accelerator, dtype=settings.dtype,
                                 tensor_parallel=instance.tensor_parallel,
                                 efficiency=settings.efficiency)
    except ValueError as error:
        exclusions.append(Exclusion(label, str(error)))
        return None
    kv_tokens = cost.max_kv_tokens(settings.memory_fraction)
    if kv_tokens == 0:
        exclusions.append(Exclusion(label, (
            f"the weights ({cost.weight_bytes_per_gpu() / 1e9:.1f} GB per GPU) do not fit in "
            f"{settings.memory_fraction:.0%} of {accelerator.memory_bytes / 1e9:.0f} GB")))
        return None
    longest = workload.max_request_tokens
    num_blocks = kv_tokens // settings.block_size
    if num_blocks * settings.block_size < longest:
        exclusions.append(Exclusion(label, (
            f"room for {kv_tokens:,} tokens of KV beside the weights, less than the longest "
            f"request ({longest:,} tokens)")))
        return None

    scheduler = settings.scheduler
    mean_in, mean_out = workload.mean_input_tokens, workload.mean_output_tokens
    context = mean_in + mean_out / 2
    decode_steps = max(mean_out - 1.0, 1.0)
    max_batch = max(1, math.floor(kv_tokens / context))

    def decode_step(batch: int) -> float:
        return cost.decode_step_seconds(batch, max(batch, round(batch * context)))

    decode_rate: float | None = None
    alone = decode_step(1)
    if alone > slo.tpot:
        exclusions.append(Exclusion(label, (
            f"one decode step alone takes {alone * 1000:.1f} ms, above the TPOT SLO "
            f"({slo.tpot * 1000:.0f} ms)")))
    else:
        decode = capacity.best_rate(max_batch, decode_step, slo.tpot, decode_steps)
        decode_rate = decode.rate if decode else None

    prefill_rate: float | None = None
    prompt = workload.input_tokens_at(percentile)
    prompt_alone = capacity.prefill_seconds(cost, prompt, scheduler.max_num_batched_tokens)
    if prompt_alone > slo.ttft:
        exclusions.append(Exclusion(f"{label} (prefill)", (
            f"a p{percentile:g} prompt ({prompt} tokens) alone takes {prompt_alone:.3f} s to "
            f"prefill, above the TTFT SLO ({slo.ttft:g} s)")))
    else:
        prefill_rate = capacity.prefill_rate(cost, max(1, round(mean_in)), scheduler.max_num_batched_tokens)

    colocated_rate: float | None = None
    if decode_rate is not None and prefill_rate is not None:
        budget = scheduler.max_num_batched_tokens

        def mixed_step(batch: int) -> float:
            prompt_tokens = round(batch * mean_in / decode_steps)
            return cost.mixed_step_seconds(prompt_tokens, 0, batch, max(batch, round(batch * context)))

        # The token budget caps the batch: its decodes plus the prompts they bring along.
        within_budget = math.floor(budget / (1 + mean_in / decode_steps))
        colocated = capacity.best_rate(min(max_batch, scheduler.max_num_seqs, within_budget),
                                       mixed_step, slo.tpot, decode_steps)
        colocated_rate = colocated.rate if colocated else None
        if colocated_rate is None:
            exclusions.append(Exclusion(f"{label} (colocated)", (
                "no batch carries its share of prompts within the token budget and the TPOT SLO")))
    return InstanceOption(instance, cost, num_blocks, prefill_rate, decode_rate, colocated_rate)
