"""The simulator's request stream: when each request arrives and how long it is, nothing else.

Two sources: a seeded open-loop process with lengths from a ``pdserve bench serve`` workload
preset (the same arrival functions and length ranges the load generator uses, so a simulation
and a real load run describe the same traffic), and a JSONL trace in the public Mooncake format:

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

one object per line; ``timestamp`` is the arrival in milliseconds from the trace's start,
``input_length`` and ``output_length`` are token counts. Other keys (``hash_ids``: which
prompt blocks are shared between requests) are ignored; blank lines are skipped.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import NamedTuple

from pdserve.traffic.arrivals import arrival_times
from pdserve.traffic.workloads import PRESETS, WORKLOADS, Preset, pick_kind


class SimRequest(NamedTuple):
    """One request of the stream; a plain ``(arrival_time, input_tokens, output_tokens)`` works."""

    arrival_time: float
    """Seconds from the start of the simulation."""
    input_tokens: int
    output_tokens: int
    """Tokens generated: the request finishes at exactly this many (EOS is not modelled)."""
    kind: str = ""
    """Where it came from (a preset name, "trace"); only carried into the records."""


def check_request(request: SimRequest) -> None:
    if not (math.isfinite(request.arrival_time) and request.arrival_time >= 0):
        raise ValueError(f"arrival_time must be finite and >= 0, got {request.arrival_time!r}")
    if request.input_tokens < 1 or request.output_tokens < 1:
        raise ValueError(f"input and output tokens must be >= 1, got {request!r}")


def poisson_requests(
    workload: str, rate: float, count: int, seed: int = 0, burstiness: float = 1.0,
    fixed: Preset | None = None,
) -> list[SimRequest]:
    """``count`` requests at ``rate`` per second (Poisson, or gamma with ``burstiness`` != 1),
    lengths drawn from a ``pdserve bench serve`` workload (chat, code, summarize, mixed, or
    fixed with the lengths of ``fixed``)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    if (workload == "fixed") != (fixed is not None):
        raise ValueError("the fixed workload needs its lengths (a Preset), and only it takes them")
    times = arrival_times(rate, count, burstiness, seed)
    # A stream of its own: seeding it like the arrivals would correlate gaps with lengths.
    rng = random.Random(f"{seed}:lengths")
    requests: list[SimRequest] = []
    for arrival in times:
        preset = fixed or PRESETS[pick_kind(rng) if workload == "mixed" else workload]
        input_tokens = preset.input_tokens.draw(rng)
        requests.append(SimRequest(arrival, input_tokens, preset.output_tokens.draw(rng), preset.name))
    return requests


def load_trace(path: Path, speedup: float = 1.0, limit: int | None = None) -> list[SimRequest]:
    """Requests of a Mooncake-format JSONL trace, in arrival order.

    ``speedup`` divides every timestamp (2.0 replays the trace at twice its rate); ``limit``
    keeps the first requests of the file only.
    """
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    requests: list[SimRequest] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                request = SimRequest(
                    float(row["timestamp"]) / 1000.0 / speedup,
                    _count(row["input_length"]),
                    _count(row["output_length"]),
                    "trace",
                )
                check_request(request)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{number}: expected an object with timestamp (ms), input_length and "
                    f"output_length (positive integers): {error}"
                ) from None
            requests.append(request)
    requests.sort(key=lambda r: r.arrival_time)  # stable: equal timestamps keep file order
    return requests


def _count(value: object) -> int:
    # Traces written by other tools may hold 52.0; 52.5 or "52" is a malformed line.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"not a whole number: {value!r}")
    return int(value)
