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
