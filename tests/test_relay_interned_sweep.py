"""The compiled relay's interned retry policies, head edits and faults stay
bounded across rule swaps (``_sweep_interned`` in ext/relay.pyx: each
``Retry_``, ``Edits_`` and ``Fault_`` counts the verdicts and the requests
that point at it, and a sweep frees those nothing points at), and what a
request still holds is never freed under it: a request routed before many
swaps, retried and answered after them, is edited by its own verdict's
edits; one delayed through them gets its own fault's abort. Real sockets;
the compiled twin per request (decide) and from a cached verdict (resolve).
The pure twin interns nothing (Python objects).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    FAULT_ABORT_BODY,
    FAULT_SCALE,
    Choice,
    Fault,
    HeadEdits,
    Mirror,
    RetryPolicy,
    Verdict,
)
from tests._scripted import Scripted, _client, _until
from tests.conftest import epoch_response as local_response
from tests.conftest import undated
from tests.test_relay_edges import Backend, _relay
from tests.test_relay_mirror import _read_request

Endpoint = tuple[str, int]
SWAPS = 200
HOLD_FOR = 25  # swaps a held request waits through before its answer
SLOW_EVERY = 10  # swaps between connections handed to the pure relay
# What a sweep keeps here: the current rules' policy and edits (the cached
# verdict's, the request in flight's), a held request's, one more at the
# swap's edge; a table passes twice that plus INTERN_SLACK (16) before
# the next sweep frees the rest.
BOUND = 2 * 4 + 16


class Echo:
    """A keep-alive backend answering the x-gen line of each request (the
    relay's request edit) in its body. A request with ``x-fail`` gets a 503
    the first time its x-id comes, then the answer (the policy's retry); one
    with ``x-hold`` waits for ``release`` first (``held`` is set once it
    came)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.requests = 0
        self.lock = threading.Lock()
        self.held = threading.Event()
        self.release = threading.Event()
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(20)
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                fields.setdefault(name.strip().lower(), []).append(value.strip())
            rid = fields[b"x-id"][0]
            with self.lock:
                first = rid not in self.seen
                self.seen.add(rid)
                self.requests += 1
            if first and b"x-hold" in fields:
                self.held.set()
                assert self.release.wait(20)
            if first and (b"x-fail" in fields or b"x-hold" in fields):
                conn.sendall(b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n")
                continue
            body = b",".join(fields.get(b"x-gen", [b"none"]))
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nX-Gen: up\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    def close(self) -> None:
        self.backend.close()


class Reader:
    """Content-Length responses from a client connection, pipelined ones
    apart (what came past one response waits for the next)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(10)

    def _more(self) -> None:
        data = self.sock.recv(65536)
        assert data, self.buf
        self.buf += data

    def response(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, _ = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        end = len(head) + 4 + length
        while len(self.buf) < end:
            self._more()
        got, self.buf = self.buf[:end], self.buf[end:]
        return got


def _rules(gen: int) -> tuple[RetryPolicy, HeadEdits]:
    """Generation *gen*'s retry policy and head edits, each distinct from
    every other generation's (a backoff tuned, a header value per deploy)."""
    retry = RetryPolicy.of(1, 0.0, ["5xx"], (), backoff=0.001 + gen * 1e-6)
    edits = HeadEdits(request_set=(("x-gen", str(gen)),), response_set=(("x-gen", str(gen)),))
    return retry, edits


def _check(response: bytes, gen: int) -> None:
    """A 200 whose request carried generation *gen*'s request edit (the
    body) and whose head has its response edit, once (the backend's X-Gen
    replaced)."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK", response
    assert [ln for ln in lines if ln.lower().startswith(b"x-gen:")] == [b"x-gen: %d" % gen], (
        response
    )
    assert body == b"%d" % gen, response


@pytest.mark.parametrize("how", ["decide", "resolve"])
def test_interned_retries_and_edits_stay_bounded_across_rule_swaps(how: str) -> None:
    """200 rule swaps, each a new distinct retry policy and head edits, with
    requests flowing: on one keep-alive client, per swap, two pipelined
    requests (the first answered 503 once: retried under the policy); every
    25 swaps a request held at the backend through the next 25 swaps, a
    second pipelined behind it, then answered 503 and retried (its policy's
    backoff) and answered, its response edited by the edits it was routed
    with 25 generations ago; every 10 swaps a connection whose second,
    pipelined request goes to the pure relay. Each answer is its own
    generation's edits, request and response; the interned counts stay
    under BOUND at every swap (they passed 200 without the sweep), sweeps
    ran, and nothing stays interned after close()."""
    up = Echo()
    state = {"gen": 0}

    def decide(head: Any, origin: Any) -> Decision:
        retry, edits = _rules(state["gen"])
        return Decision((up.endpoint,), tag="t", retry=retry, edits=edits)

    kw: dict[str, Any] = {}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            retry, edits = _rules(state["gen"])
            choice = Choice(1, (up.endpoint,), "ORDERED", tag="t", edits=edits)
            return Verdict((choice,), ttl=60.0, retry=retry)

        kw["resolve"] = resolve
    relay = _relay("compiled", decide, **kw)
    ids = iter(range(1 << 30))

    def request(*extra: bytes, target: bytes = b"/x") -> bytes:
        lines = b"".join(b"%s: 1\r\n" % e for e in extra)
        return b"GET %s HTTP/1.1\r\nHost: a\r\nx-id: %d\r\n%s\r\n" % (target, next(ids), lines)

    try:
        a = _client(relay)
        ra = Reader(a)
        held: socket.socket | None = None
        held_gen = held_sweeps = 0
        sent = 0  # requests the backend is to read, tries apart
        most = {"retries": 0, "edits": 0}
        for gen in range(1, SWAPS + 1):
            state["gen"] = gen
            if how == "resolve":
                relay.invalidate()
            a.sendall(request(b"x-fail") + request())
            _check(ra.response(), gen)
            _check(ra.response(), gen)
            sent += 3
            if held is not None and gen - held_gen == HOLD_FOR:
                # a sweep freed what its routing had interned beside its own
                assert relay.interned_sweeps > held_sweeps
                up.release.set()
                rh = Reader(held)
                _check(rh.response(), held_gen)  # retried and edited as routed
                _check(rh.response(), gen)  # (routed after its answer)
                held.close()
                held = None
                sent += 3
            if held is None and gen + HOLD_FOR <= SWAPS:
                up.held.clear()
                up.release.clear()
                held, held_gen, held_sweeps = _client(relay), gen, relay.interned_sweeps
                held.sendall(request(b"x-hold") + request())
                assert up.held.wait(5)
            if gen % SLOW_EVERY == 0:
                s = _client(relay)
                s.sendall(request() + request(target=b"http://a/x"))
                rs = Reader(s)
                _check(rs.response(), gen)
                _check(rs.response(), gen)  # (the pure relay's)
                s.close()
                sent += 2
            most["retries"] = max(most["retries"], relay.interned_retries)
            most["edits"] = max(most["edits"], relay.interned_edits)
            assert relay.interned_retries <= BOUND, (gen, relay.interned_retries)
            assert relay.interned_edits <= BOUND, (gen, relay.interned_edits)
        a.close()
        assert held is None
        assert up.requests == sent, (up.requests, sent)
        stats = relay.stats()
        assert stats["errors"] == 0, stats
        assert stats["slow_path"] == SWAPS // SLOW_EVERY, stats
        # what the sweep has to do (the first sweep comes past 16 of each)
        assert relay.interned_sweeps >= SWAPS // BOUND, relay.interned_sweeps
        assert most["retries"] > 16 and most["edits"] > 16, most
    finally:
        up.release.set()
        relay.close()
        up.close()
    assert relay.interned_retries == 0 and relay.interned_edits == 0


# the swaps made while requests are delayed: fewer than SWAPS, so that they
# all come within HELD_DELAY on a loaded machine too (30 ms each); still
# well past the bounds (a sweep-less relay passes them by the 35th)
HELD_SWAPS = 100
HELD_DELAY = 3.0  # a held request's delay: past every swap's


def _fault(gen: int, delay: float) -> Fault:
    """Generation *gen*'s fault: distinct from every other generation's,
    a delay of about *delay*, then an abort whose status names *gen*."""
    return Fault(
        delay=delay + gen * 1e-6,
        delay_ppm=FAULT_SCALE,
        abort_status=400 + gen % 100,
        abort_ppm=FAULT_SCALE,
    )


@pytest.mark.parametrize("how", ["decide", "resolve"])
def test_interned_faults_stay_bounded_across_rule_swaps(how: str) -> None:
    """100 rule swaps (HELD_SWAPS), each a new distinct fault (a delay of 1 ms, then an
    abort of a status of its generation's), a request per swap; two
    requests delayed through every swap (routed at the first with its
    distinct 3 s faults): one aborted after it (its fault's answer read
    then: its own generation's status), one whose route has no endpoint
    (its 503 given after it, its verdict long freed). The interned faults
    stay under BOUND at every swap (they pass it without the sweep),
    sweeps ran, and nothing stays interned after close()."""
    state = {"gen": 0}
    routed: list[str] = []  # the held requests routed

    def fault_of(target: str) -> Fault:
        if target.startswith("/held"):
            routed.append(target)
        if target == "/held-none":  # (its delay alone: no abort)
            return Fault(delay=HELD_DELAY + state["gen"] * 1e-6, delay_ppm=FAULT_SCALE)
        return _fault(state["gen"], HELD_DELAY if target == "/held" else 0.001)

    def decide(head: Any, origin: Any) -> Decision:
        endpoints = () if head.target == "/held-none" else (("127.0.0.1", 9),)
        return Decision(endpoints, tag="t", fault=fault_of(head.target))

    kw: dict[str, Any] = {}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            endpoints = () if head.target == "/held-none" else (("127.0.0.1", 9),)
            choice = Choice(1, endpoints, "ORDERED", tag="t")
            return Verdict((choice,), ttl=60.0, fault=fault_of(head.target))

        kw["resolve"] = resolve
    relay = _relay("compiled", decide, **kw)
    try:
        state["gen"] = 1
        held = _client(relay)
        held.sendall(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        none = _client(relay)
        none.sendall(b"GET /held-none HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _until(lambda: len(routed) == 2, 5.0)  # (at generation 1)
        a = _client(relay)
        ra = Reader(a)
        most = 0
        for gen in range(2, HELD_SWAPS + 1):
            state["gen"] = gen
            if how == "resolve":
                relay.invalidate()
            a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert undated(ra.response()) == local_response(
                400 + gen % 100, FAULT_ABORT_BODY, False
            )
            most = max(most, relay.interned_faults)
            assert relay.interned_faults <= BOUND, (gen, relay.interned_faults)
        # (the swaps came within the held requests' delay: it held them)
        assert relay.stats()["local_answers"] == HELD_SWAPS - 1
        assert relay.interned_sweeps >= HELD_SWAPS // BOUND, relay.interned_sweeps
        assert most > 16, most
        got = undated(Reader(held).response())
        assert got == local_response(401, FAULT_ABORT_BODY, False)
        got = undated(Reader(none).response())
        assert got == local_response(503, "no healthy upstream", False)
        for s in (a, held, none):
            s.close()
        stats = relay.stats()
        assert stats["errors"] == 0, stats
    finally:
        relay.close()
    assert relay.interned_faults == 0


FLUSH_EVERY = 5  # swaps between metric flushes (a row holds its tag's id till then)
# What a tag sweep keeps: the rows not flushed (FLUSH_EVERY, one a swap), the
# client's connection's and the held one's, the cached verdict's, one at the
# edge; twice that plus INTERN_SLACK (16) before the next sweep.
TAG_BOUND = 2 * (FLUSH_EVERY + 4) + 16


@pytest.mark.parametrize("fault_tag", [False, True], ids=["choice-tag", "fault-tag"])
@pytest.mark.parametrize("how", ["decide", "resolve"])
def test_tag_ids_stay_bounded_and_report_their_own_tags(how: str, fault_tag: bool) -> None:
    """100 rule swaps (HELD_SWAPS), each with a new distinct tag (every other one
    unhashable: an id per conversion), a request per swap answered by its
    generation's abort (a status of its own), and a request delayed
    through every swap under a tag of its own: the tag ids in use stay
    under TAG_BOUND at every swap (they pass it without the sweep), and
    every reported row, flushed whenever, has its own request's tag (a
    freed id reused never reports another tag). With *fault_tag*, each
    fault's abort is reported under a tag of the fault's own (Fault.tag,
    as the worker gives Istio's "unknown" labels), held by the interned
    fault: every row has its fault's tag, never its choice's, and the ids
    stay bounded too (the interned faults' and the tags' bounds)."""
    state = {"gen": 0}
    routed: list[str] = []
    rows: list[tuple[Any, int, int]] = []
    lock = threading.Lock()

    def report_rows(decided: Any, answered: Any) -> None:
        with lock:
            rows.extend((tag, status, count) for tag, status, count, _, _, _ in answered)

    def tag_fault(target: str) -> tuple[Any, Fault]:
        gen = state["gen"]
        if target == "/held":
            routed.append(target)
            tag, fault = "held", _fault(gen, HELD_DELAY)
        else:
            tag, fault = (f"t{gen}" if gen % 2 else ["u", gen]), _fault(gen, 0.0)
        if fault_tag:
            fault = fault._replace(tag=("fi", repr(tag)))
        return tag, fault

    def decide(head: Any, origin: Any) -> Decision:
        tag, fault = tag_fault(head.target)
        return Decision((("127.0.0.1", 9),), tag=tag, fault=fault)

    kw: dict[str, Any] = {"report_rows": report_rows}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            tag, fault = tag_fault(head.target)
            choice = Choice(1, (("127.0.0.1", 9),), "ORDERED", tag=tag)
            return Verdict((choice,), ttl=60.0, fault=fault)

        kw["resolve"] = resolve
    relay = _relay("compiled", decide, **kw)
    try:
        state["gen"] = 1
        held = _client(relay)
        held.sendall(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _until(lambda: len(routed) == 1, 5.0)
        a = _client(relay)
        ra = Reader(a)
        most = 0
        for gen in range(2, HELD_SWAPS + 1):
            state["gen"] = gen
            if how == "resolve":
                relay.invalidate()
            a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert undated(ra.response()) == local_response(
                400 + gen % 100, FAULT_ABORT_BODY, False
            )
            if gen % FLUSH_EVERY == 0:
                relay.flush_reports(1.0)
            most = max(most, relay.interned_tags)
            assert relay.interned_tags <= TAG_BOUND + fault_tag * BOUND, (gen, relay.interned_tags)
        assert relay.stats()["local_answers"] == HELD_SWAPS - 1  # (the held one still held)
        assert undated(Reader(held).response()) == local_response(401, FAULT_ABORT_BODY, False)
        a.close()
        held.close()
        relay.flush_reports(1.0)
        assert relay.tag_sweeps >= HELD_SWAPS // TAG_BOUND, relay.tag_sweeps
        assert most > 16, most
    finally:
        relay.close()
    want: list[tuple[Any, int, int]] = [("held", 401, 1)]
    for gen in range(2, HELD_SWAPS + 1):
        want.append((f"t{gen}" if gen % 2 else ["u", gen], 400 + gen % 100, 1))
    if fault_tag:
        want = [(("fi", repr(tag)), status, n) for tag, status, n in want]
    key = repr
    assert sorted(rows, key=key) == sorted(want, key=key)


class HeldMirror:
    """A mirror that reads a copy (its head and Content-Length body), then
    holds it until ``release`` is set, and answers 207 (a status no other
    request here gets). ``copies``: the copies read."""

    def __init__(self) -> None:
        self.copies = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.backend = Backend(self._serve)
        self.endpoint = self.backend.endpoint

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        if _read_request(conn, b"") is None:  # (the whole copy, its body too)
            conn.close()
            return
        with self.lock:
            self.copies += 1
        self.release.wait(20)
        conn.sendall(b"HTTP/1.1 207 X\r\ncontent-length: 0\r\n\r\n")
        conn.close()

    def close(self) -> None:
        self.backend.close()


@pytest.mark.parametrize("how", ["decide", "resolve"])
def test_a_copys_tag_survives_sweeps_while_it_is_held(how: str) -> None:
    """A copy in flight (its mirror holds it), and a request's drawn copy
    not started yet (its body held by its client), each with a Mirror.tag
    of its own, through 100 rule swaps (HELD_SWAPS), each a request of a
    new tag answered by its abort, its verdict with a mirror of a new tag
    (never drawn): sweeps ran meanwhile, and once the body came and the
    mirror answers, each copy is reported with its own Mirror's tag (a
    freed id reused reported another tag, or none)."""
    up, mirror = Scripted([]), HeldMirror()
    state = {"gen": 0}
    routed: list[str] = []
    rows: list[tuple[Any, int, int]] = []
    lock = threading.Lock()

    def report_rows(decided: Any, answered: Any) -> None:
        with lock:
            rows.extend((tag, status, count) for tag, status, count, _, _, _ in answered)

    def route(target: str) -> tuple[Any, tuple[Endpoint, ...], Fault | None, Mirror]:
        """*target*'s tag, endpoints, fault and mirror now."""
        if target in ("/held", "/plan"):
            routed.append(target)
            return target, (up.endpoint,), None, Mirror((mirror.endpoint,), tag=target + "-copy")
        gen = state["gen"]
        tag = f"t{gen}" if gen % 2 else ["u", gen]
        never = Mirror((mirror.endpoint,), ppm=0, tag=("m", repr(tag)))
        return tag, (("127.0.0.1", 9),), _fault(gen, 0.0), never

    def decide(head: Any, origin: Any) -> Decision:
        tag, endpoints, fault, m = route(head.target)
        return Decision(endpoints, tag=tag, fault=fault, mirrors=(m,))

    kw: dict[str, Any] = {"report_rows": report_rows}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            tag, endpoints, fault, m = route(head.target)
            choice = Choice(1, endpoints, "ORDERED", tag=tag)
            return Verdict((choice,), ttl=60.0, fault=fault, mirrors=(m,))

        kw["resolve"] = resolve
    relay = _relay("compiled", decide, **kw)
    try:
        state["gen"] = 1
        held = _client(relay)
        held.sendall(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        assert Reader(held).response().startswith(b"HTTP/1.1 200 ")
        assert _until(lambda: mirror.copies == 1, 5.0)  # (in flight, held)
        plan = _client(relay)
        plan.sendall(b"POST /plan HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
        assert _until(lambda: routed == ["/held", "/plan"], 5.0)  # (its copy drawn)
        sweeps = relay.tag_sweeps
        a = _client(relay)
        ra = Reader(a)
        for gen in range(2, HELD_SWAPS + 1):
            state["gen"] = gen
            if how == "resolve":
                relay.invalidate()
            a.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert undated(ra.response()) == local_response(
                400 + gen % 100, FAULT_ABORT_BODY, False
            )
            if gen % FLUSH_EVERY == 0:
                relay.flush_reports(1.0)
        assert relay.tag_sweeps > sweeps, relay.tag_sweeps
        plan.sendall(b"llo")
        assert Reader(plan).response().startswith(b"HTTP/1.1 200 ")
        assert _until(lambda: mirror.copies == 2, 5.0)
        mirror.release.set()
        assert _until(lambda: relay.stats()["mirror_active"] == 0, 5.0)
        relay.flush_reports(1.0)
        stats = relay.stats()
        for s in (a, held, plan):
            s.close()
    finally:
        mirror.release.set()
        relay.close()
        up.close()
        mirror.close()
    assert stats["mirrored"] == 2 and stats["errors"] == 0, stats
    copies = sorted((row for row in rows if row[1] == 207), key=repr)
    assert copies == [("/held-copy", 207, 1), ("/plan-copy", 207, 1)]
