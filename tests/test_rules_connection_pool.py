"""A DestinationRule's ``trafficPolicy.connectionPool``: what is read, what
is refused (by name, with file and line), and the settings each endpoint's
upstream pool gets (``RouteTable.pool_settings``): a subset's own
connectionPool replaces the rule's whole, and an endpoint that several
destinations reach takes the strictest of each field.

The bootcamp registry (tests/data/rules/registry.yaml): 198.18.0.11 and
198.18.0.12 are v1, 198.18.0.13 is v2, all on port 8080.
"""

from __future__ import annotations

import itertools
import json
import random
import textwrap
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.rules import load_rules
from l4proxy.rules.dns import NameState, resolved_table
from l4proxy.rules.routing import PoolSettings, RouteTable
from tests.test_config_errors import REGISTRY, errors_of

HOST = "bootcamp.default.svc.cluster.local"
V1A, V1B, V2 = ("198.18.0.11", 8080), ("198.18.0.12", 8080), ("198.18.0.13", 8080)

DR_HEAD = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bootcamp}
spec:
  host: bootcamp
"""


def load(tmp_path: Path, text: str, *extra: str, name: str = "rules.yaml") -> RouteTable:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return load_rules([str(f), *extra, REGISTRY]).table


def vs(*routes: str) -> str:
    """A VirtualService for bootcamp with these http routes (YAML flow maps)."""
    lines = "".join(f"  - {r}\n" for r in routes)
    return (
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: bootcamp}}\nspec:\n  hosts: [bootcamp]\n  http:\n{lines}"
    )


TO_V1 = "{route: [{destination: {host: bootcamp, subset: v1}}]}"
JASON_TO_V2 = (
    "{match: [{headers: {end-user: {exact: jason}}}], "
    "route: [{destination: {host: bootcamp, subset: v2}}]}"
)
TO_HOST = "{route: [{destination: {host: bootcamp}}]}"


# -- Istio's circuit-breaking task ---------------------------------------

# tasks/traffic-management/circuit-breaking: its DestinationRule for httpbin
# (here bootcamp), as the task gives it
CIRCUIT_BREAKING = (
    DR_HEAD
    + """\
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""
)


# (tests/test_rules_circuit_breakers.py: it loads whole, circuit breakers
# and outlierDetection included)


# -- refused and invalid fields ------------------------------------------

REFUSED = [
    ("tcp", "tcpKeepalive", "{time: 7200s}", "no TCP keepalive"),
    ("tcp", "maxConnectionDuration", "1h", "maxRequestsPerConnection"),
    ("tcp", "idleTimeout", "1h", "http.idleTimeout"),
    ("http", "maxRetries", "3", "retries.attempts"),
    ("http", "useClientProtocol", "true", "HTTP/1.1"),
    ("http", "maxConcurrentStreams", "100", "HTTP/1.1"),
]


@pytest.mark.parametrize(("section", "field", "value", "hint"), REFUSED)
@pytest.mark.parametrize("where", ["rule", "subset"])
def test_every_other_field_of_istio_s_is_refused_by_name(
    tmp_path: Path, section: str, field: str, value: str, hint: str, where: str
) -> None:
    pool = f"connectionPool:\n  {section}:\n    {field}: {value}\n"
    if where == "rule":
        text = DR_HEAD + "  trafficPolicy:\n" + textwrap.indent(pool, "    ")
        path, line = "spec.trafficPolicy", 9
    else:
        text = (
            DR_HEAD
            + "  subsets:\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n"
            + textwrap.indent(pool, "      ")
        )
        path, line = "spec.subsets[0].trafficPolicy", 12
    errs = errors_of(tmp_path, text)
    assert len(errs) == 1, errs
    want = f"{path}.connectionPool.{section}.{field} is not implemented by l4proxy; "
    assert errs[0].message.startswith(want), errs[0]
    assert hint in errs[0].message
    assert (errs[0].line, errs[0].file.endswith("rules.yaml")) == (line, True)


INVALID = [
    ("http", "maxRequestsPerConnection", "-1", "maxRequestsPerConnection -1 is not in range"),
    (
        "http",
        "maxRequestsPerConnection",
        str(2**29 + 1),
        f"{2**29 + 1} is not in range 0..{2**29}",
    ),
    ("http", "maxRequestsPerConnection", '"1"', "must be an integer, not the string '1'"),
    ("http", "idleTimeout", "0s", "idleTimeout '0s' must be whole milliseconds from 1ms"),
    ("http", "idleTimeout", "500us", "idleTimeout '500us' must be whole milliseconds from 1ms"),
    ("http", "idleTimeout", "30", "must be a duration string"),
    ("tcp", "connectTimeout", "0s", "connectTimeout '0s' must be whole milliseconds from 1ms"),
    ("tcp", "connectTimeout", "1.5ms", "connectTimeout '1.5ms' must be whole milliseconds"),
    ("tcp", "connectTimeout", "10x", "connectTimeout '10x' is not a duration"),
    ("http", "h2UpgradePolicy", "UPGRADE", "h2UpgradePolicy UPGRADE is not implemented"),
    ("http", "h2UpgradePolicy", "NEVER", "h2UpgradePolicy 'NEVER' is not known"),
    ("http", "maxRequestPerConnection", "1", "unknown field spec.trafficPolicy.connectionPool"),
    ("tcp", "connectTimout", "1s", "unknown field spec.trafficPolicy.connectionPool.tcp"),
]


@pytest.mark.parametrize(("section", "field", "value", "expected"), INVALID)
def test_a_wrong_value_is_an_error_at_its_line(
    tmp_path: Path, section: str, field: str, value: str, expected: str
) -> None:
    text = (
        DR_HEAD
        + f"  trafficPolicy:\n    connectionPool:\n      {section}:\n        {field}: {value}\n"
    )
    errs = errors_of(tmp_path, text)
    assert len(errs) == 1, errs
    assert expected in errs[0].message, errs[0]
    assert errs[0].line == 9 and errs[0].file.endswith("rules.yaml")


def test_an_unknown_section_is_an_unknown_field(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, DR_HEAD + "  trafficPolicy:\n    connectionPool:\n      grpc: {}\n")
    assert [(e.line, e.message) for e in errs] == [
        (8, "unknown field spec.trafficPolicy.connectionPool.grpc (expected one of: http, tcp)")
    ]


@pytest.mark.parametrize("policy", ["DEFAULT", "DO_NOT_UPGRADE"])
def test_h2_upgrade_policy_default_and_do_not_upgrade_do_nothing(
    tmp_path: Path, policy: str
) -> None:
    text = (
        DR_HEAD
        + f"  trafficPolicy:\n    connectionPool:\n      http: {{h2UpgradePolicy: {policy}}}\n"
    )
    table = load(tmp_path, text)
    assert table.pool_settings() == {}
    assert table == load(tmp_path, DR_HEAD, name="plain.yaml")


def test_durations_in_istio_s_format(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + """\
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms}
      http: {idleTimeout: 1m30s, maxRequestsPerConnection: 0}
"""
    )
    # (maxRequestsPerConnection 0, Istio's default, is not set: the flag's)
    want = PoolSettings(idle_timeout=90.0, connect_timeout=0.25)
    assert load(tmp_path, text).pool_settings() == {V1A: want, V1B: want, V2: want}


# -- subsets: replaced whole; several destinations: the strictest -----------

RULE_AND_V2 = (
    DR_HEAD
    + """\
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 30ms}
      http: {maxRequestsPerConnection: 100, idleTimeout: 30s}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        http: {maxRequestsPerConnection: 5}
"""
)
RULE = PoolSettings(max_requests=100, idle_timeout=30.0, connect_timeout=0.03)
V2_OWN = PoolSettings(max_requests=5)


def test_a_subset_s_connection_pool_replaces_the_rule_s_whole(tmp_path: Path) -> None:
    """v2's endpoint, reached only through subset v2 (the catch-all goes to
    v1), has v2's settings alone: not the rule's idle and connect timeouts."""
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: V2_OWN}


def test_a_subset_without_its_own_takes_the_rule_s(tmp_path: Path) -> None:
    text = RULE_AND_V2.replace("maxRequestsPerConnection: 5", "h2UpgradePolicy: DEFAULT")
    table = load(tmp_path, text + vs(JASON_TO_V2, TO_V1))
    # an empty-handed connectionPool still replaces the rule's: v2 has none
    assert table.pool_settings() == {V1A: RULE, V1B: RULE}
    untouched = RULE_AND_V2.replace(
        "    trafficPolicy:\n      connectionPool:\n        http: {maxRequestsPerConnection: 5}\n",
        "",
    )
    table = load(tmp_path, untouched + vs(JASON_TO_V2, TO_V1), name="inherits.yaml")
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: RULE}


def test_an_endpoint_of_a_subset_also_reached_through_the_bare_host_takes_the_strictest(
    tmp_path: Path,
) -> None:
    """v2's own says nothing of timeouts: through v2 the endpoint's
    connections have the flags', through the host the rule's; the stricter
    of each is the sidecar's to take (or_flag), knowing its flags."""
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_HOST))
    both = PoolSettings(5, 30.0, 0.03, or_flag=frozenset({"idle_timeout", "connect_timeout"}))
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: both}
    flags = PoolSettings(max_requests=0, idle_timeout=10.0, connect_timeout=5.0)
    assert both.resolved(flags) == PoolSettings(5, 10.0, 0.03)


def test_requests_no_route_takes_reach_the_bare_host(tmp_path: Path) -> None:
    """Without a catch-all route, a connection may take no route (the round
    robin over every endpoint): the rule's settings hold on every endpoint."""
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2))
    both = PoolSettings(5, 30.0, 0.03, or_flag=frozenset({"idle_timeout", "connect_timeout"}))
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: both}


def test_no_route_at_all_is_the_bare_host(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_V2)
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: RULE}


def test_zero_requests_is_the_flag_s_and_a_destination_without_a_field_bounds_it_by_the_flag(
    tmp_path: Path,
) -> None:
    """The rule's maxRequestsPerConnection 0 sets nothing (Istio's pilot
    sets Envoy's only above 0), so v1's endpoints have no settings; v2's,
    also reached through the host (the flags), have v2's or the flag's,
    whichever is stricter: resolved with the flags, a looser flag gives
    way, a stricter one wins, and unlimited (0) counts as the largest."""
    text = (
        DR_HEAD
        + """\
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 0}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        http: {maxRequestsPerConnection: 7, idleTimeout: 2s}
"""
    )
    table = load(tmp_path, text + vs(JASON_TO_V2, TO_HOST))
    v2 = PoolSettings(7, 2.0, or_flag=frozenset({"max_requests", "idle_timeout"}))
    assert table.pool_settings() == {V2: v2}
    assert v2.resolved(PoolSettings(0, 60.0, 10.0)) == PoolSettings(7, 2.0, 10.0)
    assert v2.resolved(PoolSettings(3, 1.0, 10.0)) == PoolSettings(3, 1.0, 10.0)


# Service NAME (a str.format template): 10.0.0.1, which every such Service
# has, and its OWN endpoint, both on port 8080; its DestinationRule's
# trafficPolicy follows (YAML lines under ``trafficPolicy:``)
SHARED_SERVICE = """\
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - address: 10.0.0.1
    ports: {{http: 8080}}
  - address: {own}
    ports: {{http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {name}
  trafficPolicy:
"""
SHARED = SHARED_SERVICE + "    connectionPool:\n{pool}\n"


def test_an_endpoint_two_services_share_takes_the_strictest_whatever_the_file_order(
    tmp_path: Path,
) -> None:
    a = SHARED.format(
        name="a", own="10.0.0.2", pool="      http: {maxRequestsPerConnection: 3, idleTimeout: 10s}"
    )
    b = SHARED.format(
        name="b",
        own="10.0.0.3",
        pool="      http: {maxRequestsPerConnection: 7, idleTimeout: 20s}\n"
        "      tcp: {connectTimeout: 20ms}",
    )
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(a)
    fb.write_text(b)
    ab = load_rules([str(fa), str(fb)]).table
    ba = load_rules([str(fb), str(fa)]).table
    want = {
        # (a sets no connect timeout: 20ms, or the flag's if shorter)
        ("10.0.0.1", 8080): PoolSettings(3, 10.0, 0.02, or_flag=frozenset({"connect_timeout"})),
        ("10.0.0.2", 8080): PoolSettings(max_requests=3, idle_timeout=10.0),
        ("10.0.0.3", 8080): PoolSettings(max_requests=7, idle_timeout=20.0, connect_timeout=0.02),
    }
    assert ab.pool_settings() == want
    assert ba.pool_settings() == want
    assert list(ab.pool_settings()) == list(ba.pool_settings()) == sorted(want)
    assert ab == ba


def test_the_endpoints_are_those_the_services_name(tmp_path: Path) -> None:
    """The keys are (address, target port) as ``svc.endpoints`` has them
    (the pairs the relay's pools are keyed by), not the service port."""
    a = SHARED.format(name="a", own="10.0.0.2", pool="      http: {maxRequestsPerConnection: 3}")
    f = tmp_path / "a.yaml"
    f.write_text(a)
    table = load_rules([str(f)]).table
    named = {(ep.address, ep.port) for svc in table.services() for ep in svc.endpoints}
    assert set(table.pool_settings()) == named == {("10.0.0.1", 8080), ("10.0.0.2", 8080)}


def test_strictest_is_order_free() -> None:
    """Any order of merging gives the same settings (seeded draws)."""
    rng = random.Random(20261205)
    values: list[PoolSettings] = [
        PoolSettings(
            rng.choice([None, 0, 1, 2, 50]),
            rng.choice([None, 0.5, 30.0]),
            rng.choice([None, 0.01, 1.0]),
        )
        for _ in range(6)
    ]
    results = set()
    for order in itertools.permutations(values):
        acc = PoolSettings()
        for v in order:
            acc = acc.strictest(v)
        results.add(acc)
    assert len(results) == 1
    assert PoolSettings(0).strictest(PoolSettings(9)) == PoolSettings(9)
    assert PoolSettings(9).strictest(PoolSettings(0)) == PoolSettings(9)
    assert PoolSettings(None, 3.0).strictest(PoolSettings(0, None)) == PoolSettings(0, 3.0)
    assert not PoolSettings().is_set and PoolSettings(max_requests=0).is_set


# -- equality, JSON, validate -v ------------------------------------------


def test_settings_take_part_in_equality(tmp_path: Path) -> None:
    base = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1), name="a.yaml")
    same = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1), name="b.yaml")
    assert base == same
    other_rule = RULE_AND_V2.replace("idleTimeout: 30s", "idleTimeout: 31s")
    assert base != load(tmp_path, other_rule + vs(JASON_TO_V2, TO_V1), name="c.yaml")
    other_subset = RULE_AND_V2.replace("maxRequestsPerConnection: 5", "maxRequestsPerConnection: 6")
    assert base != load(tmp_path, other_subset + vs(JASON_TO_V2, TO_V1), name="d.yaml")
    # without routes, only the host's own settings tell the tables apart
    unrouted = load(tmp_path, RULE_AND_V2, name="g.yaml")
    assert unrouted != load(tmp_path, other_rule, name="h.yaml")
    # an empty connectionPool on the rule is no settings at all
    empty = DR_HEAD + "  trafficPolicy:\n    connectionPool: {}\n"
    assert load(tmp_path, empty, name="e.yaml") == load(tmp_path, DR_HEAD, name="f.yaml")


def test_the_table_s_json_says_the_settings(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    dump = json.loads(json.dumps(table.to_json()))
    # (the circuit breakers, unset here: tests/test_rules_circuit_breakers.py)
    unlimited = {
        "max_connections": None,
        "http1_max_pending_requests": None,
        "http2_max_requests": None,
    }
    rule = {
        "max_requests_per_connection": 100,
        "idle_timeout": 30.0,
        "connect_timeout": 0.03,
        **unlimited,
    }
    v2 = {
        "max_requests_per_connection": 5,
        "idle_timeout": None,
        "connect_timeout": None,
        **unlimited,
    }
    assert dump["connection_pools"] == {
        "198.18.0.11:8080": rule,
        "198.18.0.12:8080": rule,
        "198.18.0.13:8080": v2,
    }
    (svc,) = dump["services"]
    assert svc["connection_pool"] == rule
    first, second = dump["routes"][HOST]
    assert first["route"][0]["connection_pool"] == v2
    assert second["route"][0]["connection_pool"] == rule
    bare = json.loads(json.dumps(load(tmp_path, DR_HEAD, name="bare.yaml").to_json()))
    assert bare["connection_pools"] == {} and bare["services"][0]["connection_pool"] is None


def test_validate_verbose_prints_each_endpoint_s_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    code = main(["validate", "-v", str(f), REGISTRY])
    out, err = capsys.readouterr()
    assert code == 0, err
    rule = "100 requests per connection, idle timeout 30 s, connect timeout 30 ms"
    assert f"load balancer ROUND_ROBIN; connection pool: {rule}\n" in out
    assert f"      198.18.0.11:8080  app=bootcamp,version=v1  pool: {rule}\n" in out
    assert (
        "      198.18.0.13:8080  app=bootcamp,version=v2  pool: 5 requests per connection\n" in out
    )
    assert "subset v2 (version=v2; ROUND_ROBIN; pool: 5 requests per connection)\n" in out


def test_validate_names_a_refused_field_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "keepalive.yaml"
    f.write_text(
        DR_HEAD + "  trafficPolicy:\n    connectionPool:\n      tcp:\n"
        "        maxConnections: 1\n        tcpKeepalive: {time: 7200s}\n"
    )
    code = main(["validate", str(f), REGISTRY])
    _, err = capsys.readouterr()
    assert code == 1
    assert (
        f"{f}:10: DestinationRule bootcamp: spec.trafficPolicy.connectionPool.tcp.tcpKeepalive "
        "is not implemented by l4proxy" in err
    )


# an HTTPRoute of the bootcamp Service (GAMMA: its parent is the Service)
HTTP_ROUTE = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bootcamp}
spec:
  parentRefs:
  - {group: "", kind: Service, name: bootcamp}
  rules:
  - backendRefs: [{name: bootcamp, port: 8080}]
"""


def test_an_http_route_s_backend_takes_its_destination_rule_s_settings(tmp_path: Path) -> None:
    """As in Istio, a DestinationRule applies to an HTTPRoute's backends too."""
    head = (
        DR_HEAD
        + "  trafficPolicy:\n    connectionPool:\n      http: {maxRequestsPerConnection: 2}\n"
    )
    table = load(tmp_path, head + HTTP_ROUTE, name="hr.yaml")
    two = PoolSettings(max_requests=2)
    assert table.pool_settings() == {V1A: two, V1B: two, V2: two}
    (route,) = table.routes_for(HOST)
    assert route.destinations[0].subset.pool == two


def test_the_settings_follow_a_dns_name_to_its_addresses(tmp_path: Path) -> None:
    """A DNS ServiceEntry's endpoint name is replaced by its addresses when
    they resolve (``resolved_table``): the rule's settings go with them."""
    text = (
        DR_HEAD.replace("host: bootcamp", "host: web.example.com")
        + """\
  trafficPolicy:
    connectionPool:
      http: {idleTimeout: 5s}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""
    )
    f = tmp_path / "web.yaml"
    f.write_text(text)
    base = load_rules([str(f)]).table
    five = PoolSettings(idle_timeout=5.0)
    assert base.pool_settings() == {("web.example.com", 80): five}
    state = NameState("web.example.com", ("192.0.2.1", "192.0.2.2"), resolved=True)
    table = resolved_table(base, {"web.example.com": state})
    assert table.pool_settings() == {("192.0.2.1", 80): five, ("192.0.2.2", 80): five}


def test_a_looser_rule_does_not_loosen_another_service_s_traffic(tmp_path: Path) -> None:
    """a's rule is looser than the flags (an hour idle); b has no rule and
    shares 10.0.0.1 with a: through b that endpoint's connections have the
    flags, so the shared endpoint has a's hour or the flag's, whichever is
    shorter, while a's own endpoint has a's hour."""
    a = SHARED.format(
        name="a", own="10.0.0.2", pool="      http: {maxRequestsPerConnection: 0, idleTimeout: 1h}"
    )
    b = SHARED.format(name="b", own="10.0.0.3", pool="      http: {}").replace(
        "  trafficPolicy:\n    connectionPool:\n      http: {}\n", ""
    )
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(a)
    fb.write_text(b)
    table = load_rules([str(fa), str(fb)]).table
    shared = PoolSettings(idle_timeout=3600.0, or_flag=frozenset({"idle_timeout"}))
    own = PoolSettings(idle_timeout=3600.0)
    assert table.pool_settings() == {("10.0.0.1", 8080): shared, ("10.0.0.2", 8080): own}
    flags = PoolSettings(max_requests=100, idle_timeout=30.0, connect_timeout=10.0)
    assert shared.resolved(flags) == flags
    assert own.resolved(flags) == PoolSettings(100, 3600.0, 10.0)
    assert table.to_json()["connection_pools"]["10.0.0.1:8080"]["or_flag"] == ["idle_timeout"]


def test_a_retry_budget_is_refused_by_name(tmp_path: Path) -> None:
    """Newer Istio's trafficPolicy.retryBudget: not an unknown field (a
    typo), but one the sidecar does not implement, with its line."""
    errs = errors_of(tmp_path, DR_HEAD + "  trafficPolicy:\n    retryBudget: {percent: 20}\n")
    assert [(e.line, e.message.split(" ", 1)[0]) for e in errs] == [
        (7, "spec.trafficPolicy.retryBudget")
    ]
    assert "not implemented" in errs[0].message and "attempts" in errs[0].message
