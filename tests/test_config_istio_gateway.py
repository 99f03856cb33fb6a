"""Istio's Gateway (networking.istio.io) and VirtualServices bound to it by
``spec.gateways``: the table they compile to, and errors with file:line.

Rule files are loaded beside REGISTRY, a bookinfo registry: productpage
(one pod), reviews (pods v1, v2, v3, with a DestinationRule of those
subsets) and details, all on port 9080. The gateway's port is 80 unless a
case says otherwise.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest

from l4proxy.rules import ConfigError, LoadResult, load_rules
from l4proxy.rules.routing import Decision, LocalAnswer, Request, RouteTable, Service
from tests._round_robin import rotation

REGISTRY = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: productpage}
spec:
  hosts: [productpage.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.1.10, labels: {app: productpage, version: v1}}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 198.18.1.21, labels: {app: reviews, version: v1}}
  - {address: 198.18.1.22, labels: {app: reviews, version: v2}}
  - {address: 198.18.1.23, labels: {app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: details}
spec:
  hosts: [details.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.1.30}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""
PRODUCTPAGE = "198.18.1.10"
REVIEWS = {"198.18.1.21": "v1", "198.18.1.22": "v2", "198.18.1.23": "v3"}

# Istio's samples/bookinfo/networking/bookinfo-gateway.yaml, verbatim but
# for the port (80 here, as the gateway's --listen is) and a comment left out
BOOKINFO = """\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  # The selector matches the ingress gateway pod labels.
  selector:
    istio: ingressgateway # use istio default controller
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        exact: /login
    - uri:
        exact: /logout
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
"""


def gateway(hosts: str = '["*"]', name: str = "gw", port: int = 80, ns: str = "") -> str:
    meta = f"{{name: {name}, namespace: {ns}}}" if ns else f"{{name: {name}}}"
    return f"""\
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {meta}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: {hosts}
"""


def vs(name: str, hosts: str, gateways: str, http: str, ns: str = "") -> str:
    meta = f"{{name: {name}, namespace: {ns}}}" if ns else f"{{name: {name}}}"
    return f"""\
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {meta}
spec:
  hosts: {hosts}
  gateways: {gateways}
  http:
{textwrap.indent(textwrap.dedent(http), "  ")}"""


def to(host: str, subset: str = "") -> str:
    """An http route of one destination, every request."""
    sub = f", subset: {subset}" if subset else ""
    return f"- route:\n  - destination: {{host: {host}{sub}}}\n"


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


def load_result(tmp_path: Path, text: str) -> LoadResult:
    return load_rules([write(tmp_path, text), write(tmp_path, REGISTRY, "registry.yaml")], seed=1)


def load(tmp_path: Path, text: str) -> RouteTable:
    return load_result(tmp_path, text).table


def at_gateway(
    table: RouteTable,
    host: str,
    path: str,
    port: int = 80,
    headers: dict[str, str] | None = None,
) -> tuple[str, str | None]:
    """(route, endpoint address) of a request for *host* and *path* on the
    gateway's *port*; ("no ingress route", None) where no name takes its
    Host (the worker's 404 NR)."""
    hit = table.ingress(host, path, port)
    if hit is None:
        return "no ingress route", None
    svc, sport = hit
    assert svc.role == "gateway"
    d = table.decide(svc, sport.number, Request(path=path, authority=host, headers=headers or {}))
    return d.route, (d.endpoints[0].address if d.endpoints else None)


def service(table: RouteTable, name: str) -> Service:
    svc = table.service(f"{name}.default.svc.cluster.local")
    assert svc is not None
    return svc


# -- bookinfo ------------------------------------------------------------------------


def test_bookinfo_gateway_routes_its_paths_to_productpage(tmp_path: Path) -> None:
    """Istio's bookinfo-gateway.yaml unchanged: every Host (server and
    VirtualService hosts "*"), the five uri matches to productpage, any
    other path 404 no route; nothing on another port."""
    table = load(tmp_path, BOOKINFO)
    for host in ("bookinfo.example.com", "192.0.2.7:80", "x"):
        for path in ("/productpage", "/static/img/a.png", "/login", "/api/v1/products/1"):
            assert at_gateway(table, host, path) == ("bookinfo", PRODUCTPAGE), (host, path)
        assert at_gateway(table, host, "/productpage/x") == ("no_route", None)
        assert at_gateway(table, host, "/") == ("no_route", None)
    assert table.ingress("bookinfo.example.com", "/productpage", 8080) is None


# -- splits and hosts ----------------------------------------------------------------


def test_a_canary_split_by_subsets_at_the_gateway(tmp_path: Path) -> None:
    """reviews v1 90 / v2 10 by DestinationRule subsets, at the gateway:
    2,000 requests with the table's seeded draw give v2 about 200 (sd 13)
    and never v3."""
    text = gateway() + vs(
        "reviews",
        "[reviews.example.com]",
        "[gw]",
        """\
        - route:
          - destination: {host: reviews, subset: v1}
            weight: 90
          - destination: {host: reviews, subset: v2}
            weight: 10
        """,
    )
    table = load(tmp_path, text)
    got = Counter(
        REVIEWS[str(at_gateway(table, "reviews.example.com", "/reviews/1")[1])] for _ in range(2000)
    )
    assert set(got) == {"v1", "v2"}
    assert 150 <= got["v2"] <= 250, got


def test_the_host_header_picks_the_virtual_service(tmp_path: Path) -> None:
    """Two VirtualServices of one server (hosts "*"), each its own host:
    each Host goes to its own, the port in the Host and letter case
    ignored; a Host neither names is taken by no name (404 NR)."""
    text = (
        gateway()
        + vs("pp", "[pp.example.com]", "[gw]", to("productpage"))
        + vs("rv", "[reviews.example.com]", "[gw]", to("reviews", "v3"))
    )
    table = load(tmp_path, text)
    assert at_gateway(table, "pp.example.com", "/") == ("pp", PRODUCTPAGE)
    assert at_gateway(table, "PP.Example.com:80", "/x") == ("pp", PRODUCTPAGE)
    assert at_gateway(table, "reviews.example.com:8080", "/") == ("rv", "198.18.1.23")
    assert at_gateway(table, "other.example.com", "/") == ("no ingress route", None)
    assert at_gateway(table, "", "/") == ("no ingress route", None)


def test_a_wildcard_server_host_takes_names_under_it(tmp_path: Path) -> None:
    """Server host *.example.com, VirtualService host "*": they meet in
    *.example.com, which takes names of one label or more under it (Envoy's
    suffix wildcard), not example.com itself nor another domain."""
    text = gateway('["*.example.com"]') + vs("pp", '["*"]', "[gw]", to("productpage"))
    table = load(tmp_path, text)
    assert at_gateway(table, "a.example.com", "/") == ("pp", PRODUCTPAGE)
    assert at_gateway(table, "a.b.example.com", "/") == ("pp", PRODUCTPAGE)
    assert at_gateway(table, "example.com", "/") == ("no ingress route", None)
    assert at_gateway(table, "a.example.org", "/") == ("no ingress route", None)
    keys = [p.service for p in table.ingress_paths]
    assert keys == ["gateway:default/gw/http.80/*.example.com"]


def test_an_exact_name_wins_over_a_wildcard_and_does_not_fall_through(tmp_path: Path) -> None:
    """VirtualService wide (*.example.com) and pp (pp.example.com): a Host
    takes the most specific name, and a request no route of that name
    matches is answered 404, never routed by the wider name's routes (as
    Envoy's virtual hosts, unlike the Gateway API's hostnames)."""
    text = (
        gateway()
        + vs("wide", '["*.example.com"]', "[gw]", to("details"))
        + vs(
            "pp",
            "[pp.example.com]",
            "[gw]",
            """\
            - match: [{uri: {prefix: /productpage}}]
              route:
              - destination: {host: productpage}
            """,
        )
    )
    table = load(tmp_path, text)
    assert at_gateway(table, "pp.example.com", "/productpage") == ("pp", PRODUCTPAGE)
    assert at_gateway(table, "pp.example.com", "/details") == ("no_route", None)
    assert at_gateway(table, "x.example.com", "/details") == ("wide", "198.18.1.30")


def test_namespace_slash_host_admits_that_namespace_s_virtual_services(tmp_path: Path) -> None:
    """A Gateway in istio-system whose server hosts are prod/* and
    ./admin.example.com: VirtualServices of prod bind for any name, those
    of istio-system for admin.example.com only, and one of dev for none
    (a warning naming the host and the Gateway; Istio says nothing)."""
    text = (
        gateway('["prod/*", "./admin.example.com"]', ns="istio-system")
        + vs(
            "shop",
            "[shop.example.com]",
            "[istio-system/gw]",
            to("productpage.default.svc.cluster.local"),
            ns="prod",
        )
        + vs(
            "admin",
            "[admin.example.com, other.example.com]",
            "[gw]",
            to("details.default.svc.cluster.local"),
            ns="istio-system",
        )
        + vs(
            "dev",
            "[dev.example.com]",
            "[istio-system/gw]",
            to("reviews.default.svc.cluster.local"),
            ns="dev",
        )
    )
    result = load_result(tmp_path, text)
    table = result.table
    assert at_gateway(table, "shop.example.com", "/") == ("shop", PRODUCTPAGE)
    assert at_gateway(table, "admin.example.com", "/") == ("admin", "198.18.1.30")
    assert at_gateway(table, "other.example.com", "/") == ("no ingress route", None)
    assert at_gateway(table, "dev.example.com", "/") == ("no ingress route", None)
    warned = {(d.name, d.message) for d in result.notes if d.severity == "warning"}
    assert (
        "dev",
        "host dev.example.com is admitted by no server of Gateway istio-system/gw (prod/* admit "
        "only the VirtualServices of that namespace, and this one is in dev); it is not "
        "routed there (Istio ignores it silently)",
    ) in warned
    assert (
        "admin",
        "host other.example.com is admitted by no server of Gateway istio-system/gw (prod/* "
        "admit only the VirtualServices of that namespace, and this one is in istio-system); "
        "it is not routed there (Istio ignores it silently)",
    ) in warned


# -- gateways per match block, and the mesh -------------------------------------------

PER_BLOCK = vs(
    "reviews",
    "[reviews]",
    "[gw, mesh]",
    """\
    - name: split
      match:
      - {uri: {prefix: /a}, gateways: [gw]}
      - {uri: {prefix: /b}, gateways: [mesh]}
      route:
      - destination: {host: reviews, subset: v2}
    - name: mesh-only
      match:
      - {gateways: [mesh], headers: {x-test: {exact: "1"}}}
      route:
      - destination: {host: reviews, subset: v3}
    - name: rest
      route:
      - destination: {host: reviews, subset: v1}
    """,
)


def test_match_gateways_narrow_each_block(tmp_path: Path) -> None:
    """One VirtualService for the gateway and the mesh: a block naming gw
    applies at the gateway only, one naming mesh to the sidecars only; a
    route whose every block names mesh is not at the gateway at all."""
    table = load(tmp_path, gateway() + PER_BLOCK)
    host = "reviews.default.svc.cluster.local"
    assert at_gateway(table, host, "/a") == ("reviews/split", "198.18.1.22")
    assert at_gateway(table, host, "/b") == ("reviews/rest", "198.18.1.21")
    x_test = {"x-test": "1"}
    assert at_gateway(table, host, "/c", headers=x_test) == ("reviews/rest", "198.18.1.21")
    reviews = service(table, "reviews")

    def mesh(path: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
        d = table.decide(reviews, 9080, Request(path=path, headers=headers or {}))
        return d.route, d.endpoints[0].address

    assert mesh("/a") == ("reviews/rest", "198.18.1.21")
    assert mesh("/b") == ("reviews/split", "198.18.1.22")
    assert mesh("/c", {"x-test": "1"}) == ("reviews/mesh-only", "198.18.1.23")
    routes = table.to_json()["routes"]
    assert [r["name"] for r in routes["gateway:default/gw/http.80/" + host]] == [
        "reviews/split",
        "reviews/rest",
    ]
    assert [r["name"] for r in routes[host]] == [
        "reviews/split",
        "reviews/mesh-only",
        "reviews/rest",
    ]


def test_a_virtual_service_of_gateways_only_leaves_the_mesh_host_alone(tmp_path: Path) -> None:
    """VirtualService reviews with gateways [gw] routes the gateway's
    requests to v2; the sidecars' requests to reviews are routed as with
    no VirtualService (round robin over v1, v2, v3), and a request of
    theirs is never 404. With mesh among its gateways it routes both."""
    only_gw = gateway() + vs("reviews", "[reviews]", "[gw]", to("reviews", "v2"))
    table = load(tmp_path, only_gw)
    host = "reviews.default.svc.cluster.local"
    assert at_gateway(table, host, "/") == ("reviews", "198.18.1.22")
    reviews = service(table, "reviews")
    spread = Counter(table.decide(reviews, 9080, Request()).endpoints[0].address for _ in range(6))
    assert spread == Counter(dict.fromkeys(REVIEWS, 2))
    assert {table.decide(reviews, 9080, Request()).route for _ in range(3)} == {"default"}
    assert host not in table.to_json()["routes"]
    both = load(tmp_path, only_gw.replace("gateways: [gw]", "gateways: [gw, mesh]"))
    reviews = service(both, "reviews")
    d = both.decide(reviews, 9080, Request())
    assert (d.route, d.endpoints[0].address) == ("reviews", "198.18.1.22")


def test_virtual_services_of_one_host_at_a_gateway_are_merged(tmp_path: Path) -> None:
    """Istio's "split large virtual services": two VirtualServices of one
    host on one Gateway, disjoint prefixes, are one route set, in the
    files' order; a catch-all route of the first is tried after the
    second's routes (pilot's SortVHostRoutes), the catch-all part of a
    route of several matches too."""
    table = load(
        tmp_path,
        gateway()
        + vs(
            "part1",
            "[myapp.com]",
            "[gw]",
            "- match: [{uri: {prefix: /service1}}]\n  route:\n  - destination: {host: "
            "productpage}\n- match: [{uri: {prefix: /old}}, {uri: {prefix: /}}]\n  route:\n"
            "  - destination: {host: reviews, subset: v1}\n",
        )
        + vs(
            "part2",
            "[myapp.com]",
            "[gw]",
            "- match: [{uri: {prefix: /service2}}, {uri: {prefix: /old/x}}]\n  route:\n"
            "  - destination: {host: details}\n",
        ),
    )
    assert at_gateway(table, "myapp.com", "/service1/a") == ("part1[0]", PRODUCTPAGE)
    assert at_gateway(table, "myapp.com", "/service2/a") == ("part2", "198.18.1.30")
    # (part1's /old is tried in its place, before part2's /old/x)
    assert at_gateway(table, "myapp.com", "/old/x") == ("part1[1]", "198.18.1.21")
    assert at_gateway(table, "myapp.com", "/other") == ("part1[1]", "198.18.1.21")
    assert at_gateway(table, "other.com", "/service1") == ("no ingress route", None)


def created(text: str, name: str, stamp: str) -> str:
    """*text* with VirtualService *name*'s metadata.creationTimestamp
    *stamp* (as written: quoted or not)."""
    meta = f"metadata: {{name: {name}}}"
    assert meta in text
    return text.replace(meta, f"metadata: {{name: {name}, creationTimestamp: {stamp}}}")


def api(name: str, host: str) -> str:
    """VirtualService *name* of host * at gw: /api to *host*."""
    return vs(
        name,
        '["*"]',
        "[gw]",
        f"- match: [{{uri: {{prefix: /api}}}}]\n  route:\n  - destination: {{host: {host}}}\n",
    )


def test_virtual_services_merge_in_creation_order(tmp_path: Path) -> None:
    """A kubectl get -o yaml dump carries creationTimestamp: the
    VirtualServices of one name are merged oldest first, as pilot sorts
    them (the file lists the newer first), one without it after every one
    with it, whatever the files' order; the identical /api match of the
    later one is never reached, a warning at its line naming the earlier."""
    text = (
        gateway()
        + created(api("newer", "details"), "newer", '"2024-03-02T10:00:00Z"')
        + api("unstamped", "reviews")
        + created(api("older", "productpage"), "older", "2024-03-01T10:00:00Z")
    )
    result = load_result(tmp_path, text)
    assert at_gateway(result.table, "x.example.com", "/api") == ("older", PRODUCTPAGE)
    routes = result.table.to_json()["routes"]["gateway:default/gw/http.80/*"]
    assert [r["name"] for r in routes] == ["older", "newer", "unstamped"]
    said = [(d.severity, d.line, d.message) for d in result.notes if "never reached" in d.message]
    f = write(tmp_path, text)
    assert said == [
        (
            "warning",
            18,
            "this match of route newer is the same as one of route older of VirtualService "
            f"default/older ({f}:40) for * on port 80, tried before it (created earlier): it "
            "is never reached there",
        ),
        (
            "warning",
            29,
            "this match of route unstamped is the same as one of route older of VirtualService "
            f"default/older ({f}:40) for * on port 80, tried before it (it has a "
            "creationTimestamp, this one none): it is never reached there",
        ),
    ]


def test_virtual_services_created_in_one_second_merge_by_name(tmp_path: Path) -> None:
    """Two VirtualServices of one creationTimestamp (whole seconds): by
    name, as pilot breaks the tie, b's file place before a's kept for
    nothing; two without one keep the files' order, and say so."""
    stamp = '"2024-03-01T10:00:00Z"'
    text = gateway() + created(api("b", "details"), "b", stamp)
    text += created(api("a", "productpage"), "a", stamp)
    result = load_result(tmp_path, text)
    assert at_gateway(result.table, "x.example.com", "/api") == ("a", PRODUCTPAGE)
    said = [d.message for d in result.notes if "never reached" in d.message]
    assert len(said) == 1 and "route b is the same as one of route a of" in said[0], said
    assert "(created in the same second, first by name)" in said[0]
    plain = load_result(tmp_path, gateway() + api("b", "details") + api("a", "productpage"))
    assert at_gateway(plain.table, "x.example.com", "/api") == ("b", "198.18.1.30")
    said = [d.message for d in plain.notes if "never reached" in d.message]
    assert len(said) == 1 and "route a is the same as one of route b of" in said[0], said
    assert "(the files' order, neither has a creationTimestamp)" in said[0]


def test_two_istio_gateways_of_hosts_star_on_one_port_are_one(tmp_path: Path) -> None:
    """bookinfo-gateway and httpbin-gateway as Istio's tutorials write
    them, both servers of host "*" on one port, each with a VirtualService
    of host "*": pilot merges the servers of a port, and the routes of
    both VirtualServices are the name's, bookinfo's first (the files')."""
    httpbin = gateway(name="httpbin-gateway") + vs(
        "httpbin",
        '["*"]',
        "[httpbin-gateway]",
        "- match: [{uri: {prefix: /status}}]\n  route:\n  - destination: {host: details}\n",
    )
    table = load(tmp_path, BOOKINFO + httpbin)
    assert at_gateway(table, "x.example.com", "/productpage") == ("bookinfo", PRODUCTPAGE)
    assert at_gateway(table, "x.example.com", "/status/200") == ("httpbin", "198.18.1.30")
    assert at_gateway(table, "x.example.com", "/") == ("no_route", None)


def test_a_mesh_virtual_service_and_a_gateway_one_share_a_host(tmp_path: Path) -> None:
    """Two VirtualServices of one host, one for the sidecars (no gateways)
    and one for the gateway, are no clash (each applies in one place)."""
    text = (
        gateway()
        + vs("mesh", "[reviews]", "[mesh]", to("reviews", "v1"))
        + vs("edge", "[reviews]", "[gw]", to("reviews", "v3"))
    )
    table = load(tmp_path, text)
    assert at_gateway(table, "reviews.default.svc.cluster.local", "/") == ("edge", "198.18.1.23")
    d = table.decide(service(table, "reviews"), 9080, Request())
    assert (d.route, d.endpoints[0].address) == ("mesh", "198.18.1.21")


def test_an_istio_gateway_and_a_gateway_api_gateway_coexist(tmp_path: Path) -> None:
    """Both kinds, of one name, on ports of their own; an Ingress too."""
    text = (
        BOOKINFO
        + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  gatewayClassName: l4proxy
  listeners: [{name: http, port: 8000, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: details}
spec:
  parentRefs: [{name: bookinfo-gateway}]
  rules: [{backendRefs: [{name: details, port: 9080}]}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: legacy}
spec:
  rules:
  - host: legacy.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: reviews, port: {number: 9080}}}}
"""
    )
    table = load(tmp_path, text)
    assert at_gateway(table, "x.example.com", "/productpage") == ("bookinfo", PRODUCTPAGE)
    assert at_gateway(table, "x.example.com", "/productpage", 8000) == ("details", "198.18.1.30")
    hit = table.ingress("legacy.example.com", "/", 80)
    assert hit is not None and hit[0].host == "reviews.default.svc.cluster.local"


# -- tls.httpsRedirect, and HTTPS servers ------------------------------------------------

# The most common Istio Gateway: port 80 redirects to https, port 443
# terminates TLS (not served by l4proxy: a warning at line 10)
HTTPS_PAIR = """\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [bookinfo.example.com]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [bookinfo.example.com]
    tls: {mode: SIMPLE, credentialName: bookinfo-credential}
"""
BOOKINFO_HTTPS = HTTPS_PAIR + vs("bookinfo", "[bookinfo.example.com]", "[gw]", to("productpage"))


def decision(
    table: RouteTable, host: str, path: str, headers: dict[str, str] | None = None
) -> Decision:
    """The decision for a request for *host* and *path* on port 80, of
    the gateway service its Host takes."""
    hit = table.ingress(host, path, 80)
    assert hit is not None, host
    svc, sport = hit
    return table.decide(
        svc, sport.number, Request(path=path, authority=host, headers=headers or {})
    )


def redirect_to(location: str) -> LocalAnswer:
    return LocalAnswer(301, "", (("location", location),), per_request=True)


def test_the_http_and_https_server_pair_loads_its_http_server(tmp_path: Path) -> None:
    """The port 80 + 443 pair: the HTTPS server is a warning at its line,
    nothing is served on 443, and port 80's name takes the https redirect
    first, then the VirtualService's route."""
    result = load_result(tmp_path, BOOKINFO_HTTPS)
    said = [n for n in result.notes if "is not served" in n.message]
    assert [(n.severity, n.line) for n in said] == [("warning", 10)], said
    assert said[0].message.startswith("server 1 (HTTPS, port 443) is not served")
    table = result.table
    assert table.ingress("bookinfo.example.com", "/productpage", 443) is None
    routes = table.to_json()["routes"]["gateway:default/gw/http.80/bookinfo.example.com"]
    assert [r["name"] for r in routes] == ["https-redirect", "bookinfo"]
    assert routes[0]["redirect"]["status"] == 301
    assert routes[0]["redirect"]["scheme"] == "https"
    # (/config_dump's: the Istio Gateway's redirect, not a Gateway API one)
    assert routes[0]["redirect"]["port_rules"] == "istio gateway httpsRedirect"


SERVED = "The Gateway's HTTP servers are served, and its VirtualServices bound to them"
NONE_SERVED = "The Gateway has no HTTP server: nothing of it is served"
PASSTHROUGH = (
    "its TLS is the backends' to terminate (tls.mode {}), so there is none to terminate in "
    "front of the gateway, and the gateway does not route TLS connections by SNI; send these "
    "connections to their backends another way (a TCP load balancer, or a TLS passthrough proxy "
    "in front of the gateway). "
)


@pytest.mark.parametrize(
    ("tls", "http", "why"),
    [
        (
            "{mode: SIMPLE, credentialName: c}",
            True,
            "the gateway does not terminate TLS (tls.mode SIMPLE), nor route it by SNI; terminate "
            "TLS in front of it (a load balancer, a TLS proxy in the pod) and forward the "
            "requests to an HTTP server of this Gateway, with X-Forwarded-Proto: https where that "
            "server has httpsRedirect. " + SERVED,
        ),
        (
            "{mode: MUTUAL, credentialName: c}",
            False,
            "the gateway does not terminate TLS (tls.mode MUTUAL), nor route it by SNI; terminate "
            "TLS in front of it (a load balancer, a TLS proxy in the pod) and forward the "
            "requests to an HTTP server (add one to this Gateway). " + NONE_SERVED,
        ),
        ("{mode: PASSTHROUGH}", True, PASSTHROUGH.format("PASSTHROUGH") + SERVED),
        (
            "{credentialName: c}",
            False,
            PASSTHROUGH.format("PASSTHROUGH, the default") + NONE_SERVED,
        ),
        ("{mode: AUTO_PASSTHROUGH}", False, PASSTHROUGH.format("AUTO_PASSTHROUGH") + NONE_SERVED),
        (
            "{mode: ISTIO_MUTUAL}",
            False,
            "its clients are Istio proxies speaking Istio's mutual TLS (tls.mode ISTIO_MUTUAL), "
            "and the gateway holds no mesh certificate; have them send plain HTTP to an HTTP "
            "server (add one to this Gateway). " + NONE_SERVED,
        ),
    ],
    ids=[
        "simple",
        "mutual alone",
        "passthrough",
        "the default",
        "auto passthrough",
        "istio mutual",
    ],
)
def test_an_https_server_s_warning_says_what_to_do_by_its_tls_mode(
    tmp_path: Path, tls: str, http: bool, why: str
) -> None:
    """Terminating TLS in front is the advice where the server terminates
    it; where it passes through (PASSTHROUGH, Istio's default, and
    AUTO_PASSTHROUGH) there is nothing to terminate, and Istio's own mTLS
    is for its proxies; the HTTP server to forward to is this Gateway's,
    or one to add where it has none."""
    https = "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: ['*']\n"
    https += f"    tls: {tls}\n"
    text = gateway() + https if http else gateway().split("  - port:")[0] + https
    said = [d for d in load_result(tmp_path, text).notes if "is not served" in d.message]
    assert [(d.severity, d.message) for d in said] == [
        ("warning", f"server {int(http)} (HTTPS, port 443) is not served: {why}")
    ]


@pytest.mark.parametrize(
    ("host", "path", "location"),
    [
        ("bookinfo.example.com", "/productpage", "https://bookinfo.example.com/productpage"),
        ("bookinfo.example.com:80", "/a/b?x=1&y=%20", "https://bookinfo.example.com/a/b?x=1&y=%20"),
        ("bookinfo.example.com:8080", "/", "https://bookinfo.example.com/"),
    ],
)
def test_https_redirect_answers_301_to_https_before_any_route(
    tmp_path: Path, host: str, path: str, location: str
) -> None:
    """Every request of the redirecting server's name, whatever its path
    (the VirtualService's route takes any): 301 to https, the Host less
    its port, path and query as sent, no body; an X-Forwarded-Proto that is
    not exactly https changes nothing (Envoy compares it so)."""
    table = load(tmp_path, BOOKINFO_HTTPS)
    for headers in ({}, {"x-forwarded-proto": "http"}, {"x-forwarded-proto": "HTTPS"}):
        d = decision(table, host, path, headers)
        assert (d.route, d.endpoints, d.answer) == ("https-redirect", [], redirect_to(location))


def test_a_request_forwarded_as_https_is_routed(tmp_path: Path) -> None:
    """X-Forwarded-Proto: https (what a TLS-terminating proxy in front
    sends) skips the redirect: the VirtualService routes it."""
    table = load(tmp_path, BOOKINFO_HTTPS)
    forwarded = {"x-forwarded-proto": "https"}
    assert at_gateway(table, "bookinfo.example.com", "/productpage", headers=forwarded) == (
        "bookinfo",
        PRODUCTPAGE,
    )


def test_a_redirecting_server_s_hosts_redirect_without_a_virtual_service(tmp_path: Path) -> None:
    """A server of httpsRedirect and hosts "*", no VirtualService: every
    Host is redirected (pilot makes a virtual host of the server's host);
    one forwarded as https takes no route (404, Envoy's NR)."""
    table = load(tmp_path, gateway() + "    tls: {httpsRedirect: true}\n")
    d = decision(table, "shop.example.org", "/cart?id=7")
    assert d.answer == redirect_to("https://shop.example.org/cart?id=7")
    forwarded = {"x-forwarded-proto": "https"}
    assert at_gateway(table, "x", "/", headers=forwarded) == ("no_route", None)


def test_https_redirect_false_redirects_nothing(tmp_path: Path) -> None:
    text = gateway() + "    tls: {httpsRedirect: false}\n"
    table = load(tmp_path, text + vs("pp", '["*"]', "[gw]", to("productpage")))
    assert at_gateway(table, "bookinfo.example.com", "/") == ("pp", PRODUCTPAGE)
    assert [r["name"] for r in table.to_json()["routes"]["gateway:default/gw/http.80/*"]] == ["pp"]


def test_a_name_redirects_where_a_redirecting_server_of_its_port_lists_it(tmp_path: Path) -> None:
    """Gateways plain (hosts "*") and secure (a.example.com, httpsRedirect)
    on port 80; VirtualServices a and b bound to plain alone. a.example.com
    is redirected, as pilot sets require_tls on the virtual host of a
    redirecting server's host whichever server gave it routes;
    b.example.com, no redirecting server's, is routed."""
    secure = gateway('["a.example.com"]', name="secure") + "    tls: {httpsRedirect: true}\n"
    text = (
        gateway(name="plain")
        + secure
        + vs("a", "[a.example.com]", "[plain]", to("productpage"))
        + vs("b", "[b.example.com]", "[plain]", to("details"))
    )
    table = load(tmp_path, text)
    assert decision(table, "a.example.com", "/").answer == redirect_to("https://a.example.com/")
    assert at_gateway(table, "a.example.com", "/", headers={"x-forwarded-proto": "https"}) == (
        "a",
        PRODUCTPAGE,
    )
    assert at_gateway(table, "b.example.com", "/") == ("b", "198.18.1.30")


# -- what validate -v shows ------------------------------------------------------------


def test_validate_verbose_shows_the_gateway_services_and_their_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    code = main(
        ["validate", "-v", write(tmp_path, BOOKINFO), write(tmp_path, REGISTRY, "registry.yaml")]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "  gateway listener gateway:default/bookinfo-gateway/http.80/* (local port 80)\n" in out
    assert (
        "      1. bookinfo: uri exact '/productpage' or uri prefix '/static' or uri exact "
        "'/login' or uri exact '/logout' or uri prefix '/api/v1/products'\n"
        "           100%  productpage.default.svc.cluster.local port 9080 subset default"
    ) in out
    assert "    any host port 80 -> gateway:default/bookinfo-gateway/http.80/*\n" in out


# -- errors and warnings at their line ---------------------------------------------------

LISTENER = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  gatewayClassName: l4proxy
  listeners: [{name: web, port: 80, protocol: HTTP, hostname: a.example.com}]
"""
INGRESS = """\
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: legacy}
spec:
  rules:
  - host: a.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: reviews, port: {number: 9080}}}}
"""

# (case, rule file text, expected message part, expected line)
CASES = [
    (
        "a protocol Istio has not",
        gateway().replace("protocol: HTTP", "protocol: SPDY"),
        "invalid protocol 'SPDY'",
        8,
    ),
    (
        "a tls mode on an HTTP server",
        gateway() + "    tls: {mode: SIMPLE}\n",
        "spec.servers[0].tls.mode 'SIMPLE': an HTTP server's tls holds httpsRedirect alone "
        "(Istio's validation: no TLS settings for plain text HTTP ports); terminate TLS in "
        "front of the gateway",
        10,
    ),
    (
        "a certificate beside httpsRedirect on an HTTP server",
        gateway() + "    tls:\n      httpsRedirect: true\n      credentialName: cert\n",
        "spec.servers[0].tls.credentialName is not implemented by l4proxy; remove it (the "
        "sidecar would not honour it); an HTTP server's tls holds httpsRedirect alone",
        12,
    ),
    (
        # (Istio 1.28's: an unknown field before)
        "a CA credential beside httpsRedirect on an HTTP server",
        gateway() + "    tls:\n      httpsRedirect: true\n      caCertCredentialName: ca\n",
        "spec.servers[0].tls.caCertCredentialName is not implemented by l4proxy; remove it "
        "(the sidecar would not honour it); an HTTP server's tls holds httpsRedirect alone",
        12,
    ),
    (
        "httpsRedirect not a boolean",
        gateway() + "    tls: {httpsRedirect: 'yes'}\n",
        "spec.servers[0].tls.httpsRedirect must be true or false, not the string 'yes'",
        10,
    ),
    (
        "an HTTPS server's port name taken by an HTTP server's",
        gateway() + "  - port: {number: 443, name: http, protocol: HTTPS}\n    hosts: ['*']\n",
        "port name http is already the name of server 0's port",
        10,
    ),
    (
        "bind on a server",
        gateway() + "    bind: 0.0.0.0\n",
        "the gateway listens where `l4proxy run --listen` says",
        10,
    ),
    (
        "targetPort",
        gateway().replace("protocol: HTTP}", "protocol: HTTP, targetPort: 8080}"),
        "targetPort is only valid for a ServiceEntry",
        8,
    ),
    (
        "no hosts",
        gateway("[]"),
        "spec.servers[0].hosts must not be empty",
        9,
    ),
    (
        "a host with a bad namespace",
        gateway('["Prod/*"]'),
        "namespace 'Prod' must be '*', '.' or a namespace",
        9,
    ),
    (
        "a host of two slashes",
        gateway('["a/b/c"]'),
        "host 'a/b/c' is malformed: a server host is [NAMESPACE/]HOST, one '/' at most, with no "
        "scheme and no path",
        9,
    ),
    (
        "a host with a scheme",
        gateway('["http://x.com"]'),
        "host 'http://x.com' is malformed: a server host is [NAMESPACE/]HOST, one '/' at most, "
        "with no scheme and no path (no scheme: 'x.com')",
        9,
    ),
    (
        "a host with a port",
        gateway('["a.example.com:80"]'),
        "must be [NAMESPACE/]HOST, HOST being '*', '*.example.com' or a DNS name (no port)",
        9,
    ),
    (
        "two servers with one port name",
        gateway() + "  - port: {number: 81, name: http, protocol: HTTP}\n    hosts: ['*']\n",
        "port name http is already the name of server 0's port",
        10,
    ),
    (
        "an Istio Gateway and a Gateway API listener on one port and host",
        LISTENER + gateway('["a.example.com"]'),
        "Gateway default/gw server 0 (host */a.example.com) serves host a.example.com on port "
        "80, and so does listener web of Gateway default/edge",
        16,
    ),
    (
        "an Istio Gateway and an Ingress rule on one host",
        INGRESS + gateway('["a.example.com"]'),
        "Gateway default/gw server 0 (host */a.example.com) serves host a.example.com on port "
        "80, and so does Ingress default/legacy",
        19,
    ),
    (
        "an Ingress rule and a Gateway API listener on one host",
        LISTENER + INGRESS,
        "Ingress default/legacy serves host a.example.com on every port, and so does listener "
        "web of Gateway default/edge",
        17,
    ),
    (
        "a name a Gateway API listener serves too",
        LISTENER + gateway() + vs("pp", "[a.example.com]", "[gw]", to("productpage")),
        "VirtualService default/pp for a.example.com on port 80 of Gateway default/gw is served "
        "by listener web of Gateway default/edge (",
        23,
    ),
    (
        "one VirtualService through two Gateways of one port",
        gateway() + gateway(name="gw2") + vs("pp", "[pp.example.com]", "[gw, gw2]", to("details")),
        "host pp.example.com on port 80 is this VirtualService's through Gateway default/gw "
        "already (",
        25,
    ),
    (
        "a wildcard host of a VirtualService for the mesh",
        gateway() + vs("pp", '["*"]', "[gw, mesh]", to("productpage")),
        "wildcard host '*' is not implemented by l4proxy; remove it (the sidecar would not "
        "honour it) for mesh traffic",
        15,
    ),
    (
        "a bad gateway name",
        gateway() + vs("pp", "[pp.example.com]", '["istio-system/"]', to("productpage")),
        "gateway 'istio-system/' must be NAMESPACE/NAME",
        16,
    ),
    (
        "a malformed creationTimestamp",
        gateway()
        + created(vs("pp", "[pp.example.com]", "[gw]", to("productpage")), "pp", "yesterday"),
        "metadata.creationTimestamp 'yesterday' is not an RFC 3339 time",
        13,
    ),
    (
        "a tls route of a VirtualService of a gateway and the mesh",
        gateway()
        + vs("pp", "[pp]", "[gw, mesh]", to("productpage"))
        + "  tls:\n  - match: [{sniHosts: [pp]}]\n    route:\n    - destination: {host: pp}\n",
        "spec.tls is not implemented by l4proxy; remove it (the sidecar would not honour it); "
        "bound to mesh, it is the sidecars' (bound to Istio Gateways alone it would be a "
        "warning, not served)",
        20,
    ),
    (
        "gateways on a tcp match block",
        gateway()
        + vs("pp", "[pp]", "[mesh]", to("productpage"))
        + "  tcp:\n  - match: [{gateways: [gw]}]\n    route:\n    - destination: {host: pp}\n",
        "spec.tcp[0].match[0].gateways is not implemented by l4proxy",
        21,
    ),
]


@pytest.mark.parametrize(
    ("text", "message", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, message: str, line: int) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules([f, write(tmp_path, REGISTRY, "registry.yaml")])
    errs = [e for e in info.value.errors if message in e.message]
    assert errs, f"no error containing {message!r} in:\n{info.value}"
    assert (errs[0].file, errs[0].line) == (f, line), str(errs[0])


WARNINGS = [
    (
        "unknown gateway",
        gateway() + vs("pp", "[pp.example.com]", "[gw, nowhere]", to("productpage")),
        "unknown gateway: no Istio Gateway default/nowhere in these files (Istio Gateways: "
        "default/gw;",
        16,
    ),
    (
        "a gateway of another namespace by its short name",
        gateway(ns="istio-system") + vs("pp", "[pp.example.com]", "[gw]", to("productpage")),
        "unknown gateway: no Istio Gateway default/gw in these files (Istio Gateways: "
        "istio-system/gw;",
        16,
    ),
    (
        "a host no server admits",
        gateway('["*.example.com"]') + vs("pp", "[pp.example.org]", "[gw]", to("productpage")),
        "host pp.example.org is admitted by no server of Gateway default/gw (its HTTP servers' "
        "hosts are */*.example.com); it is not routed there",
        16,
    ),
    (
        "an HTTPS server",
        gateway().replace("protocol: HTTP", "protocol: HTTPS"),
        "server 0 (HTTPS, port 80) is not served: the gateway does not terminate TLS, nor route "
        "it by SNI; terminate TLS in front of it (a load balancer, a TLS proxy in the pod) and "
        "forward the requests to an HTTP server (add one to this Gateway). The Gateway has no "
        "HTTP server: nothing of it is served",
        8,
    ),
    (
        "an HTTP2 server beside an HTTP one",
        gateway() + "  - port: {number: 81, name: h2, protocol: HTTP2}\n    hosts: ['*']\n",
        "server 1 (HTTP2, port 81) is not served: the gateway speaks HTTP/1.x, without h2c: the "
        "HTTP/2 and gRPC clients a server of this protocol is for would each be answered 400; "
        "for HTTP/1.x clients, make it protocol HTTP. The Gateway's HTTP servers are served, "
        "and its VirtualServices bound to them",
        10,
    ),
    (
        "a GRPC-WEB server alone",
        gateway().replace("protocol: HTTP", "protocol: GRPC-WEB"),
        "server 0 (GRPC-WEB, port 80) is not served: the gateway translates no gRPC-Web to gRPC "
        "(Envoy's grpc_web filter). The Gateway has no HTTP server: nothing of it is served",
        8,
    ),
    (
        "a Mongo server",
        gateway().replace("protocol: HTTP", "protocol: Mongo"),
        "server 0 (Mongo, port 80) is not served: the gateway routes HTTP requests, not TCP "
        "connections",
        8,
    ),
    (
        "a TLS server, its protocol in lower case",
        gateway() + "  - port: {number: 443, name: tls, protocol: tls}\n    hosts: ['*']\n",
        "server 1 (tls, port 443) is not served",
        10,
    ),
    (
        "a host only an HTTPS server admits",
        HTTPS_PAIR.replace("[bookinfo.example.com]\n    tls: {mode", "['*']\n    tls: {mode")
        + vs("pp", "[pp.example.com]", "[gw]", to("productpage")),
        "host pp.example.com is admitted by no server of Gateway default/gw (its HTTP servers' "
        "hosts are */bookinfo.example.com; server 1 (HTTPS, port 443) not served)",
        19,
    ),
    (
        "a Gateway of an HTTPS server alone",
        gateway().replace("protocol: HTTP", "protocol: HTTPS")
        + vs("pp", "[pp.example.com]", "[gw]", to("productpage")),
        "host pp.example.com is admitted by no server of Gateway default/gw (it has no HTTP "
        "server; server 0 (HTTPS, port 80) not served)",
        16,
    ),
    (
        "a block naming a gateway its VirtualService is not bound to",
        gateway()
        + vs(
            "pp",
            "[pp.example.com]",
            "[gw]",
            "- match: [{uri: {prefix: /}, gateways: [other]}]\n"
            "  route:\n  - destination: {host: productpage}\n" + to("details"),
        ),
        "gateway default/other is not one of this VirtualService's (spec.gateways: default/gw); "
        "this block applies nowhere",
        18,
    ),
    (
        "no route applies at a gateway",
        gateway()
        + vs(
            "pp",
            "[pp.example.com]",
            "[gw, mesh]",
            "- match: [{gateways: [mesh]}]\n  route:\n  - destination: {host: productpage}\n",
        ),
        "no http route of this VirtualService applies on port 80 of Gateway default/gw",
        16,
    ),
    (
        "sourceLabels in a block that names gateways",
        gateway()
        + vs(
            "pp",
            "[pp.example.com]",
            "[gw]",
            "- match: [{gateways: [gw], sourceLabels: {app: x}}]\n"
            "  route:\n  - destination: {host: productpage}\n",
        ),
        "sourceLabels are not tested in a match block that names gateways",
        18,
    ),
    (
        "a destination of several ports, none the server's, without a port",
        gateway()
        + vs("pp", "[pp.example.com]", "[gw]", to("shop"))
        + """---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: shop}
spec:
  hosts: [shop.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: admin, protocol: HTTP}]
  endpoints: [{address: 198.18.2.1}]
""",
        "port required: host shop.default.svc.cluster.local has ports 8080, 9090; a request to "
        "gateway:default/gw/http.80/pp.example.com port 80 goes to port 80 of "
        "shop.default.svc.cluster.local, which has none, and is answered 503",
        19,
    ),
    (
        "a host of the mesh and a gateway with no ServiceEntry",
        gateway() + vs("pp", "[pp.example.com]", "[gw, mesh]", to("productpage")),
        "pp.example.com has no ServiceEntry in these files; for mesh traffic this "
        "VirtualService applies once one is loaded; at Gateway default/gw it routes "
        "pp.example.com now",
        11,
    ),
    (
        "a catch-all after another VirtualService's catch-all",
        gateway()
        + vs("a", "[pp.example.com]", "[gw]", to("productpage"))
        + vs("b", "[pp.example.com]", "[gw]", to("details")),
        "route b takes every request for pp.example.com on port 80, and so does route a of "
        "VirtualService default/a (",
        26,
    ),
    (
        "a tcp route of a VirtualService of gateways only",
        gateway()
        + vs("pp", "[pp.example.com]", "[gw]", to("productpage"))
        + "  tcp:\n  - route:\n    - destination: {host: pp}\n",
        "spec.tcp is not served: the gateway routes HTTP requests, not TCP connections, and "
        "this VirtualService is bound to Istio Gateways only (no mesh), where l4proxy serves "
        "its http routes alone",
        20,
    ),
    (
        "the legacy FQDN gateway name",
        gateway() + vs("pp", "[pp.example.com]", "[gw.default.svc.cluster.local]", to("details")),
        "gateway 'gw.default.svc.cluster.local' is in the legacy NAME.NAMESPACE... form; write "
        "default/gw",
        16,
    ),
]


@pytest.mark.parametrize(
    ("text", "message", "line"), [c[1:] for c in WARNINGS], ids=[c[0] for c in WARNINGS]
)
def test_warnings_name_file_and_line(tmp_path: Path, text: str, message: str, line: int) -> None:
    result = load_result(tmp_path, text)
    found = [d for d in result.notes if message in d.message]
    assert found, "\n".join(map(str, result.notes))
    assert (found[0].severity, found[0].line) == ("warning", line), str(found[0])


def test_a_gateway_not_in_the_files_drops_that_binding_alone(tmp_path: Path) -> None:
    """A VirtualService naming a Gateway that is not in the files loads
    (it was an error, and a Gateway deleted kept the last good rules
    serving it): that binding is dropped, as Istio ignores it. pp, bound
    to gw and nowhere, still routes at gw; only, bound to nowhere alone,
    routes nothing there (no name takes its Host)."""
    text = (
        gateway('["pp.example.com", "only.example.com"]')
        + vs("pp", "[pp.example.com]", "[gw, nowhere]", to("productpage"))
        + vs("only", "[only.example.com]", "[nowhere]", to("details"))
    )
    result = load_result(tmp_path, text)
    said = [(d.severity, d.line) for d in result.notes if "unknown gateway" in d.message]
    assert said == [("warning", 16), ("warning", 26)]
    assert at_gateway(result.table, "pp.example.com", "/") == ("pp", PRODUCTPAGE)
    assert at_gateway(result.table, "only.example.com", "/") == ("no ingress route", None)


def test_a_destination_s_error_is_said_once(tmp_path: Path) -> None:
    """A VirtualService for the mesh and a gateway of two names compiles
    its routes three times; a subset that is not defined is one error."""
    text = gateway() + vs(
        "reviews", "[reviews, reviews.example.com]", "[gw, mesh]", to("reviews", "v9")
    )
    with pytest.raises(ConfigError) as info:
        load_result(tmp_path, text)
    said = [e for e in info.value.errors if "subset v9 is not defined" in e.message]
    assert len(said) == 1, info.value


def test_tcp_routes_are_not_at_the_gateway(tmp_path: Path) -> None:
    """A VirtualService for the mesh and the gateway with an http and a tcp
    route: the gateway (HTTP servers only) gets the http route alone, so a
    request it does not match is the 404, not the tcp route's v3. The
    sidecars keep the tcp route for TCP ports: reviews' 9080 is HTTP, so
    a raw connection there takes no route (Istio's HTTP listener has the
    http routes alone), not v3 (it did)."""
    text = gateway() + vs(
        "reviews",
        "[reviews]",
        "[gw, mesh]",
        """\
        - match: [{uri: {prefix: /a}}]
          route:
          - destination: {host: reviews, subset: v2}
        tcp:
        - route:
          - destination: {host: reviews, subset: v3}
        """,
    )
    table = load(tmp_path, text)
    host = "reviews.default.svc.cluster.local"
    assert at_gateway(table, host, "/a") == ("reviews", "198.18.1.22")
    assert at_gateway(table, host, "/b") == ("no_route", None)
    routes = table.to_json()["routes"]
    assert [r["protocol"] for r in routes["gateway:default/gw/http.80/" + host]] == ["http"]
    assert [r["protocol"] for r in routes[host]] == ["http", "tcp"]
    d = table.decide(service(table, "reviews"), 9080, None)
    assert d.route == "default"
    # every endpoint, in the round robin's order from wherever it starts
    rotation([e.address for e in d.endpoints], ["198.18.1.21", "198.18.1.22", "198.18.1.23"])


def test_tcp_routes_of_the_mesh_and_a_gateway_are_a_warning_naming_the_gateway(
    tmp_path: Path,
) -> None:
    """A VirtualService of mesh and a Gateway: its tcp route is the
    sidecars' and is dropped at the Gateway, which routes HTTP requests
    alone. That was said of a VirtualService of Gateways only, and here
    not at all; it is a warning at spec.tcp naming the VirtualService and
    the Gateway. The sidecars take it on TCP ports only: reviews has none,
    so it routes nothing there either (a warning at the route)."""
    text = gateway() + vs(
        "reviews",
        "[reviews]",
        "[gw, mesh]",
        """\
        - match: [{uri: {prefix: /a}}]
          route:
          - destination: {host: reviews, subset: v2}
        tcp:
        - route:
          - destination: {host: reviews, subset: v3}
        """,
    )
    result = load_result(tmp_path, text)
    assert [str(d) for d in result.notes] == [
        f"{tmp_path / 'rules.yaml'}:21: warning: VirtualService reviews: spec.tcp is not served "
        "at Gateway default/gw: the gateway routes HTTP requests, not TCP connections, and "
        "l4proxy serves this VirtualService's http routes alone there; bound to mesh too, its "
        "tcp routes are the sidecars', on TCP ports",
        f"{tmp_path / 'rules.yaml'}:22: warning: VirtualService reviews: this tcp route routes "
        "nothing: tcp routes serve TCP ports only; port 9080 of reviews.default.svc.cluster.local "
        "is HTTP: its requests take the http routes, else the whole service (the default route)",
    ]
    d = result.table.decide(service(result.table, "reviews"), 9080, None)
    assert d.route == "default"


def test_a_virtual_service_of_tcp_routes_alone_at_gateways_and_mesh_routes_nothing_there(
    tmp_path: Path,
) -> None:
    """With no http route at all, the one warning names each Gateway and
    says nothing is routed there (not a "no http route applies on port 80"
    per Gateway, whose reason, match blocks naming other gateways or
    ports, was not this one)."""
    text = (
        gateway()
        + gateway(name="other", port=8080)
        + """\
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  gateways: [gw, other, mesh]
  tcp:
  - route:
    - destination: {host: reviews, subset: v3}
"""
    )
    result = load_result(tmp_path, text)
    said = [(d.severity, d.line, d.message) for d in result.notes]
    assert said == [
        (
            "warning",
            26,
            "spec.tcp is not served at Gateways default/gw, default/other: the gateway routes "
            "HTTP requests, not TCP connections, and l4proxy serves this VirtualService's http "
            "routes alone there; bound to mesh too, its tcp routes are the sidecars', on TCP "
            "ports; it has no http route: it routes nothing there",
        ),
        (
            "warning",
            27,
            "this tcp route routes nothing: tcp routes serve TCP ports only; port 9080 of "
            "reviews.default.svc.cluster.local is HTTP: its requests take the whole service, the "
            "default route (this VirtualService has no http route)",
        ),
    ]
    assert not [k for k in result.table.to_json()["routes"] if k.startswith("gateway:")]


# Istio's "Ingress gateway without TLS termination" task (SNI passthrough),
# verbatim but for a comment left out
SNI_PASSTHROUGH = """\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: PASSTHROUGH
    hosts:
    - nginx.example.com
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: nginx
spec:
  hosts:
  - nginx.example.com
  gateways:
  - mygateway
  tls:
  - match:
    - port: 443
      sniHosts:
      - nginx.example.com
    route:
    - destination:
        host: my-nginx
        port:
          number: 443
"""


def test_the_sni_passthrough_task_loads_and_serves_nothing(tmp_path: Path) -> None:
    """The HTTPS server of tls.mode PASSTHROUGH and the VirtualService of
    its tls route (sniHosts) are a warning each, at their lines: the rule
    set loads (it was refused, spec.tls an error, and at a reload the last
    good rules kept serving), and nothing of them is served."""
    result = load_result(tmp_path, SNI_PASSTHROUGH)
    assert [(d.severity, d.line) for d in result.notes] == [("warning", 9), ("warning", 27)]
    assert result.notes[1].message == (
        "spec.tls is not served: the gateway neither routes TLS connections by SNI nor "
        "terminates TLS, and this VirtualService is bound to Istio Gateways only (no mesh), "
        "where l4proxy serves its http routes alone; it has none: it routes nothing here"
    )
    table = result.table.to_json()
    assert not [k for k in table["routes"] if k.startswith("gateway:")]
    assert result.table.ingress("nginx.example.com", "/", 443) is None


# Istio's TCP traffic shifting task (samples/tcp-echo/tcp-echo-all-v1.yaml),
# its Gateway, DestinationRule and VirtualService
TCP_ECHO = """\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: tcp-echo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 31400
      name: tcp
      protocol: TCP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts:
  - "*"
  gateways:
  - tcp-echo-gateway
  tcp:
  - match:
    - port: 31400
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v1
"""


def test_the_tcp_echo_task_loads_and_serves_nothing(tmp_path: Path) -> None:
    """A TCP server is a warning and is not served, as an HTTPS one is (it
    was an error, and the whole set refused), and so is the tcp route of
    its VirtualService; nothing of the Gateway is served."""
    result = load_result(tmp_path, TCP_ECHO)
    said = [(d.line, d.message) for d in result.notes if d.severity == "warning"]
    assert said[:2] == [
        (
            9,
            "server 0 (TCP, port 31400) is not served: the gateway routes HTTP requests, not TCP "
            "connections. The Gateway has no HTTP server: nothing of it is served",
        ),
        (
            39,
            "spec.tcp is not served: the gateway routes HTTP requests, not TCP connections, and "
            "this VirtualService is bound to Istio Gateways only (no mesh), where l4proxy serves "
            "its http routes alone; it has none: it routes nothing here",
        ),
    ]
    assert not [k for k in result.table.to_json()["routes"] if k.startswith("gateway:")]


def test_the_example_directory_routes_the_gateway_and_leaves_the_mesh(tmp_path: Path) -> None:
    """deploy/examples/istio-gateway beside deploy/examples/rules: /bootcamp
    at the gateway's port 80 is split 90/10 over v1 and v2 (the seeded
    draw, 1,000 requests: v2 about 100, sd 9.5); the sidecars' requests to
    bootcamp are still ../rules' VirtualService's (half and half).
    secure.example.com (https-gateway.yaml, the 80 + 443 pair) is
    redirected to https, but forwarded as https, then routed to v1; its
    HTTPS server is the one warning."""
    examples = Path(__file__).parent.parent / "deploy" / "examples"
    result = load_rules([str(examples / "rules"), str(examples / "istio-gateway")], seed=1)
    assert [(n.severity, Path(n.file).name, n.line) for n in result.notes] == [
        ("warning", "https-gateway.yaml", 27)
    ]
    table = result.table
    secure = decision(table, "secure.example.com", "/bootcamp?v=1")
    assert secure.answer == redirect_to("https://secure.example.com/bootcamp?v=1")
    forwarded = {"x-forwarded-proto": "https"}
    got = at_gateway(table, "secure.example.com", "/bootcamp", headers=forwarded)
    assert got[0] == "secure-edge" and got[1] in ("198.18.0.11", "198.18.0.12"), got
    v2 = "198.18.0.13"
    edge = Counter(
        at_gateway(table, "bootcamp.example.com", "/bootcamp")[1] == v2 for _ in range(1000)
    )
    assert 60 <= edge[True] <= 140, edge
    assert at_gateway(table, "bootcamp.example.com", "/") == ("no_route", None)
    bootcamp = service(table, "bootcamp")
    mesh = Counter(
        table.decide(bootcamp, 8080, Request()).endpoints[0].address == v2 for _ in range(1000)
    )
    assert 420 <= mesh[True] <= 580, mesh
