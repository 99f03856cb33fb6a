"""Istio's own ingress config: ``Gateway`` (networking.istio.io) and the
VirtualServices bound to it by ``spec.gateways``.

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
loads them, as an Ingress class is not interpreted either.

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
``tcp`` routes are warnings too, ``_networking``). No gateway service is
made of a skipped server, so a ``--listen`` on its port gets none of this
Gateway's routes: the worker warns of such a port listened on that no
other server or Ingress rule routes (``RouteTable.unserved_ports``), as
of a served server's port that no ``--listen`` serves.

An HTTP server's ``tls`` is ``httpsRedirect`` alone (and ``mode``
PASSTHROUGH, its default), as Istio's validation has it. With
``httpsRedirect: true`` each name the server gives a VirtualService, and
each of its own hosts, is Envoy's virtual host ``require_tls: ALL``, as
pilot builds it (buildGatewayHTTPRouteConfig): every request is answered
301 to ``https://HOST/PATH?QUERY`` before any route is tried
(:data:`HTTPS_REDIRECT`, the gateway service's first route), the Host's
port left out where Envoy keeps it; a name of the port that a redirecting
server lists redirects whatever server gave it routes, and a host of such
a server that no VirtualService gets is a gateway service of that route
alone. A request whose X-Forwarded-Proto is ``https`` is not redirected,
as Istio's gateway with ``numTrustedProxies`` set: it came through the
TLS-terminating proxy in front, and is routed (:data:`HTTPS_REDIRECT`
says why that is believed).

A VirtualService binds to Gateways by ``spec.gateways``, each name
resolved as Istio's resolveGatewayName does (a short name is a Gateway of
the VirtualService's namespace; ``NAMESPACE/NAME``; ``mesh`` stands for the
sidecars). Without ``gateways`` it applies to the sidecars only; with them,
to the sidecars only if ``mesh`` is among them (Istio's rule): a
VirtualService of Gateways only leaves its hosts' mesh traffic to the
registry's round robin, as if it were not there. A match block's own
``gateways`` narrow that per block (:func:`routes_for`, pilot's
sourceMatchHTTP): the block applies at the gateways it names, among those
its VirtualService is bound to, and its ``sourceLabels`` are then not
tested; a route none of whose blocks applies at a gateway is left out there.

At a Gateway, a VirtualService host meets each server host that admits the
VirtualService's namespace (``NAMESPACE/HOST``: ``*/`` any namespace, ``./``
the Gateway's, no prefix any), as pilot intersects them: the more specific
of two names one of which covers the other (``*`` covers every name,
``*.example.com`` every name under it). Each (server port, name met) is one
**gateway service**, built as a Gateway API listener's
(:mod:`~l4proxy.rules._gateway_api`): a host with no endpoints of its own
(:func:`~l4proxy.rules._gateway_api.gateway_host`) whose routes are the
VirtualService's http routes that apply at that Gateway and port, compiled
as a sidecar's are (``_table``: subsets, weights, retries, timeouts, header
edits, rewrites, redirects, faults, mirrors, CORS), reached through a
catch-all ingress path of that port for that name. A request takes the
most specific name its Host matches, the port in the Host ignored (exact,
then the longest ``*.`` suffix, of one label or more, then ``*``), as
Envoy picks a virtual host; its Host no name takes is answered 404 (Envoy's
NR), and a request no route of its name matches 404 ``no route matched``.
There is no fallback from a name's routes to a wider name's, unlike the
Gateway API's hostnames: Envoy's virtual hosts do not fall through.

The servers of every Istio Gateway on one port are one, as pilot builds
one route config of a port: each name the VirtualServices get there is
one gateway service (:class:`GatewayService`), whose routes are those of
each VirtualService that gets it, whichever Gateway it is through, in
Istio's creation order (:func:`merge_order`): the oldest by
``metadata.creationTimestamp`` first, as a ``kubectl get -o yaml`` dump
carries it (RFC 3339; a malformed one is an error at its line), those
created in one second by name, then namespace, as pilot sorts them; those
without one after, in the files' order (file, then document order), as
``kubectl apply -f`` of the same files creates them. Then, as pilot's
SortVHostRoutes, the catch-all matches (none, or the uri prefix ``/``
alone) are tried after every other, each in its order
(:func:`gateway_order`): the routes of a VirtualService split in several
(Istio's "split large virtual services") are all reached. A match
identical to one of another VirtualService merged before it, and a
catch-all after another VirtualService's, are warnings naming both, as
they are never reached.

What Istio does silently is said here: a VirtualService naming a Gateway
that is not in the files is a warning and that binding is dropped (as
Istio ignores it; istioctl analyze's IST0101), as an HTTPRoute's unknown
parent is, so that deleting a Gateway stops what it served; a host no
server of a bound Gateway admits is a warning naming both.
One VirtualService reaching one port and name through two Gateways is an
error (Istio appends its routes twice). Every Gateway kind and the
Ingress objects share the gateway's local ports, so one port and host
claimed by an Istio Gateway's server and by a Gateway API listener or an
Ingress rule is an error naming both (:func:`check_claims`,
:func:`check_paths`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from l4proxy.k8s_names import DNS1123_LABEL
from l4proxy.rules._gateway_api import gateway_host
from l4proxy.rules._objects import (
    Env,
    GatewayDraft,
    GatewayRef,
    IngressDraft,
    IstioGatewayDraft,
    RouteDraft,
    RuleDraft,
    ServerDraft,
    ServerHostDraft,
    oldest_first,
)
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
from l4proxy.rules.routing import (
    IngressPath,
    Match,
    Redirect,
    Route,
    Service,
    ServicePort,
    StringMatch,
)

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


# -- reading ---------------------------------------------------------------------


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


# -- which routes apply where ------------------------------------------------------


def routes_for(rule: RuleDraft, gateway: str, port: int | None = None) -> list[RouteDraft]:
    """The routes of *rule* that apply at *gateway* (``mesh``, or an Istio
    Gateway's ``namespace/name``) and, at a Gateway, on server *port*: none
    where *rule* is not bound to it; of a route whose match blocks name
    gateways, the blocks that apply there (each one naming *gateway*, or
    naming none), the route left out where none does; at a Gateway only
    ``http`` routes, and only blocks of no ``port`` or that one (pilot's
    translateRoute). What is left is each route's matches there, its
    ``blocks`` spent (for the mesh a catch-all among them makes them
    none; at a Gateway each is kept, for :func:`gateway_order`)."""
    if gateway not in rule.bound:
        return []
    out: list[RouteDraft] = []
    for rd in rule.routes:
        if port is not None and rd.protocol != "http":
            continue
        if rd.blocks is None:
            if not rd.matches or port is None:
                out.append(rd)
                continue
            ms = tuple(m for m in rd.matches if m.port in (None, port))
        else:
            ms = tuple(
                b.match
                for b in rd.blocks
                if (not b.gateways or any(g.key == gateway for g in b.gateways))
                and (port is None or b.match.port in (None, port))
            )
        if not ms:
            continue
        if port is None and Match() in ms:
            ms = ()
        out.append(dataclasses.replace(rd, matches=ms, blocks=None))
    return out


# -- binding VirtualServices to Gateways --------------------------------------------


def _covers(wide: str, name: str) -> bool:
    """Whether every name *name* stands for, *wide* stands for too (pilot's
    host.Name.SubsetOf): ``*`` covers all, ``*.a.com`` ``b.a.com`` and
    ``*.b.a.com``."""
    if wide.startswith("*"):
        return (name[1:] if name.startswith("*") else name).endswith(wide[1:])
    return not name.startswith("*") and name == wide


def meet(server: str, host: str) -> str | None:
    """The names a server host and a VirtualService host both stand for:
    the more specific of the two where one covers the other (pilot's
    host.Names.Intersection); None where neither does."""
    if _covers(server, host):
        return host
    if _covers(host, server):
        return server
    return None


@dataclass
class Binding:
    """VirtualService *rule* on server port *server.port* of Gateway
    *gateway*, for the requests whose Host is *name* (``*``: any), by *ref*
    (its ``spec.gateways`` entry), from its host *host*."""

    gateway: IstioGatewayDraft
    server: ServerDraft
    name: str
    host: str
    rule: RuleDraft
    ref: GatewayRef
    routes: list[RouteDraft]

    @property
    def port(self) -> int:
        return self.server.port

    def __str__(self) -> str:
        return (
            f"VirtualService {self.rule.namespace}/{self.rule.name} for {self.name} on port "
            f"{self.port} of Gateway {self.gateway.namespace}/{self.gateway.name}"
        )


# What a request to a name of a server of ``tls.httpsRedirect`` takes
# first: Envoy's virtual host ``require_tls: ALL``, which answers 301
# before any route is matched where X-Forwarded-Proto is not ``https``
# (VirtualHostImpl::getRouteFromEntries). The Location is Envoy's
# ``https://HOST/PATH?QUERY`` less the Host's port (``Redirect.gateway``:
# the port is https's, 443, left out), where Envoy keeps it
# (createSslRedirectPath; envoyproxy/envoy#4832: http://a:80/ is sent to
# https://a:80/, no https port). X-Forwarded-Proto ``https`` (exactly, as
# Envoy compares it) is believed here, as Istio's gateway believes it
# with ``gatewayTopology.numTrustedProxies`` set, never by default: this
# gateway never terminates TLS, its https requests come through a proxy
# in front that terminates it, and one that forwards them to the
# redirecting port with that header has them routed, not sent back to
# https for ever. A client that sends the header itself is routed too,
# over plain HTTP it chose: the redirect keeps browsers off plain HTTP,
# it is no access control.
HTTPS_REDIRECT = Route(
    "https-redirect",
    (),
    (Match(without_headers=(("x-forwarded-proto", StringMatch("exact", "https")),)),),
    redirect=Redirect(301, scheme="https", gateway=True, https_redirect=True),
)


@dataclass
class GatewayService:
    """One gateway service: one (server port, name), with every binding
    of it, whichever Istio Gateway each is through, in the order
    :func:`bind` found them (:func:`merge_order`), as pilot builds
    one virtual host of a name for every server on a port. Named after
    *gateway*'s *server*, the first to give it (to a VirtualService, or
    by a host of its own where it redirects: *bindings* may be none).
    *redirect*: whether it is ``require_tls: ALL`` (:data:`HTTPS_REDIRECT`),
    as pilot makes a virtual host of a name that a VirtualService gets
    through a server of ``httpsRedirect``, or that such a server of the
    port lists as a host."""

    gateway: IstioGatewayDraft
    server: ServerDraft
    name: str
    bindings: list[Binding] = dataclasses.field(default_factory=list)
    redirect: bool = False

    @property
    def key(self) -> str:
        # (``NAME.NUMBER``, as Istio names a server's routes: a Gateway API
        # listener's name, a DNS label, never has a dot)
        listener = f"{self.server.port_name}.{self.server.port}"
        return gateway_host(self.gateway, listener, None if self.name == "*" else self.name)

    @property
    def port(self) -> int:
        return self.server.port

    def service(self) -> Service:
        """The gateway service: no endpoints, one HTTP port, the server's."""
        sp = ServicePort(self.port, self.server.port_name, "HTTP")
        return Service(self.key, (sp,), role="gateway")

    def ingress_path(self) -> IngressPath:
        """The catch-all path of the server's port for the name, to the
        gateway service."""
        return IngressPath(
            f"{self.gateway.namespace}/{self.gateway.name}/{self.server.port_name}",
            None if self.name == "*" else self.name,
            "/",
            "Prefix",
            self.key,
            self.port,
            listener_port=self.port,
        )

    def routes(self) -> list[tuple[Binding, RouteDraft]]:
        """Each binding's routes, in order, then the catch-all ones
        (:func:`gateway_order`)."""
        return gateway_order([(b, rd) for b in self.bindings for rd in b.routes])

    def own_routes(self) -> list[Route]:
        """The routes it is given before the bindings' (compiled, the
        table's): the https redirect where it redirects."""
        return [HTTPS_REDIRECT] if self.redirect else []

    def __str__(self) -> str:
        if self.bindings:
            return str(self.bindings[0])
        return (
            f"the https redirect of {self.name} on port {self.port} of Gateway "
            f"{self.gateway.namespace}/{self.gateway.name}"
        )


def _catch_all(m: Match) -> bool:
    """Whether match *m* takes every request at a gateway, as pilot's
    IsCatchAllRoute says of the Envoy route it becomes: no condition but
    the uri prefix ``/`` (the port is the server's there)."""
    if m.uri is not None and not (m.uri.kind == "prefix" and m.uri.value == "/"):
        return False
    return dataclasses.replace(m, uri=None, ignore_uri_case=False, port=None) == Match()


def gateway_order(
    routes: Sequence[tuple[Binding, RouteDraft]],
) -> list[tuple[Binding, RouteDraft]]:
    """*routes* as a gateway tries them: pilot sorts each virtual host's
    routes (SortVHostRoutes) so that its catch-all ones come after the
    others, each kept in its order. A match is one Envoy route there: a
    route of catch-all and other matches keeps the others in its place and
    is tried again, as a catch-all, at the end. A match of one
    VirtualService identical to one of another tried before it, and a
    catch-all after another one, are never reached: a warning each naming
    both (one VirtualService's routes after its own catch-all are Istio's
    analyzer's IST0130, for the mesh too)."""
    head: list[tuple[Binding, RouteDraft]] = []
    tail: list[tuple[Binding, RouteDraft]] = []
    for b, rd in routes:
        some = tuple(m for m in rd.matches if not _catch_all(m))
        if rd.matches and len(some) == len(rd.matches):
            head.append((b, rd))
            continue
        if some:
            head.append((b, dataclasses.replace(rd, matches=some)))
        tail.append((b, dataclasses.replace(rd, matches=())))
    # (the port of a match is the server's here: a match of port 80 and
    # one of no port are one on port 80)
    first: dict[Match, tuple[Binding, RouteDraft, Match]] = {}
    for b, rd in head:
        for m in rd.matches:
            fb, fr, fm = first.setdefault(dataclasses.replace(m, port=None), (b, rd, m))
            if fb.rule is b.rule:
                continue
            _match_where(b, rd, m).warning(
                f"this match of route {rd.name} is the same as one of route {fr.name} of "
                f"VirtualService {fb.rule.namespace}/{fb.rule.name} "
                f"({_match_where(fb, fr, fm).location}) for {b.name} on port {b.port}, tried "
                f"before it ({_merge_reason(fb.rule, b.rule)}): it is never reached there"
            )
    for b, rd in tail[1:]:
        fb, fr = tail[0]
        if b.rule is not fb.rule:
            b.ref.where.warning(
                f"route {rd.name} takes every request for {b.name} on port {b.port}, and so "
                f"does route {fr.name} of VirtualService {fb.rule.namespace}/{fb.rule.name} "
                f"({fb.ref.where.location}), tried before it ({_merge_reason(fb.rule, b.rule)}): "
                "it is never reached there; give it a match"
            )
    return head + tail


def _match_where(b: Binding, rd: RouteDraft, m: Match) -> Where:
    """Where match *m* of route *rd* is: its block, else the route, else
    the binding's ``gateways`` entry."""
    return rd.lines.get(m) or rd.where or b.ref.where


def merge_order(rule: RuleDraft) -> tuple[bool, float, tuple[str, ...]]:
    """The order in which the VirtualServices of one name on one port are
    merged, as pilot sorts them (sortConfigByCreationTime): the oldest by
    ``creationTimestamp`` first (:func:`~l4proxy.rules._objects.oldest_first`;
    one created in the same second by name, then namespace). Those without
    one keep the files' order (the sort is stable): ``kubectl apply -f``
    of the same files creates them in that order."""
    tie = (rule.name, rule.namespace) if rule.created is not None else ()
    return (*oldest_first(rule.created), tie)


def _merge_reason(before: RuleDraft, after: RuleDraft) -> str:
    """Why VirtualService *before* is merged before *after*, in words."""
    if before.created is not None and after.created is None:
        return "it has a creationTimestamp, this one none"
    if before.created is not None and before.created != after.created:
        return "created earlier"
    if before.created is not None:
        return "created in the same second, first by name"
    return "the files' order, neither has a creationTimestamp"


def bind(gateways: Sequence[IstioGatewayDraft], rules: Iterable[RuleDraft]) -> list[GatewayService]:
    """The gateway services: every (server port, name) the VirtualServices
    of *rules* get at the Gateways, each with its bindings in
    :func:`merge_order` (then each VirtualService's ``spec.gateways``
    order); errors and warnings at the VirtualServices."""
    by_name = {(g.namespace, g.name): g for g in gateways}
    served: dict[tuple[int, str], GatewayService] = {}
    virtual_services = [r for r in rules if r.kind == "VirtualService"]
    for rule in sorted(virtual_services, key=merge_order):
        for rd in rule.routes:
            for block in rd.blocks or ():
                for g in block.gateways:
                    if g.key not in rule.bound:
                        g.where.warning(
                            f"gateway {g.key} is not one of this VirtualService's "
                            f"(spec.gateways: {', '.join(rule.bound)}); this block applies "
                            "nowhere there (a VirtualService is bound by spec.gateways alone)"
                        )
        for ref in rule.gateways or ():
            if ref.is_mesh:
                continue
            gw = by_name.get((ref.namespace, ref.name))
            if gw is None:
                known = ", ".join(f"{ns}/{n}" for ns, n in sorted(by_name)) or "none"
                # (Istio ignores the binding, istioctl analyze's IST0101; a
                # warning, never an error: a Gateway deleted must stop
                # serving, where an error would keep the last good rules)
                ref.where.warning(
                    f"unknown gateway: no Istio Gateway {ref.key} in these files (Istio "
                    f"Gateways: {known}; a VirtualService binds to networking.istio.io "
                    "Gateways, a Gateway API Gateway takes HTTPRoutes); this binding is "
                    "dropped until one is loaded, as Istio ignores it"
                )
                continue
            for b in _bindings(rule, ref, gw):
                vh = served.get((b.port, b.name))
                if vh is None:
                    served[(b.port, b.name)] = GatewayService(
                        gw, b.server, b.name, [b], b.server.https_redirect
                    )
                    continue
                # Istio appends a VirtualService's routes once per Gateway
                # that reaches the name (those of the second never taken)
                twice = next((o for o in vh.bindings if o.rule is rule), None)
                if twice is not None:
                    ref.where.error(
                        f"host {b.name} on port {b.port} is this VirtualService's through "
                        f"Gateway {twice.gateway.namespace}/{twice.gateway.name} already "
                        f"({twice.ref.where.location}); the servers of every Gateway on one "
                        "port are one: bind it there through one of them"
                    )
                    continue
                vh.bindings.append(b)
                vh.redirect = vh.redirect or b.server.https_redirect
    # pilot's virtual hosts of a redirecting server's own hosts: each one a
    # VirtualService got redirects, whatever server it is through; one no
    # VirtualService got is made, to answer the redirect alone (a request
    # X-Forwarded-Proto https, 404 no route matched)
    for gw in gateways:
        for server in gw.servers:
            if not server.https_redirect:
                continue
            for sh in server.hosts:
                vh = served.setdefault(
                    (server.port, sh.hostname), GatewayService(gw, server, sh.hostname)
                )
                vh.redirect = True
    return list(served.values())


def _bindings(rule: RuleDraft, ref: GatewayRef, gw: IstioGatewayDraft) -> list[Binding]:
    """What *rule* gets at Gateway *gw* (named by *ref*): per server port,
    each name its hosts meet the port's servers' hosts in, the first
    server to admit a name keeping it. A host no server admits is a
    warning, and so is a port where no route of *rule* applies."""
    out: list[Binding] = []
    taken: set[str] = set()
    done: set[tuple[int, str]] = set()
    routes: dict[int, list[RouteDraft]] = {}
    for server in gw.servers:
        for host in rule.hosts:
            for sh in server.hosts:
                name = meet(sh.hostname, host)
                if name is None or sh.namespace not in ("*", rule.namespace):
                    continue
                taken.add(host)
                if (server.port, name) in done:
                    continue
                done.add((server.port, name))
                if server.port not in routes:
                    routes[server.port] = routes_for(rule, ref.key, server.port)
                    if not routes[server.port]:
                        ref.where.warning(
                            f"no http route of this VirtualService applies on port "
                            f"{server.port} of Gateway {gw.namespace}/{gw.name} (their match "
                            "blocks name other gateways or ports); its hosts are not served there"
                        )
                if routes[server.port]:
                    out.append(Binding(gw, server, name, host, rule, ref, routes[server.port]))
    for host in rule.hosts:
        if host in taken:
            continue
        hosts = [str(sh) for s in gw.servers for sh in s.hosts]
        barred = [
            str(sh)
            for s in gw.servers
            for sh in s.hosts
            if meet(sh.hostname, host) is not None and sh.namespace != "*"
        ]
        if barred:
            why = (
                f"{', '.join(barred)} admit only the VirtualServices of "
                f"{'that namespace' if len(barred) == 1 else 'their namespaces'}, and this one "
                f"is in {rule.namespace}"
            )
        elif hosts:
            why = f"its HTTP servers' hosts are {', '.join(hosts)}"
        else:
            why = "it has no HTTP server"
        if gw.skipped and not barred:
            why += f"; {', '.join(gw.skipped)} not served"
        ref.where.warning(
            f"host {host} is admitted by no server of Gateway {gw.namespace}/{gw.name} ({why}); "
            "it is not routed there (Istio ignores it silently)"
        )
    return out


# -- one port and host, one owner ---------------------------------------------------


def check_claims(
    istio: Sequence[IstioGatewayDraft],
    gateways: Sequence[GatewayDraft],
    ingress: Sequence[IngressDraft],
) -> bool:
    """The ports and hosts that the Gateways' servers and listeners and
    the Ingress rules claim, each by one of them: two of different kinds
    (an Istio Gateway's server, a Gateway API listener, an Ingress rule)
    on one port (an Ingress rule's is every port) and one host (``*``, a
    listener without a hostname and an Ingress rule without one all
    meaning any) is an error naming both. (Listeners of Gateway API
    Gateways among themselves: ``_gateway_api._check_shared_ports``;
    Ingress rules of one host are merged, as Kubernetes merges them; the
    servers of Istio Gateways on one port are one, as pilot merges them,
    and the names VirtualServices get there meet in :func:`bind`.)
    Whether none clashed."""
    # (port or None: every port, host or None: any) → what claims it
    claims: list[tuple[int | None, str | None, str, Where, str]] = []
    ok = True

    def claim(port: int | None, host: str | None, what: str, where: Where, kind: str) -> None:
        nonlocal ok
        for other_port, other_host, other, other_where, other_kind in claims:
            if other_host != host or (None not in (port, other_port) and port != other_port):
                continue
            if kind == other_kind:
                # (checked, or merged, elsewhere: an Istio Gateway's servers
                # on one port are one, their names meeting in ``bind``)
                continue
            ok = False
            on = f"port {port}" if port is not None else "every port"
            where.error(
                f"{what} serves host {host or '*'} on {on}, and so does {other} "
                f"({other_where.location}); the gateway serves every Gateway and Ingress on "
                "the same local ports, so one port and host is one of them: give one another "
                "host or port"
            )
            return
        claims.append((port, host, what, where, kind))

    for gw in gateways:
        for lst in gw.listeners:
            what = f"listener {lst.name} of Gateway {gw.namespace}/{gw.name}"
            claim(lst.port, lst.hostname, what, lst.where, "gateway-api")
    seen: set[tuple[str, str | None]] = set()
    for ing in ingress:
        p = ing.path
        if p.path_type == "Default" or (p.name, p.host) in seen:
            continue
        seen.add((p.name, p.host))
        claim(None, p.host, f"Ingress {p.name}", ing.where, "ingress")
    for igw in istio:
        for i, server in enumerate(igw.servers):
            for sh in server.hosts:
                host = None if sh.hostname == "*" else sh.hostname
                what = f"Gateway {igw.namespace}/{igw.name} server {i} (host {sh})"
                claim(server.port, host, what, sh.where, "istio")
    return ok


def check_paths(
    services: Sequence[GatewayService],
    others: Iterable[IngressPath],
    gateways: Sequence[GatewayDraft],
) -> None:
    """A name the VirtualServices get on a Gateway port that a Gateway API
    listener's routes or an Ingress rule serve on that port too, or that a
    Gateway API listener on that port is for: an error naming both (a
    request would take one of them by the order of the files)."""
    paths = [p for p in others if p.path_type != "Default"]
    listeners = [(gw, lst) for gw in gateways for lst in gw.listeners if lst.hostname]
    for vh in services:
        host = None if vh.name == "*" else vh.name
        clash = next(
            (
                f"listener {lst.name} of Gateway {gw.namespace}/{gw.name} ({lst.where.location})"
                for gw, lst in listeners
                if (lst.port, lst.hostname) == (vh.port, host)
            ),
            None,
        )
        clash = clash or next(
            (
                f"Ingress {p.name} (on every port)"
                if p.listener_port is None
                else f"the routes of listener {p.name}"
                for p in paths
                if p.host == host and p.listener_port in (None, vh.port)
            ),
            None,
        )
        if clash:
            said = [(str(b), b.ref.where) for b in vh.bindings] or [(str(vh), vh.server.where)]
            for what, where in said:
                where.error(
                    f"{what} is served by {clash} too; one port and host is one route set: "
                    "give one another host or port"
                )
