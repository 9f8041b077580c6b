"""One simulated engine instance: the engine's own Scheduler and BlockManager, a step cost model.

This mirrors how ``LLMEngine`` drives its scheduler, minus the model: ``schedule()`` picks the
step's chunks (the token budget, chunked prefill, continuous batching and preemption are the
engine's code, not a copy), the cost model says how long the step takes, and at the step's end
every chunk that samples gets a token (a fake id: only lengths matter) and may finish its
sequence. The prefill/decode seam is mirrored too: a prefill-only sequence ends by holding its
blocks (``hold_kv``) until its transfer ends, and a decode instance reserves blocks for
incoming KV (``reserve_kv``) and adopts the sequence as running once it arrived (``commit_kv``).
"""

from __future__ import annotations

import math
from collections import deque

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.planner.sim.config import InstanceSpec

FAKE_TOKEN_ID = 0


class SimInstance:
    """An engine without a model. The simulator owns the clock and calls these in order:
    ``start_step`` at a step's start, ``end_step`` at its end, anything else in between."""

    def __init__(self, name: str, role: str, spec: InstanceSpec) -> None:
        self.name = name
        self.role = role
        """``prefill``, ``decode`` or ``colocated``."""
        self.spec = spec
        self.cost_model = spec.cost_model
        self.block_manager = BlockManager(spec.num_blocks, spec.block_size, spec.enable_prefix_caching)
        self.scheduler = Scheduler(spec.scheduler, self.block_manager)
        self.awaiting_kv_room: deque[Sequence] = deque()
        """Imports waiting, first come first served, for blocks to receive their KV into."""
        self.busy = False
        self.busy_seconds = 0.0
        self.num_steps = 0
        self._sequences: dict[str, Sequence] = {}
        self._step: SchedulerOutput | None = None
        self._num_reserved = 0
        # Prompt tokens of the waiting sequences, kept up to date so that least-loaded routing
        # costs O(running) per request instead of O(queue) (a waiting sequence has no KV).
        self._waiting_prompt_tokens = 0

    # -- load, as the router sees it -------------------------------------------------------

    def can_hold(self, num_tokens: int) -> bool:
        """The engine's ``check_request``: could this request ever fit the KV pool?"""
        return self.block_manager.blocks_needed(num_tokens) <= self.block_manager.num_blocks

    @property
    def queue_length(self) -> int:
        """Requests here that are not running yet (waiting, preempted, or waiting for KV room)."""
        return len(self.scheduler.waiting) + len(self.awaiting_kv_room)

    def queued_prompt_tokens(self) -> int:
        """Prompt tokens not computed yet: ``EngineStats.num_queued_prompt_tokens``."""
        running = sum(max(s.num_prompt_tokens - s.num_computed_tokens, 0) for s in self.scheduler.running)
        return self._waiting_prompt_tokens + running

    def num_in_flight(self) -> int:
        """Requests queued, running or with KV on its way here."""
        return self.scheduler.num_unfinished + len(self.awaiting_kv_room) + self._num_reserved

    # -- requests arriving -----------------------------------------------------------------

    def add_prompt(self, request_id: str, num_prompt_tokens: int, max_tokens: int, now: float,
                   prefill_only: bool) -> None:
        """``add_request``: a prompt to compute here (``prefill_only``: then hold its KV)."""
        seq = self._new_sequence(request_id, num_prompt_tokens, max_tokens, now, prefill_only)
        self.scheduler.add(seq)
        self._waiting_prompt_tokens += num_prompt_tokens

    def queue_import(self, request_id: str, num_prompt_tokens: int, max_tokens: int, now: float) -> None:
        """A prefilled request is headed here; it waits for blocks in :meth:`reserve_imports`."""
        seq = self._new_sequence(request_id, num_prompt_tokens, max_tokens, now, prefill_only=False)
        self.awaiting_kv_room.append(seq)

    def reserve_imports(self) -> list[Sequence]:
        """``reserve_kv`` for queued imports, in order, while their prompt's blocks fit."""
        reserved = []
        while self.awaiting_kv_room:
            seq = self.awaiting_kv_room[0]
            if not self.block_manager.allocate(seq.seq_id, seq.num_prompt_tokens):
                break  # first come first served: a later, smaller import does not overtake
            self.awaiting_kv_room.popleft()
            seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
            seq.num_computed_tokens = seq.num_cached_tokens = seq.num_prompt_tokens
            self._num_reserved += 1
            reserved.append(seq)
        return reserved

    def commit_import(self, seq: Sequence) -> None:
        """``commit_kv``: the KV arrived; decode on from the first token the prefill sampled."""
        self._num_reserved -= 1
        num_tokens = seq.num_computed_tokens
        self.block_manager.register_full_blocks(seq.seq_id, seq.block_hashes(), num_tokens)
        self.block_manager.record_query(seq.num_prompt_tokens, num_tokens)
        self.scheduler.add_running(seq)
        self._accept_token(seq)

    def release_kv(self, request_id: str) -> None:
        """``release_kv``: the transfer of a finished prefill's KV ended; free its blocks."""
        self.block_manager.free(_holder_id(request_id))

    # -- the step --------------------------------------------------------------------------

    def start_step(self) -> float | None:
        """Schedule a step; its duration in seconds, or None when nothing can run now."""
        assert not self.busy
        output = self._schedule()
        while not output.chunks and output.preempted_seq_ids:
            # Preempting freed blocks but admitted nothing (the scheduler admits no new work
            # in a step that preempts); the engine loop steps again at once, and so do we.
            output = self._schedule()
        if not output.chunks:
            return None  # e.g. every block is held for transfers: wait for one to end
        prefill_chunks: list[tuple[int, int]] = []
        decode_contexts: list[int] = []
        for chunk in output.chunks:
            seq = self._sequences[chunk.seq_id]
            if chunk.num_tokens == 1 and chunk.start_position >= seq.num_prompt_tokens:
                decode_contexts.append(chunk.context_length)
            else:
                # A prompt chunk, or the recompute of a preempted sequence's prompt + outputs.
                prefill_chunks.append((chunk.num_tokens, chunk.start_position))
        seconds = self.cost_model.step_seconds(prefill_chunks, decode_contexts)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"{self.name}: the cost model returned {seconds!r} seconds for a step")
        self._step = output
        self.busy = True
        self.busy_seconds += seconds
        self.num_steps += 1
        return seconds

    def end_step(self) -> list[Sequence]:
        """Apply the step's samples, as ``LLMEngine.step`` does after the forward pass.

        Returns the sequences that sampled, in chunk order; their status says what happened:
        ``FINISHED_PREFILLED`` (a prefill-only prompt is done, its KV held), ``FINISHED_LENGTH``
        (the last output token) or still running (one more token).
        """
        assert self._step is not None
        output, self._step = self._step, None
        self.busy = False
        sampled = []
        for chunk in output.chunks:
            if not chunk.sample:
                continue  # a prompt chunk short of the prompt's end samples nothing
            seq = self._sequences[chunk.seq_id]
            if seq.prefill_only:
                # The first token travels in the handoff; the blocks stay for the transfer.
                self.block_manager.retain(seq.seq_id, _holder_id(seq.request_id))
                self.scheduler.finish(seq, SequenceStatus.FINISHED_PREFILLED)
                del self._sequences[seq.seq_id]
            else:
                self._accept_token(seq)
            sampled.append(seq)
        return sampled

    # -- internals -------------------------------------------------------------------------

    def _schedule(self) -> SchedulerOutput:
        running_before = {seq.seq_id for seq in self.scheduler.running}
        output = self.scheduler.schedule()
        for seq_id in output.preempted_seq_ids:
            self._waiting_prompt_tokens += self._sequences[seq_id].num_prompt_tokens
        for chunk in output.chunks:
            if chunk.seq_id not in running_before:  # admitted from the waiting queue
                self._waiting_prompt_tokens -= self._sequences[chunk.seq_id].num_prompt_tokens
        return output

    def _new_sequence(self, request_id: str, num_prompt_tokens: int, max_tokens: int, now: float,
                      prefill_only: bool) -> Sequence:
        seq = Sequence(
            seq_id=f"{request_id}#0",
            request_id=request_id,
            choice_index=0,
            prompt_token_ids=[FAKE_TOKEN_ID] * num_prompt_tokens,
            max_tokens=max_tokens,
            arrival_time=now,
            # Fake prompts are all alike; the salt keeps each request's prefix its own.
            cache_salt=request_id,
            block_size=self.block_manager.block_size,
            prefill_only=prefill_only,
        )
        self._sequences[seq.seq_id] = seq
        return seq

    def _accept_token(self, seq: Sequence) -> None:
        seq.append_token(FAKE_TOKEN_ID)
        if len(seq.output_token_ids) >= seq.max_tokens:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
            del self._sequences[seq.seq_id]


def _holder_id(request_id: str) -> str:
    """The block table that keeps a finished prefill's KV alive for its transfer."""
    return f"{request_id}#held"
