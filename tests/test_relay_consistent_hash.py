"""Consistent hashing in the compiled relay (a ``HASH`` Choice, its
``verdict.HashOn``): each request goes to the endpoint ``hash_order()`` puts
first for what the request is hashed on (``HashOn.key_of``), its retries
down the same order; a request without it gets a random key, or a
generated cookie whose ``set-cookie`` line goes on its final response head.
Real sockets and backends; the verdict cached (ttl 60) and asked per
request (ttl 0: freed before the response comes). The pure relay's twin is
the route table's decide() (endpoints in this order, the line in its edits).
A hash on the source IP hashes the client's packed address: clients bound to
distinct loopback addresses (all of 127/8 is local on Linux); in decide mode
both twins made with ``decide_peer`` hand decide() those bytes.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

import pytest

from l4proxy.dataplane import _relay_py
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.peek import parse_head
from l4proxy.dataplane.verdict import (
    HASH_COOKIE,
    HASH_HEADER,
    HASH_QUERY,
    HASH_SOURCE_IP,
    Choice,
    HashOn,
    HeadEdits,
    RetryPolicy,
    Verdict,
    endpoint_hash,
    hash_key,
    hash_order,
)
from l4proxy.rules.routing import request_headers
from tests._scripted import Scripted, _answer, _client, _response, policy
from tests.test_relay_edges import ORIGIN, _relay

Endpoint = tuple[str, int]

RESPONSE_EDITS = HeadEdits(
    response_set=(("server", "l4"),),
    response_add=(("x-added", "1"),),
    response_remove=("x-drop",),
)
PLAIN = b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Drop: 1\r\nContent-Length: 2\r\n\r\nok"
COOKIE_VALUE = re.compile(rb'set-cookie: sid="([0-9a-f]{16})"')


@pytest.fixture(params=[60.0, 0.0], ids=["cached", "per-request"])
def ttl(request: pytest.FixtureRequest) -> float:
    """The verdict's ttl: cached, or resolved per request and freed when
    applied (the cookie line must outlive it)."""
    return float(request.param)


class Farm:
    """*n* Scripted backends behind a compiled relay whose one choice is a
    HASH on *on* (plus *dead* endpoints that refuse, first)."""

    def __init__(
        self,
        n: int,
        on: HashOn,
        ttl: float,
        edits: HeadEdits | None = None,
        script: list[Any] | None = None,
        dead: int = 0,
        seed: int = 7,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.ups = [Scripted(list(script or [])) for _ in range(n)]
        refused: list[Endpoint] = []
        for _ in range(dead):
            with socket.create_server(("127.0.0.1", 0)) as s:
                refused.append(("127.0.0.1", s.getsockname()[1]))
        self.eps: tuple[Endpoint, ...] = (*refused, *(u.endpoint for u in self.ups))
        self.dead = dead
        self.on = on
        self.hashes = [endpoint_hash(e) for e in self.eps]
        verdict = Verdict(
            (Choice(1, self.eps, "HASH", tag="t", edits=edits, hash_on=on),), ttl=ttl, retry=retry
        )
        self.relay = _relay(
            "compiled",
            lambda h, o: Decision(local=(500, "decide is not asked")),
            resolve=lambda head, origin: verdict,
            seed=seed,
        )
        self.seen = [0] * n

    def order(self, value: bytes) -> list[int]:
        return hash_order(hash_key(value), self.hashes)

    def expected(self, request: bytes) -> bytes | None:
        """What HashOn.key_of reads of *request* (the pure twin's value)."""
        head = parse_head(request)
        assert head is not None
        return self.on.key_of(head.target, request_headers(head.headers))

    def landed(self) -> list[int]:
        """The endpoints (indices in eps) that read a request since asked last."""
        got = []
        for i, u in enumerate(self.ups):
            while self.seen[i] < len(u.requests):
                self.seen[i] += 1
                got.append(i + self.dead)
        return got

    def close(self) -> None:
        self.relay.close()
        for u in self.ups:
            u.close()


def _farm(request: pytest.FixtureRequest, *a: Any, **kw: Any) -> Farm:
    farm = Farm(*a, **kw)
    request.addfinalizer(farm.close)
    return farm


def _ask(farm: Farm, c: socket.socket, request: bytes) -> tuple[bytes, int]:
    """*request* on *c*: its response and the endpoint that served it."""
    c.sendall(request)
    got = _response(c)
    where = farm.landed()
    assert len(where) == 1, where
    return got, where[0]


def _head_of(c: socket.socket) -> bytes:
    """One response head (no body read)."""
    c.settimeout(5.0)
    got = b""
    while not got.endswith(b"\r\n\r\n"):
        data = c.recv(1)
        assert data, got
        got += data
    return got


REQUESTS: dict[str, Callable[[str], bytes]] = {
    HASH_HEADER: lambda v: b"GET /x HTTP/1.1\r\nHost: a\r\nX-User: %s\r\n\r\n" % v.encode(),
    HASH_COOKIE: lambda v: (
        b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: a=1; sid=%s; b=2\r\n\r\n" % v.encode()
    ),
    HASH_QUERY: lambda v: b"GET /x?a=1&u=%s&u=zz HTTP/1.1\r\nHost: a\r\n\r\n" % v.encode(),
}
NAMES = {HASH_HEADER: "x-user", HASH_COOKIE: "sid", HASH_QUERY: "u"}


@pytest.mark.parametrize("kind", [HASH_HEADER, HASH_COOKIE, HASH_QUERY])
def test_each_key_lands_where_hash_order_puts_it(
    request: pytest.FixtureRequest, ttl: float, kind: str
) -> None:
    """Many keys over keep-alive connections, each twice: every request at
    the endpoint hash_order() puts first for its value (5 endpoints: more
    than the 3 candidates kept), the keys spread over all of them."""
    farm = _farm(request, 5, HashOn(kind, NAMES[kind]), ttl)
    conns = [_client(farm.relay) for _ in range(2)]
    where: dict[str, int] = {}
    for round_ in range(2):
        for i in range(60):
            value = f"user-{i}"
            req = REQUESTS[kind](value)
            assert farm.expected(req) == value.encode()
            got, at = _ask(farm, conns[(i + round_) % 2], req)
            assert got.startswith(b"HTTP/1.1 200 X\r\n") and b"set-cookie" not in got
            assert at == farm.order(value.encode())[0], (value, at)
            assert where.setdefault(value, at) == at
    assert set(where.values()) == set(range(5))
    for c in conns:
        c.close()


def test_an_absent_key_is_random(request: pytest.FixtureRequest, ttl: float) -> None:
    """Requests without the header (no ttl: no cookie) spread at random
    (seeded), no set-cookie line."""
    farm = _farm(request, 4, HashOn(HASH_HEADER, "x-user"), ttl)
    c = _client(farm.relay)
    seen = set()
    for _ in range(40):
        got, at = _ask(farm, c, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert b"set-cookie" not in got
        seen.add(at)
    assert len(seen) > 1
    c.close()


def test_a_refused_first_goes_to_the_keys_second(
    request: pytest.FixtureRequest, ttl: float
) -> None:
    """The key's first endpoint refuses: the request goes to its second."""
    farm = _farm(request, 3, HashOn(HASH_HEADER, "x-user"), ttl, dead=1)
    values = [f"k{i}" for i in range(200) if farm.order(f"k{i}".encode())[0] == 0][:5]
    assert values
    c = _client(farm.relay)
    for value in values:
        got, at = _ask(farm, c, REQUESTS[HASH_HEADER](value))
        assert got.startswith(b"HTTP/1.1 200 X\r\n"), got
        assert at == farm.order(value.encode())[1]
    c.close()


def _differing(
    farm: Farm,
    make: Callable[[str, str], bytes],
    right: Callable[[str, str], str],
    wrong: Callable[[str, str], str],
) -> bytes:
    """A request make(a, b) whose value (right(a, b), and as key_of reads
    it) goes elsewhere than wrong(a, b) would."""
    for i in range(100):
        a, b = f"v{i}a", f"v{i}b"
        if farm.order(right(a, b).encode())[0] != farm.order(wrong(a, b).encode())[0]:
            req = make(a, b)
            assert farm.expected(req) == right(a, b).encode()
            return req
    raise AssertionError("no pair")


@pytest.mark.parametrize(
    ("kind", "name", "make", "right", "wrong"),
    [
        (
            HASH_HEADER,
            "x-user",
            lambda a, b: (
                b"GET / HTTP/1.1\r\nX-USER:  %s\r\nHost: a\r\nx-User: \t%s \r\n\r\n"
                % (a.encode(), b.encode())
            ),
            lambda a, b: f"{a},{b}",
            lambda a, b: b,
        ),
        (
            HASH_COOKIE,
            "sid",
            lambda a, b: (
                b'GET / HTTP/1.1\r\nHost: a\r\ncookie: s=x\r\nCookie: s=1;sid="%s"; '
                b"sid=%s\r\n\r\n" % (a.encode(), b.encode())
            ),
            lambda a, b: a,
            lambda a, b: b,
        ),
        (
            HASH_COOKIE,
            "sid",
            lambda a, b: (
                b"GET / HTTP/1.1\r\nHost: a\r\nCookie: x=1; sid=%s\r\nCookie: sid=%s\r\n\r\n"
                % (a.encode(), b.encode())
            ),
            lambda a, b: a,
            lambda a, b: b,
        ),
        (
            HASH_QUERY,
            "u",
            lambda a, b: (
                b"GET /p?uu=1&u=%s#u=%s HTTP/1.1\r\nHost: a\r\n\r\n" % (a.encode(), b.encode())
            ),
            lambda a, b: a,
            lambda a, b: b,
        ),
    ],
    ids=[
        "header-lines-joined-any-case-trimmed",
        "first-pair-of-the-cookie-lines-quoted",
        "first-cookie-line-that-names-it",
        "query-fragment",
    ],
)
def test_what_is_read_of_a_request(
    request: pytest.FixtureRequest,
    ttl: float,
    kind: str,
    name: str,
    make: Callable[[str, str], bytes],
    right: Callable[[str, str], str],
    wrong: Callable[[str, str], str],
) -> None:
    """A header's lines whatever the case of its name, each trimmed, joined
    with "," (Envoy hashes every value); the first pair of the name in the
    cookie lines, in order, its quotes removed; the query up to the
    fragment: where key_of says, not where the other value would send it."""
    farm = _farm(request, 4, HashOn(kind, name), ttl)
    req = _differing(farm, make, right, wrong)
    c = _client(farm.relay)
    value = farm.expected(req)
    assert value is not None
    _, at = _ask(farm, c, req)
    assert at == farm.order(value)[0]
    c.close()


def test_an_empty_first_cookie_is_absent(request: pytest.FixtureRequest, ttl: float) -> None:
    """The first cookie of the name is empty: absent (a random key, as
    key_of's None), though a later line names it with a value."""
    farm = _farm(request, 4, HashOn(HASH_COOKIE, "sid"), ttl)
    c = _client(farm.relay)
    req = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: sid=\r\nCookie: sid=v1\r\n\r\n"
    assert farm.expected(req) is None
    seen = {_ask(farm, c, req)[1] for _ in range(30)}
    assert len(seen) > 1  # random, not v1's endpoint every time
    c.close()


def _line(on: HashOn, value: bytes) -> bytes:
    return b"set-cookie: " + on.set_cookie(value.decode()).encode() + b"\r\n"


SID = HashOn(HASH_COOKIE, "sid", 3600, "/")


@pytest.mark.parametrize("edits", [None, RESPONSE_EDITS], ids=["no-edits", "edits"])
def test_a_generated_cookie_sticks(
    request: pytest.FixtureRequest, ttl: float, edits: HeadEdits | None
) -> None:
    """A request without the cookie: its final head gets the set-cookie
    line (16 hex digits, byte for byte, after the response edits, before
    the empty line), it went where that value hashes, and the next request
    sending the cookie back goes there too, with no line; another request
    without one gets another value."""
    farm = _farm(request, 4, SID, ttl, edits=edits, script=[PLAIN] * 100)
    c = _client(farm.relay)
    values = set()
    for _ in range(6):
        got, at = _ask(farm, c, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        m = COOKIE_VALUE.search(got)
        assert m, got
        value = m.group(1)
        head = b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Drop: 1\r\nContent-Length: 2\r\n"
        if edits is not None:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nserver: l4\r\nx-added: 1\r\n"
        assert got == head + _line(SID, value) + b"\r\nok"
        assert at == farm.order(value)[0]
        back = b'GET /y HTTP/1.1\r\nHost: a\r\nCookie: o=1; sid="%s"\r\n\r\n' % value
        got2, at2 = _ask(farm, c, back)
        assert b"set-cookie" not in got2
        assert at2 == at
        values.add(value)
    assert len(values) == 6
    c.close()


def test_head_and_204_get_the_line(request: pytest.FixtureRequest, ttl: float) -> None:
    """A HEAD's head and a 204's (no body either way) get the line too."""
    script = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    ]
    farm = _farm(request, 1, SID, ttl, script=script)
    c = _client(farm.relay)
    c.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
    got = _head_of(c)
    m = COOKIE_VALUE.search(got)
    assert m, got
    assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + _line(SID, m.group(1)) + b"\r\n"
    c.sendall(b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n")
    got = _head_of(c)
    m = COOKIE_VALUE.search(got)
    assert m, got
    assert got == b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n" + _line(SID, m.group(1)) + b"\r\n"
    # nothing more came (the next response is the next request's)
    c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: sid=1\r\n\r\n")
    assert _response(c) == _answer(200, b"ok")
    c.close()


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"],
    ids=["100", "103-with-lines"],
)
def test_not_on_an_interim_head(request: pytest.FixtureRequest, ttl: float, interim: bytes) -> None:
    """An interim head goes as it came (a bare one as the loop passes it
    on, one with lines as Python judges it); the final head after it has
    the line."""
    farm = _farm(request, 1, SID, ttl, script=[interim + _answer(200, b"ok")])
    c = _client(farm.relay)
    c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _head_of(c) == interim
    got = _response(c)
    m = COOKIE_VALUE.search(got)
    assert m, got
    assert got == b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n" + _line(SID, m.group(1)) + b"\r\nok"
    c.close()


def test_pipelined_requests_each_get_their_own(request: pytest.FixtureRequest, ttl: float) -> None:
    """Pipelined requests without the cookie: each answer its own value
    (where its request went); one that sent it: none."""
    farm = _farm(request, 4, SID, ttl)
    c = _client(farm.relay)
    get = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    c.sendall(get * 4 + b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: sid=zz\r\n\r\n")
    c.settimeout(5.0)
    raw = b""
    while raw.count(b"\r\n\r\nok") < 5:  # (200 ok each: as they come, several a read)
        data = c.recv(65536)
        assert data, raw
        raw += data
    got = [part + b"\r\n\r\nok" for part in raw.split(b"\r\n\r\nok")[:-1]]
    assert len(got) == 5 and raw.endswith(b"ok"), raw
    values = []
    for answer in got[:4]:
        m = COOKIE_VALUE.search(answer)
        assert m, answer
        assert answer == b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n" + _line(SID, m.group(1)) + (
            b"\r\nok"
        )
        values.append(m.group(1))
    assert got[4] == _answer(200, b"ok")
    assert len(set(values)) == 4
    # each went where its own value hashes (served in order: one connection)
    where = farm.landed()
    assert sorted(where) == sorted([farm.order(v)[0] for v in values] + [farm.order(b"zz")[0]])
    c.close()


def test_a_session_cookie_line() -> None:
    """ttl 0, no path: the line without Max-Age and Path (interned parts)."""
    on = HashOn(HASH_COOKIE, "s", 0)
    farm = Farm(1, on, 60.0)
    try:
        c = _client(farm.relay)
        got, _ = _ask(farm, c, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        m = re.search(rb's="([0-9a-f]{16})"', got)
        assert m, got
        assert got == b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n" + _line(on, m.group(1)) + b"\r\nok"
        assert b'set-cookie: s="%s"; HttpOnly\r\n' % m.group(1) in got
        c.close()
    finally:
        farm.close()


def test_a_retry_keeps_the_line(request: pytest.FixtureRequest, ttl: float) -> None:
    """A 503 retried (the route's policy): the final answer, the retry's,
    has the line the request's cookie was generated with, once."""
    farm = _farm(request, 1, SID, ttl, script=[_answer(503)], retry=policy(2, "5xx"))
    c = _client(farm.relay)
    c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    got = _response(c)
    m = COOKIE_VALUE.search(got)
    assert m, got
    assert got == b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n" + _line(SID, m.group(1)) + b"\r\nok"
    assert farm.landed() == [0, 0]
    c.close()


# -- the client's address (HASH_SOURCE_IP) --------------------------------------

SOURCES = [f"127.0.0.{i}" for i in range(2, 41)]
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def _client_from(relay: Any, source: str) -> socket.socket:
    """A TCP client connection from the loopback address *source*, handed
    to *relay* (its peer there: *source*)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname(), source_address=(source, 0))
        theirs, _ = listener.accept()
    assert theirs.getpeername()[0] == source
    relay.add(theirs, ORIGIN)
    return ours


def test_each_source_lands_where_hash_order_puts_its_address(
    request: pytest.FixtureRequest, ttl: float
) -> None:
    """39 clients, each from its own address: every request (three on a
    keep-alive connection, two more on a second one from the same
    address) at the endpoint hash_order() puts first for the packed
    address, no set-cookie line (a ttl asks for none here); the addresses
    spread over the endpoints."""
    farm = _farm(request, 5, HashOn(HASH_SOURCE_IP, "", 60), ttl)
    where: dict[str, int] = {}
    for source in SOURCES:
        first = farm.order(socket.inet_aton(source))[0]
        for n in (3, 2):
            c = _client_from(farm.relay, source)
            for _ in range(n):
                got, at = _ask(farm, c, GET)
                assert got.startswith(b"HTTP/1.1 200 X\r\n") and b"set-cookie" not in got
                assert at == first, (source, at, first)
            c.close()
        where[source] = first
    # (39 addresses over 5 endpoints: all of them but for a 1-in-1000 draw)
    assert len(set(where.values())) >= 3, where


def test_an_unknown_source_is_random(request: pytest.FixtureRequest, ttl: float) -> None:
    """A client with no IP address (a socketpair's end: peer_of() is None)
    gets a random key per request (seeded), as an absent header does."""
    farm = _farm(request, 4, HashOn(HASH_SOURCE_IP, ""), ttl)
    ours, theirs = socket.socketpair()
    farm.relay.add(theirs, ORIGIN)
    seen = set()
    for _ in range(40):
        got, at = _ask(farm, ours, GET)
        assert got.startswith(b"HTTP/1.1 200 X\r\n") and b"set-cookie" not in got
        seen.add(at)
    assert len(seen) > 1
    ours.close()


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_decide_peer_hands_decide_the_clients_address(
    request: pytest.FixtureRequest, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decide_peer=True, decide mode: decide(head, origin, peer) gets the
    client's packed address on every request, two connections from each
    of two addresses, and None for a socketpair's; the pure relay asks
    peer_of() once per connection. The compiled relay's slow path (a
    Connection line naming a field: its pure relay's) passes the same."""
    asked: list[bytes | None] = []
    real_peer_of = _relay_py.peer_of

    def counted_peer_of(sock: socket.socket, addr: Any = None) -> bytes | None:
        got = real_peer_of(sock, addr)
        asked.append(got)
        return got

    monkeypatch.setattr(_relay_py, "peer_of", counted_peer_of)
    up = Scripted([])
    request.addfinalizer(up.close)
    peers: list[tuple[str, bytes | None]] = []

    def decide(head: Any, origin: Any, peer: bytes | None) -> Decision:
        peers.append((head.target, peer))
        return Decision((up.endpoint,), tag="t")

    relay = _relay(which, decide, decide_peer=True)
    request.addfinalizer(relay.close)
    expected: list[tuple[str, bytes | None]] = []
    conns = 0
    for source in ("127.0.0.7", "127.0.0.8"):
        packed = socket.inet_aton(source)
        for _ in range(2):
            c = _client_from(relay, source)
            conns += 1
            for i in range(3):
                c.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                assert _response(c).startswith(b"HTTP/1.1 200 X\r\n")
                expected.append((f"/{i}", packed))
            c.close()
    ours, theirs = socket.socketpair()
    relay.add(theirs, ORIGIN)
    ours.sendall(GET)
    assert _response(ours).startswith(b"HTTP/1.1 200 X\r\n")
    expected.append(("/x", None))
    ours.close()
    assert peers == expected
    if which == "pure":
        # once per connection (the socketpair's: None, asked once too)
        assert len(asked) == conns + 1 and asked[-1] is None
        return
    assert asked == []  # (the loop asked the kernel itself)
    # the slow path: the compiled loop's first request, then one it hands on
    c = _client_from(relay, "127.0.0.9")
    c.sendall(GET)
    assert _response(c).startswith(b"HTTP/1.1 200 X\r\n")
    c.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\nConnection: x-a\r\nX-A: 1\r\n\r\n")
    assert _response(c).startswith(b"HTTP/1.1 200 X\r\n")
    c.close()
    assert relay.stats()["slow_path"] == 1
    packed = socket.inet_aton("127.0.0.9")
    assert peers[-2:] == [("/x", packed), ("/slow", packed)]
    assert asked == [socket.inet_aton("127.0.0.9")]  # (the pure relay's own, once)
