"""An HTTPRoute's attachment to a Gateway.

A parentRef that attaches to nothing (a Gateway not in the files, no
listener of its sectionName or port, none that admits the route's
namespace, none whose hostname meets the route's) is a warning at its line
and the route is not served through it: a Gateway edited to admit fewer
routes, or deleted, must revoke them at the next load, where an error kept
the last good rules serving them.

Rule files are loaded next to tests/data/gateway-api/registry-per-version.yaml
and WEB, a Service of namespace b (so that a route there has a backend of
its own namespace, needing no ReferenceGrant).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from l4proxy.rules import LoadResult, load_rules
from l4proxy.rules.routing import Request, RouteTable

DATA = os.path.join(os.path.dirname(__file__), "data", "gateway-api")
PER_VERSION = os.path.join(DATA, "registry-per-version.yaml")

WEB = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: web, namespace: b}
spec:
  hosts: [web.b.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 198.18.0.21}]
"""


def gateway(listener: str = "{name: http, port: 80, protocol: HTTP}") -> str:
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: l4proxy
  listeners:
  - {listener}
"""


def route(
    name: str = "web",
    ns: str = "b",
    parent: str = "{name: gw, namespace: default}",
    hostnames: str = "",
    backend: str = "{name: web, port: 8080}",
    meta: str = "",
    path: str = "/",
) -> str:
    """An HTTPRoute of one rule, PathPrefix *path* to *backend*."""
    hosts = f"  hostnames: {hostnames}\n" if hostnames else ""
    return f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}{meta}}}
spec:
  parentRefs: [{parent}]
{hosts}  rules:
  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]
    backendRefs: [{backend}]
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


def load(tmp_path: Path, *texts: str) -> LoadResult:
    files = [write(tmp_path, t, f"r{i}.yaml") for i, t in enumerate(texts)]
    return load_rules([*files, write(tmp_path, WEB, "web.yaml"), PER_VERSION], seed=1)


def served(table: RouteTable, host: str, path: str = "/") -> str:
    """The backend a request for *host* and *path* on port 80 goes to;
    "no route" where no listener's hostname takes it (the gateway's 404
    NR), else the route name of the gateway's answer."""
    hit = table.ingress(host, path, 80)
    if hit is None:
        return "no route"
    d = table.decide(hit[0], 80, Request(path=path, authority=host))
    return d.service.host.split(".", 1)[0] if d.endpoints else d.route


ALL = "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}"
SAME = "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}"

# (case, Gateway file, route file, message part, line in the route file)
NOT_ATTACHED = [
    (
        "a Gateway not in the files",
        "",
        route(parent="{name: nowhere, namespace: default}"),
        "unknown parent: no Gateway default/nowhere in these files (Gateways: none); this "
        "HTTPRoute is not served through it until one is loaded",
        6,
    ),
    (
        "no listener of the sectionName",
        gateway(ALL),
        route(parent="{name: gw, namespace: default, sectionName: https}"),
        "Gateway gw has no listener named https (listeners: http:80); this HTTPRoute is not "
        "served through it (NoMatchingParent)",
        6,
    ),
    (
        "no listener on the port",
        gateway(ALL),
        route(parent="{name: gw, namespace: default, port: 8080}"),
        "Gateway gw has no listener on port 8080 (listeners: http:80)",
        6,
    ),
    (
        "the namespace not admitted",
        gateway(SAME),
        route(),
        "this HTTPRoute attaches to no listener of Gateway gw: routes from namespace b are "
        "not allowed (allowedRoutes.namespaces.from: All admits them; NotAllowedByListeners); "
        "it is not served there",
        6,
    ),
    (
        "no hostname met",
        gateway(ALL.replace("protocol: HTTP,", "protocol: HTTP, hostname: a.example,")),
        route(hostnames="[b.example]"),
        "this HTTPRoute attaches to no listener of Gateway gw: its hostnames match none of "
        "the listeners' hostnames (NoMatchingListenerHostname); it is not served there",
        6,
    ),
    (
        "neither",
        gateway("{name: http, port: 80, protocol: HTTP, hostname: a.example}"),
        route(hostnames="[b.example]"),
        "routes from namespace b are not allowed (allowedRoutes.namespaces.from: All admits "
        "them; NotAllowedByListeners), and its hostnames match none of the listeners' "
        "hostnames (NoMatchingListenerHostname)",
        6,
    ),
]


@pytest.mark.parametrize(
    ("gw", "hr", "message", "line"),
    [c[1:] for c in NOT_ATTACHED],
    ids=[c[0] for c in NOT_ATTACHED],
)
def test_a_route_that_attaches_to_nothing_is_a_warning_and_not_served(
    tmp_path: Path, gw: str, hr: str, message: str, line: int
) -> None:
    """Each was a load error (the whole rule set refused); now the rules
    load, the warning is at the parentRef's line, and the route's hosts
    answer as if it were not there."""
    result = load(tmp_path, gw + hr)
    found = [d for d in result.notes if message in d.message]
    assert found, "\n".join(map(str, result.notes))
    assert (found[0].severity, found[0].line) == ("warning", line + gw.count("\n"))
    assert served(result.table, "b.example") == "no route"
    assert not [r for h, r in result.table.to_json()["routes"].items() if h.startswith("gw")]


def test_a_route_refused_by_namespace_alone_is_not_said_to_miss_a_hostname(
    tmp_path: Path,
) -> None:
    """The review's repro: a route of namespace b with hostnames, on a
    listener of any hostname that admits its own namespace only. It was
    said that "its hostnames match none of the listeners' hostnames";
    they match, and the namespace is why."""
    result = load(tmp_path, gateway() + route(hostnames="[a.example]"))
    (said,) = [d.message for d in result.notes if "attaches to no listener" in d.message]
    assert "routes from namespace b are not allowed" in said
    assert "hostnames" not in said


def test_one_parent_that_attaches_to_nothing_leaves_the_others(tmp_path: Path) -> None:
    """A route of two parents, one a Gateway not in the files: served
    through the other."""
    hr = route(parent="{name: gw, namespace: default}, {name: gone, namespace: default}")
    result = load(tmp_path, gateway(ALL) + hr)
    assert [d.severity for d in result.notes] == ["warning"]
    assert served(result.table, "b.example") == "web"


@pytest.mark.parametrize("revoke", ["from: Same", "the Gateway deleted"])
def test_a_gateway_changed_or_deleted_revokes_its_routes(tmp_path: Path, revoke: str) -> None:
    """A grant-like revocation: the route of namespace b is served while
    the listener admits every namespace; once it admits its own only (or
    the Gateway's file is gone) the rules still load, with a warning, and
    the route is no longer served (where a load error kept the old table,
    and the access just removed, serving)."""
    gw = tmp_path / "gateway.yaml"
    gw.write_text(gateway(ALL))
    hr = write(tmp_path, route(), "route.yaml")
    files = [str(gw), hr, write(tmp_path, WEB, "web.yaml"), PER_VERSION]
    before = load_rules(files, seed=1)
    assert (before.notes, served(before.table, "b.example")) == ([], "web")
    if revoke == "from: Same":
        gw.write_text(gateway(SAME))
    else:
        gw.unlink()
        files.remove(str(gw))
    after = load_rules(files, seed=1)
    assert [(d.severity, d.file, d.line) for d in after.notes] == [("warning", hr, 6)]
    assert served(after.table, "b.example") == "no route"
