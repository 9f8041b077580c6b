"""A sequence: one choice of one request, as the scheduler and block manager see it.

Plain data with no torch dependency (the planner's simulator schedules these too).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockHash, hash_full_blocks


class SequenceStatus(enum.IntEnum):
    """Ordered so that ``status >= FINISHED_STOPPED`` means finished."""

    WAITING = 0
    WAITING_FOR_REMOTE_KV = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_PREFILLED = 7
    """A prefill-only request whose KV was exported for another engine."""

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_PREFILLED: "prefilled",
}


@dataclass(eq=False)
class Sequence:
    """Token ids of one choice and how far its KV has been computed.

    Compared by identity: ids are unique, and the scheduler's ``seq in running`` would otherwise
    compare whole token lists at every step.
    """

    seq_id: str
    request_id: str
    choice_index: int
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float
    priority: int = 0
    """Lower values are scheduled first (FCFS within a priority)."""
    cache_salt: str | None = None
    block_size: int = 16
    prefill_only: bool = False
    """Stop after the prompt is computed and the first token sampled (the prefill worker's job)."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (or an imported handoff)."""
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    _block_hashes: list[BlockHash] = field(default_factory=list, repr=False)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def sort_key(self) -> tuple[int, float, str]:
        """Scheduling order: priority, then arrival, then id (a stable tie-break)."""
        return (self.priority, self.arrival_time, self.seq_id)

    def block_hashes(self) -> list[BlockHash]:
        """Chained hashes of every full block of this sequence's tokens (memoized)."""
        if len(self._block_hashes) < self.num_tokens // self.block_size:
            self._block_hashes = hash_full_blocks(
                self.token_ids, self.block_size, self.cache_salt, self._block_hashes
            )
        return self._block_hashes

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
