"""Weight-only quantized linear layers for CPU decoding.

``PackedLinear(weight [out, in], "dense" | "int8" | "int4")`` prepares a weight once for one of
torch's CPU kernels; calling it maps x [T, in] to float32 [T, out].

What the kernels are (read from torch's ``int8mm_kernel.cpp`` / ``int4mm_kernel.cpp``, checked
here on torch 2.13, AVX2):
  * ``_weight_int8pack_mm(x, w_int8 [out, in], scales [out])``: scales in x's dtype. Only the
    bf16 path is fast; ``in`` must be a multiple of 8 (other widths crash or return NaN).
  * ``_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [in/G, out, 2])``
    dequantizes each nibble q in 0..15 as ``w = (q - 8) * scale + zero``, scale and zero in x's
    dtype. bf16 x is vectorized; fp32 x falls into a scalar loop (3.5 ms vs 0.25 ms for 3072x576).
    Needs out % 16 == 0, in % G == 0, G in (32, 64, 128, 256).
  * ``_dyn_quant_matmul_4bit`` is KleidiAI on ARM; on x86 it is a scalar reference loop that also
    quantizes activations to int8 and has no zero point: not usable here.
  * Both quantized kernels dequantize the weights again for every block of 4 rows of x, so their
    cost grows with T: they beat fp32 only while the fp32 GEMM is memory-bound (T <~ 16).

Q4_1 is exact in int4 with group size 32. A Q4_1 group is ``w = d * q + m`` (q in 0..15, d and m
fp16) and llama.cpp's quantizer maps each group's min to q = 0 and max to q = 15, so min/max
requantization of the dequantized float weights gives back q exactly, scale = d and min = m;
the kernel's zero is ``m + 8 d``. Only the bf16 rounding of scale and zero remains:
``|w' - w| <= 2^-8 * (|q - 8| * d + |m + 8 d|)``. Checked on SmolLM2-135M-Instruct.Q4_1.gguf:
all 3,317,760 groups of its 210 Q4_1 matrices contain both q = 0 and q = 15; requantized q
differs from the file's in 0 places; scale equals d bit for bit; the weights differ by 0.20%
(relative Frobenius), against 0.85% for per-channel int8. Its embedding (= tied LM head) is
Q8_0: int8 per row adds 1.2% error to it, int4 with groups of 32 adds 9.0%.

Large batches (prefill) run faster as fp32 ``F.linear``. With ``dense_above`` set, a quantized
layer dequantizes its weight to fp32 for any call with more rows than that, instead of keeping
an fp32 copy: the copy would cost 4 bytes per weight (+425 MB for SmolLM2-135M's layers, more
than the dense model), the dequantization costs ~1.2 ms (int8) / ~3.6 ms (int4) per layer per
call on one thread: 2-7% of a 512-token prefill by the dequantize table, 9-11% in the stack
timing below. int4 keeps its integers a second time in a plain nibble layout for this (+0.5 byte
per weight). Callers who prefer the copy can hold a "dense" and a quantized PackedLinear and
choose by batch size.

Measured with ``benchmarks/linear_kernels.py`` (torch 2.13.0+cpu, AVX2, 2 cores shared with
other jobs: load average ~2 during the 1-thread run), weights cold as in a real forward pass,
median us per call, speed-up over dense fp32 in parentheses::

    threads=1           T     dense              int8              int4
    gate_up 3072x576      1       692       470 (1.47x)       316 (2.19x)
    gate_up 3072x576      8      1837      1337 (1.37x)      1215 (1.51x)
    gate_up 3072x576     32      3158      4367 (0.72x)      4736 (0.67x)
    gate_up 3072x576     64      4627      8155 (0.57x)      9007 (0.51x)
    gate_up 3072x576    512     23059     58782 (0.39x)     56482 (0.41x)
    qkv 960x576           1       249       194 (1.28x)       142 (1.76x)
    qkv 960x576           8       456       422 (1.08x)       409 (1.11x)
    qkv 960x576          32       828      1343 (0.62x)      1466 (0.56x)
    qkv 960x576          64      1392      2680 (0.52x)      2972 (0.47x)
    qkv 960x576         512      8301     19504 (0.43x)     22904 (0.36x)
    o 576x576             1       153       131 (1.17x)        98 (1.57x)
    o 576x576             8       279       269 (1.04x)       264 (1.06x)
    o 576x576            32       491       818 (0.60x)       884 (0.56x)
    o 576x576            64       829      1581 (0.52x)      1739 (0.48x)
    o 576x576           512      5241     11812 (0.44x)     13396 (0.39x)
    down 576x1536         1       323       225 (1.44x)       191 (1.69x)
    down 576x1536         8       757       572 (1.32x)       588 (1.29x)
    down 576x1536        32      1249      1835 (0.68x)      2103 (0.59x)
    down 576x1536        64      1976      3808 (0.52x)      4379 (0.45x)
    down 576x1536       512     12594     29517 (0.43x)     36347 (0.35x)
    lm_head 49152x576     1     10537      6771 (1.56x)      4826 (2.18x)
    lm_head 49152x576     8     26255     19690 (1.33x)     18042 (1.46x)
    lm_head 49152x576    32     49755     76501 (0.65x)     53782 (0.93x)
    lm_head 49152x576    64     76632    138369 (0.55x)    126419 (0.61x)
    lm_head 49152x576   512    499216   1207807 (0.41x)   1102820 (0.45x)

    dequantize to fp32, us   int8      int4
    gate_up 3072x576          601      1895
    qkv 960x576               260       587
    o 576x576                 122       417
    down 576x1536             213       713
    lm_head 49152x576       97985    129701

    30 layers x (qkv, o, gate_up, down), ms per step; hybrids: dense above 24 / 32 rows
        T     dense         int8          int4          int8 hybrid   int4 hybrid
       MB       425          106            66                  106           119
        1      41.4   31.9 (1.30x)  23.5 (1.76x)              -             -
        8      84.6   74.9 (1.13x)  75.3 (1.12x)              -             -
       16     119.6  121.0 (0.99x) 128.2 (0.93x)              -             -
       32     134.2  229.5 (0.58x) 272.0 (0.49x)  190.7 (0.70x)             -
       64     238.5  432.5 (0.55x) 510.9 (0.47x)  295.3 (0.81x)  352.1 (0.68x)
      512    1455.3 3364.6 (0.43x) 3451.1 (0.42x) 1604.7 (0.91x) 1637.7 (0.89x)

Two threads could not be timed cleanly: other jobs kept the load average at 2-4 throughout,
and a call stalls for a 4-16 ms scheduler slice whenever one of its two threads loses its core
(the quantized kernels, with many short parallel regions, suffer most: prefer one thread per
process on a shared machine). The cells no stall hit, median us::

    threads=2          T=1: dense   int8         int4         T=8: dense   int8         int4
    gate_up 3072x576         560   271 (2.06x)  179 (3.12x)       1284   769 (1.67x)  665 (1.93x)
    qkv 960x576              202   105 (1.93x)   71 (2.83x)        365   239 (1.53x)  223 (1.63x)
    o 576x576                151   100 (1.51x)   75 (2.02x)        232   160 (1.45x)  135 (1.72x)
    down 576x1536            276   136 (2.03x)  118 (2.33x)        586   358 (1.63x)  342 (1.71x)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

WEIGHT_FORMATS = ("dense", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes ``_weight_int4pack_mm_for_cpu`` accepts."""
DEFAULT_DENSE_ABOVE = {"int8": 24, "int4": 32}
"""Batch rows above which a hybrid layer is faster as dense fp32 (crossovers measured above)."""

_INT8_MAX = 127
_INT4_LEVELS = 15
# torch's int4 kernels read a nibble q in 0..15 as the value q - 8: w = (q - 8) * scale + zero.
_INT4_OFFSET = 8
# Multiples the kernels need: with in % 8 != 0 the int8 kernel crashed or returned NaN here;
# the int4 packer works on blocks of 16 output rows.
_INT8_IN_MULTIPLE = 8
_INT4_OUT_MULTIPLE = 16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scales [out] bf16), w ~ q * scale.

    The scale is rounded to bf16 (the kernel's dtype) *before* rounding the weights, so q is the
    best integer for the scale the kernel really uses.
    """
    weight = weight.float()
    max_abs = weight.abs().amax(dim=1)  # [out]
    # bf16 moves the scale by at most 2^-8 relative, so max_abs / scale < 127.5 still rounds to 127.
    scales = (max_abs / _INT8_MAX).to(torch.bfloat16)
    safe_scales = torch.where(scales > 0, scales.float(), torch.ones_like(max_abs))
    q = torch.round(weight / safe_scales[:, None]).clamp_(-_INT8_MAX, _INT8_MAX)
    return q.to(torch.int8), scales


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groupwise asymmetric 4-bit with per-group min/max along the input dim.

    Returns (q [out, in] int32 in 0..15, scales [out, groups] float32, mins [out, groups] float32)
    with w ~ q * scale + min. A llama.cpp Q4_1 matrix (w = d * q + m, every group using both
    q = 0 and q = 15, as llama.cpp's quantizer produces) dequantized to float comes back as its
    original integers, with scale = d and min = m up to float32 rounding.
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    mins = groups.amin(dim=2)  # [out, groups]
    scales = (groups.amax(dim=2) - mins) / _INT4_LEVELS
    safe_scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((groups - mins[..., None]) / safe_scales[..., None]).clamp_(0, _INT4_LEVELS)
    return q.to(torch.int32).reshape(out_features, in_features), scales, mins


class PackedLinear:
    """A weight ``[out, in]`` prepared for one CPU kernel; call it as ``y = layer(x)``.

    Formats:
      * ``"dense"``: the weight as given (float32 unless another dtype is passed), ``F.linear``.
      * ``"int8"``: symmetric per-output-channel int8, ``_weight_int8pack_mm`` on bf16 activations.
      * ``"int4"``: asymmetric groupwise 4-bit (``group_size`` along the input dim, bf16 scale and
        zero per group), ``_weight_int4pack_mm_for_cpu`` on bf16 activations.

    With ``dense_above`` set, a quantized layer runs batches of more than ``dense_above`` rows
    (prefill) as fp32 ``F.linear`` on weights dequantized for that call, because there the fp32
    GEMM is compute-bound and faster than the quantized kernels; nothing extra is stored for
    int8, int4 keeps its integers a second time in a plain nibble layout (+0.5 byte per weight).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_format: str,
        group_size: int = 32,
        dense_above: int | None = None,
    ) -> None:
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format {weight_format!r} is not one of {WEIGHT_FORMATS}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(
                f"weight must be a 2-D float tensor [out, in], "
                f"got {weight.dtype} of shape {tuple(weight.shape)}"
            )
        if dense_above is not None and dense_above < 0:
            raise ValueError(f"dense_above must be >= 0 or None, got {dense_above}")
        self.weight_format = weight_format
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.dense_above = dense_above
        self._tensors: dict[str, torch.Tensor] = {}
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        """The quantized kernel as one call, ``kernel(x)`` for a contiguous bf16 ``x [T, in]`` ->
        bf16 ``[T, out]``, without :meth:`matmul`'s checks and conversions: for callers that run
        it a few hundred times a decode step and guarantee its input. None for dense."""
        if weight_format == "dense":
            self._tensors["weight"] = weight.contiguous()
            return
        _check_quantized_shape(weight, weight_format, group_size)
        if weight_format == "int8":
            q, scales = quantize_int8(weight)
            self._tensors["weight"] = q  # [out, in] int8
            self._tensors["scales"] = scales  # [out] bf16
        else:
            self._pack_int4(weight, group_size)
        self.kernel = self._bind_kernel()

    def _bind_kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # Each kernel's overload resolved once, its tensors bound.
        if self.weight_format == "int8":
            int8_kernel = torch.ops.aten._weight_int8pack_mm.default
            weight, scales = self._tensors["weight"], self._tensors["scales"]
            return lambda x: int8_kernel(x, weight, scales)
        int4_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu.default
        packed, scales_and_zeros, group_size = self._tensors["weight"], self._tensors["scales_and_zeros"], self.group_size
        return lambda x: int4_kernel(x, packed, group_size, scales_and_zeros)

    def _pack_int4(self, weight: torch.Tensor, group_size: int) -> None:
        q, scales, mins = quantize_int4(weight, group_size)
        # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale: rounding that sum
        # (rather than min) to bf16 centres the scale's rounding error on q = 8.
        zeros = mins + _INT4_OFFSET * scales
        # scales_and_zeros: [groups, out, 2] bf16, the layout the kernel reads.
        scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
        self._tensors["weight"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self._tensors["scales_and_zeros"] = scales_and_zeros.to(torch.bfloat16)
        if self.dense_above is not None:
            # The kernel's packed layout depends on the CPU's vector width, so keep our own:
            # nibbles [out, in / 2], low nibble = column j, high nibble = column j + in / 2.
            half = self.in_features // 2
            nibbles = q[:, :half] | (q[:, half:] << 4)
            self._tensors["nibbles"] = nibbles.to(torch.uint8)

    @property
    def kernel_bytes(self) -> int:
        """Bytes one call of the kernel reads, leaving out any dense-fallback copy: int8 = 1 byte
        per weight + a bf16 scale per row; int4 = half a byte per weight + a bf16 scale and zero
        per group of ``group_size`` inputs; dense = the weight."""
        num_weights = self.out_features * self.in_features
        if self.weight_format == "int8":
            return num_weights + 2 * self.out_features
        if self.weight_format == "int4":
            return num_weights // 2 + 4 * (num_weights // self.group_size)
        return self.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds: packed weight, scales and zeros, and any fallback copy."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] float -> [T, out] float32."""
        return self.matmul(x).float()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] float -> [T, out] in the kernel's output dtype (bf16 for the quantized
        kernels, the weight's for dense, float32 above ``dense_above``): no conversion a caller
        in bf16 would undo."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input [T, {self.in_features}], got {tuple(x.shape)}")
        if self.weight_format == "dense":
            weight = self._tensors["weight"]
            return F.linear(x.to(weight.dtype), weight)
        if self.dense_above is not None and x.shape[0] > self.dense_above:
            return F.linear(x.float(), self.dequantize())
        assert self.kernel is not None
        # Both kernels take and return bf16.
        return self.kernel(x.to(torch.bfloat16).contiguous())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the quantized kernel multiplies by (dense: a float copy).

        int4 layers built without ``dense_above`` have no nibble copy and unpack through the
        kernel instead, which is correct but slow: meant for tests and inspection.
        """
        if self.weight_format == "dense":
            return self._tensors["weight"].float()
        if self.weight_format == "int8":
            # In place after one int8 -> float copy: a broadcasting int8 * float multiply
            # takes a slow mixed-dtype path (~30x slower, measured).
            weight = self._tensors["weight"].float()
            return weight.mul_(self._tensors["scales"].float()[:, None])
        return self._dequantize_int4()

    def _dequantize_int4(self) -> torch.Tensor:
        out_features, in_features = self.out_features, self.in_features
        num_groups = in_features // self.group_size
        nibbles = self._tensors.get("nibbles")  # [out, in / 2]
        if nibbles is None:
            q = self._unpack_int4_with_kernel()
        else:
            q = torch.empty(out_features, 2, in_features // 2, dtype=torch.uint8)
            torch.bitwise_and(nibbles, 0xF, out=q[:, 0])
            torch.bitwise_right_shift(nibbles, 4, out=q[:, 1])
        # weight: [out, groups, group_size]; scales, zeros: [out, groups, 1]
        weight = q.reshape(out_features, num_groups, self.group_size).float()
        scales_and_zeros = self._tensors["scales_and_zeros"].float()  # [groups, out, 2]
        scales = scales_and_zeros[..., 0].t()
        # Fold the -8 offset into the zero as the kernel does: w = q * scale + (zero - 8 * scale).
        zeros = scales_and_zeros[..., 1].t() - _INT4_OFFSET * scales
        # Two in-place ops: addcmul with these broadcasts is ~10x slower (measured).
        weight.mul_(scales[..., None]).add_(zeros[..., None])
        return weight.view(out_features, in_features)

    def _unpack_int4_with_kernel(self) -> torch.Tensor:
        """q [out, in] in 0..15, read back through the kernel: slow (an in x in x out GEMM)."""
        identity = torch.eye(self.in_features, dtype=torch.bfloat16)
        # scale 1, zero 8 turn each nibble into its own value q, exact in bf16.
        unit = torch.tensor([1.0, float(_INT4_OFFSET)], dtype=torch.bfloat16)
        num_groups = self.in_features // self.group_size
        unit_scales_and_zeros = unit.expand(num_groups, self.out_features, 2).contiguous()
        q_t = torch.ops.aten._weight_int4pack_mm_for_cpu(
            identity, self._tensors["weight"], self.group_size, unit_scales_and_zeros
        )  # [in, out]
        return q_t.t().to(torch.uint8)

    def __repr__(self) -> str:
        return (
            f"PackedLinear({self.weight_format}, out={self.out_features}, in={self.in_features}, "
            f"nbytes={self.nbytes}, dense_above={self.dense_above})"
        )


def _check_quantized_shape(weight: torch.Tensor, weight_format: str, group_size: int) -> None:
    """Raise where torch's kernel would fail, or silently compute garbage, on this weight."""
    if weight.device.type != "cpu":
        raise NotImplementedError(
            f"{weight_format} PackedLinear runs torch's CPU kernels only; weight is on "
            f"{weight.device} (CUDA's _weight_int4pack_mm needs a different tiled packing)"
        )
    out_features, in_features = weight.shape
    if weight_format == "int8":
        if in_features % _INT8_IN_MULTIPLE:
            raise ValueError(
                f"int8 needs in_features divisible by {_INT8_IN_MULTIPLE}, got {in_features}"
            )
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            raise NotImplementedError("this torch build has no aten._weight_int8pack_mm")
        return
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"int4 needs in_features divisible by group_size {group_size}, got {in_features}"
        )
    if out_features % _INT4_OUT_MULTIPLE:
        raise ValueError(
            f"int4 needs out_features divisible by {_INT4_OUT_MULTIPLE}, got {out_features}"
        )
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise NotImplementedError("this torch build has no aten._weight_int4pack_mm_for_cpu")
