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

Large batches may run in float32 instead. On this Xeon (a VM) oneDNN's bf16 GEMM
(``brg_matmul:avx512_core_bf16``) reaches only 70-86 GFLOP/s a thread at every batch size, while
MKL's float32 GEMM climbs with the batch: one thread, hot weights, GFLOP/s::

    rows                      32     64    128    512
    gate_up 3072x576  bf16    83     76     78     86
                      fp32    65     90    105    131
    down 576x1536     bf16    73     84     79     74
                      fp32    57     93    101    124

so with a float32 copy of the weight, batches above ``FLOAT32_ABOVE`` rows (prefill chunks)
multiply in float32 and round the result to bf16 once: whole prefills ran 1.30-1.47x faster
(512 and 2,048 tokens, 2 threads, the two variants in alternating processes, two rounds each). The copy costs 4
bytes a weight (425 MB for SmolLM2-135M's layers); ``ModelConfig.large_batch_float32`` turns it
off. Its weights are the checkpoint's own, not their bf16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT32_ABOVE = 48
"""Rows above which a layer with a float32 copy multiplies in float32 (crossover in the table)."""


def onednn_bf16_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 weights on ``device`` can be pre-packed for oneDNN."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class OneDnnLinear:
    """A bf16 ``[out, in]`` weight packed for oneDNN; ``layer(x)`` is ``F.linear(x, weight)``.

    ``layer(x, residual)`` adds ``residual`` inside the same kernel (its output write), the
    packed equivalent of ``addmm``. With ``float32_weight`` (the same weight, float32), batches
    of more than ``FLOAT32_ABOVE`` rows multiply that instead; the result is bf16 either way.
    """

    def __init__(self, weight: torch.Tensor, float32_weight: torch.Tensor | None = None) -> None:
        if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(
                f"OneDnnLinear packs a 2-D bfloat16 CPU weight, got {weight.dtype} "
                f"{tuple(weight.shape)} on {weight.device}"
            )
        self.out_features, self.in_features = weight.shape
        # No batch-size hint: the packing chosen for "any batch" was as fast as the one for a
        # single row at every batch size measured (1-512 rows).
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        if float32_weight is not None and float32_weight.shape != weight.shape:
            raise ValueError(f"float32_weight {tuple(float32_weight.shape)} is not the weight's shape {tuple(weight.shape)}")
        self._float32 = None if float32_weight is None else float32_weight.float().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes of weights one call reads."""
        return self.out_features * self.in_features * 2

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self._float32 is not None and x.shape[0] > FLOAT32_ABOVE:
            if residual is None:
                return F.linear(x.float(), self._float32).to(x.dtype)
            return torch.addmm(residual.float(), x.float(), self._float32.t()).to(x.dtype)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._packed, None, "add")

    def __repr__(self) -> str:
        float32 = ", float32 copy" if self._float32 is not None else ""
        return f"OneDnnLinear(out={self.out_features}, in={self.in_features}{float32})"
