"""``shm``: same host; the receiver copies held blocks straight out of the sender's KV pool.

The sender's pool lives in a named POSIX shared-memory segment (the engine's ``shm``
allocator). The control plane is the same socket protocol as ``tcp`` (HELLO, PULL, HEADER,
ACK), but the KV bytes never go through it: the SHM frame names the segment and the sender's
block table, and the receiver maps the segment once (cached per sender) and copies block by
block into its own reserved blocks — one memory copy, no serialization, no codec.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker, shared_memory
from typing import Any, ClassVar

import torch

from pdserve.engine.handoff import HandoffHeader
from pdserve.engine.kv_cache import KVLayout, attach_shared_pool
from pdserve.engine.shm_segments import segment_owner
from pdserve.transfer.connector import KVConnector, PullTarget
from pdserve.transfer.errors import FailureReason, TransferError
from pdserve.transfer.wire import Deadline, Frame, Kind, expect, recv_frame_skipping_waits


class ShmConnector(KVConnector):
    name: ClassVar[str] = "shm"
    data_mode: ClassVar[str] = "shm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer_pools = PeerPools(self.layout)

    def _receive_data(
        self,
        sock: socket.socket,
        head: Frame,
        header: HandoffHeader,
        block_table: list[int],
        target: PullTarget,
        deadline: Deadline,
    ) -> dict[str, int]:
        if target.pool is None:
            raise TransferError(FailureReason.PROTOCOL, "the shm connector needs the receiving pool")
        self._peer_pools.detach_dead()
        # The header came at once; WAITING keep-alives follow while the sender's prefill runs.
        frame = expect(recv_frame_skipping_waits(sock, deadline), Kind.SHM)
        source_table = [int(b) for b in frame.meta["block_table"]]
        num_blocks = -(-header.num_tokens // self.layout.block_size)
        if len(source_table) < num_blocks or len(block_table) < num_blocks:
            raise TransferError(FailureReason.PROTOCOL, "block tables shorter than the KV they should hold")
        shm_name, sender_pid = str(frame.meta["shm_name"]), int(frame.meta["pid"])
        if segment_owner(shm_name) != sender_pid:
            raise TransferError(
                FailureReason.PROTOCOL, f"{shm_name!r} is not a KV pool of the sender (pid {sender_pid})"
            )
        with self._peer_pools.borrow(shm_name, sender_pid) as source_pool:
            if not all(0 <= block < source_pool.shape[2] for block in source_table[:num_blocks]):
                raise TransferError(FailureReason.PROTOCOL, "sender block id outside its pool")
            destination = target.pool
            for source_start, destination_start, length in block_runs(
                source_table[:num_blocks], block_table[:num_blocks]
            ):
                destination[:, :, destination_start : destination_start + length].copy_(
                    source_pool[:, :, source_start : source_start + length]
                )
        return {"none": num_blocks * self.layout.bytes_per_block}

    def _fail(self, sock: socket.socket | None, target: PullTarget, reserved: bool, error: TransferError) -> None:
        super()._fail(sock, target, reserved, error)
        self._peer_pools.detach_dead()

    def close(self) -> None:
        super().close()
        self._peer_pools.close()


@dataclass
class _Mapping:
    tensor: torch.Tensor
    segment: shared_memory.SharedMemory
    users: int = 0
    detached: bool = False


class PeerPools:
    """Same-host senders' KV pools mapped into this process, one mapping per segment.

    Pulls run on several threads at once. Closing a segment unmaps it at once, even while a
    tensor still points into it, and a copy from unmapped memory kills the process with
    SIGSEGV. So every copy borrows its mapping, and a mapping is closed only once it is
    detached (its sender's segment was unlinked, or the connector closed) *and* no copy uses
    it. Attaching is under the same lock, so concurrent first pulls from one sender share one
    mapping: a second mapping replacing the first in the table would let the first be
    garbage-collected (and unmapped) under the copy that uses it.
    """

    def __init__(self, layout: KVLayout) -> None:
        self._layout = layout
        self._lock = threading.Lock()
        self._mappings: dict[str, _Mapping] = {}

    @contextmanager
    def borrow(self, name: str, sender_pid: int) -> Iterator[torch.Tensor]:
        """The sender's pool, mapped until the ``with`` block ends."""
        with self._lock:
            mapping = self._mappings.get(name) or self._attach(name, sender_pid)
            mapping.users += 1
        try:
            yield mapping.tensor
        finally:
            with self._lock:
                mapping.users -= 1
                _close_if_unused(mapping)

    def detach_dead(self) -> None:
        """Unmap pools whose segment was unlinked (the sender exited or died): the mapping would
        otherwise keep a dead sender's whole pool in memory."""
        with self._lock:
            for name in [n for n in self._mappings if not _segment_exists(n)]:
                self._detach(name)

    def close(self) -> None:
        with self._lock:
            for name in list(self._mappings):
                self._detach(name)

    def mapped(self) -> list[str]:
        """Names of the segments mapped now (for tests and debugging)."""
        with self._lock:
            return list(self._mappings)

    def _attach(self, name: str, sender_pid: int) -> _Mapping:
        try:
            tensor, segment = attach_shared_pool(name, self._sender_layout(name, sender_pid))
        except FileNotFoundError:
            raise TransferError(FailureReason.PEER_CLOSED, f"shared KV pool {name!r} is gone") from None
        # Python registers attached segments with its resource tracker, which would unlink
        # the sender's segment when this process exits; only the creator may do that.
        if sender_pid != os.getpid():
            resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        mapping = self._mappings[name] = _Mapping(tensor, segment)
        return mapping

    def _detach(self, name: str) -> None:
        mapping = self._mappings.pop(name)
        mapping.detached = True
        _close_if_unused(mapping)

    def _sender_layout(self, name: str, sender_pid: int) -> KVLayout:
        """The sender's pool has our layout but its own block count: read it off the segment size."""
        segment = shared_memory.SharedMemory(name=name, create=False)
        try:
            if sender_pid != os.getpid():
                resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
            num_blocks = segment.size // self._layout.bytes_per_block
        finally:
            segment.close()
        return replace(self._layout, num_blocks=num_blocks)


def _close_if_unused(mapping: _Mapping) -> None:
    if mapping.detached and mapping.users == 0:
        mapping.tensor = torch.empty(0)
        mapping.segment.close()


def block_runs(source: list[int], destination: list[int]) -> list[tuple[int, int, int]]:
    """(source start, destination start, length) of runs that are consecutive on both sides,
    so that freshly allocated (mostly contiguous) tables copy in a few large strided copies."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(source, destination, strict=True):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _segment_exists(name: str) -> bool:
    """Whether a POSIX shared-memory segment still has a name (Linux keeps them in /dev/shm)."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists(f"/dev/shm/{name.lstrip('/')}")
