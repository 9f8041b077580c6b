"""The engine process's control messages as JSON: sampling parameters in, outputs out.

Every event carries ``time``: the engine process's ``time.monotonic()`` when it happened.

Requests (client → engine process) are objects with an ``op`` and a client-chosen ``id``;
every op gets exactly one ``{"event": "reply", "id": ..., "ok": ...}``. Request progress comes
as further events tagged with ``request_id``:

- ``output``: the request's cumulative choices (as :func:`output_to_json`), ``finished`` last;
- ``prefilled``: a prefill-only request's KV is held and offered under ``kv_cache_id`` at
  ``kv_address``, with the first sampled token(s);
- ``kv_received``: a pulled KV landed (bytes, seconds);
- ``kv_failed``: a pull failed (``reason``); ``fallback`` says whether the prompt is being
  recomputed here (more ``output`` events follow) or the request ended (``"fail"``);
- ``error``: the request ended without output (``status``, ``message``).

A ``generate`` op carries ``prompt`` (text or token ids) or ``messages`` (chat messages, rendered
with the model's chat template), ``params`` (:class:`SamplingParams` fields) and ``kv``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pdserve.engine.handoff import sampled_token_to_json
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams

_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}


def is_last_event(event: dict[str, Any]) -> bool:
    """Whether no further event of this request will follow."""
    kind = event.get("event")
    if kind == "output":
        return bool(event.get("finished"))
    if kind in ("prefilled", "error"):
        return True
    return kind == "kv_failed" and event.get("fallback") == "fail"


def params_from_json(data: dict[str, Any] | None) -> SamplingParams:
    """Raises ValueError for unknown fields or invalid values (the caller answers 400)."""
    data = dict(data or {})
    unknown = sorted(set(data) - _PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    for name in ("stop", "stop_token_ids"):
        if name in data and isinstance(data[name], list):
            data[name] = tuple(data[name])
    try:
        return SamplingParams(**data)
    except TypeError as error:
        raise ValueError(str(error)) from None


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    data = {name: getattr(params, name) for name in _PARAM_NAMES}
    data["stop"], data["stop_token_ids"] = list(params.stop), list(params.stop_token_ids)
    return data


def output_to_json(output: RequestOutput) -> dict[str, Any]:
    return {
        "event": "output",
        "request_id": output.request_id,
        "finished": output.finished,
        "num_prompt_tokens": len(output.prompt_token_ids),
        "num_cached_tokens": output.num_cached_tokens,
        "outputs": [
            {
                "index": choice.index,
                "text": choice.text,
                "token_ids": choice.token_ids,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
                "logprobs": None
                if choice.logprobs is None
                else [sampled_token_to_json(t) for t in choice.logprobs],
            }
            for choice in output.outputs
        ],
    }
