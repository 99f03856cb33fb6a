"""A gateway listener's own answers, the same from both relay twins,
through a real worker of each on loopback (an Istio Gateway of every host
and two VirtualServices bound to it; a backend that answers by path):

* ``l4proxy_decisions_total`` counts every request a route decided, once,
  under the service the decision names: a route's own answers (a
  redirect, a direct response, the 404 of no route matched) too, however
  the request came (origin-form, absolute-form, with Upgrade), and a
  forwarded one under its destination. The compiled relay counted none of
  a route's answers on its fast path, its slow path's (absolute-form,
  Upgrade) under the gateway's service, and the pure one every forwarded
  request under the gateway's service where the compiled one names the
  destination;
* a gateway failure's answer (503, the route timeout's 504) keeps an
  HTTP/1.0 client that asked (``Connection: keep-alive``) when its request
  was read whole, saying ``connection: keep-alive``; it was closed;
* ``OPTIONS *`` is answered 404 before any route is asked, as Envoy's
  connection manager answers a path that is no path; it went to the route
  that takes every path (a sidecar's to a known service the same, in
  network namespaces: Istio's sidecar has a connection manager there);
* every local answer says ``date:``, as Envoy's do;
* a head of ``max_head`` bytes goes up with the forwarding lines added
  (the limit is on what the client sent, as Envoy's); one byte more is
  refused 431.
"""

from __future__ import annotations

import email.utils
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from l4proxy.demo.podnet import PodNetwork
from l4proxy.sidecar.worker import Worker
from tests._worker import (
    WEB_HOST,
    drive_gateway,
    every_host_gateway,
    gateway_virtual_service,
    web_entry,
)
from tests.conftest import accept_until_closed
from tests.mesh import IMPLS, through_a_sidecar
from tests.test_access_log_worker import _fields, _read_lines
from tests.test_worker_gateway_local_answer_framing import Answer, _answer, _closed

TWINS = ["pure", "compiled"]
WEB = WEB_HOST
# an IMF-fixdate (RFC 9110 §5.6.7), as Envoy's date header
IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r" \d{4} \d\d:\d\d:\d\d GMT"
)


class Pod:
    """A backend on 127.0.0.1 that answers by path: ``/slow`` never (the
    connection stays open until the relay closes it), ``/reset`` by
    closing without a byte, any other 200 ``a`` on a keep-alive
    connection; it keeps each request head it read."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = self.server.getsockname()
        self.heads: list[bytes] = []
        accept_until_closed(
            self.server,
            lambda conn: threading.Thread(target=self._serve, args=(conn,), daemon=True).start(),
        )

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads.append(head + b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path == b"/slow":
                    while conn.recv(65536):
                        pass
                    return
                if path == b"/reset":
                    return
                buf = buf[int(_header(head, b"content-length") or 0) :]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")

    def close(self) -> None:
        self.server.close()


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _rules(port: int, pod: Pod) -> str:
    """A Gateway of every host on *port*. site.example: /moved redirects
    (301), /direct is answered 503 "down", /slow times out (504 after
    0.3 s), /reset is closed by the pod (503), /gone goes to a host no
    entry has (503), any other path to the pod. strict.example: /only to
    the pod, any other path the 404 of no route matched."""
    site = f"""\
  - match: [{{uri: {{prefix: /moved}}}}]
    redirect: {{uri: /new}}
  - match: [{{uri: {{prefix: /direct}}}}]
    directResponse: {{status: 503, body: {{string: down}}}}
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: 0.3s
    route: [{{destination: {{host: {WEB}}}}}]
  - match: [{{uri: {{prefix: /reset}}}}]
    route: [{{destination: {{host: {WEB}}}}}]
  - match: [{{uri: {{prefix: /gone}}}}]
    route: [{{destination: {{host: gone.default.svc.cluster.local}}}}]
  - route: [{{destination: {{host: {WEB}}}}}]
"""
    strict = f"""\
  - match: [{{uri: {{prefix: /only}}}}]
    route: [{{destination: {{host: {WEB}}}}}]
"""
    return (
        every_host_gateway(port)
        + gateway_virtual_service("site", "site.example", site)
        + gateway_virtual_service("strict", "strict.example", strict)
        + web_entry(pod.endpoint[1])
    )


class Run:
    """What a worker of one twin did: what the client function returned,
    the access log's lines, its counters' rows (each family's labels and
    value) and the heads its pod read."""

    def __init__(self) -> None:
        self.said: Any = None
        self.lines: list[bytes] = []
        self.rows: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.heads: list[bytes] = []
        self.port = 0


def _drive(
    which: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    talk: Callable[[tuple[str, int]], Any],
    **options: Any,
) -> Run:
    """*talk(address)* on a thread against a worker of relay twin *which*
    serving _rules() for its own port."""
    pod = Pod()
    r, w = os.pipe()
    run = Run()

    def rules(port: int) -> str:
        run.port = port
        return _rules(port, pod)

    def drained(worker: Worker) -> None:
        for name, series in worker.counter_snapshot().items():
            run.rows[name] = [(dict(k), n) for k, n in series.items()]

    try:
        run.said = drive_gateway(
            which,
            monkeypatch,
            tmp_path / "rules.yaml",
            rules,
            talk,
            drained,
            access_log_fd=w,
            **options,
        )
    finally:
        pod.close()
        os.close(w)
    run.lines = _read_lines(r)
    run.heads = pod.heads
    return run


def _each(requests: list[bytes]) -> Callable[[tuple[str, int]], list[Answer]]:
    """A client that sends each request on a connection of its own."""

    def talk(address: tuple[str, int]) -> list[Answer]:
        got = []
        for request in requests:
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(request)
                got.append(_answer(s))
        return got

    return talk


def _get(target: str, host: str = "site.example", more: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{more}\r\n".encode()


@pytest.mark.parametrize("which", TWINS)
def test_every_routed_decision_is_counted_once_under_the_service_it_names(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redirect three ways (origin-form, absolute-form, with Upgrade:
    the compiled fast path and its slow path), the direct response, the
    503 of a destination with no entry, the 404 of no route matched, the
    pod's answer two ways: one decision each, a route's own answers under
    the gateway's service, the pod's under its own (the compiled relay's
    rows and the pure relay's counts alike); OPTIONS * none."""
    upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    requests = [
        _get("/moved"),
        _get("http://site.example/moved"),
        _get("/moved", more=upgrade),
        _get("/direct"),
        _get("/gone"),
        _get("/nothing", host="strict.example"),
        _get("/ok"),
        _get("http://site.example/ok"),
        b"OPTIONS * HTTP/1.1\r\nHost: site.example\r\n\r\n",
    ]
    run = _drive(which, monkeypatch, tmp_path, _each(requests))
    assert [status for status, _, _ in run.said] == [301, 301, 301, 503, 503, 404, 200, 200, 404]
    gateway = f"gateway:default/gw/http.{run.port}"
    got = {
        (d["service"], d["route"], d["subset"]): n for d, n in run.rows["l4proxy_decisions_total"]
    }
    assert got == {
        (f"{gateway}/site.example", "site[0]", "none"): 3,  # the redirect
        (f"{gateway}/site.example", "site[1]", "none"): 1,  # the direct response
        (f"{gateway}/site.example", "site[4]", "default"): 1,  # no entry: 503
        (f"{gateway}/strict.example", "no_route", "none"): 1,
        (WEB, "site[5]", "default"): 2,
    }


@pytest.mark.parametrize("which", TWINS)
def test_a_gateway_failure_keeps_an_http10_client_that_asked(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one HTTP/1.0 connection that asks for keep-alive: the 503 of an
    upstream that closed (a GET, then a POST whose body came whole) and
    the route timeout's 504 each say ``connection: keep-alive`` and the
    connection serves the next request. A POST whose body is not all here
    gets its 503 with ``connection: close`` and the close, as does a
    request that did not ask."""
    keep = "Connection: keep-alive\r\n"

    def talk(address: tuple[str, int]) -> tuple[list[tuple[int, str | None]], bool, bool]:
        kept = []
        with socket.create_connection(address, timeout=10) as s:
            for request in (
                f"GET /reset HTTP/1.0\r\nHost: site.example\r\n{keep}\r\n",
                f"GET /slow HTTP/1.0\r\nHost: site.example\r\n{keep}\r\n",
                f"POST /reset HTTP/1.0\r\nHost: site.example\r\n{keep}"
                "Content-Length: 5\r\n\r\nhello",
                f"GET /ok HTTP/1.0\r\nHost: site.example\r\n{keep}\r\n",
                "GET /reset HTTP/1.0\r\nHost: site.example\r\n\r\n",
            ):
                s.sendall(request.encode())
                status, fields, _ = _answer(s)
                kept.append((status, fields.get("connection")))
            last_closed = _closed(s)
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(
                f"POST /reset HTTP/1.0\r\nHost: site.example\r\n{keep}"
                "Content-Length: 10\r\n\r\nhello".encode()
            )
            status, fields, _ = _answer(s)
            kept.append((status, fields.get("connection")))
            cut_closed = _closed(s)
        return kept, last_closed, cut_closed

    kept, last_closed, cut_closed = _drive(which, monkeypatch, tmp_path, talk).said
    assert kept == [
        (503, "keep-alive"),
        (504, "keep-alive"),
        (503, "keep-alive"),
        (200, "keep-alive"),
        (503, "close"),
        (503, "close"),
    ]
    assert last_closed and cut_closed


@pytest.mark.parametrize("which", TWINS)
def test_options_asterisk_is_answered_404_before_any_route(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OPTIONS *`` to a host whose last route takes every path: 404, no
    body, before any route (no decision; Istio's labels unknown; the
    access log's details Envoy's ``absolute_path_rejected``, no route, no
    cluster), the connection kept for the next request, which the pod
    answers; the pod never sees the OPTIONS."""

    def talk(address: tuple[str, int]) -> list[Answer]:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: site.example\r\n\r\n")
            first = _answer(s)
            s.sendall(_get("/ok"))
            return [first, _answer(s)]

    run = _drive(which, monkeypatch, tmp_path, talk)
    (status, fields, body), after = run.said
    assert (status, fields.get("content-length"), body, fields.get("connection")) == (
        404,
        "0",
        b"",
        None,
    )
    assert after[0] == 200
    assert [h.split(b" ", 1)[0] for h in run.heads] == [b"GET"]
    assert [(d["route"], n) for d, n in run.rows["l4proxy_decisions_total"]] == [("site[5]", 1)]
    istio = [d for d, _ in run.rows["istio_requests_total"] if d["response_code"] == "404"]
    assert [d["destination_service"] for d in istio] == ["unknown"]
    (line,) = [_fields(line) for line in run.lines if b'"OPTIONS ' in line]
    assert (line["code"], line["details"], line["cluster"], line["route"]) == (
        "404",
        "absolute_path_rejected",
        "-",
        "-",
    )


@pytest.mark.parametrize("which", TWINS)
def test_every_local_answer_says_the_date(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redirect, the direct response, the 404s of no route and of
    OPTIONS *, the 503 of /reset and the 504 each say ``date:``, an IMF-fixdate of
    the second they were sent; the pod's answer goes as it came (the
    forwarded path adds nothing)."""
    requests = [
        _get("/moved"),
        _get("/direct"),
        _get("/nothing", host="strict.example"),
        b"OPTIONS * HTTP/1.1\r\nHost: site.example\r\n\r\n",
        _get("/reset"),
        _get("/slow"),
        _get("/ok"),
    ]
    before = int(time.time())
    run = _drive(which, monkeypatch, tmp_path, _each(requests))
    after = time.time()
    statuses = [status for status, _, _ in run.said]
    assert statuses == [301, 503, 404, 404, 503, 504, 200]
    for status, fields, _ in run.said[:-1]:
        date = fields.get("date", "")
        assert IMF_FIXDATE.fullmatch(date), (status, fields)
        second = email.utils.parsedate_to_datetime(date).timestamp()
        assert before <= second <= after, date
        assert date == email.utils.formatdate(second, usegmt=True)  # (its weekday too)
    assert "date" not in run.said[-1][1]


@pytest.mark.parametrize("which", TWINS)
def test_a_head_of_max_head_goes_up_with_its_forwarding_lines(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With max_head 1024: a head of 1024 bytes reaches the pod with the
    forwarding lines and the first try's x-envoy-attempt-count added after
    it (1024 + 168 bytes for a client on 127.0.0.1: the bound is the limit
    plus those lines, see forwarding.py), one of 1025 bytes is refused 431
    and goes nowhere."""
    limit = 1024

    def head(size: int) -> bytes:
        start = b"GET /ok HTTP/1.1\r\nHost: site.example\r\nX-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    requests = [head(limit), head(limit + 1)]
    assert [len(r) for r in requests] == [limit, limit + 1]
    run = _drive(which, monkeypatch, tmp_path, _each(requests), max_head=limit)
    assert [status for status, _, _ in run.said] == [200, 431]
    added = (
        b"x-forwarded-for: 127.0.0.1\r\n"
        b"x-forwarded-proto: http\r\n"
        b"x-envoy-external-address: 127.0.0.1\r\n"
        b"x-request-id: " + b"0" * 36 + b"\r\n"
        b"x-envoy-attempt-count: 1\r\n"
    )
    assert len(added) == 168
    (sent,) = run.heads
    assert len(sent) == limit + len(added)
    assert sent.startswith(requests[0][:-2]), sent


# a backend that answers each request 200 with its method, keep-alive
ECHO_METHOD = r"""
import socket, sys, threading
def serve(c):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = c.recv(65536)
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        method = head.split(b" ", 1)[0]
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(method) + method)
s = socket.create_server(("", int(sys.argv[1])), backlog=64)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
# OPTIONS *, then a GET, on one connection to the service's address: each
# answer's status line and body
ASTERISK_CLIENT = """
import socket, sys
c = socket.create_connection(("198.19.0.30", 8080), 10)
out = []
for request in (b"OPTIONS * HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n",
                b"GET /x HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n"):
    c.sendall(request)
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += c.recv(65536)
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    fields = dict(line.partition(b":")[::2] for line in head.lower().split(b"\\r\\n")[1:])
    n = int(fields[b"content-length"])
    while len(body) < n:
        body += c.recv(65536)
    out.append(head.split(b"\\r\\n")[0] + b" " + body)
sys.stdout.buffer.write(b"\\n".join(out))
"""


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_sidecar_answers_options_asterisk_to_a_known_service_404(
    pod_network: PodNetwork, impl: str
) -> None:
    """A client pod's OPTIONS * to a ServiceEntry's address, routed per
    request by its sidecar: 404 before any route, as the HTTP connection
    manager of Istio's sidecar on that port answers it; the connection
    stays, the GET after it reaches the pod. It went to the pod."""
    got = through_a_sidecar(pod_network, impl, ECHO_METHOD, ASTERISK_CLIENT)
    assert got.split(b"\n") == [b"HTTP/1.1 404 Not Found ", b"HTTP/1.1 200 OK GET"]
