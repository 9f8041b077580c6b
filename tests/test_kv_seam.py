"""The engine half of a transfer: held KV on the sender, reserve/write/commit on the receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fixtures_model import make_float32_llm

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import CacheConfig
from pdserve.engine.llm import LLM
from pdserve.engine.loader import Checkpoint
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams

PROMPT = "Write a haiku about the sea. The sea is"
PARAMS = SamplingParams(max_tokens=10)


@pytest.fixture(scope="module")
def pair(checkpoint: Checkpoint) -> Iterator[tuple[LLM, LLM]]:
    sender = make_float32_llm(checkpoint, CacheConfig(num_blocks=32))
    receiver = make_float32_llm(checkpoint, CacheConfig(num_blocks=32))
    yield sender, receiver
    sender.close()
    receiver.close()


def run(llm: LLM) -> list[RequestOutput]:
    finished = []
    while llm.engine.has_unfinished_requests():
        finished += [o for o in llm.engine.step() if o.finished]
    return finished


def test_retained_blocks_outlive_their_sequence() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    assert manager.allocate("seq", 6)
    manager.retain("seq", "held")
    manager.free("seq")
    assert manager.num_free_blocks == 2 and manager.block_table("held")
    with pytest.raises(ValueError, match="already has blocks"):
        manager.retain("held", "held")
    manager.free("held")
    assert manager.num_free_blocks == 4


def test_held_kv_stays_allocated_until_released(pair: tuple[LLM, LLM]) -> None:
    sender, _ = pair
    engine = sender.engine
    engine.add_request(PROMPT, PARAMS, "held", prefill_only=True, hold_kv=True)
    (output,) = run(sender)
    held = output.held_kv
    assert held is not None and output.handoff is None
    assert held.header.num_tokens == len(output.prompt_token_ids)
    assert len(held.header.first_tokens) == 1
    assert engine.held_kv("held") is held
    assert engine.stats().num_held_kv == 1
    assert engine.stats().num_free_blocks == 32 - len(held.block_table)
    assert engine.release_kv("held") and not engine.release_kv("held")
    assert engine.stats().num_free_blocks == 32 and engine.stats().num_held_kv == 0
    with pytest.raises(ValueError, match="prefill_only"):
        engine.add_request(PROMPT, PARAMS, hold_kv=True)


def test_reserve_write_commit_decodes_like_a_local_prefill(pair: tuple[LLM, LLM]) -> None:
    sender, receiver = pair
    (local,) = receiver.generate(PROMPT, PARAMS)
    sender.engine.add_request(PROMPT, PARAMS, "moved", prefill_only=True, hold_kv=True)
    (prefilled,) = run(sender)
    held = prefilled.held_kv
    assert held is not None
    header = held.header
    # The receiver learns the first tokens last, as a pipelined transfer does.
    header_without_tokens = type(header)(**{**header.__dict__, "first_tokens": []})
    table = receiver.engine.reserve_kv(header_without_tokens, PARAMS, "moved")
    assert receiver.engine.stats().num_reserved_kv == 1
    assert not receiver.engine.has_work(), "a reservation must not make the engine step"
    for layer in range(receiver.engine.architecture.num_layers):
        kv = sender.engine.runner.read_kv(held.block_table, header.num_tokens, layers=slice(layer, layer + 1))
        receiver.engine.runner.write_kv(table, kv, layers=slice(layer, layer + 1))
    sender.engine.release_kv("moved")
    receiver.engine.commit_kv("moved", header.first_tokens)
    (decoded,) = run(receiver)
    assert decoded.outputs[0].token_ids == local.outputs[0].token_ids
    assert decoded.num_cached_tokens == len(decoded.prompt_token_ids)
    assert receiver.engine.stats().num_reserved_kv == 0


def test_aborting_a_reservation_frees_it_silently(pair: tuple[LLM, LLM]) -> None:
    sender, receiver = pair
    sender.engine.add_request(PROMPT, PARAMS, "dropped", prefill_only=True, hold_kv=True)
    (prefilled,) = run(sender)
    assert prefilled.held_kv is not None
    free_before = receiver.engine.stats().num_free_blocks
    receiver.engine.reserve_kv(prefilled.held_kv.header, PARAMS, "dropped")
    assert receiver.engine.stats().num_free_blocks < free_before
    assert receiver.engine.abort("dropped", report=False)
    assert receiver.engine.step() == []
    assert receiver.engine.stats().num_free_blocks == free_before
    sender.engine.release_kv("dropped")


def test_a_reservation_larger_than_the_free_pool_is_refused(pair: tuple[LLM, LLM], checkpoint: Checkpoint) -> None:
    sender, _ = pair
    small = make_float32_llm(checkpoint, CacheConfig(num_blocks=4))
    try:
        prompt = " ".join(["word"] * 40)
        sender.engine.add_request(prompt, PARAMS, "big", prefill_only=True, hold_kv=True)
        (prefilled,) = run(sender)
        assert prefilled.held_kv is not None
        small.engine.add_request(" ".join(["other"] * 30), SamplingParams(max_tokens=30))
        small.engine.step()  # the running request takes blocks, leaving too few for the import
        with pytest.raises(MemoryError):
            small.engine.reserve_kv(prefilled.held_kv.header, PARAMS, "big")
        assert small.engine.stats().num_reserved_kv == 0
        sender.engine.release_kv("big")
    finally:
        small.close()


def test_an_import_that_finishes_at_its_first_token_is_reported(pair: tuple[LLM, LLM]) -> None:
    sender, receiver = pair
    one = SamplingParams(max_tokens=1)
    sender.engine.add_request(PROMPT, one, "one", prefill_only=True, hold_kv=True)
    (prefilled,) = run(sender)
    assert prefilled.held_kv is not None
    header = prefilled.held_kv.header
    table = receiver.engine.reserve_kv(header, one, "one")
    kv = sender.engine.runner.read_kv(prefilled.held_kv.block_table, header.num_tokens)
    receiver.engine.runner.write_kv(table, kv)
    sender.engine.release_kv("one")
    receiver.engine.commit_kv("one")
    (done,) = run(receiver)
    assert done.finished and done.outputs[0].token_ids == [header.first_tokens[0].token_id]
    assert done.outputs[0].finish_reason == "length"
    assert receiver.engine.request_ids() == [] and receiver.engine.stats().num_free_blocks == 32


def test_the_loop_streams_an_imports_first_token_before_its_next_step(pair: tuple[LLM, LLM]) -> None:
    """A decode worker commits imported KV between steps; the first token must go out then,
    not after the step that follows (a whole decode step of TTFT under load)."""
    from pdserve.runtime.engine_loop import EngineLoop

    sender, receiver = pair
    engine = receiver.engine

    def steps_run() -> int:
        return sum(int(work["steps"]) for work in engine.step_counters.snapshot().values())

    sender.engine.add_request(PROMPT, PARAMS, "streamed", prefill_only=True, hold_kv=True)
    (prefilled,) = run(sender)
    assert prefilled.held_kv is not None
    header = prefilled.held_kv.header
    delivered: list[tuple[str, int, int]] = []  # (request, tokens so far, steps run when delivered)
    loop = EngineLoop(
        lambda: engine, lambda o: delivered.append((o.request_id, len(o.outputs[0].token_ids), steps_run()))
    )
    loop.start()
    try:
        # Another request keeps the loop stepping, as a busy decode worker's would.
        loop.call(lambda e: e.add_request(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True), "busy")).result(30)
        table = loop.call(lambda e: e.reserve_kv(header, PARAMS, "streamed")).result(30)
        kv = sender.engine.runner.read_kv(prefilled.held_kv.block_table, header.num_tokens)
        engine.runner.write_kv(table, kv)  # off the loop thread, as a transfer writes
        committed_at = loop.call(lambda e: (e.commit_kv("streamed", header.first_tokens), steps_run())[1]).result(30)
        deadline = time.monotonic() + 60
        while sum(1 for r, _, _ in delivered if r == "streamed") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
        sender.engine.release_kv("streamed")
    first = next(d for d in delivered if d[0] == "streamed")
    assert first[1] == 1, "the first output carries the prefill's token"
    assert first[2] == committed_at, f"{first[2] - committed_at} step(s) ran before the first token went out"
