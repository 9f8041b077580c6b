"""What the engine reports back to callers, one object per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.handoff import HeldKV, KVHandoff
from pdserve.engine.sampler import SampledToken


@dataclass
class CompletionOutput:
    """One choice of a request, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampledToken] | None
    finish_reason: str | None = None
    """"stop", "length", "abort", "prefilled" or None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the choice, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestError:
    """Why the engine ended a request early, for its client alone."""

    message: str
    status: int = 500
    """The HTTP status its client gets: 4xx when the request's own parameters caused it."""


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """State of a request after an engine step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens whose KV was reused (prefix cache or imported) rather than computed."""
    metrics: RequestMetrics | None = None
    handoff: KVHandoff | None = None
    """For prefill-only requests, the exported KV once the prefill finished."""
    held_kv: HeldKV | None = None
    """For prefill-only requests with ``hold_kv``: the blocks holding the KV until released."""
    error: RequestError | None = field(default=None)
    """Set when the engine ended this request alone (its choices then finish "abort")."""
