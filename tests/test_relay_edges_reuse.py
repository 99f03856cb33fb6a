"""Pooled upstream connections, reuse and retries: both twins, real sockets.

How a batch is made (see tests/test_relay_edges.py): the relay's thread is
held in ``decide`` for another client (Host: hold) while the backend sends;
everything sent meanwhile is in the relay's sockets when it next looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, Verdict
from tests.conftest import dead_ports, load_twin, reset_close
from tests.test_relay_edges import TWINS, Backend, _client, _read_head, _relay

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(params=TWINS)
def which(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def _read_n(s: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """At least *n* bytes (or what came before EOF or *timeout*)."""
    s.settimeout(timeout)
    got = b""
    try:
        while len(got) < n and (data := s.recv(65536)):
            got += data
    except TimeoutError:
        pass
    return got


class Hold:
    """decide() for *endpoints*, holding the relay's thread on Host: hold."""

    def __init__(self, *endpoints: tuple[str, int]) -> None:
        self.endpoints = endpoints
        self.hold, self.holding = threading.Event(), threading.Event()

    def decide(self, head: Any, origin: Any) -> Decision:
        if head.host == "hold":
            self.holding.set()
            self.hold.wait(5)
            return Decision(local=(404, "held"))
        return Decision(self.endpoints)

    def resolve(self, head: Any, origin: Any) -> Verdict:
        """The compiled twin's fast path: a verdict per origin and Host,
        cached and applied in the C loop (a checkout in the loop's step)."""
        if head.host == "hold":
            self.holding.set()
            self.hold.wait(5)
            return Verdict(local=(404, "held"), shape=0)
        return Verdict((Choice(1, self.endpoints, "ORDERED"),), ttl=60, shape=0)

    def relay(self, which: str) -> Any:
        return _relay(
            which, self.decide, **({"resolve": self.resolve} if which == "compiled" else {})
        )

    def held(self, relay: Any) -> socket.socket:
        """Hold the relay's thread (until release()); the holding client."""
        b = _client(relay)
        b.sendall(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
        assert self.holding.wait(5)
        return b

    def release(self) -> None:
        self.hold.set()


# A GET and a pipelined POST; the GET's connection ends with its answer, so
# the POST must go on a new one (a 502 if it took the half-closed one).
GET_THEN_POST = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
)
POST_ON_A_NEW_CONNECTION = [(0, b"GET /1 HTTP/1.1"), (1, b"POST /2 HTTP/1.1")]


def _first_then_ok(
    first: Callable[[socket.socket], None], seen: list[tuple[int, bytes]]
) -> Callable[[socket.socket], None]:
    """A backend's handler: every request line logged in *seen* as
    (connection, line); the first connection's first request answered by
    *first* (which closes it), every other one OK."""
    conns = iter(range(100))

    def serve(conn: socket.socket) -> None:
        n = next(conns)
        while head := _read_head(conn):
            seen.append((n, head.split(b"\r\n")[0]))
            if n == 0:
                first(conn)
                return
            conn.sendall(OK)

    return serve


def test_a_connection_closed_with_its_last_answer_is_not_handed_out_again(which: str) -> None:
    """The server answered and closed in one send (no Connection: close): the
    FIN came in the same read as the answer. The answer completed, the
    connection went back to the pool, and the client's pipelined POST took
    it in the same step: sent onto a half-closed socket, it got a 502 (a
    GET is retried, a POST is not). The event that read the answer says
    EPOLLRDHUP: such a connection is never pooled, and the POST goes on a
    new one (no syscall more per request)."""
    go, got_head, closed = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[int, bytes]] = []  # (connection, request line)

    def first(conn: socket.socket) -> None:
        got_head.set()
        go.wait(5)
        conn.sendall(OK)
        conn.close()  # its FIN right behind the answer
        closed.set()

    backend = Backend(_first_then_ok(first, seen))
    h = Hold(backend.endpoint)
    relay = h.relay(which)
    try:
        a = _client(relay)
        a.sendall(GET_THEN_POST)
        assert got_head.wait(5)
        b = h.held(relay)
        go.set()
        assert closed.wait(5)  # the answer and the FIN wait in the relay's socket
        h.release()
        got = _read_n(a, 2 * len(OK))
        assert got == OK + OK, got
        assert seen == POST_ON_A_NEW_CONNECTION, seen
        b.close()
    finally:
        h.release()
        go.set()
        relay.close()
        backend.close()


def _queued(s: socket.socket) -> int:
    """Bytes waiting in *s*'s receive queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def test_a_spliced_answer_ended_by_a_fin_read_for_the_client_is_not_pooled(which: str) -> None:
    """A long answer goes through the compiled relay's pipe (splice). While
    the pipe holds bytes the client has not taken, the upstream is not
    watched; its last bytes and the server's FIN (no Connection: close)
    came meanwhile, and the client's EPOLLOUT read them when the pipe
    emptied: no upstream event, so no EPOLLRDHUP said the FIN. The answer
    completed, the connection went back to the pool, and the client's
    pipelined POST took it at once: sent onto a half-closed socket, a 502.
    The peek that ends a spliced body takes the FIN (and an error) too: not
    pooled, and the POST goes on a new connection."""
    X, Y = 700_000, 1_000  # the pipe and the client's socket cannot take X
    sent, tail, closed = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[int, bytes]] = []  # (connection, request line)

    def first(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (X + Y))
        conn.sendall(b"a" * X)
        sent.set()
        tail.wait(5)
        conn.sendall(b"b" * Y)
        conn.close()  # its FIN right behind the body's end
        closed.set()

    backend = Backend(_first_then_ok(first, seen))
    h = Hold(backend.endpoint)
    relay = h.relay(which)
    try:
        a = _client(relay)
        a.sendall(GET_THEN_POST)
        assert sent.wait(5)
        # the client's socket fills, then stays full: the relay waits for it
        deadline, last = time.monotonic() + 2, -1
        while (n := _queued(a)) != last or n == 0:
            assert time.monotonic() < deadline, "the client's socket never filled"
            last = n
            time.sleep(0.05)
        tail.set()
        assert closed.wait(5)
        time.sleep(0.05)  # the tail and the FIN wait in the relay's upstream socket
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (X + Y)
        got = _read_n(a, len(head) + X + Y + len(OK))
        assert got.startswith(head), got[:200]
        body, after = got[len(head) : len(head) + X + Y], got[len(head) + X + Y :]
        assert body == b"a" * X + b"b" * Y, len(body)
        assert after == OK, after  # not a 502
        assert seen == POST_ON_A_NEW_CONNECTION, seen
        if which == "compiled":
            assert relay.stats()["spliced"] == 1
    finally:
        tail.set()
        relay.close()
        backend.close()


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize("case", ["a_gone", "a_alive", "b_dead"])
def test_a_retry_goes_to_another_endpoint_and_past_a_failed_connect(which: str, case: str) -> None:
    """A request on a pooled connection to A that the server reset before
    any answer is sent again (a GET): the retry was pinned to A, and when
    its connect failed the client got a 502, though B was healthy. It goes
    to another endpoint when there is one (Istio's default retry policy
    skips the previous hosts), and a retry's failed connect moves on to the
    next candidate, as a first attempt's does (A last).

    a_gone: A stops listening (its pod went away): B answers. a_alive: A
    still answers new connections: B answers all the same. b_dead: B
    refuses connections: A answers, on a new connection."""
    conns = iter(range(100))

    def serve_a(conn: socket.socket) -> None:
        n = next(conns)
        while _read_head(conn):
            if n == 0 and first_done.is_set():
                reset_close(conn)  # the pooled connection: reset, unanswered
                return
            conn.sendall(_answer(b"A"))
            first_done.set()

    def serve_b(conn: socket.socket) -> None:
        while _read_head(conn):
            conn.sendall(_answer(b"B"))

    first_done = threading.Event()
    a_backend = Backend(serve_a)
    b_backend = Backend(serve_b)
    if case == "b_dead":
        b_backend.listener.shutdown(socket.SHUT_RDWR)
    h = Hold(a_backend.endpoint, b_backend.endpoint)
    relay = h.relay(which)
    try:
        c = _client(relay)
        c.sendall(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _read_n(c, len(_answer(b"A"))) == _answer(b"A")  # pooled now
        if case == "a_gone":
            a_backend.listener.shutdown(socket.SHUT_RDWR)
        c.sendall(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        want = _answer(b"A" if case == "b_dead" else b"B")
        assert _read_n(c, len(want)) == want
        assert relay.stats()["requests"] == 2
    finally:
        relay.close()
        a_backend.close()
        b_backend.close()


@pytest.mark.parametrize("body", [b"hi", b"x" * 4_000_000], ids=["unsent", "partly_sent"])
def test_a_post_that_never_left_is_sent_again(which: str, body: bytes) -> None:
    """A POST found a pooled connection the server had reset while the relay
    decided it (no idle event could evict it in between): its first send
    failed (ECONNRESET), the kernel had taken no byte of it, so it never
    left; but only idempotent requests were sent again, and the POST got a
    502. Whatever its method, a request of which no byte was taken is sent
    again, on a new connection. One of which the kernel took bytes is not
    (partly_sent: the server read its head, then reset): 503, Envoy's
    answer to a reset before the response."""
    unsent = body == b"hi"
    go, reset_done, holding = threading.Event(), threading.Event(), threading.Event()
    posts: list[int] = []  # the connection each POST came on
    conns = iter(range(100))

    def serve(conn: socket.socket) -> None:
        n = next(conns)
        while head := _read_head(conn):
            if head.startswith(b"POST"):
                posts.append(n)
                if n == 0:  # partly_sent, on the pooled connection: its head came
                    reset_close(conn)
                    return
                left = len(body) - len(head.partition(b"\r\n\r\n")[2])
                while left > 0 and (data := conn.recv(1 << 20)):
                    left -= len(data)
            conn.sendall(_answer(b"#%d" % n))
            if unsent and n == 0:
                go.wait(5)  # while the relay decides the POST: reset, and gone
                reset_close(conn)
                reset_done.set()
                return

    def decide(head: Any, origin: Any) -> Decision:
        if head.method == "POST" and unsent:
            holding.set()
            go.wait(5)
            assert reset_done.wait(5)
            time.sleep(0.05)  # the RST is in the relay's socket
        return Decision((backend.endpoint,))

    backend = Backend(serve)
    relay = _relay(which, decide)  # (the compiled twin asks decide per request)
    try:
        c = _client(relay)
        c.sendall(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _read_n(c, len(_answer(b"#0"))) == _answer(b"#0")  # pooled now
        post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
        threading.Thread(target=_send_quietly, args=(c, post + body), daemon=True).start()
        if unsent:
            assert holding.wait(5)
            go.set()
            want = _answer(b"#1")  # on a new connection
            assert _read_n(c, len(want)) == want
            assert posts == [1], posts
        else:
            got = _read_n(c, 12)
            assert got.startswith(b"HTTP/1.1 503 "), got
            assert posts == [0], posts  # not sent again: its head had left
    finally:
        go.set()
        relay.close()
        backend.close()


def _send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        s.sendall(data)


class Tracked:
    """A backend answering its name, that holds the answers to /hold until
    release() and says when each of its connections saw the relay's EOF."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.go = threading.Event()
        self.lock = threading.Lock()
        self.open = 0  # connections the relay has not closed
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.open += 1
        try:
            while head := _read_head(conn):
                if b" /hold " in head:
                    self.go.wait(5)
                conn.sendall(_answer(self.name))
        finally:
            with self.lock:
                self.open -= 1

    def wait_open(self, n: int, timeout: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.open != n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        self.go.set()
        self.backend.close()


def test_an_endpoint_the_table_no_longer_names_gives_back_its_connections(which: str) -> None:
    """A reload removed endpoint A: its idle pooled connection stayed open
    until the pool's idle timeout (60 s), and one in flight went back to
    the pool when its request ended, which held A's graceful shutdown. Now
    retain_endpoints() without A closes A's idle connection at once and the
    one in flight at its check-in (pool_closed_removed). B, dropped and named
    again before its request ends (a DNS answer that lost an address for a
    moment), keeps its connection; C, never named (PassthroughCluster's),
    keeps its pool."""
    a, b, c = Tracked(b"A"), Tracked(b"B"), Tracked(b"C")
    by_host = {"a": a, "b": b, "c": c}

    def decide(head: Any, origin: Any) -> Decision:
        return Decision((by_host[head.host].endpoint,))

    relay = _relay(which, decide)
    clients: list[socket.socket] = []

    def request(host: str, path: str = "/") -> socket.socket:
        s = _client(relay)
        clients.append(s)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode()))
        return s

    try:
        relay.retain_endpoints({a.endpoint, b.endpoint})
        held_a, held_b = request("a", "/hold"), request("b", "/hold")
        assert a.wait_open(1) and b.wait_open(1)  # in flight
        for host in ("a", "c"):  # then one idle to A (a second connection), one to C
            assert _read_n(request(host), len(_answer(b"A"))) == _answer(host.upper().encode())
        assert a.wait_open(2) and relay.stats()["pool_idle"] == 2

        relay.retain_endpoints(set())  # A and B leave the table
        assert a.wait_open(1), "A's idle connection is still open"
        assert relay.stats()["pool_idle"] == 1  # C's
        relay.retain_endpoints({b.endpoint})  # B is back before its answer
        # applied once a request to C has been answered: the loop applies a
        # retain after the events of the batch its wake-up came in, and B's
        # answer in that batch was checked in before it (a flake under load)
        assert _read_n(request("c"), len(_answer(b"C"))) == _answer(b"C")
        a.go.set()
        b.go.set()
        assert _read_n(held_a, len(_answer(b"A"))) == _answer(b"A")
        assert _read_n(held_b, len(_answer(b"B"))) == _answer(b"B")
        assert a.wait_open(0), "A's connection in flight was pooled"
        deadline = time.monotonic() + 1
        while relay.stats()["pool_idle"] != 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        st = relay.stats()
        assert (st["pool_idle"], st["pool_closed_removed"]) == (2, 2), st  # B's and C's
        assert b.open == 1 and c.open == 1
    finally:
        for s in clients:
            s.close()
        relay.close()
        for t in (a, b, c):
            t.close()


def test_least_request_counts_a_request_whose_connect_is_still_on_its_way(which: str) -> None:
    """LEAST_REQUEST over A and B, B slow to accept (its accept queue full: the
    SYNs go unanswered). A request counted only once its connect succeeded:
    while B's connect hung, B had 0 requests, every other request at an even
    count went to it, and hung too (half of them). Counted from its
    assignment, as Envoy's LEAST_REQUEST counts, B has 1: the rest go to A."""
    a = Tracked(b"A")
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(0)
    b = slow.getsockname()
    filler = socket.create_connection(b)  # the accept queue's one place
    picks = iter(range(1000))

    def decide(head: Any, origin: Any) -> Decision:
        """The worker's LEAST_REQUEST (RouteTable.decide): round-robin order,
        then a stable sort by requests in flight."""
        order = [a.endpoint, b] if next(picks) % 2 == 0 else [b, a.endpoint]
        return Decision(tuple(sorted(order, key=relay.pools.active)))

    def resolve(head: Any, origin: Any) -> Verdict:  # the compiled loop's own pick()
        return Verdict((Choice(1, (a.endpoint, b), "LEAST_REQUEST"),), ttl=60, shape=0)

    relay = _relay(which, decide, **({"resolve": resolve} if which == "compiled" else {}))
    clients: list[socket.socket] = []
    try:
        answered = 0
        for _ in range(6):
            s = _client(relay)
            clients.append(s)
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            answered += _read_n(s, len(_answer(b"A")), timeout=0.25) == _answer(b"A")
        assert answered == 5, f"{6 - answered} of 6 requests went to the endpoint still connecting"
        assert relay.pools.active(b) == 1 and relay.pools.active(a.endpoint) == 0
    finally:
        for s in clients:
            s.close()
        relay.close()
        a.close()
        filler.close()
        slow.close()


def test_a_request_counted_from_its_assignment_is_counted_down_once(which: str) -> None:
    """Counted from its assignment, a request must leave the count exactly
    once however its connect ends: refused (the next candidate answers),
    timed out (likewise), or the client gone while it connects."""
    a = Tracked(b"A")
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(0)
    b = slow.getsockname()
    filler = socket.create_connection(b)  # the accept queue's one place: SYNs unanswered
    with dead_ports(1) as (dead,):
        d = ("127.0.0.1", dead)
        order = {"refused": (d, a.endpoint), "timeout": (b, a.endpoint), "gone": (b,)}
        relay = _relay(which, lambda head, origin: Decision(order[head.host]), connect_timeout=0.1)
        try:
            for host in ("refused", "timeout"):
                s = _client(relay)
                s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
                assert _read_n(s, len(_answer(b"A"))) == _answer(b"A"), host
                s.close()
                assert [relay.pools.active(e) for e in (a.endpoint, b, d)] == [0, 0, 0], host
            s = _client(relay)
            s.sendall(b"GET / HTTP/1.1\r\nHost: gone\r\n\r\n")
            deadline = time.monotonic() + 1
            while relay.pools.active(b) != 1:
                assert time.monotonic() < deadline, "the request connecting is not counted"
                time.sleep(0.005)
            s.close()
            while relay.pools.active(b) != 0:
                assert time.monotonic() < deadline, relay.pools.active(b)
                time.sleep(0.005)
            time.sleep(0.3)  # its connect deadline and a tick pass: not counted down again
            assert relay.pools.active(b) == 0
        finally:
            relay.close()
            a.close()
            filler.close()
            slow.close()


def test_least_request_orders_by_what_add_external_tells_of_too(which: str) -> None:
    """The worker's connections routed at L4 and the tunnels it took over
    from the relay are not the relay's requests; add_external() tells of
    them, and LEAST_REQUEST (the compiled loop's own pick too) orders by them
    with its own. Told before the loop knew the endpoint (an interned EP
    takes the count then) and after."""
    a, b = Tracked(b"A"), Tracked(b"B")
    picks = iter(range(1000))

    def decide(head: Any, origin: Any) -> Decision:  # the worker's LEAST_REQUEST
        order = [a.endpoint, b.endpoint] if next(picks) % 2 == 0 else [b.endpoint, a.endpoint]
        return Decision(tuple(sorted(order, key=relay.pools.active)))

    def resolve(head: Any, origin: Any) -> Verdict:  # the compiled loop's own pick()
        return Verdict((Choice(1, (a.endpoint, b.endpoint), "LEAST_REQUEST"),), ttl=60, shape=0)

    relay = _relay(which, decide, **({"resolve": resolve} if which == "compiled" else {}))
    s = _client(relay)

    def answers(n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            out.append(_read_n(s, len(_answer(b"A"))))
        return out

    try:
        relay.add_external(a.endpoint, 2)
        assert relay.pools.active(a.endpoint) == 2
        assert answers(4) == [_answer(b"B")] * 4
        relay.add_external(a.endpoint, -2)
        relay.add_external(b.endpoint, 1)
        assert answers(4) == [_answer(b"A")] * 4
        relay.add_external(b.endpoint, -1)
        assert sorted(answers(4)) == [_answer(b"A")] * 2 + [_answer(b"B")] * 2
        assert relay.pools.active(a.endpoint) == relay.pools.active(b.endpoint) == 0
    finally:
        s.close()
        relay.close()
        a.close()
        b.close()


def test_a_tunnel_stays_counted_until_the_l4_callback_has_taken_it(which: str) -> None:
    """A WebSocket's request leaves the relay's count only once the l4
    callback (the worker, which counts the tunnel from there until the pump
    reports its end) has returned, and that callback is told the tunnel's
    endpoint: LEAST_REQUEST never sees the endpoint without it."""

    def upgrade(conn: socket.socket) -> None:
        _read_head(conn)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        conn.recv(1)

    backend = Backend(upgrade)
    seen: list[tuple[Any, int]] = []

    def l4(client: Any, up: Any, to_client: bytes, to_up: bytes, origin: Any, ep: Any) -> None:
        seen.append((ep, relay.pools.active(backend.endpoint)))
        client.close()
        up.close()

    relay = load_twin("relay", which).HttpRelay(
        lambda head, origin: Decision((backend.endpoint,)), l4
    )
    relay.start()
    try:
        s = _client(relay)
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        deadline = time.monotonic() + 5
        while not seen or relay.pools.active(backend.endpoint):
            assert time.monotonic() < deadline, (seen, relay.pools.active(backend.endpoint))
            time.sleep(0.005)
        assert seen == [(backend.endpoint, 1)]
        s.close()
    finally:
        relay.close()
        backend.close()
