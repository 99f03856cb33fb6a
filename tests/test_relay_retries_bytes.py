"""A retried try, byte by byte: nothing of a given-up response reaches the
client, the request is sent whole, and LEAST_REQUEST counts return to zero
(both twins)."""

from __future__ import annotations

import socket
import time

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
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import sent_up


def _split_503(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 503 Serv")
    time.sleep(0.1)
    conn.sendall(b"ice Unavailable\r\nContent-Length: 10\r\n\r\nabc")
    time.sleep(0.1)
    conn.sendall(b"defghij")


def test_a_503_split_across_reads_with_a_body_is_retried_nothing_forwarded(
    mode: tuple[str, str],
) -> None:
    got, up, counted, stats = _exchange(mode, [_split_503], policy(2, "5xx"))
    assert got[0] == _answer(200, OK_BODY), got
    assert len(up.requests) == 2 and counted == [200] and stats["retries"] == 1


def test_a_503_judged_in_python_is_retried(mode: tuple[str, str]) -> None:
    # (a repeated Content-Length: the compiled loop has Python judge it)
    twice = b"HTTP/1.1 503 X\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nno"
    got, up, counted, _stats = _exchange(mode, [twice], policy(2, "5xx"))
    assert got[0] == _answer(200, OK_BODY), got
    assert len(up.requests) == 2 and counted == [200]


def test_interim_in_python_then_503_is_final(mode: tuple[str, str]) -> None:
    # (a 103 with header lines: the compiled loop has Python judge it)
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    got, up, counted, _stats = _exchange(
        mode, [early + b"HTTP/1.1 503 X\r\nContent-Length: 2\r\n\r\nno"], policy(2, "5xx")
    )
    assert got[0].startswith(early) and _status(got[0][len(early) :]) == 503, got
    assert len(up.requests) == 1 and counted == [503]


def test_a_head_request_is_retried(mode: tuple[str, str]) -> None:
    head = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
    up = Scripted(
        [
            b"HTTP/1.1 503 X\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
        ]
    )
    relay = _proxy(mode, (up.endpoint,), policy(2, "5xx"))
    try:
        a = _client(relay)
        a.sendall(head)
        a.settimeout(3)
        data = b""
        while b"\r\n\r\n" not in data:
            data += a.recv(65536)
        assert data == b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", data
        a.sendall(GET)
        assert _status(_response(a)) == 200
        assert up.requests == [sent_up(head), sent_up(head, 2), sent_up(GET)]
    finally:
        relay.close()
        up.close()


def test_pipelined_requests_after_a_retried_one(mode: tuple[str, str]) -> None:
    second = b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"
    up = Scripted([_answer(503, b"no")])
    relay = _proxy(mode, (up.endpoint,), policy(2, "5xx"))
    try:
        a = _client(relay)
        a.sendall(GET + second)
        want = _answer(200, OK_BODY) * 2
        a.settimeout(5)
        got = b""
        while len(got) < len(want):
            data = a.recv(65536)
            assert data, got
            got += data
        assert got == want
        assert up.requests == [sent_up(GET), sent_up(GET, 2), sent_up(second)]
    finally:
        relay.close()
        up.close()


@pytest.mark.parametrize("split", [False, True])
def test_a_chunked_post_is_sent_again_whole(mode: tuple[str, str], split: bool) -> None:
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    seen: list[bytes] = []
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(5)
    import threading

    def serve() -> None:
        for answer in (_answer(503, b"no"), _answer(200, OK_BODY)):
            conn, _ = lst.accept()
            conn.settimeout(5)
            buf = b""
            while not buf.endswith(b"0\r\n\r\n"):
                d = conn.recv(65536)
                if not d:
                    break
                buf += d
            seen.append(buf)
            conn.sendall(answer)
            if answer.startswith(b"HTTP/1.1 200"):
                time.sleep(0.3)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    relay = _proxy(mode, (lst.getsockname()[:2],), policy(2, "5xx"))
    try:
        a = _client(relay)
        if split:
            a.sendall(head + body[:7])
            time.sleep(0.1)
            a.sendall(body[7:])
        else:
            a.sendall(head + body)
        assert _response(a) == _answer(200, OK_BODY)
        t.join(5)
        assert seen == [sent_up(head + body), sent_up(head + body, 2)], seen
    finally:
        relay.close()
        lst.close()


@pytest.mark.parametrize("step", ["503", "close", "stall"])
def test_active_counts_are_balanced_after_retries(
    mode: tuple[str, str],
    step: str,
) -> None:
    """LEAST_REQUEST's counts: every given-up try is uncounted (503, close,
    per-try timeout), the last try's connection back in the pool."""
    from tests._scripted import CLOSE, STALL

    s = {"503": _answer(503, b"no"), "close": CLOSE, "stall": STALL}[step]
    bad = Scripted([s] * 3)
    good = Scripted([])
    relay = _proxy(mode, (bad.endpoint, good.endpoint), policy(3, "5xx", per_try=0.3))
    try:
        a = _client(relay)
        for _ in range(2):
            a.sendall(GET)
            assert _response(a) == _answer(200, OK_BODY)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            counts = (relay.pools.active(bad.endpoint), relay.pools.active(good.endpoint))
            if counts == (0, 0):
                break
            time.sleep(0.05)
        assert counts == (0, 0)
        a.close()
    finally:
        relay.close()
        bad.close()
        good.close()


def _hanging_endpoint() -> tuple[socket.socket, list[socket.socket], tuple[str, int]]:
    """A listener whose accept queue is full: a new connect hangs (SYN dropped)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(lst.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.1)
    return lst, fillers, lst.getsockname()[:2]


@pytest.mark.parametrize("body", [False, True])
def test_a_first_try_still_connecting_past_its_per_try_timeout(
    mode: tuple[str, str],
    body: bool,
) -> None:
    """A first try whose connect hangs, under a policy retrying resets with
    a per-try timeout of 0.3 s: its per-try timer does not run while it
    connects (a try's starts with its connection's readiness, as Envoy's),
    with a body or without; the connect timeout (1 s) ends it, and the
    policy's retry of the failed connect goes to the next endpoint, its
    second try. Before, without a body, the per-try timeout retried it at
    0.3 s."""
    lst, fillers, hang = _hanging_endpoint()
    good = Scripted([])
    relay = _proxy(
        mode, (hang, good.endpoint), policy(1, "reset", per_try=0.3), connect_timeout=1.0
    )
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi" if body else GET
    try:
        a = _client(relay)
        t0 = time.monotonic()
        a.sendall(request)
        got = _response(a, timeout=6)
        took = time.monotonic() - t0
        assert got == _answer(200, OK_BODY), got
        # (the connect timeout's next endpoint: its second try, the try
        # whose connect timed out the first, as Envoy's)
        assert good.requests == [sent_up(request, 2)]
        assert took >= 1.0 - 0.1, took  # (the connect timeout's, not 0.3 s)
        a.sendall(GET)
        assert _response(a) == _answer(200, OK_BODY)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            counts = (relay.pools.active(hang), relay.pools.active(good.endpoint))
            if counts == (0, 0):
                break
            time.sleep(0.05)
        assert counts == (0, 0)
        assert relay.stats()["errors"] == 0
    finally:
        relay.close()
        good.close()
        for s in fillers:
            s.close()
        lst.close()


def test_a_connecting_first_try_past_its_per_try_timeout_without_a_reset_policy(
    mode: tuple[str, str],
) -> None:
    """Istio's default retryOn, which retries no timeout (Envoy) but a
    failed connect: a first try whose connect hangs past its per-try
    timeout (0.3 s) is not timed out (its timer waits for its connection,
    as Envoy's); the connect timeout (1 s) ends it, the policy's retry of
    the failed connect goes to the other endpoint: its 200, saying 2.
    Before, the 504 at the per-try timeout, nothing sent to the other
    endpoint."""
    lst, fillers, hang = _hanging_endpoint()
    good = Scripted([])
    on = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    relay = _proxy(
        mode, (hang, good.endpoint), policy(2, on, (503,), per_try=0.3), connect_timeout=1.0
    )
    try:
        a = _client(relay)
        t0 = time.monotonic()
        a.sendall(GET)
        got = _response(a, timeout=6)
        took = time.monotonic() - t0
        assert got == _answer(200, OK_BODY), got
        assert took >= 1.0 - 0.1, took  # (the connect timeout's, not 0.3 s)
        assert good.requests == [sent_up(GET, 2)]
    finally:
        relay.close()
        good.close()
        for s in fillers:
            s.close()
        lst.close()
