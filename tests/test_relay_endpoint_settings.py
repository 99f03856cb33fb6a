"""Per-endpoint pool and connect settings (``HttpRelay.endpoint_settings``:
an Istio DestinationRule's ``trafficPolicy.connectionPool`` per
destination), both twins, real sockets.

Two endpoints A and B in one relay, A with settings of its own, B with the
relay's (the constructor's: unlimited requests per connection, a pool idle
timeout of 30 s, a connect timeout of 5 s): A's requests per upstream
connection, pool idle timeout and connect timeout apply to A alone; the
settings replaced at runtime apply from then on, to the connections
already open too; an endpoint named before it was ever used gets its own;
values out of range are refused, and the settings in effect stay.

The relay routes by Host: ``a`` to A, ``b`` to B, ``s`` to S (a third
backend: a request answered through the loop after endpoint_settings()
tells that the loop has applied it, which it does after the events of the
batch its wake-up came in).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from l4proxy.dataplane._pool_py import EndpointSettings
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, Verdict
from tests._scripted import (
    Scripted,
    _client,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges import _relay

Endpoint = tuple[str, int]
DEFAULT_CONNECT = 5.0  # the constructor's (the relays' default)
DEFAULT_IDLE = 30.0  # PoolOptions' idle_timeout


def _get(host: str) -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()


def _hosts(mode: tuple[str, str], routes: dict[str, tuple[Endpoint, ...]], **kw: Any) -> Any:
    """A relay (started) routing each request by its Host to
    ``routes[host]``, in that order."""
    which, how = mode
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            return Verdict((Choice(1, routes[head.host], "ORDERED", tag="t"),), ttl=60.0)

        kw["resolve"] = resolve
    return _relay(which, lambda head, origin: Decision(routes[head.host], tag="t"), **kw)


def _ask(c: socket.socket, host: str) -> int:
    """One GET to *host* on the client *c*: its status."""
    c.sendall(_get(host))
    return _status(_response(c))


def _settings(relay: Any, c: socket.socket, settings: dict[Endpoint, EndpointSettings]) -> None:
    """relay.endpoint_settings(settings), applied by its loop once a
    request to S (through the loop) was answered."""
    relay.endpoint_settings(settings)
    assert _ask(c, "s") == 200


@contextmanager
def _three(
    mode: tuple[str, str], **kw: Any
) -> Iterator[tuple[Any, Scripted, Scripted, Scripted, socket.socket]]:
    """A relay routing to backends A, B and S (200 at once), with a client:
    closed at the end."""
    a, b, s = Scripted([]), Scripted([]), Scripted([])
    relay = _hosts(mode, {"a": (a.endpoint,), "b": (b.endpoint,), "s": (s.endpoint,)}, **kw)
    try:
        c = _client(relay)
        yield relay, a, b, s, c
        c.close()
    finally:
        relay.close()
        a.close()
        b.close()
        s.close()


def test_max_requests_per_connection_per_endpoint(mode: tuple[str, str]) -> None:
    """A with one request per connection, B the relay's (unlimited), both
    used before (their EPs interned, a connection pooled each): A's pooled
    connection, which has served its one request already, is closed when
    the settings arrive (as its check-in would have: the limit holds from
    the next request on); then each of A's requests gets a connection of
    its own, closed by the relay after its answer
    (``pool_closed_max_requests``); B's all go on its first."""
    n = 4
    with _three(mode) as (relay, a, b, _, c):
        assert _ask(c, "a") == 200 and _ask(c, "b") == 200
        closed_before = relay.stats()["pool_closed_max_requests"]
        _settings(relay, c, {a.endpoint: EndpointSettings(1, DEFAULT_IDLE, DEFAULT_CONNECT)})
        assert _until(lambda: a.closed_by_relay == 1), a.closed_by_relay
        assert a.accepted == 1, a.accepted
        for _ in range(n):
            assert _ask(c, "a") == 200
            assert _ask(c, "b") == 200
        assert _until(lambda: a.closed_by_relay == n + 1), a.closed_by_relay
        stats = relay.stats()
        assert b.closed_by_relay == 0
    assert a.accepted == n + 1, a.accepted
    assert b.accepted == 1, b.accepted
    assert stats["pool_closed_max_requests"] - closed_before == n + 1, stats


def test_pool_idle_timeout_per_endpoint(mode: tuple[str, str]) -> None:
    """A's pooled connections idle 0.2 s at most, B's the relay's 30 s: A's
    idle connection is closed by the relay after its timeout (a tick later
    at most: 0.45 s; the bound, 3 s, leaves the rest to a loaded machine),
    B's is still open then and serves B's next request; A's next request
    opens a new one."""
    with _three(mode) as (relay, a, b, _, c):
        _settings(relay, c, {a.endpoint: EndpointSettings(0, 0.2, DEFAULT_CONNECT)})
        assert _ask(c, "a") == 200 and _ask(c, "b") == 200
        assert _until(lambda: a.closed_by_relay == 1, 3.0), "A's idle connection still open"
        assert relay.stats()["pool_expired"] == 1
        assert _ask(c, "b") == 200
        assert _ask(c, "a") == 200
        stats = relay.stats()
        assert b.closed_by_relay == 0
    assert b.accepted == 1, b.accepted
    assert a.accepted == 2, a.accepted
    assert stats["pool_reused"] >= 1, stats


@contextmanager
def _never_accepting() -> Iterator[Endpoint]:
    """A listener whose accept queue is full: a connect to it never
    completes (its SYN dropped)."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(0)
    filler = socket.create_connection(hang.getsockname())  # the queue's one place
    try:
        yield hang.getsockname()
    finally:
        filler.close()
        hang.close()


def test_connect_timeout_per_endpoint(mode: tuple[str, str]) -> None:
    """Two endpoints that never accept, HA with a connect timeout of 0.1 s,
    HB with the relay's 5 s, each followed by a backend that answers: a
    request to HB first, then one to HA on another client. HA's connect is
    given up and its request answered by the next endpoint well before the
    default (the bound, 2.5 s, leaves the rest to a loaded machine), while
    HB's connect still waits; a connect error counted, HA's alone."""
    up = Scripted([])
    with _never_accepting() as ha, _never_accepting() as hb:
        relay = _hosts(mode, {"a": (ha, up.endpoint), "b": (hb, up.endpoint)})
        try:
            relay.endpoint_settings({ha: EndpointSettings(0, DEFAULT_IDLE, 0.1)})
            cb = _client(relay)
            cb.sendall(_get("b"))  # (its connect to HB waits for 5 s)
            ca = _client(relay)
            t0 = time.monotonic()
            assert _ask(ca, "a") == 200
            took = time.monotonic() - t0
            assert took < 2.5, took
            stats = relay.stats()
            cb.setblocking(False)
            with pytest.raises(BlockingIOError):
                cb.recv(1)  # (nothing yet: HB's connect still waits)
            ca.close()
            cb.close()
        finally:
            relay.close()
            up.close()
    assert stats["connect_errors"] == 1, stats
    assert up.accepted == 1 and len(up.requests) == 1


def test_settings_replaced_at_runtime_apply_from_then_on(mode: tuple[str, str]) -> None:
    """A with one request per connection, then the settings replaced by
    B's alone (two per connection): A is back to the relay's (its
    requests share a connection), and B's connection, pooled before with
    one request served, is closed when its second request is released; B's
    next request opens another."""
    with _three(mode) as (relay, a, b, _, c):
        _settings(relay, c, {a.endpoint: EndpointSettings(1, DEFAULT_IDLE, DEFAULT_CONNECT)})
        assert _ask(c, "a") == 200 and _ask(c, "a") == 200
        assert _ask(c, "b") == 200
        assert (a.accepted, b.accepted) == (2, 1)
        _settings(relay, c, {b.endpoint: EndpointSettings(2, DEFAULT_IDLE, DEFAULT_CONNECT)})
        for _ in range(3):
            assert _ask(c, "a") == 200
        assert _ask(c, "b") == 200  # its pooled connection's second: closed after it
        assert _until(lambda: b.closed_by_relay == 1), b.closed_by_relay
        assert _ask(c, "b") == 200  # a new one
        stats = relay.stats()
    assert a.accepted == 3, a.accepted  # (its second was closed before the change)
    assert b.accepted == 2, b.accepted
    assert stats["pool_closed_max_requests"] == 3, stats  # A's two, B's one


def test_an_idle_connection_gets_an_idle_timeout_set_while_it_waits(mode: tuple[str, str]) -> None:
    """B's connection pooled under the relay's 30 s, then B's idle timeout
    set to 0.2 s: the next expiry closes it (3 s: a loaded machine's)."""
    with _three(mode) as (relay, _, b, _, c):
        assert _ask(c, "b") == 200
        _settings(relay, c, {b.endpoint: EndpointSettings(0, 0.2, DEFAULT_CONNECT)})
        assert _until(lambda: b.closed_by_relay == 1, 3.0), "B's idle connection still open"
        assert relay.stats()["pool_expired"] == 1


def test_an_endpoint_configured_before_it_was_ever_used(mode: tuple[str, str]) -> None:
    """Settings for A given before any request named it (the compiled
    relay has no EP for it yet: it gets them when it is interned): each of
    A's requests gets a connection of its own."""
    n = 3
    with _three(mode) as (relay, a, _, _, c):
        _settings(relay, c, {a.endpoint: EndpointSettings(1, DEFAULT_IDLE, DEFAULT_CONNECT)})
        for _ in range(n):
            assert _ask(c, "a") == 200
        assert _until(lambda: a.closed_by_relay == n), a.closed_by_relay
        stats = relay.stats()
    assert a.accepted == n, a.accepted
    assert stats["pool_closed_max_requests"] == n, stats


BAD = (
    (-1, DEFAULT_IDLE, DEFAULT_CONNECT),
    (2**31, DEFAULT_IDLE, DEFAULT_CONNECT),
    (1.5, DEFAULT_IDLE, DEFAULT_CONNECT),
    (0, -1.0, DEFAULT_CONNECT),
    (0, 0.0, DEFAULT_CONNECT),
    (0, math.nan, DEFAULT_CONNECT),
    (0, math.inf, DEFAULT_CONNECT),
    (0, DEFAULT_IDLE, -0.1),
    (0, DEFAULT_IDLE, math.nan),
    (0, DEFAULT_IDLE, math.inf),
)


def test_values_out_of_range_are_refused_and_change_nothing(mode: tuple[str, str]) -> None:
    """A negative, huge or fractional count, a timeout not a finite number
    of seconds above 0: ValueError naming the endpoint, and the settings in
    effect stay (A's one request per connection)."""
    with _three(mode) as (relay, a, b, _, c):
        _settings(relay, c, {a.endpoint: EndpointSettings(1, DEFAULT_IDLE, DEFAULT_CONNECT)})
        for bad in BAD:
            with pytest.raises(ValueError, match=f"127.0.0.1:{b.endpoint[1]}"):
                relay.endpoint_settings({b.endpoint: EndpointSettings(*bad)})
        assert _ask(c, "s") == 200  # (through the loop: anything given is applied)
        for _ in range(2):
            assert _ask(c, "a") == 200
        assert _until(lambda: a.closed_by_relay == 2), a.closed_by_relay
    assert a.accepted == 2, a.accepted


# a Connection naming a field: the compiled loop hands it to its pure relay
GET_NAMED = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: x-a\r\nX-A: 1\r\n\r\n"


def test_the_compiled_twin_s_slow_path_has_them_too(mode: tuple[str, str]) -> None:
    """Requests the compiled loop hands to its pure relay (a Connection
    naming a field: the slow path, which has pools of its own) get A's one request per
    connection too."""
    n = 3
    with _three(mode) as (relay, a, _, _, c):
        _settings(relay, c, {a.endpoint: EndpointSettings(1, DEFAULT_IDLE, DEFAULT_CONNECT)})
        for _ in range(n):
            c.sendall(GET_NAMED)
            assert _status(_response(c)) == 200
        assert _until(lambda: a.closed_by_relay == n), a.closed_by_relay
        stats = relay.stats()
    assert a.accepted == n, a.accepted
    assert stats["pool_closed_max_requests"] == n, stats
    assert stats.get("slow_path", 1) == 1, stats  # (the compiled twin's: handed over once)
