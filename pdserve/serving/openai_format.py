"""Engine output events -> OpenAI response bodies and stream chunks.

Logprobs come in an event's choices as the worker sends them (``pdserve.runtime.protocol``):
per sampled token its id, logprob, top alternatives and their texts. They become OpenAI's
shapes here: ``{tokens, token_logprobs, top_logprobs, text_offset}`` for completions (offsets
count characters of the completion text, from 0, as vLLM does without echo) and
``{content: [{token, logprob, bytes, top_logprobs}]}`` for chat. A logprob of -inf (a token
that could not be sampled) is written as -9999.0, as OpenAI does, to keep the JSON valid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MIN_LOGPROB = -9999.0
"""What a -inf logprob is written as."""


def usage(event: dict[str, Any]) -> dict[str, int]:
    prompt = int(event["num_prompt_tokens"])
    completion = sum(len(choice["token_ids"]) for choice in event["outputs"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request_id: str, model: str, created: int, chat: bool, event: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for choice in event["outputs"]:
        finish = _finish_reason(choice["finish_reason"])
        entries = choice.get("logprobs")
        if chat:
            logprobs = None if entries is None else chat_logprobs(entries)
            choices.append({
                "index": choice["index"], "message": {"role": "assistant", "content": choice["text"]},
                "finish_reason": finish, "logprobs": logprobs,
            })
        else:
            logprobs = None if entries is None else completion_logprobs(entries)[0]
            choices.append({"index": choice["index"], "text": choice["text"], "finish_reason": finish,
                            "logprobs": logprobs})
    return {
        "id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
        "model": model, "choices": choices, "usage": usage(event),
    }


def completion_logprobs(entries: list[dict[str, Any]], text_offset: int = 0) -> tuple[dict[str, Any], int]:
    """A completion choice's ``logprobs`` for these tokens, the first at ``text_offset``; and the
    offset after the last. ``top_logprobs`` maps the alternatives' texts to their logprobs, plus
    the sampled token's (so up to N + 1 entries, as OpenAI documents)."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    for entry in entries:
        text, _ = _text_and_bytes(entry.get("token"), entry["token_id"])
        logprob = _logprob(entry["logprob"])
        alternatives: dict[str, float] = {}
        for top_text, _, top_logprob in _alternatives(entry):
            alternatives.setdefault(top_text, _logprob(top_logprob))
        alternatives.setdefault(text, logprob)
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(text)
    body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
    return body, text_offset


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat choice's ``logprobs`` for these tokens."""
    content = []
    for entry in entries:
        text, raw = _text_and_bytes(entry.get("token"), entry["token_id"])
        top = [
            {"token": top_text, "logprob": _logprob(top_logprob), "bytes": top_raw}
            for top_text, top_raw, top_logprob in _alternatives(entry)
        ]
        content.append({"token": text, "logprob": _logprob(entry["logprob"]), "bytes": raw, "top_logprobs": top})
    return {"content": content}


@dataclass
class StreamState:
    """What has been streamed so far, per choice, to turn cumulative outputs into deltas.

    Text and tokens are tracked apart: a token that ends inside a character (or may start a
    stop string) shows in the text later than in the tokens. A chunk carries the logprobs of
    every token not sent before it, so the chunks' logprobs add up to the whole response's.
    """

    request_id: str
    model: str
    created: int
    chat: bool
    sent_text: dict[int, str] = field(default_factory=dict)
    sent_tokens: dict[int, int] = field(default_factory=dict)
    """Per choice, how many tokens' logprobs were sent."""
    text_offsets: dict[int, int] = field(default_factory=dict)
    """Per choice, the completions ``text_offset`` of the next token."""
    finished: set[int] = field(default_factory=set)

    def chunks(self, event: dict[str, Any]) -> list[str]:
        """SSE ``data:`` lines for one output event."""
        lines = []
        for choice in event["outputs"]:
            index = choice["index"]
            if index in self.finished:
                continue
            first = index not in self.sent_text
            before = self.sent_text.get(index, "")
            delta = choice["text"][len(before):] if choice["text"].startswith(before) else choice["text"]
            finish = _finish_reason(choice["finish_reason"])
            if not delta and finish is None and not (first and self.chat):
                continue
            self.sent_text[index] = choice["text"]
            if finish is not None:
                self.finished.add(index)
            lines.append(self._sse(self._choice(index, delta, finish, first, self._logprobs(choice))))
        return lines

    def usage_chunk(self, event: dict[str, Any]) -> str:
        return self._sse({**self._envelope(), "choices": [], "usage": usage(event)})

    def _logprobs(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        """The logprobs of the choice's tokens not sent yet (None: not asked for, or none new)."""
        entries = choice.get("logprobs")
        index = choice["index"]
        sent = self.sent_tokens.get(index, 0)
        if entries is None or len(entries) <= sent:
            return None
        new = entries[sent:]
        self.sent_tokens[index] = len(entries)
        if self.chat:
            return chat_logprobs(new)
        body, self.text_offsets[index] = completion_logprobs(new, self.text_offsets.get(index, 0))
        return body

    def _choice(
        self, index: int, delta: str, finish: str | None, first: bool, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        if self.chat:
            content: dict[str, Any] = {"content": delta}
            if first:
                content["role"] = "assistant"
            choice = {"index": index, "delta": content, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": logprobs}
        return {**self._envelope(), "choices": [choice]}

    def _envelope(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def _sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"


def _finish_reason(reason: str | None) -> str | None:
    """The OpenAI finish_reason of an engine one. "abort" never gets here (dispatch.py turns it
    into an error), and must never become "stop": a cut answer would look whole."""
    if reason is None or reason in ("stop", "length"):
        return reason
    raise ValueError(f"finish_reason {reason!r} has no OpenAI equivalent")


def _logprob(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else MIN_LOGPROB


def token_text_and_bytes(value: str | list[int]) -> tuple[str, list[int]]:
    """A token as the worker describes it (``protocol.TokenTexts``: its text, or its bytes when
    they are not whole characters) -> (text, UTF-8 bytes). Bytes that are not whole characters
    show as U+FFFD in the text, as the engine's own decoding shows them."""
    if isinstance(value, str):
        return value, list(value.encode())
    return bytes(value).decode("utf-8", errors="replace"), list(value)


def _text_and_bytes(value: str | list[int] | None, token_id: int) -> tuple[str, list[int]]:
    # A worker that sent no text (no tokenizer at hand) still gets an answer, vLLM's way.
    return token_text_and_bytes(f"token_id:{token_id}" if value is None else value)


def _alternatives(entry: dict[str, Any]) -> list[tuple[str, list[int], float | None]]:
    """The top alternatives as (text, bytes, logprob), best first."""
    top = entry.get("top_logprobs") or []
    texts = entry.get("top_tokens") or [None] * len(top)
    alternatives = []
    for (token_id, logprob), value in zip(top, texts, strict=True):
        text, raw = _text_and_bytes(value, int(token_id))
        alternatives.append((text, raw, logprob))
    return alternatives
