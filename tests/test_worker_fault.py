"""A VirtualService's ``http[].fault`` from the rule file to a real worker,
both relay twins: Istio's fault-injection task on one keep-alive
connection: end-user jason's requests are aborted (500 ``fault filter
abort``, never at the backend), the others delayed and then served; a reload
without the fault reaches the same connection at its next request. Per
connection (``--http-routing connection``) the fault is named in a warning."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from l4proxy.dataplane.verdict import FAULT_ABORT_BODY
from tests._scripted import Scripted, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
    per_connection_warnings,
)

HOST = GATEWAY_HOST
DELAY = 0.3

FAULTS = gateway_routes(
    f"""\
  - name: jason
    match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    fault:
      abort: {{httpStatus: 500, percentage: {{value: 100}}}}
    route:
    - destination: {{host: {HOST}}}
  - name: others
    fault:
      delay: {{fixedDelay: {int(DELAY * 1000)}ms, percentage: {{value: 100.0}}}}
    route:
    - destination: {{host: {HOST}}}
"""
)

PLAIN = gateway_routes(
    f"""\
  - name: others
    route:
    - destination: {{host: {HOST}}}
"""
)


def _ask(s: socket.socket, user: str = "") -> tuple[bytes, float]:
    started = time.monotonic()
    extra = f"end-user: {user}\r\n" if user else ""
    s.sendall(f"GET / HTTP/1.1\r\nHost: gw\r\n{extra}\r\n".encode())
    return _response(s), time.monotonic() - started


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_istio_fault_injection_task_per_request_and_its_rollback(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    up = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]) + FAULTS)
    got: dict[str, tuple[bytes, float]] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, _, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                got["jason"] = await loop.run_in_executor(None, _ask, s, "jason")
                got["at_backend_after_jason"] = (b"", float(len(up.requests)))
                got["other"] = await loop.run_in_executor(None, _ask, s)
                rules.write_text(gateway_service(up.endpoint[1]) + PLAIN)
                assert await watcher.reload()
                got["jason_after"] = await loop.run_in_executor(None, _ask, s, "jason")

    try:
        asyncio.run(main())
    finally:
        up.close()
    jason, _ = got["jason"]
    assert _status(jason) == 500 and jason.endswith(FAULT_ABORT_BODY.encode()), jason
    assert got["at_backend_after_jason"][1] == 0  # aborted before any upstream
    other, took = got["other"]
    assert _status(other) == 200
    assert took >= DELAY  # (a lower bound only: the delay ran before it was served)
    jason_after, _ = got["jason_after"]
    assert _status(jason_after) == 200  # the rollback reached the same connection
    assert len(up.requests) == 2 and up.accepted == 1


def test_per_connection_the_fault_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]) + FAULTS)
    try:
        warnings = per_connection_warnings(rules, caplog)
    finally:
        up.close()
    assert any(
        "fault injection" in w and f"{HOST} svc/jason" in w and f"{HOST} svc/others" in w
        for w in warnings
    ), warnings


# a canary split whose route aborts half its requests: the subsets are
# labelled by version, the endpoints carry it
CANARY_ABORTS = gateway_subsets("v1", "v2") + gateway_routes(
    f"""\
  - name: canary
    fault:
      abort: {{httpStatus: 503, percentage: {{value: 50}}}}
    route:
    - destination: {{host: {HOST}, subset: v1}}
      weight: 50
    - destination: {{host: {HOST}, subset: v2}}
      weight: 50
"""
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_an_abort_is_counted_against_no_version(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Istio labels an aborted request (response flag FI: no upstream host
    picked) with destination_version and destination_workload "unknown", its
    destination_service still the route's: a fault injected into a route
    under canary analysis counts against neither version. The requests that
    went are counted under their subset's version, as before."""
    _worker_twin(which, monkeypatch)
    v1, v2 = Scripted([]), Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(v1.endpoint[1], v2.endpoint[1], labels=("v1", "v2")) + CANARY_ABORTS
    )
    seen: dict[tuple[str, str, str], int] = {}
    statuses: list[int] = []

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for _ in range(60):
                    got, _ = await loop.run_in_executor(None, _ask, s, "")
                    statuses.append(_status(got))
            assert worker.relay is not None
            worker.relay.flush_reports(1.0)
            for labels, n in worker.relay_counters.snapshot()["istio_requests_total"].items():
                d = dict(labels)
                assert d["destination_service"] == HOST, d
                key = (d["response_code"], d["destination_version"], d["destination_workload"])
                seen[key] = seen.get(key, 0) + n

    try:
        asyncio.run(main())
    finally:
        v1.close()
        v2.close()
    aborted = statuses.count(503)
    assert 0 < aborted < 60 and statuses.count(200) == 60 - aborted, statuses
    assert seen.get(("503", "unknown", "unknown")) == aborted, seen
    assert {k for k in seen if k[0] == "503"} == {("503", "unknown", "unknown")}, seen
    went = {k[1]: n for k, n in seen.items() if k[0] == "200"}
    assert set(went) == {"v1", "v2"} and sum(went.values()) == 60 - aborted, seen
    assert len(v1.requests) == went["v1"] and len(v2.requests) == went["v2"]
