"""A request head a sidecar refuses before any route is asked, end to end:
a real sidecar in network namespaces (``--http-routing request``,
compiled and pure), the app (uid 1000) sending raw heads to the bootcamp
service's VIP: two Host lines, a Host with a space, a dot-segment, each
answered 400 and counted once in ``istio_requests_total`` as
``destination_service_name="unknown"``, every destination label
``unknown``, as Istio's stats name a request that took no route and no
cluster and whose Host was never read. They were counted under
``PassthroughCluster``, the name of traffic passed through to
destinations no rule names: these went nowhere. The gateway's are
tests/test_worker_gateway_local_answers.py's."""

from __future__ import annotations

import re

import pytest

from tests._hardening import wait_until
from tests.mesh import IMPLS, PYTHON, VIP, Mesh

pytestmark = pytest.mark.netns

# The app: each head on a connection of its own, the answer's status line
# printed (the 400, then the sidecar's close).
APP = """
import socket, sys
for head in (
    b"GET / HTTP/1.1\\r\\nHost: bootcamp\\r\\nHost: other\\r\\n\\r\\n",
    b"GET / HTTP/1.1\\r\\nHost: boot camp\\r\\n\\r\\n",
    b"GET /a/../b HTTP/1.1\\r\\nHost: bootcamp\\r\\n\\r\\n",
):
    s = socket.create_connection((sys.argv[1], 8080), timeout=5)
    s.sendall(head)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.split(b"\\r\\n", 1)[0].decode())
    s.close()
"""

ROW = re.compile(r"^istio_requests_total\{(?P<labels>[^}]*)\} (?P<n>\S+)$", re.M)


def _rows(mesh: Mesh, code: str) -> list[tuple[dict[str, str], float]]:
    """istio_requests_total's rows with this response_code: labels, count."""
    assert mesh.sidecar is not None
    out = []
    for m in ROW.finditer(mesh.sidecar.admin("/stats")):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("response_code") == code:
            out.append((labels, float(m["n"])))
    return out


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_head_refused_before_routing_is_labelled_unknown(mesh: Mesh, impl: str) -> None:
    mesh.start(impl, run_args=("--http-routing", "request"))
    assert mesh.client is not None
    out = mesh.client.run([PYTHON, "-c", APP, VIP], user=1000, timeout=30).stdout
    assert out.splitlines() == ["HTTP/1.1 400 Bad Request"] * 3, out
    assert wait_until(lambda: sum(n for _, n in _rows(mesh, "400")) >= 3)
    rows = _rows(mesh, "400")
    assert sum(n for _, n in rows) == 3, rows
    for labels, _ in rows:
        assert (
            labels["destination_service"],
            labels["destination_service_name"],
            labels["destination_version"],
            labels["destination_workload"],
        ) == ("unknown",) * 4, labels
