"""4-bit weights multiplied in integer arithmetic (the native ``int4_linear``).

``Int4Linear(weight [out, in], native)`` quantizes a weight to groupwise asymmetric 4-bit (groups
of 32 inputs, ``w = d * q + m``, fp16 d and m: a llama.cpp Q4_1 matrix comes back exactly,
quantize.py) and packs it for native/int4_linear.cpp, whose header comment has the layout
and the arithmetic. Calling it maps x [T, in] (bf16 or float32) to [T, out] in x's dtype, with an
optional residual added before the one rounding.

Why: torch's int4 kernel unpacks every nibble to bf16 and multiplies in floating point, and on
the 2-core Xeon read weights at about 9 GB/s. The native kernel quantizes each activation row
to two int8 digits (about 15 bits, int8_digits.h) and multiplies nibbles by digits in integer
arithmetic: by VNNI on AVX-512 CPUs that have it, by vpmaddubsw on AVX2 ones. It is the
small-batch half of the int4 formats (build.py) where one of those paths is built; the
portable build computes the same in scalar code, correct but slower than torch's kernel.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers.quantize import quantize_int4
from pdserve.engine.native_kernels import NativeKernels

GROUP_SIZE = 32
ROWS_PER_BLOCK = 16
BLOCK_BYTES = 320
"""A (16-row block, 32-input group): 256 bytes of nibbles, 16 fp16 d, 16 fp16 m."""


def int4_linear_available(native: NativeKernels | None) -> bool:
    """Whether the engine should multiply int4 layers by the native kernel: built here on a
    vectorized path (AVX512-VNNI or AVX2), not the portable one."""
    return (native is not None and native.int4_linear is not None
            and not native.path("int4_linear").startswith("portable"))


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """q [out, in] in 0..15, scales and mins [out, in / 32] -> uint8 [out / 16, in / 32, 320].

    Byte 64 c + 4 r + b of a (row block, group) holds q[r, 8 c + b] low and q[r, 8 c + 4 + b]
    high, so that the kernel's unpacked vectors hold 4 consecutive inputs of each of 16 rows.
    """
    out_features, in_features = q.shape
    if out_features % ROWS_PER_BLOCK or in_features % GROUP_SIZE:
        raise ValueError(
            f"int4_linear needs out_features divisible by {ROWS_PER_BLOCK} and in_features by "
            f"{GROUP_SIZE}, got [{out_features}, {in_features}]"
        )
    blocks, groups = out_features // ROWS_PER_BLOCK, in_features // GROUP_SIZE
    # [block, row, group, c, half, b]: input 8 c + 4 half + b of the group.
    nibbles = q.to(torch.uint8).view(blocks, ROWS_PER_BLOCK, groups, 4, 2, 4)
    packed = nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)  # [block, row, group, c, b]
    packed = packed.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 256)  # [block, group, c, row, b]

    def per_group(values: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [block, group, 32] bytes
        halves = values.to(torch.float16)
        if not torch.isfinite(halves).all():
            raise ValueError("int4_linear stores group scales and minima as fp16; this weight's overflow it")
        return halves.view(blocks, ROWS_PER_BLOCK, groups).permute(0, 2, 1).contiguous().view(torch.uint8)

    return torch.cat((packed, per_group(scales), per_group(mins)), dim=2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The float32 weights [out, in] a packed tensor holds (d * q + m): pack_int4 undone."""
    blocks, groups = packed.shape[:2]
    nibbles = packed[:, :, :256].reshape(blocks, groups, 4, ROWS_PER_BLOCK, 4)
    q = torch.stack((nibbles & 0x0F, nibbles >> 4), dim=3)  # [block, group, c, half, row, b]
    out_features, in_features = blocks * ROWS_PER_BLOCK, groups * GROUP_SIZE
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(out_features, in_features).float()

    def per_row(offset: int) -> torch.Tensor:  # the group constants, [out, in] (repeated along a group)
        halves = packed[:, :, offset : offset + 32].contiguous().view(torch.float16).float()
        return halves.permute(0, 2, 1).reshape(out_features, groups).repeat_interleave(GROUP_SIZE, dim=1)

    return q * per_row(256) + per_row(288)


class Int4Linear:
    """``layer(x, residual=None)`` = x @ W.T (+ residual), W as 4-bit groups (see the module)."""

    def __init__(self, weight: torch.Tensor, native: NativeKernels) -> None:
        if native.int4_linear is None:
            raise ValueError("Int4Linear needs the native int4_linear kernel, which did not build here")
        if weight.dim() != 2 or not weight.is_floating_point() or weight.device.type != "cpu":
            raise ValueError(
                f"weight must be a 2-D float CPU tensor [out, in], got {weight.dtype} {tuple(weight.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        q, scales, mins = quantize_int4(weight, GROUP_SIZE)
        self.packed = pack_int4(q, scales, mins)
        self._kernel = native.int4_linear
        self._dequantize = native.int4_dequantize

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._kernel(x.contiguous(), self.packed, residual)

    def kernel(self, rows: int) -> str:
        return "native-int4"

    @property
    def kernel_bytes(self) -> int:
        """Bytes one call reads: half a byte a weight and fp16 d and m a group of 32 (as Q4_1)."""
        return self.packed.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 weights [out, in] the kernel multiplies, by the native kernel (about a
        millisecond for SmolLM2's gate_up, against 17 by torch ops)."""
        if self._dequantize is None:
            return unpack_int4(self.packed)
        return self._dequantize(self.packed)

    def __repr__(self) -> str:
        return f"Int4Linear({self.out_features}x{self.in_features}, groups of {GROUP_SIZE})"
