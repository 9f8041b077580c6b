"""Weight quantizers shared by the quantized layers: int8 per row, 4-bit in groups.

Q4_1 is exact in int4 with groups of 32. A Q4_1 group is ``w = d * q + m`` (q in 0..15, d and m
fp16) and llama.cpp's quantizer maps each group's min to q = 0 and max to q = 15, so min/max
requantization of the dequantized float weights gives back q exactly, scale = d and min = m.
Checked on SmolLM2-135M-Instruct.Q4_1.gguf: all 3,317,760 groups of its 210 Q4_1 matrices contain
both q = 0 and q = 15, and requantized q differs from the file's in 0 places. Its embedding (the
tied LM head) is Q8_0: int8 per row adds 1.2% error to it (relative Frobenius), int4 in groups of
32 would add 9.0%, which is why quantized models keep their head in int8.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_LEVELS = 15


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scales [out] bf16), w ~ q * scale.

    The scale is rounded to bf16 (torch's int8 kernel's dtype) *before* rounding the weights, so
    q is the best integer for the scale the kernels really use.
    """
    weight = weight.float()
    max_abs = weight.abs().amax(dim=1)  # [out]
    # bf16 moves the scale by at most 2^-8 relative, so max_abs / scale < 127.5 still rounds to 127.
    scales = (max_abs / INT8_MAX).to(torch.bfloat16)
    safe_scales = torch.where(scales > 0, scales.float(), torch.ones_like(max_abs))
    q = torch.round(weight / safe_scales[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scales


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groupwise asymmetric 4-bit with per-group min/max along the input dim.

    Returns (q [out, in] int32 in 0..15, scales [out, groups] float32, mins [out, groups] float32)
    with w ~ q * scale + min: a Q4_1 matrix comes back as its own integers (module docstring).
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    mins = groups.amin(dim=2)  # [out, groups]
    scales = (groups.amax(dim=2) - mins) / INT4_LEVELS
    safe_scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((groups - mins[..., None]) / safe_scales[..., None]).clamp_(0, INT4_LEVELS)
    return q.to(torch.int32).reshape(out_features, in_features), scales, mins
