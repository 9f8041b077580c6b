"""KV transfer between two in-process workers (real engines, real sockets, real connectors).

Faults come from the loopback FaultProxy placed between the receiver and the sender's KV server.
Every test ends by checking that neither side leaks: free blocks back to the pool size, nothing
held, reserved, offered or pulled.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from pdserve.bench.prompt_set import TEXT_PROMPTS, long_prompt
from pdserve.engine.config import CacheConfig
from pdserve.engine.handoff import HandoffHeader
from pdserve.engine.loader import Checkpoint
from pdserve.runtime.inprocess import InProcessWorker as Worker
from pdserve.runtime.inprocess import failures, is_idle, token_ids
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import PullTarget, connector_class
from pdserve.transfer.errors import FailureReason, TransferError
from pdserve.transfer.fault_proxy import Direction, Fault, FaultProxy

SECRET = "correct horse battery staple"
PROMPT = TEXT_PROMPTS[0]
PARAMS = {"max_tokens": 12}
FAST_FAIL = TransferConfig(lease_ttl=1.0, io_timeout=2.0, transfer_timeout=8.0, secret=SECRET)


@pytest.fixture(scope="module")
def sender(checkpoint: Checkpoint) -> Iterator[Worker]:
    worker = Worker(checkpoint, FAST_FAIL, CacheConfig(memory_bytes=128 << 20, allocator="shm"))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def receiver(checkpoint: Checkpoint) -> Iterator[Worker]:
    worker = Worker(checkpoint, FAST_FAIL)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def local_tokens(receiver: Worker) -> list[int]:
    receiver.generate("local-reference", PROMPT, PARAMS)
    return token_ids(receiver.wait_finished("local-reference"))


def open_fds() -> list[str]:
    """This process's open files, leaving out shared-memory pools (the shm connector keeps a
    live sender's pool mapped between pulls, by design)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor, already closed
            continue
    return [t for t in targets if not t.startswith("/dev/shm/")]


@pytest.fixture(autouse=True)
def no_leaks(sender: Worker, receiver: Worker) -> Iterator[None]:
    before = len(open_fds())
    yield
    for name, worker in (("sender", sender), ("receiver", receiver)):
        state = worker.wait_idle(timeout=10)
        assert is_idle(state), f"{name} leaked: {state}"
    deadline = time.monotonic() + 5  # sockets close as their threads finish
    while len(open_fds()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(open_fds()) <= before, f"file descriptors leaked: {open_fds()}"


def prefill(sender: Worker, request_id: str, prompt: str = PROMPT, pipelined: bool = False) -> dict:
    sender.generate(request_id, prompt, PARAMS, kv={"mode": "offer", "pipelined": pipelined})
    if pipelined:
        return {}
    (event,) = sender.wait_finished(request_id)
    assert event["event"] == "prefilled", event
    return event


def pull(receiver: Worker, request_id: str, address: str, prompt: str = PROMPT, **kv: object) -> list[dict]:
    receiver.generate(request_id, prompt, PARAMS, kv={"mode": "pull", "address": address, **kv})
    return receiver.wait_finished(request_id)


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_pulled_kv_decodes_like_a_local_prefill(
    sender: Worker, receiver: Worker, local_tokens: list[int], backend: str
) -> None:
    prefilled = prefill(sender, f"pull-{backend}")
    assert prefilled["first_tokens"][0]["token_id"] == local_tokens[0]
    events = pull(receiver, f"pull-{backend}", sender.kv_address, backend=backend, on_failure="fail")
    assert events[0]["event"] == "kv_received", events[0]
    assert events[-1]["num_cached_tokens"] == events[-1]["num_prompt_tokens"], "the prompt was recomputed"
    assert token_ids(events) == local_tokens


def test_pipelined_transfer_lands_layers_while_the_prefill_runs(
    sender: Worker, receiver: Worker, checkpoint: Checkpoint
) -> None:
    prompt = long_prompt()[:4000]  # ~900 tokens: two prefill chunks of up to 512
    receiver.generate("local-long", prompt, PARAMS)
    expected = token_ids(receiver.wait_finished("local-long"))

    first_write: list[float] = []
    runner = receiver.engine.runner
    original_write = runner.write_kv

    def observed_write(*args: object, **kwargs: object) -> None:
        if not first_write:
            first_write.append(time.monotonic())
        original_write(*args, **kwargs)  # type: ignore[arg-type]

    runner.write_kv = observed_write  # type: ignore[method-assign]
    try:
        prefill(sender, "pipelined", prompt, pipelined=True)
        receiver.generate(
            "pipelined", prompt, PARAMS, kv={"mode": "pull", "address": sender.kv_address, "on_failure": "fail"}
        )
        (prefilled,) = sender.wait_finished("pipelined")
        events = receiver.wait_finished("pipelined")
    finally:
        runner.write_kv = original_write  # type: ignore[method-assign]
    assert prefilled["event"] == "prefilled"
    assert not failures(events), events
    assert first_write and first_write[0] < prefilled["received_at"], "no layer arrived before the prefill ended"
    assert token_ids(events) == expected


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_an_announced_offer_is_pulled_while_its_prefill_runs(sender: Worker, receiver: Worker, backend: str) -> None:
    """The serving path's pipelining: `offered` comes as the prefill starts, and a pull started
    then gets the KV (tcp: layer by layer; shm: its blocks reserved early, copied at the end)."""
    # ~900 tokens, long enough to overlap; a prefix of its own, else the sender's prefix cache
    # would hold it (from other tests) and there would be nothing to pipeline.
    prompt = f"Announced over {backend}. " + long_prompt()[:4000]
    request_id = f"announced-{backend}"
    receiver.generate(f"local-{request_id}", prompt, PARAMS)
    expected = token_ids(receiver.wait_finished(f"local-{request_id}"))
    metrics = sender.service.connector.metrics
    early, early_bytes = metrics.early.labels("send")._value.get(), metrics.early_bytes._value.get()
    reserved_at: list[float] = []
    engine = receiver.engine
    original_reserve = engine.reserve_kv

    def observed_reserve(*args: object, **kwargs: object) -> list[int]:
        reserved_at.append(time.monotonic())
        return original_reserve(*args, **kwargs)  # type: ignore[arg-type]

    engine.reserve_kv = observed_reserve  # type: ignore[method-assign]
    try:
        offer = {"mode": "offer", "pipelined": backend == "tcp", "announce": True}
        sender.generate(request_id, prompt, PARAMS, kv=offer)
        offered = sender.next_event(request_id)
        assert offered["event"] == "offered" and offered["kv_address"] == sender.kv_address, offered
        receiver.generate(request_id, prompt, PARAMS, kv={
            "mode": "pull", "address": offered["kv_address"], "backend": backend, "on_failure": "fail",
        })
        (prefilled,) = sender.wait_finished(request_id)
        events = receiver.wait_finished(request_id)
    finally:
        del engine.reserve_kv
    assert prefilled["event"] == "prefilled" and not failures(events), events
    assert token_ids(events) == expected
    assert metrics.early.labels("send")._value.get() == early + 1, "the pull did not connect before the prefill ended"
    assert reserved_at and reserved_at[0] < prefilled["time"], "the receiver reserved only after the prefill"
    if backend == "tcp":
        assert metrics.early_bytes._value.get() > early_bytes, "no layer was sent while the prefill ran"


def test_a_prefill_aborted_after_its_announcement_is_recomputed_by_the_puller(
    sender: Worker, receiver: Worker
) -> None:
    prompt = "Withdrawn. " + long_prompt()[:4000]
    receiver.generate("local-withdrawn", prompt, PARAMS)
    expected = token_ids(receiver.wait_finished("local-withdrawn"))
    sender.generate("withdrawn", prompt, PARAMS, kv={"mode": "offer", "pipelined": True, "announce": True})
    offered = sender.next_event("withdrawn")
    receiver.generate("withdrawn", prompt, PARAMS, kv={"mode": "pull", "address": offered["kv_address"]})
    time.sleep(0.3)  # the pull connects and claims the offer; the ~900-token prefill runs on
    sender.abort("withdrawn")  # as when the router closes the prefill's stream
    events = receiver.wait_finished("withdrawn")
    (failure,) = failures(events)
    assert failure["fallback"] == "recompute", failure
    assert token_ids(events) == expected


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "fp8"])
def test_every_codec_transfers_and_decodes(
    sender: Worker, receiver: Worker, local_tokens: list[int], codec: str
) -> None:
    prefill(sender, f"codec-{codec}")
    events = pull(receiver, f"codec-{codec}", sender.kv_address, codec=codec, on_failure="fail")
    assert events[0]["event"] == "kv_received"
    tokens = token_ids(events)
    assert len(tokens) == PARAMS["max_tokens"]
    agreement = sum(a == b for a, b in zip(tokens, local_tokens, strict=True)) / len(tokens)
    print(f"codec {codec}: {agreement:.0%} of {len(tokens)} greedy tokens agree with the uncompressed path")
    assert tokens[0] == local_tokens[0]  # the first token was sampled before any compression


def _auto_layers(worker: Worker) -> dict[tuple[str, str], float]:
    """The sender's count of layers sent under codec auto, by (codec, reason)."""
    metric = worker.service.connector.metrics.auto_codec_layers
    return {(s.labels["codec"], s.labels["reason"]): s.value
            for family in metric.collect() for s in family.samples if s.name.endswith("_total")}


def _pipelined_auto_pull(sender: Worker, receiver: Worker, request_id: str, prompt: str, address: str) -> list[dict]:
    prefill(sender, request_id, prompt, pipelined=True)
    receiver.generate(request_id, prompt, PARAMS, kv={
        "mode": "pull", "address": address, "codec": "auto", "on_failure": "fail", "server": sender.kv_address,
    })
    (prefilled,) = sender.wait_finished(request_id)
    assert prefilled["event"] == "prefilled", prefilled
    return receiver.wait_finished(request_id)


def test_auto_codec_compresses_while_a_slow_link_holds_layers_back(sender: Worker, receiver: Worker) -> None:
    prompt = long_prompt()[:4000]  # ~900 tokens: ~41 MB of float32 KV, ~2 s raw at 20 MB/s
    before = _auto_layers(sender)
    host, port = sender.kv_address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        proxy.set_fault(Fault.rate(20_000_000, direction=Direction.SERVER_TO_CLIENT))
        events = _pipelined_auto_pull(sender, receiver, "auto-slow", prompt, f"{proxy.address[0]}:{proxy.address[1]}")
    received = events[0]
    assert received["event"] == "kv_received" and not failures(events), received
    # Raw while the link was measured, int8 once it showed it could not keep up.
    assert received["codec"] == "int8+none"
    num_tokens = events[-1]["num_prompt_tokens"]
    raw_bytes = num_tokens * receiver.engine.kv_pool.layout.bytes_per_block // receiver.engine.kv_pool.layout.block_size
    assert received["num_bytes"] < 0.6 * raw_bytes, (received["num_bytes"], raw_bytes)
    sent = {key: value - before.get(key, 0) for key, value in _auto_layers(sender).items()}
    assert sent.get(("int8", "slow_link"), 0) > 0 and sent.get(("none", "measuring"), 0) > 0, sent
    assert len(token_ids(events)) == PARAMS["max_tokens"]


def test_incompatible_kv_is_rejected_naming_the_field(checkpoint: Checkpoint, sender: Worker) -> None:
    other = Worker(checkpoint, FAST_FAIL, CacheConfig(memory_bytes=32 << 20, block_size=32))
    try:
        prefill(sender, "mismatch")
        events = pull(other, "mismatch", sender.kv_address, on_failure="fail")
        (failure,) = failures(events)
        assert failure["reason"] == "incompatible" and "block_size" in failure["message"], failure
        assert is_idle(other.wait_idle()), other.debug()
    finally:
        other.close()


def test_unclaimed_kv_is_freed_when_its_lease_expires(
    sender: Worker, receiver: Worker, local_tokens: list[int]
) -> None:
    prefill(sender, "unclaimed")
    assert sender.debug()["num_held_kv"] == 1
    state = sender.wait_idle(timeout=FAST_FAIL.lease_ttl + 3)
    assert state["num_held_kv"] == 0 and state["num_free_blocks"] == state["num_blocks"]
    assert sender.service.connector.metrics.expired_leases._value.get() >= 1
    # A late pull learns the KV is gone and, by default, recomputes the prompt.
    events = pull(receiver, "unclaimed", sender.kv_address)
    assert failures(events)[0]["reason"] == "unknown_kv"
    assert token_ids(events) == local_tokens


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.bitflip(offset=40_000, bit=3, direction=Direction.SERVER_TO_CLIENT), "corrupt"),
        (Fault.truncate(after_bytes=30_000, direction=Direction.SERVER_TO_CLIENT), "peer_closed"),
        (Fault.drop(after_bytes=30_000, direction=Direction.SERVER_TO_CLIENT), "peer_closed"),
        (Fault.stall(after_bytes=30_000, direction=Direction.SERVER_TO_CLIENT), "timeout"),
    ],
    ids=["bitflip", "truncate", "drop", "stall"],
)
def test_network_faults_fail_fast_and_fall_back_to_recompute(
    sender: Worker, receiver: Worker, local_tokens: list[int], fault: Fault, reason: str
) -> None:
    host, port = sender.kv_address.rsplit(":", 1)
    request_id = f"fault-{fault.kind.value}"
    with FaultProxy((host, int(port))) as proxy:
        proxy.set_fault(fault)
        prefill(sender, request_id)
        started = time.monotonic()
        events = pull(receiver, request_id, f"{proxy.address[0]}:{proxy.address[1]}", server=sender.kv_address)
        (failure,) = failures(events)
        assert failure["reason"] == reason, failure
        assert failure["received_at"] - started < FAST_FAIL.transfer_timeout + 1
        assert failure["fallback"] == "recompute"
        assert token_ids(events) == local_tokens  # corrupted KV never reached the cache
    failed = receiver.service.connector.metrics.failed.labels("receive", reason)._value.get()
    assert failed >= 1, f"no receive failure counted for {reason}"


def test_a_slow_link_only_delays_the_transfer(sender: Worker, receiver: Worker, local_tokens: list[int]) -> None:
    host, port = sender.kv_address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        proxy.set_fault(Fault.delay(0.05))
        prefill(sender, "delayed")
        events = pull(
            receiver, "delayed", f"{proxy.address[0]}:{proxy.address[1]}", on_failure="fail", server=sender.kv_address
        )
    assert events[0]["event"] == "kv_received" and not failures(events)
    assert token_ids(events) == local_tokens


def test_a_kv_server_off_loopback_requires_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        TransferConfig(host="0.0.0.0")
    assert TransferConfig(host="0.0.0.0", secret="s").host == "0.0.0.0"


def _slow_pull(sender: Worker, receiver: Worker, request_id: str, proxy: FaultProxy) -> str:
    prompt = long_prompt()[:4000]
    prefill(sender, request_id, prompt)
    proxy.set_fault(Fault.rate(4_000_000, direction=Direction.SERVER_TO_CLIENT))  # ~40 MB take ~10 s
    receiver.generate(
        request_id, prompt, PARAMS,
        kv={"mode": "pull", "address": f"{proxy.address[0]}:{proxy.address[1]}", "on_failure": "fail",
            "server": sender.kv_address},
    )
    time.sleep(0.5)
    return prompt


def test_abort_on_the_receiver_ends_the_transfer_on_both_sides(sender: Worker, receiver: Worker) -> None:
    host, port = sender.kv_address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        _slow_pull(sender, receiver, "abort-receiver", proxy)
        started = time.monotonic()
        assert receiver.abort("abort-receiver")
        events = receiver.wait_finished("abort-receiver", timeout=5)
        assert failures(events)[0]["reason"] == "aborted", events
        assert time.monotonic() - started < 2
        assert is_idle(sender.wait_idle(timeout=FAST_FAIL.io_timeout + 2)), sender.debug()


def test_abort_on_the_sender_ends_the_transfer_on_both_sides(sender: Worker, receiver: Worker) -> None:
    host, port = sender.kv_address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        _slow_pull(sender, receiver, "abort-sender", proxy)
        started = time.monotonic()
        sender.abort("abort-sender")
        assert is_idle(sender.wait_idle(timeout=3)), sender.debug()
        events = receiver.wait_finished("abort-sender", timeout=FAST_FAIL.transfer_timeout)
        # The sender resets the connection: the receiver sees the abort or the reset, at once.
        assert failures(events)[0]["reason"] in ("aborted", "peer_closed"), events
        assert time.monotonic() - started < 3


def test_pulls_must_prove_the_shared_secret(sender: Worker, receiver: Worker) -> None:
    prefill(sender, "auth")
    layout = receiver.engine.kv_pool.layout

    def never(*_args: object) -> list[int]:
        raise AssertionError("no KV may be reserved without the secret")

    target = PullTarget(reserve=never, write=never, commit=never, cancel=lambda: None)
    for secret in (None, "wrong secret"):
        config = TransferConfig(secret=secret, io_timeout=2, transfer_timeout=4)
        connector = connector_class("tcp")(config, layout)
        with pytest.raises(TransferError) as failure:
            connector.pull(sender.kv_address, "auth", target)
        assert failure.value.reason is FailureReason.AUTH
        connector.close()
    # The failed attempts did not consume the offer: the right secret still gets it.
    events = pull(receiver, "auth", sender.kv_address, on_failure="fail")
    assert events[0]["event"] == "kv_received"


def test_a_proof_relayed_through_another_server_is_refused(sender: Worker, receiver: Worker) -> None:
    """The receiver's proof names the server it dialed. A rogue server that passes the receiver's
    proof on to the real one (here: a proxy the receiver took for the server) gets AUTH, and the
    offer stays for its rightful receiver."""
    prefill(sender, "relayed")
    host, port = sender.kv_address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as rogue:
        events = pull(receiver, "relayed", f"{rogue.address[0]}:{rogue.address[1]}", on_failure="fail")
    assert [(f["reason"], f["fallback"]) for f in failures(events)] == [("auth", "fail")], events
    events = pull(receiver, "relayed", sender.kv_address, on_failure="fail")
    assert events[0]["event"] == "kv_received"


def test_transfer_threads_are_pooled_and_bounded(sender: Worker, receiver: Worker) -> None:
    for prefix in ("kv-send", "kv-pull"):
        threads = [t for t in threading.enumerate() if t.name.startswith(prefix)]
        assert len(threads) <= 2 * FAST_FAIL.max_concurrent_transfers, threads


def test_header_round_trips_through_json(sender: Worker) -> None:
    prefilled = prefill(sender, "header")
    held = sender.engine.held_kv("header")
    assert held is not None
    assert HandoffHeader.from_json(held.header.to_json()) == held.header
    assert prefilled["first_tokens"][0]["token_id"] == held.header.first_tokens[0].token_id
    assert sender.service.connector.withdraw("header")


def test_an_unauthenticated_peer_cannot_make_the_server_wait_for_a_huge_frame(sender: Worker) -> None:
    """A PULL announcing a 4 GiB body, from a peer that proved nothing yet: the KV server refuses
    it from the frame header alone (an ERROR frame, then it closes), instead of allocating the
    body and waiting for it until the I/O timeout."""
    import json
    import socket

    from pdserve.transfer import wire

    host, port = str(sender.service.connector.address).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as peer:
        hello = wire.recv_frame(peer, wire.Deadline(5.0, 5.0))
        assert hello.kind is wire.Kind.HELLO
        meta = json.dumps({"kv_cache_id": "anything"}).encode()
        peer.sendall(wire._HEADER.pack(wire.MAGIC, wire.WIRE_VERSION, int(wire.Kind.PULL), len(meta), (1 << 32) - 1)
                     + meta)
        peer.settimeout(1.5)  # far below the server's I/O timeout (2 s here): no waiting for the body
        with pytest.raises(TransferError, match="peer reported: implausible frame sizes"):  # its ERROR frame
            wire.recv_frame(peer, wire.Deadline(1.5, 1.5))
        try:  # and the server closed the connection (a reset: it left our header's bytes unread)
            closed = peer.recv(1) == b""
        except ConnectionResetError:
            closed = True
        assert closed
