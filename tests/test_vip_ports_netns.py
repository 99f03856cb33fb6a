"""Two ServiceEntries sharing one VIP address on different ports, end to
end: a real sidecar in network namespaces (l4proxy-init's REDIRECT, the
original destination read with SO_ORIGINAL_DST), compiled and pure, per
connection and per request. The app (uid 1000) calls 198.19.0.61:80 and
reaches service alpha's pod, 198.19.0.61:81 (HTTP) and :82 (TCP) service
beta's, as Istio's outbound listeners 198.19.0.61_80, _81 and _82 route
them. The load refuses only a clash on the same address and port; the
route table found a VIP by its address alone, so the service listed
second was unreachable through it (its ports passed through to the VIP
itself, where nothing listens). The lookups are tests/test_routing.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from l4proxy.demo.bootcamp import tally
from l4proxy.demo.podnet import PodNetwork
from tests._hardening import TCP_ECHO, exchange
from tests.mesh import IMPLS, PYTHON, ROUTING_MODES, Mesh, client_mesh

pytestmark = pytest.mark.netns

VIP = "198.19.0.61"


@pytest.fixture
def mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    yield from client_mesh(pod_network)


def _entry(name: str, ports: list[tuple[int, str, str, int]], pod_ip: str) -> str:
    """A ServiceEntry of *name* at VIP with *ports* (number, name,
    protocol, the pod's port), one endpoint at *pod_ip*."""
    return json.dumps(
        {
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "ServiceEntry",
            "metadata": {"name": name},
            "spec": {
                "hosts": [f"{name}.default.svc.cluster.local"],
                "addresses": [VIP],
                "ports": [
                    {"number": n, "name": pn, "protocol": proto} for n, pn, proto, _ in ports
                ],
                "resolution": "STATIC",
                "endpoints": [
                    {
                        "address": pod_ip,
                        "labels": {"app": name},
                        "ports": {pn: target for _, pn, _, target in ports},
                    }
                ],
            },
        }
    )


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_services_sharing_a_vip_on_different_ports_each_reach_their_pods(
    mesh: Mesh, impl: str, mode: str
) -> None:
    alpha = mesh.net.add_pod("alpha", labels={"app": "alpha"})
    beta = mesh.net.add_pod("beta", labels={"app": "beta"})
    mesh.serve_bootcamp(alpha, "alpha-0", "1")
    mesh.serve_bootcamp(beta, "beta-0", "2")
    mesh.procs.append(beta.popen([PYTHON, "-c", TCP_ECHO, "9000"], user=1000))
    alpha.wait_listening(8080)
    beta.wait_listening(8080)
    beta.wait_listening(9000)
    mesh.write_rules(
        _entry("alpha", [(80, "http-a", "HTTP", 8080)], alpha.ipv4),
        _entry("beta", [(81, "http-b", "HTTP", 8080), (82, "tcp-b", "TCP", 9000)], beta.ipv4),
        name="registry.yaml",
    )
    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.start_client(run_args=(*args, *ROUTING_MODES[mode]))
    assert mesh.client is not None

    for port, pod in ((80, "alpha-0"), (81, "beta-0")):
        lines = mesh.curl(f"http://{VIP}:{port}/", 3)
        _, pods = tally("\n".join(lines))
        assert dict(pods) == {pod: 3}, (port, lines, mesh.sidecar_log(3000))
        assert [ln for ln in lines if ln.isdigit()] == ["200"] * 3, (port, lines)

    r = exchange(mesh.client, VIP, 82, [("send", b"to beta"), ("shut", None)])
    assert r["data"] == b"to beta", (r, mesh.sidecar_log(3000))
