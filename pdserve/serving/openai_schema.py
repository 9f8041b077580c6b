"""The OpenAI request bodies this server accepts, validated (a violation is a 400, never a 500).

Defaults follow the OpenAI API (temperature 1, completions max_tokens 16). Fields OpenAI has and
pdserve does not serve yet are refused by name rather than silently ignored. A few vLLM-style
extensions (top_k, min_p, repetition_penalty, min_tokens, ignore_eos) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pdserve.engine.sampling_params import REPETITION_PENALTY_RANGE
from pdserve.serving.errors import APIError

MAX_N = 16
MAX_STOP_CHARS = 1000
"""Longest stop string: each is searched for in the tail of the text after every token."""


def _valid_text(value: Any) -> Any:
    """``value`` if every string in it is valid Unicode text; JSON's ``\ud800`` escapes decode
    to lone surrogates, which no tokenizer can encode (a 400 here, never a 500 later)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate, e.g. \\ud800)") from None
    elif isinstance(value, list):
        for item in value:
            _valid_text(item)
    elif isinstance(value, dict):
        for item in value.values():
            _valid_text(item)
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class KVTransferParams(BaseModel):
    """What ``POST /v1/prefill`` returned: the offer's id. ``kv_address`` is accepted (clients
    send back what they got) and ignored: the router pulls from the address its own prefill
    worker gave for that id (offer_book.py), never one a client names."""

    model_config = ConfigDict(extra="forbid")

    kv_cache_id: str = Field(min_length=1, max_length=200)
    kv_address: str | None = Field(None, max_length=300)


class SamplingFields(BaseModel):
    # A field pdserve does not know is refused by name (400), never silently ignored: a client
    # sending response_format or logit_bias must learn that they had no effect.
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM-style extensions
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # pdserve extension, the two-phase form: redeem a prefill made by POST /v1/prefill
    kv_transfer_params: KVTransferParams | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return _valid_text(value)

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return _valid_text(value)

    def sampling_params(self, max_tokens: int) -> dict[str, Any]:
        """The engine's SamplingParams fields."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "max_tokens": max_tokens, "min_tokens": min(self.min_tokens, max_tokens),
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "n": self.n, "seed": self.seed, "stop": stops,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "ignore_eos": self.ignore_eos,
            "logprobs": self.engine_logprobs(),
        }

    def engine_logprobs(self) -> int | None:
        """The engine's ``logprobs``: None for none, else how many top alternatives per token."""
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    """The sampled token's logprob and the ``logprobs`` most likely alternatives, per token."""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return _valid_text(value)

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError("one prompt per request: send a batch as separate requests", param="prompt")
            prompt = prompt[0]
        if prompt == "" or prompt == []:
            raise APIError("prompt is empty", param="prompt")
        if self.echo or self.suffix is not None or (self.best_of not in (None, 1, self.n)):
            raise APIError("echo, suffix and best_of are not supported", param="echo")
        return prompt  # type: ignore[return-value]

    def engine_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _valid_text(value)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs is only allowed with logprobs: true")
        return value

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        if self.tools:
            raise APIError("tools are not supported", param="tools")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class PrefillRequest(CompletionRequest):
    """``POST /v1/prefill`` (pdserve extension): a completion's or a chat's fields, prefilled only.

    Sampling fields matter here: the prefill samples the first token. Send the same ones (and
    the same prompt or messages) with the completion that redeems the KV.
    """

    prompt: str | list[int] | list[str] | list[list[int]] | None = None  # type: ignore[assignment]
    messages: list[ChatMessage] | None = None

    def template_messages(self) -> list[dict[str, str]]:
        assert self.messages is not None
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def single_prompt(self) -> str | list[int]:
        if self.prompt is None:
            raise APIError("send a prompt or messages", param="prompt")
        return super().single_prompt()
