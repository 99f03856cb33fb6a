"""A response head with a bare LF (a line ending in LF without its CR: the
status line, a header line, the empty line that ends the head: a legacy
server's), through each relay twin on real sockets: the pure one, the
compiled one deciding per request and from a cached verdict.

It is taken, as RFC 9112 §2.2 lets a recipient take a bare LF and as
Envoy, HAProxy and nginx take it, and it goes to the client as the same
head with CRLF line ends would: every line ending in CRLF, its hop-by-hop
lines dropped, the relay's own lines added, a route's response edits
applied. Had it gone as it came (before, it was refused: 502 ``LF without
CR in the response head``), a client that ends lines only at CRLF would
read ``X-A: 1\\nSet-Cookie: s=evil`` as one field, and a head that ends in
``\\n\\n`` as going on into the body: other headers than the relay judged
(response splitting). The compiled relay hands such a head to Python
(parse_response_head), which writes it again in c.rhead (crlf_head()); the
common CRLF head is judged in C as before. A bare CR is still refused, and
so is a bare LF in the chunked framing of the body (its bytes go on as they
came: tests/test_relay_chunk_errors.py).
"""

from __future__ import annotations

import pytest

from l4proxy.dataplane import accesslog
from l4proxy.dataplane.verdict import HeadEdits
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
from tests.test_relay_head_edits import _edits_relay

HEADS = {
    "status-line": b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    # the splitting: one field to a client that ends lines only at CRLF
    "header-line": b"HTTP/1.1 200 OK\r\nX-A: 1\nSet-Cookie: s=evil\r\nContent-Length: 2\r\n\r\nok",
    "last-header-line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
    "empty-line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nok",
    "every-line": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    # lines the relay drops (hop-by-hop), the rest with CRLF
    "hop-by-hop": (
        b"HTTP/1.1 200 OK\nConnection: x-a\nX-A: 1\nUpgrade: h2c\nContent-Length: 2\n\nok"
    ),
    "http10": b"HTTP/1.0 200 OK\nConnection: keep-alive\nContent-Length: 2\n\nok",
    "says-close": b"HTTP/1.1 200 OK\nConnection: close\nContent-Length: 2\n\nok",
    # an interim head, then the final one
    "interim": b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "interim-103": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\n\r\nHTTP/1.1 200 OK\nContent-Length: 2\n\nok"
    ),
    "no-body": b"HTTP/1.1 204 No Content\r\n\n",
}


def crlf(answer: bytes) -> bytes:
    """*answer* (heads and a body without LF) with every LF a CRLF."""
    return answer.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _through(
    mode: tuple[str, str], script: list[bytes], edits: HeadEdits | None = None
) -> tuple[list[bytes], Scripted, Reported, dict[str, int]]:
    """One keep-alive client connection, a GET per step of *script* and a
    last one (answered 200): the responses, the backend, what was
    reported, the relay's stats."""
    up = Scripted(list(script))
    reported = Reported()
    if edits is None:
        relay = _proxy(mode, (up.endpoint,), None, **reported.kw(mode[0]))
    else:
        relay = _edits_relay(mode, (up.endpoint,), edits, **reported.kw(mode[0]))
    try:
        a = _client(relay)
        got = []
        for _ in range(len(script) + 1):
            a.sendall(GET)
            got.append(_response(a))
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert stats["requests"] == len(script) + 1 and stats["errors"] == 0, stats
    return got, up, reported, stats


def _heads(answer: bytes) -> bytes:
    """The heads of *answer* (an interim one's too), the body left out."""
    return answer[: answer.rindex(b"\r\n\r\n") + 4]


@pytest.mark.parametrize("head", list(HEADS))
def test_a_bare_lf_in_a_response_head_goes_on_with_crlf(mode: tuple[str, str], head: str) -> None:
    """Each head is answered as the same head with CRLF line ends is, byte
    for byte, with no bare LF left; the upstream connection is reused
    when the head keeps it (one that says close is not), no failure is
    reported and the access log's flags say nothing."""
    got, up, reported, _ = _through(mode, [HEADS[head]])
    want, up_crlf, _, _ = _through(mode, [crlf(HEADS[head])])
    assert got == want, (got, want)
    heads = _heads(got[0])
    assert heads.count(b"\n") == heads.count(b"\r\n"), heads
    assert got[1] == _answer(200, OK_BODY), got[1]  # the next request, on the same connection
    assert len(up.requests) == 2
    assert up.accepted == up_crlf.accepted == (2 if head == "says-close" else 1)
    assert reported.failures == []
    assert [flags for _, flags in reported.rows] == [0, 0], reported.rows


def test_the_split_field_is_two_fields_to_the_client(mode: tuple[str, str]) -> None:
    """``X-A: 1\\nSet-Cookie: s=evil``: the relay reads two fields, and so
    does a client that ends lines only at CRLF (it would have read one
    field X-A of value ``1\\nSet-Cookie: s=evil``)."""
    got, _, _, _ = _through(mode, [HEADS["header-line"]])
    assert got[0] == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nSet-Cookie: s=evil\r\nContent-Length: 2\r\n\r\nok"
    ), got[0]


@pytest.mark.parametrize("edits", ["response", "connection"])
def test_the_head_rewritten_is_the_one_edited(mode: tuple[str, str], edits: str) -> None:
    """A route's response edits (the compiled twin's send_edited_head) and
    the relay's own connection line to a client that leaves (its request
    said close) go on the head written with CRLF: each line ends in CRLF,
    the lines added before its empty line."""
    bare = b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\nok"
    if edits == "response":
        got, _, _, _ = _through(
            mode, [bare], HeadEdits(response_add=(("x-r", "1"),), response_remove=("x-a",))
        )
        assert got[0] == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-r: 1\r\n\r\nok", got[0]
        return
    up = Scripted([bare])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        got = _response(a)
        a.close()
    finally:
        relay.close()
        up.close()
    assert got == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"
    ), got


def test_a_chunked_body_after_a_bare_lf_head_goes_as_it_came(mode: tuple[str, str]) -> None:
    """A bare-LF head saying chunked, its chunks framed with CRLF: the head
    goes with CRLF, the chunks as they came, the connection reused for the
    next request."""
    body = b"2\r\nok\r\n0\r\n\r\n"
    up = Scripted([b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n" + body])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(GET)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert _recv(a, len(head) + len(body)) == head + body
        a.sendall(GET)
        assert _response(a) == _answer(200, OK_BODY)
        a.close()
    finally:
        relay.close()
        up.close()
    assert up.accepted == 1


def test_the_same_bare_lf_head_is_written_again_each_time(mode: tuple[str, str]) -> None:
    """The compiled relay takes a head equal byte for byte to the last one
    it judged for its endpoint on that one's verdict (its memo): a
    bare-LF head, Python's, never enters it, so each one is written again,
    around CRLF heads that do."""
    bare = HEADS["last-header-line"]
    good = _answer(200, b"ok")
    got, up, _, _ = _through(mode, [bare, bare, good, bare, good])
    fixed = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert got == [fixed, fixed, good, fixed, good, good], got
    assert up.accepted == 1


def test_a_bare_cr_in_a_response_head_is_still_a_502(mode: tuple[str, str]) -> None:
    """A CR not before an LF ends no line: 502 ``CR without LF in the
    response head`` (UPE, a gateway failure of its endpoint), the client
    kept, its next request answered on a new upstream connection."""
    reason = b"CR without LF in the response head"
    got, up, reported, _ = _through(
        mode, [b"HTTP/1.1 200 OK\r\nX-A: 1\rSet-Cookie: s=evil\r\nContent-Length: 2\r\n\r\nok"]
    )
    head, _, body = got[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and body == reason, got[0]
    assert got[1] == _answer(200, OK_BODY), got[1]
    assert _until(lambda: up.accepted == 2)
    ((status, flags), ok) = sorted(reported.rows, reverse=True)
    assert status == 502 and flags & accesslog.UPE, reported.rows
    assert ok == (200, 0), reported.rows
    assert reported.failures == [(up.endpoint, reason.decode())], reported.failures
