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
from dataclasses import replace
from multiprocessing import resource_tracker, shared_memory
from typing import Any, ClassVar

import torch

from pdserve.engine.handoff import HandoffHeader
from pdserve.engine.kv_cache import KVLayout, attach_shared_pool
from pdserve.transfer.connector import KVConnector, PullTarget
from pdserve.transfer.errors import FailureReason, TransferError
from pdserve.transfer.wire import Deadline, Frame, Kind, expect, recv_frame


class ShmConnector(KVConnector):
    name: ClassVar[str] = "shm"
    data_mode: ClassVar[str] = "shm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attached: dict[str, tuple[torch.Tensor, shared_memory.SharedMemory]] = {}

    def _receive_data(
        self,
        sock: socket.socket,
        head: Frame,
        header: HandoffHeader,
        block_table: list[int],
        target: PullTarget,
        deadline: Deadline,
    ) -> int:
        if target.pool is None:
            raise TransferError(FailureReason.PROTOCOL, "the shm connector needs the receiving pool")
        self._detach_dead()
        frame = expect(recv_frame(sock, deadline), Kind.SHM)
        source_table = [int(b) for b in frame.meta["block_table"]]
        num_blocks = -(-header.num_tokens // self.layout.block_size)
        if len(source_table) < num_blocks or len(block_table) < num_blocks:
            raise TransferError(FailureReason.PROTOCOL, "block tables shorter than the KV they should hold")
        source_pool = self._attach(str(frame.meta["shm_name"]), int(frame.meta.get("pid", 0)))
        if max(source_table[:num_blocks], default=0) >= source_pool.shape[2]:
            raise TransferError(FailureReason.PROTOCOL, "sender block id outside its pool")
        destination = target.pool
        for source_start, destination_start, length in block_runs(source_table[:num_blocks], block_table[:num_blocks]):
            destination[:, :, destination_start : destination_start + length].copy_(
                source_pool[:, :, source_start : source_start + length]
            )
        return num_blocks * self.layout.bytes_per_block

    def _attach(self, name: str, sender_pid: int) -> torch.Tensor:
        attached = self._attached.get(name)
        if attached is None:
            try:
                tensor, segment = attach_shared_pool(name, self._sender_layout(name, sender_pid))
            except FileNotFoundError:
                raise TransferError(FailureReason.PEER_CLOSED, f"shared KV pool {name!r} is gone") from None
            # Python registers attached segments with its resource tracker, which would unlink
            # the sender's segment when this process exits; only the creator may do that.
            if sender_pid != os.getpid():
                resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
            attached = self._attached[name] = (tensor, segment)
        return attached[0]

    def _detach_dead(self) -> None:
        """Unmap pools whose segment was unlinked (the sender exited or died): the mapping would
        otherwise keep a dead sender's whole pool in memory."""
        for name in [n for n in self._attached if not _segment_exists(n)]:
            _, segment = self._attached.pop(name)
            segment.close()

    def _fail(self, sock: socket.socket | None, target: PullTarget, reserved: bool, error: TransferError) -> None:
        super()._fail(sock, target, reserved, error)
        self._detach_dead()

    def _sender_layout(self, name: str, sender_pid: int) -> KVLayout:
        """The sender's pool has our layout but its own block count: read it off the segment size."""
        segment = shared_memory.SharedMemory(name=name, create=False)
        try:
            if sender_pid != os.getpid():
                resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
            num_blocks = segment.size // self.layout.bytes_per_block
        finally:
            segment.close()
        return replace(self.layout, num_blocks=num_blocks)

    def close(self) -> None:
        super().close()
        for _, segment in self._attached.values():
            segment.close()
        self._attached.clear()


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
