"""A VirtualService's ``http[].corsPolicy`` from the rule file to a real
worker, both relay twins, as a browser uses it: on one keep-alive
connection, preflights from allowed Origins are answered by the proxy
(nothing reaches the backend), the actual requests' responses carry
``access-control-allow-origin`` echoing each one's own Origin (two Origins
in turn: a verdict cached for one must never answer the other), and a
request without an Origin or from one not allowed, preflight or not, goes
upstream and comes back untouched."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from l4proxy.dataplane.verdict import FAULT_ABORT_BODY
from tests._scripted import Scripted, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_worker,
    per_connection_warnings,
)
from tests.conftest import EPOCH_DATE, undated

HOST = GATEWAY_HOST
APP = "https://app.example"
ADMIN = "https://admin.example"
EVIL = "https://evil.example"
T = TypeVar("T")
CORS = gateway_routes(
    f"""\
  - route:
    - destination: {{host: {HOST}}}
    corsPolicy:
      allowOrigins:
      - exact: {APP}
      - prefix: https://admin.
      allowMethods: [GET, PUT]
      allowHeaders: [x-token]
      exposeHeaders: [x-total]
      maxAge: 10m
      allowCredentials: true
""",
    api="v1",
)
# the backend's own answer: a CORS header of its own, which the filter's replaces
UPSTREAM = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\naccess-control-allow-origin: *\r\n\r\nok"


def _ask(s: socket.socket, method: str, origin: str | None, preflight: bool = False) -> bytes:
    lines = [f"{method} /items HTTP/1.1", "Host: gw"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if preflight:
        lines += ["Access-Control-Request-Method: PUT", "Access-Control-Request-Headers: x-token"]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return _response(s)


def _on_one_connection(
    tmp_path: Path, backend: Scripted, text: str, asks: Sequence[Callable[[socket.socket], T]]
) -> list[T]:
    """A worker routing per request on the rules *text* (GATEWAY_SERVICE
    to *backend*): each of *asks* in turn on one client connection, what
    each returned; *backend* closed."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]) + text)
    got: list[T] = []

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, _, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for ask in asks:
                    got.append(await loop.run_in_executor(None, ask, s))

    try:
        asyncio.run(main())
    finally:
        backend.close()
    return got


def _cors_lines(response: bytes) -> list[tuple[str, str]]:
    """The response's access-control-* lines, in order (names lowercase)."""
    head = response.partition(b"\r\n\r\n")[0].decode()
    out = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower().startswith("access-control-"):
            out.append((name.lower(), value.strip()))
    return out


def _actual(origin: str) -> list[tuple[str, str]]:
    return [
        ("access-control-allow-origin", origin),
        ("access-control-allow-credentials", "true"),
        ("access-control-expose-headers", "x-total"),
    ]


def _preflight(origin: str) -> list[tuple[str, str]]:
    return [
        ("access-control-allow-origin", origin),
        ("access-control-allow-credentials", "true"),
        ("access-control-allow-methods", "GET,PUT"),
        ("access-control-allow-headers", "x-token"),
        ("access-control-max-age", "600"),
    ]


UNTOUCHED = [("access-control-allow-origin", "*")]
# (method, Origin, a preflight?, what the client gets, whether the backend sees it)
CONVERSATION = [
    ("OPTIONS", APP, True, _preflight(APP), False),
    ("GET", APP, False, _actual(APP), True),
    ("OPTIONS", ADMIN, True, _preflight(ADMIN), False),
    ("GET", ADMIN, False, _actual(ADMIN), True),
    ("GET", APP, False, _actual(APP), True),  # (each Origin its own verdict)
    ("OPTIONS", APP, True, _preflight(APP), False),
    ("GET", EVIL, False, UNTOUCHED, True),
    ("OPTIONS", EVIL, True, UNTOUCHED, True),  # (FORWARD: upstream, untouched)
    ("GET", None, False, UNTOUCHED, True),
    ("OPTIONS", None, True, UNTOUCHED, True),
    ("PUT", ADMIN, False, _actual(ADMIN), True),
]


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_browser_s_preflights_and_requests_on_one_connection(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    backend = Scripted([UPSTREAM] * 20)
    asks = [partial(_ask, method=m, origin=o, preflight=pre) for m, o, pre, _, _ in CONVERSATION]
    answers = _on_one_connection(tmp_path, backend, CORS, asks)
    assert [_status(a) for a in answers] == [200] * len(CONVERSATION)
    for i, (answer, (_, _, _, lines, _)) in enumerate(zip(answers, CONVERSATION, strict=True)):
        assert _cors_lines(answer) == lines, (i, answer)
    # the proxy's own answers: no body; the backend's: its body
    for answer, (*_, upstream) in zip(answers, CONVERSATION, strict=True):
        assert answer.endswith(b"\r\n\r\nok") == upstream, answer
    # the backend saw every request but the allowed preflights, on one connection
    sent = [(m, o) for m, o, _, _, upstream in CONVERSATION if upstream]
    seen = [(r.split(b" ", 1)[0].decode(), _origin_of(r)) for r in backend.requests]
    assert seen == sent
    assert backend.accepted == 1


def _origin_of(request: bytes) -> str | None:
    for line in request.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"origin":
            return value.strip().decode()
    return None


def test_per_connection_cors_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(1111) + CORS)
    warnings = per_connection_warnings(rules, caplog)
    assert any(
        "CORS policies" in w and "--http-routing connection" in w and f"{HOST} svc" in w
        for w in warnings
    ), warnings


# Istio's filter order is fault, then CORS, then router (pilot's
# listener_builder appends Fault then Cors): a route's fault is drawn for a
# preflight before the CORS filter answers it
FAULTED = CORS.replace("    corsPolicy:\n", "    fault:\n      FAULT\n    corsPolicy:\n")
FAULT_DELAY = 0.3
ABORT = "abort: {httpStatus: 418, percentage: {value: 100}}"
DELAY = f"delay: {{fixedDelay: {int(FAULT_DELAY * 1000)}ms, percentage: {{value: 100}}}}"


def _faulted_preflights(fault: str, tmp_path: Path) -> list[tuple[bytes, float]]:
    """Two allowed preflights on one connection to the CORS route given
    *fault*: (each response, its seconds); the backend must see neither."""
    backend = Scripted([])

    def timed(s: socket.socket) -> tuple[bytes, float]:
        started = time.monotonic()
        answer = _ask(s, "OPTIONS", APP, preflight=True)
        return answer, time.monotonic() - started

    got = _on_one_connection(tmp_path, backend, FAULTED.replace("FAULT", fault), [timed] * 2)
    assert backend.requests == []
    return got


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_an_aborted_route_s_preflight_gets_the_abort(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    for answer, _ in _faulted_preflights(ABORT, tmp_path):
        assert _status(answer) == 418, answer
        assert answer.endswith(FAULT_ABORT_BODY.encode()), answer
        assert _cors_lines(answer) == [], answer  # (the CORS filter never ran)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_delayed_route_s_preflight_is_answered_after_the_delay(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    for answer, took in _faulted_preflights(DELAY, tmp_path):
        assert _status(answer) == 200 and _cors_lines(answer) == _preflight(APP), answer
        assert took >= FAULT_DELAY, took  # (a lower bound only)


# a route's own answers without a body, ahead of the CORS route
ANSWERS = CORS.replace(
    "  http:\n",
    "  http:\n"
    "  - match: [{uri: {prefix: /empty}}]\n"
    "    directResponse: {status: 403}\n"
    "  - match: [{uri: {prefix: /old}}]\n"
    "    redirect: {uri: /new}\n",
)


def test_per_connection_answers_without_a_body_send_none(tmp_path: Path) -> None:
    """--http-routing connection: a preflight that opens a connection, a
    direct response and a redirect with no body are answered with none
    (content-length: 0), as per request, then the connection closes."""
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]) + ANSWERS)
    asks = {
        "preflight": f"OPTIONS /items HTTP/1.1\r\nHost: gw\r\nOrigin: {APP}\r\n"
        "Access-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: x-token\r\n\r\n",
        "direct": "GET /empty HTTP/1.1\r\nHost: gw\r\n\r\n",
        "redirect": "GET /old/page HTTP/1.1\r\nHost: gw\r\n\r\n",
    }
    got: dict[str, bytes] = {}

    def ask(address: tuple[str, int], request: str) -> bytes:
        with socket.create_connection(address, 10) as s:
            s.sendall(request.encode())
            answer = _response(s)
            assert s.recv(1) == b""  # (then closed)
            return answer

    async def main() -> None:
        async with gateway_worker(rules, http_routing="connection") as (_, _, address):
            loop = asyncio.get_running_loop()
            for name, request in asks.items():
                got[name] = await loop.run_in_executor(None, ask, address, request)

    try:
        asyncio.run(main())
    finally:
        backend.close()
    assert backend.requests == []
    assert _status(got["preflight"]) == 200 and _cors_lines(got["preflight"]) == _preflight(APP)
    assert _status(got["direct"]) == 403
    assert _status(got["redirect"]) == 301
    for name, answer in got.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert body == b"" and b"\r\ncontent-length: 0" in head.lower(), (name, answer)


# a CORS route with response edits of its own and of its destination
EDITED = gateway_routes(
    f"""\
  - route:
    - destination: {{host: {HOST}}}
      headers:
        response:
          set: {{x-dest: d}}
    headers:
      response:
        add: {{x-route: r}}
        remove: [content-type]
    corsPolicy:
      allowOrigins:
      - exact: {APP}
      allowCredentials: true
""",
    api="v1",
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_refused_upstream_s_503_carries_the_cors_lines_and_the_route_s_edits(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route's only endpoint refuses connections (a socket bound, not
    listening): the browser's request gets the relay's 503 with the CORS
    filter's lines for its Origin, after the route's and the
    destination's, as Envoy's router and CORS filter finalize their local
    reply; a request without an Origin gets the edits alone."""
    _worker_twin(which, monkeypatch)
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(refusing.getsockname()[1]) + EDITED)
    got: list[bytes] = []

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, _, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for origin in (APP, None):
                    got.append(await loop.run_in_executor(None, _ask, s, "GET", origin))

    try:
        asyncio.run(main())
    finally:
        refusing.close()
    lines = (
        "x-dest: d\r\naccess-control-allow-origin: https://app.example\r\n"
        "access-control-allow-credentials: true\r\nx-route: r\r\n"
    )
    start = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 19\r\n"
        b"date: %s\r\nserver: l4proxy\r\n" % EPOCH_DATE
    )
    assert [undated(a.partition(b"\r\n\r\n")[0] + b"\r\n\r\n") for a in got] == [
        start + lines.encode() + b"\r\n",
        start + b"x-dest: d\r\nx-route: r\r\n\r\n",
    ], got
