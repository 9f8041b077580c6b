"""Calibration: time controlled steps of the real engine (the roofline is fitted to them in roofline_fit.py).

``measure_samples(engine, plan)`` drives an idle ``LLMEngine`` through steps whose work it
chooses, one kind of step per *point*, each timed ``repeats`` times (wall clock around
``engine.step()``: scheduling, the forward pass, sampling and detokenization, everything a
serving loop pays per step):

- prefill ``(n, 0)``: a fresh prompt of n random tokens, ``max_tokens=1``, alone in its step;
- prefill ``(n, s)``: a prefix of s tokens is prefilled (untimed) unless still in the prefix
  cache, then each repeat sends that prefix plus n fresh tokens: a continuation chunk of n
  after s cached (s must be a multiple of the KV block size, the prefix cache's granularity);
- decode ``(batch, context)``: one real prefill of context - 1 tokens exports its KV
  (``prefill_only``), ``import_kv`` adopts ``batch`` copies of it (distinct blocks, as distinct
  requests would have) and the engine decodes them: one warm-up step, then the timed ones;
- mixed ``(batch, context, n)``: the same decodes plus a fresh n-token prompt in each timed step.

What a step did is read from the engine's own step counters (engine/step_counters.py), the
difference around each step, not assumed from the plan: the plan says what should happen, the
counters say what did (a prefix evicted from the cache shows up as a smaller cached length,
for instance). A calibration step has at most one prompt chunk, so its (new, cached) pair is
recovered exactly from the counted tokens and attention pairs; its decodes all share one
context (they are copies of one template), which the counted context sum divided by the count
gives. A step whose counted work contradicts the plan (a different number of prompt tokens or
decodes) is an error: the engine's scheduler limits are too small for the plan.

Each point becomes one sample: the median repeat (the lower median for an even count), with
that repeat's own work. Points run cheapest-first, taking prefill, decode and mixed points in
turn, so a run cut short by ``time_budget_s`` still has every kind of step.
"""

from __future__ import annotations

import math
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from pdserve.engine.block_manager import hash_full_blocks
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.planner.calibrate.step_profile import StepSample

if TYPE_CHECKING:
    from pdserve.engine.handoff import KVHandoff
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.outputs import RequestOutput


@dataclass(frozen=True)
class CalibrationPlan:
    """Which steps to time, how often, and for how long at most."""

    prefill_points: tuple[tuple[int, int], ...]
    """(new tokens, cached tokens) of pure prompt steps."""
    decode_points: tuple[tuple[int, int], ...]
    """(batch size, context length of the first decode) of pure decode steps."""
    mixed_points: tuple[tuple[int, int, int], ...] = ()
    """(decode batch, decode context, prompt tokens) in one step."""
    repeats: int = 3
    """Timed repeats per point; the sample is their median."""
    time_budget_s: float = 300.0
    """Points not started by then are skipped (with a note on stderr)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if not self.time_budget_s > 0:
            raise ValueError("time_budget_s must be positive")
        for n, s in self.prefill_points:
            if n < 1 or s < 0:
                raise ValueError(f"prefill point needs new >= 1 and cached >= 0, got {(n, s)}")
        for batch, context, *rest in (*self.decode_points, *self.mixed_points):
            if batch < 1 or context < 2 or any(n < 1 for n in rest):
                raise ValueError(f"decode/mixed point needs batch >= 1, context >= 2, prompt >= 1: "
                                 f"{(batch, context, *rest)}")

    def max_step_tokens(self) -> int:
        """The scheduler's token budget this plan needs (a prompt is never chunked)."""
        return max([n for n, _ in self.prefill_points] + [b for b, _ in self.decode_points]
                   + [b + n for b, _, n in self.mixed_points] + [1])

    def max_batch(self) -> int:
        return max([b for b, _ in self.decode_points] + [b for b, _, _ in self.mixed_points] + [1])

    def max_context(self) -> int:
        """The longest sequence any point builds."""
        return max([n + s for n, s in self.prefill_points]
                   + [c + self.repeats + 4 for _, c, *_ in (*self.decode_points, *self.mixed_points)] + [1])

    def kv_blocks_needed(self, block_size: int) -> int:
        """KV blocks for the largest point, plus every continuation prefix kept in the cache."""
        def blocks(tokens: int) -> int:
            return math.ceil(tokens / block_size)

        prefixes = sum(blocks(s) for s in {s for _, s in self.prefill_points if s})
        prefill = max([blocks(n + s + 1) for n, s in self.prefill_points] + [0])
        decode = max([b * blocks(c + self.repeats + 4) for b, c in self.decode_points] + [0])
        mixed = max([b * blocks(c + self.repeats + 4) + blocks(n + 1) for b, c, n in self.mixed_points] + [0])
        return prefixes + max(prefill, decode, mixed) + 16

    def engine_config(self, model: ModelConfig, block_size: int = 16) -> EngineConfig:
        """An engine able to run this plan: KV blocks, token budget and sequence limit to fit."""
        return EngineConfig(
            model=model,
            cache=CacheConfig(block_size=block_size, num_blocks=self.kv_blocks_needed(block_size)),
            scheduler=SchedulerConfig(max_num_batched_tokens=self.max_step_tokens(),
                                      max_num_seqs=self.max_batch() + 2),
            show_progress=False,
        )


def _decode_grid(batches: Sequence[int], contexts: Sequence[int], max_tokens: int) -> tuple[tuple[int, int], ...]:
    # Serving's default 512 MiB KV pool holds ~11.6k tokens of SmolLM2 in float32, so a real
    # decode batch never reads much more than that; points beyond it would only cost time.
    return tuple((b, c) for c in contexts for b in batches if b * c <= max_tokens)


STANDARD_PLAN = CalibrationPlan(
    prefill_points=((16, 0), (32, 0), (64, 0), (128, 0), (256, 0), (512, 0), (1024, 0), (2048, 0),
                    (16, 512), (128, 512), (16, 1024), (256, 1024), (16, 2048), (512, 2048)),
    decode_points=_decode_grid((1, 2, 4, 8, 16, 32, 64), (128, 512, 1024, 2048), 16384),
    mixed_points=((4, 512, 256), (8, 512, 64), (16, 128, 128), (32, 512, 32), (8, 1024, 512)),
    repeats=3,
    time_budget_s=300.0,
)
"""About 2-3 minutes at 1 thread on this project's machine (bounded at 5)."""

QUICK_PLAN = CalibrationPlan(
    prefill_points=((16, 0), (64, 0), (256, 0), (1024, 0), (64, 512), (16, 1024)),
    decode_points=_decode_grid((1, 4, 16, 64), (128, 1024), 16384),
    mixed_points=((4, 512, 128), (16, 128, 64)),
    repeats=3,
    time_budget_s=75.0,
)
"""About a minute."""


# -- driving the engine --------------------------------------------------------------------------

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"[calibrate {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Observed:
    """One timed step as the step counters saw it."""

    seconds: float
    prefill_chunks: tuple[tuple[int, int], ...]
    decode_contexts: tuple[int, ...]


def measure_samples(engine: LLMEngine, plan: CalibrationPlan, log: Log | None = None) -> list[StepSample]:
    """Time the plan's steps on an idle engine (see the module docstring); progress on stderr."""
    return _Calibrator(engine, plan, log or _stderr).run()


class _Calibrator:
    def __init__(self, engine: LLMEngine, plan: CalibrationPlan, log: Log) -> None:
        self.engine, self.plan, self.log = engine, plan, log
        self.rng = random.Random(0)
        self.templates: dict[int, KVHandoff] = {}
        self.prefixes: dict[int, tuple[str, list[int]]] = {}
        _check_engine(engine, plan)

    def run(self) -> list[StepSample]:
        self._warm_up()
        deadline = time.monotonic() + self.plan.time_budget_s
        queues: list[list[Callable[[], StepSample]]] = [
            [partial(self._prefill, n, s) for n, s in sorted(self.plan.prefill_points, key=sum)],
            [partial(self._decode, b, c) for b, c in sorted(self.plan.decode_points, key=lambda p: p[0] * p[1])],
            [partial(self._mixed, b, c, n)
             for b, c, n in sorted(self.plan.mixed_points, key=lambda p: p[0] * p[1] + p[2])],
        ]
        order = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]
        samples: list[StepSample] = []
        for index, point in enumerate(order):
            if time.monotonic() > deadline:
                self.log(f"time budget of {self.plan.time_budget_s:.0f} s spent: "
                         f"skipped the last {len(order) - index} of {len(order)} points")
                break
            sample = point()
            samples.append(sample)
            self.log(f"[{index + 1}/{len(order)}] {_describe(sample)}: {sample.seconds * 1000:.1f} ms "
                     f"(median of {len(sample.timings_s)})")
        return samples

    # -- points ------------------------------------------------------------------------------

    def _prefill(self, new_tokens: int, cached: int) -> StepSample:
        salt, prefix = self._prefix(cached) if cached else ("", [])
        timings = []
        for _ in range(self.plan.repeats):
            self._add_prompt(prefix + self._tokens(new_tokens), salt or None)
            timings.append(self._step(expect_prefill=new_tokens, expect_decodes=0))
            self._drain()
        return _median_sample(timings)

    def _decode(self, batch: int, context: int) -> StepSample:
        request_ids = self._import_batch(batch, context)
        timings = [self._step(expect_prefill=0, expect_decodes=batch) for _ in range(self.plan.repeats)]
        self._abort(request_ids)
        return _median_sample(timings)

    def _mixed(self, batch: int, context: int, new_tokens: int) -> StepSample:
        request_ids = self._import_batch(batch, context)
        timings = []
        for _ in range(self.plan.repeats):
            self._add_prompt(self._tokens(new_tokens), None)
            timings.append(self._step(expect_prefill=new_tokens, expect_decodes=batch))
        self._abort(request_ids)
        return _median_sample(timings)

    # -- helpers -----------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Untimed: lazy initialisation, thread pools, allocator caches."""
        self._add_prompt(self._tokens(64), None)
        self._drain()
        self._abort(self._import_batch(2, 64))

    def _tokens(self, count: int) -> list[int]:
        # Random ids: timing does not depend on the text, and distinct prompts never share
        # prefix-cache blocks by accident. Ids 0-15 hold the special tokens of most vocabularies.
        return [self.rng.randrange(16, self.engine.architecture.vocab_size) for _ in range(count)]

    def _add_prompt(self, token_ids: list[int], cache_salt: str | None, prefill_only: bool = False) -> None:
        # A fresh salt per prompt unless given: only a continuation may hit the prefix cache.
        self.engine.add_request(token_ids, SamplingParams(max_tokens=1), f"calibrate-{uuid.uuid4().hex}",
                                cache_salt=cache_salt or uuid.uuid4().hex, prefill_only=prefill_only)

    def _prefix(self, cached: int) -> tuple[str, list[int]]:
        """A prompt of ``cached`` tokens whose blocks are in the prefix cache now (prefilled
        again when another point's blocks evicted them since)."""
        blocks = self.engine.block_manager
        if cached % blocks.block_size:
            raise ValueError(f"cached length {cached} is not a multiple of the KV block size {blocks.block_size}")
        salt, tokens = self.prefixes.setdefault(cached, (f"calibrate-prefix-{cached}", self._tokens(cached)))
        hits = blocks.find_cached_prefix(hash_full_blocks(tokens, blocks.block_size, salt), max_tokens=cached)
        if len(hits) * blocks.block_size < cached:
            self._add_prompt(tokens, salt)
            self._drain()
        return salt, tokens

    def _template(self, context: int) -> KVHandoff:
        """The KV of a (context - 1)-token prompt: its first decode has ``context`` positions."""
        if context not in self.templates:
            self._add_prompt(self._tokens(context - 1), None, prefill_only=True)
            handoffs = [out.handoff for out in self._drain() if out.handoff is not None]
            self.templates[context] = handoffs[0]
        return self.templates[context]

    def _import_batch(self, batch: int, context: int) -> list[str]:
        """``batch`` running copies of a template, after one untimed warm-up decode step."""
        template = self._template(context)
        # Enough tokens that no copy finishes during the point: first + warm-up + repeats.
        params = SamplingParams(max_tokens=self.plan.repeats + 4, ignore_eos=True)
        request_ids = [
            self.engine.import_kv(template, params, f"calibrate-{uuid.uuid4().hex}", cache_salt=uuid.uuid4().hex)
            for _ in range(batch)
        ]
        self._step(expect_prefill=0, expect_decodes=batch)
        return request_ids

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id, report=False)
        self._drain()

    def _drain(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while self.engine.has_unfinished_requests():
            outputs.extend(self.engine.step())
        return outputs

    def _step(self, expect_prefill: int, expect_decodes: int) -> _Observed:
        counters = self.engine.step_counters
        before = _work_totals(counters.snapshot())
        started = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - started
        observed = _observe(seconds, before, _work_totals(counters.snapshot()))
        prompt_tokens = sum(n for n, _ in observed.prefill_chunks)
        if prompt_tokens != expect_prefill or len(observed.decode_contexts) != expect_decodes:
            raise RuntimeError(
                f"the engine ran {prompt_tokens} prompt tokens and {len(observed.decode_contexts)} decodes in a "
                f"step planned with {expect_prefill} and {expect_decodes}: are its scheduler limits too small?")
        return observed


def _check_engine(engine: LLMEngine, plan: CalibrationPlan) -> None:
    if engine.has_unfinished_requests():
        raise ValueError("calibration needs an idle engine (no request in flight)")
    scheduler, blocks = engine.config.scheduler, engine.block_manager
    needs = {
        "max_num_batched_tokens": (scheduler.max_num_batched_tokens, plan.max_step_tokens()),
        "max_num_seqs": (scheduler.max_num_seqs, plan.max_batch() + 1),
        "KV blocks": (blocks.num_blocks, plan.kv_blocks_needed(blocks.block_size)),
        "max_model_len": (engine.max_model_len, plan.max_context() + 1),
    }
    short = [f"{name} {have} < {need}" for name, (have, need) in needs.items() if have < need]
    if short:
        raise ValueError(f"the engine is too small for this calibration plan ({', '.join(short)}); "
                         "build it with CalibrationPlan.engine_config")


def _work_totals(snapshot: dict[str, dict[str, float]]) -> list[int]:
    """[prompt tokens, prompt attention pairs, decode tokens, decode context tokens], all kinds summed."""
    keys = ("prefill_tokens", "prefill_attention_pairs", "decode_tokens", "decode_context_tokens")
    return [int(sum(work[key] for work in snapshot.values())) for key in keys]


def _observe(seconds: float, before: Sequence[int], after: Sequence[int]) -> _Observed:
    new, pairs, decodes, context_sum = (a - b for a, b in zip(after, before, strict=True))
    chunks: tuple[tuple[int, int], ...] = ()
    if new:
        # pairs = n*s + n(n+1)/2 for one chunk of n new tokens after s cached.
        cached, remainder = divmod(pairs - new * (new + 1) // 2, new)
        if remainder or cached < 0:
            raise RuntimeError(f"{new} prompt tokens with {pairs} attention pairs are not one chunk")
        chunks = ((new, cached),)
    base, extra = divmod(context_sum, decodes) if decodes else (0, 0)
    # The decodes of a calibration step are copies of one template, hence one shared context
    # (extra is 0); decode cost is linear in each context, so an even split loses nothing anyway.
    contexts = (base + 1,) * extra + (base,) * (decodes - extra)
    return _Observed(seconds, chunks, contexts)


def _median_sample(timings: Sequence[_Observed]) -> StepSample:
    ranked = sorted(timings, key=lambda t: t.seconds)
    middle = ranked[(len(ranked) - 1) // 2]
    return StepSample(middle.prefill_chunks, middle.decode_contexts, middle.seconds,
                      tuple(t.seconds for t in timings))


def _describe(sample: StepSample) -> str:
    parts = [f"prefill {n} after {s}" for n, s in sample.prefill_chunks]
    if sample.decode_contexts:
        parts.append(f"decode x{len(sample.decode_contexts)} at context {sample.decode_contexts[0]}")
    return " + ".join(parts)
