"""Hop-by-hop fields of responses (RFC 9110 §7.6.1), both twins, over sockets.

A response's Connection field, the fields it names, Keep-Alive,
Proxy-Connection and Upgrade are about the upstream's connection: the client
gets none of them (a 101's head aside: the tunnel's), and the relay says its
own ``connection: close`` / ``keep-alive`` where the client's hop needs it.
Apache with mod_http2 sends ``Upgrade: h2,h2c`` and ``Connection: Upgrade,
Keep-Alive`` on every HTTP/1.1 answer: the compiled loop drops them itself,
no response head goes to Python. The twins' agreement on generated heads is
in test_relay_twins.py.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from l4proxy.dataplane._relay_py import Decision
from tests.conftest import accept_until_closed, load_twin

APACHE = (
    b"Date: Sat, 05 Dec 2026 13:00:00 GMT\r\nServer: Apache/2.4.62 (Debian)\r\n"
    b"Upgrade: h2,h2c\r\nConnection: Upgrade, Keep-Alive\r\n"
    b'Last-Modified: Sat, 05 Dec 2026 12:00:00 GMT\r\nETag: "2-5f"\r\n'
    b"Accept-Ranges: bytes\r\nContent-Length: 2\r\nVary: Accept-Encoding\r\n"
    b"Keep-Alive: timeout=5, max=100\r\nContent-Type: text/html\r\n"
)
APACHE_SEEN = (
    b"Date: Sat, 05 Dec 2026 13:00:00 GMT\r\nServer: Apache/2.4.62 (Debian)\r\n"
    b'Last-Modified: Sat, 05 Dec 2026 12:00:00 GMT\r\nETag: "2-5f"\r\n'
    b"Accept-Ranges: bytes\r\nContent-Length: 2\r\nVary: Accept-Encoding\r\n"
    b"Content-Type: text/html\r\n"
)
NGINX = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
MANY = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(0, 60, 2))

# What the backend answers, by the request's path, and what the client
# should read of it.
ANSWERS: dict[bytes, tuple[bytes, bytes]] = {
    b"/apache": (
        b"HTTP/1.1 200 OK\r\n" + APACHE + b"\r\nok",
        b"HTTP/1.1 200 OK\r\n" + APACHE_SEEN + b"\r\nok",
    ),
    b"/nginx": (NGINX, NGINX),  # its Connection: keep-alive is the relay's own word
    b"/named": (
        b"HTTP/1.1 200 OK\r\nX-Trace: a\r\nConnection: x-trace, X-Hop\r\nX-Hop: 1\r\n"
        b"Content-Length: 2\r\nX-End: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-End: 2\r\n\r\nok",
    ),
    b"/many": (  # more names than the loop holds without malloc: sorted, looked up
        b"HTTP/1.1 200 OK\r\nConnection: "
        + b", ".join(b"x-%d" % i for i in range(40))
        + b"\r\n"
        + MANY
        + b"Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(40, 60, 2))
        + b"Content-Length: 2\r\n\r\nok",
    ),
    b"/framing": (  # never the framing: a chunked body still framed as chunked
        b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding, Content-Length, keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ),
}


class Backend:
    """Answers each bodyless request by its path (ANSWERS), keeping its
    connections open; counts them."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = self.listener.getsockname()
        self.accepted = 0
        self.socks: list[socket.socket] = []
        accept_until_closed(self.listener, self._take)

    def _take(self, conn: socket.socket) -> None:
        self.accepted += 1
        self.socks.append(conn)
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                path = head.split(b" ")[1]
                if path == b"/101":
                    conn.sendall(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nKeep-Alive: timeout=5\r\n\r\n"
                    )
                    return
                conn.sendall(ANSWERS[path][0])

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


class Proxy:
    def __init__(self, which: str, endpoint: tuple[str, int]) -> None:
        self.handed: list[bytes] = []
        self.relay = load_twin("relay", which).HttpRelay(
            lambda head, origin: Decision((endpoint,)), self._l4, header_timeout=2.0
        )
        self.relay.start()
        self.listener = socket.create_server(("127.0.0.1", 0))
        accept_until_closed(self.listener, lambda c: self.relay.add(c, ("198.19.0.10", 8080)))

    def _l4(self, client: socket.socket, up: object, to_client: bytes, *rest: object) -> None:
        self.handed.append(to_client)
        client.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.listener.getsockname(), timeout=5)

    def close(self) -> None:
        self.listener.close()
        self.relay.close()


@pytest.fixture(params=["compiled", "pure"])
def proxy(request: pytest.FixtureRequest) -> Iterator[tuple[Proxy, Backend, str]]:
    load_twin("relay", request.param)  # skips (fails under CI) when not built
    backend = Backend()
    p = Proxy(request.param, backend.endpoint)
    yield p, backend, request.param
    p.close()
    backend.close()


def _read(c: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = c.recv(65536)
        assert chunk, got
        got += chunk
    return got


def test_apache_answers_lose_their_hop_by_hop_fields_in_the_loop(
    proxy: tuple[Proxy, Backend, str],
) -> None:
    """Twenty Apache answers on one client connection: each reaches the
    client without Upgrade, Connection and Keep-Alive, on one upstream
    connection, and the compiled twin never hands a head to Python."""
    p, backend, which = proxy
    seen = ANSWERS[b"/apache"][1]
    with p.connect() as c:
        for i in range(20):
            c.sendall(b"GET /apache HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert _read(c, len(seen)) == seen, i
    assert backend.accepted == 1
    if which == "compiled":
        stats = p.relay.stats()
        assert stats["response_heads_in_python"] == 0 and stats["slow_path"] == 0, stats


@pytest.mark.parametrize("path", [b"/nginx", b"/named", b"/many", b"/framing"])
def test_the_fields_a_responses_connection_names_go_in_the_loop(
    proxy: tuple[Proxy, Backend, str], path: bytes
) -> None:
    """The fields Connection names go with it, however many (the compiled
    loop sorts more than 16 and looks them up), never the framing headers;
    nginx's ``Connection: keep-alive`` is the relay's own word already and
    goes as it is. Two requests each: the upstream connection is reused."""
    p, backend, which = proxy
    seen = ANSWERS[path][1]
    with p.connect() as c:
        for _ in range(2):
            c.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert _read(c, len(seen)) == seen
    assert backend.accepted == 1
    if which == "compiled":
        stats = p.relay.stats()
        assert stats["response_heads_in_python"] == 0 and stats["slow_path"] == 0, stats


@pytest.mark.parametrize(
    ("request_", "own", "closes"),
    [
        (
            b"GET /apache HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"connection: keep-alive",
            False,
        ),
        (
            b"GET /apache HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
            b"connection: close",
            True,
        ),
        (b"GET /apache HTTP/1.0\r\n\r\n", b"connection: close", True),
    ],
    ids=["http10_keep_alive", "client_close", "http10"],
)
def test_the_relay_says_its_own_connection_for_the_clients_hop(
    proxy: tuple[Proxy, Backend, str], request_: bytes, own: bytes, closes: bool
) -> None:
    """With Apache's Connection gone, the client still learns what its own
    hop does: an HTTP/1.0 client that asked keep-alive is told so (it
    closes otherwise), one that is closed is told close."""
    p, _, which = proxy
    seen = b"HTTP/1.1 200 OK\r\n" + APACHE_SEEN + own + b"\r\n\r\nok"
    with p.connect() as c:
        c.sendall(request_)
        assert _read(c, len(seen)) == seen
        if closes:
            assert c.recv(1) == b""
    if which == "compiled":
        assert p.relay.stats()["response_heads_in_python"] == 0


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /nginx HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
        b"GET /nginx HTTP/1.0\r\n\r\n",
    ],
    ids=["client_close", "http10"],
)
def test_a_closed_client_reads_close_alone_not_nginxs_keep_alive_beside_it(
    proxy: tuple[Proxy, Backend, str], request_: bytes
) -> None:
    """nginx says ``Connection: keep-alive`` on every answer (the relay took
    the client's close off the request: the upstream connection stays
    pooled). A client the relay closes reads ``connection: close`` alone,
    not both words; in the loop, no head to Python."""
    p, _, which = proxy
    seen = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"
    with p.connect() as c:
        c.sendall(request_)
        assert _read(c, len(seen)) == seen
        assert c.recv(1) == b""
    if which == "compiled":
        assert p.relay.stats()["response_heads_in_python"] == 0


def test_a_101_goes_as_the_server_sent_it(proxy: tuple[Proxy, Backend, str]) -> None:
    """A 101's head is the tunnel's: Upgrade, Connection and Keep-Alive stay."""
    p = proxy[0]
    with p.connect() as c:
        c.sendall(
            b"GET /101 HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert c.recv(1) == b""  # (the test's L4 callback closes it)
    assert p.handed == [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nKeep-Alive: timeout=5\r\n\r\n"
    ]
