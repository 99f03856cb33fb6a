"""``Expect: 100-continue``: the relay says ``100 Continue`` itself, as
Envoy's connection manager does by default (``proxy_100_continue``
false), when the request goes upstream (after its routing and a fault's
draws, before its connection is made) and its body is not all here: the
client (curl waits 1 s for a 100 before a body over 1 KiB) sends its body
while the connection is made, not after its own wait or the upstream's
100. The head goes upstream as it came; the upstream's own 100 to it is
dropped, so the client gets one. No 100 to an HTTP/1.0 client (RFC 9110
§15.2), to a request without a body (``Content-Length: 0``), to one whose
body came with its head, to another expectation (it goes upstream as it
came), nor before a local answer (the client keeps its body; the
connection closes after the answer, the body unread).

Both twins (pure, compiled per request and from a cached verdict), real
sockets; and through a real worker per request with each twin and per
connection (an L4 relay after the first head: the upstream's own 100).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import FAULT_SCALE, MIRROR_SCALE, Fault, Mirror
from tests._scripted import (
    Scripted,
    _answer,
    _client,
    _proxy,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests._worker import gateway_service, gateway_worker
from tests.test_relay_edges import Backend, _read_all, _read_head, _relay
from tests.test_relay_mirror import COPY, Mirrored, _mirror_relay, _settled
from tests.test_relay_retries_per_try_connect import SlowToAccept
from tests.test_worker_connection_first_head import ROUTINGS, _routing

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ABORT = Fault(abort_status=503, abort_ppm=FAULT_SCALE)
DELAY = Fault(delay=0.2, delay_ppm=FAULT_SCALE)
HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
BODIES = {
    "content-length": (b"Content-Length: 5\r\n\r\n", b"hello"),
    "chunked": (b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
}


def _continued(a: socket.socket, timeout: float = 5.0) -> bytes:
    """The first 25 bytes the client gets (the 100 when it came)."""
    a.settimeout(timeout)
    got = b""
    while len(got) < len(CONTINUE):
        data = a.recv(len(CONTINUE) - len(got))
        assert data, got
        got += data
    return got


def _post_after_100(relay: Any) -> bytes:
    """A POST expecting 100-continue (Content-Length: 5): the relay's 100
    first, then its body; the response the client gets."""
    a = _client(relay)
    try:
        a.sendall(HEAD + b"Content-Length: 5\r\n\r\n")
        assert _continued(a) == CONTINUE
        a.sendall(b"hello")
        return _response(a)
    finally:
        a.close()


def _upstream_continues(seen: list[bytes], interim: bytes = CONTINUE) -> Backend:
    """A backend that says its own 100 (*interim*) to a head that expects
    it, reads the Content-Length body, then answers 200 ``ok`` (what it
    read: *seen*)."""

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        head = _read_head(conn)
        if not head:
            return
        head, _, body = head.partition(b"\r\n\r\n")
        if b"\r\nexpect: 100-continue" in head.lower():
            conn.sendall(interim)
        while len(body) < 5:
            data = conn.recv(65536)
            if not data:
                return
            body += data
        seen.append(head + b"\r\n\r\n" + body)
        conn.sendall(_answer(200, b"ok"))

    return Backend(serve)


class _ReadsBodies:
    """A keep-alive backend that never says 100: each request's body read
    (Content-Length, or chunked to its last chunk), then 200 ``ok``; what
    it read: *requests*."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            chunked = b"\r\ntransfer-encoding: chunked" in head.lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while (b"0\r\n\r\n" not in buf) if chunked else len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            if chunked:
                end = buf.index(b"0\r\n\r\n") + 5
                body, buf = buf[:end], buf[end:]
            else:
                body, buf = buf[:length], buf[length:]
            self.requests.append(head + b"\r\n\r\n" + body)
            conn.sendall(_answer(200, b"ok"))

    def close(self) -> None:
        self.backend.close()


def _answers_on_head(seen: list[bytes]) -> Backend:
    """A backend that answers 200 ``ok`` as soon as it has a head, its body
    unread (what it read: *seen*)."""

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        head = _read_head(conn)
        if head:
            seen.append(head)
            conn.sendall(_answer(200, b"ok"))
            try:
                conn.recv(65536)
            except OSError:
                pass

    return Backend(serve)


@pytest.mark.parametrize("body", list(BODIES))
def test_the_relay_says_100_continue_and_its_body_goes_up(mode: tuple[str, str], body: str) -> None:
    """A client holding its body until a 100, a backend that never says
    one: the relay's 100 comes, the body goes up after it with the head as
    sent (its Expect line kept), the 200 follows; the connection stays (a
    GET on it is answered)."""
    framing, payload = BODIES[body]
    backend = _ReadsBodies()
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(HEAD + framing)
        assert _continued(a) == CONTINUE
        a.sendall(payload)
        got = _response(a)
        assert _status(got) == 200 and got.endswith(b"ok"), got
        a.sendall(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
        got = _response(a)
        assert got.startswith(b"HTTP/1.1 200"), got  # (no second 100)
        a.close()
    finally:
        relay.close()
        backend.close()
    first = backend.requests[0]
    assert b"\r\nExpect: 100-continue\r\n" in first, first
    assert first.endswith(b"\r\n\r\n" + payload) and len(backend.requests) == 2, backend.requests


@pytest.mark.parametrize(
    "interim",
    [CONTINUE, b"HTTP/1.1 100 Continue\r\nX-Seen: 1\r\n\r\n"],
    ids=["bare", "with-a-line"],  # (the compiled loop's Python judges the second)
)
def test_the_upstreams_own_100_is_dropped(mode: tuple[str, str], interim: bytes) -> None:
    """The upstream says its 100 too: the client gets one, the relay's."""
    seen: list[bytes] = []
    backend = _upstream_continues(seen, interim)
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        got = _post_after_100(relay)
    finally:
        relay.close()
        backend.close()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got  # (no other 100)
    assert len(seen) == 1 and seen[0].endswith(b"\r\n\r\nhello"), seen


def test_the_100_comes_before_the_connection_is_made(mode: tuple[str, str]) -> None:
    """An endpoint slow to accept (~3 s): the 100 comes while its connect
    waits (nothing accepted yet), the body sent then goes up once it is
    made."""
    slow = SlowToAccept(0.0)
    relay = _proxy(mode, (slow.endpoint,), None)
    try:
        slow.start()
        a = _client(relay)
        a.sendall(HEAD + b"Content-Length: 5\r\n\r\n")
        assert _continued(a) == CONTINUE
        with slow.lock:
            accepted = slow.accepted
        a.sendall(b"hello")
        got = _response(a, timeout=10.0)
        a.close()
    finally:
        relay.close()
        slow.listener.close()
        slow.filler.close()
        for conn in slow.conns:
            conn.close()
    assert accepted == 0
    assert _status(got) == 200, got


@pytest.mark.parametrize(
    "head",
    [
        b"POST /x HTTP/1.0\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\nContent-Length: 5\r\n\r\n",
    ],
    ids=["http10", "content-length-0", "body-with-head", "other-expectation"],
)
def test_no_100_where_none_is_due(mode: tuple[str, str], head: bytes) -> None:
    """A backend answering on the head alone: its 200 is the first thing
    the client gets (a 100 of the relay's would have come before it, at the
    routing); the head went up as sent."""
    seen: list[bytes] = []
    backend = _answers_on_head(seen)
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(head)
        got = _response(a)
        a.close()
    finally:
        relay.close()
        backend.close()
    assert _status(got) == 200 and b" 100 " not in got, got
    line = head.split(b"\r\n")[2]
    assert len(seen) == 1 and line in seen[0], seen


def test_no_100_before_a_local_answer() -> None:
    """A route's local answer (404): no 100 before it (the client keeps its
    body), ``connection: close`` and the close (its body unread)."""
    for which in ("pure", "compiled"):
        relay = _relay(which, lambda head, origin: Decision(local=(404, "no route")))
        try:
            a = _client(relay)
            a.sendall(HEAD + b"Content-Length: 5\r\n\r\n")
            got, end = _read_all(a, 5.0)
            a.close()
        finally:
            relay.close()
        assert got.startswith(b"HTTP/1.1 404"), (which, got)
        assert b"connection: close" in got.lower() and end == "EOF", (which, got, end)


def test_a_retried_post_gets_one_100() -> None:
    """A retry policy (5xx, 1 attempt), the first try answered 503: the
    POST, its body sent after the relay's 100, is held whole and sent again;
    the client gets one 100 and the retry's 200."""
    for mode in (("pure", "decide"), ("compiled", "decide"), ("compiled", "resolve")):
        backend = Scripted([_answer(503)])
        relay = _proxy(mode, (backend.endpoint,), policy(1))
        try:
            a = _client(relay)
            a.sendall(HEAD + b"Content-Length: 5\r\n\r\n")
            assert _continued(a) == CONTINUE, mode
            a.sendall(b"hello")
            got = _response(a)
            a.close()
        finally:
            relay.close()
            backend.close()
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), (mode, got)
        assert len(backend.requests) == 2, (mode, backend.requests)
        assert all(r.endswith(b"\r\n\r\nhello") for r in backend.requests), backend.requests


def test_a_pipelined_expecting_request_gets_its_100_after_the_answer_before_it(
    mode: tuple[str, str],
) -> None:
    """A GET and an expecting POST's head in one segment: the GET's answer
    first, then the POST's 100 (never between the GET's head and body, nor
    ahead of it), then its answer."""
    backend = Scripted([_answer(200, b"first")])
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n" + HEAD + b"Content-Length: 5\r\n\r\n")
        first = _response(a)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"first"), first
        assert _continued(a) == CONTINUE
        a.sendall(b"hello")
        got = _response(a)
        a.close()
    finally:
        relay.close()
        backend.close()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got
    assert len(backend.requests) == 2 and backend.requests[1].endswith(b"hello")


def _through_worker(rules: Path, routing: str) -> bytes:
    """An expecting POST through a worker: the head, what comes back
    first (the 100), the body, then every byte until the 200's end."""
    out: list[bytes] = []

    def client(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(HEAD.replace(b"Host: a", b"Host: gw") + b"Content-Length: 5\r\n\r\n")
            got = _continued(s)
            s.sendall(b"hello")
            out.append(got + _response(s))

    async def main() -> None:
        async with gateway_worker(rules, http_routing=routing) as (_, _worker, address):
            await asyncio.get_running_loop().run_in_executor(None, client, address)

    asyncio.run(main())
    return out[0]


@pytest.mark.parametrize("routing", [r for r in ROUTINGS if r != "connection-compiled"])
def test_one_100_through_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routing: str
) -> None:
    """Per request (each twin), the relay's 100 and not the upstream's; per
    connection (L4 after the first head), the upstream's: one either way."""
    mode = _routing(routing, monkeypatch)
    seen: list[bytes] = []
    backend = _upstream_continues(seen)
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    try:
        got = _through_worker(rules, mode)
    finally:
        backend.close()
    assert got.startswith(CONTINUE) and got.count(b"100 Continue") == 1, got
    assert got[len(CONTINUE) :].startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got
    assert len(seen) == 1 and b"\r\nExpect: 100-continue" in seen[0], seen


def test_the_expectation_is_read_case_insensitively(mode: tuple[str, str]) -> None:
    """``EXPECT:  100-Continue `` (RFC 9110 §10.1.1: case-insensitive; the
    value's blanks are no part of it): the relay's 100 all the same."""
    backend = _ReadsBodies()
    relay = _proxy(mode, (backend.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(
            b"POST /x HTTP/1.1\r\nHost: a\r\nEXPECT:  100-Continue \r\nContent-Length: 5\r\n\r\n"
        )
        assert _continued(a) == CONTINUE
        a.sendall(b"hello")
        got = _response(a)
        a.close()
    finally:
        relay.close()
        backend.close()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got
    assert len(backend.requests) == 1 and backend.requests[0].endswith(b"hello")


def test_a_mirrored_expecting_post_is_copied_with_its_body(mode: tuple[str, str]) -> None:
    """A route mirroring every request: the client gets the relay's 100,
    the primary and the copy each get the head (its Expect line kept) and
    the body sent after the 100."""
    backend = _ReadsBodies()
    mirror = Mirrored()
    copy = Mirror((mirror.endpoint,), ppm=MIRROR_SCALE, tag=COPY)
    relay = _mirror_relay(mode, (backend.endpoint,), (copy,))
    try:
        got = _post_after_100(relay)
        assert _until(lambda: len(mirror.requests) == 1, 5.0), mirror.requests
        _settled(relay)
    finally:
        relay.close()
        backend.close()
        mirror.listener.close()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got
    assert backend.requests[0].endswith(b"\r\n\r\nhello"), backend.requests
    copied = mirror.requests[0][1]
    assert b"\r\nExpect: 100-continue\r\n" in copied and copied.endswith(b"hello"), copied


def test_a_faults_abort_comes_without_a_100_and_its_delay_before_it(
    mode: tuple[str, str],
) -> None:
    """A fault's abort (the fault filter before the router): the 503 with
    no 100 before it, the connection closed (the body never sent). A
    fault's delay: the 100 once it passed, then the body goes up."""
    backend = _ReadsBodies()
    relay = _mirror_relay(mode, (backend.endpoint,), (), fault=ABORT)
    try:
        a = _client(relay)
        a.sendall(HEAD + b"Content-Length: 5\r\n\r\n")
        got, end = _read_all(a, 5.0)
        a.close()
    finally:
        relay.close()
    assert got.startswith(b"HTTP/1.1 503") and end == "EOF", (got, end)
    assert b"connection: close" in got.lower() and not backend.requests, got
    relay = _mirror_relay(mode, (backend.endpoint,), (), fault=DELAY)
    try:
        got = _post_after_100(relay)
    finally:
        relay.close()
        backend.close()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got
    assert len(backend.requests) == 1 and backend.requests[0].endswith(b"hello")
