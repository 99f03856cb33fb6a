"""The compiled loop's last verdict per connection: a hit is the lookup's hit.

A keep-alive connection's next request with its last one's method, target
and Host takes the verdict of its last cache hit without the lookup
(``last_verdict()`` in ext/relay.pyx), while no cache entry was added,
replaced or cleared, the epoch held, both entries are live and no key
header is configured. Each test here changes one of those between two
requests on one connection and checks that the second request gets what a
fresh lookup gives. The pure twin caches nothing: these are the compiled
twin's (the twins' agreement on routing is in test_relay_twins.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import BinaryIO

import pytest

from l4proxy.dataplane._peek_py import RequestHead
from l4proxy.dataplane.verdict import (
    SHAPE_HEADERS,
    SHAPE_METHOD,
    SHAPE_PATH,
    SHAPE_TESTS,
    Choice,
    Verdict,
)
from tests.test_relay import (
    Backend,
    Proxy,
    _resolving_proxy,
    backends_fixture,  # noqa: F401  (the fixture backends)
    read_response,
)


def _to(b: Backend, shape: int = 0, tests: tuple = (), ttl: float = 3600.0) -> Verdict:
    return Verdict((Choice(1, (b.endpoint,)),), shape=shape, tests=tests, ttl=ttl)


def _get(c: socket.socket, path: str = "/a", host: str = "svc") -> bytes:
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return read_response(c)[:4]


def _answers(f: BinaryIO, n: int) -> list[bytes]:
    """The first 4 bytes of the bodies of n Content-Length responses."""
    got = []
    for _ in range(n):
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        got.append(f.read(length)[:4])
    return got


def _proxy(
    backends: list[Backend], answer: Callable[[RequestHead], Verdict], **kw: object
) -> tuple[Proxy, list]:
    return _resolving_proxy(backends, None, answer, **kw)


def test_a_rule_swap_between_two_requests_reaches_the_second(backends: list[Backend]) -> None:
    """invalidate() (a rule swap) between two requests with the same line:
    the second asks Python and goes where the new rules say."""
    rules = {"to": backends[0]}
    proxy, calls = _proxy(
        backends, lambda head: _to(rules["to"], SHAPE_TESTS, (("segments", "/a"),))
    )
    try:
        with proxy.connect() as c:
            assert [_get(c) for _ in range(3)] == [b"v=v1"] * 3
            rules["to"] = backends[1]
            proxy.relay.invalidate()
            assert _get(c) == b"v=v2"
    finally:
        proxy.close()
    assert len(calls) == 2
    assert proxy.relay.stats()["verdict_cache_hits"] == 2


def test_an_expired_verdict_is_not_served_from_the_last_one(backends: list[Backend]) -> None:
    """The verdict's ttl passes between two requests with the same line: the
    lookup asks Python for it (stale while revalidated: the first request
    after its expiry asks), so the second request goes where Python says
    now. Its ttl is not timed: the sleep only makes sure it passed."""
    ttl = 0.5
    rules = {"to": backends[0]}
    proxy, calls = _proxy(backends, lambda head: _to(rules["to"], ttl=ttl))
    try:
        with proxy.connect() as c:
            assert [_get(c) for _ in range(3)] == [b"v=v1"] * 3
            asked = len(calls)
            rules["to"] = backends[1]
            time.sleep(ttl * 1.5)
            assert _get(c) == b"v=v2"
    finally:
        proxy.close()
    assert len(calls) == asked + 1


def test_a_shape_entry_replaced_by_another_connection_is_followed(
    backends: list[Backend],
) -> None:
    """Another connection's request replaces the shape entry of the Host
    (Python answered it with other tests) and caches a verdict under the
    key the first connection's next target now makes: the lookup finds
    that one, without Python, and so does the next request with the same
    line (R.cache_gen moved: the last hit's entries are not taken)."""
    tests_a = (("segments", "/a"),)
    tests_b = (("segments", "/b"),)
    rules = {"answer": _to(backends[0], SHAPE_TESTS, tests_a)}
    proxy, calls = _proxy(backends, lambda head: rules["answer"])
    try:
        with proxy.connect() as a, proxy.connect() as b:
            assert [_get(a) for _ in range(3)] == [b"v=v1"] * 3
            rules["answer"] = _to(backends[1], SHAPE_TESTS, tests_b)
            # /c passes no test of /a: a miss; /a passes no test of /b either
            assert _get(b, "/c") == b"v=v2"
            assert _get(a) == b"v=v2"
    finally:
        proxy.close()
    assert calls == [("GET", "/a"), ("GET", "/c")]


def test_a_cache_cleared_by_another_connection_is_looked_up_again(
    backends: list[Backend],
) -> None:
    """Another connection's distinct targets fill the cache to CACHE_MAX
    (2048 entries): it is cleared, the last hit's entries freed. The first
    connection's next request asks Python again and goes where it says."""
    rules = {"to": backends[0]}
    proxy, calls = _proxy(backends, lambda head: _to(rules["to"], SHAPE_PATH))
    try:
        with proxy.connect() as a, proxy.connect() as b:
            assert [_get(a) for _ in range(3)] == [b"v=v1"] * 3
            f = b.makefile("rb")
            for start in range(0, 2100, 100):
                b.sendall(
                    b"".join(
                        b"GET /fill/%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i
                        for i in range(start, start + 100)
                    )
                )
                assert _answers(f, 100) == [b"v=v1"] * 100
            rules["to"] = backends[1]
            assert _get(a) == b"v=v2"
    finally:
        proxy.close()
    assert calls.count(("GET", "/a")) == 2


def test_a_key_header_keeps_the_lookup(backends: list[Backend]) -> None:
    """With a key header configured the line is not enough: the same method,
    target and Host with another x-user value goes where its value says,
    and back; each value asks Python once."""

    def answer(head: RequestHead) -> Verdict:
        return _to(backends[dict(head.headers).get("x-user") == "b"], SHAPE_HEADERS)

    proxy, calls = _proxy(backends, answer, key_headers=["x-user"])
    got = []
    try:
        with proxy.connect() as c:
            for user in "aabab":
                c.sendall(f"GET /a HTTP/1.1\r\nHost: svc\r\nx-user: {user}\r\n\r\n".encode())
                got.append(read_response(c)[:4])
    finally:
        proxy.close()
    assert got == [b"v=v1", b"v=v1", b"v=v2", b"v=v1", b"v=v2"]
    assert len(calls) == 2
    assert proxy.relay.stats()["verdict_cache_hits"] == 3


# (the first line, the other, the shape the verdicts are cached under)
PIPELINED = {
    "host": ("GET /a HTTP/1.1\r\nHost: one\r\n\r\n", "GET /a HTTP/1.1\r\nHost: two\r\n\r\n", 0),
    "method": (
        "GET /a HTTP/1.1\r\nHost: svc\r\n\r\n",
        "DELETE /a HTTP/1.1\r\nHost: svc\r\n\r\n",
        SHAPE_METHOD,
    ),
    "target": (
        "GET /a HTTP/1.1\r\nHost: svc\r\n\r\n",
        "GET /b HTTP/1.1\r\nHost: svc\r\n\r\n",
        SHAPE_PATH,
    ),
    "tests": (
        "GET /a/1 HTTP/1.1\r\nHost: svc\r\n\r\n",
        "GET /b/1 HTTP/1.1\r\nHost: svc\r\n\r\n",
        SHAPE_TESTS,
    ),
}


@pytest.mark.parametrize("differs", sorted(PIPELINED))
def test_pipelined_requests_that_differ_in_host_method_or_target(
    backends: list[Backend], differs: str
) -> None:
    """After two requests with one line (the second a cache hit), three
    pipelined in one write: the other line, the first, the other. Each goes
    where its own Host, method or target says (the cache holds both)."""
    first, other, shape = PIPELINED[differs]

    def answer(head: RequestHead) -> Verdict:
        mine = (head.host, head.method, head.path) == ("one", "GET", "/a") or (
            head.host == "svc" and head.method == "GET" and head.path.startswith("/a")
        )
        return _to(backends[0 if mine else 1], shape, (("segments", "/a"),) if shape else ())

    proxy, calls = _proxy(backends, answer)
    try:
        with proxy.connect() as c:
            f = c.makefile("rb")
            for _ in range(2):
                c.sendall(first.encode())
                assert _answers(f, 1) == [b"v=v1"]
            c.sendall((other + first + other).encode())
            assert _answers(f, 3) == [b"v=v2", b"v=v1", b"v=v2"]
    finally:
        proxy.close()
    assert len(calls) == 2
    assert proxy.relay.stats()["verdict_cache_hits"] == 3
