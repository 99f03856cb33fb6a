"""What a connection or request is (l4proxy.rules.classify): one row per branch.

The function is pure, so every case is a row: the origin (where it was going),
the head (unread, not HTTP, or a parsed head), the options, and the answer.
No sockets, no namespaces; the worker and the relay that act on the answer
are tested end to end in test_sidecar, test_per_request and test_hardening_*.
"""

from __future__ import annotations

from typing import Any

import pytest

from l4proxy.dataplane._peek_py import RequestHead, parse_head
from l4proxy.rules.classify import UNREAD, Classification, Kind, Origin, Unread, classify
from l4proxy.rules.routing import Endpoint, IngressPath, RouteTable, Service, ServicePort

HOST = "bootcamp.default.svc.cluster.local"
VIP = "198.19.0.10"  # bootcamp's ServiceEntry address (HTTP 8080)
DB_VIP = "198.19.0.20"  # a TCP service (5432)
UNKNOWN = "198.19.9.9"  # in no ServiceEntry
POD_IP = "198.18.0.5"  # this pod's own address
LOCAL_IPS = frozenset({POD_IP, "127.0.0.1"})
LISTENER_PORTS = frozenset({15001, 15006, 8000})
GATEWAY_PORT = 8000

BOOTCAMP = Service.create(
    HOST,
    [ServicePort(8080, "http", "HTTP")],
    [Endpoint("198.18.0.11", 8080, {"version": "v1"})],
    addresses=[VIP],
    aliases=["bootcamp", "bootcamp.default", "bootcamp.default.svc"],
)
DB = Service.create(
    "db.default.svc.cluster.local",
    [ServicePort(5432, "tcp", "TCP")],
    [Endpoint("198.18.0.21", 5432, {})],
    addresses=[DB_VIP],
)
TABLE = RouteTable(
    [BOOTCAMP, DB],
    ingress=[
        IngressPath("api", None, "/api", "Prefix", HOST, 8080, listener_port=GATEWAY_PORT),
        IngressPath("other", None, "/other", "Prefix", HOST, 8080, listener_port=9000),
        # a backend the registry does not have, and a port its service lacks
        IngressPath("gone", None, "/gone", "Prefix", "gone.default.svc.cluster.local", 80),
        IngressPath("noport", None, "/noport", "Prefix", HOST, "grpc", listener_port=GATEWAY_PORT),
    ],
    seed=1,
)


def head(path: str = "/", host: str | None = "bootcamp") -> RequestHead:
    # HTTP/1.0 without Host (optional there); HTTP/1.1 with it
    version, fields = ("1.0", "") if host is None else ("1.1", f"Host: {host}\r\n")
    parsed = parse_head(f"GET {path} HTTP/{version}\r\n{fields}\r\n".encode())
    assert parsed is not None
    return parsed


def out(dst: tuple[str, int]) -> Origin:
    return Origin(dst[0], dst[1], False)


def gw(port: int = GATEWAY_PORT) -> Origin:
    return Origin(None, port, True)


REFUSED_NOT_REDIRECTED = (Kind.REFUSED, "not_redirected", None, None)
READ_HEAD = (Kind.READ_HEAD, "", None, None)
RELAY = (Kind.RELAY, "", None, None)
PASSTHROUGH = (Kind.PASSTHROUGH, "", None, None)
BOOTCAMP_8080 = (Kind.ROUTE, "", None, (HOST, 8080))
DB_5432 = (Kind.ROUTE, "", None, (DB.host, 5432))
REGISTRY_ONLY_HTTP = (Kind.REFUSED, "registry_only", 502, None)
REGISTRY_ONLY_L4 = (Kind.REFUSED, "registry_only", None, None)

_OPTS: dict[str, dict[str, Any]] = {
    "": {},
    "per-request": {"per_request": True},
    "registry-only": {"registry_only": True},
}

# id, origin, head (UNREAD: nothing read yet; None: not HTTP), options, expected
# (kind, why, status, (service host, port) when routed)
ROWS: list[tuple[str, Origin | None, Any, str, tuple[Any, ...]]] = [
    # -- not ours to route -------------------------------------------------
    ("no original destination", None, UNREAD, "", REFUSED_NOT_REDIRECTED),
    (
        "dialled our listener on loopback",
        out(("127.0.0.1", 15001)),
        UNREAD,
        "",
        REFUSED_NOT_REDIRECTED,
    ),
    (
        "dialled our listener on the pod ip",
        out((POD_IP, 15006)),
        UNREAD,
        "",
        REFUSED_NOT_REDIRECTED,
    ),
    ("inbound to the app", out((POD_IP, 9080)), UNREAD, "", (Kind.INBOUND, "", None, None)),
    (
        "inbound, even on an HTTP port",
        out((POD_IP, 8080)),
        UNREAD,
        "per-request",
        (Kind.INBOUND, "", None, None),
    ),
    ("loopback is never inbound", out(("127.0.0.1", 9080)), UNREAD, "", PASSTHROUGH),
    # -- a known address ---------------------------------------------------
    ("HTTP service port: read the head", out((VIP, 8080)), UNREAD, "", READ_HEAD),
    ("HTTP service port, per request: the relay", out((VIP, 8080)), UNREAD, "per-request", RELAY),
    ("HTTP service port, head read", out((VIP, 8080)), head(), "", BOOTCAMP_8080),
    ("the address wins over the Host header", out((VIP, 8080)), head(host="db"), "", BOOTCAMP_8080),
    ("HTTP service port, bytes not HTTP: routed at L4", out((VIP, 8080)), None, "", BOOTCAMP_8080),
    ("TCP service port: never read", out((DB_VIP, 5432)), UNREAD, "per-request", DB_5432),
    # -- an unknown address ------------------------------------------------
    (
        "unknown address, a port some service declares HTTP",
        out((UNKNOWN, 8080)),
        UNREAD,
        "",
        READ_HEAD,
    ),
    ("unknown address, Host names a service", out((UNKNOWN, 8080)), head(), "", BOOTCAMP_8080),
    (
        "unknown address, Host with the port",
        out((UNKNOWN, 8080)),
        head(host="bootcamp:8080"),
        "",
        BOOTCAMP_8080,
    ),
    (
        "unknown address, Host on a port the service lacks",
        out((UNKNOWN, 9090)),
        head(),
        "",
        PASSTHROUGH,
    ),
    ("unknown address, no Host", out((UNKNOWN, 8080)), head(host=None), "", PASSTHROUGH),
    ("unknown address and Host", out((UNKNOWN, 8080)), head(host="example.test"), "", PASSTHROUGH),
    (
        "unknown, REGISTRY_ONLY, HTTP: 502",
        out((UNKNOWN, 8080)),
        head(host="example.test"),
        "registry-only",
        REGISTRY_ONLY_HTTP,
    ),
    (
        "unknown, REGISTRY_ONLY, not HTTP: close",
        out((UNKNOWN, 8080)),
        None,
        "registry-only",
        REGISTRY_ONLY_L4,
    ),
    ("unknown TCP port: never read", out((UNKNOWN, 5432)), UNREAD, "", PASSTHROUGH),
    (
        "unknown TCP port, REGISTRY_ONLY: close",
        out((UNKNOWN, 5432)),
        UNREAD,
        "registry-only",
        REGISTRY_ONLY_L4,
    ),
    (
        "REGISTRY_ONLY still routes known services",
        out((VIP, 8080)),
        head(),
        "registry-only",
        BOOTCAMP_8080,
    ),
    # -- gateway listeners -------------------------------------------------
    ("gateway: read the head", gw(), UNREAD, "", READ_HEAD),
    ("gateway, per request: the relay", gw(), UNREAD, "per-request", RELAY),
    ("gateway: a path of this listener", gw(), head("/api/v1"), "", BOOTCAMP_8080),
    (
        "gateway: no path matches",
        gw(),
        head("/nope"),
        "",
        (Kind.REFUSED, "no_ingress_route", 404, None),
    ),
    (
        "gateway: a path of another listener",
        gw(),
        head("/other"),
        "",
        (Kind.REFUSED, "no_ingress_route", 404, None),
    ),
    ("gateway: the other listener's path", gw(9000), head("/other"), "", BOOTCAMP_8080),
    (
        "gateway: a path whose service is not in the registry",
        gw(),
        head("/gone/x"),
        "",
        (Kind.REFUSED, "ingress_backend_not_found", 503, None),
    ),
    (
        "gateway: a path whose port its service does not have",
        gw(),
        head("/noport"),
        "",
        (Kind.REFUSED, "ingress_backend_not_found", 503, None),
    ),
    ("gateway: not HTTP", gw(), None, "", (Kind.REFUSED, "gateway_not_http", 400, None)),
    ("gateway: REGISTRY_ONLY does not apply", gw(), head("/api"), "registry-only", BOOTCAMP_8080),
]


def _run(
    origin: Origin | None, h: RequestHead | Unread | None, opts: str, **extra: bool
) -> Classification:
    options = {**_OPTS[opts], **extra}
    return classify(TABLE, origin, h, local_ips=LOCAL_IPS, listener_ports=LISTENER_PORTS, **options)


@pytest.mark.parametrize(
    ("origin", "h", "opts", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
def test_classify(
    origin: Origin | None, h: RequestHead | Unread | None, opts: str, expected: tuple[Any, ...]
) -> None:
    c = _run(origin, h, opts)
    kind, why, status, routed = expected
    assert (c.kind, c.why, c.status) == (kind, why, status)
    if routed is None:
        assert c.service is None and c.port is None
    else:
        assert c.service is not None and c.port is not None
        assert (c.service.host, c.port.number) == routed


def test_refusals_carry_their_answer() -> None:
    bodies = {
        (r.why, r.status, r.body)
        for r in (_run(*row[1:4]) for row in ROWS)
        if r.kind is Kind.REFUSED
    }
    assert bodies == {
        ("not_redirected", None, ""),
        ("registry_only", 502, "blocked"),
        ("registry_only", None, "blocked"),
        ("no_ingress_route", 404, "no route"),
        ("ingress_backend_not_found", 503, "no healthy upstream"),
        ("gateway_not_http", 400, "bad request"),
    }


@pytest.mark.parametrize(
    "row", [r for r in ROWS if isinstance(r[2], RequestHead)], ids=lambda r: r[0]
)
def test_a_read_head_is_classified_alike_per_connection_and_per_request(
    row: tuple[str, Origin | None, Any, str, tuple[Any, ...]],
) -> None:
    """The relay (every request) and the worker (a connection's first request)
    ask with the same head and must get the same answer."""
    _, origin, h, opts, _ = row
    per_connection = _run(origin, h, opts, per_request=False)
    assert _run(origin, h, opts, per_request=True) == per_connection


def test_defaults_know_no_local_address() -> None:
    """Without local addresses (the worker could not list them) nothing is
    inbound, and only the listener ports on loopback are ours."""
    assert classify(TABLE, out((POD_IP, 9080))).kind is Kind.PASSTHROUGH
    assert classify(TABLE, out((VIP, 8080))).kind is Kind.READ_HEAD
