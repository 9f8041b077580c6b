from __future__ import annotations

import random

from builders import make_scheduler, make_sequence
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence, SequenceStatus


def run_step(scheduler: Scheduler, rng: random.Random | None = None) -> SchedulerOutput:
    """Schedule a step and append a token to every sequence that samples, as the engine would."""
    output = scheduler.schedule()
    by_id = {s.seq_id: s for s in scheduler.running}
    for chunk in output.chunks:
        seq = by_id[chunk.seq_id]
        if chunk.sample:
            seq.append_token(rng.randrange(3) if rng else 7)
            if len(seq.output_token_ids) >= seq.max_tokens:
                scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
    return output


def test_decodes_are_scheduled_before_a_long_prompt_which_is_chunked() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=8)
    short = make_sequence([1, 2, 3], max_tokens=20)
    scheduler.add(short)
    run_step(scheduler)  # prefill of the short prompt, samples its first token
    long = make_sequence(list(range(30)), max_tokens=4)
    scheduler.add(long)
    for _ in range(3):
        output = run_step(scheduler)
        assert output.chunks[0].seq_id == short.seq_id and output.chunks[0].num_tokens == 1
        assert output.chunks[1].seq_id == long.seq_id and output.chunks[1].num_tokens == 7
        assert output.num_batched_tokens == 8
    assert long.num_computed_tokens == 21


def test_long_prefill_threshold_caps_chunk_size() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=64, long_prefill_token_threshold=5)
    seq = make_sequence(list(range(12)))
    scheduler.add(seq)
    sizes = [run_step(scheduler).chunks[0].num_tokens for _ in range(3)]
    assert sizes == [5, 5, 2]


def test_prefix_cache_hit_skips_computed_blocks_but_keeps_the_last_token() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=64)
    first = make_sequence(list(range(8)), max_tokens=1)
    scheduler.add(first)
    run_step(scheduler)
    assert first.status == SequenceStatus.FINISHED_LENGTH
    again = make_sequence(list(range(8)), max_tokens=1)
    scheduler.add(again)
    chunk = run_step(scheduler).chunks[0]
    # Both blocks are cached, but the last token must run to produce logits: one block is redone.
    assert chunk.start_position == 4 and chunk.num_tokens == 4
    assert again.num_cached_tokens == 4
    extended = make_sequence(list(range(8)) + [99, 98], max_tokens=1)
    scheduler.add(extended)
    chunk = run_step(scheduler).chunks[0]
    assert chunk.start_position == 8 and chunk.token_ids == [99, 98]


def test_priority_orders_admission() -> None:
    scheduler = make_scheduler(num_blocks=64, max_num_batched_tokens=4, max_num_seqs=1)
    low = make_sequence([1, 2, 3], priority=5)
    high = make_sequence([4, 5, 6], priority=0)
    scheduler.add(low)
    scheduler.add(high)
    assert scheduler.schedule().chunks[0].seq_id == high.seq_id


def test_preemption_frees_the_lowest_priority_sequence_and_it_recomputes() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=16)
    first = make_sequence([1, 2, 3, 4, 5, 6, 7], max_tokens=6)
    second = make_sequence([8, 9, 10, 11, 12, 13, 14], max_tokens=6)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 0
    assert run_step(scheduler).preempted_seq_ids == []  # position 7 still fits the second block
    output = run_step(scheduler)  # both need a third block: the later arrival is preempted
    assert output.preempted_seq_ids == [second.seq_id]
    assert second.status == SequenceStatus.PREEMPTED and second.num_computed_tokens == 0
    while first.status == SequenceStatus.RUNNING:
        run_step(scheduler)
    output = run_step(scheduler)
    # Recompute covers the prompt and the token generated before preemption, except the first
    # block, which is still in the prefix cache.
    chunk = output.chunks[0]
    assert chunk.seq_id == second.seq_id
    assert chunk.sample and chunk.start_position == 4
    assert chunk.context_length == second.num_tokens - 1  # run_step appended the sampled token


def test_finish_and_abort_free_blocks_immediately() -> None:
    scheduler = make_scheduler(num_blocks=16)
    seq = make_sequence(list(range(10)))
    waiting = make_sequence(list(range(5)))
    scheduler.add(seq)
    run_step(scheduler)
    scheduler.add(waiting)
    scheduler.finish(waiting, SequenceStatus.FINISHED_ABORTED)
    scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
    assert scheduler.block_manager.num_free_blocks == 16
    assert scheduler.num_unfinished == 0


@st.composite
def request_streams(draw: st.DrawFn) -> list[tuple[int, list[int], int, int, bool]]:
    """(arrival step, prompt, max_tokens, priority, abort) tuples; a tiny alphabet makes prefix hits."""
    count = draw(st.integers(1, 12))
    return [
        (
            draw(st.integers(0, 10)),
            draw(st.lists(st.integers(0, 2), min_size=1, max_size=20)),
            draw(st.integers(1, 10)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
        )
        for _ in range(count)
    ]


@settings(max_examples=150, deadline=None)
@given(
    stream=request_streams(),
    num_blocks=st.integers(8, 24),
    budget=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_blocks_return_to_initial_count_after_any_request_stream(
    stream: list[tuple[int, list[int], int, int, bool]], num_blocks: int, budget: int, seed: int
) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget)
    sequences: list[tuple[int, Sequence, bool]] = []
    for arrival, prompt, max_tokens, priority, abort in stream:
        # Like the engine, refuse requests that could never fit the pool.
        if -(-(len(prompt) + max_tokens) // 4) > num_blocks:
            continue
        sequences.append((arrival, make_sequence(prompt, max_tokens, priority), abort))
    for step in range(400):
        for arrival, seq, abort in sequences:
            if arrival == step:
                scheduler.add(seq)
            if abort and step == arrival + 3 and not seq.is_finished:
                scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        run_step(scheduler, rng)
        used = scheduler.block_manager.num_used_blocks
        assert used <= num_blocks
        if step > 10 and scheduler.num_unfinished == 0:
            break
    assert scheduler.num_unfinished == 0, "every request finishes"
    assert all(seq.is_finished for _, seq, _ in sequences)
    assert scheduler.block_manager.num_free_blocks == num_blocks


def test_scheduling_layer_imports_without_torch() -> None:
    """The planner's simulator runs this very code, on machines that may lack torch."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import pdserve.engine.scheduler, pdserve.engine.block_manager, pdserve.engine.sequence\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
