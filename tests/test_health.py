"""Outlier detection: consecutive connect failures eject an endpoint for a while."""

from __future__ import annotations

from dataclasses import dataclass

from l4proxy.rules.health import EndpointHealth


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


def test_ejection_is_bounded_by_max_ejection_percent() -> None:
    """At most 50 % of a service's endpoints ejected (at least one always may be)."""
    clock = Clock()
    h = EndpointHealth(consecutive_failures=1, base_ejection=10, clock=clock)
    eps = [Ep(f"198.18.0.{i}", 80) for i in range(1, 5)]
    for ep in eps:
        h.failure(ep, "refused", groups=(eps,))
    assert [h.is_healthy(e) for e in eps] == [False, False, True, True]
    assert h.describe(eps[2])["ejections_suppressed"] == 1
    # One comes back: the next failure of a suppressed one ejects it.
    clock.now += 10.1
    h.failure(eps[2], "refused", groups=(eps,))
    assert not h.is_healthy(eps[2])
    # Three endpoints at 50 %: one ejected at most; one of one: that one.
    three = eps[:3]
    h2 = EndpointHealth(consecutive_failures=1, clock=clock)
    for ep in three:
        h2.failure(ep, "x", groups=(three,))
    assert sum(not h2.is_healthy(e) for e in three) == 1
    h3 = EndpointHealth(consecutive_failures=1, clock=clock)
    h3.failure(eps[0], "x", groups=(eps[:1],))
    assert not h3.is_healthy(eps[0])


def test_only_time_ends_an_ejection_and_failures_meanwhile_do_not_count() -> None:
    """A connect under way when the endpoint was ejected succeeded and undid
    the ejection at once; failures while ejected were counted, so the first
    failure after it came back ejected it again, for twice as long."""
    clock = Clock()
    h = EndpointHealth(consecutive_failures=3, base_ejection=10, clock=clock)
    ep = Ep("198.18.0.7", 80)
    for _ in range(3):
        h.failure(ep, "refused")
    h.success(ep)  # the late connect
    assert not h.is_healthy(ep)
    for _ in range(5):
        h.failure(ep, "refused")  # panic mode, in-flight connects
    clock.now += 10.1
    assert h.is_healthy(ep)
    h.failure(ep, "refused")
    assert h.is_healthy(ep)  # one failure after it came back: not three in a row
    assert h.describe(ep)["connect_failures"] == 9  # all counted in the totals


def test_the_ejection_multiplier_decays_while_healthy() -> None:
    """Every ejection made the next longer, for the life of the sidecar: after
    a bad day, a blip a week later was ejected for the maximum (300 s)."""
    clock = Clock()
    h = EndpointHealth(consecutive_failures=1, base_ejection=10, max_ejection=300, clock=clock)
    ep = Ep("198.18.0.8", 80)
    for _ in range(40):  # a bad day: ejected again each time it came back
        h.failure(ep, "refused")
        clock.now += h.describe(ep)["ejected_for_s"] + 0.1
    assert h.describe(ep)["ejections"] == 30  # counted up to what 300 s needs, no further
    clock.now += 7 * 24 * 3600  # a healthy week
    h.failure(ep, "refused")
    assert h.describe(ep)["ejected_for_s"] == 10.0  # was 300
    clock.now += 10.1 + 25  # two spans of 10 s healthy: two off the count (1 -> 0)
    h.failure(ep, "refused")
    assert h.describe(ep)["ejected_for_s"] == 10.0


def test_retain_forgets_endpoints_the_table_no_longer_names() -> None:
    h = EndpointHealth(consecutive_failures=1)
    pods = [Ep(f"198.18.1.{i}", 80) for i in range(1, 200)]
    for ep in pods:
        h.success(ep)
    h.failure(pods[0], "refused")
    assert h.retain(pods[:2]) == 197
    assert not h.is_healthy(pods[0])  # kept: still in the table, still ejected
    assert h.describe(pods[1])["successes"] == 1
    assert h.describe(pods[5])["successes"] == 0  # forgotten


def test_a_base_ejection_above_the_cap_is_its_own_cap() -> None:
    """--ejection-time 600: the first ejection lasts 600 s, not the 300 s
    cap (Envoy's max_ejection_time: 300 s or the base, if longer)."""
    clock = Clock()
    h = EndpointHealth(consecutive_failures=1, base_ejection=600, clock=clock)
    ep = Ep("198.18.0.7", 80)
    h.failure(ep, "x")
    assert h.describe(ep)["ejected_for_s"] == 600.0
