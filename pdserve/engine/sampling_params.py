"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (as vLLM does): dividing logits by them overflows."""
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""Penalties outside it only overflow or flatten the logits; within it every logit stays finite."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Defaults are greedy decoding of up to 16 tokens."""

    max_tokens: int = 16
    """Most tokens to generate per choice."""
    min_tokens: int = 0
    """Stop tokens and stop strings are ignored until this many tokens were generated."""
    temperature: float = 0.0
    """0 (or anything below ``GREEDY_BELOW``) means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Makes sampling reproducible: randomness depends only on (seed, choice index, position)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted per occurrence from the logit of generated tokens."""
    repetition_penalty: float = 1.0
    """CTRL/HF-style: divides positive (multiplies negative) logits of prompt and output tokens."""
    stop: tuple[str, ...] = ()
    """Generation ends when the text contains one of these; the stop string is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (the model's EOS ids always do unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use this to fix output lengths)."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0 = sampled only)."""
    n: int = 1
    """Number of choices; they share the prompt's KV blocks."""
    skip_special_tokens: bool = True
    """Leave special tokens (e.g. <|im_end|>) out of the detokenized text."""
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    """Reserved for callers' bookkeeping; never read by the engine."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables), got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (low <= self.repetition_penalty <= high,
             f"repetition_penalty must be in [{low}, {high}], got {self.repetition_penalty}"),
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be between 0 and 20, got {self.logprobs}",
            ),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
