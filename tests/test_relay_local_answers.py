"""The relays' own answers and HTTP's message framing, both twins (the
compiled one deciding per request and from a cached verdict), byte for
byte, real sockets: a HEAD request answered locally gets the head alone
(RFC 9110 §9.3.2), a status that has no body gets none (§6.4.1, §8.6),
each status its standard reason phrase. See ``local_response`` in
``_exchange_py.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import OVERFLOW_BODY, REASONS, RESET_BEFORE_HEADERS
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import FAULT_SCALE, Choice, Fault, Verdict
from tests._scripted import (
    CLOSE,
    STALL,
    Scripted,
    _client,
    _response,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.conftest import EPOCH_DATE, undated
from tests.conftest import epoch_response as local_response
from tests.test_relay_edges import _read_all, _relay

Endpoint = tuple[str, int]

NEXT = b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def _local_relay(
    mode: tuple[str, str],
    local: tuple[int, str] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    endpoints: tuple[Endpoint, ...] = (),
    fault: Fault | None = None,
) -> Any:
    """A relay of the twin and mode answering every request *local* (with
    *headers*), else sending it to *endpoints* (none: its 503) with *fault*."""
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        if local is not None:
            verdict = Verdict(local=local, local_headers=headers, tag="t", ttl=60.0)
        else:
            verdict = Verdict((Choice(1, endpoints, "ORDERED", tag="t"),), ttl=60.0, fault=fault)
        kw["resolve"] = lambda head, origin: verdict
    decision = Decision(endpoints, local=local, local_headers=headers, tag="t", fault=fault)
    return _relay(which, lambda h, o: decision, **kw)


def _head_then_get(relay: Any) -> bytes:
    """A HEAD request then, on the same connection, a GET asking to close:
    all the client reads."""
    a = _client(relay)
    a.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n" + NEXT)
    got, how = _read_all(a, 5.0)
    a.close()
    assert how == "EOF", (got, how)
    return got


@pytest.mark.parametrize(
    ("local", "headers"),
    [
        ((200, "hello"), ()),
        ((301, ""), (("location", "http://b/new"),)),
        ((404, "route not found"), ()),
        ((503, "no healthy upstream"), ()),
    ],
    ids=["direct", "redirect", "404", "503"],
)
def test_a_head_request_answered_locally_gets_the_head_alone(
    mode: tuple[str, str], local: tuple[int, str], headers: tuple[tuple[str, str], ...]
) -> None:
    """A local answer to a HEAD: its status line and header lines (the
    content-length a GET would get), no body; the GET after it on the
    connection reads its own whole answer, nothing else."""
    relay = _local_relay(mode, local, headers)
    try:
        got = _head_then_get(relay)
    finally:
        relay.close()
    lines = "".join(f"{n}: {v}\r\n" for n, v in headers)
    status, body = local
    assert undated(got) == (
        local_response(status, body, False, lines, head_only=True)
        + local_response(status, body, True, lines)
    )
    assert local_response(status, body, False, lines, head_only=True) + body.encode() == (
        local_response(status, body, False, lines)
    )


def test_a_head_request_with_no_endpoint_or_aborted_gets_the_head_alone(
    mode: tuple[str, str],
) -> None:
    """The relays' other local answers: a choice with no endpoints (503 no
    healthy upstream), a fault's abort: the head alone for a HEAD."""
    for kw, status, body in (
        ({}, 503, "no healthy upstream"),
        (
            {
                "endpoints": (("127.0.0.1", 9),),
                "fault": Fault(abort_status=429, abort_ppm=FAULT_SCALE),
            },
            429,
            "fault filter abort",
        ),
    ):
        relay = _local_relay(mode, **kw)
        try:
            got = _head_then_get(relay)
        finally:
            relay.close()
        assert undated(got) == (
            local_response(status, body, False, head_only=True) + local_response(status, body, True)
        ), kw


def test_a_head_request_s_gateway_failure_gets_the_head_alone(mode: tuple[str, str]) -> None:
    """An upstream that closes before answering a HEAD: the 503's head
    alone (Envoy's answer to a reset before the response), the connection
    kept; the next request served by the backend."""
    up = Scripted([CLOSE])
    relay = _local_relay(mode, endpoints=(up.endpoint,))
    reason = RESET_BEFORE_HEADERS
    try:
        got = _head_then_get(relay)
    finally:
        relay.close()
        up.close()
    answer = local_response(503, reason, False, head_only=True)
    got = undated(got)
    assert got.startswith(answer) and got[len(answer) :].startswith(b"HTTP/1.1 200 "), got
    assert len(up.requests) == 2


def test_a_head_request_s_route_timeout_gets_the_head_alone(mode: tuple[str, str]) -> None:
    """A HEAD whose backend never answers within the route's timeout: the
    504's head alone, the connection kept; the next request served."""
    up = Scripted([STALL])
    which, how = mode
    kw: dict[str, Any] = {}
    eps = (up.endpoint,)
    if how == "resolve":
        verdict = Verdict((Choice(1, eps, "ORDERED", tag="t"),), ttl=60.0, timeout=0.2)
        kw["resolve"] = lambda head, origin: verdict
    decision = Decision(eps, tag="t", timeout=0.2)
    relay = _relay(which, lambda h, o: decision, **kw)
    try:
        got = _head_then_get(relay)
    finally:
        relay.close()
        up.close()
    answer = local_response(504, "upstream request timeout", False, head_only=True)
    got = undated(got)
    assert got.startswith(answer) and got[len(answer) :].startswith(b"HTTP/1.1 200 "), got
    assert len(up.requests) == 2


@pytest.mark.parametrize("status", [204, 304, 100])
def test_a_status_without_a_body_gets_none(mode: tuple[str, str], status: int) -> None:
    """A direct response of 204, 304 (or 1xx) given a body: none sent (the
    body would be read as the next response), no content-length for 204
    and 1xx, the content-length a 200 would have for 304; the next request
    answered after it."""
    body = "HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n"
    relay = _local_relay(mode, (status, body))
    try:
        a = _client(relay)
        a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" + NEXT)
        got, _ = _read_all(a, 5.0)
        a.close()
    finally:
        relay.close()
    first = local_response(status, body, close=False)
    assert undated(got) == first + local_response(status, body, close=True)
    reason = {204: b"No Content", 304: b"Not Modified", 100: b"Continue"}[status]
    length = b"" if status != 304 else b"content-length: %d\r\n" % len(body)
    assert first == (
        b"HTTP/1.1 %d %s\r\n%scontent-type: text/plain\r\ndate: %s\r\nserver: l4proxy\r\n\r\n"
        % (status, reason, length, EPOCH_DATE)
    )


def test_reason_phrases() -> None:
    """Each status a route may answer has its standard reason phrase
    (Envoy's), a code without one "Unknown"; never "Error"."""
    assert local_response(200, "ok").startswith(b"HTTP/1.1 200 OK\r\n")
    assert local_response(301, "").startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
    assert local_response(429, "").startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert local_response(599, "").startswith(b"HTTP/1.1 599 Unknown\r\n")
    for status in (200, 201, 202, 203, 205, 206, 300, 302, 303, 307, 308, 401, 403, 418):
        assert REASONS.get(status, "Unknown") != "Error", status
    for status in range(200, 600):
        assert b"Error\r\n" not in local_response(status, "")[:40] or status == 500, status


def test_a_redirect_through_the_relay_says_moved_permanently(mode: tuple[str, str]) -> None:
    """A redirect's status line as the client reads it; its empty body has
    no content-type (Envoy's local reply sets one only on a body)."""
    relay = _local_relay(mode, (301, ""), (("location", "http://b/"),))
    try:
        a = _client(relay)
        a.sendall(NEXT)
        got = _response(a)
        a.close()
    finally:
        relay.close()
    assert undated(got) == (
        b"HTTP/1.1 301 Moved Permanently\r\ncontent-length: 0\r\n"
        b"location: http://b/\r\nconnection: close\r\ndate: %s\r\nserver: l4proxy\r\n\r\n"
        % EPOCH_DATE
    )


def test_the_overflow_answer_to_a_head_is_its_head() -> None:
    """(local_response's head_only: the head, byte for byte, of the answer
    a GET gets; the overflow body's length in it.)"""
    full = local_response(503, OVERFLOW_BODY, False, "x-envoy-overloaded: true\r\n")
    head = local_response(503, OVERFLOW_BODY, False, "x-envoy-overloaded: true\r\n", True)
    assert full == head + OVERFLOW_BODY.encode()
    assert b"content-length: %d\r\n" % len(OVERFLOW_BODY) in head
