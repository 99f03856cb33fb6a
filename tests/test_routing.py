"""Sans-IO route selection on hand-built tables: matches, subsets, load balancers, lookups."""

from __future__ import annotations

from collections import Counter

import pytest

from l4proxy.rules.dns import NameState, resolved_table
from l4proxy.rules.routing import (
    Decision,
    Destination,
    Endpoint,
    IngressPath,
    Labels,
    Match,
    OutlierPolicy,
    Request,
    RequestShape,
    Route,
    RouteTable,
    Service,
    ServicePort,
    StringMatch,
    Subset,
)
from tests._round_robin import rotated, rotation

HOST = "bootcamp.default.svc.cluster.local"
V1A = Endpoint("198.18.0.11", 8080, {"app": "bootcamp", "version": "v1"})
V1B = Endpoint("198.18.0.12", 8080, {"app": "bootcamp", "version": "v1"})
V2 = Endpoint("198.18.0.13", 8080, {"app": "bootcamp", "version": "v2"})
HTTP = ServicePort(8080, "http", "HTTP")
BOOTCAMP = Service.create(
    HOST,
    [HTTP],
    [V1A, V1B, V2],
    addresses=["198.19.0.10"],
    aliases=["bootcamp", "bootcamp.default", "bootcamp.default.svc"],
)
V1 = Subset("v1", Labels({"version": "v1"}))
V2S = Subset("v2", Labels({"version": "v2"}))


def table(*routes: Route, lb: str | None = None, **kw: object) -> RouteTable:
    return RouteTable(
        [BOOTCAMP],
        {HOST: list(routes)},
        load_balancers={HOST: lb} if lb else None,
        seed=7,
        **kw,  # type: ignore[arg-type]
    )


def to(subset: Subset, weight: int = 100) -> Destination:
    return Destination(HOST, subset, weight)


def req(path: str = "/", method: str = "GET", **headers: str) -> Request:
    return Request(method=method, path=path, authority="bootcamp:8080", headers=headers)


# -- value types ----------------------------------------------------------


def test_endpoint_is_frozen_and_hashable() -> None:
    e = Endpoint("10.0.0.1", 80, {"a": "b"})
    assert e == Endpoint("10.0.0.1", 80, Labels({"a": "b"}))
    assert len({e, Endpoint("10.0.0.1", 80, {"a": "b"})}) == 1
    assert isinstance(e.labels, Labels) and e.labels == {"a": "b"}
    with pytest.raises(AttributeError):
        e.port = 81  # type: ignore[misc]


def test_labels_select_subsets() -> None:
    sel = Labels({"version": "v1"})
    assert sel.selects({"app": "x", "version": "v1"})
    assert not sel.selects({"app": "x", "version": "v2"})
    assert Labels().selects({})
    assert str(Labels({"b": "2", "a": "1"})) == "a=1,b=2"


def test_service_port_is_http() -> None:
    assert ServicePort(80, "http", "HTTP").is_http
    assert ServicePort(80, "grpc", "GRPC").is_http
    assert not ServicePort(80, "http", "TCP").is_http  # the protocol decides
    assert not ServicePort(443, "https", "HTTPS").is_http


# -- decisions ------------------------------------------------------------


def test_no_rule_is_round_robin_over_every_endpoint() -> None:
    t = RouteTable([BOOTCAMP])
    picks = [t.decide(BOOTCAMP, 8080, req()) for _ in range(6)]
    # each in turn, from wherever the counter starts (its drawn offset)
    k = rotation([d.endpoints[0] for d in picks], [V1A, V1B, V2])
    d = picks[0]
    assert (d.route, d.subset, d.service) == ("default", "default", BOOTCAMP)
    # The rest of the list is the retry order: the whole service, rotated.
    assert picks[1].endpoints == rotated([V1A, V1B, V2], k + 1)


def test_catch_all_route_picks_its_subset() -> None:
    t = table(Route("all-v1", (to(V1),)))
    ds = [t.decide(BOOTCAMP, 8080, req()) for _ in range(4)]
    assert {(d.route, d.subset) for d in ds} == {("all-v1", "v1")}
    k = rotation([d.endpoints[0] for d in ds], [V1A, V1B])
    assert [d.endpoints for d in ds[:2]] == [rotated([V1A, V1B], k), rotated([V1A, V1B], k + 1)]


def test_first_matching_route_wins() -> None:
    jason = Match(headers=(("end-user", StringMatch("exact", "jason")),))
    t = table(Route("jason", (to(V2S),), (jason,)), Route("rest", (to(V1),)))
    assert t.decide(BOOTCAMP, 8080, req(**{"end-user": "jason"})).route == "jason"
    assert t.decide(BOOTCAMP, 8080, req(**{"end-user": "bob"})).route == "rest"
    assert t.decide(BOOTCAMP, 8080, req()).route == "rest"


def test_no_matching_route_falls_back_to_default() -> None:
    only = Match(uri=StringMatch("prefix", "/api"))
    t = table(Route("api", (to(V2S),), (only,)))
    d = t.decide(BOOTCAMP, 8080, req("/web"))
    assert (d.route, d.subset, len(d.endpoints)) == ("default", "default", 3)


def test_an_unmatched_refusing_host_answers_404_where_its_http_routes_apply() -> None:
    """A VirtualService's or an HTTPRoute's host (``unmatched``): a request
    no route matches is answered 404 (Envoy's NR), on the ports and for the
    callers some http route serves; elsewhere Istio builds no route
    configuration from it, and the host keeps the round robin."""
    api = Match(uri=StringMatch("prefix", "/api"))
    t = table(Route("api", (to(V2S),), (api,)), unmatched=[HOST])
    d = t.decide(BOOTCAMP, 8080, req("/web"))
    assert (d.route, d.subset, d.endpoints, d.status) == ("no_route", "none", [], 404)
    rc = t.choices(BOOTCAMP, 8080, req("/web"))
    assert (rc.route, rc.subsets, rc.status) == ("no_route", (), 404)
    assert t.decide(BOOTCAMP, 8080, None).route == "default"  # raw bytes: per connection
    assert t.refuses_unmatched(BOOTCAMP, 8080)
    # Routes only for port 9090, or only for callers labelled app=client:
    on_9090 = Match(uri=api.uri, port=9090)
    t = table(Route("api", (to(V2S),), (on_9090,)), unmatched=[HOST])
    assert t.decide(BOOTCAMP, 8080, req("/web")).route == "default"
    clients = Match(uri=api.uri, source_labels=Labels({"app": "client"}))
    t = table(Route("api", (to(V2S),), (clients,)), unmatched=[HOST])
    assert t.decide(BOOTCAMP, 8080, req("/web"), {"app": "other"}).route == "default"
    assert t.decide(BOOTCAMP, 8080, req("/web"), {"app": "client"}).status == 404
    # tcp routes only: no http route configuration, nothing refused.
    t = table(Route("pg", (to(V2S),), (Match(port=5432),), "tcp"), unmatched=[HOST])
    assert t.decide(BOOTCAMP, 8080, req("/web")).route == "default"


def test_a_catch_all_route_makes_unmatched_moot_for_equality() -> None:
    """A host with a route matching every request has no unmatched request:
    a RouteRule and the equivalent VirtualService compare equal."""
    assert table(Route("all", (to(V1),)), unmatched=[HOST]) == table(Route("all", (to(V1),)))
    api = Route("api", (to(V2S),), (Match(uri=StringMatch("prefix", "/api")),))
    assert table(api, unmatched=[HOST]) != table(api)


def test_a_dns_resolved_table_keeps_the_404_of_an_unmatched_request() -> None:
    """The table the sidecar serves when endpoints are DNS names is rebuilt
    per resolution: it dropped the unmatched-refusing hosts, and a
    VirtualService's unmatched request went round robin again."""
    svc = Service.create(
        HOST, [HTTP], [Endpoint("bootcamp-v1.default", 8080, {"version": "v1"})], resolution="DNS"
    )
    api = Route("api", (to(V1),), (Match(uri=StringMatch("prefix", "/api")),))
    base = RouteTable([svc], {HOST: [api]}, unmatched=[HOST])
    states = {"bootcamp-v1.default": NameState("bootcamp-v1.default", ("198.18.0.7",), True)}
    t = resolved_table(base, states)
    resolved = t.service(HOST)
    assert resolved is not None
    assert t.decide(resolved, 8080, req("/api")).endpoints[0].address == "198.18.0.7"
    assert t.decide(resolved, 8080, req("/web")).status == 404


@pytest.mark.parametrize(
    ("match", "hit", "miss"),
    [
        (Match(uri=StringMatch("exact", "/a")), req("/a?x=1"), req("/a/b")),
        (Match(uri=StringMatch("prefix", "/a")), req("/ab"), req("/b/a")),
        (Match(uri=StringMatch("regex", "/v[0-9]+/.*")), req("/v12/x"), req("/x/v12/x")),
        (Match(method=StringMatch("exact", "POST")), req(method="POST"), req(method="GET")),
        (Match(authority=StringMatch("prefix", "bootcamp")), req(), Request(authority="other")),
        (Match(scheme=StringMatch("exact", "http")), req(), Request(scheme="https")),
        (
            Match(headers=(("cookie", StringMatch("regex", "^(.*?;)?(user=jason)(;.*)?$")),)),
            req(cookie="a=1;user=jason;b=2"),
            req(cookie="user=jasonx"),
        ),
        # RE2's language, as Envoy's: a POSIX class, not a set then a literal "]"
        (
            Match(uri=StringMatch("regex", "/user/[[:alpha:]]+")),
            req("/user/alice"),
            req("/user/a]"),
        ),
        (
            Match(
                uri=StringMatch("prefix", "/api"),
                headers=(("x-canary", StringMatch("exact", "1")),),
            ),
            req("/api/x", **{"x-canary": "1"}),
            req("/api/x"),  # both conditions must hold
        ),
    ],
)
def test_match_conditions(match: Match, hit: Request, miss: Request) -> None:
    t = table(Route("r", (to(V2S),), (match,)))
    assert t.decide(BOOTCAMP, 8080, hit).route == "r"
    assert t.decide(BOOTCAMP, 8080, miss).route == "default"


def test_match_blocks_are_ored() -> None:
    m = (Match(uri=StringMatch("exact", "/a")), Match(uri=StringMatch("exact", "/b")))
    t = table(Route("r", (to(V2S),), m))
    assert t.decide(BOOTCAMP, 8080, req("/a")).route == "r"
    assert t.decide(BOOTCAMP, 8080, req("/b")).route == "r"
    assert t.decide(BOOTCAMP, 8080, req("/c")).route == "default"


def test_request_header_names_are_case_insensitive() -> None:
    m = Match(headers=(("end-user", StringMatch("exact", "jason")),))
    t = table(Route("r", (to(V2S),), (m,)))
    r = Request(headers={"End-User": "jason"})
    assert t.decide(BOOTCAMP, 8080, r).route == "r"


def test_source_labels_and_port() -> None:
    m = Match(source_labels=Labels({"app": "tester"}), port=8080)
    t = table(Route("r", (to(V2S),), (m,)))
    assert t.decide(BOOTCAMP, 8080, req(), {"app": "tester", "version": "x"}).route == "r"
    assert t.decide(BOOTCAMP, 8080, req(), {"app": "client"}).route == "default"
    assert t.decide(BOOTCAMP, 9090, req(), {"app": "tester"}).route == "default"


def test_tcp_routes_on_destination_only() -> None:
    header = Match(headers=(("x", StringMatch("exact", "1")),))
    source = Match(source_labels=Labels({"app": "tester"}))
    t = table(
        Route("by-header", (to(V2S),), (header,)),
        Route("by-source", (to(V2S),), (source,)),
        Route("rest", (to(V1),)),
    )
    assert t.decide(BOOTCAMP, 8080, None, {"app": "tester"}).route == "by-source"
    assert t.decide(BOOTCAMP, 8080, None).route == "rest"  # header match cannot match TCP


def test_tcp_routes_come_first_for_raw_connections_on_a_tcp_port() -> None:
    """A service with no HTTP port: both kinds apply to its connections
    (the documented leniency), the tcp route first."""
    db = _db([ServicePort(5432, "tcp-pg", "TCP")])
    v1 = Destination(db.host, V1, 100)
    v2 = Destination(db.host, V2S, 100)
    t = RouteTable([db], {db.host: [Route("http", (v1,)), Route("tcp", (v2,), protocol="tcp")]})
    assert t.decide(db, 5432, None).route == "tcp"
    assert RouteTable([db], {db.host: [Route("http", (v1,))]}).decide(db, 5432, None).route == (
        "http"
    )


def test_a_tcp_route_never_applies_on_an_http_port() -> None:
    """A VirtualService of tcp routes only on bootcamp's HTTP port 8080: it
    took every request and raw connection there (all to v2); Istio's
    listener on an HTTP port is an HTTP connection manager built from the
    http routes alone, so the port keeps its default: the round robin over
    every endpoint, no 404 (no http route), requests and raw bytes alike."""
    tcp_only = table(Route("bootcamp", (to(V2S),), protocol="tcp"), unmatched=[HOST])
    picks = [tcp_only.decide(BOOTCAMP, 8080, req()) for _ in range(6)]
    assert {(d.route, d.subset) for d in picks} == {("default", "default")}
    rotation([d.endpoints[0] for d in picks], [V1A, V1B, V2])
    raw = [tcp_only.decide(BOOTCAMP, 8080, None) for _ in range(3)]
    assert {d.route for d in raw} == {"default"}
    assert sorted(d.endpoints[0].address for d in raw) == sorted(e.address for e in (V1A, V1B, V2))
    rc = tcp_only.choices(BOOTCAMP, 8080, req())
    assert rc.route == "default" and len(rc.subsets[0].endpoints) == 3
    assert not tcp_only.refuses_unmatched(BOOTCAMP, 8080)
    # nothing takes every connection there: the port's own settings hold
    assert tcp_only.to_json()["caught"] == {}
    # Beside http routes: the http ones route the port, raw bytes too (per
    # connection), and what none matches is their 404, never the tcp route.
    api = Route("api", (to(V1),), (Match(uri=StringMatch("prefix", "/api")),))
    both = table(api, Route("tcp", (to(V2S),), protocol="tcp"), unmatched=[HOST])
    assert both.decide(BOOTCAMP, 8080, req("/api")).route == "api"
    assert both.decide(BOOTCAMP, 8080, req("/web")).status == 404
    assert both.decide(BOOTCAMP, 8080, None).route == "default"
    every = table(Route("http", (to(V1),)), Route("tcp", (to(V2S),), protocol="tcp"))
    assert every.decide(BOOTCAMP, 8080, req()).route == "http"
    assert every.decide(BOOTCAMP, 8080, None).route == "http"  # (it was the tcp route)


def test_a_tcp_route_on_an_http_port_reaches_no_endpoint_s_settings() -> None:
    """The subset of a tcp route that applies nowhere (its every port is
    HTTP) reaches no endpoint: its outlier detection is not the v2 pod's;
    the service's own settings hold on the port."""
    eager = OutlierPolicy(consecutive_5xx=1)
    v2 = Subset("v2", Labels({"version": "v2"}), outlier=eager)
    t = table(Route("bootcamp", (to(v2),), protocol="tcp"))
    assert t.outlier_policies() == {}
    assert t.ejection_groups(V2) == ((V1A, V1B, V2),)
    db = _db([ServicePort(5432, "tcp-pg", "TCP")])
    on_tcp = RouteTable([db], {db.host: [Route("pg", (Destination(db.host, v2, 100),), (), "tcp")]})
    v2_ep = next(e for e in db.endpoints if e.labels["version"] == "v2")
    assert on_tcp.outlier_policies() == {(v2_ep.address, v2_ep.port): eager}


def test_each_port_takes_its_kind_of_routes() -> None:
    """A VirtualService of both kinds on a service with an HTTP port and a
    TCP port: the HTTP port's requests and connections take the http
    routes, the TCP port's connections the tcp routes; the table's JSON
    ('validate -v') says each route's ports."""
    db = _db([ServicePort(8080, "http", "HTTP"), ServicePort(5432, "tcp-pg", "TCP")])
    v1 = Destination(db.host, V1, 100)
    v2 = Destination(db.host, V2S, 100)
    t = RouteTable(
        [db],
        {db.host: [Route("api", (v1,)), Route("pg", (v2,), protocol="tcp")]},
        unmatched=[db.host],
        seed=7,
    )
    assert t.decide(db, 8080, req()).route == "api"
    assert t.decide(db, 8080, None).route == "api"
    assert t.decide(db, 5432, None).route == "pg"
    assert {e.labels["version"] for e in t.decide(db, 5432, None).endpoints} == {"v2"}
    assert t.route_ports(db, t.routes_for(db.host)[0]) == [8080]
    assert t.route_ports(db, t.routes_for(db.host)[1]) == [5432]
    routes = t.to_json()["routes"][db.host]
    assert [(r["name"], r.get("ports"), r.get("not_on")) for r in routes] == [
        ("api", [8080], [5432]),
        ("pg", [5432], [8080]),
    ]
    assert t.to_json()["caught"] == {db.host: [8080, 5432]}
    # The same tcp route alone still routes the TCP port, and not the HTTP one.
    tcp_only = RouteTable([db], {db.host: [Route("pg", (v2,), protocol="tcp")]}, seed=7)
    assert tcp_only.decide(db, 5432, None).route == "pg"
    assert tcp_only.decide(db, 8080, None).route == "default"
    assert tcp_only.decide(db, 8080, req()).route == "default"


def test_empty_subset_gives_no_endpoints() -> None:
    t = table(Route("v3", (to(Subset("v3", Labels({"version": "v3"}))),)))
    d = t.decide(BOOTCAMP, 8080, req())
    assert d == Decision(BOOTCAMP, "v3", "v3", [])


def test_destination_in_another_service() -> None:
    other_ep = Endpoint("198.18.0.50", 9000, {"app": "ratings"})
    ratings = Service.create(
        "ratings.default.svc.cluster.local", [ServicePort(9000, "http")], [other_ep]
    )
    route = Route("to-ratings", (Destination(ratings.host, Subset("default")),))
    t = RouteTable([BOOTCAMP, ratings], {HOST: [route]})
    d = t.decide(BOOTCAMP, 8080, req())
    assert d.service is ratings and d.endpoints == [other_ep]  # its only port is used
    lost = RouteTable([BOOTCAMP], {HOST: [route]})
    assert lost.decide(BOOTCAMP, 8080, req()).endpoints == []


def test_unhealthy_endpoints_are_skipped_unless_all_are() -> None:
    t = RouteTable([BOOTCAMP])
    down = {V1A}
    picks = [t.decide(BOOTCAMP, 8080, req(), healthy=lambda e: e not in down) for _ in range(4)]
    assert all(V1A not in d.endpoints for d in picks)
    assert Counter(d.endpoints[0] for d in picks) == {V1B: 2, V2: 2}
    every = t.decide(BOOTCAMP, 8080, req(), healthy=lambda e: False)
    assert sorted(every.endpoints, key=lambda e: e.address) == [V1A, V1B, V2]


def test_least_request_prefers_idle_endpoints() -> None:
    t = table(lb="LEAST_REQUEST")
    active = {V1A: 5, V1B: 0, V2: 2}
    d = t.decide(BOOTCAMP, 8080, req(), active=lambda e: active[e])
    assert d.endpoints == [V1B, V2, V1A]
    # With equal load it still spreads (round robin between ties).
    firsts = {t.decide(BOOTCAMP, 8080, req(), active=lambda e: 0).endpoints[0] for _ in range(3)}
    assert firsts == {V1A, V1B, V2}


def test_random_policy_inside_a_subset() -> None:
    t = table(lb="RANDOM")
    firsts = Counter(t.decide(BOOTCAMP, 8080, req()).endpoints[0] for _ in range(300))
    assert set(firsts) == {V1A, V1B, V2}
    assert max(firsts.values()) < 150  # not stuck on one


def test_subset_policy_overrides_host_policy() -> None:
    rr = Subset("v1", Labels({"version": "v1"}), "ROUND_ROBIN")
    t = table(Route("r", (to(rr),)), lb="LEAST_REQUEST")
    firsts = [t.decide(BOOTCAMP, 8080, req(), active=lambda e: 0).endpoints[0] for _ in range(4)]
    rotation(firsts, [V1A, V1B])


def test_multi_port_service_uses_the_endpoints_of_the_port() -> None:
    web = Endpoint("198.18.2.1", 8080)
    admin = Endpoint("198.18.2.1", 9901)
    svc = Service(
        "multi.default.svc.cluster.local",
        (ServicePort(80, "http"), ServicePort(9901, "tcp-admin")),
        ((80, (web,)), (9901, (admin,))),
    )
    t = RouteTable([svc])
    assert t.decide(svc, 80, None).endpoints == [web]
    assert t.decide(svc, 9901, None).endpoints == [admin]
    assert svc.endpoints == (web, admin)


# -- lookups --------------------------------------------------------------


def test_service_for_address() -> None:
    t = RouteTable([BOOTCAMP])
    assert t.service_for_address("198.19.0.10", 8080) == (BOOTCAMP, HTTP)
    assert t.service_for_address("::ffff:198.19.0.10", 8080) == (BOOTCAMP, HTTP)
    assert t.service_for_address("198.19.0.10", 9090) is None  # not a port of it
    assert t.service_for_address("198.19.0.11", 8080) is None
    assert t.service_for_address("not-an-ip", 8080) is None


def _on(host: str, ports: list[int], addresses: list[str]) -> Service:
    return Service.create(
        host,
        [ServicePort(p, f"tcp-{p}", "TCP") for p in ports],
        [Endpoint("198.18.0.20", 9)],
        addresses=addresses,
    )


def test_services_sharing_an_address_on_different_ports_are_each_found_on_theirs() -> None:
    """A VIP is an address and a port, as Istio's outbound listeners are
    (10.9.9.9_80, 10.9.9.9_81): the service listed second is found on its
    own port (before: the address was the first's, port 81 None)."""
    a = _on("a.example.com", [80], ["10.9.9.9"])
    b = _on("b.example.com", [81, 82], ["10.9.9.9/32", "::ffff:10.9.9.10"])
    c = _on("c.example.com", [83], ["10.9.0.0/16"])  # a block covering both
    d = _on("d.example.com", [84], ["10.9.9.0/24"])
    t = RouteTable([a, b, c, d])
    for ip, port, host in [
        ("10.9.9.9", 80, "a.example.com"),
        ("10.9.9.9", 81, "b.example.com"),
        ("::ffff:10.9.9.9", 82, "b.example.com"),
        ("10.9.9.10", 81, "b.example.com"),
        ("10.9.9.10", 80, None),  # b's address, not a's port there
        ("10.9.9.9", 83, "c.example.com"),  # the block's, on its port
        ("10.9.9.9", 84, "d.example.com"),
        ("10.9.1.1", 83, "c.example.com"),
        ("10.9.1.1", 84, None),
        ("10.9.9.9", 85, None),  # the address, known on no such port
    ]:
        got = t.service_for_address(ip, port)
        assert (got[0].host if got else None) == host, (ip, port)
        if got is not None:
            assert got[1].number == port
    # Nested blocks: the most specific with the port wins (Envoy's longest
    # prefix), in either order (before: the first listed, e's /16 on 90)
    e = _on("e.example.com", [90], ["10.8.0.0/16"])
    f = _on("f.example.com", [90, 91], ["10.8.1.0/24"])
    for t in (RouteTable([e, f]), RouteTable([f, e])):
        assert t.service_for_address("10.8.1.1", 90)[0] is f  # type: ignore[index]
        assert t.service_for_address("10.8.2.1", 90)[0] is e  # type: ignore[index]
        assert t.service_for_address("10.8.1.1", 91)[0] is f  # type: ignore[index]
        assert t.service_for_address("10.8.2.1", 91) is None


@pytest.mark.parametrize(
    "host",
    [
        "bootcamp",
        "bootcamp:8080",
        "bootcamp.default",
        "bootcamp.default.svc",
        "bootcamp.default.svc.cluster.local",
        "Bootcamp.Default.svc.cluster.local.:8080",
        "198.19.0.10:8080",
    ],
)
def test_service_for_host(host: str) -> None:
    t = RouteTable([BOOTCAMP])
    assert t.service_for_host(host, 8080) == (BOOTCAMP, HTTP)


def test_service_for_host_misses() -> None:
    t = RouteTable([BOOTCAMP])
    assert t.service_for_host("reviews", 8080) is None
    assert t.service_for_host("bootcamp", 9090) is None
    assert t.is_http_port(8080) and not t.is_http_port(9090)


def test_ingress_lookup() -> None:
    paths = [
        IngressPath("ns/a", None, "/bootcamp", "Exact", HOST, 8080),
        IngressPath("ns/a", None, "/api", "Prefix", HOST, "http"),
        IngressPath("ns/a", None, "/api/v2", "Prefix", HOST, 8080),
        IngressPath("ns/b", None, "/v1", "StringPrefix", HOST, 8080),
        IngressPath("ns/c", "shop.example.com", "/only", "Exact", HOST, 8080),
        IngressPath("ns/d", "*.example.com", "/wild", "Exact", HOST, 8080),
        IngressPath("ns/e", None, "/gone", "Exact", "gone.default.svc.cluster.local", 80),
    ]
    t = RouteTable([BOOTCAMP], ingress=paths)
    hit = (BOOTCAMP, HTTP)
    assert t.ingress(None, "/bootcamp") == hit
    assert t.ingress("anything:80", "/bootcamp?x=1") == hit
    assert t.ingress(None, "/bootcamp/") is None  # exact
    assert t.ingress(None, "/api") == hit and t.ingress(None, "/api/x") == hit
    assert t.ingress(None, "/apix") is None  # Prefix is per path element
    assert t.ingress(None, "/v1beta") == hit  # Istio 0.7 ".*": a string prefix
    assert t.ingress("shop.example.com", "/only") == hit
    assert t.ingress("shop.example.com", "/bootcamp") is None  # the host's rules only
    assert t.ingress("a.example.com", "/wild") == hit
    assert t.ingress("a.b.example.com", "/wild") is None
    assert t.ingress(None, "/gone") is None  # no such service (yet)
    with_default = RouteTable(
        [BOOTCAMP], ingress=[*paths, IngressPath("ns/f", None, "", "Default", HOST, 8080)]
    )
    assert with_default.ingress("shop.example.com", "/elsewhere") == hit


def test_empty_table() -> None:
    t = RouteTable.empty()
    assert t.services() == [] and t.to_json()["services"] == []
    assert t == RouteTable()
    assert t.service_for_address("198.19.0.10", 8080) is None


# -- what routing reads of the target: the relay's tests ------------------------------

# Pieces of origin-form targets: path elements that are, contain or extend the
# tested values, a query, a fragment.
_PIECES = (
    "/a",
    "/b",
    "/c",
    "/a/b",
    "/ab",
    "/api",
    "/v1",
    "/v1beta",
    "/only",
    "/wild",
    "/",
    "?",
    "#",
    "x",
)


def _targets(seed: int, n: int = 3000) -> list[str]:
    import random

    rng = random.Random(seed)
    out = ["".join(rng.choices(_PIECES, k=rng.randrange(1, 5))) for _ in range(n)]
    return [t if t.startswith("/") else "/" + t for t in out]


def _same_bits_same_outcome(tests: tuple, outcome: object, seed: int) -> int:
    """Targets passing the same tests have the same outcome; the number of
    distinct outcomes seen (so that a vacuous run cannot pass)."""
    from l4proxy.dataplane.verdict import request_bits

    seen: dict[bytes, object] = {}
    for target in _targets(seed):
        got = outcome(target)  # type: ignore[operator]
        bits = request_bits(tests, target)
        assert seen.setdefault(bits, got) == got, (target, bits, got, seen[bits])
    return len(set(map(repr, seen.values())))


def test_routes_read_the_target_only_through_their_tests() -> None:
    uri = (
        ("exact", StringMatch("exact", "/a")),
        ("prefix", StringMatch("prefix", "/a/b?")),  # the whole target, query included
        ("elements", StringMatch("path_prefix", "/c/")),  # Gateway API PathPrefix
        ("api", StringMatch("prefix", "/api")),
    )
    t = table(
        *(Route(name, (to(V2S),), (Match(uri=m),)) for name, m in uri),
        Route("rest", (to(V1),)),
    )
    shape = t.request_shape(BOOTCAMP)
    assert shape.tests is not None and not shape.method and not shape.headers
    routes = _same_bits_same_outcome(
        shape.tests, lambda target: t.decide(BOOTCAMP, 8080, req(target)).route, seed=1
    )
    assert routes == 5


def test_routes_read_headers_only_through_their_tests() -> None:
    """Exact and prefix header matches are tests too; a regex one makes the
    headers' values part of the shape."""
    import random

    from l4proxy.dataplane.verdict import request_bits

    jason = Match(headers=(("end-user", StringMatch("exact", "jason")),))
    beta = Match(
        uri=StringMatch("prefix", "/api"), headers=(("x-canary", StringMatch("prefix", "be")),)
    )
    t = table(
        Route("jason", (to(V2S),), (jason,)),
        Route("beta", (to(V2S),), (beta,)),
        Route("rest", (to(V1),)),
    )
    shape = t.request_shape(BOOTCAMP)
    assert shape.tests == (
        ("target_prefix", "/api"),
        ("header_exact", "end-user:jason"),
        ("header_prefix", "x-canary:be"),
    )
    assert not shape.headers
    rng = random.Random(3)
    seen: dict[bytes, str] = {}
    for target in _targets(4):
        headers = {}
        for name in ("end-user", "x-canary"):
            if rng.random() < 0.7:
                headers[name] = rng.choice(["jason", "jaso", "jason2", "b", "be", "beta", ""])
        route = t.decide(BOOTCAMP, 8080, req(target, **headers)).route
        bits = request_bits(shape.tests, target, headers)
        assert seen.setdefault(bits, route) == route, (target, headers)
    assert set(seen.values()) == {"jason", "beta", "rest"}
    regex = Match(headers=(("cookie", StringMatch("regex", ".*user=jason.*")),))
    both = table(Route("j", (to(V2S),), (jason, regex)))
    assert both.request_shape(BOOTCAMP) == ((("header_exact", "end-user:jason"),), False, True)
    uri_regex = Match(uri=StringMatch("regex", "/v[0-9]+"))
    headers_too = table(Route("j", (to(V2S),), (jason, uri_regex)))
    assert headers_too.request_shape(BOOTCAMP) == (None, False, True)
    # a gateway's services merged: the whole target wins, and header tests
    # it drops turn into header values
    header_tests = RequestShape((("header_exact", "end-user:jason"),), False, False)
    assert header_tests.merged(RequestShape(None, True, False)) == (None, True, True)
    assert RequestShape((), False, False).merged(RequestShape(None, False, False)) == (
        None,
        False,
        False,
    )


def test_a_regex_or_a_query_match_makes_the_whole_target_the_shape() -> None:
    regex = Match(uri=StringMatch("regex", "/v[0-9]+/.*"))
    query = Match(query=(("q", StringMatch("exact", "1")),))
    method = Match(uri=StringMatch("prefix", "/a"), method=StringMatch("exact", "POST"))
    assert table(Route("r", (to(V2S),), (regex,))).request_shape(BOOTCAMP).tests is None
    assert table(Route("q", (to(V2S),), (query,))).request_shape(BOOTCAMP).tests is None
    shape = table(Route("m", (to(V2S),), (method,))).request_shape(BOOTCAMP)
    assert shape == ((("target_prefix", "/a"),), True, False)
    assert table(Route("all", (to(V1),))).request_shape(BOOTCAMP) == ((), False, False)


@pytest.mark.parametrize("host", [None, "bootcamp", "shop.example.com", "a.example.com"])
def test_gateway_requests_read_the_target_only_through_their_tests(host: str | None) -> None:
    """Ingress paths (Exact, Prefix, StringPrefix, by host) and then the
    routes of the service a path names."""
    other = Service.create("other.default.svc.cluster.local", [HTTP], [V1A])
    paths = [
        IngressPath("ns/a", None, "/a", "Exact", HOST, 8080),
        IngressPath("ns/a", None, "/api", "Prefix", HOST, 8080),
        IngressPath("ns/a", None, "/api/v1", "Prefix", other.host, 8080),
        IngressPath("ns/b", None, "/v1", "StringPrefix", HOST, 8080),
        IngressPath("ns/c", "shop.example.com", "/only", "Exact", other.host, 8080),
        IngressPath("ns/c", "shop.example.com", "/", "Prefix", HOST, 8080),
        IngressPath("ns/d", "*.example.com", "/wild", "Exact", HOST, 8080),
        IngressPath("ns/f", None, "", "Default", other.host, 8080),
    ]
    routes = {
        HOST: [Route("ab", (to(V2S),), (Match(uri=StringMatch("prefix", "/ab")),))],
        other.host: [Route("c", (to(V2S),), (Match(uri=StringMatch("path_prefix", "/c")),))],
    }
    t = RouteTable([BOOTCAMP, other], routes, ingress=paths)

    def outcome(target: str) -> tuple[str, str] | None:
        found = t.ingress(host, target)
        if found is None:
            return None
        return found[0].host, t.decide(found[0], 8080, req(target)).route

    shape = t.gateway_shape(host)
    assert shape.tests is not None
    assert _same_bits_same_outcome(shape.tests, outcome, seed=2) >= 3


def test_a_regex_runs_in_time_linear_in_the_header() -> None:
    """``(a+)+b`` against a header of 30 ``a``s: Python's ``re`` backtracks
    through 2**30 ways (minutes; 40 would be hours) on the worker that
    decides, for every such request a client sends. RE2 answers at once."""
    redos = Match(headers=(("x-id", StringMatch("regex", "(a+)+b")),))
    t = table(Route("r", (to(V2S),), (redos,)))
    assert t.decide(BOOTCAMP, 8080, req(**{"x-id": "a" * 30})).route == "default"
    assert t.decide(BOOTCAMP, 8080, req(**{"x-id": "a" * 30 + "b"})).route == "r"


def _db(ports: list[ServicePort]) -> Service:
    eps = [Endpoint("198.18.0.21", p.number, {"version": v}) for v in ("v1", "v2") for p in ports]
    return Service.create("db.default.svc.cluster.local", ports, eps)


def test_an_http_route_leaves_the_tcp_ports_of_a_service_with_http_ones() -> None:
    """A VirtualService whose only route is an http catch-all → v2 (a canary
    of the HTTP API): on the service's TCP port (Postgres) it applied to
    every connection, so the whole database traffic went to v2. Istio never
    applies http routes to a TCP port: that port keeps its default."""
    db = _db([ServicePort(8080, "http", "HTTP"), ServicePort(5432, "tcp-pg", "TCP")])
    v2 = Subset("v2", Labels({"version": "v2"}))
    canary = Route("api", (Destination(db.host, v2, 100),))
    t = RouteTable([db], {db.host: [canary]}, seed=7)
    assert t.decide(db, 5432, None).route == "default"
    assert {e.labels["version"] for e in t.decide(db, 5432, None).endpoints} == {"v1", "v2"}
    assert t.decide(db, 8080, req()).route == "api"  # the HTTP port's requests
    assert t.decide(db, 8080, None).route == "api"  # non-HTTP bytes on the HTTP port
    pinned = Route("pg", (Destination(db.host, v2, 100),), (Match(port=5432),))
    assert RouteTable([db], {db.host: [pinned]}).decide(db, 5432, None).route == "pg"
    # A service with no HTTP port: its rules still split its connections.
    raw = _db([ServicePort(5432, "tcp-pg", "TCP")])
    t2 = RouteTable([raw], {raw.host: [canary]}, seed=7)
    assert t2.decide(raw, 5432, None).route == "api"
