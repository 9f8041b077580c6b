"""The one interface every projection of the model has, and the two plain float layers.

``layer(x [T, in], residual=None)`` is ``x @ W.T (+ residual)`` in x's dtype, whatever the kernel:
the model calls every projection the same way and never asks what it is. ``kernel(rows)`` names
the kernel a batch of that many rows runs (for logs, ``pdserve env`` and tests), and
``kernel_bytes`` is what a one-row call reads, the figure a decode step's memory-bandwidth
ceiling is computed from.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Linear(Protocol):
    """A projection ``[out, in]``, ready to multiply."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor: ...

    def kernel(self, rows: int) -> str:
        """The kernel a batch of ``rows`` runs, a name of the crossover table (formats.py)."""
        ...

    @property
    def kernel_bytes(self) -> int:
        """Bytes of weights (and their scales) a one-row call reads."""
        ...


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DenseLinear:
    """A float weight as it is, multiplied by ``F.linear`` in the weight's dtype; x is converted
    to it and the result back to x's, so a float32 copy can serve a bf16 model's large batches
    with one rounding."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"DenseLinear takes a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight
        wide = x.to(weight.dtype)
        if residual is None:
            return F.linear(wide, weight).to(x.dtype)
        # addmm fuses the residual add into the GEMM's output write.
        return torch.addmm(residual.to(weight.dtype), wide, weight.t()).to(x.dtype)

    def kernel(self, rows: int) -> str:
        return f"dense-{_dtype_name(self.weight.dtype)}"

    @property
    def kernel_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __repr__(self) -> str:
        return f"DenseLinear({self.out_features}x{self.in_features}, {_dtype_name(self.weight.dtype)})"


class Quantized(Linear, Protocol):
    """A quantized layer that can give back the float weights its kernel multiplies."""

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]``."""
        ...


class DequantizedLinear:
    """A float32 GEMM on a quantized layer's weights, dequantized for each call and dropped.

    For batches bound by arithmetic, where a float GEMM beats the quantized kernel, without the
    4 bytes a weight a kept float32 copy would cost; dequantizing takes about a millisecond for
    SmolLM2's largest projection, a few percent of a prefill chunk (docs/engine.md).
    """

    def __init__(self, source: Quantized) -> None:
        self.source = source
        self.out_features, self.in_features = source.out_features, source.in_features

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.source.dequantize()
        if residual is None:
            return F.linear(x.float(), weight).to(x.dtype)
        return torch.addmm(residual.float(), x.float(), weight.t()).to(x.dtype)

    def kernel(self, rows: int) -> str:
        return "dequantized"

    @property
    def kernel_bytes(self) -> int:
        return self.source.kernel_bytes  # the float weights are made, not read

    def __repr__(self) -> str:
        return f"DequantizedLinear({self.source!r})"
