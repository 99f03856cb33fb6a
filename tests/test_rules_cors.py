"""CORS in the rules: a VirtualService's ``http[].corsPolicy``, a RouteRule's
``corsPolicy`` and an HTTPRoute rule's ``CORS`` filter.

Loaded from real YAML (the VirtualService reference's example, the Gateway
API's CORS guide, on the bootcamp registry), then read back through
``RouteTable.choices()`` and ``decide()``, which must agree: a preflight
from an allowed Origin is the route's own 200 answer with Envoy's CORS
filter's lines in its order; an actual request from one gets
``access-control-allow-origin`` (echoed), ``-allow-credentials`` and
``-expose-headers`` over the route's own response edits; a request without
an Origin, or from one not allowed, is routed exactly as without the policy
(``IGNORE`` answers an unallowed preflight 200 without allow-origin). Every
refusal names its file and line; the key headers and shape make the
relay's cache tell Origins apart; ``validate -v`` and ``/config_dump`` say
the policy.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import FAULT_SCALE, Fault, HeadEdits
from l4proxy.rules import load_rules
from l4proxy.rules.routing import LocalAnswer, Request, RouteTable
from tests.test_config_errors import REGISTRY, RR
from tests.test_rules_head_edits import (
    DR,
    HR,
    PER_VERSION,
    VS,
    _line,
    assert_error_at,
    gateway,
    istio,
    write,
)
from tests.test_rules_mirror import warnings_of

HOST = "bootcamp.default.svc.cluster.local"
ORIGIN = "https://example.com"
ROUTE = "  - route:\n    - destination: {host: bootcamp, subset: v1}\n"
# the VirtualService reference's CorsPolicy example, with allowOrigins
REFERENCE = (
    ROUTE
    + """\
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      allowMethods:
      - POST
      - GET
      allowCredentials: false
      allowHeaders:
      - X-Foo-Bar
      maxAge: "24h"
"""
)
PREFLIGHT_LINES = (
    ("access-control-allow-origin", ORIGIN),
    ("access-control-allow-methods", "POST,GET"),
    ("access-control-allow-headers", "X-Foo-Bar"),
    ("access-control-max-age", "86400"),
)


def preflight(origin: str | None = ORIGIN, method: str = "PUT", **more: str) -> Request:
    headers = {"access-control-request-method": method, **more}
    if origin is not None:
        headers["origin"] = origin
    return Request("OPTIONS", "/", "bootcamp:8080", headers=headers)


def actual(origin: str | None = ORIGIN, method: str = "GET", path: str = "/") -> Request:
    return Request(method, path, "bootcamp:8080", headers={"origin": origin} if origin else {})


def answer(table: RouteTable, request: Request) -> LocalAnswer | None:
    """The route's own answer to *request*, by choices(); decide() agrees,
    and an answer sends nothing upstream (the route's fault, if any, goes
    with it: drawn before it)."""
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, request)
    d = table.decide(svc, 8080, request)
    assert rc.answer == d.answer
    if rc.answer is not None:
        assert rc.subsets == () and d.endpoints == [] and rc.fault == d.fault
    return rc.answer


def edits(table: RouteTable, request: Request) -> tuple[HeadEdits | None, ...]:
    """Each destination's edits by choices(); decide()'s pick is among them."""
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, request)
    d = table.decide(svc, 8080, request)
    assert rc.answer is None and d.answer is None and d.endpoints
    got = tuple(ws.edits for ws in rc.subsets)
    assert d.edits in got
    return got


# -- Istio ------------------------------------------------------------------------


def test_an_allowed_origin_s_preflight_is_answered_with_envoy_s_lines(tmp_path: Path) -> None:
    table = istio(tmp_path, REFERENCE)
    got = answer(table, preflight())
    assert got == LocalAnswer(200, "", PREFLIGHT_LINES)


def test_an_allowed_origin_s_actual_request_gets_allow_origin_echoed(tmp_path: Path) -> None:
    table = istio(tmp_path, REFERENCE)
    (e,) = edits(table, actual())
    assert e == HeadEdits(response_set=(("access-control-allow-origin", ORIGIN),))
    # an OPTIONS without Access-Control-Request-Method is no preflight: it goes upstream
    (e,) = edits(table, actual(method="OPTIONS"))
    assert e == HeadEdits(response_set=(("access-control-allow-origin", ORIGIN),))


@pytest.mark.parametrize("origin", [None, "", "https://evil.example", "http://example.com"])
def test_no_origin_or_one_not_allowed_is_routed_as_without_the_policy(
    tmp_path: Path, origin: str | None
) -> None:
    table = istio(tmp_path, REFERENCE)
    assert edits(table, actual(origin)) == (None,)
    # (FORWARD, the default: the preflight goes upstream untouched)
    assert answer(table, preflight(origin)) is None
    assert edits(table, preflight(origin)) == (None,)


def test_ignore_answers_an_unallowed_preflight_without_allow_origin(tmp_path: Path) -> None:
    table = istio(tmp_path, REFERENCE + "      unmatchedPreflights: IGNORE\n")
    got = answer(table, preflight("https://evil.example"))
    assert got == LocalAnswer(200, "", PREFLIGHT_LINES[1:])
    assert answer(table, preflight()) == LocalAnswer(200, "", PREFLIGHT_LINES)
    assert answer(table, preflight(None)) is None  # (no Origin: no preflight)
    assert edits(table, actual("https://evil.example")) == (None,)


@pytest.mark.parametrize(
    ("match", "allowed", "refused"),
    [
        ("{exact: https://example.com}", ["https://example.com"], ["https://example.co"]),
        ("{prefix: https://app.}", ["https://app.example.com"], ["https://example.com"]),
        (
            "{regex: 'https://[a-z]+\\.example\\.com'}",
            ["https://a.example.com"],
            ["https://example.com", "https://a.example.com.evil"],
        ),
        # Envoy's filter allows every Origin where a match takes "*"
        ('{exact: "*"}', ["https://example.com", "null"], []),
        ("{regex: '.*'}", ["https://anything.example"], []),
    ],
)
def test_allow_origins_forms(
    tmp_path: Path, match: str, allowed: list[str], refused: list[str]
) -> None:
    http = ROUTE + f"    corsPolicy:\n      allowOrigins: [{match}]\n"
    table = istio(tmp_path, http)
    for origin in allowed:
        assert answer(table, preflight(origin)) == LocalAnswer(
            200, "", (("access-control-allow-origin", origin),)
        ), origin
    for origin in refused:
        assert answer(table, preflight(origin)) is None, origin


def _warned_at(tmp_path: Path, http: str, marker: str, phrase: str) -> bool:
    """Whether the route *http* loads with a warning saying *phrase* at
    the line of *marker*."""
    text = DR + VS + http
    return any(
        line == _line(text, marker) and phrase in message
        for line, message in warnings_of(tmp_path, text)
    )


def test_deprecated_allow_origin_is_exact_with_a_warning(tmp_path: Path) -> None:
    http = ROUTE + "    corsPolicy:\n      allowOrigin: [https://example.com]\n"
    assert _warned_at(tmp_path, http, "allowOrigin:", "is deprecated")
    table = istio(tmp_path, http)
    assert answer(table, preflight()) is not None
    assert answer(table, preflight("https://example.com.evil")) is None


def test_allow_origin_beside_allow_origins_is_ignored_with_a_warning(tmp_path: Path) -> None:
    http = ROUTE + (
        "    corsPolicy:\n      allowOrigins: [{exact: https://a.example}]\n"
        "      allowOrigin: [https://b.example]\n"
    )
    assert _warned_at(tmp_path, http, "allowOrigin:", "is ignored")
    table = istio(tmp_path, http)
    assert answer(table, preflight("https://a.example")) is not None
    assert answer(table, preflight("https://b.example")) is None


def test_a_policy_without_origins_warns_and_allows_none(tmp_path: Path) -> None:
    http = ROUTE + "    corsPolicy: {allowMethods: [GET]}\n"
    assert _warned_at(tmp_path, http, "corsPolicy:", "allows no origin")
    assert answer(istio(tmp_path, http), preflight()) is None


def test_wildcard_headers_echo_the_request(tmp_path: Path) -> None:
    # (a method '*' is the Gateway API's only: test_gateway_api_defaults_and_wildcards)
    http = ROUTE + (
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n"
        "      allowMethods: [DELETE]\n      allowHeaders: ['*']\n      allowCredentials: true\n"
    )
    table = istio(tmp_path, http)
    got = answer(table, preflight(method="DELETE", **{"access-control-request-headers": "x-a"}))
    assert got == LocalAnswer(
        200,
        "",
        (
            ("access-control-allow-origin", ORIGIN),
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-methods", "DELETE"),
            ("access-control-allow-headers", "x-a"),
        ),
        per_request=True,  # (Access-Control-Request-Headers is no key of the relay's cache)
    )
    got = answer(table, preflight(method="DELETE"))  # nothing requested: no line
    assert got is not None
    assert [n for n, _ in got.headers] == [
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
    ]


def test_header_entries_are_any_text_as_istio_takes_them(tmp_path: Path) -> None:
    """Istio checks only that an allowHeaders or exposeHeaders entry is not
    empty: a list written as one entry goes as it is, joined with the
    others by ','."""
    http = ROUTE + (
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n"
        "      allowHeaders: ['Content-Type, Authorization', x-a]\n"
        "      exposeHeaders: ['X-Total X-Page']\n"
    )
    table = istio(tmp_path, http)
    got = answer(table, preflight())
    assert got is not None
    assert ("access-control-allow-headers", "Content-Type, Authorization,x-a") in got.headers
    assert edits(table, actual())[0] == HeadEdits(
        response_set=(
            ("access-control-allow-origin", ORIGIN),
            ("access-control-expose-headers", "X-Total X-Page"),
        )
    )


def test_credentials_and_expose_headers_on_the_actual_response(tmp_path: Path) -> None:
    http = ROUTE + (
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n"
        "      exposeHeaders: [x-total, x-page]\n      allowCredentials: true\n"
    )
    (e,) = edits(istio(tmp_path, http), actual())
    assert e is not None
    assert e.response_set == (
        ("access-control-allow-origin", ORIGIN),
        ("access-control-allow-credentials", "true"),
        ("access-control-expose-headers", "x-total,x-page"),
    )


def test_the_cors_lines_go_over_the_route_s_response_edits(tmp_path: Path) -> None:
    """Envoy's CORS filter sets its headers on the response the router
    edited: a route's set or add of the same name is replaced, the rest
    kept, its remove still removes the upstream's line."""
    http = ROUTE + (
        "    headers:\n      response:\n"
        "        set: {access-control-allow-origin: '*', x-kept: a}\n"
        "        add: {access-control-allow-origin: '*', x-added: b}\n"
        "        remove: [access-control-allow-origin, x-gone]\n"
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n"
    )
    table = istio(tmp_path, http)
    (e,) = edits(table, actual())
    assert e is not None
    assert e.response_set == (("x-kept", "a"), ("access-control-allow-origin", ORIGIN))
    assert e.response_add == (("x-added", "b"),)
    assert e.response_remove == ("access-control-allow-origin", "x-gone")
    (e,) = edits(table, actual(None))  # no Origin: the route's own edits
    assert e is not None and ("access-control-allow-origin", "*") in e.response_set


def test_weighted_destinations_each_get_the_lines(tmp_path: Path) -> None:
    http = (
        "  - route:\n    - destination: {host: bootcamp, subset: v1}\n      weight: 50\n"
        "    - destination: {host: bootcamp, subset: v2}\n      weight: 50\n"
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n"
    )
    got = edits(istio(tmp_path, http), actual())
    assert got == (HeadEdits(response_set=(("access-control-allow-origin", ORIGIN),)),) * 2


def test_a_direct_response_gets_the_lines_and_a_preflight_the_filter_s_answer(
    tmp_path: Path,
) -> None:
    http = (
        "  - directResponse: {status: 418, body: {string: teapot}}\n"
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n"
    )
    table = istio(tmp_path, http)
    assert answer(table, actual()) == LocalAnswer(
        418, "teapot", (("access-control-allow-origin", ORIGIN),)
    )
    assert answer(table, actual(None)) == LocalAnswer(418, "teapot")
    # (the CORS filter answers before the router)
    assert answer(table, preflight()) == LocalAnswer(
        200, "", (("access-control-allow-origin", ORIGIN),)
    )


def test_a_preflight_s_answer_carries_the_route_s_fault(tmp_path: Path) -> None:
    """Istio's filters are fault, then CORS, then router (pilot's
    listener_builder appends Fault then Cors): the relay draws the route's
    fault before it sends the preflight's answer, as before any answer."""
    http = REFERENCE + "    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n"
    table = istio(tmp_path, http)
    assert answer(table, preflight()) == LocalAnswer(200, "", PREFLIGHT_LINES)
    svc = table.service(HOST)
    assert svc is not None
    fault = Fault(abort_status=503, abort_ppm=FAULT_SCALE)
    assert table.choices(svc, 8080, preflight()).fault == fault
    assert table.decide(svc, 8080, preflight()).fault == fault
    assert table.choices(svc, 8080, actual()).fault == fault
    # (a raw connection has no request: nothing injected, no preflight)
    assert table.decide(svc, 8080, None).fault is None


def test_only_the_matched_route_s_policy_applies(tmp_path: Path) -> None:
    http = (
        "  - match: [{uri: {prefix: /api}}]\n"
        "    route:\n    - destination: {host: bootcamp, subset: v1}\n"
        "    corsPolicy:\n      allowOrigins: [{exact: https://example.com}]\n" + ROUTE
    )
    table = istio(tmp_path, http)
    assert edits(table, actual(path="/api/x")) != (None,)
    assert edits(table, actual(path="/other")) == (None,)


def test_key_headers_and_shape_make_origins_distinct_verdicts(tmp_path: Path) -> None:
    table = istio(tmp_path, REFERENCE)
    assert {"origin", "access-control-request-method"} <= table.match_headers()
    svc = table.service(HOST)
    assert svc is not None
    shape = table.request_shape(svc)
    assert shape.method and shape.headers
    plain = istio(tmp_path, ROUTE)
    assert plain.match_headers() == frozenset()
    svc = plain.service(HOST)
    assert svc is not None
    shape = plain.request_shape(svc)
    assert not shape.method and not shape.headers


def test_route_rule_cors_policy(tmp_path: Path) -> None:
    text = RR + (
        "  destination: {name: bootcamp}\n"
        "  corsPolicy:\n    allowOrigin: [https://example.com]\n"
        "    allowMethods: [POST, GET]\n    allowHeaders: [X-Foo-Bar]\n    maxAge: 24h\n"
    )
    loaded = load_rules([write(tmp_path, text), REGISTRY], seed=1)
    assert not [d for d in loaded.notes if d.severity == "warning"]
    assert answer(loaded.table, preflight()) == LocalAnswer(200, "", PREFLIGHT_LINES)


ISTIO_ERRORS = [
    (
        "empty origin",
        ROUTE + "    corsPolicy:\n      allowOrigins:\n      - {exact: ''}\n",
        "- {exact: ''}",
        "spec.http[0].corsPolicy.allowOrigins[0] must not be empty",
    ),
    (
        "bad regex",
        ROUTE + "    corsPolicy:\n      allowOrigins:\n      - {regex: '(x'}\n",
        "- {regex:",
        "is invalid",
    ),
    (
        "suffix",
        ROUTE + "    corsPolicy:\n      allowOrigins:\n      - {suffix: .com}\n",
        "- {suffix",
        "suffix is not a field of Istio's StringMatch (exact, prefix, regex)",
    ),
    (
        "method",
        ROUTE + "    corsPolicy:\n      allowMethods:\n      - FETCH\n",
        "- FETCH",
        "'FETCH' is not a supported HTTP method",
    ),
    (
        "method star (Istio's supportedMethods has none)",
        ROUTE + "    corsPolicy:\n      allowMethods:\n      - '*'\n",
        "- '*'",
        "'*' is not a supported HTTP method (one of GET, HEAD, POST, PUT, PATCH, DELETE, "
        "CONNECT, OPTIONS, TRACE; Istio's validation takes no '*')",
    ),
    (
        "empty header",
        ROUTE + "    corsPolicy:\n      allowHeaders:\n      - ''\n",
        "- ''",
        "spec.http[0].corsPolicy.allowHeaders[0] '' must not be empty nor hold a CR, LF or NUL",
    ),
    (
        "expose header with a line break",
        ROUTE + '    corsPolicy:\n      exposeHeaders:\n      - "x\\r\\nset-cookie: a=b"\n',
        '- "x',
        "spec.http[0].corsPolicy.exposeHeaders[0] 'x\\r\\nset-cookie: a=b' must not be empty "
        "nor hold a CR, LF or NUL",
    ),
    (
        "max age 0s (Istio's ValidateDuration: at least 1ms)",
        ROUTE + "    corsPolicy:\n      maxAge: 0s\n",
        "maxAge:",
        "spec.http[0].corsPolicy.maxAge '0s' must be whole milliseconds from 1ms",
    ),
    (
        "max age not whole seconds",
        ROUTE + "    corsPolicy:\n      maxAge: 1500ms\n",
        "maxAge:",
        "max_age duration is accurate only to seconds precision",
    ),
    (
        "max age not a duration",
        ROUTE + "    corsPolicy:\n      maxAge: 10\n",
        "maxAge:",
        "must be a duration string",
    ),
    (
        "credentials not a boolean",
        ROUTE + "    corsPolicy:\n      allowCredentials: 'yes'\n",
        "allowCredentials:",
        "spec.http[0].corsPolicy.allowCredentials must be true or false",
    ),
    (
        "unmatched preflights",
        ROUTE + "    corsPolicy:\n      unmatchedPreflights: DROP\n",
        "unmatchedPreflights:",
        "must be one of UNSPECIFIED, FORWARD, IGNORE, not 'DROP'",
    ),
    (
        "unknown field",
        ROUTE + "    corsPolicy:\n      allowOrigns: []\n",
        "allowOrigns:",
        "unknown field spec.http[0].corsPolicy.allowOrigns",
    ),
]


@pytest.mark.parametrize(
    ("http", "marker", "message"), [c[1:] for c in ISTIO_ERRORS], ids=[c[0] for c in ISTIO_ERRORS]
)
def test_istio_errors_name_file_and_line(
    tmp_path: Path, http: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, DR + VS + http, marker, message)


def test_route_rule_has_no_allow_origins(tmp_path: Path) -> None:
    text = RR + (
        "  destination: {name: bootcamp}\n"
        "  corsPolicy:\n    allowOrigins: [{exact: https://example.com}]\n"
    )
    assert_error_at(tmp_path, text, "allowOrigins:", "unknown field spec.corsPolicy.allowOrigins")


def test_route_rule_method_star_is_refused(tmp_path: Path) -> None:
    # (Istio 0.7's validateCORSPolicy: the same supportedMethods, no '*')
    text = RR + (
        "  destination: {name: bootcamp}\n"
        "  corsPolicy:\n    allowOrigin: [https://example.com]\n    allowMethods: ['*']\n"
    )
    assert_error_at(tmp_path, text, "allowMethods:", "'*' is not a supported HTTP method")


# -- the Gateway API ---------------------------------------------------------------

BACKEND = "    backendRefs:\n    - {name: bootcamp-v1, port: 8080}\n"
# the Gateway API's CORS guide (its HTTPRoute, on the bootcamp services)
GATEWAY = (
    """\
  - filters:
    - type: CORS
      cors:
        allowOrigins:
        - "https://*.foo.com"
        - "http://bar.com:8080"
        allowMethods: [GET, OPTIONS, POST]
        allowCredentials: true
        allowHeaders: [x-header-1]
        exposeHeaders: [x-header-2]
        maxAge: 1000
"""
    + BACKEND
)


def test_gateway_api_cors_guide(tmp_path: Path) -> None:
    table = gateway(tmp_path, GATEWAY)
    lines = (
        ("access-control-allow-credentials", "true"),
        ("access-control-allow-methods", "GET,OPTIONS,POST"),
        ("access-control-allow-headers", "x-header-1"),
        ("access-control-max-age", "1000"),
    )
    for origin in ("https://a.foo.com", "https://a.b.foo.com", "https://a.foo.com:443"):
        got = answer(table, preflight(origin))
        assert got == LocalAnswer(200, "", (("access-control-allow-origin", origin), *lines))
    for origin in (
        "http://a.foo.com",  # the scheme
        "https://foo.com.evil",
        "https://a.foo.com:8443",  # (no port: 443 only)
        "http://bar.com",  # (port 8080 given: that one only)
        "https://example.com",
    ):
        assert answer(table, preflight(origin)) is None, origin
    assert answer(table, preflight("http://bar.com:8080")) is not None
    (e,) = edits(table, actual("https://x.foo.com"))
    assert e is not None
    assert e.response_set == (
        ("access-control-allow-origin", "https://x.foo.com"),
        ("access-control-allow-credentials", "true"),
        ("access-control-expose-headers", "x-header-2"),
    )


def test_gateway_api_defaults_and_wildcards(tmp_path: Path) -> None:
    rules = (
        "  - filters:\n    - type: CORS\n      cors:\n"
        "        allowOrigins: ['*']\n        allowMethods: ['*']\n"
    ) + BACKEND
    table = gateway(tmp_path, rules)
    got = answer(table, preflight("https://anyone.example", method="PATCH"))
    assert got == LocalAnswer(
        200,
        "",
        (
            ("access-control-allow-origin", "https://anyone.example"),
            ("access-control-allow-methods", "PATCH"),
            ("access-control-max-age", "5"),  # (the CRD's default)
        ),
    )


GATEWAY_ERRORS = [
    (
        "header name not a token (the API's HTTPHeaderName)",
        "  - filters:\n    - type: CORS\n      cors:\n        allowHeaders:\n"
        "        - x foo\n" + BACKEND,
        "- x foo",
        "header name 'x foo' is not an HTTP field name",
    ),
    (
        "star beside origins",
        "  - filters:\n    - type: CORS\n      cors:\n"
        "        allowOrigins: ['*', 'https://a.com']\n" + BACKEND,
        "allowOrigins:",
        "AllowOrigins cannot contain '*' alongside other origins",
    ),
    (
        "origin without scheme",
        "  - filters:\n    - type: CORS\n      cors:\n        allowOrigins:\n"
        "        - example.com\n" + BACKEND,
        "- example.com",
        "'example.com' is not an origin",
    ),
    (
        "origin with a path",
        "  - filters:\n    - type: CORS\n      cors:\n        allowOrigins:\n"
        "        - https://example.com/app\n" + BACKEND,
        "- https://example.com/app",
        "is not an origin",
    ),
    (
        "origin port out of range",
        "  - filters:\n    - type: CORS\n      cors:\n        allowOrigins:\n"
        "        - https://example.com:70000\n" + BACKEND,
        "- https://example.com:70000",
        "is not an origin",
    ),
    (
        "star beside methods",
        "  - filters:\n    - type: CORS\n      cors:\n        allowMethods: ['*', GET]\n" + BACKEND,
        "allowMethods:",
        "AllowMethods cannot contain '*' alongside other methods",
    ),
    (
        "unknown method",
        "  - filters:\n    - type: CORS\n      cors:\n        allowMethods:\n"
        "        - FETCH\n" + BACKEND,
        "- FETCH",
        "'FETCH' is not a supported HTTP method",
    ),
    (
        "max age 0",
        "  - filters:\n    - type: CORS\n      cors:\n        maxAge: 0\n" + BACKEND,
        "maxAge:",
        "spec.rules[0].filters[0].cors.maxAge 0 is not in range 1..2147483647",
    ),
    (
        "twice",
        "  - filters:\n    - type: CORS\n      cors: {}\n    - {type: CORS, cors: {maxAge: 9}}\n"
        + BACKEND,
        "- {type: CORS",
        "filter CORS is given twice",
    ),
    (
        "on a backendRef",
        "  - backendRefs:\n    - name: bootcamp-v1\n      port: 8080\n"
        "      filters:\n      - type: CORS\n        cors: {allowOrigins: ['*']}\n",
        "      - type: CORS",
        "filter CORS on a backendRef is not implemented",
    ),
]


@pytest.mark.parametrize(
    ("rules", "marker", "message"),
    [c[1:] for c in GATEWAY_ERRORS],
    ids=[c[0] for c in GATEWAY_ERRORS],
)
def test_gateway_api_errors_name_file_and_line(
    tmp_path: Path, rules: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, HR + rules, marker, message, PER_VERSION)


# -- what the table says of it ------------------------------------------------------


def test_config_dump_and_validate_v_say_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = istio(tmp_path, REFERENCE)
    (route,) = json.loads(json.dumps(table.to_json()))["routes"][HOST]
    assert route["cors"] == {
        "allow_origins": [{"exact": ORIGIN}],
        "allow_methods": "POST,GET",
        "allow_headers": "X-Foo-Bar",
        "expose_headers": "",
        "max_age": "86400",
        "allow_credentials": False,
        "unmatched_preflights": "FORWARD",
    }
    assert main(["validate", "-v", write(tmp_path, DR + VS + REFERENCE), REGISTRY]) == 0
    out = capsys.readouterr().out
    assert f"CORS: origins exact '{ORIGIN}': their preflights answered 200 here" in out
    assert "other origins' preflights sent upstream (FORWARD)" in out
    assert "allow-methods: POST,GET" in out and "max-age: 86400" in out


@pytest.mark.parametrize(
    ("origins", "said"),
    [
        ("{exact: '*'}", "exact '*'"),
        ("{regex: '.*'}", "regex '.*'"),
        ("{exact: 'https://a.example'}, {prefix: '*'}", "exact 'https://a.example', prefix '*'"),
    ],
)
def test_validate_v_says_a_match_of_star_allows_any_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], origins: str, said: str
) -> None:
    http = ROUTE + f"    corsPolicy:\n      allowOrigins: [{origins}]\n"
    assert main(["validate", "-v", write(tmp_path, DR + VS + http), REGISTRY]) == 0
    out = capsys.readouterr().out
    assert f"CORS: origins {said}: any origin allowed, its preflights answered 200 here" in out
    assert "other origins" not in out


def test_cors_routes(tmp_path: Path) -> None:
    http = textwrap.dedent(
        """\
          - name: api
            match: [{uri: {prefix: /api}}]
            route:
            - destination: {host: bootcamp, subset: v1}
            corsPolicy: {allowOrigins: [{exact: "*"}]}
        """
    )
    http = "".join("  " + line if line else line for line in http.splitlines(True))
    assert istio(tmp_path, http + ROUTE).cors_routes() == [(HOST, "bootcamp/api")]


def test_a_gateway_api_origin_of_a_long_host_is_served_and_one_too_long_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An origin of a 200-character host (the API takes 253) loads, and its
    preflight is answered, and validate -v says it (before: the match
    l4proxy makes of it was held to Envoy's regex program size, a
    RegexError out of the load: validate's traceback, the sidecar's
    rejection without a file or line); 254 characters are an error at
    its line."""
    host = "a" * 180 + ".foo.com"
    origin = f"https://{host}"
    rules = GATEWAY.replace('"https://*.foo.com"', f'"{origin}"')
    table = gateway(tmp_path, rules)
    got = answer(table, preflight(origin))
    assert got is not None and ("access-control-allow-origin", origin) in got.headers
    assert answer(table, preflight(f"https://b{host[1:]}")) is None
    assert main(["validate", "-v", write(tmp_path, HR + rules), PER_VERSION]) == 0
    assert "CORS: origins regex 'https://aaaa" in capsys.readouterr().out
    long = "https://" + "a" * 238 + ".foo.com"
    assert len(long) == 254
    assert_error_at(
        tmp_path,
        HR + GATEWAY.replace('"https://*.foo.com"', f'"{long}"'),
        long,
        "is 254 characters long: at most 253 (the API's maxLength)",
        PER_VERSION,
    )
