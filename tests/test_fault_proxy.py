"""The fault proxy on loopback: each fault observed from the client and from an echo server."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from pdserve.transfer.fault_proxy import Direction, Fault, FaultKind, FaultProxy

TEST_TIMEOUT_S = 10
SOCKET_TIMEOUT_S = 2.0
C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


class EchoServer:
    """Upstream for the proxy: echoes every byte and records, per connection, what it received
    and how the connection ended ("eof" or "reset"), which is what most faults change."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self.received: list[bytearray] = []
        self.ends: list[str | None] = []
        self._thread = threading.Thread(target=self._run, name="echo-server")
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def ended(self, index: int) -> bool:
        """Whether connection ``index`` was accepted and has ended (accept may still be due)."""
        return len(self.ends) > index and self.ends[index] is not None

    @property
    def num_open(self) -> int:
        return sum(end is None for end in self.ends)

    def close(self) -> None:
        self._wake_writer.send(b"x")
        self._thread.join(SOCKET_TIMEOUT_S)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_writer.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_reader:
                    return
                if key.fileobj is self._listener:
                    conn, _ = self._listener.accept()
                    conn.settimeout(SOCKET_TIMEOUT_S)
                    self._selector.register(conn, selectors.EVENT_READ, len(self.received))
                    self.received.append(bytearray())
                    self.ends.append(None)
                else:
                    assert isinstance(key.fileobj, socket.socket)
                    self._echo(key.fileobj, key.data)

    def _echo(self, conn: socket.socket, index: int) -> None:
        try:
            data = conn.recv(65536)
            if data:
                self.received[index] += data
                conn.sendall(data)
                return
            end = "eof"
        except (ConnectionError, TimeoutError):
            end = "reset"
        self._selector.unregister(conn)
        conn.close()
        self.ends[index] = end


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIMEOUT_S rather than hang the suite."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        pytest.fail(f"test ran longer than {TEST_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def no_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The proxy's loop logs what its tasks failed to handle; any such record is a bug."""
    yield
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.address) as fault_proxy:
        yield fault_proxy


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=SOCKET_TIMEOUT_S)


def recv_exactly(sock: socket.socket, num_bytes: int) -> bytes:
    data = bytearray()
    while len(data) < num_bytes:
        chunk = sock.recv(num_bytes - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {num_bytes} bytes")
        data += chunk
    return bytes(data)


def recv_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the socket still yields, and how it ended: "eof", "reset" or "timeout"."""
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    except TimeoutError:
        return bytes(data), "timeout"
    return bytes(data), "eof"


def round_trip_s(sock: socket.socket, payload: bytes) -> float:
    start = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - start


def wait_until(predicate: Callable[[], bool], timeout_s: float = SOCKET_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_refuses_non_loopback_and_checks_fault_fields(echo: EchoServer) -> None:
    for host in ("0.0.0.0", "192.0.2.1", "::", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            FaultProxy(echo.address, listen_host=host)
    FaultProxy(echo.address, listen_host="127.0.0.5")  # all of 127.0.0.0/8 is fine
    with pytest.raises(ValueError):
        Fault.rate(0)
    with pytest.raises(ValueError):
        Fault.delay(-1.0)
    with pytest.raises(ValueError):
        Fault.bitflip(offset=3, bit=8)
    with pytest.raises(ValueError):
        Fault.stall(after_bytes=-1)


def test_forwards_both_ways_and_counts(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        round_trip_s(first, b"hello")
        round_trip_s(second, bytes(1000))
        stats = proxy.stats()
        assert stats.num_bytes_client_to_server == stats.num_bytes_server_to_client == 1005
        assert stats.num_connections_accepted == 2 and stats.num_connections_open == 2
    wait_until(lambda: proxy.stats().num_connections_open == 0)
    assert echo.ends == ["eof", "eof"]


def test_delay_adds_latency_and_clears_on_an_open_connection(proxy: FaultProxy) -> None:
    delay_s = 0.15
    with connect(proxy) as client:
        round_trip_s(client, b"warm")
        proxy.set_fault(Fault.delay(delay_s))
        assert round_trip_s(client, b"slow") >= 2 * delay_s * 0.95  # once each way
        proxy.set_fault(Fault.delay(delay_s, direction=C2S))
        assert round_trip_s(client, b"half") >= delay_s * 0.95
        proxy.set_fault(Fault.none())
        assert round_trip_s(client, b"fast") < 2 * delay_s


def test_rate_limits_bandwidth(proxy: FaultProxy) -> None:
    rate, num_bytes = 50_000, 40_000
    proxy.set_fault(Fault.rate(rate, direction=C2S))
    payload = os.urandom(num_bytes)
    with connect(proxy) as client:
        elapsed_s = round_trip_s(client, payload)
    # One burst of 50 ms may go at once; the rest waits for tokens.
    assert elapsed_s >= num_bytes / rate - 0.05 - 0.02
    assert proxy.stats().num_bytes_client_to_server == num_bytes


def test_stall_holds_data_until_cleared(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = os.urandom(300)
    with connect(proxy) as client:
        round_trip_s(client, b"w" * 50)
        # Offsets count from the start of the stream: 50 bytes already went back.
        proxy.set_fault(Fault.stall(after_bytes=150, direction=S2C))
        client.sendall(payload)
        assert recv_exactly(client, 100) == payload[:100]
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)
        wait_until(lambda: len(echo.received[0]) == 350)  # the other direction is not stalled
        assert proxy.stats().num_bytes_server_to_client == 150
        client.settimeout(SOCKET_TIMEOUT_S)
        proxy.set_fault(Fault.none())
        assert recv_exactly(client, 200) == payload[100:]


def test_drop_resets_both_sides(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.set_fault(Fault.drop(after_bytes=100, direction=C2S))
    with connect(proxy) as client:
        client.sendall(os.urandom(1000))
        data, end = recv_to_end(client)
    assert end == "reset" and len(data) <= 100
    wait_until(lambda: echo.ended(0))
    assert echo.ends[0] == "reset" and len(echo.received[0]) <= 100
    wait_until(lambda: proxy.stats().num_connections_open == 0)


@pytest.mark.parametrize("direction", [C2S, S2C])
def test_truncate_forwards_exactly_n_bytes_then_fin(
    proxy: FaultProxy, echo: EchoServer, direction: Direction
) -> None:
    payload = os.urandom(300)
    proxy.set_fault(Fault.truncate(after_bytes=100, direction=direction))
    with connect(proxy) as client:
        client.sendall(payload)
        data, end = recv_to_end(client)
        assert end == "eof"
        if direction is S2C:
            assert data == payload[:100]
        else:
            assert payload[:100].startswith(data)
            wait_until(lambda: echo.ended(0))
            assert echo.ends[0] == "eof" and echo.received[0] == payload[:100]
    wait_until(lambda: proxy.stats().num_connections_open == 0)


@pytest.mark.parametrize("direction", [C2S, S2C])
def test_bitflip_flips_one_bit_in_one_direction(
    proxy: FaultProxy, echo: EchoServer, direction: Direction
) -> None:
    payload = bytes(range(100))
    flipped = bytearray(payload)
    flipped[10] ^= 1 << 3
    proxy.set_fault(Fault.bitflip(offset=10, bit=3, direction=direction))
    with connect(proxy) as client:
        client.sendall(payload)
        assert recv_exactly(client, 100) == flipped
        assert echo.received[0] == (flipped if direction is C2S else payload)
        client.sendall(payload)  # the offset is past: later bytes go through untouched
        assert recv_exactly(client, 100) == payload


def test_zmq_request_is_corrupted_by_bitflip() -> None:
    zmq = pytest.importorskip("zmq")
    context = zmq.Context()
    reply_socket = context.socket(zmq.REP)
    request_socket = context.socket(zmq.REQ)
    try:
        for sock in (reply_socket, request_socket):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(SOCKET_TIMEOUT_S * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(SOCKET_TIMEOUT_S * 1000))
        port = reply_socket.bind_to_random_port("tcp://127.0.0.1")
        with FaultProxy(("127.0.0.1", port)) as proxy:
            request_socket.connect(f"tcp://127.0.0.1:{proxy.address[1]}")
            request_socket.send(b"warm-up")
            assert reply_socket.recv() == b"warm-up"
            reply_socket.send(b"ok")
            assert request_socket.recv() == b"ok"
            # The next request on the wire: an empty delimiter frame (flags, size), then the
            # body frame (flags, size, body). Aim at body byte 20.
            sent_so_far = proxy.stats().num_bytes_client_to_server
            proxy.set_fault(Fault.bitflip(offset=sent_so_far + 4 + 20, bit=0, direction=C2S))
            body = bytes(64)
            request_socket.send(body)
            received = reply_socket.recv()
            assert proxy.fault.kind is FaultKind.BITFLIP
            assert len(received) == len(body)
            assert [i for i, (a, b) in enumerate(zip(received, body, strict=True)) if a != b] == [
                20
            ]
            assert received[20] == 1
    finally:
        request_socket.close()
        reply_socket.close()
        context.term()


def _open_fds() -> set[tuple[str, str]]:
    """(fd, what it refers to) for each open descriptor of this process."""
    opened = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed by now
            opened.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return opened


def test_close_releases_connections_threads_and_fds(echo: EchoServer) -> None:
    # Only what appeared during the test counts: a thread or descriptor of an earlier test that
    # ends meanwhile is not the proxy's doing.
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    proxy = FaultProxy(echo.address).start()
    idle = connect(proxy)
    round_trip_s(idle, b"idle")
    proxy.set_fault(Fault.stall(after_bytes=0))
    stalled = connect(proxy)
    stalled.sendall(b"held")
    dropped = connect(proxy)
    proxy.set_fault(Fault.drop(after_bytes=0))  # also acts on idle connections at once
    # connect() returns once the kernel has the connection; the proxy may accept it later. All
    # three must be accepted (and dropped) before the fault is lifted, or a late one survives.
    wait_until(lambda: proxy.stats().num_connections_accepted == 3 and proxy.stats().num_connections_open == 0)
    proxy.set_fault(Fault.none())
    survivor = connect(proxy)
    round_trip_s(survivor, b"alive")
    assert proxy.stats().num_connections_open == 1
    proxy.close()
    assert recv_to_end(survivor)[1] in ("eof", "reset")
    for sock in (idle, stalled, dropped, survivor):
        sock.close()
    wait_until(lambda: len(echo.ends) == 4 and echo.num_open == 0)
    assert proxy.stats().num_connections_open == 0
    assert set(threading.enumerate()) - threads_before == set()
    assert _open_fds() - fds_before == set()


def test_refused_upstream_closes_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with FaultProxy(("127.0.0.1", port)) as proxy, connect(proxy) as client:
        assert recv_to_end(client) in ((b"", "eof"), (b"", "reset"))
        wait_until(lambda: proxy.stats().num_connections_accepted == 1)
        assert proxy.stats().num_connections_open == 0
