"""The retry policy at its edges: a lost retry of a pooled try, per-try
timeouts under retryOn, retryOn's parsing (both twins, real sockets)."""

from __future__ import annotations

import socket
from typing import Any

from tests._scripted import (
    GET,
    STALL,
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
from tests.test_relay_edges_count import Counted


def test_a_pooled_try_retried_by_the_policy_whose_connects_all_fail_answers_503(
    mode: tuple[str, str],
) -> None:
    """As test_a_retry_whose_connects_all_fail_answers_503, but the try the
    policy gave up was on a pooled connection (the second request of a
    keep-alive client): the reused connection's own retry must not take
    the lost retry for a pooled connection that closed (the pure twin's
    Exchange._reused stayed True from the try given up)."""
    dead = socket.create_server(("127.0.0.1", 0))
    dead_endpoint = ("127.0.0.1", dead.getsockname()[1])
    dead.close()
    up = Scripted([])

    def answer_then_go_down(conn: socket.socket) -> None:
        up.backend.listener.shutdown(socket.SHUT_RDWR)
        up.backend.listener.close()
        conn.sendall(_answer(503, b"no"))

    up.script = [_answer(200, b"ok"), answer_then_go_down]
    counted = Counted()
    relay = _proxy(mode, (up.endpoint, dead_endpoint), policy(3, "5xx"), counted)
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _status(_response(a)) == 200
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 503, got
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert sorted(s for s, _ in counted.rows) == [200, 503]
    assert stats["errors"] == 0, stats


ISTIO_DEFAULT = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def test_a_per_try_timeout_is_retried_only_under_a_reset_policy(mode: tuple[str, str]) -> None:
    """Envoy retries a try past its per-try timeout as a reset: only under
    5xx, gateway-error or reset (retry_state_impl.cc: 'non-hedged per try
    timeouts ... are only retried if the applicable retry policy specifies
    either RETRY_ON_5XX or RETRY_ON_GATEWAY_ERROR'; wouldRetryFromReset adds
    RETRY_ON_RESET). Under Istio's default retryOn a slow POST is not sent
    a second time: the client gets the 504 at the per-try timeout."""
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    slow = Scripted([STALL])
    fast = Scripted([])
    counted = Counted()
    relay = _proxy(
        mode, (slow.endpoint, fast.endpoint), policy(2, ISTIO_DEFAULT, (503,), 0.3), counted
    )
    try:
        a = _client(relay)
        a.sendall(post)
        got = _response(a)
        assert got.startswith(b"HTTP/1.1 504 "), got
        assert (len(slow.requests), len(fast.requests)) == (1, 0)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        slow.close()
        fast.close()
    assert [s for s, _ in counted.rows] == [504]
    assert stats["retries"] == 0


def test_a_retry_on_token_of_unicode_digits_is_an_error_not_a_traceback(tmp_path: Any) -> None:
    """str.isdigit() is true for '²' (and '٥'), which int() refuses: the
    rule file was a ValueError traceback out of load_rules (validate, the
    watcher), not an error with its line. Istio's strconv.Atoi takes ASCII
    digits only."""
    from tests.test_config_errors import VS, errors_of

    text = (
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: "5xx,²"
"""
    )
    errs = errors_of(tmp_path, text)
    hits = [e for e in errs if "'²' is not a retry policy" in str(e)]
    assert hits, "\n".join(map(str, errs))
    assert hits[0].line == 12


def test_an_empty_retry_on_is_istio_s_default_policy(tmp_path: Any) -> None:
    """Istio's ConvertPolicy() reads retryOn only when it is not empty
    ('if in.RetryOn != ""'): retryOn: "" keeps the default policy (503),
    as an absent retryOn does; it was a policy that retried nothing."""
    from l4proxy.rules import load_rules
    from l4proxy.rules.routing import ISTIO_DEFAULT_RETRY_CODES, ISTIO_DEFAULT_RETRY_ON, HttpRetry
    from tests.test_config_load import HOST, REGISTRY, write

    vs = """\
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: bootcamp}
    spec:
      hosts: [bootcamp]
      http:
      - route:
        - destination: {host: bootcamp}
        retries: {attempts: 2, retryOn: ""}
    """
    table = load_rules([write(tmp_path, "vs.yaml", vs), REGISTRY]).table
    (route,) = table.routes_for(HOST)
    assert route.retries == HttpRetry(2, 0.0, ISTIO_DEFAULT_RETRY_ON, ISTIO_DEFAULT_RETRY_CODES)
