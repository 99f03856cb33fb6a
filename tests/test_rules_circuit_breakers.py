"""A DestinationRule's circuit breakers (``trafficPolicy.connectionPool``'s
``tcp.maxConnections``, ``http.http1MaxPendingRequests`` and
``http.http2MaxRequests``): read into ``PoolSettings.max_connections``,
``max_pending`` and ``max_active``; 0 is unset (Istio's pilot sets Envoy's
thresholds only above 0), a bad value an error at its line; no flag sets
them, so an endpoint that several destinations reach takes the smallest
limit any of them sets, a destination without one not loosening it.

The bootcamp registry (tests/data/rules/registry.yaml): 198.18.0.11 and
198.18.0.12 are v1, 198.18.0.13 is v2, all on port 8080.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.rules import load_rules
from l4proxy.rules.routing import POOL_FIELDS, OutlierPolicy, PoolSettings
from tests.test_config_errors import REGISTRY, errors_of
from tests.test_rules_connection_pool import (
    CIRCUIT_BREAKING,
    DR_HEAD,
    HOST,
    JASON_TO_V2,
    SHARED,
    TO_HOST,
    TO_V1,
    V1A,
    V1B,
    V2,
    load,
    vs,
)

FIELDS = [
    ("tcp", "maxConnections", "max_connections", "max_connections"),
    ("http", "http1MaxPendingRequests", "max_pending", "http1_max_pending_requests"),
    ("http", "http2MaxRequests", "max_active", "http2_max_requests"),
]


def pool_rule(section: str, field: str, value: str) -> str:
    return (
        DR_HEAD
        + f"  trafficPolicy:\n    connectionPool:\n      {section}:\n        {field}: {value}\n"
    )


# -- Istio's circuit-breaking task -----------------------------------------


def test_the_circuit_breaking_task_s_rule_loads_whole(tmp_path: Path) -> None:
    """tasks/traffic-management/circuit-breaking's DestinationRule, as the
    task gives it: every field read, none refused."""
    table = load(tmp_path, CIRCUIT_BREAKING)
    want = PoolSettings(max_requests=1, max_connections=1, max_pending=1)
    assert table.pool(HOST) == want
    assert table.pool_settings() == {V1A: want, V1B: want, V2: want}
    assert table.outlier(HOST) == OutlierPolicy(
        consecutive_5xx=1, interval=1.0, base_ejection=180.0, max_ejection_percent=100.0
    )
    assert table.outlier_policies() == {ep: table.outlier(HOST) for ep in (V1A, V1B, V2)}


def test_validate_accepts_the_circuit_breaking_task_s_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "cb.yaml"
    f.write_text(CIRCUIT_BREAKING)
    code = main(["validate", "-v", str(f), REGISTRY])
    out, err = capsys.readouterr()
    assert code == 0, err
    said = "1 request per connection, max 1 connection, 1 pending"
    assert f"load balancer ROUND_ROBIN; connection pool: {said}\n" in out
    assert f"      198.18.0.13:8080  app=bootcamp,version=v2  pool: {said}\n" in out


# -- each field, 0, bad values --------------------------------------------


@pytest.mark.parametrize(("section", "field", "attr", "json_name"), FIELDS)
@pytest.mark.parametrize("value", [1, 7, 2**31 - 1])
def test_each_circuit_breaker_is_read(
    tmp_path: Path, section: str, field: str, attr: str, json_name: str, value: int
) -> None:
    table = load(tmp_path, pool_rule(section, field, str(value)))
    want = PoolSettings(**{attr: value})  # type: ignore[arg-type]
    assert table.pool(HOST) == want and want.is_set
    assert table.pool_settings() == {V1A: want, V1B: want, V2: want}
    dump = json.loads(json.dumps(table.to_json()))
    assert dump["connection_pools"]["198.18.0.13:8080"][json_name] == value
    assert dump["services"][0]["connection_pool"][json_name] == value


@pytest.mark.parametrize(("section", "field", "attr", "json_name"), FIELDS)
def test_zero_is_unset(tmp_path: Path, section: str, field: str, attr: str, json_name: str) -> None:
    """As in Istio's pilot (Envoy's threshold only above 0): no limit, no
    settings, the same table as without the field."""
    table = load(tmp_path, pool_rule(section, field, "0"))
    assert table.pool(HOST) == PoolSettings()
    assert table.pool_settings() == {}
    assert table == load(tmp_path, DR_HEAD, name="plain.yaml")


BAD = [
    ("-1", "{field} -1 is not in range 0..2147483647"),
    (str(2**31), f"{{field}} {2**31} is not in range 0..2147483647"),
    ('"1"', "{field} must be an integer, not the string '1'"),
    ("true", "{field} must be an integer, not the boolean true"),
    ("1.5", "{field} must be an integer, not the number 1.5"),
]


@pytest.mark.parametrize(("section", "field", "attr", "json_name"), FIELDS)
@pytest.mark.parametrize(("value", "expected"), BAD)
def test_a_bad_value_is_an_error_at_its_line(
    tmp_path: Path,
    section: str,
    field: str,
    attr: str,
    json_name: str,
    value: str,
    expected: str,
) -> None:
    errs = errors_of(tmp_path, pool_rule(section, field, value))
    assert len(errs) == 1, errs
    full = f"spec.trafficPolicy.connectionPool.{section}.{field}"
    assert expected.format(field=full) in errs[0].message, errs[0]
    assert errs[0].line == 9 and errs[0].file.endswith("rules.yaml")


def test_bad_values_in_a_subset_are_each_an_error_at_their_line(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + """\
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        tcp:
          maxConnections: -3
          connectTimeout: 1s
        http:
          http1MaxPendingRequests: x
          http2MaxRequests: 5
          maxRetries: 3
"""
    )
    errs = errors_of(tmp_path, text)
    path = "spec.subsets[0].trafficPolicy.connectionPool"
    assert sorted((e.line, e.message.split(" ", 1)[0]) for e in errs) == [
        (12, f"{path}.tcp.maxConnections"),
        (15, f"{path}.http.http1MaxPendingRequests"),
        (17, f"{path}.http.maxRetries"),
    ]
    assert "is not implemented by l4proxy" in next(e for e in errs if e.line == 17).message


# -- merged per endpoint: the strictest, a limit beats none -----------------

RULE_AND_V2 = (
    DR_HEAD
    + """\
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10}
      http: {http2MaxRequests: 50, http1MaxPendingRequests: 20}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 2}
        http: {http1MaxPendingRequests: 30}
"""
)
RULE = PoolSettings(max_connections=10, max_pending=20, max_active=50)
V2_OWN = PoolSettings(max_connections=2, max_pending=30)


def test_a_subset_s_own_replaces_the_rule_s_whole(tmp_path: Path) -> None:
    """v2's endpoint, reached only through subset v2, has no active limit:
    the rule's http2MaxRequests is not taken into v2's connectionPool."""
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: V2_OWN}


def test_an_endpoint_reached_through_the_host_too_takes_the_smallest_of_each(
    tmp_path: Path,
) -> None:
    """Through v2 and through the bare host: the smaller of each limit, and
    the rule's active limit, which v2 leaves unset (unlimited), holds: a
    limit beats none, and none is in or_flag (no flag to weigh it with)."""
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_HOST))
    both = PoolSettings(max_connections=2, max_pending=20, max_active=50)
    assert table.pool_settings() == {V1A: RULE, V1B: RULE, V2: both}
    flags = PoolSettings(max_requests=100, idle_timeout=30.0, connect_timeout=10.0)
    assert both.resolved(flags) == PoolSettings(100, 30.0, 10.0, 2, 20, 50)
    assert PoolSettings().resolved(flags) == flags  # unset: unlimited


def test_a_service_without_a_limit_does_not_loosen_another_s_on_a_shared_pod(
    tmp_path: Path,
) -> None:
    """a limits its pods to 5 connections; b, with no rule, shares 10.0.0.1:
    that pod keeps a's 5 (b's traffic counted within it), whatever the file
    order, and no or_flag."""
    a = SHARED.format(name="a", own="10.0.0.2", pool="      tcp: {maxConnections: 5}")
    b = SHARED.format(name="b", own="10.0.0.3", pool="      http: {}").replace(
        "  trafficPolicy:\n    connectionPool:\n      http: {}\n", ""
    )
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(a)
    fb.write_text(b)
    five = PoolSettings(max_connections=5)
    want = {("10.0.0.1", 8080): five, ("10.0.0.2", 8080): five}
    assert load_rules([str(fa), str(fb)]).table.pool_settings() == want
    assert load_rules([str(fb), str(fa)]).table.pool_settings() == want
    dump = load_rules([str(fa), str(fb)]).table.to_json()["connection_pools"]
    assert "or_flag" not in dump["10.0.0.1:8080"]


def test_two_services_limits_on_a_shared_pod_take_the_smaller(tmp_path: Path) -> None:
    a = SHARED.format(
        name="a", own="10.0.0.2", pool="      http: {http2MaxRequests: 8, idleTimeout: 10s}"
    )
    b = SHARED.format(
        name="b",
        own="10.0.0.3",
        pool="      http: {http2MaxRequests: 3, http1MaxPendingRequests: 4}",
    )
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(a)
    fb.write_text(b)
    table = load_rules([str(fa), str(fb)]).table
    assert table.pool_settings() == {
        ("10.0.0.1", 8080): PoolSettings(
            idle_timeout=10.0, max_pending=4, max_active=3, or_flag=frozenset({"idle_timeout"})
        ),
        ("10.0.0.2", 8080): PoolSettings(idle_timeout=10.0, max_active=8),
        ("10.0.0.3", 8080): PoolSettings(max_pending=4, max_active=3),
    }


def test_strictest_is_order_free_and_a_limit_beats_none() -> None:
    """Seeded draws over every field: any order of merging gives the same."""
    rng = random.Random(20261205)
    values = [
        PoolSettings(
            rng.choice([None, 0, 1, 50]),
            rng.choice([None, 0.5, 30.0]),
            rng.choice([None, 0.01, 1.0]),
            rng.choice([None, 1, 2, 100]),
            rng.choice([None, 1, 9]),
            rng.choice([None, 3, 2**31 - 1]),
        )
        for _ in range(6)
    ]
    results = {
        functools.reduce(PoolSettings.strictest, order, PoolSettings())
        for order in itertools.permutations(values)
    }
    assert len(results) == 1
    for attr in ("max_connections", "max_pending", "max_active"):
        one = PoolSettings(**{attr: 4})  # type: ignore[arg-type]
        assert one.strictest(PoolSettings()) == one == PoolSettings().strictest(one)
        assert one.strictest(PoolSettings(**{attr: 2})) == PoolSettings(**{attr: 2})  # type: ignore[arg-type]
        assert one.is_set
    assert POOL_FIELDS[3:] == ("max_connections", "max_pending", "max_active")


# -- equality, JSON, validate -v ------------------------------------------


def test_the_limits_take_part_in_equality(tmp_path: Path) -> None:
    base = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1), name="a.yaml")
    assert base == load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1), name="b.yaml")
    for old, new in [
        ("maxConnections: 10", "maxConnections: 11"),
        ("http2MaxRequests: 50", "http2MaxRequests: 51"),
        ("http1MaxPendingRequests: 30", "http1MaxPendingRequests: 31"),
    ]:
        other = RULE_AND_V2.replace(old, new)
        assert base != load(tmp_path, other + vs(JASON_TO_V2, TO_V1), name="c.yaml"), new


def test_the_table_s_json_names_them(tmp_path: Path) -> None:
    table = load(tmp_path, RULE_AND_V2 + vs(JASON_TO_V2, TO_V1))
    dump = json.loads(json.dumps(table.to_json()))
    unset = {"max_requests_per_connection": None, "idle_timeout": None, "connect_timeout": None}
    rule = {
        **unset,
        "max_connections": 10,
        "http1_max_pending_requests": 20,
        "http2_max_requests": 50,
    }
    v2 = {
        **unset,
        "max_connections": 2,
        "http1_max_pending_requests": 30,
        "http2_max_requests": None,
    }
    assert dump["connection_pools"] == {
        "198.18.0.11:8080": rule,
        "198.18.0.12:8080": rule,
        "198.18.0.13:8080": v2,
    }
    assert dump["services"][0]["connection_pool"] == rule
    first, second = dump["routes"][HOST]
    assert first["route"][0]["connection_pool"] == v2
    assert second["route"][0]["connection_pool"] == rule


def test_validate_verbose_says_the_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(
        RULE_AND_V2.replace("maxConnections: 2", "maxConnections: 1").replace(
            "http1MaxPendingRequests: 30", "http1MaxPendingRequests: 1, idleTimeout: 2s"
        )
        + vs(JASON_TO_V2, TO_V1)
    )
    code = main(["validate", "-v", str(f), REGISTRY])
    out, err = capsys.readouterr()
    assert code == 0, err
    rule = "max 10 connections, 20 pending, 50 active"
    assert f"load balancer ROUND_ROBIN; connection pool: {rule}\n" in out
    assert f"      198.18.0.11:8080  app=bootcamp,version=v1  pool: {rule}\n" in out
    v2 = "idle timeout 2 s, max 1 connection, 1 pending"
    assert f"      198.18.0.13:8080  app=bootcamp,version=v2  pool: {v2}\n" in out
    assert f"subset v2 (version=v2; ROUND_ROBIN; pool: {v2})\n" in out
