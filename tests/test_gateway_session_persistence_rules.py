"""An HTTPRoute rule's ``sessionPersistence`` in the rule file and the route
table: validated as the Gateway API's CRD does (errors with file and line),
Envoy Gateway's choices where the API leaves one (the default name, the
cookie's Path from the path match, Max-Age for a permanent cookie, what it
ignores said in a warning, idleTimeout refused), ``validate`` accepting
the shape of Envoy Gateway's own examples, and ``RouteTable.decide`` /
``choices`` honouring a token (the pure core both relays follow)."""

from __future__ import annotations

import os
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import SessionPersistence, session_token
from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.routing import (
    Match,
    Request,
    RouteTable,
    StringMatch,
    request_headers,
    session_cookie_path,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "gateway-api")
PER_VERSION = os.path.join(DATA, "registry-per-version.yaml")
HOST = "bootcamp.default.svc.cluster.local"
V1 = ("198.18.0.11", "198.18.0.12")
V2 = ("198.18.0.13",)

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bootcamp
spec:
  parentRefs:
  - {group: "", kind: Service, name: bootcamp}
  rules:
  - backendRefs:
    - {name: bootcamp-v1, port: 8080, weight: 90}
    - {name: bootcamp-v2, port: 8080, weight: 10}
    sessionPersistence:
"""  # (the session's lines go at line 13)


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "rules.yaml"
    f.write_text(textwrap.dedent(text))
    return str(f)


def route_with(session: str) -> str:
    return ROUTE + textwrap.indent(textwrap.dedent(session), "      ")


def load(tmp_path: Path, text: str) -> RouteTable:
    return load_rules([write(tmp_path, text), PER_VERSION], seed=3).table


def _session(table: RouteTable) -> SessionPersistence | None:
    (route,) = table.routes_for(HOST)
    return route.session


# -- what a rule file says --------------------------------------------------

# (case, sessionPersistence's lines, expected message part, expected line)
ERRORS = [
    (
        "sessionName over 128 bytes",
        "sessionName: " + "s" * 129,
        "spec.rules[0].sessionPersistence.sessionName is 129 bytes long; the API allows 128",
        13,
    ),
    (
        "sessionName of 128 two-byte characters",
        "sessionName: " + "é" * 65,
        "is 130 bytes long",
        13,
    ),
    (
        "a cookie name that is no token",
        "sessionName: 'my session'",
        "spec.rules[0].sessionPersistence.sessionName 'my session' is not a cookie name",
        13,
    ),
    (
        "a header token named Content-Length",
        "{type: Header, sessionName: Content-Length}",
        "'Content-Length' cannot carry the session token",
        13,
    ),
    (
        "an unknown type",
        "{type: Query}",
        "spec.rules[0].sessionPersistence.type 'Query' is not one of Cookie, Header",
        13,
    ),
    (
        "a duration with days",
        "absoluteTimeout: 1d",
        "spec.rules[0].sessionPersistence.absoluteTimeout '1d' is not a duration",
        13,
    ),
    (
        "a duration of six digits",
        "absoluteTimeout: 100000s",
        "'100000s' is not a duration",
        13,
    ),
    (
        "a duration of five parts",
        "absoluteTimeout: 1h1m1s1ms1h",
        "'1h1m1s1ms1h' is not a duration",
        13,
    ),
    (
        "Permanent without absoluteTimeout",
        "cookieConfig: {lifetimeType: Permanent}",
        "spec.rules[0].sessionPersistence.absoluteTimeout is required when "
        "spec.rules[0].sessionPersistence.cookieConfig.lifetimeType is Permanent",
        13,
    ),
    (
        "an unknown lifetimeType",
        "cookieConfig: {lifetimeType: Forever}",
        "lifetimeType 'Forever' is not one of Permanent, Session",
        13,
    ),
    (
        "idleTimeout",
        "{sessionName: sid, idleTimeout: 10m}",
        "spec.rules[0].sessionPersistence.idleTimeout is not implemented by l4proxy",
        13,
    ),
    (
        "an unknown field",
        "{sessionName: sid, cookieTTL: 10m}",
        "unknown field spec.rules[0].sessionPersistence.cookieTTL",
        13,
    ),
]


@pytest.mark.parametrize(
    ("session", "message", "line"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS]
)
def test_errors_name_file_and_line(tmp_path: Path, session: str, message: str, line: int) -> None:
    f = write(tmp_path, route_with(session))
    with pytest.raises(ConfigError) as info:
        load_rules([f, PER_VERSION])
    errs = [e for e in info.value.errors if message in e.message]
    assert errs, f"no error containing {message!r} in:\n{info.value}"
    assert (errs[0].file, errs[0].line) == (f, line), str(errs[0])


def test_a_rule_without_a_name_takes_envoy_gateway_s(tmp_path: Path) -> None:
    """A cookie named httproute-NAMESPACE-NAME-rule-INDEX (Envoy Gateway's
    route destination name, '/' as '-'), a session cookie: no Max-Age."""
    table = load(tmp_path, route_with("{}"))
    assert _session(table) == SessionPersistence("cookie", "httproute-default-bootcamp-rule-0", "")


def test_a_header_token_s_name_is_lowercase(tmp_path: Path) -> None:
    table = load(tmp_path, route_with("{type: Header, sessionName: Session-A}"))
    assert _session(table) == SessionPersistence("header", "session-a", "")


@pytest.mark.parametrize(
    ("timeout", "max_age"), [("10s", 10), ("1h30m", 5400), ("1500ms", 1), ("2m500ms", 120)]
)
def test_a_permanent_cookie_s_max_age_is_its_absolute_timeout_in_whole_seconds(
    tmp_path: Path, timeout: str, max_age: int
) -> None:
    session = (
        f"{{sessionName: sid, absoluteTimeout: {timeout}, "
        "cookieConfig: {lifetimeType: Permanent}}"
    )
    table = load(tmp_path, route_with(session))
    assert _session(table) == SessionPersistence("cookie", "sid", "", max_age)


# (case, sessionPersistence's lines, expected warning part, its line, the session)
WARNINGS = [
    (
        "absoluteTimeout with a session cookie",
        "{sessionName: sid, absoluteTimeout: 1h}",
        "absoluteTimeout does nothing with a session cookie",
        SessionPersistence("cookie", "sid", ""),
    ),
    (
        "absoluteTimeout with cookieConfig Session",
        "{sessionName: sid, absoluteTimeout: 1h, cookieConfig: {lifetimeType: Session}}",
        "absoluteTimeout does nothing with a session cookie",
        SessionPersistence("cookie", "sid", ""),
    ),
    (
        "absoluteTimeout with a header",
        "{type: Header, sessionName: x-s, absoluteTimeout: 10s}",
        "absoluteTimeout does nothing with type Header",
        SessionPersistence("header", "x-s", ""),
    ),
    (
        "cookieConfig with a header",
        "{type: Header, sessionName: x-s, cookieConfig: {lifetimeType: Session}}",
        "cookieConfig does nothing with type Header",
        SessionPersistence("header", "x-s", ""),
    ),
    (
        "a header token named Set-Cookie",
        "{type: Header, sessionName: Set-Cookie}",
        "an answer that gives a token loses every cookie the pod set",
        SessionPersistence("header", "set-cookie", ""),
    ),
    (
        "a permanent cookie under a second",
        "{sessionName: sid, absoluteTimeout: 500ms, cookieConfig: {lifetimeType: Permanent}}",
        "is under a second",
        SessionPersistence("cookie", "sid", ""),
    ),
]


@pytest.mark.parametrize(
    ("session", "message", "want"), [c[1:] for c in WARNINGS], ids=[c[0] for c in WARNINGS]
)
def test_what_envoy_gateway_ignores_is_a_warning(
    tmp_path: Path, session: str, message: str, want: SessionPersistence
) -> None:
    result = load_rules([write(tmp_path, route_with(session)), PER_VERSION])
    (warning,) = [d for d in result.notes if message in d.message]
    assert (warning.severity, warning.line) == ("warning", 13), warning
    assert _session(result.table) == want


EG_EXAMPLES = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners:
  - {name: http, protocol: HTTP, port: 80}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: backend}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{number: 3000, name: http, protocol: HTTP}]
  endpoints:
  - {address: 198.18.1.1}
  - {address: 198.18.1.2}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: cookie
spec:
  parentRefs:
    - name: eg
  hostnames: [cookie.example.com]
  rules:
    - matches:
        - path:
            type: PathPrefix
            value: /
      backendRefs:
        - name: backend
          port: 3000
      sessionPersistence:
        sessionName: Session-A
        type: Cookie
        absoluteTimeout: 10s
        cookieConfig:
          lifetimeType: Permanent
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: header
spec:
  parentRefs:
    - name: eg
  hostnames: [header.example.com]
  rules:
    - matches:
        - path:
            type: PathPrefix
            value: /
      backendRefs:
        - name: backend
          port: 3000
      sessionPersistence:
        sessionName: Session-A
        type: Header
        absoluteTimeout: 10s
"""


def test_validate_accepts_envoy_gateway_s_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The two routes of Envoy Gateway's session persistence task (each
    given a hostname of its own here): valid, the header's absoluteTimeout
    a warning, and -v says what each route does."""
    code = main(["validate", "--verbose", write(tmp_path, EG_EXAMPLES)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "session persistence: cookie Session-A names the endpoint (Path=/; Max-Age=10)" in out
    assert "session persistence: header session-a names the endpoint" in out
    assert "absoluteTimeout does nothing with type Header" in err


# -- the cookie's Path -------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "path"),
    [
        (Match(), "/"),
        (Match(uri=StringMatch("exact", "/cart/checkout")), "/cart/checkout"),
        (Match(uri=StringMatch("path_prefix", "/cart")), "/cart"),
        (Match(uri=StringMatch("regex", "/p1/p2/.*/p3")), "/p1/p2"),
        (Match(uri=StringMatch("regex", "/api/v[0-9]+/users")), "/api"),
        (Match(uri=StringMatch("regex", "/a|/b")), "/"),
        (Match(uri=StringMatch("regex", ".*")), "/"),
        (Match(uri=StringMatch("exact", "/a;b/c")), "/"),
        (Match(uri=StringMatch("path_prefix", "/shop/caf\u00e9")), "/shop"),
    ],
)
def test_the_cookie_s_path_is_the_matched_path_s(match: Match, path: str) -> None:
    assert session_cookie_path(match) == path


def test_each_match_of_a_rule_gives_its_own_path(tmp_path: Path) -> None:
    text = (
        ROUTE.replace(
            "  - backendRefs:",
            "  - matches:\n    - path: {type: PathPrefix, value: /cart/}\n"
            "    - path: {type: Exact, value: /login}\n    - headers: [{name: x-a, value: b}]\n"
            "    backendRefs:",
        )
        + "      sessionName: sid\n"
    )
    table = load(tmp_path, text)
    svc = table.service(HOST)
    assert svc is not None
    paths = []
    for target, headers in [("/cart/x?y", {}), ("/login", {}), ("/other", {"x-a": "b"})]:
        request = Request(method="GET", path=target, authority="bootcamp", headers=headers)
        session = table.choices(svc, 8080, request).session
        assert session is not None
        paths.append(session.path)
    assert paths == ["/cart", "/login", "/"]


# -- decide() and choices(): the pure core ---------------------------------------


def _request(cookie: str | None = None) -> Request:
    fields = [("cookie", cookie)] if cookie is not None else []
    return Request(method="GET", path="/", authority="bootcamp", headers=request_headers(fields))


def _token(address: str) -> str:
    return session_token((address, 8080))


def test_decide_sends_a_token_to_its_endpoint_against_the_weights(tmp_path: Path) -> None:
    """90/10: v2's one pod's token takes every request to it, first of its
    destination's (no other), with the session for the relay; without a
    token the draw (about 10% v2); a token the table has no endpoint for
    is no token."""
    table = load(tmp_path, route_with("{sessionName: sid}"))
    svc = table.service(HOST)
    assert svc is not None
    for _ in range(50):
        d = table.decide(svc, 8080, _request(f'theme=dark; sid="{_token(V2[0])}"'))
        assert [e.address for e in d.endpoints] == list(V2)
        assert d.session == SessionPersistence("cookie", "sid", "/")
    for address in V1:
        for _ in range(10):
            d = table.decide(svc, 8080, _request(f"sid={_token(address)}"))
            assert d.endpoints[0].address == address
            assert {e.address for e in d.endpoints} == set(V1)
    drawn = Counter(table.decide(svc, 8080, _request()).endpoints[0].address for _ in range(1000))
    assert 60 <= drawn[V2[0]] <= 140  # 100 ± 4 sd
    forged = Counter(
        table.decide(svc, 8080, _request(f"sid={_token('198.18.9.9')}")).endpoints[0].address
        for _ in range(1000)
    )
    assert set(forged) == {*V1, *V2} and forged[V2[0]] <= 140


def test_an_ejected_endpoint_s_token_is_no_token(tmp_path: Path) -> None:
    """The endpoint the token names is not healthy (outlier detection
    ejected it): the request is routed as one without a token, in decide()
    and in the choices the compiled relay's verdict is made of."""
    table = load(tmp_path, route_with("{sessionName: sid}"))
    svc = table.service(HOST)
    assert svc is not None

    def healthy(e: object) -> bool:
        return getattr(e, "address", "") != V1[0]

    request = _request(f"sid={_token(V1[0])}")
    seen = {
        table.decide(svc, 8080, request, healthy=healthy).endpoints[0].address for _ in range(200)
    }
    assert seen == {V1[1], V2[0]}
    rc = table.choices(svc, 8080, request, healthy=healthy)
    assert [[e.address for e in ws.endpoints] for ws in rc.subsets] == [[V1[1]], list(V2)]
    assert rc.session == SessionPersistence("cookie", "sid", "/")


def test_a_header_token_on_two_lines_is_no_token(tmp_path: Path) -> None:
    table = load(tmp_path, route_with("{type: Header, sessionName: X-S}"))
    svc = table.service(HOST)
    assert svc is not None
    one = Request(headers=request_headers([("x-s", _token(V2[0]))]))
    two = Request(headers=request_headers([("x-s", _token(V2[0])), ("x-s", _token(V2[0]))]))
    assert {table.decide(svc, 8080, one).endpoints[0].address for _ in range(30)} == set(V2)
    assert len({table.decide(svc, 8080, two).endpoints[0].address for _ in range(100)}) > 1


def test_a_rollback_to_weight_0_unpins_its_pods(tmp_path: Path) -> None:
    """v2's backendRef at weight 0 is no destination of the rule: its pod's
    token pins no more, every request goes to v1."""
    table = load(tmp_path, route_with("{sessionName: sid}").replace("weight: 10", "weight: 0"))
    svc = table.service(HOST)
    assert svc is not None
    request = _request(f"sid={_token(V2[0])}")
    assert {table.decide(svc, 8080, request).endpoints[0].address for _ in range(100)} == set(V1)
