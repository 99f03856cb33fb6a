"""A VirtualService's ``headers``, ``rewrite`` and ``redirect`` from the rule
file to a real worker, both relay twins: on one keep-alive connection the
request the rewrite route takes reaches the backend with its path and headers
edited and comes back with the response's edits, the redirect is answered
without the backend, and after a reload that drops the edits the next
request on the same connection goes as it came (a rollback reaches existing
connections). Per connection (``--http-routing connection``) the redirect
is still answered, and the edits, which need the per-request relay, are
said in a warning."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_worker,
)

HOST = GATEWAY_HOST

EDITS = gateway_routes(
    f"""\
  - name: moved
    match: [{{uri: {{prefix: /old}}}}]
    redirect: {{uri: /new}}
  - name: api
    match: [{{uri: {{prefix: /api}}}}]
    rewrite: {{uri: /v2}}
    headers:
      request:
        set: {{x-version: v1}}
        remove: [x-debug]
      response:
        add: {{x-served-by: l4proxy}}
        remove: [x-internal]
    route:
    - destination: {{host: {HOST}}}
      headers:
        request:
          add: {{x-destination: svc}}
"""
)

# the same routes without the edits: the rollback
PLAIN = gateway_routes(
    f"""\
  - name: api
    route:
    - destination: {{host: {HOST}}}
"""
)

BACKEND_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-internal: secret\r\nX-Served-By: app\r\n\r\nok"
)


def _ask(s: socket.socket, target: str, extra: str = "") -> bytes:
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n".encode())
    return _response(s)


def _head_lines(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line.lower() for line in head.split(b"\r\n")]


def _run_keepalive(rules: Path, up: Scripted, **options: Any) -> dict[str, Any]:
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, **options) as (watcher, _, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                got["api"] = await loop.run_in_executor(
                    None, _ask, s, "/api/users?id=1", "X-Version: v0\r\nx-debug: 1\r\n"
                )
                got["moved"] = await loop.run_in_executor(None, _ask, s, "/old/page")
                rules.write_text(gateway_service(up.endpoint[1]) + PLAIN)
                assert await watcher.reload()
                got["after"] = await loop.run_in_executor(
                    None, _ask, s, "/api/users?id=1", "x-debug: 1\r\n"
                )

    asyncio.run(main())
    return got


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_edits_rewrite_and_redirect_per_request_and_their_rollback(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    up = Scripted([BACKEND_ANSWER, BACKEND_ANSWER])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]) + EDITS)
    try:
        got = _run_keepalive(rules, up, http_routing="request")
    finally:
        up.close()
    assert len(up.requests) == 2  # the redirect never reached the backend
    first, after = (_head_lines(r) for r in up.requests)
    # the rewrite (prefix /api -> /v2, the query kept), x-version set (the
    # client's line replaced), x-debug removed, the destination's line added
    assert first[0] == b"get /v2/users?id=1 http/1.1", first
    assert b"x-version: v1" in first and b"x-version: v0" not in first, first
    assert not [line for line in first if line.startswith(b"x-debug")], first
    assert b"x-destination: svc" in first, first
    # the response: x-served-by added beside the application's, x-internal removed
    api = _head_lines(got["api"])
    assert _status(got["api"]) == 200 and got["api"].endswith(b"\r\n\r\nok")
    assert api.count(b"x-served-by: l4proxy") == 1 and b"x-served-by: app" in api, api
    assert not [line for line in api if line.startswith(b"x-internal")], api
    # the redirect: 301 to the new path, answered by the proxy
    moved = _head_lines(got["moved"])
    assert _status(got["moved"]) == 301, got["moved"]
    assert b"location: http://gw/new" in moved, moved
    # after the rollback, on the same connection: as it came
    assert after[0] == b"get /api/users?id=1 http/1.1", after
    assert b"x-debug: 1" in after and b"x-destination: svc" not in after, after
    assert b"x-internal: secret" in _head_lines(got["after"])


def test_per_connection_the_redirect_is_answered_and_the_edits_are_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--http-routing connection: the first request of a connection decides
    it; a redirect route answers it, and the edits (the per-request relay's)
    are named in a warning when the table goes live."""
    up = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]) + EDITS)
    got: dict[str, bytes] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="connection") as (_, _w, address):
            loop = asyncio.get_running_loop()
            for target in ("/old/page", "/api/x"):
                async with connected(address) as s:
                    got[target] = await loop.run_in_executor(None, _ask, s, target)

    with caplog.at_level(logging.WARNING):
        try:
            asyncio.run(main())
        finally:
            up.close()
    assert _status(got["/old/page"]) == 301
    assert b"location: http://gw/new" in _head_lines(got["/old/page"])
    assert _status(got["/api/x"]) == 200 and len(up.requests) == 1
    assert _head_lines(up.requests[0])[0] == b"get /api/x http/1.1"  # not rewritten
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--http-routing connection" in w and f"{HOST} svc/api" in w for w in warnings), (
        warnings
    )
