"""This machine: what it is, how busy other processes keep it, and its measured peaks.

Probes shared by the benchmarks (``pdserve bench engine``, ``bench profile-workload``) and the
planner's calibration (``pdserve plan calibrate``), which records them beside its step profile.

The GEMM peak is a large fp32 ``F.linear`` with the weight in the ``[out, in]`` layout the engine
uses, so it is the best the engine's own matmuls can do here, not a datasheet figure. The
bandwidth peak is a large copy (bytes read + written): a batch-1 decode step must stream every
weight from memory once, so it is also the engine benchmark's decode floor.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F


def machine_info(num_threads: int) -> dict[str, Any]:
    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "num_cores": os.cpu_count(),
        "num_usable_cores": num_usable_cores(),
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "num_threads": num_threads,
        "load_average_start": load_average(),
        # Share of all cores in use during one second in which this process idles.
        "cpu_busy_percent_start": psutil.cpu_percent(interval=1.0),
    }


def num_usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def is_busy(machine: dict[str, Any]) -> bool:
    """Whether other jobs used the CPU (``machine`` from :func:`machine_info`). They make every
    number low and noisy: an OpenMP region waits for its slowest thread, and a descheduled one
    costs milliseconds."""
    during = machine.get("other_cpu_percent_during_run")
    return bool(machine["cpu_busy_percent_start"] > 20.0 or (during is not None and during > 10.0))


class OtherCpuMeter:
    """Share of all cores that processes other than this one and its children kept busy."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._system_busy = self._busy_seconds()
        self._own = self._own_seconds()

    @staticmethod
    def _busy_seconds() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def percent(self) -> float:
        """Call after the children ended (their CPU time is counted once they are waited for)."""
        wall = time.monotonic() - self._started
        others = (self._busy_seconds() - self._system_busy) - (self._own_seconds() - self._own)
        return max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so a wall-clock timing covers it (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(
    device: str, num_bytes: int = 256 << 20, num_repeats: int = 10
) -> dict[str, Any]:
    """Median ``dst.copy_(src)`` rate over ``num_bytes`` buffers, counting bytes read + written."""
    source = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)  # fault the pages in before timing
    seconds = []
    for _ in range(num_repeats):
        synchronize(device)
        started = time.perf_counter()
        destination.copy_(source)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    del source, destination
    median = statistics.median(seconds)
    return {
        "buffer_bytes": num_bytes,
        "bytes_per_copy": 2 * num_bytes,
        "seconds": seconds,
        "median_seconds": median,
        "bytes_per_second": 2 * num_bytes / median,
    }


def measure_gemm_flops(rows: int = 1024, inner: int = 1024, out: int = 4096, repeats: int = 5) -> float:
    """Median fp32 GEMM FLOP/s of ``[rows, inner] x [out, inner]^T`` with the current threads."""
    x = torch.randn(rows, inner)
    weight = torch.randn(out, inner)
    F.linear(x, weight)  # warm up: page faults, thread pool
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        F.linear(x, weight)
        seconds.append(time.perf_counter() - started)
    return 2.0 * rows * inner * out / statistics.median(seconds)


@dataclass(frozen=True)
class MachinePeaks:
    flops_per_second: float
    bytes_per_second: float


def measure_peaks(num_threads: int) -> MachinePeaks:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        flops = measure_gemm_flops()
        bandwidth = measure_copy_bandwidth("cpu")["bytes_per_second"]
    finally:
        torch.set_num_threads(previous)
    return MachinePeaks(flops_per_second=flops, bytes_per_second=bandwidth)
