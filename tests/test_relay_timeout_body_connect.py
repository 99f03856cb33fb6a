"""The route timeout (VirtualService ``http[].timeout``) of a request with a
body runs from the request's end, as Envoy's router's
(Filter::onRequestComplete), its connect's time counted: Envoy buffers a
body while the upstream connection is made, so a POST whose body is all
here times from its end, not from when its connection is ready.

Before, neither relay read a body while connecting, and the timer of a
request with a body started once its connection was ready and the body
read: a POST to a pod slow to accept got its 200 where Envoy answers the
504 ``UT``. Now a body that came whole with its head (a ``Content-Length``
body's bytes, a chunked body's last chunk) starts the timer at the
request's routing; its 504 keeps the client connection, the body read and
dropped, as after a request without a body (Envoy's local reply to a
request read whole). A body still to come is timed from its last byte
read, as before (and as Envoy's: its timer starts at the body's end).

Both twins (pure, compiled per request and from a cached verdict), real
sockets. An endpoint slow to accept (test_relay_retries_per_try_connect's
SlowToAccept: its accept queue full until RELEASE s after the request, its
connect ~3 s); a route timeout of 1 s.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from l4proxy.dataplane.verdict import MIRROR_SCALE, Mirror
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
)
from tests.test_relay_mirror import COPY, Mirrored, _mirror_relay, _settled
from tests.test_relay_retries_per_try_connect import RELEASE, SlowToAccept

SEED = 20261207
TIMEOUT = 1.0
HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\n"
BODIES = {
    "content-length": HEAD + b"Content-Length: 5\r\n\r\nhello",
    "chunked": HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", list(BODIES))
def test_a_post_whose_body_came_with_its_head_is_timed_while_connecting(
    mode: tuple[str, str], body: str
) -> None:
    """A POST, its body in the head's segment, to an endpoint slow to
    accept (~3 s), a route timeout of 1 s: the 504 ``upstream request
    timeout`` at ~1 s, during the connect, as Envoy's (before: the 200 at
    ~3.5 s, timed from the connection's readiness). The client connection
    stays (no ``connection: close``; its body was read, not taken for the
    next head): a GET on it once the endpoint accepts gets the 200, the
    endpoint seeing that GET alone."""
    slow = SlowToAccept(0.2)
    relay = _proxy(mode, (slow.endpoint,), None, timeout=TIMEOUT, seed=SEED)
    try:
        c = _client(relay)
        t0 = time.monotonic()
        slow.start()
        c.sendall(BODIES[body])
        got = _response(c, timeout=10.0)
        took = time.monotonic() - t0
        assert _status(got) == 504 and got.endswith(b"upstream request timeout"), (got, took)
        assert TIMEOUT - 0.1 <= took < RELEASE - 0.3, took
        assert b"\r\nconnection: close" not in got.partition(b"\r\n\r\n")[0].lower(), got
        assert slow.requests == []
        # once the endpoint accepts, the next request on the same connection
        time.sleep(max(0.0, t0 + RELEASE + 0.3 - time.monotonic()))
        c.sendall(GET)
        again = _response(c, timeout=10.0)
        assert _status(again) == 200 and again.endswith(b"late"), again
        assert [r.split(b"\r\n", 1)[0] for r in slow.requests] == [b"GET /x HTTP/1.1"]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        slow.close()
    assert (stats["requests"], stats["timeouts"]) == (2, 1), stats


def test_a_post_whose_body_comes_slowly_is_timed_from_the_body_s_end(
    mode: tuple[str, str],
) -> None:
    """The head alone, its body 1.5 s later (past the route timeout of
    1 s), the answer 0.6 s after the body reached the endpoint: the 200,
    the timeout running from the body's last byte read (as Envoy's:
    onRequestComplete), not from the head."""
    gap, answer_after = 1.5, 0.6

    def late(conn: Any) -> None:
        time.sleep(answer_after)
        conn.sendall(_answer(200, b"whole"))

    up = Scripted([late])
    relay = _proxy(mode, (up.endpoint,), None, timeout=TIMEOUT, seed=SEED)
    try:
        c = _client(relay)
        whole = BODIES["content-length"]
        c.sendall(whole[:-5])
        time.sleep(gap)
        t_body = time.monotonic()
        c.sendall(whole[-5:])
        got = _response(c, timeout=10.0)
        took = time.monotonic() - t_body
        assert _status(got) == 200 and got.endswith(b"whole"), (got, took)
        assert took >= answer_after - 0.05, took
        assert [r.rpartition(b"\r\n\r\n")[2] for r in up.requests] == [b"hello"]
        stats = _closed_stats(c, relay)
    finally:
        relay.close()
        up.close()
    assert (stats["requests"], stats["timeouts"]) == (1, 0), stats


def test_a_mirrored_post_timed_out_while_connecting_drops_its_copy(
    mode: tuple[str, str],
) -> None:
    """The same POST, mirrored: its 504 while connecting, its copy dropped
    and counted, as a body no try took is (test_relay_mirror's
    test_a_body_no_try_took_is_a_dropped_copy): never the head without its
    body (the compiled twin read the body for the 504 only)."""
    slow = SlowToAccept(0.2)
    mirror = Mirrored()
    copy = Mirror((mirror.endpoint,), ppm=MIRROR_SCALE, tag=COPY)
    relay = _mirror_relay(mode, (slow.endpoint,), (copy,), timeout=TIMEOUT, seed=SEED)
    try:
        c = _client(relay)
        slow.start()
        c.sendall(BODIES["content-length"])
        got = _response(c, timeout=10.0)
        assert _status(got) == 504 and got.endswith(b"upstream request timeout"), got
        stats = _settled(relay)
        c.close()
    finally:
        relay.close()
        slow.close()
        mirror.close()
    assert mirror.accepted == 0
    assert (stats["mirrored"], stats["mirror_dropped"]) == (0, 1), stats
