"""A retry policy's retry goes through the connection pool, as Envoy's do
(both twins, real sockets): after its backoff it takes an idle pooled
connection to its endpoint when there is one, as a first try does; a stale
one (the server closed it as it was taken) gets the reused connection's own
retry on a new connection, which is not one of the policy's attempts,
whatever the policy retries.

Two endpoints A and B each get an idle pooled connection first (a request
to each alone, by Host); then a request to both, A first, A answering 503
(or, in one test, A's pooled connection reset as the request is routed).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import RESET_BEFORE_HEADERS_RETRIED
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, RetryPolicy, Verdict
from tests._scripted import (
    CLOSE,
    Scripted,
    Step,
    _answer,
    _client,
    _closed_stats,
    _reset,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import sent_up
from tests.test_relay_edges import _relay
from tests.test_relay_edges_count import Counted

WARM_A = b"GET /w HTTP/1.1\r\nHost: a\r\n\r\n"
WARM_B = b"GET /w HTTP/1.1\r\nHost: b\r\n\r\n"
GET_X = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
ISTIO_DEFAULT = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def _two(
    mode: tuple[str, str],
    a: Scripted,
    b: Scripted,
    retry: RetryPolicy,
    counted: Counted,
    routing: Callable[[], None] | None = None,
) -> Any:
    """A relay routing Host a to A alone, b to B alone (no policy), any
    other to A then B under *retry* (calling *routing* first: on the
    relay's loop, which waits for it)."""
    which, how = mode

    def endpoints(head: Any) -> tuple[tuple[tuple[str, int], ...], RetryPolicy | None]:
        host = head.host
        if host == "a":
            return (a.endpoint,), None
        if host == "b":
            return (b.endpoint,), None
        if routing is not None:
            routing()
        return (a.endpoint, b.endpoint), retry

    kw: dict[str, Any] = dict(counted.kw(which))
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            eps, r = endpoints(head)
            return Verdict((Choice(1, eps, "ORDERED", tag="t"),), ttl=60.0, retry=r)

        kw["resolve"] = resolve

    def decide(head: Any, origin: Any) -> Decision:
        eps, r = endpoints(head)
        return Decision(eps, tag="t", retry=r)

    return _relay(which, decide, **kw)


def _run(
    mode: tuple[str, str],
    a_steps: list[Step],
    b_steps: list[Step],
    retry: RetryPolicy,
    request: bytes = GET_X,
    routing: Callable[[], None] | None = None,
    a_script: list[Step] | None = None,
) -> tuple[bytes, Scripted, Scripted, dict[str, int], list[int]]:
    """Warm A and B (a pooled connection each), then *request* (routed
    through *routing*, the relay's decide hook): its response, the
    backends, the relay's stats and the statuses counted. *a_script*: A's
    whole script, its warm answer included, in place of *a_steps*'."""
    a = Scripted(a_script if a_script is not None else [_answer(200, b"warm-a"), *a_steps])
    b = Scripted([_answer(200, b"warm-b"), *b_steps])
    counted = Counted()
    relay = _two(mode, a, b, retry, counted, routing)
    try:
        c = _client(relay)
        for warm in (WARM_A, WARM_B):
            c.sendall(warm)
            assert _status(_response(c)) == 200
        assert (a.accepted, b.accepted) == (1, 1)
        c.sendall(request)
        got = _response(c)
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        a.close()
        b.close()
    return got, a, b, stats, [s for s, _ in counted.rows]


def test_a_policy_retry_takes_its_endpoint_s_idle_pooled_connection(mode: tuple[str, str]) -> None:
    """A answers 503 on its pooled connection; the retry goes to B on B's
    pooled connection: B accepts no new connection, the pool counts the
    reuse (the first try's on A, the retry's on B)."""
    got, a, b, stats, counted = _run(mode, [_answer(503, b"no")], [_answer(200, b"b")], policy(1))
    assert _status(got) == 200 and got.endswith(b"b"), got
    assert (len(a.requests), len(b.requests)) == (2, 2)
    assert b.requests[1] == sent_up(GET_X, 2)
    assert b.accepted == 1, "the retry opened a new connection: B's pooled one was idle"
    assert a.accepted == 1
    assert stats["pool_reused"] == 2, stats
    assert stats["retries"] == 1, stats
    assert sorted(counted) == [200, 200, 200]


@pytest.mark.parametrize(
    ("on", "codes"),
    [("5xx", ()), ("retriable-status-codes", (503,)), (ISTIO_DEFAULT, (503,))],
    ids=["5xx", "status-codes", "istio-default"],
)
def test_a_policy_retry_s_stale_pooled_connection_gets_its_own_retry_not_an_attempt(
    mode: tuple[str, str],
    on: str,
    codes: tuple[int, ...],
) -> None:
    """The retry's pooled connection to B is stale (B closes it on reading
    the retried request, no byte back): it is sent once more on a new
    connection to B (the endpoint the policy chose; A, answering 503 for
    ever, is not tried again), not as one of the policy's attempts (1,
    used by A's 503), even under a policy that does not retry resets: the
    client gets B's answer."""
    got, a, b, stats, counted = _run(
        mode, [_answer(503, b"no")] * 5, [CLOSE, _answer(200, b"b")], policy(1, on, codes)
    )
    assert _status(got) == 200 and got.endswith(b"b"), got
    assert len(a.requests) == 2, "A was tried again"
    assert b.requests[1:] == [sent_up(GET_X, 2)] * 2  # (the stale one's retry: the same try)
    assert b.accepted == 2  # the pooled one, then the new one
    assert stats["pool_reused"] == 2, stats
    assert stats["retries"] == 1, stats
    assert sorted(counted) == [200, 200, 200]


@pytest.mark.parametrize("on", ["retriable-status-codes", "retriable-status-codes,reset"])
def test_a_post_on_a_policy_retry_s_stale_pooled_connection_is_not_sent_again(
    mode: tuple[str, str],
    on: str,
) -> None:
    """The reused connection's own retry keeps its rule on a policy's try:
    a POST that left on the stale pooled connection (B read it, then
    closed) is not sent a third time; with reset in retryOn it would be
    the policy's, whose one attempt A's 503 used: the 503 of a connection
    closed before the response, after a retry."""
    post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    a = Scripted([_answer(200, b"warm-a"), _answer(503, b"no")])
    b = Scripted([_answer(200, b"warm-b"), CLOSE])
    counted = Counted()
    relay = _two(mode, a, b, policy(1, on, (503,)), counted)
    try:
        c = _client(relay)
        for warm in (WARM_A, WARM_B):
            c.sendall(warm)
            assert _status(_response(c)) == 200
        c.sendall(post)
        got = _response(c)
        c.close()
    finally:
        relay.close()
        a.close()
        b.close()
    assert _status(got) == 503, got
    assert got.endswith(RESET_BEFORE_HEADERS_RETRIED.encode()), got
    assert b.requests[1:] == [sent_up(post, 2)]
    assert (a.accepted, b.accepted) == (1, 1)


def test_a_post_that_never_left_is_not_sent_again_when_it_left_on_the_policy_s_try(
    mode: tuple[str, str],
) -> None:
    """A's pooled connection is reset while the relay routes a POST (no
    idle event evicted it in between): its send fails, the kernel took no
    byte, so the POST never left and gets the reused connection's one
    retry, on a new connection to B, whatever its method. B answers 503;
    the policy's retry (retriable-status-codes 503, to the endpoints as
    drawn: B first) takes B's idle pooled connection, and B closes it on
    reading the POST, no byte back: that POST left, so it is not sent
    again (no reset in retryOn; the policy's one attempt spent): the 503.
    That the first try's request never left is no mark of the policy's
    try's (the compiled twin's c.never_left, cleared as a policy's retry
    begins); kept, the POST went a third time, on a new connection to B."""
    post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    go, reset_done = threading.Event(), threading.Event()

    def warm_then_reset(conn: socket.socket) -> None:
        conn.sendall(_answer(200, b"warm-a"))
        go.wait(5)  # while the relay routes the POST: reset, and gone
        _reset(conn)
        reset_done.set()

    def routing() -> None:
        if not go.is_set():
            go.set()
            assert reset_done.wait(5)
            time.sleep(0.05)  # the RST is in the relay's socket

    retry = policy(1, "retriable-status-codes", (503,), ignore_previous_hosts=False)
    got, a, b, stats, counted = _run(
        mode,
        [],
        [_answer(503, b"no"), CLOSE],
        retry,
        request=post,
        routing=routing,
        a_script=[warm_then_reset],
    )
    assert a.requests == [sent_up(WARM_A)], "the POST reached A: it left"
    # (its first try, sent again on a new connection to B as it never left;
    # then the policy's retry, on B's pooled connection)
    sent = [sent_up(WARM_B), sent_up(post), sent_up(post, 2)]
    assert b.requests == sent, "the POST went again after it left"
    assert _status(got) == 503, got
    assert (a.accepted, b.accepted) == (1, 2)  # B: the pooled one, the reused one's retry's
    assert stats["retries"] == 1, stats
    assert sorted(counted) == [200, 200, 503]
