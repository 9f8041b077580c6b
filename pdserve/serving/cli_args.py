"""Command-line options of ``pdserve worker``, ``router`` and ``serve`` (no heavy imports here:
``pdserve --help`` must stay instant)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from pdserve.engine.layers.formats import WEIGHT_FORMATS

if TYPE_CHECKING:
    from pdserve.serving.router import RouterConfig

ROLES = ("prefill", "decode", "both")
KV_CODECS = ("none", "fp16", "bf16", "int8", "fp8", "auto")
"""transfer/codecs.py's CODEC_NAMES and codec_choice.py's AUTO, spelled out: importing them would
import torch (a test keeps them equal)."""


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=ROLES, default="both", help="what the router sends here (default: both)")
    parser.add_argument("--host", default="127.0.0.1", help="internal API address (default: loopback)")
    parser.add_argument("--port", type=int, default=8101, help="internal API port (default: 8101)")
    parser.add_argument("--cpus", default=None, help="cores to pin to, e.g. 0 or 0-1 (default: all)")
    parser.add_argument("--kv-memory-mb", type=int, default=512, help="KV cache budget in MiB (default: 512)")
    parser.add_argument("--kv-backend", choices=("tcp", "shm"), default="tcp",
                        help="how this worker pulls KV: shm on one host, tcp across hosts (default: tcp)")
    parser.add_argument("--kv-codec", choices=KV_CODECS, default="none",
                        help="how KV this worker pulls over tcp is encoded on the wire, unless the router asks for "
                        "another: int8 and fp8 move ~1/4 of float32 KV's bytes (~1/2 of bf16's) and are lossy; "
                        "auto: the sender sends each layer raw while the link keeps up with the prefill and int8 "
                        "while a slow link holds layers back; shm copies raw KV whatever this says (default: none)")
    parser.add_argument("--kv-host", default="127.0.0.1", help="KV server address (off loopback needs --kv-secret)")
    parser.add_argument("--kv-port", type=int, default=0, help="KV server port (default: any free port)")
    parser.add_argument("--kv-secret", default=os.environ.get("PDSERVE_KV_SECRET"),
                        help="shared secret for KV pulls (default: $PDSERVE_KV_SECRET)")
    parser.add_argument("--kv-lease-ttl", type=float, default=10.0, help="seconds offered KV waits to be pulled")
    parser.add_argument("--kv-timeout", type=float, default=30.0, help="deadline of one KV transfer, seconds")
    parser.add_argument("--kv-io-timeout", type=float, default=5.0,
                        help="seconds without progress before a KV transfer counts as stalled (default: 5)")
    parser.add_argument("--kv-advertise", default=None, metavar="HOST:PORT",
                        help="the address decode workers should pull KV from, when it differs from where the "
                        "KV server listens (NAT, port mapping, a proxy)")
    parser.add_argument("--internal-secret", default=os.environ.get("PDSERVE_INTERNAL_SECRET"),
                        help="Bearer secret the router must send to this worker's internal API; required off "
                        "loopback (default: $PDSERVE_INTERNAL_SECRET)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let running requests finish before exiting")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the parent process dies (used by serve)")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plain-logs", action="store_true",
                        help="log plain text lines instead of JSON objects (one per line, with request_id)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="(default: INFO)")


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="API address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default: 8000)")
    parser.add_argument("--prefill", nargs="*", default=[], metavar="URL", help="prefill workers' internal URLs")
    parser.add_argument("--decode", nargs="*", default=[], metavar="URL", help="decode workers' internal URLs")
    parser.add_argument("--both", nargs="*", default=[], metavar="URL", help="colocated workers' internal URLs")
    parser.add_argument("--kv-backend", choices=("tcp", "shm"), default=None,
                        help="tell decode workers how to pull KV (default: their own setting)")
    parser.add_argument("--kv-codec", choices=KV_CODECS, default=None,
                        help="tell decode workers how KV pulled over tcp is encoded (default: their --kv-codec)")
    parser.add_argument("--admin-key", default=os.environ.get("PDSERVE_ADMIN_KEY"),
                        help="Bearer key of the /admin API that adds and removes workers at run time "
                        "(default: $PDSERVE_ADMIN_KEY; without one, only loopback clients may use it)")
    parser.add_argument("--worker-secret", default=os.environ.get("PDSERVE_INTERNAL_SECRET"),
                        help="the workers' --internal-secret, needed when they listen off loopback "
                        "(default: $PDSERVE_INTERNAL_SECRET)")
    add_policy_arguments(parser)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Options the router of ``pdserve router`` and of ``pdserve serve`` share."""
    parser.add_argument("--api-key", action="append", default=None, metavar="[TENANT=]KEY",
                        help="require 'Authorization: Bearer KEY'; repeat for several keys; a key's TENANT "
                        "gets a prefix cache of its own (default: $PDSERVE_API_KEY, comma-separated; else open)")
    parser.add_argument("--routing", choices=("round_robin", "least_loaded", "prefix_aware"), default="round_robin",
                        help="how the router picks a worker (default: round_robin)")
    parser.add_argument("--local-prefill-tokens", type=int, default=0, metavar="N",
                        help="prompts whose uncached part is at most N tokens are prefilled on the decode worker, "
                        "with no KV transfer (default: 0, always disaggregate)")
    parser.add_argument("--kv-pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="start the decode worker's KV pull as soon as the prefill starts: over tcp the layers "
                        "stream while the prefill runs, over shm the pull connects and reserves its blocks early "
                        "and copies when the prefill ends (default: on)")
    parser.add_argument("--kv-overcommit", type=float, default=1.0,
                        help="decode KV blocks the router may reserve for prompt + max_tokens, as a multiple of "
                        "the decode pool's blocks (default: 1.0: never more than fits)")
    parser.add_argument("--max-concurrent", type=int, default=256, help="requests in flight at once (default: 256)")
    parser.add_argument("--max-queued", type=int, default=512,
                        help="requests waiting beyond that; more get 429 + Retry-After (default: 512)")
    parser.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request may wait for capacity before a 503 (default: 30)")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default: 4 MiB)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted (default: the model's context less one)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve the API off loopback (--host) without --api-key: anyone who reaches it may use it")
    parser.add_argument("--reserve-output-tokens", type=int, default=1024, metavar="N",
                        help="decode KV the router reserves for the output of a request that sets no max_tokens; "
                        "it may grow past N, the engine preempting if the pool runs out (default: 1024)")


def router_config_from_args(args: argparse.Namespace, **fixed: Any) -> RouterConfig:
    """The router's configuration from ``add_policy_arguments`` options (and ``fixed`` fields)."""
    from pdserve.serving.api_keys import parse_api_keys
    from pdserve.serving.router import RouterConfig
    from pdserve.transfer.config import is_loopback

    specs = args.api_key if args.api_key is not None else [os.environ.get("PDSERVE_API_KEY") or ""]
    api_keys = parse_api_keys(specs)
    host = str(getattr(args, "host", "127.0.0.1"))
    if not is_loopback(host) and not api_keys and not args.insecure:
        raise ValueError(f"the API would listen on {host}, off loopback, with no --api-key: anyone who reaches it "
                         "could use it. Set --api-key (or $PDSERVE_API_KEY), or pass --insecure")
    return RouterConfig(
        api_keys=api_keys, routing=args.routing, local_prefill_tokens=args.local_prefill_tokens,
        kv_overcommit=args.kv_overcommit, max_concurrent=args.max_concurrent, max_queued=args.max_queued,
        queue_timeout=args.queue_timeout, max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens, reserve_output_tokens=args.reserve_output_tokens,
        kv_pipeline=args.kv_pipeline, **fixed,
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="API address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default: 8000)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default: 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default: 1)")
    parser.add_argument("--colocated", action="store_true",
                        help="run --workers colocated (prefill+decode) workers instead: the monolithic baseline")
    parser.add_argument("--workers", type=int, default=1, help="colocated workers with --colocated (default: 1)")
    formats = ["auto", *WEIGHT_FORMATS]
    parser.add_argument("--prefill-weight-format", default="auto", choices=formats,
                        help="prefill workers' weights (default: auto = --weight-format if given, else dense: "
                        "prefill is bound by arithmetic)")
    parser.add_argument("--decode-weight-format", default="auto", choices=formats,
                        help="decode workers' weights (default: auto = --weight-format if given, else int4 where "
                        "the CPU has the native int4 kernel (AVX2 or AVX-512), else dense: decode is bound by "
                        "reading weights). Colocated workers take --weight-format (default dense)")
    parser.add_argument("--kv-memory-mb", type=int, default=512, help="KV cache budget per worker in MiB")
    parser.add_argument("--kv-backend", choices=("shm", "tcp"), default="shm",
                        help="how decode workers pull KV: shm copies it out of the prefill worker's pool (this "
                        "host only), tcp streams it over loopback like across hosts (default: shm)")
    parser.add_argument("--kv-codec", choices=KV_CODECS, default="none",
                        help="how KV is encoded over tcp (int8, fp8: ~1/4 of float32's bytes, lossy; auto: int8 "
                        "only while a slow link holds layers back); needs --kv-backend tcp (default: none)")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the workers")
    add_policy_arguments(parser)
