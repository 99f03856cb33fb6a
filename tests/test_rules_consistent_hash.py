"""A DestinationRule's ``trafficPolicy.loadBalancer.consistentHash``: what
is read (each hash key, a cookie's ttl and path, the ring and Maglev sizes
with their warning), what is an error (with file and line: the
simple/consistentHash oneof, one hash key, ``useSourceIp``), how a subset's
own policy replaces the rule's (``Subset.hash_on``, ``RouteTable.hash_on``),
what ``choices`` hands the compiled relay (``WeightedSubset`` policy HASH
and ``hash_on``), and the pure twin's draw in ``decide``: the same key the
same endpoint (verdict.hash_order's), an endpoint gone moves only its keys,
an absent key random, a generated cookie set in the response.

The bootcamp registry (tests/data/rules/registry.yaml): 198.18.0.11 and
198.18.0.12 are v1, 198.18.0.13 is v2, all on port 8080. ``SHOP`` below
has five endpoints for the spread.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import (
    HASH_COOKIE,
    HASH_HEADER,
    HASH_QUERY,
    HASH_SOURCE_IP,
    HashOn,
    endpoint_hash,
    hash_key,
    hash_order,
)
from l4proxy.rules import load_rules
from l4proxy.rules.dns import resolved_table
from l4proxy.rules.routing import Endpoint, Request, RouteTable
from tests.test_config_errors import REGISTRY, errors_of
from tests.test_rules_connection_pool import DR_HEAD, HOST, V1A, V1B, V2, load, vs

SHOP_HOST = "shop.default.svc.cluster.local"
SHOP = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shop}
spec:
  hosts: [shop.default.svc.cluster.local]
  addresses: [198.19.0.20]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 198.18.1.1, labels: {app: shop}}
  - {address: 198.18.1.2, labels: {app: shop}}
  - {address: 198.18.1.3, labels: {app: shop}}
  - {address: 198.18.1.4, labels: {app: shop}}
  - {address: 198.18.1.5, labels: {app: shop}}
"""
SHOP_EPS = [(f"198.18.1.{i}", 8080) for i in range(1, 6)]


def rule(body: str, head: str = DR_HEAD) -> str:
    """*head* with ``trafficPolicy.loadBalancer`` *body* (YAML lines under it)."""
    return head + "  trafficPolicy:\n    loadBalancer:\n" + textwrap.indent(body, "      ")


def shop_rule(body: str) -> str:
    head = DR_HEAD.replace("name: bootcamp", "name: shop").replace("host: bootcamp", "host: shop")
    return rule(body, head)


def shop(tmp_path: Path, body: str, *, seed: int = 7) -> RouteTable:
    f = tmp_path / "shop.yaml"
    f.write_text(SHOP + "---\n" + shop_rule(body))
    return load_rules([str(f)], seed=seed).table


def _line(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert lines, marker
    return lines[-1]


def ep(e: Endpoint) -> tuple[str, int]:
    return (e.address, e.port)


def predicted(value: bytes, eps: list[tuple[str, int]]) -> tuple[str, int]:
    """Where verdict.hash_order sends *value* among *eps* (table order)."""
    return eps[hash_order(hash_key(value), [endpoint_hash(e) for e in eps])[0]]


# -- reading: each form ------------------------------------------------------

FORMS = [
    ("consistentHash: {httpHeaderName: X-User}", HashOn(HASH_HEADER, "x-user")),
    ("consistentHash: {httpCookie: {name: sid}}", HashOn(HASH_COOKIE, "sid")),
    (
        "consistentHash: {httpCookie: {name: sid, ttl: 1h, path: /shop}}",
        HashOn(HASH_COOKIE, "sid", 3600, "/shop"),
    ),
    ("consistentHash: {httpCookie: {name: sid, ttl: 0s}}", HashOn(HASH_COOKIE, "sid", 0)),
    # whole seconds, truncated (Max-Age)
    ("consistentHash: {httpCookie: {name: sid, ttl: 1500ms}}", HashOn(HASH_COOKIE, "sid", 1)),
    ("consistentHash: {httpQueryParameterName: user}", HashOn(HASH_QUERY, "user")),
    ("consistentHash: {httpHeaderName: x-user, useSourceIp: null}", HashOn(HASH_HEADER, "x-user")),
    ("consistentHash: {useSourceIp: true}", HashOn(HASH_SOURCE_IP, "")),
]


@pytest.mark.parametrize(("body", "want"), FORMS)
def test_each_form(tmp_path: Path, body: str, want: HashOn) -> None:
    table = load(tmp_path, rule(body + "\n"))
    assert table.load_balancer(HOST) == "HASH"
    assert table.hash_on(HOST) == want


def test_istio_s_examples_load(tmp_path: Path) -> None:
    """The DestinationRule reference's LoadBalancerSettings examples: a
    session cookie named user; a header with the (deprecated) ring size."""
    cookie = rule("consistentHash:\n  httpCookie:\n    name: user\n    ttl: 0s\n")
    assert load(tmp_path, cookie).hash_on(HOST) == HashOn(HASH_COOKIE, "user", 0, "")
    header = rule("consistentHash:\n  httpHeaderName: x-user\n  minimumRingSize: 1024\n")
    assert load(tmp_path, header).hash_on(HOST) == HashOn(HASH_HEADER, "x-user")


def test_simple_policies_have_no_hash(tmp_path: Path) -> None:
    table = load(tmp_path, rule("simple: LEAST_REQUEST\n"))
    assert (table.load_balancer(HOST), table.hash_on(HOST)) == ("LEAST_REQUEST", None)


# -- errors, each at its file and line ------------------------------------

ERRORS = [
    (
        "simple: RANDOM\nconsistentHash: {httpHeaderName: x-user}\n",
        "consistentHash",
        "sets both simple and consistentHash",
    ),
    ("{}\n", "loadBalancer", "needs simple or consistentHash"),
    ("simple: HASH\n", "simple", "load balancer HASH is not known"),
    ("consistentHash: {}\n", "consistentHash", "needs one of httpHeaderName, httpCookie"),
    (
        "consistentHash:\n  httpHeaderName: x-user\n  httpQueryParameterName: u\n",
        "httpQueryParameterName",
        "sets httpHeaderName and httpQueryParameterName: one of them",
    ),
    (
        "consistentHash: {useSourceIp: true, httpHeaderName: x-user}\n",
        "useSourceIp",
        "sets httpHeaderName and useSourceIp: one of them",
    ),
    ("consistentHash: {useSourceIp: 'yes'}\n", "useSourceIp", "must be true or false"),
    ("consistentHash: {httpHeaderName: x user}\n", "httpHeaderName", "is not an HTTP field name"),
    ("consistentHash: {httpHeaderName: ''}\n", "httpHeaderName", "must not be empty"),
    (
        "consistentHash: {httpQueryParameterName: a=b}\n",
        "httpQueryParameterName",
        "'a=b' is not a query parameter name",
    ),
    (
        "consistentHash: {httpQueryParameterName: \u00e9}\n",
        "httpQueryParameterName",
        "'\u00e9' is not a query parameter name (no '&', '=', '#', space, control or non-ASCII",
    ),
    (
        "consistentHash: {httpQueryParameterName: \u20ac}\n",
        "httpQueryParameterName",
        "'\u20ac' is not a query parameter name",
    ),
    ("consistentHash:\n  httpCookie: {ttl: 1h}\n", "httpCookie", "httpCookie.name is required"),
    (
        "consistentHash:\n  httpCookie: {name: 's id'}\n",
        "httpCookie",
        "cookie name 's id' is not a cookie name",
    ),
    (
        "consistentHash:\n  httpCookie: {name: sid, path: '/a;b'}\n",
        "httpCookie",
        "may hold no ';', no control character and nothing but ASCII",
    ),
    (
        "consistentHash:\n  httpCookie: {name: sid, path: '/\u00e9'}\n",
        "httpCookie",
        "'/\u00e9' may hold no ';', no control character and nothing but ASCII",
    ),
    (
        "consistentHash:\n  httpCookie: {name: sid, path: '/\u20ac', ttl: 1s}\n",
        "httpCookie",
        "'/\u20ac' may hold no ';'",
    ),
    (
        "consistentHash:\n  httpCookie: {name: sid, ttl: 10}\n",
        "httpCookie",
        "ttl must be a duration string",
    ),
    (
        "consistentHash:\n  httpCookie:\n    name: sid\n    attributes: [{name: SameSite}]\n",
        "attributes",
        "attributes is not implemented by l4proxy",
    ),
    (
        "consistentHash:\n  httpHeader: x-user\n",
        "httpHeader",
        "unknown field spec.trafficPolicy.loadBalancer.consistentHash.httpHeader",
    ),
    (
        "consistentHash:\n  httpHeaderName: x\n  ringHash: {}\n  maglev: {tableSize: 7}\n",
        "maglev",
        "sets both ringHash and maglev",
    ),
    (
        "consistentHash:\n  httpHeaderName: x\n  ringHash: {minimumRingSize: -1}\n",
        "ringHash",
        "minimumRingSize -1 is not in range",
    ),
    (
        "consistentHash:\n  httpHeaderName: x\n  maglev: {tableSize: big}\n",
        "maglev",
        "tableSize must be an integer",
    ),
    (
        "consistentHash:\n  httpHeaderName: x\n  minimumRingSize: -5\n",
        "minimumRingSize",
        "minimumRingSize -5 is not in range",
    ),
    (
        "consistentHash:\n  httpHeaderName: x\n  maglev: {size: 7}\n",
        "maglev",
        "unknown field spec.trafficPolicy.loadBalancer.consistentHash.maglev.size",
    ),
    (
        "consistentHash: {httpHeaderName: x}\nlocalityLbSetting: {enabled: true}\n",
        "localityLbSetting",
        "localityLbSetting is not implemented by l4proxy",
    ),
    (
        "consistentHash: {httpHeaderName: x}\nwarmupDurationSecs: 10s\n",
        "warmupDurationSecs",
        "warmupDurationSecs is not implemented by l4proxy",
    ),
]


@pytest.mark.parametrize(("body", "marker", "message"), ERRORS)
def test_an_error_is_at_its_file_and_line(
    tmp_path: Path, body: str, marker: str, message: str
) -> None:
    text = rule(body)
    errs = [e for e in errors_of(tmp_path, text) if message in e.message]
    assert errs, (message, errors_of(tmp_path, text))
    assert errs[0].file.endswith("rules.yaml")
    assert errs[0].line == _line(text, marker), errs[0]


def test_an_empty_cookie_name_is_one_error(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, rule("consistentHash: {httpCookie: {name: '', ttl: 1s}}\n"))
    assert [e.message.split(": ", 1)[-1] for e in errs] == [
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name must not be empty"
    ], errs


def test_a_subset_s_error_is_at_its_line(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + "  subsets:\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n"
        + "      loadBalancer:\n        consistentHash:\n          httpHeaderName: x user\n"
    )
    errs = errors_of(tmp_path, text)
    assert [e.line for e in errs] == [12], errs
    assert "is not an HTTP field name" in errs[0].message, errs


# -- the ring and Maglev sizes: checked, then a warning -----------------------


@pytest.mark.parametrize(
    ("tables", "marker"),
    [
        ("ringHash: {minimumRingSize: 1024}", "ringHash"),
        ("ringHash: {}", "ringHash"),
        ("maglev: {tableSize: 65537}", "maglev"),
        ("minimumRingSize: 0", "minimumRingSize"),
    ],
)
def test_a_table_size_loads_with_a_warning_at_its_line(
    tmp_path: Path, tables: str, marker: str
) -> None:
    text = rule(f"consistentHash:\n  httpHeaderName: x-user\n  {tables}\n")
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    result = load_rules([str(f), REGISTRY])
    warnings = [d for d in result.notes if d.severity == "warning"]
    assert [(w.line, w.file) for w in warnings] == [(_line(text, marker), str(f))]
    assert "has no effect: l4proxy orders a consistent hash's endpoints by rendezvous" in (
        warnings[0].message
    )
    assert result.table.hash_on(HOST) == HashOn(HASH_HEADER, "x-user")


def test_a_ttl_under_a_second_is_a_session_cookie_and_a_warning(tmp_path: Path) -> None:
    text = rule("consistentHash:\n  httpCookie:\n    name: sid\n    ttl: 500ms\n")
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    result = load_rules([str(f), REGISTRY])
    warnings = [d for d in result.notes if d.severity == "warning"]
    assert [w.line for w in warnings] == [_line(text, "ttl")], warnings
    assert "is under a second: the cookie's Max-Age is whole seconds" in warnings[0].message
    assert result.table.hash_on(HOST) == HashOn(HASH_COOKIE, "sid", 0)


def test_no_table_size_no_warning(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(rule("consistentHash: {httpHeaderName: x-user}\n"))
    assert [d for d in load_rules([str(f), REGISTRY]).notes if d.severity == "warning"] == []


# -- a subset's own policy replaces the rule's --------------------------------

HOST_COOKIE_V1_HEADER_V2_RANDOM = (
    DR_HEAD
    + """\
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: sid, ttl: 60s}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
  - name: all
    labels: {app: bootcamp}
"""
)
TO_EACH = (
    "{route: [{destination: {host: bootcamp, subset: v1}, weight: 40}, "
    "{destination: {host: bootcamp, subset: v2}, weight: 30}, "
    "{destination: {host: bootcamp, subset: all}, weight: 30}]}"
)
COOKIE = HashOn(HASH_COOKIE, "sid", 60)
X_USER = HashOn(HASH_HEADER, "x-user")


def test_a_subset_s_policy_replaces_the_rule_s(tmp_path: Path) -> None:
    table = load(tmp_path, HOST_COOKIE_V1_HEADER_V2_RANDOM + vs(TO_EACH))
    (route,) = table.routes_for(HOST)
    got = [(d.subset.name, d.subset.load_balancer, d.subset.hash_on) for d in route.destinations]
    assert got == [("v1", "HASH", X_USER), ("v2", "RANDOM", None), ("all", "HASH", COOKIE)]
    assert (table.load_balancer(HOST), table.hash_on(HOST)) == ("HASH", COOKIE)


def test_a_hash_subset_under_a_simple_rule(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + "  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n  subsets:\n"
        + "  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n"
        + "      loadBalancer: {consistentHash: {httpQueryParameterName: u}}\n"
        + "  - name: v2\n    labels: {version: v2}\n"
    )
    to_both = (
        "{route: [{destination: {host: bootcamp, subset: v1}, weight: 50}, "
        "{destination: {host: bootcamp, subset: v2}, weight: 50}]}"
    )
    table = load(tmp_path, text + vs(to_both))
    v1, v2 = table.routes_for(HOST)[0].destinations
    assert (v1.subset.load_balancer, v1.subset.hash_on) == ("HASH", HashOn(HASH_QUERY, "u"))
    assert (v2.subset.load_balancer, v2.subset.hash_on) == ("LEAST_REQUEST", None)
    assert (table.load_balancer(HOST), table.hash_on(HOST)) == ("LEAST_REQUEST", None)


# -- choices: what the compiled relay gets -----------------------------------


def test_choices_carry_the_policy_per_destination(tmp_path: Path) -> None:
    table = load(tmp_path, HOST_COOKIE_V1_HEADER_V2_RANDOM + vs(TO_EACH))
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, Request(path="/"))
    got = [(ws.subset, ws.policy, ws.hash_on, [ep(e) for e in ws.endpoints]) for ws in rc.subsets]
    assert got == [
        ("v1", "HASH", X_USER, [V1A, V1B]),
        ("v2", "RANDOM", None, [V2]),
        ("all", "HASH", COOKIE, [V1A, V1B, V2]),
    ]


def test_choices_of_the_default_route_carry_the_host_s_policy(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpHeaderName: x-user}\n")
    svc = table.service(SHOP_HOST)
    assert svc is not None
    (only,) = table.choices(svc, 8080, Request(path="/")).subsets
    assert (only.policy, only.hash_on) == ("HASH", X_USER)
    assert [ep(e) for e in only.endpoints] == SHOP_EPS
    # an ejected endpoint leaves the list the compiled relay hashes over
    rc = table.choices(svc, 8080, Request(path="/"), healthy=lambda e: e.address != "198.18.1.2")
    assert [ep(e) for e in rc.subsets[0].endpoints] == [e for e in SHOP_EPS if e[0] != "198.18.1.2"]


# -- decide: the pure twin's draw ------------------------------------------------


def _first(table: RouteTable, request: Request | None, **kw: object) -> tuple[str, int]:
    svc = table.service(SHOP_HOST)
    assert svc is not None
    d = table.decide(svc, 8080, request, **kw)  # type: ignore[arg-type]
    return ep(d.endpoints[0])


def test_the_same_header_value_always_the_same_endpoint(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpHeaderName: x-user}\n")
    for user in ("jason", "ann", "bob"):
        want = predicted(user.encode(), SHOP_EPS)
        got = {_first(table, Request(path="/", headers={"X-User": user})) for _ in range(20)}
        assert got == {want}, user


def test_the_source_ip_is_the_clients_packed_address(tmp_path: Path) -> None:
    """useSourceIp: the client's address the relay gives (Request.source),
    whatever the headers say; unknown: random (both endpoints seen)."""
    table = shop(tmp_path, "consistentHash: {useSourceIp: true}\n")
    for last in range(1, 20):
        addr = bytes([198, 18, 7, last])
        want = predicted(addr, SHOP_EPS)
        got = {
            _first(table, Request(path="/", headers={"x-user": str(i)}, source=addr))
            for i in range(5)
        }
        assert got == {want}, addr
    assert len({_first(table, Request(path="/")) for _ in range(50)}) > 1
    # a raw TCP connection: its client's address, given beside no request
    svc = table.service(SHOP_HOST)
    assert svc is not None
    addr = bytes([198, 18, 7, 1])
    raw = {ep(table.decide(svc, 8080, None, source=addr).endpoints[0]) for _ in range(5)}
    assert raw == {predicted(addr, SHOP_EPS)}


def test_the_whole_order_is_hash_order_s(tmp_path: Path) -> None:
    """A retry goes down the same order, as the compiled relay's."""
    table = shop(tmp_path, "consistentHash: {httpQueryParameterName: u}\n")
    svc = table.service(SHOP_HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/cart?x=1&u=jason"))
    order = hash_order(hash_key(b"jason"), [endpoint_hash(e) for e in SHOP_EPS])
    assert [ep(e) for e in d.endpoints] == [SHOP_EPS[i] for i in order]


def test_different_values_spread_over_the_endpoints(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpHeaderName: x-user}\n")
    counts = Counter(
        _first(table, Request(path="/", headers={"x-user": f"user-{i}"})) for i in range(1000)
    )
    assert set(counts) == set(SHOP_EPS)
    mean, sd = 1000 / 5, (1000 * 0.2 * 0.8) ** 0.5
    assert all(abs(c - mean) < 4 * sd for c in counts.values()), counts


def test_an_unhealthy_endpoint_moves_only_its_own_keys(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpCookie: {name: sid}}\n")
    gone = SHOP_EPS[2]
    moved = 0
    for i in range(300):
        req = Request(path="/", headers={"cookie": f"a=1; sid=s{i}"})
        before = _first(table, req)
        after = _first(table, req, healthy=lambda e: (e.address, e.port) != gone)
        if before == gone:
            moved += 1
            # to its next in the order the rest give it
            assert after == predicted(f"s{i}".encode(), [e for e in SHOP_EPS if e != gone])
        else:
            assert after == before
    assert moved > 0


def test_an_absent_key_is_a_seeded_random_endpoint(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpHeaderName: x-user}\n", seed=3)
    draws = [_first(table, Request(path="/")) for _ in range(60)]
    assert set(draws) == set(SHOP_EPS)
    again = shop(tmp_path, "consistentHash: {httpHeaderName: x-user}\n", seed=3)
    assert [_first(again, Request(path="/")) for _ in range(60)] == draws
    svc = table.service(SHOP_HOST)
    assert svc is not None
    assert table.decide(svc, 8080, Request(path="/")).edits is None  # no cookie to set


def test_a_raw_connection_draws_a_random_key_and_sets_no_cookie(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpCookie: {name: sid, ttl: 1h}}\n", seed=5)
    svc = table.service(SHOP_HOST)
    assert svc is not None
    decisions = [table.decide(svc, 8080, None) for _ in range(60)]
    assert {ep(d.endpoints[0]) for d in decisions} == set(SHOP_EPS)
    assert all(d.edits is None for d in decisions)


def _set_cookie(edits: object) -> list[str]:
    return [v for n, v in getattr(edits, "response_add", ()) if n == "set-cookie"]


def test_a_missing_cookie_is_generated_hashed_and_set(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpCookie: {name: sid, ttl: 1h, path: /}}\n")
    svc = table.service(SHOP_HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/", headers={"cookie": "other=1"}))
    (line,) = _set_cookie(d.edits)
    value = line.split('"')[1]
    assert line == f'sid="{value}"; Max-Age=3600; Path=/; HttpOnly'
    assert len(value) == 16 and int(value, 16) >= 0
    assert ep(d.endpoints[0]) == predicted(value.encode(), SHOP_EPS)
    # the client sends it back: the same endpoint, nothing set again
    for _ in range(10):
        back = table.decide(svc, 8080, Request(path="/", headers={"cookie": f'sid="{value}"'}))
        assert ep(back.endpoints[0]) == ep(d.endpoints[0])
        assert back.edits is None
    # each new client its own cookie
    values = {_set_cookie(table.decide(svc, 8080, Request(path="/")).edits)[0] for _ in range(20)}
    assert len(values) == 20


def test_no_cookie_is_set_on_the_503_of_no_endpoint(tmp_path: Path) -> None:
    """Every pod ejected (an outlier policy: no panic mode): the router's
    503 sets no cookie, as the compiled relay's, and Envoy's, whose router
    adds a generated cookie to an upstream's response only."""
    f = tmp_path / "shop.yaml"
    policy = shop_rule("consistentHash: {httpCookie: {name: sid, ttl: 1h}}\n")
    f.write_text(SHOP + "---\n" + policy + "    outlierDetection: {consecutive5xxErrors: 1}\n")
    table = load_rules([str(f)], seed=7).table
    svc = table.service(SHOP_HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/"), healthy=lambda e: False)
    assert (d.endpoints, d.status, _set_cookie(d.edits)) == ([], 503, [])
    d = table.decide(svc, 8080, Request(path="/"))  # (the pods back: one is set)
    assert d.endpoints and len(_set_cookie(d.edits)) == 1


def test_a_session_cookie_has_no_max_age(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpCookie: {name: user, ttl: 0s}}\n")
    svc = table.service(SHOP_HOST)
    assert svc is not None
    (line,) = _set_cookie(table.decide(svc, 8080, Request(path="/")).edits)
    assert line.startswith('user="') and line.endswith('"; HttpOnly')


def test_the_cookie_line_goes_after_the_route_s_own_response_edits(tmp_path: Path) -> None:
    text = (
        DR_HEAD
        + "  trafficPolicy:\n    loadBalancer:\n"
        + "      consistentHash: {httpCookie: {name: sid, ttl: 60s}}\n"
        + vs(
            "{headers: {response: {add: {x-a: '1'}, set: {x-b: '2'}, remove: [set-cookie]}}, "
            "route: [{destination: {host: bootcamp}, "
            "headers: {response: {add: {x-c: '3'}}}}]}"
        )
    )
    table = load(tmp_path, text)
    svc = table.service(HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/"))
    assert d.edits is not None
    (line,) = _set_cookie(d.edits)
    assert d.edits.response_add == (("x-a", "1"), ("x-c", "3"), ("set-cookie", line))
    assert d.edits.response_set == (("x-b", "2"),)
    assert d.edits.response_remove == ("set-cookie",)
    # sent back: the route's own edits alone
    value = line.split('"')[1]
    back = table.decide(svc, 8080, Request(path="/", headers={"cookie": f"sid={value}"}))
    assert back.edits is not None and _set_cookie(back.edits) == []
    assert back.edits.response_add == (("x-a", "1"), ("x-c", "3"))
    assert ep(back.endpoints[0]) == ep(d.endpoints[0])


def test_a_cookie_without_ttl_is_only_read(tmp_path: Path) -> None:
    table = shop(tmp_path, "consistentHash: {httpCookie: {name: sid}}\n", seed=1)
    svc = table.service(SHOP_HOST)
    assert svc is not None
    ds = [table.decide(svc, 8080, Request(path="/")) for _ in range(40)]
    assert all(d.edits is None for d in ds)
    assert {ep(d.endpoints[0]) for d in ds} == set(SHOP_EPS)


def test_the_weights_stay_per_request(tmp_path: Path) -> None:
    """Sticky within a subset, not across the split (as in Istio)."""
    table = load(tmp_path, HOST_COOKIE_V1_HEADER_V2_RANDOM + vs(TO_EACH))
    svc = table.service(HOST)
    assert svc is not None
    req = Request(path="/", headers={"x-user": "jason", "cookie": "sid=abc"})
    subsets = Counter(table.decide(svc, 8080, req).subset for _ in range(300))
    assert set(subsets) == {"v1", "v2", "all"}
    firsts = {
        d.subset: ep(d.endpoints[0])
        for d in (table.decide(svc, 8080, req) for _ in range(100))
        if d.subset != "v2"
    }
    assert firsts == {
        "v1": predicted(b"jason", [V1A, V1B]),
        "all": predicted(b"abc", [V1A, V1B, V2]),
    }


# -- the table's JSON, resolved tables, validate -v ----------------------------


def test_config_dump_json_carries_it(tmp_path: Path) -> None:
    table = load(tmp_path, HOST_COOKIE_V1_HEADER_V2_RANDOM + vs(TO_EACH))
    data = json.loads(json.dumps(table.to_json()))
    (svc,) = [s for s in data["services"] if s["host"] == HOST]
    assert (svc["load_balancer"], svc["hash_on"]) == (
        "HASH",
        {"kind": "cookie", "name": "sid", "ttl": 60, "path": ""},
    )
    dests = data["routes"][HOST][0]["route"]
    assert [(d["load_balancer"], d["hash_on"]) for d in dests] == [
        ("HASH", {"kind": "header", "name": "x-user"}),
        ("RANDOM", None),
        ("HASH", {"kind": "cookie", "name": "sid", "ttl": 60, "path": ""}),
    ]


def test_a_resolved_table_keeps_the_host_s_hash(tmp_path: Path) -> None:
    table = load(tmp_path, rule("consistentHash: {httpHeaderName: x-user}\n"))
    again = resolved_table(table, {})
    assert again.hash_on(HOST) == X_USER
    assert again == table
    assert table != load(tmp_path, rule("consistentHash: {httpHeaderName: x-other}\n"))


def test_validate_verbose_says_each_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "rules.yaml"
    text = HOST_COOKIE_V1_HEADER_V2_RANDOM.replace(
        "{name: sid, ttl: 60s}", "{name: sid, ttl: 3600s, path: /}"
    )
    f.write_text(text + vs(TO_EACH))
    code = main(["validate", "-v", str(f), REGISTRY])
    out, err = capsys.readouterr()
    assert code == 0, err
    cookie = "consistent hash on cookie sid (generated, ttl 3600s, path /)"
    assert f"load balancer {cookie}" in out
    assert "subset v1 (version=v1; consistent hash on header x-user)" in out
    assert "subset v2 (version=v2; RANDOM)" in out
    assert f"subset all (app=bootcamp; {cookie})" in out


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("{httpCookie: {name: sid}}", "consistent hash on cookie sid (never generated)"),
        (
            "{httpCookie: {name: u, ttl: 0s}}",
            "consistent hash on cookie u (generated, session cookie)",
        ),
        ("{httpQueryParameterName: u}", "consistent hash on query parameter u"),
        ("{useSourceIp: true}", "consistent hash on the client's address"),
    ],
)
def test_validate_verbose_says_each_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, said: str
) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(rule(f"consistentHash: {body}\n"))
    assert main(["validate", "-v", str(f), REGISTRY]) == 0
    out, _ = capsys.readouterr()
    assert f"load balancer {said}" in out
    # and the requests no route takes go by it too, not round robin
    assert f"no routes: {said} over all endpoints (route 'default')" in out
