"""A roofline cost model of one engine step: (model, accelerator, dtype, tensor parallelism) -> seconds.

A step pushes T new tokens through the model (prefill chunks and one token per decoding
sequence). On each of the ``tp`` GPUs of a tensor-parallel group it

  computes  F = [2 * layer_matmul_params * T + 2 * lm_head_params * S + attention FLOPs] / tp
            (S = sequences in the step: one row of logits each; attention per model.attention_flops)
  reads     B = matmul_params * dtype_bytes / tp          (every weight once per step)
              + kv_tokens * kv_bytes_per_token_per_gpu    (cached K/V read, new K/V written)

and takes

  step = max(F / (peak_flops * compute_eff), B / (memory_bw * bandwidth_eff))
         + communication + step_overhead_s

where, for tp > 1, communication is two all-reduces per layer (after attention and after the
MLP) of T * hidden * dtype_bytes each; a ring all-reduce sends 2 * (tp - 1) / tp of the message
per GPU over the intra-node link, plus a fixed latency per all-reduce. Communication is not
overlapped with compute, which is close to what eager tensor-parallel engines do.

Ignored on purpose (small at serving batch sizes, or folded into the efficiencies by
calibration): activation traffic, softmax/norm/rotary FLOPs, the vocab-parallel logits gather,
kernel-launch effects beyond the fixed overhead. With 2-byte weights a step does about T FLOPs
per weight byte, so decode stays memory-bound until T nears the ridge point peak_flops /
memory_bw (295 on an H100, before the efficiencies and KV reads move it); prefill is compute-bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.planner.catalogue.hardware import Accelerator
from pdserve.planner.catalogue.models import ModelSpec, dtype_bytes


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks an engine achieves; calibration fits them later."""

    compute: float = 0.6
    """Of peak dense FLOP/s: large prefill matmuls reach 60-80% in tuned engines, attention less."""
    bandwidth: float = 0.8
    """Of peak memory bandwidth: streaming weight and KV reads reach roughly 80-90%."""
    step_overhead_s: float = 1e-3
    """Fixed cost per step (scheduling, sampling, launches): order of a millisecond on a GPU
    engine; a guess until calibrated (this project's eager CPU engine is far above it)."""
    link: float = 0.7
    """Of a link's peak bandwidth: NCCL-style all-reduces and KV transfers."""
    allreduce_latency_s: float = 10e-6
    """Fixed latency of one all-reduce, which dominates the small messages of decode steps."""

    def __post_init__(self) -> None:
        for key in ("compute", "bandwidth", "link"):
            value = getattr(self, key)
            if not (0 < value <= 1):
                raise ValueError(f"efficiency {key} must be in (0, 1], got {value!r}")
        for key in ("step_overhead_s", "allreduce_latency_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class StepTime:
    """One step's time by component (seconds); ``total`` is what a step costs."""

    compute_s: float
    memory_s: float
    communication_s: float
    overhead_s: float

    @property
    def total(self) -> float:
        return max(self.compute_s, self.memory_s) + self.communication_s + self.overhead_s

    @property
    def bound(self) -> str:
        """What limits the step: "compute" or "memory"."""
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class _StepWork:
    """What one step does, summed over its sequences."""

    num_tokens: int
    """New tokens through the decoder layers."""
    num_sequences: int
    """Sequences in the step: rows of logits through the output projection."""
    attention_flops: int
    kv_tokens: int
    """Tokens whose K/V the step reads (cached) or writes (new)."""


_EMPTY_STEP = StepTime(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RooflineCostModel:
    """Step times of ``model`` on ``tensor_parallel`` GPUs of ``hardware``; a StepCostModel."""

    model: ModelSpec
    hardware: Accelerator
    dtype: str = "bfloat16"
    """Weights and activations."""
    kv_dtype: str | None = None
    """KV cache; None means the same as dtype."""
    tensor_parallel: int = 1
    efficiency: Efficiency = field(default_factory=Efficiency)

    def __post_init__(self) -> None:
        dtype_bytes(self.dtype)
        dtype_bytes(self.cache_dtype)
        tp = self.tensor_parallel
        if tp < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
        if tp > self.hardware.gpus_per_node:
            raise ValueError(
                f"tensor_parallel {tp} exceeds the {self.hardware.gpus_per_node} GPUs of one "
                f"{self.hardware.name} node (tensor parallelism stays inside a node)"
            )
        if self.model.num_heads % tp:
            raise ValueError(f"{self.model.name}: {self.model.num_heads} heads do not split over {tp=}")
        kv_heads = self.model.num_kv_heads
        # Fewer KV heads than GPUs: each GPU keeps a replica of one KV head (as vLLM does).
        if (kv_heads >= tp and kv_heads % tp) or (kv_heads < tp and tp % kv_heads):
            raise ValueError(f"{self.model.name}: {kv_heads} KV heads do not split over {tp=}")

    @property
    def cache_dtype(self) -> str:
        return self.kv_dtype or self.dtype

    # Memory.

    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token in the whole model (what a transfer moves)."""
        return self.model.kv_bytes_per_token(self.cache_dtype)

    def kv_bytes_per_token_per_gpu(self) -> int:
        """KV bytes of one token on each GPU of the group (KV heads split, or replicated when
        there are fewer KV heads than GPUs)."""
        model = self.model
        kv_heads_per_gpu = math.ceil(model.num_kv_heads / self.tensor_parallel)
        return 2 * model.num_layers * kv_heads_per_gpu * model.head_dim * dtype_bytes(self.cache_dtype)

    def weight_bytes_per_gpu(self) -> float:
        # Layers split by heads and MLP columns, embeddings and output projection by vocabulary;
        # the replicated norms are a rounding error.
        return self.model.weight_bytes(self.dtype) / self.tensor_parallel

    def max_kv_tokens(self, memory_fraction: float = 0.9) -> int:
        """Tokens of KV that fit beside the weights in ``memory_fraction`` of each GPU (0 if none)."""
        if not (0 < memory_fraction <= 1):
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        free = self.hardware.memory_bytes * memory_fraction - self.weight_bytes_per_gpu()
        return max(0, math.floor(free / self.kv_bytes_per_token_per_gpu()))

    # Steps.

    def step_seconds(
        self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]
    ) -> float:
        """One engine step (StepCostModel); an empty step costs nothing (the engine does not run it).

        A decode context counts the token being decoded, as the engine's
        ``ScheduledChunk.context_length`` does.
        """
        return self.step_breakdown(prefill_chunks, decode_contexts).total

    def step_breakdown(
        self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]
    ) -> StepTime:
        """step_seconds by component: compute, memory, communication, overhead."""
        for chunk in prefill_chunks:
            if chunk[0] < 1 or chunk[1] < 0:
                raise ValueError(f"a prefill chunk needs >= 1 new token and context >= 0, got {chunk}")
        if any(context < 1 for context in decode_contexts):
            raise ValueError("decode contexts must be >= 1 (they count the token being decoded)")
        prefill = [self._prefill_work(n, c) for n, c in prefill_chunks]
        decode = self._decode_work(len(decode_contexts), sum(decode_contexts))
        return self._time(_sum_work([*prefill, decode]))

    def prefill_seconds(self, num_tokens: int, context_tokens: int = 0) -> float:
        """One step prefilling ``num_tokens`` after ``context_tokens`` already cached."""
        return self.step_seconds([(num_tokens, context_tokens)], [])

    def decode_step_seconds(self, batch_size: int, total_context_tokens: int) -> float:
        """One step decoding a token for each of ``batch_size`` sequences whose contexts sum
        to ``total_context_tokens`` (decode cost is linear in each context, so the sum suffices)."""
        if batch_size < 0 or total_context_tokens < batch_size:
            raise ValueError("need batch_size >= 0 and total_context_tokens >= batch_size")
        return self._time(self._decode_work(batch_size, total_context_tokens)).total

    def mixed_step_seconds(
        self, num_prefill_tokens: int, prefill_context: int, num_decode_seqs: int, decode_context: int
    ) -> float:
        """A colocated step: one prefill chunk plus decodes (``decode_context``: their contexts' sum)."""
        counts = (num_prefill_tokens, prefill_context, num_decode_seqs)
        if min(counts) < 0 or decode_context < num_decode_seqs:
            raise ValueError("counts must be >= 0 and decode_context >= num_decode_seqs")
        parts = [self._decode_work(num_decode_seqs, decode_context)]
        if num_prefill_tokens:
            parts.append(self._prefill_work(num_prefill_tokens, prefill_context))
        return self._time(_sum_work(parts)).total

    def transfer_seconds(self, num_tokens: int, link_bytes_per_s: float) -> float:
        """Moving ``num_tokens`` of KV over a link of that peak bandwidth (at the link efficiency)."""
        if num_tokens < 0 or not link_bytes_per_s > 0:
            raise ValueError("num_tokens must be >= 0 and link_bytes_per_s > 0")
        return num_tokens * self.kv_bytes_per_token() / (link_bytes_per_s * self.efficiency.link)

    # Arithmetic.

    def _prefill_work(self, new_tokens: int, context: int) -> _StepWork:
        return _StepWork(
            num_tokens=new_tokens,
            num_sequences=1,
            attention_flops=self.model.attention_flops(new_tokens, context),
            kv_tokens=context + new_tokens,
        )

    def _decode_work(self, num_seqs: int, total_context: int) -> _StepWork:
        # A decode context counts the token being decoded (the engine's context_length): it
        # attends to `context` keys, reads context - 1 cached K/V and writes its own. Both are
        # linear in the context, so the sum over sequences is all that matters.
        per_key = self.model.attention_flops(1, 0)
        return _StepWork(
            num_tokens=num_seqs,
            num_sequences=num_seqs,
            attention_flops=per_key * total_context,
            kv_tokens=total_context,
        )

    def _time(self, work: _StepWork) -> StepTime:
        if work.num_tokens == 0:
            return _EMPTY_STEP
        model, hw, eff, tp = self.model, self.hardware, self.efficiency, self.tensor_parallel
        flops = (
            2 * model.layer_matmul_params() * work.num_tokens
            + 2 * model.lm_head_params() * work.num_sequences
            + work.attention_flops
        ) / tp
        weight_reads = model.matmul_params() * dtype_bytes(self.dtype) / tp
        kv_traffic = work.kv_tokens * self.kv_bytes_per_token_per_gpu()
        communication = 0.0
        if tp > 1:
            message = work.num_tokens * model.hidden_size * dtype_bytes(self.dtype)
            per_allreduce = (2 * (tp - 1) / tp * message / (hw.intra_node_bytes_per_s * eff.link)
                             + eff.allreduce_latency_s)
            communication = 2 * model.num_layers * per_allreduce
        return StepTime(
            compute_s=flops / (hw.peak_flops_per_s * eff.compute),
            memory_s=(weight_reads + kv_traffic) / (hw.memory_bytes_per_s * eff.bandwidth),
            communication_s=communication,
            overhead_s=eff.step_overhead_s,
        )


def _sum_work(parts: Sequence[_StepWork]) -> _StepWork:
    return _StepWork(
        num_tokens=sum(p.num_tokens for p in parts),
        num_sequences=sum(p.num_sequences for p in parts),
        attention_flops=sum(p.attention_flops for p in parts),
        kv_tokens=sum(p.kv_tokens for p in parts),
    )
