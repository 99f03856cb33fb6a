"""Request mirroring in the rules: a VirtualService's ``http[].mirror``
(``mirrorPercentage``, the deprecated ``mirrorPercent``) and
``http[].mirrors``, a RouteRule's ``mirror``, an HTTPRoute's
``RequestMirror`` filters.

Loaded from real YAML (Istio's mirroring task, the VirtualService
reference's ``mirrors``, the Gateway API's request mirroring guide and its
percentage conformance test, on the bootcamp registry), then read back
through ``RouteTable.choices()`` and ``decide()``: the matched route's
:class:`~l4proxy.dataplane.verdict.Mirror`\\ s, each destination resolved to
its endpoints as a route destination's, its share in parts per million
(Istio's percent as pilot converts it, ``uint32(value * 10000)``), and none
on a route's own answer or a raw connection. Every refusal and warning names
its file and line; ``validate -v`` and ``/config_dump`` say the mirrors; the
worker puts them on its Verdicts and Decisions, and per connection warns
that nothing is mirrored.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.peek import parse_head
from l4proxy.dataplane.verdict import MIRROR_SCALE, Mirror
from l4proxy.rules import load_rules
from l4proxy.rules.classify import Origin
from l4proxy.rules.routing import MirrorTag, Request, RouteTable
from tests._worker import GATEWAY_HOST as SVC
from tests._worker import (
    _worker_twin,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
    per_connection_warnings,
)
from tests.test_config_errors import REGISTRY
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

HOST = "bootcamp.default.svc.cluster.local"
V1 = (("198.18.0.11", 8080), ("198.18.0.12", 8080))
V2 = (("198.18.0.13", 8080),)
ALL = (*V1, *V2)
ROUTE = "  - route:\n    - destination: {host: bootcamp, subset: v1}\n"


def request(path: str = "/") -> Request:
    return Request(path=path, authority="bootcamp:8080")


def mirrors_of(table: RouteTable, path: str = "/") -> tuple[tuple[tuple[str, int], ...], ...]:
    """(endpoints, ppm) of each mirror, by choices(); decide() must agree."""
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, request(path))
    d = table.decide(svc, 8080, request(path))
    assert d.mirrors == rc.mirrors
    return tuple((m.endpoints, m.ppm) for m in rc.mirrors)  # type: ignore[misc]


def warnings_of(tmp_path: Path, text: str, registry: str = REGISTRY) -> list[tuple[int, str]]:
    loaded = load_rules([write(tmp_path, text), registry], seed=1)
    return [(d.line, d.message) for d in loaded.notes if d.severity == "warning"]


# -- Istio ------------------------------------------------------------------------

# Istio's mirroring task (virtual-service-mirror.yaml: httpbin v1 gets every
# request, a copy of each goes to v2), on bootcamp
TASK = """\
  - route:
    - destination:
        host: bootcamp
        subset: v1
      weight: 100
    mirror:
      host: bootcamp
      subset: v2
    mirrorPercentage:
      value: 100.0
"""


def test_istio_mirroring_task(tmp_path: Path) -> None:
    table = istio(tmp_path, TASK)
    assert mirrors_of(table) == ((V2, MIRROR_SCALE),)
    svc = table.service(HOST)
    assert svc is not None
    (m,) = table.choices(svc, 8080, request()).mirrors
    assert m.balance_key is not None  # (its own round-robin counter)
    assert m.balance_key not in {ws.key for ws in table.choices(svc, 8080, request()).subsets}
    # the copies' reports carry the mirror's service and version (Istio's
    # labels), a tag of its own kind: never equal to a route choice's
    rc = table.choices(svc, 8080, request())
    assert m.tag == MirrorTag(HOST, rc.route, "v2", "v2", "bootcamp-v2")
    assert table.decide(svc, 8080, request()).mirrors[0].tag == m.tag
    assert m.tag != (HOST, rc.route, "v2", "v2", "bootcamp-v2")


@pytest.mark.parametrize(
    ("share", "ppm"),
    [
        ("", MIRROR_SCALE),  # (no percentage: every request, Istio's default)
        ("    mirrorPercentage: {value: 50}\n", 500_000),
        ("    mirrorPercentage: {value: 0.5}\n", 5_000),
        ("    mirrorPercentage: {value: 0.0001}\n", 1),
        ("    mirrorPercentage: {value: 33.3333}\n", 333_333),
    ],
)
def test_mirror_percentage(tmp_path: Path, share: str, ppm: int) -> None:
    table = istio(tmp_path, ROUTE + "    mirror: {host: bootcamp, subset: v2}\n" + share)
    assert mirrors_of(table) == ((V2, ppm),)


def test_deprecated_mirror_percent_is_read_with_a_warning(tmp_path: Path) -> None:
    http = ROUTE + "    mirror: {host: bootcamp, subset: v2}\n    mirrorPercent: 25\n"
    assert mirrors_of(istio(tmp_path, http)) == ((V2, 250_000),)
    text = DR + VS + http
    ((line, message),) = warnings_of(tmp_path, text)
    assert line == _line(text, "mirrorPercent:") and "deprecated" in message
    # mirrorPercentage wins (Istio reads it first)
    http += "    mirrorPercentage: {value: 10}\n"
    assert mirrors_of(istio(tmp_path, http)) == ((V2, 100_000),)
    ((_, message),) = warnings_of(tmp_path, DR + VS + http)
    assert "ignored" in message


# The VirtualService reference's mirrors example, on bootcamp: two mirrors,
# each with its own share; one without a subset (every endpoint)
MIRRORS = """\
  - route:
    - destination: {host: bootcamp, subset: v1}
      weight: 100
    mirrors:
    - destination:
        host: bootcamp
        subset: v2
      percentage:
        value: 50
    - destination:
        host: bootcamp
        port: {number: 8080}
"""


def test_mirrors_list(tmp_path: Path) -> None:
    assert mirrors_of(istio(tmp_path, MIRRORS)) == ((V2, 500_000), (ALL, MIRROR_SCALE))


def test_only_the_matched_route_mirrors(tmp_path: Path) -> None:
    http = (
        "  - match: [{uri: {prefix: /shadowed}}]\n"
        "    route:\n    - destination: {host: bootcamp, subset: v1}\n"
        "    mirror: {host: bootcamp, subset: v2}\n" + ROUTE
    )
    table = istio(tmp_path, http)
    assert mirrors_of(table, "/shadowed/x") == ((V2, MIRROR_SCALE),)
    assert mirrors_of(table, "/other") == ()


def test_no_mirror_on_a_local_answer_nor_a_raw_connection(tmp_path: Path) -> None:
    table = istio(tmp_path, TASK)
    svc = table.service(HOST)
    assert svc is not None
    assert table.decide(svc, 8080, None).mirrors == ()  # (nothing is copied at L4)
    # a VirtualService's host with no route for the request (404): none
    http = (
        "  - match: [{uri: {prefix: /only}}]\n"
        "    route:\n    - destination: {host: bootcamp, subset: v1}\n"
        "    mirror: {host: bootcamp, subset: v2}\n"
    )
    table = istio(tmp_path, http)
    svc = table.service(HOST)
    assert svc is not None
    assert mirrors_of(table, "/only") == ((V2, MIRROR_SCALE),)
    d = table.decide(svc, 8080, request("/elsewhere"))
    assert d.status == 404 and d.mirrors == ()
    assert table.choices(svc, 8080, request("/elsewhere")).mirrors == ()


def test_a_redirect_or_direct_response_mirrors_nothing_with_a_warning(tmp_path: Path) -> None:
    for action in (
        "  - redirect: {uri: /v2}\n",
        "  - directResponse: {status: 503}\n",
    ):
        http = action + "    mirror: {host: bootcamp, subset: v2}\n"
        table = istio(tmp_path, http)
        svc = table.service(HOST)
        assert svc is not None
        assert table.decide(svc, 8080, request()).answer is not None
        assert table.decide(svc, 8080, request()).mirrors == ()
        assert table.choices(svc, 8080, request()).mirrors == ()
        assert table.routes_for(HOST)[0].mirrors == ()
        text = DR + VS + http
        ((line, message),) = warnings_of(tmp_path, text)
        assert line == _line(text, "mirror:") and "does nothing" in message, message


def test_a_share_of_zero_mirrors_nothing_with_a_warning(tmp_path: Path) -> None:
    http = ROUTE + "    mirror: {host: bootcamp, subset: v2}\n    mirrorPercentage: {value: 0}\n"
    table = istio(tmp_path, http)
    assert table.routes_for(HOST)[0].mirrors == ()
    text = DR + VS + http
    ((line, message),) = warnings_of(tmp_path, text)
    assert line == _line(text, "mirrorPercentage") and "0%" in message


def test_mirror_percentage_without_mirror_is_a_warning(tmp_path: Path) -> None:
    text = DR + VS + ROUTE + "    mirrorPercentage: {value: 20}\n"
    ((line, message),) = warnings_of(tmp_path, text)
    assert line == _line(text, "mirrorPercentage") and "without mirror" in message


ISTIO_ERRORS = [
    (
        "both mirror and mirrors",
        ROUTE
        + "    mirror: {host: bootcamp, subset: v2}\n"
        + "    mirrors:\n    - destination: {host: bootcamp}\n",
        "mirrors:",
        "cannot contain both mirror and mirrors",
    ),
    (
        "mirrorPercentage above 100",
        ROUTE + "    mirror: {host: bootcamp}\n    mirrorPercentage:\n      value: 100.5\n",
        "value: 100.5",
        "mirror percentage 100.5 is not in range 0..100",
    ),
    (
        "mirrorPercentage negative",
        ROUTE + "    mirror: {host: bootcamp}\n    mirrorPercentage:\n      value: -1\n",
        "value: -1",
        "mirror percentage -1 is not in range 0..100",
    ),
    (
        "mirrorPercentage a bare number",
        ROUTE + "    mirror: {host: bootcamp}\n    mirrorPercentage: 50\n",
        "mirrorPercentage",
        "must be a mapping like {value: 50}",
    ),
    (
        "mirrorPercent above 100",
        ROUTE + "    mirror: {host: bootcamp}\n    mirrorPercent: 101\n",
        "mirrorPercent:",
        "mirrorPercent 101 is not in range 0..100",
    ),
    (
        "mirrors percentage above 100",
        ROUTE
        + "    mirrors:\n    - destination: {host: bootcamp}\n      percentage: {value: 150}\n",
        "percentage:",
        "mirror percentage 150 is not in range 0..100",
    ),
    (
        "mirrors entry without destination",
        ROUTE + "    mirrors:\n    - percentage: {value: 10}\n",
        "- percentage",
        "destination",
    ),
    (
        "mirror to an unknown subset",
        ROUTE + "    mirror:\n      host: bootcamp\n      subset: v3\n",
        "mirror:",
        "subset v3 is not defined by DestinationRule bootcamp",
    ),
    (
        "mirror to a port the host has not",
        ROUTE + "    mirror:\n      host: bootcamp\n      port: {number: 9090}\n",
        "mirror:",
        "port 9090 is not a port of bootcamp.default.svc.cluster.local",
    ),
    (
        "mirror host with a port",
        ROUTE + "    mirror:\n      host: bootcamp:8080\n",
        "host: bootcamp:8080",
        "must be a DNS name",
    ),
    (
        "mirror with an unknown field",
        ROUTE + "    mirror:\n      host: bootcamp\n      weight: 5\n",
        "weight: 5",
        "weight",
    ),
]


@pytest.mark.parametrize(
    ("http", "marker", "message"), [c[1:] for c in ISTIO_ERRORS], ids=[c[0] for c in ISTIO_ERRORS]
)
def test_istio_errors_name_file_and_line(
    tmp_path: Path, http: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, DR + VS + http, marker, message)


def test_mirror_to_a_host_without_service_entry_warns_and_drops_its_copies(
    tmp_path: Path,
) -> None:
    text = DR + VS + ROUTE + "    mirror: {host: shadow.example.com}\n"
    warnings = warnings_of(tmp_path, text)
    assert any(
        line == _line(text, "mirror:")
        and "shadow.example.com has no ServiceEntry in these files; nothing is mirrored to it "
        "until one is loaded (the route applies now)"
        in m
        for line, m in warnings
    ), warnings
    table = istio(tmp_path, ROUTE + "    mirror: {host: shadow.example.com}\n")
    assert mirrors_of(table) == (((), MIRROR_SCALE),)  # (the relay counts them dropped)


# -- RouteRule (config.istio.io/v1alpha2) -------------------------------------------

# Istio 0.7's mirroring task: every request to httpbin v1, a copy to v2
ROUTE_RULE = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: mirror-traffic-to-v2}
spec:
  destination: {name: bootcamp}
  precedence: 11
  route:
  - labels: {version: v1}
    weight: 100
  - labels: {version: v2}
    weight: 0
  mirror:
    name: bootcamp
    labels: {version: v2}
"""


def test_route_rule_mirror(tmp_path: Path) -> None:
    table = load_rules([write(tmp_path, ROUTE_RULE), REGISTRY], seed=1).table
    assert mirrors_of(table) == ((V2, MIRROR_SCALE),)


def test_route_rule_mirror_labels_that_select_nothing(tmp_path: Path) -> None:
    text = ROUTE_RULE.replace("    labels: {version: v2}\n", "    labels: {version: v9}\n")
    assert_error_at(tmp_path, text, "  mirror:", "route labels version=v9 select no endpoint")


# -- Gateway API ------------------------------------------------------------------

# The Gateway API's request mirroring guide and its percentage conformance
# test (HTTPRouteRequestPercentageMirror), on bootcamp's versions
GATEWAY = """\
  - matches:
    - path: {type: PathPrefix, value: /percent-mirror}
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: bootcamp-v2, port: 8080}
        percent: 20
    backendRefs:
    - {name: bootcamp-v1, port: 8080}
  - matches:
    - path: {type: PathPrefix, value: /percent-mirror-fraction}
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: bootcamp-v2, port: 8080}
        fraction: {numerator: 1, denominator: 3}
    backendRefs:
    - {name: bootcamp-v1, port: 8080}
  - matches:
    - path: {type: PathPrefix, value: /two-mirrors}
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: bootcamp-v2, port: 8080}
        fraction: {numerator: 5}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: bootcamp, port: 8080}
    backendRefs:
    - {name: bootcamp-v1, port: 8080}
"""


def test_gateway_api_request_mirror(tmp_path: Path) -> None:
    table = gateway(tmp_path, GATEWAY)
    assert mirrors_of(table, "/percent-mirror") == ((V2, 200_000),)
    assert mirrors_of(table, "/percent-mirror-fraction") == ((V2, 333_333),)
    # (fraction's denominator 100 by default; several filters, each its own)
    assert mirrors_of(table, "/two-mirrors") == ((V2, 50_000), (ALL, MIRROR_SCALE))
    assert mirrors_of(table, "/elsewhere") == ()


def test_gateway_api_mirror_with_a_redirect_warns_and_mirrors_nothing(tmp_path: Path) -> None:
    rules = (
        "  - filters:\n"
        "    - type: RequestRedirect\n      requestRedirect: {hostname: example.com}\n"
        "    - type: RequestMirror\n"
        "      requestMirror: {backendRef: {name: bootcamp-v2, port: 8080}}\n"
    )
    table = gateway(tmp_path, rules)
    assert table.routes_for(HOST)[0].mirrors == ()
    text = HR + rules
    ((line, message),) = warnings_of(tmp_path, text, PER_VERSION)
    assert line == _line(text, "type: RequestRedirect") and "do nothing" in message


def test_gateway_api_unresolved_mirror_backend_warns(tmp_path: Path) -> None:
    rules = (
        "  - filters:\n    - type: RequestMirror\n"
        "      requestMirror: {backendRef: {name: nowhere, port: 8080}}\n"
        "    backendRefs:\n    - {name: bootcamp-v1, port: 8080}\n"
    )
    table = gateway(tmp_path, rules)
    assert mirrors_of(table) == (((), MIRROR_SCALE),)
    text = HR + rules
    ((line, message),) = warnings_of(tmp_path, text, PER_VERSION)
    assert line == _line(text, "requestMirror:") and "nothing is mirrored" in message


MIRROR = "  - filters:\n    - type: RequestMirror\n      requestMirror:\n"
BACKENDS = "    backendRefs:\n    - {name: bootcamp-v1, port: 8080}\n"
GATEWAY_ERRORS = [
    (
        "percent and fraction",
        MIRROR
        + "        backendRef: {name: bootcamp-v2, port: 8080}\n"
        + "        percent: 10\n        fraction: {numerator: 1}\n"
        + BACKENDS,
        "fraction:",
        "only one of percent or fraction",
    ),
    (
        "percent above 100",
        MIRROR
        + "        backendRef: {name: bootcamp-v2, port: 8080}\n        percent: 101\n"
        + BACKENDS,
        "percent: 101",
        "percent 101 is not in range 0..100",
    ),
    (
        "numerator above denominator",
        MIRROR
        + "        backendRef: {name: bootcamp-v2, port: 8080}\n"
        + "        fraction:\n          numerator: 3\n          denominator: 2\n"
        + BACKENDS,
        "numerator: 3",
        "numerator 3 must be less than or equal to denominator 2",
    ),
    (
        "denominator 0",
        MIRROR
        + "        backendRef: {name: bootcamp-v2, port: 8080}\n"
        + "        fraction:\n          numerator: 0\n          denominator: 0\n"
        + BACKENDS,
        "denominator: 0",
        "denominator",
    ),
    (
        "backendRef without port",
        MIRROR + "        backendRef:\n          name: bootcamp-v2\n" + BACKENDS,
        "backendRef:",
        "port is required for a Service backend",
    ),
    (
        "backendRef with a weight",
        MIRROR
        + "        backendRef:\n          name: bootcamp-v2\n          port: 8080\n"
        + "          weight: 1\n"
        + BACKENDS,
        "weight: 1",
        "weight",
    ),
    (
        "no backendRef",
        MIRROR + "        percent: 10\n" + BACKENDS,
        "requestMirror:",
        "backendRef",
    ),
    (
        "backendRef port not of the Service",
        MIRROR + "        backendRef: {name: bootcamp-v2, port: 9090}\n" + BACKENDS,
        "backendRef:",
        "port 9090 is not a port of bootcamp-v2",
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


# -- what the table says of them ---------------------------------------------------


def test_config_dump_and_validate_v_say_the_mirrors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = istio(tmp_path, MIRRORS)
    (route,) = json.loads(json.dumps(table.to_json()))["routes"][HOST]
    assert route["mirrors"] == [
        {"host": HOST, "subset": "v2", "labels": {"version": "v2"}, "port": None, "percent": 50.0},
        {"host": HOST, "subset": "default", "labels": {}, "port": 8080, "percent": 100.0},
    ]
    assert main(["validate", "-v", write(tmp_path, DR + VS + MIRRORS), REGISTRY]) == 0
    out = capsys.readouterr().out
    assert f"mirrors 50% of the requests to {HOST} subset v2 (version=v2;" in out
    assert f"mirrors every request to {HOST} port 8080 subset default (all endpoints;" in out


def test_mirrored_routes(tmp_path: Path) -> None:
    http = (
        "  - name: shadowed\n    match: [{uri: {prefix: /s}}]\n"
        "    route:\n    - destination: {host: bootcamp, subset: v1}\n"
        "    mirror: {host: bootcamp, subset: v2}\n" + ROUTE
    )
    assert istio(tmp_path, http).mirrored_routes() == [(HOST, "bootcamp/shadowed")]


# -- the worker --------------------------------------------------------------------

WORKER_RULES = gateway_subsets("v1", "v2") + gateway_routes(
    f"""\
  - name: shadowed
    match: [{{uri: {{prefix: /shadowed}}}}]
    route:
    - destination: {{host: {SVC}, subset: v1}}
    mirror: {{host: {SVC}, subset: v2}}
    mirrorPercentage: {{value: 25}}
  - name: answered
    match: [{{uri: {{prefix: /answered}}}}]
    directResponse: {{status: 204}}
  - name: plain
    route:
    - destination: {{host: {SVC}, subset: v1}}
"""
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_worker_verdicts_and_decisions_carry_the_mirrors(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(1111, 2222, labels=("v1", "v2")) + WORKER_RULES)
    got: dict[str, tuple[tuple[Mirror, ...], tuple[Mirror, ...]]] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            origin = Origin(None, address[1], True)
            for path in ("/shadowed/a", "/answered", "/plain"):
                head = parse_head(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
                assert head is not None
                verdict = worker._resolve_request(head, origin)
                decision = worker._decide_request(head, origin)
                got[path] = (verdict.mirrors, decision.mirrors)

    asyncio.run(main())
    (mv,), (md,) = got["/shadowed/a"]
    assert mv == md
    assert mv.endpoints == (("127.0.0.1", 2222),) and mv.ppm == 250_000
    assert got["/answered"] == ((), ())  # (a direct response: no copy)
    assert got["/plain"] == ((), ())


def test_per_connection_mirroring_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(1111, 2222, labels=("v1", "v2")) + WORKER_RULES)
    warnings = per_connection_warnings(rules, caplog)
    assert any(
        "request mirroring" in w and "--http-routing connection" in w and f"{SVC} svc/shadowed" in w
        for w in warnings
    ), warnings


def test_stats_gauges_say_the_relays_mirror_counters() -> None:
    from types import SimpleNamespace

    from l4proxy.sidecar.admin import WorkerView

    counted = {
        "mirrored": 7,
        "mirror_dropped": 2,
        "mirror_failed": 1,
        "mirror_active": 3,
        "mirror_connects": 4,
        "mirror_idle": 2,
    }
    state = SimpleNamespace(
        generation=1, digest=0, reloads=0, reload_failures=0, last_error=None, warnings=0
    )
    worker = SimpleNamespace(
        pump=SimpleNamespace(stats=dict),
        rules=SimpleNamespace(state=state),
        relay=SimpleNamespace(stats=lambda: counted),
        handshakes=set(),
        in_transit=lambda: 0,
    )
    gauges = WorkerView(worker, "pure").gauges()  # type: ignore[arg-type]
    assert {k: v for k, v in gauges.items() if "mirror" in k} == {
        "l4proxy_http_mirrored_total": 7,
        "l4proxy_http_mirror_dropped_total": 2,
        "l4proxy_http_mirror_failed_total": 1,
        "l4proxy_http_mirror_active": 3,
        "l4proxy_http_mirror_connects_total": 4,
        "l4proxy_http_mirror_idle": 2,
    }
    worker.relay = SimpleNamespace(stats=dict)  # (a relay that counts none yet: 0)
    assert WorkerView(worker, "pure").gauges()["l4proxy_http_mirrored_total"] == 0
