"""A gateway listener's forwarding headers (``l4proxy/dataplane/forwarding.py``:
X-Forwarded-For, X-Forwarded-Proto, x-envoy-external-address, x-request-id,
as an Istio ingress gateway's Envoy sets them) through a real worker, both
relay twins, keep-alive connections on loopback: what the backend receives,
exactly (``Scripted`` records each request's bytes), what the access log
says of it, and what a mirror gets; the twins send byte-identical heads for
one seed. A sidecar's transparent requests go without them: a client pod's
captured request through ``l4proxy run`` in network namespaces."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import upstream_head, with_attempt_count
from l4proxy.dataplane.forwarding import (
    EDGE_REMOVED,
    Forwarding,
    RequestIds,
    forwarded_head,
    trusted_address,
    uuid_text,
)
from l4proxy.dataplane.peek import HeadParser
from l4proxy.demo.podnet import PodNetwork
from tests._scripted import Scripted, _response, _status
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
)
from tests.conftest import reset_close
from tests.mesh import IMPLS, through_a_sidecar
from tests.test_access_log_worker import TEXT_LINE, _read_lines

HOST = GATEWAY_HOST
TWINS = ["pure", "compiled"]
UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# what a client may send of the headers the gateway replaces or removes
SPOOFED = (
    "X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Request-Id: from-the-client\r\n"
    "X-Envoy-External-Address: 192.0.2.66\r\n"
    "X-Envoy-Internal: true\r\n"
    "X-Envoy-Retry-On: 5xx\r\n"
    "x-envoy-upstream-rq-timeout-ms: 1\r\n"
    "X-Forwarded-Client-Cert: By=spiffe://x\r\n"
)


def _fields(request: bytes) -> list[tuple[bytes, bytes]]:
    """A request's header lines as (lowercase name, value)."""
    head = request.split(b"\r\n\r\n", 1)[0]
    out = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out.append((name.lower(), value.strip()))
    return out


def _values(request: bytes, name: bytes) -> list[bytes]:
    return [v for n, v in _fields(request) if n == name]


def _get(s: socket.socket, path: str, extra: str = "") -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nUser-Agent: t/1\r\n{extra}\r\n".encode())
    return _response(s)


def _serve(
    which: str,
    rules_text: str,
    talk: Callable[[socket.socket], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    **options: Any,
) -> list[bytes]:
    """*talk*(a connection) through a worker of *which* twin on a gateway
    listener (its draws seeded: 7), whose access log is a pipe: its lines."""
    _worker_twin(which, monkeypatch)
    rules = tmp_path / f"rules-{which}.yaml"
    rules.write_text(rules_text)
    r, w = os.pipe()

    async def main() -> None:
        async with gateway_worker(
            rules, watcher_options={"seed": 7}, access_log_fd=w, **options
        ) as (_, _w, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                await loop.run_in_executor(None, talk, s)

    try:
        asyncio.run(main())
    finally:
        os.close(w)
    return _read_lines(r)


@pytest.mark.parametrize("which", TWINS)
def test_the_gateway_appends_the_client_and_gives_each_request_an_id(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests on one connection (0 trusted proxies, the default):
    the client's address is X-Forwarded-For (appended to the client's own),
    X-Forwarded-Proto is http whatever the client said,
    x-envoy-external-address is the client connection's address, and each
    request has an x-request-id of its own, uuid4-shaped, never the
    client's; the edge headers a client could steer Envoys with are gone;
    the rest of the head goes as it came."""
    up = Scripted([])
    try:
        _serve(
            which,
            gateway_service(up.endpoint[1]),
            lambda s: [_get(s, "/a"), _get(s, "/b", SPOOFED), _get(s, "/c")],
            tmp_path,
            monkeypatch,
        )
    finally:
        up.close()
    plain, spoofed, again = up.requests
    for request in (plain, spoofed, again):
        assert _values(request, b"x-forwarded-proto") == [b"http"], request
        assert _values(request, b"x-envoy-external-address") == [b"127.0.0.1"], request
        (rid,) = _values(request, b"x-request-id")
        assert UUID4.fullmatch(rid), request
        assert _values(request, b"host") == [b"gw"] and _values(request, b"user-agent") == [b"t/1"]
    assert _values(plain, b"x-forwarded-for") == [b"127.0.0.1"], plain
    assert _values(spoofed, b"x-forwarded-for") == [b"203.0.113.7, 10.0.0.1,127.0.0.1"], spoofed
    assert spoofed.startswith(b"GET /b HTTP/1.1\r\n")
    names = {n for n, _ in _fields(spoofed)}
    assert not names & {b"x-envoy-internal", b"x-envoy-retry-on", b"x-forwarded-client-cert"}
    assert b"x-envoy-upstream-rq-timeout-ms" not in names, spoofed
    ids = [_values(r, b"x-request-id")[0] for r in up.requests]
    assert len(set(ids)) == 3 and b"from-the-client" not in ids, ids


@pytest.mark.parametrize("which", TWINS)
def test_a_trusted_proxy_s_proto_and_client_are_believed(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--trusted-proxies 1 (a load balancer in front that terminates TLS):
    its X-Forwarded-Proto https reaches the backend, the address it
    appended (the last of X-Forwarded-For) is x-envoy-external-address,
    and the load balancer's own address is still appended; a request
    without them gets http and the connection's address as before."""
    up = Scripted([])
    behind = "X-Forwarded-For: 198.51.100.9, 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
    try:
        _serve(
            which,
            gateway_service(up.endpoint[1]),
            lambda s: [_get(s, "/a", behind), _get(s, "/b")],
            tmp_path,
            monkeypatch,
            trusted_proxies=1,
        )
    finally:
        up.close()
    lb, direct = up.requests
    assert _values(lb, b"x-forwarded-proto") == [b"https"], lb
    assert _values(lb, b"x-envoy-external-address") == [b"203.0.113.7"], lb
    assert _values(lb, b"x-forwarded-for") == [b"198.51.100.9, 203.0.113.7,127.0.0.1"], lb
    assert _values(direct, b"x-forwarded-proto") == [b"http"], direct
    assert _values(direct, b"x-envoy-external-address") == [b"127.0.0.1"], direct


MIRRORED = gateway_subsets("v1", "v2") + gateway_routes(
    f"""\
  - route:
    - destination: {{host: {HOST}, subset: v1}}
    mirror: {{host: {HOST}, subset: v2}}
"""
)


@pytest.mark.parametrize("which", TWINS)
def test_the_access_log_and_the_mirror_see_the_id_sent_upstream(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request's access log line says the x-request-id and the
    X-Forwarded-For its backend got, and its mirrored copy carries the same
    id (Envoy's shadow does), on one connection."""
    v1, v2 = Scripted([]), Scripted([])

    def talk(s: socket.socket) -> None:
        for path in ("/a", "/b"):
            assert _status(_get(s, path, "X-Request-Id: mine\r\nX-Forwarded-For: 192.0.2.1\r\n"))
        deadline = time.monotonic() + 5  # (the copies go after the answers)
        while len(v2.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        service = gateway_service(v1.endpoint[1], v2.endpoint[1], labels=("v1", "v2"))
        lines = _serve(which, service + MIRRORED, talk, tmp_path, monkeypatch)
    finally:
        v1.close()
        v2.close()
    logged = [TEXT_LINE.fullmatch(line.decode()) for line in lines]
    assert all(logged) and len(logged) == 2, lines
    sent = [_values(r, b"x-request-id")[0].decode() for r in v1.requests]
    assert [m["rid"] for m in logged if m] == sent, (lines, v1.requests)
    # each copy carries its own request's id; the two copies may arrive in
    # either order (each goes on a connection of its own, as Envoy's shadows)
    by_path = {r.split(b" ", 2)[1]: _values(r, b"x-request-id") for r in v1.requests}
    copies = {r.split(b" ", 2)[1]: _values(r, b"x-request-id") for r in v2.requests}
    assert copies == by_path and len(v2.requests) == 2, (v1.requests, v2.requests)
    assert len(set(sent)) == 2
    assert [m["xff"] for m in logged if m] == ["192.0.2.1,127.0.0.1"] * 2, lines
    assert [_values(r, b"host") for r in v2.requests] == [[b"gw-shadow"]] * 2


# requests whose heads take each way of the forwarding code: none of its
# lines; two X-Forwarded-For lines, an empty one, X-Forwarded-Proto (kept
# with a trusted proxy), a client's id and attempt count, an
# X-Forwarded-For of no address, hop-by-hop lines between them
TWIN_REQUESTS = (
    b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /b HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 198.51.100.9\r\nAccept: */*\r\n"
    b"x-forwarded-for: \r\nX-FORWARDED-FOR:203.0.113.7 \r\nX-Forwarded-Proto: https\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: gw\r\nX-Request-Id: abc\r\nx-envoy-max-retries: 9\r\n"
    b"X-Envoy-Attempt-Count: 4\r\n\r\n",
    b"GET /d HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: not-an-address\r\n\r\n",
    b"GET /f HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\nX-Forwarded-For: 192.0.2.9\r\n"
    b"Keep-Alive: timeout=5\r\nX-Envoy-Internal: true\r\n\r\n",
    b"GET /e HTTP/1.1\r\nHost: gw\r\n\r\n",
)


@pytest.mark.parametrize("trusted", [0, 2])
def test_the_twins_send_byte_identical_heads(
    trusted: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same requests through a worker of each twin, seeded alike: the
    backend receives the same bytes from both, ids included; and they are
    forwarded_head()'s (of the head without its hop-by-hop lines)."""
    got: dict[str, list[bytes]] = {}
    for which in TWINS:
        up = Scripted([])

        def talk(s: socket.socket) -> None:
            for request in TWIN_REQUESTS:
                s.sendall(request)
                assert _status(_response(s)) == 200

        try:
            _serve(
                which,
                gateway_service(up.endpoint[1]),
                talk,
                tmp_path,
                monkeypatch,
                trusted_proxies=trusted,
            )
        finally:
            up.close()
        got[which] = up.requests
    assert got["pure"] == got["compiled"]
    # (the worker's seed, as the relay draws: the connection's, then one a head)
    ids = RequestIds(7)
    connection = ids.connection()
    expected = []
    for request in TWIN_REQUESTS:
        rid = ids.next(connection)
        # (hop-by-hop lines out, the client's count too; the first try's
        # after the forwarding lines)
        sent = upstream_head(request, HeadParser().feed(request))
        head, _, _ = forwarded_head(sent, Forwarding(trusted), b"127.0.0.1", rid)
        expected.append(with_attempt_count(head))
    assert got["pure"] == expected


# a backend that answers each request with its head, then closes
ECHO = r"""
import socket, sys
s = socket.create_server(("", int(sys.argv[1])), backlog=64)
while True:
    c, _ = s.accept()
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = c.recv(65536)
        if not data:
            break
        buf += data
    head = buf.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(head) + head)
    c.close()
"""
SIDECAR_REQUEST = (
    b"GET /x HTTP/1.1\r\nHost: echo\r\nUser-Agent: t/1\r\n" + SPOOFED.encode() + b"\r\n"
)
CLIENT = f"""
import socket, sys
c = socket.create_connection(("198.19.0.30", 8080), 10)
c.sendall({SIDECAR_REQUEST!r})
data = b""
while not data.endswith(b"\\r\\n\\r\\n") or data.count(b"\\r\\n\\r\\n") < 2:
    more = c.recv(65536)
    if not more:
        break
    data += more
sys.stdout.buffer.write(data.partition(b"\\r\\n\\r\\n")[2])
"""


@pytest.mark.netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_sidecar_s_captured_request_goes_as_it_came(pod_network: PodNetwork, impl: str) -> None:
    """A client pod's request to a ServiceEntry's address, captured by
    l4proxy-init and routed per request by the sidecar (Istio's sidecars
    run with use_remote_address false): the backend gets the head the
    client sent, its X-Forwarded-For, X-Forwarded-Proto, x-request-id and
    x-envoy-* lines as they were, and none added but the first try's
    x-envoy-attempt-count (Envoy's router adds it at a sidecar too)."""
    got = through_a_sidecar(pod_network, impl, ECHO, CLIENT)
    assert got == with_attempt_count(SIDECAR_REQUEST)


# -- forwarding.py's own ----------------------------------------------------------


def test_request_ids_are_uuid4_text_and_repeat_for_a_seed() -> None:
    """A seed's ids repeat; each is a uuid4's text; on one connection its
    ids share their second half and differ in their first (Envoy samples
    traces by the first 8 hex digits), two connections' differ there."""
    a, b = RequestIds(3), RequestIds(3)
    one, two = a.connection(), a.connection()
    drawn = [a.next(one) for _ in range(100)]
    other = a.next(two)
    assert b.connection() == one and b.connection() == two
    assert drawn == [b.next(one) for _ in range(100)] and other == b.next(two)
    assert len({rid[:8] for rid in drawn}) == 100
    assert {rid[18:] for rid in drawn} == {drawn[0][18:]} != {other[18:]}
    for rid in (*drawn, other):
        u = uuid.UUID(rid.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == rid
    hi, lo = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    assert (
        uuid_text(hi, lo)
        == str(uuid.UUID(bytes=(hi.to_bytes(8, "big") + lo.to_bytes(8, "big")), version=4)).encode()
    )


@pytest.mark.parametrize(
    ("xff", "hops", "expected"),
    [
        (b"203.0.113.128, 203.0.113.10, 203.0.113.1", 1, b"203.0.113.1"),
        (b"203.0.113.128, 203.0.113.10, 203.0.113.1", 2, b"203.0.113.10"),  # Envoy's example 3
        (b"203.0.113.1", 2, None),  # fewer addresses than hops
        (b"a.b, 203.0.113.1", 2, None),  # not an address
        (b" 2001:DB8::1 ", 1, b"2001:db8::1"),  # canonical, trimmed
        (b"[2001:db8::1]", 1, None),
        (b"10.0.0.1,", 1, None),
        (b"010.0.0.1", 1, None),
    ],
)
def test_trusted_address(xff: bytes, hops: int, expected: bytes | None) -> None:
    assert trusted_address(xff, hops) == expected


def test_the_edge_removed_names_are_lowercase_envoy_headers() -> None:
    assert all(n == n.lower() and n.startswith(b"x-") and len(n) >= 12 for n in EDGE_REMOVED)


@pytest.mark.parametrize("slow", [False, True], ids=["head", "slow-path-head"])
@pytest.mark.parametrize("which", TWINS)
def test_a_client_that_resets_at_once_cannot_forge_its_address(
    which: str, slow: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sends a request with its own X-Forwarded-For and resets
    the connection at once (SO_LINGER 0), 35 times, a few milliseconds
    apart or none: each request that still reaches the backend has the
    client's address appended and x-envoy-external-address. The address
    was asked of the kernel (getpeername) as the request was routed, which
    fails once the reset is in, and then nothing was appended: the backend
    read the client's X-Forwarded-For alone, a forged client address
    (found by a review's fuzzer: 2 to 7 in 35 reached the backend so). Now
    it is the one accept() gave. A slow-path head (nine dropped edge lines)
    is one the compiled relay hands to the pure one with the address."""
    up = Scripted([])
    extra = "".join(f"x-envoy-internal: {i}\r\n" for i in range(9)) if slow else ""
    head = (
        "POST /transfer HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 6.6.6.6\r\n"
        f"{extra}Content-Length: 0\r\n\r\n"
    ).encode()
    _worker_twin(which, monkeypatch)
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]))

    def attack(address: tuple[str, int], delay: float) -> None:
        s = socket.create_connection(address, 10)
        s.sendall(head)
        if delay:
            time.sleep(delay)
        reset_close(s)

    async def main() -> None:
        async with gateway_worker(rules) as (_, _w, address):
            loop = asyncio.get_running_loop()
            for delay in (0, 0, 0, 0.0005, 0.001, 0.002, 0.005) * 5:
                await loop.run_in_executor(None, attack, address, delay)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)

    try:
        asyncio.run(main())
    finally:
        up.close()
    assert up.requests, "no request reached the backend"  # (what is judged)
    for request in up.requests:
        assert _values(request, b"x-forwarded-for") == [b"6.6.6.6,127.0.0.1"], request
        assert _values(request, b"x-envoy-external-address") == [b"127.0.0.1"], request
