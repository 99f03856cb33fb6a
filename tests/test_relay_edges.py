"""Per-request relay edge cases found by a review, both twins, real sockets.

The pure relay is also the compiled relay's slow path (requests the C loop
hands over), so its failures reach compiled deployments too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Choice, Verdict
from tests.conftest import accept_until_closed, load_twin

TWINS = ("pure", "compiled")
ORIGIN = ("198.19.0.10", 8080)


class Backend:
    """One thread per accepted connection, running *handler(conn)*."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        self.handler = handler
        accept_until_closed(
            self.listener,
            lambda conn: threading.Thread(target=self._serve, args=(conn,), daemon=True).start(),
        )

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def _read_head(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            return b""
        buf += data
    return buf


def _relay(which: str, decide: Callable[[Any, Any], Decision], **kw: Any) -> Any:
    """Either twin, asking *decide* per request (the compiled one without
    ``resolve``: no verdict cache)."""
    relay = load_twin("relay", which).HttpRelay(decide, lambda *a: None, **kw)
    relay.start()
    return relay


@pytest.fixture(params=TWINS)
def which(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def _client(relay: Any) -> socket.socket:
    ours, theirs = socket.socketpair()
    relay.add(theirs, ORIGIN)
    return ours


def _read_all(s: socket.socket, timeout: float) -> tuple[bytes, str]:
    s.settimeout(timeout)
    got = b""
    try:
        while data := s.recv(1 << 20):
            got += data
    except TimeoutError:
        return got, "timeout"
    except OSError as exc:
        return got, type(exc).__name__
    return got, "EOF"


def test_thousands_of_pipelined_requests_answered_locally(which: str) -> None:
    """Each local answer (404, 503) went on to the next pipelined head by
    recursion: 2,000 in one segment passed Python's recursion limit in the
    pure twin, and the connection was reset with every answer lost (behind a
    slow-path head, the compiled relay's own pure relay did the same)."""
    relay = _relay(which, lambda head, origin: Decision(local=(404, "no route")))
    try:
        a = _client(relay)
        a.sendall(b"GET / HTTP/1.1\r\nHost:a\r\n\r\n" * 2000)
        a.shutdown(socket.SHUT_WR)
        got, how = _read_all(a, 10)
        assert got.count(b"HTTP/1.1 404") == 2000 and how == "EOF", (got[-80:], how)
        assert relay.stats()["errors"] == 0
    finally:
        relay.close()


def test_pipelined_requests_answered_from_the_verdict_cache_on_a_small_stack() -> None:
    """Compiled twin: each request answered locally went on to the next
    pipelined head by a call one level deeper (local_answer -> next_request
    -> head_step -> on_head, with its 2 KiB key, -> apply_verdict ->
    local_answer): thousands of heads in one read, all answered from the
    verdict cache, took thousands of frames, and only the C compiler's tail
    calls (-O2) kept the stack flat; built without them, the loop's thread
    overflowed its stack. head_step() now loops over the heads. Here on a
    256 KiB stack, 2,520 heads in one read."""
    heads = b"GET / HTTP/1.1\r\nHost:a\r\n\r\n" * 2520  # 65,520 bytes: one read
    relay_class = load_twin("relay", "compiled").HttpRelay
    relay = relay_class(
        lambda h, o: Decision(local=(404, "no route")),
        lambda *a: None,
        resolve=lambda h, o: Verdict(local=(404, "no route"), ttl=60.0, shape=0),
    )
    was = threading.stack_size(256 << 10)
    try:
        relay.start()
    finally:
        threading.stack_size(was)
    try:
        a = _client(relay)
        a.sendall(heads)
        a.shutdown(socket.SHUT_WR)
        got, how = _read_all(a, 10)
        assert got.count(b"HTTP/1.1 404") == 2520 and how == "EOF", (len(got), how)
        stats = relay.stats()
        # (the second head is read before the first's verdict is cached)
        assert stats["verdict_cache_hits"] >= 2518 and stats["errors"] == 0, stats
    finally:
        relay.close()


def test_the_rest_of_a_pipelined_segment_has_the_header_timeout(which: str) -> None:
    """A head begun in the segment of the request before it: the pure twin
    timed it only from the next read, so it waited for the idle timeout."""

    def answer(conn: socket.socket) -> None:
        while _read_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = Backend(answer)
    relay = _relay(
        which, lambda h, o: Decision((backend.endpoint,)), header_timeout=0.5, idle_timeout=30.0
    )
    try:
        a = _client(relay)
        started = time.monotonic()
        a.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHo")
        got, how = _read_all(a, 10)
        assert got.endswith(b"request header timeout") and how == "EOF", (got[-60:], how)
        assert time.monotonic() - started < 5
    finally:
        relay.close()
        backend.close()


def test_a_close_delimited_answer_while_the_body_still_arrives_lingers(which: str) -> None:
    """The server answered without a length and closed while the client was
    still uploading: the pure twin closed at once, with unread bytes, so the
    client got a reset instead of the answer."""

    def answer_early(conn: socket.socket) -> None:
        _read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited answer")

    backend = Backend(answer_early)
    relay = _relay(which, lambda h, o: Decision((backend.endpoint,)))
    try:
        a = _client(relay)
        a.sendall(
            b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"b" * 1000
        )
        time.sleep(0.3)  # the answer is in, and the server's close seen
        for _ in range(20):  # the client goes on with its body
            a.sendall(b"b" * 1000)
            time.sleep(0.01)
        got, how = _read_all(a, 5)
        assert got.endswith(b"close-delimited answer") and how == "EOF", (got[-40:], how)
    finally:
        relay.close()
        backend.close()


def test_a_big_answer_to_a_closing_client_counts_no_error(which: str) -> None:
    """The last bytes of a Connection: close answer went out from an EPOLLOUT
    event that closed the connection; the pure twin then registered the closed
    fd number with epoll again (an error each time, and with that number
    reused by another thread's socket, a relay thread spinning for ever)."""
    body = b"x" * 200_000

    def answer(conn: socket.socket) -> None:
        while _read_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    backend = Backend(answer)
    relay = _relay(which, lambda h, o: Decision((backend.endpoint,)))
    try:
        for _ in range(3):
            # TCP with small buffers: the answer's end goes out on EPOLLOUT
            listener = socket.create_server(("127.0.0.1", 0))
            a = socket.socket()
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            a.connect(listener.getsockname())
            theirs, _ = listener.accept()
            listener.close()
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            relay.add(theirs, ORIGIN)
            a.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            time.sleep(0.2)  # the relay fills the client's window and waits
            got, how = _read_all(a, 5)
            assert got.endswith(body) and how == "EOF"
            a.close()
        time.sleep(0.2)
        assert relay.stats()["errors"] == 0
    finally:
        relay.close()
        backend.close()


def test_a_failing_hand_off_does_not_take_the_rest_of_its_batch() -> None:
    """Pure twin (the compiled relay's slow path): connections handed over
    together are set up in one batch; the first, already reset by its client,
    raised while its answer was sent, and every connection after it in the
    batch was dropped unanswered."""

    def answer(conn: socket.socket) -> None:
        while _read_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def tcp_pair() -> tuple[socket.socket, socket.socket]:
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()
        return ours, theirs

    backend = Backend(answer)
    relay = _relay("pure", lambda h, o: Decision((backend.endpoint,)))
    try:
        (c1, s1), (c2, s2) = tcp_pair(), tcp_pair()
        c1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c1.close()  # reset before the relay answers its bad head
        time.sleep(0.1)
        with relay._lock:  # two hand-offs taken in one batch
            s1_head = b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n"
            relay._queue.append((s1, ORIGIN, s1_head, 1, None))
            relay._queue.append((s2, ORIGIN, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n", 0, None))
        del s1, s2
        relay._wake()
        c2.settimeout(5)
        assert c2.recv(65536).startswith(b"HTTP/1.1 200 OK")
    finally:
        relay.close()
        backend.close()


def test_an_idle_connection_the_server_closed_is_not_handed_out_in_the_same_batch(
    which: str,
) -> None:
    """The server closed an idle pooled connection, and a request came in
    the same epoll batch, ahead of the close's event: the request took the
    dead connection (eviction waited for the connection's own event, later
    in the batch). A POST is not retried, so the client got an error for a
    server that was up. The batch's idle evictions now come first.

    How the batch is made: the relay thread is held inside ``decide`` for
    another connection while the client sends its POST and then the server
    closes; both events are ready when the thread next waits."""
    closes: list[threading.Event] = []

    def answer(conn: socket.socket) -> None:
        close = threading.Event()
        closes.append(close)
        head = _read_head(conn)
        if not head:
            return
        body = b"#%d" % len(closes)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        close.wait(10)  # then the connection closes: the pooled one dies

    backend = Backend(answer)
    hold, holding = threading.Event(), threading.Event()

    def decide(head: Any, origin: Any) -> Decision:
        if head.host == "hold":
            holding.set()
            hold.wait(10)
            return Decision(local=(404, "held"))
        return Decision((backend.endpoint,))

    def resolve(head: Any, origin: Any) -> Verdict:
        # the compiled twin's fast path: one verdict per origin and Host,
        # applied in the C loop, the POST's checkout included
        if head.host == "hold":
            holding.set()
            hold.wait(10)
            return Verdict(local=(404, "held"), shape=0)
        return Verdict((Choice(1, (backend.endpoint,)),), ttl=60, shape=0)

    relay = _relay(which, decide, **({"resolve": resolve} if which == "compiled" else {}))
    try:
        a = _client(relay)
        a.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        a.settimeout(5)
        assert a.recv(4096).endswith(b"#1")  # its upstream connection is pooled
        time.sleep(0.1)
        b = _client(relay)
        b.sendall(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
        assert holding.wait(5)
        a.sendall(b"POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        time.sleep(0.1)
        closes[0].set()  # the pooled connection's FIN arrives after the POST
        time.sleep(0.2)
        hold.set()
        got = a.recv(4096)
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"#2"), got
        b.close()
    finally:
        hold.set()
        for close in closes:
            close.set()
        relay.close()
        backend.close()


# -- a half-closing client ---------------------------------------------------------------

EPOLLIN = 0x1
EPOLLOUT = 0x4


class RelayFd(NamedTuple):
    """A socket the relay owns (the file at *fd* while *inode* is it)."""

    fd: int
    inode: int


def _tcp_client(relay: Any, rcvbuf: int = 0, sndbuf: int = 0) -> tuple[socket.socket, RelayFd]:
    """A TCP client handed to *relay*, and the relay's socket for it;
    *rcvbuf*: the client's receive buffer, *sndbuf*: the relay side's send
    buffer (both small: an answer waits in the relay)."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.socket()
    if rcvbuf:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    ours.connect(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    if sndbuf:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    # both twins keep the number (the compiled one detaches the socket)
    fd = RelayFd(theirs.fileno(), os.fstat(theirs.fileno()).st_ino)
    relay.add(theirs, ORIGIN)
    return ours, fd


_TFD = re.compile(r"^tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)\s.*\sino:([0-9a-f]+)", re.M)


def _watched_with(fd: RelayFd) -> dict[int, int]:
    """What the epoll instance watching *fd* watches: fd -> event mask
    (EPOLLERR and EPOLLHUP are always in it); {}: *fd* is not watched."""
    for name in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{name}") as f:
                entries = [
                    (int(m[1]), int(m[2], 16), int(m[3], 16)) for m in _TFD.finditer(f.read())
                ]
        except OSError:
            continue
        if (fd.fd, fd.inode) in {(t, i) for t, _, i in entries}:
            return {t: mask for t, mask, _ in entries}
    return {}


def _relay_socket(fd: int) -> socket.socket:
    """A duplicate of the relay's socket *fd*, to look at (close it)."""
    return socket.socket(fileno=os.dup(fd))


def _upstream_of(endpoint: tuple[str, int]) -> RelayFd:
    """The relay's connection to *endpoint* (the only socket of this process
    connected to it)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            with _relay_socket(int(name)) as s, contextlib.suppress(OSError):
                if s.family == socket.AF_INET and s.getpeername() == endpoint:
                    found.append(RelayFd(int(name), st.st_ino))
    assert len(found) == 1, f"connections to {endpoint}: {found}"
    return found[0]


def _unread(fd: int) -> int:
    """Bytes waiting in the receive queue of the relay's socket *fd*."""
    with _relay_socket(fd) as s:
        n: int = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        return n


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll *check* (on state the relay's thread changes) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def _holding_decide(
    endpoint: tuple[str, int], decided: list[str]
) -> tuple[Callable[[Any, Any], Decision], threading.Event, threading.Event]:
    """decide() sending every request to *endpoint*, except Host: hold's: it
    holds the relay's thread (set the second event to let it go) once it has
    set the first. The paths decided go to *decided*."""
    hold, holding = threading.Event(), threading.Event()

    def decide(head: Any, origin: Any) -> Decision:
        decided.append(head.path)
        if head.host == "hold":
            holding.set()
            hold.wait(10)
            return Decision(local=(404, "held"))
        return Decision((endpoint,))

    return decide, holding, hold


def test_a_half_close_while_a_closing_answer_waits_does_not_spin_the_loop(which: str) -> None:
    """A client half-closed (SHUT_WR: nc -N, HTTP/1.0 tools) while the rest
    of a closing answer (HTTP/1.0 here) still waited for it, a slow reader:
    the compiled relay read the EOF but kept EPOLLIN on the socket (the lazy
    EPOLLIN of an exchange), and the EOF, level-triggered, woke its loop at
    once, for ever: the thread serving every fast-path connection at 100 %
    CPU until the client read the answer's end, or the idle timeout (300 s).
    Once the EOF is read the socket is watched for EPOLLOUT only; the answer
    still goes out whole, then the close.

    The answer is in the relay's socket whole before the relay reads it (its
    thread held in another request's decide()): one read takes it, the
    exchange is over, and most of it waits for the client."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n" + bytes(range(250)) * 240
    go, released, head_read = threading.Event(), threading.Event(), threading.Event()

    def serve(conn: socket.socket) -> None:
        if _read_head(conn):
            head_read.set()
            go.wait(10)
            conn.sendall(answer)
            if not conn.recv(1):  # an HTTP/1.0 request's connection: closed at its end
                released.set()

    backend = Backend(serve)
    decided: list[str] = []
    decide, holding, hold = _holding_decide(backend.endpoint, decided)
    relay = _relay(which, decide)
    try:
        a, fd = _tcp_client(relay, rcvbuf=4096, sndbuf=4096)
        a.sendall(b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n")
        assert head_read.wait(5)
        up = _upstream_of(backend.endpoint)
        b = _client(relay)
        b.sendall(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
        assert holding.wait(5)
        go.set()
        _wait_for("the answer is in, whole", lambda: _unread(up.fd) == len(answer))
        hold.set()
        assert released.wait(5)  # one read: the exchange is over, the answer in the relay
        both = EPOLLIN | EPOLLOUT
        _wait_for(
            "the answer waits for the client (EPOLLOUT), which may still send (EPOLLIN)",
            lambda: _watched_with(fd).get(fd.fd, 0) & both == both,
        )
        a.shutdown(socket.SHUT_WR)
        _wait_for(
            "the client's EOF is read, and its socket no longer watched for EPOLLIN",
            lambda: not _watched_with(fd).get(fd.fd, EPOLLIN) & EPOLLIN,
        )
        got, how = _read_all(a, 5)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == answer[-60000:], got[:80]
        assert how == "EOF"
        assert relay.stats()["errors"] == 0
        b.close()
    finally:
        hold.set()
        go.set()
        relay.close()
        backend.close()


# -- an answer, then a reset ------------------------------------------------------------

TCP_CLOSE = 7  # tcpi_state


def _tcp_state(fd: int) -> int:
    with _relay_socket(fd) as s:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _read_head_only(s: socket.socket) -> bytes:
    """A request head, leaving the bytes after it unread (MSG_PEEK)."""
    while True:
        data = s.recv(65536, socket.MSG_PEEK)
        if not data:
            return b""
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return s.recv(end + 4)
        time.sleep(0.002)  # the rest of the head (it comes in one segment)


_EARLY = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\n\r\nbig"


def _early_answer_seen(got: bytes) -> None:
    """The server's early answer, whole, with the relay's close: the rest of
    the request body will never be read (its framing is lost)."""
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and rest == b"big", got
    assert b"\r\nconnection: close" in head.lower(), head


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_an_early_answer_then_a_reset_reaches_the_client(which: str, method: str) -> None:
    """A server answered before reading the request body (a 413) and closed;
    with the body unread its kernel reset the connection. The answer is
    still readable on the relay's socket after the reset, but both twins
    tried to send more of the body first, took the failed send for the
    upstream's end with nothing received, and answered 502 "upstream closed
    the connection before a response": the server's answer was lost.

    The relay holds body bytes the server does not take (its buffers are
    full), and its thread is held in decide() (another client's request)
    while the answer and the reset arrive: it finds both at once. The rest of
    the body (bytes that look like requests) goes nowhere: not upstream, not
    read as requests."""
    go, answered, head_read = threading.Event(), threading.Event(), threading.Event()
    heads: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        heads.append(_read_head_only(conn))
        head_read.set()
        go.wait(10)
        conn.sendall(_EARLY)
        conn.close()  # the body unread: a reset
        answered.set()

    backend = Backend(answer)
    backend.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills soon
    decided: list[str] = []
    decide, holding, hold = _holding_decide(backend.endpoint, decided)
    relay = _relay(which, decide)
    try:
        a, _ = _tcp_client(relay)
        a.sendall(
            b"%s /up HTTP/1.1\r\nHost: a\r\nContent-Length: 50000000\r\n\r\n" % method.encode()
        )
        assert head_read.wait(5)
        up = _upstream_of(backend.endpoint)
        a.setblocking(False)
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n" * 1000

        def relay_holds_body_bytes() -> bool:
            with contextlib.suppress(BlockingIOError):
                a.send(smuggled)
            both = EPOLLIN | EPOLLOUT  # (a connecting upstream: EPOLLOUT only)
            return _watched_with(up).get(up.fd, 0) & both == both

        _wait_for("the relay holds body bytes for the server", relay_holds_body_bytes, 10)
        b = _client(relay)
        b.sendall(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
        assert holding.wait(5)
        go.set()
        assert answered.wait(5)
        _wait_for("the reset is in", lambda: _tcp_state(up.fd) == TCP_CLOSE)
        hold.set()
        a.setblocking(True)
        got, how = _read_all(a, 5)
        _early_answer_seen(got)
        assert how == "EOF", how
        assert decided == ["/up", "/"] and len(heads) == 1, (decided, heads)
        b.close()
    finally:
        hold.set()
        go.set()
        relay.close()
        backend.close()


def test_a_put_answered_early_on_a_pooled_connection_is_not_sent_again(which: str) -> None:
    """The same on a pooled connection, with the client's next body bytes
    read first: the failed send, with nothing received, looked like a pooled
    connection the server had closed while idle, and the PUT (idempotent, all
    of it still held) was sent again on a new connection: the server got it
    twice, though it had answered it, and the client got the second answer.
    Once the answer is read, the request is not sent again."""
    go, answered, put_read = threading.Event(), threading.Event(), threading.Event()
    puts: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        while head := _read_head_only(conn):
            if head.startswith(b"GET"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            puts.append(head.split(b"\r\n")[0])
            if len(puts) > 1:  # sent again (the fault): answered at once
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                return
            conn.recv(1, socket.MSG_PEEK)  # body bytes came, and stay unread
            put_read.set()
            go.wait(10)
            conn.sendall(_EARLY)
            conn.close()  # the body unread: a reset
            answered.set()
            return

    backend = Backend(serve)
    decided: list[str] = []
    decide, holding, hold = _holding_decide(backend.endpoint, decided)
    relay = _relay(which, decide)
    try:
        a, fd = _tcp_client(relay)
        a.settimeout(5)
        a.sendall(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert a.recv(4096) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # pooled now
        a.sendall(b"PUT /doc HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n" + b"z" * 5000)
        assert put_read.wait(5)
        up = _upstream_of(backend.endpoint)
        b = _client(relay)
        b.sendall(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
        assert holding.wait(5)
        a.sendall(b"z" * 5000)  # more body: the relay reads it, and sends it, first
        _wait_for("the body bytes are in", lambda: _unread(fd.fd) == 5000)
        go.set()
        assert answered.wait(5)
        _wait_for("the reset is in", lambda: _tcp_state(up.fd) == TCP_CLOSE)
        hold.set()
        got, how = _read_all(a, 5)
        _early_answer_seen(got)
        assert how == "EOF", how
        assert puts == [b"PUT /doc HTTP/1.1"], puts
        b.close()
    finally:
        hold.set()
        go.set()
        relay.close()
        backend.close()


# -- a spliced answer, then the request's end ------------------------------------------------


@pytest.mark.parametrize(
    ("end", "stalled"),
    [("bad chunk", False), ("bad chunk", True), ("half-close", True)],
    ids=["bad-chunk", "bad-chunk-stalled", "half-close-stalled"],
)
def test_a_request_ending_while_its_answer_is_spliced(which: str, end: str, stalled: bool) -> None:
    """A chunked POST answered early (the body unread) with a long
    Content-Length answer, whose rest the compiled twin splices (upstream ->
    pipe -> client); then the request ends badly: a chunk-size line that is
    not one (the exchange fails: no 400, the answer has begun) or the
    client's half-close (a request body cut short). The compiled twin let
    go of the upstream connection but not of the splice: the next event on
    the client's socket (its EPOLLOUT with bytes in the pipe, its close)
    spliced from the upstream connection it no longer had, a NULL
    dereference that took the process down; and the pipe's bytes were lost
    (its FIN went first). Now they go to the client, in order, then the
    close, as the pure twin sends what it has read. *stalled*: the client
    reads nothing meanwhile (the pipe holds bytes; the pure twin reads
    neither side while its own buffer holds them, so it may stop short)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n"
    first, more = head + b"\r\n" + b"a" * 1000, b"b" * 65536
    # as the client gets it: the relay says it closes (the request is not over)
    expected = head + b"connection: close\r\n\r\n" + b"a" * 1000 + more
    received_first, sent, finished = threading.Event(), threading.Event(), threading.Event()

    def answer(conn: socket.socket) -> None:
        _read_head_only(conn)
        conn.sendall(first)
        received_first.wait(5)
        conn.sendall(more)  # in the relay's socket once c.out is empty: spliced
        sent.set()
        finished.wait(5)

    backend = Backend(answer)

    def decide(head: Any, origin: Any) -> Decision:
        if head.host == "b":
            return Decision(local=(404, "no route"))
        return Decision((backend.endpoint,))

    relay = _relay(which, decide)
    try:
        bufsize = 4096 if stalled else 0
        a, _ = _tcp_client(relay, rcvbuf=bufsize, sndbuf=bufsize)
        a.sendall(
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        a.settimeout(5)
        got = b""
        while len(got) < len(expected) - len(more):
            got += a.recv(65536)
        received_first.set()
        assert sent.wait(5)
        up = _upstream_of(backend.endpoint)
        if which == "compiled":
            # every byte is in the relay (the pipe), most still there if stalled
            _wait_for("the answer's rest is spliced", lambda: relay.stats()["spliced"] == 1)
            _wait_for("the relay has read it all", lambda: _unread(up.fd) == 0)
        if not stalled:
            while len(got) < len(expected):
                got += a.recv(65536)
        if end == "bad chunk":
            a.sendall(b"zz\r\n")
        else:
            a.shutdown(socket.SHUT_WR)
        rest, how = _read_all(a, 5)
        got += rest
        assert how == "EOF", how
        if which == "compiled" or not stalled:
            assert got == expected, (len(got), got[-20:])
        else:  # the pure twin: in order, but maybe short
            assert got == expected[: len(got)], (len(got), got[-20:])
        a.close()  # after the relay's FIN (or close): its socket hangs up
        b = _client(relay)
        b.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        b.settimeout(5)
        assert b.recv(4096).startswith(b"HTTP/1.1 404 ")
        assert relay.stats()["errors"] == 0
        b.close()
    finally:
        finished.set()
        relay.close()
        backend.close()


def test_a_pipe_full_of_small_segments_is_no_urgent_mark() -> None:
    """Compiled twin: a spliced answer to a client that reads nothing for a
    while, arriving in many small segments. A pipe counts slots (one per
    segment spliced on its own), not bytes, so it filled with far fewer
    bytes than its size; splice() into it then failed (EAGAIN) while the
    upstream socket was readable, which splice_moves() took for an urgent
    mark: the splice was given up, the pipe's bytes copied into the
    client's buffer and the rest of the body copied too. Now the pipe is
    filled only when empty (as the pump does), and an EAGAIN is a mark only
    when sockatmark() says so."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n"
    first = b"a" * 1000
    small = [b"%04d" % i * 25 for i in range(400)]  # 100 bytes each
    received_first, sent, finished = threading.Event(), threading.Event(), threading.Event()

    def answer(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _read_head(conn)
        conn.sendall(head + first)
        received_first.wait(5)
        for seg in small:  # each in a read of the relay's: a slot each
            conn.sendall(seg)
            time.sleep(0.0005)
        sent.set()
        finished.wait(5)

    backend = Backend(answer)
    relay = _relay("compiled", lambda h, o: Decision((backend.endpoint,)))
    try:
        a, _ = _tcp_client(relay, rcvbuf=4096, sndbuf=4096)
        a.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        a.settimeout(5)
        expected = head + first + b"".join(small)
        got = b""
        while len(got) < len(head + first):
            got += a.recv(65536)
        received_first.set()  # then nothing read until all is sent
        assert sent.wait(5)
        assert relay.stats()["spliced"] == 1
        while len(got) < len(expected):
            got += a.recv(65536)
        assert got == expected
        assert relay.stats()["urgent"] == 0
    finally:
        finished.set()
        relay.close()
        backend.close()


# -- urgent data ---------------------------------------------------------------------------

TCP_CLOSE_WAIT = 8  # tcpi_state


@pytest.mark.parametrize(
    "case",
    [
        "response",
        "spliced response",
        "spliced response, then its close",
        "request",
        "spliced request",
    ],
)
def test_an_urgent_byte_is_relayed_in_its_place(which: str, case: str) -> None:
    """A byte sent with MSG_OOB inside a body (either way): without
    SO_OOBINLINE on the relay's sockets recv() skips the urgent byte, so a
    Content-Length body arrived a byte short and its reader waited for the
    idle timeout (both twins). A spliced body goes back to the copy path at
    the mark (splice() cannot cross it), where the same byte was lost; and a
    mark with the rest and the FIN behind it made splice() return 0, taken
    for the server's close mid-body (the rest lost, the client closed). Now
    the byte arrives in its place, as an ordinary byte, as through the L4
    pump. "then its close": the relay's thread is held (another client's
    decide()) until the rest and the FIN are in."""
    big = "spliced" in case
    part1 = bytes(range(256)) * 800 if big else b"01234"
    part2 = b"z" * 100_000 if big else b"6789"
    body = part1 + b"!" + part2
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    go, part1_in, sent, finished = (threading.Event() for _ in range(4))
    received: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _read_head_only(conn)
        if "request" in case:
            data = b""
            while len(data) < len(body) and (chunk := conn.recv(65536)):
                data += chunk
                if len(data) >= len(part1):
                    part1_in.set()
            received.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            conn.sendall(head + part1)
            go.wait(5)
            conn.send(b"!", socket.MSG_OOB)
            conn.sendall(part2)
            sent.set()
            if "close" in case:
                return
        finished.wait(5)

    backend = Backend(serve)
    decide, holding, hold = _holding_decide(backend.endpoint, [])
    relay = _relay(which, decide)
    try:
        a, _ = _tcp_client(relay)
        a.settimeout(2)
        got = b""
        if "request" in case:
            a.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
            a.sendall(part1)
            assert part1_in.wait(5)
            if which == "compiled":
                assert relay.stats()["spliced"] == int(big)
            a.send(b"!", socket.MSG_OOB)
            a.sendall(part2)
            expected = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        else:
            a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            while len(got) < len(head + part1):
                got += a.recv(1 << 20)
            if which == "compiled":
                assert relay.stats()["spliced"] == int(big)
            if "close" in case:
                up = _upstream_of(backend.endpoint)
                b = _client(relay)
                b.sendall(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
                assert holding.wait(5)
            go.set()
            assert sent.wait(5)
            if "close" in case:
                _wait_for(
                    "the rest and the FIN are in", lambda: _tcp_state(up.fd) == TCP_CLOSE_WAIT
                )
                hold.set()
                b.close()
            expected = head + body
        with contextlib.suppress(TimeoutError):
            while len(got) < len(expected) and (chunk := a.recv(1 << 20)):
                got += chunk
        same = got == expected  # (not compared in the assertion: 300 KB reprs)
        assert same, (len(got), len(expected))
        if "request" in case:
            assert received == [body]
        if which == "compiled":
            assert relay.stats()["urgent"] == int(big)
    finally:
        hold.set()
        finished.set()
        relay.close()
        backend.close()


# -- epoll refusing a connection ---------------------------------------------------------------


def test_a_connection_epoll_refuses_is_given_up_at_once(tmp_path: Any) -> None:
    """Compiled twin: set_mask() ignored epoll_ctl()'s failures and recorded
    the mask as if the fd were watched: a connection epoll refused (ENOSPC
    at max_user_watches, ENOMEM; here EPERM, an fd that cannot be polled)
    was never woken, and held its fd and memory until a timeout, every later
    change of its mask failing too. Now it is aborted at once (an error)."""

    class FileAsSocket:
        """What add() asks of a socket, over a regular file's fd."""

        def __init__(self, fd: int) -> None:
            self.fd = fd

        def setblocking(self, flag: bool) -> None:
            pass

        def detach(self) -> int:
            return self.fd

    path = tmp_path / "not-pollable"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)

    def still_open() -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            return False

    relay = _relay("compiled", lambda h, o: Decision(local=(404, "no")), header_timeout=30.0)
    try:
        relay.add(FileAsSocket(fd), ORIGIN)
        _wait_for("the connection is given up", lambda: not still_open())
        stats = relay.stats()
        assert (stats["connections"], stats["active"], stats["errors"]) == (1, 0, 1), stats
    finally:
        relay.close()
        if still_open():
            os.close(fd)
