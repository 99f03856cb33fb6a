"""The route timeout (VirtualService ``http[].timeout``) of a request with a
body runs from the request's end, as Envoy's router's
(Filter::onRequestComplete), its connect's time counted: Envoy buffers a
body while the upstream connection is made, so a POST whose body is all
here times from its end, not from when its connection is ready.

Before, neither relay read a body while connecting, and the timer of a
request with a body started once its connection was ready and the body
read: a POST to a pod slow to accept got its 200 where Envoy answers the
504 ``UT``. Now a body that came whole with its head (a ``Content-Length``
body's bytes, a chunked body's last chunk) starts the timer at the
request's routing; its 504 keeps the client connection, the body read and
dropped, as after a request without a body (Envoy's local reply to a
request read whole). A body still to come is timed from its last byte
read, as before (and as Envoy's: its timer starts at the body's end).

Both twins (pure, compiled per request and from a cached verdict), real
sockets. An endpoint slow to accept (test_relay_retries_per_try_connect's
SlowToAccept: its accept queue full until RELEASE s after the request, its
connect ~3 s); a route timeout of 1 s.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.accesslog import AccessLog
from l4proxy.dataplane.verdict import MIRROR_SCALE, Choice, Mirror, RetryPolicy, Verdict
from tests._scripted import (
    GET,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_attempt_count import _refusing
from tests.test_relay_edges import _read_all, _relay, _wait_for
from tests.test_relay_mirror import COPY, Mirrored, _mirror_relay, _settled
from tests.test_relay_retries_per_try_connect import RELEASE, SlowToAccept

SEED = 20261207
TIMEOUT = 1.0
HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\n"
BODIES = {
    "content-length": HEAD + b"Content-Length: 5\r\n\r\nhello",
    "chunked": HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", list(BODIES))
def test_a_post_whose_body_came_with_its_head_is_timed_while_connecting(
    mode: tuple[str, str], body: str
) -> None:
    """A POST, its body in the head's segment, to an endpoint slow to
    accept (~3 s), a route timeout of 1 s: the 504 ``upstream request
    timeout`` at ~1 s, during the connect, as Envoy's (before: the 200 at
    ~3.5 s, timed from the connection's readiness). The client connection
    stays (no ``connection: close``; its body was read, not taken for the
    next head): a GET on it once the endpoint accepts gets the 200, the
    endpoint seeing that GET alone."""
    slow = SlowToAccept(0.2)
    relay = _proxy(mode, (slow.endpoint,), None, timeout=TIMEOUT, seed=SEED)
    try:
        c = _client(relay)
        t0 = time.monotonic()
        slow.start()
        c.sendall(BODIES[body])
        got = _response(c, timeout=10.0)
        took = time.monotonic() - t0
        assert _status(got) == 504 and got.endswith(b"upstream request timeout"), (got, took)
        assert TIMEOUT - 0.1 <= took < RELEASE - 0.3, took
        assert b"\r\nconnection: close" not in got.partition(b"\r\n\r\n")[0].lower(), got
        assert slow.requests == []
        # once the endpoint accepts, the next request on the same connection
        time.sleep(max(0.0, t0 + RELEASE + 0.3 - time.monotonic()))
        c.sendall(GET)
        again = _response(c, timeout=10.0)
        assert _status(again) == 200 and again.endswith(b"late"), again
        assert [r.split(b"\r\n", 1)[0] for r in slow.requests] == [b"GET /x HTTP/1.1"]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        slow.close()
    assert (stats["requests"], stats["timeouts"]) == (2, 1), stats


def test_a_post_whose_body_comes_slowly_is_timed_from_the_body_s_end(
    mode: tuple[str, str],
) -> None:
    """The head alone, its body 1.5 s later (past the route timeout of
    1 s), the answer 0.6 s after the body reached the endpoint: the 200,
    the timeout running from the body's last byte read (as Envoy's:
    onRequestComplete), not from the head."""
    gap, answer_after = 1.5, 0.6

    def late(conn: Any) -> None:
        time.sleep(answer_after)
        conn.sendall(_answer(200, b"whole"))

    up = Scripted([late])
    relay = _proxy(mode, (up.endpoint,), None, timeout=TIMEOUT, seed=SEED)
    try:
        c = _client(relay)
        whole = BODIES["content-length"]
        c.sendall(whole[:-5])
        time.sleep(gap)
        t_body = time.monotonic()
        c.sendall(whole[-5:])
        got = _response(c, timeout=10.0)
        took = time.monotonic() - t_body
        assert _status(got) == 200 and got.endswith(b"whole"), (got, took)
        assert took >= answer_after - 0.05, took
        assert [r.rpartition(b"\r\n\r\n")[2] for r in up.requests] == [b"hello"]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        # (its end of the pooled connection: closed by its thread once the
        # relay's goes, not left to the fd audit's next snapshot)
        _until(lambda: up.closed_by_relay == 1)
        up.close()
    assert (stats["requests"], stats["timeouts"]) == (1, 0), stats


def test_a_mirrored_post_timed_out_while_connecting_drops_its_copy(
    mode: tuple[str, str],
) -> None:
    """The same POST, mirrored: its 504 while connecting, its copy dropped
    and counted, as a body no try took is (test_relay_mirror's
    test_a_body_no_try_took_is_a_dropped_copy): never the head without its
    body (the compiled twin read the body for the 504 only)."""
    slow = SlowToAccept(0.2)
    mirror = Mirrored()
    copy = Mirror((mirror.endpoint,), ppm=MIRROR_SCALE, tag=COPY)
    relay = _mirror_relay(mode, (slow.endpoint,), (copy,), timeout=TIMEOUT, seed=SEED)
    try:
        c = _client(relay)
        slow.start()
        c.sendall(BODIES["content-length"])
        got = _response(c, timeout=10.0)
        assert _status(got) == 504 and got.endswith(b"upstream request timeout"), got
        stats = _settled(relay)
        c.close()
    finally:
        relay.close()
        slow.close()
        mirror.close()
    assert mirror.accepted == 0
    assert (stats["mirrored"], stats["mirror_dropped"]) == (0, 1), stats


# -- the body read and dropped, and what follows it on the connection ------
#
# An endpoint that never accepts (its backlog full: a connect hangs, well
# past the route timeout) on Host "slow", a Scripted one on Host "fast"
# (routed by Host: the compiled twin's cached verdict keys on it), a route
# timeout of SHORT s on the slow one only.

SHORT = 0.5
FAST = b"GET /f HTTP/1.1\r\nHost: fast\r\n\r\n"
SLOW = b"POST /s HTTP/1.1\r\nHost: slow\r\n"


@contextmanager
def _black_hole() -> Iterator[tuple[str, int]]:
    """An endpoint whose connects hang (its accept queue full, never read)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
        time.sleep(0.05)
        yield listener.getsockname()
    finally:
        for s in fillers:
            s.close()
        listener.close()


def _by_host(
    mode: tuple[str, str],
    slow: tuple[tuple[str, int], ...],
    fast: tuple[str, int],
    retry: RetryPolicy | None = None,
    **kw: Any,
) -> Any:
    """A relay sending Host "slow" to *slow* (route timeout SHORT, *retry*),
    anything else to *fast* (no timeout)."""
    which, how = mode

    def decide(head: Any, origin: Any) -> Decision:
        if head.host == "slow":
            return Decision(slow, tag="s", timeout=SHORT, retry=retry)
        return Decision((fast,), tag="f")

    if how == "resolve":
        verdicts = {
            "slow": Verdict(
                (Choice(1, slow, "ORDERED", tag="s"),), ttl=60.0, timeout=SHORT, retry=retry
            ),
            "fast": Verdict((Choice(1, (fast,), "ORDERED", tag="f"),), ttl=60.0),
        }
        kw["resolve"] = lambda head, origin: verdicts[head.host]
    return _relay(which, decide, seed=SEED, **kw)


def _log_lines(r: int) -> list[dict[str, Any]]:
    """The access log's JSON lines written to the pipe *r* (its write end
    closed)."""
    got = b""
    while data := os.read(r, 65536):
        got += data
    return [json.loads(line) for line in got.splitlines()]


PIPELINED = {
    # each: the slow request(s) ahead of the fast GET, in one segment
    "content-length": SLOW + b"Content-Length: 5\r\n\r\nhello",
    "content-length-0": SLOW + b"Content-Length: 0\r\n\r\n",
    "chunked-extensions-trailers": SLOW
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + b'5;a=b;c="d"\r\nhello\r\n0;x=y\r\nX-T: 1\r\nY-T: 2\r\n\r\n',
    "expect-100-continue": SLOW + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
    "two-posts": (SLOW + b"Content-Length: 5\r\n\r\nhello") * 2,
}
# what each slow request's access log line says it received (a chunked
# body's bytes as they came, its framing included, as the relays count it)
RECEIVED = {
    "content-length": [5],
    "content-length-0": [0],
    "chunked-extensions-trailers": [45],
    "expect-100-continue": [5],
    "two-posts": [5, 5],
}


@pytest.mark.parametrize("case", list(PIPELINED))
def test_the_requests_pipelined_after_a_dropped_body_are_served_in_order_once(
    mode: tuple[str, str], case: str
) -> None:
    """The slow request(s) and a GET in one segment: each slow one's 504
    ``upstream request timeout`` while connecting (its body read and
    dropped: never the next head), then the GET's 200, in that order, on
    the same connection; the fast endpoint sees the GET alone, once. The
    access log: each slow one's 504 ``UT`` with the body's bytes received,
    the GET's 200 ``-``; no ``100 Continue`` from the relay (it passes
    ``Expect`` on, and no try went)."""
    up = Scripted([])
    r, w = os.pipe()
    try:
        with _black_hole() as hole:
            relay = _by_host(mode, (hole,), up.endpoint, access_log=AccessLog(w, json=True))
            try:
                c = _client(relay)
                c.sendall(PIPELINED[case] + FAST)
                slow = [_response(c, timeout=5.0) for _ in RECEIVED[case]]
                got = _response(c, timeout=5.0)
                stats = _closed_stats(c, relay)
            finally:
                relay.close()
                _until(lambda: up.closed_by_relay == up.accepted)  # (its end: see above)
        os.close(w)
        w = -1
        lines = _log_lines(r)
    finally:
        up.close()
        os.close(r)
        if w >= 0:
            os.close(w)
    for answer in slow:
        assert _status(answer) == 504 and answer.endswith(b"upstream request timeout"), answer
        assert b"connection: close" not in answer.lower(), answer
    assert _status(got) == 200 and got.endswith(b"ok"), got
    assert [q.split(b"\r\n", 1)[0] for q in up.requests] == [b"GET /f HTTP/1.1"]
    n = len(RECEIVED[case])
    assert [(d["path"], d["response_code"], d["response_flags"]) for d in lines] == [
        *[("/s", 504, "UT")] * n,
        ("/f", 200, "-"),
    ], lines
    assert [d["bytes_received"] for d in lines[:n]] == RECEIVED[case], lines
    assert (stats["requests"], stats["timeouts"]) == (n + 1, n), stats


@pytest.mark.parametrize(
    "body",
    [
        # a last chunk's CRLF still to come: not all here when routed
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
        # a chunk that cannot be framed: its 400 comes at the send
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        # part of a Content-Length body
        b"Content-Length: 10\r\n\r\nhello",
    ],
    ids=["last-chunk-split", "bad-chunk", "content-length-part"],
)
def test_a_body_not_all_here_when_routed_is_not_timed_while_connecting(
    mode: tuple[str, str], body: bytes
) -> None:
    """A body whose end did not come with its head (or cannot be framed)
    is not read while connecting, so its route timer has not started: no
    504 in three times the route timeout (the README's difference left:
    Envoy's would start at the body's end), and no byte after the head is
    taken for a request."""
    up = Scripted([])
    try:
        with _black_hole() as hole:
            relay = _by_host(mode, (hole,), up.endpoint)
            try:
                c = _client(relay)
                c.sendall(SLOW + body)
                got, how = _read_all(c, 3 * SHORT)
                c.close()
            finally:
                relay.close()
    finally:
        up.close()
    assert (got, how) == (b"", "timeout")
    assert up.requests == []


def test_a_dropped_body_s_504_during_a_connect_retry_s_backoff(mode: tuple[str, str]) -> None:
    """The first connect refused, a policy that retries it with a backoff
    of a base of 1000 s: the route timeout's 504 ends the wait (its body
    dropped, the connection kept, the retry never sent); the pipelined GET
    gets its 200, the fast endpoint seeing it alone; once the client goes
    the relay holds nothing."""
    dead = _refusing()
    up = Scripted([])
    retry = RetryPolicy.of(1, 0.0, ["connect-failure"], (), 1000.0)
    relay = _by_host(mode, (("127.0.0.1", dead.getsockname()[1]),), up.endpoint, retry)
    try:
        c = _client(relay)
        c.sendall(PIPELINED["content-length"] + FAST)
        first = _response(c, timeout=5.0)
        got = _response(c, timeout=5.0)
        stats = _closed_stats(c, relay)
        _wait_for("the client's connection is gone", lambda: relay.active() == 0, 3.0)
    finally:
        relay.close()
        _until(lambda: up.closed_by_relay == up.accepted)  # (its end: see above)
        up.close()
        dead.close()
    assert _status(first) == 504 and first.endswith(b"upstream request timeout"), first
    assert b"connection: close" not in first.lower(), first
    assert _status(got) == 200 and got.endswith(b"ok"), got
    assert [q.split(b"\r\n", 1)[0] for q in up.requests] == [b"GET /f HTTP/1.1"]
    assert (stats["requests"], stats["timeouts"], stats["retries"]) == (2, 1, 1), stats


@pytest.mark.parametrize("how", ["half-closed", "connection-close", "http10"])
def test_a_dropped_body_s_504_closes_where_the_client_leaves(
    mode: tuple[str, str], how: str
) -> None:
    """The 504 of a body read and dropped keeps the connection only as its
    head asks: ``Connection: close`` (the 504 says so) and HTTP/1.0
    without keep-alive close it once it is out, and so does a client that
    half-closed after its body (its EOF read as the next head is waited
    for). The GET after it in the segment is never read as a request."""
    up = Scripted([])
    head = {
        "half-closed": SLOW,
        "connection-close": SLOW + b"Connection: close\r\n",
        "http10": b"POST /s HTTP/1.0\r\nHost: slow\r\n",
    }[how]
    try:
        with _black_hole() as hole:
            relay = _by_host(mode, (hole,), up.endpoint)
            try:
                c = _client(relay)
                c.sendall(
                    head
                    + b"Content-Length: 5\r\n\r\nhello"
                    + (b"" if how == "half-closed" else FAST)
                )
                if how == "half-closed":
                    c.shutdown(socket.SHUT_WR)
                got, end = _read_all(c, 5.0)
                c.close()
            finally:
                relay.close()
    finally:
        up.close()
    assert end == "EOF", (got, end)
    assert _status(got) == 504 and got.endswith(b"upstream request timeout"), got
    assert (b"connection: close" in got.lower()) == (how != "half-closed"), got
    assert up.requests == []
