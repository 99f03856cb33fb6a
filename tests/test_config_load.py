"""Loading rule sets: the seed's manifests, every kind, ConfigMap directories, one model."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from l4proxy.rules import ConfigError, LoadResult, load_rules
from l4proxy.rules.routing import HttpRetry, Labels, Request, RouteTable
from tests.mesh import SEED_DIR as SEED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(__file__), "data", "rules")
REGISTRY = os.path.join(DATA, "registry.yaml")
HOST = "bootcamp.default.svc.cluster.local"

# Skips without ../shared, fails under CI=true (conftest's seed_dir).
needs_seed = pytest.mark.usefixtures("seed_dir")


def seed(name: str) -> str:
    return os.path.join(SEED, name)


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return str(p)


def _load(tmp_path: Path, name: str, text: str) -> LoadResult:
    """*text* written to *name* and loaded with the registry (bootcamp)."""
    return load_rules([write(tmp_path, name, text), REGISTRY])


def _vs_route(field: str) -> str:
    """A VirtualService for bootcamp: one http route to it, *field* (a
    field of that route, its lines at the route's indentation) on line 9."""
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: bootcamp}}
spec:
  hosts: [bootcamp]
  http:
  - route:
    - destination: {{host: bootcamp}}
{textwrap.indent(field, "    ")}
"""


def _route_rule(*fields: str) -> str:
    """Istio 0.7's RouteRule bootcamp-default for bootcamp, *fields* (its
    further spec fields, each one or more lines) from line 6 on."""
    head = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: bootcamp-default}
spec:
  destination: {name: bootcamp}
"""
    return head + "".join(textwrap.indent(f, "  ") + "\n" for f in fields)


def _assert_retries(table: RouteTable, expected: HttpRetry | None) -> None:
    """*table*'s one route to bootcamp has the retry policy *expected*: the
    route, validate -v's JSON and a request's decision."""
    (route,) = table.routes_for(HOST)
    assert route.retries == expected
    got = table.to_json()["routes"][HOST][0]["retries"]
    assert got == (expected.to_json() if expected else None)
    svc = table.service(HOST)
    assert svc is not None
    assert table.decide(svc, 8080, Request(path="/")).retries == expected


# -- the seed -------------------------------------------------------------


@needs_seed
@pytest.mark.parametrize(
    ("rule", "split"),
    [
        ("bootcamp-route-rule-all-v1.yaml", {"v1": 100}),
        ("bootcamp-route-rule-50-v2.yaml", {"v1": 50, "v2": 50}),
        ("bootcamp-route-rule-all-v2.yaml", {"v2": 100}),
    ],
)
def test_seed_route_rules_load_verbatim(rule: str, split: dict[str, int]) -> None:
    result = load_rules([seed(rule), REGISTRY])
    (route,) = result.table.routes_for(HOST)
    assert route.name == "bootcamp-default"
    assert route.matches == ()
    assert {d.subset.name: d.weight for d in route.destinations} == split
    for d in route.destinations:
        assert d.subset.labels == {"version": d.subset.name}
        assert d.host == HOST
    assert result.sources == [seed(rule), REGISTRY]
    assert [n for n in result.notes if n.severity != "note"] == []


@needs_seed
def test_seed_kubernetes_objects_are_skipped_with_notes_and_ingress_loads() -> None:
    files = ["bootcamp.yaml", "bootcamp-service.yaml", "bootcamp-ingress.yaml"]
    result = load_rules([seed(f) for f in files] + [seed("bootcamp-route-rule-all-v1.yaml")])
    notes = [str(n) for n in result.notes if n.severity == "note"]
    why = "skipped (a Kubernetes object, not a rule)"
    assert notes == [
        f"{seed('bootcamp.yaml')}:1: note: Deployment bootcamp-v1: {why}",
        f"{seed('bootcamp.yaml')}:22: note: Deployment bootcamp-v2: {why}",
        f"{seed('bootcamp-service.yaml')}:1: note: Service bootcamp: {why}",
    ]
    # No ServiceEntry: the rule and the Ingress path wait for one, with a hint.
    warnings = [n for n in result.notes if n.severity == "warning"]
    assert {w.kind for w in warnings} == {"RouteRule", "Ingress"}
    assert all("has no ServiceEntry" in w.message for w in warnings)
    assert all("a Kubernetes Service carries no endpoint addresses" in w.message for w in warnings)
    (path,) = result.table.ingress_paths
    assert (path.host, path.path, path.path_type, path.service, path.port) == (
        None,
        "/bootcamp",
        "Exact",
        HOST,
        8080,
    )
    # Once the registry is loaded as well, the tutorial's gateway path resolves.
    table = load_rules([seed(f) for f in files] + [REGISTRY]).table
    found = table.ingress(None, "/bootcamp")
    assert found is not None and found[0].host == HOST and found[1].number == 8080
    assert table.ingress(None, "/bootcamp/x") is None  # Istio 0.7: exact


@needs_seed
def test_the_three_seed_rules_together_are_duplicates() -> None:
    with pytest.raises(ConfigError) as info:
        load_rules([SEED])
    errs = info.value.errors
    assert len(errs) == 2
    assert all("duplicate name: RouteRule default/bootcamp-default" in e.message for e in errs)


# -- one model ------------------------------------------------------------


@needs_seed
@pytest.mark.parametrize(
    ("rule", "vs"),
    [
        ("bootcamp-route-rule-50-v2.yaml", "vs-50-v2.yaml"),
        ("bootcamp-route-rule-all-v1.yaml", "vs-all-v1.yaml"),
    ],
)
def test_route_rule_and_virtual_service_compile_to_the_same_table(rule: str, vs: str) -> None:
    a = load_rules([seed(rule), REGISTRY]).table
    b = load_rules([os.path.join(DATA, vs), REGISTRY]).table
    assert a == b
    assert json.dumps(a.to_json(), sort_keys=True) == json.dumps(b.to_json(), sort_keys=True)


@needs_seed
def test_different_rules_compile_to_different_tables() -> None:
    a = load_rules([seed("bootcamp-route-rule-50-v2.yaml"), REGISTRY]).table
    b = load_rules([seed("bootcamp-route-rule-all-v2.yaml"), REGISTRY]).table
    c = load_rules([os.path.join(DATA, "vs-all-v1.yaml"), REGISTRY]).table
    assert a != b and a != c and b != c


def test_table_equality_ignores_load_balancer_state() -> None:
    a = load_rules([os.path.join(DATA, "vs-50-v2.yaml"), REGISTRY], seed=1).table
    b = load_rules([os.path.join(DATA, "vs-50-v2.yaml"), REGISTRY], seed=2).table
    svc = a.services()[0]
    for _ in range(7):
        a.decide(svc, 8080, Request())
    assert a == b


def test_table_to_json_is_json() -> None:
    table = load_rules([os.path.join(DATA, "vs-50-v2.yaml"), REGISTRY]).table
    dump = json.loads(json.dumps(table.to_json()))
    (svc,) = dump["services"]
    assert svc["host"] == HOST
    assert svc["aliases"] == ["bootcamp", "bootcamp.default", "bootcamp.default.svc"]
    assert svc["addresses"] == ["198.19.0.10"]
    assert [e["address"] for e in svc["endpoints"]["8080"]] == [
        "198.18.0.11",
        "198.18.0.12",
        "198.18.0.13",
    ]
    (route,) = dump["routes"][HOST]
    assert [(d["subset"], d["weight"]) for d in route["route"]] == [("v1", 50), ("v2", 50)]


# -- precedence -----------------------------------------------------------


def _rule(name: str, precedence: int, version: str, namespace: str = "default") -> str:
    return f"""\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: {name}
  namespace: {namespace}
spec:
  destination:
    name: bootcamp
    namespace: default
  precedence: {precedence}
  match:
    request:
      headers:
        x-{name}: {{exact: "1"}}
  route:
  - labels: {{version: {version}}}
---
"""


def test_route_rules_order_by_precedence_then_namespace_and_name(tmp_path: Path) -> None:
    text = (
        _rule("zeta", 5, "v1")
        + _rule("alpha", 1, "v1")
        + _rule("beta", 5, "v2")
        + _rule("beta", 5, "v2", namespace="aaa")
        + _rule("top", 10, "v2")
    )
    f = write(tmp_path, "rules.yaml", text)
    names = [r.name for r in load_rules([f, REGISTRY]).table.routes_for(HOST)]
    # precedence high first; ties by (namespace, name): aaa/beta, default/beta, default/zeta
    assert names == ["top", "beta", "beta", "zeta", "alpha"]
    # The order does not depend on the file order.
    docs = text.split("---\n")
    g = write(tmp_path, "reversed.yaml", "---\n".join(reversed(docs)))
    again = load_rules([g, REGISTRY]).table
    assert again == load_rules([f, REGISTRY]).table


# -- kinds ----------------------------------------------------------------


def test_virtual_service_matches_compile(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "vs.yaml",
        """\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bootcamp}
        spec:
          hosts: [bootcamp]
          gateways: [mesh]
          http:
          - name: jason
            match:
            - headers:
                end-user: {exact: jason}
              uri: {prefix: /api}
            - sourceLabels: {app: tester}
              port: 8080
            route:
            - destination: {host: bootcamp, subset: v2, port: {number: 8080}}
          - match:
            - {}
            route:
            - destination: {host: bootcamp}
          tcp:
          - route:
            - destination: {host: bootcamp, subset: v1}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: bootcamp}
        spec:
          host: bootcamp
          trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}  # (deprecated name)
          subsets:
          - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
          - {name: v2, labels: {version: v2}}
        """,
    )
    table = load_rules([f, REGISTRY]).table
    jason, rest, tcp = table.routes_for(HOST)
    assert jason.name == "bootcamp/jason" and rest.name == "bootcamp[1]"
    assert tcp.name == "bootcamp" and tcp.protocol == "tcp"
    assert len(jason.matches) == 2
    first, second = jason.matches
    assert first.uri is not None and first.uri.to_json() == {"prefix": "/api"}
    assert [(n, m.to_json()) for n, m in first.headers] == [("end-user", {"exact": "jason"})]
    assert second.source_labels == Labels({"app": "tester"}) and second.port == 8080
    assert rest.matches == ()  # an empty block is a catch-all
    (d,) = jason.destinations
    assert d.port == 8080 and d.subset.load_balancer == "LEAST_REQUEST"
    (t,) = tcp.destinations
    assert t.subset.load_balancer == "RANDOM"
    assert table.load_balancer(HOST) == "LEAST_REQUEST"


_DB = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db]
  ports: [%s]
  endpoints: [{address: 198.18.0.21}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db]
  http:
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: db}}]
  tcp:
  - %s
    route: [{destination: {host: db}}]
"""
_HTTP, _GRPC = "{number: 8080, name: http, protocol: HTTP}", "{number: 9090, name: grpc}"
_PG = "{number: 5432, name: tcp-pg, protocol: TCP}"


@pytest.mark.parametrize(
    ("ports", "match", "warning"),
    [
        (
            f"{_HTTP}, {_PG}",
            "match: [{port: 8080}]",
            "this tcp route routes nothing: tcp routes serve TCP ports only; port 8080 of "
            "db.default.svc.cluster.local is HTTP: its requests take the http routes, else the "
            "whole service (the default route)",
        ),
        (
            f"{_HTTP}, {_GRPC}",
            "match: [{sourceLabels: {app: x}}]",
            "this tcp route routes nothing: tcp routes serve TCP ports only; ports 8080, 9090 of "
            "db.default.svc.cluster.local are HTTP/GRPC: their requests take the http routes, "
            "else the whole service (the default route)",
        ),
        (f"{_HTTP}, {_PG}", "match: [{port: 5432}]", None),
        (f"{_HTTP}, {_PG}", "match: [{}]", None),
        (_PG, "match: [{}]", None),
    ],
    ids=["names the http port", "every port http", "names the tcp port", "any port", "tcp only"],
)
def test_a_tcp_route_whose_every_port_is_http_is_a_warning_at_its_line(
    tmp_path: Path, ports: str, match: str, warning: str | None
) -> None:
    """A tcp route serves TCP ports only (Istio: the listener of an HTTP
    port has the http routes alone); one whose every port, those its
    blocks name or all of the service's, is HTTP routes nothing: a warning
    at its line, where the load said nothing and the sidecar took that
    port's requests (and raw connections) with it."""
    f = write(tmp_path, "db.yaml", _DB % (ports, match))
    result = load_rules([f])
    said = [(d.severity, d.line, d.message) for d in result.notes if "tcp route" in d.message]
    assert said == ([("warning", 18, warning)] if warning else [])
    svc = result.table.service("db.default.svc.cluster.local")
    assert svc is not None
    tcp = result.table.routes_for(svc.host)[1]
    assert (result.table.route_ports(svc, tcp) == []) == (warning is not None)


def test_a_virtual_service_answers_404_when_no_route_matches_a_route_rule_does_not(
    tmp_path: Path,
) -> None:
    """Istio answers 404 (Envoy's NR) to a request for a VirtualService's
    host that none of its http routes matches; l4proxy spread it over every
    endpoint. A RouteRule (Istio 0.7, the tutorial's API) keeps its rule:
    no rule matched, round robin over every endpoint."""
    vs = write(
        tmp_path,
        "vs.yaml",
        """\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bootcamp}
        spec:
          hosts: [bootcamp]
          http:
          - match: [{uri: {prefix: /api}}]
            route: [{destination: {host: bootcamp, subset: v2}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: bootcamp}
        spec:
          host: bootcamp
          subsets: [{name: v2, labels: {version: v2}}]
        """,
    )
    rr = write(
        tmp_path,
        "rr.yaml",
        """\
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata: {name: api}
        spec:
          destination: {name: bootcamp}
          match:
            request:
              headers:
                uri: {prefix: /api}
          route:
          - labels: {version: v2}
        """,
    )
    t = load_rules([vs, REGISTRY]).table
    svc = t.service(HOST)
    assert svc is not None
    assert t.decide(svc, 8080, Request(path="/api/x")).route == "bootcamp"
    d = t.decide(svc, 8080, Request(path="/other"))
    assert (d.route, d.endpoints, d.status) == ("no_route", [], 404)
    assert t.decide(svc, 8080, None).route == "default"  # not HTTP/1.x: per connection
    t = load_rules([rr, REGISTRY]).table
    assert t.decide(svc, 8080, Request(path="/api/x")).route == "api"
    d = t.decide(svc, 8080, Request(path="/other"))
    assert (d.route, len(d.endpoints), d.status) == ("default", 3, 503)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5s", 5.0), ("0.5s", 0.5), ("250ms", 0.25), ("1m30s", 90.0), ("1h", 3600.0), ("0s", 0.0)],
)
def test_virtual_service_timeout_compiles(tmp_path: Path, value: str, seconds: float) -> None:
    """http[].timeout is the route's timeout in seconds ("0s": none, Istio's
    default); a reload that changes only it is a new table."""
    table = _load(tmp_path, "vs.yaml", _vs_route(f"timeout: {value}")).table
    (route,) = table.routes_for(HOST)
    assert route.timeout == seconds
    other = _load(tmp_path, "vs.yaml", _vs_route("")).table
    assert (table == other) == (seconds == 0)
    assert table.to_json()["routes"][HOST][0]["timeout"] == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10s", 10.0), ("0.5s", 0.5), ("250ms", 0.25), ("1m30s", 90.0), ("1h", 3600.0)],
)
def test_route_rule_http_req_timeout_compiles(tmp_path: Path, value: str, seconds: float) -> None:
    """httpReqTimeout.simpleTimeout.timeout is the route's timeout, read by
    the VirtualService's duration parser; without it the rule has none, and a
    reload that changes only it is a new table."""
    route_v1 = "route:\n- labels: {version: v1}"
    timeout = f"httpReqTimeout:\n  simpleTimeout:\n    timeout: {value}"
    table = _load(tmp_path, "rr.yaml", _route_rule(route_v1, timeout)).table
    (route,) = table.routes_for(HOST)
    assert route.timeout == seconds
    assert table.to_json()["routes"][HOST][0]["timeout"] == seconds
    other = _load(tmp_path, "rr.yaml", _route_rule(route_v1)).table
    (plain,) = other.routes_for(HOST)
    assert plain.timeout == 0.0
    assert table != other


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        # Istio's default policy when retryOn is omitted: 503 its status code
        (
            "{attempts: 3}",
            HttpRetry(
                3,
                0.0,
                (
                    "connect-failure",
                    "refused-stream",
                    "unavailable",
                    "cancelled",
                    "retriable-status-codes",
                ),
                (503,),
            ),
        ),
        (
            "{attempts: 2, perTryTimeout: 250ms, retryOn: 'gateway-error,reset'}",
            HttpRetry(2, 0.25, ("gateway-error", "reset"), ()),
        ),
        # bare codes are retriable status codes, and imply the policy (Istio)
        (
            "{attempts: 1, retryOn: '503,409,5xx,503', retryRemoteLocalities: true}",
            HttpRetry(1, 0.0, ("5xx", "retriable-status-codes"), (503, 409)),
        ),
        # backoff: the base interval between tries (Envoy's 25 ms without it)
        (
            "{attempts: 2, retryOn: 5xx, backoff: 100ms}",
            HttpRetry(2, 0.0, ("5xx",), (), 0.1),
        ),
        ("{attempts: 0, retryOn: 5xx}", None),  # Istio: retries disabled
        # a sign, as Go's strconv.Atoi reads one (Istio's validation, its converter)
        (
            "{attempts: 1, retryOn: '+503,reset'}",
            HttpRetry(1, 0.0, ("reset", "retriable-status-codes"), (503,)),
        ),
        ("{perTryTimeout: 1s}", None),  # (attempts 0)
        # a retry prefers an endpoint not tried yet: Istio's default, true
        (
            "{attempts: 2, retryOn: 5xx, retryIgnorePreviousHosts: true}",
            HttpRetry(2, 0.0, ("5xx",), ()),
        ),
        (
            "{attempts: 2, retryOn: 5xx, retryIgnorePreviousHosts: false}",
            HttpRetry(2, 0.0, ("5xx",), (), ignore_previous_hosts=False),
        ),
    ],
)
def test_virtual_service_retries_compile(
    tmp_path: Path, retries: str, expected: HttpRetry | None
) -> None:
    """http[].retries is the route's retry policy as Istio makes Envoy's; a
    reload that changes only it is a new table; validate -v's JSON has it."""
    table = _load(tmp_path, "vs.yaml", _vs_route(f"retries: {retries}")).table
    _assert_retries(table, expected)
    plain = _load(tmp_path, "vs.yaml", _vs_route(""))
    assert (table == plain.table) == (expected is None)


@pytest.mark.parametrize(
    ("simple", "expected"),
    [
        (
            "{attempts: 3, perTryTimeout: 2s}",
            HttpRetry(3, 2.0, ("5xx", "connect-failure", "refused-stream"), ()),
        ),
        (
            "{attempts: 1, perTryTimeout: 250ms}",
            HttpRetry(1, 0.25, ("5xx", "connect-failure", "refused-stream"), ()),
        ),
        # pilot made a policy only for attempts > 0: none, its per-try timeout too
        ("{attempts: 0, perTryTimeout: 2s}", None),
        ("{perTryTimeout: 2s}", None),
    ],
)
def test_route_rule_http_req_retries_compile(
    tmp_path: Path, simple: str, expected: HttpRetry | None
) -> None:
    """httpReqRetries.simpleRetry is the route's retry policy as Istio 0.7's
    pilot made Envoy's: its attempts, its per-try timeout, on
    5xx,connect-failure,refused-stream; the same policy as a VirtualService
    retries field saying so; a reload that changes only it is a new table;
    validate -v's JSON has it."""
    result = _load(tmp_path, "rr.yaml", _route_rule(f"httpReqRetries:\n  simpleRetry: {simple}"))
    assert not result.notes, result.notes
    table = result.table
    _assert_retries(table, expected)
    plain = _load(tmp_path, "rr.yaml", _route_rule())
    (untried,) = plain.table.routes_for(HOST)
    assert untried.retries is None
    assert (table == plain.table) == (expected is None)
    if expected is not None:  # what the VirtualService would say for it
        retries = (
            f"retries:\n  attempts: {expected.attempts}\n"
            f"  perTryTimeout: {expected.per_try_timeout}s\n"
            "  retryOn: 5xx,connect-failure,refused-stream"
        )
        other = _load(tmp_path, "vs.yaml", _vs_route(retries)).table
        (same,) = other.routes_for(HOST)
        assert same.retries == expected


@pytest.mark.parametrize(("per_try", "warned"), [("2s", True), ("1s", False), ("500ms", False)])
def test_route_rule_per_try_timeout_past_its_timeout_warns(
    tmp_path: Path, per_try: str, warned: bool
) -> None:
    """A perTryTimeout longer than the rule's httpReqTimeout, which bounds
    every try together, is a warning on its line, as a VirtualService's."""
    rr = _route_rule(
        "httpReqTimeout: {simpleTimeout: {timeout: 1s}}",
        f"httpReqRetries:\n  simpleRetry:\n    attempts: 2\n    perTryTimeout: {per_try}",
    )
    result = _load(tmp_path, "rr.yaml", rr)
    (route,) = result.table.routes_for(HOST)
    assert route.retries is not None and route.timeout == 1.0
    said = [d for d in result.notes if "perTryTimeout" in d.message]
    if not warned:
        assert not said, said
        return
    (warning,) = said
    assert warning.severity == "warning" and warning.line == 10
    assert warning.message.endswith(
        "spec.httpReqRetries.simpleRetry.perTryTimeout 2s is longer than the rule's "
        "httpReqTimeout (1s), which bounds every try together"
    ), warning.message


@pytest.mark.parametrize(
    ("retries", "said"),
    [
        ("{attempts: 0, retryOn: 5xx}", "retryOn does nothing"),
        (
            "{perTryTimeout: 1s, retryRemoteLocalities: false}",
            "perTryTimeout, retryRemoteLocalities do nothing",
        ),
        ("{attempts: 0, retryIgnorePreviousHosts: false}", "retryIgnorePreviousHosts does nothing"),
        ("{attempts: 0}", None),
        ("{attempts: 0, retryOn: ''}", None),
    ],
)
def test_retries_of_no_attempts_that_say_more_warn(
    tmp_path: Path, retries: str, said: str | None
) -> None:
    """attempts 0 (or none) turns retries off (Istio's ConvertPolicy): a
    perTryTimeout, retryOn or retryRemoteLocalities beside it does nothing,
    which recent Istio's validation refuses; said in a warning here."""
    result = _load(tmp_path, "vs.yaml", _vs_route(f"retries: {retries}"))
    (route,) = result.table.routes_for(HOST)
    assert route.retries is None
    warned = [d for d in result.notes if "retries" in d.message]
    if said is None:
        assert not warned, warned
        return
    (warning,) = warned
    assert warning.severity == "warning" and warning.line == 9
    assert (
        f"spec.http[0].retries: attempts is 0 (or not given): retries are off, so {said} "
        "(recent Istio refuses this)"
    ) in warning.message, warning.message


def test_route_rule_match_compiles(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "rr.yaml",
        """\
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata: {name: jason}
        spec:
          destination: {name: bootcamp}
          precedence: 2
          match:
            source:
              labels: {app: client}
            request:
              headers:
                cookie: {regex: "^(.*?;)?(user=jason)(;.*)?$"}
                uri: {prefix: /api}
                method: GET
                authority: {exact: bootcamp}
                scheme: {exact: http}
          route:
          - labels: {version: v2}
        """,
    )
    (route,) = load_rules([f, REGISTRY]).table.routes_for(HOST)
    (m,) = route.matches
    assert m.source_labels == {"app": "client"}
    assert [n for n, _ in m.headers] == ["cookie"]
    assert m.uri is not None and m.uri.kind == "prefix"
    assert m.method is not None and m.method.to_json() == {"exact": "GET"}
    assert m.authority is not None and m.scheme is not None


def test_service_entry_ports_endpoints_and_dns(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "se.yaml",
        """\
        apiVersion: networking.istio.io/v1alpha3
        kind: ServiceEntry
        metadata: {name: shop, namespace: shop}
        spec:
          hosts: [shop]
          addresses: [198.19.1.0/24, 198.19.0.30]
          location: MESH_INTERNAL
          ports:
          - {number: 80, name: http-web}
          - {number: 9000, name: grpc-api}
          - {number: 5000, name: admin, protocol: TCP, targetPort: 5001}
          resolution: STATIC
          endpoints:
          - address: 198.18.1.1
            ports: {http-web: 8080}
            labels: {version: v1}
          - address: 198.18.1.2
        ---
        apiVersion: networking.istio.io/v1alpha3
        kind: ServiceEntry
        metadata: {name: api}
        spec:
          hosts: [api.example.com]
          ports: [{number: 443, name: tls, protocol: TLS}]
          resolution: DNS
        """,
    )
    table = load_rules([f]).table
    shop = table.service("shop.shop.svc.cluster.local")
    assert shop is not None
    assert shop.aliases == ("shop.shop", "shop.shop.svc")  # no short name: another namespace
    assert [(p.number, p.protocol, p.is_http) for p in shop.ports] == [
        (80, "HTTP", True),
        (9000, "GRPC", True),
        (5000, "TCP", False),
    ]
    assert [(e.address, e.port) for e in shop.endpoints_for(80)] == [
        ("198.18.1.1", 8080),
        ("198.18.1.2", 80),
    ]
    assert [e.port for e in shop.endpoints_for(5000)] == [5001, 5001]
    assert shop.endpoints_for(80)[0].labels == {"version": "v1"}
    api = table.service("api.example.com")
    assert api is not None and api.resolution == "DNS" and api.aliases == ()
    assert [(e.address, e.port) for e in api.endpoints] == [("api.example.com", 443)]
    found = table.service_for_address("198.19.1.77", 9000)
    assert found is not None and found[0] is shop and found[1].name == "grpc-api"


def test_list_documents_in_json(tmp_path: Path) -> None:
    result = load_rules([os.path.join(DATA, "all-kinds.json")])
    (svc,) = result.table.services()
    assert svc.host == "db.shop.svc.cluster.local"
    assert [str(n) for n in result.notes if n.severity == "note"] == [
        f"{os.path.join(DATA, 'all-kinds.json')}:8: note: ConfigMap unrelated: skipped "
        "(a Kubernetes object, not a rule)"
    ]


def test_ingress_v1_path_types(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "ing.yaml",
        """\
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: web}
        spec:
          ingressClassName: istio
          defaultBackend:
            service: {name: bootcamp, port: {name: http}}
          rules:
          - host: shop.example.com
            http:
              paths:
              - path: /exact
                pathType: Exact
                backend: {service: {name: bootcamp, port: {number: 8080}}}
          - http:
              paths:
              - path: /app
                pathType: Prefix
                backend: {service: {name: bootcamp, port: {number: 8080}}}
              - path: /v1.*
                pathType: ImplementationSpecific
                backend: {service: {name: bootcamp, port: {number: 8080}}}
        """,
    )
    table = load_rules([f, REGISTRY]).table
    kinds = [(p.host, p.path, p.path_type) for p in table.ingress_paths]
    assert kinds == [
        (None, "", "Default"),
        ("shop.example.com", "/exact", "Exact"),
        (None, "/app", "Prefix"),
        (None, "/v1", "StringPrefix"),
    ]


def test_ingress_paths_ending_in_slash_star_are_prefixes_as_istio_reads_them(
    tmp_path: Path,
) -> None:
    """ImplementationSpecific ``/*`` (the GKE idiom) and ``/api/*`` were exact
    paths nothing requests (every request 404); Istio's
    createFallbackStringMatch makes ``/*`` every path and ``/api/*`` the
    string prefix ``/api``, for v1beta1 paths without pathType too."""
    f = write(
        tmp_path,
        "ing.yaml",
        """\
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: web}
        spec:
          rules:
          - http:
              paths:
              - path: /api/*
                pathType: ImplementationSpecific
                backend: {service: {name: bootcamp, port: {number: 8080}}}
          - host: all.example.com
            http:
              paths:
              - path: /*
                pathType: ImplementationSpecific
                backend: {service: {name: bootcamp, port: {number: 8080}}}
        ---
        apiVersion: extensions/v1beta1
        kind: Ingress
        metadata: {name: old}
        spec:
          rules:
          - host: old.example.com
            http:
              paths:
              - path: /v1/*
                backend: {serviceName: bootcamp, servicePort: 8080}
        """,
    )
    result = load_rules([f, REGISTRY])
    table = result.table
    assert table.ingress(None, "/api/users") is not None
    assert table.ingress(None, "/api") is not None
    assert table.ingress(None, "/web") is None
    for path in ("/", "/index.html", "/a/b?c=d"):
        assert table.ingress("all.example.com", path) is not None
    assert table.ingress("old.example.com", "/v1/x") is not None
    assert table.ingress("old.example.com", "/v2/x") is None
    notes = [n.message for n in result.notes if n.severity == "note"]
    assert notes == [
        "path '/api/*' (ImplementationSpecific) is read as Istio reads it: "
        "the string prefix '/api', which /apix matches too (pathType: Prefix with path "
        "/api matches whole path elements only)",
        "path '/*' (ImplementationSpecific) is read as Istio reads it: every path",
        "path '/v1/*' (no pathType) is read as Istio reads it: "
        "the string prefix '/v1', which /v1x matches too (pathType: Prefix with path "
        "/v1 matches whole path elements only)",
    ]


OTHER = """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other.default.svc.cluster.local]
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  - {number: 9090, name: http-admin, protocol: HTTP}
  endpoints: [{address: 198.18.1.1}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [bootcamp]
  http:
  - route: [{destination: {host: other}}]
"""


def _port_warnings(tmp_path: Path, text: str, *more: str) -> list[str]:
    f = write(tmp_path, "rules.yaml", text)
    notes = [n for n in load_rules([f, *more]).notes if "port required" in n.message]
    assert all(n.severity == "warning" for n in notes)  # printed by validate without -v
    return [f"{n.line}: {n.message}" for n in notes]


def test_a_destination_without_port_on_a_host_of_several_ports_warns(tmp_path: Path) -> None:
    """bootcamp (port 8080) routed to other (ports 9080, 9090) without a
    port: a request goes to other:8080, which does not exist, and every one
    is answered 503. It loaded without a word (Istio's analyzer: IST0112)."""
    assert _port_warnings(tmp_path, OTHER, REGISTRY) == [
        "17: port required: host other.default.svc.cluster.local has ports 9080, 9090; a "
        "request to bootcamp.default.svc.cluster.local port 8080 goes to port 8080 of "
        "other.default.svc.cluster.local, which has none, and is answered 503 (set "
        "destination.port.number)"
    ]
    t = _load(tmp_path, "rules.yaml", OTHER).table
    svc = t.service(HOST)
    assert svc is not None
    assert t.decide(svc, 8080, Request()).endpoints == []  # what the warning says
    # With a port, or to a host of one port: no warning.
    with_port = OTHER.replace("{host: other}", "{host: other, port: {number: 9080}}")
    assert _port_warnings(tmp_path, with_port, REGISTRY) == []
    one_port = OTHER.replace("  - {number: 9090, name: http-admin, protocol: HTTP}\n", "")
    assert _port_warnings(tmp_path, one_port, REGISTRY) == []
    # As a tcp route: never dialled on bootcamp's HTTP port 8080, so no
    # request goes to other:8080 (the route routes nothing: its own warning)
    as_tcp = OTHER.replace("  http:\n", "  tcp:\n")
    assert _port_warnings(tmp_path, as_tcp, REGISTRY) == []
    notes = _load(tmp_path, "rules.yaml", as_tcp).notes
    assert [n.line for n in notes if "this tcp route routes nothing" in n.message] == [17]
    # The routed host not known yet: the dialled port cannot be checked.
    (unknown,) = _port_warnings(tmp_path, OTHER)
    assert "port required: host other.default.svc.cluster.local has ports 9080, 9090" in unknown


def test_a_destination_without_port_that_has_the_dialled_port_does_not_warn(
    tmp_path: Path,
) -> None:
    """Several ports, but every port the route is dialled on among them:
    the dialled port serves (its own host's subsets, or a twin service)."""
    twin = OTHER.replace("number: 9080", "number: 8080")
    assert _port_warnings(tmp_path, twin, REGISTRY) == []
    own = """\
    apiVersion: networking.istio.io/v1alpha3
    kind: ServiceEntry
    metadata: {name: shop}
    spec:
      hosts: [shop.default.svc.cluster.local]
      ports: [{number: 8080, name: http}, {number: 9090, name: http-admin}]
      endpoints: [{address: 198.18.1.1, labels: {version: v1}}]
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: RouteRule
    metadata: {name: shop}
    spec:
      destination: {name: shop}
      route: [{labels: {version: v1}}]
    """
    assert _port_warnings(tmp_path, own) == []


def test_unknown_destinations_warn_but_load(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "rr.yaml",
        """\
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata: {name: reviews}
        spec:
          destination: {name: reviews}
          route:
          - {labels: {version: v9}}
        """,
    )
    result = load_rules([f])
    (w,) = [n for n in result.notes if n.severity == "warning"]
    assert str(w) == (
        f"{f}:1: warning: RouteRule reviews: reviews.default.svc.cluster.local has no "
        "ServiceEntry in these files; this RouteRule applies once one is loaded"
    )
    assert [r.name for r in result.table.routes_for("reviews.default.svc.cluster.local")] == [
        "reviews"
    ]


# -- paths, namespace, domain ---------------------------------------------


def test_namespace_and_domain_are_loader_parameters(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "rr.yaml",
        """\
        apiVersion: networking.istio.io/v1alpha3
        kind: ServiceEntry
        metadata: {name: bootcamp}
        spec:
          hosts: [bootcamp]
          ports: [{number: 8080, name: http}]
          endpoints: [{address: 198.18.0.11}]
        """,
    )
    table = load_rules([f], namespace="shop", domain="corp.internal").table
    (svc,) = table.services()
    assert svc.host == "bootcamp.shop.svc.corp.internal"
    assert table.service_for_host("bootcamp:8080", 8080) is not None
    assert table.service_for_host("bootcamp.shop.svc.corp.internal", 8080) is not None


def test_configmap_mount_directory(tmp_path: Path) -> None:
    """A ConfigMap volume: visible names are symlinks through ..data to a hidden dir."""
    mount = tmp_path / "rules"
    first = mount / "..2024_01_01_00_00_00.000000001"
    first.mkdir(parents=True)
    shutil.copy(REGISTRY, first / "registry.yaml")
    shutil.copy(os.path.join(DATA, "vs-50-v2.yaml"), first / "routes.yaml")
    (first / "README").write_text("not a rule file")
    os.symlink(first.name, mount / "..data")
    for name in ("registry.yaml", "routes.yaml", "README"):
        os.symlink(f"..data/{name}", mount / name)
    (mount / ".hidden.yaml").write_text("this: [is not valid")
    result = load_rules([str(mount)])
    assert result.sources == [str(mount / "registry.yaml"), str(mount / "routes.yaml")]
    (route,) = result.table.routes_for(HOST)
    assert [d.weight for d in route.destinations] == [50, 50]

    # The kubelet's atomic swap: a new timestamped dir, then ..data re-pointed.
    second = mount / "..2024_01_01_00_05_00.000000002"
    second.mkdir()
    shutil.copy(REGISTRY, second / "registry.yaml")
    shutil.copy(os.path.join(DATA, "vs-all-v1.yaml"), second / "routes.yaml")
    os.symlink(second.name, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(first)
    (route,) = load_rules([str(mount)]).table.routes_for(HOST)
    assert [(d.subset.name, d.weight) for d in route.destinations] == [("v1", 100)]


def test_empty_directory_is_an_empty_table_with_a_note(tmp_path: Path) -> None:
    result = load_rules([str(tmp_path)])
    assert result.table.services() == [] and result.sources == []
    (note,) = result.notes
    assert note.severity == "note" and "no *.yaml" in note.message


def test_a_single_path_string_is_accepted() -> None:
    assert load_rules(REGISTRY).sources == [REGISTRY]  # type: ignore[arg-type]


def _cidr_entry(name: str, blocks: str, port: int = 5432) -> str:
    return (
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\n"
        f"metadata: {{name: {name}}}\nspec:\n  hosts: [{name}.example.com]\n"
        f"  addresses: [{blocks}]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n"
        "  resolution: STATIC\n  endpoints: [{address: 192.0.2.1}]\n"
    )


@pytest.mark.parametrize("wide_first", [True, False])
def test_nested_cidr_vips_route_to_the_most_specific_block_with_a_warning(
    tmp_path: Path, wide_first: bool
) -> None:
    """A broad block (10.0.0.0/8) and a service's own inside it
    (10.1.2.0/24) on one port, in either order: Istio admits them (a
    wildcard listener whose filter chains match the blocks, Envoy's
    longest prefix picks), so the /24's addresses go to db and the rest
    of the /8 to wide, where the first listed took them all (db was
    unreachable at its own VIP when listed second); a warning at the
    inner block's ServiceEntry names both. A block of another port, or
    disjoint blocks, say nothing."""
    wide = _cidr_entry("wide", "10.0.0.0/8")
    db = _cidr_entry("db", "10.1.2.0/24")
    other = _cidr_entry("other", "10.1.0.0/16", port=6000) + _cidr_entry("far", "11.0.0.0/8")
    text = (wide + db if wide_first else db + wide) + other
    f = write(tmp_path, "se.yaml", text)
    result = load_rules([f])
    warnings = [d for d in result.notes if d.severity == "warning"]
    [w] = warnings
    db_line = text.splitlines().index("  hosts: [db.example.com]") + 1
    wide_line = text.splitlines().index("  hosts: [wide.example.com]") + 1
    assert (w.file, w.line, w.name) == (f, db_line, "db")
    assert w.message == (
        "address block 10.1.2.0/24 of db.example.com lies inside 10.0.0.0/8, a VIP block of "
        f"wide.example.com ({f}:{wide_line}), on port 5432: connections to its addresses go to "
        "db.example.com, the most specific block (as Envoy's longest prefix match picks it for "
        "Istio), the rest of 10.0.0.0/8 to wide.example.com; if that is not meant, give them "
        "disjoint blocks"
    )
    table = result.table

    def host(ip: str, port: int = 5432) -> str | None:
        found = table.service_for_address(ip, port)
        return None if found is None else found[0].host

    assert host("10.1.2.0") == host("10.1.2.255") == "db.example.com"
    assert host("10.1.3.0") == host("10.1.1.255") == host("10.255.0.1") == "wide.example.com"
    assert host("10.1.2.7", 6000) == "other.example.com"
    assert host("11.1.2.7") == "far.example.com"


def test_a_cidr_vip_listed_by_two_services_on_one_port_is_an_error(tmp_path: Path) -> None:
    """The same block on the same port in two services is the VIP clash,
    an error (Envoy refuses two filter chains of one match), not the
    nesting warning."""
    text = _cidr_entry("a", "10.1.0.0/16") + _cidr_entry("b", "10.1.0.0/16")
    f = write(tmp_path, "se.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_rules([f])
    [err] = info.value.errors
    assert "address 10.1.0.0/16 port 5432 is already the VIP of a.example.com" in err.message
    assert not [d for d in info.value.diagnostics if d.severity == "warning"]
