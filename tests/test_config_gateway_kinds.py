"""The Gateway API's kinds besides HTTPRoute and Gateway in a rule file.

A ReferenceGrant permits HTTPRoutes of one namespace to name Services of
another as backendRefs (and mirror backends): without one in the Service's
namespace that names the route's namespace and the Service (or any
Service), the backend is RefNotPermitted and its share is answered 500,
whatever the registry holds, a warning even for a rule with no other
backend (a grant deleted must revoke: an error would keep the last good
rules and the grant in them). A GatewayClass (a
quickstart manifest holds one beside its Gateway and routes) is skipped
with a note; the other kinds are errors naming the kinds l4proxy reads."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.routing import Request, RouteTable
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
        "Gateway API it reads HTTPRoute, Gateway, ReferenceGrant (GatewayClass: skipped)"
    ), err


def test_a_backend_lb_policy_points_to_the_rule_s_session_persistence(tmp_path: Path) -> None:
    """BackendLBPolicy's sessionPersistence is what an HTTPRoute rule's
    sessionPersistence (GEP-1619) does here; the refusal says so."""
    text = (
        "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: BackendLBPolicy\n"
        "metadata: {name: lb}\nspec:\n  targetRefs: [{group: '', kind: Service, name: echo}]\n"
        "  sessionPersistence: {sessionName: foo, type: Cookie}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_rules([write(tmp_path, text), PER_VERSION])
    (err,) = info.value.errors
    assert err.line == 2
    assert err.message.endswith(
        "(GatewayClass: skipped); for sticky sessions give the HTTPRoute rule a "
        "sessionPersistence (GEP-1619, the same fields), which l4proxy supports"
    ), err


def _listener(extra: str) -> str:
    """GW with *extra* fields on its listener."""
    return GW.replace("protocol: HTTP}", f"protocol: HTTP, {extra}}}")


@pytest.mark.parametrize(
    ("text", "severity", "line", "message"),
    [
        (
            GW.replace("  listeners:", "  infrastructure:\n    labels: {team: a}\n  listeners:"),
            "note",
            8,
            "spec.infrastructure is not applied: l4proxy creates no infrastructure for a Gateway",
        ),
        (
            _listener("allowedRoutes: {kinds: [{kind: HTTPRoute}, {kind: GRPCRoute}]}"),
            "note",
            9,
            "route kind GRPCRoute is not served (l4proxy's gateway speaks HTTP/1.x and serves "
            "HTTPRoutes only); this listener's HTTPRoutes attach",
        ),
    ],
    ids=["infrastructure", "GRPCRoute beside HTTPRoute"],
)
def test_what_a_migration_brings_along_is_a_note(
    tmp_path: Path, text: str, severity: str, line: int, message: str
) -> None:
    """Each was an error that refused the Gateway; l4proxy has nothing to
    do with it, and says so."""
    result = load_rules([write(tmp_path, text), PER_VERSION])
    (said,) = [d for d in result.notes if message in d.message]
    assert (said.severity, said.line) == (severity, line), str(said)


def test_a_listener_that_admits_no_http_route_is_still_an_error(tmp_path: Path) -> None:
    f = write(tmp_path, _listener("allowedRoutes: {kinds: [{kind: GRPCRoute}]}"))
    with pytest.raises(ConfigError) as info:
        load_rules([f, PER_VERSION])
    (err,) = info.value.errors
    assert err.line == 9 and "route kind 'GRPCRoute' is not implemented by l4proxy" in str(err)


# the canary's Service in namespace "shop", beside default's bootcamp-v1
SHOP = """\
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: canary, namespace: shop}
spec:
  hosts: [canary.shop.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 198.18.0.21}
"""
# an HTTPRoute of default, its share split with shop's canary (on line 11)
SPLIT = (
    HR
    + MESH
    + """\
  rules:
  - backendRefs:
    - {name: bootcamp-v1, port: 8080}
    - {name: canary, namespace: shop, port: 8080}
"""
)


def grant(
    namespace: str = "shop",
    from_: str = "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}",
    to: str = '{group: "", kind: Service}',
    api: str = "v1beta1",
) -> str:
    return f"""\
---
apiVersion: gateway.networking.k8s.io/{api}
kind: ReferenceGrant
metadata: {{name: routes-from-default, namespace: {namespace}}}
spec:
  from:
  - {from_}
  to:
  - {to}
"""


def _shares(table: RouteTable) -> Counter[str]:
    svc = table.service("bootcamp.default.svc.cluster.local")
    assert svc is not None
    got: Counter[str] = Counter()
    for _ in range(400):
        d = table.decide(svc, 8080, Request())
        got[d.endpoints[0].address if d.endpoints else str(d.status)] += 1
    return got


@pytest.mark.parametrize(
    "granted",
    [
        pytest.param(grant(), id="any-service"),
        pytest.param(grant(to='{group: "", kind: Service, name: canary}'), id="that-service"),
        pytest.param(grant(api="v1alpha2"), id="v1alpha2"),
    ],
)
def test_a_grant_lets_a_route_split_with_another_namespace_s_service(
    tmp_path: Path, granted: str
) -> None:
    result = load_rules([write(tmp_path, SPLIT + SHOP + granted), PER_VERSION], seed=3)
    assert not [d for d in result.notes if d.severity == "warning"], result.notes
    shares = _shares(result.table)
    # bootcamp-v1's two endpoints, shop's canary: about 100, 100 and 200 of 400
    assert set(shares) == {"198.18.0.11", "198.18.0.12", "198.18.0.21"}, shares
    assert 140 <= shares["198.18.0.21"] <= 260, shares  # 200 ± 4 sd


@pytest.mark.parametrize(
    "granted",
    [
        pytest.param("", id="no-grant"),
        pytest.param(grant(namespace="default"), id="grant-in-the-route-s-namespace"),
        pytest.param(grant(to='{group: "", kind: Service, name: other}'), id="another-service"),
        pytest.param(
            grant(from_="{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: team}"),
            id="another-namespace-s-routes",
        ),
        pytest.param(
            grant(from_="{group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: default}"),
            id="another-kind-s",
        ),
        pytest.param(grant(to="{group: apps, kind: Deployment}"), id="another-target-kind"),
    ],
)
def test_without_a_grant_the_share_is_answered_500(tmp_path: Path, granted: str) -> None:
    """Even with the Service in the registry: the Gateway API's rule."""
    result = load_rules([write(tmp_path, SPLIT + SHOP + granted), PER_VERSION], seed=3)
    (warning,) = [d for d in result.notes if d.severity == "warning"]
    assert (warning.line, warning.message) == (
        11,
        "backendRef canary: Service shop/canary is in another namespace, and no "
        "ReferenceGrant in shop permits HTTPRoutes of default to refer to it "
        "(RefNotPermitted); its share (1 of 2) is answered 500 until one does",
    ), warning
    shares = _shares(result.table)
    assert set(shares) == {"198.18.0.11", "198.18.0.12", "500"}, shares
    assert 140 <= shares["500"] <= 260, shares


def test_a_mirror_in_another_namespace_needs_a_grant_too(tmp_path: Path) -> None:
    mirror = (
        HR
        + MESH
        + """\
  rules:
  - backendRefs: [{name: bootcamp-v1, port: 8080}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: canary, namespace: shop, port: 8080}}
"""
    )
    refused = load_rules([write(tmp_path, mirror + SHOP), PER_VERSION])
    (warning,) = [d for d in refused.notes if d.severity == "warning"]
    assert "mirror backendRef canary: Service shop/canary is in another namespace" in str(warning)
    assert warning.message.endswith("; nothing is mirrored to it"), warning
    granted = load_rules([write(tmp_path, mirror + SHOP + grant()), PER_VERSION])
    assert not [d for d in granted.notes if d.severity == "warning"], granted.notes
    tables = [
        r.table.to_json()["routes"]["bootcamp.default.svc.cluster.local"]
        for r in (refused, granted)
    ]
    (m_refused,) = tables[0][0]["mirrors"]
    (m_granted,) = tables[1][0]["mirrors"]
    assert "refused" in m_refused and "refused" not in m_granted


def test_a_grant_deleted_revokes_even_a_rule_s_only_backend(tmp_path: Path) -> None:
    """A rule whose one backend is another namespace's: with the grant it
    routes there; the grant deleted, the rules still load (an error would
    keep the last good ones, the grant's permission with them) and every
    request of the rule is answered 500."""
    only = HR + MESH + "  rules:\n  - backendRefs: [{name: canary, namespace: shop, port: 8080}]\n"
    granted = load_rules([write(tmp_path, only + SHOP + grant()), PER_VERSION], seed=3)
    assert set(_shares(granted.table)) == {"198.18.0.21"}
    revoked = load_rules([write(tmp_path, only + SHOP), PER_VERSION], seed=3)
    (warning,) = [d for d in revoked.notes if d.severity == "warning"]
    assert warning.line == 9 and "no ReferenceGrant in shop permits" in warning.message
    assert set(_shares(revoked.table)) == {"500"}


@pytest.mark.parametrize(
    ("spec", "message", "line"),
    [
        ("  to: [{group: '', kind: Service}]\n", "spec.from is required", 4),
        ("  from: []\n  to: [{group: '', kind: Service}]\n", "spec.from must not be empty", 5),
        (
            "  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: a}]\n"
            "  to:\n" + "  - {group: '', kind: Service}\n" * 17,
            "spec.to must have at most 16 entries, not 17",
            6,
        ),
        (
            "  from: [{kind: HTTPRoute, namespace: a}]\n  to: [{group: '', kind: Service}]\n",
            'spec.from[0].group is required ("" for Services)',
            5,
        ),
        (
            "  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute}]\n"
            "  to: [{group: '', kind: Service}]\n",
            "spec.from[0].namespace is required",
            5,
        ),
        (
            "  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: a}]\n"
            "  to: [{group: '', kind: Service, namespace: b}]\n",
            "unknown field spec.to[0].namespace",
            6,
        ),
        (
            "  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: a}]\n"
            "  to: [{group: '', kind: Service, name: Not_A_Name}]\n",
            "Not_A_Name",
            6,
        ),
    ],
)
def test_a_bad_grant_is_an_error_at_its_line(
    tmp_path: Path, spec: str, message: str, line: int
) -> None:
    text = (
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n"
        "metadata: {name: g, namespace: shop}\nspec:\n" + spec
    )
    with pytest.raises(ConfigError) as info:
        load_rules([write(tmp_path, text), PER_VERSION])
    errors = [str(e) for e in info.value.errors]
    assert any(f"rules.yaml:{line}:" in e and message in e for e in errors), errors


def test_validate_shows_the_share_a_grant_is_missing_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    for extra, shown in (("", True), (grant(), False)):
        rules = write(tmp_path, SPLIT + SHOP + extra)
        assert main(["validate", "-v", rules, PER_VERSION]) == 0
        out = capsys.readouterr().out
        line = "50%  canary.shop.svc.cluster.local port 8080: answered 500 (not permitted"
        assert (line in out) is shown, out
        assert ("1 ReferenceGrant" in out) is bool(extra), out


def test_validate_says_a_mirror_a_grant_is_missing_for_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "mirrors every request to canary.shop..." as if it did."""
    from l4proxy.cli import main

    mirror = (
        HR
        + MESH
        + "  rules:\n  - backendRefs: [{name: bootcamp-v1, port: 8080}]\n    filters:\n"
        + "    - type: RequestMirror\n"
        + "      requestMirror: {backendRef: {name: canary, namespace: shop, port: 8080}}\n"
    )
    for extra, refused in (("", True), (grant(), False)):
        assert main(["validate", "-v", write(tmp_path, mirror + SHOP + extra), PER_VERSION]) == 0
        out = capsys.readouterr().out
        said = [line.strip() for line in out.splitlines() if "mirror" in line]
        assert said == [
            "mirror to canary.shop.svc.cluster.local port 8080 refused (not permitted: no "
            "ReferenceGrant): nothing is mirrored"
            if refused
            else "mirrors every request to canary.shop.svc.cluster.local port 8080 subset "
            "default (all endpoints; fire and forget, Host -shadow)"
        ], out


def test_a_session_token_never_pins_a_request_to_a_backend_not_permitted(
    tmp_path: Path,
) -> None:
    """A client that names the refused Service's pod in its session cookie
    (a token is base64 of ip:port: anyone can write one) gets the other
    backend's pods or the refused share's 500, never that pod."""
    from l4proxy.dataplane.verdict import session_token

    sticky = SPLIT + "    sessionPersistence: {sessionName: s}\n"
    table = load_rules([write(tmp_path, sticky + SHOP), PER_VERSION], seed=3).table
    svc = table.service("bootcamp.default.svc.cluster.local")
    assert svc is not None
    token = session_token(("198.18.0.21", 8080))
    got: Counter[str] = Counter()
    for _ in range(200):
        d = table.decide(svc, 8080, Request(headers={"cookie": f's="{token}"'}))
        got[d.endpoints[0].address if d.endpoints else str(d.status)] += 1
    assert set(got) == {"198.18.0.11", "198.18.0.12", "500"}, got
    # with the grant, the same token pins every request to that pod
    table = load_rules([write(tmp_path, sticky + SHOP + grant()), PER_VERSION], seed=3).table
    svc = table.service("bootcamp.default.svc.cluster.local")
    assert svc is not None
    d = table.decide(svc, 8080, Request(headers={"cookie": f's="{token}"'}))
    assert [e.address for e in d.endpoints][:1] == ["198.18.0.21"]


def test_a_gateway_port_no_listen_serves_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Gateway's listener on port 80 and a gateway listening elsewhere (the
    test's ephemeral port; Istio's ingress Service maps 80 to the pod's
    8080): every request would be a 404 no route, said at the load. A
    sidecar (no gateway listener) says nothing of another pod's Gateway."""
    import asyncio
    import logging

    from l4proxy.dataplane.listener import bind_listener
    from l4proxy.rules.watch import RuleWatcher
    from l4proxy.sidecar.worker import Worker, WorkerOptions

    route = HR + "  parentRefs: [{name: gw}]\n  rules:\n"
    route += "  - backendRefs: [{name: bootcamp-v1, port: 8080}]\n"
    rules = write(tmp_path, route + GW)

    def warnings_of(mode: str) -> list[str]:
        caplog.clear()
        watcher = RuleWatcher([rules, PER_VERSION], interval=3600, settle=0)
        assert watcher.load_now()
        lst = bind_listener("127.0.0.1", 0, mode)

        async def main() -> None:
            with caplog.at_level(logging.WARNING):
                worker = Worker([lst], watcher, WorkerOptions())
                worker.close()

        try:
            asyncio.run(main())
        finally:
            lst.sock.close()
        return [r.getMessage() for r in caplog.records if "no --listen" in r.getMessage()]

    (said,) = warnings_of("gateway")
    assert "gateway ports no --listen serves (listening on " in said
    assert said.endswith(": port 80 (default/gw/http)"), said
    assert warnings_of("transparent") == []
