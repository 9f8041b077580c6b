"""Engine steps on the serving loop's thread, with the engine built on that thread or on the main
thread (where workers built it before 2026-11-30): see pdserve/runtime/engine_loop.py.

    python benchmarks/engine_thread_ab.py [--rounds 3] [--threads 2]

OpenMP teams are per process, so each arm runs in a child process of its own; the arms alternate
``--rounds`` times so that both see the same machine. Each child times prefill steps of fresh
256-token prompts and decode steps at batch 1 and 8 (512-token contexts), all run through
:class:`EngineLoop` as a worker runs them. Prints medians per arm and their ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "built-on-main": "the engine loaded on the main thread, stepped on the loop's (before)",
    "built-on-loop": "the engine loaded and stepped on the loop's thread (EngineLoop now)",
}


def _child(arm: str, threads: int, prefills: int, decode_steps: int) -> dict[str, list[float]]:
    from pdserve.engine.config import EngineConfig, ModelConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.runtime.engine_loop import EngineLoop

    def build() -> LLMEngine:
        return LLMEngine(EngineConfig(model=ModelConfig(num_threads=threads), show_progress=False))

    if arm == "built-on-main":
        built_here = build()
        loop = EngineLoop(lambda: built_here, lambda _: None)
    else:
        loop = EngineLoop(build, lambda _: None)
    loop.start()

    def timed_steps(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, skip_prefill: bool) -> list[float]:
        for index, prompt in enumerate(prompts):
            engine.add_request(
                prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), f"r{time.monotonic_ns()}-{index}"
            )
        times = []
        while engine.has_unfinished_requests():
            prefilling = bool(engine.scheduler.waiting) or any(s.is_prefilling for s in engine.scheduler.running)
            started = time.perf_counter()
            engine.step()
            if prefilling != skip_prefill:
                times.append(time.perf_counter() - started)
        return times

    def fresh(count: int, length: int, salt: int) -> list[list[int]]:
        return [[(salt * 131 + row * 17 + i * 7) % 30000 + 100 for i in range(length)] for row in range(count)]

    def on_loop(prompts: list[list[int]], max_tokens: int, skip_prefill: bool) -> list[float]:
        return loop.call(lambda engine: timed_steps(engine, prompts, max_tokens, skip_prefill)).result(timeout=600)

    on_loop(fresh(1, 256, 0), 1, skip_prefill=False)  # warm-up
    result = {
        "prefill_256": [t for i in range(prefills) for t in on_loop(fresh(1, 256, i + 1), 1, skip_prefill=False)],
        "decode_b1": on_loop(fresh(1, 512, 99), decode_steps, skip_prefill=True),
        "decode_b8": on_loop(fresh(8, 512, 98), decode_steps, skip_prefill=True),
    }
    loop.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefills", type=int, default=6, help="timed 256-token prefills per child")
    parser.add_argument("--decode-steps", type=int, default=24, help="timed decode steps per batch size and child")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_thread_ab.json"))
    parser.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.threads, args.prefills, args.decode_steps)))
        return
    samples: dict[str, dict[str, list[float]]] = {arm: {} for arm in ARMS}
    for round_index in range(args.rounds):
        for arm in ARMS:
            print(f"round {round_index + 1}/{args.rounds}: {arm}", file=sys.stderr, flush=True)
            child = subprocess.run(
                [sys.executable, __file__, "--child", arm, "--threads", str(args.threads),
                 "--prefills", str(args.prefills), "--decode-steps", str(args.decode_steps)],
                check=True, capture_output=True, text=True,
            )
            for kind, times in json.loads(child.stdout.strip().splitlines()[-1]).items():
                samples[arm].setdefault(kind, []).extend(times)
    medians = {arm: {kind: statistics.median(times) for kind, times in kinds.items()} for arm, kinds in samples.items()}
    print(f"| step ({args.threads} threads) | built on main, ms | built on the loop thread, ms | ratio |")
    print("|---|---|---|---|")
    ratios = {}
    for kind in medians["built-on-loop"]:
        before, after = medians["built-on-main"][kind], medians["built-on-loop"][kind]
        ratios[kind] = before / after
        print(f"| {kind} | {before * 1000:.1f} | {after * 1000:.1f} | {ratios[kind]:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "benchmarks/engine_thread_ab.py", "arms": ARMS, "threads": args.threads, "rounds": args.rounds,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command_line": " ".join(sys.argv),
        "median_seconds": medians, "ratio_before_over_after": ratios, "samples": samples,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
