"""What a gateway's own answers are labelled with: a request a Gateway
API route answers itself (500 for a backend no ReferenceGrant permits or
a rule of weights 0, 404 for a path no rule of the host matches) reached no
upstream, so Istio's gateway labels it ``destination_service="unknown"``
and its access log has no cluster (``-``), the route's name kept. They
were labelled with the gateway service's own name (``gateway:NS/GW/
LISTENER/HOST``, ``destination_service_name`` that cut at its first dot,
a workload ``gateway:...-default``) and logged under a made-up cluster
``outbound|PORT||gateway:...``. A request the pod answers keeps its
service's labels and cluster. A real worker of each relay twin, one
keep-alive connection on loopback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from l4proxy.sidecar.worker import Worker
from tests._worker import drive_gateway
from tests.test_access_log_worker import _read_lines
from tests.test_gateway_session_persistence import Backend
from tests.test_worker_istio_gateway import TWINS, Answer, Client


def _istio_rows(worker: Worker) -> list[tuple[dict[str, str], float]]:
    """*worker*'s istio_requests_total rows (its relay's reports flushed):
    each one's labels and count."""
    if worker.relay is not None:
        worker.relay.flush_reports(1.0)
    return [
        (dict(k), n)
        for counters in (worker.counters, worker.relay_counters)
        for name, rows in counters.snapshot().items()
        if name == "istio_requests_total"
        for k, n in rows.items()
    ]


def _rules(port: int, pod: Backend) -> str:
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg, namespace: default}}
spec:
  gatewayClassName: l4proxy
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: edge, namespace: default}}
spec:
  parentRefs: [{{name: eg}}]
  hostnames: [edge.example]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /zero}}}}]
    backendRefs: [{{name: web, port: 8080, weight: 0}}]
  - matches: [{{path: {{type: PathPrefix, value: /refused}}}}]
    backendRefs: [{{name: web, namespace: other, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /ok}}}}]
    backendRefs: [{{name: web, port: 8080}}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {pod.endpoint[1]}}}, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: web, namespace: other}}
spec:
  hosts: [web.other.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {pod.endpoint[1]}}}}}]
"""


@pytest.mark.parametrize("which", TWINS)
def test_a_gateway_routes_own_answers_are_labelled_unknown_with_no_cluster(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = Backend("a")
    got: list[Answer] = []
    labels: list[tuple[dict[str, str], float]] = []
    r, w = os.pipe()

    def client(address: tuple[str, int]) -> None:
        c = Client(address)
        try:
            for path in ("/zero", "/refused", "/nowhere", "/ok"):
                got.append(c.get("edge.example", path))
        finally:
            c.close()

    try:
        drive_gateway(
            which,
            monkeypatch,
            tmp_path / "rules.yaml",
            lambda port: _rules(port, pod),
            client,
            lambda worker: labels.extend(_istio_rows(worker)),
            access_log_fd=w,
        )
    finally:
        pod.close()
        os.close(w)
    lines = _read_lines(r)
    assert [status for status, _ in got] == [500, 500, 404, 200], got
    by_code = {d["response_code"]: d for d, _ in labels}
    for code in ("500", "404"):
        d = by_code[code]
        assert (
            d["destination_service"],
            d["destination_service_name"],
            d["destination_version"],
            d["destination_workload"],
        ) == ("unknown",) * 4, d
    ok = by_code["200"]
    assert (ok["destination_service"], ok["destination_version"]) == (
        "web.default.svc.cluster.local",
        "v1",
    ), ok
    assert sum(n for d, n in labels if d["response_code"] == "500") == 2
    assert not [d for d, _ in labels if "gateway:" in " ".join(d.values())], labels

    def line(path: str) -> str:
        (found,) = [ln.decode() for ln in lines if f'"GET {path} HTTP/1.1"' in ln.decode()]
        return found

    for path in ("/zero", "/refused"):
        # (UPSTREAM_CLUSTER "-" then the route's name: Istio's default
        # format puts the cluster after UPSTREAM_HOST, the route last)
        assert " - - " in line(path) and "outbound|" not in line(path), line(path)
        assert "gateway:" not in line(path), line(path)
    assert "outbound|8080||web.default.svc.cluster.local" in line("/ok"), line("/ok")


@pytest.mark.parametrize("which", TWINS)
def test_a_gateways_head_refused_before_routing_is_labelled_unknown(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heads the gateway refuses before any route is asked (two Host
    lines, a Host with a space, a dot-segment: 400 and a close) reached no
    destination: ``unknown`` in every destination label. They were
    labelled ``destination_service_name="PassthroughCluster"``, the name
    of traffic to destinations no rule names, which an ingress never
    passes through."""
    pod = Backend("a")
    labels: list[tuple[dict[str, str], float]] = []
    heads = [
        b"GET /ok HTTP/1.1\r\nHost: edge.example\r\nHost: other\r\n\r\n",
        b"GET /ok HTTP/1.1\r\nHost: edge example\r\n\r\n",
        b"GET /ok/../refused HTTP/1.1\r\nHost: edge.example\r\n\r\n",
    ]

    def client(address: tuple[str, int]) -> list[bytes]:
        got = []
        for head in heads:
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(head)
                data = b""
                while chunk := s.recv(4096):  # (the 400, then the close)
                    data += chunk
                got.append(data.split(b"\r\n", 1)[0])
        return got

    try:
        got = drive_gateway(
            which,
            monkeypatch,
            tmp_path / "rules.yaml",
            lambda port: _rules(port, pod),
            client,
            lambda worker: labels.extend(_istio_rows(worker)),
        )
    finally:
        pod.close()
    assert got == [b"HTTP/1.1 400 Bad Request"] * 3
    refused = [(d, n) for d, n in labels if d["response_code"] == "400"]
    assert sum(n for _, n in refused) == 3, labels
    for d, _ in refused:
        assert (
            d["destination_service"],
            d["destination_service_name"],
            d["destination_version"],
            d["destination_workload"],
        ) == ("unknown",) * 4, d
