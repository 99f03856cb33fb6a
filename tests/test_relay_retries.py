"""A route's retry policy (VirtualService ``http[].retries``): both twins, real sockets.

Envoy's retry policy as Istio configures it: a try answered with a status
the policy names (``retryOn``: ``5xx``, ``gateway-error``, ``retriable-4xx``,
status codes), closed before its response head (``reset``, ``5xx``,
``gateway-error``) or past its ``perTryTimeout`` is given up, its
connection closed, and the request sent again, to another endpoint first,
at most ``attempts`` times; only while the whole request is held (the
replay limit) and nothing of the response reached the client. The client
sees the last try's answer, counted once; the route timeout spans every
try. Without a policy nothing of this happens.

The backends here (tests._scripted's) answer from one script shared by
their connections: each request takes the next step (a status, a close, a
stall), then 200.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests._scripted import (
    CLOSE,
    GET,
    OK_BODY,
    STALL,
    Scripted,
    _answer,
    _client,
    _exchange,
    _proxy,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    gateway_routes,
    gateway_service,
    gateway_worker,
)
from tests.conftest import sent_up
from tests.test_relay_edges import _read_all
from tests.test_relay_edges_count import Counted


@pytest.mark.parametrize(("attempts", "expected"), [(2, 200), (3, 200), (1, 503), (0, 503)])
def test_attempts_bound_the_retries_and_the_request_is_counted_once(
    mode: tuple[str, str], attempts: int, expected: int
) -> None:
    """A backend that answers 503 twice, then 200: two retries or more get
    the 200, fewer the last 503; counted once, with the status the client
    got; every try reached the backend."""
    retry = policy(attempts, "gateway-error") if attempts else None
    got, up, counted, stats = _exchange(mode, [_answer(503, b"no")] * 2, retry)
    assert _status(got[0]) == expected, got
    assert got[0].endswith(OK_BODY if expected == 200 else b"no")
    tries = min(attempts, 2) + 1
    assert len(up.requests) == tries
    assert up.requests == [sent_up(GET, n) for n in range(1, tries + 1)]  # each saying its try
    assert counted == [expected]
    assert stats["requests"] == 1 and stats["retries"] == tries - 1
    # each retried try's connection was closed (never pooled), not the last
    assert up.accepted == tries


@pytest.mark.parametrize(
    ("on", "codes", "status", "retried"),
    [
        ("gateway-error", (), 503, True),
        ("gateway-error", (), 502, True),
        ("gateway-error", (), 504, True),
        ("gateway-error", (), 500, False),
        ("5xx", (), 500, True),
        ("5xx", (), 409, False),
        ("retriable-4xx", (), 409, True),
        ("retriable-4xx", (), 503, False),
        ("retriable-status-codes", (418, 503), 418, True),
        ("retriable-status-codes", (503,), 502, False),
        ("reset,connect-failure", (), 503, False),
        # Istio's default when retryOn is omitted: 503 only
        (
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            (503,),
            503,
            True,
        ),
        (
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            (503,),
            500,
            False,
        ),
        # the HTTP/2 and gRPC policies never occur here
        (
            "refused-stream,unavailable,cancelled,deadline-exceeded,internal,resource-exhausted",
            (),
            503,
            False,
        ),
    ],
)
def test_retry_on_says_which_statuses_are_retried(
    mode: tuple[str, str], on: str, codes: tuple[int, ...], status: int, retried: bool
) -> None:
    got, up, counted, stats = _exchange(mode, [_answer(status, b"first")], policy(1, on, codes))
    assert _status(got[0]) == (200 if retried else status), got
    assert len(up.requests) == (2 if retried else 1)
    assert counted == [200 if retried else status]
    assert stats["retries"] == (1 if retried else 0)


@pytest.mark.parametrize(
    ("on", "retried"),
    [("reset", True), ("5xx", True), ("gateway-error", True), ("retriable-4xx", False)],
)
def test_a_connection_closed_before_the_response_is_retried_under_reset(
    mode: tuple[str, str], on: str, retried: bool
) -> None:
    got, up, counted, _ = _exchange(mode, [CLOSE], policy(2, on))
    assert _status(got[0]) == (200 if retried else 503), got
    assert len(up.requests) == (2 if retried else 1)
    assert counted == [200 if retried else 503]


def test_without_a_policy_nothing_is_retried(mode: tuple[str, str]) -> None:
    """The default: the 503 and the close of a new connection reach the
    client as before (Envoy's 503 for the close)."""
    for script, status in (([_answer(503)], 503), ([CLOSE], 503)):
        got, up, counted, stats = _exchange(mode, list(script), None)
        assert _status(got[0]) == status
        assert len(up.requests) == 1
        assert counted == [status] and stats["retries"] == 0


def test_the_retry_goes_to_another_endpoint_first(mode: tuple[str, str]) -> None:
    """Istio's previous-hosts predicate: an endpoint that always answers 503
    is tried once, the other one answers; the 503's connection is closed."""
    bad = Scripted([_answer(503)] * 10)
    good = Scripted([])
    relay = _proxy(mode, (bad.endpoint, good.endpoint), policy(3, "5xx"))
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 200, got
        assert (len(bad.requests), len(good.requests)) == (1, 1)
        deadline = time.monotonic() + 2
        while bad.closed_by_relay == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bad.closed_by_relay == 1, "the retried try's connection stayed open (pooled?)"
        a.close()
    finally:
        relay.close()
        bad.close()
        good.close()


@pytest.mark.parametrize("ignore", [True, False], ids=["ignore-previous", "as-drawn"])
def test_retry_ignore_previous_hosts_says_where_the_retry_goes(
    mode: tuple[str, str], ignore: bool
) -> None:
    """Two endpoints in order, the first answers 503 once: the retry goes
    to the other one (retryIgnorePreviousHosts true, Istio's default), or
    to the first again, as the route drew them (false)."""
    first = Scripted([_answer(503)])
    second = Scripted([])
    retry = policy(1, "5xx", ignore_previous_hosts=ignore)
    relay = _proxy(mode, (first.endpoint, second.endpoint), retry)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 200, got
        assert relay.stats()["retries"] == 1
        a.close()
    finally:
        relay.close()
        first.close()
        second.close()
    assert (len(first.requests), len(second.requests)) == ((1, 1) if ignore else (2, 0))
    assert first.accepted == (1 if ignore else 2)  # (the 503's connection is never pooled)


@pytest.mark.parametrize("ignore", [True, False], ids=["ignore-previous", "as-drawn"])
def test_a_failed_connect_s_endpoint_is_dropped_whatever_the_policy_says(
    mode: tuple[str, str], ignore: bool
) -> None:
    """A refused connect moves on to the next endpoint, one of the
    policy's tries under 5xx (Envoy's connect-failure retry): its endpoint
    is out of the request's whatever retryIgnorePreviousHosts says. The
    next one answers 503 once; the policy's second retry then goes to the
    last one (true), or the one that answered again (false), never to the
    refusing one."""
    # bound, never listening: connects refused, and no other test's listener
    # takes the port meanwhile (as one could once it were closed)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_endpoint = ("127.0.0.1", dead.getsockname()[1])
    first = Scripted([_answer(503)])
    second = Scripted([])
    retry = policy(2, "5xx", ignore_previous_hosts=ignore)
    relay = _proxy(mode, (dead_endpoint, first.endpoint, second.endpoint), retry)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 200, got
        stats = relay.stats()
        assert (stats["retries"], stats["connect_errors"]) == (2, 1), stats
        a.close()
    finally:
        relay.close()
        first.close()
        second.close()
        dead.close()
    assert (len(first.requests), len(second.requests)) == ((1, 1) if ignore else (2, 0))


def test_a_per_try_timeout_retries_on_another_endpoint(mode: tuple[str, str]) -> None:
    """A try without a response head past perTryTimeout is retried (under
    a policy that retries a reset, as Envoy: here only resets and 409s
    would be), on the other endpoint."""
    slow = Scripted([STALL])
    fast = Scripted([])
    relay = _proxy(
        mode, (slow.endpoint, fast.endpoint), policy(1, "retriable-4xx,reset", per_try=0.3)
    )
    try:
        a = _client(relay)
        t0 = time.monotonic()
        a.sendall(GET)
        got = _response(a)
        took = time.monotonic() - t0
        assert _status(got) == 200, got
        assert 0.25 <= took < 2.0, took
        assert (len(slow.requests), len(fast.requests)) == (1, 1)
        deadline = time.monotonic() + 2
        while slow.closed_by_relay == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.closed_by_relay == 1
        a.close()
    finally:
        relay.close()
        slow.close()
        fast.close()


def test_the_route_timeout_spans_every_try(mode: tuple[str, str]) -> None:
    """Each try stalls: per-try timeouts of 0.3 s, as many tries as the
    route's 0.8 s timeout leaves, then 504 (not 5 x 0.3 s); out of tries
    first, the per-try timeout's own 504."""
    up = Scripted([STALL] * 10)
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), policy(5, "5xx", per_try=0.3), counted, timeout=0.8)
    try:
        a = _client(relay)
        t0 = time.monotonic()
        a.sendall(GET)
        got = _response(a)
        took = time.monotonic() - t0
        assert got.startswith(b"HTTP/1.1 504 ") and got.endswith(b"upstream request timeout"), got
        assert 0.7 <= took < 1.6, took
        assert 2 <= len(up.requests) <= 4
        a.close()
        relay.flush_reports(1.0)
    finally:
        relay.close()
        up.close()
    assert [s for s, _ in counted.rows] == [504]
    # out of tries before the route timeout: the last try's timeout is a 504
    up = Scripted([STALL] * 10)
    relay = _proxy(mode, (up.endpoint,), policy(1, "5xx", per_try=0.2))
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert got.startswith(b"HTTP/1.1 504 "), got
        assert len(up.requests) == 2
        a.close()
    finally:
        relay.close()
        up.close()


def test_a_request_over_the_replay_limit_is_not_retried(mode: tuple[str, str]) -> None:
    """A body bigger than what the relay holds (64 KiB) cannot be sent
    again: its 503 is the client's. A small POST is retried, body and all
    (a policy holds every method, as Envoy retries any)."""
    big = b"x" * 70000
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    got, up, _, stats = _exchange(mode, [_answer(503)], policy(2, "5xx"), request=post)
    assert _status(got[0]) == 503
    assert len(up.requests) == 1 and stats["retries"] == 0
    small = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    got, up, _, stats = _exchange(mode, [_answer(503)], policy(2, "5xx"), request=small)
    assert _status(got[0]) == 200
    assert up.requests == [sent_up(small), sent_up(small, 2)]


def test_a_response_that_began_is_never_retried(mode: tuple[str, str]) -> None:
    """A 200 cut short after its head went out: the client's connection
    ends, nothing is sent again; an interim head (100 Continue) that went
    out makes the 503 after it final too."""
    up = Scripted([(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", CLOSE)])
    relay = _proxy(mode, (up.endpoint,), policy(3, "5xx,reset"))
    try:
        a = _client(relay)
        a.sendall(GET)
        got, how = _read_all(a, 3)
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"abc"), (got, how)
        assert how in ("EOF", "ConnectionResetError"), how
        assert len(up.requests) == 1
    finally:
        relay.close()
        up.close()
    got, up, counted, _ = _exchange(
        mode, [b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(503, b"no")], policy(3, "5xx")
    )
    assert got[0].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 "), got
    assert len(up.requests) == 1 and counted == [503]


def test_outlier_detection_hears_each_failed_try(mode: tuple[str, str]) -> None:
    """A try closed before its response is a gateway failure of its
    endpoint, as without a policy; a retried 503 is an answer (an
    application's status), not a failure."""
    failures: list[tuple[tuple[str, int], str]] = []
    answered: list[tuple[str, int]] = []
    up = Scripted([CLOSE, _answer(503)])
    relay = _proxy(
        mode,
        (up.endpoint,),
        policy(3, "5xx"),
        response_failed=lambda ep, tag, why: failures.append((tuple(ep), why)),
        answered=lambda ep, tag: answered.append(tuple(ep)),
    )
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _status(_response(a)) == 200
        a.close()
        relay.flush_reports(1.0)
    finally:
        relay.close()
        up.close()
    assert failures == [(up.endpoint, "upstream closed the connection before a response")]
    assert answered and set(answered) == {up.endpoint}


@pytest.mark.parametrize(("on", "retried"), [("retriable-4xx", False), ("reset", True)])
def test_a_post_on_a_reused_connection_is_sent_again_only_as_the_policy_says(
    mode: tuple[str, str], on: str, retried: bool
) -> None:
    """A policy holds a POST for its tries, which must not make the reused
    connection's own retry (idempotent methods only) take it: a POST whose
    pooled connection closes before answering gets the 503 as before,
    unless the policy retries resets."""
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    up = Scripted([_answer(200, OK_BODY), CLOSE])
    relay = _proxy(mode, (up.endpoint,), policy(1, on))
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _status(_response(a)) == 200
        a.sendall(post)
        got = _response(a)
        assert _status(got) == (200 if retried else 503), got
        sent = [sent_up(GET), sent_up(post), sent_up(post, 2)]
        assert up.requests == (sent if retried else sent[:2])
        a.close()
    finally:
        relay.close()
        up.close()


RETRY_RULES = gateway_routes(
    f"""\
  - name: retried
    route: [{{destination: {{host: {GATEWAY_HOST}}}}}]
    retries:
      attempts: 2
      retryOn: gateway-error
""",
    api="v1alpha3",
)
# The same for Istio 0.7's RouteRule: its policy is 5xx,connect-failure,refused-stream
ROUTE_RULE_RETRIES = """
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: svc-retried}
spec:
  destination: {name: svc}
  httpReqRetries:
    simpleRetry: {attempts: 2, perTryTimeout: 5s}
"""


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize(
    "retry_rules", [RETRY_RULES, ROUTE_RULE_RETRIES], ids=["virtual-service", "route-rule"]
)
def test_a_worker_applies_a_virtual_service_s_retries(
    which: str, retry_rules: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy from the rule file to the relay, through a whole worker
    (the compiled twin from its cached verdicts, the pure one per
    decision): of two endpoints one answers 503 every time, the other 200;
    every request gets 200, each counted once as 200 in the Istio metric;
    /stats counts the retries. A RouteRule's httpReqRetries the same."""
    import asyncio

    _worker_twin(which, monkeypatch)
    bad = Scripted([_answer(503, b"no")] * 100)
    good = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(bad.endpoint[1], good.endpoint[1]) + retry_rules)
    got: list[bytes] = []
    seen: dict[str, Any] = {}

    def get(address: tuple[str, int]) -> bytes:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            return _response(s)

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            for _ in range(6):
                got.append(await loop.run_in_executor(None, get, address))
            assert worker.relay is not None
            worker.relay.flush_reports(1.0)
            seen["stats"] = worker.relay.stats()
            seen["istio"] = {
                dict(labels)["response_code"]: n
                for labels, n in worker.relay_counters.snapshot()["istio_requests_total"].items()
            }

    try:
        asyncio.run(main())
    finally:
        bad.close()
        good.close()
    assert [_status(g) for g in got] == [200] * 6, got
    assert len(good.requests) == 6 and 1 <= len(bad.requests) <= 6
    assert seen["stats"]["requests"] == 6
    assert seen["stats"]["retries"] == len(bad.requests)
    assert seen["istio"] == {"200": 6}, seen["istio"]


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("ignore", ["true", "false"])
def test_a_worker_applies_retry_ignore_previous_hosts(
    which: str, ignore: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """retryIgnorePreviousHosts from the rule file to the relay: two
    endpoints (round robin), each answers 503 to its first request only,
    one retry. Avoiding the previous endpoint, the retry meets the other
    one's 503, the client's answer; false, it goes to the same endpoint
    again, which now answers 200."""
    import asyncio

    _worker_twin(which, monkeypatch)
    ups = [Scripted([_answer(503, b"no")]), Scripted([_answer(503, b"no")])]
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(*(up.endpoint[1] for up in ups))
        + RETRY_RULES.replace(
            "retryOn: gateway-error",
            f"retryOn: gateway-error\n      retryIgnorePreviousHosts: {ignore}",
        ).replace("attempts: 2", "attempts: 1")
    )
    got: dict[str, Any] = {}

    def get(address: tuple[str, int]) -> bytes:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            return _response(s)

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            got["response"] = await asyncio.get_running_loop().run_in_executor(None, get, address)
            assert worker.relay is not None
            got["retries"] = worker.relay.stats()["retries"]

    try:
        asyncio.run(main())
    finally:
        for up in ups:
            up.close()
    assert got["retries"] == 1
    seen = sorted(len(up.requests) for up in ups)
    if ignore == "true":
        assert _status(got["response"]) == 503 and seen == [1, 1], got
    else:
        assert _status(got["response"]) == 200 and seen == [0, 2], got


@pytest.mark.parametrize("routing", ["connection", "request"])
def test_connection_mode_says_it_does_not_apply_a_retry_policy(
    routing: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Never silently ignored: --http-routing connection relays bytes and
    cannot retry a request, so a table with a retry policy is a warning
    naming the route; per request, the default, there is none."""
    import asyncio

    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(9) + RETRY_RULES)

    async def main() -> None:
        async with gateway_worker(rules, http_routing=routing) as (watcher, _, _):
            assert watcher.state.table.retried_routes() == [
                ("svc.default.svc.cluster.local", "svc/retried")
            ]

    with caplog.at_level("WARNING", logger="l4proxy.worker"):
        asyncio.run(main())
    warned = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    if routing == "connection":
        assert warned == [
            "retry policies (http[].retries, httpReqRetries, an HTTPRoute's retry) are not "
            "applied with --http-routing connection "
            "(only per request, the default): svc.default.svc.cluster.local route svc/retried"
        ]
    else:
        assert warned == []


def test_a_retry_whose_connects_all_fail_answers_503(mode: tuple[str, str]) -> None:
    """A try answered 503, its retry's connects refused by every endpoint
    (the other endpoint is down, the first one went down meanwhile): the
    client gets 503 no healthy upstream, once (Envoy's answer to a retry
    whose connects failed; a first attempt's every connect failing gets
    it too)."""
    # bound, never listening: connects refused, and no other test's listener
    # takes the port meanwhile (as one could once it were closed)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_endpoint = ("127.0.0.1", dead.getsockname()[1])
    up = Scripted([])

    def answer_then_go_down(conn: socket.socket) -> None:
        up.backend.listener.shutdown(socket.SHUT_RDWR)  # (wakes its accept: not listening)
        up.backend.listener.close()
        conn.sendall(_answer(503, b"no"))

    up.script = [answer_then_go_down]
    counted = Counted()
    relay = _proxy(mode, (up.endpoint, dead_endpoint), policy(3, "5xx"), counted)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 503 and got.endswith(b"no healthy upstream"), got
        a.close()
        relay.flush_reports(1.0)
    finally:
        relay.close()
        up.close()
        dead.close()
    assert [s for s, _ in counted.rows] == [503]
