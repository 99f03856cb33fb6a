"""The relay's own answers to a request routed to a choice with response
edits (a 503 when every connect failed, a circuit breaker's 503, the 504
of the route timeout, the 503 of an upstream that closed, the 503 or 500
of a choice with no endpoint) carry those edits, the CORS filter's lines
among them, as Envoy's router finalizes its local replies with the
route's header mutations; a fault's abort, a route's own answer and a
request with no route do not. Both twins, the compiled one deciding per
request and from a cached verdict, real sockets, byte for byte, and a
worker from a rule file. See ``HeadEdits`` in ``verdict.py``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import OVERFLOW_BODY, OVERFLOW_HEADERS, RESET_BEFORE_HEADERS
from l4proxy.dataplane._pool_py import EndpointSettings
from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import FAULT_ABORT_BODY, Choice, Fault, HeadEdits, Verdict
from l4proxy.rules.dns import Resolution
from l4proxy.rules.routing import CorsPolicy, Request, StringMatch, with_cors_lines
from tests._scripted import (
    CLOSE,
    MODES,
    STALL,
    Scripted,
    _client,
    _response,
    _status,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests._worker import _worker_twin, connected, gateway_service_of, gateway_worker
from tests.conftest import EPOCH_DATE, undated
from tests.conftest import epoch_response as local_response
from tests.test_dns import ScriptedResolver
from tests.test_relay_edges import _read_all, _relay
from tests.test_worker_cors import EDITED

Endpoint = tuple[str, int]

# a route's and its destination's, as the route table merges them: the
# answer's own content-type and server lines go, the sets and adds follow
EDITS = HeadEdits(
    response_set=(("server", "l4"), ("x-dest", "d")),
    response_add=(("x-route", "1"), ("x-route", "2")),
    response_remove=("content-type",),
)
ADDED = b"server: l4\r\nx-dest: d\r\nx-route: 1\r\nx-route: 2\r\n"
TIMEOUT_S = 0.2
NO_UPSTREAM = "no healthy upstream"


def _edited(answer: bytes) -> bytes:
    """*answer* (local_response()'s) as EDITS leave it: its content-type
    and server lines out, ADDED before its empty line."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"content-type:", b"server:"))
    ]
    return b"\r\n".join(lines) + b"\r\n" + ADDED + b"\r\n" + body


def _get(host: str = "a", method: str = "GET", close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"%s /x HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method.encode(), host.encode(), extra)


def _routed(
    mode: tuple[str, str],
    routes: dict[str, tuple[Endpoint, HeadEdits | None]],
    timeout: float = 0.0,
    fault: Fault | None = None,
) -> Any:
    """A relay of the twin and mode sending each Host of *routes* to its
    endpoint with its edits (and *timeout*, *fault*)."""
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            endpoint, edits = routes[head.host]
            choice = Choice(1, (endpoint,), "ORDERED", tag="t", edits=edits)
            return Verdict((choice,), ttl=60.0, timeout=timeout, fault=fault)

        kw["resolve"] = resolve

    def decide(head: Any, origin: Any) -> Decision:
        endpoint, edits = routes[head.host]
        return Decision((endpoint,), tag="t", timeout=timeout, edits=edits, fault=fault)

    return _relay(which, decide, **kw)


@contextmanager
def _refusing() -> Iterator[Endpoint]:
    """An endpoint that refuses connections: a socket bound, not listening
    (its port is ours until the test ends)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()
    finally:
        s.close()


def _ask(relay: Any, *requests: bytes) -> list[bytes]:
    """*requests* in turn on one client connection: each answer (undated)."""
    c = _client(relay)
    try:
        out = []
        for request in requests:
            c.sendall(request)
            out.append(undated(_response(c)))
        return out
    finally:
        c.close()


def _head_of(request_answer: bytes) -> bytes:
    return request_answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


def _connect_failed(
    mode: tuple[str, str], edits: HeadEdits | None, *requests: bytes
) -> list[bytes]:
    with _refusing() as dead:
        relay = _routed(mode, {"a": (dead, edits)})
        try:
            return _ask(relay, *requests)
        finally:
            relay.close()


def test_the_503_after_every_connect_failed_is_edited(mode: tuple[str, str]) -> None:
    """Each request on a kept connection gets the edited 503, the last one
    (Connection: close) the edited close variant."""
    got = _connect_failed(mode, EDITS, _get(), _get(), _get(close=True))
    keep = _edited(local_response(503, NO_UPSTREAM, close=False))
    assert got == [keep, keep, _edited(local_response(503, NO_UPSTREAM, close=True))]


def test_a_head_request_gets_the_edited_head_alone(mode: tuple[str, str]) -> None:
    """Read to the connection's end: the head, no body after it."""
    with _refusing() as dead:
        relay = _routed(mode, {"a": (dead, EDITS)})
        try:
            c = _client(relay)
            c.sendall(_get(method="HEAD", close=True))
            got = _read_all(c, 5.0)[0]
            c.close()
        finally:
            relay.close()
    assert undated(got) == _head_of(_edited(local_response(503, NO_UPSTREAM, close=True)))


def test_without_edits_the_503_is_as_before(mode: tuple[str, str]) -> None:
    got = _connect_failed(mode, None, _get(), _get(close=True))
    assert got == [
        local_response(503, NO_UPSTREAM, close=False),
        local_response(503, NO_UPSTREAM, close=True),
    ]


def test_edits_without_response_edits_leave_the_503_as_before(mode: tuple[str, str]) -> None:
    got = _connect_failed(mode, HeadEdits(request_set=(("x-req", "1"),)), _get())
    assert got == [local_response(503, NO_UPSTREAM, close=False)]


class Held:
    """A backend step that holds its request until ``open()``."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def step(self, conn: socket.socket) -> None:
        self.gate.wait(10)
        conn.sendall(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\nok")

    def open(self) -> None:
        self.gate.set()


def test_a_circuit_breaker_s_503_is_edited(mode: tuple[str, str]) -> None:
    """max_active 1: while A holds one request, the second one's overflow
    503 (its x-envoy-overloaded line kept) has the edits."""
    held = Held()
    a, s = Scripted([held.step]), Scripted([])
    relay = _routed(mode, {"a": (a.endpoint, EDITS), "s": (s.endpoint, None)})
    try:
        relay.endpoint_settings(
            {a.endpoint: EndpointSettings(0, 30.0, 5.0, False, 0, 0, 1)}  # max_active 1
        )
        assert _status(_ask(relay, _get("s"))[0]) == 200  # (the settings applied)
        first = _client(relay)
        first.sendall(_get())
        assert _until(lambda: len(a.requests) == 1), a.requests
        got = _ask(relay, _get())
        held.open()
        assert _status(_response(first)) == 200
        first.close()
    finally:
        held.open()
        relay.close()
        a.close()
        s.close()
    assert got == [_edited(local_response(503, OVERFLOW_BODY, False, OVERFLOW_HEADERS))]


def _timed_out(mode: tuple[str, str], edits: HeadEdits | None) -> bytes:
    up = Scripted([STALL])
    relay = _routed(mode, {"a": (up.endpoint, edits)}, timeout=TIMEOUT_S)
    try:
        (got,) = _ask(relay, _get())
    finally:
        relay.close()
        up.close()
    return got


def test_the_route_timeout_s_504_is_edited(mode: tuple[str, str]) -> None:
    got = _timed_out(mode, EDITS)
    assert got == _edited(local_response(504, "upstream request timeout", close=False))


def test_without_edits_the_504_is_as_before(mode: tuple[str, str]) -> None:
    got = _timed_out(mode, None)
    assert got == local_response(504, "upstream request timeout", close=False)


def test_the_503_of_an_upstream_that_closed_is_edited(mode: tuple[str, str]) -> None:
    up = Scripted([CLOSE])
    relay = _routed(mode, {"a": (up.endpoint, EDITS)})
    try:
        got = _ask(relay, _get())
    finally:
        relay.close()
        up.close()
    assert got == [_edited(local_response(503, RESET_BEFORE_HEADERS, close=False))]


def test_a_fault_s_abort_is_not_edited(mode: tuple[str, str]) -> None:
    """Envoy's fault filter answers before the router (and the CORS
    filter): the abort is as without edits; nothing goes upstream."""
    up = Scripted([])
    fault = Fault(abort_status=418, abort_ppm=1_000_000)
    relay = _routed(mode, {"a": (up.endpoint, EDITS)}, fault=fault)
    try:
        got = _ask(relay, _get())
    finally:
        relay.close()
        up.close()
    assert got == [local_response(418, FAULT_ABORT_BODY, close=False)]
    assert up.requests == []


# -- a destination with no endpoint: the router's answer, edited ------------------

APP = "https://app.example"
EVIL = "https://evil.example"
# a route's CORS policy, as the route table merges its lines into the edits
# (with_cors_lines: sets of their own, after the route's and destination's)
CORS = CorsPolicy((StringMatch("exact", APP),), expose_headers="x-total", allow_credentials=True)
CORS_LINES = (
    b"access-control-allow-origin: https://app.example\r\n"
    b"access-control-allow-credentials: true\r\n"
    b"access-control-expose-headers: x-total\r\n"
)
NO_ROUTE = "no route matched"
UNRESOLVED = "backend not resolved"
# a destination with no endpoint: (its status, its edits, its route's CORS policy)
Empty = tuple[int, HeadEdits | None, CorsPolicy | None]


def _edited_cors(answer: bytes, cors: bytes) -> bytes:
    """*answer* as EDITS with the CORS filter's *cors* lines leave it: the
    sets, then the CORS lines (sets of their own), then the adds."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"content-type:", b"server:"))
    ]
    added = b"server: l4\r\nx-dest: d\r\n" + cors + b"x-route: 1\r\nx-route: 2\r\n"
    return b"\r\n".join(lines) + b"\r\n" + added + b"\r\n" + body


def _route_edits(head: Any, edits: HeadEdits | None, cors: CorsPolicy | None) -> HeadEdits | None:
    """*edits* with *cors*'s lines for *head*'s Origin, as the route table
    gives them (the real CorsPolicy and with_cors_lines)."""
    request = Request(head.method, head.path, head.host or "", headers=dict(head.headers))
    return with_cors_lines(edits, cors.response_lines(request) if cors is not None else ())


def _empty_routed(
    mode: tuple[str, str], routes: dict[str, Empty], fault: Fault | None = None
) -> Any:
    """A relay of the twin and mode whose route for each Host of *routes*
    drew a destination with no endpoint (an empty subset, a backend not
    resolved); any other Host has no route: the worker's local 404, no
    edits (nothing to apply)."""
    which, how = mode
    kw: dict[str, Any] = {}
    if how == "resolve":

        def resolve(head: Any, origin: Any) -> Verdict:
            if head.host not in routes:
                return Verdict(local=(404, NO_ROUTE), tag="none")
            status, edits, cors = routes[head.host]
            edits = _route_edits(head, edits, cors)
            choice = Choice(1, (), "ORDERED", tag="t", status=status, edits=edits)
            return Verdict((choice,), ttl=60.0, fault=fault)

        kw["resolve"] = resolve
        kw["key_headers"] = ["origin"]  # (the CORS lines are per Origin)

    def decide(head: Any, origin: Any) -> Decision:
        if head.host not in routes:
            return Decision(local=(404, NO_ROUTE), tag="none")
        status, edits, cors = routes[head.host]
        edits = _route_edits(head, edits, cors)
        return Decision((), tag="t", edits=edits, fault=fault, status=status)

    return _relay(which, decide, **kw)


def _ask_empty(mode: tuple[str, str], routes: dict[str, Empty], *requests: bytes) -> list[bytes]:
    relay = _empty_routed(mode, routes)
    try:
        return _ask(relay, *requests)
    finally:
        relay.close()


def _with_origin(origin: str | None, host: str = "a", close: bool = False) -> bytes:
    request = _get(host, close=close)
    if origin is None:
        return request
    return request[:-2] + b"Origin: %s\r\n\r\n" % origin.encode()


def test_a_destination_with_no_endpoint_gets_the_edited_503(mode: tuple[str, str]) -> None:
    """Each request on a kept connection gets the router's 503 with the
    edits (Envoy's NoHealthyUpstream local reply, finalized by the
    route), the last one (Connection: close) the edited close variant."""
    got = _ask_empty(mode, {"a": (503, EDITS, None)}, _get(), _get(), _get(close=True))
    keep = _edited(local_response(503, NO_UPSTREAM, close=False))
    assert got == [keep, keep, _edited(local_response(503, NO_UPSTREAM, close=True))]


def test_a_backend_not_resolved_gets_the_edited_500(mode: tuple[str, str]) -> None:
    got = _ask_empty(mode, {"a": (500, EDITS, None)}, _get())
    assert got == [_edited(local_response(500, UNRESOLVED, close=False))]


def test_a_head_request_to_no_endpoint_gets_the_edited_head_alone(mode: tuple[str, str]) -> None:
    relay = _empty_routed(mode, {"a": (503, EDITS, None)})
    try:
        c = _client(relay)
        c.sendall(_get(method="HEAD", close=True))
        got = _read_all(c, 5.0)[0]
        c.close()
    finally:
        relay.close()
    assert undated(got) == _head_of(_edited(local_response(503, NO_UPSTREAM, close=True)))


def test_no_endpoint_s_503_carries_the_cors_lines_of_an_allowed_origin(
    mode: tuple[str, str],
) -> None:
    """On one connection: an allowed Origin gets the CORS filter's lines
    among the edits; no Origin, or one not allowed, the edits alone; the
    allowed one again its lines (a verdict cached for one Origin never
    answers another)."""
    origins = (APP, None, EVIL, APP)
    requests = [_with_origin(o) for o in origins]
    got = _ask_empty(mode, {"a": (503, EDITS, CORS)}, *requests)
    answer = local_response(503, NO_UPSTREAM, close=False)
    with_cors, without = _edited_cors(answer, CORS_LINES), _edited_cors(answer, b"")
    assert got == [with_cors, without, without, with_cors]


def test_cors_lines_without_other_edits(mode: tuple[str, str]) -> None:
    """A CORS route with no header edits: its lines alone, before the
    empty line."""
    got = _ask_empty(mode, {"a": (503, None, CORS)}, _with_origin(APP), _with_origin(None))
    answer = local_response(503, NO_UPSTREAM, close=False)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert got == [head + b"\r\n" + CORS_LINES + b"\r\n" + body, answer]


def test_no_endpoint_without_response_edits_is_as_before(mode: tuple[str, str]) -> None:
    routes: dict[str, Empty] = {
        "a": (503, None, None),
        "b": (503, HeadEdits(request_set=(("x-req", "1"),)), None),
    }
    got = _ask_empty(mode, routes, _get("a"), _get("b"))
    assert got == [local_response(503, NO_UPSTREAM, close=False)] * 2


def test_a_host_with_no_route_gets_no_edits(mode: tuple[str, str]) -> None:
    """After an edited 503 on the same connection, a request for a Host no
    route takes gets the local 404 as it is (no route: nothing to apply,
    nothing left over from the request before), then the edited 503 again."""
    got = _ask_empty(mode, {"a": (503, EDITS, CORS)}, _with_origin(APP), _get("zz"), _get())
    answer = local_response(503, NO_UPSTREAM, close=False)
    assert got == [
        _edited_cors(answer, CORS_LINES),
        local_response(404, NO_ROUTE, close=False),
        _edited_cors(answer, b""),
    ]


@pytest.mark.parametrize("twin", ["pure", "compiled"])
def test_a_route_s_own_answer_is_not_edited(twin: str) -> None:
    """A direct response (its decision's local) with edits beside it: as it
    is (its lines are the route table's), unlike the router's 503."""
    relay = _relay(twin, lambda head, origin: Decision(local=(200, "direct"), tag="t", edits=EDITS))
    try:
        got = _ask(relay, _get())
    finally:
        relay.close()
    assert got == [local_response(200, "direct", close=False)]


def test_no_endpoint_s_fault_abort_is_not_edited_and_its_delay_is(mode: tuple[str, str]) -> None:
    """Envoy's fault filter answers before the router: an abort is as
    without edits; after a delay alone the router's 503 comes, edited."""
    aborted = Fault(abort_status=418, abort_ppm=1_000_000)
    relay = _empty_routed(mode, {"a": (503, EDITS, None)}, fault=aborted)
    try:
        got = _ask(relay, _get())
    finally:
        relay.close()
    assert got == [local_response(418, FAULT_ABORT_BODY, close=False)]
    delayed = Fault(delay=0.05, delay_ppm=1_000_000)
    relay = _empty_routed(mode, {"a": (503, EDITS, CORS)}, fault=delayed)
    try:
        got = _ask(relay, _with_origin(APP), _get(close=True))
    finally:
        relay.close()
    assert got == [
        _edited_cors(local_response(503, NO_UPSTREAM, close=False), CORS_LINES),
        _edited(local_response(503, NO_UPSTREAM, close=True)),
    ]


def test_the_twins_send_the_same_bytes_for_no_endpoint() -> None:
    """The pure twin, the compiled one per request and from a cached
    verdict: byte for byte the same answers to one conversation."""
    routes: dict[str, Empty] = {"a": (503, EDITS, CORS), "u": (500, EDITS, None)}
    requests = [
        _with_origin(APP),
        _get(method="HEAD"),
        _with_origin(EVIL, "u"),
        _get("zz"),
        _with_origin(APP, close=True),
    ]
    answers = []
    for mode in MODES:
        relay = _empty_routed(mode, routes)
        try:
            c = _client(relay)
            c.sendall(b"".join(requests))
            answers.append(_read_all(c, 5.0)[0])
            c.close()
        finally:
            relay.close()
    assert answers[0] == answers[1] == answers[2], answers
    assert answers[0].count(b"HTTP/1.1 ") == len(requests)
    assert CORS_LINES in answers[0]


# -- from the rule file: a worker, both twins -------------------------------------

HOST = "svc.default.svc.cluster.local"
# the gateway's service, whose one endpoint is a name that resolves to no
# address (a headless Service scaled to zero), routed with response edits
# of the route's and the destination's, and a CORS policy
NO_ADDRESS = gateway_service_of("{address: gone.test}", resolution="DNS") + EDITED


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_worker_s_destination_with_no_address_gets_the_edited_503(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its one name resolved to nothing: the browser's request gets the
    router's 503 with the CORS filter's lines for its Origin after the
    destination's set, the route's add last; a request without an Origin
    the edits alone (the pure twin from the worker's decisions, the
    compiled one from its cached verdicts)."""
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(NO_ADDRESS)
    resolver = ScriptedResolver({"gone.test": Resolution((), 60, "dns")})
    got: list[bytes] = []

    def no_endpoint(watcher: Any) -> bool:
        svc = next(s for s in watcher.state.table.services() if s.host == HOST)
        return not svc.endpoints

    async def main() -> None:
        options = {"resolver": resolver}
        async with gateway_worker(
            rules, start_watcher=True, watcher_options=options, http_routing="request"
        ) as (watcher, _, address):
            for _ in range(200):  # (the name's answer: the table without it)
                if no_endpoint(watcher):
                    break
                await asyncio.sleep(0.02)
            assert no_endpoint(watcher)
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for origin in (APP, None, APP):
                    s.sendall(_with_origin(origin, "gw"))
                    got.append(undated(await loop.run_in_executor(None, _response, s)))

    asyncio.run(main())
    start = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 19\r\ndate: %s\r\n"
        b"server: l4proxy\r\n" % EPOCH_DATE
    )
    cors = (
        b"access-control-allow-origin: https://app.example\r\n"
        b"access-control-allow-credentials: true\r\n"
    )
    with_cors = start + b"x-dest: d\r\n" + cors + b"x-route: r\r\n\r\n" + NO_UPSTREAM.encode()
    without = start + b"x-dest: d\r\nx-route: r\r\n\r\n" + NO_UPSTREAM.encode()
    assert got == [with_cors, without, with_cors]


# the gateway's service, whose HTTPRoute (a GAMMA route) gives its one
# backendRef weight 0, with a response edit of the rule's
WEIGHTS_ZERO = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: svc}
spec:
  parentRefs:
  - {group: "", kind: Service, name: svc}
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-route, value: r}]
    backendRefs:
    - {name: svc, port: 8080, weight: 0}
"""


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_worker_s_route_of_weights_zero_answers_the_edited_500(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing serves the rule: each request on a kept connection gets its
    500 with the rule's response edit (the compiled twin from a cached
    choice without endpoints, the pure one from the decision), counted as
    500 under unknown versions; the pod is never asked."""
    from tests._worker import gateway_service

    _worker_twin(which, monkeypatch)
    pod = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(pod.endpoint[1]) + WEIGHTS_ZERO)
    got: list[bytes] = []
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for _ in range(3):
                    s.sendall(_get("gw"))
                    got.append(undated(await loop.run_in_executor(None, _response, s)))
            assert worker.relay is not None
            worker.relay.flush_reports(1.0)
            counted = worker.relay_counters.snapshot()["istio_requests_total"]
            seen["istio"] = {
                (d["response_code"], d["destination_version"], d["destination_workload"]): n
                for labels, n in counted.items()
                for d in [dict(labels)]
            }

    try:
        asyncio.run(main())
    finally:
        pod.close()
    edited = (
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 20\r\n"
        b"content-type: text/plain\r\ndate: %s\r\nserver: l4proxy\r\nx-route: r\r\n\r\n"
        % EPOCH_DATE
        + UNRESOLVED.encode()
    )
    assert got == [edited] * 3
    assert seen["istio"] == {("500", "unknown", "unknown"): 3}
    assert pod.requests == []
