"""A 204 or a 304 whose head says Content-Length or Transfer-Encoding,
through each relay twin on real sockets: the pure one, the compiled one
deciding per request and from a cached verdict.

Neither has a body whatever its head says (RFC 9112 §6.3 item 1), and the
relays frame none. What the client gets: a 204 without its Content-Length
and Transfer-Encoding lines (a server MUST NOT send them, RFC 9110 §8.6,
RFC 9112 §6.1; nginx drops its Content-Length, Envoy drops a
``Content-Length: 0`` and refuses the rest), a 304 without its
Transfer-Encoding lines (allowed by §6.1, but Python's http.client reads
``chunked`` before the status and waits for a chunk: urllib and requests
hung on it behind the relay), its Content-Length kept (the
representation's size, §8.6); the answer to a HEAD keeps both (what a GET
would have said). The compiled loop hands such a 204 or 304 to Python
(bodiless_head()), which writes c.rhead's head again; any other head is
judged in C as before.
"""

from __future__ import annotations

import http.client
import socket

import pytest

from l4proxy.dataplane.verdict import HeadEdits
from tests._scripted import (
    GET,
    OK_BODY,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _response,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_head_edits import _edits_relay

HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"

# (the request, the upstream's head, the head the client gets)
CASES = {
    "204-chunked": (
        GET,
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
    ),
    "204-length": (
        GET,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    ),
    "204-length-0": (
        GET,
        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ),
    "204-gzip-chunked": (
        GET,
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ),
    "204-bare-lf": (
        GET,
        b"HTTP/1.1 204 No Content\nTransfer-Encoding: chunked\nX-A: 1\n\n",
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    ),
    "204-to-head": (
        HEAD,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ),
    "304-chunked": (
        GET,
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    ),
    # what stays
    "304-length": (
        GET,
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    ),
    "head-chunked": (
        HEAD,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    "head-length": (
        HEAD,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
    ),
    "204-plain": (GET, b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"),
}


def _head_answer(a: socket.socket) -> bytes:
    """A head with no body after it, read to its empty line (a byte at a
    time: nothing after it read)."""
    a.settimeout(5.0)
    got = b""
    while b"\r\n\r\n" not in got:
        data = a.recv(1)
        assert data, got
        got += data
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_a_bodiless_answer_goes_without_its_framing_lines(mode: tuple[str, str], case: str) -> None:
    """The head the client gets, then the next request's answer on the same
    connections (nothing framed after the head: the upstream connection
    reused, no failure)."""
    request, upstream, want = CASES[case]
    up = Scripted([upstream])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(request)
        got = _head_answer(a)
        a.sendall(GET)
        after = _response(a)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert got == want, got
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 1 and len(up.requests) == 2
    assert stats["errors"] == 0, stats
    if mode[0] == "compiled" and case in ("head-chunked", "head-length", "204-plain"):
        assert stats["response_heads_in_python"] == 0, stats  # (judged in C, as before)


@pytest.mark.parametrize("status", [204, 304])
def test_python_http_client_reads_the_answer_and_the_next(
    mode: tuple[str, str], status: int
) -> None:
    """http.client (urllib's, requests') through the relay: a 204 or 304
    that said chunked, then a 200 on the same connection (before: it
    waited for a chunk, a timeout)."""
    reason = b"No Content" if status == 204 else b"Not Modified"
    up = Scripted([b"HTTP/1.1 %d %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (status, reason)])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.settimeout(3.0)
        h = http.client.HTTPConnection("a", timeout=3.0)
        h.sock = a
        h.request("GET", "/x")
        r = h.getresponse()
        assert (r.status, r.read()) == (status, b"")
        h.request("GET", "/x")
        r = h.getresponse()
        assert (r.status, r.read()) == (200, OK_BODY)
        h.close()
    finally:
        relay.close()
        up.close()


def test_a_routes_response_edits_go_on_the_head_written_again(mode: tuple[str, str]) -> None:
    """A route's response edits (the compiled twin's send_edited_head)
    apply to the 204 without its framing lines."""
    up = Scripted([b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"])
    relay = _edits_relay(
        mode, (up.endpoint,), HeadEdits(response_add=(("x-r", "1"),), response_remove=("x-a",))
    )
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _head_answer(a)
        a.sendall(GET)
        after = _response(a)
    finally:
        relay.close()
        up.close()
    assert got == b"HTTP/1.1 204 No Content\r\nx-r: 1\r\n\r\n", got
    assert after.startswith(b"HTTP/1.1 200 "), after
