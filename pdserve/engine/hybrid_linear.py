"""A quantized layer for small batches beside a pre-packed bf16 copy for large ones (CPU).

Decoding a few rows is bound by reading the weights, so a 4-bit (or 8-bit) weight is faster
there; a prefill chunk or a large decode batch is bound by arithmetic, where oneDNN's packed
bf16 GEMM is faster than the quantized kernels, which dequantize again for every few rows.
Measured on the 2-core Xeon with AVX512-BF16 (torch 2.13, 2 threads, cold weights, us per call;
the crossover moves little between shapes)::

    rows                     1      8     12     16     24     32
    gate_up 3072x576 bf16  232    370    401    471    793    902
                     int8  143    362    483    697   1024   1353
                     int4   88    257    358    565    828   1064
    down 576x1536    bf16   87    202    210    280    444    520
                     int4   57    134    204    250    389    487

so int4 runs up to 12 rows and int8 up to 4 (``ONEDNN_DENSE_ABOVE``). The bf16 copy costs two
bytes a weight beside the quantized ones: for SmolLM2-135M, 255 MB beside 66 MB of int4.

Where the native kernels have the int4 x int8 kernel (AVX512-VNNI, int4_linear.py), int4 layers
run it instead of torch's int4 kernel: it multiplies nibbles by the activations' int8 digits
rather than unpacking them to bf16, and stays ahead of the dense layers far longer (same machine,
us per call)::

    rows                        8     24     32     64
    gate_up  native int4      148    384    495   1056
             packed bf16      356    722    878   1342
             w8a16            267    408    454    764
    down     native int4       87    224    273    587
             packed bf16      220    399    497    761
             w8a16            207    278    288    442

so it runs up to 64 rows beside packed bf16 and up to 24 beside w8a16 (``int4+w8a16``):
``NATIVE_INT4_DENSE_ABOVE``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.int4_linear import Int4Linear, int4_linear_available
from pdserve.engine.native_kernels import NativeKernels
from pdserve.engine.onednn_linear import OneDnnLinear
from pdserve.engine.quantization import PackedLinear
from pdserve.engine.w8a8_linear import W8A8Linear

ONEDNN_DENSE_ABOVE = {"int8": 4, "int4": 12}
"""Rows above which the packed bf16 copy is faster than the quantized kernel (table above)."""
NATIVE_INT4_DENSE_ABOVE = {"bf16": 64, "w8a16": 24, "float32": 64}
"""Rows above which the dense layer (packed bf16, w8a16, or a float32 GEMM on the weights
dequantized for the call) is faster than the native int4 kernel."""


class HybridLinear:
    """``layer(x)`` is ``x @ weight.T`` in bf16, by the quantized kernel for up to ``dense_above``
    rows and by the dense layer above (the packed bf16 weight, or for "int4+w8a16" a w8a16
    layer); ``layer(x, residual)`` adds ``residual``."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_format: str,
        dense: OneDnnLinear | W8A8Linear | None,
        native: NativeKernels | None = None,
    ) -> None:
        """weight: [out, in] in any float precision, quantized from as given; dense: the same
        weight as the dense model packs it, so batches above the threshold compute exactly what
        weight_format="dense" computes (or as w8a16 computes it, for "int4+w8a16"), or None for
        float32 models: a float32 GEMM on the int4 weights dequantized for the call (no copy
        kept), which needs the native int4 kernel (ValueError without it); native: the
        kernels, whose int4 x int8 kernel int4 layers use where it was built."""
        if weight_format not in ONEDNN_DENSE_ABOVE:
            raise ValueError(f"HybridLinear quantizes to one of {tuple(ONEDNN_DENSE_ABOVE)}, got {weight_format!r}")
        self.quantized: PackedLinear | Int4Linear
        self._small: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
        native_int4 = _native_int4(weight, native) if weight_format == "int4" else None
        self.dense: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
        if dense is None:
            if native_int4 is None:
                raise ValueError("a float32 int4 hybrid needs the native int4 kernel (vectorized, and the "
                                 "weight's group constants within fp16)")
            self.quantized = self._small = native_int4
            self.dense = native_int4.dense
            self.dense_above = NATIVE_INT4_DENSE_ABOVE["float32"]
            return
        self.dense = dense
        if native_int4 is not None:
            self.quantized = self._small = native_int4
            self.dense_above = NATIVE_INT4_DENSE_ABOVE["w8a16" if isinstance(dense, W8A8Linear) else "bf16"]
        else:
            self.quantized = PackedLinear(weight, weight_format)
            kernel = self.quantized.kernel
            assert kernel is not None  # a quantized format has one
            self._small = lambda x, residual: kernel(x) if residual is None else residual + kernel(x)
            self.dense_above = ONEDNN_DENSE_ABOVE[weight_format]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] > self.dense_above:
            return self.dense(x, residual)
        return self._small(x.contiguous(), residual)

    def __repr__(self) -> str:
        return f"HybridLinear({self.quantized!r}, dense_above={self.dense_above})"


def _native_int4(weight: torch.Tensor, native: NativeKernels | None) -> Int4Linear | None:
    """The weight for the native int4 kernel, or None where it is not built, or where the
    weight's group constants overflow its fp16 (torch's kernel keeps them in bf16)."""
    if native is None or not int4_linear_available(native):
        return None
    try:
        return Int4Linear(weight, native)
    except ValueError:
        return None
