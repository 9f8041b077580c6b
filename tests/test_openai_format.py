"""Logprobs from engine output events to OpenAI bodies and stream chunks (no server, no model):
the worker's token texts (``protocol``), the request fields (``openai_schema``) and the
response shapes (``openai_format``)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models

from pdserve.engine.outputs import CompletionOutput, RequestOutput
from pdserve.engine.sampler import SampledToken
from pdserve.engine.tokenizer import Tokenizer, TokenizerConfig
from pdserve.runtime.protocol import TokenTexts, output_to_json
from pdserve.serving.errors import APIError
from pdserve.serving.openai_format import (
    MIN_LOGPROB,
    StreamState,
    completion_body,
    token_text_and_bytes,
)
from pdserve.serving.openai_schema import ChatCompletionRequest, CompletionRequest

INF = float("-inf")
E_ACUTE = list("é".encode())  # [0xC3, 0xA9]: one character, two tokens below

# Token ids as a worker describes them: "Hi", " there", the two halves of "é", and "<|end|>".
TOKENS: dict[int, str | list[int]] = {
    10: "Hi", 11: " there", 12: [E_ACUTE[0]], 13: [E_ACUTE[1]], 14: "<|end|>", 15: "!",
}


def entry(token_id: int, logprob: float, *top: tuple[int, float]) -> dict[str, Any]:
    """One logprobs entry of an output event, as ``protocol.output_to_json`` writes it."""
    return {
        "token_id": token_id, "logprob": logprob, "top_logprobs": [list(pair) for pair in top],
        "token": TOKENS[token_id], "top_tokens": [TOKENS[token_id] for token_id, _ in top],
    }


ENTRIES = [
    entry(10, -0.25, (10, -0.25), (15, -1.5)),
    entry(11, -0.5, (11, -0.5), (14, INF)),  # an impossible alternative: -inf
    entry(12, -1.0, (12, -1.0), (10, -2.0)),
    entry(13, INF, (15, -0.1), (10, -3.0)),  # a sampled token with -inf
    entry(15, -0.75, (15, -0.75), (11, -1.0)),
]
TEXTS = ["Hi", "Hi there", "Hi there", "Hi thereé", "Hi thereé!"]
"""The choice's text after each token: the first half of "é" adds nothing yet."""


def event(count: int, finished: bool = False, logprobs: bool = True) -> dict[str, Any]:
    """The cumulative output event after ``count`` tokens."""
    return {
        "event": "output", "request_id": "r", "finished": finished, "num_prompt_tokens": 4, "num_cached_tokens": 0,
        "outputs": [{
            "index": 0, "text": TEXTS[count - 1], "token_ids": [e["token_id"] for e in ENTRIES[:count]],
            "finish_reason": "length" if finished else None, "stop_reason": None,
            "logprobs": ENTRIES[:count] if logprobs else None,
        }],
    }


def strict_json(body: Any) -> Any:
    """``body`` through JSON as a strict parser (no Infinity, no NaN) reads it."""
    return json.loads(json.dumps(body, allow_nan=False))


def test_completions_logprobs_in_openai_shape() -> None:
    body = strict_json(completion_body("cmpl-r", "m", 0, False, event(5, finished=True)))
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Hi", " there", "\ufffd", "\ufffd", "!"]
    assert logprobs["token_logprobs"] == [-0.25, -0.5, -1.0, MIN_LOGPROB, -0.75]
    assert logprobs["text_offset"] == [0, 2, 8, 9, 10]
    assert logprobs["top_logprobs"][0] == {"Hi": -0.25, "!": -1.5}
    assert logprobs["top_logprobs"][1] == {" there": -0.5, "<|end|>": MIN_LOGPROB}
    # The sampled token is always among them, even when it is not a top alternative (N + 1).
    assert logprobs["top_logprobs"][3] == {"!": -0.1, "Hi": -3.0, "\ufffd": MIN_LOGPROB}
    assert body["usage"]["completion_tokens"] == 5


def test_chat_logprobs_in_openai_shape() -> None:
    body = strict_json(completion_body("chatcmpl-r", "m", 0, True, event(5, finished=True)))
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hi", " there", "\ufffd", "\ufffd", "!"]
    assert content[0] == {
        "token": "Hi", "logprob": -0.25, "bytes": list(b"Hi"),
        "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": list(b"Hi")},
                         {"token": "!", "logprob": -1.5, "bytes": [33]}],
    }
    assert content[1]["top_logprobs"][1] == {"token": "<|end|>", "logprob": MIN_LOGPROB, "bytes": list(b"<|end|>")}
    # Partial characters keep their exact bytes: together they are the "é" of the text.
    assert content[2]["bytes"] + content[3]["bytes"] == E_ACUTE
    assert content[3]["logprob"] == MIN_LOGPROB


def test_no_logprobs_asked_gives_null() -> None:
    for chat in (False, True):
        body = completion_body("r", "m", 0, chat, event(5, finished=True, logprobs=False))
        assert body["choices"][0]["logprobs"] is None
        state = StreamState("r", "m", 0, chat)
        chunks = [json.loads(line[len("data: "):]) for line in state.chunks(event(5, finished=True, logprobs=False))]
        assert all(c["choices"][0]["logprobs"] is None for c in chunks)


def stream(chat: bool, counts: list[int]) -> list[dict[str, Any]]:
    state = StreamState("r", "m", 0, chat)
    lines = []
    for count in counts:
        lines += state.chunks(event(count, finished=count == len(ENTRIES)))
    return [strict_json(json.loads(line[len("data: "):].strip())) for line in lines]


@pytest.mark.parametrize("counts", [[1, 2, 3, 4, 5], [2, 3, 5], [5]], ids=["per-token", "split", "whole"])
def test_streamed_completion_logprobs_add_up_to_the_whole(counts: list[int]) -> None:
    whole = strict_json(completion_body("r", "m", 0, False, event(5, finished=True)))["choices"][0]["logprobs"]
    chunks = stream(False, counts)
    joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        logprobs = chunk["choices"][0]["logprobs"]
        for key in joined:
            joined[key] += logprobs[key] if logprobs else []
    assert joined == whole
    assert "".join(c["choices"][0]["text"] for c in chunks) == TEXTS[-1]


def test_streamed_chat_logprobs_follow_tokens_not_text() -> None:
    chunks = stream(True, [1, 2, 3, 4, 5])
    # Token 3 (half a character) adds no text, so no chunk: its logprobs ride with token 4's.
    per_chunk = [[c["token"] for c in (chunk["choices"][0]["logprobs"] or {}).get("content", [])] for chunk in chunks]
    assert per_chunk == [["Hi"], [" there"], ["\ufffd", "\ufffd"], ["!"]]
    assert [chunk["choices"][0]["delta"]["content"] for chunk in chunks] == ["Hi", " there", "é", "!"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    whole = completion_body("r", "m", 0, True, event(5, finished=True))["choices"][0]["logprobs"]["content"]
    streamed = [c for chunk in chunks for c in (chunk["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == strict_json(whole)


def test_token_text_and_bytes() -> None:
    assert token_text_and_bytes(" é") == (" é", [32, *E_ACUTE])
    assert token_text_and_bytes([32, E_ACUTE[0]]) == (" \ufffd", [32, E_ACUTE[0]])


# ---- the worker side: token texts from a tokenizer ---------------------------------------------


def byte_level_tokenizer() -> Tokenizer:
    # GPT-2's alphabet: "Ġ" is a space, "Ã" and "©" are the bytes 0xC3 and 0xA9.
    vocab = {"H": 0, "t": 1, "Ġ": 2, "Ã": 3, "©": 4, "Ã©": 5, "Ġt": 6}
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=[("Ã", "©"), ("Ġ", "t")]))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|end|>"])
    return Tokenizer(backend, TokenizerConfig(eos_token="<|end|>"))


def sentencepiece_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "▁hello": 3, "x": 4}
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(backend, TokenizerConfig())


def test_token_texts_of_a_byte_level_vocabulary() -> None:
    tokenizer = byte_level_tokenizer()
    texts = TokenTexts(tokenizer)
    end = tokenizer.token_to_id("<|end|>")
    assert [texts.get(i) for i in (0, 2, 5, 6)] == ["H", " ", "é", " t"]
    assert texts.get(3) == [0xC3] and texts.get(4) == [0xA9]
    assert texts.get(end) == "<|end|>"
    assert texts.get(10**6) == ""  # an id past the vocabulary (a padded embedding row)


def test_token_texts_of_a_sentencepiece_vocabulary() -> None:
    texts = TokenTexts(sentencepiece_tokenizer())
    # The leading space stays: inside a completion, "▁hello" is " hello".
    assert texts.get(3) == " hello" and texts.get(4) == "x"
    assert texts.get(1) == [0xC3] and texts.get(2) == [0xA9]


def test_output_event_carries_token_texts() -> None:
    tokenizer = byte_level_tokenizer()
    sampled = [SampledToken(3, -0.5, ((3, -0.5), (0, -1.0))), SampledToken(4, -0.1, ((4, -0.1), (2, INF)))]
    output = RequestOutput("r", [0, 1], [CompletionOutput(0, "é", [3, 4], sampled)], finished=False)
    data = json.loads(json.dumps(output_to_json(output, tokenizer)))
    first, second = data["outputs"][0]["logprobs"]
    assert (first["token_id"], first["token"], first["top_tokens"]) == (3, [0xC3], [[0xC3], "H"])
    assert (second["token"], second["top_tokens"]) == ([0xA9], [[0xA9], " "])
    assert math.isinf(second["top_logprobs"][1][1])
    body = strict_json(completion_body("r", "m", 0, True, data))
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0]["bytes"] + content[1]["bytes"] == E_ACUTE
    assert content[1]["top_logprobs"][1] == {"token": " ", "logprob": MIN_LOGPROB, "bytes": [32]}
    # Without logprobs (or without a tokenizer) the event is as before.
    plain = RequestOutput("r", [0], [CompletionOutput(0, "H", [0], None)], finished=True)
    assert output_to_json(plain, tokenizer)["outputs"][0]["logprobs"] is None
    assert "token" not in output_to_json(output)["outputs"][0]["logprobs"][0]


# ---- the request fields ------------------------------------------------------------------------


def test_completion_logprobs_field() -> None:
    request = CompletionRequest(model="m", prompt="hi", logprobs=3)
    assert request.single_prompt() == "hi"
    assert request.sampling_params(8)["logprobs"] == 3
    assert CompletionRequest(model="m", prompt="hi").sampling_params(8)["logprobs"] is None
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", logprobs=6)
    with pytest.raises(APIError):
        CompletionRequest(model="m", prompt="hi", logprobs=1, echo=True).single_prompt()


def test_chat_logprobs_fields() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert ChatCompletionRequest(model="m", messages=messages).sampling_params(8)["logprobs"] is None
    assert ChatCompletionRequest(model="m", messages=messages, logprobs=True).sampling_params(8)["logprobs"] == 0
    both = ChatCompletionRequest(model="m", messages=messages, logprobs=True, top_logprobs=20)
    assert both.template_messages() == [{"role": "user", "content": "hi"}]
    assert both.sampling_params(8)["logprobs"] == 20
    for fields in ({"top_logprobs": 2}, {"top_logprobs": 0, "logprobs": False}):
        with pytest.raises(ValidationError) as raised:
            ChatCompletionRequest(model="m", messages=messages, **fields)
        assert raised.value.errors()[0]["loc"] == ("top_logprobs",)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=messages, logprobs=True, top_logprobs=21)
