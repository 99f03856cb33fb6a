"""A whole answer that goes to the client as it came is sent from the read
that brought it (answer_from_read() in ext/relay.pyx: no copy into the
connection's buffers first), what the kernel does not take at once queued
after it. Over real loopback sockets, both twins: answers of every size up
to one read, to a client that reads at once and to one whose socket takes
a few KB at a time (the rest of each answer queued), one after another and
pipelined on one keep-alive connection; every byte in order."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator

import pytest

from l4proxy.dataplane._relay_py import Decision
from tests.conftest import accept_until_closed, load_twin

SIZES = [0, 1, 3, 100, 4095, 4096, 9000, 30000, 60000]


def _answer(i: int, size: int) -> bytes:
    """The i-th answer: a body of *size* bytes that say which answer it is."""
    body = (f"{i}:".encode() + random.Random(i).randbytes(size))[:size]
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Server:
    """A backend that answers each request with the answer its target names
    (/i/size), in one send."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        accept_until_closed(self.listener, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        threading.Thread(target=self._loop, args=(conn,), daemon=True).start()

    def _loop(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    got = conn.recv(65536)
                    if not got:
                        return
                    data += got
                head, data = data.split(b"\r\n\r\n", 1)
                _, i, size = head.split(b" ", 2)[1].split(b"/")
                conn.sendall(_answer(int(i), int(size)))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(name="server")
def server_fixture() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def _relay(twin: str, endpoint: tuple[str, int], small: bool) -> tuple[object, socket.socket]:
    relay = load_twin("relay", twin).HttpRelay(lambda h, o: Decision((endpoint,)), lambda *a: None)
    relay.start()
    listener = socket.create_server(("127.0.0.1", 0))

    def hand_over(conn: socket.socket) -> None:
        if small:  # the relay's side of the client connection takes a few KB at a time
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        relay.add(conn, ("198.19.0.10", 8080))

    accept_until_closed(listener, hand_over)
    return relay, listener


def _read(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = c.recv(n - len(out))
        assert got, (len(out), n)
        out += got
    return out


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("twin", ["compiled", "pure"])
def test_whole_answers_reach_the_client_in_order(server: Server, twin: str, small: bool) -> None:
    relay, listener = _relay(twin, server.endpoint, small)
    rng = random.Random(5)
    try:
        c = socket.socket()
        if small:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.settimeout(10)
        c.connect(listener.getsockname())
        with c:
            i = 0
            for _ in range(40):
                # one request, or a few pipelined in one write
                batch = [(i + k, rng.choice(SIZES)) for k in range(rng.choice([1, 1, 2, 3]))]
                i += len(batch)
                c.sendall(b"".join(b"GET /%d/%d HTTP/1.1\r\nHost: a\r\n\r\n" % b for b in batch))
                for j, size in batch:
                    want = _answer(j, size)
                    assert _read(c, len(want)) == want, (j, size)
    finally:
        listener.close()
        relay.close()  # type: ignore[attr-defined]
