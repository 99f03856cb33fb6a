"""A DestinationRule's ``loadBalancer.consistentHash`` from the rule file to a
real worker, both relay twins, over keep-alive connections: every request of
a user (a header, a cookie) lands on the endpoint the rendezvous order
(verdict.hash_order) names for its value, on whichever connection it comes;
a cookie the proxy generated brings the client back to the endpoint that
served it; and when an endpoint goes (a reload scales it away) only the
users it served move. The pure twin draws in the route table, the compiled
one in its loop from the cached verdict: both must agree with the same
prediction."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from l4proxy.dataplane.verdict import endpoint_hash, hash_key, hash_order
from tests._worker import _worker_twin, gateway_destination_rule, gateway_service, gateway_worker
from tests.test_gateway_session_persistence import _get
from tests.test_least_request import Backend

NAMES = "abcd"
USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    out = [Backend(n) for n in NAMES]
    yield out
    for b in out:
        b.close()


def _rules(backends: list[Backend], policy: str) -> str:
    return gateway_service(*(b.endpoint[1] for b in backends)) + gateway_destination_rule(
        f"    loadBalancer:\n      consistentHash: {policy}\n"
    )


def _predict(backends: list[Backend], value: str) -> str:
    hashes = [endpoint_hash(b.endpoint) for b in backends]
    return backends[hash_order(hash_key(value.encode()), hashes)[0]].name


def _drive(rules: Path, routing: str, clients: Callable[[tuple[str, int]], None]) -> None:
    """*clients* (run on a thread, given the listener's address) against a
    real worker on *rules*, with --http-routing *routing*."""

    async def main() -> None:
        async with gateway_worker(rules, http_routing=routing) as (_, _w, address):
            await asyncio.get_running_loop().run_in_executor(None, clients, address)

    asyncio.run(main())


def _users_on(address: tuple[str, int], rounds: int = 3) -> dict[str, set[str]]:
    """Each user's requests, *rounds* each, spread over four keep-alive
    connections (a user's on a different one each round): who answered."""
    seen: dict[str, set[str]] = {u: set() for u in USERS}
    conns = [socket.create_connection(address, timeout=10) for _ in range(4)]
    try:
        for r in range(rounds):
            for i, user in enumerate(USERS):
                name, _ = _get(conns[(i + r) % 4], f"x-user: {user}\r\n")
                seen[user].add(name)
    finally:
        for s in conns:
            s.close()
    return seen


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_header_pins_each_user_and_scaling_down_moves_only_its_users(
    which: str, backends: list[Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends, "{httpHeaderName: x-user}"))
    got: dict[str, dict[str, set[str]]] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (watcher, _, address):
            loop = asyncio.get_running_loop()
            got["before"] = await loop.run_in_executor(None, _users_on, address)
            rules.write_text(_rules(backends[:3], "{httpHeaderName: x-user}"))  # d scaled away
            assert await watcher.reload()
            got["after"] = await loop.run_in_executor(None, _users_on, address)

    asyncio.run(main())
    before = {u: _predict(backends, u) for u in USERS}
    after = {u: _predict(backends[:3], u) for u in USERS}
    assert got["before"] == {u: {before[u]} for u in USERS}
    assert len(set(before.values())) == 4  # (40 users: every endpoint has some)
    assert got["after"] == {u: {after[u]} for u in USERS}
    moved = {u for u in USERS if after[u] != before[u]}
    assert moved == {u for u in USERS if before[u] == "d"} != set()


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_generated_cookie_brings_the_client_back(
    which: str, backends: list[Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends, "{httpCookie: {name: sid, path: /, ttl: 3600s}}"))
    sessions: list[tuple[str, str, list[str]]] = []  # (cookie value, first, then)

    def browse(address: tuple[str, int]) -> None:
        for _ in range(12):  # a client each: no cookie, then the one it got, back
            with socket.create_connection(address, timeout=10) as s:
                first, head = _get(s)
                lines = [
                    line for line in head.split(b"\r\n") if line.lower().startswith(b"set-cookie:")
                ]
                assert len(lines) == 1, head
                m = re.fullmatch(
                    rb'set-cookie: sid="([0-9a-f]{16})"; Max-Age=3600; Path=/; HttpOnly', lines[0]
                )
                assert m, lines
                value = m.group(1).decode()
                then = []
                for _ in range(3):
                    name, again = _get(s, f'Cookie: theme=dark; sid="{value}"\r\n')
                    assert b"set-cookie" not in again.lower(), again
                    then.append(name)
                sessions.append((value, first, then))

    _drive(rules, "request", browse)
    for value, first, then in sessions:
        assert first == _predict(backends, value), (value, first)
        assert then == [first] * 3, (value, first, then)
    assert len({v for v, _, _ in sessions}) == len(sessions)  # a new cookie each
    assert len({first for _, first, _ in sessions}) > 1  # (12 clients: not all on one)


def test_per_connection_a_header_decides_the_connection_and_cookies_are_a_warning(
    backends: list[Backend], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--http-routing connection: a connection goes where its first request
    hashes (each user's own connection still lands on the predicted
    endpoint); a policy that would generate a cookie is named in a warning
    (no response is edited at L4)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        _rules(backends, "{httpHeaderName: x-user}")
        + """
  subsets:
  - name: sticky
    trafficPolicy:
      loadBalancer: {consistentHash: {httpCookie: {name: sid, ttl: 0s}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.default.svc.cluster.local]
  http:
  - match: [{headers: {x-sticky: {exact: "1"}}}]
    route: [{destination: {host: svc.default.svc.cluster.local, subset: sticky}}]
  - route: [{destination: {host: svc.default.svc.cluster.local}}]
"""
    )
    seen: dict[str, list[str]] = {}

    def users(address: tuple[str, int]) -> None:
        for user in USERS[:12]:
            with socket.create_connection(address, timeout=10) as s:
                seen[user] = [_get(s, f"x-user: {user}\r\n")[0] for _ in range(2)]

    with caplog.at_level(logging.WARNING):
        _drive(rules, "connection", users)
    assert seen == {u: [_predict(backends, u)] * 2 for u in USERS[:12]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "--http-routing connection" in w and "svc.default.svc.cluster.local subset sticky" in w
        for w in warnings
    ), warnings


@pytest.mark.parametrize(
    ("which", "routing"),
    [("pure", "request"), ("compiled", "request"), ("pure", "connection")],
)
def test_the_clients_address_pins_each_client(
    which: str,
    routing: str,
    backends: list[Backend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """useSourceIp: each client address (127.0.0.2 to .25, all of 127/8
    being local) lands where the rendezvous order puts its packed address,
    on every request of two connections each, whatever its headers say;
    per request, and per connection (--http-routing connection)."""
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends, "{useSourceIp: true}"))
    clients = [f"127.0.0.{i}" for i in range(2, 26)]
    seen: dict[str, set[str]] = {c: set() for c in clients}

    def visit(address: tuple[str, int]) -> None:
        for _ in range(2):
            for i, client in enumerate(clients):
                with socket.create_connection(address, timeout=10, source_address=(client, 0)) as s:
                    for n in range(2):
                        seen[client].add(_get(s, f"x-user: {i}-{n}\r\n")[0])

    _drive(rules, routing, visit)
    hashes = [endpoint_hash(b.endpoint) for b in backends]
    want = {
        c: {backends[hash_order(hash_key(socket.inet_aton(c)), hashes)[0]].name} for c in clients
    }
    assert seen == want
    assert len({n for names in want.values() for n in names}) > 1


# X-Forwarded-For values from a load balancer in front (--trusted-proxies 1:
# the last address is its client's) and the client address each names: a
# first hop's own list before it, IPv6, spaces; an element that is no
# address, and an empty value, name none (the connection's peer then)
FORWARDED = [
    *((f"10.1.0.{i}", f"10.1.0.{i}") for i in range(1, 21)),
    ("203.0.113.9, 10.1.0.3", "10.1.0.3"),
    ("10.1.0.4,2001:db8::7", "2001:db8::7"),
    ("2001:DB8:0:0::8 ", "2001:db8::8"),
    ("10.1.0.5, unknown", None),
    ("", None),
]


@pytest.mark.parametrize("which", ["pure", "compiled"])
@pytest.mark.parametrize("trusted", [1, 0])
def test_a_trusted_proxy_s_client_is_the_source_ip_hashed(
    which: str,
    trusted: int,
    backends: list[Backend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """useSourceIp at a gateway behind a load balancer (--trusted-proxies
    1): every request comes from the balancer's address (127.0.0.1), and
    each lands where the rendezvous order puts its client's address, the
    last of its X-Forwarded-For (what x-envoy-external-address says, and
    Envoy's downstream remote address, which its hash policy reads); twice
    each, on two keep-alive connections, in both orders. Where that names
    no address, and with 0 trusted proxies whatever it says, the
    connection's address is hashed."""
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(backends, "{useSourceIp: true}"))
    seen: dict[str, set[str]] = {xff: set() for xff, _ in FORWARDED}

    def visit(address: tuple[str, int]) -> None:
        conns = [socket.create_connection(address, timeout=10) for _ in range(2)]
        try:
            for r, order in enumerate((FORWARDED, FORWARDED[::-1])):
                for i, (xff, _) in enumerate(order):
                    line = f"x-forwarded-for: {xff}\r\n" if xff else ""
                    seen[xff].add(_get(conns[(i + r) % 2], line)[0])
        finally:
            for s in conns:
                s.close()

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request", trusted_proxies=trusted) as (
            _,
            _w,
            address,
        ):
            await asyncio.get_running_loop().run_in_executor(None, visit, address)

    asyncio.run(main())
    hashes = [endpoint_hash(b.endpoint) for b in backends]

    def packed(text: str | None) -> bytes:
        if text is None or not trusted:
            return socket.inet_aton("127.0.0.1")
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        return socket.inet_pton(family, text)

    want = {
        xff: {backends[hash_order(hash_key(packed(client)), hashes)[0]].name}
        for xff, client in FORWARDED
    }
    assert seen == want
    assert len({n for names in want.values() for n in names}) == (4 if trusted else 1)
