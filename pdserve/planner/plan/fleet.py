"""A fleet: which instances serve a model, how many of each, and what that costs.

Colocated, one pool of ``N`` identical instances does both phases; disaggregated, ``P`` prefill
instances and ``D`` decode instances (possibly different hardware) with KV moving between them.
An instance is ``tensor_parallel`` GPUs of one accelerator type, so it costs
``tensor_parallel * usd_per_gpu_hour``. Everything here is arithmetic on plain numbers, so the
prices can be checked by hand:

    usd_per_hour            = sum over pools of count * tensor_parallel * usd_per_gpu_hour
    output tokens per hour  = rate (req/s) * mean output tokens * 3600
    usd_per_million_tokens  = usd_per_hour / output tokens per hour * 1e6
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class InstanceType:
    """One engine instance: ``tensor_parallel`` GPUs of one accelerator, priced per GPU-hour."""

    accelerator: str
    """The catalogue name, e.g. "A100-80GB"."""
    tensor_parallel: int
    usd_per_gpu_hour: float

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if not (math.isfinite(self.usd_per_gpu_hour) and self.usd_per_gpu_hour > 0):
            raise ValueError(f"usd_per_gpu_hour must be > 0, got {self.usd_per_gpu_hour!r}")

    @property
    def usd_per_hour(self) -> float:
        return self.tensor_parallel * self.usd_per_gpu_hour

    @property
    def label(self) -> str:
        """"A100-80GB" for one GPU, "H100-SXM TP4" for a tensor-parallel group."""
        return self.accelerator if self.tensor_parallel == 1 else f"{self.accelerator} TP{self.tensor_parallel}"


@dataclass(frozen=True)
class Pool:
    """``count`` identical instances in one role."""

    role: str
    """``colocated``, ``prefill`` or ``decode``."""
    instance: InstanceType
    count: int

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.count < 1:
            raise ValueError(f"a pool needs at least one instance, got {self.count}")

    @property
    def usd_per_hour(self) -> float:
        return self.count * self.instance.usd_per_hour

    @property
    def num_gpus(self) -> int:
        return self.count * self.instance.tensor_parallel

    @property
    def label(self) -> str:
        return f"{self.count}x {self.instance.label}"


@dataclass(frozen=True)
class Fleet:
    """Either one colocated pool, or a prefill pool and a decode pool (in that order)."""

    pools: tuple[Pool, ...]

    def __post_init__(self) -> None:
        roles = tuple(pool.role for pool in self.pools)
        if roles not in (("colocated",), ("prefill", "decode")):
            raise ValueError(f"a fleet is (colocated,) or (prefill, decode) pools, got {roles}")

    @classmethod
    def colocated(cls, instance: InstanceType, count: int) -> Fleet:
        return cls((Pool("colocated", instance, count),))

    @classmethod
    def disaggregated(cls, prefill: InstanceType, num_prefill: int, decode: InstanceType,
                      num_decode: int) -> Fleet:
        return cls((Pool("prefill", prefill, num_prefill), Pool("decode", decode, num_decode)))

    @property
    def is_disaggregated(self) -> bool:
        return len(self.pools) == 2

    @property
    def kind(self) -> str:
        return "disaggregated" if self.is_disaggregated else "colocated"

    def pool(self, role: str) -> Pool:
        for pool in self.pools:
            if pool.role == role:
                return pool
        raise KeyError(f"this {self.kind} fleet has no {role} pool")

    @property
    def family(self) -> str:
        """The fleet without its counts: what the search grows ("A100-80GB -> L40S")."""
        if self.is_disaggregated:
            return f"{self.pools[0].instance.label} -> {self.pools[1].instance.label}"
        return f"{self.pools[0].instance.label} colocated"

    @property
    def label(self) -> str:
        if self.is_disaggregated:
            return f"{self.pools[0].label} prefill + {self.pools[1].label} decode"
        return f"{self.pools[0].label} colocated"

    @property
    def pd_ratio(self) -> str:
        """Prefill to decode instances, "2:12"; "-" when colocated."""
        if not self.is_disaggregated:
            return "-"
        return f"{self.pools[0].count}:{self.pools[1].count}"

    @property
    def num_instances(self) -> int:
        return sum(pool.count for pool in self.pools)

    @property
    def num_gpus(self) -> int:
        return sum(pool.num_gpus for pool in self.pools)

    @property
    def usd_per_hour(self) -> float:
        return sum(pool.usd_per_hour for pool in self.pools)

    def usd_per_million_output_tokens(self, rate: float, mean_output_tokens: float) -> float:
        """What a million generated tokens cost when the fleet serves ``rate`` requests/s of
        ``mean_output_tokens`` each (paying for the whole fleet, busy or not)."""
        if not (rate > 0 and mean_output_tokens > 0):
            raise ValueError("rate and mean_output_tokens must be > 0")
        tokens_per_hour = rate * mean_output_tokens * 3600.0
        return self.usd_per_hour / tokens_per_hour * 1e6

    def with_counts(self, *counts: int) -> Fleet:
        """The same instance types with other counts (one per pool, in pool order)."""
        if len(counts) != len(self.pools):
            raise ValueError(f"need {len(self.pools)} counts, got {len(counts)}")
        return Fleet(tuple(Pool(p.role, p.instance, n) for p, n in zip(self.pools, counts, strict=True)))


def saving(fleet_usd_per_hour: float, baseline_usd_per_hour: float) -> float:
    """Fraction of the baseline's cost saved (negative when the fleet costs more)."""
    if not baseline_usd_per_hour > 0:
        raise ValueError("the baseline must cost something")
    return 1.0 - fleet_usd_per_hour / baseline_usd_per_hour
