"""The KV connector contract, shared by every backend, and the registry that names them.

One connector lives in each worker and plays both roles.

Sending side (a prefill worker), all calls from the engine's thread unless noted:
  1. :meth:`KVConnector.start` once: the KV server listens; :attr:`address` is what receivers dial.
  2. :meth:`offer` when a prefill request is admitted, under a ``kv_cache_id`` the router chose.
     With ``pipelined=True`` the engine's per-layer callback feeds :meth:`publish_layer` so a
     receiver that is already connected gets layer *i* while layer *i+1* is computed.
  3. :meth:`ready` when the prefill finished with its blocks held (``LLMEngine`` ``hold_kv``).
  4. The sender then does nothing: the offer ends exactly once — the receiver ACKs after the KV
     landed in its cache, the transfer fails or misses its deadline, :meth:`withdraw` is called
     (an abort on the sending side), or nobody claims it within ``lease_ttl`` — and ending it
     calls ``release(kv_cache_id)``, which must free the held blocks (post it to the engine).

Receiving side (a decode worker), from a thread of its own (it blocks):
  5. :meth:`pull` dials the sender, proves the shared secret, claims the offer and reads the
     header; calls ``target.reserve(header)`` (the engine checks the compatibility fingerprint
     and reserves blocks), moves the data into those blocks (``target.write`` or a direct
     shared-memory copy), calls ``target.commit(first_tokens)`` and ACKs. On any failure it
     calls ``target.cancel()`` (the engine frees the reservation), tells the sender why, and
     raises :class:`TransferError` — never later than ``transfer_timeout``. ``target.abort()``
     from another thread (an abort on the receiving side) ends a pull at once.

Who frees what: the sender frees its held blocks (via ``release``) once the offer ended; the
receiver frees its reservation on failure and owns the blocks after commit. Neither side ever
waits on the other without a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pdserve.engine.handoff import (
    HandoffHeader,
    HeldKV,
    IncompatibleHandoffError,
    sampled_token_from_json,
)
from pdserve.engine.kv_cache import KVLayout
from pdserve.engine.sampler import SampledToken
from pdserve.transfer.auth import new_nonce, prove_pull, prove_server, verify
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.errors import FailureReason, TransferError
from pdserve.transfer.metrics import TransferMetrics
from pdserve.transfer.offers import OfferTable, Segment
from pdserve.transfer.server import KVServer, KVSource
from pdserve.transfer.wire import (
    Deadline,
    Frame,
    Kind,
    expect,
    recv_frame,
    recv_frame_skipping_waits,
    send_error,
    send_frame,
)


@dataclass
class PullTarget:
    """Where one pulled KV goes: the receiving engine's side of a single request."""

    reserve: Callable[[HandoffHeader], list[int]]
    """Check the header and reserve blocks for ``header.num_tokens`` positions; returns the
    block table. Raises IncompatibleHandoffError or MemoryError to refuse."""
    write: Callable[[list[int], int, int, torch.Tensor], None]
    """(block_table, layer, start, kv [2, n, kv_heads, head_dim]) into the reserved blocks."""
    commit: Callable[[list[SampledToken]], None]
    """The KV is complete: hand the request to the scheduler with its first tokens."""
    cancel: Callable[[], None]
    """Free the reservation (called once, on any failure after ``reserve``)."""
    pool: torch.Tensor | None = None
    """The receiving engine's KV pool, for backends that copy blocks into it directly."""
    received_bytes: int = 0
    """Payload bytes that arrived, set before ``commit`` is called."""
    received_codec: str = "none"
    """The codec they travelled in ("none" for raw KV and shared-memory copies; under ``auto``,
    the codecs of its layers joined by "+", e.g. "none+int8"), set with them."""
    _aborted: threading.Event = field(default_factory=threading.Event)
    _socket: socket.socket | None = None

    def abort(self) -> None:
        """End the pull from another thread (the request was aborted on this side)."""
        self._aborted.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()


@dataclass(frozen=True)
class PullResult:
    header: HandoffHeader
    num_bytes: int
    """Payload bytes received (encoded size for streamed KV)."""
    seconds: float
    codec: str = "none"


class KVConnector(ABC):
    """A backend for moving KV between workers; see the module docstring for the contract."""

    name: ClassVar[str]

    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        source: KVSource | None = None,
        release: Callable[[str], None] | None = None,
        metrics: TransferMetrics | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.source = source
        self.metrics = metrics or TransferMetrics()
        self.offers = OfferTable(config.lease_ttl, release or (lambda _id: None))
        self._server: KVServer | None = None

    # -- sending side ----------------------------------------------------------------------

    def start(self) -> str:
        """Start serving offers; returns the address receivers dial ("host:port")."""
        if self.source is None:
            raise ValueError("a connector without a KV source can only receive")
        if self._server is None:
            self._server = KVServer(self.config, self.source, self.offers, self.metrics)
        return self._server.address

    @property
    def address(self) -> str | None:
        return self._server.address if self._server else None

    def offer(self, kv_cache_id: str, header: HandoffHeader, pipelined: bool = False) -> None:
        self.offers.open(kv_cache_id, header, pipelined)

    def publish_layer(self, kv_cache_id: str, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine layer callback for a pipelined offer: k, v are [n, kv_heads, head_dim]."""
        self.offers.publish(kv_cache_id, Segment(layer, start, torch.stack([k, v]).cpu()))

    def ready(self, kv_cache_id: str, held: HeldKV) -> None:
        self.offers.ready(kv_cache_id, held)

    def withdraw(self, kv_cache_id: str) -> bool:
        return self.offers.withdraw(kv_cache_id)

    # -- receiving side --------------------------------------------------------------------

    def pull(
        self, address: str, kv_cache_id: str, target: PullTarget, codec: str | None = None, server: str | None = None
    ) -> PullResult:
        """Fetch ``kv_cache_id`` from the sender at ``address`` into ``target``; see the contract.

        ``server`` is the KV server's own address when ``address`` only leads to it (a TCP
        proxy or tunnel): the proof of the secret names the server, which checks it is itself.
        """
        deadline = Deadline(self.config.transfer_timeout, self.config.io_timeout)
        started = time.monotonic()
        self.metrics.started.labels("receive").inc()
        reserved = False
        sock: socket.socket | None = None
        try:
            sock = _connect(address, deadline)
            target._socket = sock
            if target.aborted:
                raise TransferError(FailureReason.ABORTED, "the request was aborted on the receiver")
            hello = expect(recv_frame(sock, deadline), Kind.HELLO)
            nonce = new_nonce()
            pull_meta = self._pull_meta(hello, kv_cache_id, codec, server or address, nonce)
            send_frame(sock, Kind.PULL, pull_meta, deadline=deadline)
            head = expect(recv_frame_skipping_waits(sock, deadline), Kind.HEADER)
            self._check_server(head, nonce, kv_cache_id)
            header = HandoffHeader.from_json(head.meta["header"])
            block_table = _reserve(target, header)
            reserved = True
            bytes_by_codec, first_tokens = self._receive(sock, head, header, block_table, target, deadline)
            num_bytes = sum(bytes_by_codec.values())
            codec = "+".join(sorted(bytes_by_codec)) or "none"
            target.received_bytes, target.received_codec = num_bytes, codec
            target.commit(first_tokens)
            reserved = False
            send_frame(sock, Kind.ACK, deadline=deadline)
        except TransferError as error:
            failure = error
            if target.aborted:
                failure = TransferError(FailureReason.ABORTED, "the request was aborted on the receiver")
            self._fail(sock, target, reserved, failure)
            raise failure from None
        except Exception as error:
            # Whatever a peer's bytes make go wrong (a field of the wrong type, KV that does not
            # fit its shape) fails this pull alone; the request then recomputes.
            failure = TransferError(
                FailureReason.PROTOCOL, f"unusable data from the sender: {type(error).__name__}: {error}"
            )
            self._fail(sock, target, reserved, failure)
            raise failure from None
        finally:
            target._socket = None
            if sock is not None:
                sock.close()
        seconds = time.monotonic() - started
        self.metrics.record_success("receive", bytes_by_codec, seconds)
        return PullResult(header, num_bytes, seconds, codec)

    def close(self) -> None:
        """Stop serving; every open offer ends (its KV is released)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.offers.close()

    # -- backend hooks ---------------------------------------------------------------------

    data_mode: ClassVar[str]
    """What the PULL asks the sender for: "stream" (frames over the socket) or "shm"."""

    @abstractmethod
    def _receive_data(
        self,
        sock: socket.socket,
        head: Frame,
        header: HandoffHeader,
        block_table: list[int],
        target: PullTarget,
        deadline: Deadline,
    ) -> dict[str, int]:
        """Move the KV into ``block_table``; returns the payload bytes by the codec they travelled
        in. The DONE frame is read after."""

    # -- internals -------------------------------------------------------------------------

    def _pull_meta(self, hello: Frame, kv_cache_id: str, codec: str | None, server: str, nonce: str) -> dict:
        meta: dict = {
            "kv_cache_id": kv_cache_id, "data": self.data_mode, "codec": codec or self.config.codec,
            "server": server, "nonce": nonce,
        }
        if hello.meta.get("auth"):
            if self.config.secret is None:
                raise TransferError(FailureReason.AUTH, "the sender requires a shared secret; none is configured")
            meta["auth"] = prove_pull(self.config.secret, str(hello.meta["nonce"]), kv_cache_id, server)
        return meta

    def _check_server(self, head: Frame, nonce: str, kv_cache_id: str) -> None:
        """With a secret, KV is taken only from a server that proves it too: a peer without it
        (a process squatting on a worker's port, say) must not fill our cache."""
        if self.config.secret is not None and not verify(
            prove_server(self.config.secret, nonce, kv_cache_id), head.meta.get("auth")
        ):
            raise TransferError(FailureReason.AUTH, "the KV server did not prove the shared secret")

    def _receive(
        self,
        sock: socket.socket,
        head: Frame,
        header: HandoffHeader,
        block_table: list[int],
        target: PullTarget,
        deadline: Deadline,
    ) -> tuple[dict[str, int], list[SampledToken]]:
        bytes_by_codec = self._receive_data(sock, head, header, block_table, target, deadline)
        done = expect(recv_frame(sock, deadline), Kind.DONE)
        first_tokens = [sampled_token_from_json(t) for t in done.meta.get("first_tokens", [])]
        return bytes_by_codec, first_tokens

    def _fail(self, sock: socket.socket | None, target: PullTarget, reserved: bool, error: TransferError) -> None:
        if reserved:
            target.cancel()
        if sock is not None and error.reason is not FailureReason.PEER_CLOSED:
            send_error(sock, error.reason, error.detail)
        self.metrics.failed.labels("receive", error.reason.value).inc()


def _connect(address: str, deadline: Deadline) -> socket.socket:
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=deadline.socket_timeout("connecting"))
    except TimeoutError:
        raise TransferError(FailureReason.TIMEOUT, f"connecting to {address} timed out") from None
    except OSError as error:
        raise TransferError(FailureReason.PEER_CLOSED, f"cannot connect to {address}: {error}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reserve(target: PullTarget, header: HandoffHeader) -> list[int]:
    try:
        return target.reserve(header)
    except IncompatibleHandoffError as error:
        raise TransferError(FailureReason.INCOMPATIBLE, str(error)) from None
    except MemoryError as error:
        raise TransferError(FailureReason.NO_ROOM, str(error)) from None


# -- registry --------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], type[KVConnector]]] = {}


def register_connector(name: str, loader: Callable[[], type[KVConnector]]) -> None:
    """Register a backend lazily, so optional ones (RDMA) import their libraries only when used."""
    _REGISTRY[name] = loader


def connector_class(name: str) -> type[KVConnector]:
    loader = _REGISTRY.get(name)
    if loader is None:
        raise ValueError(f"unknown KV connector {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return loader()


def connector_names() -> list[str]:
    return sorted(_REGISTRY)


def _load_tcp() -> type[KVConnector]:
    from pdserve.transfer.tcp import TcpConnector

    return TcpConnector


def _load_shm() -> type[KVConnector]:
    from pdserve.transfer.shm import ShmConnector

    return ShmConnector


def _load_nixl() -> type[KVConnector]:
    """The RDMA seam (NVIDIA NIXL over UCX) for GPU clusters; see docs/transfer.md.

    It would subclass :class:`KVConnector` with ``data_mode = "rdma"``: the sender registers its
    pool with a NIXL agent at start, the SHM frame's role is played by the agent metadata plus
    the sender's block descriptors, and ``_receive_data`` posts RDMA READs into the reserved
    blocks. Not implemented: no RDMA hardware here to test it.
    """
    try:
        import nixl  # noqa: F401
    except ImportError:
        raise ValueError(
            "the 'nixl' KV connector needs NVIDIA NIXL and RDMA-capable GPUs; use 'tcp' or 'shm' here"
        ) from None
    raise ValueError("the 'nixl' KV connector is a documented seam, not implemented yet; use 'tcp' or 'shm'")


register_connector("tcp", _load_tcp)
register_connector("shm", _load_shm)
register_connector("nixl", _load_nixl)
