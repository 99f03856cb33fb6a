"""A retry policy that can never fire here is no policy.

Only ``5xx``, ``gateway-error``, ``reset``, ``retriable-4xx`` and
``retriable-status-codes`` with a code retry a response or a reset on an
HTTP/1.1 exchange, and ``connect-failure`` and ``reset-before-request`` a
failed connect; the others are HTTP/2, HTTP/3 or gRPC events or need what
Istio does not configure. A policy of those alone held up to 64 KiB of
every request for a replay that could not come: it is now no policy
(None), unless it has a per-try timeout, which still answers 504
(Envoy's), with nothing held. A policy that retries a failed connect alone
is one, per-try timeout or not, holding nothing either.
"""

from __future__ import annotations

import pytest

from l4proxy.dataplane._exchange_py import Exchange, Route
from l4proxy.dataplane.verdict import RETRY_STATUS_CODES, RetryPolicy
from l4proxy.rules.routing import HttpRetry
from l4proxy.sidecar.worker import _retry_policy
from tests._scripted import (
    STALL,
    Scripted,
    _client,
    _closed_stats,
    _proxy,
    _response,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges_count import Counted

NEVER = [
    ("refused-stream", "unavailable", "cancelled"),
    ("deadline-exceeded", "internal", "resource-exhausted", "http3-post-connect-failure"),
    ("retriable-headers", "envoy-ratelimited"),
    ("retriable-status-codes",),  # without a code
]
# a failed connect alone (Envoy's router retries it under each)
CONNECTS = [
    ("connect-failure",),
    ("retriable-headers", "envoy-ratelimited", "reset-before-request"),
    ("connect-failure", "retriable-status-codes"),  # without a code
]
FIRES = [
    (("5xx",), ()),
    (("gateway-error",), ()),
    (("reset",), ()),
    (("retriable-4xx",), ()),
    (("connect-failure", "retriable-status-codes"), (503,)),
]
POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("on", NEVER)
def test_a_policy_that_never_fires_is_none_unless_it_times_tries(on: tuple[str, ...]) -> None:
    assert _retry_policy(HttpRetry(3, 0.0, on, ())) is None
    timed = _retry_policy(HttpRetry(3, 2.0, on, ()))
    assert timed is not None and timed.on == 0 and timed.per_try_timeout == 2.0
    assert timed.in_effect


@pytest.mark.parametrize("on", CONNECTS)
@pytest.mark.parametrize("per_try", [0.0, 2.0])
def test_a_policy_that_retries_a_failed_connect_alone_is_one(
    on: tuple[str, ...], per_try: float
) -> None:
    """Per-try timeout or not (before: None without one, a policy with one),
    holding no request for a replay (``on`` 0)."""
    got = _retry_policy(HttpRetry(3, per_try, on, ()))
    assert got is not None and got.on == 0 and got.on_connect and got.in_effect
    assert got.per_try_timeout == per_try


@pytest.mark.parametrize(("on", "codes"), FIRES)
def test_a_policy_that_fires_is_kept(on: tuple[str, ...], codes: tuple[int, ...]) -> None:
    got = _retry_policy(HttpRetry(3, 0.0, on, codes))
    assert got is not None and got.on and got.in_effect


def test_retriable_status_codes_without_a_code_has_no_bit() -> None:
    assert RetryPolicy.of(2, 0.0, ["retriable-status-codes"], ()).on == 0
    assert RetryPolicy.of(2, 0.0, ["retriable-status-codes"], (503,)).on == RETRY_STATUS_CODES
    assert not RetryPolicy.of(0, 1.0, ["5xx"], ()).in_effect  # attempts 0: none


@pytest.mark.parametrize(
    ("on", "held"), [("unavailable", False), ("connect-failure", False), ("5xx", True)]
)
def test_a_post_is_held_only_for_a_policy_that_may_retry_it(on: str, held: bool) -> None:
    ex = Exchange()
    (route,) = ex.client_data(POST)
    assert isinstance(route, Route)
    ex.retry = RetryPolicy.of(2, 1.0, [on], ())
    ex.routed(False)
    assert (ex._replay is not None) == held


def test_a_per_try_timeout_alone_still_answers_504(mode: tuple[str, str]) -> None:
    """Envoy's per-try timeout applies whatever retryOn says: a policy that
    never fires here keeps it (the try past it gets the 504), no retry."""
    up = Scripted([STALL])
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), RetryPolicy.of(3, 0.2, ["unavailable"], ()), counted)
    try:
        a = _client(relay)
        a.sendall(POST)
        got = _response(a, timeout=3.0)
        assert got.startswith(b"HTTP/1.1 504 "), got
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 1
    assert [s for s, _ in counted.rows] == [504]
    assert stats["retries"] == 0
