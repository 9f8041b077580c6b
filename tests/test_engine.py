"""Engine behaviour on the real model: sampling controls, stops, n > 1, aborts, bad input."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from fixtures_model import make_float32_llm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.handoff import IncompatibleHandoffError
from pdserve.engine.layers.int4 import Int4Linear, int4_linear_available
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.llm import LLM
from pdserve.engine.loader import Checkpoint, ModelNotFoundError
from pdserve.engine.outputs import RequestError
from pdserve.engine.sampling_params import SamplingParams

PROMPT = "The three most important inventions in history are"
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)


def make_llm(checkpoint: Checkpoint, **cache: object) -> LLM:
    return make_float32_llm(checkpoint, CacheConfig(**cache))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llm(checkpoint: Checkpoint) -> LLM:
    engine = make_llm(checkpoint)
    yield engine
    engine.close()


def test_seeded_sampling_is_independent_of_the_batch(llm: LLM) -> None:
    (alone,) = llm.generate(PROMPT, SAMPLED)
    others = [SamplingParams(max_tokens=9, temperature=1.0, seed=s) for s in range(3)]
    batch = llm.generate(["Hello", PROMPT, "Write a poem about the sea", "x = 1"], [others[0], SAMPLED, *others[1:]])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    # A different seed gives a different continuation (a fixed, checked pair).
    (other,) = llm.generate(PROMPT, replace(SAMPLED, seed=99))
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_seeded_sampling_is_the_same_split_or_colocated(llm: LLM, checkpoint: Checkpoint) -> None:
    params = replace(SAMPLED, n=2)
    (colocated,) = llm.generate(PROMPT, params)
    decoder = make_llm(checkpoint)
    split = decoder.decode_from(llm.prefill_only(PROMPT, params), params)
    decoder.close()
    assert [c.token_ids for c in split.outputs] == [c.token_ids for c in colocated.outputs]
    assert colocated.outputs[0].token_ids != colocated.outputs[1].token_ids


def test_prefill_layer_hook_sees_every_layer_of_the_prompt(checkpoint: Checkpoint) -> None:
    import torch

    # Small chunks: the hook is called once per layer per chunk, with the chunk's start position.
    config = EngineConfig(
        model=ModelConfig(dtype="float32"),
        scheduler=SchedulerConfig(max_num_batched_tokens=16),
        show_progress=False,
    )
    llm = LLM(config=config, checkpoint=checkpoint)
    calls: list[tuple[int, int, int]] = []
    pieces: dict[int, list[torch.Tensor]] = {}

    def hook(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        calls.append((layer, start, k.shape[0]))
        pieces.setdefault(layer, []).append(torch.stack([k, v]).clone())

    prompt_ids = list(range(300, 340))  # 40 tokens: chunks of 16, 16, 8
    handoff = llm.prefill_only(prompt_ids, SamplingParams(max_tokens=2), kv_hook=hook)
    llm.close()
    assert [c for c in calls if c[0] == 0] == [(0, 0, 16), (0, 16, 16), (0, 32, 8)]
    assert sorted({c[0] for c in calls}) == list(range(checkpoint.architecture.num_layers))
    for layer, chunks in pieces.items():
        assert torch.equal(torch.cat(chunks, dim=1), handoff.kv[layer])


def test_unseeded_sampling_still_varies(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0)
    first, second = llm.generate([PROMPT, PROMPT], params)
    assert first.outputs[0].token_ids != second.outputs[0].token_ids


def test_n_choices_share_the_prompt_blocks(llm: LLM) -> None:
    engine = llm.engine
    prompt_ids = list(range(1000, 1000 + 100))  # 7 blocks, the last one partial
    free_before = engine.stats().num_free_blocks
    request_id = engine.add_request(prompt_ids, SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=7))
    engine.step()  # prefill, first tokens for all three choices, fork
    engine.step()  # first decode step of each choice; forks copied their partial block
    used = free_before - engine.stats().num_free_blocks
    assert used == 7 + 2, "6 shared full blocks + one partial block per choice"
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id and o.finished]
    assert len(outputs[0].outputs) == 3
    assert all(len(c.token_ids) == 4 for c in outputs[0].outputs)
    assert engine.stats().num_free_blocks == free_before


def test_stop_strings_and_stop_tokens(llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    (full,) = llm.generate(PROMPT, greedy)
    text, ids = full.outputs[0].text, full.outputs[0].token_ids
    assert full.outputs[0].finish_reason == "length" and len(ids) == 24
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    (stopped,) = llm.generate(PROMPT, replace(greedy, stop=(stop,)))
    out = stopped.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    (by_token,) = llm.generate(PROMPT, replace(greedy, stop_token_ids=(ids[5],)))
    assert by_token.outputs[0].token_ids == ids[: ids.index(ids[5]) + 1]
    assert by_token.outputs[0].stop_reason == ids[5]


def test_min_tokens_blocks_eos(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Say just 'yes'."}]
    (natural,) = llm.chat(messages, SamplingParams(max_tokens=100))
    natural_length = len(natural.outputs[0].token_ids)
    assert natural.outputs[0].finish_reason == "stop" and natural_length < 90
    eos = natural.outputs[0].token_ids[-1]
    minimum = natural_length + 5
    (longer,) = llm.chat(messages, SamplingParams(max_tokens=100, min_tokens=minimum))
    assert len(longer.outputs[0].token_ids) >= minimum
    assert eos not in longer.outputs[0].token_ids[: minimum - 1]


def test_logprobs_are_reported(llm: LLM) -> None:
    (output,) = llm.generate(PROMPT, SamplingParams(max_tokens=5, logprobs=3))
    choice = output.outputs[0]
    assert choice.logprobs is not None and len(choice.logprobs) == 5
    for token_id, entry in zip(choice.token_ids, choice.logprobs, strict=True):
        assert entry.token_id == token_id and entry.logprob is not None and entry.logprob <= 0
        assert entry.top_logprobs is not None and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0] == (token_id, pytest.approx(entry.logprob))  # greedy: top-1


def test_penalties_change_the_output(llm: LLM) -> None:
    base = SamplingParams(max_tokens=30, ignore_eos=True)
    (plain,) = llm.generate("1, 2, 3, 1, 2, 3, 1, 2, 3,", base)
    (penalized,) = llm.generate("1, 2, 3, 1, 2, 3, 1, 2, 3,", replace(base, repetition_penalty=1.8))
    assert plain.outputs[0].token_ids != penalized.outputs[0].token_ids


def test_streamed_text_never_splits_a_character(llm: LLM) -> None:
    engine = llm.engine
    request_id = engine.add_request("日本の首都は東京です。大阪は", SamplingParams(max_tokens=20, ignore_eos=True))
    seen: list[str] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                seen.append(output.outputs[0].text)
    assert all("\ufffd" not in text for text in seen)
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))


def _run_alone(llm: LLM, params: SamplingParams, resume: list[int]) -> tuple[list[int], str, str | None]:
    engine = llm.engine
    request_id = engine.add_request(PROMPT, params, resume=resume)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.request_id == request_id and o.finished), final)
    assert final is not None
    (choice,) = final.outputs
    return choice.token_ids, choice.text, choice.finish_reason


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=30, ignore_eos=True),
    SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.9, top_p=0.95, seed=77, repetition_penalty=1.3),
], ids=["greedy", "seeded"])
def test_a_resumed_request_continues_exactly(llm: LLM, params: SamplingParams) -> None:
    """What a decode worker does for a stream whose worker died: the first 10 tokens given, it
    draws the same 20 after them (same seed, positions and penalties), and reports all 30."""
    whole = _run_alone(llm, params, [])
    assert len(whole[0]) == 30 and whole[2] == "length"
    assert _run_alone(llm, params, whole[0][:10]) == whole
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks
    with pytest.raises(ValueError, match="no room"):
        llm.engine.add_request(PROMPT, params, resume=whole[0])
    with pytest.raises(ValueError, match="n=1"):
        llm.engine.add_request(PROMPT, replace(params, n=2), resume=whole[0][:3])
    assert llm.engine.request_ids() == []


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    engine = llm.engine
    free_before = engine.stats().num_free_blocks
    keep = engine.add_request(PROMPT, SamplingParams(max_tokens=6))
    drop = engine.add_request(list(range(2000, 2100)), SamplingParams(max_tokens=50, n=2, temperature=1.0))
    engine.step()
    engine.step()
    assert engine.abort(drop)
    assert not engine.abort(drop)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert {c.finish_reason for c in finals[drop].outputs} == {"abort"}
    assert finals[keep].outputs[0].finish_reason in ("stop", "length")
    assert engine.stats().num_free_blocks == free_before


def test_a_request_whose_kv_is_poisoned_fails_alone(llm: LLM) -> None:
    """NaN in one request's imported KV makes its logits NaN: that request ends with an error
    (a 5xx, never a normal finish), and the request decoding beside it gets its solo tokens."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    (solo,) = llm.generate(PROMPT, params)
    handoff = llm.prefill_only("Once upon a time, in a land far away,", params)
    poisoned = replace(handoff, kv=torch.full_like(handoff.kv, float("nan")))
    engine = llm.engine
    victim = engine.add_request(PROMPT, params)
    engine.step()  # the victim's prefill
    bad = engine.import_kv(poisoned, params)
    outputs = {}
    for _ in range(60):
        outputs.update((output.request_id, output) for output in engine.step())
        if not engine.has_unfinished_requests():
            break
    assert outputs[victim].outputs[0].token_ids == solo.outputs[0].token_ids
    assert outputs[victim].outputs[0].finish_reason == "length" and outputs[victim].error is None
    error = outputs[bad].error
    assert error is not None and error.status == 500 and "not finite" in error.message
    assert outputs[bad].finished and outputs[bad].outputs[0].finish_reason == "abort"
    assert engine.request_ids() == [] and engine.stats().num_free_blocks == engine.stats().num_blocks


def test_a_handoff_with_a_token_outside_the_vocabulary_is_refused_alone(llm: LLM) -> None:
    """A peer's first token is checked on import, by both halves (the header's at reserve_kv, a
    pipelined transfer's at commit_kv): taken as is, it would fail the next step's embedding and
    every request in the batch. The neighbour decoding meanwhile gets its solo tokens."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    (solo,) = llm.generate(PROMPT, params)
    handoff = llm.prefill_only("Once upon a time, in a land far away,", params)
    vocab = llm.engine.architecture.vocab_size
    bad_first = [replace(handoff.first_tokens[0], token_id=vocab + 5)]
    engine = llm.engine
    victim = engine.add_request(PROMPT, params)
    engine.step()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.import_kv(replace(handoff, first_tokens=bad_first), params, "bad-header")
    table = engine.reserve_kv(replace(handoff, first_tokens=[]).header, params, "bad-commit")
    engine.runner.write_kv(table, handoff.kv)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.commit_kv("bad-commit", bad_first)
    assert engine.abort("bad-commit", report=False)  # what a transfer does when commit fails
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((output.request_id, output) for output in engine.step())
    assert outputs[victim].outputs[0].token_ids == solo.outputs[0].token_ids
    assert engine.request_ids() == [] and engine.stats().num_free_blocks == engine.stats().num_blocks


def test_an_engine_that_fails_a_request_reports_it_once(llm: LLM) -> None:
    engine = llm.engine
    request_id = engine.add_request(PROMPT, SamplingParams(max_tokens=8))
    assert engine.fail(request_id, RequestError("its detokenizer broke", 500))
    assert not engine.fail(request_id, RequestError("again", 500)) and not engine.abort(request_id)
    (output,) = engine.take_pending_outputs()
    assert output.error == RequestError("its detokenizer broke", 500) and output.finished
    assert [choice.finish_reason for choice in output.outputs] == ["abort"]
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_bad_input_raises_and_the_engine_keeps_serving(checkpoint: Checkpoint) -> None:
    config = EngineConfig(
        model=ModelConfig(dtype="float32", max_model_len=64),
        cache=CacheConfig(num_blocks=16),
        scheduler=SchedulerConfig(),
        show_progress=False,
    )
    llm = LLM(config=config, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="context is 64"):
        llm.generate(list(range(100, 200)))
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([5, 10**6])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    (ok,) = llm.generate("Hello", SamplingParams(max_tokens=3))
    assert len(ok.outputs[0].token_ids) >= 1
    # A handoff from an engine with another block size is refused, naming the field.
    other = make_llm(checkpoint, block_size=32)
    handoff = other.prefill_only("Hello there", SamplingParams(max_tokens=3))
    other.close()
    with pytest.raises(IncompatibleHandoffError, match="block_size"):
        llm.engine.import_kv(handoff)
    tampered = replace(handoff, compatibility={**handoff.compatibility, "block_size": 16, "weights_digest": "0" * 64})
    with pytest.raises(IncompatibleHandoffError, match="weights_digest"):
        llm.engine.import_kv(tampered)
    assert llm.engine.stats().num_free_blocks == 16
    llm.close()


def test_unknown_model_file_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(ModelNotFoundError, match="does-not-exist.gguf"):
        LLM("/nonexistent/does-not-exist.gguf", show_progress=False)


def test_shared_memory_pool_is_created_and_unlinked(checkpoint: Checkpoint) -> None:
    llm = make_llm(checkpoint, allocator="shm", num_blocks=32)
    name = llm.engine.kv_pool.shm_name
    assert name is not None and os.path.exists(f"/dev/shm/{name}")
    (output,) = llm.generate(PROMPT, SamplingParams(max_tokens=4))
    assert len(output.outputs[0].token_ids) == 4
    llm.close()
    assert not os.path.exists(f"/dev/shm/{name}")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stream=st.lists(
        st.tuples(
            st.integers(1, 40),  # prompt length
            st.integers(1, 8),  # max_tokens
            st.integers(1, 2),  # n
            st.sampled_from(["run", "abort-early", "abort-late"]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_blocks_return_after_any_mix_of_requests(llm: LLM, stream: list[tuple[int, int, int, str]]) -> None:
    engine = llm.engine
    initial = engine.stats().num_free_blocks
    actions = {}
    for number, (length, max_tokens, n, action) in enumerate(stream):
        prompt = [(number * 31 + i) % 500 + 100 for i in range(length)]
        request_id = engine.add_request(
            prompt, SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0, seed=number)
        )
        actions[request_id] = action
    for step in range(200):
        if step in (1, 4):
            for request_id, action in actions.items():
                if action == ("abort-early" if step == 1 else "abort-late"):
                    engine.abort(request_id)
        engine.step()
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == initial


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_quantized_weights_generate_the_same_answer(checkpoint: Checkpoint, weight_format: str) -> None:
    config = EngineConfig(
        model=ModelConfig(dtype="float32", weight_format=weight_format),
        cache=CacheConfig(num_blocks=64),
        show_progress=False,
    )
    llm = LLM(config=config, checkpoint=checkpoint)
    model = llm.engine.model
    # int4 layers take the native kernel where it is vectorized here (AVX2 or AVX512-VNNI),
    # and torch's int4 kernel elsewhere; the head of either format the native int8 kernel.
    expected = Int4Linear if weight_format == "int4" and int4_linear_available(model.native) else TorchQuantizedLinear
    layer = model.layers[0].gate_up
    assert isinstance(layer, RowRouted) and isinstance(layer.small, expected)
    if model.native is not None and model.native.int8_linear is not None:
        assert model.lm_head.kernel(1) == "native-int8"
    # A 40-token prompt: its prefill runs dense (torch's int4 kernel) or the native int4 kernel
    # (below its float32 crossover); decoding through the kernel.
    prompt = (
        "Question: which city is the capital of France, and which river flows through it? "
        "Answer: The capital of France is"
    )
    (output,) = llm.generate(prompt, SamplingParams(max_tokens=4))
    llm.close()
    assert output.outputs[0].text.startswith(" Paris")
