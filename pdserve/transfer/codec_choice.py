"""The codec of each layer a KV server streams: fixed, or ``auto``.

``auto`` compresses only while the link, not the prefill, is the bottleneck. A pipelined
transfer hides the link behind the prefill as long as the link carries KV at least as fast as
the prefill computes it; compressing then only adds encoding time to every layer. When the link
falls behind, layers queue on the sender, and every queued byte is time the decode worker will
wait after the prefill ends: then each byte saved is time saved, as long as the link is slower
than the codec. So the sender decides layer by layer, from what it sees itself:

- *behind*: a layer is waiting for the link (more layers were published while one was sent), or
  the prefill is over and every layer left is waited for;
- *the link's rate*: bytes over the seconds the socket took to accept them, counted only while
  behind (a socket buffer with room accepts a frame at once and would say nothing of the link).

The first layers sent while behind are sent raw, to measure the link. A transfer that is never
behind is never compressed, so a fast link keeps raw KV (and greedy parity); a slow one gets the
lossy ``int8`` codec (99.6% teacher-forced top-1 agreement, benchmarks/results/codec_quality.txt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pdserve.transfer.codecs import KVCodec, get_codec

AUTO = "auto"
AUTO_CODEC = "int8"
"""What ``auto`` compresses to: 0.516x bf16's bytes (0.258x float32's) at 99.6% agreement."""
COMPRESS_BELOW_BYTES_PER_S = 1e9
"""Compress only on links slower than this. int8 encodes float32 KV at ~2.5 GB/s and decodes it
at ~8.7 GB/s on one thread (codec_quality.txt: 94 MB in 37 + 10.8 ms) and saves 74% of its bytes
(48% of bf16's): it costs ~0.5 ns a byte and saves 0.74 (bf16: 0.48) byte-times of the link, so it
pays below ~1.5 GB/s for float32 KV and ~1 GB/s for bf16."""
MEASURE_BYTES = 1 << 20
"""Bytes sent while behind before the link's rate is trusted."""


@dataclass(frozen=True)
class LayerCodec:
    codec: KVCodec
    reason: str
    """Why (a metric label): fixed, link_keeps_up, measuring, fast_link or slow_link."""


class CodecPolicy(Protocol):
    name: str
    """What the HEADER names: a codec, or ``auto`` (each LAYER frame then names its own)."""

    def choose(self, behind: bool) -> LayerCodec: ...

    def sent(self, num_bytes: int, seconds: float, behind: bool) -> None: ...


class FixedCodec:
    """Every layer in one codec, the one the pull asked for."""

    def __init__(self, codec: KVCodec) -> None:
        self.name = codec.name
        self._choice = LayerCodec(codec, "fixed")

    def choose(self, behind: bool) -> LayerCodec:
        return self._choice

    def sent(self, num_bytes: int, seconds: float, behind: bool) -> None:
        pass


class AutoCodec:
    """Raw while the link keeps up, ``int8`` while a slow link holds layers back (one stream's)."""

    name = AUTO

    def __init__(self, compress_below: float = COMPRESS_BELOW_BYTES_PER_S) -> None:
        self.compress_below = compress_below
        self._bytes = 0
        self._seconds = 0.0
        self._raw = get_codec("none")
        self._compressed = get_codec(AUTO_CODEC)

    @property
    def link_bytes_per_s(self) -> float | None:
        """The link's rate seen while behind; None until MEASURE_BYTES were sent so."""
        if self._bytes < MEASURE_BYTES or self._seconds <= 0:
            return None
        return self._bytes / self._seconds

    def choose(self, behind: bool) -> LayerCodec:
        if not behind:
            return LayerCodec(self._raw, "link_keeps_up")
        rate = self.link_bytes_per_s
        if rate is None:
            return LayerCodec(self._raw, "measuring")
        if rate >= self.compress_below:
            return LayerCodec(self._raw, "fast_link")
        return LayerCodec(self._compressed, "slow_link")

    def sent(self, num_bytes: int, seconds: float, behind: bool) -> None:
        if behind:
            self._bytes += num_bytes
            self._seconds += seconds


def codec_policy(name: str) -> CodecPolicy:
    """The policy for a pull's ``codec``: ``auto`` or a codec's name (ValueError for others)."""
    return AutoCodec() if name == AUTO else FixedCodec(get_codec(name))
