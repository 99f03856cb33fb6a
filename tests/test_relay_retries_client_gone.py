"""A client that resets while its request is retried (both twins, real sockets).

Under a retry policy with many attempts and no timeout, a backend that
answers 503 at once sees a try per backoff for as long as the client is
there. The compiled relay keeps EPOLLIN on the client through the exchange
and sees its reset at once; the pure relay stopped watching the client once
its request was read, so it went on retrying for a client gone. Now both
end the exchange at the client's reset, closing the try's upstream
connection, and retry no more; a client that only half-closes still gets
its answer.
"""

from __future__ import annotations

import socket
import time

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    STALL,
    Scripted,
    _answer,
    _client,
    _proxy,
    _reset,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.test_relay_edges_count import Counted


def test_a_client_reset_during_the_retries_ends_them(mode: tuple[str, str]) -> None:
    up = Scripted([_answer(503, b"no")] * 1000)
    counted = Counted()
    # a try every 20 ms or so, for ever (no route timeout)
    relay = _proxy(
        mode, (up.endpoint,), RetryPolicy.of(100000, 0.0, ["5xx"], (), backoff=0.01), counted
    )
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) >= 3), len(up.requests)
        _reset(a)
        time.sleep(0.1)  # (a try in flight as the reset came may still land)
        seen = len(up.requests)
        time.sleep(0.3)
        assert len(up.requests) == seen, (seen, len(up.requests))
        # every try's connection closed: the last one's too
        assert _until(lambda: up.closed_by_relay >= up.accepted), (up.closed_by_relay, up.accepted)
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert stats["active"] == 0, stats
    assert [s for s, _ in counted.rows] == [0]  # counted once, no status sent


def test_a_client_reset_during_a_stalled_try_closes_its_upstream(mode: tuple[str, str]) -> None:
    """The try in flight (no answer yet, no per-try timeout) is closed at
    the client's reset, not left to the idle timeout."""
    up = Scripted([STALL])
    relay = _proxy(mode, (up.endpoint,), RetryPolicy.of(3, 0.0, ["5xx"], ()))
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) == 1)
        _reset(a)
        assert _until(lambda: up.closed_by_relay == 1), up.closed_by_relay
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 1


def test_a_half_closed_client_still_gets_the_retried_answer(mode: tuple[str, str]) -> None:
    """A FIN alone is a half-close: the retries go on and the answer goes out."""
    up = Scripted([_answer(503, b"no"), _answer(503, b"no")])
    relay = _proxy(mode, (up.endpoint,), RetryPolicy.of(3, 0.0, ["5xx"], (), backoff=0.05))
    try:
        a = _client(relay)
        a.sendall(GET)
        assert _until(lambda: len(up.requests) >= 1)
        a.shutdown(socket.SHUT_WR)
        got = _response(a)
        assert _status(got) == 200, got
        a.close()
    finally:
        relay.close()
        up.close()
    assert len(up.requests) == 3
