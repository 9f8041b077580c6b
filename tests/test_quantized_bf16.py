"""Quantized weights on bf16 CPUs: the native int8 kernel against its dequantized weight, the LM
head's choice of kernel by batch size, a routed layer switching to its packed bf16 copy, and a
bf16 int4 engine answering like the dense one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures_model import capital_answer, checkpoint, make_small_llm  # noqa: F401
from fixtures_native import seeded_randn

from pdserve.engine.layers.build import LayerTarget, build_linear
from pdserve.engine.layers.formats import crossover_rows
from pdserve.engine.layers.int4 import Int4Linear, int4_linear_available
from pdserve.engine.layers.int8 import MAX_ROWS as NATIVE_INT8_MAX_ROWS
from pdserve.engine.layers.lm_head import build_lm_head
from pdserve.engine.layers.onednn import OneDnnLinear, onednn_bf16_available
from pdserve.engine.layers.quantize import quantize_int8
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.loader import Checkpoint
from pdserve.engine.native_kernels import NativeKernels

CPU = torch.device("cpu")
needs_onednn_bf16 = pytest.mark.skipif(
    not onednn_bf16_available(CPU, torch.bfloat16), reason="oneDNN has no bf16 kernels for this CPU"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
# 101 outputs leave a partial block of four rows; 72 inputs are not a multiple of 16 (scalar path).
@pytest.mark.parametrize(("out_features", "in_features"), [(101, 576), (64, 72)])
def test_int8_linear_matches_its_dequantized_weight(native: NativeKernels, dtype: torch.dtype, rows: int,
                                                     out_features: int, in_features: int) -> None:
    q, scales = quantize_int8(seeded_randn(out_features, in_features) * 0.05)
    x = seeded_randn(rows, in_features, seed=1).to(dtype)
    got = native.int8_linear(x, q, scales.float())
    expected = x.double() @ (q.double() * scales.double()[:, None]).t()
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    # float32 sums of 576 products in another order: far inside bf16's resolution.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_linear_refuses_what_it_cannot_read(native: NativeKernels) -> None:
    q, scales = quantize_int8(seeded_randn(32, 64))
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        native.int8_linear(seeded_randn(5, 64), q, scales.float())
    with pytest.raises(RuntimeError, match="matching the weight"):
        native.int8_linear(seeded_randn(1, 63), q, scales.float())
    with pytest.raises(RuntimeError, match="int8"):
        native.int8_linear(seeded_randn(1, 64), q.float(), scales.float())
    with pytest.raises(RuntimeError, match="scales must be"):
        native.int8_linear(seeded_randn(1, 64), q, scales)  # bf16 scales, not float32
    assert native.int8_linear(seeded_randn(0, 64), q, scales.float()).shape == (0, 32)


@needs_onednn_bf16
def test_lm_head_picks_its_kernel_by_batch_size(native: NativeKernels) -> None:
    weight = (seeded_randn(1000, 576) * 0.05).bfloat16()
    bf16 = LayerTarget(torch.bfloat16, CPU, native)
    quantized = build_lm_head(weight, "int4", bf16)
    dense = build_lm_head(weight, "dense", bf16)
    assert [quantized.kernel(rows) for rows in (1, NATIVE_INT8_MAX_ROWS, NATIVE_INT8_MAX_ROWS + 1)] == [
        "native-int8", "native-int8", "onednn-bf16"
    ]
    # Dense models never quantize their head; without the native kernels the int8 copy is torch's.
    assert dense.kernel(1) == "onednn-bf16"
    assert build_lm_head(weight.float(), "int4", LayerTarget(torch.float32, CPU, None)).kernel(1) == "torch-int8"
    assert quantized.decode_bytes == 1000 * 576 + 4 * 1000 and dense.decode_bytes == 2 * 1000 * 576

    x = seeded_randn(3, 576, seed=2).bfloat16()
    reference = F.linear(x.float(), weight.float())
    small, large = quantized(x), quantized(seeded_randn(6, 576, seed=3).bfloat16())
    assert small.dtype == torch.float32 and small.shape == (3, 1000) and large.shape == (6, 1000)
    # Per-row int8 moves the logits by ~0.6% of their size (test_torch_quantized.py's estimate).
    assert float((small - reference).norm() / reference.norm()) < 0.01
    torch.testing.assert_close(dense(x), reference, rtol=2**-7, atol=1e-2)


@needs_onednn_bf16
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_a_quantized_layer_runs_the_packed_bf16_copy_above_its_rows(weight_format: str) -> None:
    weight = seeded_randn(96, 128) * 0.05
    layer = build_linear(weight, weight_format, LayerTarget(torch.bfloat16, CPU, native=None))
    assert isinstance(layer, RowRouted) and isinstance(layer.small, TorchQuantizedLinear)
    threshold = crossover_rows(f"torch-{weight_format}", "onednn-bf16", LayerTarget(torch.bfloat16, CPU).level)
    assert layer.small_rows == threshold
    small = seeded_randn(threshold, 128, seed=1).bfloat16()
    large = seeded_randn(threshold + 1, 128, seed=2).bfloat16()
    residual = seeded_randn(threshold + 1, 96, seed=3).bfloat16()
    # The dense layer: packed bf16, itself routed to its float32 copy above its own rows (on a CPU
    # without bf16 hardware, from 2 rows: the crossover table's avx512 section).
    dense = layer.large
    assert dense.kernel(1) == "onednn-bf16" and dense.kernel(threshold + 1) in ("onednn-bf16", "dense-float32")
    if dense.kernel(threshold + 1) == "onednn-bf16":
        assert torch.equal(dense(large), OneDnnLinear(weight.bfloat16())(large))
    # Up to the threshold: the quantized kernel, bit for bit; above it: the dense layer, bit for bit.
    assert torch.equal(layer(small), TorchQuantizedLinear(weight, weight_format)(small))
    assert torch.equal(layer(large), dense(large))
    assert torch.equal(layer(large, residual), dense(large, residual))
    assert torch.equal(layer(small, residual[:threshold]), residual[:threshold] + layer(small))


@needs_onednn_bf16
def test_an_int4_layer_runs_the_native_int4_kernel_where_built(native: NativeKernels) -> None:
    if not int4_linear_available(native):
        pytest.skip("the portable int4 kernel is not the engine's choice")
    weight = seeded_randn(96, 128) * 0.05
    target = LayerTarget(torch.bfloat16, CPU, native)
    layer = build_linear(weight, "int4", target)
    assert isinstance(layer, RowRouted) and isinstance(layer.small, Int4Linear)
    assert layer.small_rows == crossover_rows("native-int4", "onednn-bf16", target.level)
    x = seeded_randn(layer.small_rows, 128, seed=1).bfloat16()
    residual = seeded_randn(x.shape[0], 96, seed=2).bfloat16()
    assert torch.equal(layer(x), Int4Linear(weight, native)(x))
    assert torch.equal(layer(x, residual), Int4Linear(weight, native)(x, residual))
    above = seeded_randn(layer.small_rows + 1, 128, seed=3).bfloat16()
    assert torch.equal(layer(above), layer.large(above))
    # Group constants beyond fp16's range stay with torch's kernel (bf16 scales).
    fallback = build_linear(weight * 1e9, "int4", target)
    assert isinstance(fallback, RowRouted) and isinstance(fallback.small, TorchQuantizedLinear)
    # The same weights as torch's int4 kernel multiplies (both exact 4-bit groups): close results.
    torch.testing.assert_close(layer(x).float(), TorchQuantizedLinear(weight, "int4")(x).float(), rtol=0.02, atol=0.02)


@needs_onednn_bf16
def test_a_bf16_int4_engine_answers_like_the_dense_one(checkpoint: Checkpoint) -> None:  # noqa: F811
    """Its layers are routed (int4 for the decode, the bf16 copy for the 40-token prefill) and
    its head runs the native int8 kernel; greedy decoding still finds the answer."""
    llm = make_small_llm(checkpoint, "bfloat16", "int4")
    try:
        model = llm.engine.model
        assert isinstance(model.layers[0].gate_up, RowRouted)
        assert model.lm_head.kernel(1) == ("native-int8" if model.native is not None else "torch-int8")
        answer = capital_answer(llm)
    finally:
        llm.close()
    assert answer.startswith(" Paris")
