"""``Expect: 100-continue`` after the relay's own 100 (review of the
relay's answer, tests/test_relay_expect_continue.py): what follows it on
each path where the request's body is on its way, each twin, real
sockets. A local answer after the 100 (every connect timed out or
refused, a circuit breaker) says ``connection: close`` and closes, never
reading the body as the next request (it holds one here: smuggling would
answer it); an upstream's answer before the body is read the same; an
upstream's 100 split across reads, or said again by each try of a retry,
never reaches the client (the relay's one does), a 103 does."""

from __future__ import annotations

import socket
import time

from l4proxy.dataplane._pool_py import EndpointSettings
from l4proxy.dataplane._relay_py import Decision
from tests._scripted import _client, _proxy, _response, mode_fixture, policy  # noqa: F401
from tests.test_relay_circuit_breakers import _limits
from tests.test_relay_edges import Backend, _read_all, _read_head, _relay
from tests.test_relay_expect_continue import CONTINUE, HEAD, _continued, _post_after_100
from tests.test_relay_retries_per_try_connect import SlowToAccept

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"  # (the body: a request)
FRAMING = b"Content-Length: %d\r\n\r\n" % len(SMUGGLED)


def _read_body(conn: socket.socket, head: bytes, n: int) -> bool:
    """Read the request body's *n* bytes after *head* (its rest came with
    it); False when the relay closed first."""
    body = head.partition(b"\r\n\r\n")[2]
    while len(body) < n:
        data = conn.recv(65536)
        if not data:
            return False
        body += data
    return True


def test_a_connect_timing_out_after_the_100_closes_without_reading_the_body(
    mode: tuple[str, str],
) -> None:
    """The 100 comes while the connect waits; the body (a request) is sent;
    the connect times out (0.5 s): one 503, ``connection: close``, EOF,
    the body never answered as a request."""
    slow = SlowToAccept(0.0)
    relay = _proxy(mode, (slow.endpoint,), None)
    relay.endpoint_settings({slow.endpoint: EndpointSettings(0, 30.0, 0.5)})
    try:
        a = _client(relay)
        a.sendall(HEAD + FRAMING)
        assert _continued(a) == CONTINUE
        a.sendall(SMUGGLED)
        got, end = _read_all(a, 5.0)
        a.close()
    finally:
        relay.close()
        slow.listener.close()
        slow.filler.close()
        for conn in slow.conns:
            conn.close()
    assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 503"), (got, end)
    assert b"connection: close" in got.lower() and end == "EOF", (got, end)


def test_every_connect_refused_after_the_100_closes(mode: tuple[str, str]) -> None:
    """A closed port: the 503 says ``connection: close`` and the relay
    closes; the body sent after it is never answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    relay = _proxy(mode, (("127.0.0.1", port),), None)
    try:
        a = _client(relay)
        a.sendall(HEAD + FRAMING)
        got = _response(a)
        try:
            a.sendall(SMUGGLED)
        except OSError:
            pass
        rest, end = _read_all(a, 5.0)
        a.close()
    finally:
        relay.close()
    got += rest
    assert got.count(b"HTTP/1.1 5") == 1 and got.count(b"HTTP/1.1 ") <= 2, (got, end)
    assert b"connection: close" in got.lower() and end in ("EOF", "ConnectionResetError"), end


def test_a_circuit_breakers_503_after_the_100_closes() -> None:
    """An endpoint at its max_active (a GET held): the expecting POST gets
    the 100 (as it goes upstream: Envoy says its 100 at the head too) and
    the breaker's 503, then the close; the twins say the same."""
    out = {}
    for which in ("pure", "compiled"):
        backend = Backend(lambda conn: time.sleep(2))
        ep = backend.endpoint
        relay = _relay(which, lambda head, origin, ep=ep: Decision((ep,), tag="t"))
        relay.endpoint_settings({ep: _limits(max_active=1)})
        try:
            b = _client(relay)
            b.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.3)
            a = _client(relay)
            a.sendall(HEAD + FRAMING)
            got, end = _read_all(a, 5.0)
            a.close()
            b.close()
        finally:
            relay.close()
            backend.close()
        out[which] = (got.startswith(CONTINUE), got[len(CONTINUE) :].split(b"\r\n")[0], end)
    assert out["pure"] == out["compiled"] == (True, b"HTTP/1.1 503 Service Unavailable", "EOF"), out


def test_an_answer_on_the_head_after_the_100_is_the_only_one(mode: tuple[str, str]) -> None:
    """The upstream answers on the head alone; the client, told 100, sends
    its body (a request): one answer, the body never read as a request."""
    seen: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        head = _read_head(conn)
        if head:
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            try:
                conn.recv(65536)
            except OSError:
                pass

    backend = Backend(serve)
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(HEAD + FRAMING)
        assert _continued(a) == CONTINUE
        time.sleep(0.2)
        a.sendall(SMUGGLED)
        got, end = _read_all(a, 5.0)
        a.close()
    finally:
        relay.close()
        backend.close()
    assert got.count(b"HTTP/1.1 ") == 1 and got.endswith(b"ok") and end == "EOF", (got, end)
    assert len(seen) == 1, seen


def test_an_upstream_100_split_across_reads_is_dropped_a_103_is_not(
    mode: tuple[str, str],
) -> None:
    """``HTTP/1.1 10`` then ``0 Continue``: dropped all the same; the 103
    with a line after the body goes to the client, then the 200."""

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        head = _read_head(conn)
        if not head:
            return
        conn.sendall(b"HTTP/1.1 10")
        time.sleep(0.2)
        conn.sendall(b"0 Continue\r\n\r\n")
        if _read_body(conn, head, 5):
            conn.sendall(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            )

    backend = Backend(serve)
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        got = _post_after_100(relay)
    finally:
        relay.close()
        backend.close()
    assert b"100 Continue" not in got and got.startswith(b"HTTP/1.1 103"), got
    assert b"\r\n\r\nHTTP/1.1 200 OK" in got and got.endswith(b"ok"), got


def test_each_tries_own_100_is_dropped(mode: tuple[str, str]) -> None:
    """A retry policy (5xx, reset; 2 retries): each try's upstream says its
    100, the first then 503, the second a reset, the third 200: the client
    gets the relay's one 100 and the 200."""
    tries: list[int] = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        head = _read_head(conn)
        if not head:
            return
        tries.append(1)
        conn.sendall(CONTINUE)
        if not _read_body(conn, head, 5):
            return
        if len(tries) == 1:
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        elif len(tries) == 2:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            conn.close()
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = Backend(serve)
    relay = _proxy(mode, (backend.endpoint,), policy(2, "5xx,reset"))
    try:
        got = _post_after_100(relay)
    finally:
        relay.close()
        backend.close()
    assert b"100 Continue" not in got and got.startswith(b"HTTP/1.1 200"), (got, tries)
    assert got.endswith(b"ok") and len(tries) == 3, (got, tries)
