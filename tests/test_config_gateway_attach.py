"""An HTTPRoute's attachment to a Gateway, and the order of routes that tie.

A parentRef that attaches to nothing (a Gateway not in the files, no
listener of its sectionName or port, none that admits the route's
namespace, none whose hostname meets the route's) is a warning at its line
and the route is not served through it: a Gateway edited to admit fewer
routes, or deleted, must revoke them at the next load, where an error kept
the last good rules serving them; where every parentRef of a route does,
its backends' findings follow, each a warning for when it attaches. Routes
whose matches tie go to the oldest by ``metadata.creationTimestamp``, then
by ``namespace/name``; a match that another route's identical one always
takes first is a warning.

Rule files are loaded next to tests/data/gateway-api/registry-per-version.yaml
and WEB, a Service of namespace b (so that a route there has a backend of
its own namespace, needing no ReferenceGrant).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from l4proxy.rules import UNATTACHED, ConfigError, LoadResult, RouteParentRef, load_rules
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
        "not allowed (its listener's allowedRoutes.namespaces.from is Same, namespace default "
        "alone: set allowedRoutes.namespaces.from: All to admit them; NotAllowedByListeners); "
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
        "routes from namespace b are not allowed (its listener's allowedRoutes.namespaces."
        "from is Same, namespace default alone: set allowedRoutes.namespaces.from: All to admit "
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


def test_each_unattached_warning_names_its_parent_ref(tmp_path: Path) -> None:
    """Three parentRefs on one line (a flow sequence), the first and last
    attaching to nothing: each warning names its route and index in
    spec.parentRefs, which the line (6 for all three) cannot tell."""
    hr = route(
        parent="{name: gone, namespace: default}, {name: gw, namespace: default, sectionName: "
        "http}, {name: gw, namespace: default, sectionName: https}"
    )
    result = load(tmp_path, gateway(ALL) + hr)
    warned = [(d.line, d.reason, d.parent_ref) for d in result.notes]
    line = 6 + gateway().count("\n")
    assert warned == [
        (line, UNATTACHED, RouteParentRef("b", "web", 0)),
        (line, UNATTACHED, RouteParentRef("b", "web", 2)),
    ]
    assert str(warned[1][2]) == "HTTPRoute b/web spec.parentRefs[2]"
    assert served(result.table, "b.example") == "web"


def test_a_route_attached_nowhere_says_so_before_its_backends(tmp_path: Path) -> None:
    """A route of namespace b that no listener admits (from: Same), with a
    backend that resolves to nothing beside web: the parentRef's warning
    comes first, where the backend's was found (and logged) before it."""
    hr = route(backend="{name: web, port: 8080}, {name: gone, port: 8080}")
    result = load(tmp_path, gateway(SAME) + hr)
    f = str(tmp_path / "r0.yaml")
    base = gateway().count("\n")
    said = [(d.severity, d.file, d.line, d.reason) for d in result.notes]
    assert said == [("warning", f, base + 6, UNATTACHED), ("warning", f, base + 9, None)]


def test_a_route_attached_nowhere_has_its_backends_checked_for_when_it_attaches(
    tmp_path: Path,
) -> None:
    """As above, and a rule whose one backend resolves to nothing (an
    error for a route that is served): the rules load, where the error
    refused them all for a route that serves nothing; each backend's
    finding is a warning saying it holds once the route attaches, the
    error's that it then refuses the rules."""
    hr = route(backend="{name: web, port: 8080}, {name: gone, port: 8080}")
    hr += "  - backendRefs: [{name: lost, port: 8080}]\n"
    result = load(tmp_path, gateway(SAME) + hr)
    found = [(d.severity, d.message) for d in result.notes if d.reason is None]
    assert found == [
        (
            "warning",
            "once this HTTPRoute attaches: backendRef gone resolves to nothing in these files "
            "(no ServiceEntry host or DNS endpoint named gone.b.svc.cluster.local); its share "
            "(1 of 2) is answered 500 until one is loaded",
        ),
        (
            "warning",
            "once this HTTPRoute attaches, an error that refuses the rules: backendRef lost "
            "resolves to nothing: no ServiceEntry host and no DNS endpoint of a ServiceEntry "
            "is named lost.b.svc.cluster.local (add one to the registry)",
        ),
    ]
    assert served(result.table, "b.example") == "no route"


def test_a_route_attached_somewhere_keeps_its_backends_findings(tmp_path: Path) -> None:
    """One parentRef attaches (from: All), one names a Gateway not in the
    files: the route is served, so its backends' findings are as ever,
    the rule whose one backend resolves to nothing an error."""
    hr = route(
        parent="{name: gw, namespace: default}, {name: gone, namespace: default}",
        backend="{name: lost, port: 8080}",
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path, gateway(ALL) + hr)
    (err,) = info.value.errors
    assert err.message.startswith("backendRef lost resolves to nothing: "), err.message


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


# -- precedence among routes that tie ----------------------------------------------


def _tie(zzz: str, aaa: str) -> str:
    """HTTPRoutes zzz (to bootcamp-v2) and aaa (to bootcamp-v1) of
    namespace default, both PathPrefix /api for c.example; *zzz* and
    *aaa* are their metadata's extra fields."""
    return (
        gateway()
        + route("zzz", "default", hostnames="[c.example]", meta=zzz, path="/api").replace(
            "{name: web, port: 8080}", "{name: bootcamp-v2, port: 8080}"
        )
        + route("aaa", "default", hostnames="[c.example]", meta=aaa, path="/api").replace(
            "{name: web, port: 8080}", "{name: bootcamp-v1, port: 8080}"
        )
    )


OLD = ', creationTimestamp: "2024-01-01T00:00:00Z"'
NEW = ', creationTimestamp: "2025-01-01T00:00:00Z"'


@pytest.mark.parametrize(
    ("zzz", "aaa", "winner"),
    [
        (OLD, NEW, "bootcamp-v2"),  # the review's repro (v/t08.yaml): zzz is older, and wins
        # unquoted, YAML reads a timestamp; an offset counts
        (
            ", creationTimestamp: 2024-01-01T02:00:00+03:00",
            ", creationTimestamp: 2024-01-01T00:00:00Z",
            "bootcamp-v2",
        ),
        ("", NEW, "bootcamp-v1"),  # a route without one is yet to be created: the newer
        (NEW, "", "bootcamp-v2"),
        ("", "", "bootcamp-v1"),  # neither, or the same: namespace/name
        (OLD, OLD, "bootcamp-v1"),
    ],
)
def test_the_oldest_route_wins_a_tie(tmp_path: Path, zzz: str, aaa: str, winner: str) -> None:
    """The API: of two routes whose matches tie, the oldest by
    creationTimestamp wins, then the first by namespace/name. The
    timestamp was ignored, so aaa always won."""
    result = load(tmp_path, _tie(zzz, aaa))
    assert served(result.table, "c.example", "/api/x") == winner


def test_a_match_another_route_always_takes_first_is_a_warning_naming_both(
    tmp_path: Path,
) -> None:
    """aaa's PathPrefix /api on c.example is never reached: zzz's, older,
    is tried first. The warning is at aaa's match, naming zzz's line; zzz
    is not warned of, nor a route of another hostname or match."""
    text = _tie(OLD, NEW)
    text += route("other", "default", hostnames="[d.example]", path="/api").replace(
        "{name: web, port: 8080}", "{name: bootcamp, port: 8080}"
    )
    text += route("deeper", "default", hostnames="[c.example]", path="/api/v2").replace(
        "{name: web, port: 8080}", "{name: bootcamp, port: 8080}"
    )
    result = load(tmp_path, text)
    (warning,) = result.notes
    f = str(tmp_path / "r0.yaml")
    assert (warning.severity, warning.file, warning.line) == ("warning", f, 26)
    assert "HTTPRoute aaa: " in str(warning)
    assert warning.message == (
        f"this match is the same as one of HTTPRoute default/zzz ({f}:16) on "
        "hostname c.example of listener http of Gateway default/gw, which the API's order "
        "tries first (created earlier): this one is never reached there"
    )


def test_identical_matches_of_one_route_are_not_warned_of(tmp_path: Path) -> None:
    """Two rules of one route with the same match: its own order, not a
    route that hides another (no warning here)."""
    hr = route(ns="default", backend="{name: bootcamp-v1, port: 8080}")
    hr += "  - matches: [{path: {type: PathPrefix, value: /}}]\n"
    hr += "    backendRefs: [{name: bootcamp-v2, port: 8080}]\n"
    assert load(tmp_path, gateway() + hr).notes == []


BOOTCAMP = '{group: "", kind: Service, name: bootcamp}'


def at_service(table: RouteTable, path: str) -> str:
    """The backend a sidecar's request for *path* to Service bootcamp
    (port 8080) goes to, else the route name of its answer."""
    svc = table.service("bootcamp.default.svc.cluster.local")
    assert svc is not None
    d = table.decide(svc, 8080, Request(path=path))
    return d.service.host.split(".", 1)[0] if d.endpoints else d.route


@pytest.mark.parametrize(
    ("aaa", "zzz", "winner"),
    [
        (NEW, OLD, "bootcamp-v2"),  # zzz is older, and wins: not the file's order, nor the name
        ("", OLD, "bootcamp-v2"),  # a route without one is yet to be created: the newer
        ("", "", "bootcamp-v1"),  # neither, or the same: namespace/name
        (OLD, OLD, "bootcamp-v1"),
    ],
)
def test_the_oldest_route_wins_a_tie_on_a_service_parent(
    tmp_path: Path, aaa: str, zzz: str, winner: str
) -> None:
    """GAMMA: HTTPRoutes aaa (to bootcamp-v1) and zzz (to bootcamp-v2),
    both of Service bootcamp with the match PathPrefix /api, tie on the
    API's precedence; the API's order breaks the tie as on a Gateway's
    listener: the oldest by creationTimestamp, then namespace/name. aaa
    comes first in the file and by name."""

    def hr(name: str, meta: str, backend: str) -> str:
        return route(
            name,
            "default",
            parent=BOOTCAMP,
            backend=f"{{name: {backend}, port: 8080}}",
            meta=meta,
            path="/api",
        )

    result = load(tmp_path, hr("aaa", aaa, "bootcamp-v1") + hr("zzz", zzz, "bootcamp-v2"))
    assert at_service(result.table, "/api/x") == winner


@pytest.mark.parametrize(
    "stamp", ['"2024-01-01"', '"yesterday"', '"2024-13-01T00:00:00Z"', "2024-01-01", "12"]
)
def test_a_malformed_creation_timestamp_is_an_error_at_its_line(tmp_path: Path, stamp: str) -> None:
    f = write(
        tmp_path,
        gateway()
        + route(ns="default", meta=f",\n  creationTimestamp: {stamp}").replace(
            "{name: web, port: 8080}", "{name: bootcamp-v1, port: 8080}"
        ),
    )
    with pytest.raises(ConfigError) as info:
        load_rules([f, PER_VERSION])
    (err,) = info.value.errors
    assert (err.file, err.line) == (f, 12), str(err)
    assert "metadata.creationTimestamp" in err.message and "is not an RFC 3339 time" in err.message
