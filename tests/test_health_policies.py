"""Outlier detection with a DestinationRule's outlierDetection (OutlierPolicy)
per endpoint: the application's 5xx, gateway statuses, split local failures,
Istio's ejection times and bound; the sidecar's own detection elsewhere."""

from __future__ import annotations

import pytest

from l4proxy.rules.health import EndpointHealth
from l4proxy.rules.routing import OutlierPolicy
from tests.test_health import Clock, Ep

A = Ep("198.18.0.1", 80)
B = Ep("198.18.0.2", 80)
C = Ep("198.18.0.3", 80)


def P(**fields: float | bool) -> OutlierPolicy:
    """A policy whose bound lets an endpoint alone be ejected (Istio's 10 %
    would not: see test_the_bound_has_no_floor)."""
    return OutlierPolicy(**{"max_ejection_percent": 100, **fields})  # type: ignore[arg-type]


def _health(policy: OutlierPolicy | None = None, *eps: Ep) -> tuple[EndpointHealth, Clock]:
    clock = Clock()
    h = EndpointHealth(consecutive_failures=3, base_ejection=10, clock=clock)
    if policy is not None:
        h.configure({(e.address, e.port): policy for e in (eps or (A,))})
    return h, clock


def test_five_5xx_in_a_row_eject_for_the_base_time() -> None:
    h, clock = _health(P())
    for _ in range(4):
        h.status(A, 500)
    assert h.is_healthy(A)
    h.status(A, 500)
    assert not h.is_healthy(A)
    d = h.describe(A)
    assert d["ejected_for_s"] == 30.0  # Istio's baseEjectionTime
    assert d["status_failures"] == 5
    assert d["outlier_detection"] == "DestinationRule"
    assert d["last_error"] == "upstream answered 500"
    clock.now += 30.1
    assert h.is_healthy(A)


def test_an_answer_below_500_ends_the_run() -> None:
    h, _ = _health(P())
    for _ in range(4):
        h.status(A, 503)
    h.success(A)
    for _ in range(4):
        h.status(A, 503)
    assert h.is_healthy(A)
    h.status(A, 503)
    assert not h.is_healthy(A)


def test_gateway_errors_count_502_503_504_and_another_5xx_ends_their_run() -> None:
    policy = P(consecutive_5xx=0, consecutive_gateway=3)
    h, _ = _health(policy)
    h.status(A, 502)
    h.status(A, 504)
    h.status(A, 500)  # not a gateway error: the run ends
    h.status(A, 503)
    h.status(A, 502)
    assert h.is_healthy(A)
    h.status(A, 504)
    assert not h.is_healthy(A)


def test_5xx_off_counts_no_500() -> None:
    h, _ = _health(P(consecutive_5xx=0, consecutive_gateway=0))
    for _ in range(50):
        h.status(A, 500)
        h.failure(A, "refused")
    assert h.is_healthy(A)
    assert h.describe(A)["status_failures"] == 50


def test_the_proxys_own_failures_count_as_5xx_unless_split() -> None:
    h, _ = _health(P(consecutive_5xx=3))
    h.failure(A, "refused")
    h.status(A, 500)
    assert h.is_healthy(A)
    h.failure(A, "reset", kind="response")
    assert not h.is_healthy(A)


def test_split_local_failures_have_their_own_run() -> None:
    h, _ = _health(P(consecutive_5xx=3, split_local=True, consecutive_local=2))
    h.status(A, 500)
    h.failure(A, "refused")  # local: not a 5xx
    h.status(A, 500)
    assert h.is_healthy(A)  # 5xx run 2, local run 0 (a response ended it)
    h.failure(A, "refused")
    h.failure(A, "refused")
    assert not h.is_healthy(A)  # two local failures in a row


def test_split_local_zero_counts_no_local_failure() -> None:
    h, _ = _health(P(split_local=True, consecutive_local=0))
    for _ in range(20):
        h.failure(A, "refused")
    assert h.is_healthy(A)


def test_failures_while_ejected_do_not_count() -> None:
    h, clock = _health(P(consecutive_5xx=2))
    h.status(A, 500)
    h.status(A, 500)
    assert not h.is_healthy(A)
    for _ in range(5):
        h.status(A, 500)
    clock.now += 30.1
    assert h.is_healthy(A)
    h.status(A, 500)
    assert h.is_healthy(A)  # one in the new run


def test_ejections_grow_to_300s_and_decay_per_interval() -> None:
    policy = P(consecutive_5xx=1, base_ejection=100, interval=5)
    h, clock = _health(policy)
    h.status(A, 500)
    assert h.describe(A)["ejected_for_s"] == 100.0
    clock.now += 100.1
    h.status(A, 500)
    assert h.describe(A)["ejected_for_s"] == 200.0
    clock.now += 200.1
    h.status(A, 500)
    assert h.describe(A)["ejected_for_s"] == 300.0  # Envoy's max_ejection_time
    clock.now += 300.1 + 3 * 5  # healthy three intervals: three ejections off
    h.status(A, 500)
    assert h.describe(A)["ejected_for_s"] == 100.0


def test_a_base_above_300s_is_its_own_maximum() -> None:
    h, _ = _health(P(consecutive_5xx=1, base_ejection=400))
    h.status(A, 500)
    assert h.describe(A)["ejected_for_s"] == 400.0


@pytest.mark.parametrize(("percent", "ejected"), [(10, 0), (25, 1), (50, 2), (100, 4)])
def test_max_ejection_percent_bounds_the_peers(percent: float, ejected: int) -> None:
    eps = [Ep(f"198.18.0.{i}", 80) for i in range(1, 5)]
    h, _ = _health(P(consecutive_5xx=1, max_ejection_percent=percent), *eps)
    for ep in eps:
        h.status(ep, 503, (eps,))
    assert sum(not h.is_healthy(ep) for ep in eps) == ejected
    assert sum(h.describe(ep)["ejections_suppressed"] for ep in eps) == 4 - ejected


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "sidecar"])
def test_the_bound_holds_in_each_destination_of_the_endpoint(rule: bool) -> None:
    """A pod in two destinations (subset v1 of A and B, and the service's
    four pods) is ejected only where both stay within 50 %: A's ejection
    leaves v1 at one of two and the service at one of four; B's would
    leave v1 empty, so it is refused, though the service's four would take
    it. C, in the service alone, goes (two of four), D then not (three).
    The sidecar's own detection is bounded so too."""
    D = Ep("198.18.0.4", 80)
    v1, service = (A, B), (A, B, C, D)
    policy = P(consecutive_5xx=3, max_ejection_percent=50) if rule else None
    h, _ = _health(policy, *service)

    def fail(ep: Ep, *groups: tuple[Ep, ...]) -> None:
        for _ in range(3):  # (a run of 3: the rule's, the sidecar's own)
            if rule:
                h.status(ep, 503, groups)
            else:
                h.failure(ep, "refused", groups)

    fail(A, v1, service)
    fail(B, v1, service)
    assert (h.is_healthy(A), h.is_healthy(B)) == (False, True)
    assert h.describe(B)["ejections_suppressed"] == 1
    fail(C, service)
    assert not h.is_healthy(C)
    fail(D, service)
    assert h.is_healthy(D)


def test_other_endpoints_keep_the_sidecars_own_detection() -> None:
    h, _ = _health(P(consecutive_5xx=1), A)
    for _ in range(10):
        h.status(B, 500)  # (not reported for B; and not counted if it were)
    assert h.is_healthy(B)
    assert h.describe(B)["outlier_detection"] == "sidecar"
    for _ in range(3):
        h.failure(B, "refused")
    assert not h.is_healthy(B)  # the sidecar's 3 gateway failures
    assert h.describe(B)["ejected_for_s"] == 10.0  # its --ejection-time


def test_the_bound_has_no_floor() -> None:
    """Envoy since 1.27 (Istio never sets always_eject_one_host): with
    Istio's default 10 %, one pod alone, or one of three, is never ejected;
    the sidecar's own detection keeps its floor of one."""
    eps = [A, B, C]
    h, _ = _health(OutlierPolicy(consecutive_5xx=1), *eps)
    for _ in range(10):
        h.status(A, 500)
        h.status(B, 500, (eps,))
    assert h.is_healthy(A) and h.is_healthy(B)
    assert h.describe(B)["ejections_suppressed"] == 10
    sidecar, _ = _health()
    for _ in range(3):
        sidecar.failure(B, "refused", (eps,))
    assert not sidecar.is_healthy(B)


def test_an_ejection_the_bound_stops_ends_the_run() -> None:
    """As in Envoy: refused by the bound, the endpoint needs a whole new run
    (the sidecar's own detection tries again at its next failure)."""
    eps = [A, B]
    h, clock = _health(P(consecutive_5xx=3, max_ejection_percent=50), *eps)
    for _ in range(3):
        h.status(A, 500, (eps,))
    assert not h.is_healthy(A)
    for _ in range(3):
        h.status(B, 500, (eps,))
    assert h.is_healthy(B) and h.describe(B)["ejections_suppressed"] == 1
    clock.now += 30.1  # A is back
    h.status(B, 500, (eps,))
    h.status(B, 500, (eps,))
    assert h.is_healthy(B)  # a run of two, not five
    h.status(B, 500, (eps,))
    assert not h.is_healthy(B)


def test_a_reload_that_changes_the_detection() -> None:
    """Counts are kept across a reload that changes nothing; one that
    changes an endpoint's policy starts its runs again and ends the ejection
    a rule made (a one-step rollback), not one the sidecar's detection made."""
    h, _ = _health(P(consecutive_5xx=3))
    h.status(A, 500)
    h.status(A, 500)
    h.configure({(A.address, A.port): P(consecutive_5xx=3)})  # the same
    h.status(A, 500)
    assert not h.is_healthy(A)
    h.configure({(A.address, A.port): P(consecutive_5xx=3, base_ejection=60)})
    assert h.is_healthy(A) and h.describe(A)["consecutive_failures"] == 0
    h.status(A, 500)
    h.status(A, 500)
    h.status(A, 500)
    assert h.describe(A)["ejected_for_s"] == 120.0  # the second ejection, 60 s base
    h.configure({})  # the rule removed: back at once, now the sidecar's
    assert h.is_healthy(A)
    assert h.policy(A) is None
    assert h.describe(A)["outlier_detection"] == "sidecar"
    for _ in range(3):
        h.failure(A, "refused")
    assert not h.is_healthy(A)
    h.configure({(A.address, A.port): P()})  # the sidecar's ejection stays
    assert not h.is_healthy(A)
