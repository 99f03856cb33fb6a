"""A Gateway API Gateway revoking a route at a reload, through a real
worker on a gateway listener, both relay twins, one keep-alive connection
on loopback.

An HTTPRoute of namespace b is attached to a Gateway of namespace default
whose listener admits every namespace (``allowedRoutes.namespaces.from:
All``), and served; the Gateway is then rewritten to admit its own
namespace only (``from: Same``), or its file deleted. That was a load
error (the route attached to nothing), so the reload was refused and the
old table, with the access just removed, kept serving. Now the reload is
applied with a warning, and the next request on the same connection is no
longer routed to the route's backend: it is answered what a host no route
takes gets, the gateway's own 404 ``no route`` (Envoy's NR)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from l4proxy.dataplane.listener import bind_listener
from l4proxy.rules.watch import RuleWatcher
from l4proxy.sidecar.worker import Worker, WorkerOptions
from tests._worker import _worker_twin
from tests.test_gateway_session_persistence import Backend
from tests.test_worker_istio_gateway import TWINS, Answer, Client


def _gateway(port: int, admits: str) -> str:
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  gatewayClassName: l4proxy
  listeners:
  - name: http
    port: {port}
    protocol: HTTP
    allowedRoutes: {{namespaces: {{from: {admits}}}}}
"""


def _route(pod: Backend) -> str:
    """HTTPRoute web of namespace b on Gateway default/edge, to Service
    web of b, whose one endpoint is *pod*."""
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: b}}
spec:
  parentRefs: [{{name: edge, namespace: default}}]
  hostnames: [web.example.com]
  rules:
  - backendRefs: [{{name: web, port: 8080}}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: web, namespace: b}}
spec:
  hosts: [web.b.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {pod.endpoint[1]}}}}}]
"""


@pytest.mark.parametrize("revoke", ["from: Same", "the Gateway deleted"])
@pytest.mark.parametrize("which", TWINS)
def test_a_gateway_that_stops_admitting_a_route_revokes_it_at_the_reload(
    which: str,
    revoke: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 from the route's pod (a) on one keep-alive connection; the
    Gateway revokes the route and the watcher reloads: the reload is
    applied (generation 2, its warning logged), and the next request on
    the same connection is the gateway's 404 no route, a request after it
    too; the pod saw none of them."""
    _worker_twin(which, monkeypatch)
    pod = Backend("a")
    rules = tmp_path / "rules"
    rules.mkdir()
    lst = bind_listener("127.0.0.1", 0, "gateway")
    gateway = rules / "gateway.yaml"
    gateway.write_text(_gateway(lst.address[1], "All"))
    (rules / "route.yaml").write_text(_route(pod))
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0, seed=7)
    assert watcher.load_now()
    got: list[Answer] = []
    reloaded: list[bool] = []

    async def main() -> None:
        worker = Worker([lst], watcher, WorkerOptions(http_routing="request"))
        worker.start()
        loop = asyncio.get_running_loop()
        c = Client(lst.address)
        try:
            got.append(await loop.run_in_executor(None, c.get, "web.example.com", "/"))
            first = c.sock
            if revoke == "from: Same":
                gateway.write_text(_gateway(lst.address[1], "Same"))
            else:
                gateway.unlink()
            reloaded.append(await watcher.reload())
            for _ in range(2):
                got.append(await loop.run_in_executor(None, c.get, "web.example.com", "/"))
                assert c.sock is first  # (the same connection, kept alive)
        finally:
            c.close()
            await worker.drain(1)
            worker.close()

    try:
        with caplog.at_level(logging.INFO, logger="l4proxy.rules"):
            asyncio.run(main())
    finally:
        pod.close()
    assert reloaded == [True]
    assert (watcher.state.generation, watcher.state.reload_failures) == (2, 0)
    assert got == [(200, "a"), (404, "no route"), (404, "no route")]
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if "rules rejected" in m], logged
    (warning,) = [m for m in logged if m.startswith("rules: ") and "warning" in m]
    assert "route.yaml:5: warning: HTTPRoute web: " in warning
    assert ("not allowed" if revoke == "from: Same" else "no Gateway default/edge") in warning
    assert any(m.startswith("rules generation 2 loaded from") for m in logged), logged
