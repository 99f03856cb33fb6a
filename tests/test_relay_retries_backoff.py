"""The wait before a retry of the route's policy: Envoy's jittered
exponential backoff (both twins, real sockets).

Envoy waits before each retry a uniformly random time in [0, (2^n - 1) *
base) for the n-th, at most 10 times base (base 25 ms unless the policy's
``backoff`` says); without it a backend answering 503 at once met a retry
loop as fast as the loopback (a policy of 100000 attempts made thousands of
tries a second). The tests count operations (tries, connections, the
relay's connections), never time a wait, except with bounds 20 times what
they measure.
"""

from __future__ import annotations

import time

import pytest

from l4proxy.dataplane.verdict import DEFAULT_RETRY_BACKOFF, RetryPolicy
from tests._scripted import (
    GET,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _reset,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges import _wait_for
from tests.test_relay_edges_count import Counted

ALWAYS_503 = [_answer(503, b"no")] * 100000


def policy(
    attempts: int, on: str = "5xx", per_try: float = 0.0, backoff: float = DEFAULT_RETRY_BACKOFF
) -> RetryPolicy:
    return RetryPolicy.of(attempts, per_try, on.split(","), (), backoff)


def test_envoy_s_backoff_grows_to_its_cap() -> None:
    """RetryPolicy.backoff_s: [0, 25 ms) before the first retry, [0, 75 ms)
    before the second, [0, 175 ms) before the third, then at most 250 ms
    (Envoy's max interval, 10 times base) however many retries; a policy's
    own base scales it."""
    p = policy(5)
    below = 1 - 1e-9  # u is in [0, 1)
    assert [round(p.backoff_s(n, below), 6) for n in (1, 2, 3)] == [0.025, 0.075, 0.175]
    assert [p.backoff_s(n, below) for n in (4, 5, 100, 100000)] == [0.25] * 4
    assert p.backoff_s(7, 0.5) == pytest.approx(0.1875)  # 15 x 25 ms / 2: past the cap no more
    assert p.backoff_s(1, 0.0) == 0.0
    slow = policy(5, backoff=0.1)
    assert round(slow.backoff_s(2, below), 6) == 0.3 and slow.backoff_s(9, below) == 1.0


def test_a_rule_s_backoff_reaches_the_relay_s_policy() -> None:
    """The worker turns the route's HttpRetry into the relays' RetryPolicy
    with its base interval; both default to Envoy's 25 ms."""
    from l4proxy.rules.routing import DEFAULT_RETRY_BACKOFF as RULES_DEFAULT
    from l4proxy.rules.routing import HttpRetry
    from l4proxy.sidecar.worker import _retry_policy

    assert RULES_DEFAULT == DEFAULT_RETRY_BACKOFF == 0.025
    got = _retry_policy(HttpRetry(3, 0.0, ("5xx",), (), 0.1))
    assert got is not None and got.backoff == 0.1 and got.attempts == 3
    got = _retry_policy(HttpRetry(3))
    assert got is not None and got.backoff == DEFAULT_RETRY_BACKOFF


def test_a_backend_answering_503_at_once_is_not_hammered(mode: tuple[str, str]) -> None:
    """100000 attempts on 5xx against a backend that answers 503 at once,
    under a route timeout of 0.6 s: with the backoff (250 ms at most from
    the fourth retry on) the backend sees a handful of tries, not thousands;
    the client gets the route timeout's 504 once (it passes during a
    backoff, or during a try), counted once; every try's connection is
    closed, never pooled, and the relay holds nothing afterwards."""
    up = Scripted(ALWAYS_503)
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), policy(100000), counted, timeout=0.6)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert got.startswith(b"HTTP/1.1 504 ") and got.endswith(b"upstream request timeout"), got
        tries = len(up.requests)
        # (about 7: 1 + waits averaging 12, 37, 87, then 167 ms; immediate retries made thousands)
        assert 2 <= tries <= 40, tries
        a.close()
        _wait_for("the client is gone", lambda: relay.active() == 0, 3.0)
        _wait_for(
            "every try's connection is closed", lambda: up.closed_by_relay == up.accepted, 3.0
        )
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert [s for s, _ in counted.rows] == [504]
    # a retry decided per 503: the 504 came in its backoff, or while one went
    assert stats["retries"] in (tries - 1, tries), (stats, tries)
    assert stats["active"] == 0 and stats["pool_idle"] == 0, stats


def test_retries_after_their_backoffs_get_the_answer_and_wake_the_loop(
    mode: tuple[str, str],
) -> None:
    """Four 503s, then a 200, for each of three requests: each client gets
    its 200 after four backoffs (the fourth retry's try), counted once. The
    backoff wakes the relay's loop, whose tick is 0.25 s: twelve retries
    sent at the tick would take 2.5 s or so, where the waits are 10 ms at
    most (a base of 1 ms)."""
    up = Scripted([])
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), policy(6, backoff=0.001), counted)
    try:
        a = _client(relay)
        t0 = time.monotonic()
        for _ in range(3):
            up.script = list(ALWAYS_503[:4])
            a.sendall(GET)
            got = _response(a)
            assert _status(got) == 200, got
        took = time.monotonic() - t0
        assert took < 1.2, took
        assert len(up.requests) == 15
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert [s for s, _ in counted.rows] == [200] * 3
    assert stats["retries"] == 12


def test_the_per_try_timer_starts_when_the_retry_is_sent(mode: tuple[str, str]) -> None:
    """Envoy starts a retry's per-try timer when the retry is sent, not
    during its backoff: a per-try timeout of 0.5 s and a backoff of up to
    2 s, a 503 then a 200 at once: the retry's 200 is the client's (a
    timer run during the wait would give the 504 three times in four). The
    per-try timeout leaves a loaded host time to answer (at 0.1 s it gave
    the 504 under load; the backoff keeps its ratio)."""
    up = Scripted([_answer(503, b"no")])
    relay = _proxy(mode, (up.endpoint,), policy(1, "5xx", per_try=0.5, backoff=2.0))
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 200, got
        assert len(up.requests) == 2
        a.close()
    finally:
        relay.close()
        up.close()


def test_a_client_gone_during_the_backoff_leaks_nothing(mode: tuple[str, str]) -> None:
    """The client resets its connection while its request waits for a
    retry's backoff (up to 200 ms): the relay's connection ends (the
    compiled twin at once, the pure twin when the retry is answered: it
    does not watch a client whose request was read), nothing of it is left
    when the backoff passes, the upstream connections are closed or pooled,
    and the relay serves the next client."""
    up = Scripted(ALWAYS_503)
    relay = _proxy(mode, (up.endpoint,), policy(100000, backoff=0.2), timeout=2.0)
    try:
        a = _client(relay)
        a.sendall(GET)
        _wait_for("the first try", lambda: len(up.requests) >= 1, 3.0)
        _reset(a)
        up.script = []  # from now on 200s: the pure twin's next retry ends it
        _wait_for("the client's connection is gone", lambda: relay.active() == 0, 3.0)
        time.sleep(0.25)  # the backoff of the gone connection passed (200 ms at most)

        def settled() -> bool:
            return up.closed_by_relay + relay.stats()["pool_idle"] == up.accepted

        _wait_for("the upstream connections are closed or pooled", settled, 3.0)
        assert len(up.requests) <= 5, len(up.requests)
        b = _client(relay)
        b.sendall(GET)
        assert _status(_response(b)) == 200
        b.close()
        _wait_for("the second client is gone", lambda: relay.active() == 0, 3.0)
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert stats["active"] == 0, stats
