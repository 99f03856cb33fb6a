"""The route timeout end to end: a real sidecar in network namespaces.

A VirtualService gives one route of a slow service ``timeout: 0.3s`` and
leaves another without (and, once, two RouteRules with and without
``httpReqTimeout``); the backend (tests/_hardening.py's HTTP_ECHO) answers
``GET /sleep/2`` after 2 s. Through the sidecar (``--http-routing request``,
compiled and pure), real curl as uid 1000 gets 504 ``upstream request
timeout`` on the timed route well before the backend would have answered, the
sidecar's ``/stats`` counts exactly those requests as
``istio_requests_total{response_code="504"}``, and the untimed route still
waits. The relay-level cases (a reset once the response began, pooling,
outlier detection) are tests/test_relay_timeout.py's.
"""

from __future__ import annotations

import re
import time

import pytest

from tests._hardening import HTTP_ECHO, wait_until
from tests.mesh import IMPLS, PYTHON, Mesh, service_entry

pytestmark = pytest.mark.netns

SLOW_VIP = "198.19.0.42"
SLOW_URL = f"http://{SLOW_VIP}:8080/sleep/2"

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: slow}
spec:
  hosts: [slow]
  http:
  - name: timed
    match: [{headers: {x-timed: {exact: "yes"}}}]
    timeout: 0.3s
    route: [{destination: {host: slow}}]
  - name: untimed
    route: [{destination: {host: slow}}]
"""

# The same two routes as Istio 0.7's RouteRules (httpReqTimeout), the
# header-matched one first by precedence.
ROUTE_RULES = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: slow-timed}
spec:
  destination: {name: slow}
  precedence: 2
  match: {request: {headers: {x-timed: {exact: "yes"}}}}
  httpReqTimeout:
    simpleTimeout: {timeout: 300ms}
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: slow-untimed}
spec:
  destination: {name: slow}
  precedence: 1
"""


def _count_504(mesh: Mesh) -> int:
    """istio_requests_total of the slow service with response_code 504."""
    assert mesh.sidecar is not None
    total = 0.0
    for line in mesh.sidecar.admin("/stats").splitlines():
        if (
            line.startswith("istio_requests_total{")
            and 'response_code="504"' in line
            and 'destination_service_name="slow"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _curl(mesh: Mesh, n: int, *extra: str) -> list[tuple[str, float, str]]:
    """n requests to SLOW_URL, each on its own connection: (status, seconds,
    body) each, status "000" for a request curl gave up on."""
    assert mesh.client is not None
    argv = ["curl", "-sS", "-H", "Connection: close", *extra]
    argv += ["-w", "\\n@@ %{http_code} %{time_total}\\n", *([SLOW_URL] * n)]
    out = mesh.client.run(argv, user=1000, check=False, timeout=60).stdout
    got = re.findall(r"(.*?)\n?@@ (\d{3}) ([0-9.]+)\n", out, re.S)
    return [(code, float(secs), body) for body, code, secs in got]


@pytest.mark.parametrize(
    ("impl", "rules"),
    [
        *(pytest.param(impl, VIRTUAL_SERVICE, id=impl) for impl in IMPLS),
        pytest.param("compiled-uvloop", ROUTE_RULES, id="compiled-uvloop-routerule"),
    ],
)
def test_route_timeout_answers_504_and_counts_it(mesh: Mesh, impl: str, rules: str) -> None:
    slow = mesh.net.add_pod("slow", labels={"app": "slow", "version": "v1"})
    mesh.procs.append(slow.popen([PYTHON, "-c", HTTP_ECHO, "8080"], user=1000))
    slow.wait_listening(8080)
    mesh.write_rules(
        service_entry("slow", SLOW_VIP, 8080, [(slow.ipv4, slow.labels)]), name="slow.yaml"
    )
    mesh.start(impl, rules, run_args=("--http-routing", "request"))
    assert mesh.sidecar is not None and _count_504(mesh) == 0

    # The timed route: 504 with Envoy's body, before the backend's 2 s (0.3 s
    # plus up to the relay's 0.25 s tick; slack for a busy host), never early.
    n = 3
    got = _curl(mesh, n, "--max-time", "5", "-H", "x-timed: yes")
    assert [(code, body) for code, _, body in got] == [("504", "upstream request timeout")] * n
    assert all(0.3 <= secs < 1.8 for _, secs, _ in got), got
    # Counted once each, as a 504 of the slow service.
    assert wait_until(lambda: _count_504(mesh) >= n), mesh.sidecar.admin("/stats")
    assert _count_504(mesh) == n

    # The untimed route on the same backend still waits: curl gives up after
    # 1 s (000), the sidecar never answered 504; nothing more is counted 504.
    (untimed,) = _curl(mesh, 1, "--max-time", "1")
    assert untimed[0] == "000" and untimed[1] >= 0.95, untimed
    assert "upstream request timeout" not in untimed[2]
    time.sleep(0.6)  # past the timed route's deadline and a tick
    assert _count_504(mesh) == n
    assert mesh.sidecar.alive()
