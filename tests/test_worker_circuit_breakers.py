"""A DestinationRule's circuit breakers (``connectionPool`` ``tcp.maxConnections``,
``http.http1MaxPendingRequests``, ``http.http2MaxRequests``) from the rule file to
a real worker, both relay twins: Istio's circuit-breaking task's rule, one
request served, one waiting for the one connection, the third Envoy's overflow
503 (``x-envoy-overloaded``), counted in /clusters; per connection
(``--http-routing connection``) ``tcp.maxConnections`` refuses the connection
past the limit. Counted, not timed: each client goes once the one before it
is where it is expected (at the backend, waiting)."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import OVERFLOW_BODY
from l4proxy.sidecar.admin import WorkerView
from tests._scripted import Scripted, _answer, _response, _status
from tests._worker import _worker_twin, gateway_destination_rule, gateway_service, gateway_worker
from tests.test_worker_outlier_detection import _until

# Istio's circuit-breaking task (its DestinationRule's connectionPool)
TASK_POOL = """    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
"""


class Held:
    """Each request waits for release() before it is answered 200."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)

    def step(self, conn: socket.socket) -> None:
        self.gate.acquire(timeout=10)
        conn.sendall(_answer(200, b"ok"))

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()


def _ask(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        return _response(s)


def _endpoint_row(worker: Any, port: int) -> dict[str, Any]:
    (cluster,) = WorkerView(worker, "test").clusters_now()
    (row,) = [ep for ep in cluster["endpoints"] if ep["port"] == port]
    return row


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_the_istio_task_one_served_one_waiting_one_overflow(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    held = Held()
    up = Scripted([held.step, held.step])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]) + gateway_destination_rule(TASK_POOL))
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            first = loop.run_in_executor(None, _ask, address)
            await _until(lambda: len(up.requests) == 1, "the first at the backend")
            second = loop.run_in_executor(None, _ask, address)
            await _until(
                lambda: _endpoint_row(worker, up.endpoint[1])["rq_pending"] == 1, "waiting"
            )
            got["third"] = await loop.run_in_executor(None, _ask, address)
            got["row"] = _endpoint_row(worker, up.endpoint[1])
            got["at_backend"] = len(up.requests)
            held.release(2)
            got["first"], got["second"] = await first, await second

    try:
        asyncio.run(main())
    finally:
        held.release(2)
        up.close()
    assert _status(got["third"]) == 503
    assert b"x-envoy-overloaded: true" in got["third"].lower()
    assert got["third"].endswith(OVERFLOW_BODY.encode())
    assert got["at_backend"] == 1  # (the second waited; the third never went)
    assert (got["row"]["rq_pending"], got["row"]["rq_pending_overflow"]) == (1, 1), got["row"]
    assert _status(got["first"]) == _status(got["second"]) == 200
    assert len(up.requests) == 2 and up.accepted == 2  # one request per connection


def test_per_connection_max_connections_refuses_past_the_limit(tmp_path: Path) -> None:
    """--http-routing connection: the second connection while the first is
    relayed is answered the overflow 503 (its request read: HTTP), counted
    as cx_overflow; once the first ends, a connection goes through again."""
    held = Held()
    up = Scripted([held.step])
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(up.endpoint[1])
        + gateway_destination_rule("    connectionPool:\n      tcp: {maxConnections: 1}\n")
    )
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="connection") as (_, worker, address):
            loop = asyncio.get_running_loop()
            first = loop.run_in_executor(None, _ask, address)
            await _until(lambda: len(up.requests) == 1, "the first at the backend")
            got["second"] = await loop.run_in_executor(None, _ask, address)
            got["row"] = _endpoint_row(worker, up.endpoint[1])
            held.release()
            got["first"] = await first
            await _until(
                lambda: _endpoint_row(worker, up.endpoint[1])["cx_active"] == 0, "first ended"
            )
            got["third"] = await loop.run_in_executor(None, _ask, address)

    try:
        asyncio.run(main())
    finally:
        held.release()
        up.close()
    assert _status(got["second"]) == 503
    assert b"x-envoy-overloaded: true" in got["second"].lower()
    assert got["row"]["cx_overflow"] == 1, got["row"]
    assert _status(got["first"]) == _status(got["third"]) == 200
    assert len(up.requests) == 2


def test_per_connection_an_endpoint_at_its_limit_after_a_failed_connect_is_passed_over(
    tmp_path: Path,
) -> None:
    """Endpoints R (refuses connects) and B (maxConnections 1, its one
    connection held), round robin: the connection whose turn starts at B is
    the overflow 503; the one that starts at R, whose connect fails, passes
    B over (at its limit) and is answered no healthy upstream: two
    overflows counted at B, no request past the first reaches it. (Which
    of the two comes first depends on where the round robin's drawn
    offset started the first connection: at R or at B.)"""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refusing = closed.getsockname()[1]  # (held, never listening: refused)
    held = Held()
    b = Scripted([held.step])
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(refusing, b.endpoint[1])
        + gateway_destination_rule("    connectionPool:\n      tcp: {maxConnections: 1}\n")
    )
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="connection") as (_, worker, address):
            loop = asyncio.get_running_loop()
            first = loop.run_in_executor(None, _ask, address)  # R refused, then B: held
            await _until(lambda: len(b.requests) == 1, "the first at B")
            got["then"] = [await loop.run_in_executor(None, _ask, address) for _ in range(2)]
            got["row"] = _endpoint_row(worker, b.endpoint[1])
            held.release()
            got["first"] = await first

    try:
        asyncio.run(main())
    finally:
        held.release()
        b.close()
        closed.close()
    overflow, passed_over = sorted(got["then"], key=lambda r: r.endswith(b"no healthy upstream"))
    assert _status(overflow) == 503 and overflow.endswith(OVERFLOW_BODY.encode())
    assert _status(passed_over) == 503 and passed_over.endswith(b"no healthy upstream")
    assert got["row"]["cx_overflow"] == 2, got["row"]
    assert _status(got["first"]) == 200 and len(b.requests) == 1
