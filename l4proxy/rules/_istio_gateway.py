"""Istio's own ingress config: the VirtualServices bound to a ``Gateway``
(networking.istio.io) by ``spec.gateways``.

Theory of operation
-------------------
An Istio Gateway's servers are read by
:mod:`~l4proxy.rules._istio_gateway_servers`: those of protocol HTTP are
served, each ``port.number`` the local port of an ``l4proxy run
--listen`` listener, and a server of any other protocol is a warning
there and is not served. This module binds the VirtualServices to the
servers served, and merges what they get on one port.

With an HTTP server's ``httpsRedirect: true``, each name the server gives
a VirtualService, and each of its own hosts, is Envoy's virtual host
``require_tls: ALL``, as pilot builds it (buildGatewayHTTPRouteConfig):
every request is answered 301 to ``https://HOST/PATH?QUERY`` before any
route is tried (:data:`HTTPS_REDIRECT`, the gateway service's first
route), the Host's port left out where Envoy keeps it; a name of the port
that a redirecting server lists redirects whatever server gave it routes,
and a host of such a server that no VirtualService gets is a gateway
service of that route alone. A request whose X-Forwarded-Proto is
``https`` is not redirected, as Istio's gateway with ``numTrustedProxies``
set: it came through the TLS-terminating proxy in front, and is routed
(:data:`HTTPS_REDIRECT` says why that is believed).

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
server of a bound Gateway admits is a warning naming both; so are the
``tcp`` routes of a VirtualService of ``mesh`` and Gateways, served for
the sidecars alone (:func:`_tcp_not_served`).
One VirtualService reaching one port and name through two Gateways is an
error (Istio appends its routes twice). Every Gateway kind and the
Ingress objects share the gateway's local ports, so one port and host
claimed by an Istio Gateway's server and by a Gateway API listener or an
Ingress rule is an error naming both (:func:`check_claims`,
:func:`check_paths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from l4proxy.rules._gateway_api import gateway_host
from l4proxy.rules._objects import (
    GatewayDraft,
    GatewayRef,
    IngressDraft,
    IstioGatewayDraft,
    RouteDraft,
    RuleDraft,
    ServerDraft,
    oldest_first,
)
from l4proxy.rules._schema import Where
from l4proxy.rules.routing import (
    IngressPath,
    Match,
    Redirect,
    Route,
    Service,
    ServicePort,
    StringMatch,
)

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
        # (the Gateways of the files it is bound to, for _tcp_not_served)
        bound: dict[tuple[str, str], IstioGatewayDraft] = {}
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
            bound[(ref.namespace, ref.name)] = gw
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
        _tcp_not_served(rule, list(bound.values()))
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


def _tcp_not_served(rule: RuleDraft, gateways: Sequence[IstioGatewayDraft]) -> None:
    """The ``tcp`` routes of *rule*, a VirtualService of ``mesh`` and the
    Istio Gateways *gateways* (those of the files it is bound to): served
    for the sidecars, per connection, and not at a Gateway, where only
    ``http`` routes apply (:func:`routes_for`), as its TCP servers are not
    served: a warning naming them, where Istio would route them at a TCP
    server. (A VirtualService of Gateways only has its ``tcp`` routes
    warned of and dropped as it is read, ``_networking``; a ``tls`` route
    bound to ``mesh`` is an error there, the sidecars routing no TLS by
    SNI, so none is left here.)"""
    if not gateways or not any(rd.protocol == "tcp" for rd in rule.routes):
        return
    names = ", ".join(f"{gw.namespace}/{gw.name}" for gw in gateways)
    http = any(rd.protocol == "http" for rd in rule.routes)
    Where(rule.where.ctx, ("spec", "tcp")).warning(
        f"spec.tcp is not served at Gateway{'s' if len(gateways) > 1 else ''} {names}: the "
        "gateway routes HTTP requests, not TCP connections, and l4proxy serves this "
        "VirtualService's http routes alone there; bound to mesh too, its tcp routes are the "
        "sidecars', on TCP ports"
        + ("" if http else "; it has no http route: it routes nothing there")
    )


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
                    # (a VirtualService of no http route at all: _tcp_not_served)
                    if not routes[server.port] and any(r.protocol == "http" for r in rule.routes):
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
