"""Redirects whose Location the request's own target or Host cannot make,
through a real worker of each relay twin on gateway listeners, raw
requests on loopback: an Istio Gateway server of every host with
``tls.httpsRedirect`` (the first listener), and a VirtualService redirect
to https that keeps the Host (the second).

They were answered 301 with ``https:///productpage`` (an HTTP/1.0
request without Host, an empty ``Host:``), ``https://a.example.com:/p``
(a Host's empty port: its ``:`` kept), ``https://a.example.com*``
(``OPTIONS *``), ``https://a.example.com`` (``CONNECT``: no path). Now: a
Location with no host is never written, 400 instead (Envoy answers 400 to
a request without Host, and Istio's 426 to any HTTP/1.0 one); an empty
port is left out; a target that is no path is not redirected: ``OPTIONS
*`` 404 and ``CONNECT`` 403, as Envoy answers them (at a gateway listener
``OPTIONS *`` is answered before any route is asked, with no body, as
Envoy's connection manager does: test_worker_gateway_answers_twins.py). A
relative redirect (the path alone, no scheme to change) still needs no
host."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from l4proxy.dataplane.listener import bind_listener
from tests._worker import (
    WEB_HOST,
    _worker_twin,
    gateway_virtual_service,
    web_entry,
    worker_on,
)
from tests.test_gateway_session_persistence import Backend
from tests.test_worker_gateway_local_answer_framing import Answer, _answer

TWINS = ["pure", "compiled"]


def _rules(redirecting: int, plain: int, pod: Backend) -> str:
    gateway = f"""\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {redirecting}, name: http, protocol: HTTP}}
    hosts: ["*"]
    tls: {{httpsRedirect: true}}
  - port: {{number: {plain}, name: http-plain, protocol: HTTP}}
    hosts: ["*"]
"""
    routes = f"""\
  - match: [{{uri: {{prefix: /tohttps}}}}]
    redirect: {{scheme: https}}
  - match: [{{uri: {{prefix: /moved}}}}]
    redirect: {{uri: /new}}
  - route: [{{destination: {{host: {WEB_HOST}}}}}]
"""
    return gateway + gateway_virtual_service("site", '"*"', routes) + web_entry(pod.endpoint[1])


# (the listener it goes to, the request)
CASES: list[tuple[str, bytes]] = [
    ("redirecting", b"GET /productpage HTTP/1.0\r\n\r\n"),
    ("redirecting", b"GET /p HTTP/1.1\r\nHost:\r\n\r\n"),
    ("redirecting", b"GET /p HTTP/1.1\r\nHost: a.example.com:\r\n\r\n"),
    ("redirecting", b"OPTIONS * HTTP/1.1\r\nHost: a.example.com\r\n\r\n"),
    ("redirecting", b"CONNECT a.example.com:443 HTTP/1.1\r\nHost: a.example.com:443\r\n\r\n"),
    ("plain", b"GET /tohttps HTTP/1.1\r\nHost:\r\n\r\n"),
    ("plain", b"GET /moved HTTP/1.0\r\n\r\n"),
]


@pytest.mark.parametrize("which", TWINS)
def test_a_redirect_that_has_no_host_or_no_path_is_not_written(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case on a connection of its own, then a plain GET on the same
    connection where the answer kept it: the answers' status, location
    and body, and that the next request was served (its 301)."""
    _worker_twin(which, monkeypatch)
    pod = Backend("a")
    got: list[tuple[int, str | None, bytes]] = []
    after: list[tuple[int, str | None]] = []

    def client(addresses: dict[str, tuple[str, int]]) -> None:
        for listener, request in CASES:
            with socket.create_connection(addresses[listener], timeout=10) as s:
                s.sendall(request)
                status, fields, body = _answer(s)
                got.append((status, fields.get("location"), body))
                if request.startswith(b"GET /p HTTP/1.1") or request.startswith(b"OPTIONS"):
                    s.sendall(b"GET /x HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
                    answer: Answer = _answer(s)
                    after.append((answer[0], answer[1].get("location")))

    async def main() -> None:
        redirecting = bind_listener("127.0.0.1", 0, "gateway")
        plain = bind_listener("127.0.0.1", 0, "gateway")
        path = tmp_path / "rules.yaml"
        path.write_text(_rules(redirecting.address[1], plain.address[1], pod))
        seeded = {"seed": 7}
        async with worker_on(
            [redirecting, plain], path, watcher_options=seeded, http_routing="request"
        ):
            addresses = {"redirecting": redirecting.address, "plain": plain.address}
            await asyncio.get_running_loop().run_in_executor(None, client, addresses)

    try:
        asyncio.run(main())
    finally:
        pod.close()
    assert got == [
        (400, None, b"no host to redirect to"),
        (400, None, b"no host to redirect to"),
        (301, "https://a.example.com/p", b""),
        (404, None, b""),  # (before any route: no redirect's)
        (403, None, b"CONNECT is not redirected"),
        (400, None, b"no host to redirect to"),
        (301, "/new", b""),
    ]
    assert after == [(301, "https://a.example.com/x")] * 3
