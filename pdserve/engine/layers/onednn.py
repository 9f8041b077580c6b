"""bfloat16 linear layers with weights pre-packed once for oneDNN (CPU only).

``F.linear`` on a bf16 CPU tensor hands the ``[out, in]`` weight to oneDNN, which reorders it into
its blocked layout on every call: for a decode step (a handful of rows) that reorder costs as much
as the multiplication. Packing once at load time removes it (about 2x at one row, equal at 512 on
the Xeon with AVX512-BF16; docs/engine.md has the tables). Only used where oneDNN has bf16
kernels for this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``).

On that Xeon oneDNN's bf16 GEMM stays near 80 GFLOP/s a thread at every batch size while MKL's
float32 GEMM climbs with the batch, so the builder routes large batches to a float32 copy of the
weight (``ModelConfig.large_batch_float32``, build.py).
"""

from __future__ import annotations

import torch


def onednn_bf16_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 weights on ``device`` can be pre-packed for oneDNN."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class OneDnnLinear:
    """A bf16 ``[out, in]`` weight packed for oneDNN; ``layer(x)`` is ``F.linear(x, weight)``, and
    ``layer(x, residual)`` adds ``residual`` inside the same kernel (its output write), the packed
    equivalent of ``addmm``."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(
                f"OneDnnLinear packs a 2-D bfloat16 CPU weight, got {weight.dtype} "
                f"{tuple(weight.shape)} on {weight.device}"
            )
        self.out_features, self.in_features = weight.shape
        # No batch-size hint: the packing chosen for "any batch" was as fast as the one for a
        # single row at every batch size measured (1-512 rows).
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    @property
    def kernel_bytes(self) -> int:
        return self.out_features * self.in_features * 2

    def kernel(self, rows: int) -> str:
        return "onednn-bf16"

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._packed, None, "add")

    def __repr__(self) -> str:
        return f"OneDnnLinear(out={self.out_features}, in={self.in_features})"
