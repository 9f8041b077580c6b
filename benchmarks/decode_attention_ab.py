"""Decode steps with the native decode attention kernel against the torch path (gather + SDPA),
side by side: two engines in one process, their steps alternating, so both see the same machine.

    python benchmarks/decode_attention_ab.py [--batches 1,8,32] [--context 512] [--threads 2]

Prints the median and p90 step time of each and their ratio per batch size, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import Checkpoint, load_checkpoint, resolve_model_path
from pdserve.engine.sampling_params import SamplingParams
from pdserve.traffic.stats import percentile


def _engine(checkpoint: Checkpoint, attention: str, batch: int, context: int, steps: int, threads: int) -> LLMEngine:
    blocks_per_seq = -(-(context + steps + 8) // 16)
    config = EngineConfig(
        model=ModelConfig(attention=attention, num_threads=threads),
        cache=CacheConfig(num_blocks=batch * blocks_per_seq + 1, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(batch, 1)),
        show_progress=False,
    )
    engine = LLMEngine(config, checkpoint)
    for row in range(batch):
        prompt = [(row * 7 + i) % 1000 + 100 for i in range(context)]
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, ignore_eos=True))
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per engine and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_attention_ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(str(resolve_model_path(None, show_progress=False)), show_progress=False)
    rows = []
    print(f"| batch | torch path ms (p50 / p90) | native ms (p50 / p90) | speed-up (p50) |  ({args.threads} threads, "
          f"{args.context}-token contexts, bf16)")
    print("|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        engines = {name: _engine(checkpoint, name, batch, args.context, args.steps, args.threads)
                   for name in ("torch", "native")}
        assert engines["native"].model.native is not None, "the native kernel did not load"
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(3):  # warm-up
            for engine in engines.values():
                engine.step()
        for _ in range(args.steps):
            for name, engine in engines.items():
                started = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - started)
        for engine in engines.values():
            engine.close()
        summary = {name: (statistics.median(t) * 1000, percentile(t, 90) * 1000) for name, t in times.items()}
        speedup = summary["torch"][0] / summary["native"][0]
        rows.append({"batch": batch, "torch_ms": summary["torch"], "native_ms": summary["native"],
                     "speedup_p50": speedup})
        print(f"| {batch} | {summary['torch'][0]:.1f} / {summary['torch'][1]:.1f} | "
              f"{summary['native'][0]:.1f} / {summary['native'][1]:.1f} | {speedup:.2f}x |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "threads": args.threads,
        "context": args.context, "steps": args.steps, "torch": torch.__version__, "rows": rows,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
