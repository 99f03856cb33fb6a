"""Istio's TCP metrics of connections no upstream took, through a real
sidecar of each implementation in network namespaces.

Istio's stats filter counts every TCP connection its listener takes: one
whose upstream never connected is reported at its close (opened and
closed at once, its bytes), with ``response_flags`` saying why, as its
access log line does (``UF,URX``: every connect failed; ``UH``: no
healthy upstream, ``BlackHoleCluster`` under REGISTRY_ONLY; ``UO``: a
circuit breaker's overflow). l4proxy counted only connections an upstream
took, so a TCP service whose pods all refused connections showed no
traffic at all in Istio's dashboards, rather than failed traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from l4proxy.demo.podnet import PodNetwork
from tests.mesh import IMPLS, PYTHON, Mesh, client_mesh, service_entry
from tests.test_access_log_tcp import CLIENT, DB_VIP, DEAD_VIP, ECHO, HOLD, NOTHING
from tests.test_istio_metrics import _series, exposition_errors

FAMILIES = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
)
DB_LABELS = {"app": "db", "version": "v1"}


@pytest.fixture
def mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    """A client pod's sidecar and the pods a test adds."""
    yield from client_mesh(pod_network)


def _rules(db: str) -> list[str]:
    """db (TCP 5432, its subset v1: the db pod, at most one connection),
    dead (TCP 5433 of a pod labelled dead v3 where nothing listens,
    routed to its subset v3, which one failed connect ejects)."""
    dead = {"app": "dead", "version": "v3"}
    return [
        service_entry("db", DB_VIP, 5432, [(db, DB_LABELS)], "TCP", "tcp-db"),
        service_entry("dead", DEAD_VIP, 5433, [(db, dead)], "TCP", "tcp-dead"),
        """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db.default.svc.cluster.local
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
  subsets:
  - {name: v1, labels: {version: v1}}""",
        """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: dead}
spec:
  host: dead.default.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}
  subsets:
  - {name: v3, labels: {version: v3}}""",
        *(
            f"""apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  tcp:
  - route:
    - destination: {{host: {name}.default.svc.cluster.local, subset: {subset}}}"""
            for name, subset in (("db", "v1"), ("dead", "v3"))
        ),
    ]


def _by_flags(text: str, family: str) -> dict[tuple[str, str], tuple[dict[str, str], float]]:
    rows = _series(text, family)
    keyed = {(r["destination_service_name"], r["response_flags"]): (r, n) for r, n in rows}
    assert len(keyed) == len(rows), rows
    return keyed


def _wait_stats(sidecar: object, closed: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        text: str = sidecar.admin("/stats")  # type: ignore[attr-defined]
        rows = _series(text, "istio_tcp_connections_closed_total")
        if sum(n for _, n in rows) >= closed or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_tcp_connections_no_upstream_took_are_counted_with_their_flags(
    mesh: Mesh, impl: str
) -> None:
    """Through a real sidecar of each implementation (its pump, its relay
    twin), the access log off: a connection held open on db (its
    tcp.maxConnections, 1, taken), then one more to db (UO), one to a
    port no one listens on (UF,URX: under the pod tried, dead-v3), which
    ejects that pod, and one more there (UH: none to try, under the
    subset's pods, as UO is) are each closed unanswered and counted
    opened and closed with no byte, under the labels a connection an
    upstream took has but their flags; the held one is opened, not
    closed, its flags ``-``."""
    db = mesh.net.add_pod("db", labels=DB_LABELS)
    mesh.procs.append(db.popen([PYTHON, "-c", ECHO, "5432"], user=1000))
    db.wait_listening(5432)
    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.write_rules(*_rules(db.ipv4))
    pod = ("--pod-labels", "app=client,version=v1", "--namespace", "default")
    sidecar = mesh.start_client(run_args=(*args, "--http-routing", "request", *pod))
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
    targets = [(DB_VIP, 5432), (DEAD_VIP, 5433), (DEAD_VIP, 5433)]
    argv = [PYTHON, "-c", CLIENT, *(f"{h},{p},{b'lost'.hex()}" for h, p in targets)]
    done = mesh.client.run(argv, user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr + mesh.sidecar_log(3000)
    assert all(r[1] in NOTHING for r in json.loads(done.stdout)), done.stdout
    text = _wait_stats(sidecar, 3)
    opened = _by_flags(text, "istio_tcp_connections_opened_total")
    assert sorted(opened) == [
        ("db", "-"),
        ("db", "UO"),
        ("dead", "UF,URX"),
        ("dead", "UH"),
    ]
    assert all(n == 1 for _, n in opened.values()), opened
    held, _ = opened[("db", "-")]
    assert opened[("db", "UO")][0] == {**held, "response_flags": "UO"}
    assert (held["destination_workload"], held["destination_app"]) == ("db-v1", "db")
    dead, _ = opened[("dead", "UF,URX")]
    assert (dead["destination_service"], dead["destination_version"]) == (
        "dead.default.svc.cluster.local",
        "v3",
    )
    assert (dead["destination_workload"], dead["destination_app"]) == ("dead-v3", "dead")
    ejected, _ = opened[("dead", "UH")]
    assert ejected == {**dead, "response_flags": "UH"}  # (its pods', as UO's are)
    for labels, _ in opened.values():
        assert (labels["request_protocol"], labels["source_workload"]) == ("tcp", "client-v1")
    refused = {("db", "UO"), ("dead", "UF,URX"), ("dead", "UH")}
    for family in FAMILIES[1:]:
        rows = _by_flags(text, family)
        assert sorted(rows) == sorted(refused), (family, rows)  # (the held one: at its end)
        for key, (labels, n) in rows.items():
            assert labels == opened[key][0]
            assert n == (1 if family.endswith("closed_total") else 0), (family, key, n)
    assert exposition_errors(text) == []


@pytest.mark.netns
def test_registry_only_counts_the_blackholes_connections(mesh: Mesh) -> None:
    """REGISTRY_ONLY closes a TCP connection to a destination no rule
    names: counted as Istio's BlackHoleCluster (a cluster of no endpoint:
    UH), every destination_* label but the name unknown."""
    pod = ("--pod-labels", "app=client,version=v1", "--namespace", "default")
    sidecar = mesh.start_client(
        run_args=(*("--http-routing", "request", "--outbound-policy", "REGISTRY_ONLY"), *pod)
    )
    assert mesh.client is not None
    argv = [PYTHON, "-c", CLIENT, f"198.19.0.99,7000,{b'x'.hex()}"]
    done = mesh.client.run(argv, user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr + mesh.sidecar_log(3000)
    assert json.loads(done.stdout)[0][1] in NOTHING
    text = _wait_stats(sidecar, 1)
    for family in FAMILIES:
        ((labels, n),) = _series(text, family)
        assert n == (0 if family.endswith("bytes_total") else 1), family
        assert (labels["destination_service_name"], labels["response_flags"]) == (
            "BlackHoleCluster",
            "UH",
        )
        assert labels["destination_service"] == "BlackHoleCluster"
        assert (labels["destination_workload"], labels["destination_cluster"]) == (
            "unknown",
            "unknown",
        )


# sets a process's RLIMIT_NOFILE soft limit: run as that process's user
# (prlimit(2) on another user's process needs CAP_SYS_RESOURCE, which root
# may lack in a container)
_PRLIMIT = """
import resource, sys
pid, soft = int(sys.argv[1]), int(sys.argv[2])
_, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
"""


def _set_nofile(pid: int, soft: int) -> None:
    with open(f"/proc/{pid}/status") as f:
        ids = {
            k: int(v.split()[0])
            for k, _, v in (ln.partition(":") for ln in f)
            if k in ("Uid", "Gid")
        }
    subprocess.run(
        [PYTHON, "-c", _PRLIMIT, str(pid), str(soft)],
        user=ids["Uid"],
        group=ids["Gid"],
        extra_groups=[],
        check=True,
        timeout=10,
    )


@contextlib.contextmanager
def _one_fd_left(pid: int) -> Iterator[None]:
    """*pid*'s RLIMIT_NOFILE lowered to one above its first free fd: the
    next accept takes that fd, a socket() after it fails (EMFILE); then
    restored."""
    with open(f"/proc/{pid}/limits") as f:
        soft = int(next(ln for ln in f if ln.startswith("Max open files")).split()[3])
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    first_free = next(i for i in range(len(fds) + 1) if i >= len(fds) or fds[i] != i)
    _set_nofile(pid, first_free + 1)
    try:
        yield
    finally:
        _set_nofile(pid, soft)


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_tcp_connection_with_no_fd_for_its_upstream_is_counted_om(mesh: Mesh, impl: str) -> None:
    """Through a real sidecar of each implementation (one worker, the log
    off): a connection to db and one to the db pod's own address
    (PassthroughCluster) relayed (their series ``-``), then the same two
    taken while the worker has a single fd left, so that each upstream's
    socket() fails (EMFILE): each closed unanswered, refused as fd_limit
    (its access log line says OM), and counted opened and closed at once
    with no byte under its relayed twin's labels but ``response_flags="OM"``,
    as an HTTP request's 503 OM is counted in istio_requests_total (before:
    not counted in istio_tcp_* at all)."""
    db = mesh.net.add_pod("db", labels=DB_LABELS)
    mesh.procs.append(db.popen([PYTHON, "-c", ECHO, "5432"], user=1000))
    db.wait_listening(5432)
    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.write_rules(*_rules(db.ipv4))
    pod = ("--pod-labels", "app=client,version=v1", "--namespace", "default")
    run_args = (*args, "--http-routing", "request", "--workers", "1", *pod)
    sidecar = mesh.start_client(run_args=run_args)
    assert mesh.client is not None
    targets = [f"{DB_VIP},5432,{b'one'.hex()}", f"{db.ipv4},5432,{b'one'.hex()}"]
    argv = [PYTHON, "-c", CLIENT, *targets]
    done = mesh.client.run(argv, user=1000, timeout=30)
    assert [r[1] for r in json.loads(done.stdout)] == [b"echo:one".hex()] * 2, done.stdout
    _wait_stats(sidecar, 2)
    (worker,) = sidecar.worker_pids()
    with _one_fd_left(worker):
        done = mesh.client.run(argv, user=1000, timeout=30, check=False)
    assert done.returncode == 0, done.stderr + mesh.sidecar_log(3000)
    assert all(r[1] in NOTHING for r in json.loads(done.stdout)), done.stdout
    text = _wait_stats(sidecar, 4)
    # one each: the accept after each, which found no fd with nothing
    # waiting, counts none (it counted one: 4)
    assert sidecar.stat('l4proxy_refused_total{reason="fd_limit"}') == 2
    names = ("db", "PassthroughCluster")
    for family in FAMILIES:
        rows = _by_flags(text, family)
        assert sorted(rows) == sorted((n, f) for n in names for f in ("-", "OM")), (family, rows)
        for name in names:
            relayed, n_relayed = rows[(name, "-")]
            om, n_om = rows[(name, "OM")]
            assert om == {**relayed, "response_flags": "OM"}
            if family.endswith("bytes_total"):
                assert (n_relayed > 0, n_om) == (True, 0), (family, rows)
            else:
                assert (n_relayed, n_om) == (1, 1), (family, rows)
    assert exposition_errors(text) == []
