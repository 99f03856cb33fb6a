"""An Istio ``Gateway`` (networking.istio.io) document: its ``servers``,
read and validated, the ones l4proxy serves kept
(:class:`~l4proxy.rules._objects.IstioGatewayDraft`), the others warned of.
Binding VirtualServices to them is :mod:`~l4proxy.rules._istio_gateway`'s.

Theory of operation
-------------------
An Istio Gateway (v1alpha3, v1beta1, v1) lists **servers**: a ``port``
(``number``, ``name``, ``protocol``) and the ``hosts`` it admits. l4proxy
serves the servers of protocol HTTP (its gateway speaks HTTP/1.x): the
port number is the local port of an ``l4proxy run --listen`` listener, as a
Gateway API listener's is, because the gateway listens where ``--listen``
says, and an Istio ingress gateway's Service that maps port 80 to a
``targetPort`` 8080 wants ``--listen 0.0.0.0:80`` in the pod (or a server on
port 8080). A server's ``bind`` and ``defaultEndpoint``, and
``port.targetPort``, are refused by name. ``selector`` is read and not
interpreted: the rule files are the whole config of the gateway that
loads them, as an Ingress class is not interpreted either. The port names
of one Gateway's servers are unique, as Istio's validation has them.

A server of any other protocol is a warning and is not served, nothing
else of it read: HTTPS and TLS, whatever their ``tls`` (the gateway does
not terminate TLS, which is done in front of it, nor route TLS by SNI;
the warning's advice is by ``tls.mode``, :func:`_tls_advice`);
TCP, MONGO, MYSQL, REDIS and UDP (it routes HTTP requests); HTTP2, GRPC
and GRPC-WEB, whose clients speak HTTP/2 or gRPC-Web, which it does not
(:data:`_UNSERVED` says why they are not served as HTTP/1.x). A warning,
not an error, as Istio's own task configs hold such servers beside HTTP
ones, and an error would refuse the whole set (at a reload, the last good
rules kept serving). So the most common Gateway, port 80 redirecting to
https beside port 443 terminating TLS, loads: its HTTP servers are
served, its VirtualServices bound to them alone (their ``tls`` and
``tcp`` routes are warnings too, ``_networking``; the ``tcp`` routes of
one bound to ``mesh`` too are the sidecars', and a warning at its
Gateways, ``_istio_gateway``).
No gateway service is made of a skipped server, so a ``--listen`` on its
port gets none of this Gateway's routes: the draft keeps the skipped
servers' ports (``IstioGatewayDraft.unserved``), and the worker warns of
such a port listened on that no other server or Ingress rule routes
(``RouteTable.unserved_ports``), as of a served server's port that no
``--listen`` serves.

An HTTP server's ``tls`` is ``httpsRedirect`` alone (and ``mode``
PASSTHROUGH, its default), as Istio's validation has it
(:func:`_https_redirect`); what a redirecting server answers is
``_istio_gateway``'s (``HTTPS_REDIRECT``). A server host is
``[NAMESPACE/]HOST`` as Istio validates it (:func:`_server_host`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from l4proxy.k8s_names import DNS1123_LABEL
from l4proxy.rules._objects import Env, IstioGatewayDraft, ServerDraft, ServerHostDraft
from l4proxy.rules._schema import (
    Ctx,
    Where,
    boolean,
    dotted,
    fields,
    integer,
    labels,
    listing,
    text,
)
from l4proxy.rules._yaml import Path

GROUP = "networking.istio.io"
_PLAIN = (
    "an HTTP server's tls holds httpsRedirect alone (Istio's validation: no TLS settings for "
    "plain text HTTP ports); terminate TLS in front of the gateway"
)
# Istio's ServerTLSSettings fields but httpsRedirect and mode: certificates
# and their checks, which a server of protocol HTTP may not have
_TLS_FIELDS = (
    "serverCertificate",
    "privateKey",
    "caCertificates",
    "caCrl",
    "caCertCredentialName",
    "credentialName",
    "credentialNames",
    "tlsCertificates",
    "subjectAltNames",
    "verifyCertificateSpki",
    "verifyCertificateHash",
    "minProtocolVersion",
    "maxProtocolVersion",
    "cipherSuites",
)
# The server protocols whose servers hold TLS (their warning: _tls_advice)
_TLS_PROTOCOLS = ("HTTPS", "TLS")
_H2 = (
    "the gateway speaks HTTP/1.x, without h2c: the HTTP/2 and gRPC clients a server of this "
    "protocol is for would each be answered 400; for HTTP/1.x clients, make it protocol HTTP"
)
_L4 = "the gateway routes HTTP requests, not TCP connections"
# Istio's other server protocols (protocol.Parse, case-insensitive), none
# of which l4proxy serves: a warning each, with why, as HTTPS and TLS.
# Not HTTP2 and gRPC served as HTTP/1.x either: their clients speak
# HTTP/2 (gRPC's always do), so the port would look served while each of
# them is refused; a server for HTTP/1.x clients says so, protocol HTTP.
_UNSERVED = {
    "HTTP2": _H2,
    "GRPC": _H2,
    "GRPC-WEB": "the gateway translates no gRPC-Web to gRPC (Envoy's grpc_web filter)",
    "TCP": _L4,
    "MONGO": _L4,
    "MYSQL": _L4,
    "REDIS": _L4,
    "UDP": "the gateway routes HTTP requests, not UDP datagrams",
}
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def read_gateway(ctx: Ctx, obj: dict[str, Any], env: Env) -> IstioGatewayDraft | None:
    assert ctx.name is not None
    spec = fields(
        ctx, obj.get("spec"), ("spec",), allowed=("selector", "servers"), required=("servers",)
    )
    if spec is None:
        return None
    # (read, not interpreted: these files are this gateway's whole config)
    ok = labels(ctx, spec.get("selector"), ("spec", "selector")) is not None
    servers: list[ServerDraft] = []
    skipped: list[str] = []
    unserved: list[tuple[Path, _OtherServer]] = []
    http = False  # (whether it has an HTTP server)
    named: dict[str, int] = {}
    for i, item in enumerate(listing(ctx, spec.get("servers"), ("spec", "servers")) or []):
        path = ("spec", "servers", i)
        got: ServerDraft | None = None
        port_name: str | None
        other = _other_server(item, i)
        if other is not None:
            port_name = other.port_name
            unserved.append((path, other))
            skipped.append(other.what)
        else:
            http = True
            got = _server(ctx, item, path)
            if got is None:
                ok = False
                continue
            port_name = got.port_name
        if port_name in named:
            ctx.error(
                (*path, "port", "name"),
                f"port name {port_name} is already the name of server {named[port_name]}'s "
                "port; the port names of a Gateway's servers must be unique (Istio's validation)",
            )
            ok = False
            continue
        if port_name is not None:
            named[port_name] = i
        if got is not None:
            servers.append(got)
    for at, other in unserved:
        proto = other.protocol.upper()
        why = _tls_advice(other, http) if proto in _TLS_PROTOCOLS else _UNSERVED[proto]
        ctx.warning(
            at,
            f"{other.what} is not served: {why}. "
            + (
                "The Gateway's HTTP servers are served, and its VirtualServices bound to them"
                if http
                else "The Gateway has no HTTP server: nothing of it is served"
            ),
        )
    if not ok:
        return None
    return IstioGatewayDraft(
        ctx.name,
        ctx.namespace,
        servers,
        Where(ctx, ()),
        skipped,
        [(o.number, o.what) for _, o in unserved if o.number is not None],
    )


class _OtherServer(NamedTuple):
    """A server of a protocol l4proxy does not serve, as much of it as
    its warning says: ``server I (PROTOCOL, port N)``, its protocol as
    written, its port name (None where it is not a string), its
    ``tls.mode`` as written (None: none given) and whether it has a
    ``tls``."""

    what: str
    protocol: str
    port_name: str | None
    mode: Any
    tls: bool
    number: int | None = None  # its port.number (None where it is not an integer)


def _tls_advice(server: _OtherServer, http: bool) -> str:
    """Why an HTTPS or TLS server is not served, and what to do, by its
    ``tls.mode`` (Istio's default, where a ``tls`` gives none, is
    PASSTHROUGH): its TLS passes through to the backend (PASSTHROUGH,
    AUTO_PASSTHROUGH), where there is nothing to terminate in front of the
    gateway, which does not route by SNI; Istio's mutual TLS between its
    proxies (ISTIO_MUTUAL), for which the gateway holds no certificate;
    else TLS terminated at the server (SIMPLE, MUTUAL, OPTIONAL_MUTUAL),
    which a proxy in front can terminate instead. *http*: whether the
    Gateway has an HTTP server to forward to (else: add one)."""
    mode = server.mode if server.mode is not None or not server.tls else "PASSTHROUGH"
    said = f"tls.mode {mode}" + (", the default" if server.mode is None else "")
    to = "an HTTP server of this Gateway" if http else "an HTTP server (add one to this Gateway)"
    if mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
        return (
            f"its TLS is the backends' to terminate ({said}), so there is none to terminate in "
            "front of the gateway, and the gateway does not route TLS connections by SNI; send "
            "these connections to their backends another way (a TCP load balancer, or a TLS "
            "passthrough proxy in front of the gateway)"
        )
    if mode == "ISTIO_MUTUAL":
        return (
            f"its clients are Istio proxies speaking Istio's mutual TLS ({said}), and the "
            f"gateway holds no mesh certificate; have them send plain HTTP to {to}"
        )
    return (
        "the gateway does not terminate TLS"
        + (f" ({said})" if server.tls else "")
        + ", nor route it by SNI; terminate TLS in front of it (a load balancer, a TLS proxy in "
        f"the pod) and forward the requests to {to}"
        + (", with X-Forwarded-Proto: https where that server has httpsRedirect" if http else "")
    )


def _other_server(value: Any, index: int) -> _OtherServer | None:
    """Server *index*, *value*, where its ``port.protocol`` is one l4proxy
    does not serve (HTTPS, TLS, or one of :data:`_UNSERVED`, in any case,
    as Istio parses it); None for any other server, read by
    :func:`_server`. Nothing else of it is read: it is not served."""
    port = value.get("port") if isinstance(value, dict) else None
    proto = port.get("protocol") if isinstance(port, dict) else None
    if not isinstance(proto, str) or (
        proto.upper() not in _TLS_PROTOCOLS and proto.upper() not in _UNSERVED
    ):
        return None
    assert isinstance(port, dict) and isinstance(value, dict)
    name = port.get("name")
    tls = value.get("tls")
    return _OtherServer(
        f"server {index} ({proto}, port {port.get('number')})",
        proto,
        name if isinstance(name, str) else None,
        tls.get("mode") if isinstance(tls, dict) else None,
        isinstance(tls, dict),
        number if isinstance(number := port.get("number"), int) else None,
    )


def _server(ctx: Ctx, value: Any, path: Path) -> ServerDraft | None:
    srv = fields(
        ctx,
        value,
        path,
        allowed=("port", "hosts", "name", "tls"),
        unimplemented={
            "bind": "the gateway listens where `l4proxy run --listen` says",
            "defaultEndpoint": "it applies to a sidecar's Sidecar resource, not a gateway",
        },
        required=("port", "hosts"),
    )
    if srv is None or srv.get("port") is None or not srv.get("hosts"):
        return None
    ok = True
    if srv.get("name") is not None:
        ok = text(ctx, srv["name"], (*path, "name")) is not None
    redirect = _https_redirect(ctx, srv.get("tls"), (*path, "tls"))
    if redirect is None:
        ok = False
    ppath = (*path, "port")
    port = fields(
        ctx,
        srv["port"],
        ppath,
        allowed=("number", "name", "protocol"),
        unimplemented={
            "targetPort": "targetPort is only valid for a ServiceEntry (Istio's validation); "
            "the gateway listens on port.number"
        },
        required=("number", "name", "protocol"),
    )
    if port is None or any(port.get(k) is None for k in ("number", "name", "protocol")):
        return None
    number = integer(ctx, port["number"], (*ppath, "number"), 1, 65535, what="port")
    name = text(ctx, port["name"], (*ppath, "name"), required=True)
    proto = text(ctx, port["protocol"], (*ppath, "protocol"), required=True)
    if proto is not None and proto.upper() != "HTTP":
        ctx.error(
            (*ppath, "protocol"),
            f"invalid protocol {proto!r} (Istio's are HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, "
            "TCP, TLS, MONGO, MYSQL, REDIS, UDP; l4proxy serves HTTP, and warns of a server of "
            "another, which it does not serve)",
        )
        proto = None
    hosts: list[ServerHostDraft] = []
    for j, h in enumerate(listing(ctx, srv["hosts"], (*path, "hosts")) or []):
        got = _server_host(ctx, h, (*path, "hosts", j))
        if got is None:
            ok = False
        elif got not in hosts:
            hosts.append(got)
    if not ok or number is None or name is None or proto is None or not hosts:
        return None
    return ServerDraft(number, name, hosts, Where(ctx, path), bool(redirect))


def _https_redirect(ctx: Ctx, value: Any, path: Path) -> bool | None:
    """An HTTP server's ``tls``: whether its ``httpsRedirect`` is true
    (False without a ``tls``). Istio's validation allows an HTTP server
    no other TLS setting (``mode`` but its default, PASSTHROUGH, no
    certificate): an error each, as here. None after an error."""
    if value is None:
        return False
    tls = fields(
        ctx,
        value,
        path,
        allowed=("httpsRedirect", "mode"),
        unimplemented={k: _PLAIN for k in _TLS_FIELDS},
    )
    if tls is None or any(k not in ("httpsRedirect", "mode") for k in tls):
        return None
    mode = tls.get("mode")
    if mode is not None and mode != "PASSTHROUGH":
        ctx.error((*path, "mode"), f"{dotted((*path, 'mode'))} {mode!r}: {_PLAIN}")
        return None
    return boolean(ctx, tls.get("httpsRedirect"), (*path, "httpsRedirect"))


def _server_host(ctx: Ctx, value: Any, path: Path) -> ServerHostDraft | None:
    """``[NAMESPACE/]HOST`` as Istio validates a Gateway's host: NAMESPACE
    ``*`` (any; the default), ``.`` (the Gateway's) or a namespace; HOST
    ``*``, ``*.example.com`` or a DNS name."""
    h = text(ctx, value, path, required=True)
    if h is None:
        return None
    if h.count("/") > 1:
        # (split at a '/', a scheme's or a path's was read as a namespace)
        scheme, sep, rest = h.partition("://")
        hint = f" (no scheme: {rest.split('/', 1)[0]!r})" if sep and scheme.isalpha() else ""
        ctx.error(
            path,
            f"host {h!r} is malformed: a server host is [NAMESPACE/]HOST, one '/' at most, "
            f"with no scheme and no path{hint}",
        )
        return None
    ns, _, name = h.partition("/") if "/" in h else ("*", "", h)
    if ns == ".":
        ns = ctx.namespace
    elif ns != "*" and not DNS1123_LABEL.fullmatch(ns):
        ctx.error(
            path,
            f"host {h!r}: namespace {ns!r} must be '*', '.' or a namespace (a DNS-1123 label)",
        )
        return None
    name = name.lower().rstrip(".")
    plain = name[2:] if name.startswith("*.") else name
    if name != "*" and not (_NAME.fullmatch(plain) and len(plain) <= 253):
        ctx.error(
            path,
            f"host {h!r} must be [NAMESPACE/]HOST, HOST being '*', '*.example.com' or a DNS "
            "name (no port)",
        )
        return None
    return ServerHostDraft(ns, name, Where(ctx, path))
