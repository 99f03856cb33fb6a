"""A client that resets while its request is in flight, after a FIN or a
pipelined request (both twins, real sockets).

While a request is in flight the client is not read, only watched for its
reset. The compiled relay watched it through the exchange's lazy EPOLLIN,
dropped (its socket out of epoll) once that fired unwanted: a client that
half-closed (SHUT_WR) or pipelined its next request, then reset, went
unnoticed until the response came or the idle timeout, through every retry
and backoff under a policy, the try's upstream connection held. The pure
relay watched only under a retry policy (EPOLLRDHUP), and not once a FIN
came. Now both keep the client in epoll with nothing wanted but what epoll
says anyway (EPOLLHUP, EPOLLERR: a reset, never a FIN alone), edge-
triggered: a reset ends the exchange, its upstream closed, no retry more; a
half-close still gets its answer, with no wake-up for the FIN it left set.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    OK_BODY,
    STALL,
    Scripted,
    _answer,
    _proxy,
    _reset,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges import EPOLLIN, RelayFd, _relay, _tcp_client, _watched_with

SECOND = b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture(params=["half-closed", "pipelined"])
def then(request: pytest.FixtureRequest) -> Iterator[str]:
    """What the client does while its request is in flight, before any
    reset: either makes its socket readable to the relay."""
    yield request.param


def _nudge(a: socket.socket, fd: RelayFd, then: str) -> None:
    """Half-close or pipeline, and wait until the relay took note: the
    client's socket no longer watched for EPOLLIN (the compiled twin's lazy
    EPOLLIN fired; the pure twin does not read a client in flight)."""
    if then == "half-closed":
        a.shutdown(socket.SHUT_WR)
    else:
        a.sendall(SECOND)
    assert _until(lambda: _watched_with(fd).get(fd.fd, 0) & EPOLLIN == 0), _watched_with(fd)


def test_a_reset_after_a_fin_or_a_pipelined_request_ends_the_retries(
    mode: tuple[str, str],
    then: str,
) -> None:
    up = Scripted([_answer(503, b"no")] * 1000)
    # a try every 10 ms or so, for ever (no route timeout)
    relay = _proxy(mode, (up.endpoint,), RetryPolicy.of(100000, 0.0, ["5xx"], (), backoff=0.01))
    try:
        a, fd = _tcp_client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) >= 3), len(up.requests)
        _nudge(a, fd, then)
        tried = len(up.requests)
        # the retries go on (a loaded machine's slow backend thread: 10 s)
        assert _until(lambda: len(up.requests) >= tried + 3, 10), (tried, len(up.requests))
        _reset(a)
        time.sleep(0.1)  # (a try in flight as the reset came may still land)
        seen = len(up.requests)
        time.sleep(0.3)  # a few tries, were they going on (backoffs up to 0.1 s)
        assert len(up.requests) == seen, (seen, len(up.requests))
        # every try's connection closed: the last one's too (the backend's
        # threads see it late on a loaded machine: 10 s)
        closed = _until(lambda: up.closed_by_relay >= up.accepted, 10)
        assert closed, (up.closed_by_relay, up.accepted)
        assert _until(lambda: relay.stats()["active"] == 0, 10), relay.stats()
    finally:
        relay.close()
        up.close()


@pytest.mark.parametrize("retry", [None, RetryPolicy.of(3, 0.0, ["5xx"], ())], ids=["", "retry"])
def test_a_reset_after_a_fin_or_a_pipelined_request_closes_the_stalled_upstream(
    mode: tuple[str, str],
    then: str,
    retry: RetryPolicy | None,
) -> None:
    """The try in flight (no answer yet, no timeout) is closed at the
    client's reset, not left to the idle timeout; with or without a policy."""
    up = Scripted([STALL])
    relay = _proxy(mode, (up.endpoint,), retry)
    try:
        a, fd = _tcp_client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) == 1)
        _nudge(a, fd, then)
        # the relay's loop turns once more (another client's exchange, its
        # connection pooled): the FIN or the bytes came before, seen then
        b, _ = _tcp_client(relay)
        b.sendall(GET)
        assert _status(_response(b)) == 200
        b.close()
        _reset(a)
        assert _until(lambda: up.closed_by_relay == 1), up.closed_by_relay
        assert _until(lambda: relay.stats()["active"] == 0), relay.stats()
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 2  # a's, tried once, and b's


def test_a_stalled_upstream_is_closed_at_a_plain_reset_without_a_policy(
    mode: tuple[str, str],
) -> None:
    """No FIN, nothing pipelined: the compiled twin's lazy EPOLLIN saw the
    reset already; the pure one watched only under a retry policy."""
    up = Scripted([STALL])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a, _ = _tcp_client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) == 1)
        _reset(a)
        assert _until(lambda: up.closed_by_relay == 1), up.closed_by_relay
    finally:
        relay.close()
        up.close()


def _read(a: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """*n* bytes, or those that came before the end or *timeout*."""
    a.settimeout(timeout)
    got = b""
    try:
        while len(got) < n and (data := a.recv(n - len(got))):
            got += data
    except TimeoutError:
        pass
    return got


def _cpu_ticks() -> int:
    """This process's CPU time (every thread, the relay's too), in clock ticks."""
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def test_a_half_closed_or_pipelining_client_gets_its_answers_and_nothing_spins(
    mode: tuple[str, str],
    then: str,
) -> None:
    """A FIN alone is no reset: the answer still goes out (and the pipelined
    request's after it). Meanwhile the FIN, level-triggered, left set for
    as long as the backend takes, wakes the relay's loop for nothing: a spin
    would take the whole wait's CPU time."""
    go = threading.Event()

    def slow(conn: socket.socket) -> None:
        go.wait(10)
        conn.sendall(_answer(200, OK_BODY))

    up = Scripted([slow])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a, fd = _tcp_client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) == 1)
        _nudge(a, fd, then)
        before = _cpu_ticks()
        time.sleep(0.5)  # 50 ticks at 100 Hz, the whole of it were the loop spinning
        spent = _cpu_ticks() - before
        assert spent <= 10, spent
        go.set()
        ok = _answer(200, OK_BODY)
        answers = 2 if then == "pipelined" else 1
        got = _read(a, len(ok) * answers)
        assert got == ok * answers, got
        assert len(up.requests) == answers
        a.close()
    finally:
        go.set()
        relay.close()
        up.close()


ODD_503 = b"HTTP/1.1 503 X\r\nContent-Length: 0, 0\r\n\r\n"  # a head Python judges (a list)


@pytest.mark.parametrize("which", ["pure", "compiled"])  # (decide() holds the loop: no verdicts)
@pytest.mark.parametrize("order", ["answer-then-reset", "reset-then-answer"])
def test_a_reset_in_the_batch_that_asks_python_about_the_client_is_not_lost(
    which: str, then: str, order: str
) -> None:
    """The client's reset in the same epoll batch as, and after, its
    upstream's answer that asks Python (a 503 whose head Python judges,
    then retried to a backend that stalls). The compiled loop skips a
    client's event while Python is asked about it, and the edge-triggered
    watch says a reset once: it was lost, the stalled try's upstream held
    though the client was gone. The batch is made by holding the loop in
    another client's decide() while the answer and the reset come."""
    go, sent, in_decide = threading.Event(), threading.Event(), threading.Event()

    def answer_when_told(conn: socket.socket) -> None:
        go.wait(10)
        try:
            conn.sendall(ODD_503)
            sent.set()
            if conn.recv(1, socket.MSG_PEEK) == b"":  # the relay closed this try
                raise ConnectionResetError
        except OSError:  # (or closed it before the answer: the reset seen first)
            with up.lock:
                up.closed_by_relay += 1
            raise  # (this connection's thread ends: counted once)

    up = Scripted([answer_when_told, STALL])
    other = Scripted([])  # b's: 200 at once
    retry = RetryPolicy.of(1, 0.0, ["5xx"], (), 0.001)

    def decide(head: Any, origin: Any) -> Decision:
        if head.target == "/b":
            in_decide.set()
            time.sleep(0.4)  # the loop's thread, in Python: no epoll_wait meanwhile
            return Decision((other.endpoint,), tag="b")
        return Decision((up.endpoint,), tag="t", retry=retry)

    relay = _relay(which, decide)
    try:
        a, fd = _tcp_client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) == 1)
        _nudge(a, fd, then)  # the client watched for its reset alone
        b, _ = _tcp_client(relay)
        b.sendall(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        assert in_decide.wait(5)
        if order == "answer-then-reset":
            go.set()
            assert sent.wait(5)
            time.sleep(0.02)  # (the answer on the wire before the reset)
            _reset(a)
        else:
            _reset(a)
            time.sleep(0.02)
            go.set()
        assert _status(_response(b)) == 200
        b.close()
        # the client is gone: its exchange ended (no connection left to the
        # relay; lost, it waited on the stalled retry), and every try's
        # upstream connection closed
        assert _until(lambda: relay.stats()["active"] == 0, 3), relay.stats()
        assert _until(lambda: up.closed_by_relay == up.accepted), (up.accepted, up.closed_by_relay)
    finally:
        go.set()
        relay.close()
        up.close()
        other.close()
