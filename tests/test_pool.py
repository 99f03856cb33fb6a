"""Upstream connection pools (l4proxy.dataplane._pool_py): which connection, kept or closed."""

from __future__ import annotations

import pytest

from l4proxy.dataplane._pool_py import EndpointSettings, PoolOptions, Pools

A = ("198.18.0.10", 8080)
B = ("198.18.0.11", 8080)
C = ("198.18.0.12", 8080)


def test_reuse_is_lifo_per_endpoint_and_counted() -> None:
    p = Pools()
    assert p.checkout(A) is None
    p.opened(A, 1)
    p.opened(A, 2)
    assert p.active(A) == 2
    assert p.checkin(A, 1, reusable=True, now=0.0) == []
    assert p.checkin(A, 2, reusable=True, now=1.0) == []
    assert (p.active(A), p.idle(A)) == (0, 2)
    assert p.checkout(B) is None  # pools are per endpoint
    assert p.checkout(A) == 2  # the most recently used first
    assert p.checkout(A) == 1
    assert p.checkout(A) is None
    assert p.counters["opened"] == 2 and p.counters["reused"] == 2


def test_unreusable_max_requests_and_overflow_are_closed() -> None:
    p = Pools(PoolOptions(max_idle=1, max_requests=2))
    p.opened(A, 1)
    assert p.checkin(A, 1, reusable=False, now=0) == [1]
    p.opened(A, 2)
    p.opened(A, 3)
    assert p.checkin(A, 2, reusable=True, now=0) == []
    assert p.checkin(A, 3, reusable=True, now=0) == [3]  # max_idle 1
    assert p.checkout(A) == 2
    assert p.checkin(A, 2, reusable=True, now=0) == [2]  # its second request: max_requests
    c = p.counters
    assert (c["closed_unreusable"], c["closed_overflow"], c["closed_max_requests"]) == (1, 1, 1)
    assert p.snapshot() == {A: (0, 0)}


def test_an_idle_connection_the_server_closed_is_never_handed_out() -> None:
    p = Pools()
    for h in (1, 2, 3):
        p.opened(A, h)
    for h in (1, 2, 3):
        p.checkin(A, h, reusable=True, now=0)
    assert p.evict(3) is True
    assert p.evict(3) is False  # once
    assert p.checkout(A) == 2
    assert p.evict(2) is False  # checked out: not the pool's to evict
    assert p.counters["evicted"] == 1


def test_idle_timeout_expires_the_oldest() -> None:
    p = Pools(PoolOptions(idle_timeout=10))
    for h, t in ((1, 0.0), (2, 5.0), (3, 9.0)):
        p.opened(A, h)
        p.checkin(A, h, reusable=True, now=t)
    assert p.expire(now=9.9) == []
    assert p.expire(now=15.0) == [1, 2]
    assert p.checkout(A) == 3 and p.counters["expired"] == 2


def test_an_endpoint_s_own_settings_apply_to_it_alone_from_then_on() -> None:
    """A's max_requests 1 and idle_timeout 2 s (endpoint_settings), B the
    options' (unlimited, 10 s); then A unlimited, then A not named: the
    options' again. Each applies from then on."""
    p = Pools(PoolOptions(idle_timeout=10))
    p.endpoint_settings({A: EndpointSettings(1, 2.0, 1.0)})
    p.opened(A, 1)
    p.opened(B, 2)
    assert p.checkin(A, 1, reusable=True, now=0) == [1]  # its first request: its max
    assert p.checkin(B, 2, reusable=True, now=0) == []
    p.opened(A, 3)
    p.endpoint_settings({A: EndpointSettings(0, 2.0, 1.0)})
    assert p.checkin(A, 3, reusable=True, now=0) == []
    assert p.expire(now=2.5) == [3]  # A's 2 s
    assert p.idle(B) == 1 and p.expire(now=9.0) == []
    p.opened(A, 4)
    p.checkin(A, 4, reusable=True, now=9.0)
    p.endpoint_settings({})  # the options' again: 10 s
    assert p.expire(now=12.0) == [2]  # B's, idle since 0
    assert p.expire(now=18.5) == []
    assert p.expire(now=19.5) == [4]
    assert p.counters["closed_max_requests"] == 1 and p.counters["expired"] == 3


def test_active_counts_checked_out_connections_for_least_conn() -> None:
    p = Pools()
    p.opened(A, 1)
    p.opened(B, 2)
    p.opened(B, 3)
    assert (p.active(A), p.active(B)) == (1, 2)
    assert p.discard(B, 2) is True  # a reset mid-request
    assert p.active(B) == 1
    assert p.discard(B, 2) is False and p.active(B) == 1  # twice: no miscount
    with pytest.raises(ValueError):
        p.opened(B, 3)


def test_a_connection_counts_from_its_connect_on() -> None:
    """LEAST_REQUEST reads active(): a connection still connecting counts (a
    request counts from its assignment); a failed connect is forgotten."""
    p = Pools()
    p.connecting(B, 1)
    p.connecting(B, 2)
    assert p.active(B) == 2 and p.counters["opened"] == 0
    p.connected()
    assert p.discard(B, 2) is True  # its connect failed
    assert p.active(B) == 1 and p.counters["opened"] == 1
    assert p.checkin(B, 1, reusable=True, now=0) == []
    assert (p.active(B), p.idle(B)) == (0, 1)


def test_external_connections_count_for_least_conn_and_own_changes_are_told() -> None:
    """add_external(): what LEAST_REQUEST must see that the pool does not hold
    (tunnels in the pump, the worker's L4 connections) counts in active()
    and in /clusters' snapshot; on_active hears of every change of the
    pool's own count (the compiled relay's slow path feeds its loop so)."""
    p = Pools()
    told: list[tuple[object, int]] = []
    p.on_active = lambda endpoint, n: told.append((endpoint, n))
    p.add_external(B, 2)
    p.add_external(C, 1)
    p.opened(A, 1)
    p.connecting(B, 2)
    assert (p.active(A), p.active(B), p.active(C)) == (1, 3, 1)
    assert p.snapshot() == {A: (1, 0), B: (3, 0), C: (1, 0)}
    p.checkin(A, 1, reusable=True, now=0)
    assert p.checkout(A) == 1
    p.discard(B, 2)
    p.add_external(B, -2)
    p.add_external(C, -1)
    assert (p.active(B), p.active(C)) == (0, 0)
    assert told == [(A, 1), (B, 1), (A, -1), (A, 1), (B, -1)]  # its own only
    assert p.expire(now=100) == [] and p.snapshot() == {A: (1, 0)}  # B: nothing left


def test_removed_endpoint_gives_back_its_idle_connections() -> None:
    p = Pools()
    p.opened(A, 1)
    p.opened(A, 2)
    p.checkin(A, 1, reusable=True, now=0)
    assert p.remove_endpoint(A) == [1]
    assert p.active(A) == 1  # the one in flight finishes, then is closed
    assert p.remove_endpoint(B) == []
    assert p.checkin(A, 2, reusable=True, now=0) == [2]
    assert p.counters["closed_removed"] == 2 and p.snapshot() == {A: (0, 0)}


def test_an_endpoint_named_again_pools_its_connections_in_flight() -> None:
    p = Pools()
    p.opened(A, 1)
    p.opened(A, 2)
    p.opened(A, 3)
    assert p.remove_endpoint(A) == []
    assert p.discard(A, 3) is True  # a reset meanwhile: forgotten, not closed twice
    p.restore_endpoint(A)
    assert p.checkin(A, 1, reusable=True, now=0) == []
    assert p.remove_endpoint(A) == [1]  # idle now: closed at once
    assert p.checkin(A, 2, reusable=False, now=0) == [2]  # not reusable anyway
    assert p.counters["closed_unreusable"] == 1 and p.counters["closed_removed"] == 1


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        PoolOptions(max_idle=-1)


def test_an_endpoint_with_nothing_pooled_or_in_flight_is_forgotten() -> None:
    """PassthroughCluster makes an endpoint of every address an app calls:
    the table keeps only those that hold a connection."""
    p = Pools(PoolOptions(idle_timeout=10))
    for i in range(1000):
        ep = (f"198.18.{i // 256}.{i % 256}", 80)
        p.opened(ep, i)
        p.checkin(ep, i, reusable=i % 2 == 0, now=0.0)  # odd: closed, not pooled
    p.opened(A, "busy")  # in flight across the expiry
    assert len(p.snapshot()) == 1001
    assert len(p.expire(now=5.0)) == 0 and len(p.snapshot()) == 501  # idle ones stay
    assert len(p.expire(now=20.0)) == 500
    assert p.snapshot() == {A: (1, 0)}
    p.checkin(A, "busy", reusable=True, now=20.0)
    assert p.checkout(A) == "busy"  # still pooled as before


def test_endpoint_settings_shared_by_many_endpoints_are_checked_as_each_is() -> None:
    """checked_endpoint_settings checks each distinct value once (a table's
    tens of thousands of endpoints share a few, checked on the event loop at
    each swap): the endpoints sharing one get the same checked tuple, and a
    value equal to one already checked but of another type (True == 1, a
    bool is no count) is checked on its own and refused."""
    from l4proxy.dataplane._pool_py import EndpointSettings, checked_endpoint_settings

    many = {(f"10.0.0.{i}", 80): (5, 30, 2.5) for i in range(1, 200)}
    out = checked_endpoint_settings(many)
    assert len(out) == 199 and len({id(v) for v in out.values()}) == 1
    assert out[("10.0.0.7", 80)] == EndpointSettings(5, 30.0, 2.5)
    assert isinstance(out[("10.0.0.7", 80)].idle_timeout, float)
    with pytest.raises(ValueError, match="max_requests must be an int"):
        checked_endpoint_settings(
            {("10.0.0.1", 80): (1, 30, 2.5), ("10.0.0.2", 80): (True, 30, 2.5)}
        )
    with pytest.raises(ValueError, match="idle_timeout must be a finite"):
        checked_endpoint_settings({("a", 1): (1, 1, 1), ("b", 1): (1, True, 1)})
