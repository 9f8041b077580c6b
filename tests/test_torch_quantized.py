"""torch's int8/int4 kernels (TorchQuantizedLinear) against dense fp32, Q4_1 -> int4 exactness,
shape checks, and a routed layer running a GEMM on the dequantized weights above its rows.

Error bounds used below:
  * bf16 keeps 8 significant bits, so rounding to it moves a value by at most 2^-8 relative.
  * Kernel vs its own dequantized weight W': the kernel rounds x and the result to bf16 and
    accumulates in fp32, so |y - x @ W'^T| <= 2^-7 * (|x| @ |W'|^T), elementwise, up to fp32 noise.
  * Round-to-nearest error is uniform in [-step/2, step/2], rms step / sqrt(12). Per-row int8
    on Gaussian rows of 128 has step = max|w| / 127 ~ 2.6 sigma / 127: ~0.6% relative error.
    4-bit groups of 32 have step = range / 15 ~ 4.1 sigma / 15: ~8% relative error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.layers.linear import DenseLinear, DequantizedLinear
from pdserve.engine.layers.quantize import quantize_int4
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear

BF16_UNIT_ROUNDOFF = 2.0**-8
OUT_FEATURES, IN_FEATURES = 96, 128


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize(("weight_format", "max_relative_error"), [("int8", 0.01), ("int4", 0.1)])
def test_quantized_output_is_close_to_dense(weight_format: str, max_relative_error: float) -> None:
    weight = _random(OUT_FEATURES, IN_FEATURES) * 0.05
    x = _random(5, IN_FEATURES, seed=1)
    layer = TorchQuantizedLinear(weight, weight_format)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (5, OUT_FEATURES)
    residual = _random(5, OUT_FEATURES, seed=4)
    assert torch.equal(layer(x, residual), residual + y)
    # Quantization error: the estimate in the module docstring (0.6% / 8%) with margin.
    assert _relative_error(y, F.linear(x, weight)) < max_relative_error
    # The kernel itself: only bf16 rounding of x and of y away from fp32 on its own weights.
    dequantized = layer.dequantize()  # [out, in] float32
    bound = 2 * BF16_UNIT_ROUNDOFF * F.linear(x.abs(), dequantized.abs()) + 1e-6
    assert ((y - F.linear(x, dequantized)).abs() <= bound).all()


def test_int8_weights_are_within_half_a_step() -> None:
    weight = _random(OUT_FEATURES, IN_FEATURES)
    dequantized = TorchQuantizedLinear(weight, "int8").dequantize()
    # Each row's step is its bf16 scale, itself at most 2^-8 above max|w| / 127.
    step = weight.abs().amax(dim=1, keepdim=True) / 127 * (1 + BF16_UNIT_ROUNDOFF)
    assert ((dequantized - weight).abs() <= step / 2 * (1 + 1e-5)).all()


def _q4_1_matrix(
    out_features: int, in_features: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A llama.cpp Q4_1-style matrix: (w [out, in], q [out, groups, 32], d, m [out, groups])."""
    generator = torch.Generator().manual_seed(seed)
    num_groups = in_features // 32
    q = torch.randint(0, 16, (out_features, num_groups, 32), generator=generator)
    # llama.cpp's Q4_1 quantizer maps each group's min to 0 and max to 15: every group has both
    # (true of all 3.3M groups in SmolLM2-135M-Instruct.Q4_1.gguf).
    q[..., 0], q[..., 1] = 0, 15
    q = q[..., torch.randperm(32, generator=generator)]
    d = (torch.rand(out_features, num_groups, generator=generator) * 0.01 + 1e-4).half().float()
    # Weights near zero-mean put m near -7.5 d; spread it to exercise large zeros too.
    spread = torch.randn(out_features, num_groups, generator=generator) * 0.02
    m = (-7.5 * d + spread).half().float()
    # As gguf.quants dequantizes Q4_1: float32 d * q + m.
    w = (d[..., None] * q.float() + m[..., None]).reshape(out_features, in_features)
    return w, q, d, m


def test_q4_1_weights_round_trip_through_int4() -> None:
    w, q, d, m = _q4_1_matrix(OUT_FEATURES, 256, seed=2)
    q_again, scales, mins = quantize_int4(w, 32)
    # The original integers come back exactly, the scale and min up to float32 rounding.
    assert torch.equal(q_again.reshape(q.shape), q.to(torch.int32))
    assert torch.allclose(scales, d, rtol=1e-6, atol=0) and torch.equal(mins, m)
    # The kernel stores scale s' = bf16(d) and zero z' = bf16(m + 8 d) and computes
    # (q - 8) s' + z', so w' - w = (q - 8)(s' - d) + (z' - (m + 8 d)):
    # |w' - w| <= 2^-8 (|q - 8| d + |m + 8 d|).
    error = (TorchQuantizedLinear(w, "int4").dequantize() - w).reshape(q.shape).abs()
    bound = BF16_UNIT_ROUNDOFF * ((q - 8).abs() * d[..., None] + (m + 8 * d).abs()[..., None])
    assert (error <= bound * (1 + 1e-4) + 1e-8).all()


def test_int4_dequantize_paths_agree() -> None:
    # With keep_nibbles the layer unpacks its own nibble copy; without, it reads the kernel's
    # packed weight back through the kernel: both must give the same integers.
    weight = _random(OUT_FEATURES, IN_FEATURES, seed=3)
    plain = TorchQuantizedLinear(weight, "int4", group_size=64)
    with_nibbles = TorchQuantizedLinear(weight, "int4", group_size=64, keep_nibbles=True)
    assert torch.equal(plain.dequantize(), with_nibbles.dequantize())


def test_bytes_count_packed_weight_scales_and_copies() -> None:
    weight = _random(OUT_FEATURES, IN_FEATURES)
    num_weights, num_groups = OUT_FEATURES * IN_FEATURES, OUT_FEATURES * IN_FEATURES // 32
    assert DenseLinear(weight).kernel_bytes == 4 * num_weights
    assert DenseLinear(weight.bfloat16()).kernel_bytes == 2 * num_weights
    int8 = TorchQuantizedLinear(weight, "int8")
    assert int8.kernel_bytes == int8.nbytes == num_weights + 2 * OUT_FEATURES
    int4 = TorchQuantizedLinear(weight, "int4")
    assert int4.kernel_bytes == int4.nbytes == num_weights // 2 + 4 * num_groups
    # The nibble copy is held (nbytes) but not read by the kernel (kernel_bytes).
    with_nibbles = TorchQuantizedLinear(weight, "int4", keep_nibbles=True)
    assert with_nibbles.nbytes == num_weights + 4 * num_groups
    assert with_nibbles.kernel_bytes == int4.kernel_bytes == DequantizedLinear(with_nibbles).kernel_bytes


@pytest.mark.parametrize(
    ("weight_shape", "weight_format", "group_size"),
    [
        ((OUT_FEATURES, IN_FEATURES), "int3", 32),  # unknown format
        ((OUT_FEATURES, IN_FEATURES), "dense", 32),  # not a torch-quantized format
        ((OUT_FEATURES * IN_FEATURES,), "int8", 32),  # not 2-D
        ((OUT_FEATURES, 60), "int8", 32),  # the int8 kernel misreads rows not a multiple of 8
        ((OUT_FEATURES, 100), "int4", 32),  # in_features not a multiple of the group
        ((24, IN_FEATURES), "int4", 32),  # out_features not a multiple of 16
        ((OUT_FEATURES, IN_FEATURES), "int4", 16),  # group size the kernel lacks
    ],
)
def test_bad_format_or_shape_raises(
    weight_shape: tuple[int, ...], weight_format: str, group_size: int
) -> None:
    with pytest.raises(ValueError):
        TorchQuantizedLinear(torch.zeros(weight_shape), weight_format, group_size=group_size)


def test_dense_linear_is_f_linear_in_its_weights_dtype() -> None:
    weight = _random(OUT_FEATURES, IN_FEATURES)
    x, residual = _random(7, IN_FEATURES, seed=1), _random(7, OUT_FEATURES, seed=2)
    assert torch.equal(DenseLinear(weight)(x), F.linear(x, weight))
    assert torch.equal(DenseLinear(weight)(x, residual), torch.addmm(residual, x, weight.t()))
    # A float32 weight serves bf16 activations with one rounding of the float32 result.
    assert torch.equal(DenseLinear(weight)(x.bfloat16()), F.linear(x.bfloat16().float(), weight).bfloat16())
    with pytest.raises(ValueError, match="2-D float"):
        DenseLinear(torch.zeros(4, 4, dtype=torch.int8))


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_a_routed_layer_runs_a_dequantized_gemm_above_its_rows(weight_format: str) -> None:
    weight = _random(OUT_FEATURES, IN_FEATURES)
    quantized = TorchQuantizedLinear(weight, weight_format, keep_nibbles=True)
    routed = RowRouted(quantized, DequantizedLinear(quantized), small_rows=4)
    small, large = _random(4, IN_FEATURES, seed=1), _random(5, IN_FEATURES, seed=2)
    # At the threshold: the quantized kernel, bit for bit.
    assert torch.equal(routed(small), quantized(small))
    assert routed.kernel(4) == f"torch-{weight_format}" and routed.kernel(5) == "dequantized"
    # Above it: fp32 F.linear on the dequantized weight, bit for bit; unlike the kernel's
    # result, which went through bf16.
    dense_result = F.linear(large, quantized.dequantize())
    assert torch.equal(routed(large), dense_result)
    assert not torch.equal(quantized(large), dense_result)
    # An empty batch is fine either way.
    assert routed(torch.zeros(0, IN_FEATURES)).shape == (0, OUT_FEATURES)
    with pytest.raises(ValueError, match="small_rows"):
        RowRouted(quantized, DequantizedLinear(quantized), small_rows=-1)
    with pytest.raises(ValueError, match="differ in shape"):
        RowRouted(quantized, DenseLinear(weight[:32]), small_rows=4)
