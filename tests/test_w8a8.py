"""int8 x int8 linear layers (w8a8_linear.py): the native row quantizer and rescaler against their
torch definitions, the layer against float arithmetic, and w8a8 engines answering like dense."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import checkpoint  # noqa: F401
from fixtures_native import seeded_randn

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.llm import LLM
from pdserve.engine.loader import Checkpoint
from pdserve.engine.native_kernels import NativeKernels
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.w8a8_linear import W8A8Linear, dequantize, quantize_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_native_row_quantization_equals_its_torch_definition(native: NativeKernels, dtype: torch.dtype,
                                                             rows: int) -> None:
    # Rows of very different magnitudes, the last all zero, strided (a slice of a wider tensor).
    wide = torch.cat([seeded_randn(rows, 700) * torch.logspace(-3, 3, rows)[:, None], torch.zeros(1, 700)])
    x = wide.to(dtype)[:, :576]
    q, scales = native.quantize_rows_int8(x)
    expected_q, expected_scales = quantize_rows(x)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert torch.equal(q, expected_q) and torch.equal(scales, expected_scales)
    assert int(q.abs().max()) == 127 and int(q[-1].abs().max()) == 0 and float(scales[-1]) == 0.0
    # Each row is recovered to within half a step of its own scale (and float32 rounding).
    error = (q.float() * scales[:, None] - x.float()).abs()
    assert bool((error <= scales[:, None] * 0.5 + x.float().abs() * 2**-20).all())


def test_row_quantization_rounds_halves_to_even(native: NativeKernels) -> None:
    # max 127 makes the scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, _ = native.quantize_rows_int8(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]
    assert torch.equal(quantize_rows(x)[0], q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_native_rescaling_matches_its_torch_definition(native: NativeKernels, dtype: torch.dtype,
                                                       with_residual: bool) -> None:
    sums = torch.randint(-(2**20), 2**20, (33, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    row_scales, column_scales = seeded_randn(33).abs() * 1e-3, seeded_randn(96, seed=2).abs() * 1e-3
    residual = seeded_randn(33, 96, seed=3).to(dtype) if with_residual else None
    out = native.dequantize_int32(sums, row_scales, column_scales, residual, dtype)
    expected = dequantize(sums, row_scales, column_scales, residual, dtype)
    assert out.dtype == dtype
    # The same float32 arithmetic, up to a fused multiply-add: within one rounding of the output.
    step = 2**-7 if dtype == torch.bfloat16 else 2**-22
    torch.testing.assert_close(out.float(), expected.float(), rtol=step, atol=1e-6)


def test_native_ends_check_their_inputs(native: NativeKernels) -> None:
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.quantize_rows_int8(torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        native.quantize_rows_int8(torch.zeros(8, 2).t())
    sums = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="column_scales"):
        native.dequantize_int32(sums, torch.ones(2), torch.ones(3), None, torch.float32)
    with pytest.raises(RuntimeError, match="residual"):
        native.dequantize_int32(sums, torch.ones(2), torch.ones(4), torch.zeros(2, 4), torch.bfloat16)
    with pytest.raises(RuntimeError, match="int32"):
        native.dequantize_int32(sums.float(), torch.ones(2), torch.ones(4), None, torch.float32)


@pytest.mark.parametrize("rows", [1, 4, 32, 200])
def test_w8a8_layer_is_close_to_float_arithmetic_native_or_not(native: NativeKernels, rows: int) -> None:
    weight = seeded_randn(384, 576) * 0.05
    x = seeded_randn(rows, 576, seed=1).bfloat16()
    residual = seeded_randn(rows, 384, seed=2).bfloat16()
    fast, plain = W8A8Linear(weight, native), W8A8Linear(weight)
    reference = x.float() @ weight.t()
    y = fast(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 384)
    # 8 bits for each row of x and each row of the weight: about 1% error, far from 0 or 100%.
    relative_error = float((y.float() - reference).norm() / reference.norm())
    assert 1e-3 < relative_error < 0.02
    # The integer products are exact, so the two paths differ only in the last rounding.
    torch.testing.assert_close(y.float(), plain(x).float(), rtol=2**-7, atol=1e-2)
    with_residual = fast(x, residual)
    torch.testing.assert_close(with_residual.float(), (reference + residual.float()), rtol=0.05, atol=0.05)
    torch.testing.assert_close(with_residual.float(), plain(x, residual).float(), rtol=2**-7, atol=1e-2)
    # Rows are quantized independently: a row's result does not depend on its batch.
    assert torch.equal(fast(x[:1]), y[:1])
    assert fast.nbytes == 384 * 576 + 4 * 384


def test_w8a8_layer_rejects_a_weight_that_is_not_a_matrix() -> None:
    with pytest.raises(ValueError, match="2-D"):
        W8A8Linear(torch.zeros(4))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_w8a8_engine_answers_like_the_dense_one(checkpoint: Checkpoint, dtype: str) -> None:  # noqa: F811
    """bfloat16 runs the native quantizer and rescaler, float32 (no native kernels by default) the
    torch ones; both multiply in int8, the head included, and find the answer."""
    config = EngineConfig(
        model=ModelConfig(dtype=dtype, weight_format="w8a8"),
        cache=CacheConfig(num_blocks=64),
        show_progress=False,
    )
    llm = LLM(config=config, checkpoint=checkpoint)
    try:
        model = llm.engine.model
        assert isinstance(model.layers[0].gate_up, W8A8Linear) and isinstance(model.layers[-1].qkv, W8A8Linear)
        assert model.lm_head.kernel(1) == model.lm_head.kernel(64) == "w8a8"
        prompt = "Question: which city is the capital of France, and which river flows through it? Answer: The capital of France is"
        (output,) = llm.generate(prompt, SamplingParams(max_tokens=4))
    finally:
        llm.close()
    assert output.outputs[0].text.startswith(" Paris")
