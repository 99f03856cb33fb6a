"""Every request is counted once, however its exchange ends: both twins, real sockets.

A request whose exchange ended without a complete response (the upstream
closed or reset mid-body, a malformed chunk, a 100 Continue and then a
close, the client gone mid-request or mid-response, the idle timeout) was
never counted: ``istio_requests_total`` and ``l4proxy_http_requests_total``
saw nothing, and a canary reading its success rate from them never saw
those failures. It is counted with the status of the final head the client
got (a 200 whose body was cut counts as 200, as Envoy counts it), else with
the relay's own answer (502), else 0 (no response began: Envoy's
``response_code`` 0), and its duration goes into the histogram.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from tests.conftest import reset_close
from tests.test_relay_edges import TWINS, Backend, _client, _read_all, _read_head, _relay

OK_CUT = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"


@pytest.fixture(params=TWINS)
def which(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


class Counted:
    """What a relay reported: (status, seconds) per request, from either
    twin (the pure one reports each request, the compiled one aggregated
    rows: their histogram buckets must hold every count)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []
        self.lock = threading.Lock()

    def report(self, tag: Any, status: int, seconds: float, flags: int) -> None:
        with self.lock:
            self.rows.append((status, seconds))

    def report_rows(self, decided: Any, answered: Any) -> None:
        with self.lock:
            for _, status, count, seconds, buckets, _ in answered:
                assert sum(buckets) == count, (status, count, buckets)
                self.rows += [(status, seconds / count)] * count

    def kw(self, which: str) -> dict[str, Any]:
        out: dict[str, Any] = {"report": self.report}
        if which == "compiled":
            out["report_rows"] = self.report_rows
        return out


def _serve(handler: Callable[[socket.socket], None], done: threading.Event) -> Backend:
    def serve(conn: socket.socket) -> None:
        try:
            handler(conn)
        finally:
            done.set()

    return Backend(serve)


def _count(
    which: str, handler: Callable[[socket.socket], None], client: Callable[..., bytes], **kw: Any
) -> tuple[bytes, list[tuple[int, float]], dict[str, int]]:
    """Run one exchange: *handler* serves it, *client(sock, upstream_done)*
    drives it and returns what it got; then what the relay counted."""
    done = threading.Event()
    backend = _serve(handler, done)
    counted = Counted()
    relay = _relay(
        which, lambda h, o: Decision((backend.endpoint,), tag="t"), **counted.kw(which), **kw
    )
    try:
        a = _client(relay)
        got = client(a, done)
        a.close()
        # the relay has closed everything: nothing more comes (counted once)
        deadline = time.monotonic() + 1
        while relay.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        backend.close()
    return got, counted.rows, stats


def _get(a: socket.socket, done: threading.Event) -> bytes:
    a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    return _read_all(a, 2)[0]


def _cut_then_close(conn: socket.socket) -> None:
    if _read_head(conn):
        conn.sendall(OK_CUT)


def _cut_then_reset(conn: socket.socket) -> None:
    if _read_head(conn):
        conn.sendall(OK_CUT)
        reset_close(conn)


def _bad_chunk(conn: socket.socket) -> None:
    if _read_head(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.05)  # (forwarded first)
        conn.sendall(b"zz\r\n")
        conn.recv(1)  # until the relay closes


def _continue_then_close(conn: socket.socket) -> None:
    if _read_head(conn):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


def _one(rows: list[tuple[int, float]], stats: dict[str, int], status: int) -> None:
    assert [s for s, _ in rows] == [status], rows
    assert rows[0][1] > 0, rows  # its duration, in the histogram
    assert stats["requests"] == 1, stats


@pytest.mark.parametrize(
    ("handler", "tail"),
    [(_cut_then_close, b"abc"), (_cut_then_reset, b"abc"), (_bad_chunk, b"hello\r\n")],
    ids=["close", "reset", "bad_chunk"],
)
def test_a_response_cut_mid_body_counts_with_its_status(
    which: str, handler: Callable[[socket.socket], None], tail: bytes
) -> None:
    """The client got a 200 head and part of the body, then the close: the
    request counts as the 200 it got (as Envoy counts it; the cut shows in
    the client's framing, not in the status)."""
    got, rows, stats = _count(which, handler, _get)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(tail), got
    _one(rows, stats, 200)


def test_a_100_continue_then_a_close_is_answered_502_and_counted(which: str) -> None:
    """Interim heads are not an answer: the 502 still goes out after them
    (the client got nothing else, and waited for its final answer)."""

    def put(a: socket.socket, done: threading.Event) -> bytes:
        a.sendall(
            b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        return _read_all(a, 2)[0]

    got, rows, stats = _count(which, _continue_then_close, put)
    interim, _, final = got.partition(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue" and final.startswith(b"HTTP/1.1 502 "), got
    _one(rows, stats, 502)
    assert stats["local_answers"] == 1


def _wait_eof(conn: socket.socket) -> None:
    _read_head(conn)
    while conn.recv(65536):
        pass


def test_a_client_gone_mid_body_counts_as_0(which: str) -> None:
    def post_cut(a: socket.socket, done: threading.Event) -> bytes:
        a.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        a.close()
        assert done.wait(2)  # the relay closed its upstream connection
        return b""

    _, rows, stats = _count(which, _wait_eof, post_cut)
    _one(rows, stats, 0)


def test_a_client_gone_mid_response_counts_with_its_status(which: str) -> None:
    go = threading.Event()

    def slow_body(conn: socket.socket) -> None:
        if _read_head(conn):
            conn.sendall(OK_CUT)
            go.wait(2)
            conn.sendall(b"defg")  # the relay sends it to a client that is gone
            conn.recv(1)

    def get_then_leave(a: socket.socket, done: threading.Event) -> bytes:
        a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        a.settimeout(2)
        got = b""
        while not got.endswith(b"abc"):
            got += a.recv(65536)
        a.close()
        go.set()
        assert done.wait(2)
        return got

    _, rows, stats = _count(which, slow_body, get_then_leave)
    _one(rows, stats, 200)


def test_an_exchange_the_idle_timeout_ends_counts_as_0(which: str) -> None:
    """A hung upstream: the idle timeout closes both connections, unanswered."""
    got, rows, stats = _count(which, _wait_eof, _get, idle_timeout=0.3)
    assert got == b""
    _one(rows, stats, 0)
    assert stats["timeouts"] == 1


def test_a_request_in_flight_when_the_relay_closes_counts_as_0(which: str) -> None:
    """A drain that timed out: close() cuts the requests still in flight. The
    compiled twin counted them after its loop's last report, into rows never
    handed to report_rows: istio_requests_total missed them (the pure twin
    reported them). Its close() hands them over."""
    got_head, go = threading.Event(), threading.Event()

    def hang(conn: socket.socket) -> None:
        if _read_head(conn):
            got_head.set()
            go.wait(5)

    backend = Backend(hang)
    counted = Counted()
    relay = _relay(which, lambda h, o: Decision((backend.endpoint,), tag="t"), **counted.kw(which))
    try:
        a = _client(relay)
        a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert got_head.wait(5)
        relay.close()
        _one(counted.rows, relay.stats(), 0)
        a.close()
    finally:
        go.set()
        relay.close()
        backend.close()
