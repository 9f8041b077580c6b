"""How a child process ended, in words: a crash should say which signal killed it."""

from __future__ import annotations

import signal


def describe_exit(returncode: int | None) -> str:
    """``exit code 1``, ``signal SIGSEGV`` (subprocess reports a signal as a negative code), or
    ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
