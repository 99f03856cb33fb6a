"""The Gateway API CRDs' list bounds (maxItems, the CEL rule on a route's
matches in all, header and query match values' lengths): a file an API
server would refuse is refused, with the file and the line of the list,
and a rule set saved over its bound leaves the last good table serving.

Each bound is tried at its limit (loads) and one past it (an error at the
list's line); the lists are generated, the error's line computed from the
text (the line of the list's key).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import l4proxy.rules.watch as rulewatch
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.routing import Request, RouteTable
from l4proxy.rules.watch import RuleWatcher

DATA = os.path.join(os.path.dirname(__file__), "data", "gateway-api")
PER_VERSION = os.path.join(DATA, "registry-per-version.yaml")
HOST = "bootcamp.default.svc.cluster.local"

HEAD = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bootcamp
spec:
"""
MESH = '  parentRefs:\n  - {group: "", kind: Service, name: bootcamp}\n'
TO_V1 = "    backendRefs:\n    - {name: bootcamp-v1, port: 8080}\n"


def rule(matches: int = 1, headers: int = 0, queries: int = 0, value: str = "v") -> str:
    """A rule of *matches* PathPrefix matches (/p0, /p1, ...), each with
    *headers* header and *queries* query parameter matches, to bootcamp-v1."""
    out = "  - matches:\n"
    for i in range(matches):
        out += f"    - path: {{type: PathPrefix, value: /p{i}}}\n"
        if headers:
            out += "      headers:\n"
            out += "".join(f"      - {{name: h{j}, value: {value}}}\n" for j in range(headers))
        if queries:
            out += "      queryParams:\n"
            out += "".join(f"      - {{name: q{j}, value: {value}}}\n" for j in range(queries))
    return out + TO_V1


def mesh_route(rules: str, hostnames: int = 0) -> str:
    names = (
        ""
        if not hostnames
        else "  hostnames:\n" + "".join(f"  - h{i}.example.com\n" for i in range(hostnames))
    )
    return HEAD + MESH + names + "  rules:\n" + rules


def parents(n: int) -> str:
    """A route of *n* parentRefs: the Service parent at *n* ports (each
    its own, as the API requires of references to one parent)."""
    refs = "".join(
        f'  - {{group: "", kind: Service, name: bootcamp, port: {8080 + i}}}\n' for i in range(n)
    )
    return HEAD + "  parentRefs:\n" + refs + "  rules:\n" + rule()


def backend_refs(n: int) -> str:
    refs = "".join("    - {name: bootcamp-v1, port: 8080}\n" for _ in range(n))
    return HEAD + MESH + "  rules:\n  - backendRefs:\n" + refs


def gateway(listeners: int = 1, kinds: int = 1) -> str:
    out = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\n"
        "spec:\n  gatewayClassName: l4proxy\n  listeners:\n"
    )
    for i in range(listeners):
        out += f"  - name: l{i}\n    port: {8000 + i}\n    protocol: HTTP\n"
        if kinds:
            out += "    allowedRoutes:\n      kinds:\n"
            out += "".join("      - {kind: HTTPRoute}\n" for _ in range(kinds))
    return out


def route_of(table: RouteTable, request: Request) -> str | None:
    """The name of the route bootcamp's port 8080 gives *request* (None: none)."""
    svc = table.service(HOST)
    assert svc is not None
    got = table.decide(svc, 8080, request).route
    return None if got == "no_route" else got


def line_of(text: str, key: str, nth: int = 0) -> int:
    """The 1-based line of the *nth* line that is *key* (stripped)."""
    lines = [i + 1 for i, ln in enumerate(text.splitlines()) if ln.strip() == key]
    return lines[nth]


# (case, the text at the bound, past it, the message past it, the list's key)
BOUNDS: list[tuple[str, Callable[[int], str], int, str, str]] = [
    (
        "rules",
        lambda n: mesh_route(rule() * n),
        16,
        "spec.rules has 17 rules; the API allows 16 (the CRD's maxItems",
        "rules:",
    ),
    (
        "matches of a rule",
        lambda n: mesh_route(rule(n)),
        64,
        "spec.rules[0].matches has 65 matches; the API allows 64",
        "- matches:",
    ),
    (
        "matches of a route in all",
        lambda n: mesh_route(rule(64) + rule(n - 64)),
        128,
        "spec.rules has 129 matches in all; the API allows 128 across a route's rules",
        "rules:",
    ),
    (
        "headers of a match",
        lambda n: mesh_route(rule(headers=n)),
        16,
        "spec.rules[0].matches[0].headers has 17 matches; the API allows 16",
        "headers:",
    ),
    (
        "queryParams of a match",
        lambda n: mesh_route(rule(queries=n)),
        16,
        "spec.rules[0].matches[0].queryParams has 17 matches; the API allows 16",
        "queryParams:",
    ),
    (
        "backendRefs of a rule",
        backend_refs,
        16,
        "spec.rules[0].backendRefs has 17 references; the API allows 16",
        "- backendRefs:",
    ),
    (
        "hostnames of a route",
        lambda n: mesh_route(rule(), hostnames=n),
        16,
        "spec.hostnames has 17 hostnames; the API allows 16",
        "hostnames:",
    ),
    (
        "parentRefs of a route",
        parents,
        32,
        "spec.parentRefs has 33 references; the API allows 32",
        "parentRefs:",
    ),
    (
        "listeners of a Gateway",
        lambda n: gateway(listeners=n),
        64,
        "spec.listeners has 65 listeners; the API allows 64",
        "listeners:",
    ),
    (
        "kinds of a listener's allowedRoutes",
        lambda n: gateway(kinds=n),
        8,
        "spec.listeners[0].allowedRoutes.kinds has 9 kinds; the API allows 8",
        "kinds:",
    ),
]


@pytest.mark.parametrize(
    ("make", "bound", "message", "key"), [b[1:] for b in BOUNDS], ids=[b[0] for b in BOUNDS]
)
def test_a_list_at_its_bound_loads_and_one_past_it_is_refused_at_its_line(
    tmp_path: Path, make: Callable[[int], str], bound: int, message: str, key: str
) -> None:
    at = tmp_path / "at.yaml"
    at.write_text(make(bound))
    load_rules([str(at), PER_VERSION])
    past = tmp_path / "past.yaml"
    past.write_text(make(bound + 1))
    with pytest.raises(ConfigError) as info:
        load_rules([str(past), PER_VERSION])
    [err] = info.value.errors
    assert message in err.message, str(err)
    assert "an API server refuses" in err.message or "across a route's rules" in err.message
    assert (err.file, err.line) == (str(past), line_of(make(bound + 1), key)), str(err)


def test_an_empty_rules_list_is_refused_and_a_route_without_rules_has_the_default_rule(
    tmp_path: Path,
) -> None:
    """HTTPRoute's spec.rules: minItems 1, and by default one rule
    matching PathPrefix / (gateway-api apis/v1/httproute_types.go). The
    default fills a field left out or null, not an empty list, so an API
    server refuses ``rules: []``: an error at its line, where it loaded as
    the default rule. Left out or null: that rule, every request answered
    500 (no backend)."""
    empty = tmp_path / "empty.yaml"
    text = HEAD + MESH + "  rules: []\n"
    empty.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules([str(empty), PER_VERSION])
    [err] = info.value.errors
    assert "spec.rules is empty; the API wants 1 rule at least (the CRD's minItems" in err.message
    assert (err.file, err.line) == (str(empty), line_of(text, "rules: []")), str(err)
    for i, without in enumerate(
        (HEAD + MESH, HEAD + MESH + "  rules:\n", HEAD + MESH + "  rules: null\n")
    ):
        f = tmp_path / f"without{i}.yaml"
        f.write_text(without)
        table = load_rules([str(f), PER_VERSION]).table
        svc = table.service(HOST)
        assert svc is not None
        for path in ("/", "/any/path"):
            d = table.decide(svc, 8080, Request(path=path))
            assert (d.route, d.endpoints, d.status) == ("bootcamp", [], 500), (without, path, d)


def test_a_long_list_is_refused_before_its_items_are_read(tmp_path: Path) -> None:
    """17 rules each wrong: one error, the bound's (not 17 more)."""
    f = tmp_path / "r.yaml"
    f.write_text(mesh_route("  - {matches: [{method: FETCH}]}\n" * 17))
    with pytest.raises(ConfigError) as info:
        load_rules([str(f), PER_VERSION])
    assert [e.message.split(":")[0] for e in info.value.errors] == [
        "spec.rules has 17 rules; the API allows 16 (the CRD's maxItems"
    ]


@pytest.mark.parametrize(
    ("what", "text", "message"),
    [
        (
            "header value over 4096",
            mesh_route(rule(headers=1, value="x" * 4097)),
            "spec.rules[0].matches[0].headers[0].value is 4097 characters long; the API "
            "allows 4096",
        ),
        (
            "query value over 1024",
            mesh_route(rule(queries=1, value="x" * 1025)),
            "spec.rules[0].matches[0].queryParams[0].value is 1025 characters long; the API "
            "allows 1024",
        ),
        (
            "header value empty",
            mesh_route(rule(headers=1, value='""')),
            "spec.rules[0].matches[0].headers[0].value must not be empty",
        ),
        (
            "header value absent",
            mesh_route(rule(headers=1).replace(", value: v}", "}")),
            "spec.rules[0].matches[0].headers[0].value is required: the API has no presence "
            "match (to match a header that is there, whatever its value: type: "
            "RegularExpression, value: '.*')",
        ),
        (
            "query value absent",
            mesh_route(rule(queries=1).replace(", value: v}", "}")),
            "spec.rules[0].matches[0].queryParams[0].value is required: the API has no "
            "presence match (to match a query parameter that is there, whatever its value: "
            "type: RegularExpression, value: '.*')",
        ),
        (
            "query parameter name not a token",
            mesh_route(rule(queries=1).replace("name: q0", "name: 'a[b]'")),
            "query parameter name 'a[b]' is not an HTTP field name",
        ),
        (
            "a header name given twice as written",
            mesh_route(rule(headers=2).replace("name: h1", "name: h0")),
            "h0 is matched twice in spec.rules[0].matches[0].headers "
            "(also spec.rules[0].matches[0].headers[0]); keep one",
        ),
    ],
)
def test_a_match_value_or_name_the_api_server_refuses_is_an_error(
    tmp_path: Path, what: str, text: str, message: str
) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules([str(f), PER_VERSION])
    [err] = info.value.errors
    assert message in err.message, str(err)
    assert err.file == str(f)


def test_the_presence_match_a_missing_value_error_suggests_matches_as_it_says(
    tmp_path: Path,
) -> None:
    """The hint of a header or query match without a value (type:
    RegularExpression, value: '.*') holds: it matches the request that has
    the header or parameter, whatever its value (empty too), and not one
    without it."""
    f = tmp_path / "r.yaml"
    f.write_text(
        mesh_route(
            rule(headers=1).replace(", value: v}", ", type: RegularExpression, value: '.*'}")
        )
    )
    table = load_rules([str(f), PER_VERSION]).table
    for headers, routed in (({"h0": "anything"}, True), ({"h0": ""}, True), ({}, False)):
        got = route_of(table, Request(path="/p0", headers=headers))
        assert (got is not None) is routed, headers
    f.write_text(
        mesh_route(
            rule(queries=1).replace(", value: v}", ", type: RegularExpression, value: '.*'}")
        )
    )
    table = load_rules([str(f), PER_VERSION]).table
    for target, routed in (("/p0?q0=x", True), ("/p0?q0", True), ("/p0?q1=x", False)):
        assert (route_of(table, Request(path=target)) is not None) is routed, target


def test_header_and_query_values_at_their_bounds_load(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        mesh_route(rule(headers=1, value="x" * 4096))
        .replace("  rules:\n", "  rules:\n" + rule(queries=1, value="y" * 1024))
        .replace("/p0}\n      queryParams", "/q0}\n      queryParams")
    )
    table = load_rules([str(f), PER_VERSION]).table
    assert route_of(table, Request(path="/p0", headers={"h0": "x" * 4096})) is not None
    assert route_of(table, Request(path="/q0?q0=" + "y" * 1024)) is not None


def test_a_header_named_again_in_another_case_is_ignored_as_the_api_says(
    tmp_path: Path,
) -> None:
    """``Foo`` after ``foo`` in one match: the API admits both (its list
    map's key is the name as written) and says the first is matched and
    the others ignored: a warning at the ignored one, and the match is
    ``foo`` alone (a request without a ``Foo: other`` matches), ranked as
    one header match, not two."""
    text = mesh_route(
        "  - matches:\n    - headers:\n      - {name: foo, value: a}\n"
        "      - {name: Foo, value: b}\n" + TO_V1
    )
    f = tmp_path / "r.yaml"
    f.write_text(text)
    result = load_rules([str(f), PER_VERSION])
    [warn] = [d for d in result.notes if d.severity == "warning"]
    assert (warn.file, warn.line) == (str(f), line_of(text, "- {name: Foo, value: b}"))
    assert warn.message.endswith(
        "spec.rules[0].matches[0].headers[1] is ignored: header Foo is already matched by "
        "spec.rules[0].matches[0].headers[0] (names ignore case; the API matches the first)"
    )
    [route] = result.table.routes_for(HOST)
    [match] = route.matches
    assert [(name, m.value) for name, m in match.headers] == [("foo", "a")]
    assert route_of(result.table, Request(path="/", headers={"foo": "a"})) is not None
    assert route_of(result.table, Request(path="/", headers={"foo": "b"})) is None


def test_a_rule_set_saved_over_a_bound_leaves_the_last_good_table_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The route loaded with 16 rules (/p0 on each), then saved with 17 and
    a new path: refused at the list's line, the 16-rule table served (/new
    unrouted), the error logged with file and line; cut back to 16, the
    new path goes live."""
    d = tmp_path / "rules"
    d.mkdir()
    (d / "registry.yaml").write_text(Path(PER_VERSION).read_text())
    route = d / "route.yaml"
    route.write_text(mesh_route(rule() * 16))
    watcher = RuleWatcher([str(d)], interval=3600, settle=0)
    assert watcher.load_now()
    served = watcher.state.table
    new = rule().replace("/p0", "/new")
    route.write_text(mesh_route(new + rule() * 16))
    with caplog.at_level(logging.ERROR, logger=rulewatch.log.name):
        watcher.load_now()
    assert route_of(watcher.state.table, Request(path="/p0")) is not None
    assert route_of(watcher.state.table, Request(path="/new")) is None
    assert watcher.state.table is served or watcher.state.generation == 2
    said = f"{route}:{line_of(mesh_route(rule()), 'rules:')}:"
    assert watcher.state.last_error is not None and said in watcher.state.last_error
    assert "spec.rules has 17 rules; the API allows 16" in watcher.state.last_error
    assert any(said in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    route.write_text(mesh_route(new + rule() * 15))
    assert watcher.load_now()
    assert route_of(watcher.state.table, Request(path="/new")) is not None


GATEWAY = (
    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
    "spec:\n  gatewayClassName: l4proxy\n  listeners:\n"
    "  - {name: a, port: 8080, protocol: HTTP, hostname: a.example.com}\n"
    "  - {name: b, port: 8080, protocol: HTTP, hostname: b.example.com}\n---\n"
)


@pytest.mark.parametrize(
    ("refs", "message"),
    [
        (
            "{name: gw}, {name: gw}",
            "spec.parentRefs[1] names Gateway default/gw as spec.parentRefs[0] does; give each "
            "its own sectionName or port, or keep one",
        ),
        (
            "{name: gw, sectionName: a}, {name: gw, sectionName: a}",
            "give each its own sectionName or port, or keep one",
        ),
        (
            "{name: gw}, {name: gw, sectionName: b}",
            "spec.parentRefs[1] names Gateway default/gw as spec.parentRefs[0] does; give each a "
            "sectionName (or each a port), or none: a reference without one takes the whole "
            "parent",
        ),
        (
            "{name: gw, sectionName: a}, {name: gw, port: 8080}",
            "give each a sectionName (or each a port), or none",
        ),
        (
            '{group: "", kind: Service, name: bootcamp}, '
            '{group: "", kind: Service, name: bootcamp}',
            "spec.parentRefs[1] names Service default/bootcamp as spec.parentRefs[0] does",
        ),
    ],
    ids=["same", "same-section", "section-and-none", "section-and-port", "service-twice"],
)
def test_references_to_one_parent_that_do_not_tell_themselves_apart_are_an_error(
    tmp_path: Path, refs: str, message: str
) -> None:
    """The CRD's CEL rules on parentRefs (the experimental channel's, with
    port): before, the route attached twice and each match was doubled
    (``uri exact '/x' or uri exact '/x'``)."""
    text = GATEWAY + HEAD + f"  parentRefs: [{refs}]\n  rules:\n" + rule()
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules([str(f), PER_VERSION])
    [err] = info.value.errors
    assert message in err.message, str(err)
    assert err.message.endswith("(the API's rule for 2 or more references to the same parent)")
    assert (err.file, err.line) == (str(f), line_of(text, f"parentRefs: [{refs}]"))


def test_references_to_one_parent_each_with_its_own_section_attach_once_each(
    tmp_path: Path,
) -> None:
    text = GATEWAY + HEAD + "  parentRefs: [{name: gw, sectionName: a}, {name: gw, sectionName: b}]"
    f = tmp_path / "r.yaml"
    f.write_text(text + "\n  rules:\n" + rule())
    table = load_rules([str(f), PER_VERSION]).table
    gateways = {k: v for k, v in table.to_json()["routes"].items() if k.startswith("gateway")}
    assert sorted(gateways) == [
        "gateway:default/gw/a/a.example.com",
        "gateway:default/gw/b/b.example.com",
    ]
    for [r] in gateways.values():
        assert len(r["match"]) == 1, r


def test_a_rule_name_given_twice_in_a_route_is_an_error(tmp_path: Path) -> None:
    """Two rules named alike (the API's rule, in its experimental CRD) made
    two routes of one name, ``bootcamp/same``, which l4proxy's metrics and
    decisions name them by."""

    def named(name: str) -> str:
        return rule().replace("  - matches:", f"  - name: {name}\n    matches:", 1)

    text = mesh_route(named("same") + named("other") + named("same"))
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules([str(f), PER_VERSION])
    [err] = info.value.errors
    assert err.message.endswith(
        "rule name same is also spec.rules[0]'s; a rule's name must be unique within the route "
        "(the API's rule)"
    ), str(err)
    assert (err.file, err.line) == (str(f), line_of(text, "- name: same", 1))


def test_a_reference_that_writes_the_routes_own_namespace_is_another_parent_to_the_api(
    tmp_path: Path,
) -> None:
    """The CEL rules compare the namespace as written, so an API server
    admits ``{name: gw}`` beside ``{name: gw, namespace: default}`` (the
    route's): the file loads (it was refused), the later reference a
    warning and dropped, the route attached once, each match once."""
    refs = "{name: gw}, {name: gw, namespace: default}"
    text = GATEWAY + HEAD + f"  parentRefs: [{refs}]\n  rules:\n" + rule()
    f = tmp_path / "r.yaml"
    f.write_text(text)
    result = load_rules([str(f), PER_VERSION])
    [warn] = [d for d in result.notes if d.severity == "warning"]
    assert (warn.file, warn.line) == (str(f), line_of(text, f"parentRefs: [{refs}]"))
    assert "spec.parentRefs[1] is ignored: it names Gateway default/gw as spec.parentRefs[0]" in (
        warn.message
    )
    gateways = {
        k: v for k, v in result.table.to_json()["routes"].items() if k.startswith("gateway")
    }
    assert len(gateways) == 2, gateways  # (listeners a and b, once each)
    for [r] in gateways.values():
        assert len(r["match"]) == 1, r
    # (one with a sectionName, one without: two parents to the API, both attach)
    refs = "{name: gw}, {name: gw, namespace: default, sectionName: a}"
    f.write_text(GATEWAY + HEAD + f"  parentRefs: [{refs}]\n  rules:\n" + rule())
    result = load_rules([str(f), PER_VERSION])
    assert not [d for d in result.notes if d.severity == "warning"]
