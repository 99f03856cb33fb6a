"""``l4proxy canary --gateway-api``: Flagger's Gateway API provider. The
canary's document is an HTTPRoute whose backendRefs are the stable and
canary Services (one Service per version), and its samples select what the
sidecars report for each backend, as the registry resolves it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from dataclasses import replace

import pytest
import yaml

from l4proxy.canary._analysis import (
    Conflict,
    GatewayRoute,
    HeaderMatch,
    Policy,
    Rollout,
    resume,
)
from l4proxy.canary._metrics import marks_query, totals_of
from l4proxy.canary.command import (
    backend_targets,
    canary_owns,
    competing,
    document,
    documents_text,
    splice_documents,
)
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.routing import Request, RouteTable
from tests.conftest import serving
from tests.test_canary_core import unstamped

DATA = os.path.join(os.path.dirname(__file__), "data", "gateway-api")
PER_VERSION = os.path.join(DATA, "registry-per-version.yaml")
DNS = os.path.join(DATA, "registry-dns.yaml")
HOST = "bootcamp.default.svc.cluster.local"
GW = GatewayRoute(8080)
R = Rollout(
    "bootcamp", "bootcamp-v1", "bootcamp-v2", weight=25, step=1, steps=(5, 25, 100), gateway=GW
)
AB = replace(
    R,
    weight=0,
    step=0,
    steps=(0, 0),
    match=(HeaderMatch("x-canary", "exact", "insider"), HeaderMatch("cookie", "regex", ".*c=1.*")),
)
P = Policy(steps=(5, 25, 100), interval=1, threshold=2)


def _table(tmp_path: pathlib.Path, r: Rollout, registry: str = PER_VERSION) -> RouteTable:
    shutil.copy(registry, tmp_path)
    (tmp_path / "canary-bootcamp.yaml").write_text(documents_text(r))
    return load_rules([str(tmp_path)], namespace="default", domain="cluster.local").table


def _split(table: RouteTable, **headers: str) -> list[tuple[str, int]]:
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, Request(path="/", authority="bootcamp:8080", headers=headers))
    return [(ws.service.host.split(".")[0], ws.weight) for ws in rc.subsets if ws.weight]


# -- the document, through the real rules loader --------------------------------------
def test_the_document_is_an_http_route_on_the_service() -> None:
    doc = yaml.safe_load(document(R))
    assert (doc["apiVersion"], doc["kind"]) == ("gateway.networking.k8s.io/v1", "HTTPRoute")
    assert doc["metadata"]["name"] == "canary-bootcamp"
    assert doc["spec"]["parentRefs"] == [
        {"group": "", "kind": "Service", "name": "bootcamp", "port": 8080}
    ]
    with_gw = yaml.safe_load(document(replace(R, gateway=GatewayRoute(8080, ("gw",)))))
    assert with_gw["spec"]["parentRefs"][1] == {"name": "gw"}


@pytest.mark.parametrize(("weight", "split"), [(25, [75, 25]), (100, [0, 100])])
def test_requests_split_by_the_weights_backends(
    tmp_path: pathlib.Path, weight: int, split: list[int]
) -> None:
    table = _table(tmp_path, replace(R, weight=weight))
    expected = [(n, w) for n, w in zip(("bootcamp-v1", "bootcamp-v2"), split, strict=True) if w]
    assert _split(table) == expected


def test_the_mirror_filter_while_mirrored(tmp_path: pathlib.Path) -> None:
    mirrored = replace(R, weight=0, step=0, steps=(0, 100))
    svc_table = _table(tmp_path, mirrored)
    svc = svc_table.service(HOST)
    assert svc is not None
    rc = svc_table.choices(svc, 8080, Request(path="/", authority="bootcamp:8080"))
    assert [(ws.service.host, ws.weight) for ws in rc.subsets if ws.weight] == [
        ("bootcamp-v1.default.svc.cluster.local", 100)
    ]
    (m,) = rc.mirrors
    assert m.tag is not None and (m.tag.service, m.tag.version) == (
        "bootcamp-v2.default.svc.cluster.local",
        "v2",
    )
    live = _table(tmp_path, replace(mirrored, step=1, weight=100))
    rc = live.choices(svc, 8080, Request(path="/", authority="bootcamp:8080"))
    assert rc.mirrors == ()


def test_ab_matches_go_to_the_canary(tmp_path: pathlib.Path) -> None:
    table = _table(tmp_path, AB)
    assert _split(table, **{"x-canary": "insider"}) == [("bootcamp-v2", 100)]
    assert _split(table, cookie="a=b; c=1") == [("bootcamp-v2", 100)]
    assert _split(table, **{"x-canary": "other"}) == [("bootcamp-v1", 100)]
    assert _split(table) == [("bootcamp-v1", 100)]


USER_FILE = """\
# the user's rules: comments and layout are kept
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 198.18.0.99}]
"""


def _splice(text: str, r: Rollout) -> str:
    return splice_documents(
        text,
        [("canary-bootcamp", document(r))],
        lambda n: canary_owns("canary-bootcamp", n),
        "HTTPRoute",
    )


def test_a_rules_file_keeps_the_other_documents_bytes() -> None:
    once = _splice(USER_FILE, R)
    assert once == USER_FILE + "---\n" + document(R)
    promoted = replace(R, phase="promoted", weight=100, step=2)
    assert _splice(once, promoted) == USER_FILE + "---\n" + document(promoted)


def test_the_routerule_of_an_earlier_rollout_is_taken_out() -> None:
    """A rules file that holds the canary's RouteRule (a rollout run without
    --gateway-api before): writing the HTTPRoute removes it, else SERVICE
    would be routed by two APIs, which the loader refuses."""
    old = Rollout("bootcamp", "v1", "v2", phase="promoted", weight=100, steps=(100,))
    with_rule = USER_FILE + "---\n" + document(old)
    assert _splice(with_rule, R) == USER_FILE + "---\n" + document(R)


# -- competing() -------------------------------------------------------------------------
USER_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: bootcamp}}]
  rules:
  - {match}backendRefs: [{{name: bootcamp-v1, port: 8080}}]
"""
PINNED = "matches: [{headers: [{name: x-tester, value: v1}]}]\n    "


def test_a_users_http_route_without_a_match_competes(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "user.yaml"
    f.write_text(USER_ROUTE.format(name="bootcamp", match=""))
    found = competing([str(f)], "bootcamp", "ours.yaml", "canary-bootcamp", gateway_api=True)
    assert found == [f"{f}:1: HTTPRoute bootcamp routes every request of Service bootcamp"]


def test_a_users_http_route_with_a_match_keeps_its_requests(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "user.yaml"
    f.write_text(USER_ROUTE.format(name="bootcamp", match=PINNED))
    assert competing([str(f)], "bootcamp", "ours.yaml", "canary-bootcamp", gateway_api=True) == []
    # a RouteRule of ours: an HTTPRoute on the Service competes, match or not
    assert competing([str(f)], "bootcamp", "ours.yaml", "canary-bootcamp") != []


GATEWAY = os.path.join(os.path.dirname(__file__), "..", "deploy", "examples", "gateway-api")
ON_GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: bootcamp-gateway}}]
  rules:
  - {match}backendRefs: [{{name: bootcamp-v1, port: 8080}}]
"""


def test_a_users_catch_all_route_on_a_gateway_of_ours_competes(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "user.yaml"
    f.write_text(ON_GATEWAY.format(name="site", match=""))
    found = competing(
        [str(f)], "bootcamp", "ours.yaml", "canary-bootcamp", True, ("bootcamp-gateway",)
    )
    assert found == [f"{f}:1: HTTPRoute site routes every request of Gateway bootcamp-gateway"]


def test_a_users_route_on_a_gateway_with_a_match_or_not_ours_keeps_it(
    tmp_path: pathlib.Path,
) -> None:
    f = tmp_path / "user.yaml"
    f.write_text(ON_GATEWAY.format(name="site", match=PINNED))
    assert (
        competing([str(f)], "bootcamp", "o", "canary-bootcamp", True, ("bootcamp-gateway",)) == []
    )
    f.write_text(ON_GATEWAY.format(name="site", match=""))
    assert competing([str(f)], "bootcamp", "o", "canary-bootcamp", True, ("other-gateway",)) == []


CATCH_ALL = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: site{namespace}}}
spec:
  parentRefs: [{parent}]
  rules:
  - backendRefs: [{{name: bootcamp-v1, port: 8080}}]
"""


@pytest.mark.parametrize(
    ("parent", "namespace", "competes"),
    [
        ("{name: bootcamp-gateway}", "", True),
        ("{name: bootcamp-gateway, namespace: default}", "", True),
        # a Gateway of the same name in another namespace: another Gateway
        ("{name: bootcamp-gateway, namespace: shop}", "", False),
        ("{name: bootcamp-gateway}", "shop", False),
        # ours, from another namespace (where a listener admits it: All)
        ("{name: bootcamp-gateway, namespace: default}", "shop", True),
        # another group's kind of that name
        ("{group: example.com, kind: Gateway, name: bootcamp-gateway}", "", False),
        ('{group: "", kind: Service, name: bootcamp-gateway}', "", False),
        # one listener, or one port: ours has neither, it is on every listener
        ("{name: bootcamp-gateway, sectionName: http}", "", True),
        ("{name: bootcamp-gateway, port: 80}", "", True),
        # SERVICE's Service: ours is on port 8080
        ('{group: "", kind: Service, name: bootcamp}', "", True),
        ("{group: core, kind: Service, name: bootcamp, port: 8080}", "", True),
        ('{group: "", kind: Service, name: bootcamp, port: 9090}', "", False),
        ('{group: "", kind: Service, name: bootcamp, namespace: shop}', "", False),
        ('{group: "", kind: Service, name: bootcamp}', "shop", False),
        # a consumer route: shop's clients of our bootcamp, not the sidecars of ours
        ('{group: "", kind: Service, name: bootcamp, namespace: default}', "shop", False),
        # no group: a Gateway API kind named Service, which the loader refuses
        ("{kind: Service, name: bootcamp}", "", False),
    ],
    ids=[
        "gateway",
        "gateway-our-namespace",
        "gateway-of-another-namespace",
        "route-of-another-namespace",
        "ours-from-another-namespace",
        "another-group",
        "a-service-so-named",
        "section",
        "port",
        "service",
        "service-core-our-port",
        "service-another-port",
        "service-of-another-namespace",
        "route-and-service-of-another-namespace",
        "consumer-route",
        "service-without-group",
    ],
)
def test_competing_resolves_parent_refs_as_the_api(
    tmp_path: pathlib.Path, parent: str, namespace: str, competes: bool
) -> None:
    """A parentRef names a group, kind, namespace (the route's by default)
    and name, as the Gateway API resolves it: a catch-all route on a
    same-named Gateway of another namespace was refused as competing (it
    matched by name alone), as was one on another port of the Service."""
    f = tmp_path / "user.yaml"
    f.write_text(
        CATCH_ALL.format(parent=parent, namespace=f", namespace: {namespace}" if namespace else "")
    )
    found = competing(
        [str(f)], "bootcamp", "o", "canary-bootcamp", True, ("bootcamp-gateway",), port=8080
    )
    assert bool(found) == competes, found


SHOP = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bootcamp-gateway, namespace: shop}
spec:
  gatewayClassName: l4proxy
  listeners: [{name: http, port: 8081, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: site, namespace: shop}
spec:
  hosts: [site.shop.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 198.18.0.99}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: site, namespace: shop}
spec:
  parentRefs: [{name: bootcamp-gateway}]
  rules:
  - backendRefs: [{name: site, port: 8080}]
"""


def test_a_catch_all_route_on_a_same_named_gateway_elsewhere_lets_the_rollout_run(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Namespace shop has a Gateway named as ours and a catch-all route on
    it: the rollout on default's bootcamp-gateway was refused (exit 2,
    "routes every request of Gateway bootcamp-gateway"); it runs."""
    shutil.copy(os.path.join(GATEWAY, "gateway.yaml"), tmp_path)
    (tmp_path / "shop.yaml").write_text(SHOP)
    with _sidecar(tmp_path) as admin:
        code = _canary(
            tmp_path, *GATEWAY_API, "--gateway", "bootcamp-gateway", "--metrics", admin,
            "--steps", "100",
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    assert doc["spec"]["parentRefs"][1] == {"name": "bootcamp-gateway"}


def test_a_users_catch_all_route_on_the_gateway_is_refused_before_any_write(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(os.path.join(GATEWAY, "gateway.yaml"), tmp_path)
    (tmp_path / "user.yaml").write_text(ON_GATEWAY.format(name="site", match=""))
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *GATEWAY_API, "--gateway", "bootcamp-gateway", "--metrics", admin)
    assert code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'user.yaml'}:1: HTTPRoute site routes every request of Gateway" in err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()


# Our Gateway (default/bootcamp-gateway) with its listeners, a Service
# "site" in default and in shop, and the user's catch-all route "site" on it
ON_OUR_GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: bootcamp-gateway}}
spec:
  gatewayClassName: l4proxy
  listeners:
{listeners}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: site}}
spec:
  hosts: [site.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 198.18.0.98}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: site, namespace: shop}}
spec:
  hosts: [site.shop.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 198.18.0.99}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: site, namespace: {namespace}}}
spec:
  parentRefs: [{parents}]
  hostnames: [{hostnames}]
  rules:
  - backendRefs: [{{name: site, port: 8080}}]
"""
SAME = "  - {name: http, port: 80, protocol: HTTP}"
ALL = "  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}"
# internal admits default's routes alone (Same, the default), public any
MIXED = (
    "  - {name: internal, port: 80, protocol: HTTP}\n"
    "  - {name: public, port: 81, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}"
)
NAMED_HOST = "  - {name: http, port: 80, protocol: HTTP, hostname: bootcamp.example.com}"
SELECTOR = (
    "  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: "
    "{from: Selector, selector: {matchLabels: {team: shop}}}}}"
)
KINDS = "  - {{name: http, port: 80, protocol: HTTP, allowedRoutes: {{kinds: [{kinds}]{ns}}}}}"
OURS = "{name: bootcamp-gateway, namespace: default"
SITE = '{group: "", kind: Service, name: site}'  # the route's own namespace's


@pytest.mark.parametrize(
    ("listeners", "namespace", "parents", "hostnames", "competes"),
    [
        (SAME, "default", OURS + "}", "", True),
        # allowedRoutes.namespaces.from: Same by default, All admits any
        (SAME, "shop", OURS + "}", "", False),
        (ALL, "shop", OURS + "}", "", True),
        # attached to public alone, where ours is too (on every listener)
        (MIXED, "shop", OURS + "}", "", True),
        (MIXED, "shop", OURS + ", sectionName: internal}", "", False),
        (MIXED, "shop", OURS + ", sectionName: public}", "", True),
        (MIXED, "shop", OURS + ", port: 80}", "", False),
        (MIXED, "shop", OURS + ", port: 81}", "", True),
        # two parentRefs on one line, where a warning names the line alone
        # (of one parent, each with its own sectionName: the API's rule)
        (
            MIXED,
            "shop",
            OURS + ", sectionName: internal}, " + OURS + ", sectionName: other}",
            "",
            False,
        ),
        (
            MIXED,
            "shop",
            OURS + ", sectionName: internal}, " + OURS + ", sectionName: public}",
            "",
            True,
        ),
        # beside one that attaches (shop's own Service site): ours is told
        # apart on the line, where one warning of two refs read as attached
        (MIXED, "shop", OURS + ", sectionName: internal}, " + SITE, "", False),
        (MIXED, "shop", SITE + ", " + OURS + ", sectionName: internal}", "", False),
        (MIXED, "shop", SITE + ", " + OURS + ", sectionName: public}", "", True),
        # hostnames that meet the listener's, or none of them
        (NAMED_HOST, "default", OURS + "}", "bootcamp.example.com", True),
        (NAMED_HOST, "default", OURS + "}", "shop.example.com", False),
        # the loader refuses these Gateways (no rollout runs beside them),
        # and no file holds a namespace's labels: taken to attach
        (SELECTOR, "shop", OURS + "}", "", True),
        (KINDS.format(kinds="{kind: GRPCRoute}", ns=""), "default", OURS + "}", "", True),
        # HTTPRoute among the kinds: its routes attach, the other kind a note
        (
            KINDS.format(
                kinds="{kind: HTTPRoute}, {kind: GRPCRoute}", ns=", namespaces: {from: All}"
            ),
            "shop",
            OURS + "}",
            "",
            True,
        ),
    ],
    ids=[
        "same-namespace",
        "from-same",
        "from-all",
        "one-listener-admits",
        "section-of-same",
        "section-of-all",
        "port-of-same",
        "port-of-all",
        "flow-both-unattached",
        "flow-one-attached",
        "flow-ours-unattached-beside-a-service",
        "flow-a-service-beside-ours-unattached",
        "flow-a-service-beside-ours-attached",
        "hostname-meets",
        "hostname-meets-none",
        "selector",
        "kinds-without-http-route",
        "kinds-with-http-route",
    ],
)
def test_a_route_on_our_gateway_competes_where_the_loader_attaches_it(
    tmp_path: pathlib.Path,
    listeners: str,
    namespace: str,
    parents: str,
    hostnames: str,
    competes: bool,
) -> None:
    """A catch-all route of another namespace on our Gateway was taken as
    competing by its parentRef's name alone, where no listener admits it
    (allowedRoutes.namespaces.from: Same, the default) and the Gateway
    serves it nowhere: it competes where the loader attaches it."""
    f = tmp_path / "user.yaml"
    f.write_text(
        ON_OUR_GATEWAY.format(
            listeners=listeners, namespace=namespace, parents=parents, hostnames=hostnames
        )
    )
    found = competing(
        [str(f)], "bootcamp", "o", "canary-bootcamp", True, ("bootcamp-gateway",), port=8080
    )
    assert bool(found) == competes, found


def test_a_route_on_a_gateway_not_in_the_rules_is_taken_to_attach(tmp_path: pathlib.Path) -> None:
    """Without our Gateway in the files the loader warns of every route on
    it (UNATTACHED: unknown parent), ours too (a rollout is refused so):
    which listener would admit the route is not known, and it competes."""
    f = tmp_path / "user.yaml"
    text = ON_OUR_GATEWAY.format(listeners=SAME, namespace="shop", parents=OURS + "}", hostnames="")
    f.write_text(text.replace("metadata: {name: bootcamp-gateway}", "metadata: {name: other}"))
    found = competing(
        [str(f)], "bootcamp", "o", "canary-bootcamp", True, ("bootcamp-gateway",), port=8080
    )
    assert found == [f"{f}:25: HTTPRoute site routes every request of Gateway bootcamp-gateway"]


@pytest.mark.parametrize("listeners", [SELECTOR, KINDS.format(kinds="{kind: GRPCRoute}", ns="")])
def test_the_gateways_taken_to_attach_every_route_are_refused_by_the_loader(
    tmp_path: pathlib.Path, listeners: str
) -> None:
    """Where competing() cannot know a listener's verdict it takes a route
    to attach: only for a Gateway that the loader refuses, beside which
    no rollout runs."""
    f = tmp_path / "user.yaml"
    f.write_text(
        ON_OUR_GATEWAY.format(
            listeners=listeners, namespace="shop", parents=OURS + "}", hostnames=""
        )
    )
    with pytest.raises(ConfigError):
        load_rules([str(f)])


SHOP_ON_OURS = """apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: site, namespace: shop}
spec:
  hosts: [site.shop.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 198.18.0.99}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: site, namespace: shop}
spec:
  parentRefs: [{name: bootcamp-gateway, namespace: default}]
  rules:
  - backendRefs: [{name: site, port: 8080}]
"""


def test_a_route_of_another_namespace_on_our_gateway_lets_the_rollout_run(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Namespace shop has a catch-all route on our Gateway, whose one
    listener admits routes of its own namespace alone (allowedRoutes'
    default, Same): the Gateway does not serve it, and the rollout was
    refused (exit 2, "routes every request of Gateway bootcamp-gateway");
    it runs."""
    shutil.copy(os.path.join(GATEWAY, "gateway.yaml"), tmp_path)
    (tmp_path / "shop.yaml").write_text(SHOP_ON_OURS)
    with _sidecar(tmp_path) as admin:
        code = _canary(
            tmp_path, *GATEWAY_API, "--gateway", "bootcamp-gateway", "--metrics", admin,
            "--steps", "100",
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err


def test_ours_does_not_compete(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "canary-bootcamp.yaml"
    f.write_text(document(R))
    assert competing([str(f)], "bootcamp", str(f), "canary-bootcamp", gateway_api=True) == []


# -- state and resume -----------------------------------------------------------------
def test_the_state_holds_the_mode() -> None:
    r = replace(R, gateway=GatewayRoute(9090, ("gw",)))
    back = Rollout.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r and back.gateway == GatewayRoute(9090, ("gw",))
    assert Rollout.from_json({**r.to_json(), "gateway": None}).gateway is None


def test_a_resume_in_the_other_mode_is_refused() -> None:
    with pytest.raises(Conflict, match="--gateway-api"):
        resume(P, "bootcamp", "bootcamp-v1", "bootcamp-v2", R, 1.0)
    routerule = replace(R, gateway=None)
    with pytest.raises(Conflict, match="without --gateway-api"):
        resume(P, "bootcamp", "bootcamp-v1", "bootcamp-v2", routerule, 1.0, gateway=GW)


@pytest.mark.parametrize(
    "gateway", [GatewayRoute(9090), GatewayRoute(8080, ("gw",))], ids=["port", "gateway"]
)
def test_a_resume_with_another_port_or_gateway_is_refused(gateway: GatewayRoute) -> None:
    with pytest.raises(Conflict, match="with --port 8080: resume it with those"):
        resume(P, "bootcamp", "bootcamp-v1", "bootcamp-v2", R, 1.0, gateway=gateway)


def test_a_resume_with_the_same_port_and_gateways_goes_on() -> None:
    saved = replace(R, gateway=GatewayRoute(8080, ("a", "b")))
    ev = resume(P, "bootcamp", "bootcamp-v1", "bootcamp-v2", saved, 1.0, gateway=saved.gateway)
    assert (ev.kind, ev.rollout.weight, ev.rollout.gateway) == ("resume", 25, saved.gateway)


# -- metrics: what the sidecars report for each backend ---------------------------------
@pytest.mark.parametrize(
    ("registry", "targets"),
    [
        # a ServiceEntry per backend: its own name, its endpoints' version label
        (PER_VERSION, {"bootcamp-v1": ("bootcamp-v1", "v1"), "bootcamp-v2": ("bootcamp-v2", "v2")}),
        # DNS endpoints of bootcamp's ServiceEntry (deploy/kubernetes): bootcamp's name
        (DNS, {"bootcamp-v1": ("bootcamp", "v1"), "bootcamp-v2": ("bootcamp", "v2")}),
    ],
    ids=["per-version", "dns"],
)
def test_backend_targets(tmp_path: pathlib.Path, registry: str, targets: dict[str, str]) -> None:
    probe = replace(R, weight=50)
    table = _table(tmp_path, probe, registry)
    assert backend_targets(table, probe, "default", "cluster.local") == targets


BARE_GET = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: root}}
spec:
  parentRefs: [{{group: "", kind: Service, name: bootcamp, port: 8080}}]
  rules:
  - matches: [{match}]
    backendRefs: [{{name: bootcamp-v2, port: 8080}}, {{name: bootcamp-v1, port: 8080}}]
"""


@pytest.mark.parametrize(
    "match", ["{path: {type: Exact, value: /}}", "{method: GET}"], ids=["exact-root", "get"]
)
def test_backend_targets_are_ours_whatever_route_takes_a_bare_get(
    tmp_path: pathlib.Path, match: str
) -> None:
    """A user's route that matches ``GET /`` (its backends in the other
    order) ranks above our rule without a match: the targets are still our
    backends', not those of the route a probe request would take."""
    (tmp_path / "root.yaml").write_text(BARE_GET.format(match=match))
    probe = replace(R, weight=50)
    table = _table(tmp_path, probe)
    assert backend_targets(table, probe, "default", "cluster.local") == {
        "bootcamp-v1": ("bootcamp-v1", "v1"),
        "bootcamp-v2": ("bootcamp-v2", "v2"),
    }


def _stats(v1_5xx: float, v2_ok: float, v2_5xx: float = 0, gen: int = 1) -> str:
    """A sidecar's /stats for the per-version registry: each backend is
    reported under its own Service name (backend_targets)."""
    lab = 'reporter="source",destination_service_name="{s}",destination_version="{v}",'
    lab += 'response_code="{c}"'
    v2 = lab.format(s="bootcamp-v2", v="v2", c="200")
    return (
        "# TYPE istio_requests_total counter\n"
        f"istio_requests_total{{{lab.format(s='bootcamp-v1', v='v1', c='503')}}} {v1_5xx}\n"
        f"istio_requests_total{{{v2}}} {v2_ok}\n"
        f"istio_requests_total{{{lab.format(s='bootcamp-v2', v='v2', c='503')}}} {v2_5xx}\n"
        f'istio_request_duration_milliseconds_bucket{{{v2},le="10"}} {v2_ok + v2_5xx}\n'
        f'istio_request_duration_milliseconds_bucket{{{v2},le="+Inf"}} {v2_ok + v2_5xx}\n'
        f"l4proxy_rules_generation {gen}\n"
    )


def test_the_samples_select_the_canary_backends_series() -> None:
    from l4proxy.canary._metrics import parse_text

    values, _ = parse_text(_stats(999, 90, 10))
    t = totals_of(values, "bootcamp-v2", "v2")
    assert (t.requests, t.errors) == (100, 10)
    # what a RouteRule's selection would read here: nothing
    assert totals_of(values, "bootcamp", "bootcamp-v2").requests == 0


def test_the_marks_query_takes_the_backends_names() -> None:
    q = marks_query(("bootcamp", "bootcamp-v1", "bootcamp-v2"))
    assert 'destination_service_name=~"bootcamp|bootcamp\\\\-v1|bootcamp\\\\-v2"' in q


# -- the command ------------------------------------------------------------------------
@contextlib.contextmanager
def _sidecar(tmp_path: pathlib.Path) -> Iterator[str]:
    """A sidecar serving *tmp_path*: between two reads, v2 served its weight's
    share (all 200) of 100 requests, v1 the rest, every one a 503 (so that a
    sample of v1's, or of bootcamp's, fails); mirrored, v2 answered a copy
    of each of v1's, 200."""
    seen = [""]
    served = {"v1": 0, "v2": 0, "copies": 0}

    def reply(target: str) -> bytes | None:
        doc = tmp_path / "canary-bootcamp.yaml"
        text = doc.read_text() if doc.exists() else ""
        if text != seen[-1]:
            seen.append(text)
        rules = yaml.safe_load(text)["spec"]["rules"] if text else [{"backendRefs": []}]
        default = rules[-1]
        weight = {b["name"]: b["weight"] for b in default["backendRefs"]}
        served["v1"] += weight.get("bootcamp-v1", 0)
        served["v2"] += weight.get("bootcamp-v2", 0)
        if default.get("filters"):
            served["copies"] += weight.get("bootcamp-v1", 0)
        body = _stats(served["v1"], served["v2"], gen=len(seen))
        c = served["copies"]
        lab = 'reporter="source",destination_service_name="bootcamp-v2",'
        lab += 'destination_version="v2",response_code="200"'
        body += (
            "# TYPE l4proxy_mirror_requests_total counter\n"
            f"l4proxy_mirror_requests_total{{{lab}}} {c}\n"
            f'l4proxy_mirror_request_duration_milliseconds_bucket{{{lab},le="10"}} {c}\n'
            f'l4proxy_mirror_request_duration_milliseconds_bucket{{{lab},le="+Inf"}} {c}\n'
        )
        return body.encode()

    with serving(reply) as address:
        yield address


def _canary(tmp_path: pathlib.Path, *extra: str, registry: str = PER_VERSION) -> int:
    from l4proxy.cli import main

    shutil.copy(registry, tmp_path)
    argv = ["canary", "bootcamp", "--rules", str(tmp_path)]
    timing = ["--interval", "0.05", "--wait-live", "1", "--progress-deadline", "1", "--json"]
    return main([*argv, *timing, *extra])


GATEWAY_API = ["--gateway-api", "--stable", "bootcamp-v1", "--canary", "bootcamp-v2"]


def test_a_rollout_on_a_sidecar_promotes_the_canary_backend(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """v1 fails every request: only a sample of bootcamp-v2's own series
    passes, through a mirrored interval (the copies' family) and two steps."""
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *GATEWAY_API, "--metrics", admin, "--mirror", "--steps", "50,100")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    assert [(e["event"], e.get("mirror"), e["weight"]) for e in events if "check" in e] == [
        ("check", True, 50),
        ("check", None, 100),
        ("promoted", None, 100),
    ]
    assert events[0]["gateway_api"] == {"port": 8080, "gateways": []}
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    assert [(b["name"], b["weight"]) for b in doc["spec"]["rules"][0]["backendRefs"]] == [
        ("bootcamp-v1", 0),
        ("bootcamp-v2", 100),
    ]


def test_status_says_the_mode(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from l4proxy.canary.command import save_state
    from l4proxy.cli import main

    save_state(str(tmp_path / ".canary-bootcamp.state.json"), R)
    assert main(["canary", "status", "bootcamp", "--rules", str(tmp_path)]) == 0
    out = unstamped(capsys.readouterr().out)
    assert out.startswith("bootcamp: bootcamp-v1 -> bootcamp-v2 (HTTPRoute canary-bootcamp, port")


@pytest.mark.parametrize(
    ("extra", "registry", "message"),
    [
        (["--port", "8080"], PER_VERSION, "--port goes with --gateway-api"),
        (["--gateway", "gw"], PER_VERSION, "--gateway goes with --gateway-api"),
        ([*GATEWAY_API, "--port", "0"], PER_VERSION, "--port 0: not a port"),
        ([*GATEWAY_API, "--match", "uri=/x", "--iterations", "2"], PER_VERSION, "--match uri=/x"),
        (
            ["--gateway-api", "--stable", "Bootcamp_v1", "--canary", "bootcamp-v2"],
            PER_VERSION,
            "--stable 'Bootcamp_v1' is not a Service name",
        ),
        (
            ["--gateway-api", "--stable", "bootcamp-v1", "--canary", "bootcamp-v3"],
            PER_VERSION,
            "--canary bootcamp-v3: the backend resolves to no endpoint",
        ),
        (
            [*GATEWAY_API, "--gateway", "nosuch"],
            PER_VERSION,
            "l4proxy canary: --gateway nosuch: no such Gateway in the rules",
        ),
        (
            ["--gateway-api", "--stable", "v1", "--canary", "v2"],
            PER_VERSION,
            "l4proxy canary: --stable v1: no Service v1 in the rules (with --gateway-api, "
            "--stable and --canary name Services, e.g. bootcamp-v1)",
        ),
        (
            [*GATEWAY_API, "--port", "7777"],
            PER_VERSION,
            "l4proxy canary: --port 7777: not a port of bootcamp (",
        ),
    ],
    ids=[
        "port",
        "gateway",
        "port-0",
        "pseudo-header",
        "not-a-service",
        "unresolved",
        "no-such-gateway",
        "versions-for-services",
        "not-the-services-port",
    ],
)
def test_options_and_errors(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    registry: str,
    message: str,
) -> None:
    with _sidecar(tmp_path) as admin:
        if "--stable" not in extra:
            extra = [*extra, "--stable", "v1", "--canary", "v2"]
        code = _canary(tmp_path, *extra, "--metrics", admin, registry=registry)
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        (
            "[{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: m, protocol: HTTP}]",
            "has ports 8080, 9090: give --port PORT",
        ),
        (
            None,
            "no ServiceEntry for bootcamp.default.svc.cluster.local in the rules, so "
            "SERVICE's port is not known: give --port PORT",
        ),
    ],
    ids=["ambiguous", "none"],
)
def test_the_port_from_the_registry_or_an_error_naming_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], ports: str | None, message: str
) -> None:
    text = pathlib.Path(PER_VERSION).read_text()
    first, rest = text.split("---\n", 1)
    if ports is None:
        text = rest
    else:
        text = first.replace("[{number: 8080, name: http, protocol: HTTP}]", ports) + "---\n" + rest
    registry = tmp_path / "reg.yaml"
    registry.write_text(text)
    rules = tmp_path / "rules"
    rules.mkdir()
    with _sidecar(rules) as admin:
        code = _canary(rules, *GATEWAY_API, "--metrics", admin, registry=str(registry))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (rules / "canary-bootcamp.yaml").exists()


def test_a_users_route_on_the_service_is_refused_before_any_write(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "user.yaml").write_text(USER_ROUTE.format(name="bootcamp", match=""))
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *GATEWAY_API, "--metrics", admin)
    assert code == 2
    assert "HTTPRoute bootcamp routes every request of Service bootcamp" in capsys.readouterr().err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()


def test_a_resume_without_gateway_api_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.canary.command import save_state

    save_state(str(tmp_path / ".canary-bootcamp.state.json"), R)
    with _sidecar(tmp_path) as admin:
        code = _canary(
            tmp_path, "--stable", "bootcamp-v1", "--canary", "bootcamp-v2", "--metrics", admin
        )
    assert code == 2
    assert "through --gateway-api (an HTTPRoute): resume it that way" in capsys.readouterr().err
