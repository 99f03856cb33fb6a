"""A request whose Content-Length is said more than once with one value
(two lines, or a list on one: ``5, 5``), through each relay twin on real
sockets: the pure one, the compiled one deciding per request and from a
cached verdict.

RFC 9110 §8.6 lets a recipient take a list of equal values as the one;
the head goes upstream with one Content-Length line, the length in the
first one's place (its name as sent), the others dropped, as HAProxy sends
it; a retry sends the same. It went as sent: a server that refuses a
repeated Content-Length or a list (llhttp, Node's, does) or reads ``5, 5``
otherwise answered or framed what the relay framed as one body of 5
bytes. Differing values stay refused: 400 and a close, nothing sent.
"""

from __future__ import annotations

import pytest

from tests._scripted import (
    GET,
    OK_BODY,
    Scripted,
    _answer,
    _client,
    _exchange,
    _proxy,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import sent_up


def _post(lines: bytes, body: bytes = b"hello") -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: a\r\n" + lines + b"X-B: 2\r\n\r\n" + body


# the head's Content-Length lines as sent, and as they go upstream
MERGED = {
    "two-lines": (
        b"Content-Length: 5\r\nX-A: 1\r\ncontent-length: 5\r\n",
        b"Content-Length: 5\r\nX-A: 1\r\n",
    ),
    "list": (b"Content-Length: 5, 5\r\n", b"Content-Length: 5\r\n"),
    "list-ows": (b"content-length:5 ,\t5 \r\n", b"content-length: 5\r\n"),
    "list-and-line": (
        b"X-A: 1\r\nCONTENT-LENGTH: 5,5\r\nContent-Length: 5\r\n",
        b"X-A: 1\r\nCONTENT-LENGTH: 5\r\n",
    ),
    "three-lines": (b"Content-Length: 5\r\n" * 3, b"Content-Length: 5\r\n"),
    # (a guard: one line, one value, goes as it is)
    "one": (b"Content-Length:  5 \r\n", b"Content-Length:  5 \r\n"),
}


@pytest.mark.parametrize("case", list(MERGED))
def test_one_content_length_line_goes_upstream(mode: tuple[str, str], case: str) -> None:
    sent, merged = MERGED[case]
    got, up, counted, _stats = _exchange(mode, [], None, request=_post(sent), requests=2)
    assert got == [_answer(200, OK_BODY)] * 2
    # the body framed by the one length: the next request read after it
    assert up.requests == [sent_up(_post(merged))] * 2
    assert counted == [200, 200]


def test_an_empty_body_said_twice(mode: tuple[str, str]) -> None:
    request = b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n"
    got, up, _counted, _stats = _exchange(mode, [], None, request=request, requests=2)
    assert got == [_answer(200, OK_BODY)] * 2
    assert up.requests == [sent_up(b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")] * 2


def test_a_retry_sends_the_one_line(mode: tuple[str, str]) -> None:
    sent, merged = MERGED["two-lines"]
    got, up, counted, stats = _exchange(
        mode, [_answer(503, b"no")], policy(2, "5xx"), request=_post(sent)
    )
    assert got == [_answer(200, OK_BODY)]
    assert up.requests == [sent_up(_post(merged)), sent_up(_post(merged), 2)]
    assert counted == [200] and stats["retries"] == 1


@pytest.mark.parametrize(
    "lines",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: 5,5,6\r\n",
    ],
    ids=["two-lines", "list", "list-of-three"],
)
def test_differing_values_stay_refused(mode: tuple[str, str], lines: bytes) -> None:
    up = Scripted([])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(GET + _post(lines, b"hello!") + GET)
        first, refused = _response(a), _response(a)
        assert first == _answer(200, OK_BODY)
        assert _status(refused) == 400 and refused.endswith(b"conflicting Content-Length values")
        assert b"connection: close" in refused.lower()
        a.settimeout(2.0)
        assert a.recv(1) == b""  # closed
        a.close()
        assert _until(lambda: not relay.active(), 1.0)
    finally:
        relay.close()
        up.close()
    assert up.requests == [sent_up(GET)]  # nothing of it, nor what came after
