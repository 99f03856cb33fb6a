"""--access-log for connections routed at L4, as Envoy's tcp_proxy logs
them: the line (``"- - -"``, response code 0, the bytes each way, the
connection's life, the cluster and endpoint it went to, or why none took
it); what the pump reports of each connection's end for it, both twins;
bytes that are not HTTP on a gateway listener (their 400's line) through a
real worker of each relay twin; and TCP ports (a connect that failed,
tcp.maxConnections' overflow, a connection a drain closes), inbound, an
unknown destination (PassthroughCluster; REGISTRY_ONLY's BlackHoleCluster)
and bytes that are not HTTP on an HTTP port through a real sidecar of each
implementation in network namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from l4proxy.dataplane import accesslog as al
from l4proxy.demo.podnet import PodNetwork
from tests._scripted import Scripted
from tests._worker import gateway_service, gateway_worker
from tests.conftest import load_twin
from tests.mesh import IMPLS, PYTHON, Mesh, client_mesh, service_entry
from tests.test_access_log_worker import TEXT_LINE, TWINS, _read_lines
from tests.test_pump import (
    Net,
    close_pumps,  # noqa: F401  (autouse: the pumps make_pump() started, closed)
    make_pump,
    take_ended,
    wait_for,
)
from tests.test_relay_retries import _worker_twin

START = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


def _fields(line: bytes) -> dict[str, str]:
    m = TEXT_LINE.fullmatch(line.decode("utf-8"))
    assert m, line
    return m.groupdict()


# -- the line ----------------------------------------------------------------------------


def test_a_connections_line_is_tcp_proxys() -> None:
    """No request: "- - -", response code 0, no details, no header, no
    route; the bytes each way, its life, its cluster and endpoint."""
    rec = al.connection_record(
        START,
        0,
        5,
        10,
        1234,
        "10.1.0.7:5432",
        "outbound|5432|v1|db.default.svc.cluster.local",
        "10.1.0.2:40512",
        "198.19.0.20:5432",
        "10.1.0.2:51000",
    )
    assert al.format_line(rec) == (
        b'[2023-11-14T22:13:20.250Z] "- - -" 0 - - - "-" 5 10 1234 - "-" "-" "-" "-" '
        b'"10.1.0.7:5432" outbound|5432|v1|db.default.svc.cluster.local 10.1.0.2:40512 '
        b"198.19.0.20:5432 10.1.0.2:51000 - -\n"
    )
    d = json.loads(al.format_line(rec, json=True))
    assert list(d) == list(al.JSON_KEYS)
    assert (d["method"], d["path"], d["protocol"], d["route_name"]) == (None, None, None, None)
    assert (d["response_code"], d["response_flags"], d["response_code_details"]) == (0, "-", None)
    assert (d["bytes_received"], d["bytes_sent"], d["duration"]) == (5, 10, 1234)


def test_a_connection_the_drains_deadline_cut_says_so_as_a_request_does() -> None:
    """DC and DRAIN_CUT (LOCAL_CUT: the worker's _ConnLog.cut()), as the
    line of a request cut at the deadline; its upstream's local address
    kept (it had an upstream: DC says how it ended, not that none took
    it). The same in JSON."""
    rec = al.connection_record(
        START,
        al.DC | al.LOCAL_CUT,
        5,
        10,
        25000,
        "10.1.0.7:5432",
        "outbound|5432|v1|db.default.svc.cluster.local",
        "10.1.0.2:40512",
        "198.19.0.20:5432",
        "10.1.0.2:51000",
    )
    f = _fields(al.format_line(rec))
    assert (f["code"], f["flags"], f["details"]) == ("0", "DC", al.DRAIN_CUT)
    assert (f["upstream"], f["upstream_local"]) == ("10.1.0.7:5432", "10.1.0.2:40512")
    d = json.loads(al.format_line(rec, json=True))
    assert (d["response_flags"], d["response_code_details"]) == ("DC", al.DRAIN_CUT)
    assert d["upstream_local_address"] == "10.1.0.2:40512"


def test_a_connection_no_upstream_took_says_why() -> None:
    """Every connect failed: UF and URX (tcp_proxy's connect attempts used
    up), the endpoint last tried, no upstream local address."""
    rec = al.connection_record(
        START,
        al.UF | al.URX,
        0,
        0,
        3,
        "10.1.0.9:5433",
        "outbound|5433||x",
        "10.1.0.2:1",
        None,
        None,
    )
    f = _fields(al.format_line(rec))
    assert (f["code"], f["flags"], f["details"]) == ("0", "UF,URX", "-")
    assert (f["upstream"], f["upstream_local"]) == ("10.1.0.9:5433", "-")


# -- what the pump reports ---------------------------------------------------------------


@pytest.fixture(params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("pump", request.param)


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def test_the_pump_reports_each_ends_bytes_each_way_and_when(twin: ModuleType, net: Net) -> None:
    """ends(): a token's connection's bytes moved client to upstream (its
    pending bytes first) and back, and when it ended, on time.monotonic()'s
    clock; a hand-off that never was a connection: none; ended() as before."""
    p = make_pump(twin)
    client, server = net.pair(p, pending_upstream=b"head:", token=7)
    client.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1005:
        got += server.recv(65536)
    server.sendall(b"y" * 300)
    assert len(client.recv(65536, socket.MSG_WAITALL)) == 300
    before = time.monotonic()
    client.close()
    server.close()
    r, w = os.pipe()
    p.add(r, w, token=8)  # (not sockets: closed at once)
    deadline = time.monotonic() + 5
    ends: list[tuple[int, int, int, float]] = []
    while len(ends) < 2 and time.monotonic() < deadline:
        ends += p.ends()
        time.sleep(0.005)
    after = time.monotonic()
    by_token = {e[0]: e for e in ends}
    assert sorted(by_token) == [7, 8]
    assert by_token[7][1:3] == (1005, 300)
    assert before <= by_token[7][3] <= after
    assert by_token[8][1:3] == (0, 0)
    quiet = net.pair(p, token=9)
    quiet[0].close()
    quiet[1].close()
    assert take_ended(p, 1) == [9]  # (ended(): the tokens alone)
    assert wait_for(lambda: p.active == 0)


# -- bytes that are not HTTP on a gateway listener ---------------------------------------


@pytest.mark.parametrize("which", TWINS)
def test_bytes_not_http_on_a_gateway_get_their_400s_line(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay hands a connection whose first bytes are not HTTP (a TLS
    ClientHello's) to the L4 path, which a gateway listener answers 400:
    a line (it had none), as a head the parser refused has: DPE, no
    destination, the answer's bytes."""
    backend = Scripted([])
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    r, w = os.pipe()
    said: list[bytes] = []

    def talk(address: tuple[str, int]) -> tuple[int, int]:
        with socket.create_connection(address, 10) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            said.append(data)
            return s.getsockname()

    async def main() -> tuple[str, int]:
        async with gateway_worker(rules, http_routing="request", access_log_fd=w) as (
            _,
            _worker,
            address,
        ):
            await asyncio.get_running_loop().run_in_executor(None, talk, address)
            return address

    try:
        address = asyncio.run(main())
    finally:
        os.close(w)
        backend.close()
    lines = _read_lines(r)
    assert said[0].startswith(b"HTTP/1.1 400 ") and len(lines) == 1
    f = _fields(lines[0])
    assert (f["method"], f["path"], f["protocol"]) == ("-", "-", "-")
    assert (f["code"], f["flags"], f["details"]) == ("400", "DPE", "http1.codec_error")
    assert (f["received"], f["sent"]) == ("0", str(len(said[0])))
    assert (f["upstream"], f["cluster"], f["route"]) == ("-", "-", "-")
    assert f["downstream_local"] == f"127.0.0.1:{address[1]}"
    assert not backend.requests


# -- TCP ports through a real sidecar ----------------------------------------------------

# a TCP server: reads what a connection sends until it half-closes, answers
# "echo:" and that, closes
ECHO = r"""
import socket, sys, threading
s = socket.create_server(("", int(sys.argv[1])), backlog=64)
def serve(c):
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(b"echo:" + data)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# the client (uid 1000, captured by l4proxy-init): one connection to each
# address given, sending its bytes and half-closing; prints, per connection,
# its local port and what came back ("reset": a connection the sidecar
# closed with the bytes unread)
CLIENT = r"""
import json, socket, sys
out = []
for target in sys.argv[1:]:
    host, port, payload = target.split(",")
    c = socket.create_connection((host, int(port)), 5)
    port = c.getsockname()[1]
    data = b""
    try:
        c.sendall(bytes.fromhex(payload))
        c.shutdown(socket.SHUT_WR)
        while chunk := c.recv(65536):
            data += chunk
    except OSError:  # (ECONNRESET, ENOTCONN)
        data = None
    out.append([port, "reset" if data is None else data.hex()])
    c.close()
print(json.dumps(out))
"""
NOTHING = {"", "reset"}  # what a client the sidecar closed without an upstream gets

DB_VIP, DEAD_VIP, WEB_VIP = "198.19.0.20", "198.19.0.21", "198.19.0.22"


def _tcp_rules(db: str) -> list[str]:
    """db (TCP 5432, version v1, a VirtualService's tcp route to that
    subset), dead (TCP 5433 on the same pod: nothing listens), web (an
    HTTP port, 8080, served by the pod's TCP echo on 5432)."""
    return [
        service_entry("db", DB_VIP, 5432, [(db, {"version": "v1"})], "TCP", "tcp-db"),
        service_entry("dead", DEAD_VIP, 5433, [(db, {})], "TCP", "tcp-dead"),
        f"""apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: [{WEB_VIP}]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {db}, ports: {{http: 5432}}}}""",
        """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}""",
        """apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db.default.svc.cluster.local]
  tcp:
  - route:
    - destination: {host: db.default.svc.cluster.local, subset: v1}""",
    ]


def _wait_lines(path: Path, n: int, timeout: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        if data.count(b"\n") >= n or time.monotonic() >= deadline:
            return data.splitlines(keepends=True)
        time.sleep(0.05)


@pytest.fixture
def bare_mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    """A client pod's sidecar and the pods a test adds (no bootcamp)."""
    yield from client_mesh(pod_network)


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_connections_routed_at_l4_get_tcp_proxys_lines(
    bare_mesh: Mesh, impl: str, tmp_path: Path
) -> None:
    """Through a real sidecar (--http-routing request) of each
    implementation (its pump and relay twins): a TCP port's connection,
    one whose every connect failed, one to a destination no rule names,
    bytes that are not HTTP on an HTTP port, and an inbound connection
    each get one line when they end, as Envoy's tcp_proxy writes it: the
    bytes each way, the cluster (its subset's), the endpoint."""
    mesh = bare_mesh
    db = mesh.net.add_pod("db", labels={"app": "db", "version": "v1"})
    mesh.procs.append(db.popen([PYTHON, "-c", ECHO, "5432"], user=1000))
    db.wait_listening(5432)
    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.write_rules(*_tcp_rules(db.ipv4))
    log_path = tmp_path / "access.log"
    mesh.start_client(run_args=(*args, "--http-routing", "request", "--access-log", str(log_path)))
    assert mesh.client is not None
    mesh.procs.append(mesh.client.popen([PYTHON, "-c", ECHO, "9000"], user=1000))
    mesh.client.wait_listening(9000)
    not_http = b"\x16\x03\x01\x00\x05hello"
    targets = [
        (DB_VIP, 5432, b"hello"),
        (DEAD_VIP, 5433, b"lost"),
        (db.ipv4, 5432, b"passing"),
        (WEB_VIP, 8080, not_http),
    ]
    argv = [PYTHON, "-c", CLIENT, *(f"{h},{p},{b.hex()}" for h, p, b in targets)]
    done = mesh.client.run(argv, user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr + mesh.sidecar_log(3000)
    out = json.loads(done.stdout)
    said = [r[1] for r in out]
    assert said[1] in NOTHING  # (no upstream: the sidecar closed it)
    assert [bytes.fromhex(said[i]) for i in (0, 2, 3)] == [
        b"echo:hello",
        b"echo:passing",
        b"echo:" + not_http,
    ]
    inbound = f"{mesh.client.ipv4},9000,{b'hi'.hex()}"  # (from the db pod: inbound)
    done = db.run([PYTHON, "-c", CLIENT, inbound], user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    ((db_port, answer),) = json.loads(done.stdout)
    assert bytes.fromhex(answer) == b"echo:hi"
    lines = _wait_lines(log_path, 5)
    assert len(lines) == 5, lines
    by_port = {f["downstream_local"]: f for f in map(_fields, lines)}
    client = mesh.client.ipv4
    for (host, port, _), (local_port, _) in zip(targets, out, strict=True):
        f = by_port[f"{host}:{port}"]
        assert (f["method"], f["path"], f["protocol"], f["route"]) == ("-", "-", "-", "-")
        assert (f["code"], f["details"]) == ("0", "-")
        assert f["downstream_remote"] == f"{client}:{local_port}"
    ok = by_port[f"{DB_VIP}:5432"]
    assert (ok["flags"], ok["received"], ok["sent"]) == ("-", "5", "10")
    assert ok["cluster"] == "outbound|5432|v1|db.default.svc.cluster.local"
    assert ok["upstream"] == f"{db.ipv4}:5432"
    assert re.fullmatch(rf"{re.escape(client)}:\d+", ok["upstream_local"])
    failed = by_port[f"{DEAD_VIP}:5433"]
    assert (failed["flags"], failed["received"], failed["sent"]) == ("UF,URX", "0", "0")
    assert failed["cluster"] == "outbound|5433||dead.default.svc.cluster.local"
    assert (failed["upstream"], failed["upstream_local"]) == (f"{db.ipv4}:5433", "-")
    passed = by_port[f"{db.ipv4}:5432"]
    assert (passed["flags"], passed["cluster"]) == ("-", "PassthroughCluster")
    assert (passed["received"], passed["sent"], passed["upstream"]) == (
        "7",
        "12",
        f"{db.ipv4}:5432",
    )
    web = by_port[f"{WEB_VIP}:8080"]
    assert web["cluster"] == "outbound|8080||web.default.svc.cluster.local"
    assert (web["flags"], web["upstream"]) == ("-", f"{db.ipv4}:5432")
    assert (web["received"], web["sent"]) == (str(len(not_http)), str(5 + len(not_http)))
    into = by_port[f"{client}:9000"]  # (Istio's inbound cluster: the port, no subset, no host)
    assert (into["flags"], into["cluster"], into["upstream"]) == (
        "-",
        "inbound|9000||",
        f"{client}:9000",
    )
    assert (into["received"], into["sent"]) == ("2", "7")
    assert into["downstream_remote"] == f"{db.ipv4}:{db_port}"


@pytest.mark.netns
def test_registry_only_refuses_at_l4_into_the_blackhole(bare_mesh: Mesh, tmp_path: Path) -> None:
    """REGISTRY_ONLY closes a connection to a destination no rule names: its
    line is Istio's, cluster BlackHoleCluster, UH (a cluster of no
    endpoint), no bytes."""
    mesh = bare_mesh
    log_path = tmp_path / "access.log"
    mesh.start_client(
        run_args=(
            *("--http-routing", "request", "--outbound-policy", "REGISTRY_ONLY"),
            *("--access-log", str(log_path)),
        )
    )
    assert mesh.client is not None
    argv = [PYTHON, "-c", CLIENT, f"198.19.0.99,7000,{b'x'.hex()}"]
    done = mesh.client.run(argv, user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr + mesh.sidecar_log(3000)
    out = json.loads(done.stdout)
    assert out[0][1] in NOTHING
    lines = _wait_lines(log_path, 1)
    assert len(lines) == 1, lines
    f = _fields(lines[0])
    assert (f["code"], f["flags"], f["cluster"]) == ("0", "UH", "BlackHoleCluster")
    assert (f["received"], f["sent"], f["upstream"]) == ("0", "0", "-")
    assert f["downstream_local"] == "198.19.0.99:7000"


# a client that sends its bytes and holds the connection open
HOLD = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
c.sendall(b"held")
print("sent", flush=True)
time.sleep(60)
"""


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_connection_the_drain_closes_gets_its_line(
    bare_mesh: Mesh, impl: str, tmp_path: Path
) -> None:
    """A connection still open at SIGTERM, closed by the drain's deadline
    once the relay closed: its line is written (the relay's writer stays
    open for the pump's last ends) before the sidecar exits, and says what
    a request's line cut so says, ``DC
    downstream_local_disconnect(filter_chain_is_being_removed)`` (with
    its upstream's local address: it had one); before, it said nothing
    (``- -``), as a connection that ended on its own. Meanwhile a second
    connection overflowed tcp.maxConnections: UO."""
    mesh = bare_mesh
    db = mesh.net.add_pod("db", labels={"app": "db", "version": "v1"})
    mesh.procs.append(db.popen([PYTHON, "-c", ECHO, "5432"], user=1000))
    db.wait_listening(5432)
    env, args = IMPLS[impl]
    mesh.env.update(env)
    one = "  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}\n  subsets:"
    mesh.write_rules(*(r.replace("  subsets:", one) for r in _tcp_rules(db.ipv4)))
    log_path = tmp_path / "access.log"
    sidecar = mesh.start_client(
        run_args=(
            *(*args, "--http-routing", "request", "--access-log", str(log_path)),
            *("--drain-duration", "1"),
        )
    )
    assert mesh.client is not None
    holder = mesh.client.popen(
        [PYTHON, "-c", HOLD, DB_VIP, "5432"], user=1000, stdout=subprocess.PIPE
    )
    mesh.procs.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == b"sent\n"
    deadline = time.monotonic() + 10
    while sidecar.stat("l4proxy_bytes_upstream_total") < 4:  # (relayed: in the pump)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not log_path.read_bytes()  # (open: no line yet)
    done = mesh.client.run([PYTHON, "-c", CLIENT, f"{DB_VIP},5432,{b'x'.hex()}"], user=1000)
    assert json.loads(done.stdout)[0][1] in NOTHING
    over = _wait_lines(log_path, 1)
    assert len(over) == 1, over
    f = _fields(over[0])
    assert (f["flags"], f["received"], f["sent"], f["upstream"]) == ("UO", "0", "0", "-")
    assert f["cluster"] == "outbound|5432|v1|db.default.svc.cluster.local"
    assert sidecar.stop() == 0
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2, lines
    f = _fields(lines[1])
    assert (f["flags"], f["details"], f["received"], f["sent"]) == ("DC", al.DRAIN_CUT, "4", "0")
    assert f["cluster"] == "outbound|5432|v1|db.default.svc.cluster.local"
    assert f["upstream_local"].startswith(f"{mesh.client.ipv4}:"), f
    assert int(f["duration"]) >= 1000  # (the drain's deadline closed it)
