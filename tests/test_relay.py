"""The per-request relay, both twins, over real loopback sockets.

Backends are small threaded HTTP/1.1 servers on 127.0.0.1 that count the
connections they accept; clients are raw sockets, so every byte is checked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import resource
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import pytest

from l4proxy.dataplane._peek_py import RequestHead
from l4proxy.dataplane._pool_py import PoolOptions
from l4proxy.dataplane._relay_py import UNROUTED, Decision
from tests._fd_audit import snapshot
from tests.conftest import accept_until_closed, dead_ports, load_twin, sent_up
from tests.mesh import binomial_ok


class Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # (5 by default: a burst of connects lost SYNs, 1 s each)

    def __init__(self, name: str, close_after: int = 0, host: str = "127.0.0.1") -> None:
        self.name = name
        self.close_after = close_after  # close the connection after n responses
        self.accepted = 0
        self.targets: list[bytes] = []  # every request's target, in order
        self.lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)
        # polled every 50 ms: shutdown() waits for the next poll (0.5 s by default,
        # twice per test with two backends)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def endpoint(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)


class _Handler(socketserver.StreamRequestHandler):
    server: Backend

    def _chunked_body(self) -> bytes:
        return _read_chunked(self.rfile)

    def handle(self) -> None:
        with self.server.lock:
            self.server.accepted += 1
        served = 0
        while True:
            line = self.rfile.readline()
            if not line:
                return
            length = 0
            chunked = expect = False
            while (h := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
                chunked = chunked or h.lower() == b"transfer-encoding: chunked\r\n"
                expect = expect or h.lower() == b"expect: 100-continue\r\n"
            if expect:  # the client waits for it before the body
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            body = self.rfile.read(length) if length else b""
            if chunked:
                body = self._chunked_body()
            target = line.split()[1]
            with self.server.lock:
                self.server.targets.append(target)
            answer = f"v={self.server.name} {target.decode()} {len(body)}".encode()
            # /http10/: an HTTP/1.0 server, which closes after its answer
            # unless the request's path also says keep-alive (/http10/ka/)
            http10 = target.startswith(b"/http10/")
            keep = not http10 or target.startswith(b"/http10/ka/")
            self.wfile.write(
                b"%s 200 OK\r\n%sContent-Length: %d\r\n\r\n%s"
                % (
                    b"HTTP/1.0" if http10 else b"HTTP/1.1",
                    b"Connection: keep-alive\r\n" if http10 and keep else b"",
                    len(answer),
                    answer,
                )
            )
            self.wfile.flush()
            if not keep:
                return
            served += 1
            if self.server.close_after and served >= self.server.close_after:
                return


def _read_chunked(rfile: BinaryIO) -> bytes:
    """A chunked body's data (its trailers read and dropped)."""
    body = b""
    while size := int(rfile.readline().split(b";")[0], 16):
        body += rfile.read(size)
        assert rfile.readline() == b"\r\n"
    while rfile.readline() not in (b"\r\n", b""):
        pass
    return body


def read_response(sock: socket.socket) -> bytes:
    """One Content-Length response from *sock*."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(h.split(b":")[1])
        for h in head.split(b"\r\n")
        if h.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    assert len(body) == length  # one request in flight: nothing after it
    return body


@pytest.fixture(name="backends")
def backends_fixture() -> Iterator[list[Backend]]:
    """Backends v1 and v2: a test module that imports this has the fixture
    ``backends``."""
    servers = [Backend("v1"), Backend("v2")]
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


_TWIN = {"which": "pure"}


@pytest.fixture(autouse=True, params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on both twins: Proxy builds the twin named here."""
    load_twin("relay", request.param)  # skips (fails under CI) when not built
    _TWIN["which"] = request.param
    yield request.param
    _TWIN["which"] = "pure"


class Proxy:
    """A relay on a loopback listener; decide() splits by a seeded RNG."""

    def __init__(self, decide: object, pool: PoolOptions | None = None, **options: Any) -> None:
        self.handed: list[bytes] = []
        self.refused: list[str] = []
        relay_class = load_twin("relay", _TWIN["which"]).HttpRelay
        self.relay = relay_class(
            decide,
            self._l4,
            pool=pool,
            header_timeout=1.0,
            refused=self.refused.append,
            **options,
        )
        self.relay.start()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        accept_until_closed(self.listener, self._hand_over)

    def _hand_over(self, conn: socket.socket) -> None:
        self.relay.add(conn, ("198.19.0.10", 8080))

    def _l4(
        self,
        client: socket.socket,
        up: object,
        to_client: bytes,
        to_up: bytes,
        origin: object,
        endpoint: object,
    ) -> None:
        self.handed.append(to_up)
        client.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def close(self) -> None:
        self.listener.close()
        self.relay.close()


def test_every_request_on_a_keep_alive_connection_is_split_on_its_own(
    backends: list[Backend],
) -> None:
    rng = random.Random(7)
    picks: list[str] = []

    def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
        b = backends[rng.random() < 0.5]
        picks.append(b.name)
        return Decision((b.endpoint,), tag=b.name)

    proxy = Proxy(decide)
    try:
        conns = [proxy.connect() for _ in range(4)]
        seen: list[list[str]] = [[] for _ in conns]
        for i in range(50):
            for k, c in enumerate(conns):
                c.sendall(f"GET /r{i} HTTP/1.1\r\nHost: bootcamp\r\n\r\n".encode())
                seen[k].append(read_response(c).split()[0].decode())
        for c in conns:
            c.close()
    finally:
        proxy.close()
    # every connection saw both versions: the split is per request
    assert all({"v=v1", "v=v2"} <= set(s) for s in seen)
    assert [s for conn in zip(*seen, strict=True) for s in conn] == [f"v={p}" for p in picks]
    # upstream connections are reused: far fewer than the 200 requests
    assert sum(b.accepted for b in backends) <= 8
    stats = proxy.relay.stats()
    assert stats["requests"] == 200 and stats["pool_reused"] >= 190


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_hop_by_hop_request_fields_are_dropped_in_the_loop(
    backends: list[Backend], twin: str
) -> None:
    """Keep-Alive, Proxy-Connection, TE and a Connection naming TE (RFC 9110
    §10.1.4; Perl's LWP sends ``Connection: TE, close``) are dropped by the
    compiled loop itself: no request goes to its pure relay. A Connection
    naming another field does (the twins' agreement on the bytes is in
    test_relay_twins.py)."""
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,)))
    heads = (
        "Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\n",
        "Connection: TE\r\nTE: trailers\r\n",
        "connection: te, keep-alive\r\nTE: deflate\r\n",
    )
    try:
        with proxy.connect() as c:
            for i, extra in enumerate(heads):
                c.sendall(f"GET /h{i} HTTP/1.1\r\nHost: svc\r\n{extra}\r\n".encode())
                assert read_response(c).startswith(b"v=v1 /h%d" % i)
            assert proxy.relay.stats()["slow_path"] == 0
            c.sendall(b"GET /named HTTP/1.1\r\nHost: svc\r\nConnection: x-a\r\nX-A: 1\r\n\r\n")
            assert read_response(c).startswith(b"v=v1 /named")
        assert proxy.relay.stats()["slow_path"] == 1
    finally:
        proxy.close()


def test_connection_close_clients_reuse_pooled_upstreams(backends: list[Backend]) -> None:
    def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
        return Decision((backends[0].endpoint,))

    proxy = Proxy(decide)
    try:
        for i in range(30):
            with proxy.connect() as c:
                c.sendall(f"GET /c{i} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
                assert read_response(c) == f"v=v1 /c{i} 0".encode()
                assert c.recv(1) == b""  # we close as the client asked
    finally:
        proxy.close()
    assert backends[0].accepted == 1


def test_a_server_that_closes_idle_connections_costs_no_request() -> None:
    flaky = Backend("v1", close_after=1)  # closes after every response, without saying so
    try:

        def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
            return Decision((flaky.endpoint,))

        proxy = Proxy(decide)
        try:
            with proxy.connect() as c:
                for i in range(20):
                    c.sendall(f"GET /f{i} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                    assert read_response(c) == f"v=v1 /f{i} 0".encode()
        finally:
            proxy.close()
        stats = proxy.relay.stats()
        assert stats["requests"] == 20 and flaky.accepted == 20
        # each closed idle connection was evicted or retried, never a 502
        assert stats["local_answers"] == 0
    finally:
        flaky.shutdown()
        flaky.server_close()


def test_no_route_answers_locally_and_keeps_the_connection(backends: list[Backend]) -> None:
    def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
        if head.path == "/bootcamp":
            return Decision((backends[0].endpoint,))
        return Decision(local=(404, "no route"))

    proxy = Proxy(decide)
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /bootcamp HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(c) == b"v=v1 /bootcamp 0"
            c.sendall(b"GET /secret HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(c) == b"no route"
            c.sendall(b"GET /bootcamp HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(c) == b"v=v1 /bootcamp 0"
    finally:
        proxy.close()


def _answer_and_close(c: socket.socket) -> bytes:
    """Everything the relay sends on *c* until it closes it."""
    c.settimeout(5)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    return data


# What a rule for /public must not let through: each a dot-segment, plain or
# percent-encoded, that a server removing dot-segments reads as /private.
DOT_TARGETS = [
    b"/public/../private",
    b"/public/%2e%2e/private",
    b"/public/%2E./private?x=1",
    b"/public/./../private",
    b"/public\\..\\private",
    b"http://gw/public/../private",
]


def _public_only(backend: Backend) -> Callable[[RequestHead, object], Decision]:
    """An Ingress with one Prefix path, /public (segment-wise, as Ingress
    matches it): everything else is a local 404."""

    def decide(head: RequestHead, origin: object) -> Decision:
        path = head.path.split("?")[0]
        if path == "/public" or path.startswith("/public/"):
            return Decision((backend.endpoint,))
        return Decision(local=(404, "no route"))

    return decide


@pytest.mark.parametrize("target", DOT_TARGETS)
def test_a_dot_segment_gets_400_and_a_close_and_never_goes_upstream(
    backends: list[Backend], target: bytes
) -> None:
    """/public/../private matched the rule for /public and went upstream as
    it was sent: a server that removes dot-segments served /private, which no
    rule exposed. Now it is refused like other malformed heads, on its own
    and as the next request of a keep-alive connection the relay routed
    before (the compiled twin's fast path hands it to its pure relay)."""
    proxy = Proxy(_public_only(backends[0]))
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /private HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(c) == b"no route"
            c.sendall(b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % target)
            data = _answer_and_close(c)
            assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
            assert b"connection: close\r\n" in data
            assert data.endswith(b"dot-segment (. or ..) in the request path")
        with proxy.connect() as c:  # after a routed request on the same connection
            c.sendall(b"GET /public/a HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(c) == b"v=v1 /public/a 0"
            c.sendall(b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % target)
            assert _answer_and_close(c).startswith(b"HTTP/1.1 400 ")
        assert backends[0].targets == [b"/public/a"]  # never the dot-segment
        assert proxy.relay.stats()["local_answers"] == 3
    finally:
        proxy.close()


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_a_cached_verdict_never_serves_a_dot_segment(backends: list[Backend], twin: str) -> None:
    """The loop keys verdicts by which tests a target passes: /public/../private
    passes the Ingress path's test for /public (request_bits b"\\x01") like
    /public/a, so after /public/a it took that cached verdict, without Python.
    It gets 400 now, and Python is never asked about it."""
    from l4proxy.dataplane.verdict import SHAPE_TESTS, Choice, Verdict

    tests = (("segments", "/public"),)
    up = (Choice(1, (backends[0].endpoint,)),)

    def answer(head: RequestHead) -> Verdict:
        if _public_only(backends[0])(head, None).local is not None:
            return Verdict(local=(404, "no route"), ttl=3600.0, shape=SHAPE_TESTS, tests=tests)
        return Verdict(up, ttl=3600.0, shape=SHAPE_TESTS, tests=tests)

    proxy, calls = _resolving_proxy(backends, None, answer)
    try:
        with proxy.connect() as c:
            assert _get(c, "/public/a") == b"v=v1 /public/a 0"
            assert _get(c, "/private") == b"no route"
        for target in DOT_TARGETS[:5]:  # (origin-form: the fast path's)
            with proxy.connect() as c:
                assert _get(c, "/public/b") == b"v=v1 /public/b 0"  # the cached verdict
                c.sendall(b"GET %s HTTP/1.1\r\nHost: svc\r\n\r\n" % target)
                assert _answer_and_close(c).startswith(b"HTTP/1.1 400 "), target
    finally:
        proxy.close()
    assert calls == [("GET", "/public/a"), ("GET", "/private")], calls
    assert backends[0].targets == [b"/public/a"] + [b"/public/b"] * 5
    assert proxy.relay.stats()["verdict_cache_hits"] == 5


def test_dead_endpoint_is_skipped_and_all_dead_is_503(backends: list[Backend]) -> None:
    cleanup = contextlib.ExitStack()
    dead_ep = ("127.0.0.1", cleanup.enter_context(dead_ports(1))[0])
    failed: list[tuple[tuple[str, int], str]] = []

    def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
        if head.path == "/all-dead":
            return Decision((dead_ep,))
        return Decision((dead_ep, backends[1].endpoint))

    proxy = Proxy(decide)
    proxy.relay.connect_failed = lambda ep, tag, why: failed.append((ep, why))
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"v=v2 /x 0"
            c.sendall(b"GET /all-dead HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"no healthy upstream"
    finally:
        proxy.close()
        cleanup.close()
    # The reason is the connect's own (outlier detection and /clusters show
    # it): SO_ERROR is cleared by the read that saw it, and a second read
    # used to turn every refused connect into "connect timeout".
    assert failed == [(dead_ep, "Connection refused")] * 2


def test_bodies_go_through_byte_identical(backends: list[Backend]) -> None:
    def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
        return Decision((backends[0].endpoint,))

    body = random.Random(3).randbytes(300_000)
    proxy = Proxy(decide)
    try:
        with proxy.connect() as c:
            for _ in range(3):
                c.sendall(b"PUT /up HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % len(body))
                c.sendall(body)
                assert read_response(c) == b"v=v1 /up %d" % len(body)
    finally:
        proxy.close()


@pytest.mark.parametrize("max_head", [8192, 131072])
def test_max_head_is_the_limit_on_both_twins(backends: list[Backend], max_head: int) -> None:
    """A head of max_head bytes or fewer goes through, a longer one gets 431.
    The compiled twin's Python parse and its pure relay (the slow path) used
    to apply 65536 whatever max_head was: a 70 kB head under 128 kB reset
    the connection, and a 10 kB one over 8 kB was passed on."""

    def decide(head: RequestHead, origin: tuple[str, int]) -> Decision:
        return Decision((backends[0].endpoint,))

    def head_of(size: int) -> bytes:
        start = b"GET /h HTTP/1.1\r\nHost: b\r\nX-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    proxy = Proxy(decide, max_head=max_head)
    try:
        with proxy.connect() as c:
            for size in (max_head - 1000, max_head):
                c.sendall(head_of(size))
                assert read_response(c) == b"v=v1 /h 0"
        with proxy.connect() as c:
            c.sendall(head_of(max_head + 1000))
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    finally:
        proxy.close()


@pytest.mark.parametrize("sent", [b"GET / HTTP/1.1\r\nHost", b""], ids=["half-a-head", "nothing"])
def test_slow_head_gets_408(sent: bytes) -> None:
    """A head not complete within header_timeout (1 s here) gets the L4
    path's 408 and a close, and is reported as refused("header_timeout"),
    also when the client connected and never sent a byte (the first head is
    timed from the hand-off, as the L4 path times its peek from accept; it
    used to wait for idle_timeout, an hour by default)."""
    proxy = Proxy(lambda head, origin: Decision(local=(404, "x")))
    try:
        with proxy.connect() as c:
            t0 = time.monotonic()
            c.sendall(sent)
            c.settimeout(5)
            data = b""
            while chunk := c.recv(4096):
                data += chunk
            assert 0.9 <= time.monotonic() - t0 < 3  # 1 s, plus a tick, plus a busy machine
            assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
            assert data.endswith(b"\r\n\r\nrequest header timeout"), data
        deadline = time.monotonic() + 2  # reported on the loop's next return to Python
        while not proxy.refused and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.refused == ["header_timeout"]
    finally:
        proxy.close()


def test_an_idle_keep_alive_connection_is_not_a_slow_head(backends: list[Backend]) -> None:
    """Between requests the head timer waits for the next head's first byte."""
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,)))
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /1 HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"v=v1 /1 0"
            time.sleep(1.5)  # over header_timeout
            c.sendall(b"GET /2 HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"v=v1 /2 0"
        assert proxy.refused == []
    finally:
        proxy.close()


def test_a_connection_that_closes_after_its_answer_is_released_and_closed() -> None:
    """HTTP/1.0 (and any answer with Connection: close): the upstream is not
    reused; an HTTP/1.0 client gets the whole answer and then EOF, a
    keep-alive client the answer without the close, and its next request
    goes on a new upstream connection; nothing is left. (The relay used to
    discard the upstream from its pool twice here, and the KeyError left the
    client connection open for good.)"""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(c: socket.socket) -> None:
        d = b""
        while b"\r\n\r\n" not in d:
            d += c.recv(65536)
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        c.sendall(head % len(d) + d)
        c.close()

    accept_until_closed(srv, serve)
    endpoint = ("127.0.0.1", srv.getsockname()[1])
    proxy = Proxy(lambda head, origin: Decision((endpoint,)))
    try:
        old = b"GET /old HTTP/1.0\r\nUser-Agent: x\r\n\r\n"
        with proxy.connect() as c:
            c.sendall(old)
            data = b""
            while chunk := c.recv(65536):  # EOF, not a timeout
                data += chunk
        assert data.endswith(sent_up(old)) and b"connection: close" in data
        with proxy.connect() as c:  # the server says close; the client stays
            for path in (b"/new", b"/next"):
                request = b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path
                c.sendall(request)
                assert read_response(c) == sent_up(request)
        deadline = time.monotonic() + 5
        while proxy.relay.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = proxy.relay.stats()
        assert stats["active"] == 0 and stats["errors"] == 0, stats
        assert stats["pool_closed_unreusable"] == 3 and stats["pool_idle"] == 0
    finally:
        proxy.close()
        srv.close()


def test_a_server_that_does_not_read_holds_the_client_back() -> None:
    """Backpressure on a request body: the relay holds at most one read of
    it; the client is not read while the upstream has not taken it (an
    unbounded buffer here would let one upload fill the sidecar's memory)."""
    sink = socket.create_server(("127.0.0.1", 0))  # accepts, never reads
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(sink.accept()[0]), daemon=True).start()
    endpoint = ("127.0.0.1", sink.getsockname()[1])
    proxy = Proxy(lambda head, origin: Decision((endpoint,)))
    total = 128 << 20
    sent = 0
    try:
        with proxy.connect() as c:
            c.sendall(f"POST /up HTTP/1.1\r\nHost: b\r\nContent-Length: {total}\r\n\r\n".encode())
            c.settimeout(1.0)  # (unbounded, loopback takes GBs a second)
            chunk = b"x" * 65536
            try:
                while sent < total:
                    sent += c.send(chunk)
            except TimeoutError:
                pass  # the client is held back: what we want
            # kernel buffers on loopback (client, relay, server) hold some MB;
            # everything else would be in the relay's memory
            assert sent < 48 << 20, sent
    finally:
        proxy.close()
        for s in held:
            s.close()
        sink.close()


def _chunked_post(path: str, chunks: list[bytes], trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(ch), ch) for ch in chunks if ch)
    head = b"POST %s HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head % path.encode() + body + b"0\r\n" + trailers + b"\r\n"


def test_chunked_request_bodies_are_framed_on_a_kept_connection(
    backends: list[Backend], twin: str
) -> None:
    """Chunked request bodies (some with trailers, the last one 8 MiB) on one
    keep-alive connection: each reaches the server whole, all on one pooled
    upstream connection. The compiled twin frames them in its loop: none
    goes to its pure relay (which used to take the connection for good)."""
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,)))
    got, want = [], []
    try:
        with proxy.connect() as c:
            for i in range(20):
                chunks = [b"x" * (i + 1), b"y" * (3 * i), b"z"]
                c.sendall(_chunked_post(f"/c/{i}", chunks, b"X-T: %d\r\n" % i if i % 2 else b""))
                got.append(read_response(c))
                want.append(b"v=v1 /c/%d %d" % (i, sum(map(len, chunks))))
            big = [bytes([i % 256]) * 65536 for i in range(128)]
            sender = threading.Thread(target=c.sendall, args=(_chunked_post("/big", big),))
            sender.start()
            got.append(read_response(c))
            sender.join(10)
            want.append(b"v=v1 /big %d" % (128 * 65536))
    finally:
        proxy.close()
    assert got == want
    assert backends[0].accepted == 1
    if twin == "compiled":
        assert proxy.relay.stats()["slow_path"] == 0


def test_expect_100_continue_waits_for_the_servers_100_on_a_kept_connection(
    backends: list[Backend], twin: str
) -> None:
    """A client that sends ``Expect: 100-continue`` and waits for the 100
    before its body (curl for large bodies, .NET): the 100 comes from the
    server through the relay, then the final answer; ten such requests on one
    connection, one upstream connection. The compiled twin serves them in its
    loop, the interim head included (no Python)."""
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,)))
    try:
        with proxy.connect() as c:
            for i in range(10):
                body = b"b" * (100 + i)
                c.sendall(
                    b"PUT /e/%d HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % (i, len(body))
                )
                interim = b""
                while not interim.endswith(b"\r\n\r\n"):
                    chunk = c.recv(1)
                    assert chunk, interim
                    interim += chunk
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                c.sendall(body)
                assert read_response(c) == b"v=v1 /e/%d %d" % (i, len(body))
    finally:
        proxy.close()
    assert backends[0].accepted == 1
    if twin == "compiled":
        stats = proxy.relay.stats()
        assert stats["slow_path"] == 0 and stats["response_heads_in_python"] == 0, stats


def test_http10_responses_keep_the_upstream_only_when_they_say_keep_alive(
    backends: list[Backend], twin: str
) -> None:
    """An HTTP/1.0 server (python's http.server by default, old appliances)
    that says ``Connection: keep-alive``: ten requests on one client
    connection reuse one upstream connection, and the compiled twin reads
    those response heads in its loop (no Python). One that does not say it is
    not persistent: the server closes; the relay's client connection stays,
    its answer saying ``connection: keep-alive`` (an HTTP/1.0 answer does
    not persist otherwise), and its next request goes on a new upstream
    connection."""
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,)))
    try:
        with proxy.connect() as c:
            answers = [_get(c, f"/http10/ka/{i}") for i in range(10)]
            stats = proxy.relay.stats() if twin == "compiled" else {}
            c.sendall(b"GET /http10/last HTTP/1.1\r\nHost: svc\r\n\r\n")
            last = b""
            while len(last) < 82:
                chunk = c.recv(65536)
                assert chunk, last
                last += chunk
            after = _get(c, "/http10/ka/after")
    finally:
        proxy.close()
    assert answers == [b"v=v1 /http10/ka/%d 0" % i for i in range(10)]
    assert last == (
        b"HTTP/1.0 200 OK\r\nContent-Length: 19\r\nconnection: keep-alive\r\n\r\n"
        b"v=v1 /http10/last 0"
    )
    assert after == b"v=v1 /http10/ka/after 0"
    assert backends[0].accepted == 2
    if twin == "compiled":
        assert stats["response_heads_in_python"] == 0, stats


def test_an_ipv6_endpoint_is_served_in_the_loop(twin: str) -> None:
    """Requests to an IPv6 endpoint (::1) on one keep-alive connection, over
    one pooled upstream connection; the compiled twin connects it itself
    (it used to hand such connections to its pure relay)."""
    v6 = Backend("v6", host="::1")
    proxy = Proxy(lambda head, origin: Decision((v6.endpoint,)))
    try:
        with proxy.connect() as c:
            answers = [_get(c, f"/six/{i}") for i in range(10)]
    finally:
        proxy.close()
        v6.shutdown()
        v6.server_close()
    assert answers == [b"v=v6 /six/%d 0" % i for i in range(10)]
    assert v6.accepted == 1
    if twin == "compiled":
        assert proxy.relay.stats()["slow_path"] == 0


# -- the compiled twin's verdict cache (the pure twin asks decide per request) --


def _resolving_proxy(
    backends: list[Backend],
    verdict: object,
    answer: Callable[[RequestHead], object] | None = None,
    **kw: object,
) -> tuple[Proxy, list]:
    """A compiled relay whose resolve() answers *verdict* (or *answer(head)*)
    and records (method, path) of each call."""
    calls: list[tuple[str, str]] = []

    def resolve(head: RequestHead, origin: object) -> object:
        calls.append((head.method, head.path))
        return verdict if answer is None else answer(head)

    proxy = Proxy.__new__(Proxy)
    proxy.handed = []
    relay_class = load_twin("relay", "compiled").HttpRelay
    proxy.relay = relay_class(lambda h, o: Decision(), proxy._l4, resolve=resolve, seed=11, **kw)
    proxy.relay.start()
    proxy.listener = socket.create_server(("127.0.0.1", 0))
    proxy.port = proxy.listener.getsockname()[1]
    accept_until_closed(proxy.listener, proxy._hand_over)
    return proxy, calls


def _append_to(rows: list) -> Callable[[list, list], None]:
    return lambda decided, answered: rows.append(answered)


def _get(c: socket.socket, path: str, method: str = "GET") -> bytes:
    c.sendall(f"{method} {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
    return read_response(c)


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_a_verdict_is_asked_once_per_request_shape(backends: list[Backend], twin: str) -> None:
    from l4proxy.dataplane.verdict import SHAPE_PATH, Choice, Verdict

    for shape, want in ((0, 1), (SHAPE_PATH, 40)):
        verdict = Verdict((Choice(1, (backends[0].endpoint,)),), shape=shape)
        proxy, calls = _resolving_proxy(backends, verdict)
        try:
            with proxy.connect() as c:
                for i in range(40):  # 40 paths; GET and HEAD alike
                    assert _get(c, f"/u/{i}").startswith(b"v=v1")
        finally:
            proxy.close()
        # shape 0: the route does not look at paths: one verdict serves all
        assert len(calls) == want, (shape, calls[:3])
        stats = proxy.relay.stats()
        assert stats["verdict_cache_hits"] == 40 - want


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_an_expired_verdict_sends_one_request_to_python_not_every_one(
    backends: list[Backend], twin: str
) -> None:
    """Stale while revalidated: 40 keep-alive connections whose verdict has
    expired send their next requests in one burst. One of them asks Python;
    the 39 others are served the expired verdict while that one is out (the
    loop used to ask Python for each). The burst is queued whole before the
    loop reads any of it: the loop is held in resolve() for another Host."""
    from l4proxy.dataplane.verdict import Choice, Verdict

    ttl = 0.2
    release = threading.Event()

    def answer(head: RequestHead) -> Verdict:
        if head.host == "hold":  # the loop waits here while the burst queues
            assert release.wait(10)
        return Verdict((Choice(1, (backends[0].endpoint,)),), ttl=ttl, shape=0)

    proxy, calls = _resolving_proxy(backends, None, answer)
    conns = [proxy.connect() for _ in range(40)]
    holder = proxy.connect()
    try:
        for c in conns:  # the verdict is cached (and refilled) while in use
            assert _get(c, "/warm").startswith(b"v=v1")
        time.sleep(ttl * 1.5)  # expired; served stale for 1 s more
        asked = len(calls)
        holder.sendall(b"GET /hold HTTP/1.1\r\nHost: hold\r\n\r\n")
        while len(calls) == asked:  # the loop is in resolve() for it
            time.sleep(0.005)
        for c in conns:
            c.sendall(b"GET /burst HTTP/1.1\r\nHost: svc\r\n\r\n")
        release.set()
        answers = [read_response(c) for c in conns]
        assert read_response(holder).startswith(b"v=v1")
    finally:
        for c in [*conns, holder]:
            c.close()
        proxy.close()
    assert all(a.startswith(b"v=v1 /burst") for a in answers), answers[:3]
    burst = [call for call in calls if call[1] == "/burst"]
    assert len(burst) == 1, len(burst)


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_paths_that_pass_the_same_tests_share_a_verdict(backends: list[Backend], twin: str) -> None:
    """SHAPE_TESTS: the loop keys verdicts by which tests a target passes,
    not by the target: 120 distinct paths with ids and queries ask Python
    once per outcome (3), and each request gets its outcome's verdict."""
    from l4proxy.dataplane.verdict import SHAPE_TESTS, Choice, Verdict

    tests = (("segments", "/api"), ("exact", "/v2"))

    def answer(head: RequestHead) -> Verdict:
        path = head.path.split("?")[0]
        up = backends[1] if path == "/v2" or path.startswith("/api/") else backends[0]
        return Verdict((Choice(1, (up.endpoint,)),), shape=SHAPE_TESTS, tests=tests)

    proxy, calls = _resolving_proxy(backends, None, answer)
    got = []
    try:
        with proxy.connect() as c:
            for i in range(40):
                for path in (f"/api/users/{i}?q={i}", f"/v2?n={i}", f"/web/{i}"):
                    got.append((path, _get(c, path)[:4]))
    finally:
        proxy.close()
    assert len(calls) == 3, calls
    for path, answer in got:
        want = b"v=v1" if path.startswith("/web/") else b"v=v2"
        assert answer == want, (path, answer)
    assert proxy.relay.stats()["verdict_cache_hits"] == 117


def test_both_twins_of_the_request_tests_agree() -> None:
    """verdict.request_bits and the loop's test_bits on random tests and
    request heads: targets with queries, fragments and prefixes that end
    mid-element; key headers absent, repeated (the last one counts), with
    OWS, in any case of name."""
    import random

    from l4proxy.dataplane._peek_py import has_dot_segment
    from l4proxy.dataplane.peek import HeadError, parse_head
    from l4proxy.dataplane.verdict import TEST_KINDS, request_bits

    relay = load_twin("relay", "compiled").HttpRelay(
        lambda h, o: Decision(),
        lambda *a: None,
        resolve=lambda h, o: None,
        key_headers=["x-a", "x-b"],
    )
    rng = random.Random(5)
    alphabet = "/ab?#=."

    def text(k: int) -> str:
        return "".join(rng.choices(alphabet, k=rng.randrange(0, k)))

    try:
        for _ in range(3000):
            tests = []
            for _ in range(rng.randrange(0, 20)):
                kind = rng.choice(TEST_KINDS)
                name = rng.choice(["x-a", "x-b"])
                tests.append((kind, f"{name}:{text(4)}" if kind.startswith("header_") else text(5)))
            target = "/" + text(8)
            lines = []
            for _ in range(rng.randrange(0, 4)):
                name = rng.choice(["x-a", "X-A", "x-b", "x-c"])
                ows = rng.choice(["", " ", "\t"])
                lines.append(name + ":" + ows + text(5) + rng.choice(["", " "]) + "\r\n")
            raw = f"GET {target} HTTP/1.1\r\nHost: h\r\n{''.join(lines)}\r\n".encode()
            if has_dot_segment(target.encode()):  # ("/." is drawn) refused: no tests
                with pytest.raises(HeadError, match="dot-segment"):
                    parse_head(raw)
                continue
            head = parse_head(raw)
            assert head is not None
            want = request_bits(tuple(tests), head.path, dict(head.headers))
            assert relay._request_bits(tuple(tests), raw) == want, (tests, raw)
        with pytest.raises(KeyError):  # not a key header: not cached (asked per request)
            relay._request_bits((("header_exact", "x-c:1"),), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    finally:
        relay.close()


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_a_key_header_name_that_is_not_ascii_leaves_the_others_in_place(twin: str) -> None:
    """Rule validation refuses such names, but should one reach the relay
    (invalidate(key_headers), from a rule swap): the compiled twin numbered
    every name first, then stored them one by one until the first that was
    not ASCII raised, so a header test on a name after it read a slot of the
    loop's Head that summarize() never set (stack garbage as an offset into
    the head: a wrong verdict cached, or a read out of bounds). The names it
    cannot compare are left out, the others kept, and a verdict reading
    headers is then not cached (as with more names than the key holds)."""
    from l4proxy.dataplane.verdict import request_bits

    relay = load_twin("relay", "compiled").HttpRelay(
        lambda h, o: Decision(local=(404, "no route")), lambda *a: None, key_headers=["x-a"]
    )
    relay.start()
    try:
        relay.invalidate(["x-a", "x-\u00e9", "x-z"])  # applied at the next call into Python
        a, b = socket.socketpair()
        with a:
            relay.add(b, ("198.19.0.10", 80))
            a.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            a.settimeout(5)
            assert a.recv(4096).startswith(b"HTTP/1.1 404 ")
        tests = (("header_exact", "x-z:v"), ("header_prefix", "x-a:w"))
        for headers in ({"x-z": "v", "x-a": "w"}, {"x-z": "v"}, {}):
            lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            raw = f"GET / HTTP/1.1\r\nHost: h\r\n{lines}\r\n".encode()
            assert relay._request_bits(tests, raw) == request_bits(tests, "/", headers), headers
        with pytest.raises(KeyError):  # not a key: asked per request, never cached
            relay._request_bits(
                (("header_exact", "x-\u00e9:v"),), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            )
        assert relay.stats()["errors"] == 0
    finally:
        relay.close()


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_header_values_that_pass_the_same_tests_share_a_verdict(
    backends: list[Backend], twin: str
) -> None:
    """A route on end-user: jason (Istio's example): 40 other users and jason,
    twice each, ask Python twice (jason or not), not once per user."""
    from l4proxy.dataplane.verdict import SHAPE_TESTS, Choice, Verdict

    tests = (("header_exact", "end-user:jason"),)

    def answer(head: RequestHead) -> Verdict:
        up = backends[1] if dict(head.headers).get("end-user") == "jason" else backends[0]
        return Verdict((Choice(1, (up.endpoint,)),), shape=SHAPE_TESTS, tests=tests)

    proxy, calls = _resolving_proxy(backends, None, answer, key_headers=["end-user"])
    got = []
    try:
        with proxy.connect() as c:
            for user in [*(f"user{i}" for i in range(40)), "jason"] * 2:
                c.sendall(f"GET /p HTTP/1.1\r\nHost: svc\r\nEnd-User: {user}\r\n\r\n".encode())
                got.append((user, read_response(c)[:4]))
    finally:
        proxy.close()
    assert len(calls) == 2, calls
    assert all(v == (b"v=v2" if user == "jason" else b"v=v1") for user, v in got), got


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_more_header_names_than_the_key_holds_are_never_cached_wrong(
    backends: list[Backend], twin: str
) -> None:
    """Routes match on 20 header names, more than the key holds (16): a
    verdict that reads headers is not cached (each request asks), rather than
    cached under a key without the 20th header's value (which sent a request
    with x-h19: b where the one with x-h19: a went)."""
    from l4proxy.dataplane.verdict import SHAPE_HEADERS, Choice, Verdict

    names = [f"x-h{i}" for i in range(20)]

    def answer(head: RequestHead) -> Verdict:
        up = backends[1] if dict(head.headers).get("x-h19") == "b" else backends[0]
        return Verdict((Choice(1, (up.endpoint,)),), shape=SHAPE_HEADERS, ttl=3600.0)

    proxy, calls = _resolving_proxy(backends, None, answer, key_headers=names)
    got = []
    try:
        with proxy.connect() as c:
            for value in "abab":
                c.sendall(f"GET /h HTTP/1.1\r\nHost: svc\r\nx-h19: {value}\r\n\r\n".encode())
                got.append(read_response(c)[:4])
    finally:
        proxy.close()
    assert got == [b"v=v1", b"v=v2", b"v=v1", b"v=v2"]
    assert len(calls) == 4


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_invalidate_makes_the_next_request_ask_again(backends: list[Backend], twin: str) -> None:
    from l4proxy.dataplane.verdict import Choice, Verdict

    verdict = Verdict((Choice(1, (backends[0].endpoint,)),), ttl=3600.0)
    proxy, calls = _resolving_proxy(backends, verdict)
    try:
        with proxy.connect() as c:
            for _ in range(5):
                _get(c, "/a")
            proxy.relay.invalidate()  # a rule swap
            for _ in range(5):
                _get(c, "/a")
    finally:
        proxy.close()
    assert len(calls) == 2


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_the_weighted_draw_is_reproducible_with_a_seed(backends: list[Backend], twin: str) -> None:
    from l4proxy.dataplane.verdict import Choice, Verdict

    verdict = Verdict(
        (Choice(1, (backends[0].endpoint,), tag="v1"), Choice(1, (backends[1].endpoint,), tag="v2"))
    )
    runs = []
    for forget in (False, False, True):
        rows: list = []
        proxy, _calls = _resolving_proxy(backends, verdict, report_rows=_append_to(rows))
        try:
            with proxy.connect() as c:
                run = [_get(c, "/s")[:4] for _ in range(100)]
                if forget:  # what a failed connect does: the verdicts, not the draws
                    proxy.relay.invalidate()
                runs.append(run + [_get(c, "/s")[:4] for _ in range(100)])
        finally:
            proxy.close()
        answered = {tag: n for batch in rows for tag, _status, n, _s, _b, _f in batch}
        assert answered == {"v1": runs[-1].count(b"v=v1"), "v2": runs[-1].count(b"v=v2")}
    assert runs[0] == runs[1]  # --seed: the same draws, request for request
    # the RNG restarts with a new table only (key headers given), as the
    # route table's; it used to restart at any forgetting
    assert runs[2] == runs[0]
    assert binomial_ok(runs[0].count(b"v=v2"), 200, 0.5)


def test_out_of_fds_for_an_upstream_answers_503_and_blames_no_endpoint(
    backends: list[Backend],
) -> None:
    """socket() for a new upstream fails with EMFILE: the client gets the L4
    path's answer (503 "overloaded"), the refusal is counted as fd_limit, and
    the endpoint is not reported as failing (a flood must not eject healthy
    pods). The relay used to let the OSError reach its event handler, which
    reset the client with no answer."""
    failed: list[tuple[str, int]] = []
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,)))
    proxy.relay.connect_failed = lambda ep, tag, why: failed.append(ep)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog: list[int] = []
    try:
        with proxy.connect() as c:
            deadline = time.monotonic() + 5
            while not proxy.relay.stats()["active"]:  # the relay owns the client
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # Every fd of this process in use: a low limit, filled up.
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
            c.sendall(b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n")
            c.settimeout(5)
            answer = read_response(c)
            for fd in hog:
                os.close(fd)
            hog.clear()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            # the connection stays usable (a keep-alive local answer), and
            # with fds back the next request goes upstream
            c.sendall(b"GET /y HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"v=v1 /y 0"
        assert answer == b"overloaded"
        assert proxy.refused == ["fd_limit"]
        assert failed == []
        assert proxy.relay.stats()["errors"] == 0
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        proxy.close()


Serve = Callable[[socket.socket], None]
OneShotServer = Callable[[Serve], tuple[str, int]]


@pytest.fixture(name="one_shot_server")
def one_shot_server_fixture() -> Iterator[OneShotServer]:
    """start(serve): a loopback server that runs *serve* on each connection,
    in a thread; its address. Its listener is closed after the test."""
    listeners: list[socket.socket] = []

    def start(serve: Serve) -> tuple[str, int]:
        listeners.append(srv := socket.create_server(("127.0.0.1", 0)))

        def run(c: socket.socket) -> None:
            threading.Thread(target=serve, args=(c,), daemon=True).start()

        accept_until_closed(srv, run)
        host, port = srv.getsockname()[:2]
        return str(host), int(port)

    yield start
    for srv in listeners:
        srv.close()


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk
        data += chunk
    return data


def test_a_response_larger_than_the_socket_buffers_reaches_a_slow_reader(
    one_shot_server: OneShotServer,
) -> None:
    """The client reads only after the relay had to hold response bytes for
    it: the upstream stops being read (backpressure) and must be read again
    once the client drains. The relay used to re-arm only the client's
    interest then, so the upstream was never read again: the exchange hung
    with both sockets unwatched."""
    size = 32 << 20
    payload = random.Random(5).randbytes(1 << 20) * (size >> 20)

    def serve(c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):  # reset when the test gives up
            _read_head(c)
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + payload)

    endpoint = one_shot_server(serve)
    proxy = Proxy(lambda head, origin: Decision((endpoint,)))
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n")
            time.sleep(0.5)  # not reading: the relay's buffer for us fills up
            c.settimeout(10)
            data = bytearray()  # (read_response's bytes += is quadratic at 32 MiB)
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size
            while len(data) < len(head) + size:
                chunk = c.recv(1 << 20)
                assert chunk, len(data)
                data += chunk
            assert data == head + payload
    finally:
        proxy.close()


def _held_upstream_bytes(relay: Any) -> int:
    """What the relay holds for its upstreams (read from this thread while
    the relay's own changes the dict: retried until a consistent pass)."""
    while True:
        try:
            return sum(len(up.out) for up in list(relay._ups.values()))
        except RuntimeError:  # dictionary changed size during iteration
            continue


# pure only: reads the pure twin's buffers (both twins:
# test_a_server_that_does_not_read_holds_the_client_back)
@pytest.mark.parametrize("twin", ["pure"], indirect=True)
def test_a_slow_upstream_bounds_what_the_relay_holds_of_a_request_body(
    one_shot_server: OneShotServer,
) -> None:
    """The upstream reads the body only after a pause: meanwhile the relay
    must stop reading the client once it holds bytes it could not send (one
    read's worth), not buffer the whole body. It used to read the client as
    long as it had nothing held *for the client*, so a fast client filled
    the relay's memory with what a slow upstream had not taken yet."""
    size = 32 << 20
    got: list[int] = []

    def serve(c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            _read_head(c)
            time.sleep(1.0)
            n = 0
            while n < size:
                chunk = c.recv(1 << 20)
                assert chunk
                n += len(chunk)
            got.append(n)
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    endpoint = one_shot_server(serve)
    proxy = Proxy(lambda head, origin: Decision((endpoint,)))
    held: list[int] = []
    try:
        with proxy.connect() as c:
            c.sendall(b"PUT /up HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % size)
            sender = threading.Thread(target=c.sendall, args=(b"z" * size,), daemon=True)
            sender.start()
            for _ in range(8):  # while the upstream pauses
                time.sleep(0.1)
                held.append(_held_upstream_bytes(proxy.relay))
            c.settimeout(10)
            assert read_response(c) == b"ok"
            sender.join(5)
        assert got == [size]
        assert max(held) <= 2 * 65536, held
    finally:
        proxy.close()


# pure only: the compiled twin reports its own requests in rows and hands bad heads to this twin
@pytest.mark.parametrize("twin", ["pure"], indirect=True)
def test_a_bad_head_after_a_routed_request_is_reported_as_unrouted(
    backends: list[Backend],
) -> None:
    """The per-request metrics: a request whose head is refused (400) was
    routed nowhere, so it is reported with the relays' UNROUTED tag (not a
    decision's: None is a destination no rule names) and no duration; it
    used to be reported with the previous request's decision (its service
    and version) and the time since that request began."""
    reports: list[tuple[object, int, float]] = []
    proxy = Proxy(lambda head, origin: Decision((backends[0].endpoint,), tag="v1"))
    proxy.relay.report = lambda tag, status, seconds, _flags: reports.append((tag, status, seconds))
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /1 HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"v=v1 /1 0"
            time.sleep(0.3)
            c.sendall(
                b"GET /2 HTTP/1.1\r\nHost: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )
            c.settimeout(5)
            data = b""
            while chunk := c.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 400 "), data
        assert [(tag, status) for tag, status, _ in reports] == [("v1", 200), (UNROUTED, 400)]
        assert reports[1][2] == 0.0
    finally:
        proxy.close()


def test_an_exchange_idle_for_idle_timeout_is_closed(one_shot_server: OneShotServer) -> None:
    """An upstream that accepts a request and never answers: after
    idle_timeout with no byte either way the client connection and the
    upstream connection are closed, as the L4 pump closes an idle relay.
    The relay timed out only connections between requests, so a hung
    upstream held both fds for good."""
    hung: list[socket.socket] = []

    def serve(c: socket.socket) -> None:
        hung.append(c)  # read nothing, answer nothing, keep it open

    endpoint = one_shot_server(serve)
    relay_class = load_twin("relay", _TWIN["which"]).HttpRelay
    relay = relay_class(
        lambda head, origin: Decision((endpoint,)), lambda *a: None, idle_timeout=1.0
    )
    relay.start()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with socket.create_connection(listener.getsockname()[:2], timeout=5) as c:
            conn, _ = listener.accept()
            relay.add(conn, ("198.19.0.10", 8080))
            t0 = time.monotonic()
            c.sendall(b"GET /hang HTTP/1.1\r\nHost: b\r\n\r\n")
            assert c.recv(65536) == b""  # closed, not left waiting for the 5 s timeout
            assert 0.9 <= time.monotonic() - t0 < 3
        assert hung and hung[0].recv(65536).startswith(b"GET /hang ")
        hung[0].settimeout(5)
        assert hung[0].recv(65536) == b""  # the upstream side was closed too
        assert relay.stats()["active"] == 0
    finally:
        for s in hung:
            s.close()
        listener.close()
        relay.close()


def test_close_lets_go_of_every_fd_whether_started_or_not(twin: str) -> None:
    """close() closes every fd the relay opened, its thread run or not. A
    relay closed without a start (a worker's, closed before it started)
    kept the pure twin's epoll and wake-up socketpair open (the compiled
    twin's slow path is a pure relay: its own the same), and a compiled
    relay that had listened kept its reserve fd (/dev/null), each until
    the cyclic GC freed the relay, whenever that came."""
    relay_class = load_twin("relay", twin).HttpRelay
    relays = []  # (held: only close() may close their fds here)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for start in (False, True):
            before = snapshot()
            relays.append(relay := relay_class(lambda head, origin: None, lambda *a: None))
            if twin == "compiled":
                relay.listen(listener.fileno(), 0)
            if start:
                relay.start()
            relay.close()
            after = snapshot()
            assert {fd: t for fd, t in after.items() if before.get(fd) != t} == {}, start


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_the_compiled_loop_accepts_on_a_gateway_listener(
    backends: list[Backend], twin: str
) -> None:
    """listen(): accept in the loop (no Python per connection); accepts()
    counts them; unlisten() lets go of the fd, after which the kernel
    queues connections nobody takes."""
    from l4proxy.dataplane.verdict import Choice, Verdict

    counted: list[tuple[int, int]] = []
    relay_class = load_twin("relay", "compiled").HttpRelay
    relay = relay_class(
        lambda h, o: Decision(),
        lambda *a: None,
        resolve=lambda h, o: Verdict((Choice(1, (backends[0].endpoint,)),)),
        accepts=lambda index, n: counted.append((index, n)),
    )
    lst = socket.create_server(("127.0.0.1", 0))
    lst.setblocking(False)
    relay.listen(lst.fileno(), 3, True, ("gateway", 8080))
    relay.start()
    try:
        for i in range(20):  # Connection: close clients: one connection each
            with socket.create_connection(lst.getsockname()[:2], timeout=5) as c:
                c.sendall(f"GET /g{i} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
                assert read_response(c) == f"v=v1 /g{i} 0".encode()
        relay.flush_reports(1.0)
        assert sum(n for index, n in counted if index == 3) == 20
        assert relay.stats()["connections"] == 20
        assert relay.last_accept() > 0
        relay.unlisten(3)
        late = socket.create_connection(lst.getsockname()[:2], timeout=5)
        late.sendall(b"GET /late HTTP/1.1\r\nHost: b\r\n\r\n")
        late.settimeout(0.5)
        with pytest.raises(TimeoutError):
            late.recv(1)  # in the backlog: nobody accepts it any more
        late.close()
        assert relay.stats()["connections"] == 20
    finally:
        relay.close()
        lst.close()


def _wait_active(relay: Any, want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while relay.active() != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return int(relay.active())


def test_a_client_that_asked_to_close_is_closed_without_a_lingering_read(
    backends: list[Backend],
) -> None:
    """RFC 9112 9.6: a client that sent Connection: close sends nothing after
    its request, so once the answer is out the relay closes at once (no
    half-close and lingering read, which held the fd until the client's FIN
    or 2 s). A client that asked to keep the connection and got a close
    answer keeps it (the close was the server's), until its FIN."""
    server_closes = socket.create_server(("127.0.0.1", 0))

    def serve(c: socket.socket) -> None:
        d = b""
        while b"\r\n\r\n" not in d:
            d += c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        c.close()

    accept_until_closed(server_closes, serve)
    closing = ("127.0.0.1", server_closes.getsockname()[1])
    proxy = Proxy(
        lambda head, origin: Decision(
            (closing if head.path == "/closes" else backends[0].endpoint,)
        )
    )
    try:
        with proxy.connect() as c:  # stays open on our side throughout
            c.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_response(c) == b"v=v1 /a 0"
            assert c.recv(1) == b""  # the relay's FIN
            assert _wait_active(proxy.relay, 0, 1.0) == 0  # not after LINGER (2 s)
        with proxy.connect() as c:
            c.sendall(b"GET /closes HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(c) == b"ok"
            c.sendall(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(c) == b"v=v1 /b 0"
            assert proxy.relay.active() == 1
            c.shutdown(socket.SHUT_WR)
            assert _wait_active(proxy.relay, 0, 1.5) == 0
        assert proxy.relay.stats()["errors"] == 0
    finally:
        proxy.close()
        server_closes.close()


def test_the_loop_reads_an_accepted_connection_before_epoll_knows_it(
    backends: list[Backend], twin: str
) -> None:
    """listen(): a new connection is read at once (the request is usually
    there); one whose request comes later is watched instead. Both kinds are
    answered, keep their connection across requests, and a Connection: close
    request ends with the relay's close, not a lingering read."""
    from l4proxy.dataplane.verdict import Choice, Verdict

    relay = load_twin("relay", "compiled").HttpRelay(
        lambda h, o: Decision(),
        lambda *a: None,
        resolve=lambda h, o: Verdict((Choice(1, (backends[0].endpoint,)),)),
    )
    lst = socket.create_server(("127.0.0.1", 0))
    lst.setblocking(False)
    relay.listen(lst.fileno(), 0, True, ("gateway", 8080))
    relay.start()
    try:
        for delay in (0.0, 0.2):
            with socket.create_connection(lst.getsockname()[:2], timeout=5) as c:
                assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # ours
                time.sleep(delay)  # 0.2: accepted, read (nothing yet), then watched
                for i in range(3):
                    c.sendall(f"GET /k{i} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                    assert read_response(c) == f"v=v1 /k{i} 0".encode()
                c.sendall(b"GET /end HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                assert read_response(c) == b"v=v1 /end 0"
                assert c.recv(1) == b""
                assert _wait_active(relay, 0, 1.0) == 0
        assert lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # inherited
        stats = relay.stats()
        assert stats["connections"] == 2 and stats["errors"] == 0, stats
    finally:
        relay.close()
        lst.close()


def test_origins_and_endpoints_nothing_uses_are_forgotten(
    backends: list[Backend], twin: str
) -> None:
    """Every original destination is an origin of the loop, and every
    endpoint of a verdict one of its EPs (PassthroughCluster: one per address
    an app calls). Both tables are swept when they double: what nothing uses
    goes, a pooled connection's endpoint stays (and is reused)."""
    from l4proxy.dataplane.verdict import Choice, Verdict

    live = backends[0].endpoint
    cleanup = contextlib.ExitStack()
    dead = cleanup.enter_context(dead_ports(300))

    def resolve(head: RequestHead, origin: Any) -> Verdict:
        i = int(head.path.strip("/"))
        return Verdict((Choice(1, (live if i < 0 else ("127.0.0.1", dead[i]),)),))

    relay = load_twin("relay", "compiled").HttpRelay(
        lambda h, o: Decision(), lambda *a: None, resolve=resolve, intern_limit=64
    )
    relay.start()
    listener = socket.create_server(("127.0.0.1", 0))

    def ask(i: int, origin: tuple[str, int]) -> bytes:
        c = socket.create_connection(listener.getsockname()[:2], timeout=5)
        s, _ = listener.accept()
        relay.add(s, origin)
        with c:
            c.sendall(f"GET /{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        return data

    try:
        assert ask(-1, ("198.18.0.1", 80)).endswith(b"v=v1 /-1 0")  # pooled from here
        for i in range(300):
            assert ask(i, (f"198.18.1.{i % 250}", 80 + i // 250)).startswith(b"HTTP/1.1 50")
        assert _wait_active(relay, 0, 2.0) == 0
        sizes = relay.table_sizes()
        assert sizes["sweeps"] >= 2, sizes
        assert sizes["origins"] <= 2 * 64 and sizes["endpoints"] <= 2 * 64, sizes
        assert relay.pool_snapshot()[live] == (0, 1)  # kept: it holds a connection
        reused = relay.stats()["pool_reused"]
        assert ask(-1, ("198.18.0.1", 80)).endswith(b"v=v1 /-1 0")
        assert relay.stats()["pool_reused"] == reused + 1
    finally:
        relay.close()
        listener.close()
        cleanup.close()


def _wait_ended(ended: list[threading.Event]) -> None:
    """Until the test's server threads closed their sockets (a later test
    counts fds)."""
    for done in ended:
        assert done.wait(5)


def test_a_long_response_body_is_spliced_and_the_connection_goes_on(
    twin: str, one_shot_server: OneShotServer
) -> None:
    """A Content-Length body of SPLICE_MIN (128 KiB) or more goes upstream ->
    pipe -> client in the compiled twin (the pure one copies): the same
    bytes, the connection and its pooled upstream go on, the pipe is closed
    at the body's end, and a body the server cuts short reaches the client
    up to the cut, then EOF."""
    big = random.Random(11).randbytes(4 << 20)
    ended: list[threading.Event] = []

    def serve(c: socket.socket) -> None:
        ended.append(done := threading.Event())
        with c, contextlib.suppress(OSError, AssertionError):  # (EOF: the relay closed)
            while True:
                path = _read_head(c).split(b" ")[1]
                if path == b"/big":
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big)
                elif path == b"/cut":  # promises 4 MiB, sends 1, closes
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big))
                    c.sendall(big[: 1 << 20])
                    break
                else:
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        done.set()  # (after the with: the socket is closed)

    endpoint = one_shot_server(serve)
    proxy = Proxy(lambda head, origin: Decision((endpoint,)))
    try:
        with proxy.connect() as c:
            c.sendall(b"GET /small HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"ok"
            fds = len(os.listdir("/proc/self/fd"))
            c.sendall(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == big
            c.sendall(b"GET /small HTTP/1.1\r\nHost: b\r\n\r\n")
            assert read_response(c) == b"ok"
            assert len(os.listdir("/proc/self/fd")) == fds  # no pipe left behind
        with proxy.connect() as c:
            c.sendall(b"GET /cut HTTP/1.1\r\nHost: b\r\n\r\n")
            c.settimeout(10)
            data = bytearray()
            while chunk := c.recv(1 << 20):
                data += chunk
            assert data.partition(b"\r\n\r\n")[2] == big[: 1 << 20]
        stats = proxy.relay.stats()
        # one upstream connection for all; the cut one is counted too (as
        # the 200 its client got)
        assert stats["requests"] == 4 and stats["pool_opened"] == 1, stats
        assert stats.get("spliced", 0) == (2 if twin == "compiled" else 0)
    finally:
        proxy.close()
        _wait_ended(ended)


def test_a_long_request_body_is_spliced_and_an_early_answer_closes(
    twin: str, one_shot_server: OneShotServer
) -> None:
    """An upload of SPLICE_MIN or more goes client -> pipe -> upstream in the
    compiled twin: the server gets every byte, the connection goes on. A
    server that answers before the body's end (413) gets its connection
    closed, never pooled with a body half sent, and the client its answer."""
    body = random.Random(12).randbytes(4 << 20)
    ended: list[threading.Event] = []

    def serve(c: socket.socket) -> None:
        ended.append(done := threading.Event())
        with c, contextlib.suppress(OSError, AssertionError):  # (EOF: the relay closed)
            while True:
                head = _read_head(c)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if b"/early" in head:
                    c.sendall(b"HTTP/1.1 413 Too Large\r\ncontent-length: 3\r\n\r\nbig")
                    time.sleep(0.5)
                    break
                got = bytearray()
                while len(got) < length:
                    chunk = c.recv(1 << 20)
                    assert chunk
                    got += chunk
                answer = b"%d %s" % (len(got), hashlib.sha256(got).hexdigest().encode())
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer) + answer)
        done.set()

    endpoint = one_shot_server(serve)
    proxy = Proxy(lambda head, origin: Decision((endpoint,)))
    want = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
    try:
        with proxy.connect() as c:
            for i in range(3):
                if i == 1:
                    fds = len(os.listdir("/proc/self/fd"))
                c.sendall(b"POST /up HTTP/1.1\r\nHost: b\r\ncontent-length: %d\r\n\r\n" % len(body))
                c.sendall(body)
                assert read_response(c) == want
            assert len(os.listdir("/proc/self/fd")) == fds  # no pipe left behind
        spliced = proxy.relay.stats().get("spliced", 0)
        assert spliced == (3 if twin == "compiled" else 0)
        with proxy.connect() as c:  # (spliced or not: the answer may come first)
            c.sendall(b"POST /early HTTP/1.1\r\nHost: b\r\ncontent-length: %d\r\n\r\n" % len(body))
            with contextlib.suppress(OSError):  # the relay may stop reading us
                c.sendall(body[: 1 << 20])
            c.settimeout(10)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := c.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 413") and data.endswith(b"big"), data[:200]
        assert _wait_active(proxy.relay, 0, 3.0) == 0
        stats = proxy.relay.stats()
        assert stats["pool_opened"] == 1 and stats["errors"] == 0, stats  # reused once
    finally:
        proxy.close()
        _wait_ended(ended)


# -- found by review: a freed connection, a half-closed client, a spliced body --------------


def _relay_to(upstream: tuple[str, int]) -> Any:
    """A started relay of the twin under test that sends every request to *upstream*."""
    relay_class = load_twin("relay", _TWIN["which"]).HttpRelay
    relay = relay_class(lambda head, origin: Decision((upstream,)), lambda *a: None)
    relay.start()
    return relay


def _serve_once(answer: Callable[[socket.socket], None]) -> tuple[str, int]:
    """A server for one connection: *answer(sock)* once a head has arrived."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        s, _ = srv.accept()
        srv.close()
        with s:
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            answer(s)
            s.settimeout(5)
            with contextlib.suppress(OSError):
                while s.recv(65536):
                    pass

    threading.Thread(target=run, daemon=True).start()
    host, port = srv.getsockname()[:2]
    return str(host), int(port)


_FREED_WHILE_ASKING = r"""
import socket, sys, threading, time
from l4proxy.dataplane._ext.relay import HttpRelay, Decision

srv = socket.create_server(("127.0.0.1", 0))
read_head = threading.Event()
def upstream():
    s, _ = srv.accept()
    s.recv(65536)
    read_head.set()
    time.sleep(0.15)  # the client is gone by then: part 1 gets a reset
    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b"a" * 100)
    time.sleep(0.15)
    s.sendall(b"b" * 100)  # complete: /2 asks Python, then the flush fails
    time.sleep(0.5)
threading.Thread(target=upstream, daemon=True).start()
asked = []
def decide(head, origin):
    asked.append(head.target)
    return Decision(endpoints=(srv.getsockname(),))
relay = HttpRelay(decide, lambda *a: None)
relay.start()
lst = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(lst.getsockname())
acc, _ = lst.accept()
cli.sendall(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
relay.add(acc, "o")
assert read_head.wait(5)
cli.close()
time.sleep(0.6)
print(asked, relay.active())
relay.close()
"""


@pytest.mark.parametrize("twin", ["compiled"], indirect=True)
def test_a_connection_closed_while_it_waits_for_python_is_not_read_after_it_is_freed(
    twin: str,
) -> None:
    """Pipelined /1 and /2, then the client leaves: /1's answer completes,
    /2 asks Python, and the flush of /1's rest to the gone client closes the
    connection, which stayed on the list of questions: the loop freed it,
    then _service read it (a segfault with malloc perturbed to show it; a
    hang if the memory was reused for a new connection). Run in a child with
    freed memory poisoned, so that a read after free cannot pass unseen."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.tcache_count=0", MALLOC_PERTURB_="165")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", _FREED_WHILE_ASKING],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split("\n")[0] == "['/1'] 0"  # /2 never asked: its client is gone


def _small_buffers_to(body: bytes) -> tuple[Any, socket.socket, socket.socket]:
    """A relay to a server that answers *body*, and a client connection with
    8 KiB buffers at both ends: (relay, client, the relay's end, not added)."""

    def answer(s: socket.socket) -> None:
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    relay = _relay_to(_serve_once(answer))
    with socket.create_server(("127.0.0.1", 0)) as lst:
        cli = socket.socket()
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        cli.connect(lst.getsockname())
        acc, _ = lst.accept()
    acc.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return relay, cli, acc


def test_a_half_closed_client_gets_its_whole_answer() -> None:
    """`Connection: close`, then shutdown(SHUT_WR), then slow reading (small
    buffers on both ends): the answer completes while the relay still holds
    part of it, and the client's FIN read while closing closed the connection
    with that part unsent (a short body behind a clean FIN)."""
    body = random.Random(5).randbytes(100_000)

    relay, cli, acc = _small_buffers_to(body)
    try:
        with cli:
            cli.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            cli.shutdown(socket.SHUT_WR)
            relay.add(acc, ("198.19.0.10", 8080))
            time.sleep(0.3)  # the relay fills both buffers and holds the rest
            cli.settimeout(10)
            got = b""
            while chunk := cli.recv(65536):
                got += chunk
        assert got.endswith(b"\r\n\r\n" + body), len(got)
    finally:
        relay.close()


def test_bytes_after_a_spliced_body_do_not_answer_the_next_request() -> None:
    """A body long enough to be spliced (400 kB), then, in the same write,
    bytes the server should not have sent (here a whole response). The loop
    pooled the connection when the body's count was reached, and the
    client's pipelined next request went out on it and got those bytes as
    its answer (another client's, when it was someone else's request). As
    when a copied body ends in the read that holds more: not reused; the
    pipelined request goes on a new connection (refused here: a 503)."""
    body = random.Random(6).randbytes(400_000)
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!"

    def answer(s: socket.socket) -> None:
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + stray)

    relay = _relay_to(_serve_once(answer))
    try:
        with socket.create_server(("127.0.0.1", 0)) as lst:
            cli = socket.create_connection(lst.getsockname())
            acc, _ = lst.accept()
        relay.add(acc, ("198.19.0.10", 8080))
        with cli:
            cli.sendall(
                b"GET /big HTTP/1.1\r\nHost: a\r\n\r\nGET /small HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            cli.settimeout(10)
            whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            got = b""
            while len(got) < len(whole) or b"\r\n\r\n" not in got[len(whole) :]:
                chunk = cli.recv(1 << 20)
                assert chunk, got[-200:]
                got += chunk
        assert got.startswith(whole), got[:200]
        assert got[len(whole) :].startswith(b"HTTP/1.1 503 "), got[len(whole) :]
    finally:
        relay.close()


def test_a_slow_reader_gets_the_whole_answer_before_the_close() -> None:
    """`Connection: close` to a client that slows to 25 kB/s: the answer
    completes while most of a read (64 KiB) is still held for it, and the
    2 s linger ran from there, not from the answer's last byte sent: the tail
    was cut (a mobile client at a gateway, on both twins). The body is two
    reads long and copied, not spliced (under SPLICE_MIN)."""
    body = random.Random(7).randbytes(128_000)

    relay, cli, acc = _small_buffers_to(body)
    try:
        relay.add(acc, ("198.19.0.10", 8080))
        with cli:
            cli.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            cli.settimeout(10)
            got = b""
            while chunk := cli.recv(512):
                got += chunk
                if len(got) > 60_000:  # the first read is through: slow down (2.7 s
                    time.sleep(0.02)  # for the rest, past the 2 s linger)
        assert got.endswith(b"\r\n\r\n" + body), len(got)
    finally:
        relay.close()
