"""``pdserve serve``: router + workers on this machine, one command (the embedded default).

Disaggregated by default: one prefill and one decode worker, one core each, KV moved through
shared memory (``--kv-backend tcp``: over loopback, as across hosts, optionally compressed with
``--kv-codec``), the decode worker's pull starting as the prefill starts (``--no-kv-pipeline``:
after it). ``--colocated`` runs ``both`` workers instead (the monolithic baseline).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import time

import uvicorn

from pdserve.engine.cpu_features import cpu_features
from pdserve.engine.loader import resolve_model_path
from pdserve.engine.shm_segments import remove_stale_segments
from pdserve.logs import configure_logging
from pdserve.serving.cli_args import router_config_from_args
from pdserve.serving.role_formats import role_format
from pdserve.serving.router import create_router_app
from pdserve.serving.supervisor import ProcessGroup


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_serve(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"[serve {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.monotonic()
    configure_logging("router", args.log_level, json_lines=not args.plain_logs)
    try:
        router_config_from_args(args)  # bad options fail now, before any worker starts
        if args.kv_codec not in ("none", "auto") and args.kv_backend == "shm":
            raise ValueError(f"--kv-codec {args.kv_codec} needs --kv-backend tcp: shm copies raw KV, no codec")
    except ValueError as error:
        log(f"error: {error}")
        return 2
    stale = remove_stale_segments()  # KV pools a killed process group left in /dev/shm
    if stale:
        log(f"removed {len(stale)} shared-memory KV pool(s) of dead processes: {', '.join(stale)}")
    model = str(resolve_model_path(args.model, show_progress=True))  # fetch once, before any worker
    cores = sorted(os.sched_getaffinity(0))
    roles = ["both"] * args.workers if args.colocated else ["prefill"] * args.prefill + ["decode"] * args.decode
    # Each pool on the kernels that suit its phase (role_formats.py).
    role_flags = {"prefill": args.prefill_weight_format, "decode": args.decode_weight_format, "both": "auto"}
    formats = {role: role_format(role, role_flags[role], args.weight_format, cpu_features()) for role in set(roles)}
    # Per-run secrets, unless given: the workers' API and KV server then serve only the router
    # and each other, not every local process (docs/security.md).
    env = {
        **os.environ,
        "PDSERVE_INTERNAL_SECRET": os.environ.get("PDSERVE_INTERNAL_SECRET") or secrets.token_urlsafe(32),
        "PDSERVE_KV_SECRET": os.environ.get("PDSERVE_KV_SECRET") or secrets.token_urlsafe(32),
    }
    group = ProcessGroup(log, secret=env["PDSERVE_INTERNAL_SECRET"])
    urls: dict[str, list[str]] = {"prefill": [], "decode": [], "both": []}
    try:
        for index, role in enumerate(roles):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cpus = str(cores[index % len(cores)]) if len(roles) > 1 else f"{cores[0]}-{cores[-1]}"
            argv = worker_argv(args, role, port, cpus, model, formats[role].weight_format)
            group.spawn(f"{role} worker {index}", url, argv, env)
            urls[role].append(url)
            log(f"starting {role} worker on core(s) {cpus}, weights {formats[role].weight_format} "
                f"({formats[role].why})")
        group.wait_healthy(args.ready_timeout, log)
        group.watch()
        config = router_config_from_args(
            args, prefill=tuple(urls["prefill"]), decode=tuple(urls["decode"]), both=tuple(urls["both"]),
            kv_backend=args.kv_backend, worker_secret=env["PDSERVE_INTERNAL_SECRET"],
        )
        app = create_router_app(config)
        base = f"http://{args.host}:{args.port}"
        log(f"ready in {time.monotonic() - started:.1f} s: {base}/v1 "
            f"({'colocated' if args.colocated else 'disaggregated'})")
        print(_usage(base, config.api_keys[0].key if config.api_keys else None), file=sys.stderr, flush=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _exit_cleanly)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C / SIGTERM, re-raised by uvicorn after it stopped
        return 0
    except RuntimeError as error:
        log(f"error: {error}")
        return 1
    finally:
        log("stopping workers")
        group.stop()


def worker_argv(args: argparse.Namespace, role: str, port: int, cpus: str, model: str, weight_format: str) -> list[str]:
    """The command line of one of serve's workers (after the Python executable)."""
    return [
        "-m", "pdserve.cli", "worker", "--role", role, "--port", str(port), "--cpus", cpus,
        "--model", model, "--dtype", args.dtype, "--weight-format", weight_format,
        "--attention", args.attention,
        "--large-batch-float32" if args.large_batch_float32 else "--no-large-batch-float32",
        "--kv-backend", args.kv_backend, "--kv-codec", args.kv_codec,
        "--kv-memory-mb", str(args.kv_memory_mb), "--exit-with-parent",
        "--log-level", args.log_level, *(["--plain-logs"] if args.plain_logs else []),
    ]


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _usage(base: str, api_key: str | None) -> str:
    key = api_key or "none"
    return f"""
  curl {base}/v1/completions -H 'Content-Type: application/json' -H 'Authorization: Bearer {key}' \\
       -d '{{"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 16}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  print(client.chat.completions.create(model=client.models.list().data[0].id,
        messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)
"""
