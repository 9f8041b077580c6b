"""Weight-only int8 and int4 layers on torch's own CPU kernels: the fallback where the native
int4 kernel is not built (or a weight does not fit it), and the LM head's int8 copy without the
native kernels.

What the kernels are (read from torch's ``int8mm_kernel.cpp`` / ``int4mm_kernel.cpp``, torch 2.13):
  * ``_weight_int8pack_mm(x, w_int8 [out, in], scales [out])``: scales in x's dtype. Only the
    bf16 path is fast; ``in`` must be a multiple of 8 (other widths crash or return NaN).
  * ``_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [in/G, out, 2])``
    dequantizes each nibble q in 0..15 as ``w = (q - 8) * scale + zero``, scale and zero in x's
    dtype. bf16 x is vectorized; fp32 x falls into a scalar loop (3.5 ms vs 0.25 ms for 3072x576).
    Needs out % 16 == 0, in % G == 0, G in (32, 64, 128, 256).
  * ``_dyn_quant_matmul_4bit`` is KleidiAI on ARM; on x86 it is a scalar reference loop that also
    quantizes activations to int8 and has no zero point: not usable here.
  * Both dequantize the weights again for every block of 4 rows of x, so their cost grows with
    the batch: they beat a float GEMM only while it is bound by memory (a few rows; the crossover
    table, formats.py).

So both run bf16 activations whatever the model's dtype. The int4 kernel's zero is ``m + 8 d``
for a Q4_1 group (quantize.py), rounded to bf16 with its scale: the weights differ from the
file's by 0.20% (relative Frobenius) on SmolLM2's Q4_1 matrices, against 0.85% for int8 per row.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers.quantize import quantize_int4, quantize_int8

TORCH_QUANTIZED_FORMATS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes ``_weight_int4pack_mm_for_cpu`` accepts."""

# torch's int4 kernels read a nibble q in 0..15 as the value q - 8: w = (q - 8) * scale + zero.
_INT4_OFFSET = 8
# Multiples the kernels need: with in % 8 != 0 the int8 kernel crashed or returned NaN here;
# the int4 packer works on blocks of 16 output rows.
_INT8_IN_MULTIPLE = 8
_INT4_OUT_MULTIPLE = 16


class TorchQuantizedLinear:
    """``layer(x, residual=None)``: x @ W.T (+ residual) in x's dtype by torch's int8 or int4
    kernel, W quantized from ``weight`` as given (int8: a bf16 scale a row; int4: a bf16 scale
    and zero a group of ``group_size`` inputs).

    ``keep_nibbles`` keeps int4's integers a second time in a plain layout (+0.5 byte a weight)
    so that :meth:`dequantize` is fast: for a layer whose large batches run a float GEMM on the
    dequantized weights. Without it, int4 dequantizes through the kernel, slowly (tests only).
    """

    def __init__(self, weight: torch.Tensor, weight_format: str, group_size: int = 32,
                 keep_nibbles: bool = False) -> None:
        if weight_format not in TORCH_QUANTIZED_FORMATS:
            raise ValueError(f"weight_format {weight_format!r} is not one of {TORCH_QUANTIZED_FORMATS}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(
                f"weight must be a 2-D float tensor [out, in], "
                f"got {weight.dtype} of shape {tuple(weight.shape)}"
            )
        _check_shape(weight, weight_format, group_size)
        self.weight_format = weight_format
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self._tensors: dict[str, torch.Tensor] = {}
        if weight_format == "int8":
            q, scales = quantize_int8(weight)
            self._tensors["weight"] = q  # [out, in] int8
            self._tensors["scales"] = scales  # [out] bf16
            int8_kernel = torch.ops.aten._weight_int8pack_mm.default
            self._kernel = lambda x: int8_kernel(x, q, scales)
        else:
            self._pack_int4(weight, group_size, keep_nibbles)
            int4_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu.default
            packed, scales_and_zeros = self._tensors["weight"], self._tensors["scales_and_zeros"]
            self._kernel = lambda x: int4_kernel(x, packed, group_size, scales_and_zeros)

    def _pack_int4(self, weight: torch.Tensor, group_size: int, keep_nibbles: bool) -> None:
        q, scales, mins = quantize_int4(weight, group_size)
        # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale: rounding that sum
        # (rather than min) to bf16 centres the scale's rounding error on q = 8.
        zeros = mins + _INT4_OFFSET * scales
        # scales_and_zeros: [groups, out, 2] bf16, the layout the kernel reads.
        scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
        self._tensors["weight"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self._tensors["scales_and_zeros"] = scales_and_zeros.to(torch.bfloat16)
        if keep_nibbles:
            # The kernel's packed layout depends on the CPU's vector width, so keep our own:
            # nibbles [out, in / 2], low nibble = column j, high nibble = column j + in / 2.
            half = self.in_features // 2
            self._tensors["nibbles"] = (q[:, :half] | (q[:, half:] << 4)).to(torch.uint8)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self._kernel(x.to(torch.bfloat16).contiguous()).to(x.dtype)
        return y if residual is None else residual + y

    def kernel(self, rows: int) -> str:
        return f"torch-{self.weight_format}"

    @property
    def kernel_bytes(self) -> int:
        """int8: a byte a weight and a bf16 scale a row; int4: half a byte a weight and a bf16
        scale and zero a group (any nibble copy is not read by the kernel)."""
        num_weights = self.out_features * self.in_features
        if self.weight_format == "int8":
            return num_weights + 2 * self.out_features
        return num_weights // 2 + 4 * (num_weights // self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds, the nibble copy included."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the kernel multiplies by."""
        if self.weight_format == "int8":
            # In place after one int8 -> float copy: a broadcasting int8 * float multiply
            # takes a slow mixed-dtype path (~30x slower, measured).
            weight = self._tensors["weight"].float()
            return weight.mul_(self._tensors["scales"].float()[:, None])
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
        return f"TorchQuantizedLinear({self.weight_format}, {self.out_features}x{self.in_features})"


def _check_shape(weight: torch.Tensor, weight_format: str, group_size: int) -> None:
    """Raise where torch's kernel would fail, or silently compute garbage, on this weight."""
    if weight.device.type != "cpu":
        raise NotImplementedError(
            f"{weight_format} runs torch's CPU kernels only; the weight is on "
            f"{weight.device} (CUDA's _weight_int4pack_mm needs a different tiled packing)"
        )
    out_features, in_features = weight.shape
    if weight_format == "int8":
        if in_features % _INT8_IN_MULTIPLE:
            raise ValueError(f"int8 needs in_features divisible by {_INT8_IN_MULTIPLE}, got {in_features}")
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            raise NotImplementedError("this torch build has no aten._weight_int8pack_mm")
        return
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 needs in_features divisible by group_size {group_size}, got {in_features}")
    if out_features % _INT4_OUT_MULTIPLE:
        raise ValueError(f"int4 needs out_features divisible by {_INT4_OUT_MULTIPLE}, got {out_features}")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise NotImplementedError("this torch build has no aten._weight_int4pack_mm_for_cpu")
