"""The engine as a service: control ops in, events out, KV offered and pulled on the side.

``EngineService`` owns an :class:`EngineLoop` (the engine, built and stepped on a thread of its
own) and a KV connector.
Its ``handle`` turns the ops of :mod:`pdserve.runtime.protocol` into engine calls; engine
outputs and transfer outcomes become events in ``events`` (with a pipe to wake a poller). The
engine process serves it over ZeroMQ, a serving worker over HTTP, tests in-process.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.handoff import HandoffHeader, IncompatibleHandoffError, sampled_token_to_json
from pdserve.engine.kv_cache import KVLayout
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.runtime.engine_loop import EngineLoop
from pdserve.runtime.protocol import output_to_json, params_from_json
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import KVConnector, PullTarget, connector_class
from pdserve.transfer.errors import TransferError

log = logging.getLogger(__name__)


class EngineKVSource:
    """The engine's pool as the KV server reads it (held blocks only, from any thread)."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine

    @property
    def layout(self) -> KVLayout:
        return self._engine.kv_pool.layout

    @property
    def shm_name(self) -> str | None:
        return self._engine.kv_pool.shm_name

    def read_layers(
        self, block_table: list[int], start: int, end: int, layers: Sequence[int]
    ) -> Iterator[torch.Tensor]:
        return self._engine.kv_pool.read_layers(block_table, start, end, layers)


@dataclass
class _Pull:
    target: PullTarget
    done: threading.Event


class EngineService:
    """Owns the engine loop and the connector; turns control ops into engine calls."""

    def __init__(self, build_engine: Callable[[], LLMEngine], transfer: TransferConfig) -> None:
        """Builds the engine with ``build_engine`` on the loop's thread (see engine_loop.py for
        why) and waits for it: this is where a worker spends its model loading."""
        self.events: queue.SimpleQueue[tuple[bytes, dict[str, Any]]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        self._clients: dict[str, bytes] = {}
        """request_id -> the client identity its events go to."""
        self._offered: set[str] = set()
        self._pulls: dict[str, _Pull] = {}
        self._lock = threading.Lock()
        self.loop = EngineLoop(build_engine, self._on_output)
        try:
            self.engine = engine = self.loop.start()
        except BaseException:  # a model that cannot be loaded: leave no descriptor behind
            os.close(self._wake_read)
            os.close(self._wake_write)
            raise
        self.transfer = transfer
        try:
            self.connector: KVConnector = connector_class(transfer.backend)(
                transfer, engine.kv_pool.layout, source=EngineKVSource(engine), release=self._release
            )
        except BaseException:
            self.loop.stop()
            engine.close()
            raise
        self._receivers: dict[str, KVConnector] = {transfer.backend: self.connector}
        """Connectors for pulls, by backend name: a pull may ask for another than the default."""
        # Reused threads (a new thread's first torch op costs ~10 ms of OpenMP set-up).
        self._pullers = ThreadPoolExecutor(transfer.max_concurrent_transfers, thread_name_prefix="kv-pull")

    @property
    def wake_fd(self) -> int:
        return self._wake_read

    def start(self) -> str:
        """Start serving KV; returns the connector's address (the engine loop already runs)."""
        return self.connector.start()

    def close(self) -> None:
        with self._lock:
            pulls = list(self._pulls.values())
        for pull in pulls:
            pull.target.abort()
        for pull in pulls:
            pull.done.wait(timeout=5)
        self._pullers.shutdown(wait=True, cancel_futures=True)
        for receiver in self._receivers.values():
            receiver.close()
        self.loop.stop()
        self.engine.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- ops (main thread) -----------------------------------------------------------------

    def handle(self, client: bytes, message: dict[str, Any]) -> dict[str, Any] | None:
        """Run one op; returns the reply's payload (``None`` for shutdown)."""
        op = message.get("op")
        if op == "generate":
            return self._generate(client, message)
        if op == "abort":
            return {"aborted": self._abort(str(message["request_id"]))}
        if op == "stats":
            return asdict(self.loop.call(lambda e: e.stats()).result(timeout=30))
        if op == "debug":
            return self._debug()
        if op == "metrics":
            from prometheus_client import generate_latest

            return {"text": generate_latest(self.connector.metrics.registry).decode()}
        raise ValueError(f"unknown op {op!r}")

    def _generate(self, client: bytes, message: dict[str, Any]) -> dict[str, Any]:
        request_id = str(message["request_id"])
        params = params_from_json(message.get("params"))
        prompt = self._prompt(message)
        kv = message.get("kv") or {}
        mode = kv.get("mode", "local")
        cache_salt = message.get("cache_salt")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError("cache_salt must be a string")
        resume = message.get("resume") or []
        if resume and mode != "local":
            raise ValueError("resume needs kv mode local: the resumed tokens are prefilled here")
        with self._lock:
            if request_id in self._clients:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._clients[request_id] = client
        try:
            if mode == "local":
                self.loop.call(
                    lambda e: e.add_request(prompt, params, request_id, cache_salt=cache_salt, resume=resume)
                ).result(timeout=30)
            elif mode == "offer":
                self._offer(
                    request_id, prompt, params, bool(kv.get("pipelined", False)), bool(kv.get("announce", False)),
                    cache_salt,
                )
            elif mode == "pull":
                self._start_pull(request_id, prompt, params, kv, cache_salt)
            else:
                raise ValueError(f"unknown kv mode {mode!r} (local, offer or pull)")
        except BaseException:
            with self._lock:
                self._clients.pop(request_id, None)
            raise
        log.info("admitted", extra={
            "request_id": request_id, "mode": mode, "max_tokens": params.max_tokens,
            "prompt_tokens": len(prompt) if isinstance(prompt, list) else None, "resumed_tokens": len(resume),
        })
        return {"request_id": request_id}

    def _prompt(self, message: dict[str, Any]) -> str | list[int]:
        """``prompt`` (text or token ids) or ``messages`` (chat, rendered with the model's template)."""
        if "messages" in message:
            return self.engine.tokenizer.chat_prompt_ids(message["messages"])
        prompt = message["prompt"]
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            raise ValueError("prompt must be a string or a list of token ids")
        return prompt

    def _offer(
        self, request_id: str, prompt: Any, params: SamplingParams, pipelined: bool, announce: bool,
        cache_salt: str | None,
    ) -> None:
        """Prefill with the KV held and offered. ``pipelined``: capture each layer's KV as it is
        computed, for a receiver already connected. ``announce``: emit an ``offered`` event when
        the prefill starts computing, so that the router can start the decode worker's pull
        then (not at admission: a pull started while the prompt waits in this worker's queue
        would spend its transfer deadline there)."""
        connector = self.connector
        announced = False

        def hook(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
            nonlocal announced
            if announce and not announced:  # layer 0 of the first chunk: the prefill has started
                announced = True
                self._emit(request_id, {
                    "event": "offered", "request_id": request_id, "kv_cache_id": request_id,
                    "kv_address": self.transfer.advertise or connector.address, "pipelined": pipelined,
                })
            if pipelined:
                connector.publish_layer(request_id, layer, start, k, v)

        def admit(engine: LLMEngine) -> None:
            engine.add_request(
                prompt, params, request_id, prefill_only=True, hold_kv=True,
                kv_hook=hook if pipelined or announce else None, cache_salt=cache_salt,
            )
            connector.offer(request_id, engine.handoff_header(request_id), pipelined)
            # Marked on the engine thread, before any step can finish the prefill.
            with self._lock:
                self._offered.add(request_id)

        self.loop.call(admit).result(timeout=30)

    def _start_pull(
        self, request_id: str, prompt: Any, params: SamplingParams, kv: dict[str, Any], cache_salt: str | None
    ) -> None:
        prompt_ids = self.engine.check_request(prompt, params)  # bad input fails now, not after a transfer
        address, kv_cache_id = str(kv["address"]), str(kv.get("kv_cache_id", request_id))
        server = str(kv["server"]) if kv.get("server") else None
        receiver = self._receiver(str(kv.get("backend") or self.transfer.backend))
        on_failure = kv.get("on_failure", "recompute")
        if on_failure not in ("recompute", "fail"):
            raise ValueError(f"on_failure must be 'recompute' or 'fail', got {on_failure!r}")
        loop, engine = self.loop, self.engine

        def reserve(header: HandoffHeader) -> list[int]:
            if list(header.prompt_token_ids) != prompt_ids:
                # A redeemed two-phase prefill made for another prompt, or a peer that swapped the
                # prompt: its KV would be garbage here (and the output another request's).
                raise IncompatibleHandoffError("the offered KV was computed for a different prompt")
            return loop.call(lambda e: e.reserve_kv(header, params, request_id, cache_salt=cache_salt)).result(
                timeout=30
            )

        def write(table: list[int], layer: int, start: int, data: torch.Tensor) -> None:
            engine.runner.write_kv(table, data.unsqueeze(0), start=start, layers=slice(layer, layer + 1))

        def commit(first_tokens: list[SampledToken]) -> None:
            # Announced before the engine can emit the request's first output.
            seconds = time.monotonic() - started
            self._emit(request_id, {
                "event": "kv_received", "request_id": request_id,
                "num_bytes": target.received_bytes, "seconds": seconds, "codec": target.received_codec,
            })
            log.info("KV received", extra={
                "request_id": request_id, "bytes": target.received_bytes, "seconds": round(seconds, 4),
                "codec": target.received_codec,
            })
            loop.call(lambda e: e.commit_kv(request_id, first_tokens)).result(timeout=30)

        def cancel() -> None:
            loop.call(lambda e: e.abort(request_id, report=False)).result(timeout=30)

        target = PullTarget(reserve, write, commit, cancel, pool=engine.kv_pool.tensor)

        started = time.monotonic()

        def run() -> None:
            try:
                receiver.pull(address, kv_cache_id, target, kv.get("codec"), server)
            except TransferError as error:
                self._pull_failed(request_id, prompt, params, error, on_failure, target.aborted, cache_salt)
            finally:
                with self._lock:
                    self._pulls.pop(request_id, None)
                pull.done.set()

        pull = _Pull(target, threading.Event())
        with self._lock:
            self._pulls[request_id] = pull
        self._pullers.submit(run)

    def _receiver(self, backend: str) -> KVConnector:
        with self._lock:
            receiver = self._receivers.get(backend)
            if receiver is None:
                # One set of metrics for every backend: /metrics counts each pull, whichever it used.
                receiver = connector_class(backend)(
                    self.transfer, self.engine.kv_pool.layout, metrics=self.connector.metrics
                )
                self._receivers[backend] = receiver
            return receiver

    def _pull_failed(
        self, request_id: str, prompt: Any, params: SamplingParams, error: TransferError,
        on_failure: str, aborted: bool, cache_salt: str | None,
    ) -> None:
        fallback = "fail" if aborted else on_failure
        log.warning("KV pull failed (%s): %s; fallback: %s", error.reason.value, error.detail, fallback,
                    extra={"request_id": request_id, "reason": error.reason.value})
        self._emit(request_id, {
            "event": "kv_failed", "request_id": request_id, "reason": error.reason.value,
            "message": error.detail, "fallback": fallback,
        })
        if fallback == "recompute":
            try:
                self.loop.call(
                    lambda e: e.add_request(prompt, params, request_id, cache_salt=cache_salt)
                ).result(timeout=30)
                return
            except Exception as admit_error:
                log.warning("recompute failed: %s", admit_error, extra={"request_id": request_id})
                self._emit(request_id, {
                    "event": "error", "request_id": request_id, "status": 503,
                    "message": f"KV transfer failed ({error.reason.value}) and recomputing failed: {admit_error}",
                }, finished=True)
        with self._lock:
            self._clients.pop(request_id, None)

    def _abort(self, request_id: str) -> bool:
        with self._lock:
            pull = self._pulls.get(request_id)
        if pull is not None:
            # Stop the pull first and let its thread free the reservation: freeing it here
            # while that thread may still be writing into the blocks would corrupt their reuse.
            pull.target.abort()
            pull.done.wait(timeout=10)
        withdrawn = self.connector.withdraw(request_id)  # offered KV, held or still computing
        aborted = self.loop.call(lambda e: e.abort(request_id)).result(timeout=30)
        return bool(pull is not None or withdrawn or aborted)

    def _debug(self) -> dict[str, Any]:
        stats = self.loop.call(lambda e: e.stats()).result(timeout=30)
        process = psutil.Process()
        with self._lock:
            num_pulls, num_clients = len(self._pulls), len(self._clients)
        return {
            "pid": os.getpid(),
            "num_blocks": stats.num_blocks,
            "num_free_blocks": stats.num_free_blocks,
            "num_held_kv": stats.num_held_kv,
            "num_reserved_kv": stats.num_reserved_kv,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "num_offers": len(self.connector.offers),
            "num_pulls": num_pulls,
            "num_tracked_requests": num_clients,
            "open_fds": process.num_fds(),
            "threads": threading.active_count(),
            "children": len(process.children(recursive=True)),
            "shm_name": self.engine.kv_pool.shm_name,
        }

    # -- engine and transfer threads -------------------------------------------------------

    def _on_output(self, output: RequestOutput) -> None:
        request_id = output.request_id
        with self._lock:
            offered = request_id in self._offered
            if output.finished:
                self._offered.discard(request_id)
        if offered and output.finished:
            if output.held_kv is not None and output.error is None:
                self.connector.ready(request_id, output.held_kv)
                self._emit(request_id, {
                    "event": "prefilled", "request_id": request_id, "kv_cache_id": request_id,
                    "kv_address": self.transfer.advertise or self.connector.address,
                    "num_prompt_tokens": len(output.prompt_token_ids),
                    "num_cached_tokens": output.num_cached_tokens,
                    "kv_bytes": _kv_bytes(self.engine.kv_pool.layout, len(output.prompt_token_ids)),
                    "prompt_token_ids": list(output.prompt_token_ids),
                    "first_tokens": [sampled_token_to_json(t) for t in output.held_kv.header.first_tokens],
                }, finished=True)
                return
            self.connector.withdraw(request_id)  # aborted before its KV was held
        if output.error is not None:  # the engine ended this request alone: its client learns why
            self._emit(request_id, {"event": "error", "request_id": request_id, "status": output.error.status,
                                    "message": output.error.message}, finished=True)
            return
        self._emit(request_id, output_to_json(output, self.engine.tokenizer), finished=output.finished)

    def _release(self, kv_cache_id: str) -> None:
        self.loop.call(lambda e: e.release_kv(kv_cache_id))

    def _emit(self, request_id: str, event: dict[str, Any], finished: bool = False) -> None:
        with self._lock:
            client = self._clients.get(request_id)
            if finished or (event.get("event") == "kv_failed" and event.get("fallback") == "fail"):
                self._clients.pop(request_id, None)
        if client is None:
            return
        if finished:
            log.info("finished: %s", event.get("event"), extra={
                "request_id": request_id,
                "output_tokens": sum(len(o.get("token_ids", ())) for o in event.get("outputs", ())),
            })
        event["time"] = time.monotonic()  # when it happened (CLOCK_MONOTONIC is host-wide)
        self.events.put((client, event))
        os.write(self._wake_write, b"x")


def _kv_bytes(layout: KVLayout, num_tokens: int) -> int:
    """Uncompressed KV bytes of ``num_tokens`` positions."""
    return num_tokens * layout.bytes_per_block // layout.block_size


def warmed_up_engine(config: EngineConfig) -> LLMEngine:
    """The engine of ``config``, after one tiny request so that the first real one does not pay
    for lazy initialisation (an ``EngineService`` build function)."""
    engine = LLMEngine(config)
    started = time.monotonic()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), "warm-up")
    while engine.has_unfinished_requests():
        engine.step()
    log.info("warmed up in %.2f s", time.monotonic() - started)
    return engine
