"""The output projection (hidden state -> vocabulary logits), by the fastest kernel at hand.

The head is the largest matrix of a small model (SmolLM2-135M: 49,152 x 576, a fifth of its
weights), and a decode step reads all of it to score a few rows, so at small batches its cost is
the bytes it reads. Quantized models therefore keep an int8 copy for those batches (one byte a
weight, a float scale per row): on the 2-core Xeon with AVX512-BF16, one row took 1.30 ms by the
native kernel against 2.13 ms by torch's ``_weight_int8pack_mm`` and 3.03 ms by the packed bf16
head (2 threads, cold weights; 4 rows: 2.35 / 3.49 / 3.58 ms). Larger batches are bound by
arithmetic and run dense. Dense models keep a dense head at every batch size: int8 would change
their logits (it adds 1.2% error to SmolLM2's Q8_0 embedding, see quantization.py). "w8a8"
and "w8a16" models multiply int8 by int8 at every batch size (w8a8_linear.py), the head included: at 32
rows it took 2.9 ms where the packed bf16 head took about 15.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine.native_kernels import NativeKernels
from pdserve.engine.onednn_linear import OneDnnLinear
from pdserve.engine.quantization import DEFAULT_DENSE_ABOVE, PackedLinear, quantize_int8
from pdserve.engine.w8a8_linear import ACTIVATION_DIGITS, INT4_DECODE_W8A16, W8A8Linear, format_name

Head = Callable[[torch.Tensor], torch.Tensor]
"""x [T, hidden] -> float32 logits [T, vocab]."""

NATIVE_INT8_MAX_ROWS = 4
"""Rows the native int8 kernel takes (a decode batch); above, the dense head is faster."""


class LmHead:
    """``head(x [T, hidden]) -> float32 logits [T, vocab]``.

    weight: the dense ``[vocab, hidden]`` head in the model's dtype (with tied embeddings, the
    embedding matrix itself, shared, not copied). ``weight_format`` is the model's: int8, int4
    and int4+w8a16 add an int8 copy for small batches, run by the native kernel when ``native``
    is given, else by torch's int8 kernel (up to 24 rows, its crossover with float32); w8a8 and
    w8a16 run every batch in int8 arithmetic, int4+w8a16 the batches above the small ones (as
    w8a16). ``onednn`` packs the dense head for oneDNN.
    """

    def __init__(self, weight: torch.Tensor, weight_format: str, native: NativeKernels | None, onednn: bool) -> None:
        self.weight = weight
        quantized = weight_format in ("int8", "int4", INT4_DECODE_W8A16)
        if weight_format in ACTIVATION_DIGITS:
            w8a8 = W8A8Linear(weight, native, ACTIVATION_DIGITS[weight_format])
            self._dense: tuple[str, Head] = (format_name(w8a8.activation_digits), lambda x: w8a8(x.float()))
            self._dense_bytes = w8a8.nbytes
        elif onednn:
            packed = OneDnnLinear(weight)
            self._dense = ("onednn", lambda x: packed(x).float())
            self._dense_bytes = packed.nbytes
        else:
            self._dense = ("dense", lambda x: F.linear(x, weight).float())
            self._dense_bytes = weight.numel() * weight.element_size()
        # The small-batch kernel of quantized models, the rows it takes, the bytes it reads.
        self._small: tuple[str, Head] | None = None
        self._small_rows = 0
        self._small_bytes = 0
        int8_linear = native.int8_linear if native is not None else None
        if quantized and int8_linear is not None:
            q, scales = quantize_int8(weight)
            scales = scales.float()
            self._small = ("native-int8", lambda x: int8_linear(x.contiguous(), q, scales))
            self._small_rows = NATIVE_INT8_MAX_ROWS
            self._small_bytes = q.numel() + scales.numel() * scales.element_size()
        elif quantized:
            packed_int8 = PackedLinear(weight, "int8")
            self._small = ("int8", packed_int8)
            self._small_rows = DEFAULT_DENSE_ABOVE["int8"]
            self._small_bytes = packed_int8.kernel_bytes

    @property
    def decode_bytes(self) -> int:
        """Bytes a batch-1 decode step reads of the head."""
        return self._small_bytes if self._small is not None else self._dense_bytes

    def _route(self, rows: int) -> tuple[str, Head]:
        if self._small is not None and rows <= self._small_rows:
            return self._small
        return self._dense

    def kernel(self, rows: int) -> str:
        """Which kernel a batch of ``rows`` runs: native-int8, int8, w8a8, w8a16, onednn or dense."""
        return self._route(rows)[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._route(x.shape[0])[1](x)
