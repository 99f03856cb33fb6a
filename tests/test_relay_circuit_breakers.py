"""Circuit breakers per endpoint (``EndpointSettings.max_connections``,
``max_pending``, ``max_active``: an Istio DestinationRule's
``connectionPool.tcp.maxConnections``, ``http.http1MaxPendingRequests``,
``http.http2MaxRequests``), both twins and the compiled one's modes, real
sockets.

A backend A holds its first request until the test opens its gate (the
requests behind it on the same connection are answered at once); a backend
S answers at once: a request to S through the loop after
endpoint_settings() tells that the loop has applied it. The relay routes by
Host: ``a`` to A, ``t`` to A with a route timeout, ``p`` to A with a
retry policy's per-try timeout, ``s`` to S. What is
counted: the statuses, the connections A accepted, the requests A saw,
``overflows()`` and ``pending()``; no test times anything but a bound
(and a wait past a per-try timeout).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from l4proxy.dataplane._pool_py import EndpointSettings, checked_endpoint_settings
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, Verdict
from tests._scripted import (
    CLOSE,
    Scripted,
    Step,
    _answer,
    _client,
    _reset,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.test_relay_edges import _relay
from tests.test_relay_edges_count import Counted

Endpoint = tuple[str, int]
OVERFLOW = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
TIMEOUT_S = 0.3  # host t's route timeout
PER_TRY_S = 1.0
PER_TRY = policy(1, "reset", per_try=PER_TRY_S)  # host p's retry policy: one retry


def _get(host: str, path: str = "/x") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())


def _limits(
    max_connections: int = 0, max_pending: int = 0, max_active: int = 0
) -> EndpointSettings:
    return EndpointSettings(0, 30.0, 5.0, False, max_connections, max_pending, max_active)


class Held:
    """A's first request waits for ``open()``; ``close_after``: that answer
    says ``Connection: close`` (the relay closes the connection after it)."""

    def __init__(self, close_after: bool = False) -> None:
        self.gate = threading.Event()
        self.close_after = close_after

    def step(self, conn: socket.socket) -> None:
        self.gate.wait(10)
        if self.close_after:
            conn.sendall(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        else:
            conn.sendall(_answer(200, b"ok"))

    def open(self) -> None:
        self.gate.set()


@contextmanager
def _setup(
    mode: tuple[str, str], limits: EndpointSettings, held: Held
) -> Iterator[tuple[Any, Scripted, Counted]]:
    """A relay routing a and t to A (its first request held by *held*), s
    to S, with A's *limits* applied; closed at the end."""
    which, how = mode
    script: list[Step] = [held.step]
    a, s = Scripted(script), Scripted([])
    routes: dict[str, tuple[Endpoint, float, Any]] = {
        "a": (a.endpoint, 0.0, None),
        "t": (a.endpoint, TIMEOUT_S, None),
        "p": (a.endpoint, 0.0, PER_TRY),
        "s": (s.endpoint, 0.0, None),
    }
    counted = Counted()
    kw: dict[str, Any] = counted.kw(which)
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            endpoint, timeout, retry = routes[head.host]
            choice = Choice(1, (endpoint,), "ORDERED", tag="t")
            return Verdict((choice,), ttl=60.0, timeout=timeout, retry=retry)

        kw["resolve"] = resolve

    def decide(head: Any, origin: Any) -> Decision:
        endpoint, timeout, retry = routes[head.host]
        return Decision((endpoint,), tag="t", timeout=timeout, retry=retry)

    relay = _relay(which, decide, **kw)
    try:
        relay.endpoint_settings({a.endpoint: limits})
        c = _client(relay)
        c.sendall(_get("s"))
        assert _status(_response(c)) == 200  # applied
        c.close()
        yield relay, a, counted
    finally:
        held.open()
        relay.close()
        a.close()
        s.close()


def _send(relay: Any, host: str = "a", path: str = "/x") -> socket.socket:
    c = _client(relay)
    c.sendall(_get(host, path))
    return c


def _first_held(relay: Any, a: Scripted) -> socket.socket:
    """A client whose request A holds (the first A sees)."""
    c = _send(relay)
    assert _until(lambda: len(a.requests) == 1), a.requests
    return c


def _pending(relay: Any, endpoint: Endpoint, n: int) -> None:
    assert _until(lambda: relay.pending() == ({endpoint: n} if n else {})), relay.pending()


def _overflowed(response: bytes) -> None:
    head, _, body = response.partition(b"\r\n\r\n")
    assert _status(response) == 503, response
    assert b"\r\nx-envoy-overloaded: true\r\n" in head.lower(), response
    assert body == OVERFLOW, response


def test_max_active_overflows_the_second_request(mode: tuple[str, str]) -> None:
    """max_active 1: while A holds one request, a second one to A gets
    Envoy's overflow 503 at once (A never sees it), counted as a 503 and in
    overflows(); its client connection stays: its next request, once the
    first is answered, goes through."""
    held = Held()
    with _setup(mode, _limits(max_active=1), held) as (relay, a, counted):
        first = _first_held(relay, a)
        second = _send(relay)
        _overflowed(_response(second))
        assert relay.overflows() == {a.endpoint: 1}
        assert relay.pending() == {}
        held.open()
        assert _status(_response(first)) == 200
        second.sendall(_get("a"))
        assert _status(_response(second)) == 200  # the same client connection
        assert len(a.requests) == 2, a.requests
        first.close()
        second.close()
        relay.flush_reports(1.0)
        statuses = sorted(st for st, _ in counted.rows)
    assert statuses == [200, 200, 200, 503], statuses  # (s's 200 first)
    assert a.accepted == 1, a.accepted


def test_max_connections_with_one_pending(mode: tuple[str, str]) -> None:
    """max_connections 1, max_pending 1, three clients: the first is served
    (held), the second waits, the third gets the overflow 503 at once; then
    the second goes on the first's connection (A accepted one)."""
    held = Held()
    with _setup(mode, _limits(max_connections=1, max_pending=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        second = _send(relay)
        _pending(relay, a.endpoint, 1)
        third = _send(relay)
        _overflowed(_response(third))
        assert relay.overflows() == {a.endpoint: 1}
        assert len(a.requests) == 1
        held.open()
        assert _status(_response(first)) == 200
        assert _status(_response(second)) == 200
        assert relay.pending() == {}
        for c in (first, second, third):
            c.close()
    assert a.accepted == 1, a.accepted
    assert len(a.requests) == 2, a.requests


def test_max_connections_unlimited_pending(mode: tuple[str, str]) -> None:
    """max_connections 1, max_pending 0 (unlimited): five clients at once
    are all answered 200, in turn, on one connection, in the order they
    came (first come, first served); nothing overflows."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        clients = [_first_held(relay, a)]
        for i in range(1, 5):
            clients.append(_send(relay, path=f"/{i}"))
            _pending(relay, a.endpoint, i)
        held.open()
        assert [_status(_response(c)) for c in clients] == [200] * 5
        assert relay.pending() == {}
        assert relay.overflows() == {}
        for c in clients:
            c.close()
    assert a.accepted == 1, a.accepted
    paths = [r.split(b" ")[1] for r in a.requests]
    assert paths == [b"/x", b"/1", b"/2", b"/3", b"/4"], paths


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pending_client_gone_is_dropped(mode: tuple[str, str]) -> None:
    """A waiting request whose client resets leaves the line: A never sees
    it, the relay holds none of its fds, and the next request goes on the
    connection once it is free."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        before = _fds()
        gone = _send(relay)
        _pending(relay, a.endpoint, 1)
        _reset(gone)
        _pending(relay, a.endpoint, 0)
        assert _until(lambda: _fds() == before), (_fds(), before)
        held.open()
        assert _status(_response(first)) == 200
        later = _send(relay)
        assert _status(_response(later)) == 200
        assert [r.split(b"\r\n")[1] for r in a.requests] == [b"Host: a"] * 2
        first.close()
        later.close()
    assert a.accepted == 1, a.accepted
    assert len(a.requests) == 2, a.requests


def test_pending_request_gets_its_route_timeout(mode: tuple[str, str]) -> None:
    """A waiting request whose route timeout passes gets the 504 and leaves
    the line; A never sees it."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        timed = _send(relay, "t")
        _pending(relay, a.endpoint, 1)
        response = _response(timed)
        assert _status(response) == 504, response
        assert relay.pending() == {}
        held.open()
        assert _status(_response(first)) == 200
        first.close()
        timed.close()
    assert len(a.requests) == 1, a.requests


def test_raised_limit_lets_the_pending_request_go(mode: tuple[str, str]) -> None:
    """endpoint_settings() raising max_connections to 2: the waiting request
    connects at once (a second connection), while the first is still held."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        second = _send(relay)
        _pending(relay, a.endpoint, 1)
        relay.endpoint_settings({a.endpoint: _limits(max_connections=2)})
        assert _status(_response(second)) == 200  # the first still held
        assert relay.pending() == {}
        assert a.accepted == 2, a.accepted
        held.open()
        assert _status(_response(first)) == 200
        first.close()
        second.close()


def test_closed_connection_lets_the_pending_request_connect(mode: tuple[str, str]) -> None:
    """The held answer says Connection: close: the relay closes that
    connection, and the waiting request connects anew (A accepted two)."""
    held = Held(close_after=True)
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        second = _send(relay)
        _pending(relay, a.endpoint, 1)
        held.open()
        assert _status(_response(first)) == 200
        assert _status(_response(second)) == 200
        assert relay.pending() == {}
        first.close()
        second.close()
    assert a.accepted == 2, a.accepted
    assert len(a.requests) == 2, a.requests


def test_pending_try_s_per_try_timer_waits_for_its_connection(mode: tuple[str, str]) -> None:
    """A waiting request under a retry policy with a per-try timeout (1 s)
    waits twice that for A's one connection: its per-try timer does not
    run meanwhile (Envoy's starts when the pool hands the try a
    connection), so it is neither retried nor answered the 504; it stays
    in line, and once A's held request is answered it goes on the released
    connection: its 200, no retry. Before, its per-try timeout passed in
    line: a retry, in line again, then the 504."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        tried = _send(relay, "p")
        _pending(relay, a.endpoint, 1)
        time.sleep(2 * PER_TRY_S)
        assert relay.pending() == {a.endpoint: 1}
        assert relay.stats()["retries"] == 0
        held.open()
        assert _status(_response(first)) == 200
        assert _status(_response(tried)) == 200
        assert relay.pending() == {}
        assert relay.stats()["retries"] == 0
        for c in (first, tried):
            c.close()
    assert a.accepted == 1, a.accepted
    assert len(a.requests) == 2, a.requests


def test_removed_endpoint_serves_its_pending_request(mode: tuple[str, str]) -> None:
    """A's removal from the route table (retain_endpoints) while a request
    waits for it: the waiting request goes as a connect to a removed
    endpoint does (a draining pod still answers): the held connection,
    released, is closed (not pooled: its endpoint left), and the waiting
    request connects anew, below the limit."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        relay.retain_endpoints([a.endpoint])
        first = _first_held(relay, a)
        second = _send(relay)
        _pending(relay, a.endpoint, 1)
        relay.retain_endpoints([])
        check = _send(relay, "s")  # answered through the loop: the removal applied
        assert _status(_response(check)) == 200
        held.open()
        assert _status(_response(first)) == 200
        assert _status(_response(second)) == 200
        assert relay.pending() == {}
        for c in (first, second, check):
            c.close()
        assert _until(lambda: relay.stats()["pool_closed_removed"] == 1), relay.stats()
    assert a.accepted == 2, a.accepted
    assert len(a.requests) == 2, a.requests


def test_checked_settings_take_the_breakers() -> None:
    """checked_endpoint_settings: 3 to 7 fields (the worker's 4 positional
    ones keep working, the breakers 0), each breaker an int 0..2**31-1,
    never a bool."""
    checked = checked_endpoint_settings(
        {("h", 1): (0, 1.0, 2.0, False), ("h", 2): (0, 1, 2, True, 3, 4, 5)}
    )
    assert checked[("h", 1)] == EndpointSettings(0, 1.0, 2.0, False, 0, 0, 0)
    assert checked[("h", 2)] == EndpointSettings(0, 1.0, 2.0, True, 3, 4, 5)
    assert isinstance(checked[("h", 2)].idle_timeout, float)
    for bad in (
        (0, 1.0, 2.0, False, True),
        (0, 1.0, 2.0, False, 0, -1),
        (0, 1.0, 2.0, False, 0, 0, 2**31),
        (0, 1.0, 2.0, False, 0, 0, 1.0),
        (0, 1.0, 2.0, False, 0, 0, 0, 0),
    ):
        with pytest.raises(ValueError):
            checked_endpoint_settings({("h", 3): bad})


def test_a_tunnel_handed_off_lets_the_pending_request_connect() -> None:
    """A WebSocket's upstream connection, handed to the l4 callback at its
    101, is no connection of the pool any more: the request waiting at
    max_connections 1 connects (the pure twin; the compiled one hands
    tunnels to its pure relay, this code)."""
    from l4proxy.dataplane._relay_py import HttpRelay

    gate = threading.Event()

    def upgrade(conn: socket.socket) -> None:
        gate.wait(10)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        conn.recv(1)  # (until the test closes the tunnel)

    a = Scripted([upgrade])
    tunnels: list[socket.socket] = []

    def l4(client: Any, up: Any, to_client: bytes, to_up: bytes, origin: Any, ep: Any) -> None:
        tunnels.extend((client, up))

    relay = HttpRelay(lambda head, origin: Decision((a.endpoint,)), l4)
    relay.start()
    try:
        relay.endpoint_settings({a.endpoint: _limits(max_connections=1)})
        ws = _client(relay)
        ws.sendall(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert _until(lambda: len(a.requests) == 1), a.requests
        waiting = _send(relay)
        _pending(relay, a.endpoint, 1)
        gate.set()
        assert _status(_response(waiting)) == 200
        assert len(tunnels) == 2
        assert a.accepted == 2, a.accepted
        ws.close()
        waiting.close()
    finally:
        gate.set()
        for t in tunnels:
            t.close()
        relay.close()
        a.close()


def test_a_retry_to_an_endpoint_at_max_active_overflows(mode: tuple[str, str]) -> None:
    """The pooled connection's retry (A closed it without an answer) goes to
    the next candidate B, at max_active 1 (a request held there): it is
    not sent (B sees one request), counted in overflows(); the request is
    lost, answered as a first try's overflow (503, Envoy's body: it was
    the 502 of a connection that closed), and no one is told of a failure
    of B."""
    which, how = mode
    held = Held()
    a, b = Scripted([_answer(200, b"ok"), CLOSE]), Scripted([held.step])
    failures: list[Any] = []
    kw: dict[str, Any] = {
        "connect_failed": lambda *args: failures.append(args),
        "response_failed": lambda *args: failures.append(args),
    }
    routes = {"ab": (a.endpoint, b.endpoint), "b": (b.endpoint,)}
    if how == "resolve":
        kw["resolve"] = lambda head, origin: Verdict(
            (Choice(1, routes[head.host], "ORDERED", tag="t"),), ttl=60.0
        )
    relay = _relay(which, lambda head, origin: Decision(routes[head.host], tag="t"), **kw)
    try:
        relay.endpoint_settings({b.endpoint: _limits(max_active=1)})
        first = _send(relay, "ab")  # A's connection, pooled after it
        assert _status(_response(first)) == 200
        holder = _send(relay, "b")
        assert _until(lambda: len(b.requests) == 1), b.requests
        first.sendall(_get("ab"))  # on A's pooled connection: closed, retried to B
        response = _response(first)
        assert _status(response) == 503 and response.endswith(OVERFLOW), response
        assert relay.overflows() == {b.endpoint: 1}
        held.open()
        assert _status(_response(holder)) == 200
        first.close()
        holder.close()
    finally:
        held.open()
        relay.close()
        a.close()
        b.close()
    assert len(b.requests) == 1, b.requests
    assert len(a.requests) == 2, a.requests
    assert [f for f in failures if f[0] == b.endpoint] == [], failures
