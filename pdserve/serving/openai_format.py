"""Engine output events -> OpenAI response bodies and stream chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def usage(event: dict[str, Any]) -> dict[str, int]:
    prompt = int(event["num_prompt_tokens"])
    completion = sum(len(choice["token_ids"]) for choice in event["outputs"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request_id: str, model: str, created: int, chat: bool, event: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for choice in event["outputs"]:
        finish = _finish_reason(choice["finish_reason"])
        if chat:
            choices.append({
                "index": choice["index"], "message": {"role": "assistant", "content": choice["text"]},
                "finish_reason": finish, "logprobs": None,
            })
        else:
            choices.append({"index": choice["index"], "text": choice["text"], "finish_reason": finish, "logprobs": None})
    return {
        "id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
        "model": model, "choices": choices, "usage": usage(event),
    }


@dataclass
class StreamState:
    """What has been streamed so far, per choice, to turn cumulative outputs into deltas."""

    request_id: str
    model: str
    created: int
    chat: bool
    sent_text: dict[int, str] = field(default_factory=dict)
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
            lines.append(self._sse(self._choice(index, delta, finish, first)))
        return lines

    def usage_chunk(self, event: dict[str, Any]) -> str:
        return self._sse({**self._envelope(), "choices": [], "usage": usage(event)})

    def _choice(self, index: int, delta: str, finish: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            content: dict[str, Any] = {"content": delta}
            if first:
                content["role"] = "assistant"
            choice = {"index": index, "delta": content, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": None}
        return {**self._envelope(), "choices": [choice]}

    def _envelope(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def _sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"


def _finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
