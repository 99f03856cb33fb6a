"""A response's Transfer-Encoding that names chunked, through each relay
twin on real sockets: the pure one, the compiled one deciding per request
and from a cached verdict (which hands such a head to Python:
parse_response_head and response_framing).

Where chunked is said other than once and last (``chunked, chunked`` on
one line or two, ``chunked, gzip``, ``chunked;q=1``, ``chunked`` with
obs-text beside it), the head is refused as one that cannot be framed:
502 with the reason, a gateway failure of its endpoint, the upstream
connection closed, the client kept (its request was read whole) and its
next request answered. Such a body was read to the close, as a coding
that is not chunked, where a client (nginx, and RFC 9112 §6.3 for chunked
twice) reads it as chunked: the client's body ended at the last chunk,
and what the server sent after it reached the client as the answer to
its next request (a differential review against HAProxy, which refuses
these, and nginx). Empty list elements are no coding (RFC 9110 §5.6.1):
``chunked,``, or a Transfer-Encoding line with no value beside one saying
chunked, is chunked, as HAProxy and nginx read it, where it was read to
the close (the client held until the server closed).
"""

from __future__ import annotations

import socket

import pytest

from l4proxy.dataplane import accesslog
from tests._scripted import (
    GET,
    OK_BODY,
    Reported,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _recv,
    _response,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)

REASON = b"chunked not once and last in the response's Transfer-Encoding"
# what a server sends after its body's last chunk: to a client that read
# the body as chunked, the answer to its next request
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
BODY = b"2\r\nok\r\n0\r\n\r\n"


def _head(*lines: bytes) -> bytes:
    return b"\r\n".join((b"HTTP/1.1 200 OK", *lines)) + b"\r\n\r\n"


REFUSED = {
    "twice-one-line": _head(b"Transfer-Encoding: chunked, chunked"),
    "twice-two-lines": _head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
    "twice-after-gzip": _head(b"Transfer-Encoding: gzip, chunked", b"transfer-encoding: CHUNKED"),
    "not-last": _head(b"Transfer-Encoding: chunked, gzip"),
    "then-identity": _head(b"Transfer-Encoding: chunked, identity"),
    "parameter": _head(b"Transfer-Encoding: chunked;q=1"),
    "quoted": _head(b'Transfer-Encoding: "chunked"'),
    "nbsp": _head(b"Transfer-Encoding: chunked\xa0"),
}
CHUNKED = {
    "trailing-comma": _head(b"Transfer-Encoding: chunked,"),
    "empty-elements": _head(b"Transfer-Encoding: , chunked ,"),
    "empty-line-after": _head(b"Transfer-Encoding: chunked", b"Transfer-Encoding:"),
    "empty-line-before": _head(b"Transfer-Encoding:", b"Transfer-Encoding: gzip, chunked"),
}


def _chunked_response(a: socket.socket, head: bytes) -> bytes:
    """*head* and a chunked BODY, and not a byte more (a client that reads
    the body as chunked: after its last chunk, the next answer)."""
    return _recv(a, len(head) + len(BODY))


@pytest.mark.parametrize("head", list(REFUSED))
def test_chunked_said_other_than_once_and_last_is_a_502(mode: tuple[str, str], head: str) -> None:
    """The server sends what follows its body's end too (EVIL): no byte of
    it reaches the client, whose next request is answered by the server."""
    up = Scripted([REFUSED[head] + BODY + EVIL])
    reported = Reported()
    relay = _proxy(mode, (up.endpoint,), None, **reported.kw(mode[0]))
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        a.sendall(GET)
        after = _response(a)
        # the refused head's connection closed by the relay (never pooled)
        assert _until(lambda: up.closed_by_relay >= 1, 1.0), up.closed_by_relay
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    status, _, body = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and body == REASON, got
    assert b"connection: close" not in status.lower(), got  # read whole: kept
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 2 and len(up.requests) == 2
    assert stats["requests"] == 2 and stats["errors"] == 0, stats
    ((status_code, flags), ok) = sorted(reported.rows, reverse=True)
    assert status_code == 502 and flags & accesslog.UPE, reported.rows
    assert ok == (200, 0), reported.rows
    assert reported.failures == [(up.endpoint, REASON.decode())], reported.failures


@pytest.mark.parametrize("head", list(CHUNKED))
def test_empty_list_elements_leave_chunked_alone_chunked(mode: tuple[str, str], head: str) -> None:
    """Framed as chunked: the answer goes as it came (no close said), the
    client kept, the upstream connection pooled for the next request."""
    up = Scripted([CHUNKED[head] + BODY])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _chunked_response(a, CHUNKED[head])
        a.sendall(GET)
        after = _response(a)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert got == CHUNKED[head] + BODY, got
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 1 and len(up.requests) == 2  # pooled, reused
    assert stats["requests"] == 2 and stats["errors"] == 0, stats


def test_bytes_after_a_chunked_end_never_reach_the_client(mode: tuple[str, str]) -> None:
    """``chunked,`` framed as chunked: what the server sends after the last
    chunk is not the client's (the connection is not pooled, its bytes
    dropped), and the next request goes on a new connection."""
    head = CHUNKED["trailing-comma"]
    up = Scripted([head + BODY + EVIL])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _chunked_response(a, head)
        a.sendall(GET)
        after = _response(a)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert got == head + BODY, got
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 2 and len(up.requests) == 2
    assert stats["requests"] == 2 and stats["errors"] == 0, stats
