"""A TCP connection the drain's deadline cuts is counted closed in Istio's
TCP metrics with the flag its access log line says: ``DC``.

Its line has said ``DC downstream_local_disconnect(...)`` since 886479d,
but ``istio_tcp_connections_closed_total`` and its bytes counted it under
``response_flags="-"``, as a connection that ended on its own. Istio's
stats filter reports a TCP connection whose peer it never learnt at its
close, with the flags then.

A real worker of each relay twin (tests/_worker.py; its relay hands back
bytes that are not HTTP, routed at L4: the path a transparent listener's
connection to a TCP port takes once its original destination is read),
real sockets, its drain (1 s) finding the connection open.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane import accesslog
from l4proxy.dataplane.listener import bind_listener
from l4proxy.rules.classify import Origin
from l4proxy.sidecar import istio_metrics as im
from l4proxy.sidecar.worker import Worker
from tests._worker import _worker_twin, worker_on
from tests.test_access_log_worker import _fields, _read_lines

VIP, PORT = "198.19.0.20", 5432


def _rules(backend: int) -> str:
    return f"""apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: db}}
spec:
  hosts: [db.default.svc.cluster.local]
  addresses: [{VIP}]
  ports: [{{number: {PORT}, name: tcp-db, protocol: TCP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{tcp-db: {backend}}}, labels: {{app: db, version: v1}}}}
"""


def _series(counters: dict[str, Any], family: str) -> dict[str, tuple[dict[str, str], float]]:
    """*family*'s series by response_flags."""
    out = {}
    for key, v in counters.get(family, {}).items():
        labels = dict(key)
        out[labels["response_flags"]] = (labels, v)
    return out


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("logged", [True, False], ids=["log", "no-log"])
def test_a_tcp_connection_cut_at_the_drains_deadline_is_counted_closed_dc(
    which: str, logged: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection to db relayed (4 bytes up), still open at the drain's
    deadline: opened under ``-`` (when it was relayed), closed with its
    bytes under ``DC`` (the same labels but the flags), as its line says;
    l4proxy_drain_cut_total 1."""
    _worker_twin(which, monkeypatch)
    backend = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backend.getsockname()[1]))
    r, w = os.pipe()
    got: dict[str, Any] = {}
    held: list[socket.socket] = []

    def drained(worker: Worker) -> None:
        got["counters"] = worker.counters.snapshot()

    async def main() -> None:
        lst = bind_listener("127.0.0.1", 0, "outbound")
        options: dict[str, Any] = {"http_routing": "request"}
        if logged:
            options["access_log_fd"] = w
        async with worker_on([lst], rules, drained=drained, **options) as (_, worker):
            loop = asyncio.get_running_loop()
            client = socket.create_connection(front.getsockname(), 5)
            held.append(client)
            conn, _ = front.accept()
            conn.setblocking(False)
            # (the relay's hand-off of bytes that are not HTTP: here, none yet)
            worker._from_relay(conn, None, b"", b"", Origin(VIP, PORT, False))
            client.sendall(b"held")
            up, _ = await loop.run_in_executor(None, backend.accept)
            held.append(up)
            up.settimeout(5)
            assert await loop.run_in_executor(None, up.recv, 16) == b"held"
            deadline = time.monotonic() + 5
            while worker.pump.stats().get("bytes_upstream", 0) < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        os.close(w)
        for s in (backend, front, *held):
            s.close()
    lines = _read_lines(r)
    counters = got["counters"]
    opened = _series(counters, im.TCP_OPENED)
    assert {flags: n for flags, (_, n) in opened.items()} == {"-": 1}, opened
    relayed = opened["-"][0]
    assert relayed["destination_workload"] == "db-v1"
    for family, n in ((im.TCP_CLOSED, 1), (im.TCP_RECEIVED, 4), (im.TCP_SENT, 0)):
        rows = _series(counters, family)
        assert {flags: v for flags, (_, v) in rows.items()} == {"DC": n}, (family, rows)
        assert rows["DC"][0] == {**relayed, "response_flags": "DC"}
    assert counters["l4proxy_drain_cut_total"] == {(): 1}
    if logged:
        assert len(lines) == 1, lines
        f = _fields(lines[0])
        assert (f["flags"], f["details"], f["received"]) == ("DC", accesslog.DRAIN_CUT, "4"), f
    else:
        assert lines == []
