"""A stream whose decode worker died after tokens were streamed, resumed on another worker.

The new worker gets the request again with ``resume``: the output token ids streamed so far. It
prefills prompt + those tokens locally and samples on from position ``len(resume)`` with the
request's seed (the router draws one when the client gave none, router.py), so greedy and
sampled answers alike continue token for token as the dead worker would have, up to the two
workers' numerics (a dense prefill worker standing in for an int4 decode worker agrees on the
past but may pick differently at a near-tie). Its outputs include the resumed tokens and their
text, so what the router sees stays cumulative and the client is sent only what is new: no
gap, no repeat. Logprobs are the one thing the new worker cannot report for tokens it did not
draw: the router keeps those it received and puts them in front of the new worker's.

Only a request with one choice (n=1) resumes; several choices that diverged end with an
explicit error as before. So does a request the engine itself failed (an ``error`` event: its
own numbers or parameters, which another worker would meet again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.serving.errors import APIError


class RequestFailed(APIError):
    """The engine ended this request alone (an ``error`` event), not a worker that failed."""


def resumable(params: dict[str, Any], error: APIError) -> bool:
    """Whether a request cut by ``error`` after tokens were streamed may go on elsewhere."""
    return int(params.get("n") or 1) == 1 and error.status >= 500 and not isinstance(error, RequestFailed)


def is_whole(event: dict[str, Any]) -> bool:
    """Every choice finished: nothing is left to resume (the worker died after its last event)."""
    return all(choice.get("finish_reason") is not None for choice in event["outputs"])


@dataclass
class Resumption:
    """What the client was sent before the worker died, and how the next worker's events continue it."""

    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None
    """The logprobs received for ``token_ids`` (None: not asked for)."""

    @classmethod
    def after(cls, last: dict[str, Any]) -> Resumption:
        """From the last output event passed on (copied: its lists belonged to the dead stream)."""
        (choice,) = last["outputs"]
        logprobs = choice.get("logprobs")
        return cls(list(choice["token_ids"]), None if logprobs is None else list(logprobs))

    def body(self, local: dict[str, Any]) -> dict[str, Any]:
        """The next worker's body: prefill the prompt and the tokens so far here, then go on."""
        return {**local, "resume": self.token_ids}

    def continued(self, event: dict[str, Any]) -> dict[str, Any]:
        """An output event of the next worker, with the earlier logprobs in front of its own."""
        if self.logprobs is None:
            return event
        (choice,) = event["outputs"]
        new = choice.get("logprobs") or []
        # The new worker's list grows in place event by event (output_deltas.py): append only
        # what is new since the last event, so a long answer does not copy its logprobs each time.
        self.logprobs.extend(new[len(self.logprobs) - len(self.token_ids):])
        return {**event, "outputs": [{**choice, "logprobs": self.logprobs}]}
