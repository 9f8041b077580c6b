"""The roofline arithmetic against hand-computed cases.

Toy model (tied embeddings): 2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16,
intermediate 128, vocab 256.
  attention matmuls per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12,288
  MLP per layer:               3 * 64 * 128                           = 24,576
  decoder matmuls:             2 * (12,288 + 24,576)                   = 73,728
  output projection:           256 * 64                                = 16,384
  matmul params:               73,728 + 16,384                         = 90,112  (180,224 B in bf16)
  params: 2 * (36,864 + 2*64 norms) + 16,384 embedding + 64 final norm = 90,432  (180,864 B)
  KV per token (bf16):         2 * 2 layers * 2 kv heads * 16 * 2 B    = 256 B
  attention FLOPs:             4 * 2 layers * 4 heads * 16 = 512 per (token, key) pair
Toy accelerator: 1e12 FLOP/s, 1e11 B/s, 1e6 B memory, 1e10 B/s intra-node link.
"""

from __future__ import annotations

import pytest

from pdserve.planner.catalogue.hardware import Accelerator, load_hardware_catalogue
from pdserve.planner.catalogue.models import ModelSpec, load_model_catalogue
from pdserve.planner.cost.roofline import Efficiency, RooflineCostModel
from pdserve.planner.cost.step_cost import StepCostModel

IDEAL = Efficiency(compute=1.0, bandwidth=1.0, step_overhead_s=0.0, link=1.0, allreduce_latency_s=0.0)


def toy_model(**overrides: object) -> ModelSpec:
    shapes: dict = dict(
        name="toy", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=256, tie_word_embeddings=True,
    )
    shapes.update(overrides)
    return ModelSpec(**shapes)


def toy_accelerator(**overrides: object) -> Accelerator:
    fields: dict = dict(
        name="toy", vendor="test", description="toy accelerator", flops_dtype="bf16",
        peak_flops_per_s=1e12, memory_bytes_per_s=1e11, memory_bytes=1e6,
        intra_node_link="toy link", intra_node_bytes_per_s=1e10, network_bytes_per_s=1e9,
        gpus_per_node=8,
    )
    fields.update(overrides)
    return Accelerator(**fields)


def toy_cost(tensor_parallel: int = 1, efficiency: Efficiency = IDEAL, **model: object) -> RooflineCostModel:
    return RooflineCostModel(toy_model(**model), toy_accelerator(), "bfloat16",
                             tensor_parallel=tensor_parallel, efficiency=efficiency)


def test_toy_model_shapes_by_hand() -> None:
    model = toy_model()
    assert model.attention_matmul_params() == 12_288
    assert model.mlp_params() == 24_576
    assert model.layer_matmul_params() == 73_728
    assert model.matmul_params() == 90_112
    assert model.params() == 90_432
    assert model.weight_bytes("bfloat16") == 180_864
    assert model.kv_bytes_per_token("bfloat16") == 256
    assert model.linear_flops_per_token() == 180_224
    # 100 new tokens, nothing cached: keys = 100*101/2 = 5,050 -> 512 * 5,050.
    assert model.attention_flops(100, 0) == 2_585_600
    # One token after 399 cached: 400 keys.
    assert model.attention_flops(1, 399) == 204_800
    # A chunk of 10 after 90 cached: keys = 10*90 + 10*11/2 = 955.
    assert model.attention_flops(10, 90) == 512 * 955


def test_prefill_is_compute_bound_by_hand() -> None:
    cost = toy_cost()
    step = cost.step_breakdown([(100, 0)], [])
    # FLOPs: decoder 2*73,728*100 = 14,745,600; logits of 1 sequence 2*16,384 = 32,768;
    # attention 2,585,600 -> 17,363,968 at 1e12 FLOP/s.
    assert step.compute_s == pytest.approx(1.7363968e-5, rel=1e-12)
    # Bytes: weights 180,224 + KV of 100 tokens written 25,600 = 205,824 at 1e11 B/s.
    assert step.memory_s == pytest.approx(2.05824e-6, rel=1e-12)
    assert step.bound == "compute"
    assert step.communication_s == 0.0
    assert cost.prefill_seconds(100) == pytest.approx(1.7363968e-5, rel=1e-12)


def test_decode_is_memory_bound_by_hand() -> None:
    cost = toy_cost()
    # 4 sequences with contexts of 101 each: 100 cached tokens + the one being decoded, which
    # is how the engine counts a context (ScheduledChunk.context_length); 404 in all.
    # FLOPs: decoder 2*73,728*4 = 589,824; logits 2*16,384*4 = 131,072;
    # attention 512 * 404 keys = 206,848 -> 927,744.
    # Bytes: weights 180,224 + KV of 404 tokens (400 read, 4 written) * 256 = 103,424 -> 283,648.
    step = cost.step_breakdown([], [101, 101, 101, 101])
    assert step.compute_s == pytest.approx(9.27744e-7, rel=1e-12)
    assert step.memory_s == pytest.approx(2.83648e-6, rel=1e-12)
    assert step.bound == "memory"
    # Decode cost depends on the contexts only through their sum.
    assert cost.decode_step_seconds(4, 404) == pytest.approx(2.83648e-6, rel=1e-12)
    assert cost.step_seconds([], [51, 151, 1, 201]) == pytest.approx(2.83648e-6, rel=1e-12)


def test_mixed_step_batches_prefill_with_decodes() -> None:
    cost = toy_cost()
    # FLOPs: decoder 2*73,728*104 = 15,335,424; logits 2*16,384*5 = 163,840;
    # attention 2,585,600 + 206,848 = 2,792,448 -> 18,291,712 (compute-bound).
    # Bytes: 180,224 + 256 * (100 + 404) = 309,248.
    mixed = cost.mixed_step_seconds(100, 0, 4, 404)
    assert mixed == pytest.approx(1.8291712e-5, rel=1e-12)
    assert cost.step_seconds([(100, 0)], [101] * 4) == pytest.approx(mixed, rel=1e-12)
    # Weights are read once for both: cheaper than two separate steps.
    assert mixed < cost.prefill_seconds(100) + cost.decode_step_seconds(4, 404)
    assert cost.mixed_step_seconds(0, 0, 4, 404) == pytest.approx(cost.decode_step_seconds(4, 404))


def test_efficiency_factors_and_step_overhead() -> None:
    cost = toy_cost(efficiency=Efficiency(compute=0.5, bandwidth=0.5, step_overhead_s=1e-3))
    # 17,363,968 FLOPs at 0.5 * 1e12 = 3.4727936e-5 s, plus 1 ms.
    assert cost.prefill_seconds(100) == pytest.approx(1.034727936e-3, rel=1e-12)
    # 283,648 B at 0.5 * 1e11 = 5.67296e-6 s, plus 1 ms.
    assert cost.decode_step_seconds(4, 404) == pytest.approx(1.00567296e-3, rel=1e-12)
    # A chunk after cached context reads that context's KV and attends to it.
    # FLOPs: 2*73,728*10 + 2*16,384 + 512*955 = 1,474,560 + 32,768 + 488,960 = 1,996,288.
    # Bytes: 180,224 + 256 * 100 = 205,824 -> memory-bound: 205,824 / 5e10 = 4.11648e-6.
    assert cost.prefill_seconds(10, 90) == pytest.approx(1e-3 + 4.11648e-6, rel=1e-12)


def test_empty_step_costs_nothing() -> None:
    cost = toy_cost(efficiency=Efficiency())
    assert cost.step_seconds([], []) == 0.0
    assert cost.decode_step_seconds(0, 0) == 0.0


def test_tensor_parallel_splits_work_and_adds_allreduces() -> None:
    cost = toy_cost(tensor_parallel=2)
    # Decode 4 sequences of context 101 on 2 GPUs (1 KV head each: 128 B per token).
    step = cost.step_breakdown([], [101] * 4)
    assert step.compute_s == pytest.approx(927_744 / 2 / 1e12, rel=1e-12)
    # Bytes per GPU: 180,224 / 2 + 128 * 404 = 90,112 + 51,712 = 141,824.
    assert step.memory_s == pytest.approx(1.41824e-6, rel=1e-12)
    # 2 all-reduces * 2 layers of 4 tokens * 64 * 2 B = 512 B; a ring sends 2*(2-1)/2 = 1x that
    # per GPU at 1e10 B/s: 4 * 5.12e-8 = 2.048e-7 s.
    assert step.communication_s == pytest.approx(2.048e-7, rel=1e-12)
    assert step.total == pytest.approx(1.62304e-6, rel=1e-12)
    with_latency = toy_cost(tensor_parallel=2, efficiency=Efficiency(1.0, 1.0, 0.0, 1.0, 1e-6))
    assert with_latency.step_breakdown([], [101] * 4).communication_s == pytest.approx(4.2048e-6)


def test_kv_heads_replicate_when_fewer_than_gpus() -> None:
    cost = toy_cost(tensor_parallel=4)  # 2 KV heads over 4 GPUs: one (replicated) head each
    assert cost.kv_bytes_per_token_per_gpu() == 128
    assert cost.kv_bytes_per_token() == 256
    with pytest.raises(ValueError, match="heads do not split"):
        toy_cost(tensor_parallel=3)


def test_max_kv_tokens_after_weights() -> None:
    # (1e6 * 0.5 - 180,864) / 256 = 1,246.6 -> 1,246.
    assert toy_cost().max_kv_tokens(0.5) == 1246
    # tp=2: weights 90,432 per GPU; (500,000 - 90,432) / 128 = 3,199.75 -> 3,199.
    assert toy_cost(tensor_parallel=2).max_kv_tokens(0.5) == 3199
    # Weights alone overflow 10% of the memory: nothing fits.
    assert toy_cost().max_kv_tokens(0.1) == 0
    with pytest.raises(ValueError):
        toy_cost().max_kv_tokens(1.5)


def test_transfer_seconds() -> None:
    # 1,000 tokens * 256 B = 256,000 B over 1e9 B/s.
    assert toy_cost().transfer_seconds(1000, 1e9) == pytest.approx(2.56e-4, rel=1e-12)
    half_link = toy_cost(efficiency=Efficiency(link=0.5))
    assert half_link.transfer_seconds(1000, 1e9) == pytest.approx(5.12e-4, rel=1e-12)


def test_llama_8b_kv_bytes_per_token() -> None:
    llama = load_model_catalogue()["Llama-3.1-8B"]
    # 32 layers * 8 KV heads * 128 head_dim * 2 (K and V) * 2 bytes.
    assert llama.kv_bytes_per_token("bfloat16") == 131_072
    h100 = load_hardware_catalogue()["H100-SXM"]
    assert RooflineCostModel(llama, h100).kv_bytes_per_token() == 131_072
    assert RooflineCostModel(llama, h100, kv_dtype="float8").kv_bytes_per_token() == 65_536


def test_llama_8b_decode_on_h100_by_hand() -> None:
    llama = load_model_catalogue()["Llama-3.1-8B"]
    cost = RooflineCostModel(llama, load_hardware_catalogue()["H100-SXM"])
    # Matmul params per layer: q 4096*4096 + k,v 2*4096*1024 + o 4096*4096 + MLP 3*4096*14336
    # = 218,103,808; * 32 layers + output projection 128,256*4096 = 7,504,658,432
    # -> 15,009,316,864 B in bf16; context 1,001 (1,000 cached + 1 new) * 131,072 B = 131,203,072 B.
    # (15,140,519,936 B) / (3.35e12 * 0.8) + 1 ms overhead = 6.6494 ms.
    assert llama.matmul_params() == 7_504_658_432
    expected = 15_140_519_936 / (3.35e12 * 0.8) + 1e-3
    assert cost.decode_step_seconds(1, 1001) == pytest.approx(expected, rel=1e-9)
    assert cost.step_breakdown([], [1001]).bound == "memory"
    assert cost.step_breakdown([(4096, 0)], []).bound == "compute"
    # 70B does not fit one H100 in bf16 but fits four.
    big = load_model_catalogue()["Llama-3.1-70B"]
    assert RooflineCostModel(big, cost.hardware).max_kv_tokens() == 0
    assert RooflineCostModel(big, cost.hardware, tensor_parallel=4).max_kv_tokens() > 100_000


def test_roofline_is_a_step_cost_model() -> None:
    cost: StepCostModel = toy_cost()  # checked structurally by mypy when run on this file
    assert cost.step_seconds([(100, 0)], [101] * 4) == pytest.approx(1.8291712e-5, rel=1e-12)
    assert cost.kv_bytes_per_token() == 256


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        RooflineCostModel(toy_model(), toy_accelerator(gpus_per_node=2), tensor_parallel=4)
    with pytest.raises(ValueError, match="unknown dtype"):
        RooflineCostModel(toy_model(), toy_accelerator(), dtype="bf16")
    with pytest.raises(ValueError, match="prefill chunk"):
        toy_cost().step_seconds([(0, 5)], [])
    with pytest.raises(ValueError, match="decode contexts"):
        toy_cost().step_seconds([], [0])  # a decode context counts at least the token itself
    with pytest.raises(ValueError, match="total_context_tokens"):
        toy_cost().decode_step_seconds(4, 3)
    with pytest.raises(ValueError, match="compute"):
        Efficiency(compute=0.0)
    with pytest.raises(ValueError, match="step_overhead_s"):
        Efficiency(step_overhead_s=-1.0)
