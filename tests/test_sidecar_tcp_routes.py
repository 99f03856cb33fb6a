"""A VirtualService's ``tcp`` routes through a real sidecar (l4proxy-init +
l4proxy run in a client pod, real curl): they serve TCP ports only.

bootcamp (v1 ×2, v2 ×1) has its HTTP port 8080 and a TCP port 9000 whose
target is the pods' 8080, so the same pods answer both. A VirtualService
of one tcp route, everything to v2: Istio's listener on an HTTP port is an
HTTP connection manager built from the http routes alone, so port 8080's
requests keep the default route, the round robin over every pod (the
sidecar sent them all to v2), while port 9000's connections take the tcp
route, all to v2.
"""

from __future__ import annotations

import pytest

from tests.mesh import IMPLS, VIP, Mesh

pytestmark = pytest.mark.netns

TCP_PORT = 9000


def _registry(mesh: Mesh) -> str:
    eps = "".join(
        f"  - {{address: {ip}, labels: {{app: bootcamp, version: {labels['version']}}}}}\n"
        for ip, labels in mesh.endpoints()
    )
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: bootcamp}}
spec:
  hosts: [bootcamp.default.svc.cluster.local]
  addresses: [{VIP}]
  ports:
  - {{number: 8080, name: http, protocol: HTTP}}
  - {{number: {TCP_PORT}, name: tcp-raw, protocol: TCP, targetPort: 8080}}
  resolution: STATIC
  endpoints:
{eps}"""


TCP_TO_V2 = """\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: bootcamp}
spec:
  host: bootcamp
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: bootcamp}
spec:
  hosts: [bootcamp]
  tcp:
  - route:
    - destination: {host: bootcamp, subset: v2}
"""


@pytest.mark.parametrize(
    ("impl", "routing"),
    [
        *(pytest.param(impl, "connection", id=impl) for impl in IMPLS),
        pytest.param("compiled-uvloop", "request", id="compiled-uvloop-request"),
    ],
)
def test_a_tcp_route_leaves_the_http_port_to_the_round_robin_and_routes_the_tcp_port(
    mesh: Mesh, impl: str, routing: str
) -> None:
    mesh.write_rules(_registry(mesh), name="registry.yaml")
    mesh.write_rules(TCP_TO_V2)
    env, args = IMPLS[impl]
    mesh.env.update(env)
    mesh.start_client(run_args=(*args, "--http-routing", routing))
    n = 30
    versions, pods, failures = mesh.split(f"http://{VIP}:8080/", n=n)
    assert not failures, failures
    # the default route: round robin over the three pods, exactly (it was v2 ×30)
    assert versions == {"v1": 20, "v2": 10}, versions
    assert set(pods.values()) == {10}, pods
    versions, _, failures = mesh.split(f"http://{VIP}:{TCP_PORT}/", n=n)
    assert not failures, failures
    assert versions == {"v2": n}, versions
    assert "this tcp route routes nothing" not in mesh.sidecar_log()  # (9000 is TCP)
