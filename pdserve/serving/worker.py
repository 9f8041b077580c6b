"""``pdserve worker``: one engine behind the internal HTTP API, in this process.

The worker pins itself to the cores it is given (``--cpus 0`` or ``--cpus 0-1``), sizes torch's
threads to match, loads the model, runs one warm-up request, starts its KV server, and only
then answers ``/health`` — so "healthy" means "ready to serve".
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal

import torch
import uvicorn

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.shm_segments import remove_stale_segments
from pdserve.logs import configure_logging
from pdserve.runtime.engine_process import die_with_parent
from pdserve.runtime.engine_service import EngineService, warmed_up_engine
from pdserve.serving.internal_auth import check_internal_secret
from pdserve.serving.worker_app import create_worker_app
from pdserve.transfer.config import TransferConfig


def parse_cpus(text: str) -> list[int]:
    """"0", "0,2" or "0-3" -> core ids."""
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(f"no cores in {text!r}")
    return cpus


def worker_config(args: argparse.Namespace, num_threads: int | None) -> tuple[EngineConfig, TransferConfig]:
    engine = EngineConfig(
        show_progress=not args.exit_with_parent,  # under `serve`, the supervisor reports progress
        model=ModelConfig(
            path=args.model, dtype=args.dtype, device=args.device, num_threads=num_threads,
            weight_format=args.weight_format, attention=args.attention,
            large_batch_float32=args.large_batch_float32,
        ),
        # A prefill pool in shared memory lets same-host decode workers copy KV straight out of it.
        cache=CacheConfig(memory_bytes=args.kv_memory_mb << 20, allocator="shm" if args.role != "decode" else "heap"),
    )
    transfer = TransferConfig(
        backend=args.kv_backend, codec=args.kv_codec, host=args.kv_host, port=args.kv_port, secret=args.kv_secret,
        lease_ttl=args.kv_lease_ttl, transfer_timeout=args.kv_timeout, io_timeout=args.kv_io_timeout,
        advertise=args.kv_advertise,
    )
    return engine, transfer


def run_worker(args: argparse.Namespace) -> int:
    if args.exit_with_parent:
        die_with_parent()
    # A crash in native code (a kernel, a mapping) then prints every thread's Python stack.
    faulthandler.enable()
    configure_logging(args.role, args.log_level, json_lines=not args.plain_logs)
    check_internal_secret(args.host, args.internal_secret)  # before minutes of model loading
    stale = remove_stale_segments()  # KV pools a killed process group left in /dev/shm
    if stale:
        logging.getLogger(__name__).warning("removed shared-memory KV pools of dead processes: %s", ", ".join(stale))
    num_threads = args.threads
    if args.cpus is not None:
        cpus = parse_cpus(args.cpus)
        os.sched_setaffinity(0, cpus)
        num_threads = num_threads or len(cpus)
    engine_config, transfer = worker_config(args, num_threads)
    service = EngineService(lambda: warmed_up_engine(engine_config), transfer)
    engine = service.engine
    service.start()
    app = create_worker_app(service, args.role, args.internal_secret)
    logging.getLogger(__name__).info(
        "ready: role %s, model %s, %d torch threads, KV server %s",
        args.role, engine.model_name, torch.get_num_threads(), service.connector.address,
    )
    # uvicorn re-raises the signal that stopped it once it has drained; exit through Python so
    # that the engine is closed (its shared-memory KV pool unlinked) rather than killed outright.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.drain_timeout)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    return 0


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)
