"""``pdserve bench transfer``: KV connectors against memcpy and raw sockets, the transfer's
share of prefill time with and without pipelining, and pipelining over a shaped link.

Targets (reported, never asserted):
    shm:  >= 50% of memcpy bandwidth for payloads >= 16 MB
    tcp:  >= 50% of a raw loopback socket
    over a link where an unpipelined transfer takes ~half the prefill, pipelining leaves
    <= 20% of the unpipelined transfer time visible in time-to-first-token
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.transfer_bandwidth import BandwidthRow, measure_bandwidth
from pdserve.bench.transfer_link import LinkResult, link_available, measure_link
from pdserve.bench.transfer_prefill import PrefillShareRow, measure_prefill_share
from pdserve.engine.kv_cache import KVLayout
from pdserve.engine.loader import load_checkpoint, resolve_model_path

SHM_TARGET = 0.5
TCP_TARGET = 0.5
PIPELINE_TARGET = 0.2


def run_transfer_benchmark(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    sizes = [int(s) for s in args.sizes_mb.split(",")]
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    repeats = args.repeats
    if args.quick:
        sizes, lengths, repeats = [s for s in sizes if s <= 16] or [1], lengths[:1], 2
    model_path = str(resolve_model_path(args.model, show_progress=True))
    log(f"loading {model_path}")
    checkpoint = load_checkpoint(model_path, show_progress=False)
    arch = checkpoint.architecture
    unit = KVLayout(arch.num_layers, 1, 16, arch.num_kv_heads, arch.head_dim, torch.float32)

    bandwidth = measure_bandwidth(unit, sizes, repeats, args.codecs.split(","), log)
    shares = measure_prefill_share(checkpoint, lengths, ["tcp", "shm"], repeats, log)
    link: LinkResult | None = None
    if args.link:
        reason = link_available()
        if reason is None:
            link = measure_link(model_path, arch.vocab_size, max(lengths), max(2, repeats // 2), log)
        else:
            log(f"link: skipped ({reason})")

    report = format_report(bandwidth, shares, link)
    print(report)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": model_path,
        "bandwidth": [asdict(r) | {"gb_per_s": r.gb_per_s} for r in bandwidth],
        "prefill_share": [asdict(r) | {"share_of_prefill": r.share_of_prefill} for r in shares],
        "link": None if link is None else asdict(link) | {"pipelined_fraction": link.pipelined_fraction},
        "seconds": time.monotonic() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".txt").write_text(report + "\n")
    log(f"wrote {output} and {output.with_suffix('.txt')} in {result['seconds']:.0f} s")
    return 0


def format_report(bandwidth: list[BandwidthRow], shares: list[PrefillShareRow], link: LinkResult | None) -> str:
    lines = ["KV transfer bandwidth (median of repetitions; GB/s = payload bytes / wall time)", ""]
    methods = list(dict.fromkeys(r.method for r in bandwidth))
    lines.append("| payload | " + " | ".join(methods) + " | shm / memcpy | tcp / raw socket |")
    lines.append("|---" * (len(methods) + 3) + "|")
    for payload in dict.fromkeys(r.payload_bytes for r in bandwidth):
        by_method = {r.method: r for r in bandwidth if r.payload_bytes == payload}
        cells = [f"{by_method[m].gb_per_s:.2f} GB/s, {by_method[m].seconds_median * 1e3:.1f} ms" for m in methods]
        shm_ratio = by_method["shm"].gb_per_s / by_method["memcpy"].gb_per_s
        tcp_ratio = by_method["tcp"].gb_per_s / by_method["raw socket"].gb_per_s
        shm_mark = "" if payload < 16 << 20 else (" (met)" if shm_ratio >= SHM_TARGET else " (not met)")
        tcp_mark = " (met)" if tcp_ratio >= TCP_TARGET else " (not met)"
        lines.append(
            f"| {payload / (1 << 20):.0f} MB | " + " | ".join(cells)
            + f" | {shm_ratio:.0%}{shm_mark} | {tcp_ratio:.0%}{tcp_mark} |"
        )
    lines += [
        "",
        f"Targets: shm >= {SHM_TARGET:.0%} of memcpy from 16 MB; tcp >= {TCP_TARGET:.0%} of a raw socket.",
        "",
    ]
    lines.append("Transfer time visible after the prefill (two workers on this machine's cores)")
    lines.append("")
    lines.append("| prompt | backend | pipelined | KV | prefill | visible transfer | share of prefill |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in shares:
        lines.append(
            f"| {r.prompt_tokens} | {r.backend} | {'yes' if r.pipelined else 'no'} | {r.kv_bytes / 1e6:.1f} MB "
            f"| {r.prefill_seconds * 1e3:.0f} ms | {r.visible_transfer_seconds * 1e3:.1f} ms "
            f"| {r.share_of_prefill:.1%} |"
        )
    if link is not None:
        verdict = "met" if link.pipelined_fraction <= PIPELINE_TARGET else "not met"
        slowdown = link.pipelined_prefill_seconds / link.prefill_seconds - 1
        lines += [
            "",
            f"Shaped link (veth + tc tbf at {link.rate_mbit:.0f} Mbit/s, {link.prompt_tokens}-token prompt, "
            f"{link.kv_bytes / 1e6:.1f} MB of KV, one core per process):",
            f"- prefill alone {link.prefill_seconds:.2f} s; "
            f"unpipelined transfer visible {link.unpipelined_visible_seconds:.2f} s",
            f"- pipelined: {link.pipelined_visible_seconds:.3f} s visible = {link.pipelined_fraction:.1%} of "
            f"unpipelined (target <= {PIPELINE_TARGET:.0%}: {verdict}); prefill while sending "
            f"{link.pipelined_prefill_seconds:.2f} s ({slowdown:+.1%})",
        ]
    return "\n".join(lines)
