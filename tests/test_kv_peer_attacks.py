"""A malicious or broken KV peer: a fake KV server that holds the shared secret, speaks the wire
protocol, and lies in one way per test.

The real receiver (a decode worker's engine service, in process) pulls from it. Whatever the
fake sends — a swapped prompt, out-of-range layers, positions, blocks or tokens, KV that does
not fit its shape, an oversize or corrupt frame, a slow drip, a cut connection, a segment that
is not a KV pool — the pull fails with a reason, counted, and the request is recomputed to the
same greedy tokens; nothing stays reserved, and the fake's honest twin delivers, so the fake is
known to speak the protocol.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from pdserve.bench.prompt_set import TEXT_PROMPTS
from pdserve.engine.config import CacheConfig
from pdserve.engine.loader import Checkpoint
from pdserve.runtime.inprocess import InProcessWorker as Worker
from pdserve.runtime.inprocess import failures, is_idle, token_ids
from pdserve.transfer import wire
from pdserve.transfer.auth import new_nonce, prove_server
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.server import as_buffer
from pdserve.transfer.wire import Deadline, Kind, recv_frame, send_frame

SECRET = "a secret the fake peer was given"
PROMPT = TEXT_PROMPTS[1]
PARAMS = {"max_tokens": 8}
CONFIG = TransferConfig(lease_ttl=2.0, io_timeout=1.5, transfer_timeout=4.0, secret=SECRET)


@dataclass
class Stolen:
    """What an honest sender would send for PROMPT: its header and each layer's KV."""

    header: dict[str, Any]
    layers: list[torch.Tensor]
    """[2, num_tokens, kv_heads, head_dim] per layer."""
    shm_pool: str
    """A live pdserve KV pool in shared memory (the real sender's), for a fake to name."""


@pytest.fixture(scope="module")
def receiver(checkpoint: Checkpoint) -> Iterator[Worker]:
    worker = Worker(checkpoint, CONFIG)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def honest(checkpoint: Checkpoint) -> Iterator[Stolen]:
    """A real prefill's header and KV, taken from a real sender (whose offer is then withdrawn)."""
    sender = Worker(checkpoint, CONFIG, CacheConfig(memory_bytes=32 << 20, allocator="shm"))
    sender.generate("source", PROMPT, PARAMS, kv={"mode": "offer"})
    (prefilled,) = sender.wait_finished("source")
    assert prefilled["event"] == "prefilled", prefilled
    held = sender.engine.held_kv("source")
    assert held is not None and sender.engine.kv_pool.shm_name is not None
    layout = sender.engine.kv_pool.layout
    layers = sender.engine.kv_pool.read_layers(held.block_table, 0, held.header.num_tokens, range(layout.num_layers))
    yield Stolen(held.header.to_json(), [layer.clone() for layer in layers], sender.engine.kv_pool.shm_name)
    sender.service.connector.withdraw("source")
    sender.close()


@pytest.fixture(scope="module")
def local_tokens(receiver: Worker) -> list[int]:
    receiver.generate("local", PROMPT, PARAMS)
    return token_ids(receiver.wait_finished("local"))


Script = Callable[[socket.socket, dict[str, Any], Stolen], None]


class FakeKVServer:
    """Accepts one pull, proves the secret like a real KV server, then runs ``script``."""

    def __init__(self, script: Script, stolen: Stolen) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, args=(script, stolen), daemon=True)
        self._thread.start()

    def _serve(self, script: Script, stolen: Stolen) -> None:
        sock, _ = self._listener.accept()
        with sock:
            deadline = Deadline(30.0)
            send_frame(sock, Kind.HELLO, {"protocol": 1, "nonce": new_nonce(), "auth": True}, deadline=deadline)
            pull = recv_frame(sock, deadline).meta
            with contextlib.suppress(wire.TransferError, OSError):  # the receiver gave up on us: the point
                script(sock, pull, stolen)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=10)


# -- the fake's scripts: an honest one, and one lie each --------------------------------------


def proof(pull: dict[str, Any]) -> dict[str, str]:
    return {"auth": prove_server(SECRET, str(pull["nonce"]), str(pull["kv_cache_id"]))}


def send_header(sock: socket.socket, pull: dict[str, Any], header: dict[str, Any], **extra: Any) -> None:
    send_frame(sock, Kind.HEADER, {"header": header, "data": "stream", "codec": "none", **proof(pull), **extra})


def send_layer(sock: socket.socket, layer: int, start: int, kv: torch.Tensor, **overrides: Any) -> None:
    body = as_buffer(kv)
    meta = {"layer": layer, "start": start, "end": start + int(kv.shape[1]), "parts": [body.nbytes], **overrides}
    send_frame(sock, Kind.LAYER, meta, [body])


def send_rest(sock: socket.socket, stolen: Stolen, first: int = 0, first_tokens: list | None = None) -> None:
    for layer, kv in enumerate(stolen.layers[first:], start=first):
        send_layer(sock, layer, 0, kv)
    tokens = stolen.header["first_tokens"] if first_tokens is None else first_tokens
    send_frame(sock, Kind.DONE, {"first_tokens": tokens})
    recv_frame(sock, Deadline(10.0))  # the ACK (or the receiver's ERROR)


def honest_twin(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    send_rest(sock, stolen)


def no_server_proof(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_frame(sock, Kind.HEADER, {"header": stolen.header, "data": "stream", "codec": "none"})
    send_rest(sock, stolen)


def swapped_prompt(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    ids = stolen.header["prompt_token_ids"]
    send_header(sock, pull, {**stolen.header, "prompt_token_ids": ids[::-1]})
    send_rest(sock, stolen)


def negative_positions(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, {**stolen.header, "num_tokens": -16})


def huge_seed(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, {**stolen.header, "seed": 10**40})


def layer_out_of_range(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    send_layer(sock, 10_000, 0, stolen.layers[0])


def positions_past_the_prompt(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    send_layer(sock, 0, 0, stolen.layers[0], end=10**9)


def wrong_shape(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    send_layer(sock, 0, 0, stolen.layers[0][:, :, :1].contiguous())  # one head of several


def first_token_out_of_vocab(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, {**stolen.header, "first_tokens": []})
    send_rest(sock, stolen, first_tokens=[{"token_id": 10**9, "logprob": None, "top_logprobs": None}])


def oversize_frame(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    sock.sendall(wire._HEADER.pack(wire.MAGIC, wire.WIRE_VERSION, int(Kind.LAYER), 2, 1 << 40) + b"{}")


def bad_checksum(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    body = bytearray(as_buffer(stolen.layers[0]))
    meta = {"layer": 0, "start": 0, "end": int(stolen.layers[0].shape[1]), "parts": [len(body)],
            "xxh3": wire.checksum([body]) ^ 1}
    meta_bytes = wire.json.dumps(meta).encode()
    sock.sendall(wire._HEADER.pack(wire.MAGIC, wire.WIRE_VERSION, int(Kind.LAYER), len(meta_bytes), len(body))
                 + meta_bytes + body)


def slow_drip(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    """A byte at a time, each just within the I/O timeout: only the whole deadline ends it."""
    send_header(sock, pull, stolen.header)
    frame = bytes(as_buffer(stolen.layers[0]))
    for byte in frame[:40]:
        sock.sendall(bytes([byte]))
        time.sleep(CONFIG.io_timeout / 2)


def cut_mid_frame(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header)
    body = bytes(as_buffer(stolen.layers[0]))
    meta_bytes = b'{"layer":0}'
    sock.sendall(wire._HEADER.pack(wire.MAGIC, wire.WIRE_VERSION, int(Kind.LAYER), len(meta_bytes), len(body))
                 + meta_bytes + body[: len(body) // 2])


def foreign_segment(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header, data="shm")
    send_frame(sock, Kind.SHM, {"shm_name": "not-a-kv-pool", "block_table": [0, 1, 2], "pid": os.getpid()})


def negative_blocks(sock: socket.socket, pull: dict[str, Any], stolen: Stolen) -> None:
    send_header(sock, pull, stolen.header, data="shm")
    send_frame(sock, Kind.SHM, {"shm_name": stolen.shm_pool, "block_table": [-1, -2, -3, -4], "pid": os.getpid()})


ATTACKS: list[tuple[Script, str, str]] = [
    (no_server_proof, "tcp", "auth"),
    (swapped_prompt, "tcp", "incompatible"),
    (negative_positions, "tcp", "protocol"),
    (huge_seed, "tcp", "protocol"),
    (layer_out_of_range, "tcp", "protocol"),
    (positions_past_the_prompt, "tcp", "protocol"),
    (wrong_shape, "tcp", "protocol"),
    (first_token_out_of_vocab, "tcp", "protocol"),
    (oversize_frame, "tcp", "corrupt"),
    (bad_checksum, "tcp", "corrupt"),
    (slow_drip, "tcp", "timeout"),
    (cut_mid_frame, "tcp", "peer_closed"),
    (foreign_segment, "shm", "protocol"),
    (negative_blocks, "shm", "protocol"),
]


def pull_from(receiver: Worker, fake: FakeKVServer, request_id: str, backend: str) -> list[dict[str, Any]]:
    receiver.generate(request_id, PROMPT, PARAMS, kv={"mode": "pull", "address": fake.address, "backend": backend})
    return receiver.wait_finished(request_id, timeout=CONFIG.transfer_timeout + 30)


def test_the_fake_peer_speaks_the_protocol(receiver: Worker, honest: Stolen, local_tokens: list[int]) -> None:
    fake = FakeKVServer(honest_twin, honest)
    events = pull_from(receiver, fake, "honest", "tcp")
    fake.close()
    assert events[0]["event"] == "kv_received" and not failures(events), events
    assert token_ids(events) == local_tokens
    assert is_idle(receiver.wait_idle())


@pytest.mark.parametrize(("script", "backend", "reason"), ATTACKS, ids=[a[0].__name__ for a in ATTACKS])
def test_a_lying_peer_costs_a_recompute_and_nothing_else(
    receiver: Worker, honest: Stolen, local_tokens: list[int], script: Script, backend: str, reason: str
) -> None:
    counter = receiver.service.connector.metrics.failed.labels("receive", reason)
    before = counter._value.get()
    fake = FakeKVServer(script, honest)
    started = time.monotonic()
    events = pull_from(receiver, fake, f"attack-{script.__name__}", backend)
    fake.close()
    (failure,) = failures(events)
    assert (failure["reason"], failure["fallback"]) == (reason, "recompute"), failure
    assert failure["received_at"] - started < CONFIG.transfer_timeout + 2
    assert token_ids(events) == local_tokens  # recomputed: nothing of the lie reached the output
    assert counter._value.get() == before + 1
    assert is_idle(receiver.wait_idle()), receiver.debug()

