"""One build function: a weight, its format and the machine in, a ready layer out.

Every projection is made here, and the LM head's layer too (lm_head.py), so the choice of kernels
is written once: which kernel a format uses for small batches (native int4 where built, else
torch's), which dense layer takes large ones (oneDNN-packed bf16 on CPUs with bf16 hardware, a
float32 copy above that, or a float GEMM on weights dequantized for the call), and where they
cross (the crossover table, formats.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.layers.formats import (
    ACTIVATION_DIGITS,
    INT4_DECODE_W8A16,
    WEIGHT_FORMATS,
    crossover_rows,
)
from pdserve.engine.layers.int4 import Int4Linear, int4_linear_available
from pdserve.engine.layers.linear import DenseLinear, DequantizedLinear, Linear, Quantized
from pdserve.engine.layers.onednn import OneDnnLinear, onednn_bf16_available
from pdserve.engine.layers.routing import RowRouted
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.layers.w8a8 import W8A8Linear
from pdserve.engine.native_kernels import NativeKernels


@dataclass(frozen=True)
class LayerTarget:
    """What the layers run on: the compute dtype and device, the native kernels (None: torch's
    only), and the CPU's instruction-set level, which picks the crossover table's section."""

    dtype: torch.dtype
    device: torch.device
    native: NativeKernels | None = None
    large_batch_float32: bool = True
    """With oneDNN-packed bf16 layers, also keep a float32 copy for large batches (config.py)."""
    isa: str = ""
    """The crossover table's section: avx512_bf16, avx512, avx2 or portable; empty: this CPU's
    (its best kernel level, CpuFeatures.crossover_section)."""
    crossover: Callable[[str, str, str], int] = crossover_rows
    """(small kernel, large kernel, level) -> rows the small one takes: the table's lookup
    (benchmarks/crossover_rows.py passes its own, to build pairs the table lacks)."""

    @property
    def onednn(self) -> bool:
        """Whether dense bf16 weights are packed for oneDNN here."""
        return onednn_bf16_available(self.device, self.dtype)

    @property
    def level(self) -> str:
        if self.isa:
            return self.isa
        cpu = cpu_features()
        return cpu.crossover_section(cpu.isa_levels()[0])

    def routed(self, small: Linear, large: Linear, max_rows: int | None = None) -> RowRouted:
        """small for the batches the crossover table gives it (at most ``max_rows``), large above."""
        rows = self.crossover(small.kernel(1), large.kernel(1), self.level)
        return RowRouted(small, large, rows if max_rows is None else min(rows, max_rows))


def build_linear(weight: torch.Tensor, weight_format: str, target: LayerTarget) -> Linear:
    """weight: ``[out, in]`` in the checkpoint's own precision. Quantizing from it rather than
    from the compute dtype's rounding gives a Q4_1 matrix back exactly (quantize.py)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    weight = weight.to(device=target.device)
    if weight_format in ACTIVATION_DIGITS:
        int8 = W8A8Linear(weight, target.native, ACTIVATION_DIGITS[weight_format])
        # int4+w8a16: int4 where a decode batch reads weights, w8a16 where a prefill chunk
        # multiplies; without bf16 kernels for the int4 half, w8a16 throughout.
        if weight_format == INT4_DECODE_W8A16 and target.onednn:
            return target.routed(_decode_kernel(weight, "int4", target, keep_nibbles=False), int8)
        return int8
    if weight_format == "dense":
        return dense_layer(weight, target)
    if target.onednn:
        small = _decode_kernel(weight, weight_format, target, keep_nibbles=False)
        return target.routed(small, dense_layer(weight, target))
    small = _decode_kernel(weight, weight_format, target, keep_nibbles=True)
    return target.routed(small, DequantizedLinear(small))


def dense_layer(weight: torch.Tensor, target: LayerTarget) -> Linear:
    """The weight in the compute dtype: packed for oneDNN where it has bf16 kernels (with a
    float32 copy for large batches, where MKL's float32 GEMM outran oneDNN's bf16 one), plain
    elsewhere."""
    if not target.onednn:
        return DenseLinear(weight.to(target.dtype))
    packed = OneDnnLinear(weight.to(target.dtype))
    if not target.large_batch_float32:
        return packed
    return target.routed(packed, DenseLinear(weight.float()))


def _decode_kernel(weight: torch.Tensor, weight_format: str, target: LayerTarget, keep_nibbles: bool) -> Quantized:
    """The small-batch layer of a quantized format: the native int4 kernel where it is built and
    the weight's group constants fit its fp16, else torch's int8/int4 kernel (``keep_nibbles``:
    for a layer whose large batches dequantize it)."""
    if weight_format == "int4" and int4_linear_available(target.native):
        assert target.native is not None
        try:
            return Int4Linear(weight, target.native)
        except ValueError:  # group constants beyond fp16: torch's kernel keeps them in bf16
            pass
    return TorchQuantizedLinear(weight, weight_format, keep_nibbles=keep_nibbles)
