"""``pdserve bench engine``: prefill and decode throughput of our engine beside HF transformers.

Each side runs in its own subprocess (``python -m pdserve.bench.engine --side ours|hf``) so its
resident-memory high-water mark is its own. The parent measures copy bandwidth (the decode floor:
a batch-1 step must stream every weight from memory once), joins the two sides' results, prints
one table and writes every raw number to JSON.

Speed targets (reported, never asserted):
    decode, batch 1:            >= 80 tokens/s
    decode, batch 32:           >= 3x HF transformers
    prefill, 2,048-token prompt: >= HF transformers in bfloat16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch

from pdserve.runtime.exit_status import describe_exit

if TYPE_CHECKING:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.model import LlamaModel

DECODE_BATCH1_TARGET = 80.0
"""tokens/s."""
DECODE_BATCH32_RATIO_TARGET = 3.0
"""pdserve / HF tokens/s at batch 32."""
PREFILL_2048_RATIO_TARGET = 1.0
"""pdserve / HF bfloat16 tokens/s for a 2,048-token prompt."""
_MIN_PROMPT_TOKEN_ID = 1000
"""Random prompts draw ids above the special tokens, which sit at the start of the vocabulary."""


@dataclass(frozen=True)
class BenchPlan:
    """What one run measures; both sides get the same plan (as JSON)."""

    model_path: str
    """The resolved GGUF file or Hugging Face directory, so both sides load the same weights."""
    dtype: str
    """Our engine's dtype (``--dtype``). HF runs float32 throughout, plus bfloat16 prefill."""
    weight_format: str
    """Our engine's projection weights (``--weight-format``): dense, int8 or int4."""
    device: str
    num_threads: int
    quick: bool
    """A smoke run: fewer repeats, batches 1 and 8, 512-token prompts only."""
    prefill_lengths: tuple[int, ...]
    num_prefill_repeats: int
    """Timed prefills per length, each on a distinct prompt, after one untimed warmup."""
    batch_sizes: tuple[int, ...]
    context_length: int
    """Prompt tokens of every decode request: decode steps run over contexts of this length."""
    num_warmup_steps: int
    num_decode_steps: int
    """Timed decode steps per batch size (each step yields batch-size tokens)."""
    hf_bf16_prefill_lengths: tuple[int, ...]
    num_hf_bf16_repeats: int
    attention: str = "auto"
    """Our engine's decode attention (``--attention``): auto, native or torch."""
    large_batch_float32: bool = True
    """Our engine's float32 copies for large batches (``--[no-]large-batch-float32``)."""

    @classmethod
    def create(
        cls, model_path: str, dtype: str, weight_format: str, device: str, num_threads: int, quick: bool,
        attention: str = "auto", large_batch_float32: bool = True,
    ) -> BenchPlan:
        if quick:
            return cls(
                model_path, dtype, weight_format, device, num_threads, quick,
                prefill_lengths=(512,), num_prefill_repeats=2, batch_sizes=(1, 8),
                context_length=512, num_warmup_steps=2, num_decode_steps=8,
                hf_bf16_prefill_lengths=(512,), num_hf_bf16_repeats=1, attention=attention,
                large_batch_float32=large_batch_float32,
            )  # fmt: skip
        return cls(
            model_path, dtype, weight_format, device, num_threads, quick,
            prefill_lengths=(512, 2048), num_prefill_repeats=3, batch_sizes=(1, 8, 32, 64),
            context_length=512, num_warmup_steps=3, num_decode_steps=20,
            hf_bf16_prefill_lengths=(2048,), num_hf_bf16_repeats=2, attention=attention,
            large_batch_float32=large_batch_float32,
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchPlan:
        data = json.loads(text)
        for key in ("prefill_lengths", "batch_sizes", "hf_bf16_prefill_lengths"):
            data[key] = tuple(data[key])
        return cls(**data)


# -- helpers shared by both sides ------------------------------------------------------------


def log(side: str, message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {side}: {message}", file=sys.stderr, flush=True)


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """A random prompt; distinct seeds give distinct prompts, so no prefix is ever shared."""
    generator = torch.Generator().manual_seed(seed)
    low = min(_MIN_PROMPT_TOKEN_ID, vocab_size // 2)
    return torch.randint(low, vocab_size, (length,), generator=generator).tolist()


def prefill_seed(length: int, repeat: int) -> int:
    return 10_000 * length + repeat


def decode_seed(batch_size: int, row: int) -> int:
    return 100_000_000 + 10_000 * batch_size + row


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def prefill_entry(length: int, dtype: str, seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "prompt_tokens": length,
        "dtype": dtype,
        "seconds": seconds,
        "median_seconds": median,
        "p90_seconds": percentile(seconds, 0.9),
        "tokens_per_second": length / median,
    }


def decode_entry(
    batch_size: int, context_length: int, dtype: str, step_seconds: list[float], peak_rss: int
) -> dict[str, Any]:
    median = statistics.median(step_seconds)
    return {
        "batch_size": batch_size,
        "context_tokens": context_length,
        "dtype": dtype,
        "step_seconds": step_seconds,
        "median_step_seconds": median,
        "p90_step_seconds": percentile(step_seconds, 0.9),
        "tokens_per_second": batch_size / median,
        # High-water mark over the timed steps: weights, the batch's KV and one step's activations.
        "decode_peak_rss_bytes": peak_rss,
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (since the last reset_peak_rss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss if sys.platform == "darwin" else max_rss * 1024)


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux only); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakTracker:
    """Per-phase resident high-water marks, plus the mark over the whole run despite the resets."""

    def __init__(self) -> None:
        self.resettable = reset_peak_rss()
        self._overall = peak_rss()

    def start_phase(self) -> None:
        self._overall = max(self._overall, peak_rss())
        reset_peak_rss()

    def end_phase(self) -> int:
        phase_peak = peak_rss()
        self._overall = max(self._overall, phase_peak)
        return phase_peak

    @property
    def overall(self) -> int:
        return max(self._overall, peak_rss())


# -- our engine ------------------------------------------------------------------------------


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


# -- the run: both sides, the bandwidth floor, the report ------------------------------------


class SideFailedError(RuntimeError):
    """A side's subprocess exited without a result."""


def run_engine_benchmark(args: argparse.Namespace) -> int:
    """``pdserve bench engine``: measure, print the table, write the JSON report."""
    from pdserve.engine.loader import resolve_model_path

    started = time.perf_counter()
    if not args.skip_hf and importlib.util.find_spec("transformers") is None:
        raise ValueError(
            "the HF baseline needs transformers: pip install 'pdserve[reference]', or pass --skip-hf"
        )
    num_threads = args.threads or _num_cores()
    model_path = resolve_model_path(args.model)
    weight_format = getattr(args, "weight_format", "dense")
    plan = BenchPlan.create(
        str(model_path), args.dtype, weight_format, args.device, num_threads, args.quick,
        getattr(args, "attention", "auto"), getattr(args, "large_batch_float32", True),
    )
    torch.set_num_threads(num_threads)
    machine = machine_info(num_threads)
    if _is_busy(machine):
        log("bench", f"WARNING: other processes use {machine['cpu_busy_percent_start']:.0f}% of the CPU")

    others = OtherCpuMeter()
    log("bench", f"measuring copy bandwidth on {plan.device}")
    bandwidth = measure_copy_bandwidth(plan.device, num_repeats=5 if args.quick else 10)
    log("bench", f"copy bandwidth {bandwidth['bytes_per_second'] / 1e9:.1f} GB/s")
    try:
        ours = _run_side("ours", plan)
        hf = None if args.skip_hf else _run_side("hf", plan)
    except SideFailedError as error:
        print(f"pdserve: error: {error}", file=sys.stderr)
        return 1
    machine["load_average_end"] = _load_average()
    machine["other_cpu_percent_during_run"] = others.percent()

    report = build_report(plan, machine, bandwidth, ours, hf)
    report["args"] = dict(vars(args))
    report["command_line"] = shlex.join([sys.executable, *sys.argv])
    report["total_seconds"] = time.perf_counter() - started
    print(format_table(report), flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    log("bench", f"wrote {output} ({report['total_seconds']:.0f} s in all)")
    return 0


def _run_side(side: str, plan: BenchPlan) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its stdout joins our stderr, so ours holds the table."""
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as directory:
        result_path = Path(directory) / f"{side}.json"
        command = [
            sys.executable, "-m", "pdserve.bench.engine",
            "--side", side, "--plan", plan.to_json(), "--result", str(result_path),
        ]  # fmt: skip
        # transformers' GGUF reader draws a tqdm bar of its own; TQDM_DISABLE silences it.
        env = {**os.environ, "TQDM_DISABLE": "1"}
        others = OtherCpuMeter()
        completed = subprocess.run(command, stdout=sys.stderr.fileno(), env=env, check=False)
        if completed.returncode != 0 or not result_path.exists():
            raise SideFailedError(f"the {side} side of the benchmark failed ({describe_exit(completed.returncode)})")
        result: dict[str, Any] = json.loads(result_path.read_text())
    result["other_cpu_percent"] = others.percent()
    log("bench", f"other processes used {result['other_cpu_percent']:.0f}% of the CPU meanwhile")
    return result


def _num_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _is_busy(machine: dict[str, Any]) -> bool:
    """Whether other jobs used the CPU. They make every number low and noisy: an OpenMP region
    waits for its slowest thread, and a descheduled one costs milliseconds."""
    during = machine.get("other_cpu_percent_during_run")
    return bool(machine["cpu_busy_percent_start"] > 20.0 or (during is not None and during > 10.0))


class OtherCpuMeter:
    """Share of all cores that processes other than this one and its children kept busy."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._system_busy = self._busy_seconds()
        self._own = self._own_seconds()

    @staticmethod
    def _busy_seconds() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def percent(self) -> float:
        """Call after the children ended (their CPU time is counted once they are waited for)."""
        wall = time.monotonic() - self._started
        others = (self._busy_seconds() - self._system_busy) - (self._own_seconds() - self._own)
        return max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))


def machine_info(num_threads: int) -> dict[str, Any]:
    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "num_cores": os.cpu_count(),
        "num_usable_cores": _num_cores(),
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "num_threads": num_threads,
        "load_average_start": _load_average(),
        # Share of all cores in use during one second in which this process idles.
        "cpu_busy_percent_start": psutil.cpu_percent(interval=1.0),
    }


def measure_copy_bandwidth(
    device: str, num_bytes: int = 256 << 20, num_repeats: int = 10
) -> dict[str, Any]:
    """Median ``dst.copy_(src)`` rate over ``num_bytes`` buffers, counting bytes read + written."""
    source = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)  # fault the pages in before timing
    seconds = []
    for _ in range(num_repeats):
        synchronize(device)
        started = time.perf_counter()
        destination.copy_(source)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    del source, destination
    median = statistics.median(seconds)
    return {
        "buffer_bytes": num_bytes,
        "bytes_per_copy": 2 * num_bytes,
        "seconds": seconds,
        "median_seconds": median,
        "bytes_per_second": 2 * num_bytes / median,
    }


def decode_floor(weight_bytes: int, bytes_per_second: float) -> dict[str, float]:
    """A batch-1 decode step reads every weight once (the tied embedding once, as the LM head),
    so weight_bytes / bandwidth bounds its time from below and its tokens/s from above."""
    seconds = weight_bytes / bytes_per_second
    return {
        "weight_bytes": weight_bytes,
        "seconds_per_step": seconds,
        "batch1_tokens_per_second_ceiling": 1.0 / seconds,
    }


def _find(entries: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((e for e in entries if all(e.get(k) == v for k, v in match.items())), None)


def _rate(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else float(entry["tokens_per_second"])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _target(goal: float, measured: float | None) -> dict[str, Any]:
    return {"target": goal, "measured": measured, "met": None if measured is None else measured >= goal}


def build_report(
    plan: BenchPlan,
    machine: dict[str, Any],
    bandwidth: dict[str, Any],
    ours: dict[str, Any],
    hf: dict[str, Any] | None,
) -> dict[str, Any]:
    bytes_per_second = bandwidth["bytes_per_second"]
    floors = {"pdserve": decode_floor(ours["weight_bytes"], bytes_per_second)}
    hf_prefill = hf["prefill"] if hf else []
    hf_decode = hf["decode"] if hf else []
    if hf:
        floors["hf"] = decode_floor(hf["weight_bytes"], bytes_per_second)

    def ours_prefill(length: int) -> float | None:
        return _rate(_find(ours["prefill"], prompt_tokens=length))

    def ours_decode(batch_size: int) -> float | None:
        return _rate(_find(ours["decode"], batch_size=batch_size))

    prefill_vs_bf16 = {
        str(n): _ratio(ours_prefill(n), _rate(_find(hf_prefill, prompt_tokens=n, dtype="bfloat16")))
        for n in plan.hf_bf16_prefill_lengths
    }
    decode_vs_hf = {
        str(b): _ratio(ours_decode(b), _rate(_find(hf_decode, batch_size=b))) for b in plan.batch_sizes
    }
    ratios = {
        "prefill_vs_hf_float32": {
            str(n): _ratio(ours_prefill(n), _rate(_find(hf_prefill, prompt_tokens=n, dtype="float32")))
            for n in plan.prefill_lengths
        },
        "prefill_vs_hf_bfloat16": prefill_vs_bf16,
        "decode_vs_hf_float32": decode_vs_hf,
        "decode_batch1_vs_bandwidth_ceiling": _ratio(
            ours_decode(1), floors["pdserve"]["batch1_tokens_per_second_ceiling"]
        ),
        "run_peak_rss_vs_hf": _ratio(
            ours["memory"]["run_peak_rss_bytes"], hf["memory"]["run_peak_rss_bytes"] if hf else None
        ),
    }
    targets = {
        "decode_batch1_tokens_per_second": _target(DECODE_BATCH1_TARGET, ours_decode(1)),
        "decode_batch32_vs_hf": _target(
            DECODE_BATCH32_RATIO_TARGET, decode_vs_hf.get("32")
        ),
        "prefill_2048_vs_hf_bfloat16": _target(
            PREFILL_2048_RATIO_TARGET, prefill_vs_bf16.get("2048")
        ),
    }
    return {
        "benchmark": "pdserve bench engine",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "plan": asdict(plan),
        "machine": machine,
        "bandwidth": bandwidth,
        "decode_floor": floors,
        "pdserve": ours,
        "hf": hf,
        "ratios": ratios,
        "targets": targets,
    }


# -- the table -------------------------------------------------------------------------------


def _prefill_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['tokens_per_second']:,.0f} tok/s ({entry['median_seconds']:.2f} s)"


def _decode_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    p50, p90 = entry["median_step_seconds"] * 1e3, entry["p90_step_seconds"] * 1e3
    return f"{entry['tokens_per_second']:,.1f} tok/s (step {p50:.1f} / p90 {p90:.1f} ms)"


def _ratio_cell(ratio: float | None, label: str = "") -> str:
    return "-" if ratio is None else f"{ratio:.2f}x{label}"


def _target_cell(target: dict[str, Any], text: str) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
    return f"{text}: {verdict}"


def _gib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def format_table(report: dict[str, Any]) -> str:
    """One aligned Markdown table: pdserve beside HF, the ratios and the targets."""
    plan, ours, hf = report["plan"], report["pdserve"], report["hf"]
    ratios, targets = report["ratios"], report["targets"]
    hf_prefill = hf["prefill"] if hf else []
    hf_decode = hf["decode"] if hf else []
    missing = "-" if hf else "skipped"
    ours_dtype = ours["weight_dtype"] + (f" ({ours['dtype']})" if ours["dtype"] != ours["weight_dtype"] else "")
    if ours.get("weight_format", "dense") != "dense":
        ours_dtype += f", {ours['weight_format']} weights"
    if ours.get("decode_attention") == "native":
        ours_dtype += ", native decode attention"
    header = ["", f"pdserve {ours_dtype}", "HF sdpa float32", "HF sdpa bfloat16", "pdserve / HF", "target"]
    rows: list[list[str]] = []

    for length in plan["prefill_lengths"]:
        hf32 = _find(hf_prefill, prompt_tokens=length, dtype="float32")
        hf16 = _find(hf_prefill, prompt_tokens=length, dtype="bfloat16")
        ratio = _ratio_cell(ratios["prefill_vs_hf_float32"].get(str(length)), " fp32")
        if hf16 is not None:
            ratio += ", " + _ratio_cell(ratios["prefill_vs_hf_bfloat16"].get(str(length)), " bf16")
        target = _target_cell(targets["prefill_2048_vs_hf_bfloat16"], ">= 1x HF bf16") if length == 2048 else ""
        rows.append([
            f"prefill {length:,} tokens", _prefill_cell(_find(ours["prefill"], prompt_tokens=length)),
            _prefill_cell(hf32) if hf else missing, _prefill_cell(hf16) if hf else missing, ratio, target,
        ])  # fmt: skip

    for batch_size in plan["batch_sizes"]:
        target = ""
        if batch_size == 1:
            target = _target_cell(targets["decode_batch1_tokens_per_second"], f">= {DECODE_BATCH1_TARGET:.0f} tok/s")
        elif batch_size == 32:
            target = _target_cell(targets["decode_batch32_vs_hf"], f">= {DECODE_BATCH32_RATIO_TARGET:.0f}x HF")
        rows.append([
            f"decode batch {batch_size}, context {plan['context_length']}",
            _decode_cell(_find(ours["decode"], batch_size=batch_size)),
            _decode_cell(_find(hf_decode, batch_size=batch_size)) if hf else missing, "-",
            _ratio_cell(ratios["decode_vs_hf_float32"].get(str(batch_size))), target,
        ])  # fmt: skip

    floors = report["decode_floor"]

    def floor_cell(side: str) -> str:
        floor = floors.get(side)
        if floor is None:
            return missing
        return (
            f"{floor['batch1_tokens_per_second_ceiling']:,.1f} tok/s "
            f"({floor['weight_bytes'] / 1e6:,.0f} MB / step)"
        )

    ceiling_ratio = ratios["decode_batch1_vs_bandwidth_ceiling"]
    rows.append([
        "decode ceiling, batch 1 (weights / bandwidth)", floor_cell("pdserve"), floor_cell("hf"), "-",
        "-", "" if ceiling_ratio is None else f"pdserve batch 1 at {ceiling_ratio:.0%} of it",
    ])  # fmt: skip
    hf_memory = hf["memory"] if hf else {}
    rows.append([
        "peak RSS after loading (all phases)",
        f"{_gib(ours['memory']['run_peak_rss_bytes'])} (KV pool {_gib(ours['memory']['kv_pool_bytes'])})",
        _gib(hf_memory.get("run_peak_rss_bytes")) if hf else missing, "-",
        _ratio_cell(ratios["run_peak_rss_vs_hf"]), "",
    ])  # fmt: skip
    rows.append([
        "peak RSS while loading", _gib(ours["memory"]["load_peak_rss_bytes"]),
        _gib(hf_memory.get("load_peak_rss_bytes")) if hf else missing, "-", "-", "",
    ])  # fmt: skip
    rows.append([
        "load time", f"{ours['load_seconds']:.1f} s", f"{hf['load_seconds']:.1f} s" if hf else missing,
        "-", "-", "",
    ])  # fmt: skip

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    machine = report["machine"]
    notes = [
        f"{ours['model_name']} on {plan['device']} ({machine['cpu_model']}, {machine['num_usable_cores']} cores, "
        f"{plan['num_threads']} threads, flags {' '.join(machine['cpu_flags']) or 'none'}); torch {machine['torch']}"
        + (f", transformers {hf['transformers_version']}" if hf else ""),
        f"copy bandwidth {report['bandwidth']['bytes_per_second'] / 1e9:.1f} GB/s (read + write); "
        f"HF = LlamaForCausalLM, sdpa attention (faster than eager), DynamicCache, same weights",
        f"decode: {plan['num_decode_steps']} timed steps after {plan['num_warmup_steps']} warmup; "
        f"prefill: median of {plan['num_prefill_repeats']} distinct prompts, prefix caching off",
    ]
    if _is_busy(machine):
        sides = [("pdserve", ours), ("HF", hf)] if hf else [("pdserve", ours)]
        during = ", ".join(f"{side['other_cpu_percent']:.0f}% during {name}" for name, side in sides)
        notes.append(
            f"WARNING: other processes used {machine['cpu_busy_percent_start']:.0f}% of the CPU at the "
            f"start, {during}: these numbers are noisy and low"
        )
    table = [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]
    return "\n".join([*table, "", *notes])


# -- one side, in its own process ------------------------------------------------------------


def _side_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One side of 'pdserve bench engine' (internal).")
    parser.add_argument("--side", choices=["ours", "hf"], required=True)
    parser.add_argument("--plan", required=True, help="BenchPlan as JSON")
    parser.add_argument("--result", required=True, help="where to write the side's result JSON")
    args = parser.parse_args(argv)
    plan = BenchPlan.from_json(args.plan)
    torch.set_num_threads(plan.num_threads)
    if args.side == "ours":
        result = measure_ours(plan)
    else:
        from pdserve.bench.hf_baseline import measure_hf

        result = measure_hf(plan)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    # Run the side from the imported module, not from __main__: hf_baseline imports this module,
    # and there must be one BenchPlan class, not two.
    from pdserve.bench.engine import _side_main as side_main

    sys.exit(side_main())
