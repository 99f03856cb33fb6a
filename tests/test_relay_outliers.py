"""Outlier detection hears how upstream connections serve requests: both twins, real sockets.

With ``--http-routing request`` the relay reported only failed connects. An
endpoint that accepted every connection and then reset it, closed it before
its answer, or cut its answer short was never ejected: the client got the
proxy's answer (or half a body) for every request routed to it, and each connect even
cleared its count. Now a response that fails on an established connection is
a failure (a gateway failure, see ``l4proxy/rules/health.py``) and a complete
response is a success, reported only when it is news (an endpoint's first
answer, its first after a failure), so the steady state calls no Python.

Here a real :class:`~l4proxy.rules.health.EndpointHealth` is fed by a relay's
reports, as the worker feeds it, and ``decide`` skips the endpoints it
ejected; the last tests run a whole worker.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.relay import HttpRelay
from l4proxy.rules.health import EndpointHealth
from tests._worker import gateway_service, gateway_worker
from tests.conftest import load_twin, reset_close
from tests.test_relay_edges import TWINS, Backend, _client, _read_all, _read_head, _relay

EJECT_AFTER = 3  # EndpointHealth's consecutive failures (the worker's default)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
GET = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
BEFORE = "upstream closed the connection before a response"
MID = "upstream closed the connection mid-response"


@pytest.fixture(params=TWINS)
def which(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


@dataclass(frozen=True)
class Ep:
    address: str
    port: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


class Health:
    """An EndpointHealth fed by a relay's reports (on the relay's thread here,
    not on the worker's loop), every report logged; ``decide`` round robin
    over the endpoints it has not ejected (all of them when none is left)."""

    def __init__(self, *endpoints: tuple[str, int]) -> None:
        self.health = EndpointHealth(consecutive_failures=EJECT_AFTER, base_ejection=60)
        self.endpoints = [Ep(*e) for e in endpoints]
        self.reports: list[tuple[str, tuple[str, int], str]] = []
        self.lock = threading.Lock()
        self.turn = itertools.count()

    def ep(self, key: tuple[str, int]) -> Ep:
        return next(e for e in self.endpoints if e.key == tuple(key))

    def decide(self, head: Any, origin: Any) -> Decision:
        with self.lock:
            healthy = [e for e in self.endpoints if self.health.is_healthy(e)] or self.endpoints
            i = next(self.turn) % len(healthy)
            return Decision(tuple(e.key for e in healthy[i:] + healthy[:i]))

    def connect_failed(self, key: tuple[str, int], tag: Any, why: str) -> None:
        with self.lock:
            self.reports.append(("connect_failed", (key[0], key[1]), why))
            self.health.failure(self.ep(key), why, (self.endpoints,))

    def response_failed(self, key: tuple[str, int], tag: Any, why: str) -> None:
        with self.lock:
            self.reports.append(("response_failed", (key[0], key[1]), why))
            self.health.failure(self.ep(key), why, (self.endpoints,), "response")

    def answered(self, key: tuple[str, int], tag: Any) -> None:
        with self.lock:
            self.reports.append(("answered", (key[0], key[1]), ""))
            self.health.success(self.ep(key))

    def relay(self, which: str) -> Any:
        return _relay(
            which,
            self.decide,
            connect_failed=self.connect_failed,
            response_failed=self.response_failed,
            answered=self.answered,
        )

    def count(self, what: str, key: tuple[str, int]) -> int:
        with self.lock:
            return sum(1 for w, k, _ in self.reports if w == what and k == key)


class Served:
    """A backend's handler wrapper: counts the requests it reads."""

    def __init__(self, answer: Callable[[socket.socket, int], None]) -> None:
        self.answer = answer
        self.requests = 0
        self.conns = itertools.count()
        self.lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        n = next(self.conns)
        while _read_head(conn):
            with self.lock:
                self.requests += 1
            self.answer(conn, n)


def _ok(conn: socket.socket, n: int) -> None:
    conn.sendall(OK)


# How a failing endpoint fails each request, and the reason reported.
FAILURES: dict[str, tuple[Callable[[socket.socket, int], None], str]] = {
    "reset": (lambda conn, n: reset_close(conn), BEFORE),
    "close": (lambda conn, n: conn.close(), BEFORE),
    "cut": (
        lambda conn, n: (
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
            conn.close(),
        ),
        MID,
    ),
    "bad_chunk": (
        lambda conn, n: (
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            conn.recv(1),  # until the relay closes
            conn.close(),
        ),
        "chunk size is not hexadecimal",
    ),
    "bad_head": (
        lambda conn, n: (conn.sendall(b"HTTP/1.1 OK\r\n\r\n"), conn.recv(1), conn.close()),
        "malformed response status line",
    ),
}


def _ask(relay: Any) -> bytes:
    """One GET on a new client connection (it asks to close): the answer."""
    a = _client(relay)
    try:
        a.sendall(GET)
        return _read_all(a, 5)[0]
    finally:
        a.close()


@pytest.mark.parametrize("failure", list(FAILURES))
def test_an_endpoint_failing_every_response_is_ejected_and_the_other_serves(
    which: str, failure: str
) -> None:
    """Round robin over a failing endpoint and a good one: the failing one
    gets requests 1, 3 and 5, each a failure, and is ejected by the third;
    every later request goes to the good one. The good one's answers are
    reported once (its first): no report per request."""
    fail, reason = FAILURES[failure]
    bad, good = Served(fail), Served(_ok)
    bad_backend, good_backend = Backend(bad), Backend(good)
    h = Health(bad_backend.endpoint, good_backend.endpoint)
    relay = h.relay(which)
    try:
        answers = [_ask(relay) for _ in range(12)]
    finally:
        relay.close()
        bad_backend.close()
        good_backend.close()
    assert bad.requests == EJECT_AFTER and good.requests == 12 - EJECT_AFTER
    assert sum(a.endswith(b"\r\n\r\nok") for a in answers) == 12 - EJECT_AFTER, answers
    assert not h.health.is_healthy(h.endpoints[0]) and h.health.is_healthy(h.endpoints[1])
    d = h.health.describe(h.endpoints[0])
    assert (d["response_failures"], d["connect_failures"], d["ejections"]) == (3, 0, 1), d
    assert d["last_error"] == reason
    assert h.reports == [
        ("response_failed", bad_backend.endpoint, reason),
        ("answered", good_backend.endpoint, ""),
        ("response_failed", bad_backend.endpoint, reason),
        ("response_failed", bad_backend.endpoint, reason),
    ]


def _every_other(conn: socket.socket, n: int) -> None:
    """Even connections reset, odd ones answered (and closed: each request
    of the test goes on a new connection, so failures and answers alternate)."""
    if n % 2 == 0:
        reset_close(conn)
    else:
        conn.sendall(OK_CLOSE)
        conn.close()


def test_failures_between_answers_do_not_eject(which: str) -> None:
    """Failure, answer, failure, answer, ...: never three in a row, never
    ejected. Each answer after a failure is reported (it clears the count);
    once the endpoint only answers, nothing more is."""
    flaky = Served(_every_other)
    backend = Backend(flaky)
    h = Health(backend.endpoint)
    relay = h.relay(which)
    try:
        answers = [_ask(relay) for _ in range(10)]
        flaky.answer = lambda conn, n: (conn.sendall(OK_CLOSE), conn.close())
        answers += [_ask(relay) for _ in range(10)]
    finally:
        relay.close()
        backend.close()
    assert flaky.requests == 20
    assert [a.startswith(b"HTTP/1.1 503 ") for a in answers[:10]] == [True, False] * 5
    assert answers[10:] == [OK_CLOSE] * 10
    ep = h.endpoints[0]
    assert h.health.is_healthy(ep)
    d = h.health.describe(ep)
    assert (d["response_failures"], d["ejections"], d["consecutive_failures"]) == (5, 0, 0), d
    assert h.count("response_failed", ep.key) == 5
    assert h.count("answered", ep.key) == 5  # after each failure; not the last ten


def test_a_failed_response_keeps_the_cached_verdict() -> None:
    """The compiled twin serving from a cached verdict (as the sidecar runs
    it): a response failure alone changes no verdict, so the cache is kept;
    forgetting it on every failure sent every request to Python for as long
    as an endpoint (or a client) made responses fail. An ejection is what
    changes verdicts, and the worker then calls invalidate()."""
    from l4proxy.dataplane.verdict import Choice, Verdict

    flaky = Served(_every_other)
    backend = Backend(flaky)
    h = Health(backend.endpoint)
    verdict = Verdict((Choice(1, (backend.endpoint,), tag="t"),), ttl=60.0)
    relay = _relay(
        "compiled",
        h.decide,
        response_failed=h.response_failed,
        answered=h.answered,
        resolve=lambda head, origin: verdict,
    )
    try:
        answers = [_ask(relay) for _ in range(10)]
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        backend.close()
    assert [a.startswith(b"HTTP/1.1 503 ") for a in answers] == [True, False] * 5
    assert h.count("response_failed", h.endpoints[0].key) == 5
    assert (stats["verdict_cache_misses"], stats["verdict_cache_hits"]) == (1, 9), stats


def test_an_answer_with_a_5xx_status_is_an_answer(which: str) -> None:
    """A status the application sends (its own 503) is no failure: the
    detection is always on, with no DestinationRule to ask for it (see
    health.py). Only the first answer is reported."""
    unavailable = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
    backend = Backend(Served(lambda conn, n: conn.sendall(unavailable)))
    h = Health(backend.endpoint)
    relay = h.relay(which)
    try:
        answers = [_ask(relay) for _ in range(2 * EJECT_AFTER)]
    finally:
        relay.close()
        backend.close()
    assert all(a.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") for a in answers), answers
    assert h.health.is_healthy(h.endpoints[0])
    assert h.reports == [("answered", backend.endpoint, "")]


def test_a_retried_request_on_a_pooled_connection_blames_nobody(which: str) -> None:
    """A's pooled connection closes before its answer to the second request
    (the race RFC 9112 9.3.1 warns of: a server may close an idle connection
    at any time): the GET goes once more, to B, which answers. That is what
    the retry is for, not A's failure: nothing is reported against A."""
    a = Served(lambda conn, n: conn.sendall(OK) if n > 0 or a.requests == 1 else conn.close())
    b = Served(_ok)
    a_backend, b_backend = Backend(a), Backend(b)
    endpoints = (a_backend.endpoint, b_backend.endpoint)
    h = Health(*endpoints)
    relay = _relay(
        which,
        lambda head, origin: Decision(endpoints),  # A first, always
        connect_failed=h.connect_failed,
        response_failed=h.response_failed,
        answered=h.answered,
    )
    try:
        c = _client(relay)
        c.sendall(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _read_all_n(c, len(OK)) == OK  # A's connection is pooled now
        c.sendall(b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert _read_all(c, 5)[0].endswith(b"\r\n\r\nok")
        c.close()
        assert relay.stats()["requests"] == 2
    finally:
        relay.close()
        a_backend.close()
        b_backend.close()
    assert (a.requests, b.requests) == (2, 1)
    assert h.reports == [("answered", endpoints[0], ""), ("answered", endpoints[1], "")]


def _read_all_n(s: socket.socket, n: int) -> bytes:
    s.settimeout(5)
    got = b""
    while len(got) < n and (data := s.recv(65536)):
        got += data
    return got


# -- the whole worker -------------------------------------------------------------


def _gateway_get(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def test_a_worker_ejects_an_endpoint_that_resets_every_request(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request-mode worker (a gateway listener, two endpoints round robin):
    the one that accepts and resets every request is ejected once it failed
    three (the reports cross to the worker's loop; the compiled twin's
    cached verdicts are forgotten), then the other serves every request;
    /clusters counts its response failures."""
    relay_module = load_twin("relay", which)
    if HttpRelay is not relay_module.HttpRelay:  # the worker as the other build makes it
        import l4proxy.dataplane.relay as chooser
        import l4proxy.sidecar.worker as worker_module

        monkeypatch.setattr(chooser, "IMPLEMENTATION", which)
        monkeypatch.setattr(worker_module, "HttpRelay", relay_module.HttpRelay)
    bad, good = Served(lambda conn, n: reset_close(conn)), Served(_ok)
    bad_backend, good_backend = Backend(bad), Backend(good)
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(bad_backend.endpoint[1], good_backend.endpoint[1]))
    answers: list[bytes] = []
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, worker, address):
            loop = asyncio.get_running_loop()
            [svc] = watcher.state.table.services()
            [ep] = [e for e in svc.endpoints if e.port == bad_backend.endpoint[1]]
            for _ in range(30):  # round robin: until the bad one had its three
                answers.append(await loop.run_in_executor(None, _gateway_get, address))
                if bad.requests == EJECT_AFTER:
                    break
            for _ in range(100):  # its last failure crosses to the loop
                if not worker.health.is_healthy(ep):
                    break
                await asyncio.sleep(0.02)
            seen["ejected"] = not worker.health.is_healthy(ep)
            for _ in range(10):
                answers.append(await loop.run_in_executor(None, _gateway_get, address))
            seen["describe"] = worker.health.describe(ep)

    try:
        asyncio.run(main())
    finally:
        bad_backend.close()
        good_backend.close()
    assert seen["ejected"], seen
    assert bad.requests == EJECT_AFTER
    statuses = [a.split(b"\r\n")[0] for a in answers]
    assert statuses.count(b"HTTP/1.1 503 Service Unavailable") == EJECT_AFTER
    assert all(a.endswith(b"\r\n\r\nok") for a in answers[-10:]), answers[-10:]
    d = seen["describe"]
    assert (d["response_failures"], d["connect_failures"], d["ejections"]) == (3, 0, 1), d
    assert d["last_error"] == BEFORE
