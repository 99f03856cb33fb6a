"""Route, per-try and connect timeouts fire on time, not on the 0.25 s tick
(both twins, real sockets).

Each relay's loop wakes for the soonest deadline it has (a route timeout, a
per-try timeout, a retry's backoff, a connect's deadline), as Envoy's timers
fire, where it once
judged them at its 0.25 s tick only: a 50 ms timeout fired anywhere between
50 and 300 ms. The timings are asserted with bounds the tick cannot meet
whatever the load: back-to-back requests on one connection, each one's
timer started just after the previous one's fired, so that a tick-driven
timer took a whole tick per request. And the steady state is counted, not
timed: keep-alive requests answered well within their route timeout wake
the loop's timer scan about once per timeout, never per request. And a
retry's wait is no idleness: the idle timeout runs from the retry's send.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    STALL,
    Scripted,
    _answer,
    _client,
    _proxy,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
)

TICK = 0.25  # the relays' tick (TICK_S, _TICK)
N = 8  # requests, one after another on one connection


def _timed_504s(relay: Any) -> tuple[list[float], list[bytes], dict[str, int]]:
    """N GETs one after another on one connection, each answered 504: how
    long each took, the answers, and the relay's stats after them."""
    a = _client(relay)
    took, answers = [], []
    for _ in range(N):
        t0 = time.monotonic()
        a.sendall(GET)
        got = _response(a)
        took.append(time.monotonic() - t0)
        assert _status(got) == 504, got
        answers.append(got)
    a.close()
    return took, answers, relay.stats()


def test_a_route_timeout_fires_on_time_not_on_the_tick(mode: tuple[str, str]) -> None:
    """A 50 ms route timeout and a backend that never answers: N 504s in a
    row, each well before the tick after its deadline. The first request's
    504 at a tick comes 50 to 300 ms after it; each later one's timer starts
    just after that tick, so its 504 waited for the next: N of them took at
    least (N - 1) ticks, 1.75 s, where on time they take N x 50 ms, 0.4 s;
    the bound of 1.2 s leaves 100 ms a request to a loaded machine. None
    comes early."""
    timeout = 0.05
    up = Scripted([STALL] * (N + 5))
    relay = _proxy(mode, (up.endpoint,), None, timeout=timeout)
    try:
        took, answers, stats = _timed_504s(relay)
    finally:
        relay.close()
        up.close()
    for got in answers:
        assert got.endswith(b"upstream request timeout"), got
    assert min(took) >= timeout, took
    assert sum(took) < 1.2, took  # (the tick: at least (N - 1) x TICK, 1.75 s)
    assert stats["timeouts"] >= N and stats["timer_scans"] >= N


def test_a_per_try_timeout_fires_on_time_not_on_the_tick(mode: tuple[str, str]) -> None:
    """A 50 ms per-try timeout, one retry (a backoff of 1 ms at most) and a
    backend that never answers: each request's two tries time out and its
    504 comes. On the tick the first try's timeout of each request but the
    first waited for the next tick, and its retry's for the one after: two
    ticks a request, (N - 1) x 2 x 0.25 s in all, 3.5 s; on time N x 2 x
    50 ms, 0.8 s. The bound, 2.0 s, leaves 75 ms a try to a loaded machine."""
    per_try = 0.05
    up = Scripted([STALL] * (2 * N + 5))
    retry = RetryPolicy.of(1, per_try, ["5xx"], (), 0.001)
    relay = _proxy(mode, (up.endpoint,), retry)
    try:
        took, _, stats = _timed_504s(relay)
    finally:
        relay.close()
        up.close()
    assert min(took) >= 2 * per_try, took
    assert sum(took) < 2.0, took  # (the tick: at least (N - 1) x 2 x TICK, 3.5 s)
    assert len(up.requests) == 2 * N
    assert stats["retries"] == N


def test_the_steady_state_scans_about_once_per_route_timeout(mode: tuple[str, str]) -> None:
    """Keep-alive requests with a route timeout of 0.5 s answered at once,
    back to back for 1.5 s (hundreds of them): the loop's timer scans stay
    about one per timeout (after a scan the soonest deadline is the oldest
    request in flight's, a timeout from its start; none in flight: none
    until the next request's), at most two per timeout however slow a
    request, never one per request, nor a spin on a deadline past."""
    timeout = 0.5
    up = Scripted([])  # 200 ok, at once
    relay = _proxy(mode, (up.endpoint,), None, timeout=timeout)
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _status(_response(a)) == 200
        before = relay.stats()["timer_scans"]
        n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * timeout:
            a.sendall(GET)
            assert _status(_response(a)) == 200
            n += 1
        took = time.monotonic() - t0
        scans = relay.stats()["timer_scans"] - before
        a.close()
    finally:
        relay.close()
        up.close()
    assert n >= 20, n  # (a relay this slow tells nothing)
    assert 1 <= scans <= 2 * (took / timeout) + 2, (scans, took, n)


def test_a_connect_timeout_fires_on_time_not_on_the_tick(mode: tuple[str, str]) -> None:
    """A 50 ms connect timeout and a first endpoint that never answers a
    SYN (its accept queue full), the second answering at once: N requests
    in a row on one connection, each one's connect given up at its
    deadline, then answered by the second. On the tick each but the first
    waited for a whole tick, (N - 1) x 0.25 s in all, 1.75 s; on time N x
    50 ms, 0.4 s; the bound of 1.2 s leaves 100 ms a request to a loaded
    machine. None gave up early."""
    connect_timeout = 0.05
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(0)
    filler = socket.create_connection(hang.getsockname())  # the queue's one place
    up = Scripted([])  # 200 ok, at once
    relay = _proxy(mode, (hang.getsockname(), up.endpoint), None, connect_timeout=connect_timeout)
    try:
        a = _client(relay)
        took = []
        for _ in range(N):
            t0 = time.monotonic()
            a.sendall(GET)
            assert _status(_response(a)) == 200
            took.append(time.monotonic() - t0)
        a.close()
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
        filler.close()
        hang.close()
    assert stats["connect_errors"] == N, stats  # (each request tried the first)
    assert min(took) >= connect_timeout, took
    assert sum(took) < 1.2, took  # (the tick: at least (N - 1) x TICK, 1.75 s)


def test_a_retry_s_wait_longer_than_the_idle_timeout_is_no_idleness(mode: tuple[str, str]) -> None:
    """An idle timeout of 0.1 s and a policy's backoff of 2 s: K clients'
    requests, each answered 503, wait up to 2 s for their retry (uniform,
    seeded). A wait is no idleness: every client gets the retry's 200.
    Counted from the 503, the idle timeout closed each client whose wait
    passed 0.1 s to 0.35 s (a tick) with no answer: all but about one in
    six of them."""
    k = 8
    up = Scripted([_answer(503, b"no")] * k)  # then 200 ok
    retry = RetryPolicy.of(1, 0.0, ["5xx"], (), 2.0)
    relay = _proxy(mode, (up.endpoint,), retry, idle_timeout=0.1, seed=7)
    statuses: list[int | bytes] = [0] * k

    def ask(i: int) -> None:
        a = _client(relay)
        try:
            a.sendall(GET)
            statuses[i] = _status(_response(a, timeout=10.0))
        except AssertionError as exc:  # the connection closed with no answer
            statuses[i] = str(exc).encode()
        finally:
            a.close()

    try:
        clients = [threading.Thread(target=ask, args=(i,)) for i in range(k)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert statuses == [200] * k, statuses
    assert stats["retries"] == k and len(up.requests) == 2 * k
