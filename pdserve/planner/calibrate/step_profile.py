"""A measured step cost model for one machine: a linear fit to timed engine steps, and its file.

The roofline (cost/roofline.py) predicts a step from datasheet peaks and guessed efficiencies. On a
CPU running an eager PyTorch engine the guesses are poor: a decode step pays milliseconds of
per-operator overhead that no roof explains. This model is fitted instead to steps timed on the
machine itself (engine_steps.py drives the real engine), with five non-negative coefficients:

    step = per_step_s                                  (c0: scheduling, sampling, op launches)
         + per_prefill_token_s        * prefill_tokens  (weights times each prompt token)
         + per_attention_pair_s       * attention_pairs (prompt attention, quadratic per chunk)
         + per_decode_seq_s           * num_decodes     (weights times each decode token, logits)
         + per_decode_context_token_s * sum(decode_contexts)   (K/V each decode token reads)

A prefill chunk of n new tokens after s cached ones has ((s+n)(s+n+1) - s(s+1)) / 2 attention
pairs: query p attends to positions 0..p, itself included (engine/step_counters.py counts the
same). Why linear: each term is a count of work the engine does in proportion (matmul rows,
attention dot products, KV bytes read); on a CPU both phases stay compute- or overhead-bound at
these sizes, so the roofline's max() of two roofs never switches within a phase, and a sum fits
the measurements better (calibrate reports both fits side by side). Non-negative, because a
negative cost per unit of work is an artefact of collinear samples, not a property of the machine.

The fit minimises the *relative* error, sum(((predicted - measured) / measured)^2): steps range
from ~20 ms to seconds, and an absolute fit would ignore every short step.

Profile file (JSON, ``format: pdserve-step-profile``, ``version: 1``): the machine, threads,
model, dtype, KV bytes per token, the coefficients, the fit quality (R^2 and the largest relative
error over the samples), every sample (prefill chunks, decode contexts, median and all timings),
and optionally the roofline efficiencies fitted to the same samples (``roofline``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PROFILE_FORMAT = "pdserve-step-profile"
PROFILE_VERSION = 1


def attention_pairs(new_tokens: int, context: int) -> int:
    """Query-key pairs of a prefill chunk: query p attends to p + 1 positions, p in [context, context + new)."""
    end = context + new_tokens
    return (end * (end + 1) - context * (context + 1)) // 2


class StepFeatures(NamedTuple):
    """The counts a step's cost is linear in, in the order of the coefficients."""

    steps: int
    prefill_tokens: int
    attention_pairs: int
    num_decodes: int
    decode_context_tokens: int


def step_features(prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> StepFeatures:
    for new_tokens, context in prefill_chunks:
        if new_tokens < 1 or context < 0:
            raise ValueError(f"a prefill chunk needs >= 1 new token and context >= 0, got {(new_tokens, context)}")
    if any(context < 1 for context in decode_contexts):
        raise ValueError("decode contexts must be >= 1 (they count the token being decoded)")
    return StepFeatures(
        steps=1 if (prefill_chunks or decode_contexts) else 0,
        prefill_tokens=sum(n for n, _ in prefill_chunks),
        attention_pairs=sum(attention_pairs(n, s) for n, s in prefill_chunks),
        num_decodes=len(decode_contexts),
        decode_context_tokens=sum(decode_contexts),
    )


@dataclass(frozen=True)
class StepCoefficients:
    """Seconds per unit of each feature (c0, c_prefill_token, c_prefill_pair, c_decode_seq, c_decode_ctx)."""

    per_step_s: float = 0.0
    """c0: every non-empty step."""
    per_prefill_token_s: float = 0.0
    """Each prompt token computed."""
    per_attention_pair_s: float = 0.0
    """Each query-key pair of prompt attention."""
    per_decode_seq_s: float = 0.0
    """Each sequence decoding one token."""
    per_decode_context_token_s: float = 0.0
    """Each context token a decoding sequence attends to (its context length)."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"coefficient {item.name} must be a finite number >= 0, got {value!r}")

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, item.name) for item in fields(self)], dtype=float)

    @classmethod
    def from_array(cls, values: Sequence[float]) -> StepCoefficients:
        return cls(*(float(v) for v in values))


@dataclass(frozen=True)
class LinearStepCost:
    """A StepCostModel from fitted coefficients; an empty step costs nothing, as in the roofline."""

    coefficients: StepCoefficients
    kv_token_bytes: int
    """KV bytes of one token, all layers (what a transfer moves per prompt token)."""

    def __post_init__(self) -> None:
        if self.kv_token_bytes < 1:
            raise ValueError(f"kv_token_bytes must be positive, got {self.kv_token_bytes}")

    def step_seconds(self, prefill_chunks: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        # Plain Python: the simulator calls this once per simulated step.
        c, work = self.coefficients, step_features(prefill_chunks, decode_contexts)
        return (c.per_step_s * work.steps + c.per_prefill_token_s * work.prefill_tokens
                + c.per_attention_pair_s * work.attention_pairs + c.per_decode_seq_s * work.num_decodes
                + c.per_decode_context_token_s * work.decode_context_tokens)

    def kv_bytes_per_token(self) -> int:
        return self.kv_token_bytes


@dataclass(frozen=True)
class StepSample:
    """One kind of step as the engine ran it, and how long it took (median of the repeats)."""

    prefill_chunks: tuple[tuple[int, int], ...]
    """(new tokens, tokens already in context) of each prompt chunk."""
    decode_contexts: tuple[int, ...]
    """Context length of each one-token decode, the decoded token included."""
    seconds: float
    timings_s: tuple[float, ...] = ()
    """Every timed repeat (``seconds`` is their median)."""

    def __post_init__(self) -> None:
        step_features(self.prefill_chunks, self.decode_contexts)
        if not (self.prefill_chunks or self.decode_contexts):
            raise ValueError("a sample needs at least one prefill chunk or decode")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"a sample's seconds must be positive, got {self.seconds!r}")

    @property
    def kind(self) -> str:
        """``prefill``, ``decode`` or ``mixed``, as engine/step_counters.py names steps."""
        if self.prefill_chunks and self.decode_contexts:
            return "mixed"
        return "prefill" if self.prefill_chunks else "decode"

    def features(self) -> StepFeatures:
        return step_features(self.prefill_chunks, self.decode_contexts)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "prefill_chunks": [list(c) for c in self.prefill_chunks],
                "decode_contexts": list(self.decode_contexts), "seconds": self.seconds,
                "timings_s": list(self.timings_s)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepSample:
        return cls(
            prefill_chunks=tuple((int(n), int(s)) for n, s in data["prefill_chunks"]),
            decode_contexts=tuple(int(c) for c in data["decode_contexts"]),
            seconds=float(data["seconds"]),
            timings_s=tuple(float(t) for t in data.get("timings_s", ())),
        )


@dataclass(frozen=True)
class FitQuality:
    num_samples: int
    r_squared: float
    """1 - residual / total sum of squares, on seconds."""
    max_relative_error: float
    """max |predicted - measured| / measured over the samples."""
    mean_relative_error: float

    @classmethod
    def of(cls, predicted: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray) -> FitQuality:
        pred, meas = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
        total = float(np.sum((meas - meas.mean()) ** 2)) if len(meas) else 0.0
        residual = float(np.sum((pred - meas) ** 2))
        r_squared = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
        relative = np.abs(pred - meas) / meas if len(meas) else np.zeros(0)
        return cls(len(meas), r_squared, float(relative.max(initial=0.0)),
                   float(relative.mean()) if len(meas) else 0.0)


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||matrix @ x - target|| subject to x >= 0, exactly, for a handful of columns.

    The optimum is the unconstrained least-squares solution on its own support (the columns
    where it is positive), so it is the best feasible one among the least-squares solutions of
    every subset of columns: 2^k small solves, 32 for our five coefficients, instead of an
    active-set iteration (scipy is not a dependency). Columns are scaled to unit norm first,
    because the features span ten orders of magnitude (1 per step, ~1e7 attention pairs).
    """
    rows, num_columns = matrix.shape
    if num_columns > 12:
        raise ValueError("the subset search is for a few columns; use an active-set method")
    norms = np.linalg.norm(matrix, axis=0)
    scale = np.where(norms > 0, norms, 1.0)
    scaled = matrix / scale
    best, best_residual = np.zeros(num_columns), float(np.sum(target**2))
    for size in range(1, num_columns + 1):
        for support in itertools.combinations(range(num_columns), size):
            columns = list(support)
            solution, *_ = np.linalg.lstsq(scaled[:, columns], target, rcond=None)
            if np.any(solution < 0):
                continue
            candidate = np.zeros(num_columns)
            candidate[columns] = solution
            residual = float(np.sum((scaled @ candidate - target) ** 2))
            if residual < best_residual - 1e-15 * max(best_residual, 1.0):
                best, best_residual = candidate, residual
    return best / scale


def fit_linear(samples: Sequence[StepSample]) -> tuple[StepCoefficients, FitQuality]:
    """Non-negative coefficients minimising the samples' summed squared relative error."""
    if not samples:
        raise ValueError("no samples to fit")
    matrix = np.array([s.features() for s in samples], dtype=float)
    measured = np.array([s.seconds for s in samples], dtype=float)
    weights = 1.0 / measured  # relative residuals: (A x - y) / y
    solution = nonnegative_least_squares(matrix * weights[:, None], measured * weights)
    coefficients = StepCoefficients.from_array(np.maximum(solution, 0.0))
    return coefficients, FitQuality.of(matrix @ coefficients.as_array(), measured)


@dataclass(frozen=True)
class RooflineFit:
    """The roofline's efficiencies for this machine, fitted to the same samples (roofline_fit.py)."""

    peak_flops_per_s: float
    """Measured here (pdserve/machine.py): a large fp32 GEMM at these threads."""
    memory_bytes_per_s: float
    """Measured here: a large copy, bytes read + written."""
    compute: float
    bandwidth: float
    step_overhead_s: float
    fit: FitQuality
    model_spec: dict[str, Any] = field(default_factory=dict)
    """The planner's ModelSpec fields of the engine's model (to rebuild the RooflineCostModel)."""


@dataclass(frozen=True)
class StepProfile:
    """Everything a calibration measured and fitted, as stored in a profile file."""

    model: str
    dtype: str
    threads: int
    kv_bytes_per_token: int
    coefficients: StepCoefficients
    fit: FitQuality
    samples: tuple[StepSample, ...] = ()
    machine: dict[str, Any] = field(default_factory=dict)
    """CPU model, cores, memory, platform, torch version (pdserve/machine.py machine_info)."""
    created: str = ""
    """UTC time of the calibration, ISO 8601."""
    roofline: RooflineFit | None = None

    def cost_model(self) -> LinearStepCost:
        return LinearStepCost(self.coefficients, self.kv_bytes_per_token)


def profile_to_json(profile: StepProfile) -> dict[str, Any]:
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "created": profile.created,
        "machine": profile.machine, "threads": profile.threads, "model": profile.model,
        "dtype": profile.dtype, "kv_bytes_per_token": profile.kv_bytes_per_token,
        "coefficients": asdict(profile.coefficients), "fit": asdict(profile.fit),
        "roofline": None if profile.roofline is None else asdict(profile.roofline),
        "samples": [s.to_json() for s in profile.samples],
    }


def profile_from_json(data: dict[str, Any]) -> StepProfile:
    if data.get("format") != PROFILE_FORMAT or data.get("version") != PROFILE_VERSION:
        raise ValueError(f"not a {PROFILE_FORMAT} version {PROFILE_VERSION} file "
                         f"(format {data.get('format')!r}, version {data.get('version')!r})")
    roofline = data.get("roofline")
    return StepProfile(
        model=str(data["model"]), dtype=str(data["dtype"]), threads=int(data["threads"]),
        kv_bytes_per_token=int(data["kv_bytes_per_token"]),
        coefficients=StepCoefficients(**data["coefficients"]), fit=FitQuality(**data["fit"]),
        samples=tuple(StepSample.from_json(s) for s in data.get("samples", [])),
        machine=dict(data.get("machine") or {}), created=str(data.get("created", "")),
        roofline=None if roofline is None else RooflineFit(
            **{**roofline, "fit": FitQuality(**roofline["fit"])}),
    )


def save_profile(profile: StepProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile_to_json(profile), indent=1) + "\n")


def load_profile(path: Path) -> StepProfile:
    """A profile file; ValueError naming the file when it is not one."""
    try:
        return profile_from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a valid step profile: {error}") from None
