"""The sending side's KV server: receivers connect, prove the secret, claim an offer, get the KV.

One thread accepts connections (and sweeps expired leases); each connection gets a thread of
its own that serves exactly one pull. Data is either *streamed* (encoded layer frames over the
socket, optionally while the prefill still runs) or announced for a *shared-memory* copy (the
receiver copies the held blocks straight out of this worker's pool). Either way the held KV is
freed only after the receiver's ACK, or when the transfer fails, or when its lease expires.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, cast

import torch

from pdserve.engine.handoff import PROTOCOL_VERSION, sampled_token_to_json
from pdserve.engine.kv_cache import KVLayout
from pdserve.transfer.auth import new_nonce, prove_pull, prove_server, verify
from pdserve.transfer.codec_choice import AUTO, CodecPolicy, codec_policy
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.errors import FailureReason, TransferError
from pdserve.transfer.metrics import TransferMetrics
from pdserve.transfer.offers import KVOffer, OfferTable
from pdserve.transfer.wire import (
    CONTROL_META_BYTES,
    Deadline,
    Kind,
    expect,
    recv_frame,
    send_error,
    send_frame,
)

log = logging.getLogger(__name__)

WAITING_PER_SENDER = 4
"""Connections that may wait for a sender thread, per thread; more are refused at once."""


class KVSource(Protocol):
    """The sending engine as the KV server sees it; every method is safe from any thread."""

    @property
    def layout(self) -> KVLayout: ...

    @property
    def shm_name(self) -> str | None:
        """The KV pool's shared-memory segment, if the pool lives in one."""
        ...

    def read_layers(
        self, block_table: list[int], start: int, end: int, layers: Sequence[int]
    ) -> Iterator[torch.Tensor]:
        """Each layer's KV for positions [start, end) of held blocks, [2, n, kv_heads, head_dim],
        one layer at a time."""
        ...


def as_buffer(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes without a copy (the wire sends them as they are)."""
    return memoryview(cast(bytes, tensor.contiguous().view(torch.uint8).numpy()))


class KVServer:
    def __init__(
        self,
        config: TransferConfig,
        source: KVSource,
        offers: OfferTable,
        metrics: TransferMetrics,
        on_expired: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.offers = offers
        self.metrics = metrics
        self._on_expired = on_expired
        self._listener = socket.create_server((config.host, config.port))
        self._listener.settimeout(min(0.1, config.lease_ttl / 4))
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._max_connections = WAITING_PER_SENDER * config.max_concurrent_transfers
        # Reused threads, not one per connection: a thread's first torch op pays ~10 ms to set
        # up its OpenMP team, more than a whole small transfer takes.
        self._senders = ThreadPoolExecutor(config.max_concurrent_transfers, thread_name_prefix="kv-send")
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-server", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=2)
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            _shutdown(sock)
        self._senders.shutdown(wait=True, cancel_futures=True)

    # -- threads ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            for kv_cache_id in self.offers.expire():
                self.metrics.expired_leases.inc()
                if self._on_expired is not None:
                    self._on_expired(kv_cache_id)
            self.metrics.held_blocks.set(self.offers.held_block_count())
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                full = len(self._connections) >= self._max_connections
                if not full:
                    self._connections.add(sock)
            if full:
                # Waiting connections hold sockets and memory: a bounded queue, beyond it a
                # quick refusal (the receiver recomputes) rather than a wait nobody bounds.
                self.metrics.failed.labels("send", FailureReason.BUSY.value).inc()
                send_error(sock, FailureReason.BUSY, f"{self._max_connections} transfers already waiting or running")
                sock.close()
                continue
            self._senders.submit(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        deadline = Deadline(self.config.transfer_timeout, self.config.io_timeout)
        kv_cache_id: str | None = None
        started = time.monotonic()
        try:
            nonce = new_nonce()
            send_frame(
                sock, Kind.HELLO,
                {"protocol": PROTOCOL_VERSION, "nonce": nonce, "auth": self.config.secret is not None},
                deadline=deadline,
            )
            # Before the proof is checked, a peer may send only a small control frame.
            pull = expect(recv_frame(sock, deadline, max_meta=CONTROL_META_BYTES, max_body=0), Kind.PULL)
            requested_id = str(pull.meta.get("kv_cache_id"))
            self._check_proof(sock, nonce, requested_id, pull.meta)
            offer = self.offers.claim(requested_id)
            kv_cache_id = requested_id
            self.metrics.started.labels("send").inc()
            if not offer.is_ready:
                self.metrics.early.labels("send").inc()
            bytes_by_codec = self._send(sock, offer, str(pull.meta.get("data", "stream")), pull.meta, deadline)
            expect(recv_frame(sock, deadline, max_meta=CONTROL_META_BYTES, max_body=0), Kind.ACK)
            self.offers.end(kv_cache_id, by_server=True)
            seconds = time.monotonic() - started
            self.metrics.record_success("send", bytes_by_codec, seconds)
            log.info("KV sent", extra={"request_id": kv_cache_id, "bytes": sum(bytes_by_codec.values()),
                                       "codecs": bytes_by_codec, "seconds": round(seconds, 4)})
        except TransferError as error:
            send_error(sock, error.reason, error.detail)
            if error.reason is FailureReason.ABORTED:
                # The ERROR frame may sit behind megabytes of queued KV on a slow link: reset
                # the connection so the receiver stops at once instead of at its deadline.
                _reset(sock)
            if kv_cache_id is not None:
                self.offers.end(kv_cache_id, error, by_server=True)
                self.metrics.failed.labels("send", error.reason.value).inc()
            log.info("KV send failed: %s", error, extra={"request_id": kv_cache_id, "reason": error.reason.value})
        except Exception as error:  # a bug must not leak the KV or kill the server
            log.exception("KV send crashed", extra={"request_id": kv_cache_id})
            send_error(sock, FailureReason.PROTOCOL, f"sender error: {error}")
            if kv_cache_id is not None:
                self.offers.end(kv_cache_id, TransferError(FailureReason.PROTOCOL, str(error)), by_server=True)
                self.metrics.failed.labels("send", FailureReason.PROTOCOL.value).inc()
        finally:
            sock.close()
            with self._lock:
                self._connections.discard(sock)

    def _check_proof(self, sock: socket.socket, nonce: str, kv_cache_id: str, pull: dict) -> None:
        """With a secret, the PULL must prove it over our nonce, the id and an address of ours:
        the address the receiver dialed, so a proof handed to some other server is useless here."""
        if self.config.secret is None:
            return
        server = str(pull.get("server"))
        if server not in self._names(sock):
            raise TransferError(FailureReason.AUTH, f"the pull was meant for {server}, not this KV server")
        if not verify(prove_pull(self.config.secret, nonce, kv_cache_id, server), pull.get("auth")):
            raise TransferError(FailureReason.AUTH, "missing or wrong shared-secret proof")

    def _names(self, sock: socket.socket) -> set[str]:
        """The addresses a receiver may have dialed to reach us on this connection."""
        host, port = sock.getsockname()[:2]
        return {self.address, f"{host}:{port}", *([self.config.advertise] if self.config.advertise else [])}

    # -- one pull --------------------------------------------------------------------------

    def _send(
        self, sock: socket.socket, offer: KVOffer, mode: str, request: dict, deadline: Deadline
    ) -> dict[str, int]:
        """Serve one claimed offer; returns the payload bytes sent, by the codec they travelled in."""
        if mode == "shm":
            if self.source.shm_name is None:
                raise TransferError(
                    FailureReason.PROTOCOL,
                    "this sender's KV pool is not in shared memory (start it with the shm allocator), use tcp",
                )
            # The header goes first, even before the prefill ended: a receiver that connected
            # early reserves its blocks meanwhile, and only the block copy is left at the end.
            send_frame(
                sock, Kind.HEADER, {"header": offer.header.to_json(), "data": "shm", **self._answer(offer, request)},
                deadline=deadline,
            )
            self._await_ready(sock, offer, deadline)
            assert offer.held is not None
            send_frame(
                sock, Kind.SHM,
                {"shm_name": self.source.shm_name, "block_table": offer.held.block_table, "pid": os.getpid()},
                deadline=deadline,
            )
            send_frame(sock, Kind.DONE, _done_meta(offer), deadline=deadline)
            return {"none": offer.header.num_tokens * _bytes_per_token(self.source.layout)}
        if mode != "stream":
            raise TransferError(FailureReason.PROTOCOL, f"unknown data mode {mode!r}")
        try:
            policy = codec_policy(str(request.get("codec") or self.config.codec))
        except ValueError as error:
            raise TransferError(FailureReason.PROTOCOL, str(error)) from None
        if not offer.pipelined:
            self._await_ready(sock, offer, deadline)
        send_frame(
            sock, Kind.HEADER,
            {"header": offer.header.to_json(), "data": "stream", "codec": policy.name, **self._answer(offer, request)},
            deadline=deadline,
        )
        return self._stream(sock, offer, policy, deadline)

    def _answer(self, offer: KVOffer, pull: dict) -> dict:
        """The server's proof over the receiver's nonce, so that the receiver knows whom it got
        the KV from (nothing without a secret)."""
        if self.config.secret is None:
            return {}
        return {"auth": prove_server(self.config.secret, str(pull.get("nonce")), offer.kv_cache_id)}

    def _stream(
        self, sock: socket.socket, offer: KVOffer, policy: CodecPolicy, deadline: Deadline
    ) -> dict[str, int]:
        """Send every layer's KV: captured segments while the prefill runs, the rest once held.
        Returns the bytes sent by codec.

        Segments must extend what was sent for their layer; one that leaves a gap (a prefix the
        prefill took from its cache, so no layer callback ever saw it) is skipped and the range
        is sent from the held blocks at the end instead.
        """
        num_layers = self.source.layout.num_layers
        sent_upto = [0] * num_layers
        bytes_by_codec: dict[str, int] = {}
        seen = 0
        while not offer.is_ready:
            if not self.offers.wait(offer, seen, self._keep_alive_interval(deadline)):
                send_frame(sock, Kind.WAITING, deadline=deadline)
            _raise_if_ended(offer)
            fresh = offer.segments[seen:]
            seen += len(fresh)
            for segment in fresh:
                skip = sent_upto[segment.layer] - segment.start
                if skip < 0 or segment.end <= sent_upto[segment.layer]:
                    continue
                # Behind: a later layer is already waiting for the link, or the prefill ended.
                behind = segment is not offer.segments[-1] or offer.is_ready
                self._send_layer(sock, policy, behind, segment.layer, sent_upto[segment.layer],
                                 segment.kv[:, skip:], bytes_by_codec, deadline)
                sent_upto[segment.layer] = segment.end
        self.metrics.early_bytes.inc(sum(bytes_by_codec.values()))
        _raise_if_ended(offer)
        assert offer.held is not None
        num_tokens = offer.header.num_tokens
        for start in sorted(set(sent_upto)):
            layers = [layer for layer in range(num_layers) if sent_upto[layer] == start]
            if start >= num_tokens:
                continue
            for layer, kv in zip(
                layers, self.source.read_layers(offer.held.block_table, start, num_tokens, layers), strict=True
            ):
                self._send_layer(sock, policy, True, layer, start, kv, bytes_by_codec, deadline)
                _raise_if_ended(offer)  # withdrawn: what was read may be stale, so never say DONE
        send_frame(sock, Kind.DONE, _done_meta(offer), deadline=deadline)
        return bytes_by_codec

    def _send_layer(
        self, sock: socket.socket, policy: CodecPolicy, behind: bool, layer: int, start: int, kv: torch.Tensor,
        bytes_by_codec: dict[str, int], deadline: Deadline,
    ) -> None:
        choice = policy.choose(behind)
        if policy.name == AUTO:
            self.metrics.auto_codec_layers.labels(choice.codec.name, choice.reason).inc()
        parts = [as_buffer(part) for part in choice.codec.encode(kv)]
        num_bytes = sum(p.nbytes for p in parts)
        meta = {"layer": layer, "start": start, "end": start + int(kv.shape[1]), "parts": [p.nbytes for p in parts],
                "codec": choice.codec.name}
        started = time.monotonic()
        send_frame(sock, Kind.LAYER, meta, parts, deadline=deadline)
        policy.sent(num_bytes, time.monotonic() - started, behind)
        bytes_by_codec[choice.codec.name] = bytes_by_codec.get(choice.codec.name, 0) + num_bytes

    def _await_ready(self, sock: socket.socket, offer: KVOffer, deadline: Deadline) -> None:
        while not offer.is_ready:
            if not self.offers.wait_ready(offer, self._keep_alive_interval(deadline)):
                send_frame(sock, Kind.WAITING, deadline=deadline)
            _raise_if_ended(offer)
        _raise_if_ended(offer)

    def _keep_alive_interval(self, deadline: Deadline) -> float:
        """Wake up often enough that the receiver's idle-link timeout never fires while we wait."""
        return min(deadline.socket_timeout("waiting for the prefill"), self.config.io_timeout / 3)


def _raise_if_ended(offer: KVOffer) -> None:
    if offer.ended:
        raise offer.failure or TransferError(FailureReason.ABORTED, "the offer was withdrawn")


def _done_meta(offer: KVOffer) -> dict:
    return {"first_tokens": [sampled_token_to_json(t) for t in offer.header.first_tokens]}


def _bytes_per_token(layout: KVLayout) -> int:
    return layout.bytes_per_block // layout.block_size


def _reset(sock: socket.socket) -> None:
    """Close with RST, dropping whatever is still queued for the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
