"""Prefill in one engine process, decode in another: over tcp and shm, against the reference.

Also the faults that need a process to die: the receiver or the sender killed mid-transfer.
Each side's debug state (free blocks, held/reserved KV, open fds, threads, child processes)
must return to where it started, and shared-memory segments must not outlive their owner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hf_reference import reference_greedy

from pdserve.bench.prompt_set import CHAT_MESSAGES, TEXT_PROMPTS, long_prompt
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.loader import Checkpoint
from pdserve.runtime.engine_client import EngineProcess, EngineProcessError
from pdserve.runtime.engine_process import EngineProcessConfig
from pdserve.runtime.exit_status import describe_exit
from pdserve.runtime.inprocess import is_idle, token_ids, wait_until_idle
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.fault_proxy import Direction, Fault, FaultProxy

NEW_TOKENS = 24
REFERENCE_TOKENS = 48  # the parity tests' length: their cached reference outputs are reused
TIE_GAP = 1e-3
TRANSFER = TransferConfig(lease_ttl=5.0, io_timeout=3.0, transfer_timeout=20.0)
BASELINE_KEYS = ("open_fds", "children")
"""Back to their starting values after a fault (threads are pooled, so they may only grow to
the pool size: checked separately)."""


def process_config(allocator: str = "heap") -> EngineProcessConfig:
    return EngineProcessConfig(
        engine=EngineConfig(
            model=ModelConfig(dtype="float32", num_threads=1),
            cache=CacheConfig(memory_bytes=192 << 20, allocator=allocator),
            show_progress=False,
        ),
        transfer=TRANSFER,
    )


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[EngineProcess, EngineProcess]]:
    prefill = EngineProcess(process_config("shm")).launch()
    decode = EngineProcess(process_config()).launch()
    try:
        yield prefill.wait_ready(), decode.wait_ready()
    finally:
        prefill.stop()
        decode.stop()


@pytest.fixture(scope="module")
def prompts(checkpoint: Checkpoint) -> list[list[int]]:
    tokenizer = checkpoint.tokenizer
    ids = [tokenizer.encode(p) for p in TEXT_PROMPTS[:3]]
    chat = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True)
    ids.append(tokenizer.encode(chat, add_special_tokens=False))
    ids.append(tokenizer.encode(long_prompt()))
    return ids


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("pdserve-kv-")}


def assert_matches_reference(tokens: list[int], prompt: list[int], label: str) -> None:
    reference = reference_greedy(prompt, REFERENCE_TOKENS)
    for step, (got, want) in enumerate(zip(tokens, reference.token_ids[:NEW_TOKENS], strict=True)):
        if got != want:
            assert reference.top2_gaps[step] < TIE_GAP, f"{label}: diverges at step {step} ({got} != {want})"
            return


def run_disaggregated(
    prefill: EngineProcess, decode: EngineProcess, prompts: list[list[int]], tag: str, **kv: object
) -> list[list[int]]:
    params = {"max_tokens": NEW_TOKENS, "ignore_eos": True}
    ids = [f"{tag}-{n}" for n in range(len(prompts))]
    pipelined = bool(kv.pop("pipelined", False))
    for request_id, prompt in zip(ids, prompts, strict=True):
        prefill.generate(request_id, prompt, params, kv={"mode": "offer", "pipelined": pipelined})
        if pipelined:  # the decode side connects while the prefill still runs
            decode.generate(
                request_id, prompt, params,
                kv={"mode": "pull", "address": prefill.kv_address, "on_failure": "fail", **kv},
            )
    for request_id, prompt in zip(ids, prompts, strict=True):
        (prefilled,) = prefill.wait_finished(request_id)
        assert prefilled["event"] == "prefilled", prefilled
        if not pipelined:
            decode.generate(
                request_id, prompt, params,
                kv={"mode": "pull", "address": prefilled["kv_address"], "on_failure": "fail", **kv},
            )
    results = []
    for request_id in ids:
        events = decode.wait_finished(request_id)
        assert events[0]["event"] == "kv_received", events[0]
        assert events[-1]["num_cached_tokens"] == events[-1]["num_prompt_tokens"]
        results.append(token_ids(events))
    return results


@pytest.mark.parametrize(
    "transfer", [{"backend": "tcp"}, {"backend": "tcp", "pipelined": True}, {"backend": "shm"}],
    ids=["tcp", "tcp-pipelined", "shm"],
)
def test_disaggregated_greedy_equals_colocated_and_reference(
    workers: tuple[EngineProcess, EngineProcess], prompts: list[list[int]], transfer: dict
) -> None:
    prefill, decode = workers
    tag = "-".join(str(v) for v in transfer.values())
    outputs = run_disaggregated(prefill, decode, prompts, tag, **dict(transfer))
    params = {"max_tokens": NEW_TOKENS, "ignore_eos": True}
    for number, (tokens, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        decode.generate(f"{tag}-colocated-{number}", prompt, params)
        colocated = token_ids(decode.wait_finished(f"{tag}-colocated-{number}"))
        assert tokens == colocated, f"{tag}: prompt {number} differs from the colocated engine"
        assert_matches_reference(tokens, prompt, f"{tag} prompt {number}")
    for worker in workers:
        assert is_idle(wait_until_idle(worker.debug)), worker.debug()


def test_receiver_killed_mid_transfer_frees_the_sender(
    workers: tuple[EngineProcess, EngineProcess], prompts: list[list[int]]
) -> None:
    prefill, _ = workers
    baseline = wait_until_idle(prefill.debug)
    doomed = EngineProcess(process_config()).start()
    host, port = prefill.kv_address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        proxy.set_fault(Fault.rate(2_000_000, direction=Direction.SERVER_TO_CLIENT))
        prefill.generate("victim-receiver", prompts[-1], {"max_tokens": 4}, kv={"mode": "offer"})
        prefill.wait_finished("victim-receiver")
        doomed.generate(
            "victim-receiver", prompts[-1], {"max_tokens": 4},
            kv={"mode": "pull", "address": f"{proxy.address[0]}:{proxy.address[1]}"},
        )
        time.sleep(1.0)
        assert prefill.debug()["num_held_kv"] == 1, "the transfer should still be running"
        doomed.kill()
        state = wait_until_idle(prefill.debug, timeout=TRANSFER.io_timeout + 5)
    assert is_idle(state), state
    assert {k: state[k] for k in BASELINE_KEYS} == {k: baseline[k] for k in BASELINE_KEYS}
    assert state["threads"] <= baseline["threads"] + 2 * TRANSFER.max_concurrent_transfers


def test_sender_killed_mid_transfer_degrades_to_recompute(
    workers: tuple[EngineProcess, EngineProcess], prompts: list[list[int]]
) -> None:
    _, decode = workers
    baseline = wait_until_idle(decode.debug)
    segments_before = shm_segments()
    doomed = EngineProcess(process_config("shm")).start()
    doomed_segment = doomed.debug()["shm_name"]
    assert doomed_segment in shm_segments()
    host, port = doomed.kv_address.rsplit(":", 1)
    prompt = prompts[-1]
    try:
        with FaultProxy((host, int(port))) as proxy:
            proxy.set_fault(Fault.rate(2_000_000, direction=Direction.SERVER_TO_CLIENT))
            doomed.generate(
                "victim-sender", prompt, {"max_tokens": NEW_TOKENS, "ignore_eos": True}, kv={"mode": "offer"}
            )
            doomed.wait_finished("victim-sender")
            decode.generate(
                "victim-sender", prompt, {"max_tokens": NEW_TOKENS, "ignore_eos": True},
                kv={"mode": "pull", "address": f"{proxy.address[0]}:{proxy.address[1]}", "backend": "tcp"},
            )
            time.sleep(1.0)
            trackers = psutil.Process(doomed.pid).children()  # its resource tracker unlinks the pool
            doomed.kill()
            killed = time.monotonic()
            failure = decode.next_event("victim-sender", timeout=TRANSFER.transfer_timeout)
            noticed = time.monotonic()
            events = [failure, *decode.wait_finished("victim-sender", timeout=120)]
    finally:
        doomed.stop()
    assert failure["event"] == "kv_failed", failure
    assert failure["reason"] in ("peer_closed", "timeout"), failure
    assert noticed - killed < TRANSFER.io_timeout + 2, "the receiver waited too long for a dead sender"
    assert failure["fallback"] == "recompute"
    assert_matches_reference(token_ids(events), prompt, "recomputed after the sender died")
    state = wait_until_idle(decode.debug)
    assert is_idle(state), state
    assert {k: state[k] for k in BASELINE_KEYS} == {k: baseline[k] for k in BASELINE_KEYS}
    assert state["threads"] <= baseline["threads"] + 2 * TRANSFER.max_concurrent_transfers
    _, alive = psutil.wait_procs(trackers, timeout=30)
    assert not alive, f"the dead sender's resource tracker did not finish: {alive}"
    deadline = time.monotonic() + 5
    while doomed_segment in shm_segments() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shm_segments() <= segments_before, f"leaked: {shm_segments() - segments_before}"


def test_a_crashed_engine_process_names_the_signal_and_prints_its_stacks(capfd: pytest.CaptureFixture[str]) -> None:
    crashing = EngineProcess(process_config()).start()
    try:
        os.kill(crashing.pid, signal.SIGSEGV)  # what a fault in a native kernel raises
        with pytest.raises(EngineProcessError, match=r"died \(signal SIGSEGV\) while waiting for the reply to debug"):
            crashing.debug()
    finally:
        crashing.stop()
    crash_report = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in crash_report
    assert "engine_process.py" in crash_report, "no Python stack in the crash report"
    ended = subprocess.run([sys.executable, "-c", "raise SystemExit(3)"], check=False)
    assert describe_exit(ended.returncode) == "exit code 3"
