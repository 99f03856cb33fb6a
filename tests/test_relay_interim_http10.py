"""No interim (1xx) response goes to an HTTP/1.0 client: RFC 9110 §15.2,
"a server MUST NOT send a 1xx response to an HTTP/1.0 client". The
upstream's 100 Continue or 103 Early Hints to a request that came as
HTTP/1.0 is read and dropped, its final answer sent; an HTTP/1.1 client
gets them as before. Both relay twins (and the compiled one from a cached
verdict), real sockets: a 100 without header lines (the compiled loop's
own path) and a 103 with a Link line (judged in Python).
"""

from __future__ import annotations

import pytest

from tests._scripted import (
    _exchange,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)

FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
INTERIM = {"100": CONTINUE, "103": HINTS, "both": CONTINUE + HINTS + CONTINUE}


def _request(version: bytes) -> bytes:
    keep = b"Connection: keep-alive\r\n" if version == b"1.0" else b""
    return b"GET /x HTTP/%s\r\nHost: a\r\n%s\r\n" % (version, keep)


@pytest.mark.parametrize("interim", list(INTERIM))
def test_an_http10_client_gets_the_final_answer_alone(mode: tuple[str, str], interim: str) -> None:
    """Twice on one keep-alive HTTP/1.0 connection: each answer is the
    200 alone, said keep-alive; the backend sent its interim heads."""
    got, up, statuses, _ = _exchange(
        mode, [INTERIM[interim] + FINAL] * 2, None, _request(b"1.0"), requests=2
    )
    assert [r.split(b"\r\n", 1)[0] for r in got] == [b"HTTP/1.1 200 OK"] * 2
    assert all(b" 10" not in r.split(b"\r\n", 1)[0] for r in got)
    assert all(r.endswith(b"\r\n\r\nok") for r in got)
    assert statuses == [200, 200]
    assert len(up.requests) == 2


@pytest.mark.parametrize("interim", list(INTERIM))
def test_an_http11_client_gets_the_interim_heads_too(mode: tuple[str, str], interim: str) -> None:
    """The same answers to HTTP/1.1 requests: the interim heads, as the
    backend sent them, then the 200."""
    got, _, statuses, _ = _exchange(
        mode, [INTERIM[interim] + FINAL] * 2, None, _request(b"1.1"), requests=2
    )
    assert [r[: len(INTERIM[interim])] for r in got] == [INTERIM[interim]] * 2
    assert [_status(r[len(INTERIM[interim]) :]) for r in got] == [200, 200]
    assert statuses == [200, 200]


def test_a_retry_after_an_interim_head_an_http10_client_never_got(mode: tuple[str, str]) -> None:
    """A 103 then a 503 under a retry policy (5xx): nothing went to the
    HTTP/1.0 client, so the try is retried and the client gets the retry's
    200 alone; to an HTTP/1.1 client the 103 went out, so the 503 is its
    answer (a try after it would answer twice)."""
    answer = HINTS + b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"
    got, up, _, _ = _exchange(mode, [answer], policy(1, "5xx"), _request(b"1.0"))
    assert got[0].startswith(b"HTTP/1.1 200 ")
    assert len(up.requests) == 2
    got, up, _, _ = _exchange(mode, [answer], policy(1, "5xx"), _request(b"1.1"))
    assert got[0].startswith(HINTS) and _status(got[0][len(HINTS) :]) == 503
    assert len(up.requests) == 1
