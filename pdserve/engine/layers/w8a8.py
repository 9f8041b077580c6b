"""Linear layers in int8 arithmetic: int8 weights times int8 activations (W8A8).

Weights are quantized once, symmetric per output channel; activations are quantized on every
call, symmetric per row (token), by their own absolute maximum. ``torch._int_mm`` multiplies the
integers with int32 sums (oneDNN's VNNI kernels on x86), and each sum is scaled back by its row's
and its column's scale.

An activation may be carried as two int8 digits instead of one (``activation_digits=2``, the
"w8a16" weight format): the second digit is the first's rounding error times 254, so
x ~ scale * (q1 + q2 / 254), about 15 bits, and the two digits' rows are multiplied in the same
``_int_mm`` call. It costs about 1.4x the matmul time at 32 rows and 2x at 512, and buys back
most of the accuracy one digit loses (docs/engine.md).

Why: on the 2-core Xeon with AVX512-VNNI (a VM, no AMX) the int8 dot-product instruction runs
at about 3.4x the bf16 one, and oneDNN's int8 GEMM at 4-7x its bf16 GEMM from 8 rows up (tables
in docs/engine.md, *Linear-layer timings by machine*).

Activation quantization changes the arithmetic beyond weight-only formats: with one digit each
row keeps 8 bits relative to its largest entry, and SmolLM2's activations have channels 10-150x
their median. That is what "w8a8" (a weight format of its own, never the default) trades for
the speed; ``benchmarks/dtype_agreement.py`` measures it against the float32 reference:
teacher-forced next-token agreement 90% for w8a8, 96% for w8a16, 98% for dense bf16.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers.quantize import quantize_int8
from pdserve.engine.native_kernels import NativeKernels

INT8_MAX = 127.0
SECOND_DIGIT = 254.0
"""A first digit's rounding error (at most 1/2) times this spans the int8 range."""

def format_name(activation_digits: int) -> str:
    """w8a8 or w8a16: what a layer with this many activation digits computes."""
    return "w8a8" if activation_digits == 1 else "w8a16"


CUDA_MIN_ROWS = 17
"""``torch._int_mm`` on CUDA takes only more than 16 rows; smaller batches are padded."""


def quantize_rows(x: torch.Tensor, digits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [digits * T, K] int8, scales [T] float32).

    v = x * (127 / max|row|); q1 = round(v), half to even, and with two digits q2 =
    round((v - q1) * 254) in rows T..2T-1, so x ~ scale * (q1 + q2 / 254): exactly what the
    native kernel computes. An all-zero row gets scale 0 and q = 0.
    """
    wide = x.float()
    max_abs = wide.abs().amax(dim=1)
    # A true division: ``INT8_MAX / max_abs`` would run as reciprocal-then-product, rounding twice.
    inverse = torch.where(max_abs > 0, torch.full_like(max_abs, INT8_MAX) / max_abs, torch.zeros_like(max_abs))
    scaled = wide * inverse[:, None]
    first = torch.round(scaled).clamp_(-INT8_MAX, INT8_MAX)
    if digits == 2:
        second = torch.round((scaled - first) * SECOND_DIGIT).clamp_(-INT8_MAX, INT8_MAX)
        first = torch.cat([first, second])
    return first.to(torch.int8), max_abs / INT8_MAX


def dequantize(sums: torch.Tensor, row_scales: torch.Tensor, column_scales: torch.Tensor,
               residual: torch.Tensor | None, dtype: torch.dtype, digits: int = 1) -> torch.Tensor:
    """int32 sums [digits * T, N] -> (sum1 [+ sum2 / 254]) * row_scale * column_scale
    (+ residual), in ``dtype``."""
    rows = sums.shape[0] // digits
    y = sums[:rows].float()
    if digits == 2:
        y = y + sums[rows:].float() / SECOND_DIGIT
    y = y * row_scales[:, None] * column_scales[None, :]
    if residual is not None:
        y = y + residual.float()
    return y.to(dtype)


class W8A8Linear:
    """``layer(x [T, in])`` is ``x @ weight.T`` in int8 arithmetic, in x's dtype;
    ``layer(x, residual)`` adds ``residual`` before the one rounding to x's dtype.

    weight: [out, in] in any float precision (quantized from as given). ``activation_digits``:
    1 (w8a8) or 2 (w8a16, see the module docstring). ``native`` (CPU) fuses the row
    quantization and the rescaling into one call each; without it they are torch ops.
    ``out_dtype``: the result's dtype if not x's (the LM head's float32 logits, rounded once).
    """

    def __init__(self, weight: torch.Tensor, native: NativeKernels | None = None, activation_digits: int = 1,
                 out_dtype: torch.dtype | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"W8A8Linear takes a 2-D [out, in] weight, got {tuple(weight.shape)}")
        if activation_digits not in (1, 2):
            raise ValueError(f"activation_digits must be 1 or 2, got {activation_digits}")
        self.activation_digits = activation_digits
        self.out_dtype = out_dtype
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_int8(weight)
        # _int_mm takes [in, out]; the transposed view of the [out, in] rows ran as fast or faster
        # than a contiguous [in, out] copy at every shape and batch measured, 5x at one row.
        self._weight_t = q.t()
        self._scales = scales.float()
        # The native row quantizer and rescaler, where both built.
        self._native = (native if weight.device.type == "cpu" and native is not None
                        and native.quantize_rows_int8 is not None and native.dequantize_int32 is not None else None)

    @property
    def kernel_bytes(self) -> int:
        return self._weight_t.numel() + self._scales.numel() * 4

    def kernel(self, rows: int) -> str:
        return format_name(self.activation_digits)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        digits = self.activation_digits
        out_dtype = self.out_dtype or x.dtype
        native = self._native
        if native is not None:
            assert native.quantize_rows_int8 is not None and native.dequantize_int32 is not None
            q, row_scales = native.quantize_rows_int8(x, digits)
            return native.dequantize_int32(torch._int_mm(q, self._weight_t), row_scales, self._scales, residual,
                                           out_dtype, digits)
        q, row_scales = quantize_rows(x, digits)
        rows = q.shape[0]
        if x.device.type == "cuda" and rows < CUDA_MIN_ROWS:
            q = torch.cat([q, q.new_zeros(CUDA_MIN_ROWS - rows, q.shape[1])])
        sums = torch._int_mm(q, self._weight_t)[:rows]
        return dequantize(sums, row_scales, self._scales, residual, out_dtype, digits)

    def __repr__(self) -> str:
        return f"W8A8Linear(out={self.out_features}, in={self.in_features}, activation_digits={self.activation_digits})"
