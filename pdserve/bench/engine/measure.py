"""What a side of the engine benchmark records, ours and HF's alike: timing entries (medians and
p90s), resident-memory high-water marks, and progress lines on stderr."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from pdserve.traffic.stats import percentile


def log(side: str, message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {side}: {message}", file=sys.stderr, flush=True)


def prefill_entry(length: int, dtype: str, seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "prompt_tokens": length,
        "dtype": dtype,
        "seconds": seconds,
        "median_seconds": median,
        "p90_seconds": percentile(seconds, 90),
        "tokens_per_second": length / median,
    }


def decode_entry(
    batch_size: int, context_length: int, dtype: str, step_seconds: list[float], peak_rss: int
) -> dict[str, Any]:
    median = statistics.median(step_seconds)
    return {
        "batch_size": batch_size,
        "context_tokens": context_length,
        "dtype": dtype,
        "step_seconds": step_seconds,
        "median_step_seconds": median,
        "p90_step_seconds": percentile(step_seconds, 90),
        "tokens_per_second": batch_size / median,
        # High-water mark over the timed steps: weights, the batch's KV and one step's activations.
        "decode_peak_rss_bytes": peak_rss,
    }


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (since the last reset_peak_rss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss if sys.platform == "darwin" else max_rss * 1024)


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux only); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakTracker:
    """Per-phase resident high-water marks, plus the mark over the whole run despite the resets."""

    def __init__(self) -> None:
        self.resettable = reset_peak_rss()
        self._overall = peak_rss()

    def start_phase(self) -> None:
        self._overall = max(self._overall, peak_rss())
        reset_peak_rss()

    def end_phase(self) -> int:
        phase_peak = peak_rss()
        self._overall = max(self._overall, phase_peak)
        return phase_peak

    @property
    def overall(self) -> int:
        return max(self._overall, peak_rss())
