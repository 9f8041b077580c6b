"""Names of the KV pools' shared-memory segments, and the removal of those a dead process left.

A worker unlinks its segment when it closes its engine, but a process group killed outright
(SIGKILL, the OOM killer) unlinks nothing, and each such segment holds a whole KV pool of RAM in
``/dev/shm`` until reboot. So every segment is named after the process that created it, and
``pdserve serve`` and ``pdserve worker`` remove, at start, the segments whose creator is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

PREFIX = "pdserve-kv-"
SHM_DIRECTORY = Path("/dev/shm")
_NAME = re.compile(re.escape(PREFIX) + r"([0-9]{1,10})-[0-9a-f]{12}")


def segment_name() -> str:
    """A new segment's name: the prefix, this process's id, and a random part."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"


def segment_owner(name: str) -> int | None:
    """The pid a segment name says created it, or None if the name is not one of ours: a peer
    naming a segment to copy from may name only a pdserve KV pool, never another program's."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def remove_stale_segments(directory: Path = SHM_DIRECTORY) -> list[str]:
    """Unlink the segments whose creating process no longer exists; returns their names.
    A segment whose creator cannot be told (another naming, another user's process) is kept."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.glob(f"{PREFIX}*")):
        pid_text = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process removed it meanwhile
            path.unlink()
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
