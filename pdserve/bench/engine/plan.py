"""What one engine benchmark run measures (``BenchPlan``), and the prompts both sides time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

_MIN_PROMPT_TOKEN_ID = 1000
"""Random prompts draw ids above the special tokens, which sit at the start of the vocabulary."""


@dataclass(frozen=True)
class BenchPlan:
    """What one run measures; both sides get the same plan (as JSON)."""

    model_path: str
    """The resolved GGUF file or Hugging Face directory, so both sides load the same weights."""
    dtype: str
    """Our engine's dtype (``--dtype``). HF runs float32 throughout, plus bfloat16 prefill."""
    weight_format: str
    """Our engine's projection weights (``--weight-format``): dense, int8 or int4."""
    device: str
    num_threads: int
    quick: bool
    """A smoke run: fewer repeats, batches 1 and 8, 512-token prompts only."""
    prefill_lengths: tuple[int, ...]
    num_prefill_repeats: int
    """Timed prefills per length, each on a distinct prompt, after one untimed warmup."""
    batch_sizes: tuple[int, ...]
    context_length: int
    """Prompt tokens of every decode request: decode steps run over contexts of this length."""
    num_warmup_steps: int
    num_decode_steps: int
    """Timed decode steps per batch size (each step yields batch-size tokens)."""
    hf_bf16_prefill_lengths: tuple[int, ...]
    num_hf_bf16_repeats: int
    attention: str = "auto"
    """Our engine's decode attention (``--attention``): auto, native or torch."""
    large_batch_float32: bool = True
    """Our engine's float32 copies for large batches (``--[no-]large-batch-float32``)."""

    @classmethod
    def create(
        cls, model_path: str, dtype: str, weight_format: str, device: str, num_threads: int, quick: bool,
        attention: str = "auto", large_batch_float32: bool = True,
    ) -> BenchPlan:
        if quick:
            return cls(
                model_path, dtype, weight_format, device, num_threads, quick,
                prefill_lengths=(512,), num_prefill_repeats=2, batch_sizes=(1, 8),
                context_length=512, num_warmup_steps=2, num_decode_steps=8,
                hf_bf16_prefill_lengths=(512,), num_hf_bf16_repeats=1, attention=attention,
                large_batch_float32=large_batch_float32,
            )  # fmt: skip
        return cls(
            model_path, dtype, weight_format, device, num_threads, quick,
            prefill_lengths=(512, 2048), num_prefill_repeats=3, batch_sizes=(1, 8, 32, 64),
            context_length=512, num_warmup_steps=3, num_decode_steps=20,
            hf_bf16_prefill_lengths=(2048,), num_hf_bf16_repeats=2, attention=attention,
            large_batch_float32=large_batch_float32,
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchPlan:
        data = json.loads(text)
        for key in ("prefill_lengths", "batch_sizes", "hf_bf16_prefill_lengths"):
            data[key] = tuple(data[key])
        return cls(**data)


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """A random prompt; distinct seeds give distinct prompts, so no prefix is ever shared."""
    generator = torch.Generator().manual_seed(seed)
    low = min(_MIN_PROMPT_TOKEN_ID, vocab_size // 2)
    return torch.randint(low, vocab_size, (length,), generator=generator).tolist()


def prefill_seed(length: int, repeat: int) -> int:
    return 10_000 * length + repeat


def decode_seed(batch_size: int, row: int) -> int:
    return 100_000_000 + 10_000 * batch_size + row

