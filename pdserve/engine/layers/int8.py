"""int8 weights (a float scale per row) multiplied by the native ``int8_linear`` GEMV.

A decode step's few rows read the whole matrix, so at those batches its cost is the bytes read:
one byte a weight. Used for quantized models' LM head (lm_head.py), the largest matrix of a small
model, read whole every step. The kernel takes at most ``MAX_ROWS`` rows.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers.quantize import quantize_int8
from pdserve.engine.native_kernels import NativeKernels

MAX_ROWS = 4
"""Rows the kernel takes in one call (native/int8_linear.cpp's kMaxRows)."""


class Int8Linear:
    """``layer(x [T <= 4, in], residual=None)`` = x @ W.T (+ residual), summed in float32, in x's
    dtype or ``out_dtype`` (the LM head's float32 logits, never rounded to bf16)."""

    def __init__(self, weight: torch.Tensor, native: NativeKernels, out_dtype: torch.dtype | None = None) -> None:
        if native.int8_linear is None:
            raise ValueError("Int8Linear needs the native int8_linear kernel, which did not build here")
        self.out_features, self.in_features = weight.shape
        self._q, scales = quantize_int8(weight)
        self._scales = scales.float()
        self._kernel = native.int8_linear
        self.out_dtype = out_dtype

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self._kernel(x.contiguous(), self._q, self._scales).to(self.out_dtype or x.dtype)
        return y if residual is None else residual + y

    def kernel(self, rows: int) -> str:
        return "native-int8"

    @property
    def kernel_bytes(self) -> int:
        return self._q.numel() + self._scales.numel() * self._scales.element_size()

    def __repr__(self) -> str:
        return f"Int8Linear({self.out_features}x{self.in_features})"
