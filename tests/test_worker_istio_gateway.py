"""An Istio Gateway and the VirtualServices bound to it, through a real
worker on a gateway listener, both relay twins, keep-alive connections on
loopback.

The Gateway's server port is the listener's own (bound on port 0 first,
read back, then written into the rule file: the gateway listens where
``--listen`` says, and a server is for that local port). Pods are
one-letter backends on 127.0.0.1 (``Backend``: each answers its name).
What is checked is what a client of the gateway sees: the pod that
answered, or the gateway's own 404 (``no route`` where no name of the
Gateway takes the Host, Envoy's NR; ``no route matched`` where the
VirtualService of that name has no route for the path)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.dataplane.listener import bind_listener
from l4proxy.rules.watch import RuleWatcher
from l4proxy.sidecar.worker import Worker, WorkerOptions
from tests._worker import drive_gateway
from tests.test_gateway_session_persistence import Backend
from tests.test_least_request import read_head

TWINS = ["pure", "compiled"]
Answer = tuple[int, str]  # status, body


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    out = {n: Backend(n) for n in "abc"}
    yield out
    for b in out.values():
        b.close()


def _entry(name: str, pods: list[tuple[Backend, str]]) -> str:
    """A ServiceEntry for NAME on port 9080 whose endpoints are *pods*
    (each a backend and its version label)."""
    eps = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {b.endpoint[1]}}}, labels: {{version: {v}}}}}"
        for b, v in pods
    )
    return f"""
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
"""


def _gateway(port: int, hosts: str = '"*"') -> str:
    return f"""
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: bookinfo-gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: [{hosts}]
"""


BOOKINFO_VS = """
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match:
    - uri: {exact: /productpage}
    - uri: {prefix: /static}
    - uri: {exact: /login}
    - uri: {exact: /logout}
    - uri: {prefix: /api/v1/products}
    route:
    - destination: {host: productpage, port: {number: 9080}}
"""


class Client:
    """Requests on one keep-alive connection (a new one after an answer
    that closes it)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None

    def get(self, host: str, path: str) -> Answer:
        status, _, body = self.request(host, path)
        return status, body

    def request(self, host: str, path: str, more: str = "") -> tuple[int, dict[str, str], str]:
        """GET *path* of *host*, *more* header lines after Host: the
        status, the header fields (lowercase names; values as sent) and
        the body."""
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{more}\r\n".encode())
        data = read_head(self.sock)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(fields["content-length"]):
            chunk = self.sock.recv(4096)
            assert chunk, data
            body += chunk
        if fields.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), fields, body.decode()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@pytest.mark.parametrize("which", TWINS)
def test_bookinfo_gateway_through_a_worker(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Istio's bookinfo Gateway and VirtualService: productpage's paths go
    to its pod (a) whatever the Host, on one connection; another path is
    the VirtualService's 404 no route matched; nothing goes to details (b),
    a pod of the registry that no route names."""
    got: list[tuple[str, str, Answer]] = []

    def rules(port: int) -> str:
        return (
            _gateway(port)
            + BOOKINFO_VS
            + _entry("productpage", [(backends["a"], "v1")])
            + _entry("details", [(backends["b"], "v1")])
        )

    def client(address: tuple[str, int]) -> None:
        c = Client(address)
        for host in ("bookinfo.example.com", "192.0.2.1"):
            for path in ("/productpage", "/static/a.css", "/api/v1/products/1", "/details"):
                got.append((host, path, c.get(host, path)))
        c.close()

    drive_gateway(which, monkeypatch, tmp_path / "rules.yaml", rules, client)
    for host, path, answer in got:
        expected = (404, "no route matched") if path == "/details" else (200, "a")
        assert answer == expected, (host, path)


@pytest.mark.parametrize("which", TWINS)
def test_the_host_picks_the_virtual_service_through_a_worker(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server hosts "*.example.com"; VirtualService a (a.example.com) to
    pod a, VirtualService wild ("*") to pod b: a.example.com (its port and
    case ignored) reaches a, any other name under example.com b, per
    request on one connection; example.org is taken by no name (404 NR,
    the gateway's own, which the backends never see)."""
    got: list[tuple[str, Answer]] = []

    def rules(port: int) -> str:
        vs = """
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: %s}
spec:
  hosts: [%s]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: %s}
"""
        return (
            _gateway(port, '"*.example.com"')
            + vs % ("a", "a.example.com", "productpage")
            + vs % ("wild", '"*"', "details")
            + _entry("productpage", [(backends["a"], "v1")])
            + _entry("details", [(backends["b"], "v1")])
        )

    hosts = ["a.example.com", "x.example.com", "A.Example.com:80", "x.y.example.com"] * 2
    hosts.append("example.org")

    def client(address: tuple[str, int]) -> None:
        c = Client(address)
        for host in hosts:
            got.append((host, c.get(host, "/")))
        c.close()

    drive_gateway(which, monkeypatch, tmp_path / "rules.yaml", rules, client)
    answers = dict(got)
    assert answers == {
        "a.example.com": (200, "a"),
        "A.Example.com:80": (200, "a"),
        "x.example.com": (200, "b"),
        "x.y.example.com": (200, "b"),
        "example.org": (404, "no route"),
    }
    assert len(got) == len(hosts)


@pytest.mark.parametrize("which", TWINS)
def test_a_canary_split_at_the_gateway_through_a_worker(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reviews v1 (pod a) 90, v2 (pod b) 10, by DestinationRule subsets:
    of 400 requests on one connection (the worker's draw seeded) v2
    answers about 40 (sd 6), v1 the rest, pod c (v3) none."""
    got: Counter[str] = Counter()

    def rules(port: int) -> str:
        return (
            _gateway(port)
            + _entry(
                "reviews", [(backends["a"], "v1"), (backends["b"], "v2"), (backends["c"], "v3")]
            )
            + """
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.example.com]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"""
        )

    def client(address: tuple[str, int]) -> None:
        c = Client(address)
        for _ in range(400):
            status, body = c.get("reviews.example.com", "/reviews/0")
            assert status == 200
            got[body] += 1
        c.close()

    drive_gateway(which, monkeypatch, tmp_path / "rules.yaml", rules, client)
    assert set(got) == {"a", "b"}, got
    assert 16 <= got["b"] <= 64, got


@pytest.mark.parametrize("which", TWINS)
def test_https_redirect_through_a_worker(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Gateway of an HTTP server of httpsRedirect on the listener's
    port and an HTTPS server on 443 (not served), bookinfo's VirtualService
    bound to it: on one keep-alive connection a request is answered 301
    to https (the Host's port left out, path and query as sent, no body)
    by the gateway, one with X-Forwarded-Proto: https goes to productpage's
    pod (a), and the connection serves the next request after each."""
    got: list[tuple[int, dict[str, str], str]] = []

    def rules(port: int) -> str:
        return (
            f"""
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: bookinfo-gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: ["*"]
    tls: {{httpsRedirect: true}}
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: ["*"]
    tls: {{mode: SIMPLE, credentialName: bookinfo-credential}}
"""
            + BOOKINFO_VS
            + _entry("productpage", [(backends["a"], "v1")])
        )

    def client(address: tuple[str, int]) -> None:
        c = Client(address)
        c.sock = first = socket.create_connection(address, timeout=10)
        host = f"bookinfo.example.com:{address[1]}"
        for more in ("", "X-Forwarded-Proto: https\r\n", "", "X-Forwarded-Proto: https\r\n"):
            got.append(c.request(host, "/productpage?u=normal&x=%2F", more))
            assert c.sock is first, got  # (the same connection, not closed)
        c.close()

    drive_gateway(which, monkeypatch, tmp_path / "rules.yaml", rules, client)
    location = "https://bookinfo.example.com/productpage?u=normal&x=%2F"
    for status, fields, body in got[0::2]:
        assert (status, fields.get("location"), body) == (301, location, ""), fields
        assert fields["content-length"] == "0"
    assert [(status, body) for status, _, body in got[1::2]] == [(200, "a"), (200, "a")]


def test_a_listen_port_whose_only_server_is_not_served_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway listening on the port of a Gateway's HTTPS server (not
    served: a load warning) and on its HTTP server's: the HTTPS one routes
    nothing, and a TLS client's handshake there is answered 400. The
    worker says so at the start (it said nothing); the HTTP server's port
    is not named, and neither is the HTTPS port where an Ingress rule (of
    every gateway port) routes it."""
    plain = bind_listener("127.0.0.1", 0, "gateway")
    tls = bind_listener("127.0.0.1", 0, "gateway")
    gateway = f"""\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: gw}}
spec:
  servers:
  - port: {{number: {plain.address[1]}, name: http, protocol: HTTP}}
    hosts: ["*"]
  - port: {{number: {tls.address[1]}, name: https, protocol: HTTPS}}
    hosts: ["*"]
    tls: {{mode: SIMPLE, credentialName: cert}}
"""
    ingress = """\
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: all}
spec:
  rules:
  - host: other.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
"""

    def warned(text: str) -> list[str]:
        rules = tmp_path / "rules.yaml"
        rules.write_text(text)
        watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
        assert watcher.load_now()
        caplog.clear()

        async def main() -> None:
            with caplog.at_level(logging.WARNING):
                Worker([plain, tls], watcher, WorkerOptions()).close()

        asyncio.run(main())
        return [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]

    try:
        (said,) = warned(gateway)
        assert said.startswith("--listen ports whose only Gateway server is not served"), said
        assert said.endswith(
            f": port {tls.address[1]} (Gateway default/gw server 1 (HTTPS, port {tls.address[1]}))"
        ), said
        assert warned(gateway + ingress) == []
    finally:
        plain.sock.close()
        tls.sock.close()
