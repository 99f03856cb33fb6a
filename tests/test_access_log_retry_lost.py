"""A retry that never reached an upstream: its circuit breaker overflowed,
or the proxy had no fd for its connection. Both twins (and the compiled
one from a cached verdict), real sockets, the relay's own access log.

A first try fails (its pooled connection closed, a fresh connection closed
before any answer; a connect refused, whose next candidate is the first
attempt's still) and its retry, to the next candidate, is refused by that
endpoint's circuit breaker (``max_active``, or ``max_connections`` with
``max_pending`` waiting already), or by socket() (EMFILE). The client gets
what a first try refused so gets: 503 with Envoy's overflow body and
``x-envoy-overloaded: true``; 503 ``overloaded``. The line says why: ``UO``
``upstream_reset_before_response_started{overflow}`` (Envoy's router never
retries an overflow: no ``URX``); ``OM`` ``overload_manager``, as l4proxy
logs a first try out of fds (Envoy's router would say ``UF``, a local
connection failure; l4proxy keeps one flag for one cause, the proxy's own
overload). A retry was answered ``502`` and logged ``UC`` for both, the
words of a connection that closed, though none was open.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import threading
from typing import Any

import pytest

from l4proxy.dataplane._pool_py import EndpointSettings
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.accesslog import AccessLog, TagLog
from l4proxy.dataplane.verdict import Choice, RetryPolicy, Verdict
from tests._scripted import (
    CLOSE,
    Scripted,
    _answer,
    _client,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import dead_ports
from tests.test_access_log_worker import _fields, _read_lines
from tests.test_relay_edges import _relay, _upstream_of

Endpoint = tuple[str, int]
OVERFLOW = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
CLUSTER = "outbound|8080||svc.default.svc.cluster.local"
ON_RESET = policy(1, "reset")  # one retry, of a try whose connection closed first


def _get(host: str, path: str = "/x") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())


def _limits(max_connections: int = 0, max_pending: int = 0, max_active: int = 0) -> Any:
    return EndpointSettings(0, 30.0, 5.0, False, max_connections, max_pending, max_active)


def _describe(tag: Any) -> TagLog:
    return TagLog(CLUSTER, "r")


class Held:
    """A backend step that holds its request until ``open()``, then answers."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def step(self, conn: socket.socket) -> None:
        self.gate.wait(10)
        conn.sendall(_answer(200, b"ok"))

    def open(self) -> None:
        self.gate.set()


def _routed(
    mode: tuple[str, str],
    routes: dict[str, tuple[tuple[Endpoint, ...], RetryPolicy | None]],
    log_fd: int,
    **kw: Any,
) -> Any:
    """A relay of *mode* routing by Host (endpoints in order, a retry
    policy), its access log to *log_fd*."""
    which, how = mode
    kw["access_log"] = AccessLog(log_fd, describe=_describe)
    if how == "resolve":
        kw["resolve"] = lambda head, origin: Verdict(
            (Choice(1, routes[head.host][0], "ORDERED", tag="t"),),
            ttl=60.0,
            retry=routes[head.host][1],
        )
    return _relay(
        which,
        lambda head, origin: Decision(routes[head.host][0], tag="t", retry=routes[head.host][1]),
        **kw,
    )


def _line_of(lines: list[bytes], path: str) -> dict[str, str]:
    mine = [f for f in map(_fields, lines) if f["path"] == path]
    assert len(mine) == 1, lines
    return mine[0]


# -- a retry refused by a circuit breaker -------------------------------------------------

FIRST_FAILURES = ["pooled-closed", "fresh-closed", "refused"]
BREAKERS = ["max_active", "max_pending"]


@pytest.mark.parametrize("breaker", BREAKERS)
@pytest.mark.parametrize("first", FIRST_FAILURES)
def test_a_retry_refused_by_a_circuit_breaker_is_503_uo(
    mode: tuple[str, str], first: str, breaker: str
) -> None:
    """B is full (a request held there; at max_pending, one more waiting
    for its one connection); a request to A then B fails its first try at
    A and goes to B: 503 with the overflow body and header, as a first
    try's overflow is answered, and one line ``503 UO ...{overflow}`` (it
    was 502 UC for a retry: the pooled connection's own, or the policy's).
    ``refused``: A's connect fails, B is the first attempt's next candidate
    (no retry: 503 UO already). UPSTREAM_HOST is A's, the last endpoint a
    try reached; B is counted in overflows() and never told of a failure."""
    held = Held()
    a_script: list[Any] = {
        "pooled-closed": [_answer(200, b"ok"), CLOSE],
        "fresh-closed": [CLOSE],
        "refused": [],
    }[first]
    a, b = Scripted(a_script), Scripted([held.step])
    failures: list[Any] = []
    r, w = os.pipe()
    with dead_ports(1) as (dead,):
        a_endpoint = ("127.0.0.1", dead) if first == "refused" else a.endpoint
        retry = ON_RESET if first == "fresh-closed" else None
        routes = {"ab": ((a_endpoint, b.endpoint), retry), "b": ((b.endpoint,), None)}
        limits = (
            _limits(max_active=1)
            if breaker == "max_active"
            else _limits(max_connections=1, max_pending=1)
        )
        relay = _routed(
            mode,
            routes,
            w,
            connect_failed=lambda ep, *args: failures.append(ep),
            response_failed=lambda ep, *args: failures.append(ep),
        )
        clients: list[socket.socket] = []
        try:
            relay.endpoint_settings({b.endpoint: limits})
            c = _client(relay)
            clients.append(c)
            if first == "pooled-closed":  # A's connection, pooled after it
                c.sendall(_get("ab", "/pooled"))
                assert _status(_response(c)) == 200
            holder = _client(relay)
            clients.append(holder)
            holder.sendall(_get("b", "/held"))
            assert _until(lambda: len(b.requests) == 1), b.requests
            if breaker == "max_pending":
                waiting = _client(relay)
                clients.append(waiting)
                waiting.sendall(_get("b", "/waiting"))
                assert _until(lambda: relay.pending() == {b.endpoint: 1}), relay.pending()
            c.sendall(_get("ab", "/lost"))
            response = _response(c)
            assert relay.overflows() == {b.endpoint: 1}
            held.open()
            assert _status(_response(holder)) == 200
            if breaker == "max_pending":
                assert _status(_response(clients[2])) == 200
            # the client's connection stays, as after a first try's overflow
            c.sendall(_get("b", "/after"))
            assert _status(_response(c)) == 200
        finally:
            held.open()
            relay.close()
            os.close(w)
            for s in clients:
                s.close()
            a.close()
            b.close()
    lines = _read_lines(r)
    head, _, body = response.partition(b"\r\n\r\n")
    assert _status(response) == 503 and body == OVERFLOW, response
    assert b"\r\nx-envoy-overloaded: true\r\n" in head + b"\r\n", response
    f = _line_of(lines, "/lost")
    assert (f["code"], f["flags"]) == ("503", "UO"), f
    assert f["details"] == "upstream_reset_before_response_started{overflow}"
    assert f["upstream"] == f"{a_endpoint[0]}:{a_endpoint[1]}" and f["upstream_local"] == "-", f
    assert f["cluster"] == CLUSTER and f["route"] == "r"
    assert b.endpoint not in failures, failures


# -- a retry with no fd for its connection ---------------------------------------------


class _FdsGone:
    """Every fd of this process below the relay's connection to an
    endpoint in use: RLIMIT_NOFILE's soft limit lowered to that fd's
    number and the free ones below it taken, so that when the relay closes
    that connection, its next socket() still fails (EMFILE) whatever it
    freed. Restored by ``give_back()``."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.taken: list[int] = []
        top = _upstream_of(endpoint).fd
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, self.limits[1]))
        try:
            while True:
                self.taken.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                self.give_back()
                raise

    def give_back(self) -> None:
        for fd in self.taken:
            os.close(fd)
        self.taken.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


def test_a_retry_with_no_fd_for_its_connection_is_503_om(mode: tuple[str, str]) -> None:
    """A's first try is held, then its connection closed before any answer
    (the policy retries that); meanwhile every fd below the relay's
    connection to A is taken, so the retry's socket() fails with EMFILE:
    503 ``overloaded``, as a first try out of fds is answered, counted as
    fd_limit, one line ``503 OM overload_manager`` (it was 502 UC), no
    endpoint blamed."""
    gate, done = threading.Event(), threading.Event()

    def close_when_told(conn: socket.socket) -> None:
        gate.wait(10)
        conn.shutdown(socket.SHUT_RDWR)  # (a FIN: the try failed before any answer)
        done.wait(10)  # (its fd, maybe below the relay's, kept till the answer came)

    a = Scripted([close_when_told])
    refused: list[str] = []
    failures: list[Any] = []
    r, w = os.pipe()
    relay = _routed(
        mode,
        {"a": ((a.endpoint,), ON_RESET)},
        w,
        refused=refused.append,
        connect_failed=lambda ep, *args: failures.append(ep),
    )
    fds: _FdsGone | None = None
    try:
        c = _client(relay)
        c.sendall(_get("a", "/lost"))
        assert _until(lambda: len(a.requests) == 1), a.requests
        fds = _FdsGone(a.endpoint)
        gate.set()
        response = _response(c)
        fds.give_back()
        fds = None
        c.close()
    finally:
        gate.set()
        done.set()
        if fds is not None:
            fds.give_back()
        relay.close()
        os.close(w)
        a.close()
    lines = _read_lines(r)
    assert _status(response) == 503 and response.endswith(b"\r\n\r\noverloaded"), response
    assert refused == ["fd_limit"] and failures == [], (refused, failures)
    assert len(a.requests) == 1, a.requests  # (the retry never reached it)
    f = _line_of(lines, "/lost")
    assert (f["code"], f["flags"], f["details"]) == ("503", "OM", "overload_manager"), f
    assert f["upstream"] == f"{a.endpoint[0]}:{a.endpoint[1]}" and f["upstream_local"] == "-", f
