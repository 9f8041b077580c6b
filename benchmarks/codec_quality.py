"""Cost and quality of the KV transfer codecs on the default model (SmolLM2-135M, float32).

Cost, on a 2,048-token KV of real prose (the long prompt): wire bytes per token, and the median
time to encode, and to decode from raw bytes, all 30 layers.

Quality, per prompt of the fixed set: prefill once on the float32 engine, then pass the
handoff's KV through each codec layer by layer (encode -> bytes -> decode) and compare with the
uncompressed handoff over the 64 tokens decoded after the handoff's first token (that first
token comes from the prefill side's logits, so no codec can change it):

* free-running greedy: ``import_kv`` of every variant of one prompt, decoded together in one
  batch; where each first differs from the uncompressed handoff's continuation. Decoding the
  variants side by side keeps batch shape out of the comparison: ``none`` must never differ.
* teacher-forced: transformers' Llama scores the reference continuation in one forward over a
  ``DynamicCache`` holding the decoded prompt KV: top-1 agreement with the reference at each of
  the 64 positions, and the change in the mean log-likelihood of the reference tokens.
  The plumbing is checked first: with the uncompressed KV, HF's logits must match a forward over
  the whole prompt that computes its own KV, and its top-1 must match pdserve's tokens.

    OMP_NUM_THREADS=2 python benchmarks/codec_quality.py            # ~4 min on 2 cores
    OMP_NUM_THREADS=2 python benchmarks/codec_quality.py --quick    # 2 prompts, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.prompt_set import CHAT_MESSAGES, TEXT_PROMPTS, long_prompt
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.handoff import KVHandoff
from pdserve.engine.llm import LLM
from pdserve.engine.loader import load_checkpoint, resolve_model_path
from pdserve.engine.sampling_params import SamplingParams
from pdserve.transfer.codecs import CODEC_NAMES, KVCodec, as_bytes, get_codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import load_reference_model  # noqa: E402  (cached HF build of the same GGUF)

NEW_TOKENS = 64
"""Tokens decoded with the transferred KV, after the handoff's own first token."""
TIMING_TOKENS = 2048
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "uncompressed"


def log(message: str) -> None:
    print(f"[codec_quality] {message}", file=sys.stderr, flush=True)


def through_codec(codec: KVCodec, kv: torch.Tensor) -> torch.Tensor:
    """kv: [layers, 2, tokens, kv_heads, head_dim] -> the same after encode, bytes, decode."""
    layers = []
    for layer_kv in kv:
        payload = [bytes(as_bytes(frame)) for frame in codec.encode(layer_kv)]
        layers.append(codec.decode(payload, tuple(layer_kv.shape), kv.dtype))
    return torch.stack(layers)


def time_codec(codec: KVCodec, kv: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms to encode all layers, and to decode them from the frames' bytes (no copies)."""
    encode_ms, decode_ms = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        frames = [codec.encode(layer_kv) for layer_kv in kv]
        encoded = time.perf_counter()
        views = [[as_bytes(frame) for frame in layer_frames] for layer_frames in frames]
        started_decode = time.perf_counter()
        for layer_views in views:
            codec.decode(layer_views, tuple(kv.shape[1:]), kv.dtype)
        decoded = time.perf_counter()
        encode_ms.append((encoded - started) * 1e3)
        decode_ms.append((decoded - started_decode) * 1e3)
    return statistics.median(encode_ms), statistics.median(decode_ms)


def decode_together(
    llm: LLM, handoffs: dict[str, KVHandoff], params: SamplingParams
) -> dict[str, list[int]]:
    """Greedy continuations of every handoff, decoded in one batch."""
    engine = llm.engine
    for name, handoff in handoffs.items():
        engine.import_kv(handoff, params, request_id=f"{handoff.request_id}-{name}")
    pending = {f"{h.request_id}-{name}": name for name, h in handoffs.items()}
    tokens: dict[str, list[int]] = {}
    while pending:
        outputs = engine.step()
        if not outputs and not engine.has_unfinished_requests():
            raise RuntimeError(f"engine stopped with {sorted(pending)} unfinished")
        for output in outputs:
            if output.finished and output.request_id in pending:
                tokens[pending.pop(output.request_id)] = output.outputs[0].token_ids
    return tokens


@dataclass
class Scores:
    """Teacher-forced scores of the reference continuation."""

    top1: list[int]
    logprobs: list[float]
    """log p(reference[i + 1]) at each position i."""


def teacher_forced(
    model: Any, kv: torch.Tensor, continuation: list[int]
) -> tuple[Scores, torch.Tensor]:
    """Score ``continuation[1:]`` given the prompt KV ``kv`` and ``continuation[:-1]`` as input.

    kv: [layers, 2, prompt_tokens, kv_heads, head_dim], keys after RoPE, like HF's cache holds
    them in [batch, kv_heads, tokens, head_dim]. Returns the scores and the logits.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, layer_kv in enumerate(kv.float()):
        keys, values = (t.permute(1, 0, 2).unsqueeze(0).contiguous() for t in layer_kv)
        cache.update(keys, values, layer)
    num_prompt = kv.shape[2]
    inputs = torch.tensor([continuation[:-1]])
    positions = torch.arange(num_prompt, num_prompt + inputs.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        logits = model(
            input_ids=inputs, past_key_values=cache, position_ids=positions, use_cache=True
        ).logits[0]
    return _scores(logits, continuation[1:]), logits


def _scores(logits: torch.Tensor, targets: list[int]) -> Scores:
    logprobs = torch.log_softmax(logits.float(), dim=-1)[
        torch.arange(len(targets)), torch.tensor(targets)
    ]
    return Scores(top1=logits.argmax(dim=-1).tolist(), logprobs=logprobs.tolist())


def full_forward_logits(model: Any, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """HF computing every KV itself: the logits of the continuation positions, for the check."""
    ids = torch.tensor([prompt_ids + continuation[:-1]])
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) :]


def first_difference(reference: list[int], tokens: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(reference, tokens, strict=True)) if a != b), None)


def relative_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    """RMS error over RMS value, K and V together."""
    original = original.float()
    return float((decoded.float() - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt())


def measure_prompt(
    llm: LLM, model: Any, codecs: list[KVCodec], handoff: KVHandoff, params: SamplingParams
) -> dict[str, Any]:
    """Every codec against the uncompressed handoff on one prompt (see the module docstring)."""
    assert handoff.is_complete, "a complete handoff carries the whole prompt's KV"
    variants = {REFERENCE: handoff.kv}
    variants.update({codec.name: through_codec(codec, handoff.kv) for codec in codecs})
    started = time.perf_counter()
    continuations = decode_together(
        llm, {name: replace(handoff, kv=kv) for name, kv in variants.items()}, params
    )
    reference = continuations[REFERENCE]
    assert reference[0] == handoff.first_tokens[0].token_id, "outputs start with the handoff's"
    decoded = time.perf_counter()

    reference_scores, logits = teacher_forced(model, handoff.kv, reference)
    full_logits = full_forward_logits(model, handoff.prompt_token_ids, reference)
    row: dict[str, Any] = {
        "prompt_tokens": len(handoff.prompt_token_ids),
        "plumbing": {
            "hf_top1_vs_pdserve_greedy": _agreement(reference_scores.top1, reference[1:]),
            "max_abs_logit_diff_vs_full_forward": float((logits - full_logits).abs().max()),
        },
        "codecs": {},
    }
    for codec in codecs:
        scores, _ = teacher_forced(model, variants[codec.name], reference)
        row["codecs"][codec.name] = {
            "first_difference": first_difference(reference[1:], continuations[codec.name][1:]),
            "teacher_forced_agreement": _agreement(scores.top1, reference[1:]),
            "delta_mean_loglik": statistics.fmean(scores.logprobs)
            - statistics.fmean(reference_scores.logprobs),
            "kv_relative_error": relative_error(handoff.kv, variants[codec.name]),
        }
    row["seconds"] = {"decode": decoded - started, "hf": time.perf_counter() - decoded}
    return row


def _agreement(predicted: list[int], reference: list[int]) -> int:
    return sum(a == b for a, b in zip(predicted, reference, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 short prompts, 3 timing repeats")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.perf_counter()
    checkpoint = load_checkpoint(None, show_progress=False)
    config = EngineConfig(
        model=ModelConfig(dtype="float32"),
        # Six copies of the long prompt's KV at once; no prefix cache, so every import uses its own KV.
        cache=CacheConfig(memory_bytes=1 << 30, enable_prefix_caching=False),
        show_progress=False,
    )
    llm = LLM(config=config, checkpoint=checkpoint)
    log(f"loading the HF reference model ({time.perf_counter() - started:.0f} s so far)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = load_reference_model()
    codecs = [get_codec(name) for name in CODEC_NAMES]
    params = SamplingParams(max_tokens=1 + NEW_TOKENS, ignore_eos=True)

    # ---- cost on a 2,048-token KV ---------------------------------------------------------
    long_ids = llm.tokenizer.encode(long_prompt())
    log(f"prefilling the long prompt ({len(long_ids)} tokens) for the timing KV")
    long_handoff = llm.prefill_only(long_ids, params)
    timing_kv = long_handoff.kv
    while timing_kv.shape[2] < TIMING_TOKENS:
        timing_kv = torch.cat([timing_kv, timing_kv], dim=2)
    timing_kv = timing_kv[:, :, :TIMING_TOKENS].contiguous()  # [30, 2, 2048, 3, 64] float32
    num_layers, _, _, num_kv_heads, head_dim = timing_kv.shape
    per_token_shape = (2, 1, num_kv_heads, head_dim)
    # One thread: the cost a connector's transfer thread pays beside a busy engine (and figures
    # that stay put on a shared 2-core machine, where two OpenMP threads contend with others).
    engine_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    costs: dict[str, dict[str, float]] = {}
    for codec in codecs:
        encode_ms, decode_ms = time_codec(codec, timing_kv, repeats=3 if args.quick else 11)
        costs[codec.name] = {
            "bytes_per_token": num_layers * codec.encoded_nbytes(per_token_shape, timing_kv.dtype),
            "encode_ms": encode_ms,
            "decode_ms": decode_ms,
        }
        log(
            f"{codec.name}: encode {encode_ms:.1f} ms, decode {decode_ms:.1f} ms "
            f"for {TIMING_TOKENS} tokens"
        )
    torch.set_num_threads(engine_threads)

    # ---- quality ----------------------------------------------------------------------------
    prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    prompts += [llm.chat_prompt_ids(CHAT_MESSAGES), long_ids]
    if args.quick:
        prompts = prompts[:2]
    rows: list[dict[str, Any]] = []
    for number, prompt_ids in enumerate(prompts):
        log(
            f"prompt {number + 1}/{len(prompts)} ({len(prompt_ids)} tokens), "
            f"{time.perf_counter() - started:.0f} s so far"
        )
        handoff = long_handoff if prompt_ids is long_ids else llm.prefill_only(prompt_ids, params)
        row = {"prompt": number, **measure_prompt(llm, model, codecs, handoff, params)}
        rows.append(row)
        plumbing, seconds = row["plumbing"], row["seconds"]
        log(
            f"  decode {seconds['decode']:.1f} s, HF {seconds['hf']:.1f} s; plumbing: HF top-1 = "
            f"pdserve greedy at {plumbing['hf_top1_vs_pdserve_greedy']}/{NEW_TOKENS}, logits vs "
            f"full forward {plumbing['max_abs_logit_diff_vs_full_forward']:.1e}; teacher-forced: "
            + ", ".join(
                f"{n} {c['teacher_forced_agreement']}/{NEW_TOKENS}"
                for n, c in row["codecs"].items()
            )
        )
    llm.close()

    summary = summarize(rows, costs)
    lines = table(summary, rows)
    print("\n".join(lines))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = "codec_quality_quick" if args.quick else "codec_quality"
    (args.output_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    report = {
        "date": datetime.date.today().isoformat(),
        "model": resolve_model_path(None, show_progress=False).name,
        "compute_dtype": "float32",
        "kv_dtype": str(timing_kv.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "codec_timing_threads": 1,
        "new_tokens": NEW_TOKENS,
        "timing_tokens": TIMING_TOKENS,
        "codecs": summary,
        "prompts": rows,
        "seconds": time.perf_counter() - started,
    }
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    log(f"done in {report['seconds']:.0f} s; wrote {args.output_dir / stem}.json and .txt")
    return 0


def summarize(
    rows: list[dict[str, Any]], costs: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    bf16_bytes = costs["bf16"]["bytes_per_token"]
    summary = {}
    for name, cost in costs.items():
        per_prompt = [row["codecs"][name] for row in rows]
        prefixes = [
            NEW_TOKENS if c["first_difference"] is None else c["first_difference"]
            for c in per_prompt
        ]
        summary[name] = {
            **cost,
            "ratio_vs_bf16": cost["bytes_per_token"] / bf16_bytes,
            "teacher_forced_agreement": sum(c["teacher_forced_agreement"] for c in per_prompt)
            / (NEW_TOKENS * len(rows)),
            "first_difference_median": statistics.median(prefixes),
            "first_difference_min": min(prefixes),
            "prompts_identical": sum(c["first_difference"] is None for c in per_prompt),
            "delta_mean_loglik": statistics.fmean(c["delta_mean_loglik"] for c in per_prompt),
            "kv_relative_error": statistics.fmean(c["kv_relative_error"] for c in per_prompt),
        }
    return summary


def table(summary: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    num_prompts = len(rows)
    plumbing_agree = sum(r["plumbing"]["hf_top1_vs_pdserve_greedy"] for r in rows)
    plumbing_diff = max(r["plumbing"]["max_abs_logit_diff_vs_full_forward"] for r in rows)
    lines = [
        f"KV codecs on SmolLM2-135M float32: {num_prompts} prompts, {NEW_TOKENS} tokens decoded after the "
        f"handoff's first token; cost: all layers of a {TIMING_TOKENS}-token KV, 1 thread, median",
        f"plumbing check (uncompressed KV): HF teacher-forced top-1 = pdserve greedy at "
        f"{plumbing_agree}/{NEW_TOKENS * num_prompts} positions; HF logits over the handed-off KV vs "
        f"its own full forward: max |diff| {plumbing_diff:.1e}",
        "",
        "| codec | bytes/token | vs bf16 | encode ms | decode ms | KV rel. error | teacher-forced top-1 "
        "| first difference median / min | prompts identical | Δ mean log-lik |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['bytes_per_token']:,} | {s['ratio_vs_bf16']:.3f} | {s['encode_ms']:.1f} "
            f"| {s['decode_ms']:.1f} | {s['kv_relative_error']:.1e} | {s['teacher_forced_agreement']:.1%} "
            f"| {_position(s['first_difference_median'])} / {_position(s['first_difference_min'])} "
            f"| {s['prompts_identical']}/{num_prompts} | {s['delta_mean_loglik']:+.4f} |"
        )
    int8 = summary["int8"]
    met = int8["ratio_vs_bf16"] <= 0.55 and int8["teacher_forced_agreement"] >= 0.95
    lines += [
        "",
        f"first difference: index among the {NEW_TOKENS} tokens ('none' = identical throughout); "
        "Δ mean log-lik: of the reference tokens, vs the uncompressed KV (negative = less likely).",
        f"target (int8 about half of bf16's bytes, >= 95% greedy-token agreement): "
        f"{'met' if met else 'NOT met'} — {int8['ratio_vs_bf16']:.3f} of bf16's bytes, "
        f"{int8['teacher_forced_agreement']:.1%} teacher-forced top-1 agreement",
    ]
    return lines


def _position(value: float) -> str:
    return "none" if value >= NEW_TOKENS else f"{value:g}"


if __name__ == "__main__":
    sys.exit(main())
