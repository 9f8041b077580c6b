"""The engine process's control messages as JSON: sampling parameters in, outputs out.

Every event carries ``time``: the engine process's ``time.monotonic()`` when it happened.

Requests (client → engine process) are objects with an ``op`` and a client-chosen ``id``;
every op gets exactly one ``{"event": "reply", "id": ..., "ok": ...}``. Request progress comes
as further events tagged with ``request_id``:

- ``output``: the request's cumulative choices (as :func:`output_to_json`), ``finished`` last;
  with logprobs, every sampled token and top alternative also carries its text (see
  :class:`TokenTexts`), since the router decodes nothing;
- ``offered``: (only with ``kv: {"mode": "offer", "announce": true}``) the prefill started
  computing and its KV may be pulled from ``kv_address`` under ``kv_cache_id`` already: layer
  by layer if ``pipelined``, else as soon as it ends;
- ``prefilled``: a prefill-only request's KV is held and offered under ``kv_cache_id`` at
  ``kv_address``, with the first sampled token(s);
- ``kv_received``: a pulled KV landed (bytes, seconds, the codec it travelled in);
- ``kv_failed``: a pull failed (``reason``); ``fallback`` says whether the prompt is being
  recomputed here (more ``output`` events follow) or the request ended (``"fail"``);
- ``error``: the request ended without output (``status``, ``message``).

A ``generate`` op carries ``prompt`` (text or token ids) or ``messages`` (chat messages, rendered
with the model's chat template), ``params`` (:class:`SamplingParams` fields) and ``kv``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import weakref
from typing import Any

from pdserve.engine.handoff import sampled_token_to_json
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer

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


def output_to_json(output: RequestOutput, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """An ``output`` event. With ``tokenizer``, logprobs entries carry their tokens' text too:
    ``token`` for the sampled token and ``top_tokens`` (parallel to ``top_logprobs``) for the
    alternatives, each as :meth:`TokenTexts.get` describes it."""
    wanted = tokenizer is not None and any(c.logprobs is not None for c in output.outputs)
    texts = token_texts(tokenizer) if wanted and tokenizer is not None else None
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
                else [_logprob_to_json(t, texts) for t in choice.logprobs],
            }
            for choice in output.outputs
        ],
    }


def _logprob_to_json(token: SampledToken, texts: TokenTexts | None) -> dict[str, Any]:
    data = sampled_token_to_json(token)
    if texts is not None:
        data["token"] = texts.get(token.token_id)
        data["top_tokens"] = [texts.get(token_id) for token_id, _ in token.top_logprobs or ()]
    return data


class TokenTexts:
    """Each token id's text on its own, computed once per id.

    :meth:`get` gives the text as a string when it is the token's exact UTF-8 bytes, else (a
    token holding part of a character) the list of those bytes; the router's
    ``openai_format.token_text_and_bytes`` turns either into ``(text, bytes)``. Byte-level BPE
    vocabularies (GPT-2, Llama 3, SmolLM2) and SentencePiece ones (``▁`` for space, ``<0xNN>``
    byte fallback) give the exact bytes; other decoders fall back to decoding the id alone.
    Special tokens are their content (``<|im_end|>``), as in vLLM.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        backend = tokenizer.backend
        self._tokenizer = tokenizer
        state = backend.decoder.__getstate__() if backend.decoder is not None else b"{}"
        kinds = _decoder_kinds(json.loads(state))
        self._byte_level = "ByteLevel" in kinds
        self._byte_fallback = "ByteFallback" in kinds
        self._space = kinds.get("Metaspace") or kinds.get("Replace")
        self._added = {int(i): t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._cache: dict[int, str | list[int]] = {}

    def get(self, token_id: int) -> str | list[int]:
        text = self._cache.get(token_id)
        if text is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = list(raw)
            self._cache[token_id] = text
        return text

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:  # past the tokenizer's vocabulary (a padded embedding row)
            return b""
        if self._byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
        elif self._space is not None:
            match = _BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
            if match:
                return bytes([int(match.group(1), 16)])
            return piece.replace(self._space, " ").encode()
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TEXTS: weakref.WeakKeyDictionary[Tokenizer, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Tokenizer) -> TokenTexts:
    """The (shared, growing) per-id text cache of ``tokenizer``."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


def _decoder_kinds(state: dict[str, Any]) -> dict[str, str]:
    """The decoder types in a (possibly Sequence) decoder's JSON; for ``Metaspace`` and a
    ``Replace`` of one string, the value is what stands for a space."""
    kinds: dict[str, str] = {}
    for decoder in state.get("decoders") or [state]:
        kind = str(decoder.get("type"))
        if kind == "Metaspace":
            kinds[kind] = str(decoder.get("replacement", "\u2581"))
        elif kind == "Replace" and decoder.get("content") == " ":
            kinds[kind] = str((decoder.get("pattern") or {}).get("String", "\u2581"))
        else:
            kinds[kind] = ""
    return kinds


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the others
    for the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    decoder = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + extra)] = b
            extra += 1
    return decoder
