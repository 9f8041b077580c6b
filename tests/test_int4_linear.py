"""The native int4 x int8 kernel (int4_linear.py, native/int4_linear.cpp) against its definition:
the packed weights exactly as quantized, times the activations' two int8 digits, in float64; on
every path this CPU builds (AVX512-VNNI or AVX2 by vpmaddubsw, and the portable scalar one)."""

from __future__ import annotations

import pytest
import torch
from fixtures_native import seeded_randn

from pdserve.engine.layers.build import LayerTarget, build_linear
from pdserve.engine.layers.formats import crossover_rows
from pdserve.engine.layers.int4 import Int4Linear, int4_linear_available, pack_int4, unpack_int4
from pdserve.engine.layers.quantize import quantize_int4
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.native_kernels import NativeKernels


def two_digit_activations(kernels: NativeKernels, x: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: s * (a + b / 254), float64 (int8_digits.h)."""
    digits, scales = kernels.quantize_rows_int8(x, 2)
    rows = x.shape[0]
    return (digits[:rows].double() + digits[rows:].double() / 254) * scales.double()[:, None]


def test_packing_keeps_every_weight_and_group_constant() -> None:
    weight = seeded_randn(48, 96) * 0.05
    q, scales, mins = quantize_int4(weight, 32)
    packed = pack_int4(q, scales, mins)
    expected = q.float() * scales.half().float().repeat_interleave(32, 1) + mins.half().float().repeat_interleave(32, 1)
    assert torch.equal(unpack_int4(packed), expected)
    assert packed.shape == (3, 3, 320) and packed.dtype == torch.uint8
    # The first row block's first group: row 1's inputs 0..3 in the low nibbles of bytes 4..7,
    # its inputs 4..7 in their high nibbles (the layout the kernel's comment describes).
    assert (packed[0, 0, 4:8] & 0x0F).tolist() == q[1, 0:4].tolist()
    assert (packed[0, 0, 4:8] >> 4).tolist() == q[1, 4:8].tolist()
    with pytest.raises(ValueError, match="fp16"):
        pack_int4(q, scales * 1e9, mins)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 12])
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (48, 1536)])
def test_int4_linear_equals_its_definition_in_float32(
    native: NativeKernels, rows: int, out_features: int, in_features: int
) -> None:
    layer = Int4Linear(seeded_randn(out_features, in_features) * 0.05, native)
    x = seeded_randn(rows, in_features, seed=1)
    got = layer(x)
    expected = two_digit_activations(native, x) @ unpack_int4(layer.packed).double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    # float32 sums in another order: relative to the output's scale, far below bf16's resolution.
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())
    # Two digits carry x to about 15 bits: the product is within a few 1e-4 of x's own.
    exact = x.double() @ unpack_int4(layer.packed).double().t()
    assert (got.double() - exact).abs().max() < 5e-4 * exact.abs().max()


def test_int4_linear_in_bf16_adds_the_residual_before_its_one_rounding(native: NativeKernels) -> None:
    layer = Int4Linear(seeded_randn(576, 576) * 0.05, native)
    x = seeded_randn(3, 576, seed=2).bfloat16()
    residual = seeded_randn(3, 576, seed=3).bfloat16()
    got = layer(x, residual)
    expected = two_digit_activations(native, x) @ unpack_int4(layer.packed).double().t() + residual.double()
    assert got.dtype == torch.bfloat16
    # One rounding to bf16: within half a bf16 step (2^-8 relative), plus float32 summation.
    assert ((got.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-5).all()


def test_rows_are_independent_of_their_batch(native: NativeKernels) -> None:
    layer = Int4Linear(seeded_randn(96, 576) * 0.05, native)
    x = seeded_randn(7, 576, seed=4).bfloat16()
    together = layer(x)
    for row in range(7):
        assert torch.equal(layer(x[row : row + 1]), together[row : row + 1])


def test_int4_linear_refuses_what_it_cannot_read(native: NativeKernels) -> None:
    layer = Int4Linear(seeded_randn(32, 64), native)
    with pytest.raises(RuntimeError, match="matching the packed weight"):
        layer(seeded_randn(1, 63))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        layer(seeded_randn(1, 64).double())
    with pytest.raises(RuntimeError, match="residual must be"):
        layer(seeded_randn(2, 64), seeded_randn(2, 31))
    with pytest.raises(RuntimeError, match="packed must be"):
        native.int4_linear(seeded_randn(1, 64), layer.packed.float(), None)
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4Linear(seeded_randn(40, 64), native)
    assert layer(seeded_randn(0, 64)).shape == (0, 32)


def test_the_engine_multiplies_int4_by_the_vectorized_paths_only(native: NativeKernels) -> None:
    """The scalar build is correct (the tests above) but slower than torch's int4 kernel."""
    path = native.path("int4_linear")
    assert path.split()[0] in ("avx512_vnni", "avx2", "portable")
    assert int4_linear_available(native) == (not path.startswith("portable"))


def test_int4_dequantize_gives_the_packed_weights(native: NativeKernels) -> None:
    layer = Int4Linear(seeded_randn(96, 576) * 0.05, native)
    assert native.int4_dequantize is not None
    got = native.int4_dequantize(layer.packed)
    assert got.dtype == torch.float32 and got.shape == (96, 576)
    # d * q + m, fused or not into one rounding: within a float32 step of the torch unpacking.
    torch.testing.assert_close(got, unpack_int4(layer.packed), rtol=1e-6, atol=1e-7)


def test_a_float32_int4_layer_multiplies_small_batches_by_the_kernel_and_large_by_a_gemm(
    native: NativeKernels,
) -> None:
    weight = seeded_randn(96, 128) * 0.05
    target = LayerTarget(torch.float32, torch.device("cpu"), native)
    layer = build_linear(weight, "int4", target)
    assert isinstance(layer, RowRouted)
    if not int4_linear_available(native):  # the portable build: torch's int4 kernel
        assert isinstance(layer.small, TorchQuantizedLinear)
        return
    assert isinstance(layer.small, Int4Linear)
    assert layer.small_rows == crossover_rows("native-int4", "dequantized", target.level)
    assert layer.kernel(1) == "native-int4" and layer.kernel(layer.small_rows + 1) == "dequantized"
    rows = layer.small_rows
    x, residual = seeded_randn(rows + 1, 128, seed=1), seeded_randn(rows + 1, 96, seed=2)
    assert torch.equal(layer(x[:rows], residual[:rows]), layer.small(x[:rows], residual[:rows]))
    # Above the threshold: float32 arithmetic on the same 4-bit weights, x unquantized.
    exact = x.double() @ unpack_int4(layer.small.packed).double().t() + residual.double()
    torch.testing.assert_close(layer(x, residual).double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).double(), exact - residual.double(), rtol=1e-5, atol=1e-5)
