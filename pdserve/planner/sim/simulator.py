"""A discrete-event simulation of a router in front of engine pools, disaggregated or colocated.

Disaggregated, a request travels: router (fixed overhead) -> a prefill instance, chosen by the
routing policy -> its prompt is computed, the first token sampled (the client's first token,
unless ``first_token_after_transfer``) and its blocks held -> a decode instance is chosen and
reserves blocks for the prompt's KV, waiting for room if it has none -> the transfer takes
``kv_bytes_per_token * prompt_tokens / bandwidth + latency`` -> the prefill instance frees its
blocks, the decode instance adopts the sequence and generates the remaining tokens with
continuous batching. With ``imports_at_step_boundaries`` the decode instance reserves and
adopts only between its steps, as pdserve's decode worker does. Colocated, one instance does
both phases in the same steps.

Every instance runs the engine's own scheduler and block manager (see instance.py); only the
duration of a step comes from a model. Events at the same instant are applied in the order of
``_Event`` before any step starts, so requests arriving together share a step.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.planner.sim.config import ClusterSpec
from pdserve.planner.sim.instance import SimInstance
from pdserve.planner.sim.requests import SimRequest, check_request
from pdserve.planner.sim.results import PoolMonitor, SimulationResult
from pdserve.traffic.records import RequestRecord


class _Event(enum.IntEnum):
    """Kinds of event; at equal times the smaller is applied first."""

    STEP_END = 0
    TRANSFER_END = 1
    ARRIVAL = 2
    START_STEP = 3


@dataclass
class _Flight:
    """One request's journey through the cluster."""

    index: int
    request: SimRequest
    token_times: list[float] = field(default_factory=list)
    """When the client had each output token."""
    end: float | None = None
    error: str | None = None
    prefill: SimInstance | None = None
    decode: SimInstance | None = None

    @property
    def request_id(self) -> str:
        return f"r{self.index}"

    def record(self) -> RequestRecord:
        request = self.request
        return RequestRecord(
            index=self.index,
            kind=request.kind,
            scheduled=request.arrival_time,
            sent=request.arrival_time,
            first_token=self.token_times[0] if self.token_times else None,
            end=self.end,
            chunk_times=self.token_times,
            chunk_tokens=[1] * len(self.token_times),
            prompt_tokens=request.input_tokens,
            output_tokens=len(self.token_times),
            max_tokens=request.output_tokens,
            error=self.error,
        )


RequestLike = SimRequest | tuple[float, int, int]
"""A request, or a plain ``(arrival_time_s, input_tokens, output_tokens)``."""


def simulate(cluster: ClusterSpec, requests: Iterable[RequestLike]) -> SimulationResult:
    return Simulator(cluster).run(requests)


class Simulator:
    """Runs one request stream through a cluster; its instances stay inspectable afterwards."""

    def __init__(self, cluster: ClusterSpec) -> None:
        self.cluster = cluster
        roles = {"prefill": cluster.prefill, "decode": cluster.decode, "colocated": cluster.colocated}
        self.pools = {
            role: [SimInstance(f"{role}-{i}", role, spec) for i, spec in enumerate(specs)]
            for role, specs in roles.items()
            if specs
        }
        self.now = 0.0
        self._events: list[tuple[float, _Event, int, object]] = []
        self._order = itertools.count()
        self._turns = {role: itertools.count() for role in self.pools}
        self._flights: dict[str, _Flight] = {}
        self._wake_pending: set[str] = set()
        self._arrived_imports: dict[str, list[Sequence]] = {}
        """Per decode instance: KV that arrived during its step, adopted when the step ends."""
        self._ran = False

    def run(self, requests: Iterable[RequestLike]) -> SimulationResult:
        if self._ran:
            raise RuntimeError("a Simulator runs once; make another for another run")
        self._ran = True
        stream = sorted((SimRequest(*r) for r in requests), key=lambda r: r.arrival_time)
        for request in stream:
            check_request(request)
        flights = [_Flight(index, request) for index, request in enumerate(stream)]
        self._flights = {flight.request_id: flight for flight in flights}
        for flight in flights:
            arrival = flight.request.arrival_time + self.cluster.router_overhead_s
            self._push(arrival, _Event.ARRIVAL, flight)

        start = self.now = stream[0].arrival_time if stream else 0.0
        monitors = [PoolMonitor(role, instances) for role, instances in self.pools.items()]
        while self._events:
            time, kind, _, payload = heapq.heappop(self._events)
            if time > self.now:
                for monitor in monitors:
                    monitor.advance(self.now, time)
                self.now = time
            if kind is _Event.ARRIVAL:
                assert isinstance(payload, _Flight)
                self._arrive(payload)
            elif kind is _Event.START_STEP:
                assert isinstance(payload, SimInstance)
                self._start_step(payload)
            elif kind is _Event.STEP_END:
                assert isinstance(payload, SimInstance)
                self._end_step(payload)
            else:
                assert isinstance(payload, Sequence)
                self._end_transfer(payload)

        stuck = [f.request_id for f in flights if f.end is None and f.error is None]
        if stuck:
            raise RuntimeError(f"simulation stalled with {len(stuck)} requests unfinished: {stuck[:5]}")
        duration = self.now - start
        return SimulationResult(
            records=[flight.record() for flight in flights],
            pools={monitor.role: monitor.stats(duration) for monitor in monitors},
            duration=duration,
        )

    # -- events ----------------------------------------------------------------------------

    def _arrive(self, flight: _Flight) -> None:
        request = flight.request
        num_tokens = request.input_tokens + request.output_tokens
        role = "prefill" if self.cluster.is_disaggregated else "colocated"
        # The engine refuses a request its KV pool could never hold (check_request); the
        # router's reservation only offers it to instances it fits.
        candidates = [i for i in self.pools[role] if i.can_hold(num_tokens)]
        if self.cluster.is_disaggregated and not any(i.can_hold(num_tokens) for i in self.pools["decode"]):
            candidates = []
        if not candidates:
            flight.error = f"{num_tokens} tokens fit no {role} or decode instance's KV pool"
            return
        instance = flight.prefill = self._choose(role, candidates)
        instance.add_prompt(flight.request_id, request.input_tokens, request.output_tokens, self.now,
                            prefill_only=self.cluster.is_disaggregated)
        self._wake(instance)

    def _start_step(self, instance: SimInstance) -> None:
        self._wake_pending.discard(instance.name)
        if instance.busy:
            return
        seconds = instance.start_step()
        if seconds is not None:  # else idle until a transfer or a finish frees blocks
            self._push(self.now + seconds, _Event.STEP_END, instance)

    def _end_step(self, instance: SimInstance) -> None:
        for seq in instance.end_step():
            flight = self._flights[seq.request_id]
            if seq.status is SequenceStatus.FINISHED_PREFILLED:
                if not self.cluster.first_token_after_transfer:
                    flight.token_times.append(self.now)
                self._send_to_decode(flight)
            else:
                self._token(flight, seq)
        if instance.role == "decode":
            for seq in self._arrived_imports.pop(instance.name, []):
                self._adopt(seq)
            self._reserve(instance)  # finished sequences may have freed room for imports
        self._wake(instance)

    def _end_transfer(self, seq: Sequence) -> None:
        flight = self._flights[seq.request_id]
        assert flight.prefill is not None and flight.decode is not None
        flight.prefill.release_kv(flight.request_id)
        self._wake(flight.prefill)  # its freed blocks may unblock a waiting prompt
        if self.cluster.imports_at_step_boundaries and flight.decode.busy:
            self._arrived_imports.setdefault(flight.decode.name, []).append(seq)
            return
        self._adopt(seq)

    def _adopt(self, seq: Sequence) -> None:
        """The decode instance takes over a sequence whose KV has arrived."""
        flight = self._flights[seq.request_id]
        assert flight.decode is not None
        flight.decode.commit_import(seq)
        # The decode instance appended the first token (sampled by the prefill) to its sequence.
        if self.cluster.first_token_after_transfer:
            flight.token_times.append(self.now)
        if seq.is_finished:  # a one-token answer
            flight.end = self.now
            self._reserve(flight.decode)
        self._wake(flight.decode)

    # -- helpers ---------------------------------------------------------------------------

    def _token(self, flight: _Flight, seq: Sequence) -> None:
        flight.token_times.append(self.now)
        if seq.is_finished:
            flight.end = self.now

    def _send_to_decode(self, flight: _Flight) -> None:
        request = flight.request
        num_tokens = request.input_tokens + request.output_tokens
        candidates = [i for i in self.pools["decode"] if i.can_hold(num_tokens)]
        decode = flight.decode = self._choose("decode", candidates)
        decode.queue_import(flight.request_id, request.input_tokens, request.output_tokens, self.now)
        if not (self.cluster.imports_at_step_boundaries and decode.busy):
            self._reserve(decode)  # else when its step ends (_end_step)

    def _reserve(self, decode: SimInstance) -> None:
        """Start the transfer of every import that got its blocks on ``decode``."""
        link = self.cluster.link
        assert link is not None
        for seq in decode.reserve_imports():
            flight = self._flights[seq.request_id]
            assert flight.prefill is not None
            num_bytes = flight.prefill.cost_model.kv_bytes_per_token() * seq.num_prompt_tokens
            self._push(self.now + link.transfer_seconds(num_bytes), _Event.TRANSFER_END, seq)

    def _choose(self, role: str, candidates: list[SimInstance]) -> SimInstance:
        if self.cluster.routing == "round_robin":
            return candidates[next(self._turns[role]) % len(candidates)]
        if role == "prefill":
            return min(candidates, key=lambda i: (i.queued_prompt_tokens(), i.queue_length))
        return min(candidates, key=lambda i: (i.num_in_flight(), -i.block_manager.num_free_blocks))

    def _wake(self, instance: SimInstance) -> None:
        """Start a step now, after the other events of this instant, unless one is running."""
        if not instance.busy and instance.name not in self._wake_pending:
            self._wake_pending.add(instance.name)
            self._push(self.now, _Event.START_STEP, instance)

    def _push(self, time: float, kind: _Event, payload: object) -> None:
        heapq.heappush(self._events, (time, kind, next(self._order), payload))
