"""An in-process worker on a gateway listener, for tests that drive a real
:class:`~l4proxy.sidecar.worker.Worker` and :class:`~l4proxy.rules.watch.RuleWatcher`
on loopback (no supervisor, no namespaces): the rules loaded once, the
listener bound, the worker started, then drained and closed whatever the
test did. :func:`_worker_twin` makes the worker build one relay twin or
the other (a test parametrized over both).

Rules that name the listener's port (an Istio Gateway's server is for a
local port) are written once it is bound: :func:`worker_on` serves
listeners the test bound, :func:`drive_gateway` binds one, writes the
rules for its port and runs a client function against it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from l4proxy.dataplane.listener import Listener, bind_listener
from l4proxy.rules.watch import RuleWatcher
from l4proxy.sidecar.worker import Worker, WorkerOptions

T = TypeVar("T")

# GATEWAY_SERVICE's host, which the rules of these tests route
GATEWAY_HOST = "svc.default.svc.cluster.local"

# A service of endpoints on 127.0.0.1 (their ports filled in) that a gateway
# listener sends everything to: an Ingress default backend.
GATEWAY_SERVICE = f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [{GATEWAY_HOST}]
  addresses: [198.19.200.1]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
%s
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: gateway}}
spec:
  defaultBackend:
    service: {{name: svc, port: {{number: 8080}}}}
"""


def gateway_service(*ports: int, labels: tuple[str, ...] = ()) -> str:
    """GATEWAY_SERVICE with an endpoint per port (and a version label each,
    when *labels* are given)."""
    rows = []
    for i, port in enumerate(ports):
        label = f", labels: {{version: {labels[i]}}}" if labels else ""
        rows.append(f"{{address: 127.0.0.1, ports: {{http: {port}}}{label}}}")
    return gateway_service_of(*rows)


def gateway_service_of(*rows: str, resolution: str = "STATIC") -> str:
    """GATEWAY_SERVICE whose endpoints are *rows* (YAML flow maps), resolved
    as *resolution* says (DNS: an address may be a name, looked up)."""
    text = GATEWAY_SERVICE % "\n".join(f"  - {row}" for row in rows)
    return text.replace("  resolution: STATIC\n", f"  resolution: {resolution}\n")


def gateway_subsets(*versions: str, api: str = "v1beta1", traffic_policy: str = "") -> str:
    """A DestinationRule for GATEWAY_SERVICE's host with a subset per
    version in *versions*: the endpoints labelled ``version: NAME``
    (networking.istio.io *api*), and *traffic_policy* (YAML lines, indented
    as under ``trafficPolicy:``) when given."""
    subsets = "".join(f"  - {{name: {v}, labels: {{version: {v}}}}}\n" for v in versions)
    policy = f"  trafficPolicy:\n{traffic_policy.rstrip()}\n" if traffic_policy else ""
    return f"""
---
apiVersion: networking.istio.io/{api}
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: {GATEWAY_HOST}
{policy}  subsets:
{subsets}"""


def gateway_routes(http: str, api: str = "v1beta1") -> str:
    """A VirtualService for GATEWAY_SERVICE's host whose ``http`` routes are
    *http* (YAML lines, indented as under ``http:``; networking.istio.io
    *api*)."""
    return f"""
---
apiVersion: networking.istio.io/{api}
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [{GATEWAY_HOST}]
  http:
{http}"""


def gateway_destination_rule(traffic_policy: str) -> str:
    """A DestinationRule for GATEWAY_SERVICE's host whose trafficPolicy is
    *traffic_policy* (YAML lines, indented as under ``trafficPolicy:``)."""
    return f"""
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: {GATEWAY_HOST}
  trafficPolicy:
{traffic_policy}"""


# the host of web_entry()'s Service
WEB_HOST = "web.default.svc.cluster.local"


def every_host_gateway(port: int) -> str:
    """An Istio Gateway "gw" whose one server takes every host, plain
    HTTP, on *port* (a gateway listener's own: the first document)."""
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: ["*"]
"""


def gateway_virtual_service(name: str, hosts: str, http: str) -> str:
    """A VirtualService NAME of *hosts* (a YAML flow list's items) bound to
    Gateway gw, whose ``http`` routes are *http* (YAML lines, indented as
    under ``http:``)."""
    return f"""\
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{hosts}]
  gateways: [gw]
  http:
{http}"""


def web_entry(port: int) -> str:
    """A ServiceEntry "web" of WEB_HOST, port 8080, whose one endpoint is
    127.0.0.1:*port*."""
    return f"""\
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [{WEB_HOST}]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
"""


def _worker_twin(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker makes *which* relay twin."""
    from l4proxy.dataplane.relay import HttpRelay
    from tests.conftest import load_twin

    relay_module = load_twin("relay", which)
    if HttpRelay is not relay_module.HttpRelay:  # the worker as the other build makes it
        import l4proxy.dataplane.relay as chooser
        import l4proxy.sidecar.worker as worker_module

        monkeypatch.setattr(chooser, "IMPLEMENTATION", which)
        monkeypatch.setattr(worker_module, "HttpRelay", relay_module.HttpRelay)


@contextlib.asynccontextmanager
async def worker_on(
    listeners: list[Listener],
    rules: Path,
    start_watcher: bool = False,
    watcher_options: dict[str, Any] | None = None,
    drained: Callable[[Worker], None] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[RuleWatcher, Worker]]:
    """(watcher, worker): a worker on *listeners* for the rules in *rules*
    (a file or a folder), loaded once, then drained and closed whatever the
    block did; *drained(worker)* runs between the two (its counters are
    final then). The worker's options are *options* (WorkerOptions'
    fields), the watcher's *watcher_options* (RuleWatcher's keywords: a
    resolver, an interval, a seed)."""
    watcher = RuleWatcher(
        [str(rules)], **{"interval": 3600, "settle": 0, **(watcher_options or {})}
    )
    assert watcher.load_now()
    worker = Worker(listeners, watcher, WorkerOptions(**options))
    worker.start()
    if start_watcher:
        watcher.start()
    try:
        yield watcher, worker
    finally:
        await worker.drain(1)
        if drained is not None:
            drained(worker)
        worker.close()


@contextlib.asynccontextmanager
async def gateway_worker(
    rules: Path,
    start_watcher: bool = False,
    watcher_options: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[RuleWatcher, Worker, tuple[str, int]]]:
    """(watcher, worker, listener address) for the rules in *rules*, on a
    gateway listener of its own: worker_on()."""
    lst = bind_listener("127.0.0.1", 0, "gateway")
    async with worker_on([lst], rules, start_watcher, watcher_options, **options) as (
        watcher,
        worker,
    ):
        yield watcher, worker, lst.address


@contextlib.asynccontextmanager
async def connected(address: tuple[str, int]) -> AsyncIterator[socket.socket]:
    """A client connection to *address*, made off the loop (the worker on
    it accepts meanwhile) and closed after the block."""
    loop = asyncio.get_running_loop()
    s = await loop.run_in_executor(None, socket.create_connection, address, 10)
    try:
        yield s
    finally:
        s.close()


def drive_gateway(
    which: str,
    monkeypatch: pytest.MonkeyPatch,
    rules: Path,
    text: Callable[[int], str],
    talk: Callable[[tuple[str, int]], T],
    drained: Callable[[Worker], None] | None = None,
    **options: Any,
) -> T:
    """*talk(address)* on a thread against a worker of relay twin *which*,
    routing per request on a gateway listener whose rules name its port,
    as an Istio Gateway's server names the local port it is for: the
    listener is bound on port 0 first, then *text(port)* is written to
    *rules* and loaded (the watcher seeded: a weighted split repeats).
    What *talk* returned; *drained* and *options* as worker_on() takes
    them."""
    _worker_twin(which, monkeypatch)

    async def main() -> T:
        lst = bind_listener("127.0.0.1", 0, "gateway")
        rules.write_text(text(lst.address[1]))
        async with worker_on(
            [lst],
            rules,
            watcher_options={"seed": 7},
            drained=drained,
            **{"http_routing": "request", **options},
        ):
            return await asyncio.get_running_loop().run_in_executor(None, talk, lst.address)

    return asyncio.run(main())


def per_connection_warnings(rules: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings logged while a worker with --http-routing connection
    loads *rules* (what a per request feature says it cannot do there)."""

    async def main() -> None:
        async with gateway_worker(rules, http_routing="connection"):
            pass

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
