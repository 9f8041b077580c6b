"""Every environment variable pdserve reads, typed, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where pdserve caches fetched model files (PDSERVE_CACHE_DIR, else XDG cache)."""
    explicit = os.environ.get("PDSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pdserve"


def model_path_override() -> str | None:
    """A model file or directory to use instead of the default model (PDSERVE_MODEL)."""
    return os.environ.get("PDSERVE_MODEL") or None


def kernel_isa() -> str | None:
    """The highest instruction-set level the native kernels may use (PDSERVE_KERNEL_ISA: avx512,
    avx2 or portable; unset or "auto": the best this CPU runs). Lower levels test those paths on
    a CPU that has more, or rule out a path that misbehaves."""
    value = os.environ.get("PDSERVE_KERNEL_ISA", "").strip().lower()
    return None if value in ("", "auto") else value
