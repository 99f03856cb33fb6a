"""How the gateway's own answers frame the connection, through a real
worker of each relay twin on a gateway listener (an Istio Gateway and a
VirtualService bound to it), raw requests on loopback:

* an HTTP/1.0 client that asked to keep its connection (``Connection:
  keep-alive``) is told ``connection: keep-alive`` by every answer it gets
  and keeps it: a redirect, the 404 of no route, a direct response, the
  503 of a destination with no endpoint, and an upstream's HTTP/1.1 answer
  that says nothing of it. They said nothing and kept the connection, and
  such a client (ab -k) reads an answer told nothing to the close, so it
  waited;
* a POST whose whole body came with its head, answered by its route
  itself (a redirect, a direct response), keeps the connection, its body
  read and dropped (the access log's BYTES_RECEIVED), as a fault's abort
  does and Envoy does: it closed the connection after every such answer;
  one whose body is not all here still closes it;
* an answer with an empty body (a redirect) has no ``content-type``, as
  Envoy's local reply; one with a body says ``text/plain``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._worker import (
    WEB_HOST,
    drive_gateway,
    every_host_gateway,
    gateway_virtual_service,
    web_entry,
)
from tests.test_access_log_worker import _fields, _read_lines
from tests.test_gateway_session_persistence import Backend

TWINS = ["pure", "compiled"]
Answer = tuple[int, dict[str, str], bytes]  # status, fields (lowercase names), body


def _rules(port: int, pod: Backend) -> str:
    """A Gateway of every host on *port*; a VirtualService of its routes:
    /moved redirects (301), /direct is answered 503 "down", /gone goes to
    a host no entry has (503 no healthy upstream), /ok to *pod*; any other
    path is the 404 no route matched."""
    routes = f"""\
  - match: [{{uri: {{prefix: /moved}}}}]
    redirect: {{uri: /new}}
  - match: [{{uri: {{prefix: /direct}}}}]
    directResponse: {{status: 503, body: {{string: down}}}}
  - match: [{{uri: {{prefix: /gone}}}}]
    route: [{{destination: {{host: gone.default.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /ok}}}}]
    route: [{{destination: {{host: {WEB_HOST}}}}}]
"""
    return (
        every_host_gateway(port)
        + gateway_virtual_service("site", '"*"', routes)
        + web_entry(pod.endpoint[1])
    )


def _drive(
    which: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    talk: Callable[[tuple[str, int]], Any],
) -> tuple[Any, list[bytes]]:
    """*talk(address)* on a thread against a worker of relay twin *which*
    serving _rules() for its own port: what it returned, and the access
    log's lines."""
    pod = Backend("a")
    r, w = os.pipe()
    try:
        said = drive_gateway(
            which,
            monkeypatch,
            tmp_path / "rules.yaml",
            lambda port: _rules(port, pod),
            talk,
            access_log_fd=w,
        )
    finally:
        pod.close()
        os.close(w)
    return said, _read_lines(r)


def _answer(s: socket.socket) -> Answer:
    """The next answer on *s*: its status, header fields and body (framed
    by its content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(fields["content-length"]):
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        body += chunk
    assert len(body) == int(fields["content-length"]), data  # (nothing after it yet)
    return int(lines[0].split()[1]), fields, body


def _closed(s: socket.socket) -> bool:
    """Whether the relay closed *s* (its FIN read within 5 s)."""
    s.settimeout(5)
    try:
        return s.recv(4096) == b""
    except TimeoutError:
        return False


@pytest.mark.parametrize("which", TWINS)
def test_an_http10_client_kept_is_told_keep_alive_by_every_answer(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one HTTP/1.0 connection that asks for keep-alive: the redirect,
    the 404, the direct response, the 503 of no endpoint and the pod's
    answer each say ``connection: keep-alive`` and the connection serves
    the next; a last request that does not ask is told ``connection:
    close`` and closed, as before."""
    paths = ["/moved", "/nothing", "/direct", "/gone", "/ok"]

    def talk(address: tuple[str, int]) -> tuple[list[tuple[int, str | None]], int, bool]:
        with socket.create_connection(address, timeout=10) as s:
            kept: list[tuple[int, str | None]] = []
            for path in paths:
                s.sendall(
                    f"GET {path} HTTP/1.0\r\nHost: site.example\r\n"
                    "Connection: keep-alive\r\n\r\n".encode()
                )
                status, fields, _ = _answer(s)
                kept.append((status, fields.get("connection")))
            s.sendall(b"GET /nothing HTTP/1.0\r\nHost: site.example\r\n\r\n")
            status, fields, _ = _answer(s)
            assert fields.get("connection") == "close", fields
            return kept, status, _closed(s)

    (kept, last, closed), _ = _drive(which, monkeypatch, tmp_path, talk)
    assert kept == [
        (301, "keep-alive"),
        (404, "keep-alive"),
        (503, "keep-alive"),
        (503, "keep-alive"),
        (200, "keep-alive"),
    ]
    assert (last, closed) == (404, True)


@pytest.mark.parametrize("which", TWINS)
def test_a_post_whose_body_came_whole_keeps_the_connection_of_its_routes_answer(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POST with its 5-byte body to the redirect, then one to the direct
    response, each followed on the same connection by a GET the pod
    answers: kept (no ``connection: close``), the bodies read (the log's
    BYTES_RECEIVED 5). A POST whose body is not all here (5 bytes of 10)
    gets the redirect with ``connection: close``, and the close."""

    def talk(address: tuple[str, int]) -> tuple[list[tuple[int, str | None, bytes]], bool]:
        got: list[tuple[int, str | None, bytes]] = []
        with socket.create_connection(address, timeout=10) as s:
            for path in ("/moved", "/direct"):
                s.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: site.example\r\n"
                    "Content-Length: 5\r\n\r\nhello".encode()
                )
                status, fields, _ = _answer(s)
                got.append((status, fields.get("connection"), b""))
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: site.example\r\n\r\n")
                status, fields, body = _answer(s)
                got.append((status, fields.get("connection"), body))
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(
                b"POST /moved HTTP/1.1\r\nHost: site.example\r\nContent-Length: 10\r\n\r\nhello"
            )
            status, fields, _ = _answer(s)
            got.append((status, fields.get("connection"), b""))
            return got, _closed(s)

    (got, closed), lines = _drive(which, monkeypatch, tmp_path, talk)
    assert got == [
        (301, None, b""),
        (200, None, b"a"),
        (503, None, b""),
        (200, None, b"a"),
        (301, "close", b""),
    ]
    assert closed
    posts = [_fields(line) for line in lines if b'"POST ' in line]
    assert [(f["path"], f["code"], f["received"]) for f in posts] == [
        ("/moved", "301", "5"),
        ("/direct", "503", "5"),
        ("/moved", "301", "5"),
    ]


@pytest.mark.parametrize("which", TWINS)
def test_an_empty_bodied_answer_has_no_content_type(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redirect (an empty body) says no content-type, as Envoy's local
    reply; the 404 (a body) says text/plain."""

    def talk(address: tuple[str, int]) -> list[tuple[int, str | None, bytes]]:
        got = []
        with socket.create_connection(address, timeout=10) as s:
            for path in ("/moved", "/nothing"):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: site.example\r\n\r\n".encode())
                status, fields, body = _answer(s)
                got.append((status, fields.get("content-type"), body))
        return got

    got, _ = _drive(which, monkeypatch, tmp_path, talk)
    assert got == [(301, None, b""), (404, "text/plain", b"no route matched")]
