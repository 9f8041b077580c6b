"""SLOs fixed before measuring, derived from the target's own unloaded speed.

TTFT SLO = 3x the time to first token of the median prompt sent alone; TPOT SLO = 3x the time per
output token of one request decoding alone (batch 1). Measured on the target itself, one
request at a time, before the load starts, each time with a different prompt of the median's
length (a repeated prompt would time a prefix-cache hit) — so the SLOs describe the hardware, and are not
tuned until one configuration wins. The factor and the measured bases go into the report.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdserve.bench.load.loadgen import LoadConfig, run_load
from pdserve.traffic.stats import SLO
from pdserve.traffic.workloads import RequestSpec, with_fresh_prompt

FACTOR = 3.0


@dataclass(frozen=True)
class Calibration:
    isolated_ttft: float
    """Median time to first token of the median prompt, alone."""
    isolated_tpot: float
    """Median time per output token of one request, alone."""
    factor: float = FACTOR
    prompt_tokens: int | None = None
    """The median prompt's length as the target counted it (what the unloaded times are for)."""

    @property
    def slo(self) -> SLO:
        return SLO(ttft=self.factor * self.isolated_ttft, tpot=self.factor * self.isolated_tpot)


def calibration_requests(specs: Sequence[RequestSpec], repeats: int, decode_tokens: int,
                         ) -> tuple[list[RequestSpec], list[RequestSpec]]:
    """The median prompt's length, ``repeats`` times for TTFT (one token out) and again for TPOT,
    every one a different prompt."""
    by_length = sorted(specs, key=lambda s: s.approx_prompt_tokens)
    median = by_length[len(by_length) // 2]
    prefills = [replace(with_fresh_prompt(median, i), max_tokens=1) for i in range(repeats)]
    decodes = [replace(with_fresh_prompt(median, repeats + i), max_tokens=decode_tokens) for i in range(repeats)]
    return prefills, decodes


async def calibrate(config: LoadConfig, specs: Sequence[RequestSpec], repeats: int = 3,
                    decode_tokens: int = 32) -> Calibration:
    prefill_specs, decode_specs = calibration_requests(specs, repeats, decode_tokens)
    alone = replace(config, rate=None, concurrency=1, time_limit=max(config.time_limit, 120.0))
    prefills = await run_load(alone, prefill_specs, progress=False)
    decodes = await run_load(alone, decode_specs, progress=False)
    ttfts = [r.ttft for r in prefills if r.ok and r.ttft is not None]
    tpots = [t for r in decodes if (t := r.tpot) is not None]
    if not ttfts or not tpots:
        errors = {r.error for r in (*prefills, *decodes) if r.error}
        raise RuntimeError(f"could not measure the target unloaded: {errors or 'no output'}")
    lengths = [r.prompt_tokens for r in prefills if r.ok and r.prompt_tokens]
    return Calibration(statistics.median(ttfts), statistics.median(tpots),
                       prompt_tokens=round(statistics.median(lengths)) if lengths else None)
