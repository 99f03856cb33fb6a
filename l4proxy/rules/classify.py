"""What a connection or a request is, before any byte moves: one pure function.

Theory of operation
-------------------
The worker asks the same question at three moments, and the per-request
relay at a fourth:

1. a connection is accepted: where was it going (``SO_ORIGINAL_DST`` on the
   transparent listeners, the local port on a gateway listener)? No head has
   been read (:data:`UNREAD`);
2. its first request head has been read, or the bytes turned out not to be
   HTTP (``head`` None): which service, if any?
3. the relay hands back a connection whose bytes are not HTTP (``head`` None);
4. ``--http-routing request``: every request head the relay reads.

:func:`classify` answers all of them from values: the route table live at
that moment (the caller reads it; a reload swaps it in one assignment), the
:class:`Origin`, the head if any, the pod's own addresses and the listener
ports, and two options. It reads no socket and no clock, so every branch is
a row in ``tests/test_classify.py``, without namespaces. The worker and the
relay act on the answer (connect, answer locally, hand over) and count it;
how a refusal is delivered (an HTTP answer or a close) is in
:class:`Classification`'s ``status``.

The answers, in the order they are tried:

* ``REFUSED not_redirected``: a transparent listener's connection with no
  original destination, or one dialled to our own listener (a loop);
* gateway listeners: an unread head means ``READ_HEAD`` (or ``RELAY``);
  bytes that are not HTTP are ``REFUSED gateway_not_http`` (400); a head is
  routed by the ingress paths of that listener's port, or ``REFUSED
  no_ingress_route`` (404), or ``REFUSED ingress_backend_not_found`` (503)
  where the path's backend service or port is not in the registry;
* ``INBOUND``: the original destination is one of the pod's own
  (non-loopback) addresses: forwarded to the app unchanged, never routed;
* ``READ_HEAD`` / ``RELAY``: the destination's service port is HTTP, or an
  unknown destination's port is one some service declares HTTP, and no head
  has been read: the head decides (``RELAY`` when every request is routed on
  its own). TCP ports are never read before the decision;
* ``ROUTE``: the ServiceEntry whose address is the destination, else (with a
  head) the service the Host header names on that port;
* otherwise the destination is unknown: ``PASSTHROUGH`` (Istio's
  PassthroughCluster), or ``REFUSED registry_only`` under ``REGISTRY_ONLY``
  (502 to an HTTP request, a close at L4).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Container
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from l4proxy.rules.routing import RouteTable, Service, ServicePort

__all__ = ["UNREAD", "Classification", "Head", "Kind", "Origin", "Unread", "classify"]


class Kind(enum.Enum):
    REFUSED = "refused"  # answered locally (``status``) or closed (status None)
    INBOUND = "inbound"  # to the pod's own address: the app, unchanged
    READ_HEAD = "read_head"  # HTTP port, no head yet: read it, then classify again
    RELAY = "relay"  # likewise, per-request routing: the relay reads every head
    PASSTHROUGH = "passthrough"  # unknown destination: where it was going
    ROUTE = "route"  # a service's port: the route table picks route and subset


class Origin(NamedTuple):
    """Where a connection was going."""

    ip: str | None  # the original destination; None on a gateway listener
    port: int  # the original destination port, or the gateway listener's
    gateway: bool


class Head(Protocol):
    """What classification reads of a request head (``RequestHead`` has it)."""

    @property
    def host(self) -> str | None: ...

    @property
    def path(self) -> str: ...


class Unread(enum.Enum):
    UNREAD = "unread"


UNREAD: Final = Unread.UNREAD
"""``head`` when nothing has been read from the connection yet."""


@dataclass(frozen=True, slots=True)
class Classification:
    kind: Kind
    why: str = ""  # REFUSED: the reason, as l4proxy_refused_total counts it
    status: int | None = None  # REFUSED: the HTTP answer; None: close without one
    body: str = ""  # REFUSED: the answer's body
    service: Service | None = None  # ROUTE
    port: ServicePort | None = None  # ROUTE


_NOT_REDIRECTED: Final = Classification(Kind.REFUSED, "not_redirected")
_INBOUND: Final = Classification(Kind.INBOUND)
_READ_HEAD: Final = Classification(Kind.READ_HEAD)
_RELAY: Final = Classification(Kind.RELAY)
_PASSTHROUGH: Final = Classification(Kind.PASSTHROUGH)
_GATEWAY_NOT_HTTP: Final = Classification(Kind.REFUSED, "gateway_not_http", 400, "bad request")
_NO_INGRESS_ROUTE: Final = Classification(Kind.REFUSED, "no_ingress_route", 404, "no route")
# A path matched, but its backend service (or the service's port) is not in
# the registry: Envoy's route to a cluster it does not have, 503 (NC,
# cluster_not_found), not a 404 that tells the client the path is wrong.
_NO_INGRESS_BACKEND: Final = Classification(
    Kind.REFUSED, "ingress_backend_not_found", 503, "no healthy upstream"
)


def classify(
    table: RouteTable,
    origin: Origin | None,
    head: Head | Unread | None = UNREAD,
    *,
    local_ips: Container[str] = frozenset(),
    listener_ports: Container[int] = frozenset(),
    registry_only: bool = False,
    per_request: bool = False,
) -> Classification:
    """Classify a connection (*head* :data:`UNREAD` or None: not HTTP) or a
    request (*head* given); see the module docstring for the order.

    *origin* None: a transparent listener's connection that nobody
    redirected. *local_ips* are the pod's own addresses, *listener_ports*
    the ports our listeners have; *registry_only* is ``--outbound-policy
    REGISTRY_ONLY``, *per_request* ``--http-routing request``.
    """
    if origin is None:
        return _NOT_REDIRECTED
    if origin.gateway:
        if isinstance(head, Unread):
            return _RELAY if per_request else _READ_HEAD
        if head is None:
            return _GATEWAY_NOT_HTTP
        hit = table.ingress_path(head.host, head.path, origin.port)
        if hit is None:
            return _NO_INGRESS_ROUTE
        found = table.ingress_backend(hit)
        return _NO_INGRESS_BACKEND if found is None else _routed(found)
    ip, port = origin.ip, origin.port
    if ip is None or (port in listener_ports and (_is_loopback(ip) or ip in local_ips)):
        return _NOT_REDIRECTED
    if ip in local_ips and not _is_loopback(ip):
        return _INBOUND
    found = table.service_for_address(ip, port)
    if isinstance(head, Unread):
        if found[1].is_http if found is not None else table.is_http_port(port):
            return _RELAY if per_request else _READ_HEAD
        head = None  # a TCP port: routed at L4, unread
    elif found is None and head is not None and head.host:
        found = table.service_for_host(head.host, port)
    if found is not None:
        return _routed(found)
    if registry_only:
        status = 502 if head is not None else None  # an HTTP answer only to HTTP
        return Classification(Kind.REFUSED, "registry_only", status, "blocked")
    return _PASSTHROUGH


def _routed(found: tuple[Service, ServicePort]) -> Classification:
    return Classification(Kind.ROUTE, service=found[0], port=found[1])


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
