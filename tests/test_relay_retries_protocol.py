"""A malformed response head under a retry policy (both twins, real sockets).

A response head the relay cannot frame (two Content-Lengths that differ,
Content-Length with Transfer-Encoding, a bad status line, a bare CR, a head
over the limit) is an upstream protocol error: to Envoy, a reset of the try
(``wouldRetryFromReset``): retried under ``5xx``, ``gateway-error`` and
``reset``, as a close before the head is, while the request is held and
nothing of the response reached the client. The try's connection is
closed, and outlier detection hears of a gateway failure, as without a
policy; out of tries, or under another policy, the client gets the 502.
"""

from __future__ import annotations

import pytest

from tests._scripted import (
    GET,
    OK_BODY,
    Scripted,
    _client,
    _closed_stats,
    _proxy,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.test_relay_edges_count import Counted

MAX_HEAD = 4096
BAD_HEADS = {
    "two_content_lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "length_and_chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad_status_line": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "bare_cr": b"HTTP/1.1 200 OK\r\nX-A: 1\rB\r\nContent-Length: 2\r\n\r\nok",
    "head_too_large": (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 100) + b"\r\nContent-Length: 2\r\n\r\nok"
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_HEADS))
@pytest.mark.parametrize(
    ("on", "retried"),
    [("5xx", True), ("gateway-error", True), ("reset", True), ("retriable-4xx", False)],
)
def test_a_malformed_response_head_is_retried_as_a_reset(
    mode: tuple[str, str],
    bad: str,
    on: str,
    retried: bool,
) -> None:
    up = Scripted([BAD_HEADS[bad]])
    counted = Counted()
    failures: list[tuple[tuple[str, int], str]] = []
    relay = _proxy(
        mode,
        (up.endpoint,),
        policy(2, on),
        counted,
        max_head=MAX_HEAD,
        response_failed=lambda ep, tag, why: failures.append((tuple(ep), why)),
    )
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == (200 if retried else 502), got
        assert got.endswith(OK_BODY) == retried
        # the given-up try's connection was closed by the relay (never pooled)
        assert _until(lambda: up.closed_by_relay >= 1, 1.0), up.closed_by_relay
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == (2 if retried else 1)
    assert up.accepted == len(up.requests)
    assert [s for s, _ in counted.rows] == [200 if retried else 502]
    assert stats["retries"] == (1 if retried else 0)
    assert stats["requests"] == 1 and stats["errors"] == 0, stats
    # a gateway failure of its endpoint, as without a policy
    assert len(failures) == 1 and failures[0][0] == up.endpoint, failures


def test_a_malformed_head_on_the_last_try_is_the_client_s_502(mode: tuple[str, str]) -> None:
    """Out of tries, the last try's protocol error is answered 502 as
    without a policy; each try's endpoint heard of its failure."""
    bad = BAD_HEADS["two_content_lengths"]
    up = Scripted([bad, bad, bad])
    counted = Counted()
    failures: list[str] = []
    relay = _proxy(
        mode,
        (up.endpoint,),
        policy(2, "gateway-error"),
        counted,
        response_failed=lambda ep, tag, why: failures.append(why),
    )
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        assert _status(got) == 502, got
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 3 and stats["retries"] == 2
    assert [s for s, _ in counted.rows] == [502]
    assert len(failures) == 3 and len(set(failures)) == 1, failures


def test_an_interim_head_then_a_malformed_one_is_not_retried(mode: tuple[str, str]) -> None:
    """A 100 Continue went to the client: a try after it would answer twice."""
    up = Scripted([b"HTTP/1.1 100 Continue\r\n\r\n" + BAD_HEADS["two_content_lengths"]])
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), policy(2, "5xx"), counted)
    try:
        a = _client(relay)
        a.sendall(GET)
        a.settimeout(5)
        got = b""
        while b"502" not in got:
            data = a.recv(65536)
            assert data, got
            got += data
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 502 "), got
        a.close()
        relay.flush_reports(1.0)
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 1
    assert [s for s, _ in counted.rows] == [502]


def test_without_a_policy_a_malformed_head_is_a_502(mode: tuple[str, str]) -> None:
    up = Scripted([BAD_HEADS["length_and_chunked"]])
    relay = _proxy(mode, (up.endpoint,), None)
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _status(_response(a)) == 502
        a.close()
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 1
