"""Why a KV transfer failed, as one exception type with a machine-readable reason."""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Reasons a transfer ends without delivering KV; also the label of the failure metric."""

    TIMEOUT = "timeout"
    """The deadline passed (a stalled link, a slow or hung peer)."""
    PEER_CLOSED = "peer_closed"
    """The connection ended early (the peer died or dropped the link)."""
    CORRUPT = "corrupt"
    """A frame failed its checksum or could not be parsed."""
    INCOMPATIBLE = "incompatible"
    """The KV comes from another model, dtype or layout (the message names the field)."""
    AUTH = "auth"
    """The shared secret was missing or wrong."""
    UNKNOWN_KV = "unknown_kv"
    """No offer under that kv_cache_id (never made, already claimed, released or expired)."""
    ABORTED = "aborted"
    """Either side aborted the request."""
    NO_ROOM = "no_room"
    """The receiver had no free KV blocks for the prompt."""
    BUSY = "busy"
    """The sender had too many transfers waiting already."""
    PROTOCOL = "protocol"
    """The peer sent something this protocol version does not expect."""


class TransferError(RuntimeError):
    """A KV transfer failed; ``reason`` says why in a form metrics and routers can act on."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(f"KV transfer failed ({reason.value}): {message}")
        self.reason = reason
        self.detail = message
