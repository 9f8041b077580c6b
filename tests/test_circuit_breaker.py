"""The circuit breaker's states, driven by a fake clock."""

from __future__ import annotations

from pdserve.serving.circuit_breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_the_threshold_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=5.0, clock=clock)
    for _ in range(2):
        breaker.record_failure()
        assert breaker.state == "closed" and breaker.allows()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allows()
    clock.now += 4.9
    assert not breaker.allows()
    clock.now += 0.2
    assert breaker.state == "half_open" and breaker.allows()
    breaker.claim()
    assert not breaker.allows(), "only one probe at a time"
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allows() and breaker.failures == 0


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, max_cooldown=12.0, clock=clock)
    breaker.record_failure()
    cooldowns = []
    for _ in range(3):
        clock.now += breaker.current_cooldown
        assert breaker.state == "half_open"
        breaker.claim()
        breaker.record_failure()
        cooldowns.append(breaker.current_cooldown)
        assert breaker.state == "open"
    assert cooldowns == [10.0, 12.0, 12.0]


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = CircuitBreaker(threshold=2, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_a_probe_that_ends_without_a_verdict_is_released_by_its_owner_only() -> None:
    """A probe whose client left (or that got a 4xx about itself) reports neither success nor
    failure: released by its own request, the next request probes; another request's release
    does not touch it."""
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 5.0
    breaker.claim("probe-a")
    assert breaker.state == "half_open" and not breaker.allows()
    breaker.release("someone-else")
    assert not breaker.allows(), "only the probe's own request releases it"
    breaker.release("probe-a")
    assert breaker.allows() and breaker.state == "half_open"
    breaker.claim("probe-b")
    breaker.record_success()
    breaker.release("probe-b")  # after a verdict: nothing to release
    assert breaker.state == "closed" and breaker.allows()
