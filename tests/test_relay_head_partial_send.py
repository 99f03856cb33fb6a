"""A request head larger than an upstream connection takes at once: the
relay sends what the kernel takes and the rest when the connection drains
(the compiled twin's send_staged(): the head's block becomes the replay's,
the rest copied for flush_up()), and a retry sends the head whole again.

Both twins (and the compiled one from a cached verdict), real sockets. The
head goes on a pooled connection whose send buffer the test has made small,
to a backend with a small receive buffer that reads nothing until told to:
what the two kernels hold of the head is counted (SIOCOUTQ on the relay's
socket, FIONREAD on the backend's) and must stay short of the head, so the
relay's first send was partial; then the backend reads the head, which
must be the client's, byte for byte, with the relay's attempt count.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    _client,
    _proxy,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import accept_until_closed
from tests.test_relay_edges import _read_head, _relay_socket, _upstream_of

SMALL = 4096  # bytes: the backend's receive buffer, the relay's send buffer


def _big(lines: int) -> bytes:
    """A GET whose head has *lines* lines of 1,000 bytes."""
    pad = b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"p" * 1000) for i in range(lines))
    return b"GET /big HTTP/1.1\r\nHost: a\r\n" + pad + b"\r\n"


# ~300 KB: past one 64 KB segment of loopback's GSO and both buffers many
# times over; and one a retry may send again (its copy under the relays'
# 64 KiB replay limit, the attempt count's line with it)
BIG = _big(300)
RETRIED = _big(60)
assert len(RETRIED) + 30 < 65536
SMALL_GET = b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"
CLOSE = b""


def _queued(s: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), request, b"\0" * 4))[0])


def _upstream_form(head: bytes, count: int) -> bytes:
    """*head* as the relay sends it upstream: its attempt count before the
    empty line."""
    return head[:-2] + b"x-envoy-attempt-count: %d\r\n\r\n" % count


class Held:
    """A backend with a small receive buffer: the first request on its first
    connection is answered at once; the next waits for ``go`` and is read
    whole, then answered (``after`` OK), or the connection closed without a
    byte (CLOSE) or answered 503 (UNAVAILABLE), the retry then read and
    answered on the next connection."""

    def __init__(self, head: bytes, after: bytes = OK) -> None:
        self.head = head
        self.after = after
        self.go = threading.Event()
        self.first: socket.socket | None = None
        self.connected = threading.Event()
        self.heads: list[bytes] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        self.accepted = 0
        accept_until_closed(self.listener, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
            n = self.accepted
        threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _read(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            data = conn.recv(n - len(buf))
            if not data:
                break
            buf += data
        return buf

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if n == 1:
                    self.first = conn
                    self.heads.append(_read_head(conn))
                    conn.sendall(OK)
                    self.connected.set()
                    self.go.wait(10)
                    self.heads.append(self._read(conn, len(_upstream_form(self.head, 1))))
                    if self.after == CLOSE:
                        return
                    conn.sendall(self.after)
                else:
                    self.heads.append(self._read(conn, len(_upstream_form(self.head, 1))))
                    conn.sendall(OK)
                conn.recv(1)  # (until the relay closes it)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def _partial_then_whole(
    mode: tuple[str, str], head: bytes, after: bytes = OK, retry: RetryPolicy | None = None
) -> Held:
    """The small request, then *head* on the pooled connection made
    small: asserts the first send fell short of the head; the backend's
    reading let go, the big request's response (200) read. The backend."""
    up = Held(head, after)
    relay = _proxy(mode, (up.endpoint,), retry, max_head=1 << 20)
    try:
        a = _client(relay)
        a.sendall(SMALL_GET)
        assert _status(_response(a)) == 200
        assert up.connected.wait(5)
        fd = _upstream_of(up.endpoint).fd
        with _relay_socket(fd) as ours:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
            sender = threading.Thread(target=a.sendall, args=(head,), daemon=True)
            sender.start()
            # what the two kernels hold of the head, until it stops growing
            assert up.first is not None
            held, same = -1, 0
            deadline = time.monotonic() + 5
            while same < 10 and time.monotonic() < deadline:
                now = _queued(ours, termios.TIOCOUTQ) + _queued(up.first, termios.FIONREAD)
                same = same + 1 if now == held and now > 0 else 0
                held = now
                time.sleep(0.02)
            assert 0 < held < len(_upstream_form(head, 1)), (held, len(head))
        up.go.set()
        sender.join(5)
        assert _status(_response(a, timeout=10)) == 200
        a.close()
    finally:
        up.go.set()
        relay.close()
        up.close()
    return up


def test_a_head_sent_in_parts_arrives_whole(mode: tuple[str, str]) -> None:
    """The kernel takes part of the head; the rest follows as the backend
    reads: the backend gets the client's head with the count, once."""
    up = _partial_then_whole(mode, BIG)
    assert up.heads == [_upstream_form(SMALL_GET, 1), _upstream_form(BIG, 1)]
    assert up.accepted == 1


def test_the_relays_retry_after_a_head_sent_in_parts_sends_it_whole(mode: tuple[str, str]) -> None:
    """The backend reads the head sent in parts on the pooled connection and
    closes it without a byte: the relay's own retry of a reused connection
    sends it again, whole, on a new connection (the same try: 1); the
    client gets its 200."""
    up = _partial_then_whole(mode, RETRIED, CLOSE)
    assert up.heads == [_upstream_form(SMALL_GET, 1)] + [_upstream_form(RETRIED, 1)] * 2
    assert up.accepted == 2


def test_a_policys_retry_after_a_head_sent_in_parts_sends_it_whole(mode: tuple[str, str]) -> None:
    """The backend reads the head sent in parts and answers 503: the route's
    retry policy (5xx) sends it again, whole, saying 2; the client gets the
    retry's 200."""
    up = _partial_then_whole(mode, RETRIED, UNAVAILABLE, policy(1, "5xx"))
    assert up.heads == [
        _upstream_form(SMALL_GET, 1),
        _upstream_form(RETRIED, 1),
        _upstream_form(RETRIED, 2),
    ]
