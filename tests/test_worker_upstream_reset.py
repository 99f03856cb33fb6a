"""An upstream that closes or resets its connection before any byte of the
response, through a real worker of each relay twin: the client gets
Envoy's answer to an upstream reset for connection termination (503,
``upstream connect error or disconnect/reset before headers. reset reason:
connection termination``, response flag UC; Envoy's router,
``onUpstreamReset()``), and its connection stays; once a route's retry
policy has retried the request, the answer says ``retried and the latest
reset reason``, as Envoy's does after a retry. Where Envoy answers 502 (a
response head that cannot be parsed: a protocol error) the 502 stays."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests._scripted import CLOSE, OK_BODY, Scripted, Step, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    gateway_routes,
    gateway_service,
    gateway_worker,
)
from tests.conftest import reset_close

HOST = "svc.default.svc.cluster.local"
RESET = (
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: connection termination"
)
RESET_RETRIED = (
    b"upstream connect error or disconnect/reset before headers. "
    b"retried and the latest reset reason: connection termination"
)
RETRIED_ON_RESET = gateway_routes(
    f"  - route: [{{destination: {{host: {GATEWAY_HOST}}}}}]\n"
    "    retries: {attempts: 2, retryOn: reset}\n"
)


def _ask(script: list[Step], rules: str, tmp_path: Path, requests: int) -> tuple[list[bytes], int]:
    """*requests* GETs on one keep-alive client connection through a real
    worker on a gateway listener to a Scripted backend: the responses, and
    the requests the backend read."""
    up = Scripted(script)
    path = tmp_path / "rules.yaml"
    path.write_text(gateway_service(up.endpoint[1]) + rules)
    got: list[bytes] = []

    def client(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=10) as s:
            for _ in range(requests):
                s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
                got.append(_response(s))

    async def main() -> None:
        async with gateway_worker(path, http_routing="request") as (_, _w, address):
            await asyncio.get_running_loop().run_in_executor(None, client, address)

    try:
        asyncio.run(main())
    finally:
        up.close()
    return got, len(up.requests)


def _body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("end", [CLOSE, reset_close], ids=["close", "reset"])
def test_a_connection_ended_before_the_response_is_envoy_s_503(
    which: str, end: Step, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend reads the request and closes (a FIN) or resets (an RST)
    without a byte: 503 with Envoy's body, the client's connection kept
    (the request was read whole), whose next request the backend answers."""
    _worker_twin(which, monkeypatch)
    got, seen = _ask([end], "", tmp_path, 2)
    assert [_status(r) for r in got] == [503, 200], got
    assert _body(got[0]) == RESET, got[0]
    assert b"\r\ncontent-type: text/plain\r\n" in got[0]
    assert _body(got[1]) == OK_BODY and seen == 2


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_retried_request_says_so_when_the_retries_run_out(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``retries: {attempts: 2, retryOn: reset}`` and a backend that closes
    every connection before a byte: three tries, then 503 with Envoy's body
    after a retry; the next request, answered at its first try, is 200."""
    _worker_twin(which, monkeypatch)
    got, seen = _ask([CLOSE] * 3, RETRIED_ON_RESET, tmp_path, 2)
    assert [_status(r) for r in got] == [503, 200], got
    assert _body(got[0]) == RESET_RETRIED, got[0]
    assert seen == 4


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",  # a status line it cannot parse
        b"HTTP/1.1 200 OK\r\nContent-Len",  # a head cut short by the close
    ],
    ids=["unparseable", "head-cut-short"],
)
def test_a_response_head_envoy_cannot_parse_is_still_502(
    which: str, answer: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A protocol error to Envoy (its HTTP/1 codec refuses the head, or
    reaches the end of the connection within it): 502, as Envoy answers
    it, not the 503 of a connection that ended before any byte."""
    _worker_twin(which, monkeypatch)
    got, _ = _ask([(answer, CLOSE)], "", tmp_path, 1)
    assert _status(got[0]) == 502, got
    assert not _body(got[0]).startswith(b"upstream connect error"), got[0]
