"""Named workloads: distributions of input and output lengths, and the prompts that realise them.

Lengths are drawn uniformly from each preset's ranges (in tokens). Prompts are built from a fixed
list of common English words that are one token each in Llama-family tokenizers, so a prompt of
N words is close to N tokens on any of the targets compared; the exact count each server saw is
taken from its ``usage``. Sized for a 2-core CPU running SmolLM2-135M (prefill ~400 tok/s, one
decode stream ~16 tok/s): a request takes seconds, not minutes.

    chat       short in, long out        in 64-256    out 64-192
    code       long in, medium out       in 512-1024  out 64-160
    summarize  very long in, short out   in 1024-1536 out 16-48
    mixed      50% chat, 25% code, 25% summarize
    fixed      every request IN tokens in, OUT out (``--fixed-lengths IN,OUT``), as the "random"
               datasets of other engines' benchmarks, for cross-checks

``--dataset FILE.jsonl`` replaces the synthetic prompts with real ones (one JSON object per line
with a ``prompt``, and optionally ``max_tokens``). ``shared_prefix_tokens`` starts every prompt
with the same "system prompt", as many applications do (prefix caching then pays).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORD_TEXT = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school important"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    input_tokens: LengthRange
    output_tokens: LengthRange


PRESETS: dict[str, Preset] = {
    "chat": Preset("chat", "short in, long out", LengthRange(64, 256), LengthRange(64, 192)),
    "code": Preset("code", "long in, medium out", LengthRange(512, 1024), LengthRange(64, 160)),
    "summarize": Preset("summarize", "very long in, short out", LengthRange(1024, 1536), LengthRange(16, 48)),
}
MIXED = (("chat", 0.5), ("code", 0.25), ("summarize", 0.25))
WORKLOADS = (*PRESETS, "mixed", "fixed")


def fixed_preset(input_tokens: int, output_tokens: int) -> Preset:
    if input_tokens < 1 or output_tokens < 1:
        raise ValueError(f"fixed lengths must be >= 1, got {input_tokens},{output_tokens}")
    return Preset("fixed", f"{input_tokens} in, {output_tokens} out",
                  LengthRange(input_tokens, input_tokens), LengthRange(output_tokens, output_tokens))


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    max_tokens: int
    kind: str
    approx_prompt_tokens: int


def synthetic_requests(workload: str, count: int, seed: int = 0, shared_prefix_tokens: int = 0,
                       fixed: Preset | None = None) -> list[RequestSpec]:
    """``fixed``: the lengths of the ``fixed`` workload (see :func:`fixed_preset`)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    if (workload == "fixed") != (fixed is not None):
        raise ValueError("the fixed workload needs its lengths (--fixed-lengths IN,OUT), and only it takes them")
    rng = random.Random(seed)
    prefix = " ".join(random.Random(seed + 1).choice(_WORDS) for _ in range(shared_prefix_tokens))
    specs = []
    for _ in range(count):
        preset = fixed or PRESETS[pick_kind(rng) if workload == "mixed" else workload]
        length = max(preset.input_tokens.draw(rng) - shared_prefix_tokens, 1)
        body = " ".join(rng.choice(_WORDS) for _ in range(length))
        prompt = f"{prefix} {body}" if prefix else body
        specs.append(RequestSpec(prompt, preset.output_tokens.draw(rng), preset.name, length + shared_prefix_tokens))
    return specs


def with_fresh_prompt(spec: RequestSpec, seed: int) -> RequestSpec:
    """``spec`` with another prompt of the same length: requests that must not share a prefix-cache
    hit (an SLO calibration timing a prompt several times, say) but cost the same."""
    rng = random.Random(f"fresh-{seed}")
    words = len(spec.prompt.split())
    return RequestSpec(" ".join(rng.choice(_WORDS) for _ in range(words)), spec.max_tokens, spec.kind,
                       spec.approx_prompt_tokens)


def dataset_requests(path: Path, count: int, default_max_tokens: int = 128, seed: int = 0) -> list[RequestSpec]:
    """``count`` requests drawn (seeded, with replacement when the file is shorter) from a JSONL file."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a 'prompt'") from None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: 'prompt' must be a non-empty string")
        rows.append(RequestSpec(prompt, int(row.get("max_tokens", default_max_tokens)), "dataset", len(prompt.split())))
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    rng = random.Random(seed)
    return rows[:count] if count <= len(rows) else [rng.choice(rows) for _ in range(count)]


def pick_kind(rng: random.Random) -> str:
    roll, total = rng.random(), 0.0
    for kind, share in MIXED:
        total += share
        if roll < total:
            return kind
    return MIXED[-1][0]
