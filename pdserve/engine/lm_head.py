"""The output projection (hidden state -> vocabulary logits), by the fastest kernel at hand.

The head is the largest matrix of a small model (SmolLM2-135M: 49,152 x 576, a fifth of its
weights), and a decode step reads all of it to score a few rows, so at small batches its cost is
the bytes it reads. Quantized models therefore keep an int8 copy for those batches (one byte a
weight, a float scale per row): on the 2-core Xeon with AVX512-BF16, one row took 1.30 ms by the
native kernel against 2.13 ms by torch's ``_weight_int8pack_mm`` and 3.03 ms by the packed bf16
head (2 threads, cold weights; 4 rows: 2.35 / 3.49 / 3.58 ms). Larger batches are bound by
arithmetic and run dense. Dense models keep a dense head at every batch size: int8 would change
their logits (it adds 1.2% error to SmolLM2's Q8_0 embedding, see quantization.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.native_kernels import NativeKernels
from pdserve.engine.onednn_linear import OneDnnLinear
from pdserve.engine.quantization import DEFAULT_DENSE_ABOVE, PackedLinear, quantize_int8

NATIVE_INT8_MAX_ROWS = 4
"""Rows the native int8 kernel takes (a decode batch); above, the dense head is faster."""


class LmHead:
    """``head(x [T, hidden]) -> float32 logits [T, vocab]``.

    weight: the dense ``[vocab, hidden]`` head in the model's dtype (with tied embeddings, the
    embedding matrix itself, shared, not copied). ``quantized`` adds the int8 copy for small
    batches: run by the native kernel when ``native`` is given, else by torch's int8 kernel
    (up to 24 rows, its crossover with float32). ``onednn`` packs the dense head for oneDNN.
    """

    def __init__(self, weight: torch.Tensor, quantized: bool, native: NativeKernels | None, onednn: bool) -> None:
        self.weight = weight
        self._onednn = OneDnnLinear(weight) if onednn else None
        self._native = native if quantized else None
        self._native_int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self._packed_int8: PackedLinear | None = None
        if quantized and native is not None:
            q, scales = quantize_int8(weight)
            self._native_int8 = (q, scales.float())
        elif quantized:
            self._packed_int8 = PackedLinear(weight, "int8")

    @property
    def decode_bytes(self) -> int:
        """Bytes a batch-1 decode step reads of the head."""
        if self._native_int8 is not None:
            q, scales = self._native_int8
            return q.numel() + scales.numel() * scales.element_size()
        if self._packed_int8 is not None:
            return self._packed_int8.out_features * (self._packed_int8.in_features + 2)
        return self.weight.numel() * self.weight.element_size()

    def kernel(self, rows: int) -> str:
        """Which kernel a batch of ``rows`` runs: native-int8, int8, onednn or dense."""
        if self._native_int8 is not None and rows <= NATIVE_INT8_MAX_ROWS:
            return "native-int8"
        if self._packed_int8 is not None and rows <= DEFAULT_DENSE_ABOVE["int8"]:
            return "int8"
        return "onednn" if self._onednn is not None else "dense"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel(x.shape[0])
        if kernel == "native-int8":
            assert self._native is not None and self._native_int8 is not None
            return self._native.int8_linear(x.contiguous(), *self._native_int8)
        if kernel == "int8":
            assert self._packed_int8 is not None
            return self._packed_int8(x)
        if self._onednn is not None:
            return self._onednn(x).float()
        return F.linear(x, self.weight).float()
