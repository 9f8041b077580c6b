"""The HF transformers side of ``pdserve bench engine``: ``LlamaForCausalLM`` on the same weights.

transformers builds the model itself from the same GGUF file (``gguf_file=``, dequantized to
float32) or HF directory our engine loads. Attention is "sdpa", the faster of transformers' CPU
implementations, so the baseline is the strongest stock transformers offers. Decoding uses the
default DynamicCache; every prompt of a batch has the same length, so no padding or mask is needed.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

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
from pdserve.machine import synchronize

ATTENTION = "sdpa"


def load_hf_model(model_path: Path, dtype: torch.dtype, device: str) -> Any:
    """transformers' LlamaForCausalLM from a GGUF file or HF directory, in eval mode."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model: Any
    if model_path.is_dir():
        model = LlamaForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=ATTENTION)
    else:
        model = LlamaForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=dtype, attn_implementation=ATTENTION
        )
    return model.to(device).eval()


def measure_hf(plan: BenchPlan) -> dict[str, Any]:
    """float32 prefill and decode as planned, then bfloat16 prefill on the same model, cast."""
    import transformers

    log("hf", f"loading {Path(plan.model_path).name} with transformers {transformers.__version__}")
    started = time.perf_counter()
    model = load_hf_model(Path(plan.model_path), torch.float32, plan.device)
    load_seconds = time.perf_counter() - started
    weight_numel = sum(p.numel() for p in model.parameters())  # tied weights appear once
    gc.collect()
    load_peak, rss_after_load = peak_rss(), current_rss()
    log("hf", f"loaded in {load_seconds:.1f} s, resident {rss_after_load / 2**30:.2f} GiB")

    peaks = PeakTracker()
    prefill = [
        _prefill(model, plan, length, "float32", plan.num_prefill_repeats)
        for length in plan.prefill_lengths
    ]
    decode = [_decode(model, plan, batch_size, peaks) for batch_size in plan.batch_sizes]
    if plan.hf_bf16_prefill_lengths:
        model = model.to(torch.bfloat16)
        gc.collect()
        prefill += [
            _prefill(model, plan, length, "bfloat16", plan.num_hf_bf16_repeats)
            for length in plan.hf_bf16_prefill_lengths
        ]
    return {
        "engine": "transformers",
        "transformers_version": transformers.__version__,
        "model_class": type(model).__name__,
        "attn_implementation": ATTENTION,
        "weight_numel": weight_numel,
        "weight_bytes": weight_numel * torch.float32.itemsize,
        "num_threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "prefill": prefill,
        "decode": decode,
        "memory": {
            "load_peak_rss_bytes": load_peak,
            "rss_after_load_bytes": rss_after_load,
            "run_peak_rss_bytes": peaks.overall,
            "phase_peaks_resettable": peaks.resettable,
        },
    }


def _prefill(model: Any, plan: BenchPlan, length: int, dtype: str, num_repeats: int) -> dict[str, Any]:
    vocab_size = model.config.vocab_size
    log("hf", f"prefill {length} tokens ({dtype}): 1 warmup + {num_repeats} timed")
    # bfloat16 is slow here: warm its kernels up on a short prompt rather than a full one.
    warmup_length = length if dtype == "float32" else min(length, 64)
    _time_prefill(model, prompt_ids(vocab_size, warmup_length, prefill_seed(length, -1)), plan.device)
    seconds = [
        _time_prefill(model, prompt_ids(vocab_size, length, prefill_seed(length, repeat)), plan.device)
        for repeat in range(num_repeats)
    ]
    entry = prefill_entry(length, dtype, seconds)
    log("hf", f"prefill {length} tokens ({dtype}): {entry['tokens_per_second']:.0f} tok/s")
    return entry


@torch.inference_mode()
def _time_prefill(model: Any, prompt: list[int], device: str) -> float:
    """Seconds for one forward over the prompt (filling a KV cache) and its first greedy token."""
    synchronize(device)
    started = time.perf_counter()
    input_ids = torch.tensor([prompt], device=device)
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    output.logits[:, -1].argmax(-1).tolist()
    synchronize(device)
    return time.perf_counter() - started


@torch.inference_mode()
def _decode(model: Any, plan: BenchPlan, batch_size: int, peaks: PeakTracker) -> dict[str, Any]:
    log("hf", f"decode batch {batch_size}: prefilling {batch_size} x {plan.context_length} tokens")
    vocab_size = model.config.vocab_size
    prompts = [
        prompt_ids(vocab_size, plan.context_length, decode_seed(batch_size, row))
        for row in range(batch_size)
    ]
    output = model(
        input_ids=torch.tensor(prompts, device=plan.device), use_cache=True, logits_to_keep=1
    )
    cache = output.past_key_values
    next_ids = output.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
    del output

    log("hf", f"decode batch {batch_size}: timing {plan.num_decode_steps} steps")
    step_seconds = []
    for step in range(plan.num_warmup_steps + plan.num_decode_steps):
        if step == plan.num_warmup_steps:
            peaks.start_phase()
        synchronize(plan.device)
        started = time.perf_counter()
        output = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
        next_ids.tolist()  # the host sees the tokens, as a server's would
        synchronize(plan.device)
        if step >= plan.num_warmup_steps:
            step_seconds.append(time.perf_counter() - started)
        del output
    decode_peak = peaks.end_phase()
    del cache, next_ids
    gc.collect()

    entry = decode_entry(batch_size, plan.context_length, "float32", step_seconds, decode_peak)
    log(
        "hf",
        f"decode batch {batch_size}: {entry['tokens_per_second']:.1f} tok/s "
        f"(step p50 {entry['median_step_seconds'] * 1e3:.1f} ms, p90 {entry['p90_step_seconds'] * 1e3:.1f} ms)",
    )
    return entry
