"""A DestinationRule's ``trafficPolicy.outlierDetection``: what is read (each
field, Istio's defaults, the deprecated ``consecutiveErrors``), what is an
error (with file and line), the policy each destination and each endpoint
is held to (``Subset.outlier``, ``RouteTable.outlier``,
``RouteTable.outlier_policies``: a subset's own replaces the rule's whole;
an endpoint that several destinations reach takes the most eager of each
field), and the panic threshold (``minHealthPercent``) in ``decide`` and
``choices``: below it every endpoint, else the healthy ones, possibly none
(503 no healthy upstream).

The bootcamp registry (tests/data/rules/registry.yaml): 198.18.0.11 and
198.18.0.12 are v1, 198.18.0.13 is v2, all on port 8080.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.rules import load_rules
from l4proxy.rules.dns import NameState, resolved_table
from l4proxy.rules.routing import (
    NO_HEALTHY_STATUS,
    Destination,
    Endpoint,
    Labels,
    OutlierPolicy,
    Request,
    Route,
    RouteTable,
    Service,
    ServicePort,
    Subset,
)
from tests.test_config_errors import REGISTRY, errors_of
from tests.test_rules_connection_pool import (
    DR_HEAD,
    HOST,
    HTTP_ROUTE,
    JASON_TO_V2,
    SHARED_SERVICE,
    TO_HOST,
    TO_V1,
    V1A,
    V1B,
    V2,
    load,
    vs,
)


def rule(body: str) -> str:
    """DR_HEAD with ``trafficPolicy.outlierDetection`` *body* (YAML lines
    under it, or a flow map)."""
    if body.startswith("{"):
        return DR_HEAD + f"  trafficPolicy:\n    outlierDetection: {body}\n"
    return DR_HEAD + "  trafficPolicy:\n    outlierDetection:\n" + textwrap.indent(body, "      ")


# -- reading: each field, the defaults -------------------------------------


def test_an_empty_outlier_detection_is_istio_s_defaults(tmp_path: Path) -> None:
    table = load(tmp_path, rule("{}"))
    defaults = OutlierPolicy()
    assert table.outlier(HOST) == defaults
    assert (defaults.consecutive_5xx, defaults.consecutive_gateway) == (5, 0)
    assert (defaults.interval, defaults.base_ejection, defaults.max_ejection) == (10, 30, 300)
    assert (defaults.max_ejection_percent, defaults.min_health_percent) == (10, 0)
    assert table.outlier_policies() == {V1A: defaults, V1B: defaults, V2: defaults}


def test_no_outlier_detection_is_none(tmp_path: Path) -> None:
    table = load(tmp_path, DR_HEAD + "  trafficPolicy: {loadBalancer: {simple: RANDOM}}\n")
    assert table.outlier(HOST) is None
    assert table.outlier_policies() == {}


FIELDS = [
    ("consecutive5xxErrors: 7", {"consecutive_5xx": 7}),
    ("consecutive5xxErrors: 0", {"consecutive_5xx": 0}),
    ("consecutiveGatewayErrors: 3", {"consecutive_gateway": 3}),
    (
        "{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}",
        {"split_local": True, "consecutive_local": 2},
    ),
    ("splitExternalLocalOriginErrors: false", {}),
    ("interval: 1m30s", {"interval": 90.0}),
    ("interval: 1ms", {"interval": 0.001}),
    ("baseEjectionTime: 15m", {"base_ejection": 900.0}),
    ("maxEjectionPercent: 100", {"max_ejection_percent": 100.0}),
    # 0 is unset (Istio's pilot sets Envoy's only above 0): 10
    ("maxEjectionPercent: 0", {}),
    ("minHealthPercent: 50", {"min_health_percent": 50.0}),
    ("minHealthPercent: 0", {}),
]


@pytest.mark.parametrize(("body", "want"), FIELDS)
def test_each_field(tmp_path: Path, body: str, want: dict[str, object]) -> None:
    text = rule(body if body.startswith("{") else "{" + body + "}")
    assert load(tmp_path, text).outlier(HOST) == dataclasses.replace(OutlierPolicy(), **want)


def test_a_long_base_ejection_raises_the_cap() -> None:
    assert OutlierPolicy(base_ejection=900.0).max_ejection == 900.0
    assert OutlierPolicy(base_ejection=1.0).max_ejection == 300.0


def test_istio_s_example_reads_as_given(tmp_path: Path) -> None:
    """The DestinationRule reference's OutlierDetection example."""
    text = rule("consecutive5xxErrors: 7\ninterval: 5m\nbaseEjectionTime: 15m\n")
    assert load(tmp_path, text).outlier(HOST) == OutlierPolicy(
        consecutive_5xx=7, interval=300.0, base_ejection=900.0
    )


def test_local_origin_failures_without_the_split_is_a_warning(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(rule("consecutive5xxErrors: 3\nconsecutiveLocalOriginFailures: 2\n"))
    result = load_rules([str(f), REGISTRY])
    warnings = [d for d in result.notes if d.severity == "warning"]
    assert [(w.line, w.file.endswith("rules.yaml")) for w in warnings] == [(9, True)]
    assert "does nothing without splitExternalLocalOriginErrors" in warnings[0].message
    assert result.table.outlier(HOST) == OutlierPolicy(consecutive_5xx=3, consecutive_local=2)
    f.write_text(rule("splitExternalLocalOriginErrors: true\nconsecutiveLocalOriginFailures: 2\n"))
    assert [d for d in load_rules([str(f), REGISTRY]).notes if d.severity == "warning"] == []


# -- the deprecated consecutiveErrors ----------------------------------------


def test_consecutive_errors_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """Istio's pilot has ignored the deprecated consecutiveErrors since 1.7
    (istio/istio#24087): Istio's defaults hold, beside any other field, and
    the warning, at its line, says what to set."""
    f = tmp_path / "rules.yaml"
    for body, want in (
        ("consecutiveErrors: 4\n", OutlierPolicy()),
        (
            "consecutiveGatewayErrors: 2\nconsecutiveErrors: 4\n",
            OutlierPolicy(consecutive_gateway=2),
        ),
        ("consecutiveErrors: 0\n", OutlierPolicy()),
    ):
        f.write_text(rule(body))
        result = load_rules([str(f), REGISTRY])
        warnings = [d for d in result.notes if d.severity == "warning"]
        assert [w.line for w in warnings] == [8 + body.count("\n") - 1], (body, warnings)
        assert "deprecated and ignored" in warnings[0].message
        assert "set consecutiveGatewayErrors" in warnings[0].message
        assert result.table.outlier(HOST) == want, body


def test_local_origin_failures_zero_is_unset(tmp_path: Path) -> None:
    """As Istio's pilot, which sets Envoy's only above 0: 5."""
    text = rule("{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 0}")
    assert load(tmp_path, text).outlier(HOST) == OutlierPolicy(split_local=True)


# -- errors, each at its line ----------------------------------------------

INVALID = [
    ("consecutive5xxErrors: -1", "consecutive5xxErrors -1 is not in range 0..4294967295"),
    ("consecutiveGatewayErrors: '3'", "must be an integer, not the string '3'"),
    ("consecutiveLocalOriginFailures: 1.5", "must be an integer, not the number 1.5"),
    ("consecutiveErrors: -2", "consecutiveErrors -2 is not in range"),
    ("splitExternalLocalOriginErrors: 'yes'", "must be true or false, not the string 'yes'"),
    ("interval: 0s", "interval '0s' must be whole milliseconds from 1ms"),
    ("interval: 10", "must be a duration string"),
    ("baseEjectionTime: 500us", "baseEjectionTime '500us' must be whole milliseconds"),
    ("baseEjectionTime: 3x", "baseEjectionTime '3x' is not a duration"),
    ("maxEjectionPercent: 101", "maxEjectionPercent 101 is not in range 0..100"),
    ("minHealthPercent: -1", "minHealthPercent -1 is not in range 0..100"),
    ("consecutive5xxError: 3", "unknown field spec.trafficPolicy.outlierDetection"),
]


@pytest.mark.parametrize(("body", "expected"), INVALID)
def test_a_wrong_value_is_an_error_at_its_line(tmp_path: Path, body: str, expected: str) -> None:
    errs = errors_of(tmp_path, rule(body + "\n"))
    assert len(errs) == 1, errs
    assert expected in errs[0].message, errs[0]
    assert errs[0].line == 8 and errs[0].file.endswith("rules.yaml")


def test_a_subset_s_error_is_at_its_line(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + "  subsets:\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n"
        + "      outlierDetection:\n        minHealthPercent: 200\n"
    )
    errs = errors_of(tmp_path, text)
    assert [(e.line, e.message.split(" ", 1)[0]) for e in errs] == [
        (11, "spec.subsets[0].trafficPolicy.outlierDetection.minHealthPercent")
    ]


def test_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, rule("[consecutive5xxErrors]"))
    assert [(e.line, e.message) for e in errs] == [
        (7, "spec.trafficPolicy.outlierDetection must be a mapping, not a list")
    ]


def test_the_circuit_breaking_task_s_outlier_detection_loads(tmp_path: Path) -> None:
    """Istio's circuit-breaking task's outlierDetection, once refused."""
    text = rule(
        "consecutive5xxErrors: 1\ninterval: 1s\nbaseEjectionTime: 3m\nmaxEjectionPercent: 100\n"
    )
    assert load(tmp_path, text).outlier(HOST) == OutlierPolicy(
        consecutive_5xx=1, interval=1.0, base_ejection=180.0, max_ejection_percent=100.0
    )


# -- subsets: replaced whole; several destinations: the most eager ----------

RULE_AND_V2 = (
    DR_HEAD
    + """\
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 5s
      baseEjectionTime: 1m
      minHealthPercent: 50
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      outlierDetection:
        consecutiveGatewayErrors: 2
        maxEjectionPercent: 40
"""
)
RULE = OutlierPolicy(consecutive_5xx=3, interval=5.0, base_ejection=60.0, min_health_percent=50.0)
# (its 5xx count, interval, ejection time and panic threshold are Istio's
# defaults, not the rule's)
V2_OWN = OutlierPolicy(consecutive_gateway=2, max_ejection_percent=40.0)


def test_a_subset_s_outlier_detection_replaces_the_rule_s_whole(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    assert table.outlier(HOST) == RULE
    first, second = table.routes_for(HOST)
    assert first.destinations[0].subset.outlier == V2_OWN
    assert second.destinations[0].subset.outlier == RULE  # v1: none of its own
    assert table.outlier_policies() == {V1A: RULE, V1B: RULE, V2: V2_OWN}


def test_a_destination_without_a_subset_takes_the_rule_s(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_V2 + vs(TO_HOST))
    (route,) = table.routes_for(HOST)
    assert route.destinations[0].subset.outlier == RULE


def test_an_endpoint_reached_through_the_subset_and_the_host_takes_the_most_eager(
    tmp_path: Path,
) -> None:
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_HOST))
    both = OutlierPolicy(
        consecutive_5xx=3,  # the rule's (v2's 5 is later)
        consecutive_gateway=2,  # v2's (the rule's is off)
        interval=5.0,
        base_ejection=60.0,
        max_ejection_percent=40.0,
        min_health_percent=50.0,
    )
    assert table.outlier_policies() == {V1A: RULE, V1B: RULE, V2: both}
    assert both == RULE.most_eager(V2_OWN)


def test_an_ejection_is_bounded_in_each_destination_that_holds_the_endpoint(
    tmp_path: Path,
) -> None:
    """``ejection_groups``: a subset's endpoints (Envoy's cluster per
    subset), each route's, and the host's own where some request takes no
    route; one group per destination, whatever the routes that name it."""

    def groups(table: RouteTable, key: tuple[str, int]) -> set[frozenset[tuple[str, int]]]:
        got = table.ejection_groups(Endpoint(*key))
        return {frozenset((e.address, e.port) for e in g) for g in got}

    v1, v2, every = frozenset({V1A, V1B}), frozenset({V2}), frozenset({V1A, V1B, V2})
    # the catch-all to v1: no request takes the host's round robin
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1, TO_V1))
    assert (groups(table, V1A), groups(table, V1B), groups(table, V2)) == ({v1}, {v1}, {v2})
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2))  # (no catch-all)
    assert (groups(table, V1A), groups(table, V2)) == ({every}, {v2, every})
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_HOST))  # (the host, routed)
    assert (groups(table, V1A), groups(table, V2)) == ({every}, {v2, every})
    assert table.ejection_groups(Endpoint("198.18.0.99", 8080)) == ()


def test_requests_no_route_takes_reach_the_bare_host(tmp_path: Path) -> None:
    """Without a catch-all, some requests take no route (the round robin
    over every endpoint, the rule's own policy)."""
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2))
    assert table.outlier_policies() == {V1A: RULE, V1B: RULE, V2: RULE.most_eager(V2_OWN)}


def test_endpoints_only_destinations_without_a_policy_reach_are_left_out(
    tmp_path: Path,
) -> None:
    """Only subset v2 has a policy: v1's endpoints (reached through v1,
    which has none) are not in the map."""
    text = RULE_AND_V2.replace(
        "  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 3\n"
        "      interval: 5s\n      baseEjectionTime: 1m\n      minHealthPercent: 50\n",
        "",
    )
    table = load(tmp_path, text + vs(JASON_TO_V2, TO_V1))
    assert table.outlier(HOST) is None
    assert table.outlier_policies() == {V2: V2_OWN}
    # through the bare host too (no policy): v2's alone, still
    assert load(tmp_path, text + vs(JASON_TO_V2, TO_HOST), name="b.yaml").outlier_policies() == {
        V2: V2_OWN
    }


SHARED = SHARED_SERVICE + "    outlierDetection: {policy}\n"


def test_an_endpoint_two_services_share_takes_the_most_eager_whatever_the_file_order(
    tmp_path: Path,
) -> None:
    a = SHARED.format(
        name="a", own="10.0.0.2", policy="{consecutive5xxErrors: 0, consecutiveGatewayErrors: 4}"
    )
    b = SHARED.format(
        name="b", own="10.0.0.3", policy="{consecutive5xxErrors: 8, baseEjectionTime: 2s}"
    )
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(a)
    fb.write_text(b)
    ab = load_rules([str(fa), str(fb)]).table
    ba = load_rules([str(fb), str(fa)]).table
    pa = OutlierPolicy(consecutive_5xx=0, consecutive_gateway=4)
    pb = OutlierPolicy(consecutive_5xx=8, base_ejection=2.0)
    want = {
        # a's 5xx is off, b's on at 8; a's 30 s ejection, longer than b's 2 s
        ("10.0.0.1", 8080): OutlierPolicy(consecutive_5xx=8, consecutive_gateway=4),
        ("10.0.0.2", 8080): pa,
        ("10.0.0.3", 8080): pb,
    }
    assert ab.outlier_policies() == want == ba.outlier_policies()
    assert list(ab.outlier_policies()) == sorted(want)
    assert ab == ba


def test_most_eager_field_by_field() -> None:
    a = OutlierPolicy(
        consecutive_5xx=0,
        consecutive_gateway=3,
        split_local=True,
        consecutive_local=0,
        interval=20.0,
        base_ejection=10.0,
        max_ejection_percent=5.0,
        min_health_percent=60.0,
    )
    b = OutlierPolicy(
        consecutive_5xx=7,
        consecutive_gateway=5,
        split_local=False,
        consecutive_local=4,
        interval=2.0,
        base_ejection=40.0,
        max_ejection_percent=50.0,
        min_health_percent=0.0,
    )
    want = OutlierPolicy(
        consecutive_5xx=7,  # 0 (off) loses to any count
        consecutive_gateway=3,  # the smaller of two on
        split_local=False,  # only if both split
        consecutive_local=4,
        interval=2.0,  # the shorter
        base_ejection=40.0,  # the longer
        max_ejection_percent=50.0,  # the larger
        min_health_percent=60.0,  # the larger
    )
    assert a.most_eager(b) == want == b.most_eager(a)
    off = OutlierPolicy(consecutive_5xx=0)
    assert off.most_eager(off).consecutive_5xx == 0


def test_most_eager_is_commutative_and_associative() -> None:
    """Any order and grouping of merging gives the same policy (seeded draws)."""
    rng = random.Random(20261205)
    values = [
        OutlierPolicy(
            rng.choice([0, 1, 3, 5]),
            rng.choice([0, 2, 5]),
            rng.choice([False, True]),
            rng.choice([0, 1, 5]),
            rng.choice([0.5, 10.0, 30.0]),
            rng.choice([1.0, 30.0, 600.0]),
            rng.choice([10.0, 33.0, 100.0]),
            rng.choice([0.0, 50.0, 80.0]),
        )
        for _ in range(6)
    ]
    results = set()
    for order in itertools.permutations(values):
        acc = order[0]
        for v in order[1:]:
            acc = acc.most_eager(v)
        results.add(acc)
    assert len(results) == 1
    for x, y, z in itertools.product(values, repeat=3):
        assert x.most_eager(y) == y.most_eager(x)
        assert x.most_eager(y).most_eager(z) == x.most_eager(y.most_eager(z))


# -- equality, JSON, validate -v, Gateway API, DNS -----------------------------


def test_policies_take_part_in_equality(tmp_path: Path) -> None:
    base = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1), name="a.yaml")
    assert base == load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1), name="b.yaml")
    other_rule = RULE_AND_V2.replace("interval: 5s", "interval: 6s")
    assert base != load(tmp_path, other_rule + vs(JASON_TO_V2, TO_V1), name="c.yaml")
    other_subset = RULE_AND_V2.replace("maxEjectionPercent: 40", "maxEjectionPercent: 41")
    assert base != load(tmp_path, other_subset + vs(JASON_TO_V2, TO_V1), name="d.yaml")
    # without routes, only the host's own policy tells the tables apart
    assert load(tmp_path, RULE_AND_V2, name="e.yaml") != load(tmp_path, other_rule, name="f.yaml")
    # Istio's defaults are a policy, unlike none
    assert load(tmp_path, rule("{}"), name="g.yaml") != load(tmp_path, DR_HEAD, name="h.yaml")


def test_the_table_s_json_says_the_policies(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    dump = json.loads(json.dumps(table.to_json()))
    rule_json = {
        "consecutive_5xx_errors": 3,
        "consecutive_gateway_errors": 0,
        "split_external_local_origin_errors": False,
        "consecutive_local_origin_failures": 5,
        "interval": 5.0,
        "base_ejection_time": 60.0,
        "max_ejection_time": 300.0,
        "max_ejection_percent": 10.0,
        "min_health_percent": 50.0,
    }
    v2_json = {
        **rule_json,
        "consecutive_5xx_errors": 5,
        "consecutive_gateway_errors": 2,
        "interval": 10.0,
        "base_ejection_time": 30.0,
        "max_ejection_percent": 40.0,
        "min_health_percent": 0.0,
    }
    assert dump["outlier_policies"] == {
        "198.18.0.11:8080": rule_json,
        "198.18.0.12:8080": rule_json,
        "198.18.0.13:8080": v2_json,
    }
    (svc,) = dump["services"]
    assert svc["outlier_detection"] == rule_json
    first, second = dump["routes"][HOST]
    assert first["route"][0]["outlier_detection"] == v2_json
    assert second["route"][0]["outlier_detection"] == rule_json
    bare = json.loads(json.dumps(load(tmp_path, DR_HEAD, name="bare.yaml").to_json()))
    assert bare["outlier_policies"] == {} and bare["services"][0]["outlier_detection"] is None


def test_validate_verbose_says_the_host_s_and_each_destination_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    code = main(["validate", "-v", str(f), REGISTRY])
    out, err = capsys.readouterr()
    assert code == 0, err
    rule_said = (
        "5xx x3, gateway off, eject 60 s (x n, max 300 s), interval 5 s, max 10% ejected, "
        "panic below 50% healthy (then all endpoints)"
    )
    v2_said = (
        "5xx x5, gateway x2, eject 30 s (x n, max 300 s), interval 10 s, max 40% ejected, "
        "panic below 0% (never: all ejected -> 503)"
    )
    assert f"\n    outlier detection: {rule_said}\n" in out
    assert f"subset v2 (version=v2; ROUND_ROBIN; outlier detection: {v2_said})\n" in out
    assert f"subset v1 (version=v1; ROUND_ROBIN; outlier detection: {rule_said})\n" in out


def test_validate_verbose_says_each_endpoint_s_policy_where_not_the_host_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The endpoint v2 is held to its subset's policy merged with the
    rule's (reached through both): said under it; v1's are the host's own:
    nothing more under them."""
    f = tmp_path / "rules.yaml"
    f.write_text(RULE_AND_V2 + vs(JASON_TO_V2, TO_HOST))
    assert main(["validate", "-v", str(f), REGISTRY]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    both_said = (
        "        outlier detection: 5xx x3, gateway x2, eject 60 s (x n, max 300 s), "
        "interval 5 s, max 40% ejected, panic below 50% healthy (then all endpoints)"
    )
    (v2,) = [i for i, line in enumerate(lines) if "version=v2" in line and ":8080" in line]
    assert lines[v2 + 1] == both_said, lines[v2 : v2 + 2]
    assert sum(line.startswith("        outlier detection:") for line in lines) == 1, out


def test_validate_verbose_says_a_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(rule("{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}"))
    assert main(["validate", "-v", str(f), REGISTRY]) == 0
    out, _ = capsys.readouterr()
    assert "outlier detection: 5xx x5, gateway off, local origin x2 (split), eject" in out


def test_an_http_route_s_backend_takes_its_destination_rule_s_policy(tmp_path: Path) -> None:
    """As in Istio, a DestinationRule applies to an HTTPRoute's backends too."""
    table = load(tmp_path, rule("{consecutiveGatewayErrors: 1}") + HTTP_ROUTE, name="hr.yaml")
    one = OutlierPolicy(consecutive_gateway=1)
    assert table.outlier_policies() == {V1A: one, V1B: one, V2: one}
    (route,) = table.routes_for(HOST)
    assert route.destinations[0].subset.outlier == one


def test_the_policies_follow_a_dns_name_to_its_addresses(tmp_path: Path) -> None:
    text = (
        DR_HEAD.replace("host: bootcamp", "host: web.example.com")
        + """\
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2}
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
    two = OutlierPolicy(consecutive_5xx=2)
    assert base.outlier_policies() == {("web.example.com", 80): two}
    state = NameState("web.example.com", ("192.0.2.1", "192.0.2.2"), resolved=True)
    table = resolved_table(base, {"web.example.com": state})
    assert table.outlier_policies() == {("192.0.2.1", 80): two, ("192.0.2.2", 80): two}
    assert table.outlier("web.example.com") == two


# -- the panic threshold: decide() and choices() -----------------------------

SVC = "svc.default.svc.cluster.local"
PORT = ServicePort(80, "http", "HTTP")
TCP = ServicePort(5432, "tcp", "TCP")


def _service(n: int) -> tuple[Service, tuple[Endpoint, ...]]:
    eps = tuple(Endpoint(f"10.1.0.{i}", 8080, {"app": "svc"}) for i in range(1, n + 1))
    return Service.create(SVC, [PORT, TCP], list(eps), addresses=["10.96.0.1"]), eps


def _healthy(up: set[Endpoint]) -> Callable[[Endpoint], bool]:
    return lambda e: e in up


def _table(svc: Service, policy: OutlierPolicy | None, *, routed: bool) -> RouteTable:
    """*svc* with *policy* on its rule: a catch-all route to it (a
    destination with Subset.outlier) or none (the default route)."""
    routes = None
    if routed:
        dest = Destination(SVC, Subset("default", Labels(), outlier=policy))
        routes = {SVC: [Route("catch-all", (dest,))]}
    outliers = {SVC: policy} if policy is not None else None
    return RouteTable([svc], routes, outliers=outliers, seed=1)


REQ = Request(method="GET", path="/", authority="svc", headers={})

# (endpoints, healthy ones, min_health_percent or None: no policy, the ones taken)
# "all": panic, every endpoint; "up": the healthy ones (maybe none)
PANIC = [
    (1, 1, None, "up"),
    (1, 0, None, "all"),
    (2, 0, None, "all"),
    (4, 1, None, "up"),
    (1, 0, 0.0, "up"),  # none: 503
    (2, 0, 0.0, "up"),
    (2, 1, 0.0, "up"),
    (4, 0, 0.0, "up"),
    (4, 1, 0.0, "up"),
    (1, 0, 50.0, "all"),  # 0% < 50%
    (1, 1, 50.0, "up"),
    (2, 0, 50.0, "all"),
    (2, 1, 50.0, "up"),  # 50% is not below 50%
    (4, 1, 50.0, "all"),  # 25%
    (4, 2, 50.0, "up"),
    (4, 3, 50.0, "up"),
]


@pytest.mark.parametrize("routed", [False, True], ids=["default-route", "route"])
@pytest.mark.parametrize(("n", "n_up", "min_health", "taken"), PANIC)
def test_the_panic_threshold(
    n: int, n_up: int, min_health: float | None, taken: str, routed: bool
) -> None:
    svc, eps = _service(n)
    policy = None if min_health is None else OutlierPolicy(min_health_percent=min_health)
    table = _table(svc, policy, routed=routed)
    up = set(eps[n - n_up :])  # the last ones (not the first, which the order favours)
    want = set(eps) if taken == "all" else up
    healthy = _healthy(up)

    d = table.decide(svc, 80, REQ, healthy=healthy)
    assert set(d.endpoints) == want and len(d.endpoints) == len(want)
    rc = table.choices(svc, 80, REQ, healthy=healthy)
    (ws,) = rc.subsets
    assert set(ws.endpoints) == want
    # and a raw connection (TCP port): the same endpoints
    tcp = table.decide(svc, 5432, None, healthy=healthy)
    assert set(tcp.endpoints) == want
    if not want:
        assert d.status == tcp.status == rc.status == ws.status == NO_HEALTHY_STATUS == 503
    # no health callable: every endpoint, whatever the policy
    assert set(table.decide(svc, 80, REQ).endpoints) == set(eps)


def test_all_ejected_at_a_gateway_api_route_is_503_not_500(tmp_path: Path) -> None:
    """A Gateway API route answers 500 for a backend without endpoints; one
    whose endpoints were all ejected is 503 no healthy upstream, in decide()
    and in choices() (the status the per-request relay's verdict takes)."""
    table = load(tmp_path, rule("{consecutiveGatewayErrors: 1}") + HTTP_ROUTE, name="hr.yaml")
    (route,) = table.routes_for(HOST)
    assert route.unresolved_status == 500
    svc = next(s for s in table.services() if s.host == HOST)
    req = Request(method="GET", path="/", authority="bootcamp", headers={})
    none_up = _healthy(set())
    d = table.decide(svc, 8080, req, healthy=none_up)
    assert (d.endpoints, d.status) == ([], 503)
    rc = table.choices(svc, 8080, req, healthy=none_up)
    assert rc.status == 503 and [ws.status for ws in rc.subsets] == [503]
    assert rc.subsets[0].endpoints == ()
    # without a policy: panic, every endpoint, as before
    plain = load(tmp_path, HTTP_ROUTE, name="plain.yaml")
    assert len(plain.decide(svc, 8080, req, healthy=none_up).endpoints) == 3


def test_an_unresolved_backend_beside_an_ejected_one_keeps_the_route_s_status() -> None:
    """A route with an unresolved destination (500 at a Gateway API route)
    and one whose endpoints were all ejected: the route's status stays 500
    (one answer for the route's empty ones, in choices()); each destination
    says its own."""
    svc, _ = _service(2)
    policy = OutlierPolicy()
    dests = (
        Destination(SVC, Subset("default", Labels(), outlier=policy), 50),
        Destination("gone.default.svc.cluster.local", Subset("default"), 50),
    )
    route = Route("split", dests, unresolved_status=500)
    table = RouteTable([svc], {SVC: [route]}, seed=1)
    rc = table.choices(svc, 80, REQ, healthy=_healthy(set()))
    assert rc.status == 500
    assert [(ws.endpoints, ws.status) for ws in rc.subsets] == [((), 503), ((), 500)]
