"""Fault injection in the rules: a VirtualService's ``http[].fault`` and a
RouteRule's ``httpFault``.

Loaded from real YAML (Istio's fault-injection task and the VirtualService
reference's examples, on the bootcamp registry), then read back through
``RouteTable.choices()`` and ``decide()``: the matched route's
:class:`~l4proxy.dataplane.verdict.Fault` (a fixed delay and an abort, each
with its share in parts per million, as pilot converts Istio's percentage to
Envoy's FractionalPercent: ``uint32(value * 10000)`` of a MILLION), never
another route's. Every refusal names its file and line; ``validate -v``
prints the fault under its route.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import FAULT_SCALE, Fault
from l4proxy.rules import load_rules
from l4proxy.rules.routing import Request, RouteTable
from tests.test_config_errors import REGISTRY
from tests.test_rules_head_edits import DR, VS, _line, assert_error_at, istio, write

HOST = "bootcamp.default.svc.cluster.local"
RR = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: bootcamp-fault}
spec:
  destination: {name: bootcamp}
"""
ROUTE = "    route:\n    - destination: {host: bootcamp, subset: v1}\n"
DEFAULT_ROUTE = "  - route:\n    - destination: {host: bootcamp, subset: v1}\n"


def fault_of(table: RouteTable, path: str = "/", **headers: str) -> tuple[str, Fault | None]:
    """(route name, fault) of choices() for a request to bootcamp."""
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, Request(path=path, authority="bootcamp:8080", headers=headers))
    return rc.route, rc.fault


def decided(table: RouteTable, path: str = "/", **headers: str) -> tuple[str, Fault | None]:
    svc = table.service(HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path=path, authority="bootcamp:8080", headers=headers))
    return d.route, d.fault


# -- Istio's examples ------------------------------------------------------------

# The fault-injection task's virtual-service-ratings-test-delay.yaml, on bootcamp
TASK_DELAY = """\
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: bootcamp
        subset: v2
  - route:
    - destination:
        host: bootcamp
        subset: v1
"""
# ... and virtual-service-ratings-test-abort.yaml
TASK_ABORT = TASK_DELAY.replace(
    "      delay:\n        percentage:\n          value: 100.0\n        fixedDelay: 7s\n",
    "      abort:\n        percentage:\n          value: 100.0\n        httpStatus: 500\n",
)


def test_the_task_s_delay_for_jason(tmp_path: Path) -> None:
    table = istio(tmp_path, TASK_DELAY)
    assert fault_of(table, **{"end-user": "jason"}) == ("bootcamp[0]", Fault(7.0, FAULT_SCALE))
    assert decided(table, **{"end-user": "jason"}) == ("bootcamp[0]", Fault(7.0, FAULT_SCALE))
    # anyone else takes the route without one
    assert fault_of(table, **{"end-user": "kim"}) == ("bootcamp[1]", None)
    assert decided(table) == ("bootcamp[1]", None)


def test_the_task_s_abort_for_jason(tmp_path: Path) -> None:
    table = istio(tmp_path, TASK_ABORT)
    assert fault_of(table, **{"end-user": "jason"}) == (
        "bootcamp[0]",
        Fault(0.0, 0, 500, FAULT_SCALE),
    )
    assert fault_of(table) == ("bootcamp[1]", None)


# The reference's HTTPFaultInjection.Delay and .Abort examples ("1 out of
# every 1000 requests"), and the same with 10 %
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("{delay: {percentage: {value: 0.1}, fixedDelay: 5s}}", Fault(5.0, 1000)),
        ("{abort: {percentage: {value: 0.1}, httpStatus: 400}}", Fault(0.0, 0, 400, 1000)),
        ("{delay: {percentage: {value: 10}, fixedDelay: 5s}}", Fault(5.0, 100_000)),
        ("{abort: {percentage: {value: 10.0}, httpStatus: 400}}", Fault(0.0, 0, 400, 100_000)),
        # both: independent shares (Istio: "Delay and abort faults are
        # independent of one another")
        (
            "{delay: {percentage: {value: 50}, fixedDelay: 250ms},"
            " abort: {percentage: {value: 25}, httpStatus: 503}}",
            Fault(0.25, 500_000, 503, 250_000),
        ),
    ],
)
def test_the_reference_s_examples(tmp_path: Path, fault: str, expected: Fault) -> None:
    table = istio(tmp_path, f"  - fault: {fault}\n" + ROUTE)
    assert fault_of(table) == ("bootcamp", expected)


@pytest.mark.parametrize(
    ("value", "ppm"),
    [
        (100, FAULT_SCALE),
        (0.0001, 1),  # Istio's smallest share above 0
        (0.00015, 1),  # (truncated, as Go's uint32(float))
        (0.57, 5699),  # 0.57 * 10000 is 5699.999...: pilot sends 5699
        (33.3333, 333_333),
    ],
)
def test_a_percentage_is_pilot_s_parts_per_million(tmp_path: Path, value: float, ppm: int) -> None:
    table = istio(
        tmp_path,
        f"  - fault: {{delay: {{percentage: {{value: {value}}}, fixedDelay: 1s}}}}\n" + ROUTE,
    )
    assert fault_of(table)[1] == Fault(1.0, ppm)


# -- percent and percentage, and what a missing one means ---------------------------


def test_the_deprecated_integer_percent(tmp_path: Path) -> None:
    table = istio(tmp_path, "  - fault: {delay: {percent: 50, fixedDelay: 2s}}\n" + ROUTE)
    assert fault_of(table)[1] == Fault(2.0, 500_000)


def test_percentage_wins_over_percent(tmp_path: Path) -> None:
    text = (
        DR
        + VS
        + "  - fault:\n      delay:\n        percent: 50\n"
        + ("        percentage: {value: 1}\n        fixedDelay: 2s\n" + ROUTE)
    )
    loaded = load_rules([write(tmp_path, text), REGISTRY], seed=1)
    assert fault_of(loaded.table)[1] == Fault(2.0, 10_000)
    (w,) = [d for d in loaded.notes if d.severity == "warning"]
    assert "delay.percent is ignored: percentage is given" in w.message
    assert w.line == _line(text, "percent: 50")


@pytest.mark.parametrize(
    ("fault", "marker"),
    [
        ("    fault:\n      delay:\n        fixedDelay: 7s\n", "      delay:"),
        ("    fault:\n      abort:\n        httpStatus: 500\n", "      abort:"),
    ],
    ids=["delay", "abort"],
)
def test_no_percentage_falls_on_no_request(tmp_path: Path, fault: str, marker: str) -> None:
    """As Istio behaves (istio/istio #36303, #39969: Envoy's unset share is
    0), not as its reference once said ("all requests"): a warning says so."""
    text = DR + VS + "  - match: [{uri: {prefix: /f}}]\n" + fault + ROUTE + DEFAULT_ROUTE
    loaded = load_rules([write(tmp_path, text), REGISTRY], seed=1)
    assert fault_of(loaded.table, "/f") == ("bootcamp[0]", None)
    assert loaded.table.faulted_routes() == []
    (w,) = [d for d in loaded.notes if d.severity == "warning"]
    assert "falls on no request: without a percentage Istio leaves Envoy's share at 0" in w.message
    assert w.line == _line(text, marker)


def test_a_share_of_0_written_out_is_quiet(tmp_path: Path) -> None:
    text = DR + VS + "  - fault: {abort: {httpStatus: 500, percentage: {value: 0}}}\n" + ROUTE
    loaded = load_rules([write(tmp_path, text), REGISTRY], seed=1)
    assert fault_of(loaded.table)[1] is None
    assert not [d for d in loaded.notes if d.severity == "warning"]


def test_a_zero_share_zeroes_its_part(tmp_path: Path) -> None:
    """One spelling per behaviour: an abort that never falls leaves no status."""
    table = istio(
        tmp_path,
        "  - fault:\n      delay: {percentage: {value: 100}, fixedDelay: 1s}\n"
        "      abort: {percentage: {value: 0}, httpStatus: 500}\n" + ROUTE,
    )
    assert fault_of(table)[1] == Fault(1.0, FAULT_SCALE, 0, 0)


# -- choices(), decide(): the matched route's only ------------------------------------

ROUTES = """\
  - match: [{uri: {prefix: /slow}}]
    fault: {delay: {percentage: {value: 100}, fixedDelay: 3s}}
    route:
    - destination: {host: bootcamp, subset: v1}
      weight: 50
    - destination: {host: bootcamp, subset: v2}
      weight: 50
  - match: [{uri: {prefix: /none}}]
    fault: {abort: {percentage: {value: 5}, httpStatus: 418}}
    route:
    - destination: {host: nowhere.example}
  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /new}
  - route:
    - destination: {host: bootcamp, subset: v1}
"""


def test_choices_and_decide_carry_the_matched_route_s_fault(tmp_path: Path) -> None:
    table = istio(tmp_path, ROUTES)
    slow = Fault(3.0, FAULT_SCALE)
    assert fault_of(table, "/slow") == ("bootcamp[0]", slow)
    # every decision of the route, whichever destination it draws
    assert {decided(table, "/slow") for _ in range(20)} == {("bootcamp[0]", slow)}
    # a destination without endpoints: the relay answers its 503 only when
    # no abort fell, so the fault goes with it
    svc = table.service(HOST)
    assert svc is not None
    rc = table.choices(svc, 8080, Request(path="/none", authority="bootcamp"))
    assert rc.fault == Fault(0.0, 0, 418, 50_000)
    assert rc.subsets[0].endpoints == () and rc.status == 503
    d = table.decide(svc, 8080, Request(path="/none", authority="bootcamp"))
    assert d.fault == Fault(0.0, 0, 418, 50_000) and d.endpoints == []
    # the other routes have none
    assert fault_of(table, "/moved") == ("bootcamp[2]", None)
    assert fault_of(table, "/other") == ("bootcamp[3]", None)
    assert decided(table, "/other") == ("bootcamp[3]", None)


def test_a_raw_connection_gets_no_fault(tmp_path: Path) -> None:
    """Nothing is injected at L4: decide() for a connection (no request)
    that a faulted route takes leaves the fault out."""
    table = istio(
        tmp_path, "  - fault: {delay: {percentage: {value: 100}, fixedDelay: 1s}}\n" + ROUTE
    )
    svc = table.service(HOST)
    assert svc is not None
    d = table.decide(svc, 8080, None)
    assert d.route == "bootcamp" and d.fault is None
    assert table.decide(svc, 8080, Request(authority="bootcamp")).fault == Fault(1.0, FAULT_SCALE)


def test_faulted_routes_and_the_json(tmp_path: Path) -> None:
    table = istio(tmp_path, ROUTES)
    assert table.faulted_routes() == [(HOST, "bootcamp[0]"), (HOST, "bootcamp[1]")]
    routes = json.loads(json.dumps(table.to_json()))["routes"][HOST]
    assert routes[0]["fault"] == {
        "delay": 3.0,
        "delay_ppm": 1_000_000,
        "abort_status": 0,
        "abort_ppm": 0,
    }
    assert routes[1]["fault"] == {
        "delay": 0.0,
        "delay_ppm": 0,
        "abort_status": 418,
        "abort_ppm": 50_000,
    }
    assert routes[2]["fault"] is None and routes[3]["fault"] is None


def test_a_fault_makes_tables_differ(tmp_path: Path) -> None:
    """Route equality (what a reload compares) sees the fault."""
    a = istio(tmp_path, "  - fault: {delay: {percentage: {value: 1}, fixedDelay: 1s}}\n" + ROUTE)
    b = istio(tmp_path, "  - fault: {delay: {percentage: {value: 2}, fixedDelay: 1s}}\n" + ROUTE)
    assert a.to_json() != b.to_json()
    assert a != b


def test_validate_v_shows_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, DR + VS + ROUTES)
    assert main(["validate", "-v", f, REGISTRY]) == 0
    out = capsys.readouterr().out
    assert "fault: delays every request by 3 s\n" in out
    assert "fault: aborts 5% of the requests with 418\n" in out
    f = write(
        tmp_path,
        DR
        + VS
        + "  - fault:\n      delay: {percentage: {value: 0.1}, fixedDelay: 250ms}\n"
        + "      abort: {percentage: {value: 10}, httpStatus: 503}\n"
        + ROUTE,
    )
    assert main(["validate", "-v", f, REGISTRY]) == 0
    out = capsys.readouterr().out
    assert (
        "fault: delays 0.1% of the requests by 0.25 s; aborts 10% of the requests with 503\n" in out
    )


# -- refusals ------------------------------------------------------------------------

ISTIO_ERRORS = [
    (
        "neither delay nor abort",
        "  - fault: {}\n" + ROUTE,
        "  - fault: {}",
        "spec.http[0].fault must have a delay, an abort or both (Istio's validation)",
    ),
    (
        "exponentialDelay",
        "  - fault:\n      delay:\n        exponentialDelay: 1s\n" + ROUTE,
        "exponentialDelay",
        "fault.delay.exponentialDelay is not implemented by l4proxy; remove it (the sidecar "
        "would not honour it); Envoy has no exponential delay",
    ),
    (
        "grpcStatus",
        "  - fault:\n      abort:\n        grpcStatus: UNAVAILABLE\n" + ROUTE,
        "grpcStatus",
        "fault.abort.grpcStatus is not implemented by l4proxy; remove it (the sidecar would "
        "not honour it); the relays speak HTTP/1.1, where there is no gRPC status to send",
    ),
    (
        "http2Error",
        "  - fault:\n      abort:\n        http2Error: REFUSED_STREAM\n" + ROUTE,
        "http2Error",
        "the relays speak HTTP/1.1, where there is no HTTP/2 stream to reset",
    ),
    (
        "the abort's removed percent",
        "  - fault:\n      abort:\n        httpStatus: 500\n        percent: 10\n" + ROUTE,
        "percent: 10",
        "Istio removed the abort's integer percent; use percentage: {value: N}",
    ),
    (
        "httpStatus above Envoy's range",
        "  - fault:\n      abort:\n        httpStatus: 600\n        percentage: {value: 1}\n"
        + ROUTE,
        "httpStatus: 600",
        "abort httpStatus 600 is not in range 200..599",
    ),
    (
        "httpStatus below",
        "  - fault:\n      abort:\n        httpStatus: 199\n" + ROUTE,
        "httpStatus: 199",
        "abort httpStatus 199 is not in range 200..599",
    ),
    (
        "no httpStatus",
        "  - fault:\n      abort:\n        percentage: {value: 1}\n" + ROUTE,
        "      abort:",
        "spec.http[0].fault.abort.httpStatus is required",
    ),
    (
        "no fixedDelay",
        "  - fault:\n      delay:\n        percentage: {value: 1}\n" + ROUTE,
        "      delay:",
        "spec.http[0].fault.delay.fixedDelay is required",
    ),
    (
        "fixedDelay 0s",
        "  - fault:\n      delay:\n        fixedDelay: 0s\n" + ROUTE,
        "fixedDelay: 0s",
        "fixedDelay '0s' must be whole milliseconds from 1ms",
    ),
    (
        "fixedDelay under 1ms",
        "  - fault:\n      delay:\n        fixedDelay: 500us\n" + ROUTE,
        "fixedDelay: 500us",
        "fixedDelay '500us' must be whole milliseconds from 1ms",
    ),
    (
        "percentage over 100",
        "  - fault:\n      delay:\n        fixedDelay: 1s\n        percentage:\n"
        "          value: 100.5\n" + ROUTE,
        "value: 100.5",
        "percentage 100.5 is neither 0, nor in range 0.0001..100 (Istio's)",
    ),
    (
        "percentage under Istio's smallest",
        "  - fault:\n      delay:\n        fixedDelay: 1s\n        percentage:\n"
        "          value: 0.00001\n" + ROUTE,
        "value: 0.00001",
        "percentage 1e-05 is neither 0, nor in range 0.0001..100",
    ),
    (
        "percentage a bare number",
        "  - fault:\n      abort:\n        httpStatus: 503\n        percentage: 50\n" + ROUTE,
        "percentage: 50",
        "spec.http[0].fault.abort.percentage must be a mapping like {value: 50}",
    ),
    (
        "percentage value a string",
        "  - fault:\n      abort:\n        httpStatus: 503\n        percentage: {value: '5'}\n"
        + ROUTE,
        "percentage: {value",
        "spec.http[0].fault.abort.percentage.value must be a number, not the string '5'",
    ),
    (
        "percent out of range",
        "  - fault:\n      delay:\n        fixedDelay: 1s\n        percent: 101\n" + ROUTE,
        "percent: 101",
        "spec.http[0].fault.delay.percent 101 is not in range 0..100",
    ),
    (
        "fault with redirect",
        "  - redirect: {uri: /n}\n    fault:\n      abort: {httpStatus: 500}\n",
        "    fault:",
        "rule cannot contain both fault and redirect",
    ),
    (
        "fault with directResponse",
        "  - directResponse: {status: 200}\n    fault:\n      abort: {httpStatus: 500}\n",
        "    fault:",
        "rule cannot contain both fault and directResponse",
    ),
    (
        "fault on a tcp route",
        "  - route:\n    - destination: {host: bootcamp, subset: v1}\n  tcp:\n"
        "  - fault: {abort: {httpStatus: 500}}\n"
        "    route:\n    - destination: {host: bootcamp, subset: v1}\n",
        "  - fault: {abort",
        "unknown field spec.tcp[0].fault",
    ),
]


@pytest.mark.parametrize(
    ("http", "marker", "message"), [c[1:] for c in ISTIO_ERRORS], ids=[c[0] for c in ISTIO_ERRORS]
)
def test_istio_errors_name_file_and_line(
    tmp_path: Path, http: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, DR + VS + http, marker, message)


# -- RouteRule httpFault (Istio 0.7) ----------------------------------------------------


def rule_table(tmp_path: Path, fault: str) -> RouteTable:
    return load_rules([write(tmp_path, RR + fault), REGISTRY], seed=1).table


def test_route_rule_http_fault(tmp_path: Path) -> None:
    """The Istio 0.7 task's RouteRule: delay 7s and abort, in whole percents."""
    table = rule_table(
        tmp_path,
        "  httpFault:\n    delay:\n      percent: 100\n      fixedDelay: 7s\n"
        "    abort:\n      percent: 10\n      httpStatus: 400\n",
    )
    assert fault_of(table) == ("bootcamp-fault", Fault(7.0, FAULT_SCALE, 400, 100_000))
    assert table.faulted_routes() == [(HOST, "bootcamp-fault")]


def test_route_rule_percent_is_whole_percents(tmp_path: Path) -> None:
    """Istio 0.7's pilot sent int(percent) to Envoy's v1 fault filter: 12.9 is 12."""
    text = RR + "  httpFault:\n    abort:\n      percent: 12.9\n      httpStatus: 503\n"
    loaded = load_rules([write(tmp_path, text), REGISTRY], seed=1)
    assert fault_of(loaded.table)[1] == Fault(0.0, 0, 503, 120_000)
    (w,) = [d for d in loaded.notes if d.severity == "warning"]
    assert "Istio 0.7 kept the whole percents" in w.message and "falls on 12%" in w.message
    assert w.line == _line(text, "percent: 12.9")


def test_route_rule_without_percent_has_no_fault(tmp_path: Path) -> None:
    text = RR + "  httpFault:\n    delay:\n      fixedDelay: 1s\n"
    loaded = load_rules([write(tmp_path, text), REGISTRY], seed=1)
    assert fault_of(loaded.table)[1] is None
    (w,) = [d for d in loaded.notes if d.severity == "warning"]
    assert "without a percent Istio 0.7 made no fault" in w.message
    assert w.line == _line(text, "    delay:")


RULE_ERRORS = [
    (
        "grpcStatus",
        "  httpFault:\n    abort:\n      percent: 10\n      grpcStatus: UNAVAILABLE\n",
        "grpcStatus",
        "spec.httpFault.abort.grpcStatus is not implemented by l4proxy",
    ),
    (
        "overrideHeaderName",
        "  httpFault:\n    delay:\n      fixedDelay: 1s\n      overrideHeaderName: x-d\n",
        "overrideHeaderName",
        "the fault comes from the rule, never from a request header",
    ),
    (
        "exponentialDelay",
        "  httpFault:\n    delay:\n      percent: 1\n      exponentialDelay: 1s\n",
        "exponentialDelay",
        "spec.httpFault.delay.exponentialDelay is not implemented by l4proxy",
    ),
    (
        "percent over 100",
        "  httpFault:\n    abort:\n      percent: 150\n      httpStatus: 503\n",
        "percent: 150",
        "spec.httpFault.abort.percent 150 is not in range 0..100",
    ),
    (
        "httpStatus",
        "  httpFault:\n    abort:\n      percent: 1\n      httpStatus: 700\n",
        "httpStatus: 700",
        "abort httpStatus 700 is not in range 200..599",
    ),
    (
        "neither",
        "  httpFault: {}\n",
        "  httpFault: {}",
        "spec.httpFault must have a delay, an abort or both",
    ),
]


@pytest.mark.parametrize(
    ("fault", "marker", "message"), [c[1:] for c in RULE_ERRORS], ids=[c[0] for c in RULE_ERRORS]
)
def test_route_rule_errors_name_file_and_line(
    tmp_path: Path, fault: str, marker: str, message: str
) -> None:
    assert_error_at(tmp_path, RR + fault, marker, message)
