"""Greedy output equals Hugging Face transformers token for token, however the engine gets there.

Reference: transformers' Llama on the same GGUF weights, float32, eager attention, each prompt
alone and unpadded (tests/hf_reference.py). A divergence is accepted only at a step where the
reference's top-2 logit gap is below 1e-3 (a near-tie any correct kernel may break either way),
and the assertion message says where.
"""

from __future__ import annotations

import pytest
from fixtures_model import make_float32_llm
from fixtures_native import KERNEL_ISAS
from hf_reference import ReferenceResult, reference_greedy

from pdserve.bench.prompt_set import CHAT_MESSAGES, TEXT_PROMPTS, long_prompt
from pdserve.engine.config import CacheConfig, SchedulerConfig
from pdserve.engine.llm import LLM
from pdserve.engine.loader import Checkpoint
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams

NEW_TOKENS = 48
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
TIE_GAP = 1e-3


make_llm = make_float32_llm


@pytest.fixture(scope="module")
def llm(checkpoint: Checkpoint) -> LLM:
    engine = make_llm(checkpoint)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt_ids(llm: LLM) -> list[list[int]]:
    ids = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    ids.append(llm.chat_prompt_ids(CHAT_MESSAGES))
    ids.append(llm.tokenizer.encode(long_prompt()))
    assert len(ids[-1]) > 1500
    return ids


@pytest.fixture(scope="module")
def references(prompt_ids: list[list[int]]) -> list[ReferenceResult]:
    return [reference_greedy(ids, NEW_TOKENS) for ids in prompt_ids]


def assert_parity(outputs: list[RequestOutput], references: list[ReferenceResult], label: str) -> None:
    for number, (output, reference) in enumerate(zip(outputs, references, strict=True)):
        ours = output.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS, f"{label}: prompt {number} produced {len(ours)} tokens"
        for step, (got, want) in enumerate(zip(ours, reference.token_ids, strict=True)):
            if got != want:
                gap = reference.top2_gaps[step]
                assert gap < TIE_GAP, (
                    f"{label}: prompt {number} diverges from the reference at step {step} "
                    f"(got {got}, want {want}; reference top-2 gap {gap:.2e} is no near-tie)"
                )
                print(f"{label}: prompt {number} near-tie divergence at step {step} (gap {gap:.2e})")
                break


def test_batch_of_mixed_lengths_matches_reference(
    llm: LLM, prompt_ids: list[list[int]], references: list[ReferenceResult]
) -> None:
    outputs = llm.generate(prompt_ids, GREEDY)
    assert_parity(outputs, references, "batched")


def test_prefix_cache_hits_give_the_same_tokens(
    llm: LLM, prompt_ids: list[list[int]], references: list[ReferenceResult]
) -> None:
    llm.generate(prompt_ids[-1], SamplingParams(max_tokens=1))  # warm the long prompt's blocks
    outputs = llm.generate(prompt_ids, GREEDY)
    assert outputs[-1].num_cached_tokens >= len(prompt_ids[-1]) - 16
    assert llm.engine.stats().prefix_cache_hit_rate > 0
    assert_parity(outputs, references, "prefix-cached")


def test_small_chunked_prefill_gives_the_same_tokens(
    checkpoint: Checkpoint, prompt_ids: list[list[int]], references: list[ReferenceResult]
) -> None:
    # Chunks of 37 tokens: never aligned with the 16-token blocks.
    scheduler = SchedulerConfig(max_num_batched_tokens=64, long_prefill_token_threshold=37)
    llm = make_llm(checkpoint, scheduler=scheduler)
    subset = [0, 9, 10]
    outputs = llm.generate([prompt_ids[i] for i in subset], GREEDY)
    llm.close()
    assert_parity(outputs, [references[i] for i in subset], "chunked")


def test_preemption_gives_the_same_tokens(
    checkpoint: Checkpoint, prompt_ids: list[list[int]], references: list[ReferenceResult]
) -> None:
    # Together these need ~18 blocks of 16 tokens; 12 force preemptions as they grow.
    llm = make_llm(checkpoint, cache=CacheConfig(num_blocks=12, enable_prefix_caching=False))
    subset = [1, 2, 8, 9]
    outputs = llm.generate([prompt_ids[i] for i in subset], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.stats().num_free_blocks == 12
    llm.close()
    assert_parity(outputs, [references[i] for i in subset], "preempted")


def test_prefill_on_one_engine_decode_on_another(
    llm: LLM, checkpoint: Checkpoint, prompt_ids: list[list[int]], references: list[ReferenceResult]
) -> None:
    decoder = make_llm(checkpoint)
    subset = [0, 4, 9, 10]
    outputs = []
    for index in subset:
        handoff = llm.prefill_only(prompt_ids[index], GREEDY)
        assert handoff.is_complete and handoff.num_tokens == len(prompt_ids[index])
        outputs.append(decoder.decode_from(handoff, GREEDY))
    assert_parity(outputs, [references[i] for i in subset], "split")
    assert decoder.engine.stats().num_free_blocks == decoder.engine.stats().num_blocks
    decoder.close()

    # A handoff cut to its first two blocks: a fresh decode engine prefills the rest itself.
    decoder = make_llm(checkpoint)
    partial = llm.prefill_only(prompt_ids[10], GREEDY).truncated(num_blocks=2)
    assert partial.num_tokens == 32 and not partial.is_complete
    output = decoder.decode_from(partial, GREEDY)
    assert output.num_cached_tokens == 32
    assert_parity([output], [references[10]], "partial handoff")
    decoder.close()


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_the_native_kernels_of_every_level_match_the_reference(
    checkpoint: Checkpoint, prompt_ids: list[list[int]], references: list[ReferenceResult], isa: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode attention, RoPE + KV write, the norms and the activation on each instruction-set
    level this CPU runs (PDSERVE_KERNEL_ISA caps the engine's choice), the long prompt included."""
    monkeypatch.setenv("PDSERVE_KERNEL_ISA", isa)
    llm = make_float32_llm(checkpoint, attention="native")
    try:
        native = llm.engine.model.native
        assert native is not None and {build.isa for build in native.builds.values()} == {isa}
        subset = [0, 4, 9, 10]
        outputs = llm.generate([prompt_ids[i] for i in subset], GREEDY)
    finally:
        llm.close()
    assert_parity(outputs, [references[i] for i in subset], f"native {isa}")
