"""Command-line options of ``pdserve worker``, ``router`` and ``serve`` (no heavy imports here:
``pdserve --help`` must stay instant)."""

from __future__ import annotations

import argparse
import os

ROLES = ("prefill", "decode", "both")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=ROLES, default="both", help="what the router sends here (default: both)")
    parser.add_argument("--host", default="127.0.0.1", help="internal API address (default: loopback)")
    parser.add_argument("--port", type=int, default=8101, help="internal API port (default: 8101)")
    parser.add_argument("--cpus", default=None, help="cores to pin to, e.g. 0 or 0-1 (default: all)")
    parser.add_argument("--kv-memory-mb", type=int, default=512, help="KV cache budget in MiB (default: 512)")
    parser.add_argument("--kv-backend", choices=("tcp", "shm"), default="tcp",
                        help="how this worker pulls KV: shm on one host, tcp across hosts (default: tcp)")
    parser.add_argument("--kv-host", default="127.0.0.1", help="KV server address (off loopback needs --kv-secret)")
    parser.add_argument("--kv-port", type=int, default=0, help="KV server port (default: any free port)")
    parser.add_argument("--kv-secret", default=os.environ.get("PDSERVE_KV_SECRET"),
                        help="shared secret for KV pulls (default: $PDSERVE_KV_SECRET)")
    parser.add_argument("--kv-lease-ttl", type=float, default=10.0, help="seconds offered KV waits to be pulled")
    parser.add_argument("--kv-timeout", type=float, default=30.0, help="deadline of one KV transfer, seconds")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let running requests finish before exiting")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies (used by serve)")


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="API address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default: 8000)")
    parser.add_argument("--prefill", nargs="*", default=[], metavar="URL", help="prefill workers' internal URLs")
    parser.add_argument("--decode", nargs="*", default=[], metavar="URL", help="decode workers' internal URLs")
    parser.add_argument("--both", nargs="*", default=[], metavar="URL", help="colocated workers' internal URLs")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY, else open)")
    parser.add_argument("--kv-backend", choices=("tcp", "shm"), default=None,
                        help="tell decode workers how to pull KV (default: their own setting)")
    parser.add_argument("--routing", choices=("round_robin", "least_loaded"), default="round_robin",
                        help="how the router picks a worker (default: round_robin)")
    parser.add_argument("--max-concurrent", type=int, default=256, help="requests in flight at once (default: 256)")
    parser.add_argument("--max-queued", type=int, default=512,
                        help="requests waiting beyond that; more get 503 + Retry-After (default: 512)")
    parser.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request may wait for capacity before a 503 (default: 30)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="API address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default: 8000)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default: 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default: 1)")
    parser.add_argument("--colocated", action="store_true",
                        help="run --workers colocated (prefill+decode) workers instead: the monolithic baseline")
    parser.add_argument("--workers", type=int, default=1, help="colocated workers with --colocated (default: 1)")
    parser.add_argument("--kv-memory-mb", type=int, default=512, help="KV cache budget per worker in MiB")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY, else open)")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the workers")
    parser.add_argument("--routing", choices=("round_robin", "least_loaded"), default="round_robin",
                        help="how the router picks a worker (default: round_robin)")
    parser.add_argument("--max-concurrent", type=int, default=256, help="requests in flight at once (default: 256)")
    parser.add_argument("--max-queued", type=int, default=512,
                        help="requests waiting beyond that; more get 503 + Retry-After (default: 512)")
    parser.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request may wait for capacity before a 503 (default: 30)")
