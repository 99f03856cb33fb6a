"""Endpoints from DNS, end to end: a real DNS server (Debian's dnsmasq) in a pod
serves the per-version names, the client pod's resolv.conf points to it, and
the sidecar routes to the addresses they resolve to.

1. No rule: round robin over the *addresses* (three pods: exactly 2/3 v1),
   which shows each resolved address is an endpoint, not each name.
2. RouteRule all-v2: every request to the one v2 pod.
3. DNS change (dnsmasq's hosts file rewritten, SIGHUP): a second v2 pod joins
   bootcamp-v2's name, and traffic moves onto both v2 pods.
4. dnsmasq stops: lookups fail, /clusters and /stats say so, and the last good
   addresses keep serving.
5. A reload adds a name while dnsmasq is down: the reload's first lookup of it
   fails, and the rules go live all the same (a dead server never holds a
   reload for more than a query's timeout), the failure reported as any.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.demo.podnet import Pod, PodNetwork
from tests.mesh import L4PROXY_INIT, VIP, Mesh, route_rule

pytestmark = pytest.mark.netns

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
NAMES = {v: f"bootcamp-{v}.default.svc.cluster.local" for v in ("v1", "v2")}


def set_resolv_conf(pod: Pod, nameserver: str) -> None:
    """Give the pod its own /etc/resolv.conf (``ip netns exec`` bind-mounts
    /etc/netns/<ns>/resolv.conf like hosts; PodNetwork.close removes the dir)."""
    d = f"/etc/netns/{pod.netns}"
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "resolv.conf")
    with open(path, "w") as f:
        f.write(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    os.chmod(path, 0o644)


class Dnsmasq:
    """dnsmasq in a pod answering only from a hosts file we write (TTL 1 s)."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.dir = tempfile.mkdtemp(prefix="l4dns-")
        os.chmod(self.dir, 0o755)
        self.hosts = os.path.join(self.dir, "hosts")
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, records: dict[str, list[str]]) -> None:
        tmp = self.hosts + ".tmp"
        with open(tmp, "w") as f:
            for name, addrs in records.items():
                f.writelines(f"{a} {name}\n" for a in addrs)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.hosts)

    def start(self) -> None:
        self.proc = self.pod.popen(
            [
                DNSMASQ,
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                f"--listen-address={self.pod.ipv4}",
                "--bind-interfaces",
                "--local-ttl=1",
                "--user=root",
                f"--pid-file={self.dir}/pid",
                "--log-facility=-",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pod.wait_listening(53)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)  # dnsmasq rereads --addn-hosts files

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def dns_entry(extra: dict[str, str] | None = None) -> str:
    """The ServiceEntry of NAMES, and of *extra* (name -> version)."""
    names = {NAMES[v]: v for v in ("v1", "v2")} | (extra or {})
    doc = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "ServiceEntry",
        "metadata": {"name": "bootcamp"},
        "spec": {
            "hosts": ["bootcamp.default.svc.cluster.local"],
            "addresses": [VIP],
            "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
            "resolution": "DNS",
            "endpoints": [
                {"address": name, "labels": {"app": "bootcamp", "version": v}}
                for name, v in names.items()
            ],
        },
    }
    return json.dumps(doc)


@pytest.fixture
def mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    with Mesh(pod_network, env={"L4PROXY_DNS_MIN_TTL": "1"}) as m:
        m.start_backends()
        yield m


def _clusters(mesh: Mesh) -> dict[str, Any]:
    assert mesh.sidecar is not None
    clusters = json.loads(mesh.sidecar.admin("/clusters?format=json"))
    return {d["name"]: d for c in clusters for d in c.get("dns", [])}


def _wait(what: str, check: Callable[[], bool], mesh: Mesh, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{mesh.sidecar_log(5000)}")


def test_split_follows_rule_and_dns_change_moves_traffic(mesh: Mesh) -> None:
    if not os.path.exists(DNSMASQ):
        pytest.fail("dnsmasq is not installed: apt-get install dnsmasq-base (Makefile)")
    ip = {p.name: p.ipv4 for p in mesh.bootcamp}
    dns = Dnsmasq(mesh.net.add_pod("dns"))
    try:
        dns.write({NAMES["v1"]: [ip["bc-v1-0"], ip["bc-v1-1"]], NAMES["v2"]: [ip["bc-v2-0"]]})
        dns.start()
        mesh.write_rules(dns_entry(), name="registry.yaml")
        # The client pod's resolv.conf must exist before its sidecar starts.
        client = mesh.net.add_pod("client", labels={"app": "client"})
        set_resolv_conf(client, dns.pod.ipv4)
        _init_client(mesh, client)

        _wait(
            "both names resolved",
            lambda: (
                all(d["resolved"] for d in _clusters(mesh).values()) and len(_clusters(mesh)) == 2
            ),
            mesh,
        )
        got = _clusters(mesh)
        assert sorted(got[NAMES["v1"]]["addresses"]) == sorted([ip["bc-v1-0"], ip["bc-v1-1"]])
        assert got[NAMES["v2"]]["addresses"] == [ip["bc-v2-0"]]
        assert got[NAMES["v2"]]["ttl"] == 1

        # 1. No rule: round robin over the three resolved addresses.
        versions, pods, failures = mesh.split(n=30)
        assert not failures, mesh.sidecar_log()
        assert pods == {"bootcamp-v1-0": 10, "bootcamp-v1-1": 10, "bootcamp-v2-0": 10}

        # 2. The rule: all to v2.
        mesh.write_rules(route_rule({"v2": 100}))
        _wait("the rule", lambda: mesh.split(n=1)[0] == {"v2": 1}, mesh)
        versions, pods, failures = mesh.split(n=20)
        assert not failures and pods == {"bootcamp-v2-0": 20}

        # 3. A second v2 pod joins the name: traffic moves onto both.
        extra = mesh.net.add_pod("bc-v2-1", labels={"app": "bootcamp", "version": "v2"})
        mesh.serve_bootcamp(extra, "bootcamp-v2-1", "2")
        extra.wait_listening(8080)
        dns.write(
            {
                NAMES["v1"]: [ip["bc-v1-0"], ip["bc-v1-1"]],
                NAMES["v2"]: [ip["bc-v2-0"], extra.ipv4],
            }
        )
        dns.reload()
        _wait(
            "the DNS change",
            lambda: len(_clusters(mesh)[NAMES["v2"]]["addresses"]) == 2,
            mesh,
        )
        versions, pods, failures = mesh.split(n=20)
        assert not failures and pods == {"bootcamp-v2-0": 10, "bootcamp-v2-1": 10}

        # 4. The DNS server goes away: reported, and the last good addresses serve.
        dns.stop()
        _wait("a failed lookup", lambda: _clusters(mesh)[NAMES["v2"]]["last_error"], mesh)
        v2 = _clusters(mesh)[NAMES["v2"]]
        assert len(v2["addresses"]) == 2 and v2["failures"] >= 1
        assert mesh.sidecar is not None
        text = mesh.sidecar.admin("/clusters")
        assert f"::dns::{NAMES['v2']}::last_error::" in text
        assert mesh.sidecar.stat("l4proxy_dns_stale") >= 1
        stats = mesh.sidecar.admin("/stats")
        assert f'l4proxy_dns_lookups_total{{hostname="{NAMES["v2"]}",result="error"}}' in stats
        versions, pods, failures = mesh.split(n=10)
        assert not failures and versions == {"v2": 10}

        # 5. A reload adds a name while the server is down: it goes live all
        # the same, the new name's failed first lookup reported as any.
        generation = mesh.sidecar.stat("l4proxy_rules_generation")
        v3 = "bootcamp-v3.default.svc.cluster.local"
        mesh.write_rules(dns_entry({v3: "v3"}), name="registry.yaml")
        _wait(
            "the reload",
            lambda: (
                mesh.sidecar is not None
                and mesh.sidecar.stat("l4proxy_rules_generation") > generation
            ),
            mesh,
        )
        new = _clusters(mesh)[v3]
        assert not new["resolved"] and new["last_error"] and new["lookups"] >= 1, new
        versions, pods, failures = mesh.split(n=10)
        assert not failures and versions == {"v2": 10}
    finally:
        dns.close()


def _init_client(mesh: Mesh, client: Pod) -> None:
    """Mesh.start_client's steps for a pod that already exists."""
    subprocess.run(
        [L4PROXY_INIT, "--netns", client.netns, "-p", "15001", "-u", "1337"],
        check=True,
        capture_output=True,
        env=mesh.env,
    )
    mesh.client = client
    mesh.sidecar = mesh.start_sidecar(client)
