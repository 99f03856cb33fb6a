"""A request whose Transfer-Encoding is anything but exactly one ``chunked``
(``identity, chunked``, ``gzip, chunked`` on one line or two, ``,chunked``,
``chunked,``, a ``chunked`` line and an empty one), through a real worker
on a gateway listener: per request with each relay twin (pipelined behind
a good request), and per connection with each head parser twin (the first
head). Its chunked body holds a request.

It is answered 501 with ``connection: close`` and the connection closed,
as Envoy answers it (``http1.invalid_transfer_encoding``, the access log's
RESPONSE_CODE_DETAILS; per connection, l4proxy_refused_total's reason);
nothing of it reaches the backend. It was forwarded as sent, framed as
chunked: a backend that takes a body for chunked only when the field says
exactly ``chunked`` (and otherwise reads none) read the chunked body as
further requests (the smuggled ``GET /smuggled``). The compiled relay frames
only a ``chunked`` line alone (relay.pyx ``chunked_only()``) and hands the
others to the pure relay, whose head parser refuses them.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import gateway_service, gateway_worker
from tests.test_access_log_worker import TEXT_LINE, _read_lines
from tests.test_relay_retries import _worker_twin
from tests.test_worker_connection_first_head import (
    BEHIND,
    BEHIND_IDS,
    BODY,
    FIRST,
    refused_and_closed,
)

CODINGS = {
    "identity-chunked": b"identity, chunked",
    "gzip-chunked": b"gzip, chunked",
    "comma-chunked": b",chunked",
    "chunked-comma": b"chunked,",
    "gzip-line-chunked-line": b"gzip\r\nTransfer-Encoding: chunked",
    "chunked-line-empty-line": b"chunked\r\nTransfer-Encoding: ",
}


def _post(coding: bytes) -> bytes:
    return b"POST /c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: %s\r\n\r\n%s" % (coding, BODY)


@pytest.mark.parametrize("coding", list(CODINGS))
@pytest.mark.parametrize(("routing", "behind"), BEHIND, ids=BEHIND_IDS)
def test_a_transfer_encoding_other_than_chunked_is_501_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routing: str, behind: bool, coding: str
) -> None:
    # (closed after it: the body is no request)
    refused_and_closed(
        tmp_path,
        monkeypatch,
        routing,
        behind,
        _post(CODINGS[coding]),
        501,
        b"HTTP/1.1 501 Not Implemented",
        b"Transfer-Encoding other than chunked",
        "http1.invalid_transfer_encoding",
    )


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_the_501s_line_says_invalid_transfer_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """Per request: the refused head's access log line says 501, DPE and
    Envoy's details for it (a head refused otherwise says
    http1.codec_error)."""
    _worker_twin(which, monkeypatch)
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    r, w = os.pipe()

    def talk(address: tuple[str, int]) -> list[int]:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(FIRST + _post(CODINGS["gzip-chunked"]))
            return [_status(_response(s)) for _ in range(2)]

    async def main() -> list[int]:
        async with gateway_worker(rules, http_routing="request", access_log_fd=w) as (_, _w, a):
            return await asyncio.get_running_loop().run_in_executor(None, talk, a)

    try:
        statuses = asyncio.run(main())
    finally:
        os.close(w)
        backend.close()
    assert statuses == [200, 501]
    fields = [TEXT_LINE.fullmatch(line.decode()) for line in _read_lines(r)]
    assert all(fields), fields
    got = [(f["code"], f["flags"], f["details"]) for f in fields if f]
    assert got == [("200", "-", "via_upstream"), ("501", "DPE", "http1.invalid_transfer_encoding")]
