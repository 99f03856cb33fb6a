"""A response head with a bare LF (a line ending in LF without its CR: the
status line, a header line, the empty line that ends the head), through
each relay twin on real sockets: the pure one, the compiled one deciding
per request and from a cached verdict.

It is refused as any response head that cannot be framed is: 502 ``LF
without CR in the response head`` (UPE in the access log), the upstream
connection closed, never pooled, a gateway failure of its endpoint, the
client connection kept (its request was read whole) and its next request
answered. It went to the client as it came: a client that ends lines only
at CRLF read ``X-A: 1\\nSet-Cookie: s=evil`` as one field, and a head that
ends in ``\\n\\n`` as going on into the body, other headers than the relay
judged (response splitting). The compiled relay hands such a head to
Python (parse_response_head), and none enters its memo of heads seen
before: the same head again is refused again.
"""

from __future__ import annotations

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

REASON = b"LF without CR in the response head"
HEADS = {
    "status-line": b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    # the splitting: one field to a client that ends lines only at CRLF
    "header-line": b"HTTP/1.1 200 OK\r\nX-A: 1\nSet-Cookie: s=evil\r\nContent-Length: 2\r\n\r\nok",
    "last-header-line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
    "empty-line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nok",
    "every-line": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    # lines the relay drops (hop-by-hop), the rest as it came
    "hop-by-hop": (
        b"HTTP/1.1 200 OK\nConnection: x-a\nX-A: 1\nUpgrade: h2c\nContent-Length: 2\n\nok"
    ),
    "http10": b"HTTP/1.0 200 OK\nConnection: keep-alive\nContent-Length: 2\n\nok",
    # an interim head: nothing went to the client before the refusal
    "interim": b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "interim-103": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
    "no-body": b"HTTP/1.1 204 No Content\r\n\n",
}


def _through(
    mode: tuple[str, str], script: list[bytes], refused: int = 1
) -> tuple[list[bytes], Scripted, Reported]:
    """One keep-alive client connection, a GET per step of *script* and a
    last one (answered 200), *refused* of them refused: the responses, the
    backend, what was reported."""
    up = Scripted(list(script))
    reported = Reported()
    relay = _proxy(mode, (up.endpoint,), None, **reported.kw(mode[0]))
    try:
        a = _client(relay)
        got = []
        for _ in range(len(script) + 1):
            a.sendall(GET)
            got.append(_response(a))
        # each refused head's connection closed by the relay (never pooled)
        assert _until(lambda: up.closed_by_relay >= refused, 1.0), up.closed_by_relay
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert stats["requests"] == len(script) + 1 and stats["errors"] == 0, stats
    return got, up, reported


def _refused(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    return (
        head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        and body == REASON
        # the request was read whole and asked to persist: kept
        and b"connection: close" not in head.lower()
    )


@pytest.mark.parametrize("head", list(HEADS))
def test_a_bare_lf_in_a_response_head_is_a_502(mode: tuple[str, str], head: str) -> None:
    got, up, reported = _through(mode, [HEADS[head]])
    assert _refused(got[0]), got[0]
    assert got[1] == _answer(200, OK_BODY), got[1]  # the next request, on the same connection
    assert up.accepted == 2  # the refused head's connection not reused
    assert len(up.requests) == 2
    # an upstream protocol error, as any head that cannot be framed
    # (the compiled twin reports rows by status and flags: no order)
    ((status, flags), ok) = sorted(reported.rows, reverse=True)
    assert status == 502 and flags & accesslog.UPE, reported.rows
    assert ok == (200, 0), reported.rows
    assert reported.failures == [(up.endpoint, REASON.decode())], reported.failures


def test_a_refused_head_never_enters_the_memo(mode: tuple[str, str]) -> None:
    """The compiled relay takes a head equal byte for byte to the last one
    judged for its endpoint on that one's verdict: a refused head is never
    kept there, so it is refused each time it comes; a head judged good
    before it (kept) does not let it through either."""
    bad = HEADS["last-header-line"]
    good = _answer(200, b"ok")
    got, up, reported = _through(mode, [bad, bad, good, bad, good], refused=3)
    assert [_refused(g) for g in got] == [True, True, False, True, False, False], got
    assert got[2] == got[4] == got[5] == good
    assert up.accepted == 4  # a new connection after each refusal
    assert sorted(s for s, _ in reported.rows) == [200, 200, 200, 502, 502, 502]
