"""The try after a failed connect, under a retry policy that retries one
(retryOn connect-failure, reset, 5xx, gateway-error; Istio's default among
them), waits the policy's backoff first, as Envoy's router does: its
onUpstreamReset() -> shouldRetryReset() takes a failed connect for
RetryWithBackoff and sends the retry from its backoff timer
(RetryStateImpl::enableBackoffTimer, the jittered exponential backoff of a
5xx's retry). The relay's own move to the next endpoint (no policy that
retries a failed connect) still goes at once. Either way the next try runs
its own per-try timer, as Envoy's retry is a new upstream request with a
timer of its own (before, the try after a failed connect ran on what was
left of the failed try's).

Both twins (pure, compiled per request and from a cached verdict), real
sockets, seeded (``seed``: the backoffs' draws the same each run). What is
counted: the answers, the tries that reach each backend, the retries;
where time must pass (a per-try timer), margins of a second and more.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import DEFAULT_RETRY_BACKOFF, Choice, RetryPolicy, Verdict
from tests._scripted import (
    CLOSE,
    GET,
    OK_BODY,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _reset,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_attempt_count import _counts, _refusing
from tests.test_relay_edges import _relay, _wait_for
from tests.test_relay_retries_connect import ISTIO_DEFAULT

SEED = 20261207
# a base interval whose first wait is in [0, 1000 s): past any test's
# route timeout but for a draw below 1/1000 (seeded: the same draw each run)
FOREVER = 1000.0


def policy(
    attempts: int,
    on: str,
    per_try: float = 0.0,
    backoff: float = DEFAULT_RETRY_BACKOFF,
    codes: tuple[int, ...] = (),
) -> RetryPolicy:
    return RetryPolicy.of(attempts, per_try, on.split(","), codes, backoff)


@pytest.mark.parametrize(
    "on",
    [
        *("5xx", ISTIO_DEFAULT, "reset", "gateway-error", "reset-before-request,retriable-4xx"),
        *("connect-failure", "reset-before-request"),  # (alone: no policy before)
    ],
)
def test_the_policy_s_retry_after_a_failed_connect_waits_its_backoff(
    mode: tuple[str, str], on: str
) -> None:
    """A refused first connect under a policy that retries it, a backoff of
    a base of 1000 s, a route timeout of 1 s: the retry waits (the route
    timeout's 504 ends the wait), the next endpoint never sees a connect;
    the retry was counted, the relay holds nothing once the client goes.
    Before, the move went at once: the next endpoint's 200."""
    dead = _refusing()
    up = Scripted([])
    retry = policy(1, on, backoff=FOREVER, codes=(503,) if on == ISTIO_DEFAULT else ())
    relay = _proxy(
        mode,
        (("127.0.0.1", dead.getsockname()[1]), up.endpoint),
        retry,
        timeout=1.0,
        seed=SEED,
    )
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c, timeout=10.0)
        assert _status(got) == 504 and got.endswith(b"upstream request timeout"), got
        assert up.accepted == 0 and up.requests == []
        stats = _closed_stats(c, relay)
        _wait_for("the client's connection is gone", lambda: relay.active() == 0, 3.0)
        assert up.accepted == 0  # (no retry left behind, its wait over)
    finally:
        relay.close()
        up.close()
        dead.close()
    assert (stats["retries"], stats["connect_errors"]) == (1, 1), stats


def test_the_retry_goes_once_its_backoff_passed(mode: tuple[str, str]) -> None:
    """Two refused connects under two retries on 5xx (a base of 10 ms):
    each move waits its backoff, then goes through the pool as a 5xx's
    retry does; the third endpoint answers, its request saying 3; both
    retries counted. Then the same client's next request: the dead
    endpoints' connects are refused again (the relay does not remember
    them), the waits and the answer the same."""
    dead = [_refusing(), _refusing()]
    up = Scripted([])
    endpoints = (*(("127.0.0.1", d.getsockname()[1]) for d in dead), up.endpoint)
    relay = _proxy(mode, endpoints, policy(2, "5xx", backoff=0.01), seed=SEED)
    try:
        c = _client(relay)
        for _ in range(2):
            c.sendall(GET)
            got = _response(c)
            assert _status(got) == 200, got
        assert _counts(up.requests) == [[b"3"], [b"3"]]
        assert up.accepted == 1  # (the second request's try took the pooled connection)
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
        for d in dead:
            d.close()
    assert (stats["retries"], stats["connect_errors"]) == (4, 4), stats


@pytest.mark.parametrize("on", [None, "retriable-4xx", "retriable-status-codes"])
def test_the_relay_s_own_move_goes_at_once(mode: tuple[str, str], on: str | None) -> None:
    """Without a policy that retries a failed connect (none; retryOn
    retriable-4xx; codes alone) the move is the relay's own: at once,
    whatever the policy's backoff (a base of 1000 s, a route timeout of 1 s:
    a wait would be the 504); no retry counted."""
    dead = _refusing()
    up = Scripted([])
    retry = None
    if on is not None:
        retry = RetryPolicy.of(1, 0.0, on.split(","), (502,) if "codes" in on else (), FOREVER)
    relay = _proxy(
        mode, (("127.0.0.1", dead.getsockname()[1]), up.endpoint), retry, timeout=1.0, seed=SEED
    )
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c, timeout=10.0)
        assert _status(got) == 200, got
        assert _counts(up.requests) == [[b"2"]]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
        dead.close()
    assert (stats["retries"], stats["connect_errors"]) == (0, 1), stats


@contextmanager
def _hanging() -> Iterator[tuple[str, int]]:
    """An endpoint whose connects hang: a listener's accept queue full (one
    place, taken), its SYNs unanswered until the relay's connect timeout."""
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(0)
    filler = socket.create_connection(slow.getsockname())
    try:
        yield slow.getsockname()
    finally:
        filler.close()
        slow.close()


CONNECT_TIMEOUT = 1.5
PER_TRY = 3.0
ANSWER_AFTER = 2.0  # the next endpoint's: 3.5 s after the request, 2 s into its try


def _slow_200(conn: socket.socket) -> None:
    time.sleep(ANSWER_AFTER)
    try:
        conn.sendall(_answer(200, b"late"))
    except OSError:
        pass  # (the relay gave the try up: the test says so)


@pytest.mark.parametrize(
    ("on", "retries"),
    [("5xx", 1), ("retriable-4xx", 0)],
    ids=["policy-s-retry", "relay-s-own-move"],
)
def test_the_try_after_a_failed_connect_has_its_own_per_try_timer(
    mode: tuple[str, str], on: str, retries: int
) -> None:
    """A per-try timeout of 3 s; the first endpoint's connect hangs until
    the connect timeout, 1.5 s (no per-try timer runs meanwhile: a try's
    starts with its connection's readiness, as Envoy's); the next endpoint
    answers 2 s into its try: its 200 is the client's, the next try's
    timer (from its connection's readiness: after the backoff, a base of
    1 ms, under a policy that retries the failed connect; at once, the
    relay's own move) 1 s from passing. Before, the next try ran on the
    first try's timer, started at the request's end, which passed 1.5 s
    into it: the 504 (retries spent, or retriable-4xx that retries no
    timeout)."""
    up = Scripted([_slow_200])
    retry = policy(1, on, per_try=PER_TRY, backoff=0.001)
    with _hanging() as hang:
        relay = _proxy(mode, (hang, up.endpoint), retry, connect_timeout=CONNECT_TIMEOUT, seed=SEED)
        try:
            c = _client(relay)
            t0 = time.monotonic()
            c.sendall(GET)
            got = _response(c, timeout=15.0)
            took = time.monotonic() - t0
            assert _status(got) == 200 and got.endswith(b"late"), (got, took)
            assert _counts(up.requests) == [[b"2"]]
            # (the connect timeout, then the answer's wait: 3.5 s at least)
            assert took >= CONNECT_TIMEOUT + ANSWER_AFTER - 0.1, took
            stats = _closed_stats(c, relay)
        finally:
            relay.close()
            up.close()
    assert (stats["retries"], stats["connect_errors"]) == (retries, 1), stats


@pytest.mark.parametrize(
    ("on", "retries"),
    [("5xx", 1), ("retriable-4xx", 0)],
    ids=["policy-s-retry", "relay-s-own-move"],
)
def test_a_try_after_a_failed_connect_times_from_the_request_s_end(
    mode: tuple[str, str], on: str, retries: int
) -> None:
    """A POST whose body is not all there when its first connect is refused:
    the next endpoint's try, after the backoff or at once, runs its per-try
    timer (1 s) from the request's end, as a first try's does (Envoy's from
    the request's end where it comes after the connect), not from its send:
    the client sends the rest 2 s later, the backend answers at once, the
    200 is the client's (a timer from the send gave the 504)."""
    dead = _refusing()
    up = Scripted([])
    retry = policy(1, on, per_try=1.0, backoff=0.001)
    relay = _proxy(mode, (("127.0.0.1", dead.getsockname()[1]), up.endpoint), retry, seed=SEED)
    try:
        c = _client(relay)
        c.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nfirst")
        time.sleep(2.0)
        c.sendall(b"-half")
        got = _response(c, timeout=10.0)
        assert _status(got) == 200, got
        assert len(up.requests) == 1 and up.requests[0].endswith(b"\r\n\r\nfirst-half")
        assert _counts(up.requests) == [[b"2"]]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
        dead.close()
    assert (stats["retries"], stats["connect_errors"]) == (retries, 1), stats


def test_a_client_gone_during_the_wait_after_a_failed_connect_leaks_nothing(
    mode: tuple[str, str],
) -> None:
    """The client resets its connection while its request waits out the
    backoff after a refused first connect (a base of 1000 s): the relay's
    connection ends, no try follows (the next endpoint never sees a
    connect), and the relay serves the next client (whose own wait the
    route timeout's 504 ends)."""
    dead = _refusing()
    up = Scripted([])
    relay = _proxy(
        mode,
        (("127.0.0.1", dead.getsockname()[1]), up.endpoint),
        policy(1, "5xx", backoff=FOREVER),
        timeout=1.0,
        seed=SEED,
    )
    try:
        a = _client(relay)
        a.sendall(GET)
        _wait_for("the refused connect", lambda: relay.stats()["connect_errors"] == 1, 3.0)
        _reset(a)
        _wait_for("the client's connection is gone", lambda: relay.active() == 0, 3.0)
        b = _client(relay)
        b.sendall(GET)
        assert _status(_response(b, timeout=10.0)) == 504
        b.close()
        _wait_for("the second client is gone", lambda: relay.active() == 0, 3.0)
        assert up.accepted == 0
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
        dead.close()
    assert (stats["retries"], stats["connect_errors"]) == (2, 2), stats


def _by_host(
    mode: tuple[str, str],
    routes: dict[str, tuple[tuple[tuple[str, int], ...], RetryPolicy]],
    **kw: Any,
) -> Any:
    """A relay of *mode* routing by Host: its endpoints in order, its
    retry policy."""
    which, how = mode
    if how == "resolve":
        kw["resolve"] = lambda head, origin: Verdict(
            (Choice(1, routes[head.host][0], "ORDERED", tag="t"),),
            ttl=60.0,
            retry=routes[head.host][1],
        )
    return _relay(
        which,
        lambda head, origin: Decision(routes[head.host][0], tag="t", retry=routes[head.host][1]),
        **kw,
    )


def _get(host: bytes) -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % host


@pytest.mark.parametrize("earlier", ["this-request", "previous-request"])
def test_the_policy_s_try_after_a_failed_connect_has_its_own_reuse_retry(
    mode: tuple[str, str], earlier: str
) -> None:
    """The policy's try after a refused connect (one attempt, on 5xx) takes
    an idle pooled connection, which the backend closes without a byte (a
    stale one): that try has the reused connection's one retry of its own,
    as a policy's try after a 5xx has (a stale pooled connection is no
    attempt of the policy): on a new connection, the 200. The reused
    connection's retry taken earlier, by this request's first try (A's
    pooled connection stale, then B's connect refused) or by the previous
    request on the client connection, is not the policy's try's. Before,
    the compiled twin took that earlier one for the policy's try's: the
    503 (reset before headers, retried), its one attempt spent."""
    dead = _refusing()
    dead_ep = ("127.0.0.1", dead.getsockname()[1])
    if earlier == "this-request":
        # a: A's 200 (pooled); c: C's 200 (pooled); x: A's pooled connection
        # closes (its retry to B refused), the policy's try on C's closes
        a = Scripted([_answer(200, b"a"), CLOSE])
        c_ = Scripted([_answer(200, b"c"), CLOSE])
        asks = [b"a", b"c", b"x"]
        x = (a.endpoint, dead_ep, c_.endpoint)
        last = c_
    else:
        # a: A's 200; a again: its pooled connection closes, the retry's
        # 200 on a new one (pooled); x: B refused, the policy's try on A's
        # pooled connection closes
        a = Scripted([_answer(200, b"a"), CLOSE, _answer(200, b"a"), CLOSE])
        c_ = Scripted([])
        asks = [b"a", b"a", b"x"]
        x = (dead_ep, a.endpoint)
        last = a
    retry = policy(1, "5xx", backoff=0.01)
    routes = {"a": ((a.endpoint,), retry), "c": ((c_.endpoint,), retry), "x": (x, retry)}
    relay = _by_host(mode, routes, seed=SEED)
    try:
        c = _client(relay)
        for host in asks:
            c.sendall(_get(host))
            got = _response(c, timeout=10.0)
            assert _status(got) == 200, (host, got)
        assert got.endswith(OK_BODY), got  # (the script's end: the new connection's)
        accepted = last.accepted
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        a.close()
        c_.close()
        dead.close()
    # x's stale pooled try, then its own retry on a new connection
    assert accepted == (2 if earlier == "this-request" else 3), accepted
    assert (stats["retries"], stats["connect_errors"]) == (1, 1), stats
