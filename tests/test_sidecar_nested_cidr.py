"""Nested CIDR VIP blocks on a real sidecar: an address in the blocks of
two ServiceEntries goes to the most specific block's service (Envoy's
longest prefix, as Istio's wildcard listener for CIDR ServiceEntries picks
it), whichever is listed first, and a reload that removes the inner block
hands its addresses to the outer one's service.

Observed on real sockets: the outer block's service is the v1 pods, the
inner's the v2 pods; which version answers at the VIP (inside both) says
which service the sidecar picked, in both --http-routing modes."""

from __future__ import annotations

import json
import time

import pytest

from tests.mesh import VIP, Mesh

pytestmark = pytest.mark.netns

OUTER = "198.19.0.0/16"
INNER = "198.19.0.0/24"  # (holds VIP, 198.19.0.10)
assert VIP.startswith("198.19.0.")


def block_entry(name: str, block: str, endpoints: list[tuple[str, dict[str, str]]]) -> str:
    return json.dumps(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": name},
            "spec": {
                "hosts": [f"{name}.example.com"],
                "addresses": [block],
                "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                "resolution": "STATIC",
                "endpoints": [{"address": a, "labels": labels} for a, labels in endpoints],
            },
        }
    )


@pytest.mark.parametrize("inner_first", [False, True], ids=["outer-first", "inner-first"])
@pytest.mark.parametrize("routing", ["connection", "request"])
def test_the_most_specific_block_takes_its_addresses_and_a_reload_follows(
    mesh: Mesh, routing: str, inner_first: bool
) -> None:
    v1 = [e for e in mesh.endpoints() if e[1].get("version") == "v1"]
    v2 = [e for e in mesh.endpoints() if e[1].get("version") == "v2"]
    outer, inner = block_entry("outer", OUTER, v1), block_entry("inner", INNER, v2)
    mesh.write_rules(*((inner, outer) if inner_first else (outer, inner)))
    mesh.start_client(run_args=["--http-routing", routing])
    versions, _, failures = mesh.split(n=10)
    assert not failures and versions == {"v2": 10}, (versions, failures)
    assert "lies inside 198.19.0.0/16" in mesh.sidecar_log()  # (the warning)
    before = mesh.sidecar.stat("l4proxy_reloads_total")
    mesh.write_rules(outer)
    deadline = time.monotonic() + 15
    while mesh.sidecar.stat("l4proxy_reloads_total") <= before:
        assert time.monotonic() < deadline, mesh.sidecar_log(3000)
        time.sleep(0.1)
    versions, _, failures = mesh.split(n=10)
    assert not failures and versions == {"v1": 10}, (versions, failures)
