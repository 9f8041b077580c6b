"""Output events cross the worker -> router wire as deltas and come back whole."""

from __future__ import annotations

import json

import pytest

from pdserve.serving.output_deltas import DeltaDecoder, DeltaEncoder


def _output(texts: list[str], tokens: list[list[int]], finish: str | None = None, logprobs: bool = False) -> dict:
    return {"event": "output", "request_id": "r", "finished": finish is not None, "num_prompt_tokens": 3,
            "outputs": [{"index": i, "text": text, "token_ids": ids, "finish_reason": finish, "stop_reason": None,
                         "logprobs": [{"logprob": -0.5, "token_id": t} for t in ids] if logprobs else None}
                        for i, (text, ids) in enumerate(zip(texts, tokens, strict=True))]}


def test_deltas_rebuild_the_cumulative_events_exactly() -> None:
    steps = [
        _output(["He", "A"], [[1], [7]], logprobs=True),
        _output(["Hello", "A b"], [[1, 2], [7, 8]], logprobs=True),
        _output(["Hello", "A b"], [[1, 2], [7, 8]], logprobs=True),  # nothing new (a held-back tail)
        _output(["Hello wor", "A b c"], [[1, 2, 3, 4], [7, 8, 9]], logprobs=True),
        _output(["Hello world", "A b c"], [[1, 2, 3, 4, 5], [7, 8, 9]], finish="length", logprobs=True),
    ]
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    for step in steps:
        wire = json.loads(json.dumps(encoder.encode(step)))
        assert wire["delta"] and all("num_tokens" in choice for choice in wire["outputs"])
        rebuilt = decoder.decode(wire)
        assert rebuilt["outputs"] == step["outputs"] and rebuilt["finished"] == step["finished"]
    # Other events pass through both untouched.
    kv = {"event": "kv_received", "request_id": "r", "seconds": 0.1}
    assert decoder.decode(encoder.encode(kv)) == kv


def test_a_text_that_does_not_extend_what_was_sent_is_sent_whole() -> None:
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    decoder.decode(encoder.encode(_output(["abc"], [[1]])))
    wire = encoder.encode(_output(["abX"], [[1, 2]]))
    assert wire["outputs"][0]["text_reset"] and wire["outputs"][0]["text"] == "abX"
    assert decoder.decode(wire)["outputs"][0]["text"] == "abX"


def test_a_lost_delta_is_an_error_not_a_silently_short_answer() -> None:
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    decoder.decode(encoder.encode(_output(["a"], [[1]])))
    encoder.encode(_output(["ab"], [[1, 2]]))  # lost on the way
    with pytest.raises(ValueError, match="lost event"):
        decoder.decode(encoder.encode(_output(["abc"], [[1, 2, 3]])))


def test_the_wire_grows_linearly_with_the_output() -> None:
    encoder = DeltaEncoder()
    steps = [_output(["x" * n], [list(range(n))], logprobs=True) for n in range(1, 1001)]
    sent = sum(len(json.dumps(encoder.encode(step))) for step in steps)
    whole = len(json.dumps(steps[-1]))
    cumulative = sum(len(json.dumps(step)) for step in steps)
    # The output once, plus a bounded envelope per event; cumulative events resend it all each time.
    assert sent < 2 * whole + 300 * len(steps), (sent, whole)
    assert cumulative > 50 * sent
