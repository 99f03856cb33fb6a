"""The route timeout (VirtualService ``http[].timeout``): both twins, real sockets.

Envoy's route timeout, which Istio users set per route: from the end of the
request (read whole) to the end of its response. A backend that has not
answered by then: the client gets 504 ``upstream request timeout`` (Envoy's
local reply), counted once as a 504, and the upstream connection is closed,
never pooled (its late answer would be the next request's). A response that
began and then stalls: the client connection is reset. Without a timeout
(or with one not reached) nothing changes.

Timings are not asserted tightly: a 0.2 s timeout must fire, and without
one nothing may come in a window longer than that (that it fires on time,
not at the relays' 0.25 s tick: test_relay_timers_on_time.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, Verdict
from tests._scripted import (
    GET,
    _client,
    _closed_stats,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests._worker import GATEWAY_HOST, gateway_routes, gateway_service, gateway_worker
from tests.test_relay_edges import Backend, _read_all, _read_head, _relay
from tests.test_relay_edges_count import Counted

TIMEOUT = 0.2
HEAD_10 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


class Upstream:
    """A backend serving each connection with *handler(conn)*, and what it saw:
    connections accepted, and those the relay closed (EOF while it waited)."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.accepted = 0
        self.closed_by_relay = threading.Event()
        self.release = threading.Event()  # stalled handlers stop waiting
        self.lock = threading.Lock()
        self.handler = handler
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
        self.handler(conn)

    def stall(self, conn: socket.socket) -> None:
        """Wait without answering until the relay closes the connection."""
        conn.settimeout(5)
        try:
            if conn.recv(65536) == b"":
                self.closed_by_relay.set()
        except OSError:
            self.closed_by_relay.set()

    def close(self) -> None:
        self.release.set()
        self.backend.close()


def _proxy(
    mode: tuple[str, str], up: Upstream, timeout: float, counted: Counted | None = None
) -> Any:
    which, how = mode
    kw: dict[str, Any] = counted.kw(which) if counted is not None else {}
    if how == "resolve":
        verdict = Verdict((Choice(1, (up.endpoint,), tag="t"),), ttl=60.0, timeout=timeout)
        kw["resolve"] = lambda head, origin: verdict
    return _relay(which, lambda h, o: Decision((up.endpoint,), tag="t", timeout=timeout), **kw)


def _never_answers(up: Upstream) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        if _read_head(conn):
            up.stall(conn)

    return handler


def test_a_backend_that_never_answers_gets_504_and_is_not_pooled(mode: tuple[str, str]) -> None:
    up = Upstream(lambda conn: None)
    up.handler = _never_answers(up)
    counted = Counted()
    relay = _proxy(mode, up, TIMEOUT, counted)
    try:
        a = _client(relay)
        a.sendall(GET)
        a.settimeout(3)
        got = b""
        while not got.endswith(b"\r\n\r\nupstream request timeout"):
            data = a.recv(1 << 16)
            assert data, got
            got += data
        head = got.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), got
        # (Envoy's local reply: the request was read whole, the client stays)
        assert b"\r\nconnection: close" not in head
        assert up.closed_by_relay.wait(2), "the timed-out upstream connection stayed open"
        # the next request goes on a new connection: the late one was never pooled
        a.sendall(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        got, how = _read_all(a, 3)
        assert got.startswith(b"HTTP/1.1 504 ") and how == "EOF", (got, how)
        assert b"\r\nconnection: close" in got
        a.close()
        assert up.accepted == 2
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert [s for s, _ in counted.rows] == [504, 504]  # each counted once, as 504
    assert stats["requests"] == 2 and stats["local_answers"] == 2
    assert stats["pool_returned"] == 0 and stats["timeouts"] >= 2


def test_a_request_body_is_read_before_the_timeout_runs(mode: tuple[str, str]) -> None:
    """The timeout runs from the request's end: a body sent slowly (longer
    than the timeout) does not count, the wait for the answer does."""
    up = Upstream(lambda conn: None)

    def handler(conn: socket.socket) -> None:
        buf = _read_head(conn)
        while buf.partition(b"\r\n\r\n")[2] != b"0123456789":
            buf += conn.recv(100)
        conn.sendall(HEAD_10 + b"abcdefghij")
        up.stall(conn)

    up.handler = handler
    relay = _proxy(mode, up, TIMEOUT)
    try:
        a = _client(relay)
        a.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
        time.sleep(TIMEOUT + 0.3)
        a.sendall(b"56789")
        a.settimeout(3)
        got = b""
        while not got.endswith(b"abcdefghij"):
            data = a.recv(65536)
            assert data, got
            got += data
        assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got
        a.close()
    finally:
        relay.close()
        up.close()


def test_an_answer_in_time_is_unaffected_and_pooled(mode: tuple[str, str]) -> None:
    def handler(conn: socket.socket) -> None:
        while _read_head(conn):
            time.sleep(0.05)  # well inside the timeout
            conn.sendall(HEAD_10 + b"abcdefghij")

    up = Upstream(handler)
    counted = Counted()
    relay = _proxy(mode, up, 1.0, counted)
    try:
        a = _client(relay)
        for _ in range(3):
            a.sendall(GET)
            a.settimeout(3)
            got = b""
            while not got.endswith(b"abcdefghij"):
                data = a.recv(65536)
                assert data, got
                got += data
            assert got == HEAD_10 + b"abcdefghij"
        # and the timer of an answered request does not fire later
        a.settimeout(1.5)
        with pytest.raises(TimeoutError):
            a.recv(1)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert up.accepted == 1  # one upstream connection, reused
    assert [s for s, _ in counted.rows] == [200, 200, 200]
    assert stats["local_answers"] == 0


@pytest.mark.parametrize("close_delimited", [False, True], ids=["length", "close-delimited"])
def test_a_response_that_stalls_is_cut(mode: tuple[str, str], close_delimited: bool) -> None:
    """Once a response began the client cannot get a 504: its connection is
    reset, so that even a close-delimited body is not taken for whole."""
    up = Upstream(lambda conn: None)
    head = b"HTTP/1.1 200 OK\r\n\r\n" if close_delimited else HEAD_10

    def handler(conn: socket.socket) -> None:
        if _read_head(conn):
            conn.sendall(head + b"abc")
            up.stall(conn)

    up.handler = handler
    counted = Counted()
    relay = _proxy(mode, up, TIMEOUT, counted)
    try:
        a = _client(relay)
        a.sendall(GET)
        got, how = _read_all(a, 3)
        # (a close-delimited head gets "connection: close" added)
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nabc"), got
        assert how == "ConnectionResetError", how
        a.close()
        assert up.closed_by_relay.wait(2)
        relay.flush_reports(1.0)
    finally:
        relay.close()
        up.close()
    assert [s for s, _ in counted.rows] == [200]  # the status the client got, once


def test_a_route_without_a_timeout_waits(mode: tuple[str, str]) -> None:
    up = Upstream(lambda conn: None)
    up.handler = _never_answers(up)
    relay = _proxy(mode, up, 0.0)
    try:
        a = _client(relay)
        a.sendall(GET)
        got, how = _read_all(a, TIMEOUT + 0.6)  # well past a tick after 0.2 s
        assert (got, how) == (b"", "timeout")
        a.close()
    finally:
        relay.close()
        up.close()


def test_a_connect_that_outlasts_the_timeout_gets_504(mode: tuple[str, str]) -> None:
    """The timer of a request without a body starts at its head: a connect
    that does not complete counts (Envoy's route timeout covers the pool)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    # fill the backlog: further connects stay in SYN_SENT
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    time.sleep(0.05)
    endpoint = listener.getsockname()

    class Dead:
        pass

    up: Any = Dead()
    up.endpoint = endpoint
    relay = _proxy(mode, up, TIMEOUT)
    try:
        a = _client(relay)
        a.sendall(GET)
        got, _ = _read_all(a, 3)
        assert got.startswith(b"HTTP/1.1 504 ") and got.endswith(b"upstream request timeout")
        a.close()
    finally:
        relay.close()
        for s in fillers:
            s.close()
        listener.close()


TIMED_RULES = gateway_service(9) + gateway_routes(
    f"""\
  - name: slow
    timeout: 2.5s
    route: [{{destination: {{host: {GATEWAY_HOST}}}}}]
""",
    api="v1alpha3",
)


@pytest.mark.parametrize("mode", ["connection", "request"])
def test_connection_mode_says_it_does_not_enforce_a_route_timeout(
    mode: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A field is never silently ignored: --http-routing connection relays
    bytes and cannot time a request, so a table with a route timeout is a
    warning naming the route; per request, the default, there is none."""
    import asyncio

    rules = tmp_path / "rules.yaml"
    rules.write_text(TIMED_RULES)

    async def main() -> None:
        async with gateway_worker(rules, http_routing=mode) as (watcher, _, _):
            assert watcher.state.table.timed_routes() == [
                ("svc.default.svc.cluster.local", "svc/slow", 2.5)
            ]

    with caplog.at_level("WARNING", logger="l4proxy.worker"):
        asyncio.run(main())
    warned = [r.getMessage() for r in caplog.records if "not enforced" in r.getMessage()]
    if mode == "connection":
        assert warned == [
            "route timeouts are not enforced with --http-routing connection (only per "
            "request, the default): svc.default.svc.cluster.local route svc/slow 2.5 s"
        ]
    else:
        assert warned == []
