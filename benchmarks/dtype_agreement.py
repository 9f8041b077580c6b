"""Greedy-token agreement of a faster engine configuration (dtype, weight format) with float32.

The float32 engine equals Hugging Face token for token (tests/test_engine_parity.py), so it is
the reference here. For each prompt of the parity set (48 new tokens, EOS ignored) this reports
where the candidate's greedy tokens first differ and the share of positions that agree.

Free-running greedy decoding magnifies one near-tie into a different continuation, so it also
reports a teacher-forced figure: for every prefix (the prompt plus the reference's first k
tokens, k < 48), whether the candidate's greedy next token is the reference's. The reference
scores itself the same way, as a check (it is 100% up to its own batch-dependent rounding).

    python benchmarks/dtype_agreement.py --dtype bfloat16 [--output FILE.json]
    python benchmarks/dtype_agreement.py --weight-format int8
    python benchmarks/dtype_agreement.py --prefill-weight-format dense --weight-format int4

``--prefill-weight-format`` scores a disaggregated pair: the prompt's KV and first token from an
engine in that format, handed over (``prefill_only`` -> ``decode_from``, as between a prefill and
a decode worker) to an engine in ``--weight-format``, which decodes. Teacher-forced, the decode
engine computes the reference's first k tokens itself over the prompt's handed-over KV (its
complete blocks: at most 15 prompt tokens of a partial last block are recomputed on the decode
side, which a real handoff would carry too).
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
from pdserve.engine.loader import Checkpoint, load_checkpoint
from pdserve.engine.sampling_params import SamplingParams

NEW_TOKENS = 48


def score_pair(checkpoint: Checkpoint, args: argparse.Namespace, prompts: list[list[int]],
               reference: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Free-running and teacher-forced tokens of a prefill engine handing over to a decode engine."""
    engines = [LLM(config=EngineConfig(model=ModelConfig(dtype=args.dtype, weight_format=weight_format),
                                       show_progress=False), checkpoint=checkpoint)
               for weight_format in (args.prefill_weight_format, args.weight_format)]
    prefill, decode = engines
    block_size = prefill.engine.block_manager.block_size
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    started = time.perf_counter()
    free, forced = [], []
    for prompt, tokens in zip(prompts, reference, strict=True):
        free.append(decode.decode_from(prefill.prefill_only(prompt, params), params).outputs[0].token_ids)
        following = [prefill.prefill_only(prompt, one).first_tokens[0].token_id]  # k = 0: the prefill's own token
        for k in range(1, NEW_TOKENS):
            handoff = prefill.prefill_only(prompt + tokens[:k], one).truncated(num_blocks=len(prompt) // block_size)
            following.append(decode.decode_from(handoff, one).outputs[0].token_ids[0])
        forced.append(following)
    print(f"pair: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for engine in engines:
        engine.close()
    return free, forced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--weight-format", default="dense", choices=list(WEIGHT_FORMATS))
    parser.add_argument("--prefill-weight-format", default=None, choices=list(WEIGHT_FORMATS),
                        help="score a prefill/decode pair: the prompt in this format, the decode in --weight-format")
    parser.add_argument("--output", default=None, help="write the per-prompt figures as JSON")
    args = parser.parse_args()

    checkpoint = load_checkpoint(None)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    candidate = f"{args.dtype}/{args.weight_format}"
    if args.prefill_weight_format is not None:
        candidate = f"{args.dtype}/{args.prefill_weight_format} prefill + {args.weight_format} decode"
    if candidate == "float32/dense":
        parser.error("choose a --dtype or --weight-format other than the float32/dense reference")
    results: dict[str, list[list[int]]] = {}
    forced: dict[str, list[list[int]]] = {}
    labels = ["float32/dense"] if args.prefill_weight_format is not None else ["float32/dense", candidate]
    for label in labels:
        dtype, weight_format = label.split("/")
        model = ModelConfig(dtype=dtype, weight_format=weight_format)
        llm = LLM(config=EngineConfig(model=model, show_progress=False), checkpoint=checkpoint)
        prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
        prompts += [llm.chat_prompt_ids(CHAT_MESSAGES), llm.tokenizer.encode(long_prompt())]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        print(f"{label}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results[label] = [o.outputs[0].token_ids for o in outputs]
        prefixes = [prompt + tokens[:k] for prompt, tokens in zip(prompts, results["float32/dense"], strict=True)
                    for k in range(NEW_TOKENS)]
        following = llm.generate(prefixes, SamplingParams(max_tokens=1, ignore_eos=True))
        next_tokens = [o.outputs[0].token_ids[0] for o in following]
        forced[label] = [next_tokens[i * NEW_TOKENS : (i + 1) * NEW_TOKENS] for i in range(len(prompts))]
        llm.close()
    if args.prefill_weight_format is not None:
        results[candidate], forced[candidate] = score_pair(checkpoint, args, prompts, results["float32/dense"])

    rows = []
    forced_shares, self_forced_shares = [], []
    for number, (reference, tokens) in enumerate(zip(results["float32/dense"], results[candidate], strict=True)):
        first_difference = next(
            (i for i, (a, b) in enumerate(zip(reference, tokens, strict=True)) if a != b), None
        )
        agree = sum(a == b for a, b in zip(reference, tokens, strict=True)) / len(reference)
        forced_agree = sum(a == b for a, b in zip(reference, forced[candidate][number], strict=True)) / len(reference)
        self_forced = sum(
            a == b for a, b in zip(reference, forced["float32/dense"][number], strict=True)
        ) / len(reference)
        forced_shares.append(forced_agree)
        self_forced_shares.append(self_forced)
        rows.append({"prompt": number, "first_difference": first_difference, "positional_agreement": agree,
                     "teacher_forced_agreement": forced_agree, "reference_teacher_forced_agreement": self_forced})
        shown = "none" if first_difference is None else str(first_difference)
        print(f"prompt {number:2d}: first difference at {shown:>4}, positional agreement {agree:.0%}, "
              f"teacher-forced {forced_agree:.0%} (reference {self_forced:.0%})")
    identical = sum(r["first_difference"] is None for r in rows)
    prefix = [r["first_difference"] if r["first_difference"] is not None else NEW_TOKENS for r in rows]
    print(
        f"{candidate} vs float32/dense: {identical}/{len(rows)} prompts identical over {NEW_TOKENS} tokens; "
        f"median identical prefix {statistics.median(prefix)} tokens; "
        f"teacher-forced next-token agreement {statistics.mean(forced_shares):.1%} "
        f"(the reference against itself: {statistics.mean(self_forced_shares):.1%})"
    )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"candidate": candidate, "new_tokens": NEW_TOKENS, "prompts": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
