"""A destination whose endpoints differ in version (``Choice.endpoint_tags``,
``Decision.endpoint_tags``): each request is reported with the tag of the
endpoint of its last try that reached one, as Istio labels a request by
the pod that answered; one answered before any try reached an endpoint
keeps its choice's tag; a uniform choice is reported as before. Both
twins (the compiled one deciding per request and from a cached verdict),
real sockets: each backend counts what it served, and the reports per
tag are those counts exactly (counted, never timed). The compiled
relay's interned tag ids stay bounded across rule swaps while a request
held through them is reported with its own candidates' tags.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import Counter
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import FAULT_SCALE, Choice, Fault, Mirror, Verdict
from tests._scripted import (
    GET,
    Scripted,
    _answer,
    _client,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import dead_ports
from tests.test_relay_edges import Backend, _relay
from tests.test_relay_mirror import _read_request, _Reports

Endpoint = tuple[str, int]
N = 30  # requests per test
CHOICE_TAG = "mixed"  # the choice's own tag (Istio's unknown labels, in the worker)


class _Proxy:
    """A relay of *mode* in front of one choice: its endpoints and their
    tags, its policy (applied by the compiled loop from the cached verdict;
    per request, the decide callback draws a random order, seeded, as the
    route table orders a decision), reporting to ``reports``; the
    connect failures it told of (endpoint, tag), in ``failed``."""

    def __init__(
        self,
        mode: tuple[str, str],
        endpoints: tuple[Endpoint, ...],
        tags: tuple[Any, ...],
        lb: str = "ROUND_ROBIN",
        **extra: Any,
    ) -> None:
        self.reports = _Reports()
        self.failed: list[tuple[Endpoint, Any]] = []
        self.lock = threading.Lock()
        order = random.Random(7)
        retry = extra.pop("retry", None)
        fault = extra.pop("fault", None)
        mirrors = extra.pop("mirrors", ())
        hash_on = extra.pop("hash_on", None)
        ordered = extra.pop("ordered", False)

        def decide(head: Any, origin: Any) -> Decision:
            pairs = list(zip(endpoints, tags or (None,) * len(endpoints), strict=True))
            if not ordered:
                with self.lock:
                    order.shuffle(pairs)
            return Decision(
                tuple(e for e, _ in pairs),
                tag=CHOICE_TAG,
                retry=retry,
                fault=fault,
                mirrors=mirrors,
                endpoint_tags=tuple(t for _, t in pairs) if tags else (),
            )

        kw = self.reports.kw(mode)
        kw["connect_failed"] = self._connect_failed
        if mode[1] == "resolve":
            choice = Choice(
                1,
                endpoints,
                "ORDERED" if ordered else lb,
                tag=CHOICE_TAG,
                hash_on=hash_on,
                endpoint_tags=tags,
            )
            verdict = Verdict((choice,), ttl=60.0, retry=retry, fault=fault, mirrors=mirrors)
            kw["resolve"] = lambda head, origin: verdict
        self.relay = _relay(mode[0], decide, seed=11, **kw)

    def _connect_failed(self, endpoint: Endpoint, tag: Any, why: str) -> None:
        with self.lock:
            self.failed.append((endpoint, tag))

    def ask(self, n: int, clients: int = 1, request: bytes = GET) -> list[int]:
        """*n* requests over *clients* keep-alive connections at once (each
        one's in turn): the statuses, once the relay reported them all."""
        statuses: list[int] = []

        def one(count: int, first: int) -> None:
            a = _client(self.relay)
            try:
                for i in range(first, first + count):
                    a.sendall(request.replace(b"\r\n\r\n", b"\r\nx-user: u%d\r\n\r\n" % i))
                    got = _status(_response(a))
                    with self.lock:
                        statuses.append(got)
            finally:
                a.close()

        threads = [
            threading.Thread(target=one, args=(n // clients, k * (n // clients)))
            for k in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert _until(lambda: self.relay.stats()["requests"] >= n, 5.0), self.relay.stats()
        self.relay.flush_reports(1.0)
        return statuses

    def rows(self) -> Counter[tuple[Any, int]]:
        with self.reports.lock:
            assert not self.reports.uneven, self.reports.uneven
            return Counter(self.reports.rows)

    def close(self) -> None:
        self.relay.close()


def _served(*backends: Scripted) -> list[int]:
    return [len(b.requests) for b in backends]


def test_each_request_is_counted_under_the_version_that_answered(mode: tuple[str, str]) -> None:
    """Two endpoints of v1 and one of v2, no rule between them: N requests
    on three keep-alive connections at once; the reports under v1 and v2
    are what v1's two and v2's one served, every one, and none is under
    the choice's tag (its decisions are, in the compiled loop's rows)."""
    v1a, v1b, v2 = Scripted([]), Scripted([]), Scripted([])
    proxy = _Proxy(mode, (v1a.endpoint, v1b.endpoint, v2.endpoint), ("v1", "v1", "v2"))
    try:
        assert proxy.ask(N, clients=3) == [200] * N
        rows = proxy.rows()
        decided = proxy.reports.decided
    finally:
        proxy.close()
        for b in (v1a, v1b, v2):
            b.close()
    a, b, c = _served(v1a, v1b, v2)
    assert a + b + c == N and c > 0 and a + b > 0, (a, b, c)
    assert rows == Counter({("v1", 200): a + b, ("v2", 200): c})
    if mode == ("compiled", "resolve"):  # (per request, the loop counts no decision)
        assert decided == [CHOICE_TAG] * N


@pytest.mark.parametrize("lb", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "HASH"])
def test_every_order_of_the_compiled_loop_counts_by_endpoint(lb: str) -> None:
    """The compiled loop orders a cached choice's endpoints itself: round
    robin, random, least connections (sorted by load, each candidate's tag
    carried along) and a consistent hash (x-user, a value per request):
    four clients at once, and the reports per version are what each
    version's endpoints served. A slow v2 makes the loads differ; a v2 pod
    that refuses connections sends the requests that try it first to
    their next candidate, counted under that one's version."""
    from l4proxy.dataplane.verdict import HASH_HEADER, HashOn

    def slow(conn: socket.socket) -> None:
        threading.Event().wait(0.02)
        conn.sendall(_answer(200, b"ok"))

    v1a, v1b = Scripted([]), Scripted([])
    v2 = Scripted([slow] * N)
    hash_on = HashOn(HASH_HEADER, "x-user") if lb == "HASH" else None
    with dead_ports(1) as [dead]:
        eps = (v1a.endpoint, v2.endpoint, ("127.0.0.1", dead), v1b.endpoint)
        tags = ("v1", "v2", "v2", "v1")
        proxy = _Proxy(("compiled", "resolve"), eps, tags, lb, hash_on=hash_on)
        try:
            assert proxy.ask(4 * 10, clients=4) == [200] * 40
            rows, failed = proxy.rows(), len(proxy.failed)
        finally:
            proxy.close()
            for b in (v1a, v1b, v2):
                b.close()
    a, c, b = _served(v1a, v2, v1b)
    assert a + b + c == 40 and c > 0 and a + b > 0, (a, b, c)
    assert failed > 0
    assert rows == Counter({("v1", 200): a + b, ("v2", 200): c})


def test_a_failed_connect_to_v1_then_v2s_answer_counts_as_v2(mode: tuple[str, str]) -> None:
    """v1's endpoint refuses connections, v2's answers: each request tries
    v1 first (its connect reported to outlier detection under v1's tag),
    then v2, and is counted under v2."""
    v2 = Scripted([])
    with dead_ports(1) as [dead]:
        v1 = ("127.0.0.1", dead)
        proxy = _Proxy(mode, (v1, v2.endpoint), ("v1", "v2"), ordered=True)
        try:
            assert proxy.ask(N) == [200] * N
            rows, failed = proxy.rows(), list(proxy.failed)
        finally:
            proxy.close()
            v2.close()
    assert len(v2.requests) == N
    assert rows == Counter({("v2", 200): N})
    assert failed == [(v1, "v1")] * N


def test_a_retry_policys_try_on_v2_after_v1s_503_counts_as_v2(mode: tuple[str, str]) -> None:
    """A route retrying 5xx: v1 answers each request 503, the retry goes to
    the other endpoint first (Istio's default), v2 answers it: counted
    under v2, and v1's 503s nowhere (a try's status is not a request's)."""
    v1 = Scripted([_answer(503)] * N)
    v2 = Scripted([])
    proxy = _Proxy(mode, (v1.endpoint, v2.endpoint), ("v1", "v2"), ordered=True, retry=policy(1))
    try:
        assert proxy.ask(N) == [200] * N
        rows = proxy.rows()
    finally:
        proxy.close()
        v1.close()
        v2.close()
    assert _served(v1, v2) == [N, N]
    assert rows == Counter({("v2", 200): N})


def test_a_connect_failure_to_every_endpoint_counts_under_the_last_tried(
    mode: tuple[str, str],
) -> None:
    """Neither v1 nor v2 accepts: the 503 (Envoy's UF) counts under the
    last endpoint whose connect the relay began, v2 here, as Istio labels
    it from the upstream host's own labels (not unknown, its label before
    1.8)."""
    with dead_ports(2) as [p1, p2]:
        v1, v2 = ("127.0.0.1", p1), ("127.0.0.1", p2)
        proxy = _Proxy(mode, (v1, v2), ("v1", "v2"), ordered=True)
        try:
            assert proxy.ask(N) == [503] * N
            rows, failed = proxy.rows(), list(proxy.failed)
        finally:
            proxy.close()
    assert rows == Counter({("v2", 503): N})
    assert failed == [(v1, "v1"), (v2, "v2")] * N


def test_an_abort_before_any_try_keeps_the_choices_tag(mode: tuple[str, str]) -> None:
    """A fault's abort (without a tag of its own) answers before any try
    reached an endpoint: counted under the choice's tag, no endpoint's."""
    v1, v2 = Scripted([]), Scripted([])
    fault = Fault(abort_status=418, abort_ppm=FAULT_SCALE)
    proxy = _Proxy(mode, (v1.endpoint, v2.endpoint), ("v1", "v2"), fault=fault)
    try:
        assert proxy.ask(N) == [418] * N
        rows = proxy.rows()
    finally:
        proxy.close()
        v1.close()
        v2.close()
    assert _served(v1, v2) == [0, 0]
    assert rows == Counter({(CHOICE_TAG, 418): N})


def test_a_uniform_choice_counts_under_its_own_tag(mode: tuple[str, str]) -> None:
    """No tag per endpoint (one version, the common case): every request
    under the choice's tag, as before."""
    a, b = Scripted([]), Scripted([])
    proxy = _Proxy(mode, (a.endpoint, b.endpoint), ())
    try:
        assert proxy.ask(N, clients=3) == [200] * N
        rows = proxy.rows()
    finally:
        proxy.close()
        a.close()
        b.close()
    assert sum(_served(a, b)) == N
    assert rows == Counter({(CHOICE_TAG, 200): N})


def test_tags_not_parallel_to_the_endpoints_are_refused(mode: tuple[str, str]) -> None:
    """A tag per endpoint that is not one per endpoint (a bug of the
    caller's) is refused as a decision that cannot be applied: the 503,
    counted in errors, nothing sent."""
    v1, v2 = Scripted([]), Scripted([])
    proxy = _Proxy(mode, (v1.endpoint, v2.endpoint), ("v1",), ordered=True)
    try:
        assert proxy.ask(3) == [503] * 3
        errors = proxy.relay.stats()["errors"]
    finally:
        proxy.close()
        v1.close()
        v2.close()
    assert _served(v1, v2) == [0, 0]
    assert errors >= 1


class _Mirror:
    """A mirror endpoint that reads each copy whole and answers 200: how
    many it read."""

    def __init__(self) -> None:
        self.copies = 0
        self.lock = threading.Lock()
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = b""
        while (got := _read_request(conn, buf)) is not None:
            buf = got[1]
            with self.lock:
                self.copies += 1
            conn.sendall(_answer(200))

    def close(self) -> None:
        self.backend.close()


def test_a_mirrors_copies_count_under_the_version_they_went_to(mode: tuple[str, str]) -> None:
    """A mirror whose endpoints are of v1 and v2 (a tag per endpoint):
    every request mirrored, round robin; each copy is reported under the
    tag of the endpoint it went to: what each mirror endpoint read."""
    up = Scripted([])
    m1, m2 = _Mirror(), _Mirror()
    mirror = Mirror((m1.endpoint, m2.endpoint), tag="copies", endpoint_tags=("mv1", "mv2"))
    proxy = _Proxy(mode, (up.endpoint,), (), mirrors=(mirror,))
    try:
        assert proxy.ask(N) == [200] * N
        assert _until(lambda: proxy.relay.stats()["mirror_active"] == 0, 5.0)
        proxy.relay.flush_reports(1.0)
        rows, stats = proxy.rows(), proxy.relay.stats()
    finally:
        proxy.close()
        for b in (up, m1, m2):
            b.close()
    assert stats["mirrored"] == N and stats["mirror_dropped"] == 0, stats
    assert m1.copies + m2.copies == N and m1.copies and m2.copies
    assert rows == Counter({(CHOICE_TAG, 200): N, ("mv1", 200): m1.copies, ("mv2", 200): m2.copies})


SWAPS = 100
FLUSH_EVERY = 5  # swaps between metric flushes (a row holds its tag's id till then)
# What a tag sweep keeps here: the rows not flushed (a request's and, from
# a cached verdict, its decision's, per swap), each connection's tag and its
# candidates' (the client's, the held one's), the cached verdict's three,
# one at the edge; twice that plus INTERN_SLACK (16) before the next sweep.
EP_TAG_BOUND = 2 * (2 * FLUSH_EVERY + 10) + 16


@pytest.mark.parametrize("how", ["decide", "resolve"])
def test_endpoint_tag_ids_stay_bounded_and_a_held_retry_keeps_its_own(how: str) -> None:
    """Compiled twin: SWAPS rule swaps, each a mixed choice of tags of its
    own (the choice's, v1's and v2's of that generation) and a request
    answered by v1; meanwhile the first generation's request is held at
    v1 through every swap, then answered 503 and retried to v2 under its
    route's policy. The tag ids in use stay under EP_TAG_BOUND at every
    swap (three more per swap without the sweep), sweeps ran, and every
    row has its own request's tag: the held one is counted under the
    first generation's v2, an id only its candidates still named (freed
    and reused, it was counted under another generation's)."""
    from tests.test_relay_interned_sweep import Echo, Reader

    v1, v2 = Echo(), Scripted([])
    state = {"gen": 0}
    rows: list[tuple[Any, int, int]] = []
    lock = threading.Lock()

    def report_rows(decided: Any, answered: Any) -> None:
        with lock:
            rows.extend((tag, status, count) for tag, status, count, _, _, _ in answered)

    def tags() -> tuple[Any, tuple[Any, Any]]:
        gen = state["gen"]
        return ("choice", gen), (("v1", gen), ("v2", gen))

    endpoints = (v1.endpoint, v2.endpoint)
    retry = policy(1)

    def decide(head: Any, origin: Any) -> Decision:
        tag, ep_tags = tags()
        return Decision(endpoints, tag=tag, retry=retry, endpoint_tags=ep_tags)

    kw: dict[str, Any] = {"report_rows": report_rows}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            tag, ep_tags = tags()
            choice = Choice(1, endpoints, "ORDERED", tag=tag, endpoint_tags=ep_tags)
            return Verdict((choice,), ttl=60.0, retry=retry)

        kw["resolve"] = resolve
    relay = _relay("compiled", decide, **kw)
    try:
        state["gen"] = 1
        held = _client(relay)
        held.sendall(b"GET /held HTTP/1.1\r\nHost: a\r\nx-id: held\r\nx-hold: 1\r\n\r\n")
        assert v1.held.wait(5.0)
        a = _client(relay)
        ra = Reader(a)
        most = 0
        for gen in range(2, SWAPS + 1):
            state["gen"] = gen
            if how == "resolve":
                relay.invalidate()
            a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nx-id: %d\r\n\r\n" % gen)
            assert ra.response().startswith(b"HTTP/1.1 200 ")
            if gen % FLUSH_EVERY == 0:
                relay.flush_reports(1.0)
            most = max(most, relay.interned_tags)
            assert relay.interned_tags <= EP_TAG_BOUND, (gen, relay.interned_tags)
        v1.release.set()
        assert Reader(held).response().startswith(b"HTTP/1.1 200 ")
        a.close()
        held.close()
        relay.flush_reports(1.0)
        sweeps = relay.tag_sweeps
    finally:
        v1.release.set()
        relay.close()
        v1.close()
        v2.close()
    assert sweeps >= SWAPS // EP_TAG_BOUND, sweeps
    assert most > 16, most
    assert len(v2.requests) == 1  # (the held request's retry)
    want = [(("v1", gen), 200, 1) for gen in range(2, SWAPS + 1)] + [(("v2", 1), 200, 1)]
    assert sorted(rows, key=repr) == sorted(want, key=repr)
