"""Structured (JSON) log lines, one object per line, for the router, workers and engine processes.

Every line names its ``component`` (router, prefill, decode, both, engine) and, when it is about
one request, carries that request's ``request_id``: the id the client sent as ``X-Request-Id``
(or the one the router made up), which the router hands to every worker. So one
``grep <id>`` (or a log query on ``request_id``) follows a request through the router, the
prefill, the KV transfer and the decode.

Request-scoped lines pass the id explicitly: ``log.info("...", extra={"request_id": rid, ...})``.
Any other ``extra`` field becomes a field of the JSON object too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# What a LogRecord carries of its own: everything else on it came in through ``extra``.
_STANDARD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_FIELDS and not key.startswith("_"):
                line[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(component: str, level: str = "INFO", json_lines: bool = True) -> None:
    """Send this process's log records to stderr, as JSON lines (or plain text for people)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {component} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One line per HTTP call between router and workers (health checks every 2 s) drowns the
    # lines that matter; their failures surface as our own warnings.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
