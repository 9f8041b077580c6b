"""Output events on the worker -> router wire carry what is new, not everything so far.

The engine reports each request's whole output at every step (text, token ids, logprobs so far).
Sent as is, a stream of n tokens moves O(n^2) bytes of JSON between a worker and the router
(hundreds of megabytes for a long answer with logprobs). So the worker sends deltas
(:class:`DeltaEncoder`, one per request stream) and the router rebuilds the whole output
(:class:`DeltaDecoder`) for the code that reads it. Each choice also carries ``num_tokens``, its
token count so far. Should a choice's visible text ever not extend what was sent (it is held
back at a partial stop string, then cut at a whole one, so it only grows), the choice carries
its whole text with ``text_reset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Sent:
    text: str = ""
    tokens: int = 0
    logprobs: int = 0


class DeltaEncoder:
    """Turns one request's cumulative ``output`` events into delta events (a worker's side)."""

    def __init__(self) -> None:
        self._sent: dict[int, _Sent] = {}

    def encode(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") != "output":
            return event
        return {**event, "delta": True, "outputs": [self._choice(choice) for choice in event["outputs"]]}

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        sent = self._sent.setdefault(int(choice["index"]), _Sent())
        text, token_ids, logprobs = choice["text"], choice["token_ids"], choice.get("logprobs")
        delta = {**choice, "token_ids": token_ids[sent.tokens:], "num_tokens": len(token_ids)}
        if text.startswith(sent.text):
            delta["text"] = text[len(sent.text):]
        else:
            delta["text"], delta["text_reset"] = text, True
        if logprobs is not None:
            delta["logprobs"] = logprobs[sent.logprobs:]
            sent.logprobs = len(logprobs)
        sent.text, sent.tokens = text, len(token_ids)
        return delta


@dataclass
class _Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None


class DeltaDecoder:
    """Rebuilds one request's cumulative ``output`` events from delta events (the router's side);
    any other event passes through. A rebuilt event's lists grow in place as later events are
    decoded (copying them every time would be quadratic): read an event before the next."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}

    def decode(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") != "output" or not event.get("delta"):
            return event
        outputs = []
        for delta in event["outputs"]:
            index = int(delta["index"])
            choice = self._choices.setdefault(index, _Choice(index))
            choice.text = delta["text"] if delta.get("text_reset") else choice.text + delta["text"]
            choice.token_ids.extend(delta["token_ids"])
            if delta.get("logprobs") is not None:
                if choice.logprobs is None:
                    choice.logprobs = []
                choice.logprobs.extend(delta["logprobs"])
            if len(choice.token_ids) != int(delta["num_tokens"]):
                raise ValueError(f"choice {index}: {len(choice.token_ids)} tokens received, "
                                 f"the worker counts {delta['num_tokens']} (a lost event)")
            outputs.append({
                "index": index, "text": choice.text, "token_ids": choice.token_ids,
                "finish_reason": delta.get("finish_reason"), "stop_reason": delta.get("stop_reason"),
                "logprobs": choice.logprobs,
            })
        rebuilt = {key: value for key, value in event.items() if key not in ("delta", "outputs")}
        return {**rebuilt, "outputs": outputs}
