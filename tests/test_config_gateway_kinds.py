"""The Gateway API's kinds besides HTTPRoute and Gateway in a rule file: a
GatewayClass (a quickstart manifest holds one beside its Gateway and
routes) is skipped with a note; the others are errors naming the kinds
l4proxy reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from l4proxy.rules import ConfigError, load_rules
from tests.test_config_gateway_api import GW, HR, MESH, PER_VERSION, write

GATEWAY_CLASS = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: eg}
spec:
  controllerName: gateway.envoyproxy.io/gatewayclass-controller
---
"""


def test_a_gateway_class_is_skipped_with_a_note(tmp_path: Path) -> None:
    text = (
        GATEWAY_CLASS
        + HR
        + MESH
        + "  rules:\n  - backendRefs: [{name: bootcamp-v1, port: 8080}]\n"
        + GW
    )
    result = load_rules([write(tmp_path, text), PER_VERSION])
    notes = [str(d) for d in result.notes]
    assert any(
        n.startswith(f"{tmp_path}/rules.yaml:1: note: GatewayClass eg: skipped (l4proxy serves")
        for n in notes
    ), notes
    skipped = [(s.kind, s.name) for s in result.documents if s.skipped]
    assert skipped == [("GatewayClass", "eg")]


@pytest.mark.parametrize("kind", ["TCPRoute", "GRPCRoute", "BackendTLSPolicy"])
def test_another_kind_is_an_error_naming_what_is_read(tmp_path: Path, kind: str) -> None:
    text = f"apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: x}}\n"
    with pytest.raises(ConfigError) as info:
        load_rules([write(tmp_path, text), PER_VERSION])
    (err,) = [str(e) for e in info.value.errors]
    assert err.endswith(
        f"kind {kind} (gateway.networking.k8s.io/v1) is not implemented by l4proxy; of the "
        "Gateway API it reads HTTPRoute and Gateway (GatewayClass: skipped)"
    ), err
