"""Per-request routing (``l4proxy run --http-routing request``) in namespaces.

Real keep-alive clients (Python's http.client as uid 1000 in the client pod,
one TCP connection each, checked by its local port) through l4proxy-init's
REDIRECT and the sidecar as uid 1337, to the bootcamp pods.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter

import pytest

from l4proxy.demo.podnet import Pod
from tests._hardening import TCP_ECHO
from tests.mesh import (
    IMPLS,
    PYTHON,
    ROUTING_MODES,
    VIP,
    Mesh,
    binomial_ok,
    route_rule,
    service_entry,
)

pytestmark = pytest.mark.netns

PER_REQUEST = ("--http-routing", "request")
RAW_VIP = "198.19.0.40"

# Reads "N PATH" lines on stdin; makes N requests on each of its connections
# (never reconnecting), prints one JSON line per batch: per connection, a list
# of "status body" and the set of local ports used.
CLIENT = r"""
import http.client, json, sys
host, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cs = [http.client.HTTPConnection(host, port, timeout=10) for _ in range(conns)]
for c in cs:
    c.auto_open = 0
    c.connect()
for line in sys.stdin:
    n, path = line.split()
    out = []
    for c in cs:
        got, ports = [], set()
        for _ in range(int(n)):
            c.request("GET", path, headers={"Host": "bootcamp"})
            r = c.getresponse()
            got.append(f"{r.status} {r.read().decode().strip()}")
            ports.add(c.sock.getsockname()[1])
        out.append({"got": got, "ports": sorted(ports)})
    print(json.dumps(out), flush=True)
"""


class KeepAliveClient:
    def __init__(self, mesh: Mesh, host: str, port: int, conns: int) -> None:
        assert mesh.client is not None
        self.proc = mesh.client.popen(
            [PYTHON, "-c", CLIENT, host, str(port), str(conns)],
            user=1000,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def batch(self, n: int, path: str = "/") -> list[list[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n} {path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"client died: {self.proc.poll()}"
        out = json.loads(line)
        for conn in out:
            assert len(conn["ports"]) == 1  # one TCP connection throughout
        return [conn["got"] for conn in out]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)


def version(answer: str) -> str:
    """'200 Hello ... | v=2' -> 'v2'."""
    assert answer.startswith("200 "), answer
    return "v" + answer.rsplit("v=", 1)[1]


def wait_generation(mesh: Mesh, before: float) -> None:
    assert mesh.sidecar is not None
    deadline = time.monotonic() + 10
    while mesh.sidecar.stat("l4proxy_rules_generation") <= before:
        assert time.monotonic() < deadline, "the new rules never went live"
        time.sleep(0.1)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_every_request_on_a_keep_alive_connection_is_split(mesh: Mesh, impl: str) -> None:
    mesh.start(impl, route_rule({"v1": 50, "v2": 50}), run_args=PER_REQUEST)
    assert mesh.sidecar is not None
    client = KeepAliveClient(mesh, VIP, 8080, conns=4)
    try:
        per_conn = [Counter(version(a) for a in got) for got in client.batch(100)]
    finally:
        client.close()
    # Per connection before: 100 of one version. Now both, on every connection.
    assert all(c["v1"] and c["v2"] for c in per_conn), per_conn
    v2 = sum(c["v2"] for c in per_conn)
    assert binomial_ok(v2, 400, 0.5), v2
    # 400 requests over a handful of pooled upstream connections
    opened = mesh.sidecar.stat("l4proxy_upstream_pool_opened_total")
    assert 1 <= opened <= 12, opened
    assert mesh.sidecar.stat("l4proxy_http_requests_total") == 400
    stats = mesh.sidecar.admin("/stats")
    v2_series = [
        ln
        for ln in stats.splitlines()
        if ln.startswith("istio_requests_total{")
        and 'destination_version="v2"' in ln
        and 'response_code="200"' in ln
    ]
    assert len(v2_series) == 1 and float(v2_series[0].rsplit(" ", 1)[1]) == v2
    # the pool in /clusters: the idle upstream connections, per endpoint
    clusters = json.loads(mesh.sidecar.admin("/clusters?format=json"))
    eps = [ep for c in clusters for ep in c["endpoints"]]
    assert all("rq_active" in ep and "cx_idle" in ep for ep in eps), eps
    assert 1 <= sum(ep["cx_idle"] for ep in eps) <= opened
    assert sum(ep["rq_active"] for ep in eps) == 0  # nothing in flight now


# What ends a pooled upstream connection, each a counter in /stats
POOL_EXITS = (
    "closed_max_requests",
    "closed_unreusable",
    "closed_overflow",
    "evicted",
    "expired",
    "closed_removed",
)


def test_a_rule_swap_and_a_rollback_reach_open_connections(mesh: Mesh) -> None:
    # --pool-max-requests 5: an upstream connection serves 5 requests at most
    run_args = (*PER_REQUEST, "--pool-max-requests", "5")
    mesh.start("compiled-uvloop", route_rule({"v2": 100}), run_args=run_args)
    assert mesh.sidecar is not None
    client = KeepAliveClient(mesh, VIP, 8080, conns=2)
    try:
        assert {version(a) for conn in client.batch(20) for a in conn} == {"v2"}
        for rollout in ("v1", "v2"):  # the rollback, then forward again
            gen = mesh.sidecar.stat("l4proxy_rules_generation")
            mesh.write_rules(route_rule({rollout: 100}))
            wait_generation(mesh, gen)
            got = client.batch(20)
            assert {version(a) for conn in got for a in conn} == {rollout}
    finally:
        client.close()
    served = mesh.sidecar.stat("l4proxy_http_requests_total")
    assert served == 120  # 3 batches x 2 connections x 20
    opened = mesh.sidecar.stat("l4proxy_upstream_pool_opened_total")
    assert opened >= served // 5
    # Where each of them went, as /stats says: closed at check-in (its 5th
    # request, here), evicted or expired idle, or idle now. Nothing in flight:
    # they add up.
    gone = {why: mesh.sidecar.stat(f"l4proxy_upstream_pool_{why}_total") for why in POOL_EXITS}
    assert gone["closed_max_requests"] >= 1, gone
    assert opened == sum(gone.values()) + mesh.sidecar.stat("l4proxy_upstream_pool_idle"), gone


def _established_from(pod: Pod, port: int = 8080) -> int:
    """Connections to *pod*'s *port* it has not seen the end of (ESTABLISHED)."""
    out = pod.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"]).stdout
    return len(out.splitlines())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_reload_that_removes_an_endpoint_closes_its_pooled_connections(
    mesh: Mesh, impl: str
) -> None:
    """A pod a reload took out of the ServiceEntry kept its pooled upstream
    connections for --pool-idle-timeout (60 s), invisible in /clusters, and
    held its graceful shutdown so long. They are closed as the table goes live."""
    a, b = mesh.bootcamp[0], mesh.bootcamp[1]

    def registry(*pods: Pod) -> str:
        return service_entry("bootcamp", VIP, 8080, [(p.ipv4, p.labels) for p in pods])

    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.write_rules(registry(a, b), name="registry.yaml")
    sidecar = mesh.start_client(run_args=(*args, *PER_REQUEST))
    lines = mesh.curl(f"http://{VIP}:8080/", 4)  # round robin: A, B, A, B
    assert lines.count("200") == 4, lines
    assert _established_from(a) == 1  # pooled, idle
    idle = sidecar.stat("l4proxy_upstream_pool_idle")
    assert idle == 2
    gen = sidecar.stat("l4proxy_rules_generation")
    mesh.write_rules(registry(b), name="registry.yaml")
    wait_generation(mesh, gen)
    deadline = time.monotonic() + 1
    while _established_from(a):
        assert time.monotonic() < deadline, "A's pooled connection is still open"
        time.sleep(0.05)
    assert sidecar.stat("l4proxy_upstream_pool_idle") == 1  # B's
    assert sidecar.stat("l4proxy_upstream_pool_closed_removed_total") == 1
    assert _established_from(b) == 1


INGRESS = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: gateway
spec:
  rules:
  - http:
      paths:
      - path: /bootcamp
        pathType: Exact
        backend:
          service:
            name: bootcamp
            port:
              number: 8080
"""


def test_ingress_paths_are_enforced_on_every_request(mesh: Mesh) -> None:
    mesh.start("compiled-uvloop", INGRESS, run_args=(*PER_REQUEST, "--listen", "0.0.0.0:8000"))
    assert mesh.client is not None
    client = KeepAliveClient(mesh, mesh.client.ipv4, 8000, conns=1)
    try:
        assert version(client.batch(1, "/bootcamp")[0][0]) in ("v1", "v2")
        assert client.batch(1, "/secret") == [["404 no route"]]  # was: 200 from the backend
        assert version(client.batch(1, "/bootcamp")[0][0]) in ("v1", "v2")
        # Paths with ids and queries: each is judged, and Python is asked per
        # outcome of the Ingress path's test, not per distinct target.
        for i in range(40):
            assert version(client.batch(1, f"/bootcamp?id={i}")[0][0]) in ("v1", "v2")
            assert client.batch(1, f"/secret/{i}?id={i}") == [["404 no route"]]
    finally:
        client.close()
    assert mesh.sidecar is not None
    assert mesh.sidecar.stat("l4proxy_http_requests_total") == 83
    hits = mesh.sidecar.stat("l4proxy_http_verdict_cache_hits_total")
    misses = mesh.sidecar.stat("l4proxy_http_verdict_cache_misses_total")
    assert hits + misses == 83
    # keyed by target: 83 misses (every request a new target but the 2nd and
    # 4th); by test outcome: 2, and 2 more per second the run lasts (a
    # verdict lives 1 s)
    assert misses < 40, misses
    # the 404s in Istio's metrics: no route (unknown), not PassthroughCluster
    stats = mesh.sidecar.admin("/stats").splitlines()
    series = [ln for ln in stats if ln.startswith("istio_requests_total{") and '"404"' in ln]
    assert len(series) == 1, series
    assert 'destination_service="unknown"' in series[0] and series[0].endswith(" 41"), series


INGRESS_PUBLIC = INGRESS.replace(
    "/bootcamp\n        pathType: Exact", "/public\n        pathType: Prefix"
)


@pytest.mark.parametrize("routing", list(ROUTING_MODES))
def test_a_dot_segment_does_not_reach_a_path_the_ingress_does_not_expose(
    mesh: Mesh, routing: str
) -> None:
    """An Ingress exposes only Prefix /public; bootcamp, as many servers
    do, would serve any path it is sent. /public/../private was routed by
    /public and forwarded as sent, so a server that removes dot-segments
    served /private: it gets 400 now, in both data planes (the per-request
    relay, and the per-connection peek of a connection's first head). curl
    removes dot-segments itself unless told --path-as-is."""
    run_args = (*ROUTING_MODES[routing], "--listen", "0.0.0.0:8000")
    mesh.start("compiled-uvloop", INGRESS_PUBLIC, run_args=run_args)
    assert mesh.client is not None and mesh.sidecar is not None
    base = f"http://{mesh.client.ipv4}:8000"

    def get(path: str) -> tuple[str, list[str]]:
        lines = mesh.curl(base + path, extra=["--path-as-is"])
        return lines[-1], [ln for ln in lines[:-1] if ln]

    assert get("/public/x")[0] == "200"
    assert get("/private")[0] == "404"
    dots = ("/public/../private", "/public/%2e%2e/private", "/public/%2E./private?a=1")
    for path in dots:
        assert get(path) == ("400", ["dot-segment (. or ..) in the request path"]), path
    assert get("/public/a..b/.well-known?to=../x")[0] == "200"  # no dot-segment
    # counted as the other malformed heads are
    if routing == "connection":
        assert mesh.sidecar.stat('l4proxy_refused_total{reason="bad_request_400"}') == len(dots)
    else:
        stats = mesh.sidecar.admin("/stats").splitlines()
        bad = [ln for ln in stats if ln.startswith("istio_requests_total{") and '"400"' in ln]
        assert len(bad) == 1 and bad[0].endswith(f" {len(dots)}"), bad


def test_bytes_that_are_not_http_still_go_through_at_l4(mesh: Mesh) -> None:
    odd = mesh.net.add_pod("odd", labels={"app": "odd"})
    mesh.procs.append(odd.popen([PYTHON, "-c", TCP_ECHO, "8082"], user=1000))
    odd.wait_listening(8082)
    mesh.write_rules(service_entry("raw", RAW_VIP, 8082, [(odd.ipv4, {})]), name="raw.yaml")
    mesh.start("compiled-uvloop", run_args=PER_REQUEST)
    assert mesh.client is not None
    payload = b"\x16\x03\x01 a TLS-looking start, then binary \x00\xff" * 50
    code = (
        "import socket,sys;c=socket.create_connection((sys.argv[1],8082),5);"
        "c.sendall(bytes.fromhex(sys.argv[2]));c.shutdown(socket.SHUT_WR);"
        "d=b''\nwhile (x:=c.recv(65536)): d+=x\nprint(d.hex())"
    )
    argv = [PYTHON, "-c", code, RAW_VIP, payload.hex()]
    out = mesh.client.run(argv, user=1000, timeout=20).stdout
    assert bytes.fromhex(out.strip()) == payload  # routed at L4, byte-identical
    assert mesh.sidecar is not None  # ... after the relay looked at it
    assert mesh.sidecar.stat("l4proxy_http_connections_total") == 1
    assert mesh.sidecar.stat("l4proxy_http_requests_total") == 0


HEADER_ROUTE = """
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bootcamp
spec:
  hosts: [bootcamp.default.svc.cluster.local]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: bootcamp.default.svc.cluster.local, subset: v2}
  - route:
    - destination: {host: bootcamp.default.svc.cluster.local, subset: v1}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: bootcamp
spec:
  host: bootcamp.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

API_ONLY = """
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bootcamp
spec:
  hosts: [bootcamp.default.svc.cluster.local]
  http:
  - match:
    - uri: {prefix: /api}
    route:
    - destination: {host: bootcamp.default.svc.cluster.local, subset: v2}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: bootcamp
spec:
  host: bootcamp.default.svc.cluster.local
  subsets:
  - {name: v2, labels: {version: v2}}
"""


@pytest.mark.parametrize(
    ("impl", "mode"),
    [
        ("compiled-uvloop", "request"),
        ("pure-asyncio", "request"),
        ("compiled-uvloop", "connection"),
    ],
)
def test_a_request_no_virtual_service_route_matches_is_answered_404(
    mesh: Mesh, impl: str, mode: str
) -> None:
    """Istio answers 404 (Envoy's NR) to a request for a VirtualService's
    host that none of its http routes matches; it went to any bootcamp pod,
    round robin. Each of the worker's three answers: the compiled relay's
    verdict, the pure relay's decision, the per-connection refusal."""
    mesh.start(impl, API_ONLY, run_args=ROUTING_MODES[mode])
    assert mesh.sidecar is not None
    api = [ln for ln in mesh.curl(f"http://{VIP}:8080/api", 3) if ln]
    assert api[1::2] == ["200"] * 3 and all(ln.endswith("v=2") for ln in api[::2]), api
    other = [ln for ln in mesh.curl(f"http://{VIP}:8080/other", 3) if ln]
    assert other == ["no route matched", "404"] * 3, other  # was: any pod's 200
    if mode == "connection":
        assert mesh.sidecar.stat('l4proxy_refused_total{reason="no_route"}') == 3
    else:  # Istio's labels for it, the same from both relays (the pure one said "none")
        [series] = [
            ln.rsplit(" ", 1)[0]
            for ln in mesh.sidecar.admin("/stats").splitlines()
            if ln.startswith("istio_requests_total{") and 'response_code="404"' in ln
        ]
        assert 'destination_version="unknown"' in series, series
        assert 'destination_workload="unknown"' in series, series


USERS_CLIENT = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
for user in [f"user{i}" for i in range(40)] * 2 + ["jason"] * 10:
    c.request("GET", "/", headers={"Host": "bootcamp", "End-User": user})
    r = c.getresponse()
    print(user, r.status, r.read().decode().strip().rsplit("v=", 1)[1])
"""


def test_a_header_route_is_applied_per_request_without_python_per_user(mesh: Mesh) -> None:
    """Istio's end-user: jason route on one keep-alive connection: jason's
    requests go to v2, everyone else's to v1, and the 40 other users share
    one verdict (the header is read through its test, not by value)."""
    mesh.start("compiled-uvloop", HEADER_ROUTE, run_args=PER_REQUEST)
    assert mesh.client is not None and mesh.sidecar is not None
    out = mesh.client.run([PYTHON, "-c", USERS_CLIENT, VIP], user=1000, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 90
    assert all(status == "200" for _, status, _ in rows), rows
    assert all(v == ("2" if user == "jason" else "1") for user, _, v in rows), rows
    misses = mesh.sidecar.stat("l4proxy_http_verdict_cache_misses_total")
    assert mesh.sidecar.stat("l4proxy_http_verdict_cache_hits_total") + misses == 90
    assert misses < 20, misses  # by value: 41 or more


def _maps_re2(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "_re2" in f.read()


def test_re2_is_loaded_by_the_first_regex_rule_not_at_start(mesh: Mesh) -> None:
    """RE2 and libstdc++ (2.5 MB of RSS) are paid only by a pod whose rules have
    a regex: not mapped at start, mapped once a regex rule loads, and that
    rule then routes."""
    mesh.start("compiled-uvloop", HEADER_ROUTE, run_args=PER_REQUEST)
    assert mesh.client is not None and mesh.sidecar is not None
    [worker] = mesh.sidecar.worker_pids()
    assert not _maps_re2(worker) and not _maps_re2(mesh.sidecar.proc.pid)
    gen = mesh.sidecar.stat("l4proxy_rules_generation")
    mesh.write_rules(HEADER_ROUTE.replace("exact: jason", 'regex: "^ja[s]on$"'))
    wait_generation(mesh, gen)
    assert _maps_re2(worker)
    out = mesh.client.run([PYTHON, "-c", USERS_CLIENT, VIP], user=1000, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 90
    assert all(v == ("2" if user == "jason" else "1") for user, _, v in rows), rows


READY_PROBE = r"""
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=5).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""

GATEWAY_PROBE = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = round(time.monotonic(), 2)
    try:
        c = socket.create_connection((host, port), 2)
        c.sendall(b"GET /bootcamp HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        data = b""
        while d := c.recv(4096):
            data += d
        print(t, data.split(b" ", 2)[1].decode() if data else "empty", flush=True)
    except OSError as exc:
        print(t, type(exc).__name__, flush=True)
    time.sleep(0.1)
"""


def test_a_gateway_serves_for_drain_inbound_after_sigterm_then_refuses(mesh: Mesh) -> None:
    """A load balancer still sends new connections for seconds after the pod
    is told to stop: with --drain-inbound 2 they are served (and /ready says
    503), then refused. Before, the gateway listener closed at the SIGTERM."""
    # the gateway's pod, as deploy/ runs it: no capture, a listener of its own
    mesh.write_rules(service_entry("bootcamp", VIP, 8080, mesh.endpoints()), name="registry.yaml")
    mesh.write_rules(INGRESS)
    gateway = mesh.net.add_pod("gw", labels={"app": "gw"})
    sidecar = mesh.start_sidecar(
        gateway,
        (*PER_REQUEST, "--no-transparent", "--listen", "0.0.0.0:8000", "--drain-inbound", "2"),
    )
    caller = mesh.net.add_pod("lb")
    probe = caller.popen(
        [PYTHON, "-c", GATEWAY_PROBE, gateway.ipv4, "8000", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    sigterm = time.monotonic()
    sidecar.proc.send_signal(15)
    time.sleep(0.5)
    ready = gateway.run([PYTHON, "-c", READY_PROBE, "15000"], timeout=10).stdout.strip()
    out, _ = probe.communicate(timeout=30)
    results = [(float(t) - sigterm, what) for t, what in (ln.split() for ln in out.splitlines())]
    # (the probe's clock is this machine's monotonic clock: the same one)
    assert ready == "503", ready
    before = [w for t, w in results if t < 0]
    during = [w for t, w in results if 0.2 < t < 1.6]
    after = [w for t, w in results if t > 3.5]  # (2 s, and room for a slow machine)
    assert before and set(before) == {"200"}, results
    assert during and set(during) == {"200"}, results  # was: ConnectionRefusedError
    assert after and set(after) == {"ConnectionRefusedError"}, results


URGENT_SERVER = r"""
import socket, sys
s = socket.create_server(("", int(sys.argv[1])))
body = bytes(range(256)) * 2048  # 512 KiB: spliced by the relay
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + 1) + body[:300000])
    c.send(b"!", socket.MSG_OOB)  # an urgent byte in the body's middle
    c.sendall(body[300000:])
    c.close()
"""

URGENT_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 10)
c.sendall(b"GET / HTTP/1.1\r\nHost: urgent\r\nConnection: close\r\n\r\n")
data = b""
while chunk := c.recv(1 << 16):
    data += chunk
body = bytes(range(256)) * 2048
print(data.endswith(b"\r\n\r\n" + body[:300000] + b"!" + body[300000:]))
"""


def test_an_urgent_byte_in_a_spliced_body_arrives_in_place_and_is_counted(mesh: Mesh) -> None:
    """Through the sidecar: the per-request relay's sockets take urgent data
    inline (SO_OOBINLINE; the byte was skipped and the body came one short),
    and the marks its splice crossed are in l4proxy_urgent_marks_total, with
    the L4 pump's."""
    pod = mesh.net.add_pod("urgent", labels={"app": "urgent"})
    mesh.procs.append(pod.popen([PYTHON, "-c", URGENT_SERVER, "7010"], user=1000))
    pod.wait_listening(7010)
    mesh.write_rules(service_entry("urgent", "198.19.0.44", 7010, [(pod.ipv4, {})]), name="u.yaml")
    mesh.start("compiled-uvloop", run_args=PER_REQUEST)
    assert mesh.client is not None and mesh.sidecar is not None
    r = mesh.client.run([PYTHON, "-c", URGENT_CLIENT, "198.19.0.44", "7010"], user=1000)
    assert r.stdout.strip() == "True", r.stdout + r.stderr
    assert mesh.sidecar.stat("l4proxy_http_spliced_bodies_total") == 1
    assert mesh.sidecar.stat("l4proxy_urgent_marks_total") >= 1
