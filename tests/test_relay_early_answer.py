"""A server's final answer before the request's body was all read (an
early 413, a 401 to an upload), through each relay twin on real sockets:
the pure one, the compiled one deciding per request and from a cached
verdict.

The client gets the answer said ``connection: close`` and its connection
closes once the answer is out (after the lingering read: the answer is
not lost to a reset), the rest of its body unread, as Envoy closes an
HTTP/1 connection whose response came before its request's end
(``downstream_rq_response_before_rq_complete``; Istio's sidecar does so).
HAProxy and nginx read that rest and throw it away, and keep the
connection when it comes soon enough (README: where per-request routing
is laxer and stricter than them). The upstream connection is closed,
never pooled with a body half sent; no byte of the rest reaches a server,
even one that reads as a request (smuggling safety: the rest is never
parsed as one).

And the other end of an answer out of turn: bytes a server sends after
its answer's end, in a later read. While the connection is pooled and
idle they evict it; once a request pipelined behind went out on it, they
are that request's answer, as in HAProxy and nginx (README: the pool's
eviction).
"""

from __future__ import annotations

import socket
import threading
import time

from tests._scripted import (
    GET,
    OK_BODY,
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

TOO_LARGE = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig"
# the body's rest, as a client sends it after the answer: it reads as a
# request, and another follows it on the connection
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
FIRST = b"0123456789"
HEAD = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (len(FIRST) + len(SMUGGLED))


class Early:
    """A backend that answers 413 once it has a request's head, reads on
    (keeping every byte it gets) until the relay closes, and counts its
    connections."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[bytes] = []
        self.accepted = 0
        self.closed = 0
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
        got = b""
        conn.settimeout(10)
        answered = False
        while data := conn.recv(65536):
            got += data
            if not answered and b"\r\n\r\n" in got:
                conn.sendall(TOO_LARGE)
                answered = True
        with self.lock:
            self.received.append(got)
            self.closed += 1


def test_an_early_answer_closes_the_client_as_envoy_does(mode: tuple[str, str]) -> None:
    """The head and 10 bytes of the body, then the answer; then the body's
    rest (a request's bytes) and a pipelined request: the 413 said close,
    then the end of the connection; the server got the POST's head and
    the body bytes sent before its answer, never a request after them."""
    up = Early()
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(HEAD + FIRST)
        a.settimeout(5)
        got = b""
        while not got.endswith(b"big"):
            data = a.recv(65536)
            assert data, got
            got += data
        try:
            a.sendall(SMUGGLED + NEXT)  # (the relay reads and drops them, or has closed)
        except OSError:
            pass
        rest, end = _read_all(a, 5.0)
        a.close()
        assert _until(lambda: up.closed == 1, 2.0), up.closed
    finally:
        relay.close()
        up.backend.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 Payload Too Large\r\n") and body == b"big", got
    assert b"connection: close" in head.lower(), head
    assert (rest, end) in ((b"", "EOF"), (b"", "ConnectionResetError")), (rest, end)
    assert up.accepted == 1, up.accepted  # no connection for what followed
    (seen,) = up.received
    assert seen.startswith(b"POST /up HTTP/1.1\r\n") and seen.endswith(b"\r\n\r\n" + FIRST), seen
    assert b"/smuggled" not in seen and b"/next" not in seen, seen


# -- bytes after a response's end, in a later read ---------------------------------

EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"


def _ok_then_evil(conn: socket.socket) -> None:
    """A confused server: its answer, then 100 ms later an answer no one
    asked for."""
    conn.sendall(_answer(200, OK_BODY))
    time.sleep(0.1)
    conn.sendall(EVIL)


def _two_gets(mode: tuple[str, str], pipelined: bool) -> tuple[list[bytes], Scripted]:
    up = Scripted([_ok_then_evil])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        if pipelined:
            a.sendall(GET + GET)
            got = [_response(a), _response(a)]
        else:
            a.sendall(GET)
            got = [_response(a)]
            time.sleep(0.3)  # (the bytes came while the connection was idle)
            a.sendall(GET)
            got.append(_response(a))
        # (the server reads the second request once its script step ended)
        assert _until(lambda: len(up.requests) == 2, 2.0), up.requests
        _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    return got, up


def test_bytes_no_request_asked_for_evict_the_idle_connection(mode: tuple[str, str]) -> None:
    """They came while the connection was pooled and idle: it is evicted
    (as Envoy closes a connection that speaks with no request
    outstanding), never handed out, and the next request goes on a new
    one, answered by the server."""
    got, up = _two_gets(mode, pipelined=False)
    assert got == [_answer(200, OK_BODY)] * 2, got
    assert up.accepted == 2 and len(up.requests) == 2


def test_a_pipelined_request_takes_them_for_its_answer(mode: tuple[str, str]) -> None:
    """The limit (README): a request pipelined behind the first goes on
    the connection the moment the first answer ended, and the bytes the
    server sent later are read as its answer, as HAProxy and nginx read
    them (and Envoy, once its next request went out): no proxy can tell
    them from the answer. The server's real answer that follows comes
    while the connection is idle: it is evicted then."""
    got, up = _two_gets(mode, pipelined=True)
    assert got == [_answer(200, OK_BODY), EVIL], got
    assert up.accepted == 1 and len(up.requests) == 2
