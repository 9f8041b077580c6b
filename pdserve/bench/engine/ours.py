"""Our engine's side of ``pdserve bench engine``: load it once, time prefills of each length and
decode steps of each batch size, and note what loading and each phase held in memory."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pdserve.bench.engine.measure import (
    PeakTracker,
    current_rss,
    decode_entry,
    log,
    peak_rss,
    prefill_entry,
)
from pdserve.bench.engine.plan import BenchPlan, decode_seed, prefill_seed, prompt_ids

if TYPE_CHECKING:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.model import LlamaModel


def measure_ours(plan: BenchPlan) -> dict[str, Any]:
    """Load our engine once and run every phase of the plan on it."""
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.loader import load_checkpoint

    log("pdserve", f"loading {Path(plan.model_path).name} as {plan.dtype}, {plan.num_threads} threads")
    started = time.perf_counter()
    checkpoint = load_checkpoint(plan.model_path, show_progress=False)
    config = _engine_config(plan)
    engine = LLMEngine(config, checkpoint)
    load_seconds = time.perf_counter() - started
    weight_dtype = str(engine.model.dtype).removeprefix("torch.")
    decode_attention = "native" if engine.model.native is not None else "torch"
    weight_numel = checkpoint.num_parameters  # the tied embedding once: it is also the LM head
    weight_bytes = decode_weight_bytes(engine.model)
    del checkpoint
    gc.collect()
    load_peak, rss_after_load = peak_rss(), current_rss()
    log("pdserve", f"loaded in {load_seconds:.1f} s, resident {rss_after_load / 2**30:.2f} GiB")

    peaks = PeakTracker()
    try:
        prefill = [_prefill_ours(engine, plan, length, weight_dtype) for length in plan.prefill_lengths]
        decode = []
        for batch_size in plan.batch_sizes:
            decode.append(_decode_ours(engine, plan, batch_size, weight_dtype, peaks))
        kv_pool_bytes = engine.kv_pool.layout.num_bytes
        model_name = engine.model_name
    finally:
        engine.close()
    return {
        "engine": "pdserve",
        "model_name": model_name,
        "dtype": plan.dtype,
        "weight_dtype": weight_dtype,
        "weight_format": plan.weight_format,
        "decode_attention": decode_attention,
        "weight_numel": weight_numel,
        # What one batch-1 decode step reads: every projection (the LM head included) and norm.
        "weight_bytes": weight_bytes,
        "num_threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "engine_config": asdict(config),
        "prefill": prefill,
        "decode": decode,
        "memory": {
            "load_peak_rss_bytes": load_peak,
            "rss_after_load_bytes": rss_after_load,
            "run_peak_rss_bytes": peaks.overall,
            "kv_pool_bytes": kv_pool_bytes,
            "phase_peaks_resettable": peaks.resettable,
        },
    }


def decode_weight_bytes(model: LlamaModel) -> int:
    """Bytes of weights one decode step reads: all projections and norms, the LM head once
    (with tied embeddings it is the embedding matrix; the lookup itself reads only a few rows)."""
    def tensor_bytes(norm: torch.Tensor) -> int:
        return norm.numel() * norm.element_size()

    total = model.lm_head.decode_bytes + tensor_bytes(model.final_norm)
    for layer in model.layers:
        total += tensor_bytes(layer.input_norm) + tensor_bytes(layer.post_norm)
        total += sum(projection.kernel_bytes for projection in (layer.qkv, layer.o, layer.gate_up, layer.down))
    return total


def _engine_config(plan: BenchPlan) -> EngineConfig:
    """A step budget that takes the longest prompt whole, and a KV pool that fits the plan."""
    from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    block_size = CacheConfig().block_size
    max_batch = max(plan.batch_sizes)
    decode_blocks = -(-(plan.context_length + _decode_max_tokens(plan, max_batch)) // block_size)
    prefill_blocks = -(-(max(plan.prefill_lengths) + 1) // block_size)
    return EngineConfig(
        model=ModelConfig(
            path=plan.model_path, dtype=plan.dtype, weight_format=plan.weight_format,
            device=plan.device, num_threads=plan.num_threads, attention=plan.attention,
            large_batch_float32=plan.large_batch_float32,
        ),
        cache=CacheConfig(
            num_blocks=max(max_batch * decode_blocks, prefill_blocks) + 1,
            enable_prefix_caching=False,
        ),
        scheduler=SchedulerConfig(max_num_batched_tokens=_step_budget(plan), max_num_seqs=max_batch),
        show_progress=False,
    )


def _step_budget(plan: BenchPlan) -> int:
    """Tokens per engine step: every prefill prompt runs whole, in one step."""
    return max(2048, plan.context_length, *plan.prefill_lengths)


def _admission_steps_bound(plan: BenchPlan, batch_size: int) -> int:
    """Most steps until a batch is decoding: its prompts share each step's budget with its decodes."""
    return -(-batch_size * plan.context_length // (_step_budget(plan) - batch_size)) + 2


def _decode_max_tokens(plan: BenchPlan, batch_size: int) -> int:
    """Enough that no request of the batch finishes before the last timed step."""
    return _admission_steps_bound(plan, batch_size) + plan.num_warmup_steps + plan.num_decode_steps + 2


def _prefill_ours(engine: LLMEngine, plan: BenchPlan, length: int, dtype: str) -> dict[str, Any]:
    vocab_size = engine.architecture.vocab_size
    log("pdserve", f"prefill {length} tokens: 1 warmup + {plan.num_prefill_repeats} timed")
    _time_prefill_ours(engine, prompt_ids(vocab_size, length, prefill_seed(length, -1)))
    seconds, steps = [], []
    for repeat in range(plan.num_prefill_repeats):
        elapsed, num_steps = _time_prefill_ours(
            engine, prompt_ids(vocab_size, length, prefill_seed(length, repeat))
        )
        seconds.append(elapsed)
        steps.append(num_steps)
    entry = prefill_entry(length, dtype, seconds) | {"num_steps": steps}
    log("pdserve", f"prefill {length} tokens: {entry['tokens_per_second']:.0f} tok/s")
    return entry


def _time_prefill_ours(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from add_request to the first token, and the engine steps that took."""
    from pdserve.engine.sampling_params import SamplingParams

    started = time.perf_counter()
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        num_steps += 1
        if any(o.request_id == request_id and o.outputs[0].token_ids for o in outputs):
            return time.perf_counter() - started, num_steps
    raise RuntimeError("the engine went idle before the prefill request produced its token")


def _decode_ours(
    engine: LLMEngine, plan: BenchPlan, batch_size: int, dtype: str, peaks: PeakTracker
) -> dict[str, Any]:
    from pdserve.engine.sampling_params import SamplingParams

    log("pdserve", f"decode batch {batch_size}: prefilling {batch_size} x {plan.context_length} tokens")
    vocab_size = engine.architecture.vocab_size
    params = SamplingParams(max_tokens=_decode_max_tokens(plan, batch_size), ignore_eos=True)
    request_ids = [
        engine.add_request(prompt_ids(vocab_size, plan.context_length, decode_seed(batch_size, row)), params)
        for row in range(batch_size)
    ]
    decoding: set[str] = set()
    num_admission_steps = 0
    while len(decoding) < batch_size:
        if num_admission_steps >= _admission_steps_bound(plan, batch_size):
            raise RuntimeError(f"batch {batch_size} was not all decoding after {num_admission_steps} steps")
        decoding.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        num_admission_steps += 1
    for _ in range(plan.num_warmup_steps):
        engine.step()

    log("pdserve", f"decode batch {batch_size}: timing {plan.num_decode_steps} steps")
    num_preemptions = engine.stats().num_preemptions
    peaks.start_phase()
    step_seconds = []
    for _ in range(plan.num_decode_steps):
        started = time.perf_counter()
        outputs = engine.step()
        step_seconds.append(time.perf_counter() - started)
        if len(outputs) != batch_size or any(o.finished for o in outputs):
            raise RuntimeError(f"a timed step of batch {batch_size} was not one decode of every request")
    decode_peak = peaks.end_phase()
    if engine.stats().num_preemptions != num_preemptions:
        raise RuntimeError(f"requests were preempted while timing batch {batch_size}")
    for request_id in request_ids:
        engine.abort(request_id)
    while engine.has_unfinished_requests():
        engine.step()

    entry = decode_entry(batch_size, plan.context_length, dtype, step_seconds, decode_peak)
    entry["num_admission_steps"] = num_admission_steps
    log(
        "pdserve",
        f"decode batch {batch_size}: {entry['tokens_per_second']:.1f} tok/s "
        f"(step p50 {entry['median_step_seconds'] * 1e3:.1f} ms, p90 {entry['p90_step_seconds'] * 1e3:.1f} ms)",
    )
    return entry
