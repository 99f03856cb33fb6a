"""A route's fault injection (``verdict.Fault`` on a Verdict, a Decision's
``fault``), applied by both relay twins (the compiled one deciding per
request and from a cached verdict), real sockets: an abort answered
locally byte for byte with nothing at the backend, a delay that holds the
request back from the backend (its route timeout starting after it), both,
the seeded draws per request, a client gone during a delay, pipelined
requests behind a delayed one, a request body dropped after an abort.

Timing: the tests assert the order of events (the backend saw nothing
while the delay runs, then saw the request) and lower bounds, never that
something happened within a time.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    FAULT_ABORT_BODY,
    FAULT_SCALE,
    SHAPE_FULL,
    Choice,
    Fault,
    Verdict,
)
from tests._scripted import (
    Scripted,
    _answer,
    _client,
    _recv,
    _reset,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.conftest import epoch_response as local_response
from tests.conftest import sent_up, undated
from tests.test_relay_edges import _relay
from tests.test_relay_edges_count import Counted

Endpoint = tuple[str, int]

ABORT = Fault(abort_status=503, abort_ppm=FAULT_SCALE)
ABORTED = local_response(503, FAULT_ABORT_BODY, close=False)
OK = _answer(200, b"ok")


def _fault_relay(
    mode: tuple[str, str],
    endpoint: Endpoint,
    fault: Fault,
    timeout: float = 0.0,
    counted: Counted | None = None,
    asked: threading.Event | None = None,
    **kw: Any,
) -> Any:
    """A relay of the twin and mode that sends every request to *endpoint*;
    a target under ``/f`` has *fault* (a cached verdict keyed by the target
    in the resolve mode), the others none. *asked*: set when the route is
    asked."""
    which, how = mode

    def fault_of(target: str) -> Fault | None:
        if asked is not None:
            asked.set()
        return fault if target.startswith("/f") else None

    if counted is not None:
        kw.update(counted.kw(which))
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            return Verdict(
                (Choice(1, (endpoint,), "ORDERED", tag="t"),),
                ttl=60.0,
                shape=SHAPE_FULL,
                timeout=timeout,
                fault=fault_of(head.target),
            )

        kw["resolve"] = resolve

    def decide(head: Any, origin: Any) -> Decision:
        return Decision((endpoint,), tag="t", timeout=timeout, fault=fault_of(head.target))

    return _relay(which, decide, **kw)


def _get(target: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode()


def _post(target: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (
        target.encode(),
        len(body),
        body,
    )


def test_an_abort_is_answered_locally(mode: tuple[str, str]) -> None:
    """Every request aborted: the status and Envoy's body, byte for byte,
    the client connection kept (its next request, without a fault, goes
    up), nothing at the backend, reported as a local answer."""
    up = Scripted([])
    counted = Counted()
    relay = _fault_relay(mode, up.endpoint, ABORT, counted=counted)
    try:
        a = _client(relay)
        got = []
        for target in ("/f", "/f", "/ok"):
            a.sendall(_get(target))
            got.append(_response(a))
        a.close()
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert [undated(g) for g in got] == [ABORTED, ABORTED, OK]
    assert up.requests == [sent_up(_get("/ok"))]
    assert up.accepted == 1  # (the one request that went)
    assert sorted(s for s, _ in counted.rows) == [200, 503, 503]
    assert stats["local_answers"] == 2


def test_an_abort_closes_as_its_head_asks(mode: tuple[str, str]) -> None:
    """A request that asks to close gets the abort saying so, then the
    connection's end."""
    up = Scripted([])
    relay = _fault_relay(mode, up.endpoint, ABORT._replace(abort_status=418))
    try:
        a = _client(relay)
        a.sendall(b"GET /f HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        a.settimeout(5.0)
        got = b""
        while data := a.recv(65536):
            got += data
        a.close()
    finally:
        relay.close()
        up.close()
    assert undated(got) == local_response(418, FAULT_ABORT_BODY, close=True)
    assert up.accepted == 0


def _aborted_count(mode: tuple[str, str], seed: int, n: int) -> int:
    up = Scripted([])
    fault = Fault(abort_status=503, abort_ppm=300_000)
    relay = _fault_relay(mode, up.endpoint, fault, seed=seed)
    try:
        a = _client(relay)
        statuses = []
        for _ in range(n):
            a.sendall(_get("/f"))
            statuses.append(_status(_response(a)))
        a.close()
    finally:
        relay.close()
        up.close()
    aborted = statuses.count(503)
    assert statuses.count(200) == n - aborted
    assert len(up.requests) == n - aborted  # (an aborted one never went)
    return aborted


def test_the_abort_is_drawn_per_request_with_the_seed(mode: tuple[str, str]) -> None:
    """30 % of 200 requests (one cached verdict for all, in the resolve
    mode): a count within 4 sigma of 60, the same count again with the
    same seed."""
    n, p = 200, 0.3
    first = _aborted_count(mode, 7, n)
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(first - n * p) <= 4 * sigma, first
    assert 0 < first < n  # (drawn, not all or nothing)
    assert _aborted_count(mode, 7, n) == first


class Gate:
    """A backend step that notes when a request reached the backend, then
    answers *answer*."""

    def __init__(self, answer: bytes = OK) -> None:
        self.reached = threading.Event()
        self.answer = answer

    def __call__(self, conn: socket.socket) -> None:
        self.reached.set()
        conn.sendall(self.answer)


def test_a_delay_holds_the_request_back(mode: tuple[str, str]) -> None:
    """Delayed 0.5 s: the backend has seen nothing 0.2 s after the request
    (the route asked by then), then sees it and answers; the answer comes
    no sooner than the delay."""
    gate = Gate()
    up = Scripted([gate])
    asked = threading.Event()
    relay = _fault_relay(mode, up.endpoint, Fault(delay=0.5, delay_ppm=FAULT_SCALE), asked=asked)
    try:
        a = _client(relay)
        start = time.monotonic()
        a.sendall(_get("/f"))
        assert asked.wait(5.0)
        assert not gate.reached.wait(0.2)
        assert up.requests == [] and up.accepted == 0
        assert relay.pools.active(up.endpoint) == 0  # (no endpoint counts it yet)
        got = _response(a)
        elapsed = time.monotonic() - start
        a.close()
    finally:
        relay.close()
        up.close()
    assert got == OK
    assert gate.reached.is_set()
    assert up.requests == [sent_up(_get("/f"))]
    assert elapsed >= 0.5


def test_a_delay_then_an_abort(mode: tuple[str, str]) -> None:
    """Both drawn: the abort's answer after the delay, nothing at the
    backend, the connection kept."""
    up = Scripted([])
    asked = threading.Event()
    fault = Fault(delay=0.3, delay_ppm=FAULT_SCALE, abort_status=429, abort_ppm=FAULT_SCALE)
    relay = _fault_relay(mode, up.endpoint, fault, asked=asked)
    try:
        a = _client(relay)
        start = time.monotonic()
        a.sendall(_get("/f"))
        got = _response(a)
        elapsed = time.monotonic() - start
        a.sendall(_get("/ok"))
        after = _response(a)
        a.close()
    finally:
        relay.close()
        up.close()
    assert undated(got) == local_response(429, FAULT_ABORT_BODY, close=False)
    assert elapsed >= 0.3
    assert after == OK
    assert up.requests == [sent_up(_get("/ok"))]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_client_reset_during_a_delay_ends_it(mode: tuple[str, str]) -> None:
    """The client resets while its request waits out the delay: the relay
    drops the connection (no fd left, no connection active), and nothing
    goes upstream once the delay is over."""
    up = Scripted([])
    asked = threading.Event()
    counted = Counted()
    fault = Fault(delay=0.4, delay_ppm=FAULT_SCALE)
    relay = _fault_relay(mode, up.endpoint, fault, counted=counted, asked=asked)
    try:
        before = _fds()
        a = _client(relay)
        a.sendall(_get("/f"))
        assert asked.wait(5.0)
        _reset(a)
        assert _until(lambda: relay.stats()["active"] == 0, 5.0)
        assert _fds() == before
        time.sleep(0.6)  # past the delay: nothing more happens
        relay.flush_reports(1.0)
        stats = relay.stats()
        active = relay.pools.active(up.endpoint)
    finally:
        relay.close()
        up.close()
    assert up.accepted == 0 and up.requests == []
    assert stats["active"] == 0 and active == 0
    assert [s for s, _ in counted.rows] == [0]  # (cut before any answer: Envoy's 0)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_route_timeout_starts_after_the_delay(mode: tuple[str, str], method: str) -> None:
    """A route timeout of 0.1 s and a delay of 0.4 s: no 504 during the
    delay (Envoy's router timer starts when the router gets the request),
    the request held back from the backend until then; the backend's
    prompt answer is the client's. A POST's body, here with its head, is
    read after the delay, with the request."""
    gate = Gate()
    up = Scripted([gate])
    asked = threading.Event()
    fault = Fault(delay=0.4, delay_ppm=FAULT_SCALE)
    relay = _fault_relay(mode, up.endpoint, fault, timeout=0.1, asked=asked)
    request = _get("/f") if method == "GET" else _post("/f", b"hello")
    try:
        a = _client(relay)
        start = time.monotonic()
        a.sendall(request)
        assert asked.wait(5.0)
        assert not gate.reached.wait(0.2)
        got = _response(a)
        elapsed = time.monotonic() - start
        a.close()
    finally:
        relay.close()
        up.close()
    assert got == OK
    assert up.requests == [sent_up(request)]
    assert elapsed >= 0.4


def test_pipelined_requests_wait_behind_a_delayed_one(mode: tuple[str, str]) -> None:
    """Three requests in one segment, the first delayed: the backend reads
    them in order, the client gets their answers in order."""
    gate = Gate(_answer(200, b"1"))
    up = Scripted([gate, _answer(200, b"2"), _answer(200, b"3")])
    asked = threading.Event()
    relay = _fault_relay(mode, up.endpoint, Fault(delay=0.4, delay_ppm=FAULT_SCALE), asked=asked)
    try:
        a = _client(relay)
        a.sendall(_get("/f") + _get("/a") + _get("/b"))
        assert asked.wait(5.0)
        assert not gate.reached.wait(0.2)  # (none of the three: they wait behind it)
        assert up.requests == []
        want = _answer(200, b"1") + _answer(200, b"2") + _answer(200, b"3")
        got = _recv(a, len(want))
        a.close()
    finally:
        relay.close()
        up.close()
    assert got == want
    assert up.requests == [sent_up(_get(p)) for p in ("/f", "/a", "/b")]


BODIES = {
    "length": (b"Content-Length: 11\r\n", b"hello world"),
    "chunked": (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
}


def _until_eof(a: socket.socket) -> bytes:
    """What *a* reads until the relay closes it (a reset: its end too)."""
    a.settimeout(5.0)
    got = b""
    try:
        while data := a.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return got


@pytest.mark.parametrize("framing", sorted(BODIES))
def test_an_aborted_whole_body_is_dropped(mode: tuple[str, str], framing: str) -> None:
    """A POST aborted with its body all here (sent with its head): the body
    is dropped, the connection stays, the next request on it is served;
    nothing of the POST at the backend."""
    up = Scripted([])
    relay = _fault_relay(mode, up.endpoint, ABORT)
    line, body = BODIES[framing]
    head = b"POST /f HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n"
    try:
        a = _client(relay)
        a.sendall(head + body + _get("/ok"))
        got = _recv(a, len(ABORTED + OK))
        a.close()
    finally:
        relay.close()
        up.close()
    assert undated(got) == ABORTED + OK
    assert up.requests == [sent_up(_get("/ok"))]


@pytest.mark.parametrize("framing", sorted(BODIES))
@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
def test_an_abort_before_the_whole_body_closes(
    mode: tuple[str, str], framing: str, expect: bool
) -> None:
    """A POST aborted before its body is all here (Envoy: a response before
    the request is complete): the answer says ``connection: close``, then
    the connection closes, whatever comes after (the rest of the body; or,
    from a client that sent ``Expect: 100-continue`` and got no 100, the
    next request instead of the body: never read as the body's)."""
    up = Scripted([])
    relay = _fault_relay(mode, up.endpoint, ABORT)
    line, body = BODIES[framing]
    head = b"POST /f HTTP/1.1\r\nHost: a\r\n" + line
    head += (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n"
    try:
        a = _client(relay)
        a.sendall(head if expect else head + body[:3])
        answer = _recv(a, len(local_response(503, FAULT_ABORT_BODY, close=True)))
        try:
            a.sendall(_get("/ok") if expect else body[3:] + _get("/ok"))
        except OSError:  # (closed already)
            pass
        rest = _until_eof(a)
        a.close()
    finally:
        relay.close()
        up.close()
    assert undated(answer) == local_response(503, FAULT_ABORT_BODY, close=True)
    assert rest == b""
    assert up.requests == [] and up.accepted == 0


def test_no_fault_drawn_no_change(mode: tuple[str, str]) -> None:
    """A fault with shares of 0: every request goes as without one."""
    up = Scripted([])
    fault = Fault(delay=5.0, delay_ppm=0, abort_status=503, abort_ppm=0)
    relay = _fault_relay(mode, up.endpoint, fault)
    try:
        a = _client(relay)
        got = []
        for _ in range(3):
            a.sendall(_get("/f"))
            got.append(_response(a))
        a.close()
    finally:
        relay.close()
        up.close()
    assert got == [OK] * 3
    assert up.requests == [sent_up(_get("/f"))] * 3


def test_faults_are_interned_per_distinct_fault() -> None:
    """The compiled relay holds one Fault_ per distinct fault (none for one
    that never falls), whatever the number of requests, until close()."""
    up = Scripted([])
    never = Fault(delay=1.0, delay_ppm=0, abort_status=503, abort_ppm=0)
    faults = {"/f1": ABORT, "/f2": ABORT._replace(abort_status=500), "/f3": never}

    def decide(head: Any, origin: Any) -> Decision:
        return Decision((up.endpoint,), tag="t", fault=faults.get(head.target))

    relay = _relay("compiled", decide)
    try:
        a = _client(relay)
        for target in ("/f1", "/f2", "/f3", "/f1", "/f2", "/f3", "/ok"):
            a.sendall(_get(target))
            _response(a)
        a.close()
        interned = relay.interned_faults
    finally:
        relay.close()
        up.close()
    assert interned == 3  # (the one that never falls too: as nothing)
    assert relay.interned_faults == 0


def _local_relay(mode: tuple[str, str], fault: Fault, local: tuple[int, str] | None) -> Any:
    """A relay of the twin and mode whose route has *fault* and a local
    answer: *local* (the route's own), or none of its destination's
    endpoints (None: a choice without endpoints in the resolve mode, a
    Decision without endpoints in the decide one)."""
    which, how = mode
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            if local is not None:
                return Verdict(local=local, tag="t", ttl=60.0, shape=SHAPE_FULL, fault=fault)
            return Verdict(
                (Choice(1, (), "ORDERED", tag="t"),), ttl=60.0, shape=SHAPE_FULL, fault=fault
            )

        return _relay(which, lambda h, o: Decision(()), resolve=resolve)
    return _relay(which, lambda h, o: Decision((), local=local, tag="t", fault=fault))


LOCALS = {"no-endpoint": None, "route-local": (403, "denied")}


@pytest.mark.parametrize("local", sorted(LOCALS))
def test_a_local_answer_is_aborted_first(mode: tuple[str, str], local: str) -> None:
    """Envoy's fault filter runs before the router: a request whose route
    answers locally (none of its destination's endpoints, or its own local
    answer) gets the abort's answer instead, its connection kept."""
    relay = _local_relay(mode, ABORT._replace(abort_status=418), LOCALS[local])
    try:
        a = _client(relay)
        got = []
        for _ in range(2):
            a.sendall(_get("/f"))
            got.append(_response(a))
        a.close()
    finally:
        relay.close()
    assert [undated(g) for g in got] == [local_response(418, FAULT_ABORT_BODY, close=False)] * 2


@pytest.mark.parametrize("local", sorted(LOCALS))
def test_a_local_answer_is_delayed_first(mode: tuple[str, str], local: str) -> None:
    """The delay, then the local answer (a 503 ``no healthy upstream``, or
    the route's own), its connection kept: the next request too."""
    relay = _local_relay(mode, Fault(delay=0.3, delay_ppm=FAULT_SCALE), LOCALS[local])
    status, body = LOCALS[local] or (503, "no healthy upstream")
    try:
        a = _client(relay)
        got = []
        start = time.monotonic()
        for _ in range(2):
            a.sendall(_get("/f"))
            got.append(_response(a))
        elapsed = time.monotonic() - start
        a.close()
    finally:
        relay.close()
    assert [undated(g) for g in got] == [local_response(status, body, close=False)] * 2
    assert elapsed >= 0.6


def test_a_reset_during_a_local_answers_delay(mode: tuple[str, str]) -> None:
    """A client gone while its local answer is delayed: its connection
    goes (no fd kept, the answer's copy freed), the relay serves the next
    one; a relay closed with a request delayed closes cleanly."""
    relay = _local_relay(mode, Fault(delay=0.3, delay_ppm=FAULT_SCALE), None)
    try:
        before = _fds()
        a = _client(relay)
        a.sendall(_get("/f"))
        assert _until(lambda: relay.stats()["active"] == 1, 5.0)
        _reset(a)
        assert _until(lambda: relay.stats()["active"] == 0, 5.0)
        fds = _fds()
        b = _client(relay)
        b.sendall(_get("/f"))
        got = _response(b)
        b.sendall(_get("/f"))  # (delayed when the relay closes)
        time.sleep(0.05)
    finally:
        relay.close()
    b.close()
    assert fds == before
    assert undated(got) == local_response(503, "no healthy upstream", close=False)


class _Tagged:
    """What a relay reported, (tag, status) per request, from either twin
    (the compiled one's aggregated rows expanded)."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, int]] = []
        self.lock = threading.Lock()

    def report(self, tag: Any, status: int, seconds: float, flags: int) -> None:
        with self.lock:
            self.rows.append((tag, status))

    def report_rows(self, decided: Any, answered: Any) -> None:
        with self.lock:
            for tag, status, count, _, _, _ in answered:
                self.rows += [(tag, status)] * count

    def kw(self, which: str) -> dict[str, Any]:
        out: dict[str, Any] = {"report": self.report}
        if which == "compiled":
            out["report_rows"] = self.report_rows
        return out


def test_an_abort_is_reported_under_the_faults_tag(mode: tuple[str, str]) -> None:
    """Fault.tag is what an aborted request's report carries, aborted at
    once or after its delay; a client gone during the delay before an abort
    was not aborted: it is reported (0, cut) under its choice's tag, on both
    twins alike (the pure one tagged it when the abort was drawn)."""
    up = Scripted([])
    asked = threading.Event()
    tagged = _Tagged()
    fault = Fault(
        delay=0.3, delay_ppm=FAULT_SCALE, abort_status=429, abort_ppm=FAULT_SCALE, tag="abort"
    )
    relay = _fault_relay(mode, up.endpoint, fault, asked=asked, **tagged.kw(mode[0]))
    try:
        a = _client(relay)
        a.sendall(_get("/f"))
        got = _response(a)  # (after the delay)
        b = _client(relay)
        b.sendall(_get("/f"))
        assert _until(lambda: relay.stats()["active"] == 2, 5.0)
        _reset(b)
        assert _until(lambda: relay.stats()["active"] == 1, 5.0)
        time.sleep(0.4)  # past b's delay: nothing more comes of it
        relay.flush_reports(1.0)
        a.close()
    finally:
        relay.close()
        up.close()
    assert undated(got) == local_response(429, FAULT_ABORT_BODY, close=False)
    assert sorted(tagged.rows) == [("abort", 429), ("t", 0)]
    assert up.accepted == 0


def test_an_unhashable_fault_tag_is_reported(mode: tuple[str, str]) -> None:
    """A Fault whose tag is unhashable (tags may be, a choice's as well):
    its aborts are answered and reported under it on both twins (the
    compiled one failed to intern the fault: every such request 503, an
    error), at once and after a delay, and the relay interns nothing of it
    past its requests."""
    up = Scripted([])
    tagged = _Tagged()
    tag = ["unhashable"]
    fault = Fault(
        delay=0.05, delay_ppm=FAULT_SCALE, abort_status=429, abort_ppm=FAULT_SCALE, tag=tag
    )
    relay = _fault_relay(mode, up.endpoint, fault, **tagged.kw(mode[0]))
    try:
        a = _client(relay)
        got = []
        for _ in range(3):
            a.sendall(_get("/f"))
            got.append(_response(a))
        a.close()
        relay.flush_reports(1.0)
        errors = relay.stats()["errors"]
    finally:
        relay.close()
        up.close()
    assert [undated(g) for g in got] == [local_response(429, FAULT_ABORT_BODY, close=False)] * 3
    assert tagged.rows == [(tag, 429)] * 3
    assert errors == 0
