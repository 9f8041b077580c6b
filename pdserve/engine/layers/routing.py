"""The one routing rule: a batch of up to ``small_rows`` rows runs the small-batch layer, a larger
one the large-batch layer.

Decoding a few rows reads every weight, so a quantized kernel that reads fewer bytes wins there;
a prefill chunk multiplies far more than it reads, where a float GEMM (or int8 GEMM) wins. The
row count at which the two cross is measured per pair of kernels and per instruction set
(formats.py); this class only applies it.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers.linear import Linear


class RowRouted:
    """``layer(x, residual)`` by ``small`` for up to ``small_rows`` rows of x, by ``large`` above.
    Both compute the same projection, so the result differs only by the kernels' rounding."""

    def __init__(self, small: Linear, large: Linear, small_rows: int) -> None:
        if (small.out_features, small.in_features) != (large.out_features, large.in_features):
            raise ValueError(f"RowRouted's layers differ in shape: {small!r} and {large!r}")
        if small_rows < 0:
            raise ValueError(f"small_rows must be >= 0, got {small_rows}")
        self.small, self.large, self.small_rows = small, large, small_rows
        self.out_features, self.in_features = small.out_features, small.in_features

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] > self.small_rows:
            return self.large(x, residual)
        return self.small(x, residual)

    def kernel(self, rows: int) -> str:
        return (self.small if rows <= self.small_rows else self.large).kernel(rows)

    @property
    def kernel_bytes(self) -> int:
        return self.small.kernel_bytes  # a one-row call runs the small layer

    def __repr__(self) -> str:
        return f"RowRouted({self.small!r} up to {self.small_rows} rows, then {self.large!r})"
