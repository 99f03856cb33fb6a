"""A DestinationRule's ``trafficPolicy.portLevelSettings``, at the rule and
in each subset: each entry's load balancer, connection pool and outlier
detection hold for the traffic to its service port and no other; an entry
replaces the policy whole on its port (what it leaves out is the default,
not the rule's: Istio's API and pilot's GetPortLevelTrafficPolicy); a
subset's policy on a port is pilot's MergeSubsetTrafficPolicy (the rule's
entry for the port, else the rule's own; then the subset's entry for the
port whole, else each component the subset sets); what is an error (with
file and line); what ``choices`` hands the compiled relay against what
``decide`` draws; what ``validate -v`` and ``/config_dump`` say; and a
port's connection pool through a real worker on both relay twins.

``WEB`` below has two HTTP ports, 8080 and 9090, each served by its
endpoints on the same port: 198.18.2.1 and 198.18.2.2 are v1, 198.18.2.3
is v2.
"""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import HASH_HEADER, HashOn, endpoint_hash, hash_key, hash_order
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.dns import resolved_table
from l4proxy.rules.routing import (
    NO_HEALTHY_STATUS,
    OutlierPolicy,
    PoolSettings,
    Request,
    RouteTable,
    Service,
    Subset,
)
from tests._round_robin import rotation
from tests._scripted import Scripted, _response, _status
from tests._worker import _worker_twin, gateway_worker

HOST = "web.default.svc.cluster.local"
WEB = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: [198.19.0.30]
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  - {number: 9090, name: http-admin, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 198.18.2.1, labels: {app: web, version: v1}}
  - {address: 198.18.2.2, labels: {app: web, version: v1}}
  - {address: 198.18.2.3, labels: {app: web, version: v2}}
"""
ADDRESSES = ("198.18.2.1", "198.18.2.2", "198.18.2.3")
V1_ADDRESSES = ADDRESSES[:2]
DR_HEAD = """\
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
"""
X_USER = HashOn(HASH_HEADER, "x-user")
MAX_ONE = PoolSettings(max_requests=1)


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "rules.yaml"
    f.write_text(WEB + textwrap.dedent(text))
    return str(f)


def load(tmp_path: Path, text: str, *, seed: int = 7) -> RouteTable:
    return load_rules([write(tmp_path, text)], seed=seed).table


def on(port: int, addresses: tuple[str, ...] = ADDRESSES) -> list[tuple[str, int]]:
    return [(a, port) for a in addresses]


def vs(*routes: str) -> str:
    """A VirtualService for web with these http routes (YAML flow maps)."""
    lines = "".join(f"  - {r}\n" for r in routes)
    return (
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: web}}\nspec:\n  hosts: [web]\n  http:\n{lines}"
    )


def web(table: RouteTable) -> Service:
    svc = table.service(HOST)
    assert svc is not None
    return svc


def _line(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert lines, marker
    return lines[0]


# -- each component on its port, not the other --------------------------------

PORT_9090 = """\
  trafficPolicy:
    portLevelSettings:
    - port: {number: 9090}
"""


def test_a_connection_pool_holds_on_its_port_only(tmp_path: Path) -> None:
    table = load(
        tmp_path,
        DR_HEAD + PORT_9090 + "      connectionPool: {http: {maxRequestsPerConnection: 1}}\n",
    )
    assert table.pool_settings() == dict.fromkeys(on(9090), MAX_ONE)
    assert (table.pool(HOST, 9090), table.pool(HOST, 8080)) == (MAX_ONE, PoolSettings())


def test_a_load_balancer_holds_on_its_port_only(tmp_path: Path) -> None:
    table = load(
        tmp_path,
        DR_HEAD + PORT_9090 + "      loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n",
    )
    request = Request(path="/", headers={"x-user": "jason"})
    (hashed,) = table.choices(web(table), 9090, request).subsets
    (plain,) = table.choices(web(table), 8080, request).subsets
    assert (hashed.policy, hashed.hash_on) == ("HASH", X_USER)
    assert (plain.policy, plain.hash_on) == ("ROUND_ROBIN", None)
    # decide: one endpoint for the user on 9090, each in turn on 8080
    firsts = {
        p: [table.decide(web(table), p, request).endpoints[0] for _ in range(6)]
        for p in (8080, 9090)
    }
    assert len(set(firsts[9090])) == 1
    rotation([e.address for e in firsts[8080]], ADDRESSES)


def test_an_outlier_detection_holds_on_its_port_only(tmp_path: Path) -> None:
    table = load(
        tmp_path, DR_HEAD + PORT_9090 + "      outlierDetection: {consecutive5xxErrors: 2}\n"
    )
    assert table.outlier_policies() == dict.fromkeys(on(9090), OutlierPolicy(consecutive_5xx=2))
    # every endpoint ejected: 503 no healthy upstream where the policy holds,
    # Envoy's panic (all of them) where none does
    down = table.decide(web(table), 9090, Request(path="/"), healthy=lambda e: False)
    panic = table.decide(web(table), 8080, Request(path="/"), healthy=lambda e: False)
    assert (down.status, down.endpoints) == (NO_HEALTHY_STATUS, [])
    assert len(panic.endpoints) == 3


# -- an entry replaces the policy whole on its port ----------------------------

RULE_AND_PORT = (
    DR_HEAD
    + """\
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool:
      http: {maxRequestsPerConnection: 5, idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 3}
    portLevelSettings:
    - port: {number: 9090}
      connectionPool:
        tcp: {connectTimeout: 100ms}
"""
)
RULE_POOL = PoolSettings(max_requests=5, idle_timeout=30.0)
RULE_OUTLIER = OutlierPolicy(consecutive_5xx=3)


def test_a_port_s_connection_pool_does_not_inherit_the_rule_s(tmp_path: Path) -> None:
    """Port 9090's connectionPool sets only a connect timeout: its
    endpoints have no maxRequestsPerConnection nor idle timeout (the
    flags'), not the rule's 5 and 30 s."""
    table = load(tmp_path, RULE_AND_PORT)
    settings = table.pool_settings()
    assert {k: v for k, v in settings.items() if k[1] == 9090} == dict.fromkeys(
        on(9090), PoolSettings(connect_timeout=0.1)
    )
    assert {k: v for k, v in settings.items() if k[1] == 8080} == dict.fromkeys(on(8080), RULE_POOL)


def test_what_a_port_s_entry_leaves_out_is_the_default(tmp_path: Path) -> None:
    """The entry says nothing of load balancer and outlier detection: on
    9090 round robin and none, not the rule's RANDOM and 5xx x3."""
    table = load(tmp_path, RULE_AND_PORT)
    assert (table.load_balancer(HOST, 9090), table.outlier(HOST, 9090)) == ("ROUND_ROBIN", None)
    assert (table.load_balancer(HOST, 8080), table.outlier(HOST, 8080)) == ("RANDOM", RULE_OUTLIER)
    assert set(table.outlier_policies()) == set(on(8080))


# -- subsets: pilot's MergeSubsetTrafficPolicy ----------------------------------

SUBSETS = (
    DR_HEAD
    + """\
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 5}}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9090}
        connectionPool: {tcp: {maxConnections: 7}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 1}
  - name: all
    labels: {app: web}
"""
)
TO_EACH = (
    "{route: [{destination: {host: web, subset: v1}, weight: 40}, "
    "{destination: {host: web, subset: v2}, weight: 30}, "
    "{destination: {host: web, subset: all}, weight: 30}]}"
)


def _subsets(table: RouteTable) -> dict[str, Subset]:
    (route,) = table.routes_for(HOST)
    return {d.subset.name: d.subset for d in route.destinations}


def _policy(s: Subset) -> tuple[str, PoolSettings, OutlierPolicy | None]:
    return s.load_balancer, s.pool, s.outlier


def test_a_subset_s_port_entry_replaces_everything_on_its_port(tmp_path: Path) -> None:
    """v1 on 9090: its own entry alone (max 7 connections; round robin,
    not the rule's port's LEAST_REQUEST; no maxRequestsPerConnection, not
    the rule's 5). On 8080: the rule's own."""
    v1 = _subsets(load(tmp_path, SUBSETS + vs(TO_EACH)))["v1"]
    assert _policy(v1.on_port(9090)) == ("ROUND_ROBIN", PoolSettings(max_connections=7), None)
    assert _policy(v1.on_port(8080)) == ("ROUND_ROBIN", PoolSettings(max_requests=5), None)


def test_a_subset_s_own_components_go_over_the_rule_s_port_entry(tmp_path: Path) -> None:
    """v2 sets an outlierDetection only: on 9090 the rule's entry for the
    port (LEAST_REQUEST, no pool: the entry replaced the rule's 5) with v2's
    outlier detection; on 8080 the rule's own with it."""
    v2 = _subsets(load(tmp_path, SUBSETS + vs(TO_EACH)))["v2"]
    od = OutlierPolicy(consecutive_5xx=1)
    assert _policy(v2.on_port(9090)) == ("LEAST_REQUEST", PoolSettings(), od)
    assert _policy(v2.on_port(8080)) == ("ROUND_ROBIN", PoolSettings(max_requests=5), od)


def test_a_subset_without_a_policy_takes_the_rule_s_on_each_port(tmp_path: Path) -> None:
    table = load(tmp_path, SUBSETS + vs(TO_EACH))
    every = _subsets(table)["all"]
    for port in (8080, 9090):
        own = (table.load_balancer(HOST, port), table.pool(HOST, port), table.outlier(HOST, port))
        assert _policy(every.on_port(port)) == own
    assert table.load_balancer(HOST, 9090) == "LEAST_REQUEST"


def test_each_endpoint_takes_the_strictest_of_the_destinations_on_its_port(
    tmp_path: Path,
) -> None:
    """On 9090 v1's endpoints are reached through v1 (max 7 connections)
    and through all (the rule's port: no pool), v2's through v2 and all
    (neither); on 8080 all three through the rule's own (5)."""
    settings = load(tmp_path, SUBSETS + vs(TO_EACH)).pool_settings()
    five = PoolSettings(max_requests=5)
    assert settings == {
        **dict.fromkeys(on(8080), five),
        **dict.fromkeys(on(9090, V1_ADDRESSES), PoolSettings(max_connections=7)),
    }


def test_a_subset_s_port_outlier_detection_holds_its_endpoints_on_that_port(
    tmp_path: Path,
) -> None:
    """v2's entry for 9090: its endpoint there is held to it (no route
    leaves a request to the bare host); with it ejected, a mirror to v2
    (as choices hands it the relay) copies nothing on 9090 (none healthy
    is none), and on 8080, without a policy, goes to it anyway (Envoy's
    panic)."""
    text = (
        DR_HEAD
        + "  subsets:\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n"
        + "      portLevelSettings:\n      - port: {number: 9090}\n"
        + "        outlierDetection: {consecutive5xxErrors: 2}\n"
        + vs(
            "{route: [{destination: {host: web, subset: v2}}], "
            "mirror: {host: web, subset: v2}, mirrorPercentage: {value: 100}}"
        )
    )
    table = load(tmp_path, text)
    assert table.outlier_policies() == {("198.18.2.3", 9090): OutlierPolicy(consecutive_5xx=2)}
    copies = {
        port: table.choices(web(table), port, Request(path="/"), healthy=lambda e: False)
        .mirrors[0]
        .endpoints
        for port in (8080, 9090)
    }
    assert copies == {8080: (("198.18.2.3", 8080),), 9090: ()}


# -- decide and choices agree, port by port -------------------------------------

AGREE = (
    DR_HEAD
    + """\
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {consistentHash: {httpHeaderName: x-other}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 8080}
        loadBalancer: {simple: RANDOM}
"""
)


@pytest.mark.parametrize("port", [8080, 9090])
@pytest.mark.parametrize("routed", [True, False], ids=["subset v1", "default route"])
def test_decide_draws_what_choices_hands_the_compiled_relay(
    tmp_path: Path, port: int, routed: bool
) -> None:
    text = AGREE + (vs("{route: [{destination: {host: web, subset: v1}}]}") if routed else "")
    table = load(tmp_path, text)
    for user in ("jason", "ann", "bob", "eve"):
        request = Request(path="/", headers={"x-user": user, "x-other": user[::-1]})
        (ws,) = table.choices(web(table), port, request).subsets
        first = table.decide(web(table), port, request).endpoints[0]
        if ws.policy != "HASH":
            assert (routed, port, ws.policy, ws.hash_on) == (True, 8080, "RANDOM", None)
            assert first in ws.endpoints
            continue
        assert ws.hash_on is not None
        value = (user if ws.hash_on.name == "x-user" else user[::-1]).encode()
        eps = [(e.address, e.port) for e in ws.endpoints]
        want = eps[hash_order(hash_key(value), [endpoint_hash(e) for e in eps])[0]]
        assert (first.address, first.port) == want, (user, ws.hash_on)
    # the port's own hash where it has one
    (ws,) = table.choices(web(table), port, Request(path="/")).subsets
    want_on = {(False, 8080): "x-user", (False, 9090): "x-other", (True, 9090): "x-other"}
    assert (ws.hash_on.name if ws.hash_on else None) == want_on.get((routed, port))


def test_a_destination_with_a_port_takes_that_port_s_policy(tmp_path: Path) -> None:
    """A route dialled on 8080 that sends to port 9090 is balanced by
    9090's policy (Istio keys a cluster, and its policy, on the target's
    service port), not by the dialled port's."""
    text = (
        DR_HEAD
        + PORT_9090
        + "      loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n"
        + vs("{route: [{destination: {host: web, port: {number: 9090}}}]}")
    )
    table = load(tmp_path, text)
    (ws,) = table.choices(web(table), 8080, Request(path="/")).subsets
    assert (ws.policy, ws.hash_on, {e.port for e in ws.endpoints}) == ("HASH", X_USER, {9090})


# -- errors at their file and line ------------------------------------------------

ENTRY_ERRORS = [
    (
        "no port",
        "    - connectionPool: {tcp: {maxConnections: 1}}\n",
        "connectionPool",
        "spec.trafficPolicy.portLevelSettings[0].port is required",
    ),
    (
        "port 0",
        "    - port: {number: 0}\n      connectionPool: {tcp: {maxConnections: 1}}\n",
        "number: 0",
        "port 0 is not in range 1..65535",
    ),
    (
        "port 65536",
        "    - port: {number: 65536}\n      connectionPool: {tcp: {maxConnections: 1}}\n",
        "number: 65536",
        "port 65536 is not in range 1..65535",
    ),
    (
        "port by name",
        "    - port: {name: http}\n      connectionPool: {tcp: {maxConnections: 1}}\n",
        "{name: http}",
        "portLevelSettings[0].port.name is not implemented by l4proxy",
    ),
    (
        "nothing but a port",
        "    - port: {number: 9090}\n",
        "- port: {number: 9090}",
        "spec.trafficPolicy.portLevelSettings[0] sets nothing for port 9090",
    ),
    (
        "tls",
        "    - port: {number: 9090}\n      tls: {mode: SIMPLE}\n",
        "tls:",
        "spec.trafficPolicy.portLevelSettings[0].tls is not implemented by l4proxy",
    ),
    (
        "unknown field",
        "    - port: {number: 9090}\n      outlier: {}\n",
        "outlier:",
        "unknown field spec.trafficPolicy.portLevelSettings[0].outlier",
    ),
    (
        "a wrong value in a component",
        "    - port: {number: 9090}\n      connectionPool:\n        tcp: {maxConnections: -1}\n",
        "maxConnections",
        "maxConnections -1 is not in range",
    ),
    (
        "a port twice",
        "    - port: {number: 9090}\n      loadBalancer: {simple: RANDOM}\n"
        "    - port: {number: 9090}  # again\n      loadBalancer: {simple: LEAST_REQUEST}\n",
        "# again",
        "port 9090 is given twice in spec.trafficPolicy.portLevelSettings (first at line 23)",
    ),
    (
        "not a list",
        "      {port: {number: 9090}}\n",
        "portLevelSettings:",
        "portLevelSettings must be a list, not a mapping",
    ),
]


@pytest.mark.parametrize(
    ("entries", "marker", "message"),
    [c[1:] for c in ENTRY_ERRORS],
    ids=[c[0] for c in ENTRY_ERRORS],
)
def test_an_error_is_at_its_file_and_line(
    tmp_path: Path, entries: str, marker: str, message: str
) -> None:
    text = DR_HEAD + "  trafficPolicy:\n    portLevelSettings:\n" + entries
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules([f])
    errs = [e for e in info.value.errors if message in e.message]
    assert errs, f"no error containing {message!r} in:\n{info.value}"
    assert (errs[0].file, errs[0].line) == (f, _line(WEB + text, marker)), str(errs[0])


def test_a_subset_s_error_is_at_its_line(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + "  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n"
        + "      portLevelSettings:\n      - port: {number: 9090}\n"
        + "        loadBalancer: {simple: FASTEST}\n"
    )
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules([f])
    (err,) = info.value.errors
    assert "load balancer FASTEST is not known" in err.message
    assert (err.file, err.line) == (f, _line(WEB + text, "FASTEST"))


@pytest.mark.parametrize(
    ("policy", "where"),
    [
        ("  trafficPolicy: {}\n", "spec.trafficPolicy"),
        ("  trafficPolicy:\n    loadBalancer: null\n", "spec.trafficPolicy"),
        (
            "  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy: {}\n",
            "spec.subsets[0].trafficPolicy",
        ),
    ],
    ids=["empty", "only-null", "a-subset-s"],
)
def test_a_traffic_policy_that_sets_nothing_is_an_error_at_its_line(
    tmp_path: Path, policy: str, where: str
) -> None:
    """As Istio's validation refuses it ("traffic policy must have at
    least one field"): it would do nothing, which its author did not mean."""
    text = DR_HEAD + policy
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules([f])
    (err,) = info.value.errors
    assert err.message.startswith(f"{where} sets nothing (give it a loadBalancer"), err.message
    assert (err.file, err.line) == (f, _line(WEB + text, "trafficPolicy"))


def test_a_port_the_service_lacks_is_a_warning_at_its_entry(tmp_path: Path) -> None:
    text = DR_HEAD + PORT_9090.replace("9090", "7070") + "      loadBalancer: {simple: RANDOM}\n"
    f = write(tmp_path, text)
    result = load_rules([f])
    warnings = [d for d in result.notes if d.severity == "warning"]
    assert [(w.file, w.line) for w in warnings] == [(f, _line(WEB + text, "number: 7070"))]
    assert "port 7070 is not a port of web.default.svc.cluster.local (ports: 8080, 9090)" in (
        warnings[0].message
    )


# -- the table's JSON, resolved tables, validate -v --------------------------------


def test_config_dump_json_carries_each_port_s_policy(tmp_path: Path) -> None:
    table = load(tmp_path, SUBSETS + vs(TO_EACH))
    data = json.loads(json.dumps(table.to_json()))
    (svc,) = [s for s in data["services"] if s["host"] == HOST]
    assert svc["port_level"] == [
        {
            "port": 9090,
            "load_balancer": "LEAST_REQUEST",
            "hash_on": None,
            "connection_pool": None,
            "outlier_detection": None,
        }
    ]
    v1 = data["routes"][HOST][0]["route"][0]
    assert [(p["port"], p["connection_pool"]["max_connections"]) for p in v1["port_level"]] == [
        (9090, 7)
    ]


def test_a_resolved_table_keeps_the_port_policies(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_PORT)
    again = resolved_table(table, {})
    assert again.pool(HOST, 9090) == PoolSettings(connect_timeout=0.1)
    assert again == table
    assert table != load(tmp_path, RULE_AND_PORT.replace("100ms", "200ms"))


def test_validate_verbose_says_how_each_port_s_default_route_balances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DR_HEAD + PORT_9090 + "      loadBalancer: {simple: LEAST_REQUEST}\n"
    assert main(["validate", "-v", write(tmp_path, text)]) == 0
    out, _ = capsys.readouterr()
    assert (
        "no routes: on port 8080 round robin; on port 9090 LEAST_REQUEST over all endpoints "
        "(route 'default')"
    ) in out
    # the rule's balancer on 8080; 9090's entry, without one, resets it to
    # round robin (a review: this read "LEAST_REQUEST ... (on port 9090 ROUND_ROBIN)")
    text = (
        DR_HEAD
        + "  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST}\n    portLevelSettings:\n"
        + "    - port: {number: 9090}\n      connectionPool: {tcp: {maxConnections: 3}}\n"
    )
    assert main(["validate", "-v", write(tmp_path, text)]) == 0
    out, _ = capsys.readouterr()
    assert (
        "no routes: on port 8080 LEAST_REQUEST; on port 9090 round robin over all endpoints "
        "(route 'default')"
    ) in out


def test_validate_verbose_says_each_port_s_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SUBSETS + vs(
        "{match: [{port: 8080}], route: [{destination: {host: web, subset: v1, "
        "port: {number: 9090}}}]}",
        TO_EACH,
    )
    assert main(["validate", "-v", write(tmp_path, text)]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    # under the service's port
    at = lines.index("    port 9090 http-admin (HTTP, L7):")
    assert lines[at + 1] == (
        "      portLevelSettings: load balancer LEAST_REQUEST; pool: the sidecar's flags; "
        "no outlier detection"
    )
    # a destination with a port: that port's policy in its parentheses
    assert (
        "web.default.svc.cluster.local port 9090 subset v1 (version=v1; ROUND_ROBIN; "
        "pool: max 7 connections; no outlier detection; its port's portLevelSettings)"
    ) in out
    # one without: its own, then each port's below it
    at = next(i for i, line in enumerate(lines) if "subset v2 (version=v2; ROUND_ROBIN;" in line)
    assert "pool: 5 requests per connection; outlier detection: 5xx x1" in lines[at]
    port_line = "on port 9090 (portLevelSettings): LEAST_REQUEST; pool: the sidecar's flags; "
    assert lines[at + 1].strip().startswith(port_line + "outlier detection: 5xx x1,")


def test_a_port_s_hash_on_the_client_or_a_generated_cookie_is_known_to_the_worker(
    tmp_path: Path,
) -> None:
    """What the worker asks of the table before any request: whether some
    hash reads the client's address (then it reads each connection's) and
    which generate a cookie (a warning with --http-routing connection)."""
    plain = load(tmp_path, DR_HEAD + PORT_9090 + "      loadBalancer: {simple: RANDOM}\n")
    assert (plain.hashes_sources, plain.generated_cookies()) == (False, [])
    source = "      loadBalancer: {consistentHash: {useSourceIp: true}}\n"
    assert load(tmp_path, DR_HEAD + PORT_9090 + source).hashes_sources
    cookie = "      loadBalancer: {consistentHash: {httpCookie: {name: sid, ttl: 60s}}}\n"
    assert load(tmp_path, DR_HEAD + PORT_9090 + cookie).generated_cookies() == [(HOST, "default")]


# -- through a real worker ---------------------------------------------------------

# A gateway in front of a two-port service on loopback: /a to port 8080
# (one Scripted endpoint), /b to port 9090 (another); the rule limits
# 9090's connections to one request each and says nothing of 8080.
TWO_PORTS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [svc.default.svc.cluster.local]
  addresses: [198.19.200.1]
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  - {number: 9090, name: http-admin, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: %d, http-admin: %d}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: gateway}
spec:
  rules:
  - http:
      paths:
      - {path: /a, pathType: Prefix, backend: {service: {name: svc, port: {number: 8080}}}}
      - {path: /b, pathType: Prefix, backend: {service: {name: svc, port: {number: 9090}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.default.svc.cluster.local
  trafficPolicy:
    portLevelSettings:
    - port: {number: 9090}
      connectionPool: {http: {maxRequestsPerConnection: 1}}
"""


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_port_s_connection_pool_reaches_the_relay_for_that_port_only(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 requests to each port on one keep-alive client connection each:
    8080's endpoint serves its 3 on one pooled upstream connection, 9090's
    gets a connection per request (maxRequestsPerConnection 1)."""
    _worker_twin(which, monkeypatch)
    a, b = Scripted([]), Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PORTS % (a.endpoint[1], b.endpoint[1]))

    def gets(address: tuple[str, int], path: str) -> list[int]:
        statuses = []
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(3):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
                statuses.append(_status(_response(s)))
        return statuses

    got: dict[str, list[int]] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, _, address):
            loop = asyncio.get_running_loop()
            for path in ("/a", "/b"):
                got[path] = await loop.run_in_executor(None, gets, address, path)

    try:
        asyncio.run(main())
    finally:
        a.close()
        b.close()
    assert got == {"/a": [200] * 3, "/b": [200] * 3}
    assert (len(a.requests), len(b.requests)) == (3, 3)
    assert (a.accepted, b.accepted) == (1, 3)
