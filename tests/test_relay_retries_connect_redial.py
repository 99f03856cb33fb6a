"""Under a retry policy that retries a failed connect (retryOn
connect-failure, reset, reset-before-request, 5xx, gateway-error; Istio's
default among them), the try after a failed connect dials an endpoint
already tried when none is left untried, as Envoy's: Istio's route retry
policy has ``retry_host_predicate: previous_hosts`` with
``host_selection_retry_max_attempts: 5`` (pilot's retry.DefaultPolicy()),
and Envoy's load balancer re-picks a host for each retry while the
predicate rejects it (``shouldSelectAnotherHost``: a host tried already),
keeping its last pick once those picks are spent: with one pod, the same
pod again after the backoff, up to num_retries times. So a single pod
refusing for a moment (restarting, a rollout) gets its retries. Before, a
failed connect's endpoint was dropped from the request's candidates: one
endpoint refusing was the client's 503 at once, its tries unspent.

The order: those not tried yet first, then the one tried least recently
(each endpoint tried goes last). Without such a policy nothing changes:
each endpoint dialled once (the relay's own moves). Each failed connect is
one failure for outlier detection (``connect_failed``), as before.

Both twins (pure, compiled per request and from a cached verdict), real
sockets, seeded backoffs of a few ms. What is counted: the connects
(refused ones heard through ``connect_failed``, accepted ones by the
backend), the retries, x-envoy-attempt-count, the reported flags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from l4proxy.dataplane import accesslog
from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    Reported,
    Scripted,
    _client,
    _closed_stats,
    _proxy,
    _response,
    _status,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.conftest import accept_until_closed
from tests.test_relay_attempt_count import _counts, _refusing
from tests.test_relay_retries_connect import ISTIO_DEFAULT

SEED = 20261207
BACKOFF = 0.005  # the base interval: waits of a few ms
NO_UPSTREAM = b"no healthy upstream"
Endpoint = tuple[str, int]


def _policy(attempts: int, on: str) -> RetryPolicy:
    codes = (503,) if on == ISTIO_DEFAULT else ()
    return RetryPolicy.of(attempts, 0.0, on.split(","), codes, BACKOFF)


def _relay(
    mode: tuple[str, str],
    endpoints: tuple[Endpoint, ...],
    retry: RetryPolicy | None,
    on_failed: Callable[[int], None] | None = None,
) -> tuple[Any, Reported, list[Endpoint]]:
    """A relay of *mode* to *endpoints* under *retry*: its reports, and the
    endpoints whose connect failed, in order (``connect_failed``, the
    relay's thread, before it moves on: *on_failed* of their count)."""
    reported = Reported()
    failed: list[Endpoint] = []

    def connect_failed(endpoint: Any, tag: Any, why: str) -> None:
        failed.append(tuple(endpoint))
        if on_failed is not None:
            on_failed(len(failed))

    relay = _proxy(
        mode, endpoints, retry, seed=SEED, connect_failed=connect_failed, **reported.kw(mode[0])
    )
    return relay, reported, failed


ON_CONNECT = ["connect-failure", "5xx", ISTIO_DEFAULT, "reset", "gateway-error"]


@pytest.mark.parametrize("refused", [1, 2])
@pytest.mark.parametrize("on", ON_CONNECT)
def test_one_endpoint_refusing_then_accepting_gets_the_retry(
    mode: tuple[str, str], on: str, refused: int
) -> None:
    """One endpoint, two retries: its first *refused* connects are refused
    (a socket bound, not listening), then it listens (from the relay's
    connect_failed report of the last refused one: before the retry's
    backoff began) and answers. The retry dials it again: the 200 is the
    client's, on one accepted connection, its request saying
    x-envoy-attempt-count *refused* + 1; each refused connect a retry and
    one failure heard. Before: 503 no healthy upstream after the first
    refused connect, never accepted."""
    dead = _refusing()
    endpoint: Endpoint = ("127.0.0.1", dead.getsockname()[1])
    up = Scripted([])  # (its handler serves the connections dead accepts)

    def listen_after(n: int) -> None:
        if n == refused:
            dead.listen(8)
            accept_until_closed(dead, up.backend._serve)

    relay, reported, failed = _relay(mode, (endpoint,), _policy(2, on), on_failed=listen_after)
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        assert _status(got) == 200, got
        assert up.accepted == 1
        assert _counts(up.requests) == [[str(refused + 1).encode()]]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
        dead.close()
    assert failed == [endpoint] * refused
    assert (stats["retries"], stats["connect_errors"]) == (refused, refused), stats
    assert [s for s, _ in reported.rows] == [200]


@pytest.mark.parametrize("attempts", [1, 2, 3])
@pytest.mark.parametrize("on", ON_CONNECT)
def test_one_endpoint_always_refusing_is_dialled_once_per_try(
    mode: tuple[str, str], on: str, attempts: int
) -> None:
    """One endpoint whose every connect is refused: 1 + attempts connects
    (each after its backoff), then 503 no healthy upstream, UF,URX, every
    retry counted. The client's connection stays for its next request,
    which gets the same. Before: one connect, the 503 at once, no retry."""
    dead = _refusing()
    endpoint: Endpoint = ("127.0.0.1", dead.getsockname()[1])
    relay, reported, failed = _relay(mode, (endpoint,), _policy(attempts, on))
    try:
        c = _client(relay)
        for _ in range(2):
            c.sendall(GET)
            got = _response(c)
            assert _status(got) == 503 and got.endswith(NO_UPSTREAM), got
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        dead.close()
    assert failed == [endpoint] * (2 * (1 + attempts))
    tries = 2 * (1 + attempts)
    assert (stats["retries"], stats["connect_errors"]) == (2 * attempts, tries), stats
    assert reported.rows == [(503, accesslog.UF | accesslog.URX)] * 2


@pytest.mark.parametrize("on", ON_CONNECT)
def test_two_endpoints_refusing_are_dialled_in_turn(mode: tuple[str, str], on: str) -> None:
    """Two endpoints, both refusing, three retries: four connects, A, B, A,
    B (the one tried least recently first), then the 503, UF,URX. Before:
    A, B, the 503, one retry."""
    dead = [_refusing(), _refusing()]
    a, b = (("127.0.0.1", d.getsockname()[1]) for d in dead)
    relay, reported, failed = _relay(mode, (a, b), _policy(3, on))
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        assert _status(got) == 503 and got.endswith(NO_UPSTREAM), got
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        for d in dead:
            d.close()
    assert failed == [a, b, a, b]
    assert (stats["retries"], stats["connect_errors"]) == (3, 4), stats
    assert reported.rows == [(503, accesslog.UF | accesslog.URX)]


def test_an_untried_endpoint_comes_before_a_tried_one(mode: tuple[str, str]) -> None:
    """Three endpoints, A and B refusing, C answering, three retries: A, B,
    then C (not tried yet) before A again: the 200 saying 3, two retries."""
    dead = [_refusing(), _refusing()]
    a, b = (("127.0.0.1", d.getsockname()[1]) for d in dead)
    up = Scripted([])
    relay, reported, failed = _relay(mode, (a, b, up.endpoint), _policy(3, "connect-failure"))
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        assert _status(got) == 200, got
        assert _counts(up.requests) == [[b"3"]]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
        for d in dead:
            d.close()
    assert failed == [a, b]
    assert (stats["retries"], stats["connect_errors"]) == (2, 2), stats
    assert [s for s, _ in reported.rows] == [200]


@pytest.mark.parametrize("on", [None, "retriable-4xx", "retriable-status-codes"])
@pytest.mark.parametrize("n", [1, 2])
def test_without_such_a_policy_each_endpoint_is_dialled_once(
    mode: tuple[str, str], on: str | None, n: int
) -> None:
    """No policy that retries a failed connect (none; retriable-4xx; codes
    alone), *n* endpoints refusing: each dialled once, at once (the relay's
    own moves), then 503 no healthy upstream, UF alone, no retry counted:
    as before."""
    dead = [_refusing() for _ in range(n)]
    endpoints = tuple(("127.0.0.1", d.getsockname()[1]) for d in dead)
    retry = None
    if on is not None:
        retry = RetryPolicy.of(3, 0.0, on.split(","), (502,) if "codes" in on else (), BACKOFF)
    relay, reported, failed = _relay(mode, endpoints, retry)
    try:
        c = _client(relay)
        c.sendall(GET)
        got = _response(c)
        assert _status(got) == 503 and got.endswith(NO_UPSTREAM), got
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        for d in dead:
            d.close()
    assert failed == list(endpoints)
    assert (stats["retries"], stats["connect_errors"]) == (0, n), stats
    assert reported.rows == [(503, accesslog.UF)]
