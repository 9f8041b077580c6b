"""The engine loop: admit requests, schedule a step, run the model, sample, stop, report.

Also the prefill/decode seam: a request added with ``prefill_only=True`` finishes once its
prompt is computed and its first token sampled, carrying a :class:`KVHandoff`; :meth:`import_kv`
on another engine adopts such a handoff and decodes on as if the prefill had run locally.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.device import resolve_dtype
from pdserve.engine.handoff import (
    HandoffHeader,
    HeldKV,
    KVHandoff,
    check_compatible,
    compatibility_fields,
)
from pdserve.engine.kv_cache import allocate_pool, plan_layout
from pdserve.engine.loader import Checkpoint, load_checkpoint
from pdserve.engine.model import LlamaModel
from pdserve.engine.model_runner import KVHook, ModelRunner
from pdserve.engine.outputs import RequestError, RequestMetrics, RequestOutput
from pdserve.engine.request import Choice, Request
from pdserve.engine.sampler import SampledToken, Sampler, SamplingRow
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.step_counters import ChunkWork, StepCounters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for logs, metrics and routing."""

    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_cache_hit_rate: float
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_held_kv: int = 0
    """Finished prefills whose KV is held for a transfer."""
    num_reserved_kv: int = 0
    """Requests whose blocks are reserved for KV still arriving."""
    block_size: int = 0
    """Tokens per KV block (what a router needs to count a request's blocks and hash its prefix)."""
    num_queued_prompt_tokens: int = 0
    """Prompt tokens not computed yet, waiting or mid-prefill: a prefill worker's backlog."""
    step_work: dict[str, dict[str, float]] = field(default_factory=dict)
    """Cumulative time and work of steps by kind (prefill, decode, mixed): see step_counters.py."""


class LLMEngine:
    """One model instance with its KV pool, scheduler and sampler. Not thread-safe."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None) -> None:
        self.config = config
        if config.model.num_threads is not None and config.model.device == "cpu":
            torch.set_num_threads(config.model.num_threads)
        checkpoint = checkpoint or load_checkpoint(config.model.path, show_progress=config.show_progress)
        arch = checkpoint.architecture
        self.architecture = arch
        self.tokenizer = checkpoint.tokenizer
        self.model_name = checkpoint.model_name
        self.eos_token_ids = frozenset(checkpoint.eos_token_ids)
        self.max_model_len = min(
            config.model.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings
        )
        self.device = torch.device(config.model.device)
        dtype = resolve_dtype(config.model.dtype, self.device)
        kv_dtype = resolve_dtype(config.model.kv_cache_dtype or config.model.dtype, self.device)
        self.model = LlamaModel(
            arch, checkpoint.weights, dtype, self.device, self.max_model_len, config.model.weight_format,
            config.model.attention, config.model.large_batch_float32,
        )

        layout = plan_layout(arch, config.cache, kv_dtype)
        self.kv_pool = allocate_pool(layout, config.cache, self.device)
        self.block_manager = BlockManager(
            layout.num_blocks, layout.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_pool)
        self.sampler = Sampler(arch.vocab_size)
        self.step_counters = StepCounters()
        self.compatibility = compatibility_fields(
            checkpoint.weights_digest, layout.dtype, layout.block_size, arch.describe()
        )
        self._requests: dict[str, Request] = {}
        self._sequences: dict[str, tuple[Request, Choice]] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._held: dict[str, HeldKV] = {}
        self._reserved: dict[str, Sequence] = {}

    # -- public API ------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        prefill_only: bool = False,
        hold_kv: bool = False,
        kv_hook: KVHook | None = None,
        arrival_time: float | None = None,
        resume: SequenceABC[int] = (),
    ) -> str:
        """Queue a request; raises ValueError for input the engine cannot serve.

        ``prefill_only`` requests finish after the prompt and first token(s), carrying a
        :class:`KVHandoff` (a copy of the KV) or, with ``hold_kv``, a :class:`HeldKV` whose
        blocks stay allocated until :meth:`release_kv`.

        ``resume``: output tokens another engine already generated for this request (n=1), which
        died. They are prefilled with the prompt and count as this request's output (its text,
        max_tokens, min_tokens, stop strings, penalties), and sampling continues at position
        ``len(resume)`` with the request's seed: the same tokens the other engine would have
        drawn, up to the numerics of the two engines. Logprobs cover only the tokens drawn here.
        """
        if hold_kv and not prefill_only:
            raise ValueError("hold_kv applies to prefill_only requests")
        params = params or SamplingParams()
        request = self._new_request(prompt, params, request_id, prefill_only, kv_hook, arrival_time)
        request.hold_kv = hold_kv
        seq = self._new_sequence(request, 0, priority, cache_salt)
        if resume:
            try:
                self._resume(request, list(resume))
            except ValueError:
                self._forget(request)
                raise
        self.scheduler.add(seq)
        return request.request_id

    def import_kv(
        self,
        handoff: KVHandoff,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Adopt a prefill engine's KV and continue the request here.

        A complete handoff (the whole prompt plus the first tokens) goes straight to decoding.
        A partial one (a prefix of complete blocks) is placed in the prefix cache and the
        prompt's remainder is prefilled here. Raises IncompatibleHandoffError when the handoff
        comes from another model or layout, MemoryError when its blocks do not fit now.
        """
        request_id = request_id or handoff.request_id
        block_table = self.reserve_kv(
            handoff.header, params, request_id, priority=priority, cache_salt=cache_salt
        )
        self.runner.write_kv(block_table, handoff.kv)
        self.commit_kv(request_id)
        return request_id

    def reserve_kv(
        self,
        header: HandoffHeader,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> list[int]:
        """First half of an import: check the header and reserve blocks for its KV.

        Returns the block table to write ``header.num_tokens`` positions into (with
        :meth:`ModelRunner.write_kv`, from any thread: nothing schedules these blocks until
        :meth:`commit_kv`). :meth:`abort` releases a reservation.
        """
        check_compatible(self.compatibility, header.compatibility)
        params = params or SamplingParams()
        if header.first_tokens:
            self._check_first_tokens(header.first_tokens, params.n)
        if not 0 <= header.num_tokens <= len(header.prompt_token_ids):
            raise ValueError(
                f"handoff carries KV for {header.num_tokens} positions of a {len(header.prompt_token_ids)}-token prompt"
            )
        if not 0 <= header.seed < 2**63:
            raise ValueError(f"handoff's seed {header.seed} is outside [0, 2**63)")
        request = self._new_request(
            list(header.prompt_token_ids), params, request_id or header.request_id, False, None, None,
            seed=header.seed,
        )
        request.first_tokens = list(header.first_tokens)
        seq = self._new_sequence(request, 0, priority, cache_salt)
        if not self.block_manager.allocate(seq.seq_id, header.num_tokens):
            self._forget(request)
            raise MemoryError(f"no room for {header.num_tokens} tokens of imported KV")
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        seq.num_computed_tokens = seq.num_cached_tokens = header.num_tokens
        self._reserved[request.request_id] = seq
        return list(self.block_manager.block_table(seq.seq_id))

    def commit_kv(self, request_id: str, first_tokens: list[SampledToken] | None = None) -> None:
        """Second half of an import: the reserved blocks now hold the KV; schedule the request.

        ``first_tokens`` are needed here when the header did not carry them (a pipelined
        transfer learns them last). Without them, or with a partial KV, the full blocks go to
        the prefix cache and the rest of the prompt is prefilled here.
        """
        request, _ = self._sequences[self._reserved[request_id].seq_id]
        if first_tokens:
            # Raising here leaves the reservation for the caller to abort (a transfer recomputes).
            self._check_first_tokens(first_tokens, request.params.n)
            request.first_tokens = list(first_tokens)
        seq = self._reserved.pop(request_id)
        num_tokens = seq.num_computed_tokens
        self.block_manager.register_full_blocks(seq.seq_id, seq.block_hashes(), num_tokens)
        self.block_manager.record_query(seq.num_prompt_tokens, num_tokens)
        if num_tokens == seq.num_prompt_tokens and request.first_tokens:
            self.scheduler.add_running(seq)
            request.metrics.first_scheduled_time = time.monotonic()
            tokens, request.first_tokens = request.first_tokens, []
            self._accept_first_tokens(request, tokens)
            # Report the first token now (it may also be the last: max_tokens=1, EOS, a stop).
            self._pending_outputs.append(request.output())
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self._forget(request)
        else:
            # The full blocks stay in the prefix cache; admission finds them and prefills the rest.
            request.first_tokens = []
            self.block_manager.free(seq.seq_id)
            seq.num_computed_tokens = 0
            self.scheduler.add(seq)

    def _resume(self, request: Request, output_ids: list[int]) -> None:
        """Give ``request``'s only choice the output tokens it had on the engine it resumes from."""
        params, vocab = request.params, self.architecture.vocab_size
        if request.prefill_only or params.n != 1:
            raise ValueError("resume applies to requests with n=1 that decode here")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in output_ids):
            raise ValueError(f"resumed token ids must be in [0, {vocab})")
        total = len(request.prompt_token_ids) + len(output_ids)
        if len(output_ids) >= params.max_tokens or total >= self.max_model_len:
            raise ValueError(f"{len(output_ids)} resumed tokens leave no room for another one")
        (choice,) = request.choices
        for token_id in output_ids:
            choice.sequence.append_token(token_id)
            choice.detokenizer.add(token_id)
        request.metrics.first_token_time = time.monotonic()

    def _check_first_tokens(self, tokens: SequenceABC[SampledToken], n: int) -> None:
        """A peer's first tokens, checked before they are taken: an id outside the vocabulary
        would fail the next step's embedding, and with it every request in the batch."""
        if len(tokens) != n:
            raise ValueError(f"handoff carries first tokens for {len(tokens)} choices, request asks n={n}")
        vocab = self.architecture.vocab_size
        bad = [token.token_id for token in tokens if not 0 <= token.token_id < vocab]
        if bad:
            raise ValueError(f"handoff's first tokens {bad} are outside the vocabulary of {vocab}")

    def handoff_header(self, request_id: str) -> HandoffHeader:
        """What a transfer can announce about an in-flight request before its prefill ends."""
        request = self._requests[request_id]
        return HandoffHeader(
            request_id=request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            num_tokens=len(request.prompt_token_ids),
            compatibility=dict(self.compatibility),
            seed=request.seed,
            model_name=self.model_name,
        )

    def held_kv(self, request_id: str) -> HeldKV | None:
        """The KV a finished ``hold_kv`` prefill keeps, until :meth:`release_kv`."""
        return self._held.get(request_id)

    def release_kv(self, request_id: str) -> bool:
        """Free the blocks a ``hold_kv`` prefill kept; False if nothing is held under that id."""
        if self._held.pop(request_id, None) is None:
            return False
        self.block_manager.free(_holder_id(request_id))
        return True

    def abort(self, request_id: str, *, report: bool = True) -> bool:
        """Stop a request now and free its blocks (a reservation too); False if unknown or done.

        ``report=False`` frees silently (no "abort" output), e.g. to cancel a reservation whose
        transfer failed before the request is retried another way.
        """
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._end_aborted(request)
        if report:
            self._pending_outputs.append(request.output())
        return True

    def fail(self, request_id: str, error: RequestError) -> bool:
        """End a request now with ``error`` for its client (its output carries it), freeing its
        blocks; False if unknown or done. The other requests are not touched."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        request.error = error
        self._end_aborted(request)
        self._pending_outputs.append(request.output())
        return True

    def _end_aborted(self, request: Request) -> None:
        self._reserved.pop(request.request_id, None)
        for choice in request.choices:
            if not choice.sequence.is_finished:
                self.scheduler.finish(choice.sequence, SequenceStatus.FINISHED_ABORTED)
        request.aborted = True
        self._forget(request)

    def request_ids(self) -> list[str]:
        """Requests still in flight (queued, running or with reserved KV)."""
        return list(self._requests)

    def has_work(self) -> bool:
        """Whether :meth:`step` would do anything (reserved KV waits without stepping)."""
        return bool(self._pending_outputs) or self.scheduler.num_unfinished > 0

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs)

    def take_pending_outputs(self) -> list[RequestOutput]:
        """Outputs made between steps (an import's first token at its commit, an abort), handed
        over without running a step. :meth:`step` returns them too, but only once its forward
        pass is done: a loop that calls this first streams them a whole step earlier."""
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the requests whose output changed."""
        outputs = self.take_pending_outputs()
        schedule = self.scheduler.schedule()
        if schedule.is_empty:
            return outputs
        now = time.monotonic()
        hooks = {}
        chunk_work = []
        for chunk in schedule.chunks:
            request, choice = self._sequences[chunk.seq_id]
            chunk_work.append(ChunkWork(
                chunk.num_tokens, chunk.start_position,
                is_decode=chunk.num_tokens == 1 and not choice.sequence.is_prefilling,
            ))
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            if request.kv_hook is not None:
                hooks[chunk.seq_id] = request.kv_hook
        step_logits = self.runner.execute(schedule, hooks)

        rows: list[SamplingRow] = []
        row_logits: list[int] = []
        for index, seq_id in enumerate(step_logits.seq_ids):
            request, choice = self._sequences[seq_id]
            fan_out = self._is_first_sample(request, choice)
            for choice_index in range(request.params.n) if fan_out else [choice.sequence.choice_index]:
                rows.append(self._sampling_row(request, choice, choice_index))
                row_logits.append(index)
        sampled = self.sampler(step_logits.logits[row_logits], rows) if rows else []

        touched: dict[str, Request] = {}
        failed: dict[str, RequestError] = {}
        cursor = 0
        for seq_id in step_logits.seq_ids:
            request, choice = self._sequences[seq_id]
            touched[request.request_id] = request
            first = self._is_first_sample(request, choice)
            count = request.params.n if first else 1
            tokens = sampled[cursor : cursor + count]
            cursor += count
            if request.request_id in failed:
                continue
            # A failure of one request (its sampling, its detokenization, its stop strings)
            # ends that request alone; the rest of the batch goes on.
            error = next((token for token in tokens if token.error is not None), None)
            if error is not None:
                failed[request.request_id] = RequestError(str(error.error), 400 if error.error_is_clients else 500)
                continue
            try:
                if first:
                    self._accept_first_tokens(request, tokens)
                else:
                    self._accept_token(request, choice, tokens[0])
            except Exception as exception:
                log.exception("request %s failed after sampling", request.request_id)
                failed[request.request_id] = RequestError(f"{type(exception).__name__}: {exception}", 500)
        for request in touched.values():
            if request.request_id in failed:
                request.error = failed[request.request_id]
                self._end_aborted(request)
                outputs.append(request.output())
                continue
            outputs.append(request.output())
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self._forget(request)
        self.step_counters.record(chunk_work, time.monotonic() - now)
        return outputs

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            prefix_cache_hit_rate=bm.stats.hit_rate,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            num_held_kv=len(self._held),
            num_reserved_kv=len(self._reserved),
            block_size=bm.block_size,
            num_queued_prompt_tokens=sum(
                max(seq.num_prompt_tokens - seq.num_computed_tokens, 0)
                for seq in (*self.scheduler.waiting, *self.scheduler.running)
            ),
            step_work=self.step_counters.snapshot(),
        )

    def close(self) -> None:
        """Release the KV pool (and unlink its shared-memory segment, if any)."""
        for request_id in list(self._held):
            self.release_kv(request_id)
        self.runner.close()
        self.kv_pool.close()

    # -- internals -------------------------------------------------------------------------

    def _new_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None,
        prefill_only: bool,
        kv_hook: KVHook | None,
        arrival_time: float | None,
        seed: int | None = None,
    ) -> Request:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.check_request(prompt, params)
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(
            request_id=request_id,
            params=params,
            prompt_token_ids=prompt_ids,
            seed=seed,
            metrics=RequestMetrics(arrival_time=arrival_time or time.monotonic()),
            prefill_only=prefill_only,
            kv_hook=kv_hook,
        )
        self._requests[request_id] = request
        return request

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or ValueError if this engine could never serve the request.

        Reads only immutable state, so it is safe from any thread (e.g. to refuse bad input
        before a transfer is even attempted).
        """
        prompt_ids = self._tokenize(prompt)
        total = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {self.block_manager.blocks_needed(total)} KV blocks; "
                f"the KV pool has {self.block_manager.num_blocks} (raise the KV memory budget)"
            )
        return prompt_ids

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(isinstance(t, int) for t in prompt):
            prompt_ids = [int(t) for t in prompt]
            bad = [t for t in prompt_ids if not 0 <= t < self.architecture.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.architecture.vocab_size}): {bad[:5]}")
        else:
            raise TypeError("prompt must be a string or a list of token ids")
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but the context is {self.max_model_len} "
                "tokens, which must also hold at least one generated token"
            )
        return prompt_ids

    def _new_sequence(
        self, request: Request, choice_index: int, priority: int, cache_salt: str | None
    ) -> Sequence:
        seq = Sequence(
            seq_id=f"{request.request_id}#{choice_index}",
            request_id=request.request_id,
            choice_index=choice_index,
            prompt_token_ids=request.prompt_token_ids,
            max_tokens=request.params.max_tokens,
            arrival_time=request.metrics.arrival_time,
            priority=priority,
            cache_salt=cache_salt,
            block_size=self.block_manager.block_size,
            prefill_only=request.prefill_only,
        )
        choice = request.add_choice(seq, self.tokenizer)
        self._sequences[seq.seq_id] = (request, choice)
        return seq

    def _forget(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        for choice in request.choices:
            self._sequences.pop(choice.sequence.seq_id, None)

    @staticmethod
    def _is_first_sample(request: Request, choice: Choice) -> bool:
        """The prompt's first sample decides every choice's first token at once (a resumed choice
        had its first token on another engine)."""
        return choice.sequence.choice_index == 0 and not request.first_tokens and not choice.sequence.output_token_ids

    def _sampling_row(self, request: Request, choice: Choice, choice_index: int) -> SamplingRow:
        seq, params = choice.sequence, request.params
        output_ids = seq.output_token_ids if choice_index == seq.choice_index else []
        blocked: tuple[int, ...] = ()
        if len(output_ids) < params.min_tokens:
            eos = () if params.ignore_eos else tuple(self.eos_token_ids)
            blocked = eos + params.stop_token_ids
        return SamplingRow(
            params=params,
            seed=request.seed,
            choice_index=choice_index,
            position=len(output_ids),
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=output_ids,
            blocked_token_ids=blocked,
        )

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = frozenset(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def _accept_first_tokens(self, request: Request, tokens: list[SampledToken]) -> None:
        request.first_tokens = list(tokens)
        request.metrics.first_token_time = time.monotonic()
        parent = request.choices[0].sequence
        if request.prefill_only:
            table = self.block_manager.block_table(parent.seq_id)
            header = HandoffHeader(
                request_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                num_tokens=parent.num_prompt_tokens,
                compatibility=dict(self.compatibility),
                seed=request.seed,
                first_tokens=list(tokens),
                model_name=self.model_name,
            )
            if request.hold_kv:
                self.block_manager.retain(parent.seq_id, _holder_id(request.request_id))
                request.held_kv = self._held[request.request_id] = HeldKV(header, list(table))
            else:
                kv = self.runner.read_kv(table, parent.num_prompt_tokens)
                request.handoff = KVHandoff(
                    request_id=header.request_id,
                    prompt_token_ids=header.prompt_token_ids,
                    kv=kv,
                    compatibility=header.compatibility,
                    seed=header.seed,
                    first_tokens=header.first_tokens,
                    model_name=header.model_name,
                )
            self.scheduler.finish(parent, SequenceStatus.FINISHED_PREFILLED)
            return
        # Fork the other choices off the prompt's blocks before any choice may finish.
        for choice_index in range(1, request.params.n):
            child = self._new_sequence(request, choice_index, parent.priority, parent.cache_salt)
            child.num_cached_tokens = parent.num_cached_tokens
            try:
                copy = self.block_manager.fork(parent.seq_id, child.seq_id, parent.num_prompt_tokens)
            except MemoryError:
                self.scheduler.add(child)  # no block to copy into: recompute the prompt later
            else:
                child.num_computed_tokens = parent.num_prompt_tokens
                self.scheduler.add_running(child, copy)
        for choice, token in zip(request.choices, tokens, strict=True):
            self._accept_token(request, choice, token)

    def _accept_token(self, request: Request, choice: Choice, token: SampledToken) -> None:
        status = request.record_token(
            choice, token, self._stop_ids(request.params), self.max_model_len
        )
        if status is not None:
            choice.detokenizer.flush()  # emit a held-back partial character, if any
            self.scheduler.finish(choice.sequence, status)


def _holder_id(request_id: str) -> str:
    """The block-manager table that keeps a finished prefill's KV alive for a transfer."""
    return f"{request_id}#held"
