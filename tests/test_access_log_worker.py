"""--access-log through a real worker (a gateway listener, a rule file),
both relay twins: one line per request with what Istio's sidecar says of
it (the subset in the cluster's name: what a canary's lines are read
for), each response flag where it arises, values from the client
escaped, both twins' lines the same but for times, durations and
ephemeral ports; and a log nobody reads costs lines, counted, never a
request."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane.accesslog import CAPS, JSON_KEYS, TRUNCATED, escape
from l4proxy.sidecar.admin import WorkerView
from tests._scripted import CLOSE, STALL, Scripted, _answer, _response, _status
from tests._worker import gateway_destination_rule, gateway_service, gateway_worker
from tests.conftest import dead_ports, reset_close
from tests.test_relay_retries import _worker_twin

HOST = "svc.default.svc.cluster.local"
TWINS = ["pure", "compiled"]

# Istio's default TEXT line, every field (a quoted one: escapes as accesslog's)
Q = r'((?:[^"\\]|\\.)*)'
TEXT_LINE = re.compile(
    r'\[(?P<start>[0-9T:.Z-]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" '
    r"(?P<code>\d+) (?P<flags>\S+) (?P<details>\S+) - \"-\" "
    r"(?P<received>\d+) (?P<sent>\d+) (?P<duration>\d+) - "
    rf'"(?P<xff>{Q[1:-1]})" "(?P<ua>{Q[1:-1]})" "(?P<rid>{Q[1:-1]})" "(?P<authority>{Q[1:-1]})" '
    r'"(?P<upstream>[^"]*)" (?P<cluster>\S+) (?P<upstream_local>\S+) '
    r"(?P<downstream_local>\S+) (?P<downstream_remote>\S+) - (?P<route>\S+)\n"
)

SUBSETS = f"""
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: {HOST}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
"""


def _route(extra: str = "", subset: str = "v1", match: str = "", host: str = HOST) -> str:
    """A VirtualService (route "canary") to *subset* of *host*, with
    *extra* lines (a fault, a timeout, retries) and a *match*."""
    return f"""
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [{HOST}]
  http:
  - name: canary
{f"    match: [{match}]" if match else ""}
    route:
    - destination: {{host: {host}{f", subset: {subset}" if subset else ""}}}
{extra}"""


def _serve(
    which: str,
    rules_text: str,
    talk: Callable[[tuple[str, int]], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    expect: int = 0,
    **options: Any,
) -> tuple[list[bytes], Any, dict[str, int]]:
    """*talk*(address) through a worker of *which* twin whose access log is
    a pipe: its lines (all of them: read once the worker closed, which
    writes what it buffered), what *talk* said, the relay's stats (once it
    counted *expect* requests: one a client cut is counted as the relay
    sees it go)."""
    _worker_twin(which, monkeypatch)
    rules = tmp_path / f"rules-{which}.yaml"
    rules.write_text(rules_text, encoding="utf-8")
    r, w = os.pipe()
    out: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request", access_log_fd=w, **options) as (
            _,
            worker,
            address,
        ):
            loop = asyncio.get_running_loop()
            out["said"] = await loop.run_in_executor(None, talk, address)
            assert worker.relay is not None
            deadline = time.monotonic() + 5  # (a request cut: counted once the relay sees it)
            while worker.relay.stats()["requests"] < expect:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            out["stats"] = worker.relay.stats()

    try:
        asyncio.run(main())
    finally:
        os.close(w)
    return _read_lines(r), out["said"], out["stats"]


def _read_lines(r: int) -> list[bytes]:
    """The lines of the pipe *r* to its end (every relay closed its copy of
    the write end, after writing what it buffered), closed then."""
    data = b""
    os.set_blocking(r, False)
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    return data.splitlines(keepends=True)


def _get(s: socket.socket, path: str = "/items/1", extra: bytes = b"") -> int:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n".encode() + extra + b"\r\n")
    return _status(_response(s))


def _statuses(s: socket.socket, n: int) -> list[int]:
    """The statuses of the next *n* responses (Content-Length framed), which
    may come in one read (_response() reads one, and drops what follows)."""
    buf = b""
    out: list[int] = []
    while len(out) < n:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            data = s.recv(65536)
            assert data, buf
            buf += data
            continue
        head = buf[:end]
        length = next(
            (
                int(v)
                for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                if k.strip().lower() == b"content-length"
            ),
            0,
        )
        while len(buf) < end + 4 + length:
            data = s.recv(65536)
            assert data, buf
            buf += data
        out.append(int(head.split(b" ", 2)[1]))
        buf = buf[end + 4 + length :]
    return out


def _fields(line: bytes) -> dict[str, str]:
    m = TEXT_LINE.fullmatch(line.decode("utf-8"))  # (strict: a line is valid UTF-8)
    assert m, line
    return m.groupdict()


@pytest.fixture
def v1() -> Iterator[Scripted]:
    b = Scripted([])
    yield b
    b.close()


def _as_a_sidecar_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's relays without a gateway listener's forwarding headers:
    its requests logged as a sidecar's are (the same path: a connection
    without them), the values the client sent."""
    import l4proxy.sidecar.worker as worker_module

    monkeypatch.setattr(worker_module, "Forwarding", lambda _hops: None)


def _one_line(lines: list[bytes]) -> dict[str, str]:
    assert len(lines) == 1, lines
    return _fields(lines[0])


# -- what a line says ------------------------------------------------------------------


@pytest.mark.parametrize("which", TWINS)
def test_a_request_gets_one_line_with_what_istio_says_of_it(
    which: str, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()
    body = b"hello"

    def talk(address: tuple[str, int]) -> list[int]:
        with socket.create_connection(address, 10) as s:
            first = _get(
                s,
                "/items/7?x=1",
                b"User-Agent: curl/8.5.0\r\nX-Forwarded-For: 10.0.0.1\r\n"
                b"X-Forwarded-For: 10.0.0.2\r\nX-Request-ID: 3f2a-77\r\n",
            )
            s.sendall(b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\n" + body)
            return [first, _status(_response(s)), s.getsockname()[1]]

    lines, said, stats = _serve(which, rules, talk, tmp_path, monkeypatch)
    assert said[:2] == [200, 200]
    assert len(lines) == 2 == stats["requests"]
    get, post = (_fields(line) for line in lines)
    assert (get["method"], get["path"], get["protocol"]) == ("GET", "/items/7?x=1", "HTTP/1.1")
    assert (get["code"], get["flags"], get["details"]) == ("200", "-", "via_upstream")
    assert get["cluster"] == f"outbound|8080|v1|{HOST}" and get["route"] == "svc/canary"
    assert get["upstream"] == f"127.0.0.1:{v1.endpoint[1]}"
    # (a gateway listener's: X-Forwarded-For and x-request-id as sent upstream,
    # the client's address appended, a new id: l4proxy/dataplane/forwarding.py)
    assert (get["ua"], get["xff"], get["authority"]) == (
        "curl/8.5.0",
        "10.0.0.1,10.0.0.2,127.0.0.1",
        "gw",
    )
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", get["rid"]
    ), get["rid"]
    answer = len(_answer(200, b"ok"))  # (the backend's; its head goes as it came)
    assert (get["received"], get["sent"]) == ("0", str(answer))
    assert get["downstream_remote"] == f"127.0.0.1:{said[2]}"
    assert get["upstream_local"].startswith("127.0.0.1:")
    assert (post["method"], post["received"], post["ua"]) == ("POST", str(len(body)), "-")
    assert stats["access_log_lines"] == 2 and stats["access_log_dropped"] == 0


@pytest.mark.parametrize("which", TWINS)
def test_json_lines_parse_with_istios_keys(
    which: str, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()

    def talk(address: tuple[str, int]) -> int:
        with socket.create_connection(address, 10) as s:
            return _get(s, extra=b'User-Agent: a "quoted"\tone \xe9\r\n')

    lines, said, _ = _serve(which, rules, talk, tmp_path, monkeypatch, access_log_json=True)
    assert said == 200 and len(lines) == 1
    d = json.loads(lines[0])
    assert list(d) == list(JSON_KEYS)
    assert d["user_agent"] == 'a "quoted"\tone é'  # (each byte a code point)
    assert (d["response_code"], d["response_flags"], d["route_name"]) == (200, "-", "svc/canary")
    assert d["upstream_cluster"] == f"outbound|8080|v1|{HOST}"
    assert d["x_forwarded_for"] == "127.0.0.1" and d["upstream_service_time"] is None


@pytest.mark.parametrize("which", TWINS)
def test_a_user_agent_cannot_forge_a_field(
    which: str, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quote and a control byte (a tab: what a header may carry) in the
    User-Agent come out escaped: the line still parses field for field."""
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()
    ua = b'x" 200 - via_upstream "\t\\'

    def talk(address: tuple[str, int]) -> int:
        with socket.create_connection(address, 10) as s:
            return _get(s, extra=b"User-Agent: " + ua + b"\r\n")

    lines, said, _ = _serve(which, rules, talk, tmp_path, monkeypatch)
    assert said == 200
    f = _one_line(lines)
    assert f["ua"] == r"x\" 200 - via_upstream \"\x09\\"
    assert (f["code"], f["flags"], f["route"]) == ("200", "-", "svc/canary")


@pytest.mark.parametrize("which", TWINS)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_utf8_is_written_as_it_is_and_other_bytes_escaped(
    which: str, as_json: bool, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route named in UTF-8 in its rule file, and a User-Agent in UTF-8,
    are written as they are, in TEXT and in JSON (Envoy's; they were '?'
    and \\xHH); a byte of no valid UTF-8 character and a C1 control are
    still escaped, as are quotes."""
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS
    rules += _route().replace("name: canary", 'name: "カナリア-路由"')
    ua = 'ünï "测试" 🚀'.encode() + b"\xe9!\xc2\x85"

    def talk(address: tuple[str, int]) -> int:
        with socket.create_connection(address, 10) as s:
            return _get(s, extra=b"User-Agent: " + ua + b"\r\n")

    lines, said, _ = _serve(which, rules, talk, tmp_path, monkeypatch, access_log_json=as_json)
    assert said == 200 and len(lines) == 1
    if as_json:
        d = json.loads(lines[0])
        assert d["route_name"] == "svc/カナリア-路由"
        assert d["user_agent"] == 'ünï "测试" 🚀é!\x85'
        assert "カナリア".encode() in lines[0] and b"\\u00e9!\\u0085" in lines[0]
    else:
        f = _fields(lines[0])
        assert f["route"] == "svc/カナリア-路由"
        assert f["ua"] == 'ünï \\"测试\\" 🚀\\xE9!\\xC2\\x85'


@pytest.mark.parametrize("which", TWINS)
def test_a_cut_x_forwarded_for_keeps_its_end(
    which: str, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's own long X-Forwarded-For, then the addresses the proxies
    in front appended: cut by its cap, the line keeps the end (it kept the
    client's beginning), from an element's start, the cut marked before
    it. (As a sidecar's traffic is logged: a gateway listener's own
    X-Forwarded-For, which ends with the client's address, off.)"""
    _as_a_sidecar_s(monkeypatch)
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()
    forged = ", ".join(f"203.0.113.{i}" for i in range(40)).encode()
    xff = b"X-Forwarded-For: " + forged + b", 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n"

    one = 'ü路"'.encode() * 60  # (no comma: from a whole character; escapes kept whole)

    def talk(address: tuple[str, int]) -> list[int]:
        with socket.create_connection(address, 10) as s:
            return [_get(s, extra=xff), _get(s, extra=b"X-Forwarded-For: " + one + b"\r\n")]

    lines, said, _ = _serve(which, rules, talk, tmp_path, monkeypatch)
    assert said == [200, 200] and len(lines) == 2
    kept = _fields(lines[0])["xff"].encode()
    assert kept.startswith(TRUNCATED) and kept.endswith(b", 10.0.0.1,10.0.0.2")
    assert len(kept) <= CAPS["x_forwarded_for"]
    assert re.fullmatch(rb"203\.0\.113\.\d+(, 203\.0\.113\.\d+)*", kept[len(TRUNCATED) : -20])
    assert kept == escape(forged + b", 10.0.0.1,10.0.0.2", 256, keep_end=True)
    kept = _fields(lines[1])["xff"].encode()
    assert kept == escape(one, 256, keep_end=True) and kept.endswith("路".encode() + rb"\"")


# -- the response flags ----------------------------------------------------------------


def _ask_one(path: str = "/items/1") -> Callable[[tuple[str, int]], int]:
    def talk(address: tuple[str, int]) -> int:
        with socket.create_connection(address, 10) as s:
            return _get(s, path)

    return talk


@pytest.mark.parametrize("which", TWINS)
def test_no_healthy_endpoint_is_uh(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The canary's only pod ejected (its 5xx, counted by the rule's
    outlierDetection; Istio's minHealthPercent 0): 503 UH, its subset's
    cluster named, no upstream host; before it, the pod's own 503."""
    failing = Scripted([_answer(503)] * 10)
    ejecting = SUBSETS.replace(
        "  subsets:",
        "  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 1\n"
        "      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n  subsets:",
    )
    (tmp_path / "rules.yaml").write_text(
        gateway_service(failing.endpoint[1], labels=("v1",)) + ejecting + _route()
    )
    _worker_twin(which, monkeypatch)
    r, w = os.pipe()
    said: list[int] = []

    async def main() -> None:
        async with gateway_worker(
            tmp_path / "rules.yaml", http_routing="request", access_log_fd=w
        ) as (_, worker, address):
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(None, socket.create_connection, address, 10)
            with s:
                said.append(await loop.run_in_executor(None, _get, s))
                ep = next(iter(worker.rules.state.table.service(HOST).endpoints))
                deadline = time.monotonic() + 5
                while worker.health.is_healthy(ep):  # (the report reaches the loop)
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                said.append(await loop.run_in_executor(None, _get, s))

    try:
        asyncio.run(main())
    finally:
        os.close(w)
        failing.close()
    lines = _read_lines(r)
    assert said == [503, 503]
    answered, ejected = (_fields(line) for line in lines)
    assert (answered["flags"], answered["details"]) == ("-", "via_upstream")
    assert (ejected["code"], ejected["flags"], ejected["details"]) == (
        "503",
        "UH",
        "no_healthy_upstream",
    )
    assert ejected["cluster"] == f"outbound|8080|v1|{HOST}" and ejected["upstream"] == "-"


@pytest.mark.parametrize("which", TWINS)
def test_a_refused_connect_is_uf(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with dead_ports(1) as (port,):
        rules = gateway_service(port, labels=("v1",)) + SUBSETS + _route()
        lines, said, _ = _serve(which, rules, _ask_one(), tmp_path, monkeypatch)
    f = _one_line(lines)
    assert said == 503
    assert (f["code"], f["flags"]) == ("503", "UF")
    assert f["details"] == "upstream_reset_before_response_started{connection_failure}"
    assert f["upstream"] == f"127.0.0.1:{port}" and f["upstream_local"] == "-"


@pytest.mark.parametrize("which", TWINS)
def test_a_circuit_breakers_overflow_is_uo(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http2MaxRequests 1: a second request while the first is held gets
    503 UO; the first, its client gone (a reset), is DC with no status."""
    held = Scripted([STALL])
    pool = "    connectionPool:\n      http: {http2MaxRequests: 1}\n"
    rules = gateway_service(held.endpoint[1]) + gateway_destination_rule(pool)

    def talk(address: tuple[str, int]) -> int:
        first = socket.create_connection(address, 10)
        first.sendall(b"GET /held HTTP/1.1\r\nHost: gw\r\n\r\n")
        deadline = time.monotonic() + 5
        while not held.requests:  # (in flight at the backend)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(address, 10) as s:
            status = _get(s, "/second")
        reset_close(first)
        return status

    try:
        lines, said, _ = _serve(which, rules, talk, tmp_path, monkeypatch, expect=2)
    finally:
        held.close()
    assert said == 503
    by_path = {f["path"]: f for f in map(_fields, lines)}
    assert len(lines) == 2, lines
    second, first = by_path["/second"], by_path["/held"]
    assert (second["code"], second["flags"]) == ("503", "UO")
    assert second["details"] == "upstream_reset_before_response_started{overflow}"
    assert second["cluster"] == f"outbound|8080||{HOST}" and second["route"] == "default"
    assert (first["code"], first["flags"], first["details"]) == (
        "0",
        "DC",
        "downstream_remote_disconnect",
    )
    assert first["upstream"] == f"127.0.0.1:{held.endpoint[1]}"


@pytest.mark.parametrize("which", TWINS)
def test_a_client_that_resets_keeps_its_address_in_its_line(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that resets its connection (SO_LINGER 0) while its request
    waits on the backend: its line (0 DC) says its address as accept()
    gave it. It said "-": the address was asked of the kernel (getpeername)
    when the line was written, and a reset connection has no peer."""
    held = Scripted([STALL])
    rules = gateway_service(held.endpoint[1])

    def talk(address: tuple[str, int]) -> str:
        s = socket.create_connection(address, 10)
        host, port = s.getsockname()[:2]
        me = f"{host}:{port}"
        s.sendall(b"GET /held HTTP/1.1\r\nHost: gw\r\n\r\n")
        deadline = time.monotonic() + 5
        while not held.requests:  # (in flight at the backend)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reset_close(s)
        return me

    try:
        lines, me, _ = _serve(which, rules, talk, tmp_path, monkeypatch, expect=1)
    finally:
        held.close()
    f = _one_line(lines)
    assert (f["code"], f["flags"]) == ("0", "DC"), f
    assert f["downstream_remote"] == me, f


@pytest.mark.parametrize("which", TWINS)
def test_no_route_is_nr(
    which: str, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    match = "{uri: {prefix: /only}}"
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route(match=match)
    lines, said, _ = _serve(which, rules, _ask_one("/elsewhere"), tmp_path, monkeypatch)
    f = _one_line(lines)
    assert said == 404
    assert (f["code"], f["flags"], f["details"]) == ("404", "NR", "route_not_found")
    assert (f["cluster"], f["upstream"], f["route"]) == ("-", "-", "-")


@pytest.mark.parametrize("which", TWINS)
def test_the_route_timeout_is_ut(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled = Scripted([STALL])
    rules = gateway_service(stalled.endpoint[1], labels=("v1",)) + SUBSETS
    rules += _route("    timeout: 0.2s\n")
    try:
        lines, said, _ = _serve(which, rules, _ask_one(), tmp_path, monkeypatch)
    finally:
        stalled.close()
    f = _one_line(lines)
    assert said == 504
    assert (f["code"], f["flags"], f["details"]) == ("504", "UT", "upstream_response_timeout")
    assert f["upstream"] == f"127.0.0.1:{stalled.endpoint[1]}"
    assert int(f["duration"]) >= 200


@pytest.mark.parametrize("which", TWINS)
def test_retries_used_up_is_urx(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try answered 503 by a policy that retries 5xx: the last try's
    503 goes to the client, URX (via_upstream: its answer)."""
    failing = Scripted([_answer(503, b"down")] * 3)
    retries = "    retries: {attempts: 2, retryOn: 5xx}\n"
    rules = gateway_service(failing.endpoint[1], labels=("v1",)) + SUBSETS + _route(retries)
    try:
        lines, said, stats = _serve(which, rules, _ask_one(), tmp_path, monkeypatch)
    finally:
        failing.close()
    f = _one_line(lines)
    assert said == 503 and stats["retries"] == 2 and len(failing.requests) == 3
    assert (f["code"], f["flags"], f["details"]) == ("503", "URX", "via_upstream")


@pytest.mark.parametrize("which", TWINS)
def test_an_upstream_closing_before_its_answer_is_uc(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closing = Scripted([CLOSE])
    rules = gateway_service(closing.endpoint[1], labels=("v1",)) + SUBSETS + _route()
    try:
        lines, said, _ = _serve(which, rules, _ask_one(), tmp_path, monkeypatch)
    finally:
        closing.close()
    f = _one_line(lines)
    assert said == 503  # (Envoy's: a reset for connection termination)
    assert (f["code"], f["flags"]) == ("503", "UC")
    assert f["details"] == "upstream_reset_before_response_started{connection_termination}"
    assert f["upstream"] == f"127.0.0.1:{closing.endpoint[1]}" and f["upstream_local"] == "-"


class _GoneAfterOne:
    """An endpoint that answers its first request 503 and is gone before
    it answers: a retry's new connect to it is refused. Its port stays
    held (a bound socket that never listens, sharing it by SO_REUSEPORT
    while the listener has it): no other listener can take it meanwhile."""

    def __init__(self) -> None:
        self.held = socket.socket()
        self.held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.held.bind(("127.0.0.1", 0))
        self.port = self.held.getsockname()[1]
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()  # (before the answer: the retry finds no listener)
        self.conns.append(conn)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        conn.sendall(_answer(503, b"down"))

    def close(self) -> None:
        self.thread.join(5)
        for s in (*self.conns, self.held, self.listener):
            s.close()


@pytest.mark.parametrize("which", TWINS)
def test_a_retrys_connect_that_fails_is_uf(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try answered 503, which the policy retries; the retry's
    new connect is refused: the relay answers 503 no healthy upstream (as
    Envoy, and as when a first attempt's every connect fails; it answered
    as for a connection that closed), its line UF (Envoy's for a
    connect that failed; it said UC) and URX (the policy's tries used up on
    a failure it retries)."""
    gone = _GoneAfterOne()
    retries = "    retries: {attempts: 1, retryOn: 5xx}\n"
    rules = gateway_service(gone.port, labels=("v1",)) + SUBSETS + _route(retries)
    try:
        lines, said, stats = _serve(which, rules, _ask_one(), tmp_path, monkeypatch)
    finally:
        gone.close()
    f = _one_line(lines)
    assert said == 503 and stats["retries"] == 1
    assert (f["code"], f["flags"]) == ("503", "UF,URX")
    assert f["details"] == "upstream_reset_before_response_started{connection_failure}"
    assert f["upstream"] == f"127.0.0.1:{gone.port}" and f["upstream_local"] == "-"


@pytest.mark.parametrize("which", TWINS)
@pytest.mark.parametrize(
    ("fault", "status", "flags", "details"),
    [
        ("{abort: {httpStatus: 418, percentage: {value: 100}}}", 418, "FI", "fault_filter_abort"),
        ("{delay: {fixedDelay: 50ms, percentage: {value: 100}}}", 200, "DI", "via_upstream"),
    ],
    ids=["abort", "delay"],
)
def test_a_faults_abort_is_fi_and_its_delay_di(
    which: str,
    fault: str,
    status: int,
    flags: str,
    details: str,
    v1: Scripted,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS
    rules += _route(f"    fault: {fault}\n")
    lines, said, _ = _serve(which, rules, _ask_one(), tmp_path, monkeypatch)
    f = _one_line(lines)
    assert said == status
    assert (f["code"], f["flags"], f["details"]) == (str(status), flags, details)
    assert f["route"] == "svc/canary"


# -- both twins --------------------------------------------------------------------------

MASKED = ("start", "duration")
EPHEMERAL = ("upstream_local", "downstream_local", "downstream_remote")


def _masked(line: bytes) -> dict[str, str]:
    f = _fields(line)
    for k in MASKED:
        f[k] = "*"
    for k in EPHEMERAL:
        f[k] = f[k].rpartition(":")[0] + ":*" if f[k] != "-" else "-"
    return f


def test_both_twins_write_the_same_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests through a worker of each twin (the same backend
    and rules: answers, a no route, a body, pipelined requests, an
    HTTP/1.0 HEAD): the same lines, byte for byte, but for times,
    durations and ephemeral ports (each flag's lines: the tests above,
    the same expectations for both). As a sidecar's traffic is logged (the
    client's header lines: the gateway listener's forwarding headers off;
    with them, test_worker_gateway_forwarding.py)."""
    _as_a_sidecar_s(monkeypatch)
    v1 = Scripted([])
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS
    rules += _route(match="{uri: {prefix: /items}}")

    def talk(address: tuple[str, int]) -> list[int]:
        out = []
        with socket.create_connection(address, 10) as s:
            out.append(_get(s, "/items/1", b"User-Agent: ua\r\nX-Request-ID: r1\r\n"))
            out.append(_get(s, "/nowhere"))
            # (20 lines of one header: 16 joined, by both; X-Forwarded-For's
            # last 16, the end the proxies appended)
            xff = b"".join(b"X-Forwarded-For: 10.0.0.%d\r\n" % i for i in range(20))
            out.append(_get(s, "/items/6", xff))
            s.sendall(b"PUT /items/2 HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc")
            out.append(_status(_response(s)))
            pipelined = b"GET /items/%d HTTP/1.1\r\nHost: gw\r\n\r\n"
            s.sendall(pipelined % 3 + pipelined % 4)
            out += _statuses(s, 2)
        with socket.create_connection(address, 10) as s:
            s.sendall(b"HEAD /items/5 HTTP/1.0\r\nHost: gw\r\n\r\n")
            out.append(int(s.recv(65536).split(b" ", 2)[1]))
        return out

    got: dict[str, list[dict[str, str]]] = {}
    try:
        for which in TWINS:
            lines, said, _ = _serve(which, rules, talk, tmp_path, monkeypatch)
            assert said == [200, 404, 200, 200, 200, 200, 200], which
            got[which] = [_masked(line) for line in lines]
    finally:
        v1.close()
    assert len(got["pure"]) == 7
    assert got["pure"] == got["compiled"]
    assert got["pure"][2]["xff"] == ",".join(f"10.0.0.{i}" for i in range(4, 20))


# -- a log nobody reads ------------------------------------------------------------------


@pytest.mark.parametrize("which", TWINS)
def test_a_log_nobody_reads_drops_lines_counted_and_serves_every_request(
    which: str, v1: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log's pipe full and its reader stopped: every request is still
    answered; the lines that did not fit are dropped and counted (those
    taken and those dropped: one per request)."""
    import fcntl

    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    n = 200
    _worker_twin(which, monkeypatch)
    (tmp_path / "rules.yaml").write_text(rules)
    stats: dict[str, int] = {}

    def talk(address: tuple[str, int]) -> list[int]:
        with socket.create_connection(address, 10) as s:
            return [_get(s, f"/items/{i}") for i in range(n)]

    async def main() -> list[int]:
        async with gateway_worker(
            tmp_path / "rules.yaml",
            http_routing="request",
            access_log_fd=w,
            access_log_buffer=8192,
        ) as (_, worker, address):
            said = await asyncio.get_running_loop().run_in_executor(None, talk, address)
            assert worker.relay is not None
            stats.update(worker.relay.stats())
            gauges = WorkerView(worker, "test").gauges()  # (what /stats says)
            stats["gauge_dropped"] = int(gauges["l4proxy_access_log_dropped_total"])
            os.close(r)  # (the writer blocked in its write gets EPIPE: it ends)
            return said

    try:
        said = asyncio.run(main())
    finally:
        os.close(w)
    assert said == [200] * n
    assert stats["requests"] == n
    assert stats["access_log_dropped"] > 0
    assert stats["access_log_lines"] + stats["access_log_dropped"] == n
    assert stats["gauge_dropped"] == stats["access_log_dropped"]


@pytest.mark.parametrize("which", TWINS)
def test_a_log_whose_reader_is_gone_fails_counted_logged_once(
    which: str,
    v1: Scripted,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log's pipe has no reader (EPIPE at each write): every request
    is answered, each failed write counted, its lines dropped, one
    warning logged."""
    rules = gateway_service(v1.endpoint[1], labels=("v1",)) + SUBSETS + _route()
    r, w = os.pipe()
    os.close(r)
    _worker_twin(which, monkeypatch)
    (tmp_path / "rules.yaml").write_text(rules)
    n = 20
    stats: dict[str, int] = {}

    def talk(address: tuple[str, int]) -> list[int]:
        with socket.create_connection(address, 10) as s:
            return [_get(s, f"/items/{i}") for i in range(n)]

    async def main() -> list[int]:
        async with gateway_worker(
            tmp_path / "rules.yaml", http_routing="request", access_log_fd=w
        ) as (_, worker, address):
            said = await asyncio.get_running_loop().run_in_executor(None, talk, address)
            assert worker.relay is not None
            assert worker.relay.flush_access_log(2.0)  # (written: that is, failed)
            stats.update(worker.relay.stats())
            return said

    try:
        said = asyncio.run(main())
    finally:
        os.close(w)
    assert said == [200] * n
    assert stats["access_log_lines"] == n and stats["access_log_dropped"] == n
    assert stats["access_log_write_errors"] >= 1
    warnings = [rec.getMessage() for rec in caplog.records if "access log" in rec.getMessage()]
    assert len(warnings) == 1 and "Broken pipe" in warnings[0], warnings
