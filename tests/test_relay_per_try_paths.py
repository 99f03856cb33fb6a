"""Every try gets its per-try timer, whichever way its connection became
ready and its request ended, and none outlives its request: both twins
(pure, compiled per request and from a cached verdict), real sockets.

The per-try timer starts at the later of the try's connection's readiness
and the request's end (test_relay_retries_per_try_connect.py: the
connect). Paths checked here, each both ways (an answer within the
per-try timeout of that start: the 200; one past it: the 504 ``upstream
request timeout``, where a try without a timer would have had the 200):
an idle pooled connection handed out to a keep-alive client's second
request; a pipelined second request; a body that ends after the
connection is ready (a client that waits for ``100 Continue`` and sends
its body anyway); a 4 MiB body forwarded as it comes (the compiled
relay's spliced path); a retry after a per-try timeout, on a new
connection and on an idle pooled one; a try that waited
in line for a connection (max_connections) and its retry; a mirrored
request. And a keep-alive client's first request's timer does not fire
on its second, nor a pipelined first request's on the one behind it.
Written by a review of the per-try timer's start (review8): each passed
as it came.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    STALL,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _recv,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_attempt_count import _counts
from tests.test_relay_circuit_breakers import (
    PER_TRY_S,
    Held,
    _first_held,
    _limits,
    _pending,
    _send,
    _setup,
)
from tests.test_relay_mirror import Mirrored, _mirrored

SEED = 20261207
PER_TRY = 1.0
LATE = b"upstream request timeout"


def _after(seconds: float, body: bytes = b"late") -> Callable[[socket.socket], None]:
    """A Scripted step: the 200 *seconds* after the request came."""

    def step(conn: socket.socket) -> None:
        time.sleep(seconds)
        try:
            conn.sendall(_answer(200, body))
        except OSError:
            pass  # (the relay gave the try up)

    return step


def _relay(mode: tuple[str, str], endpoints: Any, on: str = "retriable-4xx") -> Any:
    retry = RetryPolicy.of(1, PER_TRY, on.split(","), (), 0.001)
    return _proxy(mode, endpoints, retry, connect_timeout=5.0, seed=SEED)


def _timed(c: socket.socket, send: Callable[[], None]) -> tuple[bytes, float]:
    t0 = time.monotonic()
    send()
    got = _response(c, timeout=10.0)
    return got, time.monotonic() - t0


def _assert_timed(got: bytes, took: float, stats: dict[str, int], late: bool) -> None:
    """*late*: the try's timer passed (the 504, one timeout), else its 200."""
    if late:
        assert _status(got) == 504 and got.endswith(LATE), (got, took)
        assert stats["timeouts"] == 1, stats
    else:
        assert _status(got) == 200 and got.endswith(b"late"), (got, took)
        assert stats["timeouts"] == 0, stats


@pytest.mark.parametrize("late", [False, True])
def test_keep_alive_second_request_on_the_pooled_connection(
    mode: tuple[str, str], late: bool
) -> None:
    """A keep-alive client's second request, on the upstream connection its
    first pooled (handed out idle): timed from its own end, the first's
    timer gone. The second sent 0.9 s after the first was answered, its
    answer 0.6 s after it came (1.5 s after the first: past a stale
    timer of the first's) or, *late*, 1.8 s after (past its own)."""
    up = Scripted([_answer(200, b"a"), _after(1.8 if late else 0.6)])
    relay = _relay(mode, (up.endpoint,))
    try:
        c = _client(relay)
        c.sendall(GET)
        assert _response(c) == _answer(200, b"a")
        time.sleep(0.9)
        got, took = _timed(c, lambda: c.sendall(GET))
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
    assert up.accepted == 1  # (the second on the pooled connection)
    if late:
        assert _status(got) == 504 and got.endswith(LATE), (got, took)
        assert PER_TRY - 0.1 <= took < 1.7, took
        assert stats["timeouts"] == 1, stats
    else:
        assert _status(got) == 200 and got.endswith(b"late"), (got, took)
        assert stats["timeouts"] == 0, stats


@pytest.mark.parametrize("late", [False, True])
def test_pipelined_second_request(mode: tuple[str, str], late: bool) -> None:
    """Two requests in one segment: the first answered 0.9 s after it came,
    the second 0.6 s after (1.5 s after the first: past a timer started
    with the first request's) or, *late*, 1.8 s after: the second's timer
    its own."""
    up = Scripted([_after(0.9, b"a"), _after(1.8 if late else 0.6)])
    relay = _relay(mode, (up.endpoint,))
    try:
        c = _client(relay)
        c.sendall(GET + GET)
        assert _response(c, timeout=10.0) == _answer(200, b"a")
        t0 = time.monotonic()
        got = _response(c, timeout=10.0)
        took = time.monotonic() - t0
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
    _assert_timed(got, took, stats, late)


POST_HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"


@pytest.mark.parametrize("late", [False, True])
def test_body_sent_after_the_connection_is_ready(mode: tuple[str, str], late: bool) -> None:
    """A client that asks for 100 Continue, gets the relay's, and sends
    its body 1.2 s later (past the per-try timeout of the connection's
    readiness): the try timed from the body's end, the answer 0.5 s after
    it (the 200) or, *late*, 1.6 s after (the 504)."""
    up = Scripted([_after(1.6 if late else 0.5)])
    relay = _relay(mode, (up.endpoint,))
    try:
        c = _client(relay)
        c.sendall(POST_HEAD)
        assert _recv(c, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        time.sleep(1.2)
        got, took = _timed(c, lambda: c.sendall(b"hello"))
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
    assert [r.endswith(b"hello") for r in up.requests] == [True]
    _assert_timed(got, took, stats, late)


@pytest.mark.parametrize("late", [False, True])
def test_retry_after_a_per_try_timeout(mode: tuple[str, str], late: bool) -> None:
    """The first try stalls past its per-try timeout; the retry (5xx: a
    per-try timeout is retried) goes to the next endpoint, which answers
    0.5 s after it came (the 200) or, *late*, 2.5 s after (past the
    retry's own timer: the 504, two tries)."""
    first = Scripted([STALL])
    second = Scripted([_after(2.5 if late else 0.5)])
    relay = _relay(mode, (first.endpoint, second.endpoint), on="5xx")
    try:
        c = _client(relay)
        got, took = _timed(c, lambda: c.sendall(GET))
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        first.close()
        second.close()
    assert _counts(first.requests + second.requests) == [[b"1"], [b"2"]]
    assert stats["retries"] == 1, stats
    if late:
        assert _status(got) == 504 and got.endswith(LATE), (got, took)
        assert 2 * PER_TRY - 0.1 <= took < 2 * PER_TRY + 1.0, took
        assert stats["timeouts"] == 2, stats
    else:
        assert _status(got) == 200 and got.endswith(b"late"), (got, took)
        assert stats["timeouts"] == 1, stats


def test_a_try_that_waited_in_line_is_timed_once_handed_a_connection(
    mode: tuple[str, str],
) -> None:
    """max_connections 1: a request under a per-try timeout (1 s, one
    retry on reset) waits in line past its per-try timeout, untimed, then
    is handed A's released connection, where A stalls it, and its retry
    too: each try's timer runs from its connection's readiness, the 504
    within a bound (a try handed a connection out of the line without a
    timer: no answer until A gave up)."""
    held = Held()
    with _setup(mode, _limits(max_connections=1), held) as (relay, a, _):
        first = _first_held(relay, a)
        tried = _send(relay, "p")
        _pending(relay, a.endpoint, 1)
        time.sleep(1.5 * PER_TRY_S)
        with a.lock:
            a.script += [STALL, STALL]
        held.open()
        assert _status(_response(first)) == 200
        got, took = _timed(tried, lambda: None)
        assert _status(got) == 504 and got.endswith(LATE), (got, took)
        assert 2 * PER_TRY_S - 0.1 <= took < 2 * PER_TRY_S + 1.5, took
        assert relay.stats()["retries"] == 1
        assert relay.pending() == {}
        first.close()
        tried.close()
    assert len(a.requests) == 3, a.requests


BIG = 4 * 1024 * 1024  # (past the replay's bound: a body not held, spliced where it can be)


@pytest.mark.parametrize("late", [False, True])
def test_a_big_body_streamed_over_a_ready_connection(mode: tuple[str, str], late: bool) -> None:
    """A 4 MiB body sent in pieces over 1.2 s (past the per-try timeout of
    the connection's readiness), the relay forwarding it as it comes: the
    try timed from the body's end, the answer 0.5 s after it (the 200)
    or, *late*, 1.6 s after (the 504)."""
    up = Scripted([_after(1.6 if late else 0.5)])
    relay = _relay(mode, (up.endpoint,))
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BIG
    piece = b"x" * (BIG // 4)
    try:
        c = _client(relay)
        c.sendall(head + piece)
        for _ in range(2):
            time.sleep(0.6)
            c.sendall(piece)
        got, took = _timed(c, lambda: c.sendall(piece))
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
    assert [len(r.split(b"\r\n\r\n", 1)[1]) for r in up.requests] == [BIG]
    if mode[0] == "compiled":  # (the request's end on the spliced path, request_read())
        assert stats["spliced"] >= 1, stats
    _assert_timed(got, took, stats, late)


@pytest.mark.parametrize("late", [False, True])
def test_a_mirrored_request_s_try_is_timed(mode: tuple[str, str], late: bool) -> None:
    """A request mirrored (its copy to a mirror that answers at once):
    the primary's try timed as without a mirror, the answer 0.5 s after it
    came (the 200) or, *late*, 1.6 s after (the 504); the copy went."""
    up, mirror = Scripted([_after(1.6 if late else 0.5)]), Mirrored()
    retry = RetryPolicy.of(1, PER_TRY, ["retriable-4xx"], (), 0.001)
    with _mirrored(mode, up, mirror, retry=retry) as relay:
        c = _client(relay)
        got, took = _timed(c, lambda: c.sendall(GET))
        assert _until(lambda: len(mirror.seen()) == 1), mirror.seen()
        stats = _closed_stats(c, relay)
    _assert_timed(got, took, stats, late)


@pytest.mark.parametrize("late", [False, True])
def test_a_retry_after_a_per_try_timeout_on_an_idle_pooled_connection(
    mode: tuple[str, str], late: bool
) -> None:
    """A keep-alive client's first request: A's 503, its retry B's 200
    (B's connection pooled). Its second: A stalls past the per-try
    timeout, the retry goes on B's
    idle pooled connection, answered 0.5 s after it came (the 200) or,
    *late*, 2.5 s after (past the retry's own timer: the 504)."""
    a = Scripted([_answer(503, b"busy"), STALL])
    b = Scripted([_answer(200, b"b"), _after(2.5 if late else 0.5)])
    relay = _relay(mode, (a.endpoint, b.endpoint), on="5xx")
    try:
        c = _client(relay)
        c.sendall(GET)
        assert _response(c) == _answer(200, b"b")
        got, took = _timed(c, lambda: c.sendall(GET))
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        a.close()
        b.close()
    assert b.accepted == 1  # (the retry on B's pooled connection; A's retried one closed)
    assert _counts(b.requests) == [[b"2"], [b"2"]]
    assert stats["retries"] == 2, stats
    if late:
        assert _status(got) == 504 and got.endswith(LATE), (got, took)
        assert 2 * PER_TRY - 0.1 <= took < 2 * PER_TRY + 1.0, took
        assert stats["timeouts"] == 2, stats
    else:
        assert _status(got) == 200 and got.endswith(b"late"), (got, took)
        assert stats["timeouts"] == 1, stats
