"""bfloat16 linear layers with weights pre-packed once for oneDNN (CPU only).

``F.linear`` on a bf16 CPU tensor hands the ``[out, in]`` weight to oneDNN, which reorders it into
its blocked layout on every call: for a decode step (a handful of rows) that reorder costs as much
as the multiplication. Packing once at load time removes it. Measured on the 2-core Xeon with
AVX512-BF16 (torch 2.13, 2 threads, hot weights, us per call for 3072x576)::

    rows        1      8     32    128    512
    F.linear  143    302    892   3021  11220
    packed     71    211    778   2810  10848

and for the 49152x576 LM head at one row: 2482 -> 1295 us (cold weights). Only used where
oneDNN has bf16 kernels for this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``);
everywhere else, weights stay plain tensors.
"""

from __future__ import annotations

import torch


def onednn_bf16_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 weights on ``device`` can be pre-packed for oneDNN."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class OneDnnLinear:
    """A bf16 ``[out, in]`` weight packed for oneDNN; ``layer(x)`` is ``F.linear(x, weight)``.

    ``layer(x, residual)`` adds ``residual`` inside the same kernel (its output write), the
    packed equivalent of ``addmm``.
    """

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
    def nbytes(self) -> int:
        """Bytes of weights one call reads."""
        return self.out_features * self.in_features * 2

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._packed, None, "add")

    def __repr__(self) -> str:
        return f"OneDnnLinear(out={self.out_features}, in={self.in_features})"
