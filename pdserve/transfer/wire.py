"""Framing of the KV transfer protocol over a stream socket.

Every message is one frame::

    magic "PDKV" | version u8 | kind u8 | meta length u32 | body length u64 | meta (JSON) | body

``meta`` is a small JSON object; ``body`` is raw bytes (encoded KV), whose XXH3-64 checksum
travels in ``meta["xxh3"]`` so that corruption anywhere on the path is caught before the bytes
reach a KV cache. (XXH3 rather than crc32: it hashes at ~12 GB/s here against ~2.5 GB/s, which
would otherwise cap a transfer below the socket's own speed; it detects accidental corruption
as well — authenticity is the shared secret's job, not the checksum's.) Sizes are bounded so
that a corrupted length can never make a peer allocate or wait for gigabytes. Every receive
honours a deadline: nobody waits forever.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import numpy as np
import xxhash

from pdserve.transfer.errors import FailureReason, TransferError

WIRE_VERSION = 1
MAGIC = b"PDKV"
_HEADER = struct.Struct("!4sBBIQ")
MAX_META_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 32
CONTROL_META_BYTES = 64 << 10
"""The most a control frame's meta may hold (a PULL, an ACK): what a KV server reads from a peer
that has not proved the shared secret yet, so an unauthenticated peer cannot make it wait for,
or allocate, a large frame."""

Buffer = bytes | bytearray | memoryview


class Kind(IntEnum):
    HELLO = 1
    """server → client: protocol version and the auth nonce."""
    PULL = 2
    """client → server: which KV, how (stream or shm), which codec, auth proof."""
    HEADER = 3
    """server → client: the handoff header (prompt, seed, compatibility fields, codec)."""
    LAYER = 4
    """server → client: one layer's KV for a token range, encoded."""
    SHM = 5
    """server → client: the shared segment and block table to copy from."""
    DONE = 6
    """server → client: everything was sent; carries the first sampled tokens."""
    ACK = 7
    """client → server: the KV is in the receiver's cache; the sender may free it."""
    ERROR = 8
    """either way: the transfer failed; meta carries reason and message."""
    WAITING = 9
    """server → client: still alive, waiting for the prefill (keeps the idle-link timeout for
    broken links, not for slow prefills)."""


@dataclass
class Frame:
    kind: Kind
    meta: dict[str, Any]
    body: memoryview
    """Writable bytes, owned by this frame (received into fresh, uninitialized memory)."""


class Deadline:
    """An absolute point in time on the monotonic clock, with the per-operation I/O limit."""

    def __init__(self, seconds: float, io_timeout: float | None = None) -> None:
        self.expires = time.monotonic() + seconds
        self.io_timeout = io_timeout

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def socket_timeout(self, what: str) -> float:
        """The timeout for the next socket call; raises once the deadline has passed."""
        left = self.remaining()
        if left <= 0:
            raise TransferError(FailureReason.TIMEOUT, f"deadline passed while {what}")
        return min(left, self.io_timeout) if self.io_timeout else left


def send_frame(
    sock: socket.socket,
    kind: Kind,
    meta: dict[str, Any] | None = None,
    parts: Sequence[Buffer] = (),
    deadline: Deadline | None = None,
) -> int:
    """Send one frame; returns the bytes written. The body is the concatenation of ``parts``."""
    meta = dict(meta or {})
    body_len = sum(memoryview(p).nbytes for p in parts)
    if parts:
        meta["xxh3"] = checksum(parts)
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    head = _HEADER.pack(MAGIC, WIRE_VERSION, int(kind), len(meta_bytes), body_len)
    _sendall(sock, head + meta_bytes, deadline, kind)
    for part in parts:
        _sendall(sock, part, deadline, kind)
    return len(head) + len(meta_bytes) + body_len


def recv_frame(sock: socket.socket, deadline: Deadline, max_meta: int = MAX_META_BYTES,
               max_body: int = MAX_BODY_BYTES) -> Frame:
    """Read one frame, checking magic, version, sizes (at most ``max_meta`` and ``max_body``
    bytes, refused before either is read) and the body checksum."""
    head = _recv_exact(sock, _HEADER.size, deadline, "reading a frame header")
    magic, version, kind_value, meta_len, body_len = _HEADER.unpack(head)
    if magic != MAGIC:
        raise TransferError(FailureReason.CORRUPT, f"bad frame magic {bytes(magic)!r}")
    if version != WIRE_VERSION:
        raise TransferError(
            FailureReason.PROTOCOL, f"peer speaks wire version {version}, this side {WIRE_VERSION}"
        )
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise TransferError(FailureReason.CORRUPT, f"unknown frame kind {kind_value}") from None
    if meta_len > max_meta or body_len > max_body:
        raise TransferError(
            FailureReason.CORRUPT, f"implausible frame sizes (meta {meta_len}, body {body_len} bytes)"
        )
    meta_raw = _recv_exact(sock, meta_len, deadline, f"reading a {kind.name} frame")
    try:
        meta = json.loads(meta_raw.tobytes())
        if not isinstance(meta, dict):
            raise ValueError("meta is not an object")
    except ValueError as error:
        raise TransferError(FailureReason.CORRUPT, f"unreadable {kind.name} frame meta: {error}") from None
    body = _recv_exact(sock, body_len, deadline, f"reading a {kind.name} frame body")
    if body_len:
        expected = meta.get("xxh3")
        actual = checksum([body])
        if expected != actual:
            raise TransferError(
                FailureReason.CORRUPT,
                f"checksum mismatch in a {kind.name} frame: xxh3 is {actual}, sender said {expected}",
            )
    if kind is Kind.ERROR:
        reason = meta.get("reason", "protocol")
        try:
            failure = FailureReason(reason)
        except ValueError:
            failure = FailureReason.PROTOCOL
        raise TransferError(failure, f"peer reported: {meta.get('message', reason)}")
    return Frame(kind, meta, body)


def recv_frame_skipping_waits(sock: socket.socket, deadline: Deadline) -> Frame:
    """The next frame that is not a WAITING keep-alive (the overall deadline still applies)."""
    while True:
        frame = recv_frame(sock, deadline)
        if frame.kind is not Kind.WAITING:
            return frame


def checksum(parts: Sequence[Buffer]) -> int:
    """XXH3-64 of the concatenation of ``parts``."""
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return hasher.intdigest()


def expect(frame: Frame, *kinds: Kind) -> Frame:
    if frame.kind not in kinds:
        names = " or ".join(k.name for k in kinds)
        raise TransferError(FailureReason.PROTOCOL, f"expected {names}, got {frame.kind.name}")
    return frame


def send_error(sock: socket.socket, reason: FailureReason, message: str) -> None:
    """Best effort: tell the peer why we stop; the connection may already be gone."""
    try:
        sock.settimeout(0.5)
        send_frame(sock, Kind.ERROR, {"reason": reason.value, "message": message})
    except (OSError, TransferError):
        pass


def _sendall(sock: socket.socket, data: Buffer, deadline: Deadline | None, kind: Kind) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        if deadline is not None:
            sock.settimeout(deadline.socket_timeout(f"sending a {kind.name} frame"))
        try:
            sent = sock.send(view)
        except TimeoutError:
            raise TransferError(FailureReason.TIMEOUT, f"peer stopped reading a {kind.name} frame") from None
        except OSError as error:
            raise TransferError(FailureReason.PEER_CLOSED, f"sending a {kind.name} frame: {error}") from None
        view = view[sent:]


def _recv_exact(sock: socket.socket, size: int, deadline: Deadline, what: str) -> memoryview:
    # np.empty, not bytearray: zero-filling megabytes only to overwrite them costs ~10% here.
    view = memoryview(cast(bytes, np.empty(size, dtype=np.uint8))).cast("B")
    got = 0
    while got < size:
        sock.settimeout(deadline.socket_timeout(what))
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise TransferError(FailureReason.TIMEOUT, f"no data for too long while {what}") from None
        except OSError as error:
            raise TransferError(FailureReason.PEER_CLOSED, f"{what}: {error}") from None
        if n == 0:
            raise TransferError(FailureReason.PEER_CLOSED, f"connection closed while {what}")
        got += n
    return view
