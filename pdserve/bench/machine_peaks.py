"""This machine's measured peaks: the yardsticks of utilization proxies on a GPU-free host.

The GEMM peak is a large fp32 ``F.linear`` with the weight in the ``[out, in]`` layout the engine
uses, so it is the best the engine's own matmuls can do here, not a datasheet figure. The
bandwidth peak is a large copy (bytes read + written), from the engine benchmark.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from pdserve.bench.engine import measure_copy_bandwidth
from pdserve.bench.workload_profile import MachinePeaks


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


def measure_peaks(num_threads: int) -> MachinePeaks:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        flops = measure_gemm_flops()
        bandwidth = measure_copy_bandwidth("cpu")["bytes_per_second"]
    finally:
        torch.set_num_threads(previous)
    return MachinePeaks(flops_per_second=flops, bytes_per_second=bandwidth)
