"""One side of ``pdserve bench engine`` in its own process (``python -m pdserve.bench.engine``), so
its resident-memory high-water mark is its own; run.py starts it and reads its result file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pdserve.bench.engine.plan import BenchPlan


def side_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One side of 'pdserve bench engine' (internal).")
    parser.add_argument("--side", choices=["ours", "hf"], required=True)
    parser.add_argument("--plan", required=True, help="BenchPlan as JSON")
    parser.add_argument("--result", required=True, help="where to write the side's result JSON")
    args = parser.parse_args(argv)
    plan = BenchPlan.from_json(args.plan)
    torch.set_num_threads(plan.num_threads)
    if args.side == "ours":
        from pdserve.bench.engine.ours import measure_ours

        result = measure_ours(plan)
    else:
        from pdserve.bench.engine.hf_baseline import measure_hf

        result = measure_hf(plan)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(side_main())
