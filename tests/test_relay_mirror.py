"""Request mirroring (``verdict.Mirror`` on a Verdict, a Decision's
``mirrors``), applied by both relay twins (the compiled one deciding per
request and from a cached verdict), real sockets on loopback: what a
mirror receives (``shadow_head`` of the head as the primary received it,
the body bytes as sent), the share drawn per request with the seed, round
robin over a mirror's endpoints, copies that fail (refused, reset, never
answered) or cannot go (max_mirrors, a body past the replay limit), the
requests never mirrored (a fault's abort, a local answer), one copy per
request however often it is retried, pipelined requests, and no socket
left open by a copy, ended or cut by ``close()``; a copy whatever becomes
of the primary (no try reaching it: a bodyless request's copy goes, a
body's is dropped; a primary failing mid-body: dropped), and a copy's
endless answer read no further than ``MIRROR_READ_LIMIT``. Each copy
started reported once at its end with its Mirror's tag and its answer's
status as ``AnswerStatus`` reads it (``_Reports``), a copy dropped or cut
by ``close()`` never, the requests' own reports as without mirrors.

Counts, never times: a copy's end is waited for by polling the relay's
gauges (``mirror_active``) and the mirror's own records.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.dataplane._pool_py import PoolOptions
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    FAULT_SCALE,
    MIRROR_MAX_IDLE,
    MIRROR_SCALE,
    SHAPE_FULL,
    AnswerStatus,
    Choice,
    Fault,
    HeadEdits,
    Mirror,
    RetryPolicy,
    Verdict,
    shadow_head,
)
from tests._scripted import (
    OK_BODY,
    Scripted,
    _answer,
    _client,
    _response,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import accept_until_closed, dead_ports, reset_close, sent_up
from tests.test_relay_edges import Backend, _relay
from tests.test_relay_fault import _recv

Endpoint = tuple[str, int]
OK = _answer(200, OK_BODY)
GET = b"GET /x?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nX-Trace: 7\r\n\r\n"
TAG, COPY = "t", "copy"  # the requests' tag (their choice's), and the Mirrors'

_HEAD_END = re.compile(rb"\r?\n\r?\n")  # (a client's head may end its lines in a bare LF)
OK_MIRROR = "ok"  # answer, then close
RESET = "reset"  # read the request, close with a reset
HANG = "hang"  # read the request, never answer (until the relay closes)
# or the answer's bytes (then close), or a function of the request giving
# them in pieces, each sent on its own (TCP_NODELAY, a pause between)
Pieces = Callable[[bytes], list[bytes]]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _read_request(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """One whole request (its head and its body: Content-Length or
    chunked, no trailers) from *buf* and *conn*: (request, what follows);
    None at the end of the stream."""
    while (m := _HEAD_END.search(buf)) is None:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    end = m.end()
    head = buf[:end].lower()
    if b"transfer-encoding: chunked" in head:
        while b"\r\n0\r\n\r\n" not in buf[end - 2 :]:
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        stop = buf.index(b"\r\n0\r\n\r\n", end - 2) + 7
        return buf[:stop], buf[stop:]
    length = 0
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            length = int(value)
    while len(buf) < end + length:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return buf[: end + length], buf[end + length :]


def bytewise(answer: bytes) -> Pieces:
    """*answer* a byte at a time: its status line cut across reads."""
    return lambda request: [answer[i : i + 1] for i in range(len(answer))]


class Mirrored:
    """A mirror: one request per connection, answered as *how* says. What
    it saw: the requests with the order their connections were accepted
    in, connections accepted, and those the relay closed on it."""

    def __init__(self, how: str | bytes | Pieces = OK_MIRROR) -> None:
        self.how = how
        self.requests: list[tuple[int, bytes]] = []
        self.accepted = 0
        self.closed_by_relay = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint: Endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        accept_until_closed(self.listener, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        with self.lock:
            index = self.accepted
            self.accepted += 1
        threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(30)
        try:
            got = _read_request(conn, b"")
            if got is None:
                conn.close()
                return
            with self.lock:
                self.requests.append((index, got[0]))
            if self.how == RESET:
                reset_close(conn)
                return
            if self.how == HANG:
                try:
                    ended = conn.recv(65536) == b""
                except ConnectionResetError:  # (a copy that failed is reset)
                    ended = True
                if ended:
                    with self.lock:
                        self.closed_by_relay += 1
                conn.close()
                return
            if self.how == OK_MIRROR:
                conn.sendall(_answer(200, b"mirror's"))
            elif isinstance(self.how, bytes):
                conn.sendall(self.how)
            elif callable(self.how):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for piece in self.how(got[0]):
                    conn.sendall(piece)
                    time.sleep(0.001)  # (its own segment, most likely its own read)
            conn.close()
        except OSError:
            conn.close()

    def seen(self) -> list[bytes]:
        """The requests, in the order their connections were accepted."""
        with self.lock:
            return [r for _, r in sorted(self.requests)]

    def close(self) -> None:
        self.listener.close()


class Primary(Backend):
    """A keep-alive backend that reads chunked bodies too and answers OK
    (a Backend: its handler's connection closed, an OSError ending it)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        while (got := _read_request(conn, buf)) is not None:
            request, buf = got
            with self.lock:
                self.requests.append(request)
            conn.sendall(OK)


class _Dead:
    """A port nothing listens on (from ``dead_ports``): every connect
    refused."""

    def __init__(self, port: int) -> None:
        self.endpoint: Endpoint = ("127.0.0.1", port)

    def close(self) -> None:
        pass


def _mirror_relay(
    mode: tuple[str, str],
    endpoints: tuple[Endpoint, ...],
    mirrors: tuple[Mirror, ...],
    timeout: float = 0.0,
    retry: RetryPolicy | None = None,
    fault: Fault | None = None,
    local: tuple[int, str] | None = None,
    edits: HeadEdits | None = None,
    only: str | None = None,
    **kw: Any,
) -> Any:
    """A relay of the twin and mode sending every request to *endpoints*
    (in order, with the route's *edits*) with *mirrors* and *fault* (a
    cached verdict in the resolve mode); with *only*, a request to another
    path goes to *endpoints* without fault or mirrors."""
    which, how = mode
    fields: dict[str, Any] = {"timeout": timeout, "retry": retry, "local": local}
    extra: dict[str, Any] = {"fault": fault, "mirrors": mirrors}
    choices = () if local is not None else (Choice(1, endpoints, "ORDERED", tag="t", edits=edits),)

    def ours(head: Any) -> bool:
        return only is None or head.path == only

    if how == "resolve":
        verdict = Verdict(choices, ttl=60.0, shape=SHAPE_FULL, **fields, **extra)
        plain = Verdict(choices, ttl=60.0, shape=SHAPE_FULL, **fields)
        kw["resolve"] = lambda head, origin: verdict if ours(head) else plain

    def decide(head: Any, origin: Any) -> Decision:
        return Decision(endpoints, tag="t", edits=edits, **fields, **(extra if ours(head) else {}))

    return _relay(which, decide, **kw)


@contextlib.contextmanager
def _closing(*things: Any) -> Iterator[None]:
    """Close each of *things* (relays, backends, mirrors), in order, on
    leaving."""
    try:
        yield
    finally:
        for thing in things:
            thing.close()


@contextlib.contextmanager
def _mirrored(
    mode: tuple[str, str], up: Any, *mirrors: Any, ppm: int = MIRROR_SCALE, **kw: Any
) -> Iterator[Any]:
    """A ``_mirror_relay`` to the backend *up* with a Mirror (its share
    *ppm*, its tag COPY) to each of *mirrors*; the relay, *up* and the
    mirrors closed on leaving."""
    copies = tuple(Mirror((m.endpoint,), ppm=ppm, tag=COPY) for m in mirrors)
    relay = _mirror_relay(mode, (up.endpoint,), copies, **kw)
    with _closing(relay, up, *mirrors):
        yield relay


def _settled(relay: Any) -> dict[str, int]:
    """The relay's stats once no copy is in flight."""
    assert _until(lambda: relay.stats()["mirror_active"] == 0, 20.0), relay.stats()
    stats: dict[str, int] = relay.stats()
    return stats


def _answers(
    relay: Any,
    *requests: bytes,
    until: Callable[[], bool] = lambda: True,
    timeout: float = 5.0,
) -> tuple[list[bytes], dict[str, int]]:
    """*requests* one after another on one client connection to *relay*:
    their answers, and the relay's stats once *until* holds (polled up to
    *timeout*) and no copy is in flight; the client closed then."""
    a = _client(relay)
    got = []
    for request in requests:
        a.sendall(request)
        got.append(_response(a))
    assert _until(until, timeout), relay.stats()
    stats = _settled(relay)
    a.close()
    return got, stats


class _Reports:
    """What a relay reported, from either twin (the compiled one's rows
    expanded; its slow path's requests and copies come as the pure
    twin's): each request's or copy's (tag, status), the compiled one's
    decisions' tags, and its rows whose duration buckets do not sum to
    their count."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, int]] = []
        self.decided: list[Any] = []
        self.uneven: list[tuple[Any, int, int, tuple[int, ...]]] = []
        self.lock = threading.Lock()

    def report(self, tag: Any, status: int, seconds: float, flags: int) -> None:
        with self.lock:
            self.rows.append((tag, status))

    def report_rows(self, decided: Any, answered: Any) -> None:
        with self.lock:
            for tag, n in decided:
                self.decided += [tag] * n
            for tag, status, n, _, buckets, _ in answered:
                self.rows += [(tag, status)] * n
                if sum(buckets) != n:
                    self.uneven.append((tag, status, n, buckets))

    def kw(self, mode: tuple[str, str]) -> dict[str, Any]:
        """A relay's keywords for *mode*'s twin to report here."""
        out: dict[str, Any] = {"report": self.report}
        if mode[0] == "compiled":
            out.update(report_rows=self.report_rows, buckets=(1.0, 10.0, 100.0, 1000.0))
        return out

    def of(self, tag: Any) -> list[int]:
        """The statuses reported with *tag*, sorted."""
        with self.lock:
            return sorted(status for t, status in self.rows if t == tag)


def _ours_to(endpoint: Endpoint) -> int:
    """Sockets of this process connected to *endpoint* (the relay's)."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            with socket.socket(fileno=os.dup(int(name))) as s, contextlib.suppress(OSError):
                if s.family == socket.AF_INET and s.getpeername() == endpoint:
                    n += 1
        except OSError:
            continue
    return n


def _post(body: bytes) -> bytes:
    return b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_a_get_goes_to_its_mirror_as_its_shadow_head(mode: tuple[str, str]) -> None:
    """Every request mirrored: the mirror receives shadow_head() of what the
    primary received, the client the primary's answer byte for byte; the
    copy counted, none left in flight, and no socket of the relay to it
    once the mirror closed its connection (idle, evicted from the copies'
    pool)."""
    up, mirror = Scripted([]), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got,), stats = _answers(relay, GET, until=lambda: len(mirror.seen()) == 1)
        left = 0 if _until(lambda: _ours_to(mirror.endpoint) == 0, 5.0) else 1
    assert got == OK
    assert up.requests == [sent_up(GET)]
    assert mirror.seen() == [shadow_head(sent_up(GET))]
    assert b"Host: reviews-shadow:9080\r\n" in mirror.seen()[0]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == stats["mirror_failed"] == 0
    assert left == 0


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHOST:\t[::1]:8080 \r\nX-Connection: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: example\r\nKeep-Alive: timeout=5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:1\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: [::1]\r\nProxy-Connection: keep-alive\r\n\r\n",
    ],
    ids=["ipv6-port", "no-port", "keep-alive", "ipv6"],
)
def test_the_copys_head_is_shadow_head_of_the_head_as_sent(
    mode: tuple[str, str], request_head: bytes
) -> None:
    """Host forms and hop-by-hop lines, with a request header
    the route's edits set: the mirror gets shadow_head() of the head the
    primary received, edits applied."""
    up, mirror = Primary(), Mirrored()
    edits = HeadEdits(request_set=(("x-edited", "yes"),))
    with _mirrored(mode, up, mirror, edits=edits) as relay:
        (got,), stats = _answers(relay, request_head, until=lambda: len(mirror.seen()) == 1)
    assert got.startswith(b"HTTP/1.1 200 X\r\n") and got.endswith(b"\r\n\r\nok")
    assert len(up.requests) == 1
    assert b"x-edited: yes" in up.requests[0]
    assert mirror.seen() == [shadow_head(up.requests[0])]
    assert stats["mirrored"] == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_body_goes_to_the_mirror_as_sent(mode: tuple[str, str], chunked: bool) -> None:
    """A POST with a Content-Length, and one chunked: the mirror gets the
    head's shadow and the same body bytes the primary got."""
    body = b"x" * 3000
    if chunked:
        request = (
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\nbb8\r\n" + body + b"\r\n0\r\n\r\n"
        )
    else:
        request = _post(body)
    up, mirror = Primary(), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got,), stats = _answers(relay, request, until=lambda: len(mirror.seen()) == 1)
    assert got == OK
    assert len(up.requests) == 1
    sent = up.requests[0]
    hl = sent.index(b"\r\n\r\n") + 4
    assert sent == sent_up(request)
    assert mirror.seen() == [shadow_head(sent[:hl]) + sent[hl:]]
    assert stats["mirrored"] == 1


def test_a_share_of_zero_sends_no_copy(mode: tuple[str, str]) -> None:
    up, mirror = Scripted([]), Mirrored()
    with _mirrored(mode, up, mirror, ppm=0) as relay:
        got, stats = _answers(relay, *[GET] * 5)
    assert got == [OK] * 5
    assert len(up.requests) == 5
    assert mirror.accepted == 0
    assert stats["mirrored"] == stats["mirror_dropped"] == 0


def _share(mode: tuple[str, str], seed: int, n: int) -> int:
    up, mirror = Scripted([]), Mirrored()
    with _mirrored(mode, up, mirror, ppm=MIRROR_SCALE // 2, seed=seed) as relay:
        got, stats = _answers(relay, *[GET] * n)
        mirrored = stats["mirrored"]
        assert _until(lambda: len(mirror.seen()) == mirrored, 5.0)
    assert got == [OK] * n
    assert len(up.requests) == n
    assert stats["mirror_dropped"] == stats["mirror_failed"] == 0
    return mirrored


def test_a_share_is_drawn_per_request_with_the_seed(mode: tuple[str, str]) -> None:
    """50 % of 200 requests over one keep-alive connection: a count within
    4 sigma of 100, the same again with the same seed."""
    n, p = 200, 0.5
    first = _share(mode, 7, n)
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(first - n * p) <= 4 * sigma, first
    assert _share(mode, 7, n) == first


def test_each_mirror_gets_its_copy(mode: tuple[str, str]) -> None:
    up, one, two = Scripted([]), Mirrored(), Mirrored()
    with _mirrored(mode, up, one, two) as relay:
        got, stats = _answers(
            relay, *[GET] * 3, until=lambda: len(one.seen()) == len(two.seen()) == 3
        )
    assert got == [OK] * 3
    assert one.seen() == two.seen() == [shadow_head(sent_up(GET))] * 3
    assert stats["mirrored"] == 6


def test_a_mirrors_endpoints_take_turns(mode: tuple[str, str]) -> None:
    """Round robin over a mirror's two endpoints: four requests, two each,
    alternating (the requests' targets tell them apart)."""
    up, one, two = Scripted([]), Mirrored(), Mirrored()
    relay = _mirror_relay(mode, (up.endpoint,), (Mirror((one.endpoint, two.endpoint)),))
    with _closing(relay, up, one, two):
        a = _client(relay)
        for i in range(4):
            a.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            assert _response(a) == OK
            assert _until(lambda i=i: len(one.seen()) + len(two.seen()) == i + 1, 5.0)
        stats = _settled(relay)
        a.close()
    targets = [[r.split(b" ")[1] for r in m.seen()] for m in (one, two)]
    assert sorted(targets) == [[b"/0", b"/2"], [b"/1", b"/3"]]
    assert stats["mirrored"] == 4


@pytest.mark.parametrize("how", ["refused", RESET, HANG])
def test_a_failing_mirror_changes_nothing_for_the_client(mode: tuple[str, str], how: str) -> None:
    """A mirror refusing connections, resetting, or never answering (past
    the route's timeout: its deadline): the client's answers as without a
    mirror, each copy counted failed and reported with status 0, none in
    flight, no socket left."""
    up, reports = Scripted([]), _Reports()
    with dead_ports(1) as ports:
        mirror = _Dead(ports[0]) if how == "refused" else Mirrored(how)
        with _mirrored(mode, up, mirror, timeout=0.5, **reports.kw(mode)) as relay:
            got, stats = _answers(
                relay, GET, GET, until=lambda: relay.stats()["mirror_failed"] == 2, timeout=10.0
            )
            left = _ours_to(mirror.endpoint)
    assert got == [OK, OK]
    assert up.requests == [sent_up(GET)] * 2
    assert stats["mirrored"] == 2
    assert stats["mirror_failed"] == 2
    assert stats["mirror_dropped"] == 0
    assert left == 0
    assert reports.of(COPY) == [0, 0]  # (no answer: refused, reset, past the deadline)
    if isinstance(mirror, Mirrored):
        assert mirror.seen() == [shadow_head(sent_up(GET))] * 2
    if how == HANG:
        assert _until(lambda: isinstance(mirror, Mirrored) and mirror.closed_by_relay == 2)


def test_copies_past_max_mirrors_are_dropped(mode: tuple[str, str]) -> None:
    """max_mirrors=1 and a mirror that never answers: the second request's
    copy is dropped and counted; both requests answered. Neither copy is
    reported: the one dropped, nor the one in flight when the relay
    closes (the requests are)."""
    up, mirror, reports = Scripted([]), Mirrored(HANG), _Reports()
    with _mirrored(mode, up, mirror, max_mirrors=1, **reports.kw(mode)) as relay:
        a = _client(relay)
        got = []
        for _ in range(2):
            a.sendall(GET)
            got.append(_response(a))
        assert _until(lambda: len(mirror.seen()) == 1)
        stats = relay.stats()
        a.close()
    assert got == [OK, OK]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == 1
    assert stats["mirror_active"] == 1
    assert mirror.accepted == 1
    assert reports.of(COPY) == []
    assert reports.of(TAG) == [200, 200]


def test_a_body_past_the_replay_limit_is_not_mirrored(mode: tuple[str, str]) -> None:
    body = bytes(range(256)) * 280  # 71,680 bytes: past 64 KiB
    up, mirror, reports = Primary(), Mirrored(), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        (got, got2), stats = _answers(
            relay, _post(body), _post(b"small"), until=lambda: len(mirror.seen()) == 1
        )
    assert got == got2 == OK
    assert up.requests == [sent_up(_post(body)), sent_up(_post(b"small"))]
    small = sent_up(_post(b"small"))
    assert mirror.seen() == [shadow_head(small[: -len(b"small")]) + b"small"]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == 1
    assert reports.of(COPY) == [200]  # (the copy that went: the dropped one never)


def test_local_answers_are_not_mirrored(mode: tuple[str, str]) -> None:
    """A fault's abort, and the route's local answer: no copy, none counted."""
    mirror = Mirrored()
    mirrors = (Mirror((mirror.endpoint,)),)
    up = Scripted([])
    aborting = _mirror_relay(
        mode, (up.endpoint,), mirrors, fault=Fault(abort_status=503, abort_ppm=FAULT_SCALE)
    )
    answering = _mirror_relay(mode, (up.endpoint,), mirrors, local=(404, "nope"))
    with _closing(aborting, answering, up, mirror):
        got, stats = [], []
        for relay in (aborting, answering):
            answers, settled = _answers(relay, GET, GET)
            got += [int(r.split(b" ")[1]) for r in answers]
            stats.append(settled)
    assert got == [503, 503, 404, 404]
    assert up.requests == []
    assert mirror.accepted == 0
    for s in stats:
        assert s["mirrored"] == s["mirror_dropped"] == s["mirror_failed"] == 0


def test_a_retried_request_is_mirrored_once(mode: tuple[str, str]) -> None:
    """The first try answered 503, the retry policy's retry 200: the
    primary saw the request twice, the mirror once."""
    up, mirror = Scripted([_answer(503)]), Mirrored()
    with _mirrored(mode, up, mirror, retry=policy(2, "5xx")) as relay:
        (got,), stats = _answers(relay, GET, until=lambda: len(mirror.seen()) == 1)
    assert got == OK
    assert up.requests == [sent_up(GET), sent_up(GET, 2)]
    assert mirror.seen() == [shadow_head(sent_up(GET))]
    assert mirror.accepted == 1
    assert stats["mirrored"] == 1
    assert stats["retries"] == 1


def test_pipelined_requests_are_each_mirrored_once(mode: tuple[str, str]) -> None:
    up, mirror = Scripted([]), Mirrored()
    requests = [b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(4)]
    with _mirrored(mode, up, mirror) as relay:
        a = _client(relay)
        a.sendall(b"".join(requests))
        got = _recv(a, len(OK) * 4)  # (answers pipelined: as many as they come in)
        assert _until(lambda: len(mirror.seen()) == 4, 5.0)
        stats = _settled(relay)
        a.close()
    assert got == OK * 4
    assert up.requests == [sent_up(r) for r in requests]
    # (a copy on an idle connection the mirror closed goes again on a new
    # one: the order the mirror accepted its connections in is not theirs)
    assert sorted(mirror.seen()) == sorted(shadow_head(sent_up(r)) for r in requests)
    assert stats["mirrored"] == 4


def test_close_with_copies_in_flight_leaves_no_socket(mode: tuple[str, str]) -> None:
    """Three copies to a mirror that never answers, then close(): the
    relay's sockets to it are closed (the mirror sees each end)."""
    up, mirror = Scripted([]), Mirrored(HANG)
    with _mirrored(mode, up, mirror) as relay:
        a = _client(relay)
        for _ in range(3):
            a.sendall(GET)
            assert _response(a) == OK
        assert _until(lambda: len(mirror.seen()) == 3, 5.0)
        active = relay.stats()["mirror_active"]
        a.close()
    assert active == 3
    assert _ours_to(mirror.endpoint) == 0
    assert _until(lambda: mirror.closed_by_relay == 3, 5.0)


def test_a_spliced_body_is_a_dropped_copy(mode: tuple[str, str]) -> None:
    """A body long enough for the compiled relay to splice (past the replay
    limit, SPLICE_MIN still to come): its copy is dropped and counted, as
    the pure twin counts it (the compiled one freed it uncounted)."""
    body = b"b" * 400_000
    up, mirror = Primary(), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got,), stats = _answers(relay, _post(body))
    assert got == OK
    assert up.requests == [sent_up(_post(body))]
    assert mirror.accepted == 0
    assert stats["mirrored"] == 0
    assert stats["mirror_dropped"] == 1


def test_a_head_edited_past_the_replay_limit_is_not_mirrored(mode: tuple[str, str]) -> None:
    """A request without a body whose head as sent (the route's edits
    added a line) passes the replay limit: dropped in both twins (the pure
    one copied it)."""
    up, mirror = Primary(), Mirrored()
    edits = HeadEdits(request_set=(("x-edited", "y" * 200),))
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 65400 + b"\r\n\r\n"
    with _mirrored(mode, up, mirror, edits=edits) as relay:
        (got,), stats = _answers(relay, head)
    assert got == OK
    assert len(up.requests[0]) > 65536
    assert mirror.accepted == 0
    assert stats["mirrored"] == 0
    assert stats["mirror_dropped"] == 1


class _Continues(Backend):
    """A backend that answers a request's head with 100 Continue, then
    reads its body (Content-Length) and answers OK."""

    def __init__(self) -> None:
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert _read_request(conn, buf) is not None
        conn.sendall(OK)


def test_a_request_answered_100_continue_is_mirrored(mode: tuple[str, str]) -> None:
    """Expect: 100-continue, the server's 100 before the body: an interim
    head is no answer, the copy goes (both twins dropped it). The mirror
    answers the copy 100 Continue then 201: the copy is reported 201."""
    mirror, reports = Mirrored(CONTINUE + _answer(201)), _Reports()
    head = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    with _mirrored(mode, _Continues(), mirror, **reports.kw(mode)) as relay:
        a = _client(relay)
        a.sendall(head)
        interim = _recv(a, 25)
        a.sendall(b"hello")
        got = _response(a)
        assert _until(lambda: len(mirror.seen()) == 1, 5.0)
        stats = _settled(relay)
        a.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert got == OK
    assert mirror.seen() == [shadow_head(sent_up(head)) + b"hello"]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == 0
    assert reports.of(COPY) == [201]
    assert reports.of(TAG) == [200]


def test_a_copy_goes_when_no_try_reaches_the_primary(mode: tuple[str, str]) -> None:
    """The primary refuses every connect: the client gets its 503, and the
    mirror its copy all the same (Envoy's shadow goes whatever the primary
    does; both twins let it go uncounted)."""
    mirror = Mirrored()
    with dead_ports(1) as ports, _mirrored(mode, _Dead(ports[0]), mirror) as relay:
        (got,), stats = _answers(relay, GET, until=lambda: len(mirror.seen()) == 1)
    assert got.startswith(b"HTTP/1.1 503 ")
    assert stats["connect_errors"] == 1
    assert mirror.seen() == [shadow_head(sent_up(GET))]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == stats["mirror_failed"] == 0


def test_a_body_no_try_took_is_a_dropped_copy(mode: tuple[str, str]) -> None:
    """A POST, its body sent with its head, to a primary refusing every
    connect: its body was never read into a try, so not held: its copy is
    dropped and counted (both twins let it go uncounted)."""
    mirror = Mirrored()
    with dead_ports(1) as ports, _mirrored(mode, _Dead(ports[0]), mirror) as relay:
        (got,), stats = _answers(relay, _post(b"hello"))
    assert got.startswith(b"HTTP/1.1 503 ")
    assert mirror.accepted == 0
    assert stats["mirrored"] == 0
    assert stats["mirror_dropped"] == 1


class _ResetsMidBody(Backend):
    """A backend that reads a request's head (and what came with it), then
    resets the connection."""

    def __init__(self) -> None:
        self.heads = 0
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            self.heads += 1
        reset_close(conn)


def test_a_body_cut_by_the_primarys_failure_is_a_dropped_copy(mode: tuple[str, str]) -> None:
    """The primary resets while the client's body is half sent: the client
    gets the 503, the copy (the body not read whole) is dropped and
    counted (both twins let it go uncounted)."""
    up, mirror = _ResetsMidBody(), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got,), stats = _answers(
            relay, b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello"
        )
    assert got.startswith(b"HTTP/1.1 503 ")
    assert up.heads == 1
    assert mirror.accepted == 0
    assert stats["mirrored"] == 0
    assert stats["mirror_dropped"] == 1


def test_an_aborted_copy_leaves_nothing_for_the_next_request(mode: tuple[str, str]) -> None:
    """A mirrored request aborted by its fault, then one without mirrors on
    the same keep-alive connection: neither copied nor counted."""
    up, mirror = Primary(), Mirrored()
    abort = Fault(abort_status=503, abort_ppm=FAULT_SCALE)
    with _mirrored(mode, up, mirror, fault=abort, only="/m") as relay:
        (first, second), stats = _answers(
            relay, b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n"
        )
    assert first.startswith(b"HTTP/1.1 503 ")
    assert second == OK
    assert len(up.requests) == 1
    assert mirror.accepted == 0
    assert stats["mirrored"] == stats["mirror_dropped"] == stats["mirror_failed"] == 0


class _Endless(Backend):
    """A mirror that reads a request, then answers *head* and *piece* after
    piece for ever (close-delimited by default), until the relay closes the
    connection."""

    def __init__(
        self, head: bytes = b"HTTP/1.1 200 X\r\n\r\n", piece: bytes = b"z" * 65536
    ) -> None:
        self.head, self.piece = head, piece
        self.ended = 0
        self.lock = threading.Lock()
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):
            assert _read_request(conn, b"") is not None
            conn.sendall(self.head)
            while True:
                conn.sendall(self.piece)
        with self.lock:
            self.ended += 1


def test_an_endless_answer_to_a_copy_is_cut_after_the_read_limit(mode: tuple[str, str]) -> None:
    """A mirror streaming its answer forever: the relay reads at most
    MIRROR_READ_LIMIT of it, then closes the copy as done (not failed),
    long before the route's 30 s timeout would end it (both twins read it
    to the deadline, 64 KiB per event), and reports it once, with its
    status."""
    up, mirror, reports = Primary(), _Endless(), _Reports()
    with _mirrored(mode, up, mirror, timeout=30.0, **reports.kw(mode)) as relay:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _until(lambda: relay.stats()["mirrored"] == 1, 5.0)
        ended = _until(lambda: relay.stats()["mirror_active"] == 0, 10.0)
        stats = relay.stats()
        closed = ended and _until(lambda: mirror.ended == 1, 5.0)  # (by the relay)
        a.close()
    assert got == OK
    assert ended, stats
    assert closed
    assert stats["mirrored"] == 1
    assert stats["mirror_failed"] == stats["mirror_dropped"] == 0
    assert reports.of(COPY) == [200]


# -- each copy's report (Mirror.tag, its answer's status) -----------------------


@pytest.mark.parametrize(
    ("how", "status"),
    [
        (OK_MIRROR, 200),
        (_answer(503), 503),
        (CONTINUE + _answer(201), 201),  # (to a request without Expect)
        (b"", 0),  # closed without an answer
        (b"SSH-2.0-OpenSSH_9.2\r\n", 0),  # not HTTP/1.x
        (bytewise(CONTINUE + _answer(204)), 204),  # every head cut across reads
    ],
    ids=["200", "503", "continue-201", "closed", "not-http", "bytewise"],
)
def test_a_copy_is_reported_with_its_answers_status(
    mode: tuple[str, str], how: str | bytes | Pieces, status: int
) -> None:
    """Two requests, each copy answered as *how* says: each copy reported
    once, with its Mirror's tag and the status AnswerStatus reads (0 for
    none), none failed."""
    up, mirror, reports = Scripted([]), Mirrored(how), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        got, stats = _answers(relay, GET, GET, until=lambda: len(mirror.seen()) == 2)
    assert got == [OK, OK]
    assert stats["mirrored"] == 2
    assert stats["mirror_failed"] == 0
    assert reports.of(COPY) == [status, status]


def test_a_copy_the_slow_path_made_is_reported(mode: tuple[str, str]) -> None:
    """An absolute-form target: the compiled relay hands its connection
    to its pure relay (``slow``), whose copy is reported through
    ``report``, as its requests are."""
    up, mirror, reports = Scripted([]), Mirrored(_answer(203)), _Reports()
    request = b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n"
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        (got,), stats = _answers(relay, request, until=lambda: len(mirror.seen()) == 1)
    assert got == OK
    assert stats.get("slow_path", 0) == (mode[0] == "compiled")
    assert stats["mirrored"] == 1
    assert reports.of(COPY) == [203]


def test_every_copy_started_is_reported_once(mode: tuple[str, str]) -> None:
    """30 requests, each mirror drawn for half of them (seeded), one
    answering 200 and one 404: as many copies reported as ``mirrored``
    counts, each with its mirror's status, and each of the compiled
    relay's rows with its durations in as many buckets as its count."""
    up, one, two, reports = Scripted([]), Mirrored(), Mirrored(_answer(404)), _Reports()
    kw = reports.kw(mode)
    with _mirrored(mode, up, one, two, ppm=MIRROR_SCALE // 2, seed=3, **kw) as relay:
        got, stats = _answers(relay, *[GET] * 30)
    assert got == [OK] * 30
    assert 0 < len(one.seen()) < 30 and 0 < len(two.seen()) < 30
    assert stats["mirrored"] == len(one.seen()) + len(two.seen())
    assert reports.of(COPY) == [200] * len(one.seen()) + [404] * len(two.seen())
    assert reports.uneven == []


def test_mirroring_leaves_the_requests_reports_as_they_were(mode: tuple[str, str]) -> None:
    """The same three requests (answered 503, 200, 200), every one
    mirrored, then none: the requests' reports (tag and status) and the
    compiled relay's decisions the same; only the copies' come more."""
    seen = []
    for ppm, copies in ((MIRROR_SCALE, 3), (0, 0)):
        up, mirror, reports = Scripted([_answer(503)]), Mirrored(_answer(404)), _Reports()
        with _mirrored(mode, up, mirror, ppm=ppm, **reports.kw(mode)) as relay:
            _answers(relay, GET, GET, GET, until=lambda m=mirror, n=copies: len(m.seen()) == n)
        seen.append((reports.of(TAG), sorted(map(repr, reports.decided)), reports.of(COPY)))
    (requests, decided, copies), (requests_alone, decided_alone, none) = seen
    assert requests == requests_alone == [200, 200, 503]
    assert decided == decided_alone
    assert copies == [404] * 3
    assert none == []


def _random_answer(rng: random.Random) -> bytes:
    """An answer as a mirror may give it: a head (HTTP/1.0 or 1.1, any
    code, lines ending in CRLF or a bare LF) after interim heads or not,
    garbage after an interim head, or not HTTP/1.x at all; and a quarter of
    them cut short anywhere."""

    def head(code: int) -> bytes:
        end = rng.choice([b"\r\n", b"\n"])
        lines = [b"HTTP/1.%d %03d X" % (rng.randrange(2), code)]
        lines += [b"x-%d: %s" % (i, b"v" * rng.randrange(3)) for i in range(rng.randrange(3))]
        return end.join(lines) + end + end

    interim = b"".join(head(rng.choice([100, 102, 103, 199])) for _ in range(rng.randrange(3)))
    final = head(rng.choice([200, 201, 204, 301, 404, 503, 101, 999, 99, 0])) + b"body"
    garbage = rng.choice(
        [
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"http/1.1 200 X\r\n\r\n",
            b"HTTP/1.1  200\r\n\r\n",
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))),
        ]
    )
    answer = interim + rng.choice([final, final, final, garbage])
    if rng.random() < 1 / 4:
        answer = answer[: rng.randrange(len(answer) + 1)]
    return answer


def _cut(rng: random.Random, data: bytes) -> list[bytes]:
    """*data* in pieces, cut at up to four random points."""
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(5))))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_copys_status_is_answer_status_of_its_answer(which: str) -> None:
    """60 seeded random answers (_random_answer), each served in random
    pieces to the copy of request /i, whose Mirror's tag is ("copy", i):
    each copy reported once with the status AnswerStatus reads from the
    same bytes (the compiled relay's scan agrees with it however the
    answer is cut into reads)."""
    rng = random.Random(20260612)
    answers = [_random_answer(rng) for _ in range(60)]
    pieces = [_cut(rng, answer) for answer in answers]
    want = []
    for answer in answers:
        a = AnswerStatus()
        a.feed(answer)
        want.append(a.status)
    mirror, up, reports = (
        Mirrored(lambda r: pieces[int(r.split(b" ")[1][1:])]),
        Scripted([]),
        _Reports(),
    )

    def decide(head: Any, origin: Any) -> Decision:
        tag = ("copy", int(head.target[1:]))
        return Decision((up.endpoint,), tag=TAG, mirrors=(Mirror((mirror.endpoint,), tag=tag),))

    relay = _relay(which, decide, **reports.kw((which, "decide")))
    with _closing(relay, up, mirror):
        requests = [b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(len(answers))]
        got, stats = _answers(relay, *requests, until=lambda: len(mirror.seen()) == len(answers))
    assert got == [OK] * len(answers)
    assert stats["mirrored"] == len(answers)
    assert sorted(reports.rows, key=repr) == sorted(
        [(("copy", i), status) for i, status in enumerate(want)] + [(TAG, 200)] * len(answers),
        key=repr,
    )
    assert 0 < want.count(0) < len(want) and len(set(want)) > 5  # (a varied mix)


# -- the copies' pool (verdict.Mirror, "The copies' pool") ----------------------

KEEP, SHUT, CUT = "keep", "close", "reset"  # after an answer: go on, close, reset


class KeptAlive:
    """A keep-alive mirror: the n-th request it reads (over all its
    connections, from 0) gets ``answer(n, request)``, (its bytes, then
    KEEP, SHUT or CUT); with *hold*, no answer goes before *hold* requests
    came. What it saw: the requests, connections accepted, and those whose
    other end closed (a FIN: ``ended``) or reset them (``reset``)."""

    def __init__(self, answer: Callable[[int, bytes], tuple[bytes, str]], hold: int = 0) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.accepted = self.ended = self.reset = 0
        self.lock = threading.Lock()
        self.all_came = threading.Event()
        self.hold = hold
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.endpoint: Endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        accept_until_closed(self.listener, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        try:
            while (got := _read_request(conn, buf)) is not None:
                request, buf = got
                with self.lock:
                    n = len(self.requests)
                    self.requests.append(request)
                    if len(self.requests) >= self.hold:
                        self.all_came.set()
                self.all_came.wait(30)
                answer, then = self.answer(n, request)
                if then == CUT:
                    reset_close(conn)
                    return
                conn.sendall(answer)
                if then == SHUT:
                    conn.close()
                    return
            with self.lock:
                self.ended += 1
        except ConnectionResetError:
            with self.lock:
                self.reset += 1
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        self.listener.close()


def _always(answer: bytes, then: str = KEEP) -> Callable[[int, bytes], tuple[bytes, str]]:
    return lambda n, request: (answer, then)


def _one_at_a_time(relay: Any, requests: list[bytes]) -> dict[str, int]:
    """*requests* each on a client connection of its own (a HEAD's answer
    read to its head, an HTTP/1.0 one closes), each once the copies of the
    one before ended (none in flight): the relay's stats then."""
    for i, request in enumerate(requests):
        a = _client(relay)
        a.sendall(request)
        a.settimeout(5.0)
        got = b""
        while b"\r\n\r\n" not in got:
            data = a.recv(65536)
            assert data, got
            got += data
        assert got.startswith(b"HTTP/1.1 200 ")
        assert _until(lambda n=i + 1: relay.stats()["mirrored"] == n, 5.0)
        _settled(relay)
        a.close()
    return _settled(relay)


def test_copies_one_after_another_share_one_connection(mode: tuple[str, str]) -> None:
    """20 copies, each after the one before ended, to a keep-alive mirror:
    all on one connection (one accepted, one opened), each reported with
    its status, and that connection idle after."""
    up, mirror, reports = Scripted([]), KeptAlive(_always(_answer(200, b"mirror's"))), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        stats = _one_at_a_time(relay, [GET] * 20)
        relay.flush_reports()
    assert mirror.requests == [shadow_head(sent_up(GET))] * 20
    assert mirror.accepted == 1
    assert stats["mirror_connects"] == 1
    assert stats["mirror_idle"] == 1
    assert stats["mirror_failed"] == stats["mirror_dropped"] == 0
    assert reports.of(COPY) == [200] * 20


HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
GET10 = b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("request_", "answer", "then", "status", "reused"),
    [
        (GET, _answer(200, b"mirror's"), KEEP, 200, True),
        (
            GET,
            b"HTTP/1.1 201 X\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
            KEEP,
            201,
            True,
        ),
        (GET, b"HTTP/1.1 204 X\r\n\r\n", KEEP, 204, True),
        (GET, b"HTTP/1.1 304 X\r\nContent-Length: 9\r\n\r\n", KEEP, 304, True),
        (HEAD, b"HTTP/1.1 200 X\r\nContent-Length: 9\r\n\r\n", KEEP, 200, True),
        (GET, CONTINUE + b"HTTP/1.1 102 X\r\nA: b\r\n\r\n" + _answer(202, b"x"), KEEP, 202, True),
        (GET, b"HTTP/1.1 200 X\r\n\r\nto the close", SHUT, 200, False),
        (
            GET,
            b"HTTP/1.1 200 X\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            SHUT,
            200,
            False,
        ),
        (GET, b"HTTP/1.0 200 X\r\nContent-Length: 1\r\n\r\nx", SHUT, 200, False),
        (GET10, _answer(200, b"x"), SHUT, 200, False),
    ],
    ids=[
        "length",
        "chunked-trailers",
        "204",
        "304",
        "head",
        "interim",
        "close-delimited",
        "connection-close",
        "http10-answer",
        "http10-request",
    ],
)
def test_an_answer_is_read_to_its_end_by_its_framing(
    mode: tuple[str, str], request_: bytes, answer: bytes, then: str, status: int, reused: bool
) -> None:
    """Three copies, one after another, each answered *answer*: reported
    with *status*; on one connection when the answer's framing ends it and
    the connection may be reused, else each on its own (closed)."""
    up, mirror, reports = Scripted([]), KeptAlive(_always(answer, then)), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        stats = _one_at_a_time(relay, [request_] * 3)
        relay.flush_reports()
    assert len(mirror.requests) == 3
    assert mirror.accepted == stats["mirror_connects"] == (1 if reused else 3)
    assert stats["mirror_failed"] == stats["mirror_dropped"] == 0
    assert reports.of(COPY) == [status] * 3


def test_an_idle_connection_the_mirror_closed_is_not_handed_out(mode: tuple[str, str]) -> None:
    """The mirror closes the connection after its first answer: the relay
    evicts it while idle, and the next copy opens a new one (no retry, no
    failure), reported with its answer's status."""
    answers = [(_answer(200, b"x"), SHUT), (_answer(201, b"x"), KEEP)]
    up, mirror, reports = Scripted([]), KeptAlive(lambda n, r: answers[n]), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        a = _client(relay)
        a.sendall(GET)
        assert _response(a) == OK
        assert _until(lambda: _ours_to(mirror.endpoint) == 0, 5.0)  # (evicted)
        evicted = relay.stats()["mirror_idle"] == 0
        a.sendall(GET)
        assert _response(a) == OK
        stats = _settled(relay)
        a.close()
        relay.flush_reports()
    assert evicted
    assert len(mirror.requests) == 2
    assert mirror.accepted == stats["mirror_connects"] == 2
    assert stats["mirror_failed"] == 0
    assert reports.of(COPY) == [200, 201]


def test_a_reused_connection_reset_at_the_copy_sends_it_once_more(mode: tuple[str, str]) -> None:
    """The mirror resets its kept-alive connection when the second copy
    comes on it: that copy goes once more on a new connection, and is
    reported once, with that answer's status (none failed)."""
    answers = [(_answer(200, b"x"), KEEP), (b"", CUT), (_answer(201, b"x"), KEEP)]
    up, mirror, reports = Scripted([]), KeptAlive(lambda n, r: answers[n]), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        stats = _one_at_a_time(relay, [GET, GET])
        relay.flush_reports()
    assert mirror.requests == [shadow_head(sent_up(GET))] * 3
    assert mirror.accepted == stats["mirror_connects"] == 2
    assert stats["mirrored"] == 2
    assert stats["mirror_failed"] == 0
    assert reports.of(COPY) == [200, 201]


def test_idle_copy_connections_per_endpoint_are_bounded(mode: tuple[str, str]) -> None:
    """70 copies of one request in flight at once to one mirror (70
    Mirrors to it; its answers held until all 70 came): 70 connections,
    of which MIRROR_MAX_IDLE stay idle, the others closed."""
    mirror = KeptAlive(_always(_answer(200, b"x")), hold=70)
    up = Scripted([])
    copies = tuple(Mirror((mirror.endpoint,), tag=COPY) for _ in range(70))
    relay = _mirror_relay(mode, (up.endpoint,), copies)
    with _closing(relay, up, mirror):
        (got,), stats = _answers(relay, GET, until=lambda: len(mirror.requests) == 70)
        closed = _until(lambda: mirror.ended == 70 - MIRROR_MAX_IDLE, 5.0)
        ours = _ours_to(mirror.endpoint)
    assert got == OK
    assert mirror.accepted == stats["mirror_connects"] == 70
    assert stats["mirror_idle"] == MIRROR_MAX_IDLE
    assert closed, mirror.ended
    assert ours == MIRROR_MAX_IDLE


def test_idle_copy_connections_expire_after_the_pool_idle_timeout(mode: tuple[str, str]) -> None:
    """A relay whose pool idle timeout is 0.3 s: its idle copy connection
    is closed by the relay (the mirror sees its end), none left."""
    up, mirror = Scripted([]), KeptAlive(_always(_answer(200, b"x")))
    with _mirrored(mode, up, mirror, pool=PoolOptions(idle_timeout=0.3)) as relay:
        stats = _one_at_a_time(relay, [GET])
        expired = _until(lambda: mirror.ended == 1, 5.0)
        after = relay.stats()
    assert stats["mirror_idle"] == 1
    assert expired
    assert after["mirror_idle"] == 0
    assert _ours_to(mirror.endpoint) == 0


def test_a_final_head_the_relay_cannot_frame_ends_the_copy_with_a_reset(
    mode: tuple[str, str],
) -> None:
    """Two different Content-Lengths: the copy ends there, reported with
    its status, not failed, its connection reset (never reused: the next
    copy opens another)."""
    answer = b"HTTP/1.1 200 X\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"
    up, mirror, reports = Scripted([]), KeptAlive(_always(answer)), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode)) as relay:
        stats = _one_at_a_time(relay, [GET, GET])
        reset = _until(lambda: mirror.reset == 2, 5.0)
        relay.flush_reports()
    assert reset, (mirror.reset, mirror.ended)
    assert mirror.accepted == stats["mirror_connects"] == 2
    assert stats["mirror_failed"] == 0 and stats["mirror_idle"] == 0
    assert reports.of(COPY) == [200, 200]


def test_an_endless_chunked_answer_is_cut_after_the_read_limit(mode: tuple[str, str]) -> None:
    """A chunked answer whose chunks never end: the copy is cut once
    MIRROR_READ_LIMIT bytes were read (reset, not failed), and reported
    with its status."""
    chunk = b"10000\r\n" + b"z" * 0x10000 + b"\r\n"
    up, mirror, reports = (
        Primary(),
        _Endless(b"HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\n\r\n", chunk),
        _Reports(),
    )
    with _mirrored(mode, up, mirror, timeout=30.0, **reports.kw(mode)) as relay:
        (got,), stats = _answers(relay, GET, until=lambda: relay.stats()["mirrored"] == 1)
        closed = _until(lambda: mirror.ended == 1, 5.0)
        relay.flush_reports()
    assert got == OK
    assert closed
    assert stats["mirror_failed"] == stats["mirror_dropped"] == stats["mirror_idle"] == 0
    assert reports.of(COPY) == [200]


# -- an endpoint that leaves the route table (retain_endpoints) -----------------

PLAIN = b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n"  # (not mirrored: only=MIRRORED)
MIRRORED = "/x?q=1"  # (GET's target)
LONG_IDLE = PoolOptions(idle_timeout=300.0)  # (no expiry within a test)


def _answered(relay: Any, request: bytes) -> bytes:
    """*request* on a client connection of its own: its answer. Sent after
    a retain_endpoints() call, its answer says the relay applied it (the
    call's wake-up is taken before the new connection is)."""
    a = _client(relay)
    try:
        a.sendall(request)
        return _response(a)
    finally:
        a.close()


def test_a_removed_mirror_s_idle_copy_connections_close_at_once(mode: tuple[str, str]) -> None:
    """Three copies of one request (three Mirrors to one endpoint, its
    answers held until all came) leave three idle copy connections; a swap
    whose table no longer names the mirror closes them (the mirror sees
    each one's end) long before the pool idle timeout; the primary's idle
    connection, still named, stays."""
    mirror = KeptAlive(_always(_answer(200, b"x")), hold=3)
    up = Scripted([])
    copies = tuple(Mirror((mirror.endpoint,), tag=COPY) for _ in range(3))
    relay = _mirror_relay(mode, (up.endpoint,), copies, only=MIRRORED, pool=LONG_IDLE)
    with _closing(relay, up, mirror):
        relay.retain_endpoints([up.endpoint, mirror.endpoint])
        (got,), before = _answers(relay, GET, until=lambda: len(mirror.requests) == 3)
        relay.retain_endpoints([up.endpoint])
        closed = _until(lambda: mirror.ended == 3, 5.0)
        after = _settled(relay)
        ours = _ours_to(mirror.endpoint)
    assert got == OK
    assert before["mirror_idle"] == 3 and mirror.accepted == before["mirror_connects"] == 3
    assert closed, (mirror.ended, mirror.reset)
    assert after["mirror_idle"] == 0 and ours == 0
    assert after["pool_idle"] == 1 and after["pool_closed_removed"] == 0


def test_a_mirror_that_stays_keeps_its_idle_copy_connection(mode: tuple[str, str]) -> None:
    """Swaps that add and then remove another endpoint but keep the
    mirror's: the next copies take its idle connection (one accept, one
    connect, none closed)."""
    mirror = KeptAlive(_always(_answer(200, b"x")))
    up = Scripted([])
    other = ("198.18.0.99", 9080)  # (named, never routed to)
    relay = _mirror_relay(
        mode, (up.endpoint,), (Mirror((mirror.endpoint,), tag=COPY),), only=MIRRORED, pool=LONG_IDLE
    )
    with _closing(relay, up, mirror):
        relay.retain_endpoints([up.endpoint, mirror.endpoint])
        _one_at_a_time(relay, [GET])
        relay.retain_endpoints([up.endpoint, mirror.endpoint, other])
        relay.retain_endpoints([up.endpoint, mirror.endpoint])
        assert _answered(relay, PLAIN) == OK  # (both swaps applied)
        for n in (2, 3):
            assert _answered(relay, GET) == OK
            assert _until(lambda n=n: relay.stats()["mirrored"] == n, 5.0)
            stats = _settled(relay)
        ended = mirror.ended + mirror.reset  # (before close() ends it)
    assert len(mirror.requests) == 3
    assert mirror.accepted == stats["mirror_connects"] == 1
    assert ended == 0
    assert stats["mirror_idle"] == 1


@pytest.mark.parametrize("back", [False, True], ids=["removed", "named-again"])
def test_a_copy_in_flight_to_a_removed_mirror_closes_its_connection_at_its_end(
    mode: tuple[str, str], back: bool
) -> None:
    """A copy in flight (the mirror holds its answer) when a swap removes
    the mirror: at its answer's end its connection is closed, not left
    idle (the routes' pool's rule at check-in); named again before that
    end, it goes idle as before."""
    mirror = KeptAlive(_always(_answer(200, b"x")), hold=2)  # (released by hand)
    up = Scripted([])
    relay = _mirror_relay(
        mode, (up.endpoint,), (Mirror((mirror.endpoint,), tag=COPY),), only=MIRRORED, pool=LONG_IDLE
    )
    with _closing(relay, up, mirror):
        relay.retain_endpoints([up.endpoint, mirror.endpoint])
        assert _answered(relay, GET) == OK
        assert _until(lambda: len(mirror.requests) == 1, 5.0)
        relay.retain_endpoints([up.endpoint])
        if back:
            relay.retain_endpoints([up.endpoint, mirror.endpoint])
        assert _answered(relay, PLAIN) == OK  # (the swaps applied, the copy still held)
        held = relay.stats()["mirror_active"] == 1
        mirror.all_came.set()
        stats = _settled(relay)
        ended = _until(lambda: mirror.ended == 1, 0.5 if back else 5.0)
    assert held
    assert stats["mirror_failed"] == stats["mirror_dropped"] == 0
    assert stats["mirror_idle"] == (1 if back else 0)
    assert ended == (not back), (mirror.ended, mirror.reset)
