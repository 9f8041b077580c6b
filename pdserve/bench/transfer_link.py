"""Pipelining over a rate-limited link: two engine processes on either side of a veth pair.

The sender runs in a network namespace of its own, joined to the host by a veth pair whose
sender side is shaped with ``tc tbf`` (needs root, as ``ip netns`` does). The rate is chosen so
that an unpipelined transfer of the prompt's KV takes about half the prompt's prefill time;
then the same prompt is sent unpipelined and pipelined, and the transfer time still visible
after the prefill ends is compared. Each process is pinned to one core.
"""

from __future__ import annotations

import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.runtime.engine_client import EngineProcess
from pdserve.runtime.engine_process import EngineProcessConfig
from pdserve.transfer.config import TransferConfig

NAMESPACE = "pdserve-bench"
HOST_DEVICE, NS_DEVICE = "pdsb-host", "pdsb-ns"
HOST_IP, NS_IP = "10.77.0.2", "10.77.0.1"
_SECRET = "pdserve-bench-link"
_MIN_TOKEN_ID = 1000


@dataclass(frozen=True)
class LinkResult:
    prompt_tokens: int
    kv_bytes: int
    rate_mbit: float
    prefill_seconds: float
    """Median prefill time without any transfer running."""
    unpipelined_visible_seconds: float
    pipelined_visible_seconds: float
    pipelined_prefill_seconds: float
    """Median prefill time while the KV streams out layer by layer."""

    @property
    def pipelined_fraction(self) -> float:
        return self.pipelined_visible_seconds / self.unpipelined_visible_seconds


def link_available() -> str | None:
    """None if this machine can run the experiment, else why not."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"{NAMESPACE}-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{NAMESPACE}-probe"], capture_output=True)
    return None


@contextmanager
def shaped_link(rate_mbit: float | None) -> Iterator[Callable[[float], None]]:
    """A namespace with the sender's end of a veth pair; yields a function that sets its rate."""
    _teardown()
    commands = [
        ["ip", "netns", "add", NAMESPACE],
        ["ip", "link", "add", HOST_DEVICE, "type", "veth", "peer", "name", NS_DEVICE],
        ["ip", "link", "set", NS_DEVICE, "netns", NAMESPACE],
        ["ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_DEVICE],
        ["ip", "link", "set", HOST_DEVICE, "up"],
        ["ip", "netns", "exec", NAMESPACE, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_DEVICE],
        ["ip", "netns", "exec", NAMESPACE, "ip", "link", "set", NS_DEVICE, "up"],
        ["ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)

        def set_rate(mbit: float) -> None:
            # Shape what leaves the sender's namespace: the KV stream's direction.
            subprocess.run(
                ["ip", "netns", "exec", NAMESPACE, "tc", "qdisc", "replace", "dev", NS_DEVICE, "root",
                 "tbf", "rate", f"{mbit:.1f}mbit", "burst", "256kb", "latency", "100ms"],
                check=True, capture_output=True,
            )

        if rate_mbit is not None:
            set_rate(rate_mbit)
        yield set_rate
    finally:
        _teardown()


def _teardown() -> None:
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
    subprocess.run(["ip", "link", "del", HOST_DEVICE], capture_output=True)


def measure_link(
    model_path: str | None, vocab_size: int, prompt_tokens: int, repeats: int, log: Callable[[str], None]
) -> LinkResult:
    transfer = TransferConfig(transfer_timeout=300, io_timeout=60, secret=_SECRET)
    engine = EngineConfig(
        model=ModelConfig(path=model_path, dtype="float32", num_threads=1),
        cache=CacheConfig(memory_bytes=768 << 20, allocator="heap"),
        show_progress=False,
    )
    rng = random.Random(1)
    with shaped_link(None) as set_rate:
        sender = EngineProcess(
            EngineProcessConfig(engine, TransferConfig(**{**transfer.__dict__, "host": NS_IP}), control_host=NS_IP),
            command_prefix=["ip", "netns", "exec", NAMESPACE, "taskset", "-c", "0"],
        ).launch()
        receiver = EngineProcess(EngineProcessConfig(engine, transfer), command_prefix=["taskset", "-c", "1"]).launch()
        try:
            sender.wait_ready(300)
            receiver.wait_ready(300)
            def prompt() -> list[int]:
                return [rng.randrange(_MIN_TOKEN_ID, vocab_size) for _ in range(prompt_tokens)]

            log(f"link: measuring the prefill of {prompt_tokens} tokens (no transfer)")
            prefill = [_prefill_only(sender, f"calibrate-{i}", prompt()) for i in range(repeats + 1)][1:]
            prefill_seconds = statistics.median(t for t, _ in prefill)
            kv_bytes = prefill[0][1]
            rate_mbit = kv_bytes * 8 / 1e6 / (prefill_seconds / 2)
            set_rate(rate_mbit)
            log(f"link: prefill {prefill_seconds:.2f} s, KV {kv_bytes / 1e6:.1f} MB -> tbf rate {rate_mbit:.0f} Mbit/s")
            unpipelined, pipelined, pipelined_prefill = [], [], []
            for rep in range(repeats):
                visible, _ = _transfer(sender, receiver, f"plain-{rep}", prompt(), pipelined=False)
                unpipelined.append(visible)
                visible, prefill_time = _transfer(sender, receiver, f"piped-{rep}", prompt(), pipelined=True)
                pipelined.append(visible)
                pipelined_prefill.append(prefill_time)
                log(f"link: repetition {rep + 1}: unpipelined {unpipelined[-1]:.2f} s, "
                    f"pipelined {visible:.2f} s visible")
        finally:
            sender.stop()
            receiver.stop()
    return LinkResult(
        prompt_tokens, kv_bytes, rate_mbit, prefill_seconds, statistics.median(unpipelined),
        statistics.median(pipelined), statistics.median(pipelined_prefill),
    )


def _prefill_only(sender: EngineProcess, request_id: str, prompt: list[int]) -> tuple[float, int]:
    """(prefill seconds, KV bytes) of a prompt nobody pulls."""
    submitted = time.monotonic()
    sender.generate(request_id, prompt, {"max_tokens": 1}, kv={"mode": "offer"})
    (prefilled,) = sender.wait_finished(request_id, timeout=300)
    sender.abort(request_id)  # frees the held KV at once instead of at lease expiry
    return prefilled["time"] - submitted, int(prefilled["kv_bytes"])


def _transfer(
    sender: EngineProcess, receiver: EngineProcess, request_id: str, prompt: list[int], pipelined: bool
) -> tuple[float, float]:
    """(visible transfer seconds, prefill seconds) of one prompt."""
    params = {"max_tokens": 1}
    pull = {"mode": "pull", "address": sender.kv_address, "backend": "tcp", "on_failure": "fail"}
    submitted = time.monotonic()
    sender.generate(request_id, prompt, params, kv={"mode": "offer", "pipelined": pipelined})
    if pipelined:
        receiver.generate(request_id, prompt, params, kv=pull)
    (prefilled,) = sender.wait_finished(request_id, timeout=300)
    if not pipelined:
        receiver.generate(request_id, prompt, params, kv=pull)
    received = receiver.next_event(request_id, timeout=300)
    if received["event"] != "kv_received":
        raise RuntimeError(f"transfer failed: {received}")
    receiver.wait_finished(request_id, timeout=60)
    return received["time"] - prefilled["time"], prefilled["time"] - submitted
