"""A fault-injecting TCP proxy, so KV transfer fault tests can run on loopback.

``tc netem`` needs root and a real interface, and KV transfer tests run unprivileged between
processes on 127.0.0.1. So a test points its client at a ``FaultProxy`` instead of the server
and injects faults in user space: latency, a slow link, a stalled or dropped or truncated stream,
a flipped bit. The proxy forwards bytes and knows nothing of ZeroMQ or of our wire format, so it
works under any TCP protocol.

Each direction of each connection is a reader task filling a small queue and a forwarder task
draining it. Reading apart from forwarding is what lets a delay be a latency (every chunk leaves
``delay_s`` after it arrived) rather than a gap between chunks, and lets a stall hold data while
TCP flow control pushes back on the sender. Byte offsets in a fault count from the start of each
connection's stream in that direction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

_CHUNK_BYTES = 64 * 1024
_QUEUE_CHUNKS = 8
# The token bucket holds 50 ms of traffic: enough to send in chunks, small enough that a short
# transfer still takes about size / rate.
_BURST_S = 0.05
# After a truncation the proxy waits this long for both peers to close before it closes itself.
_TRUNCATE_GRACE_S = 1.0
_CALL_TIMEOUT_S = 5.0


class Direction(enum.Enum):
    """Which stream of a connection a fault acts on."""

    CLIENT_TO_SERVER = "client_to_server"
    SERVER_TO_CLIENT = "server_to_client"
    BOTH = "both"


class FaultKind(enum.Enum):
    """What a fault does to a stream; see the matching ``Fault`` constructors."""

    NONE = "none"
    DELAY = "delay"  # every chunk leaves delay_s after it arrived
    RATE = "rate"  # a token bucket lets through rate_bytes_per_s
    STALL = "stall"  # after offset bytes, hold the rest (TCP pushes back) until the fault changes
    DROP = "drop"  # after offset bytes, RST both sides
    TRUNCATE = "truncate"  # after offset bytes, FIN both sides and discard what still comes
    BITFLIP = "bitflip"  # flip one bit of the byte at offset


_LIMIT_KINDS = (FaultKind.STALL, FaultKind.DROP, FaultKind.TRUNCATE)


@dataclass(frozen=True)
class Fault:
    """One fault; the proxy applies one at a time, so setting a fault replaces the previous one."""

    kind: FaultKind = FaultKind.NONE
    direction: Direction = Direction.BOTH
    delay_s: float = 0.0
    """DELAY: latency added to every forwarded chunk."""
    rate_bytes_per_s: float = 0.0
    """RATE: bandwidth of the emulated link."""
    offset: int = 0
    """STALL, DROP, TRUNCATE: bytes forwarded before the fault acts; BITFLIP: the flipped byte."""
    bit: int = 0
    """BITFLIP: which bit of that byte, 0 being the least significant."""

    def __post_init__(self) -> None:
        if self.kind is FaultKind.DELAY and not self.delay_s > 0:
            raise ValueError(f"a delay fault needs delay_s > 0, got {self.delay_s}")
        if self.kind is FaultKind.RATE and not self.rate_bytes_per_s > 0:
            raise ValueError(
                f"a rate fault needs rate_bytes_per_s > 0, got {self.rate_bytes_per_s}"
            )
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        if not 0 <= self.bit < 8:
            raise ValueError(f"bit must be in [0, 8), got {self.bit}")

    @classmethod
    def none(cls) -> Fault:
        return cls()

    @classmethod
    def delay(cls, seconds: float, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.DELAY, direction, delay_s=seconds)

    @classmethod
    def rate(cls, bytes_per_s: float, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.RATE, direction, rate_bytes_per_s=bytes_per_s)

    @classmethod
    def stall(cls, after_bytes: int, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.STALL, direction, offset=after_bytes)

    @classmethod
    def drop(cls, after_bytes: int, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.DROP, direction, offset=after_bytes)

    @classmethod
    def truncate(cls, after_bytes: int, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.TRUNCATE, direction, offset=after_bytes)

    @classmethod
    def bitflip(cls, offset: int, bit: int = 0, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.BITFLIP, direction, offset=offset, bit=bit)

    def applies_to(self, direction: Direction) -> bool:
        if self.kind is FaultKind.NONE:
            return False
        return self.direction is Direction.BOTH or self.direction is direction


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters, summed over all connections."""

    num_bytes_client_to_server: int
    num_bytes_server_to_client: int
    num_connections_accepted: int
    num_connections_open: int


class _FaultBoard:
    """The current fault, shared by every connection, and a way to wait for it to change."""

    def __init__(self, fault: Fault) -> None:
        self.current = fault
        self._changed = asyncio.Event()

    def set(self, fault: Fault) -> None:
        self.current = fault
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float | None = None) -> None:
        """Sleep until the fault changes or ``timeout`` passes, so waits re-read the fault."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()


class _Pump:
    """One direction of one connection: what it reads from, writes to, and has forwarded."""

    def __init__(
        self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.direction = direction
        self.reader = reader
        self.writer = writer
        # Items are (arrival time, data); None marks end of stream.
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self.num_bytes = 0
        self.tokens = 0.0
        self.bucket_rate = 0.0
        self.bucket_time = 0.0


class _Connection:
    """A client connection and its upstream connection, forwarded through the current fault."""

    def __init__(
        self,
        board: _FaultBoard,
        count: Callable[[Direction, int], None],
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._board = board
        self._count = count
        self.writers = (client[1], server[1])
        self.pumps = (
            _Pump(Direction.CLIENT_TO_SERVER, client[0], server[1]),
            _Pump(Direction.SERVER_TO_CLIENT, server[0], client[1]),
        )
        self.closing = False
        self.truncated = False
        self._readers: list[asyncio.Task[None]] = []
        self._forwarders: list[asyncio.Task[None]] = []
        self._grace: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Forward both directions until both end, the connection fails, or a fault ends it."""
        self._readers = [asyncio.create_task(self._read(pump)) for pump in self.pumps]
        self._forwarders = [asyncio.create_task(self._forward(pump)) for pump in self.pumps]
        self.enforce()
        results = await asyncio.gather(*self._readers, *self._forwarders, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):  # a bug, not a network error: make it loud
                raise result

    async def close(self) -> None:
        """Close both sockets, flushing them if the connection ended cleanly.

        Aborting in ``finally`` matters when the proxy shuts down during the flush: an aborted
        transport closes its socket on the next loop iteration, so no socket outlives the loop.
        """
        if self._grace is not None:
            self._grace.cancel()
        try:
            for writer in self.writers:
                if self.closing:
                    writer.transport.abort()
                else:
                    writer.close()
            for writer in self.writers:
                # TimeoutError (a peer that stopped reading) is an OSError: aborted below.
                with contextlib.suppress(OSError):
                    async with asyncio.timeout(_CALL_TIMEOUT_S):
                        await writer.wait_closed()
        finally:
            for writer in self.writers:
                writer.transport.abort()

    def enforce(self) -> None:
        """Act on a drop or truncation whose offset is reached, even if no more data comes."""
        fault = self._board.current
        if fault.kind not in (FaultKind.DROP, FaultKind.TRUNCATE) or self.closing or self.truncated:
            return
        if any(fault.applies_to(p.direction) and p.num_bytes >= fault.offset for p in self.pumps):
            if fault.kind is FaultKind.DROP:
                self.reset()
            else:
                self.truncate()

    def reset(self) -> None:
        """End both sides abruptly: SO_LINGER 0 makes close() send RST rather than FIN."""
        if self.closing:
            return
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def abort(self) -> None:
        """End both sides now, without flushing; what the proxy does to connections on close."""
        if self.closing:
            return
        self.closing = True
        for writer in self.writers:
            writer.transport.abort()
        for task in self._readers + self._forwarders:
            task.cancel()

    def truncate(self) -> None:
        """Send FIN both ways, then read and discard until the peers close.

        Closing a socket with unread data makes the kernel send RST, which would turn a clean
        truncation into a reset; hence the readers keep draining.
        """
        self.truncated = True
        for task in self._forwarders:
            task.cancel()
        for pump in self.pumps:
            while not pump.queue.empty():  # unblocks a reader waiting on a full queue
                pump.queue.get_nowait()
        for writer in self.writers:
            if not writer.transport.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()
        self._grace = asyncio.get_running_loop().call_later(_TRUNCATE_GRACE_S, self.abort)

    async def _read(self, pump: _Pump) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await pump.reader.read(_CHUNK_BYTES):
                if not self.truncated:
                    await pump.queue.put((loop.time(), data))
        except OSError:
            self.reset()
            return
        if not self.truncated:
            await pump.queue.put(None)

    async def _forward(self, pump: _Pump) -> None:
        try:
            while (item := await pump.queue.get()) is not None:
                arrival, data = item
                await self._wait_out_delay(pump, arrival)
                while data and not (self.closing or self.truncated):
                    num_allowed = await self._allowance(pump, len(data))
                    if num_allowed == 0:
                        continue
                    piece, data = self._flip(pump, data[:num_allowed]), data[num_allowed:]
                    # Count before writing: a peer that has the bytes must see them counted.
                    pump.num_bytes += len(piece)
                    self._count(pump.direction, len(piece))
                    pump.writer.write(piece)
                    await pump.writer.drain()
                    self.enforce()
            if pump.writer.can_write_eof() and not pump.writer.transport.is_closing():
                pump.writer.write_eof()  # pass on a half-close; the other direction goes on
        except OSError:
            self.reset()

    async def _wait_out_delay(self, pump: _Pump, arrival: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            fault = self._board.current
            if fault.kind is not FaultKind.DELAY or not fault.applies_to(pump.direction):
                return
            remaining = arrival + fault.delay_s - loop.time()
            if remaining <= 0:
                return
            await self._board.wait_changed(remaining)

    async def _allowance(self, pump: _Pump, num_wanted: int) -> int:
        """How many bytes may go now; 0 after waiting or acting, so the caller re-reads the fault."""
        fault = self._board.current
        if not fault.applies_to(pump.direction):
            return num_wanted
        if fault.kind in _LIMIT_KINDS:
            room = fault.offset - pump.num_bytes
            if room > 0:
                return min(num_wanted, room)
            if fault.kind is FaultKind.STALL:
                await self._board.wait_changed()
            else:
                self.enforce()
            return 0
        if fault.kind is FaultKind.RATE:
            return await self._take_tokens(pump, num_wanted, fault.rate_bytes_per_s)
        return num_wanted

    async def _take_tokens(self, pump: _Pump, num_wanted: int, rate: float) -> int:
        now = asyncio.get_running_loop().time()
        capacity = max(1.0, rate * _BURST_S)
        if pump.bucket_rate != rate:
            pump.bucket_rate, pump.tokens, pump.bucket_time = rate, capacity, now
        pump.tokens = min(capacity, pump.tokens + (now - pump.bucket_time) * rate)
        pump.bucket_time = now
        if pump.tokens >= 1:
            num_taken = min(num_wanted, int(pump.tokens))
            pump.tokens -= num_taken
            return num_taken
        await self._board.wait_changed((min(num_wanted, capacity) - pump.tokens) / rate)
        return 0

    def _flip(self, pump: _Pump, piece: bytes) -> bytes:
        fault = self._board.current
        if fault.kind is not FaultKind.BITFLIP or not fault.applies_to(pump.direction):
            return piece
        index = fault.offset - pump.num_bytes
        if not 0 <= index < len(piece):
            return piece
        flipped = bytearray(piece)
        flipped[index] ^= 1 << fault.bit
        return bytes(flipped)


def _check_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise ValueError(f"FaultProxy listens only on a loopback address, got {host!r}")
    return host


class FaultProxy:
    """Forwards TCP connections from ``address`` to ``upstream``, applying the current fault.

    The proxy runs an asyncio loop in a background thread; ``set_fault`` may be called from any
    thread and acts on open connections too. ``close`` closes every connection and the listener
    and joins the thread.
    """

    def __init__(
        self, upstream: tuple[str, int], listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self._upstream = upstream
        self._listen = (_check_loopback(listen_host), listen_port)
        self._board = _FaultBoard(Fault.none())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._address: tuple[str, int] | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._num_bytes = {Direction.CLIENT_TO_SERVER: 0, Direction.SERVER_TO_CLIENT: 0}
        self._num_accepted = 0

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("FaultProxy is not started")
        return self._address

    @property
    def fault(self) -> Fault:
        return self._board.current

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy can be started once")
        ready: concurrent.futures.Future[tuple[str, int]] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        try:
            self._address = ready.result(timeout=_CALL_TIMEOUT_S)
        except BaseException:
            self._thread.join(_CALL_TIMEOUT_S)
            raise
        return self

    def set_fault(self, fault: Fault) -> None:
        """Replace the current fault; once this returns, every connection sees the new one."""
        with self._lock:
            if self._loop is None:
                self._board.set(fault)
                return
            future = asyncio.run_coroutine_threadsafe(self._apply_fault(fault), self._loop)
            future.result(timeout=_CALL_TIMEOUT_S)

    def stats(self) -> ProxyStats:
        return ProxyStats(
            num_bytes_client_to_server=self._num_bytes[Direction.CLIENT_TO_SERVER],
            num_bytes_server_to_client=self._num_bytes[Direction.SERVER_TO_CLIENT],
            num_connections_accepted=self._num_accepted,
            num_connections_open=len(self._connections),
        )

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None and self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(_CALL_TIMEOUT_S)
            if self._thread.is_alive():
                raise RuntimeError("FaultProxy thread did not stop")

    def _count(self, direction: Direction, num_bytes: int) -> None:
        self._num_bytes[direction] += num_bytes

    async def _apply_fault(self, fault: Fault) -> None:
        self._board.set(fault)
        for connection in list(self._connections):
            connection.enforce()

    def _run(self, ready: concurrent.futures.Future[tuple[str, int]]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, ready))
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, ready: concurrent.futures.Future[tuple[str, int]]
    ) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, *self._listen)
        host, port = server.sockets[0].getsockname()[:2]
        with self._lock:
            self._loop = loop
        ready.set_result((host, port))
        try:
            await self._stop.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                connection.abort()
            for handler in list(self._handlers):
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()
            await asyncio.sleep(0)  # aborted transports close their sockets in this iteration

    def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # A task of our own rather than a coroutine callback: asyncio 3.11 logs a cancelled
        # callback task as an error, and close() cancels connections still dialing upstream.
        self._num_accepted += 1
        handler = asyncio.create_task(self._handle(client_reader, client_writer))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        connection: _Connection | None = None
        try:
            try:
                server = await asyncio.open_connection(*self._upstream)
            except OSError:
                client_writer.transport.abort()
                return
            # A zero high-water mark makes drain() wait until the kernel has the data, so bytes
            # counted as forwarded really left, and a stall holds data here, not in a buffer.
            for writer in (client_writer, server[1]):
                writer.transport.set_write_buffer_limits(high=0)
            connection = _Connection(
                self._board, self._count, (client_reader, client_writer), server
            )
            self._connections.add(connection)
            await connection.run()
        finally:
            if connection is None:
                client_writer.transport.abort()
            else:
                await connection.close()
                self._connections.discard(connection)
