"""A route's head edits (``verdict.HeadEdits`` on a Choice, a Decision's
``edits``) and a local answer's ``local_headers``, applied by both relay
twins (the compiled one deciding per request and from a cached verdict),
byte for byte, real sockets: what a raw backend reads, what the client
reads. See "Head edits" in ``_exchange_py.py``.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import edit_bytes
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    SHAPE_FULL,
    Choice,
    HeadEdits,
    PathRewrite,
    RetryPolicy,
    Verdict,
)
from tests._scripted import (
    Scripted,
    _answer,
    _client,
    _recv,
    _response,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.conftest import epoch_response as local_response
from tests.conftest import sent_up, undated
from tests.test_relay_edges import _read_all, _relay

Endpoint = tuple[str, int]

# the first try's x-envoy-attempt-count, after the client's lines and before
# the lines a route's edits add (see "x-envoy-attempt-count" in _exchange_py.py)
COUNT = b"x-envoy-attempt-count: 1\r\n"
REQUEST_EDITS = HeadEdits(
    request_set=(("x-set", "new"),),
    request_add=(("x-add", "new"), ("x-more", "1")),
    request_remove=("x-remove",),
    path=PathRewrite(4, "/v2"),
    authority="b.svc:8080",
)
RESPONSE_EDITS = HeadEdits(
    response_set=(("server", "l4"),),
    response_add=(("x-added", "1"),),
    response_remove=("x-drop",),
)
BOTH = REQUEST_EDITS._replace(
    response_set=RESPONSE_EDITS.response_set,
    response_add=RESPONSE_EDITS.response_add,
    response_remove=RESPONSE_EDITS.response_remove,
)

# a final answer with a line set replaces and one removed; one with
# hop-by-hop lines too (a Connection naming a field, Keep-Alive)
PLAIN = b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Drop: 1\r\nX-Keep: k\r\nContent-Length: 2\r\n\r\nok"
HOP = (
    b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive, X-Hop\r\nX-Hop: h\r\n"
    b"Keep-Alive: timeout=5\r\nX-Drop: 1\r\nContent-Length: 2\r\n\r\nok"
)
HTTP10 = b"HTTP/1.0 200 OK\r\nServer: up\r\nContent-Length: 2\r\n\r\nok"
EDITED = {  # (answer, client stays): what the client reads
    (PLAIN, True): (
        b"HTTP/1.1 200 OK\r\nX-Keep: k\r\nContent-Length: 2\r\nserver: l4\r\nx-added: 1\r\n\r\nok"
    ),
    (PLAIN, False): (
        b"HTTP/1.1 200 OK\r\nX-Keep: k\r\nContent-Length: 2\r\nconnection: close\r\n"
        b"server: l4\r\nx-added: 1\r\n\r\nok"
    ),
    (HOP, True): b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nserver: l4\r\nx-added: 1\r\n\r\nok",
    (HOP, False): (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n"
        b"server: l4\r\nx-added: 1\r\n\r\nok"
    ),
    (HTTP10, True): (
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n"
        b"server: l4\r\nx-added: 1\r\n\r\nok"
    ),
    (HTTP10, False): (
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n"
        b"server: l4\r\nx-added: 1\r\n\r\nok"
    ),
}
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def _edits_relay(
    mode: tuple[str, str],
    endpoints: tuple[Endpoint, ...],
    edits: HeadEdits | None,
    retry: RetryPolicy | None = None,
    **kw: Any,
) -> Any:
    """A relay of the twin and mode that sends every request to *endpoints*
    (in order) with *edits*."""
    which, how = mode
    if how == "resolve":
        verdict = Verdict(
            (Choice(1, endpoints, "ORDERED", tag="t", edits=edits),), ttl=60.0, retry=retry
        )
        kw["resolve"] = lambda head, origin: verdict
    decision = Decision(endpoints, tag="t", retry=retry, edits=edits)
    return _relay(which, lambda h, o: decision, **kw)


def _through(
    mode: tuple[str, str],
    edits: HeadEdits | None,
    request: bytes,
    script: list[Any] | None = None,
    close: bool = False,
) -> tuple[bytes, list[bytes], dict[str, int]]:
    """*request* through a relay with *edits* to a Scripted backend
    answering *script* (else 200 ok): what the client read (one answer; all
    until the end when *close*), the requests the backend read, the relay's
    stats."""
    up = Scripted(script or [])
    relay = _edits_relay(mode, (up.endpoint,), edits)
    try:
        a = _client(relay)
        a.sendall(request)
        got = _read_all(a, 5.0)[0] if close else _response(a)
        a.close()
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    return got, up.requests, stats


# -- request heads ---------------------------------------------------------------


def test_request_edits_byte_exact_at_the_backend(mode: tuple[str, str]) -> None:
    """set replaces both lines of its name (any case, where the first was),
    add keeps the line already there, remove drops its line, the path's
    prefix is rewritten with the query kept, the Host line's value is the
    authority; the hop-by-hop line still goes; the lines set then added go
    last, before the empty line."""
    request = (
        b"GET /api/users?id=1 HTTP/1.1\r\nHost: a\r\nX-Set: 1\r\nUser-Agent: t\r\n"
        b"x-SET: 2\r\nX-Add: old\r\nX-Remove: r\r\nKeep-Alive: timeout=5\r\n\r\n"
    )
    got, seen, _ = _through(mode, REQUEST_EDITS, request)
    assert got == b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\nok"
    assert seen == [
        b"GET /v2/users?id=1 HTTP/1.1\r\nHost: b.svc:8080\r\nUser-Agent: t\r\nX-Add: old\r\n"
        + COUNT
        + b"x-set: new\r\nx-add: new\r\nx-more: 1\r\n\r\n"
    ]


@pytest.mark.parametrize(
    ("rewrite", "target", "sent"),
    [
        (PathRewrite(4, "/v2"), b"/api/users?id=1", b"/v2/users?id=1"),
        (PathRewrite(-1, "/x"), b"/a/b?q", b"/x?q"),
        (PathRewrite(4, ""), b"/api", b"/"),
        (PathRewrite(4, ""), b"/api?x=1", b"/?x=1"),
        (PathRewrite(99, "/p"), b"/short?s", b"/p?s"),
        (PathRewrite(0, "/pre"), b"/a", b"/pre/a"),
    ],
    ids=["prefix-query", "strip-all", "empty", "empty-query", "past-the-path", "strip-0"],
)
def test_path_rewrites(
    mode: tuple[str, str], rewrite: PathRewrite, target: bytes, sent: bytes
) -> None:
    """PathRewrite's cases: its first *strip* bytes of the path (-1, or
    past its end: all of it) replaced by the prefix, the query kept, a
    path left empty "/"; nothing else of the head changes."""
    request = b"GET %s HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n" % target
    _, seen, _ = _through(mode, HeadEdits(path=rewrite), request)
    assert seen == [sent_up(b"GET %s HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n" % sent)]


def test_bare_lf_lines_are_refused(mode: tuple[str, str]) -> None:
    """A head whose lines end in a bare LF (its last in CRLF) is refused
    before any route's edits: 400, nothing upstream (it was sent on with
    its bare LFs kept, which a server that ends lines only at CRLF reads
    as other lines: _peek_py's "Decisions")."""
    request = b"GET /api/a HTTP/1.1\nHost: a\nX-Remove: 1\nAccept: */*\r\n\r\n"
    got, seen, _ = _through(mode, REQUEST_EDITS, request, close=True)
    assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got
    assert got.endswith(b"\r\n\r\nLF without CR in the request head"), got
    assert seen == []


def test_no_edits_no_change(mode: tuple[str, str]) -> None:
    """Edits of the response alone leave the request head as it came (its
    hop-by-hop line dropped, as always); no edits at all: both as before."""
    request = b"GET /api/a HTTP/1.1\r\nHost: a\r\nX-Drop: 1\r\nKeep-Alive: 1\r\n\r\n"
    for edits in (RESPONSE_EDITS, None, HeadEdits()):
        _, seen, _ = _through(mode, edits, request)
        assert seen == [sent_up(b"GET /api/a HTTP/1.1\r\nHost: a\r\nX-Drop: 1\r\n\r\n")], edits


def test_slow_path_heads_are_edited(mode: tuple[str, str]) -> None:
    """Heads the compiled fast path hands to the pure relay (an
    absolute-form target, its path part rewritten, sent in origin-form; a
    Connection line naming a field, both dropped first): edited the same,
    requests and answers."""
    absolute = b"GET http://a/api/x?q=1 HTTP/1.1\r\nHost: a\r\nX-Remove: 1\r\n\r\n"
    got, seen, stats = _through(mode, BOTH, absolute, [PLAIN])
    assert seen == [
        b"GET /v2/x?q=1 HTTP/1.1\r\nHost: b.svc:8080\r\n"
        + COUNT
        + b"x-set: new\r\nx-add: new\r\nx-more: 1\r\n\r\n"
    ]
    assert got == EDITED[PLAIN, True]
    naming = b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: x-foo\r\nX-Foo: 1\r\nX-Set: 0\r\n\r\n"
    got2, seen2, stats2 = _through(mode, BOTH, naming, [HOP])
    assert seen2 == [
        b"GET /v2/x HTTP/1.1\r\nHost: b.svc:8080\r\n"
        + COUNT
        + b"x-set: new\r\nx-add: new\r\nx-more: 1\r\n\r\n"
    ]
    assert got2 == EDITED[HOP, True]
    if mode[0] == "compiled":
        assert stats["slow_path"] == 1 and stats2["slow_path"] == 1


@pytest.mark.parametrize(
    ("request_", "edits", "sent"),
    [
        (
            b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadEdits(authority="b.svc:8080"),
            b"GET /x HTTP/1.1\r\nHost: b.svc:8080\r\n" + COUNT + b"\r\n",
        ),
        (
            b"GET http://a:8080?q=1 HTTP/1.1\r\nHost: a:8080\r\n\r\n",
            HeadEdits(request_add=(("x-add", "1"),)),
            b"GET /?q=1 HTTP/1.1\r\nHost: a:8080\r\n" + COUNT + b"x-add: 1\r\n\r\n",
        ),
        (
            b"GET http://a/api/x HTTP/1.0\r\n\r\n",
            HeadEdits(path=PathRewrite(4, "/v2")),
            b"GET /v2/x HTTP/1.0\r\n" + COUNT + b"host: a\r\n\r\n",
        ),
        (
            b"GET /x HTTP/1.0\r\n\r\n",
            HeadEdits(authority="b.svc:8080"),
            b"GET /x HTTP/1.0\r\n" + COUNT + b"host: b.svc:8080\r\n\r\n",
        ),
    ],
    ids=["authority", "no-path", "http10-no-host", "origin-http10-no-host"],
)
def test_an_edited_absolute_form_request_goes_in_origin_form(
    mode: tuple[str, str], request_: bytes, edits: HeadEdits, sent: bytes
) -> None:
    """Edits of an absolute-form request: it goes in origin-form (its path,
    "/" for none, and query), its Host line's value the authority rewritten
    or else the target's (an origin server reads an absolute-form target's
    authority, not Host: RFC 9112 3.2.2; Envoy forwards origin-form with
    :authority as Host); a request without a Host line gets one (an
    HTTP/1.0 one, origin-form too)."""
    got, seen, _ = _through(mode, edits, request_)
    assert got.startswith(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n"), got
    assert seen == [sent]


@pytest.mark.parametrize(
    "target",
    [b"/api../admin", b"/api./x", b"/api%2e%2e/admin", b"/api%2E./x?q=1", b"/api.."],
)
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_a_rewrite_that_makes_a_dot_segment_is_answered_400(
    mode: tuple[str, str], target: bytes, method: bytes
) -> None:
    """A prefix rewrite (/api made /) that turns the target's first segment
    into a dot-segment (. or .., each dot also %2e): answered as the
    parser answers such a target on input (400, the connection closed; for
    a HEAD its head alone), nothing upstream, the pipelined request after
    it unread; counted as a local answer."""
    up = Scripted([])
    relay = _edits_relay(mode, (up.endpoint,), HeadEdits(path=PathRewrite(4, "/")))
    try:
        a = _client(relay)
        a.sendall(b"%s %s HTTP/1.1\r\nHost: a\r\n\r\n" % (method, target) + GET)
        got, how = _read_all(a, 5.0)
        a.close()
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    reason = "dot-segment (. or ..) in the request path"
    assert undated(got) == local_response(400, reason, head_only=method == b"HEAD"), got
    assert how == "EOF"
    assert up.requests == []
    assert stats["local_answers"] == 1


def test_a_rewrite_that_makes_no_dot_segment_goes(mode: tuple[str, str]) -> None:
    """Targets whose rewrite keeps ordinary segments (an encoded slash is
    none: the parser takes ``/..%2f`` on input too) go up rewritten."""
    for target, sent in (
        (b"/api..%2fadmin", b"/..%2fadmin"),
        (b"/api...", b"/..."),
        (b"/api.x/y", b"/.x/y"),
        (b"/api/..x", b"//..x"),
    ):
        request = b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target
        got, seen, _ = _through(mode, HeadEdits(path=PathRewrite(4, "/")), request)
        assert got.startswith(b"HTTP/1.1 200 X\r\n"), got
        assert seen == [sent_up(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % sent)]


def test_routes_read_the_original_head(mode: tuple[str, str]) -> None:
    """What decides the route (decide, resolve) reads the head as the
    client sent it, not as edited; a cached verdict (keyed by the original
    target) serves the same request again, edited again."""
    up = Scripted([])
    seen: list[tuple[str, str | None]] = []
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        verdict = Verdict(
            (Choice(1, (up.endpoint,), "ORDERED", tag="t", edits=REQUEST_EDITS),),
            ttl=60.0,
            shape=SHAPE_FULL,
        )

        def resolve(head: Any, origin: Any) -> Verdict:
            seen.append((head.target, head.header("host")))
            return verdict

        kw["resolve"] = resolve

    def decide(head: Any, origin: Any) -> Decision:
        seen.append((head.target, head.header("host")))
        return Decision((up.endpoint,), tag="t", edits=REQUEST_EDITS)

    relay = _relay(which, decide, **kw)
    try:
        c = _client(relay)
        for _ in range(2):
            c.sendall(b"GET /api/users HTTP/1.1\r\nHost: a\r\n\r\n")
            _response(c)
        c.close()
    finally:
        relay.close()
        up.close()
    assert seen == [("/api/users", "a")] * (1 if how == "resolve" else 2)
    sent = (
        b"GET /v2/users HTTP/1.1\r\nHost: b.svc:8080\r\n"
        + COUNT
        + b"x-set: new\r\nx-add: new\r\nx-more: 1\r\n\r\n"
    )
    assert up.requests == [sent, sent]


# -- response heads ----------------------------------------------------------------


@pytest.mark.parametrize("answer", [PLAIN, HOP, HTTP10], ids=["plain", "hop-by-hop", "http10"])
@pytest.mark.parametrize("stays", [True, False], ids=["keep-alive", "close"])
def test_response_edits_byte_exact_at_the_client(
    mode: tuple[str, str], answer: bytes, stays: bool
) -> None:
    """The final head as the relay sends it (hop-by-hop lines dropped, its
    own connection line) without the lines set and removed, with the set
    then added lines after the relay's own; to a keep-alive client and to
    one that asked to close (then the end)."""
    got, seen, _ = _through(
        mode, RESPONSE_EDITS, GET if stays else GET_CLOSE, [answer], close=not stays
    )
    assert got == EDITED[answer, stays]
    assert len(seen) == 1


def test_an_interim_head_is_not_edited(mode: tuple[str, str]) -> None:
    """Expect: 100-continue: the 100 goes as it came (its Server line
    kept), the final head is edited."""
    interim = b"HTTP/1.1 100 Continue\r\nServer: up\r\nX-Drop: 1\r\n\r\n"

    def answer(conn: socket.socket) -> None:
        conn.sendall(interim + PLAIN)

    request = b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    up = Scripted([answer])
    relay = _edits_relay(mode, (up.endpoint,), RESPONSE_EDITS)
    try:
        a = _client(relay)
        a.sendall(request)
        want = interim + EDITED[PLAIN, True]
        got = _recv(a, len(want))
        a.close()
    finally:
        relay.close()
        up.close()
    assert got == want


# -- retries, choices, pipelining ------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_retry_sends_the_edited_head_again(mode: tuple[str, str], method: bytes) -> None:
    """Route (A, B) under a retry policy on 5xx: A's 503 is dropped, the
    request goes to B, both got the same edited head (and body), but for
    the count of the try it is; the client gets B's answer, edited."""
    body = b"hi" if method == b"POST" else b""
    request = b"%s /api/r HTTP/1.1\r\nHost: a\r\nX-Set: old\r\nContent-Length: %d\r\n\r\n%s" % (
        method,
        len(body),
        body,
    )
    a, b = Scripted([_answer(503)]), Scripted([PLAIN])
    relay = _edits_relay(mode, (a.endpoint, b.endpoint), BOTH, retry=policy(1, "5xx"))
    try:
        c = _client(relay)
        c.sendall(request)
        got = _response(c)
        c.close()
    finally:
        relay.close()
        a.close()
        b.close()
    edited = (
        b"%s /v2/r HTTP/1.1\r\nHost: b.svc:8080\r\nContent-Length: %d\r\n"
        b"x-envoy-attempt-count: %d\r\nx-set: new\r\nx-add: new\r\nx-more: 1\r\n\r\n%s"
    )
    assert a.requests == [edited % (method, len(body), 1, body)]
    assert b.requests == [edited % (method, len(body), 2, body)]
    assert got == EDITED[PLAIN, True]


def test_pipelined_requests_keep_their_order(mode: tuple[str, str]) -> None:
    """Three requests in one segment: each edited, in order, upstream;
    their answers edited, in order, at the client."""
    request = b"".join(b"GET /api/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3))
    up = Scripted([PLAIN, PLAIN, PLAIN])
    relay = _edits_relay(mode, (up.endpoint,), BOTH)
    try:
        c = _client(relay)
        c.sendall(request)
        got = _recv(c, 3 * len(EDITED[PLAIN, True]))
        c.close()
    finally:
        relay.close()
        up.close()
    assert up.requests == [
        b"GET /v2/%d HTTP/1.1\r\nHost: b.svc:8080\r\n" % i
        + COUNT
        + b"x-set: new\r\nx-add: new\r\nx-more: 1\r\n\r\n"
        for i in range(3)
    ]
    assert got == EDITED[PLAIN, True] * 3


def test_two_choices_edit_each_request_as_its_choice() -> None:
    """A cached verdict of two choices (weights 1/1, seeded draws), each
    with its own edits and backend: every request a backend reads carries
    its choice's request line, and every answer the client reads its
    choice's response line; both choices were drawn."""
    ea = HeadEdits(request_add=(("x-choice", "a"),), response_add=(("x-via", "a"),))
    eb = HeadEdits(request_set=(("x-choice", "b"),), response_add=(("x-via", "b"),))
    a = Scripted([_answer(200, b"A")] * 40)
    b = Scripted([_answer(200, b"B")] * 40)
    verdict = Verdict(
        (
            Choice(1, (a.endpoint,), "ORDERED", tag="a", edits=ea),
            Choice(1, (b.endpoint,), "ORDERED", tag="b", edits=eb),
        ),
        ttl=60.0,
    )
    relay = _relay("compiled", lambda h, o: Decision(), resolve=lambda h, o: verdict, seed=7)
    try:
        c = _client(relay)
        got = []
        for _ in range(30):
            c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Choice: client\r\n\r\n")
            got.append(_response(c))
        c.close()
    finally:
        relay.close()
        a.close()
        b.close()
    assert a.requests and b.requests and len(a.requests) + len(b.requests) == 30
    assert set(a.requests) == {
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Choice: client\r\n" + COUNT + b"x-choice: a\r\n\r\n"
    }
    assert set(b.requests) == {b"GET / HTTP/1.1\r\nHost: a\r\n" + COUNT + b"x-choice: b\r\n\r\n"}
    for r in got:
        body = r[-1:].lower()
        assert r == b"HTTP/1.1 200 X\r\nContent-Length: 1\r\nx-via: %s\r\n\r\n%s" % (
            body,
            body.upper(),
        )


# -- local answers, per-request verdicts, interning ----------------------------------


def test_local_headers_go_with_a_local_answer(mode: tuple[str, str]) -> None:
    """A local answer (a redirect) with local_headers: its lines in it, on
    a connection that stays."""
    headers = (("location", "http://b/new"), ("x-why", "moved"))
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        verdict = Verdict(local=(301, "moved"), local_headers=headers, tag="t", ttl=60.0)
        kw["resolve"] = lambda head, origin: verdict
    decision = Decision(local=(301, "moved"), local_headers=headers, tag="t")
    relay = _relay(which, lambda h, o: decision, **kw)
    want = local_response(
        301, "moved", close=False, headers="location: http://b/new\r\nx-why: moved\r\n"
    )
    try:
        c = _client(relay)
        for _ in range(2):
            c.sendall(GET)
            assert undated(_response(c)) == want
        c.close()
    finally:
        relay.close()


def test_a_content_type_among_local_headers_replaces_text_plain(mode: tuple[str, str]) -> None:
    """A direct response whose route sets its content-type: that one line
    goes, not the relays' default text/plain beside it."""
    headers = (("content-type", "application/json"),)
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        verdict = Verdict(local=(200, "{}"), local_headers=headers, tag="t", ttl=60.0)
        kw["resolve"] = lambda head, origin: verdict
    decision = Decision(local=(200, "{}"), local_headers=headers, tag="t")
    relay = _relay(which, lambda h, o: decision, **kw)
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        c.close()
    finally:
        relay.close()
    lines = got.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert [line for line in lines if line.startswith(b"content-type")] == [
        b"content-type: application/json"
    ], got
    assert got.endswith(b"\r\n\r\n{}")


@pytest.mark.parametrize("ttl", [0.0, 60.0])
def test_a_ttl_0_local_verdict_is_asked_per_request(ttl: float) -> None:
    """A local verdict with ttl 0 (a per-request redirect) is never cached:
    resolve is asked for each of 5 requests (with a ttl, once)."""
    calls: list[int] = []
    lock = threading.Lock()

    def resolve(head: Any, origin: Any) -> Verdict:
        with lock:
            calls.append(1)
        return Verdict(local=(302, "found"), local_headers=(("location", "/n"),), tag="t", ttl=ttl)

    relay = _relay("compiled", lambda h, o: Decision(), resolve=resolve)
    want = local_response(302, "found", close=False, headers="location: /n\r\n")
    try:
        c = _client(relay)
        for _ in range(5):
            c.sendall(GET)
            assert undated(_response(c)) == want
        c.close()
    finally:
        relay.close()
    assert len(calls) == (5 if ttl == 0 else 1)


def test_edits_are_interned_per_distinct_edits() -> None:
    """Verdicts asked per request (ttl 0), each with a new HeadEdits equal
    to the one before, and converted then freed each time: the compiled
    relay holds one copy of them; two distinct ones, two; none after
    close()."""
    up = Scripted([])
    n = [0]

    def resolve(head: Any, origin: Any) -> Verdict:
        n[0] += 1
        edits = HeadEdits(request_add=(("x-n", str(n[0] % 2)),))
        return Verdict((Choice(1, (up.endpoint,), "ORDERED", edits=edits),), ttl=0.0)

    relay = _relay("compiled", lambda h, o: Decision(), resolve=resolve)
    try:
        c = _client(relay)
        for i in range(20):
            c.sendall(GET)
            _response(c)
            if i == 0:
                assert relay.interned_edits == 1
        c.close()
        assert relay.interned_edits == 2
        assert len(up.requests) == 20
    finally:
        relay.close()
        up.close()
    assert relay.interned_edits == 0


# -- the pure functions -----------------------------------------------------------


def test_edit_functions() -> None:
    """edit_request_head, edit_response_head and rewrite_target on the
    forms a socket test does not reach in both twins: an asterisk-form and
    an authority-form target kept, an absolute-form one without a path."""
    from l4proxy.dataplane._exchange_py import (
        edit_request_head,
        edit_response_head,
        rewrite_target,
    )

    assert rewrite_target(b"*", 1, b"/x") == b"*"
    assert rewrite_target(b"a:443", 1, b"/x") == b"a:443"
    assert rewrite_target(b"http://a", 4, b"") == b"http://a/"
    assert rewrite_target(b"http://a?q", -1, b"/p") == b"http://a/p?q"
    head = b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"
    assert edit_request_head(head, HeadEdits(path=PathRewrite(1, "/x"))) == head
    assert edit_request_head(head, HeadEdits()) is head
    # names never edited, whatever the edits say: framing, hop-by-hop, Host
    bad = HeadEdits(
        request_remove=("content-length", "host"), request_add=(("Transfer-Encoding", "x"),)
    )
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    assert edit_request_head(post, bad) == post
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert edit_response_head(resp, HeadEdits(response_remove=("content-length",))) == resp


# -- edits the relays refuse to write out ----------------------------------------

BAD_EDITS = {
    "value-crlf": HeadEdits(request_set=(("x-a", "1\r\nContent-Length: 5"),)),
    "value-nul": HeadEdits(request_add=(("x-a", "1\x00"),)),
    "name-colon": HeadEdits(request_add=(("x-a: 1\r\ntransfer-encoding", "chunked"),)),
    "name-space": HeadEdits(request_remove=("x a",)),
    "name-empty": HeadEdits(response_add=(("", "1"),)),
    "authority-crlf": HeadEdits(authority="b\r\nContent-Length: 7"),
    "authority-space": HeadEdits(authority="b c"),
    "prefix-space": HeadEdits(path=PathRewrite(0, "/a HTTP/1.1\r\nX: y\r\n\r\nGET /smuggled")),
    "prefix-hash": HeadEdits(path=PathRewrite(0, "/a#b")),
    "response-value-crlf": HeadEdits(response_add=(("x-r", "1\r\nSet-Cookie: evil=1"),)),
    "non-str-value": HeadEdits(request_set=(("x-a", 5),)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("name", list(BAD_EDITS))
def test_edits_that_would_split_a_head_are_an_error_answer(
    mode: tuple[str, str], name: str
) -> None:
    """Edits no table should give (a line break in a value, a name that is
    no token, a control or space in the authority or the path's prefix, a
    value that is no str): nothing goes to the backend, the request is
    answered as a route that raised (503, counted in errors), and the relay
    goes on: the next connection's request answered the same, the thread
    alive (from a cached verdict: the 503 is cached as a resolve() that
    raised has its 503 cached, for the default ttl: counted once)."""
    up = Scripted([])
    relay = _edits_relay(mode, (up.endpoint,), BAD_EDITS[name])
    try:
        for _ in range(2):
            a = _client(relay)
            a.sendall(GET_CLOSE)
            got, how = _read_all(a, 5.0)
            a.close()
            assert undated(got) == local_response(503, "no healthy upstream"), got
            assert how == "EOF"
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert up.requests == []
    assert stats["errors"] == (1 if mode[1] == "resolve" else 2)


@pytest.mark.parametrize(
    "headers",
    [(("location", "http://b/\r\nSet-Cookie: evil=1"),), (("x y", "1"),), (("x", None),)],
    ids=["value-crlf", "name-space", "non-str-value"],
)
def test_local_headers_that_would_split_a_head_are_an_error_answer(
    mode: tuple[str, str], headers: tuple[tuple[str, str], ...]
) -> None:
    """A local answer's local_headers checked as edits are: the 503 of a
    route that raised, counted, instead of the lines."""
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        verdict = Verdict(local=(301, ""), local_headers=headers, tag="t", ttl=60.0)
        kw["resolve"] = lambda head, origin: verdict
    decision = Decision(local=(301, ""), local_headers=headers, tag="t")
    relay = _relay(which, lambda h, o: decision, **kw)
    try:
        a = _client(relay)
        a.sendall(GET_CLOSE)
        got, _ = _read_all(a, 5.0)
        a.close()
        stats = relay.stats()
    finally:
        relay.close()
    assert undated(got) == local_response(503, "no healthy upstream")
    assert stats["errors"] == 1


def test_check_edits_says_what_is_wrong() -> None:
    """edit_bytes() raises ValueError naming the bad part; good edits (a
    UTF-8 value, every token character in a name) pass."""
    for name, edits in BAD_EDITS.items():
        with pytest.raises(ValueError):
            edit_bytes(edits)
            pytest.fail(name)
    with pytest.raises(ValueError, match="authority"):
        edit_bytes(BAD_EDITS["authority-space"])
    with pytest.raises(ValueError, match="prefix"):
        edit_bytes(BAD_EDITS["prefix-hash"])
    with pytest.raises(ValueError, match="not a token"):
        edit_bytes(BAD_EDITS["name-colon"])
    good = HeadEdits(
        request_set=(("!#$%&'*+-.^_`|~09azAZ", "é \t v"),),
        path=PathRewrite(1, "/a%20b"),
        authority="[::1]:80",
    )
    assert edit_bytes(good).request_lines == "!#$%&'*+-.^_`|~09azaz: é \t v\r\n".encode()
