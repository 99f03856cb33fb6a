"""The 503 ``no healthy upstream`` of a request whose every connect failed
(no try took it) keeps the client connection where its body came whole
with its head: the body read and dropped (its access log line's
BYTES_RECEIVED), as the route timeout's 504 while connecting drops it
(test_relay_timeout_body_connect.py) and as Envoy keeps the connection of
a local reply to a request it read whole: its connect fails after its
router buffered the body. Before, both relays answered it ``connection:
close`` and closed, the requests pipelined after it lost. A body not all
here still closes (its rest would be read as the next head).

Both twins (pure, compiled per request and from a cached verdict), real
sockets: an endpoint whose connects are refused on Host "dead", a Scripted
one on any other Host.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.accesslog import AccessLog
from l4proxy.dataplane.verdict import Choice, Verdict
from tests._scripted import (
    Scripted,
    _client,
    _closed_stats,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_attempt_count import _refusing
from tests.test_relay_edges import _read_all, _relay

SEED = 20261207
FAST = b"GET /f HTTP/1.1\r\nHost: fast\r\n\r\n"
DEAD = b"POST /d HTTP/1.1\r\nHost: dead\r\n"
WHOLE = {
    "content-length": (DEAD + b"Content-Length: 5\r\n\r\nhello", 5),
    "chunked": (DEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 15),
}


def _by_host(mode: tuple[str, str], dead: tuple[str, int], fast: tuple[str, int], **kw: Any) -> Any:
    """Host "dead" to *dead*, any other to *fast* (by Host: the compiled
    twin's cached verdict keys on it)."""
    which, how = mode

    def decide(head: Any, origin: Any) -> Decision:
        return Decision((dead if head.host == "dead" else fast,), tag="t")

    if how == "resolve":
        verdicts = {
            h: Verdict((Choice(1, (e,), "ORDERED", tag="t"),), ttl=60.0)
            for h, e in (("dead", dead), ("fast", fast))
        }
        kw["resolve"] = lambda head, origin: verdicts[head.host]
    return _relay(which, decide, seed=SEED, **kw)


@pytest.mark.parametrize("body", list(WHOLE))
def test_a_body_that_came_whole_is_dropped_and_the_connection_kept(
    mode: tuple[str, str], body: str
) -> None:
    """A POST whose body came with its head, its connect refused, and a GET
    in the same segment: the 503 ``no healthy upstream`` without
    ``connection: close``, then the GET's 200 on the same connection (the
    body never read as a head); the access log: 503 ``UF`` with the body's
    bytes received, then the GET's 200."""
    dead = _refusing()
    up = Scripted([])
    r, w = os.pipe()
    try:
        relay = _by_host(
            mode,
            ("127.0.0.1", dead.getsockname()[1]),
            up.endpoint,
            access_log=AccessLog(w, json=True),
        )
        try:
            c = _client(relay)
            c.sendall(WHOLE[body][0] + FAST)
            first = _response(c)
            got = _response(c)
            stats = _closed_stats(c, relay)
        finally:
            relay.close()
            # (its end of the pooled connection, closed by its thread)
            _until(lambda: up.closed_by_relay == up.accepted)
        os.close(w)
        w = -1
        lines = b""
        while data := os.read(r, 65536):
            lines += data
    finally:
        up.close()
        dead.close()
        os.close(r)
        if w >= 0:
            os.close(w)
    assert _status(first) == 503 and first.endswith(b"no healthy upstream"), first
    assert b"connection: close" not in first.lower(), first
    assert _status(got) == 200 and got.endswith(b"ok"), got
    assert [q.split(b"\r\n", 1)[0] for q in up.requests] == [b"GET /f HTTP/1.1"]
    logged = [json.loads(line) for line in lines.splitlines()]
    assert [
        (d["path"], d["response_code"], d["response_flags"], d["bytes_received"]) for d in logged
    ] == [("/d", 503, "UF", WHOLE[body][1]), ("/f", 200, "-", 0)], logged
    assert stats["requests"] == 2, stats


def test_a_body_not_all_here_still_closes(mode: tuple[str, str]) -> None:
    """Part of a Content-Length body, its connect refused: the 503 says
    ``connection: close`` and the connection closes (the rest of the body
    would be read as a head); the endpoint sees nothing."""
    dead = _refusing()
    up = Scripted([])
    try:
        relay = _by_host(mode, ("127.0.0.1", dead.getsockname()[1]), up.endpoint)
        try:
            c = _client(relay)
            c.sendall(DEAD + b"Content-Length: 50\r\n\r\nhello" + FAST)
            got, end = _read_all(c, 5.0)
            c.close()
        finally:
            relay.close()
    finally:
        up.close()
        dead.close()
    assert end == "EOF", (got, end)
    assert _status(got) == 503 and b"connection: close" in got.lower(), got
    assert up.requests == []
