"""KV-cache codecs: how one layer's KV slice becomes the raw frames a connector sends, and back.

A codec turns ``kv: [2, num_tokens, num_kv_heads, head_dim]`` (K then V, any float dtype) into a
list of contiguous tensors whose bytes go on the wire in order, and turns those bytes back into a
tensor. Both sides pick the codec by name (:func:`get_codec`); the receiver knows the shape and the
KV dtype from the handoff metadata, whose compatibility fingerprint includes the KV dtype.

| name | frames | bytes per value | lossy |
|---|---|---|---|
| ``none`` | the KV as it is | the KV dtype's (4 for float32, 2 for bfloat16) | no |
| ``fp16``, ``bf16`` | the KV cast to that dtype | 2 | yes, unless the KV already is |
| ``int8`` | int8 values + one fp16 scale per (K/V, token, head) | 1 + 2/head_dim | yes |
| ``fp8`` | float8_e4m3fn values + one fp16 scale per (K/V, token, head) | 1 + 2/head_dim | yes |

The quantizing codecs scale each row of ``head_dim`` values on its own: K rows after RoPE and V
rows differ in magnitude by orders across heads and tokens, so one scale per tensor would waste
most of the 8 bits on the few large rows. Nothing here loops in Python over tokens.

``decode`` never returns memory that aliases its frames, so a connector may reuse its receive
buffers as soon as ``decode`` returns. ``encode`` may return ``kv`` itself (``none``, or a cast to
the dtype the KV already has), so send its frames before changing ``kv``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

Frame = memoryview | bytes | bytearray

# fp16 scales: 2 bytes per row of head_dim values instead of 4 (SmolLM2: 360 B of 11,880 per
# token rather than 720 B). Scales are rounded *up* to fp16 and the values quantized with the
# rounded scale, so rounding never clips and makes the step at most 2**-10 larger (more for
# rows so small that the scale is an fp16 subnormal, where the step is still below 2**-23).
_SCALE_DTYPE = torch.float16
# The smallest fp16 subnormal: all-zero rows get this scale and decode to exact zeros.
_MIN_SCALE = 2.0**-24


class KVCodec(ABC):
    """Encodes one layer's KV slice into wire frames and decodes it back.

    Contract: ``decode(as_bytes(f) for f in encode(kv), kv.shape, kv.dtype)`` has ``kv``'s shape
    and dtype; ``encoded_nbytes(kv.shape)`` is the sum of the frames' byte counts, known before
    encoding so a receiver can size its buffers; a frame of the wrong size is a ``ValueError``.
    """

    name: str
    """Registry key, the same on both sides of a transfer."""

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        """kv: [2, num_tokens, num_kv_heads, head_dim], any float dtype, on the CPU.
        Returns contiguous CPU tensors; the wire sends each as raw bytes, in order."""

    @abstractmethod
    def decode(
        self,
        frames: Sequence[Frame],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        may_alias: bool = False,
    ) -> torch.Tensor:
        """The raw bytes of ``encode``'s frames (same order) -> a new tensor of ``shape``, ``dtype``.
        Raises ValueError naming the codec and the expected and received byte counts.
        ``may_alias=True`` lets the result share memory with the frames (``none`` then skips its
        copy), for a caller that is done with the result before it reuses its buffers."""

    @abstractmethod
    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
        """Bytes ``encode`` produces for a KV of ``shape`` (all frames). ``dtype`` is the KV dtype;
        only ``none`` needs it, since every other codec's wire format is dtype-independent."""

    def _checked_views(
        self, frames: Sequence[Frame], expected: Sequence[int], shape: tuple[int, ...]
    ) -> list[memoryview]:
        """The frames as flat byte views, after checking their count and sizes."""
        if len(frames) != len(expected):
            raise ValueError(
                f"{self.name} codec: expected {len(expected)} frame(s) for shape {tuple(shape)}, "
                f"received {len(frames)}"
            )
        views = []
        for index, (frame, nbytes) in enumerate(zip(frames, expected, strict=True)):
            view = memoryview(frame)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            if view.nbytes != nbytes:
                raise ValueError(
                    f"{self.name} codec: frame {index} of shape {tuple(shape)} should be "
                    f"{nbytes} bytes, received {view.nbytes}"
                )
            views.append(view)
        return views


class NoneCodec(KVCodec):
    """The KV's own bytes. The sender's KV dtype is the receiver's (the compatibility fingerprint
    includes it), so ``decode`` reads the bytes as ``dtype`` and no dtype travels on the wire."""

    name = "none"

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        return [kv.contiguous()]

    def decode(
        self,
        frames: Sequence[Frame],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        may_alias: bool = False,
    ) -> torch.Tensor:
        (view,) = self._checked_views(frames, [self.encoded_nbytes(shape, dtype)], shape)
        return _read(view, dtype, owned=not may_alias).reshape(shape)

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
        if dtype is None:
            raise ValueError(
                "none codec: encoded_nbytes needs the KV dtype (it sends the KV as is)"
            )
        return math.prod(shape) * dtype.itemsize


class CastCodec(KVCodec):
    """The KV cast to a 2-byte float dtype: halves float32 KV, and is free for KV already in it.
    fp16 keeps 3 more mantissa bits than bf16 but overflows above 65,504, where bf16 does not."""

    def __init__(self, name: str, wire_dtype: torch.dtype) -> None:
        self.name = name
        self.wire_dtype = wire_dtype

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        return [kv.to(self.wire_dtype).contiguous()]

    def decode(
        self,
        frames: Sequence[Frame],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        may_alias: bool = False,
    ) -> torch.Tensor:
        (view,) = self._checked_views(frames, [self.encoded_nbytes(shape)], shape)
        return _read(view, self.wire_dtype, owned=False).to(dtype, copy=True).reshape(shape)

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
        return math.prod(shape) * self.wire_dtype.itemsize


class ScaledCodec(KVCodec):
    """8-bit codes with one symmetric fp16 scale per row of ``head_dim`` values (per K/V, token
    and head): ``x ~= code * scale``, ``scale = absmax(row) / max_code``.

    Frames: the codes ``[*shape]`` (1 byte each), then the scales ``[*shape[:-1]]`` (fp16).
    """

    code_dtype: torch.dtype
    max_code: float

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        values = kv.float()
        scales = _round_up_scales(values.abs().amax(dim=-1) / self.max_code)  # [*shape[:-1]]
        scaled = (values / scales.float().unsqueeze(-1)).clamp_(-self.max_code, self.max_code)
        return [self._to_codes(scaled).contiguous(), scales.contiguous()]

    def decode(
        self,
        frames: Sequence[Frame],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        may_alias: bool = False,
    ) -> torch.Tensor:
        codes_view, scales_view = self._checked_views(frames, self._frame_nbytes(shape), shape)
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        codes = _read(codes_view, torch.uint8, owned=False).reshape(shape)
        scales = _read(scales_view, _SCALE_DTYPE, owned=False).reshape(*shape[:-1], 1)
        values, unit = self._from_codes(codes)
        return torch.mul(values, scales.float() * unit).to(dtype)

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
        return sum(self._frame_nbytes(shape))

    def _frame_nbytes(self, shape: tuple[int, ...]) -> list[int]:
        if len(shape) < 1:
            raise ValueError(f"{self.name} codec: shape {tuple(shape)} has no head_dim axis")
        return [math.prod(shape), math.prod(shape[:-1]) * _SCALE_DTYPE.itemsize]

    @abstractmethod
    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """scaled: float32 values in [-max_code, max_code] -> codes of ``code_dtype``."""

    @abstractmethod
    def _from_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, float]:
        """codes: the received bytes as uint8 -> (values, unit) with ``code = values * unit``."""


class Int8Codec(ScaledCodec):
    """Uniform steps of absmax/127 per row: error at most half a step, whatever the value."""

    name = "int8"
    code_dtype = torch.int8
    max_code = 127.0

    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round_().to(torch.int8)

    def _from_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, float]:
        return codes.view(torch.int8), 1.0


class Fp8Codec(ScaledCodec):
    """float8_e4m3fn codes (max 448): relative error at most 2**-4 per value, so small values in a
    row with a large one keep more precision than under int8, large ones less."""

    name = "fp8"
    code_dtype = torch.float8_e4m3fn
    max_code = torch.finfo(torch.float8_e4m3fn).max

    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.to(torch.float8_e4m3fn)  # rounds to nearest even

    def _from_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, float]:
        # torch's float8 -> float cast is ~5x slower on CPU than moving the bits into fp16 by
        # hand: sign to bit 15, exponent and mantissa (eeee mmm) to bits 13..7. That reads the
        # exponent with fp16's bias (15) instead of e4m3's (7), i.e. 2**-8 times the value, for
        # normals and subnormals alike. (The NaN codes 0x7F/0xFF are never encoded.)
        wide = codes.to(torch.int16)
        bits = (wide << 8).bitwise_and_(-32768).bitwise_or_((wide & 0x7F) << 7)
        return bits.view(torch.float16), 256.0


def _round_up_scales(scales: torch.Tensor) -> torch.Tensor:
    """float32 scales -> fp16 scales >= them (so no value clips), at least the smallest normal."""
    scales = scales.clamp(_MIN_SCALE, torch.finfo(_SCALE_DTYPE).max)
    rounded = scales.to(_SCALE_DTYPE)
    too_small = rounded.float() < scales
    if bool(too_small.any()):
        bigger = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
        rounded = torch.where(too_small, bigger, rounded)
    return rounded


def _read(view: memoryview, dtype: torch.dtype, owned: bool) -> torch.Tensor:
    """A 1-D tensor of ``dtype`` over the frame's bytes; a copy when ``owned`` is asked for, or
    when the buffer is read-only (torch cannot mark a tensor read-only) or misaligned for dtype."""
    if view.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    if view.readonly:
        copied = torch.empty(view.nbytes, dtype=torch.uint8)
        copied.numpy().data[:] = view
        return copied.view(dtype)
    raw = torch.frombuffer(view, dtype=torch.uint8)
    if owned or raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype)


def as_bytes(frame: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without a copy, e.g. to send a frame ``encode`` returned."""
    if not frame.is_contiguous() or frame.device.type != "cpu":
        raise ValueError("as_bytes needs a contiguous CPU tensor")
    return frame.reshape(-1).view(torch.uint8).numpy().data


_CODECS: dict[str, KVCodec] = {
    codec.name: codec
    for codec in (
        NoneCodec(),
        CastCodec("fp16", torch.float16),
        CastCodec("bf16", torch.bfloat16),
        Int8Codec(),
        Fp8Codec(),
    )
}

CODEC_NAMES: tuple[str, ...] = tuple(_CODECS)


def get_codec(name: str) -> KVCodec:
    """The codec registered as ``name``; codecs are stateless, so one shared instance each."""
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV codec {name!r}; known codecs: {', '.join(CODEC_NAMES)}"
        ) from None
