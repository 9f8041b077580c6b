"""When requests are sent: open-loop arrival processes (seeded, so a run can be repeated).

Poisson arrivals have exponential gaps of mean 1/rate. Gamma arrivals keep the mean rate and
change the burstiness: gaps ~ Gamma(shape=b, scale=1/(rate*b)); b = 1 is Poisson, b < 1 burstier
(clumps and lulls), b > 1 smoother (b -> inf: evenly spaced). The same definition as
``vllm bench serve --burstiness``, so runs are comparable.
"""

from __future__ import annotations

import math
import random


def arrival_times(rate: float, count: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times, in seconds from the start, of ``count`` requests at ``rate`` per second.

    ``rate = inf`` sends everything at once (time 0).
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        times.append(now)
    return times
