"""An HTTPRoute rule's ``sessionPersistence`` through a real worker, both
relay twins, over keep-alive connections on loopback.

The rule splits 50/50 over two Services, svc-v1 (pods a, b) and svc-v2
(pods c, d). A request without a token is drawn and balanced as ever, and
its answer gives the client the token of the pod that answered
(``verdict.session_token``: base64 of ``127.0.0.1:PORT``); a request that
sends it goes to that pod, whichever version it is of, on any connection,
and gets no new one. A token that names no pod of the rule (forged,
garbage, a pod a reload removed, a listener of someone else's) is no token:
the request is routed anew and given a new one, and the address it names
is never dialled. The pure twin pins in the route table's decide(), the
compiled one in its loop from the cached verdict."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from l4proxy.dataplane.verdict import session_token
from tests._worker import _worker_twin, gateway_service, gateway_worker, per_connection_warnings
from tests.test_least_request import read_head

NAMES = "abcd"
COOKIE = re.compile(
    rb'set-cookie: sid="([A-Za-z0-9+/=]+)"; (?:Max-Age=(\d+); )?Path=([^;]+); HttpOnly'
)
Cookie = tuple[str, int | None, str]  # its token, Max-Age (None: none), Path


class Backend:
    """A pod on 127.0.0.1: answers every request with its one-letter name,
    its head saying ``X-Session: upstream`` too (a line a header token of
    that name replaces)."""

    def __init__(self, name: str) -> None:
        self.name = name
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Session: upstream\r\n\r\n" + name.encode()
        )

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while self.rfile.readline():
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    self.wfile.write(answer)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.closed = False
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.endpoint = ("127.0.0.1", self.server.server_address[1])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    out = {n: Backend(n) for n in NAMES}
    yield out
    for b in out.values():
        b.close()


def _version(name: str, ports: list[int]) -> str:
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}}}" for p in ports)
    return f"""
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
"""


SESSION_COOKIE = """\
    sessionPersistence:
      sessionName: sid
"""


def _rules(
    backends: dict[str, Backend], session: str = SESSION_COOKIE, v1: str = "ab", v2: str = "cd"
) -> str:
    """The gateway's service svc (a's port: it never serves, its route
    does), svc-v1 and svc-v2, and the HTTPRoute of svc: 50/50 with
    *session* (YAML lines under the rule)."""
    return (
        gateway_service(backends["a"].endpoint[1])
        + _version("svc-v1", [backends[n].endpoint[1] for n in v1])
        + _version("svc-v2", [backends[n].endpoint[1] for n in v2])
        + f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: svc}}
spec:
  parentRefs:
  - {{group: "", kind: Service, name: svc}}
  rules:
  - backendRefs:
    - {{name: svc-v1, port: 8080, weight: 50}}
    - {{name: svc-v2, port: 8080, weight: 50}}
{session}"""
    )


def _get(s: socket.socket, extra: str = "") -> tuple[str, bytes]:
    """One GET on *s* (kept alive): the backend that answered, and the head."""
    s.sendall(f"GET /p HTTP/1.1\r\nHost: gw\r\n{extra}\r\n".encode())
    data = read_head(s)
    while len(data.split(b"\r\n\r\n", 1)[1]) < 1:
        data += s.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), data
    return body.decode(), head


def _cookie(head: bytes) -> Cookie | None:
    """The session cookie *head* sets, None: none."""
    lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"set-cookie:")]
    if not lines:
        return None
    assert len(lines) == 1, head
    m = COOKIE.fullmatch(lines[0])
    assert m, lines
    max_age = None if m.group(2) is None else int(m.group(2))
    return m.group(1).decode(), max_age, m.group(3).decode()


def _token_of(backends: dict[str, Backend], name: str) -> str:
    return session_token(backends[name].endpoint)


def _drive(
    rules: Path, which: str, monkeypatch: pytest.MonkeyPatch, clients: Callable[..., None]
) -> None:
    """*clients(address, watcher_reload)* on a thread against a real worker
    of relay twin *which* on *rules*; ``watcher_reload()`` reloads the rule
    file (from that thread)."""
    _worker_twin(which, monkeypatch)

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request", watcher_options={"seed": 7}) as (
            watcher,
            _w,
            address,
        ):
            loop = asyncio.get_running_loop()

            def reload() -> None:
                assert asyncio.run_coroutine_threadsafe(watcher.reload(), loop).result(10)

            await loop.run_in_executor(None, clients, address, reload)

    asyncio.run(main())


TWINS = ["pure", "compiled"]


@pytest.mark.parametrize("which", TWINS)
def test_a_token_pins_its_pod_across_the_weighted_backends(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a token the requests spread over both versions' pods, each
    answer giving the token of the pod that answered; each client's 20
    requests with its token, on a connection of its own, all go to that
    pod and get no new token."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends))
    spread: list[tuple[str, Cookie | None]] = []
    pinned: dict[str, list[tuple[str, bytes]]] = {}

    def clients(address: tuple[str, int], _reload: Callable[[], None]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(40):
                name, head = _get(s)
                spread.append((name, _cookie(head)))
        for name in NAMES:
            token = _token_of(backends, name)
            with socket.create_connection(address, timeout=10) as s:
                pinned[name] = [
                    _get(s, f'Cookie: theme=dark; sid="{token}"\r\n') for _ in range(20)
                ]

    _drive(rules, which, monkeypatch, clients)
    assert {name for name, _ in spread} == set(NAMES)
    assert all(cookie == (_token_of(backends, name), None, "/") for name, cookie in spread)
    for name, got in pinned.items():
        assert [n for n, _ in got] == [name] * 20, (name, got)
        assert all(_cookie(head) is None for _, head in got)


@pytest.mark.parametrize("which", TWINS)
def test_each_request_of_a_connection_goes_where_its_own_token_says(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per request, not per connection: one keep-alive connection's
    requests, each with another pod's token (the cookie unquoted, as a
    client may send it), go to each one's pod in turn."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends))
    order = "cadbbacd" * 3
    got: list[str] = []

    def clients(address: tuple[str, int], _reload: Callable[[], None]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for name in order:
                got.append(_get(s, f"Cookie: sid={_token_of(backends, name)}\r\n")[0])

    _drive(rules, which, monkeypatch, clients)
    assert "".join(got) == order


@pytest.mark.parametrize("which", TWINS)
def test_a_header_token_and_a_permanent_cookie(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """type Header: the answer's header carries the token (in place of the
    pod's own line of that name, as Envoy sets it), the request's header
    pins (the pod's line then goes as it came); a permanent cookie
    (lifetimeType Permanent) has its absoluteTimeout as Max-Age. Two rules
    of one route, by path."""
    rules = tmp_path / "rules.yaml"
    session = """\
    matches: [{path: {type: PathPrefix, value: /p}}]
    sessionPersistence:
      sessionName: sid
      absoluteTimeout: 1h30m
      cookieConfig: {lifetimeType: Permanent}
  - matches: [{path: {type: PathPrefix, value: /h}}]
    backendRefs:
    - {name: svc-v1, port: 8080, weight: 50}
    - {name: svc-v2, port: 8080, weight: 50}
    sessionPersistence:
      sessionName: X-Session
      type: Header
"""
    rules.write_text(_rules(backends, session))
    permanent: list[tuple[str, Cookie | None]] = []
    header: list[tuple[str, list[bytes]]] = []
    pinned: list[tuple[str, list[bytes]]] = []

    def clients(address: tuple[str, int], _reload: Callable[[], None]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(8):
                name, head = _get(s)
                permanent.append((name, _cookie(head)))
            for _ in range(8):
                s.sendall(b"GET /h HTTP/1.1\r\nHost: gw\r\n\r\n")
                head, body = _answer(s)
                header.append((body, _lines(head, b"x-session")))
            for name in "dbca":
                token = _token_of(backends, name)
                s.sendall(f"GET /h/x HTTP/1.1\r\nHost: gw\r\nX-Session: {token}\r\n\r\n".encode())
                head, body = _answer(s)
                pinned.append((body, _lines(head, b"x-session")))

    _drive(rules, which, monkeypatch, clients)
    assert permanent and all(
        cookie == (_token_of(backends, name), 5400, "/p") for name, cookie in permanent
    )
    assert all(
        lines == [f"x-session: {_token_of(backends, name)}".encode()] for name, lines in header
    )
    assert pinned == [(n, [b"X-Session: upstream"]) for n in "dbca"]


def _answer(s: socket.socket) -> tuple[bytes, str]:
    data = read_head(s)
    while len(data.split(b"\r\n\r\n", 1)[1]) < 1:
        data += s.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), data
    return head, body.decode()


def _lines(head: bytes, name: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n")[1:] if line.lower().startswith(name + b":")]


@pytest.mark.parametrize("which", TWINS)
def test_a_token_of_no_pod_of_the_rule_is_routed_anew_and_never_dialled(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Garbage, a forged token of a listener that is no endpoint (its
    address never dialled: its accepts counted), and the token of a pod
    that a reload removed: each request is routed as one without a token
    and given the token of the pod that answered it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends))
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", 0))
    foreign.listen(64)
    foreign.setblocking(False)
    forged = base64.b64encode(f"127.0.0.1:{foreign.getsockname()[1]}".encode()).decode()
    sent = [
        "%%%not-base64%%%",
        "",
        forged,
        base64.b64encode(b"127.0.0.1").decode(),
        '"' + forged,
        _token_of(backends, "a") + "=",
    ]
    anew: list[tuple[str, Cookie | None]] = []
    after_reload: list[tuple[str, Cookie | None]] = []

    def clients(address: tuple[str, int], reload: Callable[[], None]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(4):
                for value in sent:
                    name, head = _get(s, f"Cookie: sid={value}\r\n")
                    anew.append((name, _cookie(head)))
        rules.write_text(_rules(backends, v1="b"))  # pod a scaled away
        reload()
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(12):
                name, head = _get(s, f'Cookie: sid="{_token_of(backends, "a")}"\r\n')
                after_reload.append((name, _cookie(head)))

    try:
        _drive(rules, which, monkeypatch, clients)
        accepted = 0
        while True:
            try:
                conn, _ = foreign.accept()
            except BlockingIOError:
                break
            conn.close()
            accepted += 1
    finally:
        foreign.close()
    assert accepted == 0
    assert len(anew) == 24
    assert all(cookie == (_token_of(backends, name), None, "/") for name, cookie in anew)
    assert len({name for name, _ in anew}) > 1
    assert {name for name, _ in after_reload} <= set("bcd")
    assert all(cookie == (_token_of(backends, name), None, "/") for name, cookie in after_reload)


@pytest.mark.parametrize("which", TWINS)
def test_the_token_names_the_pod_that_answered_when_its_own_failed(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod a token names refuses connections (gone, its address still
    in the rules): its request goes to the next of its version's pods, and
    the answer gives the client that pod's token, as Envoy's filter
    updates it when another host served the request."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends))
    backends["a"].close()
    got: list[tuple[str, Cookie | None]] = []

    def clients(address: tuple[str, int], _reload: Callable[[], None]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(6):
                name, head = _get(s, f"Cookie: sid={_token_of(backends, 'a')}\r\n")
                got.append((name, _cookie(head)))

    _drive(rules, which, monkeypatch, clients)
    assert got[0] == ("b", (_token_of(backends, "b"), None, "/"))
    assert all(cookie == (_token_of(backends, name), None, "/") for name, cookie in got)


def test_per_connection_routing_says_no_token_is_given(
    backends: dict[str, Backend], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--http-routing connection edits no response: a warning names the
    route whose session persistence it applies only in part."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends))
    warnings = per_connection_warnings(rules, caplog)
    assert any(
        "session persistence" in w and "no token is given" in w and "svc" in w for w in warnings
    ), warnings


@pytest.mark.parametrize("which", TWINS)
def test_the_token_line_is_written_whatever_the_names_around_it(
    which: str, backends: dict[str, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cookie whose name holds a token's text (the compiled relay once
    looked for a token in the line to cut it, and found the name's), and a
    header token whose name a ResponseHeaderModifier also sets: the
    token's line replaces the filter's on an answer that gives one (Envoy's
    header session state sets its header after the route's response
    headers), and the filter's goes as it is where the request's token
    named the pod that answered."""
    rules = tmp_path / "rules.yaml"
    odd = session_token(("0.0.0.0", 0))  # (what the compiled relay searched for)
    session = f"""\
    matches: [{{path: {{type: PathPrefix, value: /p}}}}]
    sessionPersistence: {{sessionName: x{odd}x}}
  - matches: [{{path: {{type: PathPrefix, value: /h}}}}]
    backendRefs:
    - {{name: svc-v1, port: 8080, weight: 50}}
    - {{name: svc-v2, port: 8080, weight: 50}}
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: X-Session, value: fromfilter}}]
        add: [{{name: X-After, value: "1"}}]
    sessionPersistence: {{sessionName: X-Session, type: Header}}
"""
    rules.write_text(_rules(backends, session))
    cookies: list[tuple[str, list[bytes]]] = []
    given: list[tuple[str, list[bytes]]] = []
    kept: list[tuple[str, list[bytes]]] = []

    def clients(address: tuple[str, int], _reload: Callable[[], None]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(4):
                name, head = _get(s)
                cookies.append((name, _lines(head, b"set-cookie")))
            for _ in range(4):
                s.sendall(b"GET /h HTTP/1.1\r\nHost: gw\r\n\r\n")
                head, body = _answer(s)
                given.append((body, [*_lines(head, b"x-session"), *_lines(head, b"x-after")]))
            for name in "dbca":
                token = _token_of(backends, name)
                s.sendall(f"GET /h/x HTTP/1.1\r\nHost: gw\r\nX-Session: {token}\r\n\r\n".encode())
                head, body = _answer(s)
                kept.append((body, [*_lines(head, b"x-session"), *_lines(head, b"x-after")]))

    _drive(rules, which, monkeypatch, clients)
    assert cookies == [
        (n, [f'set-cookie: x{odd}x="{_token_of(backends, n)}"; Path=/p; HttpOnly'.encode()])
        for n, _ in cookies
    ]
    assert given == [
        (n, [f"x-session: {_token_of(backends, n)}".encode(), b"x-after: 1"]) for n, _ in given
    ]
    assert kept == [(n, [b"x-session: fromfilter", b"x-after: 1"]) for n in "dbca"]
