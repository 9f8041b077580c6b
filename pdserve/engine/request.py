"""Engine-side state of one request: its choices, their detokenizers, logprobs and stop logic."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.handoff import HeldKV, KVHandoff
from pdserve.engine.model_runner import KVHook
from pdserve.engine.outputs import CompletionOutput, RequestError, RequestMetrics, RequestOutput
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Choice:
    """Output-side state of one sequence."""

    sequence: Sequence
    detokenizer: IncrementalDetokenizer
    logprobs: list[SampledToken] | None
    stop_reason: int | str | None = None
    final_text: str | None = None
    """The text cut at a stop string, once one matched."""


@dataclass
class Request:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    seed: int
    metrics: RequestMetrics
    prefill_only: bool = False
    kv_hook: KVHook | None = None
    choices: list[Choice] = field(default_factory=list)
    handoff: KVHandoff | None = None
    hold_kv: bool = False
    """Prefill-only: keep the KV in this engine's blocks (``held_kv``) instead of copying it out."""
    held_kv: HeldKV | None = None
    first_tokens: list[SampledToken] = field(default_factory=list)
    aborted: bool = False
    error: RequestError | None = None
    """Why the engine failed this request, if it did (it is then aborted too)."""

    def add_choice(self, sequence: Sequence, tokenizer: Tokenizer) -> Choice:
        choice = Choice(
            sequence=sequence,
            detokenizer=IncrementalDetokenizer(
                tokenizer, self.prompt_token_ids, self.params.skip_special_tokens
            ),
            logprobs=[] if self.params.logprobs is not None else None,
        )
        self.choices.append(choice)
        return choice

    @property
    def finished(self) -> bool:
        if self.aborted:
            return True
        expected = 1 if self.prefill_only else self.params.n
        return len(self.choices) == expected and all(c.sequence.is_finished for c in self.choices)

    def record_token(
        self, choice: Choice, sampled: SampledToken, stop_token_ids: frozenset[int], max_model_len: int
    ) -> SequenceStatus | None:
        """Append a sampled token to a choice; return the finished status if it must stop now."""
        seq, params = choice.sequence, self.params
        seq.append_token(sampled.token_id)
        if choice.logprobs is not None:
            choice.logprobs.append(sampled)
        new_text = choice.detokenizer.add(sampled.token_id)
        num_output = len(seq.output_token_ids)
        may_stop = num_output >= params.min_tokens
        if may_stop and sampled.token_id in stop_token_ids:
            choice.stop_reason = sampled.token_id
            return SequenceStatus.FINISHED_STOPPED
        if may_stop and params.stop:
            text = choice.detokenizer.text
            for stop in params.stop:
                # Only the new text, plus the tail a stop string could straddle, is searched.
                index = text.find(stop, max(0, len(text) - len(new_text) - len(stop) + 1))
                if index >= 0:
                    choice.stop_reason = stop
                    choice.final_text = text[:index]
                    return SequenceStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or seq.num_tokens >= max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def output(self) -> RequestOutput:
        outputs = []
        for index, choice in enumerate(self.choices):
            seq = choice.sequence
            if choice.final_text is not None:
                text = choice.final_text
            elif seq.is_finished:
                text = choice.detokenizer.text
            else:
                text = _without_partial_stop(choice.detokenizer.text, self.params.stop)
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=list(seq.output_token_ids),
                    logprobs=list(choice.logprobs) if choice.logprobs is not None else None,
                    finish_reason=seq.status.finish_reason,
                    stop_reason=choice.stop_reason,
                )
            )
        first = self.choices[0].sequence if self.choices else None
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=first.num_cached_tokens if first else 0,
            metrics=self.metrics,
            handoff=self.handoff,
            held_kv=self.held_kv,
            error=self.error,
        )


def _without_partial_stop(text: str, stops: tuple[str, ...]) -> str:
    """Hold back a tail that may be the start of a stop string, so a stream never shows it."""
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return text[: len(text) - hold] if hold else text
