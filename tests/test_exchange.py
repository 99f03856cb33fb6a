"""The per-request exchange core (l4proxy.dataplane._exchange_py), driven without sockets.

A small driver plays the shell: it performs the actions, opens numbered
upstream connections (reused ones when the test says so) and records every
byte each side received. Each scenario is run with the bytes fed whole and
again one byte at a time: the bytes delivered must not depend on the split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from l4proxy.dataplane._exchange_py import (
    Action,
    Client,
    Close,
    Done,
    Exchange,
    NotHTTPConnection,
    Phase,
    Release,
    Retry,
    Route,
    Tunnel,
    Upstream,
    client_head,
    response_hop_by_hop,
    upstream_head,
)
from l4proxy.dataplane._framing_py import parse_response_head
from l4proxy.dataplane._peek_py import parse_head
from l4proxy.dataplane.accesslog import UT
from l4proxy.dataplane.verdict import HeadEdits, PathRewrite, RetryPolicy
from tests.conftest import sent_up


@dataclass
class Driver:
    """Plays the I/O shell around one Exchange."""

    ex: Exchange = field(default_factory=Exchange)
    reuse: list[bool] = field(default_factory=list)  # per checkout: from the pool?
    refuse: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> answer
    client: bytearray = field(default_factory=bytearray)
    upstreams: list[bytearray] = field(default_factory=list)  # bytes each one received
    released: list[bool] = field(default_factory=list)
    done: list[tuple[int, bool]] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # Close, Tunnel, Retry, NotHTTP
    # what each Release told outlier detection: "answered", or the failure
    outcomes: list[str] = field(default_factory=list)
    retry: RetryPolicy | None = None  # every route's retry policy

    def play(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, Route):
                self.routes.append(a.head.path)
                if a.head.path in self.refuse:
                    self.play(self.ex.refuse(*self.refuse[a.head.path]))
                else:
                    self.upstreams.append(bytearray())
                    reused = self.reuse.pop(0) if self.reuse else False
                    self.ex.retry = self.retry
                    self.play(self.ex.routed(reused))
            elif isinstance(a, Upstream):
                self.upstreams[-1] += a.data
            elif isinstance(a, Client):
                self.client += a.data
            elif isinstance(a, Release):
                self.released.append(a.reusable)
                if a.answered or a.failure:
                    self.outcomes.append(a.failure or "answered")
            elif isinstance(a, Done):
                self.done.append((a.status, a.local))
            elif isinstance(a, Retry):
                self.events.append("Retry(policy)" if a.policy else "Retry")
                self.upstreams.append(bytearray())
                self.play(self.ex.routed(False))
            elif isinstance(a, NotHTTPConnection):
                self.events.append("NotHTTP")
                self.client += b"<L4:" + a.data + b">"
            else:
                assert isinstance(a, Close | Tunnel)
                self.events.append(type(a).__name__)

    def send(self, data: bytes, step: int = 0) -> None:
        for piece in pieces(data, step):
            self.play(self.ex.client_data(piece))

    def answer(self, data: bytes, step: int = 0) -> None:
        for piece in pieces(data, step):
            self.play(self.ex.upstream_data(piece))


def pieces(data: bytes, step: int) -> list[bytes]:
    if not step:
        return [data]
    return [data[i : i + step] for i in range(0, len(data), step)]


GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"
GET_B = b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv1"
OK2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv2"
# OK as a client whose connection closes after it gets it (see client_head)
OK_CLOSING = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nv1"
STEPS = [0, 1]


@pytest.mark.parametrize("step", STEPS)
def test_every_request_of_a_keep_alive_connection_is_routed_on_its_own(step: int) -> None:
    d = Driver()
    d.send(GET, step)
    d.answer(OK, step)
    d.send(GET_B, step)
    d.answer(OK2, step)
    assert d.routes == ["/a", "/b"]
    assert [bytes(u) for u in d.upstreams] == [sent_up(GET), sent_up(GET_B)]
    assert d.client == OK + OK2
    assert d.released == [True, True] and d.done == [(200, False), (200, False)]
    assert d.events == [] and d.ex.phase == Phase.HEAD


@pytest.mark.parametrize("step", STEPS)
def test_empty_lines_before_a_request_line_do_not_go_upstream(step: int) -> None:
    """The empty lines (CRLF, a bare LF) the parser skips before a request
    line (RFC 9112 §2.2), the first request's and a keep-alive one's: the
    head sent upstream starts with its request line (see "Empty lines")."""
    d = Driver()
    d.send(b"\r\n\n" + GET, step)
    d.answer(OK, step)
    d.send(b"\r\n\r\n" + GET_B, step)
    d.answer(OK2, step)
    assert [bytes(u) for u in d.upstreams] == [sent_up(GET), sent_up(GET_B)]
    assert d.client == OK + OK2 and d.routes == ["/a", "/b"]


def test_a_refused_head_s_line_is_its_request_line_after_empty_lines() -> None:
    """The access log's line of a head the parser refused names its
    request line, not the empty lines skipped before it (an empty
    method and path)."""
    ex = Exchange()
    ex.client_data(b"\r\n\n\r\nGET /a HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n")
    assert ex.refused_line == b"GET /a HTTP/1.1"


def test_a_staged_head_without_a_request_line_is_refused_400() -> None:
    """refused_rewrite() on a head as staged whose first line has no
    target between two SPs (never: the head is staged from its request
    line; the compiled edit_request() the same): the parser's 400 for a
    path it refuses, the connection closed, where it raised ValueError
    (the connection reset)."""
    ex = Exchange()
    assert [type(a) for a in ex.client_data(GET)] == [Route]
    ex.edits = HeadEdits(path=PathRewrite(1, "/x"))
    ex._sent_head = b"\r\n" + GET  # (as a head was staged before the fix)
    actions = ex.refused_rewrite()
    assert actions is not None
    sent = b"".join(a.data for a in actions if isinstance(a, Client))
    assert sent.startswith(b"HTTP/1.1 400 "), actions
    assert any(isinstance(a, Close) for a in actions), actions


@pytest.mark.parametrize("step", STEPS)
def test_connection_close_client_keeps_the_upstream_reusable(step: int) -> None:
    req = b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\nX-A: 1\r\n\r\n"
    d = Driver()
    d.send(req, step)
    d.answer(OK, step)
    assert d.upstreams[0] == sent_up(b"GET /a HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n")
    # the upstream did not see the close, so its answer gets it added back
    assert d.client == OK_CLOSING and d.released == [True] and d.events == ["Close"]


def _up(raw: bytes) -> bytes:
    head = parse_head(raw)
    assert head is not None
    return upstream_head(raw, head)


def test_upstream_head_drops_http11_connection_lines() -> None:
    assert _up(b"GET / HTTP/1.1\r\nHost: a\r\nconnection: Keep-Alive\r\n\r\n") == (
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert _up(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
    ) == (b"GET / HTTP/1.1\r\nHost: a\r\nX-B: 2\r\n\r\n")
    for kept in (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, upgrade\r\nUpgrade: x\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Connection: close\r\nTE: trailers\r\n\r\n",
    ):
        assert _up(kept) is kept


def test_upstream_head_drops_hop_by_hop_fields_and_those_connection_names() -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: a\r\nKeep-Alive: 1\r\nPROXY-CONNECTION: x\r\nTE: gzip\r\n"
        b"Content-Length: 0\r\nConnection: x-a, Content-Length\r\nconnection: HOST, x-b\r\n"
        b"x-a: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"
    )
    assert _up(raw) == b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-C: 3\r\n\r\n"
    # an HTTP/1.0 Connection line stays unless it names only fields that go
    raw = b"GET / HTTP/1.0\r\nConnection: x-a\r\nConnection: close, x-b\r\nX-A: 1\r\n\r\n"
    assert _up(raw) == b"GET / HTTP/1.0\r\nConnection: close, x-b\r\n\r\n"
    # an Upgrade request keeps its upgrade: its Connection line naming it,
    # and the fields that line names (h2c's HTTP2-Settings); another
    # Connection line goes, with what it names alone
    raw = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, x-a\r\nUpgrade: ws\r\nX-A: 1\r\n"
        b"Connection: x-a, x-b\r\nX-B: 2\r\n\r\n"
    )
    assert _up(raw) == (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, x-a\r\nUpgrade: ws\r\nX-A: 1\r\n\r\n"
    )


def test_upstream_head_says_a_repeated_content_length_once() -> None:
    """RFC 9110 §8.6: equal values, on lines or in a list, go as one line in
    the first one's place (its name as sent), beside the other drops; a
    Connection naming it drops no length."""
    raw = (
        b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 2 , 2\r\nKeep-Alive: 1\r\n"
        b"Connection: Content-Length, x-a\r\nX-A: 1\r\nContent-Length: 2\r\nX-B: 2\r\n\r\n"
    )
    assert _up(raw) == b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 2\r\nX-B: 2\r\n\r\n"
    raw = b"POST / HTTP/1.0\r\nContent-Length: 0,0\r\nConnection: keep-alive\r\n\r\n"
    assert _up(raw) == b"POST / HTTP/1.0\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"


CHUNKED_REQ = (
    b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)
CHUNKED_RESP = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n"
)


@pytest.mark.parametrize("step", STEPS)
def test_chunked_both_ways_with_trailers_byte_identical(step: int) -> None:
    d = Driver()
    d.send(CHUNKED_REQ + GET, step)  # a pipelined GET behind it
    assert d.routes == ["/up"]  # one in flight at a time
    d.answer(CHUNKED_RESP, step)
    assert d.upstreams[0] == sent_up(CHUNKED_REQ)
    assert d.routes == ["/up", "/a"] and d.upstreams[1] == sent_up(GET)
    d.answer(OK, step)
    assert d.client == CHUNKED_RESP + OK and d.released == [True, True]


@pytest.mark.parametrize(
    ("request_raw", "response"),
    [
        (
            b"HEAD /a HTTP/1.1\r\nHost: svc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        ),
        (GET, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (GET, b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nContent-Length: 5\r\n\r\n"),
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
)
def test_bodyless_responses_end_with_their_head(request_raw: bytes, response: bytes) -> None:
    d = Driver()
    d.send(request_raw)
    d.answer(response)
    d.send(GET_B)
    d.answer(OK2)
    assert d.client == response + OK2 and d.released == [True, True]


@pytest.mark.parametrize("step", STEPS)
def test_expect_100_continue(step: int) -> None:
    head = b"PUT /f HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    d = Driver()
    d.send(head, step)
    assert d.ex.wants_client_data  # the body may come
    d.answer(cont, step)
    assert d.client == cont and d.done == []
    d.send(b"data", step)
    d.answer(OK, step)
    assert d.upstreams[0] == sent_up(head + b"data") and d.client == cont + OK
    assert d.released == [True] and d.done == [(200, False)]


def test_upgrade_and_connect_become_tunnels() -> None:
    up = b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    d = Driver()
    d.send(up + b"\x81\x00early")
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00hi"
    d.answer(switch)
    # (the early frame goes up with the switch)
    assert d.upstreams[0] == sent_up(up + b"\x81\x00early")
    assert d.client == switch and d.events == ["Tunnel"] and d.ex.phase == Phase.TUNNEL
    assert d.ex.client_data(b"more") == []  # the L4 relay owns the sockets now

    d = Driver()
    d.send(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    d.answer(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    assert d.events == ["Tunnel"]


def test_close_delimited_response_closes_both_sides() -> None:
    d = Driver()
    d.send(GET)
    d.answer(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    assert d.done == []
    d.play(d.ex.upstream_eof())
    assert d.client == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close"
    assert d.released == [False] and d.done == [(200, False)] and d.events == ["Close"]


@pytest.mark.parametrize("response", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"])
def test_reused_connection_closed_before_any_response_byte_is_retried_once(
    response: bytes,
) -> None:
    d = Driver(reuse=[True])
    d.send(GET)
    d.play(d.ex.upstream_eof())
    assert d.events == ["Retry"] and d.released == [False]
    assert [bytes(u) for u in d.upstreams] == [sent_up(GET), sent_up(GET)]
    if not response:  # the fresh connection fails too: no second retry
        d.play(d.ex.upstream_eof())
        assert d.client.startswith(b"HTTP/1.1 503 ") and d.events == ["Retry"]
        assert b"connection: close" not in d.client and d.ex.phase == Phase.HEAD  # it stays
        return
    d.answer(response)
    d.play(d.ex.upstream_eof())  # truncated after bytes were forwarded: no 502 over them
    assert d.client == response and d.events == ["Retry", "Close"]
    assert d.done == [(200, False)]  # counted, once, as the 200 the client got


@pytest.mark.parametrize(
    ("reused", "request_raw"),
    [
        (False, GET),  # a new connection: the server really refused this request
        (True, b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\nx"),  # not idempotent
    ],
)
def test_no_retry_when_unsafe(reused: bool, request_raw: bytes) -> None:
    d = Driver(reuse=[reused])
    d.send(request_raw)
    d.play(d.ex.upstream_eof())
    assert "Retry" not in d.events and len(d.upstreams) == 1
    assert d.client.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and d.done == [(503, True)]


def test_a_request_that_never_left_is_retried_whatever_its_method() -> None:
    """The shell says the connection failed before the kernel took a byte
    of the request (unsent: the bytes it held): a POST is sent again too."""
    post = b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\nx"
    d = Driver(reuse=[True])
    d.send(post)
    d.play(d.ex.upstream_eof(unsent=bytes(d.upstreams[0])))
    assert d.events == ["Retry"] and [bytes(u) for u in d.upstreams] == [sent_up(post)] * 2
    d = Driver(reuse=[False])  # a new connection: the server refused it, not sent again
    d.send(post)
    d.play(d.ex.upstream_eof(unsent=bytes(d.upstreams[0])))
    assert "Retry" not in d.events and d.done == [(503, True)]


def test_no_retry_when_the_body_outgrew_the_replay_buffer() -> None:
    d = Driver(ex=Exchange(replay_limit=10), reuse=[True])
    d.send(b"PUT /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
    d.play(d.ex.upstream_eof())
    assert "Retry" not in d.events and d.done == [(503, True)]


# (the answers fed whole: a retried try's connection is closed, and its
# bytes after the head that decided it never reach the exchange)
def _policy(attempts: int, on: str, codes: tuple[int, ...] = ()) -> RetryPolicy:
    return RetryPolicy.of(attempts, 0.0, on.split(","), codes)


UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno"


@pytest.mark.parametrize("step", STEPS)
def test_a_retry_policy_drops_a_retriable_answer_and_sends_the_request_again(step: int) -> None:
    post = b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc"
    d = Driver(retry=_policy(2, "gateway-error"))
    d.send(post, step)
    d.answer(UNAVAILABLE)
    d.answer(UNAVAILABLE)
    d.answer(OK)
    # any method, whole, each try saying which it is
    assert [bytes(u) for u in d.upstreams] == [sent_up(post, n) for n in (1, 2, 3)]
    assert d.events == ["Retry(policy)", "Retry(policy)"]
    assert d.client == OK and d.done == [(200, False)]  # counted once
    assert d.released == [False, False, True]  # the 503s' connections closed
    assert d.outcomes == ["answered"] * 3  # an application's 503 is an answer


@pytest.mark.parametrize("step", STEPS)
def test_out_of_tries_the_last_answer_is_the_client_s(step: int) -> None:
    d = Driver(retry=_policy(1, "retriable-status-codes", (503,)))
    d.send(GET, step)
    d.answer(UNAVAILABLE)
    d.answer(UNAVAILABLE)
    assert d.events == ["Retry(policy)"] and d.client == UNAVAILABLE
    assert d.done == [(503, False)]


def test_an_interim_head_forwarded_makes_the_next_head_final() -> None:
    d = Driver(retry=_policy(3, "5xx"))
    d.send(GET)
    d.answer(b"HTTP/1.1 100 Continue\r\n\r\n" + UNAVAILABLE)
    assert d.events == [] and d.client.endswith(UNAVAILABLE)


def test_a_close_before_the_head_is_retried_under_reset_only() -> None:
    for on, retried in (("reset", True), ("gateway-error", True), ("retriable-4xx", False)):
        d = Driver(retry=_policy(1, on))
        d.send(GET)
        d.play(d.ex.upstream_eof())
        assert d.events == (["Retry(policy)"] if retried else ["Close"][:0]), (on, d.events)
        assert d.outcomes == ["upstream closed the connection before a response"]


def test_the_reused_connection_s_retry_leaves_a_held_post_alone() -> None:
    """A policy holds a POST: the keep-alive race's retry (idempotent
    methods, or a request that never left) must not take it."""
    post = b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\nx"
    d = Driver(reuse=[True], retry=_policy(1, "retriable-4xx"))
    d.send(post)
    d.play(d.ex.upstream_eof())
    assert d.events == [] and d.done == [(503, True)]


def test_the_per_try_timeout_retries_until_a_final_head_went_out() -> None:
    d = Driver(retry=_policy(1, "reset"))
    d.send(GET)
    d.play(d.ex.try_timeout())
    assert d.events == ["Retry(policy)"] and d.outcomes == ["upstream request timeout"]
    d.play(d.ex.try_timeout())  # out of tries: the route timeout's 504
    assert d.client.startswith(b"HTTP/1.1 504 ") and d.done == [(504, True)]
    d = Driver(retry=_policy(3, "5xx"))
    d.send(GET)
    d.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsho")
    assert d.ex.try_timeout() == []  # the response began: ignored (Envoy)


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
]


@pytest.mark.parametrize("raw", SMUGGLING)
def test_ambiguous_heads_are_refused_with_400_and_close(raw: bytes) -> None:
    d = Driver()
    d.send(raw + b"0\r\n\r\n")
    assert d.client.startswith(b"HTTP/1.1 400 Bad Request\r\n") and d.events == ["Close"]
    assert d.upstreams == [] and d.routes == []


@pytest.mark.parametrize(
    "te", [b"chunked, gzip", b"gzip, chunked", b"chunked\r\nTransfer-Encoding: "]
)
def test_a_transfer_encoding_other_than_chunked_is_refused_with_501_and_close(te: bytes) -> None:
    d = Driver()
    d.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: %s\r\n\r\n0\r\n\r\n" % te)
    assert d.client.startswith(b"HTTP/1.1 501 Not Implemented\r\n") and d.events == ["Close"]
    assert d.upstreams == [] and d.routes == [] and d.done == [(501, True)]


@pytest.mark.parametrize(
    ("body", "refused_at"),
    [
        (b"zz\r\n", 0),
        (b"5\r\nhello\n0\r\n\r\n", 8),
        (b"8000000000000000\r\n", 15),  # the digit that overflows
        (b"5\nhello\r\n", 1),
    ],
)
def test_bad_chunked_request_bodies_are_cut_and_refused(body: bytes, refused_at: int) -> None:
    """Fed whole, the body bytes before the refused one go up after the
    head (as they would have, fed apart), then the 400 and the close."""
    head = b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    d = Driver()
    d.send(head + body)
    assert d.upstreams == [sent_up(head + body[:refused_at])]
    assert d.client.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert d.released == [False] and d.events == ["Close"]
    apart = Driver()
    apart.send(head + body[:refused_at])
    apart.send(body[refused_at:])
    assert (apart.upstreams, apart.client) == (d.upstreams, d.client)


def test_ambiguous_response_is_a_502() -> None:
    d = Driver()
    d.send(GET)
    d.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nxx")
    assert d.client.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert d.released == [False] and d.events == []  # the request was read whole: it stays


def test_a_502_keeps_the_client_only_when_its_request_was_read_whole() -> None:
    """A gateway failure's local answer (Envoy's local reply): the client
    connection stays when the request, its body too, was read and its head
    asked to persist; a pipelined request is then served. Else it closes: a
    body half read, a client that asked to close or half-closed."""
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
    d = Driver()
    d.send(b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nab" + GET_B)
    d.answer(bad)
    assert d.client.startswith(b"HTTP/1.1 502 ") and b"connection: close" not in d.client
    assert d.routes == ["/a", "/b"] and d.events == []
    d.answer(OK2)
    assert d.client.endswith(OK2) and d.done == [(502, True), (200, False)]

    for request, eof in (
        (b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nab", False),
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n", False),
        (GET, True),
    ):
        d = Driver()
        d.send(request)
        if eof:
            d.play(d.ex.client_eof())
        d.answer(bad)
        assert b"connection: close" in d.client and d.events == ["Close"], request


def test_a_bad_head_after_an_interim_one_keeps_the_interim_then_answers_502() -> None:
    """The interim head went to the client: the bad final head that follows
    in the same bytes cannot take it back. An interim head is not an answer,
    so the 502 follows it (it did not: the request ended unanswered, and
    uncounted)."""
    d = Driver()
    d.send(GET)
    d.answer(b"HTTP/1.1 100 Continue\r\n\r\n\rTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    interim, _, final = bytes(d.client).partition(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue" and final.startswith(b"HTTP/1.1 502 "), d.client
    assert d.released == [False] and d.events == [] and d.done == [(502, True)]


def test_local_answer_keeps_a_bodyless_keep_alive_connection_usable() -> None:
    d = Driver(refuse={"/secret": (404, "no route")})
    d.send(b"GET /secret HTTP/1.1\r\nHost: svc\r\n\r\n" + GET)
    assert d.client.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"connection: close" not in bytes(d.client).lower()
    assert d.routes == ["/secret", "/a"] and len(d.upstreams) == 1
    d.answer(OK)
    assert d.client.endswith(OK) and d.done == [(404, True), (200, False)]

    d = Driver(refuse={"/secret": (404, "no route")})  # with a body: answer and close
    d.send(b"POST /secret HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
    assert b"connection: close" in bytes(d.client) and d.events == ["Close"]


def test_not_http_first_bytes_go_l4_but_later_ones_are_refused() -> None:
    d = Driver()
    d.send(b"\x16\x03\x01\x00hello")
    assert d.events == ["NotHTTP"] and d.client == b"<L4:\x16\x03\x01\x00hello>"

    d = Driver()
    d.send(GET)
    d.answer(OK)
    d.send(b"\x16\x03\x01\x00hello")
    assert d.client.startswith(OK + b"HTTP/1.1 400 ") and d.events == ["Close"]


def test_response_before_the_request_body_ends_closes_both() -> None:
    d = Driver()
    d.send(b"PUT /big HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\npartial")
    d.answer(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert d.done == [(413, False)] and d.released == [False] and d.events == ["Close"]


def test_client_half_close_after_its_request_still_gets_the_answer() -> None:
    d = Driver()
    d.send(GET)
    d.play(d.ex.client_eof())
    assert d.events == []
    d.answer(OK)
    assert d.client == OK_CLOSING and d.released == [True] and d.events == ["Close"]


def test_client_gone_mid_body_releases_the_upstream_unreusable() -> None:
    d = Driver()
    d.send(b"PUT /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabc")
    d.play(d.ex.client_eof())
    assert d.released == [False] and d.events == ["Close"]
    assert d.done == [(0, False)]  # counted, with no status (Envoy's response code 0)


def test_response_that_says_close_is_not_reused_but_the_client_stays() -> None:
    """The upstream's persistence is not the client's (HAProxy, Envoy): its
    connection is closed, the client's stays, and the head the client gets
    no longer says close (nothing else in it changes)."""
    d = Driver()
    d.send(GET)
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nv1"
    d.answer(closing)
    assert d.client == OK and d.released == [False] and d.events == []
    d.send(GET_B)
    d.answer(OK2)
    assert d.client == OK + OK2 and d.released == [False, True] and d.events == []
    assert d.done == [(200, False), (200, False)] and d.ex.phase == Phase.HEAD


def test_response_that_says_close_closes_a_client_that_asked_to_close() -> None:
    d = Driver()
    d.send(b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nv1"
    d.answer(closing)
    assert d.client == closing  # it says so already: not added twice
    assert d.released == [False] and d.events == ["Close"]


@pytest.mark.parametrize("step", STEPS)
def test_chunked_response_that_says_close_keeps_the_client(step: int) -> None:
    d = Driver()
    d.send(GET)
    body = b"2\r\nv1\r\n0\r\n\r\n"
    d.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body, step
    )
    assert d.client == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert d.released == [False] and d.events == [] and d.ex.phase == Phase.HEAD


def test_close_delimited_response_closes_the_client_whatever_it_asked() -> None:
    d = Driver()
    d.send(GET)
    d.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close")
    d.play(d.ex.upstream_eof())
    assert d.client == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close"
    assert d.released == [False] and d.events == ["Close"]


@pytest.mark.parametrize(
    ("request_", "response", "client"),
    [
        # HTTP/1.0 without keep-alive: the client is told keep-alive
        (
            GET,
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nv1",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nv1",
        ),
        # an HTTP/1.0 client that asked keep-alive, answered close in HTTP/1.1
        (
            b"GET /a HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: CLOSE\r\nContent-Length: 2\r\n\r\nv1",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nv1",
        ),
        # every line of close / keep-alive alone goes, other lines stay
        (
            GET,
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-A: 1\r\nConnection: , close \r\n"
            b"Content-Length: 2\r\n\r\nv1",
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nv1",
        ),
        # the upstream's Keep-Alive goes too: its timeout / max were about
        # the upstream connection, which closes
        (
            GET,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=1, max=1\r\n"
            b"Content-Length: 2\r\n\r\nv1",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv1",
        ),
        # whatever its case, among other lines, as many as there are; a
        # header whose name only starts so (Keep-Alive-X) stays
        (
            GET,
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nkEEP-aLIVE: max=5\r\nConnection: close\r\n"
            b"Keep-Alive-X: 2\r\nContent-Length: 2\r\nKEEP-ALIVE:timeout=3\r\nX-B: keep-alive\r\n"
            b"\r\nv1",
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nKeep-Alive-X: 2\r\nContent-Length: 2\r\n"
            b"X-B: keep-alive\r\n\r\nv1",
        ),
        # HTTP/1.0 without keep-alive but with a Keep-Alive line: it goes,
        # and the client is told keep-alive (by us, with no parameters)
        (
            GET,
            b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=1, max=1\r\nContent-Length: 2\r\n\r\nv1",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nv1",
        ),
        # a 204 (no body): the same
        (
            GET,
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ),
    ],
    ids=[
        "http10",
        "http10_client",
        "lines",
        "keep_alive",
        "keep_alive_mixed",
        "http10_ka_line",
        "204",
    ],
)
def test_a_closing_response_head_is_rewritten_for_a_client_that_stays(
    request_: bytes, response: bytes, client: bytes
) -> None:
    d = Driver()
    d.send(request_)
    d.answer(response)
    assert d.client == client and d.released == [False] and d.events == []
    sent, got = parse_response_head(response), parse_response_head(bytes(d.client))
    assert sent is not None and got is not None  # one head, framed as before
    for name in ("content-length", "transfer-encoding"):
        assert got.values(name) == sent.values(name)


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: close, x-foo\r\n",
        # the same field on two lines (RFC 9110 §5.3): the same answer
        b"Connection: close\r\nConnection: x-foo\r\n",
        b"Connection: x-foo\r\nConnection: close\r\n",
        b"Connection: keep-alive, x-foo\r\nConnection: CLOSE\r\n",
    ],
    ids=["one_line", "two_lines", "two_lines_other_first", "keep_alive_beside_other"],
)
def test_a_close_beside_other_tokens_drops_what_it_names_and_keeps_the_client(
    connection: bytes,
) -> None:
    """``Connection: close, x-foo``: the field also names a hop-by-hop field
    of that response (RFC 9110 §7.6.1: a proxy MUST drop it), on one line
    or on several. It used to go as it was (Keep-Alive too), and the client
    connection closed, since only a close / keep-alive line could be
    dropped; now x-foo goes with the Connection lines and Keep-Alive, so
    nothing of the upstream's hop is left and the client stays."""
    d = Driver()
    d.send(GET)
    closing = (
        b"HTTP/1.1 200 OK\r\n" + connection + b"x-foo: 1\r\nKeep-Alive: timeout=1\r\n"
        b"Content-Length: 2\r\n\r\nv1"
    )
    d.answer(closing)
    assert d.client == OK and d.released == [False] and d.events == []


@pytest.mark.parametrize(
    ("head", "keep", "http10", "out"),
    [
        # Apache with mod_http2, on every HTTP/1.1 answer: its offer to
        # upgrade its own connection and that connection's parameters go
        (
            b"HTTP/1.1 200 OK\r\nUpgrade: h2,h2c\r\nConnection: Upgrade, Keep-Alive\r\n"
            b"Keep-Alive: timeout=5, max=100\r\nContent-Length: 2\r\n\r\n",
            True,
            False,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        ),
        # ... to an HTTP/1.0 client, told keep-alive by the relay
        (
            b"HTTP/1.1 200 OK\r\nUpgrade: h2,h2c\r\nConnection: Upgrade, Keep-Alive\r\n"
            b"Keep-Alive: timeout=5, max=100\r\nContent-Length: 2\r\n\r\n",
            True,
            True,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\n",
        ),
        # ... to a client that does not stay, told close
        (
            b"HTTP/1.1 200 OK\r\nUpgrade: h2,h2c\r\nConnection: Upgrade, Keep-Alive\r\n"
            b"Keep-Alive: timeout=5, max=100\r\nContent-Length: 2\r\n\r\n",
            False,
            False,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\n",
        ),
        # the fields Connection names, in any case, on any of its lines
        # (before or after them), but never the framing headers nor Host
        (
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nconnection: x-a, Content-Length, HOST\r\nX-B: 2\r\n"
            b"Content-Length: 2\r\nHost: h\r\nConnection: X-B,transfer-encoding\r\nX-C: 3\r\n"
            b"\r\n",
            True,
            False,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nHost: h\r\nX-C: 3\r\n\r\n",
        ),
        # Proxy-Connection and an HTTP/1.0 answer's keep-alive on a line
        # that goes: the relay says keep-alive itself
        (
            b"HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\n"
            b"Connection: keep-alive, x-a\r\nContent-Length: 2\r\n\r\n",
            True,
            False,
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\n",
        ),
        # the upstream's close among lines that go: the relay's own instead
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: max=1\r\n\r\n",
            False,
            False,
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",
        ),
    ],
    ids=["apache", "apache_http10_client", "apache_closing", "named", "http10", "close"],
)
def test_client_head_drops_hop_by_hop_fields(
    head: bytes, keep: bool, http10: bool, out: bytes
) -> None:
    resp = parse_response_head(head)
    assert resp is not None
    assert response_hop_by_hop(head)
    assert client_head(head, resp, keep, http10) == out


@pytest.mark.parametrize(
    ("head", "keep", "http10"),
    [
        # nginx, on every keep-alive answer: the relay's own word already
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True, False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True, True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False, False),
        # names that only start so, values that say so: not hop-by-hop
        (
            b"HTTP/1.1 200 OK\r\nKeep-Alive-X: 1\r\nX-Upgrade: h2\r\nX: close, x\r\n\r\n",
            True,
            False,
        ),
    ],
)
def test_a_head_without_hop_by_hop_lines_goes_as_it_is(
    head: bytes, keep: bool, http10: bool
) -> None:
    resp = parse_response_head(head)
    assert resp is not None
    assert not response_hop_by_hop(head)
    assert client_head(head, resp, keep, http10) is head


def test_a_persistent_answers_keep_alive_line_goes() -> None:
    """A Keep-Alive line goes whether or not the head says close: its
    ``timeout`` / ``max`` are about the upstream connection (pooled under
    the relay's own idle timeout), never the client's. It used to stay on
    a persistent answer (only a rewritten head dropped it); RFC 9110 §7.6.1
    asks a proxy to remove it, as Envoy and HAProxy do."""
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=1, max=1\r\n\r\n"
    resp = parse_response_head(head)
    assert resp is not None
    assert client_head(head, resp, True, False) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert client_head(head, resp, True, True) == (
        b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\n\r\n"
    )
    d = Driver()
    d.send(GET)
    d.answer(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=1\r\nContent-Length: 2\r\n\r\nv1")
    assert d.client == OK and d.released == [True] and d.events == []


def test_a_101_keeps_its_upgrade_and_connection_lines() -> None:
    """A 101's head is the tunnel's: it goes as the server sent it."""
    d = Driver()
    d.send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Keep-Alive: timeout=5\r\n\r\n"
    )
    d.answer(switching)
    assert d.client == switching


def test_http10_request_is_not_pooled_unless_keep_alive() -> None:
    d = Driver()
    d.send(b"GET /a HTTP/1.0\r\n\r\n")
    d.answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nv1")
    assert d.released == [False] and d.events == ["Close"]
    d = Driver()
    d.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    d.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv1")
    assert d.released == [True] and d.events == [] and d.ex.phase == Phase.HEAD


def test_backpressure_reads_the_client_only_when_its_bytes_are_wanted() -> None:
    ex = Exchange()
    assert ex.wants_client_data
    ex.client_data(GET)
    assert ex.phase == Phase.ROUTING and not ex.wants_client_data
    ex.routed(False)
    assert not ex.wants_client_data  # a bodyless request: the next one waits in the socket


# -- outlier detection: how the endpoint served, per Release -----------------------

BEFORE = "upstream closed the connection before a response"
MID = "upstream closed the connection mid-response"


def _eof(d: Driver) -> None:
    d.play(d.ex.upstream_eof())


OUTCOMES: dict[str, tuple[list[bool], Callable[[Driver], None], list[str]]] = {
    # name: (reuse per checkout, what happens after the GET, outcomes)
    "answered": ([], lambda d: d.answer(OK), ["answered"]),
    "a 5xx is an answer": (
        [],
        lambda d: d.answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
        ["answered"],
    ),
    "close-delimited": (
        [],
        lambda d: (d.answer(b"HTTP/1.1 200 OK\r\n\r\nall"), _eof(d)),
        ["answered"],
    ),
    "closed before": ([], _eof, [BEFORE]),
    "cut mid-body": (
        [],
        lambda d: (d.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"), _eof(d)),
        [MID],
    ),
    "cut mid-head": ([], lambda d: (d.answer(b"HTTP/1.1 200 OK\r\n"), _eof(d)), [MID]),
    "unframeable": (
        [],
        lambda d: d.answer(b"HTTP/1.1 OK\r\n\r\n"),
        ["malformed response status line"],
    ),
    "bad chunk": (
        [],
        lambda d: d.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ["chunk size is not hexadecimal"],
    ),
    # a reused connection closed before its answer: the retry is not a failure
    "retried, answered": ([True], lambda d: (_eof(d), d.answer(OK)), ["answered"]),
    "retried, failed again": ([True], lambda d: (_eof(d), _eof(d)), [BEFORE]),
    "client gone": ([], lambda d: d.play(d.ex.client_eof()), []),
}


@pytest.mark.parametrize("case", list(OUTCOMES))
def test_a_release_tells_how_the_endpoint_served(case: str) -> None:
    """Outlier detection's input (see health.py): an answer, whatever its
    status; a failure when the upstream closed before the response's end or
    sent one that cannot be framed; nothing for a retried reused connection
    or a client gone."""
    reuse, then, outcomes = OUTCOMES[case]
    d = Driver(reuse=list(reuse))
    d.send(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
    then(d)
    assert d.outcomes == outcomes


def test_a_client_error_is_no_failure_of_the_endpoint() -> None:
    """A request body that cannot be framed (the client's 400) releases the
    upstream without a word against it."""
    d = Driver()
    d.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert d.client.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert d.released == [False] and d.outcomes == []


# -- the route timeout ----------------------------------------------------------


def test_route_timeout_before_the_response_answers_504_and_drops_the_upstream() -> None:
    d = Driver()
    assert not d.ex.request_complete
    d.send(b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nab")
    assert d.ex.phase == Phase.EXCHANGE and not d.ex.request_complete  # its body is due
    d.send(b"cd")
    assert d.ex.request_complete  # the timer runs from here
    d.play(d.ex.upstream_timeout())
    head, _, body = bytes(d.client).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"connection: close" not in head  # read whole: the connection stays
    assert body == b"upstream request timeout"
    assert d.released == [False] and d.outcomes == ["upstream request timeout"]
    assert d.done == [(504, True)] and d.events == [] and d.ex.phase == Phase.HEAD
    assert d.ex.upstream_timeout() == []  # over: a late timer does nothing
    d.answer(OK)  # nor does a late answer
    assert d.done == [(504, True)]


def test_route_timeout_after_the_response_began_resets_the_client() -> None:
    d = Driver()
    d.send(GET)
    d.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    actions = d.ex.upstream_timeout()
    d.play(actions)
    assert Close(reset=True) in actions
    assert d.client.endswith(b"\r\n\r\nabc")  # no 504 after a head
    assert d.released == [False] and d.outcomes == ["upstream request timeout"]
    assert d.done == [(200, False)]  # the status the client got, once


def test_route_timeout_while_connecting_blames_no_endpoint() -> None:
    ex = Exchange()
    (route,) = ex.client_data(GET)
    assert isinstance(route, Route) and ex.phase == Phase.ROUTING
    assert ex.request_complete  # no body: timed from the head, the connect counts
    actions = ex.upstream_timeout()
    assert actions[0] == Release(False)  # no failure to report
    assert Done(504, True, UT) in actions and not any(isinstance(a, Close) for a in actions)
    assert not ex.request_complete and ex.phase == Phase.HEAD

    ex = Exchange()  # a client that asked to close: closed
    ex.client_data(b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    actions = ex.upstream_timeout()
    assert Done(504, True, UT) in actions and isinstance(actions[-1], Close)

    # a request whose body came whole with its head (timed from its
    # routing, request_complete): the body read and dropped, counted as
    # received, the connection kept; what looks like a request inside it is
    # never routed, and the request after it is
    ex = Exchange()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"
    post = b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s" % (
        len(smuggled),
        smuggled,
    )
    ex.client_data(post + b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert ex.request_complete
    actions = ex.upstream_timeout()
    assert Done(504, True, UT, received=len(smuggled)) in actions, actions
    assert not any(isinstance(a, Close) for a in actions), actions
    routes = [a for a in actions if isinstance(a, Route)]
    assert [r.head.path for r in routes] == ["/next"], actions

    # a request whose body is not all here (the relays start the timer only
    # once it is read: this is the exchange's own guard): closed, never the
    # body read as the next request
    ex = Exchange()
    ex.client_data(
        b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s"
        % (len(smuggled) + 1, smuggled)
    )
    assert not ex.request_complete
    actions = ex.upstream_timeout()
    assert Done(504, True, UT) in actions and isinstance(actions[-1], Close), actions
    assert not any(isinstance(a, Route) for a in actions)
