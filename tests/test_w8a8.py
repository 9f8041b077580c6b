"""int8 x int8 linear layers (layers/w8a8.py): the native row quantizer and rescaler against their
torch definitions, the layer against float arithmetic, and w8a8 engines answering like dense."""

from __future__ import annotations

import pytest
import torch
from fixtures_model import capital_answer, checkpoint, make_small_llm  # noqa: F401
from fixtures_native import seeded_randn

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.layers.formats import crossover_rows
from pdserve.engine.layers.int4 import Int4Linear, int4_linear_available
from pdserve.engine.layers.onednn import onednn_bf16_available
from pdserve.engine.layers.quantize import quantize_int8
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.layers.w8a8 import W8A8Linear, dequantize, quantize_rows
from pdserve.engine.loader import Checkpoint
from pdserve.engine.native_kernels import NativeKernels


@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_native_row_quantization_equals_its_torch_definition(native: NativeKernels, dtype: torch.dtype,
                                                             rows: int, digits: int) -> None:
    # Rows of very different magnitudes, the last all zero, strided (a slice of a wider tensor).
    wide = torch.cat([seeded_randn(rows, 700) * torch.logspace(-3, 3, rows)[:, None], torch.zeros(1, 700)])
    x = wide.to(dtype)[:, :576]
    q, scales = native.quantize_rows_int8(x, digits)
    expected_q, expected_scales = quantize_rows(x, digits)
    assert q.dtype == torch.int8 and q.shape == (digits * (rows + 1), 576) and scales.dtype == torch.float32
    assert torch.equal(q, expected_q) and torch.equal(scales, expected_scales)
    first = q[: rows + 1].float()
    assert int(first.abs().max()) == 127 and int(first[-1].abs().max()) == 0 and float(scales[-1]) == 0.0
    # Each row is recovered to within half a step of its own scale, a 254th of it with two digits
    # (and float32 rounding).
    value = first if digits == 1 else first + q[rows + 1 :].float() / 254
    step = scales[:, None] * (0.5 if digits == 1 else 0.5 / 254)
    error = (value * scales[:, None] - x.float()).abs()
    assert bool((error <= step + x.float().abs() * 2**-20).all())
    if digits == 2:  # the second digit uses its range: it is not all zeros or clipped
        assert 100 <= int(q[rows + 1 :].abs().max()) <= 127


def test_row_quantization_rounds_halves_to_even(native: NativeKernels) -> None:
    # max 127 makes the scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, _ = native.quantize_rows_int8(x, 1)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]
    assert torch.equal(quantize_rows(x)[0], q)
    # The second digit is the first's rounding error times 254: 0.5 -> 127, -0.5 -> -127.
    q, _ = native.quantize_rows_int8(x, 2)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2], [0, 127, -127, 127, -127, 127]]


@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_native_rescaling_matches_its_torch_definition(native: NativeKernels, dtype: torch.dtype,
                                                       with_residual: bool, digits: int) -> None:
    generator = torch.Generator().manual_seed(1)
    sums = torch.randint(-(2**20), 2**20, (33 * digits, 96), dtype=torch.int32, generator=generator)
    row_scales, column_scales = seeded_randn(33).abs() * 1e-3, seeded_randn(96, seed=2).abs() * 1e-3
    residual = seeded_randn(33, 96, seed=3).to(dtype) if with_residual else None
    out = native.dequantize_int32(sums, row_scales, column_scales, residual, dtype, digits)
    expected = dequantize(sums, row_scales, column_scales, residual, dtype, digits)
    assert out.shape == (33, 96)
    assert out.dtype == dtype
    # The same float32 arithmetic, up to a fused multiply-add: within one rounding of the output.
    step = 2**-7 if dtype == torch.bfloat16 else 2**-22
    torch.testing.assert_close(out.float(), expected.float(), rtol=step, atol=1e-6)


def test_native_ends_check_their_inputs(native: NativeKernels) -> None:
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.quantize_rows_int8(torch.zeros(2, 8, dtype=torch.float16), 1)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        native.quantize_rows_int8(torch.zeros(8, 2).t(), 1)
    with pytest.raises(RuntimeError, match="digits must be 1 or 2"):
        native.quantize_rows_int8(torch.zeros(2, 8), 3)
    sums = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="column_scales"):
        native.dequantize_int32(sums, torch.ones(2), torch.ones(3), None, torch.float32, 1)
    with pytest.raises(RuntimeError, match="residual"):
        native.dequantize_int32(sums, torch.ones(2), torch.ones(4), torch.zeros(2, 4), torch.bfloat16, 1)
    with pytest.raises(RuntimeError, match="int32"):
        native.dequantize_int32(sums.float(), torch.ones(2), torch.ones(4), None, torch.float32, 1)
    with pytest.raises(RuntimeError, match="row_scales"):  # two digits: 2 sum rows are 1 row
        native.dequantize_int32(sums, torch.ones(2), torch.ones(4), None, torch.float32, 2)


@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("rows", [1, 4, 32, 200])
def test_w8a8_layer_is_close_to_float_arithmetic_native_or_not(native: NativeKernels, rows: int,
                                                               digits: int) -> None:
    weight = seeded_randn(384, 576) * 0.05
    x = seeded_randn(rows, 576, seed=1).bfloat16()
    # A few outlier channels, as real activations have: they cost one digit most of its precision.
    x[:, :4] *= 30
    residual = seeded_randn(rows, 384, seed=2).bfloat16()
    fast, plain = W8A8Linear(weight, native, digits), W8A8Linear(weight, activation_digits=digits)
    reference = x.float() @ weight.t()
    y = fast(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 384)
    # One digit: 8 bits for each row of x, more error than the weights' 8 bits; two digits: the
    # weights' error is most of it.
    relative_error = float((y.float() - reference).norm() / reference.norm())
    weight_only = float((x.float() @ _dequantized(weight).t() - reference).norm() / reference.norm())
    if digits == 1:
        assert 2 * weight_only < relative_error < 0.1
    else:
        assert weight_only * 0.5 < relative_error < weight_only * 1.5
    # The integer products are exact, so the two paths differ only in the last rounding.
    torch.testing.assert_close(y.float(), plain(x).float(), rtol=2**-7, atol=1e-2)
    with_residual = fast(x, residual)
    # The residual is added before the one rounding: within a rounding of y (rounded) + residual.
    torch.testing.assert_close(with_residual.float(), y.float() + residual.float(), rtol=2**-7, atol=2e-2)
    torch.testing.assert_close(with_residual.float(), plain(x, residual).float(), rtol=2**-7, atol=1e-2)
    # Rows are quantized independently: a row's result does not depend on its batch.
    assert torch.equal(fast(x[:1]), y[:1])
    assert fast.kernel_bytes == 384 * 576 + 4 * 384


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    q, scales = quantize_int8(weight)
    return q.float() * scales.float()[:, None]


def test_w8a8_layer_rejects_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="2-D"):
        W8A8Linear(torch.zeros(4))
    with pytest.raises(ValueError, match="activation_digits"):
        W8A8Linear(torch.zeros(4, 4), activation_digits=3)


@pytest.mark.parametrize(("dtype", "weight_format"), [("bfloat16", "w8a8"), ("float32", "w8a8"),
                                                     ("bfloat16", "w8a16")])
def test_a_w8a8_engine_answers_like_the_dense_one(checkpoint: Checkpoint, dtype: str,  # noqa: F811
                                                  weight_format: str) -> None:
    """bfloat16 runs the native quantizer and rescaler, float32 (no native kernels by default) the
    torch ones; both multiply in int8, the head included, and find the answer."""
    llm = make_small_llm(checkpoint, dtype, weight_format)
    try:
        model = llm.engine.model
        assert isinstance(model.layers[0].gate_up, W8A8Linear) and isinstance(model.layers[-1].qkv, W8A8Linear)
        assert model.layers[0].gate_up.activation_digits == (2 if weight_format == "w8a16" else 1)
        assert model.lm_head.kernel(1) == model.lm_head.kernel(64) == weight_format
        answer = capital_answer(llm)
    finally:
        llm.close()
    assert answer.startswith(" Paris")


@pytest.mark.skipif(not onednn_bf16_available(torch.device("cpu"), torch.bfloat16),
                    reason="int4 decode layers need bf16 kernels")
def test_an_int4_w8a16_engine_decodes_int4_and_prefills_w8a16(checkpoint: Checkpoint) -> None:  # noqa: F811
    llm = make_small_llm(checkpoint, "bfloat16", "int4+w8a16")
    try:
        model = llm.engine.model
        layer = model.layers[0].gate_up
        native_int4 = int4_linear_available(model.native)
        assert isinstance(layer, RowRouted)
        small_kernel = "native-int4" if native_int4 else "torch-int4"
        assert layer.small_rows == crossover_rows(small_kernel, "w8a16", cpu_features().isa_levels()[0])
        assert isinstance(layer.large, W8A8Linear) and layer.large.activation_digits == 2
        # The head: int8 weights with float activations for decodes, w8a16 above.
        assert model.lm_head.kernel(1) == "native-int8" and model.lm_head.kernel(64) == "w8a16"
        # A decode row runs the int4 kernel, a chunk above the threshold the w8a16 layer, bit for bit.
        x = seeded_randn(layer.small_rows + 1, 576, seed=4).bfloat16()
        assert torch.equal(layer(x), layer.large(x))
        # (the native int4 x int8 kernel where the CPU has VNNI, as this one has; else torch's)
        assert isinstance(layer.small, Int4Linear if native_int4 else TorchQuantizedLinear)
        assert torch.equal(layer(x[:1]), layer.small(x[:1]))
        answer = capital_answer(llm)
    finally:
        llm.close()
    assert answer.startswith(" Paris")
