"""Greedy-token agreement of a faster engine configuration (dtype, weight format) with float32.

The float32 engine equals Hugging Face token for token (tests/test_engine_parity.py), so it is
the reference here. For each prompt of the parity set (48 new tokens, EOS ignored) this reports
where the candidate's greedy tokens first differ and the share of positions that agree.

    python benchmarks/dtype_agreement.py --dtype bfloat16 [--output FILE.json]
    python benchmarks/dtype_agreement.py --weight-format int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from pdserve.bench.prompt_set import CHAT_MESSAGES, TEXT_PROMPTS, long_prompt
from pdserve.engine.config import WEIGHT_FORMATS, EngineConfig, ModelConfig
from pdserve.engine.llm import LLM
from pdserve.engine.loader import load_checkpoint
from pdserve.engine.sampling_params import SamplingParams

NEW_TOKENS = 48


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--weight-format", default="dense", choices=list(WEIGHT_FORMATS))
    parser.add_argument("--output", default=None, help="write the per-prompt figures as JSON")
    args = parser.parse_args()

    checkpoint = load_checkpoint(None)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    candidate = f"{args.dtype}/{args.weight_format}"
    if candidate == "float32/dense":
        parser.error("choose a --dtype or --weight-format other than the float32/dense reference")
    results = {}
    for label in ("float32/dense", candidate):
        dtype, weight_format = label.split("/")
        model = ModelConfig(dtype=dtype, weight_format=weight_format)
        llm = LLM(config=EngineConfig(model=model, show_progress=False), checkpoint=checkpoint)
        prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
        prompts += [llm.chat_prompt_ids(CHAT_MESSAGES), llm.tokenizer.encode(long_prompt())]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        print(f"{label}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results[label] = [o.outputs[0].token_ids for o in outputs]
        llm.close()

    rows = []
    for number, (reference, tokens) in enumerate(zip(results["float32/dense"], results[candidate], strict=True)):
        first_difference = next(
            (i for i, (a, b) in enumerate(zip(reference, tokens, strict=True)) if a != b), None
        )
        agree = sum(a == b for a, b in zip(reference, tokens, strict=True)) / len(reference)
        rows.append({"prompt": number, "first_difference": first_difference, "positional_agreement": agree})
        shown = "none" if first_difference is None else str(first_difference)
        print(f"prompt {number:2d}: first difference at {shown:>4}, positional agreement {agree:.0%}")
    identical = sum(r["first_difference"] is None for r in rows)
    prefix = [r["first_difference"] if r["first_difference"] is not None else NEW_TOKENS for r in rows]
    print(
        f"{candidate} vs float32/dense: {identical}/{len(rows)} prompts identical over {NEW_TOKENS} tokens; "
        f"median identical prefix {statistics.median(prefix)} tokens"
    )
    if args.output:
        Path(args.output).write_text(json.dumps({"candidate": candidate, "new_tokens": NEW_TOKENS, "prompts": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
