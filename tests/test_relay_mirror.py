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
endless answer read no further than ``MIRROR_READ_LIMIT``.

Counts, never times: a copy's end is waited for by polling the relay's
gauges (``mirror_active``) and the mirror's own records.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    FAULT_SCALE,
    MIRROR_SCALE,
    SHAPE_FULL,
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
from tests.conftest import accept_until_closed, dead_ports, reset_close
from tests.test_relay_edges import Backend, _relay
from tests.test_relay_fault import _recv

Endpoint = tuple[str, int]
OK = _answer(200, OK_BODY)
GET = b"GET /x?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nX-Trace: 7\r\n\r\n"

_HEAD_END = re.compile(rb"\r?\n\r?\n")  # (a client's head may end its lines in a bare LF)
OK_MIRROR = "ok"  # answer, then close
RESET = "reset"  # read the request, close with a reset
HANG = "hang"  # read the request, never answer (until the relay closes)


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


class Mirrored:
    """A mirror: one request per connection, answered as *how* says. What
    it saw: the requests with the order their connections were accepted
    in, connections accepted, and those the relay closed on it."""

    def __init__(self, how: str = OK_MIRROR) -> None:
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
            conn.sendall(_answer(200, b"mirror's"))
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
    *ppm*) to each of *mirrors*; the relay, *up* and the mirrors closed on
    leaving."""
    copies = tuple(Mirror((m.endpoint,), ppm=ppm) for m in mirrors)
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
    copy counted, none left in flight, no socket of the relay to it."""
    up, mirror = Scripted([]), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got,), stats = _answers(relay, GET, until=lambda: len(mirror.seen()) == 1)
        left = _ours_to(mirror.endpoint)
    assert got == OK
    assert up.requests == [GET]
    assert mirror.seen() == [shadow_head(GET)]
    assert b"Host: reviews-shadow:9080\r\n" in mirror.seen()[0]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == stats["mirror_failed"] == 0
    assert left == 0


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHOST:\t[::1]:8080 \r\nX-Connection: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: example\r\nKeep-Alive: timeout=5\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a:1\nConnection: keep-alive\nAccept: */*\n\n",
        b"GET / HTTP/1.0\r\nHost: [::1]\r\nProxy-Connection: keep-alive\r\n\r\n",
    ],
    ids=["ipv6-port", "no-port", "bare-lf", "ipv6"],
)
def test_the_copys_head_is_shadow_head_of_the_head_as_sent(
    mode: tuple[str, str], request_head: bytes
) -> None:
    """Host forms, line ends and hop-by-hop lines, with a request header
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
    assert sent[hl:] == request[request.index(b"\r\n\r\n") + 4 :]
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
    assert one.seen() == two.seen() == [shadow_head(GET)] * 3
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
    mirror, each copy counted failed, none in flight, no socket left."""
    up = Scripted([])
    with dead_ports(1) as ports:
        mirror = _Dead(ports[0]) if how == "refused" else Mirrored(how)
        with _mirrored(mode, up, mirror, timeout=0.5) as relay:
            got, stats = _answers(
                relay, GET, GET, until=lambda: relay.stats()["mirror_failed"] == 2, timeout=10.0
            )
            left = _ours_to(mirror.endpoint)
    assert got == [OK, OK]
    assert up.requests == [GET, GET]
    assert stats["mirrored"] == 2
    assert stats["mirror_failed"] == 2
    assert stats["mirror_dropped"] == 0
    assert left == 0
    if isinstance(mirror, Mirrored):
        assert mirror.seen() == [shadow_head(GET)] * 2
    if how == HANG:
        assert _until(lambda: isinstance(mirror, Mirrored) and mirror.closed_by_relay == 2)


def test_copies_past_max_mirrors_are_dropped(mode: tuple[str, str]) -> None:
    """max_mirrors=1 and a mirror that never answers: the second request's
    copy is dropped and counted; both requests answered."""
    up, mirror = Scripted([]), Mirrored(HANG)
    with _mirrored(mode, up, mirror, max_mirrors=1) as relay:
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


def test_a_body_past_the_replay_limit_is_not_mirrored(mode: tuple[str, str]) -> None:
    body = bytes(range(256)) * 280  # 71,680 bytes: past 64 KiB
    up, mirror = Primary(), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got, got2), stats = _answers(
            relay, _post(body), _post(b"small"), until=lambda: len(mirror.seen()) == 1
        )
    assert got == got2 == OK
    assert up.requests == [_post(body), _post(b"small")]
    small = _post(b"small")
    assert mirror.seen() == [shadow_head(small[: -len(b"small")]) + b"small"]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == 1


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
    assert up.requests == [GET, GET]
    assert mirror.seen() == [shadow_head(GET)]
    assert mirror.accepted == 1
    assert stats["mirrored"] == 1
    assert stats["retries"] == 1


def test_pipelined_requests_are_each_mirrored_once_in_order(mode: tuple[str, str]) -> None:
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
    assert up.requests == requests
    assert mirror.seen() == [shadow_head(r) for r in requests]
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
    assert up.requests == [_post(body)]
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
    head is no answer, the copy goes (both twins dropped it)."""
    mirror = Mirrored()
    head = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    with _mirrored(mode, _Continues(), mirror) as relay:
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
    assert mirror.seen() == [shadow_head(head) + b"hello"]
    assert stats["mirrored"] == 1
    assert stats["mirror_dropped"] == 0


def test_a_copy_goes_when_no_try_reaches_the_primary(mode: tuple[str, str]) -> None:
    """The primary refuses every connect: the client gets its 503, and the
    mirror its copy all the same (Envoy's shadow goes whatever the primary
    does; both twins let it go uncounted)."""
    mirror = Mirrored()
    with dead_ports(1) as ports, _mirrored(mode, _Dead(ports[0]), mirror) as relay:
        (got,), stats = _answers(relay, GET, until=lambda: len(mirror.seen()) == 1)
    assert got.startswith(b"HTTP/1.1 503 ")
    assert stats["connect_errors"] == 1
    assert mirror.seen() == [shadow_head(GET)]
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
    gets the 502, the copy (the body not read whole) is dropped and
    counted (both twins let it go uncounted)."""
    up, mirror = _ResetsMidBody(), Mirrored()
    with _mirrored(mode, up, mirror) as relay:
        (got,), stats = _answers(
            relay, b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello"
        )
    assert got.startswith(b"HTTP/1.1 502 ")
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
    """A mirror that reads a request, then answers with a body that never
    ends (close-delimited), until the relay closes the connection."""

    def __init__(self) -> None:
        self.ended = 0
        self.lock = threading.Lock()
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):
            assert _read_request(conn, b"") is not None
            conn.sendall(b"HTTP/1.1 200 X\r\n\r\n")
            chunk = b"z" * 65536
            while True:
                conn.sendall(chunk)
        with self.lock:
            self.ended += 1


def test_an_endless_answer_to_a_copy_is_cut_after_the_read_limit(mode: tuple[str, str]) -> None:
    """A mirror streaming its answer forever: the relay reads at most
    MIRROR_READ_LIMIT of it, then closes the copy as done (not failed),
    long before the route's 30 s timeout would end it (both twins read it
    to the deadline, 64 KiB per event)."""
    up, mirror = Primary(), _Endless()
    with _mirrored(mode, up, mirror, timeout=30.0) as relay:
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
