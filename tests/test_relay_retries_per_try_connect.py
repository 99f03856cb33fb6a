"""A try's per-try timer (a route's ``retries.perTryTimeout``) starts when
both its connection is ready (a connect's end, or an idle pooled one
handed out) and the request was read whole, as Envoy's does: its
UpstreamRequest::onPoolReady starts the timer where the downstream
request is complete by then, else Filter::onRequestComplete does. The
connect itself is bounded by the connect timeout, not by the per-try
timeout. Every try: the first, the policy's retry after a 503 or after a
refused connect, the relay's own move after a refused connect, and the
pooled connection's one retry (no try of the policy's: its new
connection's connect is no part of its timer either).

Before, the first try's timer ran from the request's end and a retry's
from its send (the relay's own move's from the move), the connect's time
taken from the try's: an endpoint slow to accept cost the client the 504
``UT`` though its answer came well within the per-try timeout of the
connection's start.

Both twins (pure, compiled per request and from a cached verdict), real
sockets. An endpoint slow to accept: its listener's accept queue full
(backlog 0, one place taken) until RELEASE s after the request, so the
relay's SYN and its first retransmission (1 s) are dropped and its connect
ends with the next (3 s: Linux's initial RTO of 1 s, doubled). Margins of
a second on either side of each timer.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    CLOSE,
    GET,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_attempt_count import _counts, _refusing

SEED = 20261207
RELEASE = 2.0  # the slow endpoint's accept queue frees up (its connect: ~3 s)
PER_TRY = 1.5


class SlowToAccept:
    """An endpoint whose connects hang until RELEASE s after :meth:`start`
    (its accept queue full: their SYNs dropped), then go through on the
    client's next SYN retransmission; each connection's requests answered
    *answer_after* s after they came (200 ``late``). What it saw: the
    requests (heads), when each came (monotonic), connections accepted."""

    def __init__(self, answer_after: float) -> None:
        self.answer_after = answer_after
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        self.filler = socket.create_connection(self.endpoint)  # (the one place)
        self.requests: list[bytes] = []
        self.came: list[float] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        time.sleep(RELEASE)
        try:
            taken, _ = self.listener.accept()  # the filler's: the place frees up
            taken.close()
            self.listener.settimeout(15.0)
            while True:
                conn, _ = self.listener.accept()
                with self.lock:
                    self.accepted += 1
                    self.conns.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        except OSError:
            pass  # (closed: the test is over)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(15.0)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                with self.lock:
                    self.requests.append(head + b"\r\n\r\n")
                    self.came.append(time.monotonic())
                time.sleep(self.answer_after)
                conn.sendall(_answer(200, b"late"))
        except OSError:
            pass  # (the relay gave the try up: the test says so)

    def close(self) -> None:
        self.listener.close()
        self.filler.close()
        with self.lock:
            for conn in self.conns:
                conn.close()


# how the try to the slow endpoint comes: the first try (retriable-4xx:
# no retry of a timeout, the per-try timeout's 504 the client's); the
# policy's retry after the first endpoint's 503 or its refused connect
# (5xx, one attempt: the try to the slow endpoint the last); the relay's
# own move after a refused connect (retriable-4xx retries no failed connect)
HOW = {
    "first-try": ("slow", "retriable-4xx", b"1", 0),
    "policy-s-retry-after-a-503": ("503", "5xx", b"2", 1),
    "policy-s-retry-after-a-refused-connect": ("refused", "5xx", b"2", 1),
    "relay-s-own-move-after-a-refused-connect": ("refused", "retriable-4xx", b"2", 0),
    # the pooled connection's one retry (the first endpoint's idle one,
    # closed without a byte): on a new connection, to the next endpoint
    # first, saying the count of the try it repeats
    "reused-connection-s-retry": ("stale", "retriable-4xx", b"1", 0),
}


def _run(
    mode: tuple[str, str], how: str, answer_after: float
) -> tuple[bytes, float, SlowToAccept, dict[str, Any]]:
    """GET through a relay of *mode* whose try (*how*) goes to a
    SlowToAccept answering *answer_after* s after the request came: the
    response, the seconds from the send to it, the endpoint, the stats."""
    before, on, _, _ = HOW[how]
    slow = SlowToAccept(answer_after)
    first: Any = None
    if before == "503":
        first = Scripted([_answer(503, b"busy")])
        endpoints: tuple[tuple[str, int], ...] = (first.endpoint, slow.endpoint)
    elif before == "stale":  # (its first request's 200 pools the connection)
        first = Scripted([_answer(200, b"a"), CLOSE])
        endpoints = (first.endpoint, slow.endpoint)
    elif before == "refused":
        first = _refusing()
        endpoints = (("127.0.0.1", first.getsockname()[1]), slow.endpoint)
    else:
        endpoints = (slow.endpoint,)
    retry = RetryPolicy.of(1, PER_TRY, on.split(","), (), 0.001)
    # (a connect timeout past the slow endpoint's connect, ~3 s)
    relay = _proxy(mode, endpoints, retry, connect_timeout=10.0, seed=SEED)
    try:
        c = _client(relay)
        if before == "stale":
            c.sendall(GET)
            assert _response(c) == _answer(200, b"a")
        t0 = time.monotonic()
        slow.start()
        c.sendall(GET)
        got = _response(c, timeout=20.0)
        took = time.monotonic() - t0
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        slow.close()
        if first is not None:
            first.close()
    return got, took, slow, stats


@pytest.mark.parametrize("how", list(HOW))
def test_a_try_s_connect_is_no_part_of_its_per_try_timeout(mode: tuple[str, str], how: str) -> None:
    """A per-try timeout of 1.5 s; the try's connect takes ~3 s, its
    answer comes 0.5 s after the request reached the endpoint: the 200 is
    the client's, the try timed from its connection's readiness (1 s from
    passing when the answer came). Before, the timer ran during the
    connect: the 504 ``UT`` at 1.5 s, the request never sent."""
    _, _, count, retries = HOW[how]
    got, took, slow, stats = _run(mode, how, answer_after=0.5)
    assert _status(got) == 200 and got.endswith(b"late"), (got, took)
    assert _counts(slow.requests) == [[count]]
    assert slow.accepted == 1
    assert took >= RELEASE, took  # (the connect waited for the place)
    assert (stats["retries"], stats["timeouts"]) == (retries, 0), stats


@pytest.mark.parametrize("how", list(HOW))
def test_the_per_try_timer_still_bounds_the_wait_for_the_answer(
    mode: tuple[str, str], how: str
) -> None:
    """The same slow connect, the answer 2.5 s after the request reached
    the endpoint (1 s past the per-try timeout of the connection's start):
    the 504 ``upstream request timeout``, once the connection was ready
    (at least RELEASE + 1.5 s after the send), the request sent once (no
    try left, or a policy that retries no timeout). Before, the 504 came
    during the connect (1.5 s), the request never sent."""
    _, _, count, retries = HOW[how]
    got, took, slow, stats = _run(mode, how, answer_after=PER_TRY + 1.0)
    assert _status(got) == 504 and got.endswith(b"upstream request timeout"), (got, took)
    assert _counts(slow.requests) == [[count]]
    assert took >= RELEASE + PER_TRY - 0.1, took
    assert (stats["retries"], stats["timeouts"]) == (retries, 1), stats
