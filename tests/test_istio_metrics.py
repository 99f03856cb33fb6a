"""Istio's standard metrics as Istio's dashboards, Kiali and Flagger read
them: the labels of ``istio_requests_total`` and
``istio_request_duration_milliseconds`` (who called, what was called, how),
the histogram's buckets (Envoy's defaults, 0.5 ms to an hour), and the
``istio_tcp_*`` families of connections relayed at L4.

A review found Istio's Grafana dashboards mostly empty: the request series
had seven labels (no ``source_*``, no namespaces, no canonical service, no
``request_protocol``), the buckets ended at 60 s and nothing counted TCP.
The pure parts are tested first; then a real ``l4proxy run`` (a supervisor
and its worker, each relay twin) is scraped over its admin port, and a real
sidecar in network namespaces (each implementation) relays TCP connections.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.demo.podnet import PodNetwork
from l4proxy.rules.routing import Labels
from l4proxy.sidecar import istio_metrics as im
from l4proxy.sidecar.worker import Worker, _SubsetTag
from l4proxy.stats import Counters, render_prometheus
from tests._worker import GATEWAY_SERVICE
from tests.conftest import serving
from tests.mesh import IMPLS, PYTHON, Mesh, client_mesh, service_entry
from tests.test_access_log_tcp import CLIENT, DB_VIP, ECHO, WEB_VIP
from tests.test_admin_endpoints import sidecar

HOST = "shop.default.svc.cluster.local"
# Envoy's default histogram buckets (source/common/stats/histogram_impl.cc),
# which Istio's request durations keep
ENVOY_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
ENVOY_BUCKETS += (300000, 600000, 1800000, 3600000)

# -- the pure parts ------------------------------------------------------------------


def test_the_duration_buckets_are_envoys_and_istios() -> None:
    assert im.DURATION_BUCKETS_MS == ENVOY_BUCKETS


def test_a_pods_source_labels_follow_istios_label_order() -> None:
    """app, version and the canonical service as Istio reads them: the
    app.kubernetes.io/ labels before app and version, the canonical-name
    and -revision labels before both; the workload as l4proxy names a
    destination's (APP-VERSION)."""
    plain = im.source_labels({"app": "cart", "version": "v3"}, "shop", "east")
    assert plain == {
        "reporter": "source",
        "source_workload": "cart-v3",
        "source_workload_namespace": "shop",
        "source_principal": "unknown",
        "source_app": "cart",
        "source_version": "v3",
        "source_canonical_service": "cart",
        "source_canonical_revision": "v3",
        "source_cluster": "east",
    }
    named = im.source_labels(
        {
            "app": "cart",
            "app.kubernetes.io/name": "cart-ui",
            "app.kubernetes.io/version": "1.4",
            "service.istio.io/canonical-name": "storefront",
            "service.istio.io/canonical-revision": "r7",
        },
        "shop",
    )
    assert (named["source_app"], named["source_version"]) == ("cart-ui", "1.4")
    assert (named["source_canonical_service"], named["source_canonical_revision"]) == (
        "storefront",
        "r7",
    )
    assert named["source_workload"] == "cart"  # (no version label)
    assert named["source_cluster"] == "Kubernetes"  # Istio's default
    bare = im.source_labels({}, "")
    assert {k for k, v in bare.items() if v != "unknown"} == {
        "reporter",
        "source_canonical_revision",
        "source_cluster",
    }
    assert bare["source_canonical_revision"] == "latest"  # Istio's default revision


def test_a_destinations_labels_say_what_its_host_and_pod_tell() -> None:
    """The namespace of a Kubernetes Service's host; unknown of a
    ServiceEntry's; a destination no pod is known of unknown throughout
    (its canonical revision Istio's 'latest', as in its PassthroughCluster
    rows)."""
    peer = im.peer_labels({"app": "web", "version": "v2", "pod-template-hash": "5d9f"})
    assert peer == Labels({"app": "web", "version": "v2"})  # (two pods of it: one tag)
    d = im.destination_labels(HOST, "shop", "v2", "web-v2", peer, "east")
    assert d == {
        "destination_service": HOST,
        "destination_service_name": "shop",
        "destination_service_namespace": "default",
        "destination_version": "v2",
        "destination_workload": "web-v2",
        "destination_workload_namespace": "default",
        "destination_principal": "unknown",
        "destination_app": "web",
        "destination_canonical_service": "web",
        "destination_canonical_revision": "v2",
        "destination_cluster": "east",
    }
    external = im.destination_labels("api.example.com", "api", "unknown", "api-unknown")
    assert external["destination_service_namespace"] == "unknown"
    assert external["destination_cluster"] == "unknown"
    assert external["destination_canonical_service"] == "api-unknown"  # Istio: the workload's
    nobody = im.destination_labels("unknown", "PassthroughCluster", "unknown", "unknown")
    assert {k for k, v in nobody.items() if v != "unknown"} == {
        "destination_service_name",
        "destination_canonical_revision",
    }
    assert nobody["destination_canonical_revision"] == "latest"


def test_a_rows_series_carry_the_sidecars_labels_and_its_pods() -> None:
    """Worker._add_rows: a compiled relay's row, labelled at the report by
    its tag (the pod labels it keeps) and the sidecar's own; its duration
    histogram in Envoy's buckets, +Inf its count; nothing per request but
    the row."""
    source = im.source_labels({"app": "cart", "version": "v3"}, "shop")
    peer = im.peer_labels({"app": "web", "service.istio.io/canonical-revision": "r2"})
    tag = _SubsetTag(HOST, "r", "v2", "v2", "web-v2", 8080, peer)
    c = Counters()
    slow = tuple(int(le == 300000) for le in ENVOY_BUCKETS)  # one request of 2 minutes
    Worker._add_rows(c, [], [(tag, 200, 1, 120.0, slow, 0)], source)
    snap = c.snapshot()
    ((labels, n),) = snap["istio_requests_total"].items()
    got = dict(labels)
    assert n == 1
    assert got["source_workload"] == "cart-v3" and got["source_workload_namespace"] == "shop"
    assert got["destination_app"] == "web" and got["destination_canonical_revision"] == "r2"
    assert (got["request_protocol"], got["response_code"]) == ("http", "200")
    buckets = {
        dict(k)["le"]: v for k, v in snap["istio_request_duration_milliseconds_bucket"].items()
    }
    assert list(buckets) == [*map(str, ENVOY_BUCKETS), "+Inf"]
    assert (buckets["60000"], buckets["300000"], buckets["+Inf"]) == (0, 1, 1)
    assert list(snap["istio_request_duration_milliseconds_sum"].values()) == [120000.0]


# -- the exposition --------------------------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def exposition_errors(text: str) -> list[str]:
    """What Prometheus' text format (0.0.4) refuses, or a reader of a
    histogram would: a sample of no family TYPE'd before it, a family's
    samples apart, a label set malformed or a label twice, a value not a
    number, a histogram's buckets not cumulative or +Inf not its count."""
    errors: list[str] = []
    typed: dict[str, str] = {}
    done: set[str] = set()
    current = None
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if name in typed:
                errors.append(f"{name} typed twice")
            typed[name] = kind
            if current is not None:
                done.add(current)
            current = name
            continue
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.fullmatch(line)
        if m is None:
            errors.append(f"not a sample: {line!r}")
            continue
        name, _, body, value = m.groups()
        family = name
        if typed.get(current or "") == "histogram":
            family = re.sub("_(bucket|sum|count)$", "", name)
        if family != current or family in done:
            errors.append(f"{name} outside its family's block")
        labels: list[tuple[str, str]] = []
        pos = 0
        while body and pos < len(body):
            lm = _LABEL.match(body, pos)
            if lm is None:
                errors.append(f"labels malformed: {line!r}")
                break
            labels.append((lm.group(1), lm.group(2)))
            pos = lm.end()
        if len({k for k, _ in labels}) != len(labels):
            errors.append(f"a label twice: {line!r}")
        try:
            v = float(value)
        except ValueError:
            errors.append(f"value not a number: {line!r}")
            continue
        rest = ",".join(f"{k}={v}" for k, v in sorted(labels) if k != "le")
        if name.endswith("_bucket"):
            le = dict(labels).get("le")
            if le is None:
                errors.append(f"a bucket without le: {line!r}")
                continue
            buckets.setdefault((family, rest), []).append((float(le), v))
        elif name.endswith("_count") and typed.get(family) == "histogram":
            counts[(family, rest)] = v
    for key, series in buckets.items():
        les = [le for le, _ in series]
        if les != sorted(les) or les[-1] != math.inf:
            errors.append(f"{key}: buckets out of order or no +Inf")
        if any(b < a for (_, a), (_, b) in itertools.pairwise(series)):
            errors.append(f"{key}: buckets not cumulative")
        if counts.get(key) != series[-1][1]:
            errors.append(f"{key}: +Inf is not _count")
    return errors


def test_the_exposition_check_finds_what_it_checks() -> None:
    """(The check itself: each refusal once.)"""
    good = render_prometheus(
        {
            "h_bucket": {(("a", "1"), ("le", "1")): 1, (("a", "1"), ("le", "+Inf")): 2},
            "h_sum": {(("a", "1"),): 3.0},
            "h_count": {(("a", "1"),): 2},
        },
        {"h": ("histogram", "H.")},
        {},
    )
    assert exposition_errors(good) == []
    assert exposition_errors(good.replace('h_count{a="1"} 2', 'h_count{a="1"} 3')) == [
        "('h', 'a=1'): +Inf is not _count"
    ]
    assert exposition_errors('# TYPE x counter\nx{a="1",a="2"} 1\n') == [
        'a label twice: \'x{a="1",a="2"} 1\''
    ]
    assert exposition_errors("y 1\n") == ["y outside its family's block"]


# -- a real l4proxy run, each relay twin ---------------------------------------------

# the pod behind the gateway, in a Service of namespace default, its labels
# as a Deployment's pods have them; an Ingress of that namespace for one host
POD_LABELS = (
    "{app: shop-web, version: v2, pod-template-hash: 5d9f, "
    "service.istio.io/canonical-name: storefront, "
    'service.istio.io/canonical-revision: "2024-05"}'
)


def _gateway_rules(port: int) -> str:
    endpoint = f"  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {POD_LABELS}}}"
    rules = GATEWAY_SERVICE % endpoint
    ingress = rules.index("kind: Ingress")
    return (
        rules[:ingress]
        + """kind: Ingress
metadata: {name: gateway, namespace: default}
spec:
  rules:
  - host: shop.example
    http:
      paths:
      - path: /
        pathType: Prefix
        backend: {service: {name: svc, port: {number: 8080}}}
"""
    )


def _get(address: str, host: str) -> bytes:
    h, p = address.rsplit(":", 1)
    with socket.create_connection((h, int(p)), 10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            body, value = line[len(name) + 1 :].rsplit("} ", 1)
            out.append(({m.group(1): m.group(2) for m in _LABEL.finditer(body)}, float(value)))
    return out


@pytest.fixture
def backend() -> Iterator[str]:
    with serving(lambda target: b"from the pod\n") as address:
        yield address


@pytest.mark.parametrize("twin", ["compiled", "pure"])
def test_a_gateways_requests_carry_istios_labels(
    tmp_path: Path, backend: str, twin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real l4proxy run (a supervisor and its worker) of each
    relay twin, at a gateway whose pod is edge-v9 of namespace edge in
    cluster east: a request the pod answered carries every label of
    Istio's (its pod's app, canonical service and revision, the Service's
    namespace) and response_flags "-"; one no route took is unknown
    throughout, its flags NR (its log line's, through the supervisor's
    sum); the durations are in Envoy's buckets; and the whole /stats is
    valid Prometheus text."""
    if twin == "pure":
        monkeypatch.setenv("L4PROXY_NO_EXTENSIONS", "1")
    port = int(backend.rsplit(":", 1)[1])
    flags = (
        *("--workers", "1", "--namespace", "edge", "--cluster-name", "east"),
        *("--pod-labels", "app=edge,version=v9"),
    )
    with sidecar(tmp_path, backend, *flags, rules=_gateway_rules(port)) as run:
        assert f"relay={twin}" in run.log()
        assert _get(run.listen, "shop.example").endswith(b"from the pod\n")
        assert _get(run.listen, "elsewhere.example").startswith(b"HTTP/1.1 404 ")
        deadline = time.monotonic() + 10
        while True:  # (the compiled relay hands its rows over each second)
            status, text = run.get("/stats")
            assert status == 200
            rows = _series(text, "istio_requests_total")
            if sum(n for _, n in rows) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    source = {
        "reporter": "source",
        "source_workload": "edge-v9",
        "source_workload_namespace": "edge",
        "source_principal": "unknown",
        "source_app": "edge",
        "source_version": "v9",
        "source_canonical_service": "edge",
        "source_canonical_revision": "v9",
        "source_cluster": "east",
    }
    how = {
        "request_protocol": "http",
        "grpc_response_status": "",
        "connection_security_policy": "unknown",
    }
    by_code = {labels["response_code"]: (labels, n) for labels, n in rows}
    assert sorted(by_code) == ["200", "404"]
    assert by_code["200"] == (
        {
            **source,
            "destination_service": "svc.default.svc.cluster.local",
            "destination_service_name": "svc",
            "destination_service_namespace": "default",
            "destination_version": "v2",
            "destination_workload": "shop-web-v2",
            "destination_workload_namespace": "default",
            "destination_principal": "unknown",
            "destination_app": "shop-web",
            "destination_canonical_service": "storefront",
            "destination_canonical_revision": "2024-05",
            "destination_cluster": "east",
            **how,
            "response_code": "200",
            "response_flags": "-",
        },
        1,
    )
    missed, n = by_code["404"]
    assert n == 1
    assert missed["response_flags"] == "NR"  # (no route: the access log's flag)
    assert {k: v for k, v in missed.items() if k.startswith("destination_")} == {
        **{k: "unknown" for k in by_code["200"][0] if k.startswith("destination_")},
        "destination_canonical_revision": "latest",
    }
    assert {k: missed[k] for k in source} == source
    les = [
        labels["le"]
        for labels, _ in _series(text, "istio_request_duration_milliseconds_bucket")
        if labels["response_code"] == "200"
    ]
    assert les == [*map(str, ENVOY_BUCKETS), "+Inf"]
    assert exposition_errors(text) == []


# -- TCP through a real sidecar ----------------------------------------------------------


@pytest.fixture
def tcp_mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    """A client pod's sidecar and the pods a test adds."""
    yield from client_mesh(pod_network)


DB_LABELS = {"app": "db", "version": "v1", "service.istio.io/canonical-revision": "r1"}


def _db_rules(db: str) -> list[str]:
    """db (TCP 5432: a VirtualService's tcp route to its subset v1), web
    (an HTTP port, 8080, that the db pod's TCP echo on 5432 serves)."""
    return [
        service_entry("db", DB_VIP, 5432, [(db, DB_LABELS)], "TCP", "tcp-db"),
        f"""apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: [{WEB_VIP}]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {db}, ports: {{http: 5432}}, labels: {{app: web}}}}""",
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


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_tcp_connections_are_counted_as_istios(tcp_mesh: Mesh, impl: str) -> None:
    """Through a real sidecar (--http-routing request) of each
    implementation: two connections to a TCP port, one to a destination
    no rule names and bytes that are not HTTP on an HTTP port are counted
    in istio_tcp_connections_opened_total and _closed_total, with their
    bytes each way at their end, under Istio's labels (request_protocol
    tcp; the pod that took them, PassthroughCluster); an inbound
    connection is not (what reaches the pod is its callers' to report)."""
    mesh = tcp_mesh
    db = mesh.net.add_pod("db", labels=DB_LABELS)
    mesh.procs.append(db.popen([PYTHON, "-c", ECHO, "5432"], user=1000))
    db.wait_listening(5432)
    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.write_rules(*_db_rules(db.ipv4))
    pod = ("--pod-labels", "app=client,version=v1", "--namespace", "default")
    sidecar_ = mesh.start_client(run_args=(*args, "--http-routing", "request", *pod))
    assert mesh.client is not None
    mesh.procs.append(mesh.client.popen([PYTHON, "-c", ECHO, "9000"], user=1000))
    mesh.client.wait_listening(9000)
    not_http = b"\x16\x03\x01\x00\x05hello"
    targets = [
        (DB_VIP, 5432, b"hello"),
        (DB_VIP, 5432, b"hello"),
        (db.ipv4, 5432, b"passing"),
        (WEB_VIP, 8080, not_http),
    ]
    argv = [PYTHON, "-c", CLIENT, *(f"{h},{p},{b.hex()}" for h, p, b in targets)]
    done = mesh.client.run(argv, user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr + mesh.sidecar_log(3000)
    assert [bytes.fromhex(r[1]) for r in json.loads(done.stdout)] == [
        b"echo:hello",
        b"echo:hello",
        b"echo:passing",
        b"echo:" + not_http,
    ]
    inbound = f"{mesh.client.ipv4},9000,{b'hi'.hex()}"  # (from the db pod: inbound)
    done = db.run([PYTHON, "-c", CLIENT, inbound], user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while True:  # (a connection's end is counted once the pump has reported it)
        text = sidecar_.admin("/stats")
        closed = _series(text, "istio_tcp_connections_closed_total")
        if sum(n for _, n in closed) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def by_name(family: str) -> dict[str, tuple[dict[str, str], float]]:
        rows = _series(text, family)
        named = {labels["destination_service_name"]: (labels, n) for labels, n in rows}
        assert len(named) == len(rows), rows
        return named

    opened = by_name("istio_tcp_connections_opened_total")
    assert sorted(opened) == ["PassthroughCluster", "db", "web"]
    source = {
        "reporter": "source",
        "source_workload": "client-v1",
        "source_workload_namespace": "default",
        "source_principal": "unknown",
        "source_app": "client",
        "source_version": "v1",
        "source_canonical_service": "client",
        "source_canonical_revision": "v1",
        "source_cluster": "Kubernetes",
    }
    assert opened["db"] == (
        {
            **source,
            "destination_service": "db.default.svc.cluster.local",
            "destination_service_name": "db",
            "destination_service_namespace": "default",
            "destination_version": "v1",
            "destination_workload": "db-v1",
            "destination_workload_namespace": "default",
            "destination_principal": "unknown",
            "destination_app": "db",
            "destination_canonical_service": "db",
            "destination_canonical_revision": "r1",
            "destination_cluster": "Kubernetes",
            "request_protocol": "tcp",
            "response_flags": "-",
            "connection_security_policy": "unknown",
        },
        2,
    )
    passed, n = opened["PassthroughCluster"]
    assert n == 1
    assert (passed["destination_workload"], passed["destination_cluster"]) == ("unknown", "unknown")
    assert (opened["web"][0]["destination_app"], opened["web"][1]) == ("web", 1)
    counts = {
        family: {name: n for name, (_, n) in by_name(family).items()}
        for family in (
            "istio_tcp_connections_closed_total",
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        )
    }
    assert counts == {
        "istio_tcp_connections_closed_total": {"db": 2, "PassthroughCluster": 1, "web": 1},
        "istio_tcp_received_bytes_total": {"db": 10, "PassthroughCluster": 7, "web": 10},
        "istio_tcp_sent_bytes_total": {"db": 20, "PassthroughCluster": 12, "web": 15},
    }
    for family in counts:  # (each connection's key is the one it was opened under)
        assert {name: labels for name, (labels, _) in by_name(family).items()} == {
            name: labels for name, (labels, _) in opened.items()
        }
    assert exposition_errors(text) == []


# -- the tutorial's gateway ----------------------------------------------------------


def test_the_tutorials_gateway_is_told_its_own_labels() -> None:
    """The gateway's pod is the source of the tutorial's requests: its
    labels reach it (the Downward API's file, --pod-labels-file), or every
    series it reports has source_app and source_workload unknown."""
    from tests.test_deploy import BOOTCAMP, kustomize

    objs = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(BOOTCAMP)}
    pod = objs[("Deployment", "l4proxy-gateway")]["spec"]["template"]["spec"]
    (gw,) = pod["containers"]
    path = gw["command"][gw["command"].index("--pod-labels-file") + 1]
    mounts = {m["name"]: m["mountPath"] for m in gw["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (name,) = [n for n, at in mounts.items() if path.startswith(at + "/")]
    items = volumes[name]["downwardAPI"]["items"]
    assert {"path": path.rsplit("/", 1)[1], "fieldRef": {"fieldPath": "metadata.labels"}} in items
