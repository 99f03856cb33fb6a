"""Istio's ``response_flags`` on ``istio_requests_total`` and
``istio_request_duration_milliseconds``, through a real worker of each
relay twin (a gateway listener, a rule file, real sockets): each request's
series say the flags its access log line says, ``-`` for none.

Dashboards (Kiali, Istio's service dashboard) and alerts select by the
label; it was missing: the compiled relay's metrics rows were a (tag,
status) pair, without the flags its log line had. Each test reads the
access log line and the series of the same request (one request, one
line, one series), and asserts both and that they agree; the keep-alive
test also runs with the log off, where the compiled relay's flags of one
request must not reach the next one's row.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from l4proxy.sidecar import istio_metrics as im
from tests._scripted import CLOSE, STALL, Scripted, _answer, _response, _status
from tests._worker import gateway_service, gateway_worker
from tests.conftest import dead_ports, reset_close
from tests.test_access_log_worker import (
    HOST,
    SUBSETS,
    _fields,
    _get,
    _GoneAfterOne,
    _read_lines,
    _route,
)
from tests.test_relay_retries import _worker_twin

TWINS = ["pure", "compiled"]
# a response whose head says more body than comes: its relay is cut mid-body
PARTIAL = b"HTTP/1.1 200 X\r\nContent-Length: 1000\r\n\r\npartial"

Rows = dict[tuple[str, str], float]  # (response_code, response_flags) -> count


def _rows(snapshot: dict[str, Any], family: str) -> Rows:
    out: Rows = {}
    for key, n in snapshot.get(family, {}).items():
        labels = dict(key)
        if "le" in labels:
            continue
        k = (labels["response_code"], labels["response_flags"])
        out[k] = out.get(k, 0) + n
    return out


def _served(
    which: str,
    rules_text: str,
    talk: Callable[[tuple[str, int]], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    expect: int = 1,
    log: bool = True,
) -> tuple[list[bytes], Any, Rows]:
    """*talk*(address) through a worker of *which* twin (its access log a
    pipe, or off): the log's lines, what *talk* said, and the worker's
    ``istio_requests_total`` by response code and flags once it closed
    (the compiled relay hands its rows over then), which must be the
    duration histogram's ``_count`` too."""
    _worker_twin(which, monkeypatch)
    rules = tmp_path / f"rules-{which}-{log}.yaml"
    rules.write_text(rules_text, encoding="utf-8")
    r, w = os.pipe() if log else (-1, -1)
    out: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request", access_log_fd=w) as (
            _,
            worker,
            address,
        ):
            out["worker"] = worker
            loop = asyncio.get_running_loop()
            out["said"] = await loop.run_in_executor(None, talk, address)
            assert worker.relay is not None
            deadline = time.monotonic() + 5  # (a request cut: counted once the relay sees it)
            while worker.relay.stats()["requests"] < expect:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        if log:
            os.close(w)
    lines = _read_lines(r) if log else []
    snapshot = out["worker"].relay_counters.snapshot()
    rows = _rows(snapshot, im.REQUESTS)
    assert _rows(snapshot, im.DURATION + "_count") == rows
    return lines, out["said"], rows


def _agree(lines: list[bytes], rows: Rows, code: str, flags: str) -> None:
    """One line and one series, both of *code* with *flags*."""
    assert len(lines) == 1, lines
    f = _fields(lines[0])
    assert rows == {(f["code"], f["flags"]): 1}, (f, rows)
    assert (f["code"], f["flags"]) == (code, flags)


def _ask(path: str = "/items/1") -> Callable[[tuple[str, int]], int]:
    def talk(address: tuple[str, int]) -> int:
        with socket.create_connection(address, 10) as s:
            return _get(s, path)

    return talk


@pytest.mark.parametrize("which", TWINS)
def test_an_answer_without_a_flag_is_a_dash(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = Scripted([])
    try:
        rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    finally:
        v1.close()
    assert said == 200
    _agree(lines, rows, "200", "-")
    assert im.NO_FLAGS == "-"  # (Istio's, Envoy's: never an empty value)


@pytest.mark.parametrize("which", TWINS)
def test_an_unreachable_backend_is_uf(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with dead_ports(1) as (port,):
        rules = gateway_service(port, labels=("v1",)) + SUBSETS + _route()
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    assert said == 503
    _agree(lines, rows, "503", "UF")


@pytest.mark.parametrize("which", TWINS)
def test_a_retry_that_cannot_connect_is_uf_urx(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try answered 503, which the policy retries; the retry's
    connect is refused: 503 UF,URX (the compiled relay's URX comes from its
    retry state at the request's end, not from a flag set on the way)."""
    gone = _GoneAfterOne()
    retries = "    retries: {attempts: 1, retryOn: 5xx}\n"
    try:
        rules = gateway_service(gone.port, labels=("v1",)) + SUBSETS + _route(retries)
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    finally:
        gone.close()
    assert said == 503
    _agree(lines, rows, "503", "UF,URX")


@pytest.mark.parametrize("which", TWINS)
@pytest.mark.parametrize(
    ("retries", "flags"),
    [
        ("{attempts: 2}", "UF,URX"),  # (Istio's retryOn: connect-failure, ...)
        ("{attempts: 2, retryOn: 'connect-failure,502'}", "UF,URX"),
        ("{attempts: 2, retryOn: connect-failure}", "UF,URX"),  # (Envoy's: UF alone before)
        ("{attempts: 2, retryOn: reset-before-request}", "UF,URX"),
        ("{attempts: 1, retryOn: gateway-error}", "UF,URX"),
        ("{attempts: 3, retryOn: reset}", "UF,URX"),
        ("{attempts: 3, retryOn: 5xx}", "UF,URX"),
        ("{attempts: 2, retryOn: retriable-4xx}", "UF"),  # (retries no failed connect)
        ("{attempts: 2, retryOn: connect-failure, perTryTimeout: 5s}", "UF,URX"),
    ],
    ids=[
        *("istio-default", "connect-failure", "connect-failure-alone"),
        *("reset-before-request-alone", "gateway-error"),
        *("reset", "5xx", "4xx", "per-try"),
    ],
)
def test_connects_a_policy_retries_all_failing_are_uf_urx(
    which: str, retries: str, flags: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One endpoint, whose every connect is refused, under a policy whose
    retryOn covers a failed connect (connect-failure, reset, 5xx,
    gateway-error, as Envoy's router retries it): the relay's own retry of
    a failed connect (the next endpoint) has none left, and the 503 says
    UF,URX, as Envoy's says once its tries are used up on failed connects
    (UF alone before: a failed connect is no try of the policy's here, so
    its tries were never used up). A policy that would not retry it:
    UF alone, as without a policy. connect-failure (or
    reset-before-request) alone is such a policy, a perTryTimeout or not,
    as Envoy's (before, it was no policy without one: UF alone)."""
    with dead_ports(1) as (port,):
        rules = gateway_service(port, labels=("v1",)) + SUBSETS
        rules += _route(f"    retries: {retries}\n")
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    assert said == 503
    _agree(lines, rows, "503", flags)


@pytest.mark.parametrize("which", TWINS)
@pytest.mark.parametrize(
    ("retries", "flags"),
    [
        # the 503 spends the one retry, which waits its backoff (a base of
        # 1000 s) or, drawn short, stalls: the route timeout's 504
        ("{attempts: 1, retryOn: 5xx, backoff: 1000s}", "UT"),
        # the retry sent at once (25 ms at most) and stalling
        ("{attempts: 1, retryOn: 5xx}", "UT"),
        # the retry's per-try timeout, none left: Envoy's URX (its
        # maybeRetryReset() finds no retry left), the route timeout far
        ("{attempts: 1, retryOn: 5xx, perTryTimeout: 300ms}", "UT,URX"),
    ],
    ids=["backoff", "last-try", "per-try"],
)
def test_the_route_timeout_s_504_is_ut_without_urx(
    which: str, retries: str, flags: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try answers 503, which the policy retries once; the retry
    waits its backoff or stalls, and the route's timeout (1 s) passes: the
    504 says UT alone, as Envoy's (onResponseTimeout() sets UT and asks no
    retry state: its URX comes only where the retry state refused a retry,
    shouldRetry*() with none left). Before: UT,URX, the tries being spent.
    A per-try timeout on the last try is such a refusal: UT,URX (the 504
    of a try past it; its route timeout 5 s)."""
    per_try = "perTryTimeout" in retries
    up = Scripted([_answer(503, b"busy"), STALL] if not per_try else [STALL, STALL])
    timeout = "5s" if per_try else "1s"
    try:
        rules = gateway_service(up.endpoint[1], labels=("v1",)) + SUBSETS
        rules += _route(f"    timeout: {timeout}\n    retries: {retries}\n")
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    finally:
        up.close()
    assert said == 504
    _agree(lines, rows, "504", flags)
    assert 1 <= len(up.requests) <= 2


@pytest.mark.parametrize("which", TWINS)
def test_retries_used_up_on_answers_is_urx(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try answered 503 by a policy that retries 5xx: the last
    answer goes to the client, URX alone (no flag was set on the way: the
    compiled relay must look at its retries for a request without one)."""
    failing = Scripted([_answer(503, b"down")] * 3)
    retries = "    retries: {attempts: 2, retryOn: 5xx}\n"
    try:
        rules = gateway_service(failing.endpoint[1], labels=("v1",)) + SUBSETS + _route(retries)
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    finally:
        failing.close()
    assert said == 503 and len(failing.requests) == 3
    _agree(lines, rows, "503", "URX")


@pytest.mark.parametrize("which", TWINS)
def test_no_route_is_nr(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host's routes match nothing: the 404 is NR, a flag of the route's
    own answer that the relay does not set (the worker's tag says it, as
    it says it to the log)."""
    v1 = Scripted([])
    try:
        match = "{uri: {prefix: /only}}"
        rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route(match=match)
        lines, said, rows = _served(which, rules, _ask("/elsewhere"), tmp_path, monkeypatch)
    finally:
        v1.close()
    assert said == 404
    _agree(lines, rows, "404", "NR")


@pytest.mark.parametrize("which", TWINS)
def test_a_faults_abort_is_fi(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = Scripted([])
    try:
        fault = "    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n"
        rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route(fault)
        lines, said, rows = _served(which, rules, _ask(), tmp_path, monkeypatch)
    finally:
        v1.close()
    assert said == 418 and not v1.requests
    _agree(lines, rows, "418", "FI")


@pytest.mark.parametrize("which", TWINS)
def test_a_client_that_resets_mid_response_is_dc(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend sends a head and part of its body, then waits; the
    client reads the head and resets: counted under the status it got,
    200, with DC."""
    held = threading.Event()

    def partial_then_wait(conn: socket.socket) -> None:
        conn.sendall(PARTIAL)
        held.wait(10)  # (the relay closes its side when the client is gone)

    backend = Scripted([partial_then_wait])

    def talk(address: tuple[str, int]) -> bytes:
        s = socket.create_connection(address, 10)
        s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        got = b""
        while b"partial" not in got:
            data = s.recv(65536)
            assert data, got
            got += data
        reset_close(s)
        return got.split(b"\r\n", 1)[0]

    try:
        rules = gateway_service(backend.endpoint[1], labels=("v1",)) + SUBSETS + _route()
        lines, said, rows = _served(which, rules, talk, tmp_path, monkeypatch)
    finally:
        held.set()
        backend.close()
    assert said == b"HTTP/1.1 200 X"
    _agree(lines, rows, "200", "DC")


@pytest.mark.parametrize("which", TWINS)
def test_an_upstream_that_closes_mid_response_is_uc(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend sends a head and part of its body, then closes: the
    client's answer is cut, counted under its 200 with UC."""
    backend = Scripted([(PARTIAL, CLOSE)])

    def talk(address: tuple[str, int]) -> bytes:
        got = b""
        with socket.create_connection(address, 10) as s:
            s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
            while data := s.recv(65536):
                got += data
        return got

    try:
        rules = gateway_service(backend.endpoint[1], labels=("v1",)) + SUBSETS + _route()
        lines, said, rows = _served(which, rules, talk, tmp_path, monkeypatch)
    finally:
        backend.close()
    assert said.startswith(b"HTTP/1.1 200 X") and said.endswith(b"partial")
    _agree(lines, rows, "200", "UC")


def _two_routes(port: int) -> str:
    """/slow delayed by a fault (DI), /items straight to v1, nothing else
    routed (404 NR)."""
    return (
        gateway_service(port, labels=("v1",))
        + SUBSETS
        + f"""
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [{HOST}]
  http:
  - name: slow
    match: [{{uri: {{prefix: /slow}}}}]
    fault: {{delay: {{fixedDelay: 20ms, percentage: {{value: 100}}}}}}
    route:
    - destination: {{host: {HOST}, subset: v1}}
  - name: plain
    match: [{{uri: {{prefix: /items}}}}]
    route:
    - destination: {{host: {HOST}, subset: v1}}
"""
    )


@pytest.mark.parametrize("log", [True, False], ids=["log", "no-log"])
@pytest.mark.parametrize("which", TWINS)
def test_a_keep_alive_requests_flags_are_its_own(
    which: str, log: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one keep-alive connection: a delayed request (DI), a plain one,
    a no route's 404 (NR) and a plain one again: each series has its own
    request's flags, the log on or off (the compiled relay cleared a
    request's flags only where the log captured its head: with the log
    off, the requests after the delay would be counted DI)."""
    v1 = Scripted([])

    def talk(address: tuple[str, int]) -> list[int]:
        out = []
        with socket.create_connection(address, 10) as s:
            for path in ("/slow/1", "/items/1", "/none", "/items/2"):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
                out.append(_status(_response(s)))
        return out

    try:
        rules = _two_routes(v1.endpoint[1])
        lines, said, rows = _served(which, rules, talk, tmp_path, monkeypatch, 4, log)
    finally:
        v1.close()
    assert said == [200, 200, 404, 200]
    assert rows == {("200", "DI"): 1, ("200", "-"): 2, ("404", "NR"): 1}
    if log:
        logged: Rows = {}
        for f in map(_fields, lines):
            logged[(f["code"], f["flags"])] = logged.get((f["code"], f["flags"]), 0) + 1
        assert logged == rows
