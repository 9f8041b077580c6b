"""Configuration of a worker's KV connector (both the sending and the receiving side)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "tcp"
    """Connector name from the registry: "tcp" (any host) or "shm" (same host, no copy via sockets)."""
    host: str = "127.0.0.1"
    """Where this worker's KV server listens. Loopback by default; any other address needs ``secret``."""
    port: int = 0
    """0 picks a free port."""
    codec: str = "none"
    """Default compression for streamed KV: none, fp16, bf16, int8, fp8, or auto (int8 only while
    a slow link holds layers back, codec_choice.py); a pull may ask for another."""
    secret: str | None = None
    """Shared secret; when set, every pull must prove it (HMAC over a server nonce)."""
    lease_ttl: float = 10.0
    """Seconds a finished prefill's KV waits to be claimed before it is freed."""
    transfer_timeout: float = 30.0
    """Seconds a whole transfer may take, end to end, on either side."""
    io_timeout: float = 5.0
    """Seconds without progress on the socket before a transfer is declared stalled."""
    max_concurrent_transfers: int = 8
    """Transfers served (and pulled) at once; more wait their turn within their deadline."""
    advertise: str | None = None
    """The "host:port" receivers should dial, when it differs from where the KV server listens
    (behind NAT, a port mapping or a proxy). None: the listening address."""

    def __post_init__(self) -> None:
        if self.lease_ttl <= 0 or self.transfer_timeout <= 0 or self.io_timeout <= 0:
            raise ValueError("lease_ttl, transfer_timeout and io_timeout must be positive")
        if self.max_concurrent_transfers < 1:
            raise ValueError("max_concurrent_transfers must be at least 1")
        if not is_loopback(self.host) and not self.secret:
            raise ValueError(
                f"the KV server would listen on {self.host}, off loopback: set a shared secret "
                "(TransferConfig.secret / --kv-secret) so that only peers that know it can pull KV"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
