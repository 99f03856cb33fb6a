"""An endpoint's 5xx answers reported to outlier detection when its settings
ask (``EndpointSettings.report_5xx``: a DestinationRule's
``outlierDetection`` with ``consecutive5xxErrors`` or
``consecutiveGatewayErrors``), both twins, real sockets.

With ``report_5xx`` every final response of status 500 or above, complete
or a try the route's retry policy retries, goes to ``answered_5xx(endpoint,
tag, status)``, every one, and counts as a failure for the news of
``answered`` (the endpoint's next answer is reported). Without it, or below
500, an answer is reported as before: ``answered``, when news alone. A 5xx
cut short mid-body stays a gateway failure (``response_failed``).

The relay routes by Host: ``a`` to A (a Scripted backend, its script the
statuses under test), ``b`` to B and ``s`` to S (200 at once). The
callbacks log in order on the relay's thread; each test ends with B's first
answer, news, reported after everything before it: the log is then whole,
and compared exactly.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from l4proxy.dataplane._pool_py import EndpointSettings, checked_endpoint_settings
from tests._scripted import (
    CLOSE,
    Scripted,
    _answer,
    _client,
    _proxy,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.test_relay_edges import _read_all
from tests.test_relay_endpoint_settings import _ask, _get, _hosts, _settings

Endpoint = tuple[str, int]
MID = "upstream closed the connection mid-response"
ON = EndpointSettings(0, 30.0, 5.0, report_5xx=True)


class Log:
    """The outlier detection callbacks, logged in order: (what, endpoint,
    tag, status or reason)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Endpoint, Any, Any]] = []
        self.lock = threading.Lock()

    def kw(self) -> dict[str, Any]:
        return {
            "connect_failed": lambda ep, tag, why: self._add("connect_failed", ep, tag, why),
            "response_failed": lambda ep, tag, why: self._add("response_failed", ep, tag, why),
            "answered": lambda ep, tag: self._add("answered", ep, tag, None),
            "answered_5xx": lambda ep, tag, status: self._add("answered_5xx", ep, tag, status),
        }

    def _add(self, what: str, ep: Endpoint, tag: Any, detail: Any) -> None:
        with self.lock:
            self.calls.append((what, (ep[0], ep[1]), tag, detail))

    def until(self, last: tuple[str, Endpoint, Any, Any]) -> list[tuple[str, Endpoint, Any, Any]]:
        """The log once *last* is in it (the relay's thread logs it after
        everything before it)."""
        assert _until(lambda: last in self.calls, 5.0), self.calls
        with self.lock:
            return list(self.calls)


def _three(
    mode: tuple[str, str], script: list[Any]
) -> tuple[Any, Log, Scripted, Scripted, Scripted]:
    log = Log()
    a, b, s = Scripted(script), Scripted([]), Scripted([])
    relay = _hosts(mode, {"a": (a.endpoint,), "b": (b.endpoint,), "s": (s.endpoint,)}, **log.kw())
    return relay, log, a, b, s


def _closing(*things: Any) -> None:
    for t in things:
        t.close()


def _a_then_b(
    mode: tuple[str, str], script: list[Any], settings: Any, n: int
) -> tuple[list[int], list[tuple[str, Endpoint, Any, Any]], Endpoint, Endpoint, Endpoint]:
    """A (answering *script*) with *settings* (a function of A's endpoint:
    the endpoint_settings() dict), asked *n* times on one keep-alive client
    connection, then B once (its first answer, news: the log is then
    whole): A's statuses, the log, and A's, B's and S's endpoints."""
    relay, log, a, b, s = _three(mode, script)
    try:
        c = _client(relay)
        _settings(relay, c, settings(a.endpoint))
        statuses = [_ask(c, "a") for _ in range(n)]
        assert _ask(c, "b") == 200
        calls = log.until(("answered", b.endpoint, "t", None))
        c.close()
    finally:
        _closing(relay, a, b, s)
    return statuses, calls, a.endpoint, b.endpoint, s.endpoint


def test_each_5xx_is_reported_with_its_status_and_the_next_answer_is_news(
    mode: tuple[str, str],
) -> None:
    """A with report_5xx answering 503, 500, 200, 502, then 200s, on one
    keep-alive client connection: each 5xx is reported through answered_5xx
    with its status, the 200 after the 500 is news (answered), and so is
    the first 200 after the 502; the next one is not (the steady state
    reports nothing)."""
    script = [_answer(503), _answer(500), _answer(200), _answer(502)]
    statuses, calls, a, b, s = _a_then_b(mode, script, lambda a: {a: ON}, 6)
    assert statuses == [503, 500, 200, 502, 200, 200]
    assert calls == [
        ("answered", s, "t", None),
        ("answered_5xx", a, "t", 503),
        ("answered_5xx", a, "t", 500),
        ("answered", a, "t", None),
        ("answered_5xx", a, "t", 502),
        ("answered", a, "t", None),
        ("answered", b, "t", None),
    ]


def test_only_500_to_599_is_a_5xx(mode: tuple[str, str]) -> None:
    """A with report_5xx answering 499, 600 and 999 (a status line may say
    any three digits): none is a 5xx (Envoy's 500..599), so only A's first
    answer, news, is reported."""
    script = [_answer(499), _answer(600), _answer(999)]
    statuses, calls, a, b, s = _a_then_b(mode, script, lambda a: {a: ON}, 3)
    assert statuses == [499, 600, 999]
    assert calls == [
        ("answered", s, "t", None),
        ("answered", a, "t", None),
        ("answered", b, "t", None),
    ]


def test_without_report_5xx_the_statuses_are_answers(mode: tuple[str, str]) -> None:
    """The same backend, A's settings without report_5xx (its own, a
    3-tuple's, and the relay's): its first answer (the 503) is news, and
    nothing else of A's is reported."""
    for own in (None, (0, 30.0, 5.0)):
        script = [_answer(503), _answer(500), _answer(200), _answer(502)]
        statuses, calls, a, b, s = _a_then_b(
            mode, script, lambda a, own=own: {a: own} if own else {}, 6
        )
        assert statuses == [503, 500, 200, 502, 200, 200]
        assert calls == [
            ("answered", s, "t", None),
            ("answered", a, "t", None),
            ("answered", b, "t", None),
        ], own


def test_the_setting_changed_at_runtime_applies_from_the_next_response(
    mode: tuple[str, str],
) -> None:
    """A's 503 before report_5xx is an answer (its first: news); with it on,
    the next 503 is answered_5xx and the 200 after it news; turned off
    again, A's 500 is an answer, no news, and nothing is reported."""
    script = [_answer(503), _answer(503), _answer(200), _answer(500)]
    relay, log, a, b, s = _three(mode, script)
    try:
        c = _client(relay)
        assert _ask(c, "a") == 503
        _settings(relay, c, {a.endpoint: ON})
        assert _ask(c, "a") == 503
        assert _ask(c, "a") == 200
        _settings(relay, c, {})
        assert _ask(c, "a") == 500
        assert _ask(c, "a") == 200
        assert _ask(c, "b") == 200
        calls = log.until(("answered", b.endpoint, "t", None))
        c.close()
    finally:
        _closing(relay, a, b, s)
    assert calls == [
        ("answered", a.endpoint, "t", None),
        ("answered", s.endpoint, "t", None),
        ("answered_5xx", a.endpoint, "t", 503),
        ("answered", a.endpoint, "t", None),
        ("answered", b.endpoint, "t", None),
    ]


@pytest.mark.parametrize("report", [True, False], ids=["report_5xx", "off"])
def test_a_retried_5xx_try_is_reported(mode: tuple[str, str], report: bool) -> None:
    """Route (A, B), retry on 5xx: A's 503 is retried on B, whose 200 the
    client gets. With report_5xx on both, A's try is reported
    (answered_5xx, 503; Envoy tells outlier detection each attempt's
    status); without, it is A's first answer (news), as before."""
    log = Log()
    a, b = Scripted([_answer(503)]), Scripted([])
    relay = _proxy(mode, (a.endpoint, b.endpoint), policy(2, "5xx"), **log.kw())
    try:
        if report:
            relay.endpoint_settings({a.endpoint: ON, b.endpoint: ON})
        c = _client(relay)
        c.sendall(_get("a"))
        assert _status(_response(c)) == 200
        calls = log.until(("answered", b.endpoint, "t", None))
        c.close()
    finally:
        _closing(relay, a, b)
    first = (
        ("answered_5xx", a.endpoint, "t", 503) if report else ("answered", a.endpoint, "t", None)
    )
    assert calls == [first, ("answered", b.endpoint, "t", None)]
    assert (len(a.requests), len(b.requests)) == (1, 1)


def test_a_retried_5xx_try_on_the_one_endpoint(mode: tuple[str, str]) -> None:
    """Route (A), report_5xx, retry on 5xx: A answers 503, then 200 to the
    retry; the try is reported (answered_5xx) and the retry's answer is
    news (answered)."""
    log = Log()
    a = Scripted([_answer(503)])
    relay = _proxy(mode, (a.endpoint,), policy(2, "5xx"), **log.kw())
    try:
        relay.endpoint_settings({a.endpoint: ON})
        c = _client(relay)
        c.sendall(_get("a"))
        assert _status(_response(c)) == 200
        calls = log.until(("answered", a.endpoint, "t", None))
        c.close()
    finally:
        _closing(relay, a)
    assert calls == [("answered_5xx", a.endpoint, "t", 503), ("answered", a.endpoint, "t", None)]
    assert len(a.requests) == 2


def test_a_5xx_cut_short_is_a_gateway_failure(mode: tuple[str, str]) -> None:
    """A with report_5xx sends a 503's head and 3 of its 10 bytes, then
    closes: the client's connection ends after them, and A's response
    failed mid-response (response_failed), no answered_5xx."""
    cut = b"HTTP/1.1 503 X\r\nContent-Length: 10\r\n\r\nabc"
    relay, log, a, b, s = _three(mode, [(cut, CLOSE)])
    try:
        c = _client(relay)
        _settings(relay, c, {a.endpoint: ON})
        c.sendall(_get("a"))
        got, end = _read_all(c, 5)
        assert got.startswith(b"HTTP/1.1 503 ") and got.endswith(b"\r\n\r\nabc"), got
        assert end != "timeout"
        c.close()
        c = _client(relay)
        assert _ask(c, "b") == 200
        calls = log.until(("answered", b.endpoint, "t", None))
        c.close()
    finally:
        _closing(relay, a, b, s)
    assert calls == [
        ("answered", s.endpoint, "t", None),
        ("response_failed", a.endpoint, "t", MID),
        ("answered", b.endpoint, "t", None),
    ]


def _named(host: str) -> bytes:
    """A GET whose Connection names a field: the compiled loop hands it to
    its pure relay (the slow path)."""
    return b"GET /x HTTP/1.1\r\nHost: %s\r\nConnection: x-a\r\nX-A: 1\r\n\r\n" % host.encode()


def test_the_compiled_twin_s_slow_path_reports_them_too(mode: tuple[str, str]) -> None:
    """Requests the compiled loop hands to its pure relay report A's 5xx
    the same way (the callback passed on)."""
    relay, log, a, b, s = _three(mode, [_answer(503), _answer(200), _answer(500)])
    try:
        c = _client(relay)
        _settings(relay, c, {a.endpoint: ON})
        statuses = []
        for host in ("a", "a", "a", "b"):
            c.sendall(_named(host))
            statuses.append(_status(_response(c)))
        assert statuses == [503, 200, 500, 200]
        calls = log.until(("answered", b.endpoint, "t", None))
        stats = relay.stats()
        c.close()
    finally:
        _closing(relay, a, b, s)
    assert calls == [
        ("answered", s.endpoint, "t", None),
        ("answered_5xx", a.endpoint, "t", 503),
        ("answered", a.endpoint, "t", None),
        ("answered_5xx", a.endpoint, "t", 500),
        ("answered", b.endpoint, "t", None),
    ]
    assert stats.get("slow_path", 1) == 1, stats  # (the compiled twin's: handed over once)


def test_checked_endpoint_settings_takes_3_and_4_tuples() -> None:
    """A 3-tuple has report_5xx False; a 4-tuple's must be a bool."""
    checked = checked_endpoint_settings({("h", 1): (2, 3, 4), ("h", 2): (2, 3.0, 4.0, True)})
    assert checked == {
        ("h", 1): EndpointSettings(2, 3.0, 4.0, False),
        ("h", 2): EndpointSettings(2, 3.0, 4.0, True),
    }
    for bad in (1, 0, None, "yes"):
        with pytest.raises(ValueError, match="h:3: report_5xx must be a bool"):
            checked_endpoint_settings({("h", 3): (0, 1.0, 1.0, bad)})


@pytest.mark.parametrize("how", ["decide", "resolve"], ids=["compiled", "compiled-verdict"])
def test_a_5xx_in_either_half_of_the_compiled_twin_makes_the_other_s_answers_news(
    how: str,
) -> None:
    """The compiled twin's loop and its pure relay (the slow path, its own
    thread) each report an endpoint's answer once; a 5xx reported by one,
    as a failure reported there, makes every endpoint's next answer news
    in the other: B's second answer on the loop's client, after A's 503 on
    the slow path's; and B's second on the slow path's, after A's 500 on
    the loop's. Each step waits for its report (the two threads')."""
    relay, log, a, b, s = _three(("compiled", how), [_answer(503), _answer(500)])
    answered_b = ("answered", b.endpoint, "t", None)
    expected = [
        answered_b,  # the loop's first
        answered_b,  # the slow path's first
        ("answered_5xx", a.endpoint, "t", 503),  # (the slow path's)
        answered_b,  # the loop's, news again
        ("answered_5xx", a.endpoint, "t", 500),  # (the loop's)
        answered_b,  # the slow path's, news again
    ]

    def reported() -> list[tuple[str, Endpoint, Any, Any]]:
        with log.lock:
            return [x for x in log.calls if x[1] != s.endpoint]

    try:
        fast = _client(relay)
        _settings(relay, fast, {a.endpoint: ON})
        slow = _client(relay)
        for n, (c, host, status) in enumerate(
            [
                (fast, "b", 200),
                (slow, "b", 200),
                (slow, "a", 503),
                (fast, "b", 200),
                (fast, "a", 500),
                (slow, "b", 200),
            ]
        ):
            c.sendall(_named(host) if c is slow else _get(host))
            assert _status(_response(c)) == status
            assert _until(lambda n=n: len(reported()) > n, 5.0), (n, reported())
        stats = relay.stats()
        fast.close()
        slow.close()
    finally:
        _closing(relay, a, b, s)
    assert reported() == expected
    assert stats["slow_path"] == 1, stats
