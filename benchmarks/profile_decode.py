"""Operator-level profile of decode steps: where a step's time goes.

    python benchmarks/profile_decode.py [--batch 32] [--context 512] [--weight-format dense]
"""

from __future__ import annotations

import argparse

from torch.profiler import profile

from pdserve.engine.config import WEIGHT_FORMATS, CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weight-format", default="dense", choices=list(WEIGHT_FORMATS))
    args = parser.parse_args()
    config = EngineConfig(
        model=ModelConfig(weight_format=args.weight_format, num_threads=args.threads),
        cache=CacheConfig(enable_prefix_caching=False),
        show_progress=False,
    )
    engine = LLM(config=config).engine
    for row in range(args.batch):
        prompt = [(row * 7 + i) % 1000 + 100 for i in range(args.context)]
        # Requests prefilled first decode while later ones prefill: max_tokens leaves room for that,
        # so every profiled step decodes the whole batch (checked below).
        engine.add_request(prompt, SamplingParams(max_tokens=2 * args.batch + args.steps + 16, ignore_eos=True))
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    running = len(engine.scheduler.running)
    if running != args.batch:
        raise SystemExit(f"only {running} of {args.batch} requests are decoding; profile would mislead")
    with profile() as prof:
        for _ in range(args.steps):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
