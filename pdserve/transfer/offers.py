"""The sending side's book of offered KV: one entry per ``kv_cache_id``, with its lease.

An offer is opened when a prefill starts (so a receiver may connect early and, when pipelined,
receive layers while the prefill still runs), becomes *ready* when the prefill finished and its
blocks are held, is *claimed* by at most one receiver, and ends exactly once — delivered,
failed, withdrawn by an abort, or expired because nobody claimed it within the lease TTL. Ending
releases the held blocks through the ``release`` callback, also when the prefill finishes after
the offer already ended (so an abort or a dead receiver never strands KV).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.engine.handoff import HandoffHeader, HeldKV
from pdserve.transfer.errors import FailureReason, TransferError


@dataclass
class Segment:
    """One layer's KV for token positions [start, start + n), captured while prefill ran."""

    layer: int
    start: int
    kv: torch.Tensor
    """[2, n, kv_heads, head_dim]."""

    @property
    def end(self) -> int:
        return self.start + int(self.kv.shape[1])


@dataclass
class KVOffer:
    kv_cache_id: str
    header: HandoffHeader
    pipelined: bool
    segments: list[Segment] = field(default_factory=list)
    held: HeldKV | None = None
    ready_time: float | None = None
    claimed: bool = False
    ended: bool = False
    failure: TransferError | None = None

    @property
    def is_ready(self) -> bool:
        return self.held is not None


class OfferTable:
    """Thread-safe: the engine thread opens, publishes and readies; server threads claim and end."""

    def __init__(self, lease_ttl: float, release: Callable[[str], None]) -> None:
        self.lease_ttl = lease_ttl
        self._release = release
        self._offers: dict[str, KVOffer] = {}
        self._changed = threading.Condition()

    def __len__(self) -> int:
        with self._changed:
            return len(self._offers)

    def held_block_count(self) -> int:
        with self._changed:
            return sum(len(o.held.block_table) for o in self._offers.values() if o.held)

    # -- the engine side -------------------------------------------------------------------

    def open(self, kv_cache_id: str, header: HandoffHeader, pipelined: bool) -> None:
        with self._changed:
            if kv_cache_id in self._offers:
                raise ValueError(f"kv_cache_id {kv_cache_id!r} is already offered")
            self._offers[kv_cache_id] = KVOffer(kv_cache_id, header, pipelined)

    def publish(self, kv_cache_id: str, segment: Segment) -> None:
        with self._changed:
            offer = self._offers.get(kv_cache_id)
            if offer is None or offer.ended or not offer.pipelined:
                return
            offer.segments.append(segment)
            self._changed.notify_all()

    def ready(self, kv_cache_id: str, held: HeldKV) -> None:
        """The prefill finished and its blocks are held; release them at once if the offer ended."""
        with self._changed:
            offer = self._offers.get(kv_cache_id)
            if offer is None or (offer.ended and not offer.claimed):
                release_now = True
            else:
                offer.held = held
                offer.header = held.header
                offer.ready_time = time.monotonic()
                self._changed.notify_all()
                release_now = False
        if release_now:
            self._release(kv_cache_id)

    def withdraw(self, kv_cache_id: str, message: str = "the request was aborted on the sender") -> bool:
        """End an offer from the sending side (an abort); a connected receiver is told why."""
        return self.end(kv_cache_id, TransferError(FailureReason.ABORTED, message))

    # -- the server side -------------------------------------------------------------------

    def claim(self, kv_cache_id: str) -> KVOffer:
        with self._changed:
            offer = self._offers.get(kv_cache_id)
            if offer is None or offer.ended:
                raise TransferError(FailureReason.UNKNOWN_KV, f"no KV offered under {kv_cache_id!r}")
            if offer.claimed:
                raise TransferError(FailureReason.UNKNOWN_KV, f"KV {kv_cache_id!r} was already claimed")
            offer.claimed = True
            return offer

    def wait(self, offer: KVOffer, num_seen: int, timeout: float) -> bool:
        """Block until the offer has more than ``num_seen`` segments, is ready, or ended;
        False if ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(
                lambda: offer.ended or offer.is_ready or len(offer.segments) > num_seen, timeout
            )

    def wait_ready(self, offer: KVOffer, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: offer.ended or offer.is_ready, timeout)

    def end(self, kv_cache_id: str, failure: TransferError | None = None, *, by_server: bool = False) -> bool:
        """End an offer once (delivered when ``failure`` is None); frees its KV. False if gone.

        A claimed offer's blocks may be being read by its server thread (or copied by the
        receiver, for shm), so only that thread frees them (``by_server=True``, when it is
        done); ending it from elsewhere (an abort) only marks it, and the server thread sees
        the mark, tells the receiver and finishes.
        """
        with self._changed:
            offer = self._offers.get(kv_cache_id)
            if offer is None:
                return False
            if offer.ended and not by_server:
                return False
            offer.ended = True
            offer.failure = offer.failure or failure
            offer.segments.clear()
            self._changed.notify_all()
            if offer.claimed and not by_server:
                return True
            del self._offers[kv_cache_id]
            held = offer.held is not None
        if held:
            self._release(kv_cache_id)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """End every ready offer nobody claimed within the lease TTL; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._changed:
            due = [
                o.kv_cache_id
                for o in self._offers.values()
                if not o.claimed and o.ready_time is not None and now - o.ready_time > self.lease_ttl
            ]
        for kv_cache_id in due:
            self.end(kv_cache_id, TransferError(FailureReason.UNKNOWN_KV, "the lease expired"))
        return due

    def close(self) -> None:
        with self._changed:
            ids = list(self._offers)
        for kv_cache_id in ids:
            self.end(kv_cache_id, TransferError(FailureReason.ABORTED, "the sender is shutting down"))
