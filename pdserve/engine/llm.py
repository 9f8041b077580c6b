"""Offline API for scripts and tests: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.handoff import KVHandoff
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_runner import KVHook
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs batches of prompts to completion on one engine."""

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
        weight_format: str = "dense",
        attention: str = "auto",
        large_batch_float32: bool = True,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        config: EngineConfig | None = None,
        checkpoint: Checkpoint | None = None,
        show_progress: bool = True,
    ) -> None:
        if config is None:
            config = EngineConfig(
                model=ModelConfig(
                    path=model, dtype=dtype, device=device, num_threads=threads, weight_format=weight_format,
                    attention=attention, large_batch_float32=large_batch_float32,
                ),
                cache=cache or CacheConfig(),
                scheduler=scheduler or SchedulerConfig(),
                show_progress=show_progress,
            )
        self.engine = LLMEngine(config, checkpoint)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched together; outputs in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _broadcast(params, len(prompt_list))
        request_ids = [self.engine.add_request(p, sp) for p, sp in zip(prompt_list, params_list, strict=True)]
        return self._run(request_ids)

    def chat(
        self,
        conversations: list[dict[str, str]] | list[list[dict[str, str]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to chat conversations, rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.chat_prompt_ids(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.chat_prompt_ids(messages)

    def prefill_only(
        self, prompt: Prompt, params: SamplingParams | None = None, kv_hook: KVHook | None = None
    ) -> KVHandoff:
        """Compute the prompt's KV and first token(s), and return them as a handoff."""
        request_id = self.engine.add_request(prompt, params, prefill_only=True, kv_hook=kv_hook)
        (output,) = self._run([request_id])
        assert output.handoff is not None
        return output.handoff

    def decode_from(self, handoff: KVHandoff, params: SamplingParams | None = None) -> RequestOutput:
        """Continue a request from another engine's handoff until it finishes."""
        request_id = self.engine.import_kv(handoff, params)
        (output,) = self._run([request_id])
        return output

    def close(self) -> None:
        self.engine.close()

    def _run(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        order = list(request_ids) if isinstance(request_ids, list) else sorted(pending)
        final: dict[str, RequestOutput] = {}
        while pending:
            outputs = self.engine.step()
            if not outputs and not self.engine.scheduler.running and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine stopped with requests unfinished: {sorted(pending)}")
            for output in outputs:
                if output.finished and output.request_id in pending:
                    final[output.request_id] = output
                    pending.discard(output.request_id)
        return [final[r] for r in order]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    return list(prompts)  # type: ignore[arg-type]


def _broadcast(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return [replace(p) for p in params]
