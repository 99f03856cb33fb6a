"""Header edits, rewrites, redirects and direct responses in the rules.

A VirtualService's ``http[].headers``, ``http[].route[].headers``,
``rewrite``, ``redirect`` and ``directResponse``, and an HTTPRoute's
filters (RequestHeaderModifier, ResponseHeaderModifier, URLRewrite,
RequestRedirect; a backendRef's header modifiers), loaded from real YAML
(Istio's and the Gateway API's documentation examples, on the bootcamp
registry), then read back through ``RouteTable.choices()`` and
``decide()``: each destination's ``HeadEdits`` (the route's and the
destination's merged as Envoy applies Istio's lists; the path rewrite's
``strip`` of the match block that took the request) and a route's own
answer (a redirect's ``location`` built per request). Every refusal names
its file and line.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import HeadEdits, PathRewrite, request_bits
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules._edits import rewrite_target
from l4proxy.rules.routing import LocalAnswer, Request, RouteChoices, RouteTable
from tests.test_config_errors import REGISTRY

HOST = "bootcamp.default.svc.cluster.local"
GW_DATA = os.path.join(os.path.dirname(__file__), "data", "gateway-api")
PER_VERSION = os.path.join(GW_DATA, "registry-per-version.yaml")

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bootcamp}
spec:
  host: bootcamp
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
"""
VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bootcamp}
spec:
  hosts: [bootcamp]
  http:
"""
HR = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bootcamp}
spec:
  parentRefs:
  - {group: "", kind: Service, name: bootcamp}
  rules:
"""
GW = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: l4proxy
  listeners:
  - {name: http, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs:
  - {name: gw}
  rules:
"""
GW_HOST = "gateway:default/gw/http/*"


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "rules.yaml"
    f.write_text(textwrap.dedent(text))
    return str(f)


def istio(tmp_path: Path, http: str) -> RouteTable:
    return load_rules([write(tmp_path, DR + VS + http), REGISTRY], seed=1).table


def gateway(tmp_path: Path, rules: str, head: str = HR) -> RouteTable:
    return load_rules([write(tmp_path, head + rules), PER_VERSION], seed=1).table


def choices(
    table: RouteTable,
    path: str,
    host: str = HOST,
    authority: str = "bootcamp:8080",
    port: int = 8080,
) -> RouteChoices:
    svc = table.service(host)
    assert svc is not None
    return table.choices(svc, port, Request(path=path, authority=authority))


def edits_of(table: RouteTable, path: str, **kw: object) -> dict[str, HeadEdits | None]:
    return {ws.subset: ws.edits for ws in choices(table, path, **kw).subsets}  # type: ignore[arg-type]


def answer_of(table: RouteTable, path: str, **kw: object) -> LocalAnswer:
    a = choices(table, path, **kw).answer  # type: ignore[arg-type]
    assert a is not None
    return a


# -- Istio's examples ------------------------------------------------------------

# The VirtualService reference's Headers example, on bootcamp
HEADERS_EXAMPLE = """\
  - headers:
      request:
        set:
          test: "true"
    route:
    - destination:
        host: bootcamp
        subset: v2
      weight: 25
    - destination:
        host: bootcamp
        subset: v1
      headers:
        response:
          remove:
          - foo
      weight: 75
"""


def test_istio_headers_example(tmp_path: Path) -> None:
    table = istio(tmp_path, HEADERS_EXAMPLE)
    got = edits_of(table, "/anything")
    assert got == {
        "v2": HeadEdits(request_set=(("test", "true"),)),
        "v1": HeadEdits(request_set=(("test", "true"),), response_remove=("foo",)),
    }
    # decide() gives the chosen subset's
    svc = table.service(HOST)
    assert svc is not None
    for _ in range(20):
        d = table.decide(svc, 8080, Request(path="/x"))
        assert d.edits == got[d.subset]
    # a raw connection has no head to edit
    assert table.decide(svc, 8080, None).edits is None


def test_istio_rewrite_example(tmp_path: Path) -> None:
    """HTTPRewrite's example: /ratings... goes up as /v1/bookRatings... (Envoy's
    prefix_rewrite of the prefix match), the query following."""
    table = istio(
        tmp_path,
        """\
  - match:
    - uri:
        prefix: /ratings
    rewrite:
      uri: /v1/bookRatings
    route:
    - destination:
        host: bootcamp
        subset: v1
""",
    )
    (e,) = edits_of(table, "/ratings/5?x=1").values()
    assert e == HeadEdits(path=PathRewrite(8, "/v1/bookRatings"))
    assert rewrite_target("/ratings/5?x=1", e.path) == "/v1/bookRatings/5?x=1"


def test_istio_redirect_example(tmp_path: Path) -> None:
    """HTTPRedirect's example: 301 (the default) to the new authority and
    uri; the request's query stays (Envoy's path_redirect), so the answer is
    built per request."""
    table = istio(
        tmp_path,
        """\
  - match:
    - uri:
        exact: /v1/getProductRatings
    redirect:
      uri: /v1/bookRatings
      authority: newratings.default.svc.cluster.local
  - route:
    - destination: {host: bootcamp, subset: v1}
""",
    )
    rc = choices(table, "/v1/getProductRatings?id=3")
    assert rc.subsets == ()
    assert rc.answer == LocalAnswer(
        301,
        "",
        (("location", "http://newratings.default.svc.cluster.local/v1/bookRatings?id=3"),),
        per_request=True,
    )
    svc = table.service(HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/v1/getProductRatings"))
    assert d.answer is not None and d.endpoints == [] and d.status == 301
    assert d.answer.headers == (
        ("location", "http://newratings.default.svc.cluster.local/v1/bookRatings"),
    )
    assert choices(table, "/other").answer is None


def test_istio_direct_response_example(tmp_path: Path) -> None:
    """HTTPDirectResponse's examples: a string body, a base64 one, and a
    content-type among the answer's lines (it replaces the relays' text/plain)."""
    table = istio(
        tmp_path,
        """\
  - match:
    - uri:
        exact: /v1/getProductRatings
    directResponse:
      status: 503
      body:
        string: "unknown error"
    headers:
      response:
        set:
          content-type: "text/plain"
          x-why: maintenance
  - match:
    - uri:
        exact: /bytes
    directResponse:
      status: 200
      body:
        bytes: "dW5rbm93biBlcnJvcg=="
  - route:
    - destination: {host: bootcamp, subset: v1}
""",
    )
    assert answer_of(table, "/v1/getProductRatings") == LocalAnswer(
        503, "unknown error", (("content-type", "text/plain"), ("x-why", "maintenance"))
    )
    assert answer_of(table, "/bytes") == LocalAnswer(200, "unknown error")


@pytest.mark.parametrize("status", [201, 302, 307, 304])
def test_a_direct_response_201_or_3xx_gets_the_requests_url_as_location(
    tmp_path: Path, status: int
) -> None:
    """Envoy's router adds a location to a direct response with status 201
    or 3xx: the request's own URL (built per request: never cached); the
    route's own response lines follow it. Other statuses get none."""
    body = "" if status == 304 else "    body: {string: moved}\n"
    table = istio(
        tmp_path,
        f"""\
  - match: [{{uri: {{prefix: /old}}}}]
    directResponse:
      status: {status}
{body.replace("    body", "      body")}    headers:
      response:
        set: {{x-why: moved}}
  - match: [{{uri: {{prefix: /gone}}}}]
    directResponse: {{status: 410}}
  - route:
    - destination: {{host: bootcamp}}
""",
    )
    got = answer_of(table, "/old/page?id=3", authority="shop.example:8080")
    assert got == LocalAnswer(
        status,
        "" if status == 304 else "moved",
        (("location", "http://shop.example:8080/old/page?id=3"), ("x-why", "moved")),
        per_request=True,
    )
    assert answer_of(table, "/gone") == LocalAnswer(410)
    # a request without a Host (HTTP/1.0): the service's name, as it reached it
    hostless = answer_of(table, "/old/page", authority="").headers[0]
    assert hostless == ("location", f"http://{HOST}:8080/old/page")


# -- rewrite: the strip of the match that matched --------------------------------


@pytest.mark.parametrize(
    ("match", "path", "strip", "sent"),
    [
        ("[{uri: {prefix: /api/}}]", "/api/users?id=1", 5, "/v2/users?id=1"),
        ("[{uri: {prefix: /api}}]", "/api", 4, "/v2/"),
        # exact and regex: Envoy's path match and safe_regex replace the path
        ("[{uri: {exact: /api/users}}]", "/api/users?id=1", -1, "/v2/?id=1"),
        ("[{uri: {regex: '/api/[a-z]+'}}]", "/api/users", -1, "/v2/"),
        # no uri match: Istio gives Envoy prefix "/", so only the first / goes
        ("[{method: {exact: GET}}]", "/api/users", 1, "/v2/api/users"),
        (None, "/api/users", 1, "/v2/api/users"),
    ],
)
def test_a_rewrite_strips_what_the_match_matched(
    tmp_path: Path, match: str | None, path: str, strip: int, sent: str
) -> None:
    m = f"    match: {match}\n" if match else ""
    table = istio(
        tmp_path,
        f"  - rewrite: {{uri: /v2/}}\n{m}    route:\n    - destination: {{host: bootcamp}}\n",
    )
    (e,) = edits_of(table, path, authority="bootcamp").values()
    assert e is not None and e.path == PathRewrite(strip, "/v2/")
    assert rewrite_target(path, e.path) == sent


def test_the_match_block_that_took_the_request_gives_the_strip(tmp_path: Path) -> None:
    """A route with two prefix blocks: each request's strip is its own
    block's, and every request that passes the same shape tests (the
    relays' verdict key) gets the same edits, so a cached verdict's strip
    holds for each request it is applied to."""
    table = istio(
        tmp_path,
        """\
  - match:
    - uri: {prefix: /abc}
    - uri: {prefix: /a}
    rewrite: {uri: /z}
    route:
    - destination: {host: bootcamp}
  - route:
    - destination: {host: bootcamp, subset: v1}
""",
    )
    svc = table.service(HOST)
    assert svc is not None
    tests = table.request_shape(svc).tests
    assert tests is not None
    by_key: dict[bytes, set[HeadEdits | None]] = {}
    for path in ["/abc", "/abcd/e", "/abc?q", "/a", "/ab", "/a/b", "/ax?abc", "/b", "/", "/abz"]:
        (e,) = edits_of(table, path).values()
        by_key.setdefault(request_bits(tests, path), set()).add(e)
    assert all(len(s) == 1 for s in by_key.values()), by_key
    strips = {e.path.strip for s in by_key.values() for e in s if e is not None and e.path}
    assert strips == {4, 2}
    (e,) = edits_of(table, "/abc/x").values()
    assert e is not None and e.path is not None
    assert rewrite_target("/abc/x", e.path) == "/z/x"
    (e,) = edits_of(table, "/ab/x").values()
    assert e is not None and e.path is not None
    assert rewrite_target("/ab/x", e.path) == "/zb/x"


# -- the route's and the destination's headers ------------------------------------

MERGE = """\
  - headers:
      request:
        set: {x-both: route}
        add: {x-route: r}
        remove: [x-dest]
    rewrite: {authority: upstream.example}
    route:
    - destination: {host: bootcamp, subset: v1}
      headers:
        request:
          set: {x-both: dest}
          add: {x-dest: d}
          remove: [x-route]
"""


def test_one_destination_s_headers_follow_its_route_s(tmp_path: Path) -> None:
    """One destination: Istio appends its headers to the route's list, one
    Envoy list: every remove first, then the sets and adds in order, so the
    destination's set wins and neither's remove touches the other's add."""
    table = istio(tmp_path, MERGE)
    assert edits_of(table, "/") == {
        "v1": HeadEdits(
            request_set=(("x-both", "dest"),),
            request_add=(("x-route", "r"), ("x-dest", "d")),
            request_remove=("x-dest", "x-route"),
            authority="upstream.example",
        )
    }


def test_several_destinations_headers_go_before_their_route_s(tmp_path: Path) -> None:
    """Several: each destination's are its weighted cluster's, which Envoy
    applies before the route's (most_specific_header_mutations_wins false):
    the route's set wins and its remove drops the destination's add."""
    table = istio(
        tmp_path, MERGE + "      weight: 50\n    - destination: {host: bootcamp, subset: v2}\n"
    )
    assert edits_of(table, "/") == {
        "v1": HeadEdits(
            request_set=(("x-both", "route"),),
            request_add=(("x-route", "r"),),
            request_remove=("x-route", "x-dest"),
            authority="upstream.example",
        ),
        "v2": HeadEdits(
            request_set=(("x-both", "route"),),
            request_add=(("x-route", "r"),),
            request_remove=("x-dest",),
            authority="upstream.example",
        ),
    }


def test_edited_routes_and_the_json(tmp_path: Path) -> None:
    table = istio(
        tmp_path,
        MERGE.replace("  - headers:", "  - match: [{uri: {prefix: /e}}]\n    headers:")
        + "  - match: [{uri: {prefix: /r}}]\n    redirect: {uri: /n}\n"
        + "  - route:\n    - destination: {host: bootcamp, subset: v1}\n",
    )
    assert table.edited_routes() == [(HOST, "bootcamp[0]")]
    routes = json.loads(json.dumps(table.to_json()))["routes"][HOST]
    assert routes[0]["headers"] == {
        "request": {"set": [["x-both", "route"]], "add": [["x-route", "r"]], "remove": ["x-dest"]},
        "authority": "upstream.example",
    }
    assert routes[0]["route"][0]["headers"] == {
        "request": {"set": [["x-both", "dest"]], "add": [["x-dest", "d"]], "remove": ["x-route"]}
    }
    assert routes[1]["redirect"]["path"] == "/n" and routes[1]["redirect"]["status"] == 301
    assert routes[2]["headers"] is None and routes[2]["redirect"] is None


def test_validate_v_shows_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(
        tmp_path,
        DR
        + VS
        + MERGE.replace("  - headers:", "  - match: [{uri: {prefix: /e}}]\n    headers:")
        + "  - match: [{uri: {prefix: /r}}]\n    redirect: {uri: /n, redirectCode: 308}\n"
        + "  - directResponse: {status: 404, body: {string: gone}}\n",
    )
    assert main(["validate", "-v", f, REGISTRY]) == 0
    out = capsys.readouterr().out
    assert (
        "headers: Host rewritten to 'upstream.example'; request sets x-both: route; "
        "request adds x-route: r; request removes x-dest"
    ) in out
    assert (
        "its headers: request sets x-both: dest; request adds x-dest: d; request removes x-route"
    ) in out
    assert "redirect 308 to (the request's scheme)://(the request's host)/n" in out
    assert "answered 404 with a body of 4 bytes" in out


# -- redirects: the location per request ------------------------------------------


@pytest.mark.parametrize(
    ("redirect", "path", "authority", "location", "per_request"),
    [
        # the request's path and Host stay where not given
        ("{scheme: https}", "/a?b=1", "bootcamp:8080", "https://bootcamp:8080/a?b=1", True),
        # the scheme changes: the old scheme's default port goes (Envoy)
        ("{scheme: https}", "/a", "bootcamp:80", "https://bootcamp/a", True),
        ("{authority: new.example}", "/a?b", "bootcamp:8080", "http://new.example/a?b", True),
        ("{port: 8443}", "/a", "bootcamp:8080", "http://bootcamp:8443/a", True),
        # Istio leaves out a port that is the scheme's default: the Host's stays
        ("{port: 80}", "/a", "bootcamp:8080", "http://bootcamp:8080/a", True),
        ("{derivePort: FROM_REQUEST_PORT, scheme: https}", "/a", "b", "https://b:8080/a", True),
        ("{derivePort: FROM_PROTOCOL_DEFAULT, uri: /n}", "/a", "b:8080", "http://b:8080/n", True),
        # a uri with its own query and an authority keep nothing of the request
        ("{uri: '/n?x=1', authority: h}", "/a?b", "bootcamp", "http://h/n?x=1", False),
        ("{uri: /n, authority: h}", "/a?b", "bootcamp", "http://h/n?b", True),
        # a request without a Host (HTTP/1.0): the service's name and port
        ("{uri: /n}", "/a?b", "", f"http://{HOST}:8080/n?b", True),
        ("{scheme: https}", "/a", "", f"https://{HOST}:8080/a", True),
    ],
)
def test_a_redirect_s_location_is_built_per_request(
    tmp_path: Path, redirect: str, path: str, authority: str, location: str, per_request: bool
) -> None:
    table = istio(tmp_path, f"  - redirect: {redirect}\n")
    a = answer_of(table, path, authority=authority)
    assert a == LocalAnswer(301, "", (("location", location),), per_request)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_codes(tmp_path: Path, code: int) -> None:
    table = istio(tmp_path, f"  - redirect: {{uri: /n, redirectCode: {code}}}\n")
    assert answer_of(table, "/").status == code


# -- the Gateway API's examples ---------------------------------------------------


def test_gateway_request_header_modifier_example(tmp_path: Path) -> None:
    """http-header-modifier's examples: add, set and remove on the rule,
    case-insensitive names kept lowercase."""
    table = gateway(
        tmp_path,
        """\
  - matches:
    - path:
        type: PathPrefix
        value: /add-a-request-header
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add:
        - name: my-header-name
          value: my-header-value
        set:
        - name: My-Set
          value: bar
        remove: ["my-header1", "my-header3"]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add:
        - name: X-Header-Add-1
          value: header-add-1
    backendRefs:
    - name: bootcamp-v1
      port: 8080
""",
    )
    assert edits_of(table, "/add-a-request-header/x") == {
        "default": HeadEdits(
            request_set=(("my-set", "bar"),),
            request_add=(("my-header-name", "my-header-value"),),
            request_remove=("my-header1", "my-header3"),
            response_add=(("x-header-add-1", "header-add-1"),),
        )
    }
    assert edits_of(table, "/other") == {}  # (no route: 404)


def test_gateway_backend_header_modifiers(tmp_path: Path) -> None:
    """A backendRef's filters: with several backends the rule's set wins
    (Envoy's weighted clusters, as Istio converts the route)."""
    table = gateway(
        tmp_path,
        """\
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-who, value: rule}]
    backendRefs:
    - name: bootcamp-v1
      port: 8080
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{name: x-who, value: v1}]
          add: [{name: x-v1, value: "1"}]
    - name: bootcamp-v2
      port: 8080
""",
    )
    got = [ws.edits for ws in choices(table, "/").subsets]
    assert got == [
        HeadEdits(request_set=(("x-who", "rule"),), request_add=(("x-v1", "1"),)),
        HeadEdits(request_set=(("x-who", "rule"),)),
    ]


# a rule with its own and a backendRef's response edits, and its request edit
UNSERVED_FILTERS = """\
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-route, value: r}]
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-up, value: "1"}]
    backendRefs:
"""


def test_gateway_backend_not_resolved_is_edited_by_both_twins_decisions(tmp_path: Path) -> None:
    """A backendRef to no Service: its share's 500 gets the rule's and its
    own edits, the same in the pure twin's decision as in the compiled
    one's choice (the pure one's was unedited)."""
    table = gateway(
        tmp_path,
        UNSERVED_FILTERS
        + """\
    - name: nowhere
      port: 8080
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier:
          add: [{name: x-dest, value: d}]
    - {name: bootcamp-v1, port: 8080}
""",
    )
    unresolved, _ = choices(table, "/").subsets
    assert (unresolved.endpoints, unresolved.status) == ((), 500)
    assert unresolved.edits == HeadEdits(
        request_set=(("x-up", "1"),),
        response_set=(("x-route", "r"),),
        response_add=(("x-dest", "d"),),
    )
    svc = table.service(HOST)
    assert svc is not None
    request = Request(path="/", authority="bootcamp:8080")
    decisions = [table.decide(svc, 8080, request) for _ in range(40)]  # (seeded: both drawn)
    unserved = [(d.status, d.edits) for d in decisions if not d.endpoints]
    assert 0 < len(unserved) < 40
    assert set(unserved) == {(500, unresolved.edits)}
    assert table.decide(svc, 8080, None).edits is None  # (a raw connection: no head)


def test_gateway_every_weight_zero_answers_500_with_the_rule_s_edits(tmp_path: Path) -> None:
    """Every backendRef of weight 0: the 500 of the rule, with its own
    edits (Envoy finalizes the direct response it is given with the
    route's), the same for both twins; the compiled relay's choice is one
    without endpoints, of subset ``none``."""
    table = gateway(
        tmp_path,
        UNSERVED_FILTERS
        + """\
    - {name: bootcamp-v1, port: 8080, weight: 0}
    - {name: bootcamp-v2, port: 8080, weight: 0}
""",
    )
    expected = HeadEdits(request_set=(("x-up", "1"),), response_set=(("x-route", "r"),))
    rc = choices(table, "/")
    assert [(ws.subset, ws.endpoints, ws.status, ws.key, ws.edits) for ws in rc.subsets] == [
        ("none", (), 500, None, expected)
    ]
    svc = table.service(HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/", authority="bootcamp:8080"))
    assert (d.subset, d.endpoints, d.status, d.edits) == ("none", [], 500, expected)


# The API's ReplacePrefixMatch table (HTTPPathModifier)
PREFIX_TABLE = [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
]


@pytest.mark.parametrize(("request_path", "match", "replace", "sent"), PREFIX_TABLE)
def test_gateway_url_rewrite_prefix_table(
    tmp_path: Path, request_path: str, match: str, replace: str, sent: str
) -> None:
    table = gateway(
        tmp_path,
        f"""\
  - matches:
    - path: {{type: PathPrefix, value: "{match}"}}
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: elsewhere.example
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: "{replace}"}}
    backendRefs:
    - {{name: bootcamp-v1, port: 8080}}
""",
    )
    (e,) = edits_of(table, request_path).values()
    assert e is not None and e.path is not None and e.authority == "elsewhere.example"
    assert rewrite_target(request_path + "?q=1", e.path) == sent + "?q=1"


def test_gateway_url_rewrite_full_path(tmp_path: Path) -> None:
    table = gateway(
        tmp_path,
        """\
  - filters:
    - type: URLRewrite
      urlRewrite:
        path: {type: ReplaceFullPath, replaceFullPath: /one}
    backendRefs:
    - {name: bootcamp-v1, port: 8080}
""",
    )
    assert edits_of(table, "/a/b?c") == {"default": HeadEdits(path=PathRewrite(-1, "/one"))}


@pytest.mark.parametrize(
    ("redirect", "path", "authority", "location"),
    [
        # http-redirect-rewrite's example: https, well-known port left out
        (
            "{scheme: https, statusCode: 301}",
            "/old?b",
            "example.com:80",
            "https://example.com/old?b",
        ),
        ("{scheme: https, statusCode: 301}", "/old", "example.com:8080", "https://example.com/old"),
        ("{hostname: www.example.com, port: 8443}", "/old", "x", "http://www.example.com:8443/old"),
        ("{hostname: www.example.com, port: 80}", "/old", "x:8080", "http://www.example.com/old"),
        ("{scheme: https, port: 443}", "/old", "x:8080", "https://x/old"),
        # neither scheme nor port: the listener's (80: not written)
        ("{hostname: h.example}", "/old/a", "x:8080", "http://h.example/old/a"),
        (
            "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}",
            "/old/x?q",
            "x",
            "http://x/new/x?q",
        ),
        ("{path: {type: ReplaceFullPath, replaceFullPath: /n}}", "/old/x?q", "x", "http://x/n?q"),
        # a request without a Host at a listener, which has no name: relative
        ("{path: {type: ReplaceFullPath, replaceFullPath: /n}}", "/old/x?q", "", "/n?q"),
        ("{hostname: h.example}", "/old/a", "", "http://h.example/old/a"),
    ],
)
def test_gateway_request_redirect(
    tmp_path: Path, redirect: str, path: str, authority: str, location: str
) -> None:
    """RequestRedirect on a Gateway listener (port 80), the API's port
    rules: the scheme's well-known port, else the listener's; none written
    where it is the scheme's default."""
    rules = "  - matches:\n    - path: {type: PathPrefix, value: /old}\n    filters:\n"
    rules += f"    - type: RequestRedirect\n      requestRedirect: {redirect}\n"
    rules += "  - backendRefs:\n    - {name: bootcamp-v1, port: 8080}\n"
    table = gateway(tmp_path, rules, GW)
    a = answer_of(table, path, host=GW_HOST, authority=authority, port=80)
    want = 301 if "statusCode: 301" in redirect else 302
    assert a == LocalAnswer(want, "", (("location", location),), True)


def test_gateway_redirect_on_a_mesh_port_keeps_the_service_port(tmp_path: Path) -> None:
    table = gateway(
        tmp_path,
        "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {hostname: h.example}\n",
    )
    assert answer_of(table, "/a").headers == (("location", "http://h.example:8080/a"),)


# -- refusals, with file and line ---------------------------------------------------

ROUTE = "    route:\n    - destination: {host: bootcamp}\n"
ISTIO_ERRORS = [
    (
        "rewrite uri not a path",
        "  - rewrite: {uri: v2/}\n" + ROUTE,
        "rewrite: {uri: v2/}",
        "rewrite.uri 'v2/' must be a path that starts with '/', with no query or fragment",
    ),
    (
        "rewrite uri with a query",
        "  - rewrite: {uri: '/v2?x=1'}\n" + ROUTE,
        "rewrite: {uri: '/v2?x=1'}",
        "must be a path that starts with '/', with no query or fragment",
    ),
    (
        "redirect uri to another host",
        "  - redirect: {uri: '@evil.example/x'}\n",
        "redirect: {uri: '@evil.example/x'}",
        "redirect.uri '@evil.example/x' must be a path that starts with '/', with no fragment",
    ),
    (
        "direct response 204 with a body",
        "  - directResponse: {status: 204, body: {string: gone}}\n",
        "directResponse: {status: 204",
        "a 204 response has no body",
    ),
    (
        "pseudo-header",
        "  - headers: {request: {set: {':path': /x}}}\n" + ROUTE,
        "headers: {request",
        "header :path: a pseudo-header cannot be edited (use rewrite.uri or rewrite.authority)",
    ),
    (
        "host",
        "  - headers:\n      request:\n        add: {Host: x}\n" + ROUTE,
        "add: {Host",
        "header Host cannot be edited here: use rewrite.authority to change the Host",
    ),
    (
        "framing",
        "  - headers:\n      response:\n        remove:\n        - Transfer-Encoding\n" + ROUTE,
        "- Transfer-Encoding",
        "header Transfer-Encoding cannot be edited: it frames the message or is hop-by-hop",
    ),
    (
        "hop-by-hop on a destination",
        "  - route:\n    - destination: {host: bootcamp}\n"
        + "      headers: {request: {set: {Connection: close}}}\n",
        "headers: {request: {set: {Connection",
        "header Connection cannot be edited",
    ),
    (
        "not a token",
        "  - headers:\n      request:\n        set: {'x y': a}\n" + ROUTE,
        "set: {'x y'",
        "header name 'x y' is not an HTTP field name",
    ),
    (
        "CR in a value",
        '  - headers:\n      request:\n        set: {x-a: "1\\r\\nx-b: 2"}\n' + ROUTE,
        "set: {x-a",
        "has a CR, LF or NUL, which no header may hold",
    ),
    (
        "Envoy formatter",
        "  - headers:\n      request:\n        set: {x-ip: '%DOWNSTREAM_REMOTE_ADDRESS%'}\n"
        + ROUTE,
        "set: {x-ip",
        "has the Envoy formatter %DOWNSTREAM_REMOTE_ADDRESS%: Envoy reads header values as "
        "format strings, and l4proxy does not evaluate them (write %% for a literal %)",
    ),
    (
        "a lone percent",
        "  - headers:\n      request:\n        set: {x-p: '50%'}\n" + ROUTE,
        "set: {x-p",
        "has a '%' that is not '%%'",
    ),
    (
        "a number value",
        "  - headers:\n      request:\n        set:\n          x-n: 1\n" + ROUTE,
        "x-n: 1",
        'must be a string, not the number 1 (quote it: "1")',
    ),
    (
        "one name twice",
        "  - headers:\n      request:\n        set:\n          x-a: '1'\n          X-A: '2'\n"
        + ROUTE,
        "X-A: '2'",
        "header X-A is in spec.http[0].headers.request.set twice",
    ),
    (
        "redirect with route",
        "  - redirect:\n      uri: /n\n" + ROUTE,
        "  - redirect",
        "rule cannot contain both route and redirect",
    ),
    (
        "redirect with rewrite",
        "  - redirect: {uri: /n}\n    rewrite:\n      uri: /m\n",
        "    rewrite:",
        "rule cannot contain both rewrite and redirect",
    ),
    (
        "directResponse with route",
        "  - directResponse: {status: 200}\n" + ROUTE,
        "  - directResponse",
        "rule cannot contain both route and directResponse",
    ),
    (
        "redirect code not Envoy's",
        "  - redirect:\n      uri: /n\n      redirectCode: 305\n",
        "redirectCode: 305",
        "redirectCode 305 is not one Envoy sends (301, 302, 303, 307, 308)",
    ),
    (
        "redirect code not a redirect",
        "  - redirect:\n      uri: /n\n      redirectCode: 200\n",
        "redirectCode: 200",
        "redirectCode 200 is not in range 300..399",
    ),
    (
        "redirect with port and derivePort",
        "  - redirect:\n      port: 8080\n      derivePort: FROM_REQUEST_PORT\n",
        "derivePort:",
        "redirect cannot have both port and derivePort",
    ),
    (
        "uri and uriRegexRewrite",
        "  - rewrite:\n      uri: /b\n      uriRegexRewrite: {match: '^/a', rewrite: /b}\n" + ROUTE,
        "uriRegexRewrite",
        "rewrite may have only one of uri and uriRegexRewrite (Istio's validation)",
    ),
    (
        "uriRegexRewrite without its rewrite",
        "  - rewrite:\n      uriRegexRewrite: {match: '^/a'}\n" + ROUTE,
        "uriRegexRewrite",
        "uriRegexRewrite must have both match and rewrite",
    ),
    (
        "uriRegexRewrite's regex",
        "  - rewrite:\n      uriRegexRewrite:\n        match: '^/(a'\n        rewrite: /b\n"
        + ROUTE,
        "match: '^/(a'",
        "uriRegexRewrite is invalid: missing ): ^/(a",
    ),
    (
        "uriRegexRewrite names a group the regex has not",
        "  - rewrite:\n      uriRegexRewrite:\n        match: '^/a(.*)'\n"
        "        rewrite: '/b\\2'\n" + ROUTE,
        "rewrite: '/b",
        "\\2 names group 2, but the regex has 1 group",
    ),
    (
        "direct response status",
        "  - directResponse:\n      status: 100\n",
        "status: 100",
        "directResponse.status 100 is not in range 200..599",
    ),
    (
        "direct response bytes not base64",
        "  - directResponse:\n      status: 200\n      body:\n        bytes: '@@@'\n",
        "bytes: '@@@'",
        "body.bytes is not base64",
    ),
    (
        "location on a redirect",
        "  - redirect: {uri: /n}\n    headers:\n      response:\n        add: {location: /x}\n",
        "      response:",
        "location cannot be set on a route that answers itself",
    ),
    (
        "old header fields",
        "  - appendHeaders: {x-a: b}\n" + ROUTE,
        "appendHeaders",
        "is not implemented by l4proxy; remove it (the sidecar would not honour it); "
        "Istio removed it; use headers.request or headers.response",
    ),
    (
        # (Istio 1.0's, on a destination as on the route: an unknown field before)
        "old header fields on a destination",
        "  - route:\n    - destination: {host: bootcamp}\n      weight: 100\n"
        "      appendRequestHeaders: {x-a: b}\n",
        "appendRequestHeaders",
        "spec.http[0].route[0].appendRequestHeaders is not implemented by l4proxy; remove it "
        "(the sidecar would not honour it); Istio removed it; use headers.request or "
        "headers.response",
    ),
]


def _line(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert lines, marker
    return lines[0]


@pytest.mark.parametrize(
    ("http", "marker", "message"), [c[1:] for c in ISTIO_ERRORS], ids=[c[0] for c in ISTIO_ERRORS]
)
def test_istio_errors_name_file_and_line(
    tmp_path: Path, http: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, DR + VS + http, marker, message)


def assert_error_at(
    tmp_path: Path, text: str, marker: str, message: str, registry: str = REGISTRY
) -> None:
    """Loading *text* (beside *registry*'s services) fails with an error
    containing *message*, at its file and at the line of *marker*."""
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules([f, registry])
    errs = [e for e in info.value.errors if message in e.message]
    assert errs, f"no error containing {message!r} in:\n{info.value}"
    assert errs[0].file == f
    assert errs[0].line == _line(text, marker), str(errs[0])


BACKEND = "    backendRefs:\n    - {name: bootcamp-v1, port: 8080}\n"
GATEWAY_ERRORS = [
    (
        "a filter kind twice",
        "  - filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [a]}}\n"
        + "    - type: RequestHeaderModifier\n      requestHeaderModifier: {remove: [b]}\n"
        + BACKEND,
        "    - type: RequestHeaderModifier",
        "filter RequestHeaderModifier is given twice",
    ),
    (
        "redirect and rewrite",
        "  - filters:\n    - {type: RequestRedirect, requestRedirect: {scheme: https}}\n"
        + "    - type: URLRewrite\n      urlRewrite: {hostname: a.example}\n",
        "    - type: URLRewrite",
        "a rule cannot have both a RequestRedirect and a URLRewrite filter",
    ),
    (
        "redirect with backendRefs",
        "  - filters:\n    - {type: RequestRedirect, requestRedirect: {scheme: https}}\n" + BACKEND,
        "    backendRefs:",
        "a rule with a RequestRedirect filter cannot have backendRefs",
    ),
    (
        "ReplacePrefixMatch with an Exact match",
        "  - matches:\n    - path: {type: Exact, value: /a}\n    filters:\n"
        + "    - type: URLRewrite\n      urlRewrite:\n"
        + "        path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}\n"
        + BACKEND,
        "        path: {type: ReplacePrefixMatch",
        "ReplacePrefixMatch needs exactly one match, of type PathPrefix",
    ),
    (
        "one header, two actions",
        "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n"
        + "        set: [{name: X-A, value: '1'}]\n        remove: [x-a]\n"
        + BACKEND,
        "remove: [x-a]",
        "header x-a has more than one action",
    ),
    (
        "Host in a header modifier",
        "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n"
        + "        set:\n        - {name: Host, value: a}\n"
        + BACKEND,
        "{name: Host",
        "header Host cannot be edited here: use a URLRewrite filter's hostname",
    ),
    (
        "ExtensionRef",
        "  - filters:\n    - type: ExtensionRef\n"
        + "      extensionRef: {group: x.example, kind: F, name: f}\n"
        + BACKEND,
        "    - type: ExtensionRef",
        "filter ExtensionRef is not implemented by l4proxy; remove it (the sidecar would not "
        "honour it); l4proxy has no implementation-specific filters",
    ),
    (
        "statusCode",
        "  - filters:\n    - type: RequestRedirect\n      requestRedirect:\n"
        + "        statusCode: 305\n",
        "statusCode: 305",
        "statusCode 305 is not one of 301, 302, 303, 307, 308",
    ),
    (
        "a type without its field",
        "  - filters:\n    - type: URLRewrite\n" + BACKEND,
        "    - type: URLRewrite",
        "spec.rules[0].filters[0].urlRewrite is required for a URLRewrite filter",
    ),
    (
        "another type's field",
        "  - filters:\n    - type: URLRewrite\n      requestRedirect: {scheme: https}\n" + BACKEND,
        "      requestRedirect",
        "requestRedirect must not be given with type URLRewrite",
    ),
]


@pytest.mark.parametrize(
    ("rules", "marker", "message"),
    [c[1:] for c in GATEWAY_ERRORS],
    ids=[c[0] for c in GATEWAY_ERRORS],
)
def test_gateway_errors_name_file_and_line(
    tmp_path: Path, rules: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, HR + rules, marker, message, PER_VERSION)


def test_a_rewrite_without_a_uri_match_warns(tmp_path: Path) -> None:
    """Istio's quirk, said at load: a rewrite.uri on a route without a uri
    match replaces only the first '/' (Envoy's prefix '/')."""
    f = write(tmp_path, DR + VS + "  - rewrite: {uri: /v2}\n" + ROUTE)
    loaded = load_rules([f, REGISTRY])
    (w,) = [d for d in loaded.notes if d.severity == "warning" and "rewrite" in d.message]
    assert "only the path's first '/' is replaced ('/a' goes up as '/v2a')" in w.message
    assert w.line == _line(DR + VS + "  - rewrite: {uri: /v2}\n", "rewrite: {uri: /v2}")


def test_an_empty_istio_value_does_nothing(tmp_path: Path) -> None:
    """Envoy drops a header whose value is empty (keep_empty_value false, as
    Istio leaves it): the edit is left out, with a warning at its line."""
    text = DR + VS + "  - headers:\n      request:\n        set: {x-e: '', x-f: f}\n" + ROUTE
    loaded = load_rules([write(tmp_path, text), REGISTRY])
    (e,) = edits_of(loaded.table, "/").values()
    assert e == HeadEdits(request_set=(("x-f", "f"),))
    (w,) = [d for d in loaded.notes if "is empty" in d.message]
    assert w.severity == "warning" and w.line == _line(text, "set: {x-e")
