"""Outlier detection: consecutive connect failures eject an endpoint for a while."""

from __future__ import annotations

from dataclasses import dataclass

from l4proxy.health import EndpointHealth


@dataclass(frozen=True)
class Ep:
    address: str
    port: int


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ejected_after_consecutive_failures_then_back() -> None:
    clock = Clock()
    h = EndpointHealth(consecutive_failures=3, base_ejection=10, clock=clock)
    ep = Ep("198.18.0.5", 80)
    assert h.is_healthy(ep)
    h.failure(ep, "refused")
    h.failure(ep, "refused")
    assert h.is_healthy(ep)
    h.failure(ep, "refused")
    assert not h.is_healthy(ep)
    assert h.describe(ep)["ejections"] == 1
    clock.now += 9.9
    assert not h.is_healthy(ep)
    clock.now += 0.2
    assert h.is_healthy(ep)


def test_success_resets_the_count_and_ejection_grows() -> None:
    clock = Clock()
    h = EndpointHealth(consecutive_failures=2, base_ejection=10, max_ejection=25, clock=clock)
    ep = Ep("198.18.0.6", 80)
    h.failure(ep, "x")
    h.success(ep)
    h.failure(ep, "x")
    assert h.is_healthy(ep)  # not two in a row
    h.failure(ep, "x")
    assert not h.is_healthy(ep)
    clock.now += 10.1
    h.failure(ep, "x")
    h.failure(ep, "x")
    assert h.describe(ep)["ejected_for_s"] == 20.0  # second ejection: twice as long
    clock.now += 20.1
    for _ in range(2):
        h.failure(ep, "x")
    assert h.describe(ep)["ejected_for_s"] == 25.0  # capped


def test_other_endpoints_unaffected() -> None:
    h = EndpointHealth(consecutive_failures=1)
    h.failure(Ep("a", 1), "x")
    assert not h.is_healthy(Ep("a", 1))
    assert h.is_healthy(Ep("a", 2))
    assert h.is_healthy(Ep("b", 1))
