"""Review findings on the retry policy (both twins, real sockets)."""

from __future__ import annotations

import socket

from tests.test_relay_edges_count import Counted
from tests.test_relay_retries import (
    GET,
    Scripted,
    _answer,
    _client,
    _proxy,
    _response,
    _status,
    mode,  # noqa: F401  (fixture)
    policy,
)


def test_a_pooled_try_retried_by_the_policy_whose_connects_all_fail_answers_502(
    mode: tuple[str, str],  # noqa: F811
) -> None:
    """As test_a_retry_whose_connects_all_fail_answers_502, but the try the
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
        assert _status(got) == 502, got
        a.close()
        relay.flush_reports(1.0)
        stats = relay.stats()
    finally:
        relay.close()
        up.close()
    assert sorted(s for s, _ in counted.rows) == [200, 502]
    assert stats["errors"] == 0, stats
