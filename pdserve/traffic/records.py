"""What one request of a load run measured: send, first token, every token's arrival, end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    index: int
    kind: str
    scheduled: float
    """When the arrival process wanted it sent (s from the run's start)."""
    sent: float = 0.0
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    """Arrival time of every streamed chunk that carried output text."""
    chunk_tokens: list[int] = field(default_factory=list)
    """Tokens in each of those chunks (1, unless the server batched tokens into one chunk)."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    max_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (end - first token) / (tokens - 1)."""
        if not self.ok or self.output_tokens < 2:
            return None
        assert self.end is not None and self.first_token is not None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    def inter_token_latencies(self) -> list[float]:
        """Gaps between successive chunks, each spread over the tokens the later chunk carried."""
        return [gap for _, gap in self.timed_inter_token_latencies()]

    def timed_inter_token_latencies(self) -> list[tuple[float, float]]:
        """(arrival of the later chunk, gap) for every inter-token gap, as above."""
        gaps = []
        for i in range(1, len(self.chunk_times)):
            tokens = max(self.chunk_tokens[i] if i < len(self.chunk_tokens) else 1, 1)
            gap = self.chunk_times[i] - self.chunk_times[i - 1]
            gaps.extend([(self.chunk_times[i], gap / tokens)] * tokens)
        return gaps

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**data)
