"""What the simulator simulates: instances, pools, the KV link and the router's policy.

Frozen and validated like the engine's own config; the scheduler policy of each simulated
instance is the engine's :class:`SchedulerConfig`, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.engine.config import SchedulerConfig
from pdserve.planner.cost.step_cost import StepCostModel

ROUTING_POLICIES = ("round_robin", "least_loaded")


@dataclass(frozen=True)
class InstanceSpec:
    """One engine instance: how fast its steps are, how much KV it holds, how it schedules."""

    cost_model: StepCostModel
    """Seconds per step (from the step's prefill chunks and decode contexts), KV bytes per token."""
    num_blocks: int
    """KV capacity in blocks."""
    block_size: int = 16
    """Tokens per KV block."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Token budget, sequence limit and chunk size of the engine's scheduler."""
    enable_prefix_caching: bool = True
    """As in the engine. Requests never share a prefix here (each is salted), so the cache only
    makes a preempted sequence's recompute cheaper, as it does in the engine."""

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass(frozen=True)
class LinkSpec:
    """The network between a prefill and a decode instance, for one KV transfer."""

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0
    """Fixed cost of a transfer (connection, handshake, the first byte's trip)."""

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError("bandwidth_bytes_per_s must be positive")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError("latency_s must be finite and >= 0")

    def transfer_seconds(self, num_bytes: float) -> float:
        return num_bytes / self.bandwidth_bytes_per_s + self.latency_s


@dataclass(frozen=True)
class ClusterSpec:
    """Either a disaggregated cluster (prefill + decode pools and a link) or a colocated one."""

    prefill: tuple[InstanceSpec, ...] = ()
    decode: tuple[InstanceSpec, ...] = ()
    colocated: tuple[InstanceSpec, ...] = ()
    """Instances doing both phases (the ``both`` role); excludes ``prefill`` and ``decode``."""
    link: LinkSpec | None = None
    """Required when disaggregated."""
    routing: str = "round_robin"
    """``round_robin``, or ``least_loaded`` as the router defines it (serving/worker_pool.py):
    prefill by fewest queued prompt tokens, decode and colocated by fewest requests in flight,
    then most free KV blocks. The simulated router sees each instance's exact state."""
    router_overhead_s: float = 0.0
    """Fixed time from a request's arrival at the router to its arrival at an instance
    (HTTP hops, tokenization); it adds to TTFT and end-to-end latency."""
    first_token_after_transfer: bool = False
    """False: the client has the first token when the prefill ends (DistServe's accounting).
    True: when the decode instance has the KV, which is what pdserve's router does today (it
    streams the decode worker's events only)."""
    imports_at_step_boundaries: bool = False
    """True: a decode instance reserves blocks for an incoming KV, and adopts it once it has
    arrived, only between its steps, as pdserve's decode worker does (both are calls on its
    engine thread, runtime/engine_service.py): a hand-off waits for up to two of its steps.
    False: both happen the instant they can."""

    def __post_init__(self) -> None:
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("a cluster is either colocated or disaggregated (prefill + decode)")
        if not self.colocated and not (self.prefill and self.decode):
            raise ValueError("a disaggregated cluster needs prefill and decode instances")
        if self.is_disaggregated and self.link is None:
            raise ValueError("a disaggregated cluster needs a link for its KV transfers")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        if not (math.isfinite(self.router_overhead_s) and self.router_overhead_s >= 0):
            raise ValueError("router_overhead_s must be finite and >= 0")

    @property
    def is_disaggregated(self) -> bool:
        return not self.colocated
