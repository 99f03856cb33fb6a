"""A subset whose every pod is ejected answers 503 ``UH`` (no healthy
upstream), and both relay twins count it in ``istio_requests_total`` under
that subset, as its requests that reached a pod are: the destination's
version, workload, app and canonical service its pods' labels, its
response_flags ``UH``.

Before, the pure relay labelled it by the endpoints left after outlier
detection (none: the subset's name for its version, ``unknown`` for its
app and canonical service), the compiled one by the subset's pods: the two
implementations of one sidecar reported one request two ways.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from l4proxy.rules.routing import Endpoint
from tests._scripted import Scripted, _answer, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    gateway_routes,
    gateway_service_of,
    gateway_worker,
)

# the canary's pods: labels whose version is not the subset's name, an app
# that is not the host's first name (both told apart from a fallback)
CANARY = {"app": "shop", "version": "2.0", "service.istio.io/canonical-name": "shop-canon"}


def _rules(stable: int | None, canary: tuple[int, ...]) -> str:
    """The canary's pods, with *stable* a stable pod, subsets of each and
    every request routed to the canary's; without, no route (the
    service's own round robin). One failed request ejects a pod."""
    labels = ", ".join(f'"{k}": "{v}"' for k, v in CANARY.items())
    rows = [f"{{address: 127.0.0.1, ports: {{http: {p}}}, labels: {{{labels}}}}}" for p in canary]
    subsets = route = ""
    if stable is not None:
        stable_labels = "labels: {app: shop, version: '1.0'}"
        rows.append(f"{{address: 127.0.0.1, ports: {{http: {stable}}}, {stable_labels}}}")
        subsets = """  subsets:
  - {name: stable, labels: {version: '1.0'}}
  - {name: canary, labels: {version: '2.0'}}
"""
        route = gateway_routes(
            f"  - route:\n    - destination: {{host: {GATEWAY_HOST}, subset: canary}}\n"
        )
    outlier = "{consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}"
    rule = f"""
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: {GATEWAY_HOST}
  trafficPolicy:
    outlierDetection: {outlier}
{subsets}"""
    return gateway_service_of(*rows) + rule + route


def _get(s: socket.socket) -> int:
    s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    return _status(_response(s))


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("routed", [True, False], ids=["subset", "no-route"])
def test_a_destination_all_ejected_is_counted_under_its_pods(
    which: str, routed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pods of the canary, each ejected by the 503 of its first
    request; the next three are the proxy's own 503 UH: counted under the
    labels of the two 503s the pods answered but the flags (before: the
    version ``canary``, the workload ``svc-canary``, the app ``unknown``),
    in both twins; the same for a service with no route, its own
    outlierDetection."""
    _worker_twin(which, monkeypatch)
    stable = Scripted([])
    pods = [Scripted([_answer(503)] * 10) for _ in range(2)]
    rules = tmp_path / "rules.yaml"
    canary = tuple(p.endpoint[1] for p in pods)
    rules.write_text(_rules(stable.endpoint[1] if routed else None, canary))
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(None, socket.create_connection, address, 10)
            try:
                got["reached"] = [await loop.run_in_executor(None, _get, s) for _ in range(2)]
                deadline = time.monotonic() + 5
                while any(
                    worker.health.is_healthy(Endpoint("127.0.0.1", p.endpoint[1])) for p in pods
                ):
                    assert time.monotonic() < deadline, "not ejected"
                    await asyncio.sleep(0.01)
                got["uh"] = [await loop.run_in_executor(None, _get, s) for _ in range(3)]
            finally:
                s.close()
            await worker.flush_relay_reports()
            got["series"] = worker.counter_sample().series.get("istio_requests_total", {})

    try:
        asyncio.run(main())
    finally:
        for p in (stable, *pods):
            p.close()
    assert (got["reached"], got["uh"]) == ([503, 503], [503] * 3), got
    assert [len(p.requests) for p in pods] == [1, 1] and not stable.requests
    series = {dict(k)["response_flags"]: (dict(k), v) for k, v in got["series"].items()}
    assert sorted(series) == ["-", "UH"], series
    reached, n_reached = series["-"]
    uh, n_uh = series["UH"]
    assert (n_reached, n_uh) == (2, 3)
    assert {k: v for k, v in uh.items() if k != "response_flags"} == {
        k: v for k, v in reached.items() if k != "response_flags"
    }
    assert (
        uh["destination_version"],
        uh["destination_workload"],
        uh["destination_app"],
        uh["destination_canonical_service"],
        uh["response_code"],
    ) == ("2.0", "shop-2.0", "shop", "shop-canon", "503")
