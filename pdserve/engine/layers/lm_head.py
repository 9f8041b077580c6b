"""The output projection (hidden state -> vocabulary logits), built like any other layer.

The head is the largest matrix of a small model (SmolLM2-135M: 49,152 x 576, a fifth of its
weights), and a decode step reads all of it to score a few rows, so at small batches its cost is
the bytes it reads. Quantized models therefore keep an int8 copy for those batches (one byte a
weight, a float scale a row), by the native GEMV where it is built, else by torch's int8 kernel;
larger batches are bound by arithmetic and run dense. Dense models keep a dense head at every
batch size: int8 would change their logits (1.2% error on SmolLM2's Q8_0 embedding, quantize.py).
"w8a8" and "w8a16" models multiply int8 by int8 at every batch size, the head included.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers.build import LayerTarget, dense_layer
from pdserve.engine.layers.formats import ACTIVATION_DIGITS, INT4_DECODE_W8A16
from pdserve.engine.layers.int8 import MAX_ROWS, Int8Linear
from pdserve.engine.layers.linear import Linear
from pdserve.engine.layers.onednn import OneDnnLinear
from pdserve.engine.layers.torch_quantized import TorchQuantizedLinear
from pdserve.engine.layers.w8a8 import W8A8Linear

_INT8_DECODE_FORMATS = ("int8", "int4", INT4_DECODE_W8A16)
"""The formats whose head keeps an int8 copy for decode batches."""


class LmHead:
    """``head(x [T, hidden]) -> float32 logits [T, vocab]``."""

    def __init__(self, layer: Linear) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).float()

    def kernel(self, rows: int) -> str:
        """Which kernel a batch of ``rows`` runs (a name of the crossover table)."""
        return self.layer.kernel(rows)

    @property
    def decode_bytes(self) -> int:
        """Bytes a batch-1 decode step reads of the head."""
        return self.layer.kernel_bytes


def build_lm_head(weight: torch.Tensor, weight_format: str, target: LayerTarget) -> LmHead:
    """weight: the dense ``[vocab, hidden]`` head in the model's dtype (with tied embeddings the
    embedding matrix itself, shared by the dense layer, not copied)."""
    large: Linear
    if weight_format in ACTIVATION_DIGITS:
        large = W8A8Linear(weight, target.native, ACTIVATION_DIGITS[weight_format], out_dtype=torch.float32)
    elif target.onednn:
        large = OneDnnLinear(weight)  # no float32 copy: the head's large batches are rare
    else:
        large = dense_layer(weight, target)
    if weight_format not in _INT8_DECODE_FORMATS:
        return LmHead(large)
    if target.native is not None and target.native.int8_linear is not None:
        small = Int8Linear(weight, target.native, out_dtype=torch.float32)
        return LmHead(target.routed(small, large, max_rows=MAX_ROWS))
    return LmHead(target.routed(TorchQuantizedLinear(weight, "int8"), large))
