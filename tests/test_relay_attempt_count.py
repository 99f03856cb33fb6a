"""x-envoy-attempt-count: Istio's virtual hosts have Envoy's
``include_request_attempt_count``, so every request goes upstream saying
which try it is: 1, then 2, 3 for a retry policy's retries, whatever the
client sent in its place. Both relay twins, real sockets: on a sidecar's
path (the compiled one deciding per request and from a cached verdict)
and through a real worker on a gateway listener, with its forwarding
headers; the line goes after the client's lines and the forwarding
headers, and a route's head edits apply after it. The relay's own retry of
a request on a reused connection that closed is no try: the count stays;
a connect that failed, moved on from to the next endpoint, was one (as
Envoy's router counts it), with a policy or without."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import (
    DEFAULT_REPLAY_LIMIT,
    attempt_counted,
    with_attempt_count,
)
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    MIRROR_SCALE,
    SHAPE_FULL,
    Choice,
    HeadEdits,
    Mirror,
    Verdict,
    shadow_head,
)
from tests._scripted import (
    CLOSE,
    GET,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _exchange,
    _proxy,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests._worker import gateway_service, gateway_worker
from tests.test_relay_edges import _relay
from tests.test_relay_head_edits import _edits_relay
from tests.test_relay_mirror import COPY, Mirrored
from tests.test_relay_retries import _worker_twin

HOST = "svc.default.svc.cluster.local"
_COUNT = re.compile(rb"x-envoy-attempt-count: *(.*)", re.IGNORECASE)


def _counts(requests: list[bytes]) -> list[list[bytes]]:
    """Each request's x-envoy-attempt-count values, as the backend read them."""
    return [
        [
            m.group(1)
            for line in r.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            if (m := _COUNT.match(line))
        ]
        for r in requests
    ]


def test_the_count_rewritten_for_a_retry() -> None:
    """The pure twin's helpers (the compiled twin's stage_attempt() and
    attempt_count()): the first try's line before the empty line, a
    retry's value replaced in place or longer, OWS dropped,
    the body untouched; a head without the line (a route's edits removed
    it) gets it before its empty line."""
    assert with_attempt_count(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == (
        b"GET / HTTP/1.1\r\nHost: a\r\nx-envoy-attempt-count: 1\r\n\r\n"
    )
    sent = b"POST / HTTP/1.1\r\nx-envoy-attempt-count: 1\r\nB: x-envoy-attempt-count: 1\r\n\r\n"
    body = b"\r\nx-envoy-attempt-count: 1\r\n"
    assert (
        attempt_counted(sent + body, 2) == sent.replace(b"count: 1\r\nB", b"count: 2\r\nB") + body
    )
    assert attempt_counted(sent + body, 10).startswith(
        b"POST / HTTP/1.1\r\nx-envoy-attempt-count: 10\r\nB: x-envoy-attempt-count: 1\r\n\r\n"
    )
    assert attempt_counted(b"GET / HTTP/1.1\r\nX-Envoy-Attempt-Count:  9 \r\n\r\n", 3) == (
        b"GET / HTTP/1.1\r\nX-Envoy-Attempt-Count:  3 \r\n\r\n"
    )
    assert attempt_counted(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", 2) == (
        b"GET / HTTP/1.1\r\nHost: a\r\nx-envoy-attempt-count: 2\r\n\r\nbody"
    )


def test_each_try_says_which_it_is(mode: tuple[str, str]) -> None:
    """A policy of 2 attempts on 5xx, the backend answering 503 twice: the
    three tries say 1, 2 and 3, once each; the client's own value (and its
    other spelling) never goes up; the next request, answered at once, 1."""
    request = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Envoy-Attempt-Count: 7\r\n"
        b"x-envoy-attempt-count:5\r\nAccept: */*\r\n\r\n"
    )
    got, up, _, stats = _exchange(
        mode, [_answer(503), _answer(503)], policy(2, "5xx"), request, requests=2
    )
    assert [_status(r) for r in got] == [200, 200]
    assert _counts(up.requests) == [[b"1"], [b"2"], [b"3"], [b"1"]]
    assert all(r.startswith(b"GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n") for r in up.requests)
    assert stats["retries"] == 2


def test_a_tenth_retry_says_10(mode: tuple[str, str]) -> None:
    """A policy of 10 attempts on 5xx, the backend answering 503 ten
    times: the eleven tries say 1 to 11, the value one digit longer from
    the tenth on (the compiled twin's attempt_count() makes the replay
    anew there); the body goes after each head unchanged."""
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    got, up, _, stats = _exchange(mode, [_answer(503)] * 10, policy(10, "5xx"), request)
    assert [_status(r) for r in got] == [200]
    assert _counts(up.requests) == [[b"%d" % n] for n in range(1, 12)]
    assert up.requests == [
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"x-envoy-attempt-count: %d\r\n\r\nhello" % n
        for n in range(1, 12)
    ]
    assert stats["retries"] == 10


def test_a_copy_the_tenth_count_takes_past_the_replay_limit_is_not_retried(
    mode: tuple[str, str],
) -> None:
    """A POST whose head as sent and body are exactly the replay limit
    (64 KiB), under a policy of 12 retries on 5xx, the backend answering
    503 eleven times: the tenth try's count (10) makes the copy held a
    byte longer than the limit, so no eleventh try goes (the pure twin's
    _can_retry() reads the copy's length; the compiled twin's can_retry()
    did not: it sent two tries more) and the client gets the tenth 503."""
    first = len(b"x-envoy-attempt-count: 1\r\n")
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
    length = DEFAULT_REPLAY_LIMIT - first - len(head % DEFAULT_REPLAY_LIMIT)
    request = head % length + b"b" * length
    assert len(request) + first == DEFAULT_REPLAY_LIMIT
    got, up, _, stats = _exchange(mode, [_answer(503)] * 11, policy(12, "5xx"), request)
    assert [_status(r) for r in got] == [503]
    assert _counts(up.requests) == [[b"%d" % n] for n in range(1, 11)]
    assert stats["retries"] == 9


def test_a_route_that_removes_the_count_removes_the_first_try_s(
    mode: tuple[str, str],
) -> None:
    """A route removing x-envoy-attempt-count (its request edits apply
    after the line is set): the first try goes without it; the retry says
    2 again, after the route's lines, as Envoy's router sets it anew for
    each retry on the head the route's mutations made."""
    a = Scripted([_answer(503)])
    edits = HeadEdits(request_remove=("x-envoy-attempt-count",), request_add=(("x-a", "1"),))
    relay = _edits_relay(mode, (a.endpoint,), edits, retry=policy(1, "5xx"))
    try:
        c = _client(relay)
        c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Envoy-Attempt-Count: 4\r\n\r\n")
        got = _response(c)
        c.close()
    finally:
        relay.close()
        a.close()
    assert _status(got) == 200
    assert a.requests == [
        b"GET / HTTP/1.1\r\nHost: a\r\nx-a: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nx-a: 1\r\nx-envoy-attempt-count: 2\r\n\r\n",
    ]


_ROUTE = (("x-route", "r"),)


@pytest.mark.parametrize(
    ("edits", "order"),
    [
        (
            HeadEdits(request_remove=("x-envoy-attempt-count",), request_add=_ROUTE),
            (b"x-route", b"x-envoy-attempt-count"),
        ),
        # (the line the route set stays where it was, its value the retry's)
        (
            HeadEdits(request_set=(("x-envoy-attempt-count", "77"), *_ROUTE)),
            (b"x-envoy-attempt-count", b"x-route"),
        ),
    ],
    ids=["removed", "set"],
)
def test_a_retry_before_a_connection_says_its_count_after_the_route_s_edits(
    mode: tuple[str, str], edits: HeadEdits, order: tuple[bytes, bytes]
) -> None:
    """A route removing x-envoy-attempt-count (or setting it) and adding
    x-route, under a policy retrying resets (a failed connect among them)
    with a per-try timeout: the first try's connect is refused, so the head
    that goes is the policy's retry's: it says that retry's count on the
    head the route's edits made, as a retry of a request that went does
    (the pure twin applied the route's edits after the rewrite, when the
    connection came: no count, or the route's 77). Before, a per-try
    timeout passing while the request waited for a connection made that
    retry (a waiting try's timer runs no more, as Envoy's)."""
    dead = _refusing()
    a = Scripted([])
    endpoints = (("127.0.0.1", dead.getsockname()[1]), a.endpoint)
    retry = policy(5, "reset", per_try=5.0)
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        choice = Choice(1, endpoints, "ORDERED", tag="t", edits=edits)
        verdict = Verdict((choice,), ttl=60.0, retry=retry)
        kw["resolve"] = lambda head, origin: verdict
    relay = _relay(which, lambda h, o: Decision(endpoints, tag="t", retry=retry, edits=edits), **kw)
    try:
        c = _client(relay)
        c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _status(_response(c)) == 200
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        a.close()
        dead.close()
    assert stats["retries"] == 1, stats
    (sent,) = a.requests
    assert _counts([sent]) == [[b"2"]], sent  # (the first try never went)
    values = {b"x-route": b"r", b"x-envoy-attempt-count": b"2"}
    lines = b"".join(b"%s: %s\r\n" % (name, values[name]) for name in order)
    assert sent == b"GET /x HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n", sent


def _refusing() -> socket.socket:
    """A socket bound, never listening: connects to it are refused, and no
    other test's listener takes the port meanwhile (as one could once it
    were closed)."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    return dead


@pytest.mark.parametrize(
    ("order", "counts"),
    [
        # the first try's connect refused: the next endpoint's try is the
        # second, its retry the third; the next request on the connection
        # counts from 1 again (its refused connect, then 2)
        ("dead-first", ([b"2", b"2"], [b"3"])),
        # the first try answered 503, its retry's connect refused (the
        # retry goes to an endpoint not tried yet first), then the third
        ("dead-second", ([b"1", b"1"], [b"3"])),
    ],
)
def test_a_try_whose_connect_failed_is_counted(
    mode: tuple[str, str], order: str, counts: tuple[list[bytes], list[bytes]]
) -> None:
    """Envoy's router counts a try whose connect failed (its
    connect-failure retry: 5xx retries it too), so the next try's
    x-envoy-attempt-count says one more, where the relay moves on to the
    next endpoint: a policy retrying 5xx twice, three endpoints, one
    refusing connects, the first to answer says 503 once. The failed
    connect is one of the policy's tries (below), its connect errors 1 a
    request: the retries, 2 for the first request, and 1 for the second
    where it refused it. Before, the try after the failed connect said the
    count of the one that failed."""
    dead = _refusing()
    dead_endpoint = ("127.0.0.1", dead.getsockname()[1])
    first, second = Scripted([_answer(503)]), Scripted([])
    if order == "dead-first":
        endpoints = (dead_endpoint, first.endpoint, second.endpoint)
    else:
        endpoints = (first.endpoint, dead_endpoint, second.endpoint)
    relay = _proxy(mode, endpoints, policy(2, "5xx"))
    try:
        c = _client(relay)
        got = []
        for _ in range(2):
            c.sendall(GET)
            got.append(_response(c))
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        first.close()
        second.close()
        dead.close()
    assert [_status(r) for r in got] == [200, 200]
    assert (_counts(first.requests), _counts(second.requests)) == (
        [[n] for n in counts[0]],
        [[n] for n in counts[1]],
    )
    assert (stats["retries"], stats["connect_errors"]) == (
        (3, 2) if order == "dead-first" else (2, 1)
    )


def test_a_try_whose_connect_failed_is_counted_without_a_policy(mode: tuple[str, str]) -> None:
    """No retry policy: two endpoints refuse connects, the third answers;
    the relay moves on from each (its own retry), and each was a try: the
    request reaches the third saying 3, its head otherwise as the client
    sent it."""
    dead = [_refusing(), _refusing()]
    up = Scripted([])
    endpoints = (*(("127.0.0.1", d.getsockname()[1]) for d in dead), up.endpoint)
    relay = _proxy(mode, endpoints, None)
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
        for d in dead:
            d.close()
    assert _status(got) == 200
    assert up.requests == [GET[:-2] + b"x-envoy-attempt-count: 3\r\n\r\n"]
    assert (stats["retries"], stats["connect_errors"]) == (0, 2)


def test_a_reused_connections_retry_is_no_new_try(mode: tuple[str, str]) -> None:
    """The pooled connection closes on the second request without a byte:
    the relay sends it again on a new connection (the keep-alive race), as
    the same try: 1 both times."""
    got, up, _, _ = _exchange(mode, [_answer(200), CLOSE], None, requests=2)
    assert [_status(r) for r in got] == [200, 200]
    assert _counts(up.requests) == [[b"1"], [b"1"], [b"1"]]


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_gateway_request_says_it_after_the_forwarding_headers(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real worker on a gateway listener, a VirtualService retrying 5xx
    once and adding a request header: the backend answers 503 then 200;
    each try's head has the client's lines, then the forwarding headers,
    the count (1, then 2; Envoy's router adds it after the lines its
    connection manager added) and the route's header, and one count only
    though the client sent one."""
    up = Scripted([_answer(503)])
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(up.endpoint[1])
        + f"""
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}}}}}]
    retries: {{attempts: 1, retryOn: 5xx}}
    headers: {{request: {{add: {{x-route: r}}}}}}
"""
    )
    got: list[bytes] = []
    _worker_twin(which, monkeypatch)

    def client(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nx-envoy-attempt-count: 9\r\n\r\n")
            got.append(_response(s))

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, _w, address):
            await asyncio.get_running_loop().run_in_executor(None, client, address)

    try:
        asyncio.run(main())
    finally:
        up.close()
    assert _status(got[0]) == 200, got
    assert _counts(up.requests) == [[b"1"], [b"2"]]
    for n, request in zip((b"1", b"2"), up.requests, strict=True):
        names = [line.split(b":", 1)[0].lower() for line in request.split(b"\r\n")[1:-2]]
        assert names == [
            b"host",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-envoy-external-address",
            b"x-request-id",
            b"x-envoy-attempt-count",
            b"x-route",
        ], (n, request)


def test_a_copy_is_of_the_head_as_first_sent(mode: tuple[str, str]) -> None:
    """A mirrored request under a policy retrying resets (a failed connect
    among them), with a per-try timeout: its first try's connect is
    refused before any byte went, so the head first sent is the policy's
    retry's, saying 2, and so does the mirror's copy (the copy is of the
    head sent: the compiled twin's c.replay holds a copy of the head from
    the mirror's draw on, rewritten with c.rhead). Before, a per-try
    timeout passing while the request waited for a connection made that
    retry (a waiting try's timer runs no more, as Envoy's)."""
    dead = _refusing()
    a, mirror = Scripted([]), Mirrored()
    copies = (Mirror((mirror.endpoint,), ppm=MIRROR_SCALE, tag=COPY),)
    endpoints = (("127.0.0.1", dead.getsockname()[1]), a.endpoint)
    retry = policy(5, "reset", per_try=5.0)
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        choice = Choice(1, endpoints, "ORDERED", tag="t")
        verdict = Verdict((choice,), ttl=60.0, shape=SHAPE_FULL, retry=retry, mirrors=copies)
        kw["resolve"] = lambda head, origin: verdict
    relay = _relay(
        which, lambda h, o: Decision(endpoints, tag="t", retry=retry, mirrors=copies), **kw
    )
    try:
        c = _client(relay)
        c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _status(_response(c)) == 200
        assert _until(lambda: len(mirror.seen()) == 1, 5.0), mirror.seen()
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        a.close()
        mirror.close()
        dead.close()
    assert stats["retries"] == 1, stats
    assert _counts(a.requests) == [[b"2"]]  # (the first try never went)
    assert mirror.seen() == [shadow_head(a.requests[0])]


def test_a_copy_after_a_failed_connect_says_the_try_that_sent_it(mode: tuple[str, str]) -> None:
    """A mirrored request whose first try's connect is refused: the head
    first sent is the second try's, saying 2, and so does the mirror's
    copy (the copy is of the head as first sent, as where the policy's
    retry after a refused connect sent it first)."""
    dead = _refusing()
    dead_endpoint = ("127.0.0.1", dead.getsockname()[1])
    a, mirror = Scripted([]), Mirrored()
    copies = (Mirror((mirror.endpoint,), ppm=MIRROR_SCALE, tag=COPY),)
    endpoints = (dead_endpoint, a.endpoint)
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":
        verdict = Verdict((Choice(1, endpoints, "ORDERED", tag="t"),), ttl=60.0, mirrors=copies)
        kw["resolve"] = lambda head, origin: verdict
    relay = _relay(which, lambda h, o: Decision(endpoints, tag="t", mirrors=copies), **kw)
    try:
        c = _client(relay)
        c.sendall(GET)
        assert _status(_response(c)) == 200
        assert _until(lambda: len(mirror.seen()) == 1, 5.0), mirror.seen()
        c.close()
    finally:
        relay.close()
        a.close()
        mirror.close()
        dead.close()
    assert _counts(a.requests) == [[b"2"]]
    assert mirror.seen() == [shadow_head(a.requests[0])]
