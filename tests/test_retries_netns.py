"""A route's retry policy end to end: a real sidecar in network namespaces.

A service of two pods, one that resets every request once it read it
(tests/_hardening.py's RESETTER) and one that answers (HTTP_ECHO). A
VirtualService route with ``retries: {attempts: 2, retryOn: reset}`` and one
without, told apart by a header. Through the sidecar (``--http-routing
request``, compiled and pure), real curl as uid 1000 gets 200 for every
request of the retried route, whichever pod the round robin picks first, and
the sidecar's ``/stats`` counts each once as ``istio_requests_total
{response_code="200"}`` and the retries in ``l4proxy_upstream_rq_retry_total``;
the route without a policy gets the resetting pod's 502s. The relay-level
cases are tests/test_relay_retries.py's.
"""

from __future__ import annotations

import re

import pytest

from tests._hardening import HTTP_ECHO, RESETTER, wait_until
from tests.mesh import IMPLS, PYTHON, Mesh, service_entry

pytestmark = pytest.mark.netns

VIP = "198.19.0.43"
URL = f"http://{VIP}:8080/x"

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: flaky}
spec:
  hosts: [flaky]
  http:
  - name: plain
    match: [{headers: {x-plain: {exact: "yes"}}}]
    route: [{destination: {host: flaky}}]
  - name: retried
    retries: {attempts: 2, retryOn: reset}
    route: [{destination: {host: flaky}}]
"""


def _count(mesh: Mesh, code: str) -> int:
    """istio_requests_total of the flaky service with this response_code."""
    assert mesh.sidecar is not None
    total = 0.0
    for line in mesh.sidecar.admin("/stats").splitlines():
        if (
            line.startswith("istio_requests_total{")
            and f'response_code="{code}"' in line
            and 'destination_service_name="flaky"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _curl(mesh: Mesh, n: int, *extra: str) -> list[str]:
    """n requests to URL, each on its own connection: their status codes."""
    assert mesh.client is not None
    argv = ["curl", "-sS", "--max-time", "5", "-H", "Connection: close", *extra]
    argv += ["-w", "\\n@@ %{http_code}\\n", *([URL] * n)]
    out = mesh.client.run(argv, user=1000, check=False, timeout=60).stdout
    return re.findall(r"\n@@ (\d{3})\n", out)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_retried_route_gets_every_answer_and_counts_each_request_once(
    mesh: Mesh, impl: str
) -> None:
    bad = mesh.net.add_pod("bad", labels={"app": "flaky", "version": "v1"})
    good = mesh.net.add_pod("good", labels={"app": "flaky", "version": "v1"})
    mesh.procs.append(bad.popen([PYTHON, "-c", RESETTER, "8080"], user=1000))
    mesh.procs.append(good.popen([PYTHON, "-c", HTTP_ECHO, "8080"], user=1000))
    bad.wait_listening(8080)
    good.wait_listening(8080)
    endpoints = [(bad.ipv4, bad.labels), (good.ipv4, good.labels)]
    mesh.write_rules(service_entry("flaky", VIP, 8080, endpoints), name="flaky.yaml")
    mesh.start(impl, VIRTUAL_SERVICE, run_args=("--http-routing", "request"))
    assert mesh.sidecar is not None

    # Without a policy the resetting pod's request gets Envoy's 503 (round
    # robin: one request to each pod)
    plain = _curl(mesh, 2, "-H", "x-plain: yes")
    assert sorted(plain) == ["200", "503"], plain
    assert mesh.sidecar.stat("l4proxy_upstream_rq_retry_total") == 0

    # The retried route: every other request goes to the resetting pod first
    # (until outlier detection ejects it), and is retried on the other.
    n = 6
    assert _curl(mesh, n) == ["200"] * n
    assert wait_until(lambda: _count(mesh, "200") >= n + 1), mesh.sidecar.admin("/stats")
    assert _count(mesh, "200") == n + 1 and _count(mesh, "503") == 1
    assert mesh.sidecar.stat("l4proxy_upstream_rq_retry_total") >= 1
    assert mesh.sidecar.alive()
