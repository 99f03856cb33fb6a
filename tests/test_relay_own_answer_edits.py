"""The relay's own answers to a request routed to a choice with response
edits (a 503 when every connect failed, a circuit breaker's 503, the 504
of the route timeout, the 502 of an upstream that closed) carry those
edits, as Envoy's router finalizes its local replies with the route's
header mutations; a fault's abort does not. Both twins, the compiled one
deciding per request and from a cached verdict, real sockets, byte for
byte. See ``HeadEdits`` in ``verdict.py``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from l4proxy.dataplane._exchange_py import OVERFLOW_BODY, OVERFLOW_HEADERS, local_response
from l4proxy.dataplane._pool_py import EndpointSettings
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import FAULT_ABORT_BODY, Choice, Fault, HeadEdits, Verdict
from tests._scripted import (
    CLOSE,
    STALL,
    Scripted,
    _client,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges import _read_all, _relay

Endpoint = tuple[str, int]

# a route's and its destination's, as the route table merges them: the
# answer's own content-type and server lines go, the sets and adds follow
EDITS = HeadEdits(
    response_set=(("server", "l4"), ("x-dest", "d")),
    response_add=(("x-route", "1"), ("x-route", "2")),
    response_remove=("content-type",),
)
ADDED = b"server: l4\r\nx-dest: d\r\nx-route: 1\r\nx-route: 2\r\n"
TIMEOUT_S = 0.2
NO_UPSTREAM = "no healthy upstream"


def _edited(answer: bytes) -> bytes:
    """*answer* (local_response()'s) as EDITS leave it: its content-type
    and server lines out, ADDED before its empty line."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"content-type:", b"server:"))
    ]
    return b"\r\n".join(lines) + b"\r\n" + ADDED + b"\r\n" + body


def _get(host: str = "a", method: str = "GET", close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"%s /x HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method.encode(), host.encode(), extra)


def _routed(
    mode: tuple[str, str],
    routes: dict[str, tuple[Endpoint, HeadEdits | None]],
    timeout: float = 0.0,
    fault: Fault | None = None,
) -> Any:
    """A relay of the twin and mode sending each Host of *routes* to its
    endpoint with its edits (and *timeout*, *fault*)."""
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            endpoint, edits = routes[head.host]
            choice = Choice(1, (endpoint,), "ORDERED", tag="t", edits=edits)
            return Verdict((choice,), ttl=60.0, timeout=timeout, fault=fault)

        kw["resolve"] = resolve

    def decide(head: Any, origin: Any) -> Decision:
        endpoint, edits = routes[head.host]
        return Decision((endpoint,), tag="t", timeout=timeout, edits=edits, fault=fault)

    return _relay(which, decide, **kw)


@contextmanager
def _refusing() -> Iterator[Endpoint]:
    """An endpoint that refuses connections: a socket bound, not listening
    (its port is ours until the test ends)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()
    finally:
        s.close()


def _ask(relay: Any, *requests: bytes) -> list[bytes]:
    """*requests* in turn on one client connection: each answer."""
    c = _client(relay)
    try:
        out = []
        for request in requests:
            c.sendall(request)
            out.append(_response(c))
        return out
    finally:
        c.close()


def _head_of(request_answer: bytes) -> bytes:
    return request_answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


def _connect_failed(
    mode: tuple[str, str], edits: HeadEdits | None, *requests: bytes
) -> list[bytes]:
    with _refusing() as dead:
        relay = _routed(mode, {"a": (dead, edits)})
        try:
            return _ask(relay, *requests)
        finally:
            relay.close()


def test_the_503_after_every_connect_failed_is_edited(mode: tuple[str, str]) -> None:
    """Each request on a kept connection gets the edited 503, the last one
    (Connection: close) the edited close variant."""
    got = _connect_failed(mode, EDITS, _get(), _get(), _get(close=True))
    keep = _edited(local_response(503, NO_UPSTREAM, close=False))
    assert got == [keep, keep, _edited(local_response(503, NO_UPSTREAM, close=True))]


def test_a_head_request_gets_the_edited_head_alone(mode: tuple[str, str]) -> None:
    """Read to the connection's end: the head, no body after it."""
    with _refusing() as dead:
        relay = _routed(mode, {"a": (dead, EDITS)})
        try:
            c = _client(relay)
            c.sendall(_get(method="HEAD", close=True))
            got = _read_all(c, 5.0)[0]
            c.close()
        finally:
            relay.close()
    assert got == _head_of(_edited(local_response(503, NO_UPSTREAM, close=True)))


def test_without_edits_the_503_is_as_before(mode: tuple[str, str]) -> None:
    got = _connect_failed(mode, None, _get(), _get(close=True))
    assert got == [
        local_response(503, NO_UPSTREAM, close=False),
        local_response(503, NO_UPSTREAM, close=True),
    ]


def test_edits_without_response_edits_leave_the_503_as_before(mode: tuple[str, str]) -> None:
    got = _connect_failed(mode, HeadEdits(request_set=(("x-req", "1"),)), _get())
    assert got == [local_response(503, NO_UPSTREAM, close=False)]


class Held:
    """A backend step that holds its request until ``open()``."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def step(self, conn: socket.socket) -> None:
        self.gate.wait(10)
        conn.sendall(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\nok")

    def open(self) -> None:
        self.gate.set()


def test_a_circuit_breaker_s_503_is_edited(mode: tuple[str, str]) -> None:
    """max_active 1: while A holds one request, the second one's overflow
    503 (its x-envoy-overloaded line kept) has the edits."""
    held = Held()
    a, s = Scripted([held.step]), Scripted([])
    relay = _routed(mode, {"a": (a.endpoint, EDITS), "s": (s.endpoint, None)})
    try:
        relay.endpoint_settings(
            {a.endpoint: EndpointSettings(0, 30.0, 5.0, False, 0, 0, 1)}  # max_active 1
        )
        assert _status(_ask(relay, _get("s"))[0]) == 200  # (the settings applied)
        first = _client(relay)
        first.sendall(_get())
        assert _until(lambda: len(a.requests) == 1), a.requests
        got = _ask(relay, _get())
        held.open()
        assert _status(_response(first)) == 200
        first.close()
    finally:
        held.open()
        relay.close()
        a.close()
        s.close()
    assert got == [_edited(local_response(503, OVERFLOW_BODY, False, OVERFLOW_HEADERS))]


def _timed_out(mode: tuple[str, str], edits: HeadEdits | None) -> bytes:
    up = Scripted([STALL])
    relay = _routed(mode, {"a": (up.endpoint, edits)}, timeout=TIMEOUT_S)
    try:
        (got,) = _ask(relay, _get())
    finally:
        relay.close()
        up.close()
    return got


def test_the_route_timeout_s_504_is_edited(mode: tuple[str, str]) -> None:
    got = _timed_out(mode, EDITS)
    assert got == _edited(local_response(504, "upstream request timeout", close=False))


def test_without_edits_the_504_is_as_before(mode: tuple[str, str]) -> None:
    got = _timed_out(mode, None)
    assert got == local_response(504, "upstream request timeout", close=False)


def test_the_502_of_an_upstream_that_closed_is_edited(mode: tuple[str, str]) -> None:
    up = Scripted([CLOSE])
    relay = _routed(mode, {"a": (up.endpoint, EDITS)})
    try:
        got = _ask(relay, _get())
    finally:
        relay.close()
        up.close()
    before = "upstream closed the connection before a response"
    assert got == [_edited(local_response(502, before, close=False))]


def test_a_fault_s_abort_is_not_edited(mode: tuple[str, str]) -> None:
    """Envoy's fault filter answers before the router (and the CORS
    filter): the abort is as without edits; nothing goes upstream."""
    up = Scripted([])
    fault = Fault(abort_status=418, abort_ppm=1_000_000)
    relay = _routed(mode, {"a": (up.endpoint, EDITS)}, fault=fault)
    try:
        got = _ask(relay, _get())
    finally:
        relay.close()
        up.close()
    assert got == [local_response(418, FAULT_ABORT_BODY, close=False)]
    assert up.requests == []
