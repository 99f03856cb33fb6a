"""An interim (1xx) response head that carries body framing, through each
relay twin on real sockets: the pure one, the compiled one deciding per
request and from a cached verdict (which hands any 1xx head with header
lines to Python: parse_response_head and response_framing).

A server MUST NOT send Content-Length or Transfer-Encoding in a 1xx (RFC
9110 §8.6, RFC 9112 §6.1), and a 1xx has no body whatever its fields say
(RFC 9112 §6.3). Such a head went to the client as it came: a client that
takes its Content-Length (or its chunked coding) for a body read the
final answer's head as that body, and the server's bytes after it as the
answer (a desync). It is refused now as a head that cannot be framed is:
502 with the reason (UPE, a gateway failure of its endpoint, the upstream
connection closed, never pooled), as Envoy refuses it
(``http1.content_length_not_allowed``, ``transfer_encoding_not_allowed``),
where HAProxy drops the fields: l4proxy never rewrites a head's lines. A
``Content-Length: 0`` (Envoy's one exception) goes on as it came: no
client reads a body from it.
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
    _response,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges import Backend, _read_all

CL = "Content-Length in a 1xx response"
TE = "Transfer-Encoding in a 1xx response"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# the final answer: to a client that read the 1xx's framing, its head is
# that 1xx's body, and "evil!" the answer
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
REFUSED = {
    "100-content-length": (b"HTTP/1.1 100 Continue\r\nContent-Length: 38\r\n\r\n", CL),
    "103-content-length": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nContent-Length: 38\r\n\r\n",
        CL,
    ),
    "100-content-length-list": (b"HTTP/1.1 100 Continue\r\nContent-Length: 5, 5\r\n\r\n", CL),
    "100-chunked": (b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: chunked\r\n\r\n", TE),
    "102-gzip": (b"HTTP/1.1 102 Processing\r\nTransfer-Encoding: gzip\r\n\r\n", TE),
    "100-value-less-transfer-encoding": (
        b"HTTP/1.1 100 Continue\r\nTransfer-Encoding:\r\n\r\n",
        TE,
    ),
    "103-both": (
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        TE,
    ),
    "100-invalid-content-length": (
        b"HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\n",
        "invalid Content-Length in the response",
    ),
}
# no body either way: as it came
PASSED = {
    "100-content-length-0": b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n",
    "103-content-length-00": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\ncontent-length: 00\r\n\r\n"
    ),
}


def _through(
    mode: tuple[str, str], answer: bytes
) -> tuple[bytes, bytes, Scripted, Reported, dict[str, int]]:
    """Two GETs on one keep-alive client connection, the first answered
    *answer*, the second 200 ok: both responses, the backend, what was
    reported, the relay's stats."""
    up = Scripted([answer])
    reported = Reported()
    relay = _proxy(mode, (up.endpoint,), None, **reported.kw(mode[0]))
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        a.sendall(GET)
        after = _response(a)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    return got, after, up, reported, stats


@pytest.mark.parametrize("head", list(REFUSED))
def test_a_1xx_with_body_framing_is_a_502(mode: tuple[str, str], head: str) -> None:
    """No byte of the 1xx nor of what followed it reaches the client: its
    502 says why, its connection stays (the GET was read whole) and its
    next request is answered on a new upstream connection."""
    interim, reason = REFUSED[head]
    got, after, up, reported, stats = _through(mode, interim + FINAL)
    status, _, body = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and body == reason.encode(), got
    assert b"connection: close" not in status.lower(), got
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 2 and len(up.requests) == 2  # the first connection not reused
    assert stats["requests"] == 2 and stats["errors"] == 0, stats
    ((code, flags), ok) = sorted(reported.rows, reverse=True)
    assert code == 502 and flags & accesslog.UPE, reported.rows
    assert ok == (200, 0), reported.rows
    assert reported.failures == [(up.endpoint, reason)], reported.failures


def test_the_interim_heads_before_it_went_out(mode: tuple[str, str]) -> None:
    """A 100 without fields, then one with a Content-Length: the first
    reached the client before the second came, and the 502 follows it."""
    got, after, up, reported, _ = _through(
        mode, CONTINUE + REFUSED["100-content-length"][0] + FINAL
    )
    assert got.startswith(CONTINUE), got
    status, _, body = got[len(CONTINUE) :].partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and body == CL.encode(), got
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 2
    assert sorted(s for s, _ in reported.rows) == [200, 502], reported.rows


@pytest.mark.parametrize("head", list(PASSED))
def test_a_1xx_with_content_length_0_goes_as_it_came(mode: tuple[str, str], head: str) -> None:
    got, after, up, reported, stats = _through(mode, PASSED[head] + _answer(200, OK_BODY))
    assert got == PASSED[head] + _answer(200, OK_BODY), got
    assert after == _answer(200, OK_BODY), after
    assert up.accepted == 1 and len(up.requests) == 2  # pooled, reused
    assert stats["requests"] == 2 and stats["errors"] == 0, stats
    assert sorted(s for s, _ in reported.rows) == [200, 200], reported.rows
    assert reported.failures == []


def test_a_100_continue_with_content_length_to_an_expecting_client(
    mode: tuple[str, str],
) -> None:
    """The case it matters most for: a client that sent ``Expect:
    100-continue`` and holds its body. The 100 with a Content-Length never
    reaches it: it gets the relay's own ``100 Continue`` (said as the
    request went upstream, as Envoy's), then the 502, said close (its body
    was not read), and the connection is closed; the server's connection
    too."""
    seen: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        seen.append(buf)
        conn.sendall(b"HTTP/1.1 100 Continue\r\nContent-Length: 38\r\n\r\n")
        conn.settimeout(5)
        while conn.recv(65536):  # until the relay closes it
            pass
        seen.append(b"closed")

    backend = Backend(serve)
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(
            b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        got, end = _read_all(a, 5.0)
        a.close()
        assert _until(lambda: seen[-1:] == [b"closed"], 2.0), seen
    finally:
        relay.close()
        backend.close()
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got  # (the relay's own)
    status, _, body = got[25:].partition(b"\r\n\r\n")
    assert end == "EOF", (got, end)
    assert status.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and body == CL.encode(), got
    assert b"connection: close" in status.lower(), got
    assert len(seen) == 2 and seen[0].startswith(b"POST /x HTTP/1.1\r\n"), seen
