"""A Scripted backend behind a relay twin, for the tests of a route's retry
policy and of what goes on around its tries (timers, a client gone, a body
that errs): both twins, real sockets.

``mode`` parametrizes a test over the pure twin, the compiled one deciding
per request, and the compiled one from a cached verdict (as the sidecar
runs it); import it into the test module (a fixture). A :class:`Scripted`
backend answers from one script shared by its connections: each request
takes the next step (a status, a close, a stall), then 200.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, RetryPolicy, Verdict
from tests.conftest import reset_close
from tests.test_relay_edges import ORIGIN, Backend, _relay
from tests.test_relay_edges_count import Counted

# the twins and how the compiled one learns the route: per request
# (decide), or from a cached verdict (resolve, as the sidecar runs it)
MODES = (("pure", "decide"), ("compiled", "decide"), ("compiled", "resolve"))
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
STALL = "stall"  # read the request, never answer (until the relay closes)
CLOSE = "close"  # read the request, close without a byte
OK_BODY = b"ok"
# a backend's answer to one request: its bytes, STALL, CLOSE, (bytes, CLOSE)
# (send them, then close), or a function of the connection
Step = bytes | str | tuple[bytes, str] | Callable[[socket.socket], None]


@pytest.fixture(params=MODES, ids=["pure", "compiled", "compiled-verdict"], name="mode")
def mode_fixture(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """The twin and how it learns the route: a test module that imports
    this has the fixture ``mode`` (the name apart, so that a test's
    parameter ``mode`` redefines no import)."""
    yield request.param


def _answer(status: int, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def policy(
    attempts: int,
    on: str = "5xx",
    codes: tuple[int, ...] = (),
    per_try: float = 0.0,
    ignore_previous_hosts: bool = True,
) -> RetryPolicy:
    return RetryPolicy.of(
        attempts,
        per_try,
        on.split(","),
        codes,
        ignore_previous_hosts=ignore_previous_hosts,
    )


class Scripted:
    """A keep-alive backend: request i takes ``script[i]`` (an answer's
    bytes, STALL or CLOSE; past the script, 200 ok). What it saw: the
    requests (head and body), connections accepted, and the connections the
    relay closed while the backend waited on them."""

    def __init__(self, script: list[Step]) -> None:
        self.script = list(script)
        self.requests: list[bytes] = []
        self.accepted = 0
        self.closed_by_relay = 0
        self.lock = threading.Lock()
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _next(self, request: bytes) -> Step:
        with self.lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else _answer(200, OK_BODY)

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
        buf = b""
        conn.settimeout(10)
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    with self.lock:
                        self.closed_by_relay += 1
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            step = self._next(head + b"\r\n\r\n" + body)
            if step == CLOSE:
                return
            if step == STALL:
                try:
                    if conn.recv(65536) == b"":
                        with self.lock:
                            self.closed_by_relay += 1
                except OSError:
                    pass
                return
            if callable(step):
                step(conn)
                continue
            if isinstance(step, tuple):  # (bytes, CLOSE): send them, then close
                conn.sendall(step[0])
                return
            assert isinstance(step, bytes)
            conn.sendall(step)

    def close(self) -> None:
        self.backend.close()


class Reported:
    """Each request's status and access log flags, from either twin, and
    the gateway failures outlier detection heard of."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int]] = []
        self.failures: list[tuple[tuple[str, int], str]] = []
        self.lock = threading.Lock()

    def report(self, tag: Any, status: int, seconds: float, flags: int) -> None:
        with self.lock:
            self.rows.append((status, flags))

    def report_rows(self, decided: Any, answered: Any) -> None:
        with self.lock:
            for _, status, count, _seconds, _buckets, flags in answered:
                self.rows += [(status, flags)] * count

    def response_failed(self, endpoint: Any, tag: Any, why: str) -> None:
        with self.lock:
            self.failures.append((tuple(endpoint), why))

    def kw(self, which: str) -> dict[str, Any]:
        out: dict[str, Any] = {"report": self.report, "response_failed": self.response_failed}
        if which == "compiled":
            out["report_rows"] = self.report_rows
        return out


def _proxy(
    mode: tuple[str, str],
    endpoints: tuple[tuple[str, int], ...],
    retry: RetryPolicy | None,
    counted: Counted | None = None,
    timeout: float = 0.0,
    **kw: Any,
) -> Any:
    which, how = mode
    if counted is not None:
        kw.update(counted.kw(which))
    if how == "resolve":
        verdict = Verdict(
            (Choice(1, endpoints, "ORDERED", tag="t"),), ttl=60.0, timeout=timeout, retry=retry
        )
        kw["resolve"] = lambda head, origin: verdict
    return _relay(
        which, lambda h, o: Decision(endpoints, tag="t", timeout=timeout, retry=retry), **kw
    )


def _client(relay: Any) -> socket.socket:
    """A TCP client connection handed to *relay* (a socketpair's end cannot
    tell a reset from a close)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    relay.add(theirs, ORIGIN)
    return ours


_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _response(a: socket.socket, timeout: float = 5.0) -> bytes:
    """One Content-Length response (its interim heads, its head and body),
    and not a byte more: a pipelined response that came in the same segment
    stays in the socket for the next call (a head is peeked at, then read
    to its end: an empty line, CRLF or a bare LF as a lenient client takes)."""
    a.settimeout(timeout)
    got = b""
    while True:
        start = len(got)
        while True:
            data = a.recv(65536, socket.MSG_PEEK)
            assert data, got
            tail = got[max(start, len(got) - 3) :]
            end = _HEAD_END.search(tail + data)
            if end is not None:
                got += a.recv(end.end() - len(tail))
                break
            got += a.recv(len(data))
        head = got[start:]
        if not (head.startswith(b"HTTP/1.1 1") and not head.startswith(b"HTTP/1.1 101")):
            break  # (a 1xx but 101 is interim: the final head follows)
    length = 0
    for line in head.splitlines()[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = b""
    while len(body) < length:
        data = a.recv(length - len(body))
        assert data, got + body
        body += data
    return got + body


def _recv(a: socket.socket, n: int) -> bytes:
    """*n* bytes from *a* (answers pipelined: as many as they come in)."""
    a.settimeout(5.0)
    got = b""
    while len(got) < n:
        data = a.recv(65536)
        assert data, got
        got += data
    return got


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _exchange(
    mode: tuple[str, str],
    script: list[Step],
    retry: RetryPolicy | None,
    request: bytes = GET,
    requests: int = 1,
) -> tuple[list[bytes], Scripted, list[int], dict[str, int]]:
    """*requests* requests on one client connection through a relay to a
    Scripted backend: the responses, the backend, the statuses counted and
    the relay's stats."""
    up = Scripted(script)
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), retry, counted)
    try:
        a = _client(relay)
        got = []
        for _ in range(requests):
            a.sendall(request)
            got.append(_response(a))
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    return got, up, [s for s, _ in counted.rows], stats


def _closed_stats(a: socket.socket, relay: Any) -> dict[str, int]:
    """Close the client *a*, wait for *relay*'s reports: its stats."""
    a.close()
    relay.flush_reports(1.0)
    stats: dict[str, int] = relay.stats()
    return stats


def _until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll *predicate* (on state the relay's thread changes) until it holds
    or *timeout* passes: whether it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


_reset = reset_close  # (the name the retry tests import)
