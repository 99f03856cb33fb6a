"""A VirtualService's ``http[].mirror`` from the rule file to a real worker,
both relay twins: Istio's mirroring task on one keep-alive connection. v1
serves every request; v2 gets a copy of each (its Host ``-shadow``, the
body as sent) whose answers the client never sees and the route's metrics
never count (its answers are counted apart, by v2's version and their
status); a reload without the mirror stops the copies at the same
connection's next request."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from tests._scripted import OK_BODY, Scripted, _answer, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
)

HOST = GATEWAY_HOST

SUBSETS = gateway_subsets("v1", "v2")

UNMIRRORED = gateway_routes(
    f"""\
  - route:
    - destination: {{host: {HOST}, subset: v1}}
      weight: 100
"""
)
MIRRORED = (
    UNMIRRORED
    + f"    mirror: {{host: {HOST}, subset: v2}}\n    mirrorPercentage: {{value: 100.0}}\n"
)

V2_BODY = b"v2's answer, never the client's"


def _ask(s: socket.socket, i: int) -> bytes:
    if i % 3 == 2:  # every third a POST with a body
        body = f"order {i}".encode()
        s.sendall(
            b"POST /orders HTTP/1.1\r\nHost: gw\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
    else:
        s.sendall(f"GET /items/{i} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    return _response(s)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_istio_mirroring_task_and_its_removal(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    v1 = Scripted([])
    # each copy answered on a kept-alive connection: the first six 200, the others 503
    v2 = Scripted([_answer(200, V2_BODY)] * 6 + [_answer(503, V2_BODY)] * 34)
    rules = tmp_path / "rules.yaml"
    service = gateway_service(v1.endpoint[1], v2.endpoint[1], labels=("v1", "v2")) + SUBSETS
    rules.write_text(service + MIRRORED)
    answers: list[bytes] = []
    counted: dict[str, int] = {}
    copies: dict[tuple[str, str], int] = {}
    stats: dict[str, dict[str, int]] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for i in range(12):
                    answers.append(await loop.run_in_executor(None, _ask, s, i))
                assert worker.relay is not None
                stats["mirrored"] = dict(worker.relay.stats())
                rules.write_text(service + UNMIRRORED)
                assert await watcher.reload()
                for i in range(12, 18):
                    answers.append(await loop.run_in_executor(None, _ask, s, i))
                stats["after"] = dict(worker.relay.stats())
                # the copies end as v2 closes them: none is left in flight
                deadline = time.monotonic() + 10
                while worker.relay.stats().get("mirror_active", 0) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                stats["settled"] = dict(worker.relay.stats())
            worker.relay.flush_reports(1.0)
            snapshot = worker.relay_counters.snapshot()
            for labels, n in snapshot["istio_requests_total"].items():
                version = dict(labels)["destination_version"]
                counted[version] = counted.get(version, 0) + n
            for labels, n in snapshot.get("l4proxy_mirror_requests_total", {}).items():
                d = dict(labels)
                key = (d["destination_version"], d["response_code"])
                copies[key] = copies.get(key, 0) + n

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while len(v2.requests) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        v1.close()
        v2.close()
    # the client got v1's answers only, every one on its keep-alive connection
    assert [_status(a) for a in answers] == [200] * 18
    assert all(a.endswith(OK_BODY) and V2_BODY not in a for a in answers)
    assert len(v1.requests) == 18 and v1.accepted == 1
    # v2 got a copy of each of the first twelve, nothing after the reload
    assert len(v2.requests) == 12
    # on the relay's pool of copy connections: each it opened accepted once
    assert 1 <= v2.accepted == stats["settled"]["mirror_connects"] <= 12

    # (copies in flight at once go on connections of their own: they may
    # arrive in any order)
    def line_and_body(request: bytes) -> tuple[bytes, bytes]:
        return request.split(b"\r\n")[0], request.partition(b"\r\n\r\n")[2]

    assert sorted(map(line_and_body, v2.requests)) == sorted(map(line_and_body, v1.requests[:12]))
    for copy in v2.requests:
        head = copy.partition(b"\r\n\r\n")[0] + b"\r\n"  # (its lines, each with its CR LF)
        assert b"\r\nHost: gw-shadow\r\n" in head, copy
        assert b"\r\nconnection:" not in head.lower(), copy  # (kept alive: no line)
    assert stats["mirrored"]["mirrored"] == 12
    assert stats["after"]["mirrored"] == 12  # the reload reached the open connection
    assert stats["settled"]["mirror_active"] == 0
    assert stats["settled"]["mirror_failed"] == 0 and stats["settled"]["mirror_dropped"] == 0
    # the copies are not requests of the route: v1's 18 only; their answers
    # are counted apart, by the mirror's version and their status
    assert counted == {"v1": 18}
    assert copies == {("v2", "200"): 6, ("v2", "503"): 6}
