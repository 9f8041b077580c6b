"""The transfer's share of prefill time, with and without layer-by-layer pipelining.

Two in-process workers share one loaded checkpoint and the machine's cores, as two processes
on the same host would. For each prompt length and backend, the sender prefills a prompt of
random token ids (fresh each repetition, so the prefix cache never helps) and the receiver pulls
its KV: after the prefill ended (unpipelined), or from the start (pipelined). What the user
waits for is the *visible* transfer time: from the end of the prefill to the KV in the
receiver's cache. The prefill time itself is reported too, to show what sending during prefill
costs it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.config import CacheConfig
from pdserve.engine.loader import Checkpoint
from pdserve.runtime.inprocess import InProcessWorker
from pdserve.transfer.config import TransferConfig

_MIN_TOKEN_ID = 1000
"""Random prompts draw ids above the special tokens at the start of the vocabulary."""


@dataclass(frozen=True)
class PrefillShareRow:
    prompt_tokens: int
    backend: str
    pipelined: bool
    prefill_seconds: float
    """Median, from submitting the prefill to its end (the first token sampled, the KV held)."""
    visible_transfer_seconds: float
    """Median, from the end of the prefill to the KV being in the receiver's cache."""
    kv_bytes: int

    @property
    def share_of_prefill(self) -> float:
        return self.visible_transfer_seconds / self.prefill_seconds


def measure_prefill_share(
    checkpoint: Checkpoint,
    prompt_lengths: list[int],
    backends: list[str],
    repeats: int,
    log: Callable[[str], None],
    transfer: TransferConfig | None = None,
) -> list[PrefillShareRow]:
    transfer = transfer or TransferConfig(transfer_timeout=120, io_timeout=30)
    cache = CacheConfig(memory_bytes=512 << 20)
    sender = InProcessWorker(checkpoint, transfer, CacheConfig(memory_bytes=512 << 20, allocator="shm"))
    receiver = InProcessWorker(checkpoint, transfer, cache)
    rng = random.Random(0)
    vocab = checkpoint.architecture.vocab_size
    rows = []
    try:
        for length in prompt_lengths:
            for backend in backends:
                for pipelined in (False, True):
                    prefill_times, visible = [], []
                    kv_bytes = 0
                    for rep in range(repeats + 1):  # the first is a warm-up
                        prompt = [rng.randrange(_MIN_TOKEN_ID, vocab) for _ in range(length)]
                        request_id = f"{length}-{backend}-{pipelined}-{rep}"
                        prefill, transfer_time, kv_bytes = _one(
                            sender, receiver, request_id, prompt, backend, pipelined
                        )
                        if rep:
                            prefill_times.append(prefill)
                            visible.append(transfer_time)
                    row = PrefillShareRow(
                        length, backend, pipelined, statistics.median(prefill_times),
                        statistics.median(visible), kv_bytes,
                    )
                    log(
                        f"prefill share: {length} tokens, {backend}{' pipelined' if pipelined else ''}: "
                        f"prefill {row.prefill_seconds * 1e3:.0f} ms, visible transfer "
                        f"{row.visible_transfer_seconds * 1e3:.1f} ms ({row.share_of_prefill:.1%})"
                    )
                    rows.append(row)
    finally:
        sender.close()
        receiver.close()
    return rows


def _one(
    sender: InProcessWorker, receiver: InProcessWorker, request_id: str, prompt: list[int],
    backend: str, pipelined: bool,
) -> tuple[float, float, int]:
    params = {"max_tokens": 1}
    pull = {"mode": "pull", "address": sender.kv_address, "backend": backend, "on_failure": "fail"}
    sender.generate(request_id, prompt, params, kv={"mode": "offer", "pipelined": pipelined})
    submitted = time.monotonic()
    if pipelined:
        receiver.generate(request_id, prompt, params, kv=pull)
    (prefilled,) = sender.wait_finished(request_id)
    if prefilled["event"] != "prefilled":
        raise RuntimeError(f"prefill failed: {prefilled}")
    if not pipelined:
        receiver.generate(request_id, prompt, params, kv=pull)
    received = receiver.next_event(request_id, timeout=120)
    if received["event"] != "kv_received":
        raise RuntimeError(f"transfer failed: {received}")
    receiver.wait_finished(request_id)
    return (
        prefilled["time"] - submitted,
        max(0.0, received["time"] - prefilled["time"]),
        int(received["num_bytes"]),
    )
