"""Connector throughput on real KV pools, beside a raw memcpy and a raw loopback socket.

For each payload size, the same number of bytes is moved four or more ways, in one run: a
``torch`` copy between two buffers (the ceiling for ``shm``), a plain TCP socket on loopback
(the ceiling for ``tcp``), and each connector moving a held KV of that size from one pool to
another (latency = the receiver's whole ``pull``: connect, header, data, commit, ACK).
The model is not run: the KV geometry is the model's, the values are random.
"""

from __future__ import annotations

import functools
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from pdserve.engine.config import CacheConfig
from pdserve.engine.handoff import PROTOCOL_VERSION, HandoffHeader, HeldKV
from pdserve.engine.kv_cache import KVCachePool, KVLayout, allocate_pool
from pdserve.engine.sampler import SampledToken
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import PullTarget, connector_class

MB = 1 << 20


@dataclass(frozen=True)
class BandwidthRow:
    method: str
    payload_bytes: int
    """Bytes of KV moved (before any codec)."""
    seconds_median: float
    seconds_p90: float

    @property
    def gb_per_s(self) -> float:
        return self.payload_bytes / self.seconds_median / 1e9


class PoolSource:
    """A KV pool read the way the KV server reads an engine's (held blocks only)."""

    def __init__(self, pool: KVCachePool) -> None:
        self.pool = pool

    @property
    def layout(self) -> KVLayout:
        return self.pool.layout

    @property
    def shm_name(self) -> str | None:
        return self.pool.shm_name

    def read_layers(
        self, block_table: list[int], start: int, end: int, layers: Sequence[int]
    ) -> Iterator[torch.Tensor]:
        return self.pool.read_layers(block_table, start, end, layers)


def measure_bandwidth(
    unit: KVLayout, sizes_mb: list[int], repeats: int, codecs: list[str], log: Callable[[str], None]
) -> list[BandwidthRow]:
    rows: list[BandwidthRow] = []
    bytes_per_token = unit.bytes_per_block // unit.block_size
    for size_mb in sizes_mb:
        num_tokens = max(unit.block_size, -(-size_mb * MB // bytes_per_token))
        payload = num_tokens * bytes_per_token
        reps = repeats if size_mb < 128 else max(2, repeats // 2)
        log(f"bandwidth: {payload / MB:.0f} MB ({num_tokens} tokens), {reps} repetitions")
        rows.append(_row("memcpy", payload, _time(reps, functools.partial(_memcpy, payload))))
        rows.append(_row("raw socket", payload, _time(reps, functools.partial(_raw_socket, payload))))
        layout = replace(unit, num_blocks=-(-num_tokens // unit.block_size) + 1)
        for backend, codec in [("shm", "none"), *(("tcp", c) for c in codecs)]:
            label = backend if codec == "none" else f"{backend}+{codec}"
            run = _ConnectorRun(backend, codec, layout, num_tokens)
            try:
                rows.append(_row(label, payload, _time(reps, run)))
            finally:
                run.close()
        for row in rows[-(2 + 1 + len(codecs)) :]:
            log(f"  {row.method:>12}: {row.gb_per_s:6.2f} GB/s, {row.seconds_median * 1e3:8.1f} ms")
    return rows


def _row(method: str, payload: int, seconds: list[float]) -> BandwidthRow:
    ordered = sorted(seconds)
    return BandwidthRow(method, payload, statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))])


def _time(repeats: int, run: Callable[[], float | None]) -> list[float]:
    run()  # warm-ups: page faults, first connections, thread-pool start-up
    run()
    results = []
    for _ in range(repeats):
        started = time.perf_counter()
        measured = run()
        results.append(measured if measured is not None else time.perf_counter() - started)
    return results


def _memcpy(num_bytes: int) -> float:
    source = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    destination = torch.empty_like(source)
    destination.copy_(source)  # touch the pages first
    started = time.perf_counter()
    destination.copy_(source)
    return time.perf_counter() - started


def _raw_socket(num_bytes: int) -> float:
    """Bytes from one socket into a preallocated buffer behind another, on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    payload = bytearray(num_bytes)
    received = bytearray(num_bytes)
    done = threading.Event()

    def receive() -> None:
        connection, _ = listener.accept()
        view, got = memoryview(received), 0
        while got < num_bytes:
            n = connection.recv_into(view[got:])
            if n == 0:
                break
            got += n
        connection.close()
        done.set()

    thread = threading.Thread(target=receive)
    thread.start()
    started = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as sender:
        sender.sendall(payload)
        done.wait(60)
    elapsed = time.perf_counter() - started
    thread.join()
    listener.close()
    return elapsed


class _ConnectorRun:
    """One connector pair moving a held KV of ``num_tokens`` between two pools, repeatably.

    The connectors live across repetitions, as they do in a worker (shm maps the sender's
    segment once); every repetition is a new offer and a new connection.
    """

    def __init__(self, backend: str, codec: str, layout: KVLayout, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        config = TransferConfig(codec=codec, transfer_timeout=120, io_timeout=30)
        allocator = "shm" if backend == "shm" else "heap"
        self.sender_pool = allocate_pool(layout, CacheConfig(allocator=allocator), torch.device("cpu"))
        self.receiver_pool = allocate_pool(layout, CacheConfig(), torch.device("cpu"))
        self.sender_pool.tensor.normal_()
        self.receiver_pool.tensor.zero_()  # fault the pages in before timing
        self.table = list(range(-(-num_tokens // layout.block_size)))
        self.sender = connector_class(backend)(config, layout, source=PoolSource(self.sender_pool))
        self.receiver = connector_class(backend)(config, layout)
        self.address = self.sender.start()
        self._count = 0

    def __call__(self) -> float:
        self._count += 1
        kv_cache_id = f"bench-{self._count}"
        header = HandoffHeader(
            kv_cache_id, [0] * self.num_tokens, self.num_tokens,
            {"protocol_version": PROTOCOL_VERSION}, 0, [SampledToken(0, None, None)],
        )
        self.sender.offer(kv_cache_id, header)
        self.sender.ready(kv_cache_id, HeldKV(header, self.table))
        target = PullTarget(
            reserve=lambda _header: self.table, write=self._write, commit=lambda _tokens: None,
            cancel=lambda: None, pool=self.receiver_pool.tensor,
        )
        started = time.perf_counter()
        self.receiver.pull(self.address, kv_cache_id, target)
        return time.perf_counter() - started

    def _write(self, block_table: list[int], layer: int, start: int, kv: torch.Tensor) -> None:
        self.receiver_pool.write_tokens(block_table, kv.unsqueeze(0), start, slice(layer, layer + 1))

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
        self.sender_pool.close()
        self.receiver_pool.close()
