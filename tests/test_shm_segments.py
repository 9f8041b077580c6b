"""Shared-memory KV pools left by dead processes are removed; live ones are kept."""

from __future__ import annotations

import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

from pdserve.engine.shm_segments import PREFIX, SHM_DIRECTORY, remove_stale_segments, segment_name


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_segments_of_dead_processes_are_removed_and_live_ones_kept() -> None:
    dead = shared_memory.SharedMemory(name=f"{PREFIX}{_dead_pid()}-testdead", create=True, size=4096)
    live = shared_memory.SharedMemory(name=segment_name(), create=True, size=4096)
    foreign = shared_memory.SharedMemory(name=f"{PREFIX}not-a-pid-test", create=True, size=4096)
    try:
        removed = remove_stale_segments()
        assert dead.name in removed and live.name not in removed and foreign.name not in removed
        assert not (SHM_DIRECTORY / dead.name).exists()
        assert (SHM_DIRECTORY / live.name).exists() and (SHM_DIRECTORY / foreign.name).exists()
    finally:
        for segment in (dead, live, foreign):
            segment.close()
            if (SHM_DIRECTORY / segment.name).exists():
                segment.unlink()


def test_a_missing_directory_removes_nothing(tmp_path: Path) -> None:
    assert remove_stale_segments(tmp_path / "absent") == []
