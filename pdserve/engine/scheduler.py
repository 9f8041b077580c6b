"""Iteration-level (continuous) batching with chunked prefill and preemption by recompute.

Each step spends a token budget: running decodes first (one token each), then running prefills
continue, then waiting sequences are admitted in (priority, arrival) order. A prompt longer than
the budget is cut into chunks, so it never stalls the decodes that run beside it. When a running
sequence cannot grow, the lowest-priority running sequence is preempted: its blocks are freed and
it is recomputed later (prefix caching usually makes that cheap).

Plain Python with no torch dependency: the planner's simulator runs this very scheduler.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one sequence to run through the model in this step."""

    seq_id: str
    token_ids: list[int]
    start_position: int
    """Position of ``token_ids[0]``; the KV of all earlier positions is in the cache."""
    block_table: list[int]
    sample: bool
    """True when the chunk ends at the sequence's last token: sample its next token."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_length(self) -> int:
        """Tokens the chunk's last query attends to, itself included."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """What the model runner must do in one step. Decode chunks come first."""

    chunks: list[ScheduledChunk]
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(source, destination) KV block copies to perform before the forward pass."""
    preempted_seq_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.block_copies


class Scheduler:
    """Decides, step by step, which tokens of which sequences to compute."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []
        """Sorted by ``Sequence.sort_key``."""
        self.running: list[Sequence] = []
        self._pending_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence whose prompt still has to be computed."""
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence, block_copy: tuple[int, int] | None = None) -> None:
        """Adopt a sequence that already owns blocks (a fork, or imported KV)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if block_copy is not None:
            self._pending_copies.append(block_copy)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark ``seq`` finished and release its blocks at once."""
        assert status.is_finished
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq.seq_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled: set[str] = set()

        self.running.sort(key=lambda s: s.sort_key)
        # Decodes first: a waiting long prompt must never delay a token of a running stream.
        for want_decode in (True, False):
            for seq in list(self.running):
                if budget == 0:
                    break
                if seq.seq_id in scheduled or seq not in self.running:
                    continue
                if (seq.num_uncomputed_tokens == 1) != want_decode:
                    continue
                num_new = self._chunk_size(seq, budget)
                if not self._grow_or_preempt(seq, num_new, scheduled, preempted):
                    continue
                chunks.append(self._make_chunk(seq, num_new))
                scheduled.add(seq.seq_id)
                budget -= num_new

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if preempted:
                break  # memory is short this step; do not admit new work behind a preemption
            seq = self.waiting[0]
            cached_blocks = self.block_manager.find_cached_prefix(
                seq.block_hashes(), max_tokens=seq.num_tokens - 1
            )
            num_cached = len(cached_blocks) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget, self._max_chunk())
            if not self.block_manager.allocate(seq.seq_id, num_cached + num_new, cached_blocks):
                break
            self.waiting.pop(0)
            if seq.num_preemptions == 0:
                self.block_manager.record_query(seq.num_prompt_tokens, num_cached)
                seq.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._make_chunk(seq, num_new))
            budget -= num_new

        copies, self._pending_copies = self._pending_copies, []
        return SchedulerOutput(chunks=chunks, block_copies=copies, preempted_seq_ids=preempted)

    # -- internals -------------------------------------------------------------------------

    def _max_chunk(self) -> int:
        return self.config.long_prefill_token_threshold or self.config.max_num_batched_tokens

    def _chunk_size(self, seq: Sequence, budget: int) -> int:
        return min(seq.num_uncomputed_tokens, budget, self._max_chunk())

    def _grow_or_preempt(
        self, seq: Sequence, num_new: int, scheduled: set[str], preempted: list[str]
    ) -> bool:
        """Make room for ``num_new`` more tokens of ``seq``, preempting from the back.

        Victims are the lowest-priority running sequences not yet scheduled in this step (their
        blocks are not referenced by this step's chunks); ``seq`` itself is the last resort.
        """
        target = seq.num_computed_tokens + num_new
        while not self.block_manager.allocate(seq.seq_id, target):
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.PREEMPTED
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def _make_chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        tokens = seq.token_ids[start : start + num_new]
        seq.num_computed_tokens = start + num_new
        # The KV of these tokens is written in this step, before any later step reads it.
        self.block_manager.register_full_blocks(
            seq.seq_id, seq.block_hashes(), seq.num_computed_tokens
        )
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tokens,
            start_position=start,
            block_table=list(self.block_manager.block_table(seq.seq_id)),
            sample=seq.num_computed_tokens == seq.num_tokens,
        )
