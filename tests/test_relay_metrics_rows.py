"""What the relays count of the requests they serve, whatever their
number of destinations and statuses: the pure twin reports each request
on its own (``report``), the compiled one gathers them in a table of rows,
one per (tag, status), that it hands to ``report_rows``; a row its table
cannot take before the next flush (``count_row``) is counted in
``stats()``'s ``metrics_dropped`` (``l4proxy_http_metrics_dropped_total``
in /stats), so that every request served is in a row or in that counter.
Both twins, the compiled one deciding per request and from cached
verdicts, real sockets; counts, never times.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import Verdict
from l4proxy.sidecar.admin import WorkerView
from tests._scripted import mode_fixture  # noqa: F401  (the fixture mode)
from tests.test_relay_edges import ORIGIN, _relay
from tests.test_relay_mirror import _Reports

N = 600  # distinct (tag, status) rows, one request each
ROWS = 512  # the compiled table's rows per flush (count_row: ROWS_SLOTS / 2)


def _requests(first: int) -> bytes:
    """N requests, to the Hosts h<first> to h<first + N - 1>: each Host its
    own tag, a row of its own."""
    return b"".join(b"GET / HTTP/1.1\r\nHost: h%d\r\n\r\n" % i for i in range(first, first + N))


def _counting_relay(mode: tuple[str, str], reports: _Reports) -> Any:
    """A relay of the twin and mode answering every request locally (404),
    tagged with its Host (a cached verdict per Host in the resolve mode),
    reporting to *reports*."""
    which, how = mode
    kw = reports.kw(mode)
    if how == "resolve":
        kw["resolve"] = lambda head, origin: Verdict(local=(404, "x"), tag=head.host, ttl=60.0)
    return _relay(which, lambda head, origin: Decision(local=(404, "x"), tag=head.host), **kw)


def _served(relay: Any, data: bytes) -> int:
    """*data* (pipelined requests) handed to *relay* with a client
    connection, as bytes already read from it (the compiled loop serves
    them in one turn when their verdicts are cached): the answers read."""
    ours, theirs = socket.socketpair()
    relay.add(theirs, ORIGIN, data=data)
    ours.settimeout(10.0)
    got = b""
    try:
        while got.count(b"HTTP/1.1 ") < data.count(b"HTTP/1.1\r\n"):
            chunk = ours.recv(1 << 20)
            assert chunk, got[-200:]
            got += chunk
    finally:
        ours.close()
    return got.count(b"HTTP/1.1 404 ")


def test_every_request_is_in_a_row_or_in_the_drop_counter(mode: tuple[str, str]) -> None:
    """N requests of N tags pipelined on one connection, then N of N other
    tags: each request is in a report row or in metrics_dropped. The
    compiled loop serves each pass in one turn (Python's answers for the
    pipelined heads in one service): ROWS counted, the rest dropped, and
    the table, full, is flushed at that turn's end, not a second later:
    the second pass finds it empty (else none of its new rows would be
    counted). The pure twin reports every one."""
    reports = _Reports()
    relay = _counting_relay(mode, reports)
    try:
        served = [_served(relay, _requests(0)), _served(relay, _requests(N))]
        relay.flush_reports()
        dropped = relay.stats()["metrics_dropped"]
    finally:
        relay.close()
    assert served == [N, N]
    assert len(reports.rows) + dropped == 2 * N
    assert set(reports.rows) <= {(f"h{i}", 404) for i in range(2 * N)}
    assert dropped == (0 if mode[0] == "pure" else 2 * (N - ROWS))


def test_the_drop_counter_is_in_stats() -> None:
    """The compiled relay's metrics_dropped as /stats writes it."""
    reports = _Reports()
    relay = _counting_relay(("compiled", "resolve"), reports)
    try:
        _served(relay, _requests(0))
        relay.flush_reports()
        state = SimpleNamespace(
            generation=1, digest=0, reloads=0, reload_failures=0, last_error=None, warnings=0
        )
        worker = SimpleNamespace(
            pump=SimpleNamespace(stats=dict),
            rules=SimpleNamespace(state=state),
            relay=relay,
            handshakes=set(),
            in_transit=lambda: 0,
        )
        gauges = WorkerView(worker, "compiled").gauges()  # type: ignore[arg-type]
        dropped = relay.stats()["metrics_dropped"]
    finally:
        relay.close()
    assert dropped >= N - ROWS
    assert gauges["l4proxy_http_metrics_dropped_total"] == dropped
