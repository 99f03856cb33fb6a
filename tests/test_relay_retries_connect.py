"""A failed connect under a retry policy that retries it (retryOn
connect-failure, reset, 5xx or gateway-error, Istio's default among them)
is one of the policy's tries, as Envoy's router spends one of its
num_retries on it (onUpstreamReset -> maybeRetryReset -> shouldRetryReset)
and counts it in upstream_rq_retry: the relay's move to the next endpoint
spends one of ``attempts`` and counts in l4proxy_upstream_rq_retry_total,
and once they are spent the request is answered as when no endpoint is
left. Without such a policy (none, or a retryOn that names no failed
connect) the move stays the relay's own, spending nothing. Both twins
(pure, compiled per request and from a cached verdict), real sockets: the
tries that reach backends and the refused connects are counted, never
timed."""

from __future__ import annotations

import socket

import pytest

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    Scripted,
    _answer,
    _client,
    _closed_stats,
    _proxy,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.test_relay_attempt_count import _counts, _refusing

ISTIO_DEFAULT = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def _run(
    mode: tuple[str, str], plan: str, retry: RetryPolicy | None
) -> tuple[bytes, dict[str, list[list[bytes]]], dict[str, int]]:
    """One GET through three endpoints, *plan* their kinds in order: ``x``
    refuses connects (bound, never listening), ``5`` answers 503 (then
    200), ``2`` answers 200. What the client got, each answering
    endpoint's requests' x-envoy-attempt-count values (by its position),
    the relay's stats."""
    dead: list[socket.socket] = []
    ups: dict[str, Scripted] = {}
    endpoints = []
    for i, kind in enumerate(plan):
        if kind == "x":
            dead.append(_refusing())
            endpoints.append(("127.0.0.1", dead[-1].getsockname()[1]))
        else:
            ups[str(i)] = Scripted([_answer(503, b"busy")] if kind == "5" else [])
            endpoints.append(ups[str(i)].endpoint)
    relay = _proxy(mode, tuple(endpoints), retry)
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        for up in ups.values():
            up.close()
        for d in dead:
            d.close()
    return got, {i: _counts(up.requests) for i, up in ups.items()}, stats


@pytest.mark.parametrize(
    ("plan", "status", "counts", "connect_errors"),
    [
        # the refused first connect spends the one retry: the 503 of the
        # next endpoint is the client's (before: retried, 200 from the third)
        ("x52", 503, {"1": [[b"2"]], "2": []}, 1),
        # two refused connects: the second finds the retry spent, the third
        # endpoint is never tried (before: 200 from it, saying 3)
        ("xx2", 503, {"2": []}, 2),
        # the 503 spends the retry, the retry's connect is refused: lost
        # (before: the third endpoint answered, saying 3)
        ("5x2", 503, {"0": [[b"1"]], "2": []}, 1),
    ],
    ids=["refused-then-503", "refused-twice", "503-then-refused"],
)
def test_a_failed_connect_spends_one_of_the_policy_s_attempts(
    mode: tuple[str, str],
    plan: str,
    status: int,
    counts: dict[str, list[list[bytes]]],
    connect_errors: int,
) -> None:
    """A policy retrying 5xx once (Envoy retries a failed connect under
    5xx): a refused connect is its one retry, counted, and the request's
    tries end there, as Envoy's (num_retries 1: two tries in all)."""
    got, seen, stats = _run(mode, plan, policy(1, "5xx"))
    assert _status(got) == status, got
    if plan == "x52":
        assert got.endswith(b"busy"), got  # (the backend's own 503)
    else:
        assert got.endswith(b"no healthy upstream"), got
    assert seen == counts
    assert (stats["retries"], stats["connect_errors"]) == (1, connect_errors), stats


@pytest.mark.parametrize(
    "retry",
    [
        policy(1, "gateway-error"),
        policy(1, "reset"),
        policy(1, "connect-failure,retriable-status-codes", (503,)),
        policy(1, "reset-before-request,5xx"),
    ],
    ids=["gateway-error", "reset", "connect-failure", "reset-before-request"],
)
def test_each_retry_on_that_retries_a_failed_connect_spends_a_try(
    mode: tuple[str, str], retry: RetryPolicy
) -> None:
    """Every retryOn under which Envoy's router retries a failed connect:
    two endpoints refuse, the third is never tried, one retry counted."""
    got, seen, stats = _run(mode, "xx2", retry)
    assert _status(got) == 503 and got.endswith(b"no healthy upstream"), got
    assert seen == {"2": []}
    assert (stats["retries"], stats["connect_errors"]) == (1, 2), stats


@pytest.mark.parametrize(
    "retry",
    [None, policy(3, "retriable-4xx"), policy(3, "retriable-status-codes", (502,))],
    ids=["no-policy", "retriable-4xx", "codes"],
)
def test_without_a_policy_that_retries_it_a_failed_connect_moves_on(
    mode: tuple[str, str], retry: RetryPolicy | None
) -> None:
    """No policy, or one whose retryOn names no failed connect (Envoy would
    answer 503 UF at once): the relay's own retry, as before, spending
    nothing and counting no retry; each refused connect was a try (the
    third endpoint's request says 3)."""
    got, seen, stats = _run(mode, "xx2", retry)
    assert _status(got) == 200, got
    assert seen == {"2": [[b"3"]]}
    assert (stats["retries"], stats["connect_errors"]) == (0, 2), stats


def test_istio_s_default_policy_spends_its_two_attempts_on_failed_connects(
    mode: tuple[str, str],
) -> None:
    """Istio's default (attempts 2 on connect-failure, ...,
    retriable-status-codes 503): two refused connects spend both retries,
    so the third endpoint's 503 is the client's, not retried (before: the
    policy's two retries were still to spend on it)."""
    got, seen, stats = _run(mode, "xx5", policy(2, ISTIO_DEFAULT, (503,)))
    assert _status(got) == 503 and got.endswith(b"busy"), got
    assert seen == {"2": [[b"3"]]}
    assert (stats["retries"], stats["connect_errors"]) == (2, 2), stats


def test_a_policy_with_tries_left_moves_on_and_counts_each(mode: tuple[str, str]) -> None:
    """Istio's default again, one refused connect then a 503: the connect
    and the 503 spend the two retries, the third endpoint answers 200
    saying 3; two retries counted."""
    got, seen, stats = _run(mode, "x52", policy(2, ISTIO_DEFAULT, (503,)))
    assert _status(got) == 200, got
    assert seen == {"1": [[b"2"]], "2": [[b"3"]]}
    assert (stats["retries"], stats["connect_errors"]) == (2, 1), stats


@pytest.mark.parametrize("per_try", [0.0, 30.0], ids=["no-per-try", "per-try"])
@pytest.mark.parametrize("on", ["connect-failure", "reset-before-request"])
def test_a_failed_connect_alone_is_the_policy_s_with_a_per_try_timeout_or_not(
    mode: tuple[str, str], on: str, per_try: float
) -> None:
    """retryOn connect-failure (or reset-before-request) alone, attempts 1:
    as Envoy's (num_retries 1), the first refused connect is the one retry,
    the second ends the request, 503 no healthy upstream, the third endpoint
    never tried, one retry counted, with a perTryTimeout or without (before,
    without one the relays took it as no policy: the relay's own moves
    reached the third endpoint, its 200 saying 3, no retry counted; with
    one, this)."""
    got, seen, stats = _run(mode, "xx2", policy(1, on, per_try=per_try))
    assert _status(got) == 503 and got.endswith(b"no healthy upstream"), got
    assert seen == {"2": []}
    assert (stats["retries"], stats["connect_errors"]) == (1, 2), stats


@pytest.mark.parametrize("per_try", [0.0, 30.0], ids=["no-per-try", "per-try"])
def test_connect_failure_alone_with_tries_left_reaches_the_third_endpoint(
    mode: tuple[str, str], per_try: float
) -> None:
    """connect-failure alone, attempts 2: both refused connects are its
    retries, counted, and the third endpoint answers 200 saying 3."""
    got, seen, stats = _run(mode, "xx2", policy(2, "connect-failure", per_try=per_try))
    assert _status(got) == 200, got
    assert seen == {"2": [[b"3"]]}
    assert (stats["retries"], stats["connect_errors"]) == (2, 2), stats
