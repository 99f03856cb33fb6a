"""A DestinationRule's ``trafficPolicy.connectionPool`` from the rule file to
the connections a real worker makes: ``http.maxRequestsPerConnection`` and
``tcp.connectTimeout`` per request (both relay twins), ``tcp.connectTimeout``
on the connections Python makes (``--http-routing connection``), and a
warning, never silence, for the pool settings that mode cannot apply."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import _worker_twin, gateway_destination_rule, gateway_service, gateway_worker
from tests.test_relay_endpoint_settings import _never_accepting


def _pool_rule(**fields: str) -> str:
    """A DestinationRule for the gateway's service with *fields* as
    ``section.name: value`` (``http.maxRequestsPerConnection="1"``)."""
    sections: dict[str, list[str]] = {}
    for key, value in fields.items():
        section, name = key.split("__")
        sections.setdefault(section, []).append(f"        {name}: {value}")
    body = "".join(f"      {s}:\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    return gateway_destination_rule("    connectionPool:\n" + body)


def _keepalive_gets(address: tuple[str, int], n: int) -> list[int]:
    """*n* GETs on one keep-alive connection: their statuses."""
    statuses = []
    with socket.create_connection(address, timeout=10) as s:
        for _ in range(n):
            s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
            statuses.append(_status(_response(s)))
    return statuses


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("limit", [None, 1, 2])
def test_max_requests_per_connection_reaches_the_relay(
    which: str, limit: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """6 requests on one keep-alive client connection to a one-endpoint
    service: without a connectionPool one upstream connection serves them
    all (the pool); ``maxRequestsPerConnection: 1`` opens one per request,
    2 one per two."""
    _worker_twin(which, monkeypatch)
    up = Scripted([])
    rules = tmp_path / "rules.yaml"
    text = gateway_service(up.endpoint[1])
    if limit is not None:
        text += _pool_rule(http__maxRequestsPerConnection=str(limit))
    rules.write_text(text)
    got: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, _, address):
            got["settings"] = watcher.state.table.pool_settings()
            loop = asyncio.get_running_loop()
            got["statuses"] = await loop.run_in_executor(None, _keepalive_gets, address, 6)

    try:
        asyncio.run(main())
    finally:
        up.close()
    assert got["statuses"] == [200] * 6
    assert len(up.requests) == 6
    assert up.accepted == {None: 1, 1: 6, 2: 3}[limit], (up.accepted, got["settings"])


@pytest.mark.parametrize("routing", ["request", "connection"])
def test_connect_timeout_per_endpoint_reaches_every_connect(
    routing: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint whose connects never complete (a full accept queue),
    before one that answers, under the worker's 5 s --connect-timeout: with
    the rule's ``tcp.connectTimeout: 100ms`` the connect is given up and the
    request answered by the second endpoint well before 5 s, per request (the
    compiled loop's connect) and per connection (Python's). The bound, 2.5 s,
    leaves the rest to a loaded machine. ``http.maxRequestsPerConnection``
    in the same rule is a warning with --http-routing connection, which
    pools nothing; per request there is none."""
    up = Scripted([])
    with _never_accepting() as hang:
        rules = tmp_path / "rules.yaml"
        # two endpoints in order: round robin starts at the first, the hung one
        rules.write_text(
            gateway_service(hang[1], up.endpoint[1])
            + _pool_rule(tcp__connectTimeout="100ms", http__maxRequestsPerConnection="4")
        )
        got: dict[str, Any] = {}

        def get(address: tuple[str, int]) -> tuple[int, float]:
            t0 = time.monotonic()
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                status = _status(_response(s))
            return status, time.monotonic() - t0

        async def main() -> None:
            async with gateway_worker(rules, http_routing=routing, connect_timeout=5.0) as (
                _,
                _,
                address,
            ):
                got["answer"] = await asyncio.get_running_loop().run_in_executor(None, get, address)

        try:
            with caplog.at_level("WARNING", logger="l4proxy.worker"):
                asyncio.run(main())
        finally:
            up.close()
    status, took = got["answer"]
    assert status == 200 and len(up.requests) == 1
    assert took < 2.5, took
    warned = [r.getMessage() for r in caplog.records if "connectionPool" in r.getMessage()]
    if routing == "connection":
        assert len(warned) == 1 and "maxRequestsPerConnection" in warned[0], warned
        assert f"127.0.0.1:{hang[1]}" in warned[0]
    else:
        assert warned == []


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_reload_changes_the_pool_settings(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings follow the rules: 3 requests on one upstream connection,
    then a reload that adds ``maxRequestsPerConnection: 1`` (3 requests, 3
    new connections: the pooled one, past the new limit, closed at once), then one
    that removes it again (3 requests, 1 new connection)."""
    _worker_twin(which, monkeypatch)
    up = Scripted([])
    rules = tmp_path / "rules.yaml"
    plain = gateway_service(up.endpoint[1])
    rules.write_text(plain)
    accepted: list[int] = []

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, _, address):
            loop = asyncio.get_running_loop()
            for text in (plain, plain + _pool_rule(http__maxRequestsPerConnection="1"), plain):
                if rules.read_text() != text:
                    rules.write_text(text)
                    assert await watcher.reload()
                before = up.accepted
                assert await loop.run_in_executor(None, _keepalive_gets, address, 3) == [200] * 3
                accepted.append(up.accepted - before)

    try:
        asyncio.run(main())
    finally:
        up.close()
    assert accepted == [1, 3, 1], accepted


def test_connection_mode_warns_of_what_the_rules_set_not_of_the_flags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--http-routing connection with --pool-max-requests 5: a rule that
    sets only tcp.connectTimeout (applied there) is no warning, whatever
    the flags; one that sets http.idleTimeout equal to the flag's is."""
    from l4proxy.dataplane._pool_py import PoolOptions

    rules = tmp_path / "rules.yaml"
    warned: list[list[str]] = []
    flags = PoolOptions(idle_timeout=60.0, max_requests=5)
    for pool in ({"tcp__connectTimeout": "250ms"}, {"http__idleTimeout": "60s"}):
        rules.write_text(gateway_service(9) + _pool_rule(**pool))
        caplog.clear()

        async def main() -> None:
            async with gateway_worker(rules, http_routing="connection", pool=flags):
                pass

        with caplog.at_level("WARNING", logger="l4proxy.worker"):
            asyncio.run(main())
        warned.append(
            [r.getMessage() for r in caplog.records if "connectionPool" in r.getMessage()]
        )
    assert warned[0] == []
    assert len(warned[1]) == 1 and "127.0.0.1:9" in warned[1][0], warned
