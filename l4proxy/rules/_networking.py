"""networking.istio.io kinds: VirtualService, DestinationRule, ServiceEntry.

v1alpha3, v1beta1 and v1 share the fields read here. What l4proxy does not
implement (TLS, tunnels...) is an error that
names the field: a sidecar that silently ignored a setting would be worse
than one that refuses it. A value that asks for what the sidecar does
anyway is accepted and changes nothing: an ``exportTo`` that exports the
object to this sidecar's namespace (``_export_to``), a ``tls`` of mode
DISABLE (``_client_tls``), ``loadBalancer.simple: UNSPECIFIED`` (the
default, ``_SIMPLE_LB``). A DestinationRule's ``trafficPolicy`` (at the rule
and in each subset) is read with its ``portLevelSettings``
(``_port_level_settings``): each entry the whole policy of one service
port, merged as Istio's pilot does (``_objects.policy_subset``). Its
``workloadSelector`` (``_workload_selector``) names the client pods whose
sidecars it applies on, in place of the host's rule without one: which
rule applies on this pod is ``_table._policies``' to say.
``http[].timeout`` and ``http[].retries`` are honoured by the per-request
relay (Envoy's route timeout and retry policy, see ``Route.timeout`` and
``Route.retries``), and so are ``http[].headers``,
``http[].route[].headers``, ``rewrite`` (``uri``, ``uriRegexRewrite``,
``authority``), ``redirect``
and ``directResponse`` (``Route.headers``, ``Destination.headers``,
``Route.rewrite``, ``Route.redirect``, ``Route.direct``; the names and
values each may hold: ``_header_ops``), and ``http[].fault`` (a fixed delay
and an HTTP abort, ``Route.fault``, read by ``_fault``; with a redirect or a
direct response it is an error, as in Istio's validation). Differences from
Envoy: Envoy's header formatters (``%...%``) are refused, and a 3xx direct
response gets no ``location``. ``http[].mirror`` (with ``mirrorPercentage``,
or the deprecated integer ``mirrorPercent``) and ``http[].mirrors`` are the
route's request mirroring (``Route.mirrors``), read as Istio validates and
translates them (``_mirrors``). ``http[].corsPolicy`` is the route's CORS
policy (``Route.cors``, read by ``_cors``). A VirtualService's
``gateways`` and an http match block's are read here, each name resolved
as Istio resolves it (``_gateway_ref``); which routes then apply to the
sidecars and which at an Istio Gateway is ``_istio_gateway``'s to say. A
VirtualService of Istio Gateways only (no ``mesh`` among its gateways) may
name its hosts with wildcards (``*``, ``*.example.com``), as Istio users
do for an ingress gateway, and its ``tls`` and ``tcp`` routes are a
warning each and not read (``_not_served``): the gateway serves HTTP
requests alone, as its TLS and TCP servers are warnings too; one of no
``http`` route routes nothing. For the sidecars, ``tcp`` routes are
served per connection and ``tls`` ones are an error.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import re
from typing import Any, Literal

from l4proxy.dataplane.verdict import (
    HASH_COOKIE,
    HASH_HEADER,
    HASH_QUERY,
    HASH_SOURCE_IP,
    MIRROR_SCALE,
    HashOn,
    HeadEdits,
)
from l4proxy.k8s_names import DNS1123_LABEL
from l4proxy.rules._cors import istio_cors
from l4proxy.rules._fault import is_number, istio_fault
from l4proxy.rules._header_ops import istio_headers
from l4proxy.rules._objects import (
    MESH,
    DestinationDraft,
    Env,
    GatewayRef,
    MatchBlockDraft,
    PolicyDraft,
    PortPolicyDraft,
    RouteDraft,
    RuleDraft,
    ServiceDraft,
    SubsetDraft,
    aliases,
    fqdn,
    weights,
)
from l4proxy.rules._regex import RegexError, check_rewrite, compile_regex, shown
from l4proxy.rules._schema import (
    NOT_IMPLEMENTED,
    Ctx,
    Where,
    boolean,
    creation_timestamp,
    dns_label,
    dotted,
    duration,
    fields,
    header_name,
    integer,
    labels,
    listing,
    string_match,
    text,
    type_name,
)
from l4proxy.rules._yaml import Path
from l4proxy.rules.routing import (
    DEFAULT_RETRY_BACKOFF,
    ISTIO_DEFAULT_RETRY_CODES,
    ISTIO_DEFAULT_RETRY_ON,
    MAX_CIRCUIT_BREAKER,
    MAX_REQUESTS_PER_CONNECTION,
    REDIRECT_CODES,
    RETRY_ON_NO_OPS,
    RETRY_ON_POLICIES,
    Endpoint,
    HttpRetry,
    Labels,
    LocalAnswer,
    Match,
    OutlierPolicy,
    PoolSettings,
    Redirect,
    Service,
    ServicePort,
    StringMatch,
    UriRewrite,
)

API_VERSIONS = (
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
)
SERVICE_ENTRY_API_VERSIONS = API_VERSIONS

_OLD_HEADERS = "Istio removed it; use headers.request or headers.response"
_HTTP_ROUTE_UNIMPLEMENTED = {
    "appendHeaders": _OLD_HEADERS,
    "removeResponseHeaders": _OLD_HEADERS,
    "appendResponseHeaders": _OLD_HEADERS,
    "removeRequestHeaders": _OLD_HEADERS,
    "appendRequestHeaders": _OLD_HEADERS,
    "websocketUpgrade": "",
    # (a route of another VirtualService's, merged by pilot: no route here,
    # and so no second error for its missing route, _vs_route)
    "delegate": "put the delegate VirtualService's http routes in this one, their matches "
    "narrowed by this route's, as pilot merges them",
}
# Envoy's largest direct response body as Istio configures a sidecar's
# routes (max_direct_response_body_size_bytes)
MAX_DIRECT_BODY = 1024 * 1024
# an http route destination's header edits before Istio 1.1's headers (its
# DestinationWeight's in Istio 1.0), as the route's own (_HTTP_ROUTE_UNIMPLEMENTED)
_OLD_DESTINATION_HEADERS = dict.fromkeys(
    (
        "appendHeaders",
        "appendRequestHeaders",
        "appendResponseHeaders",
        "removeRequestHeaders",
        "removeResponseHeaders",
    ),
    _OLD_HEADERS,
)
_HTTP_MATCH_UNIMPLEMENTED = ("sourceNamespace",)
# a PortSelector's name (Istio 0.8 to 1.3; its PortSelector has had number
# alone since 1.4)
_PORT_BY_NAME = "Istio removed it in 1.4: select the port by number (port: {number: N})"
_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "HTTPS", "TLS", "TCP", "MONGO", "MYSQL", "REDIS")


def _host(ctx: Ctx, value: Any, path: Path, env: Env, *, wildcards: bool = False) -> str | None:
    """A host as the table keys it (see ``fqdn``); with *wildcards* (a
    VirtualService of gateways only) ``*`` and ``*.example.com`` too."""
    h = text(ctx, value, path, required=True)
    if h is None:
        return None
    if "*" in h and not wildcards:
        ctx.error(
            path,
            f"wildcard host {h!r} {NOT_IMPLEMENTED} for mesh traffic; list each host (a "
            "VirtualService whose spec.gateways name only Istio Gateways may use one)",
        )
        return None
    if "*" in h:
        if h != "*" and not (h.startswith("*.") and _DNS_NAME.fullmatch(h[2:])):
            ctx.error(path, f"wildcard host {h!r} must be '*' or start with '*.' ('*.example.com')")
            return None
        return h.lower()
    if "/" in h:
        ctx.error(path, f"host {h!r} must be a DNS name (namespace/host is not supported)")
        return None
    if not _DNS_NAME.fullmatch(h):
        # web:8080 became web:8080.default.svc.cluster.local, which nothing
        # ever matches; Istio refuses it too
        hint = f" (no port: {h.split(':', 1)[0]!r})" if ":" in h else ""
        ctx.error(path, f"host {h!r} must be a DNS name{hint}")
        return None
    return fqdn(h, ctx.namespace, env)


_DNS_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?")


def _hosts(
    ctx: Ctx, spec: dict[str, Any], env: Env, *, wildcards: bool = False
) -> tuple[list[str], bool]:
    """``spec.hosts`` as FQDNs, in order, without repeats; False if any was bad."""
    ok = True
    hosts: list[str] = []
    for i, h in enumerate(listing(ctx, spec.get("hosts"), ("spec", "hosts")) or []):
        got = _host(ctx, h, ("spec", "hosts", i), env, wildcards=wildcards)
        if got is None:
            ok = False
        elif got not in hosts:
            hosts.append(got)
    return hosts, ok


def _export_to(ctx: Ctx, value: Any, env: Env) -> bool:
    """``spec.exportTo`` of a VirtualService, DestinationRule or
    ServiceEntry: whether it is accepted.

    The sidecar applies every object it loads: there are no sidecars of
    other namespaces to hide one from. A list that exports the object to
    this sidecar's namespace (``--namespace``) therefore changes nothing
    here and is accepted: ``*`` (every namespace: Istio's default, as is
    an empty list), ``.`` (the object's own namespace) of an object in the
    sidecar's namespace, or that namespace by name. One that does not
    (``.`` of an object of another namespace, other namespaces' names,
    ``~``: none) is an error: Istio would not apply the object to this
    sidecar, and l4proxy would. So is what Istio's validation refuses: an
    entry that is no namespace name, ``~`` but on a ServiceEntry, ``*`` or
    ``~`` beside another entry, a namespace twice (``.`` and the object's
    namespace by name among them)."""
    path: Path = ("spec", "exportTo")
    items = listing(ctx, value, path)
    if items is None:
        return False
    marks = (".", "*", "~") if ctx.kind == "ServiceEntry" else (".", "*")
    seen: list[str] = []
    ok = True
    for i, item in enumerate(items):
        ipath = (*path, i)
        e = text(ctx, item, ipath, required=True)
        if e is None:
            ok = False
        elif e == "~" and "~" not in marks:
            ctx.error(ipath, f"{dotted(ipath)} '~' (none) is for a ServiceEntry (Istio refuses it)")
            ok = False
        elif e not in marks and not DNS1123_LABEL.fullmatch(e):
            ctx.error(
                ipath,
                f"{dotted(ipath)} {e!r} is not a namespace name (nor '.', the "
                f"{ctx.kind}'s own, or '*', every one"
                + (", or '~', none)" if "~" in marks else ")"),
            )
            ok = False
        elif (ctx.namespace if e == "." else e) in seen:
            ctx.error(
                ipath,
                f"{dotted(ipath)} {e!r} is given twice"
                + (
                    f" ('.' is namespace {ctx.namespace})"
                    if "." in items and ctx.namespace in items
                    else ""
                )
                + " (Istio refuses it)",
            )
            ok = False
        else:
            seen.append(ctx.namespace if e == "." else e)
    if not ok:
        return False
    alone = [e for e in ("*", "~") if e in seen and len(seen) > 1]
    if alone:
        ctx.error(
            path,
            f"{dotted(path)} holds {alone[0]!r} beside other entries (Istio refuses it; "
            f"{alone[0]!r} alone says it all)",
        )
        return False
    if not seen or "*" in seen or env.namespace in seen:
        return True
    shown = "[" + ", ".join(repr(e) for e in items) + "]"
    dot = f" ('.' is the {ctx.kind}'s namespace, {ctx.namespace})" if "." in items else ""
    ctx.error(
        path,
        f"{dotted(path)} {shown}{dot} keeps this {ctx.kind} from the sidecars of namespace "
        f"{env.namespace}, this one's (--namespace), which l4proxy does not implement: it "
        f"applies every object it loads; leave the {ctx.kind} out of this sidecar's rule "
        "files, or export it with '*'",
    )
    return False


def _port_number(ctx: Ctx, value: Any, path: Path) -> int | None:
    return integer(ctx, value, path, 1, 65535, what="port")


# -- VirtualService ----------------------------------------------------------


def read_virtual_service(ctx: Ctx, obj: dict[str, Any], env: Env) -> RuleDraft | None:
    assert ctx.name is not None
    raw = obj.get("spec")
    hostless = isinstance(raw, dict) and raw.get("hosts") in (None, [])
    spec = fields(
        ctx,
        raw,
        ("spec",),
        allowed=("hosts", "gateways", "http", "tcp", "tls", "exportTo"),
        required=() if hostless else ("hosts",),
    )
    if spec is None:
        return None
    if hostless:  # (Istio's delegate: its routes are merged into another's http[].delegate)
        ctx.error(
            ("spec",) if spec.get("hosts") is None else ("spec", "hosts"),
            "spec.hosts is required (a VirtualService without hosts is the delegate of "
            "another's http[].delegate, which l4proxy does not implement: put its http "
            "routes in that VirtualService)",
        )
    gateways = _gateway_refs(ctx, spec.get("gateways"), ("spec", "gateways"))
    ok = _export_to(ctx, spec.get("exportTo"), env) and gateways is not False
    bound = gateways if isinstance(gateways, tuple) else None
    # (a VirtualService of Istio Gateways only may name every host: "*")
    mesh = bound is None or any(g.is_mesh for g in bound)
    hosts, hosts_ok = _hosts(ctx, spec, env, wildcards=not mesh)
    ok = ok and hosts_ok
    routes: list[RouteDraft] = []
    http = listing(ctx, spec.get("http"), ("spec", "http"))
    tcp = listing(ctx, spec.get("tcp"), ("spec", "tcp"))
    tls = listing(ctx, spec.get("tls"), ("spec", "tls"))
    if http is None or tcp is None or tls is None:
        return None
    if tls and mesh:
        # (the sidecars route no TLS by SNI)
        ctx.error(
            ("spec", "tls"),
            f"spec.tls {NOT_IMPLEMENTED}"
            + (
                "; bound to mesh, it is the sidecars' (bound to Istio Gateways alone it would "
                "be a warning, not served)"
                if bound is not None
                else ""
            ),
        )
        ok = False
    if not mesh and (tls or tcp):
        _not_served(ctx, tls, tcp, http)
        if not http:
            creation_timestamp(ctx, obj)  # (checked all the same)
            return None
        tcp = []
    if not http and not tcp and not tls:
        ctx.error(("spec",), "a VirtualService needs at least one http or tcp route")
        ok = False
    default_host = hosts[0] if hosts else None
    sections: tuple[tuple[Literal["http", "tcp"], list[Any]], ...] = (("http", http), ("tcp", tcp))
    for proto, items in sections:
        for i, item in enumerate(items):
            name = _route_name(ctx.name, item, i, len(items), proto)
            r = _vs_route(ctx, item, ("spec", proto, i), proto, name, default_host, env)
            if r is None:
                ok = False
            else:
                routes.append(r)
    stamp_ok, created = creation_timestamp(ctx, obj)
    if not ok or not stamp_ok:
        return None
    return RuleDraft(
        "VirtualService",
        ctx.name,
        ctx.namespace,
        hosts,
        routes,
        Where(ctx, ()),
        gateways=bound,
        created=created,
    )


def _not_served(ctx: Ctx, tls: list[Any], tcp: list[Any], http: list[Any]) -> None:
    """The ``tls`` and ``tcp`` routes of a VirtualService of Istio Gateways
    only (no ``mesh``): a warning each, not read, as the Gateway servers
    they are for (TLS, HTTPS passthrough, TCP) are warnings and not served:
    an error would refuse the whole rule set for what is not served
    anyway (at a reload, the last good rules kept serving). For the mesh,
    ``tcp`` routes are served per connection and ``tls`` ones are an
    error."""
    why = {
        "tls": "the gateway neither routes TLS connections by SNI nor terminates TLS",
        "tcp": "the gateway routes HTTP requests, not TCP connections",
    }
    for section, items in (("tls", tls), ("tcp", tcp)):
        if not items:
            continue
        ctx.warning(
            ("spec", section),
            f"spec.{section} is not served: {why[section]}, and this VirtualService is bound to "
            "Istio Gateways only (no mesh), where l4proxy serves its http routes alone"
            + ("" if http else "; it has none: it routes nothing here"),
        )


def _gateway_refs(ctx: Ctx, value: Any, path: Path) -> tuple[GatewayRef, ...] | bool | None:
    """``gateways`` (a VirtualService's or a match block's): the references
    in order without repeats; None where it is absent or empty (Istio's
    default: ``mesh`` for a VirtualService, its VirtualService's for a
    block); False after an error."""
    items = listing(ctx, value, path)
    if items is None:
        return False
    out: list[GatewayRef] = []
    ok = True
    for i, item in enumerate(items):
        ref = _gateway_ref(ctx, item, (*path, i))
        if ref is None:
            ok = False
        elif ref not in out:
            out.append(ref)
    if not ok:
        return False
    return tuple(out) or None


def _gateway_ref(ctx: Ctx, value: Any, path: Path) -> GatewayRef | None:
    """One gateway name, resolved as Istio's resolveGatewayName does and
    checked as its validateGatewayNames does: ``mesh``; ``NAMESPACE/NAME``;
    a short ``NAME`` (a Gateway of the VirtualService's namespace); the
    legacy ``NAME.NAMESPACE.svc.cluster.local`` (a warning: Istio prefers
    ``NAMESPACE/NAME``)."""
    g = text(ctx, value, path, required=True)
    if g is None:
        return None
    where = Where(ctx, path)
    if g == MESH:
        return GatewayRef("", MESH, where)
    if "/" in g:
        ns, _, name = g.partition("/")
        if not DNS1123_LABEL.fullmatch(ns) or not DNS1123_LABEL.fullmatch(name):
            ctx.error(
                path,
                f"gateway {g!r} must be NAMESPACE/NAME, each a DNS-1123 label ('{MESH}' for the "
                "sidecars, NAME alone for a Gateway of this VirtualService's namespace)",
            )
            return None
        return GatewayRef(ns, name, where)
    if "." in g:
        parts = g.split(".")
        if not all(DNS1123_LABEL.fullmatch(p) for p in parts):
            ctx.error(path, f"gateway {g!r} is not a valid gateway name")
            return None
        ctx.warning(
            path,
            f"gateway {g!r} is in the legacy NAME.NAMESPACE... form; write "
            f"{parts[1]}/{parts[0]} (Istio's NAMESPACE/NAME)",
        )
        return GatewayRef(parts[1], parts[0], where)
    if not DNS1123_LABEL.fullmatch(g):
        ctx.error(path, f"gateway {g!r} is not a valid gateway name (a DNS-1123 label)")
        return None
    return GatewayRef(ctx.namespace, g, where)


def _route_name(vs: str, item: Any, index: int, count: int, proto: str) -> str:
    """``vs/route`` for a named route, ``vs`` for the only route, else ``vs[i]``."""
    if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
        return f"{vs}/{item['name']}"
    if count == 1:
        return vs
    return f"{vs}[{index}]" if proto == "http" else f"{vs}/tcp[{index}]"


def _vs_route(
    ctx: Ctx,
    value: Any,
    path: Path,
    proto: Literal["http", "tcp"],
    name: str,
    default_host: str | None,
    env: Env,
) -> RouteDraft | None:
    if proto == "http":
        r = fields(
            ctx,
            value,
            path,
            allowed=(
                "name",
                "match",
                "route",
                "timeout",
                "retries",
                "headers",
                "rewrite",
                "redirect",
                "directResponse",
                "fault",
                "mirror",
                "mirrors",
                "mirrorPercentage",
                "mirrorPercent",
                "corsPolicy",
            ),
            unimplemented=_HTTP_ROUTE_UNIMPLEMENTED,
        )
    else:
        r = fields(ctx, value, path, allowed=("match", "route"))
    if r is None:
        return None
    # (Istio's validation: one action, and a rewrite only with a route)
    actions = [k for k in ("route", "redirect", "directResponse") if r.get(k) is not None]
    if not actions and "delegate" in r:
        return None  # (the delegate is the error: a route without one is what it is)
    if not actions:
        ctx.error(
            path,
            f"{dotted((*path, 'route'))} is required"
            + (" (or redirect, or directResponse)" if proto == "http" else ""),
        )
        return None
    if len(actions) > 1:
        ctx.error((*path, actions[1]), f"rule cannot contain both {actions[0]} and {actions[1]}")
        return None
    if r.get("rewrite") is not None and actions[0] != "route":
        ctx.error(
            (*path, "rewrite"),
            f"rule cannot contain both rewrite and {actions[0]} (a rewrite changes the request "
            "sent to a destination; put the path in the redirect)",
        )
        return None
    if r.get("fault") is not None and actions[0] != "route":
        # (Istio's validation; Envoy's fault filter runs before the route's
        # own answer, but Istio never configures both)
        ctx.error(
            (*path, "fault"),
            f"rule cannot contain both fault and {actions[0]} (a fault delays or aborts a "
            "request sent to a destination; Istio refuses it)",
        )
        return None
    if "name" in r:
        text(ctx, r["name"], (*path, "name"))
    timeout: float | None = 0.0
    if r.get("timeout") is not None:  # "0s" too: no timeout, Istio's default
        timeout = duration(ctx, r["timeout"], (*path, "timeout"))
    retries_ok, retries = _retries(ctx, r.get("retries"), (*path, "retries"), timeout or 0.0)
    got_matches = _matches(ctx, r.get("match"), (*path, "match"), proto)
    matches, blocks, match_lines = got_matches if got_matches is not None else (None, None, {})
    dests: list[DestinationDraft] | None = []
    if r.get("route") is not None:
        dests = _destinations(ctx, r.get("route"), (*path, "route"), env, proto)
    headers_ok, headers = True, None
    if r.get("headers") is not None:
        headers_ok, headers = istio_headers(ctx, r["headers"], (*path, "headers"))
    rewrite_ok, rewrite, authority = _rewrite(ctx, r.get("rewrite"), (*path, "rewrite"), matches)
    redirect: Redirect | None = None
    direct: LocalAnswer | None = None
    if r.get("redirect") is not None:
        redirect = _redirect(ctx, r["redirect"], (*path, "redirect"))
        rewrite_ok = rewrite_ok and redirect is not None
    if r.get("directResponse") is not None:
        direct = _direct_response(ctx, r["directResponse"], (*path, "directResponse"))
        rewrite_ok = rewrite_ok and direct is not None
    fault_ok, fault = True, None
    if r.get("fault") is not None:
        fault_ok, fault = istio_fault(ctx, r["fault"], (*path, "fault"))
    mirrors_ok, mirrors = True, list[tuple[DestinationDraft, int]]()
    if proto == "http":
        mirrors_ok, mirrors = _mirrors(ctx, r, path, env, actions[0])
    cors_ok, cors = True, None
    if proto == "http" and r.get("corsPolicy") is not None:
        cors_ok, cors = istio_cors(ctx, r["corsPolicy"], (*path, "corsPolicy"))
    if (
        not cors_ok
        or matches is None
        or dests is None
        or timeout is None
        or not retries_ok
        or not headers_ok
        or not rewrite_ok
        or not fault_ok
        or not mirrors_ok
    ):
        return None
    if authority is not None:
        headers = (headers or HeadEdits())._replace(authority=authority)
    if redirect is not None or direct is not None:
        lines = _answer_headers(ctx, path, headers)
        if lines is None:
            return None
        headers = None  # (no request goes upstream: nothing else to edit)
        if direct is not None:
            direct = dataclasses.replace(direct, headers=lines)
        if redirect is not None:
            redirect = dataclasses.replace(redirect, headers=lines)
    return RouteDraft(
        name,
        proto,
        matches,
        dests,
        timeout,
        retries,
        headers,
        rewrite,
        redirect,
        direct,
        fault,
        mirrors,
        cors,
        blocks,
        Where(ctx, path),
        match_lines,
    )


def _mirrors(
    ctx: Ctx, r: dict[str, Any], path: Path, env: Env, action: str
) -> tuple[bool, list[tuple[DestinationDraft, int]]]:
    """``http[].mirror`` and ``http[].mirrors`` as Istio validates and
    translates them (validateHTTPRoute; pilot's route translation): (valid,
    each mirror's destination and share in parts per million).

    ``mirror`` is a Destination (host, subset, port.number, as a route
    destination's); its share is ``mirrorPercentage.value`` (a double,
    0..100), else the deprecated integer ``mirrorPercent`` (0..100; a
    warning, as Istio's), else every request. ``mirrors`` is a list of
    ``{destination, percentage}``, each its own share (every request
    without one). Not both (Istio's error). A share of 0 mirrors nothing:
    Istio makes no mirror policy of it (a warning here). A percent becomes
    ``uint32(value * 10000)`` parts per million, pilot's conversion (Go
    truncates). A route that answers itself (a redirect, a direct
    response) sends no request to copy: Istio accepts its mirrors and
    configures none, and so does l4proxy, with a warning."""
    ok = True
    out: list[tuple[DestinationDraft, int]] = []
    has_mirror = r.get("mirror") is not None
    if has_mirror and r.get("mirrors") is not None:
        ctx.error(
            (*path, "mirrors"),
            "rule cannot contain both mirror and mirrors (Istio's validation; put the mirror "
            "in mirrors, with its percentage)",
        )
        return False, []
    ppm = MIRROR_SCALE
    for key in ("mirrorPercentage", "mirrorPercent"):
        if r.get(key) is not None and not has_mirror:
            ctx.warning(
                (*path, key),
                f"{dotted((*path, key))} does nothing without mirror"
                + (" (each of mirrors has its own percentage)" if r.get("mirrors") else ""),
            )
    if r.get("mirrorPercent") is not None:
        ppath = (*path, "mirrorPercent")
        pct = integer(ctx, r["mirrorPercent"], ppath, 0, 100, what="mirrorPercent")
        ok = pct is not None
        if pct is not None and has_mirror:
            ignored = r.get("mirrorPercentage") is not None
            ctx.warning(
                ppath,
                f"{dotted(ppath)} is deprecated; use mirrorPercentage: {{value: {pct}}}"
                + (
                    " (it is ignored: mirrorPercentage is given, which Istio reads first)"
                    if ignored
                    else " (as Istio warns)"
                ),
            )
            ppm = pct * _MIRROR_PPM_PER_PERCENT
    if r.get("mirrorPercentage") is not None:
        got = _mirror_percentage(ctx, r["mirrorPercentage"], (*path, "mirrorPercentage"))
        ok = ok and got is not None
        ppm = got if got is not None else ppm
    entries: list[tuple[Any, Path, int, Path]] = []
    if has_mirror:
        share_at = next(
            ((*path, k) for k in ("mirrorPercentage", "mirrorPercent") if r.get(k) is not None),
            (*path, "mirror"),
        )
        entries.append((r["mirror"], (*path, "mirror"), ppm, share_at))
    items = listing(ctx, r.get("mirrors"), (*path, "mirrors")) or []
    for i, item in enumerate(items):
        epath = (*path, "mirrors", i)
        e = fields(
            ctx, item, epath, allowed=("destination", "percentage"), required=("destination",)
        )
        if e is None or e.get("destination") is None:
            ok = False
            continue
        share = MIRROR_SCALE
        if e.get("percentage") is not None:
            got = _mirror_percentage(ctx, e["percentage"], (*epath, "percentage"))
            ok = ok and got is not None
            share = got if got is not None else share
        entries.append((e["destination"], (*epath, "destination"), share, (*epath, "percentage")))
    for value, dpath, share, share_at in entries:
        if not value:
            ctx.error(dpath, f"{dotted(dpath)} must name a host")
            ok = False
            continue
        part = _destination(ctx, value, dpath[:-1], env, key=dpath[-1])
        if part is None:
            ok = False
            continue
        if share == 0:
            ctx.warning(
                share_at,
                f"{dotted(dpath)} mirrors nothing: its share is 0% (Istio configures no "
                "mirror for it)",
            )
            continue
        host, subset, port, _ = part
        out.append((DestinationDraft(host, 100, port, subset, None, Where(ctx, dpath)), share))
    if ok and out and action != "route":
        what = "mirror" if has_mirror else "mirrors"
        ctx.warning(
            (*path, what),
            f"{dotted((*path, what))} does nothing: this route answers itself ({action}) and "
            "sends no request to copy (Istio accepts it and configures no mirror)",
        )
        return True, []
    return ok, out


_MIRROR_PPM_PER_PERCENT = MIRROR_SCALE // 100


def _mirror_percentage(ctx: Ctx, value: Any, path: Path) -> int | None:
    """A mirror's Percent message, ``{value: 50.0}``, as parts per million:
    0..100 (Istio's validation of mirrors: no smallest share above 0, as a
    fault's has), ``uint32(value * 10000)`` (pilot's conversion; Go
    truncates). ``{}`` is 0, the message's default."""
    if is_number(value):
        ctx.error(path, f"{dotted(path)} must be a mapping like {{value: {value}}}")
        return None
    p = fields(ctx, value, path, allowed=("value",))
    if p is None or any(k != "value" for k in p):
        return None
    v = p.get("value", 0.0)
    vpath = (*path, "value")
    if not is_number(v):
        ctx.error(vpath, f"{dotted(vpath)} must be a number, not {type_name(v)}")
        return None
    if v < 0 or v > 100:
        ctx.error(vpath, f"mirror percentage {v} is not in range 0..100 (Istio's validation)")
        return None
    return int(float(v) * _MIRROR_PPM_PER_PERCENT)


def _rewrite(
    ctx: Ctx, value: Any, path: Path, matches: tuple[Match, ...] | None
) -> tuple[bool, UriRewrite | None, str | None]:
    """``http[].rewrite``: (valid, the path rewrite, the authority). ``uri``
    is Envoy's ``prefix_rewrite`` as Istio configures it, ``uriRegexRewrite``
    its ``regex_rewrite`` (see :class:`UriRewrite`; not both, as Istio
    validates)."""
    if value is None:
        return True, None, None
    w = fields(ctx, value, path, allowed=("uri", "uriRegexRewrite", "authority"))
    if w is None:
        return False, None, None
    ok = True
    uri = None
    if w.get("uri") is not None:
        uri = _target_text(ctx, w["uri"], (*path, "uri"), query=False)
        ok = uri is not None
    regex = None
    if w.get("uriRegexRewrite") is not None:
        regex = _regex_rewrite(ctx, w["uriRegexRewrite"], (*path, "uriRegexRewrite"))
        ok = ok and regex is not None
        if uri is not None and regex is not None:
            ctx.error(
                (*path, "uriRegexRewrite"),
                f"{dotted(path)} may have only one of uri and uriRegexRewrite (Istio's validation)",
            )
            return False, None, None
    authority = None
    if w.get("authority") is not None:
        authority = _authority(ctx, w["authority"], (*path, "authority"))
        ok = ok and authority is not None
    if ok and uri is None and regex is None and authority is None:
        ctx.error(
            path,
            f"{dotted(path)} must have uri, uriRegexRewrite or authority (Istio's validation)",
        )
        return False, None, None
    if regex is not None:
        return ok, regex, authority
    if (
        ok
        and uri is not None
        and matches is not None
        and (not matches or any(m.uri is None for m in matches))
    ):
        ctx.warning(
            (*path, "uri"),
            f"{dotted((*path, 'uri'))} {uri!r}: a match without a uri matches as Envoy's "
            f"prefix '/', so only the path's first '/' is replaced ('/a' goes up as "
            f"{uri + 'a'!r}); match a uri prefix to replace it",
        )
    return ok, (UriRewrite("prefix", uri) if uri is not None else None), authority


def _regex_rewrite(ctx: Ctx, value: Any, path: Path) -> UriRewrite | None:
    """``rewrite.uriRegexRewrite``: ``match``, an RE2 regex (as Envoy runs
    it), and ``rewrite``, what replaces each match of it in the path (its
    ``\\1`` the regex's groups: RE2's rewrite syntax, checked here, where
    Envoy would rewrite with a bad one as best it can); both required and
    non-empty, as Istio validates them."""
    w = fields(ctx, value, path, allowed=("match", "rewrite"))
    if w is None:
        return None
    if not w.get("match") or not w.get("rewrite"):
        ctx.error(
            path,
            f"{dotted(path)} must have both match and rewrite, not empty (Istio's validation)",
        )
        return None
    match = text(ctx, w["match"], (*path, "match"))
    rewrite = text(ctx, w["rewrite"], (*path, "rewrite"))
    if match is None or rewrite is None:
        return None
    if not _TARGET.fullmatch(rewrite):
        where = (*path, "rewrite")
        ctx.error(where, f"{dotted(where)} {rewrite!r} must be visible ASCII without spaces")
        return None
    try:
        pattern = compile_regex(match)
    except RegexError as exc:
        ctx.error((*path, "match"), f"regex {shown(match)} in {dotted(path)} is invalid: {exc}")
        return None
    try:
        check_rewrite(pattern, rewrite)
    except RegexError as exc:
        ctx.error((*path, "rewrite"), f"{dotted((*path, 'rewrite'))} {rewrite!r}: {exc}")
        return None
    return UriRewrite("regex", rewrite, match, pattern)


_TARGET = re.compile(r"[!-~]*")  # visible ASCII, no space: a request target's characters
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~%!$&'()*+,;=]+)(:[0-9]{1,5})?")


def _target_text(ctx: Ctx, value: Any, path: Path, *, query: bool) -> str | None:
    """A rewrite's or redirect's ``uri``: an absolute path (its own query
    where *query*), so that what goes upstream, or into a location, is a
    request target: ``v2/`` would send ``v2/users``, and a redirect to
    ``@evil.example/x`` would send the client to another host."""
    s = text(ctx, value, path, required=True)
    if s is None:
        return None
    if not _TARGET.fullmatch(s):
        ctx.error(path, f"{dotted(path)} {s!r} must be visible ASCII without spaces (a URI path)")
        return None
    if not s.startswith("/") or "#" in s or (not query and "?" in s):
        ctx.error(
            path,
            f"{dotted(path)} {s!r} must be a path that starts with '/'"
            + (", with no fragment ('#')" if query else ", with no query or fragment ('?', '#')"),
        )
        return None
    return s


def _authority(ctx: Ctx, value: Any, path: Path) -> str | None:
    s = text(ctx, value, path, required=True)
    if s is not None and not _AUTHORITY.fullmatch(s):
        ctx.error(path, f"{dotted(path)} {s!r} is not a host or host:port")
        return None
    return s


def _redirect(ctx: Ctx, value: Any, path: Path) -> Redirect | None:
    """``http[].redirect`` as Istio configures Envoy's RedirectAction:
    ``uri`` the path (the request's query stays unless it has one),
    ``authority`` the host, ``scheme``, ``port`` or ``derivePort``,
    ``redirectCode`` (301 by default; 301, 302, 303, 307 or 308, the codes
    Envoy has)."""
    d = fields(
        ctx,
        value,
        path,
        allowed=("uri", "authority", "scheme", "port", "derivePort", "redirectCode"),
    )
    if d is None:
        return None
    ok = True
    uri = scheme = authority = None
    if d.get("uri") is not None:
        uri = _target_text(ctx, d["uri"], (*path, "uri"), query=True)
        ok = uri is not None
    if d.get("authority") is not None:
        authority = _authority(ctx, d["authority"], (*path, "authority"))
        ok = ok and authority is not None
    if d.get("scheme") is not None:
        scheme = text(ctx, d["scheme"], (*path, "scheme"), required=True)
        if scheme is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
            ctx.error((*path, "scheme"), f"{dotted((*path, 'scheme'))} {scheme!r} is not a scheme")
            scheme = None
        ok = ok and scheme is not None
    port = None
    from_request = False
    if d.get("port") is not None and d.get("derivePort") is not None:
        ctx.error((*path, "derivePort"), "redirect cannot have both port and derivePort")
        ok = False
    elif d.get("port") is not None:
        port = _port_number(ctx, d["port"], (*path, "port"))
        ok = ok and port is not None
    elif d.get("derivePort") is not None:
        dp = d["derivePort"]
        if dp not in ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"):
            ctx.error(
                (*path, "derivePort"),
                f"{dotted((*path, 'derivePort'))} {dp!r} is not FROM_PROTOCOL_DEFAULT or "
                "FROM_REQUEST_PORT",
            )
            ok = False
        from_request = dp == "FROM_REQUEST_PORT"
    code = 301
    if d.get("redirectCode") is not None:
        got = integer(
            ctx, d["redirectCode"], (*path, "redirectCode"), 300, 399, what="redirectCode"
        )
        if got is not None and got not in REDIRECT_CODES:
            ctx.error(
                (*path, "redirectCode"),
                f"redirectCode {got} is not one Envoy sends (301, 302, 303, 307, 308)",
            )
            got = None
        ok = ok and got is not None
        code = got or 301
    if ok and not (uri or authority or scheme or port or d.get("derivePort")):
        ctx.error(path, f"{dotted(path)} must have uri, authority, scheme or a port")
        ok = False
    if not ok:
        return None
    return Redirect(code, scheme, authority, port, from_request, uri)


def _direct_response(ctx: Ctx, value: Any, path: Path) -> LocalAnswer | None:
    """``http[].directResponse``: ``status`` (200..599, Istio's validation)
    and ``body`` (``string``, or ``bytes`` in base64: UTF-8 text here, as
    the relays write their answers), at most 1 MiB (Envoy's limit as Istio
    configures a sidecar)."""
    d = fields(ctx, value, path, allowed=("status", "body"), required=("status",))
    if d is None or d.get("status") is None:
        return None
    status = integer(ctx, d["status"], (*path, "status"), 200, 599, what="directResponse.status")
    body = ""
    bpath = (*path, "body")
    if d.get("body") is not None:
        b = fields(ctx, d["body"], bpath, allowed=("string", "bytes"))
        if b is None:
            return None
        given = [k for k in ("string", "bytes") if b.get(k) is not None]
        if len(given) != 1:
            ctx.error(bpath, f"{dotted(bpath)} must have one of string, bytes")
            return None
        raw = text(ctx, b[given[0]], (*bpath, given[0]))
        if raw is None:
            return None
        if given[0] == "bytes":
            try:
                body = base64.b64decode(raw, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                why = "not base64" if isinstance(exc, binascii.Error) else "not UTF-8 text"
                ctx.error(
                    (*bpath, "bytes"),
                    f"{dotted((*bpath, 'bytes'))} is {why} (the relays answer with UTF-8 text)",
                )
                return None
        else:
            body = raw
        if len(body.encode()) > MAX_DIRECT_BODY:
            ctx.error(bpath, f"{dotted(bpath)} is larger than 1 MiB (Envoy's limit in Istio)")
            return None
        if body and status in (204, 304):
            # a client reads no body after them: the bytes would be taken
            # for the next response on its connection
            ctx.error(bpath, f"{dotted(bpath)}: a {status} response has no body (RFC 9110)")
            return None
    if status is None:
        return None
    return LocalAnswer(status, body)


def _answer_headers(
    ctx: Ctx, path: Path, headers: HeadEdits | None
) -> tuple[tuple[str, str], ...] | None:
    """The header lines of the answer of a route that answers itself (a
    redirect, a direct response): its ``headers.response`` set and add
    lines (Envoy applies a route's response headers to its own answers; a
    ``content-type`` replaces the relays' ``text/plain``); its
    ``headers.request`` does nothing (a warning: no request goes upstream).
    None after an error."""
    if headers is None:
        return ()
    hpath = (*path, "headers")
    if headers.request_set or headers.request_add or headers.request_remove:
        ctx.warning(
            (*hpath, "request"),
            f"{dotted((*hpath, 'request'))} does nothing: this route answers itself "
            "and sends no request",
        )
    lines = []
    for name, v in (*headers.response_set, *headers.response_add):
        if name == "location":
            ctx.error(
                (*hpath, "response"),
                "location cannot be set on a route that answers itself: a redirect's "
                "is its own (redirect.uri, authority, scheme, port)",
            )
            return None
        lines.append((name, v))
    return tuple(lines)


def _retries(ctx: Ctx, value: Any, path: Path, timeout: float) -> tuple[bool, HttpRetry | None]:
    """``http[].retries`` (Istio's HTTPRetry) as Istio's ConvertPolicy()
    makes Envoy's retry policy: (valid, the policy); None when there is none
    (no field, or ``attempts`` 0 or absent: Istio's "retries disabled").

    ``retryOn`` is Envoy's comma-separated policy names; a status code in it
    ("503") is a retriable status code and implies
    ``retriable-status-codes``. Omitted: Istio's default policy
    (connect-failure, refused-stream, unavailable, cancelled,
    retriable-status-codes with 503). Unknown names are errors, as in
    Istio's validation; those that cannot occur on an HTTP/1.1 exchange
    (HTTP/2 resets, gRPC statuses) are accepted and do nothing. ``backoff``
    (an Istio duration, at least 1ms) is the base interval of Envoy's
    jittered exponential backoff between tries (its max interval 10 times
    it, Envoy's default); without it Envoy's 25 ms.
    ``retryIgnorePreviousHosts`` (true or false; true by default, as
    Istio's): a retry prefers an endpoint not tried yet; false, it goes
    to the request's endpoints in the order the route drew them (the one
    that failed first again). Without a retries field
    the relay's own retries stay (Istio's default of 2 attempts when the
    field is absent is not imitated: see the README).
    """
    if value is None:
        return True, None
    allowed = (
        "attempts",
        "perTryTimeout",
        "retryOn",
        "retryRemoteLocalities",
        "backoff",
        "retryIgnorePreviousHosts",
    )
    r = fields(ctx, value, path, allowed=allowed)
    if r is None:
        return False, None
    ok = all(k in allowed for k in r)  # (fields() reported the others)
    attempts: int | None = 0
    if r.get("attempts") is not None:
        attempts = integer(ctx, r["attempts"], (*path, "attempts"), 0, 2**31 - 1)
    per_try: float | None = 0.0
    if r.get("perTryTimeout") is not None:
        per_try = duration(ctx, r["perTryTimeout"], (*path, "perTryTimeout"), zero=False)
        if per_try is not None and timeout and per_try > timeout:
            ctx.warning(
                (*path, "perTryTimeout"),
                f"{dotted((*path, 'perTryTimeout'))} {r['perTryTimeout']} is longer than the "
                f"route's timeout ({timeout:g}s), which bounds every try together",
            )
    backoff: float | None = DEFAULT_RETRY_BACKOFF
    if r.get("backoff") is not None:
        backoff = duration(ctx, r["backoff"], (*path, "backoff"), zero=False)
    if boolean(ctx, r.get("retryRemoteLocalities"), (*path, "retryRemoteLocalities")) is None:
        ok = False
    ignore_previous = boolean(  # (Istio's default: true)
        ctx, r.get("retryIgnorePreviousHosts"), (*path, "retryIgnorePreviousHosts"), default=True
    )
    if ignore_previous is None:
        ok = False
    policies: tuple[str, ...] | None = ISTIO_DEFAULT_RETRY_ON
    codes: tuple[int, ...] = ISTIO_DEFAULT_RETRY_CODES
    if r.get("retryOn") is not None and r["retryOn"] != "":  # (Istio: "" is the default)
        got = _retry_on(ctx, r["retryOn"], (*path, "retryOn"))
        policies = None if got is None else got[0]
        codes = () if got is None else got[1]
    if (
        attempts is None
        or per_try is None
        or policies is None
        or backoff is None
        or ignore_previous is None
        or not ok
    ):
        return False, None
    if attempts == 0:
        given = [
            k
            for k in (
                "perTryTimeout",
                "retryOn",
                "retryRemoteLocalities",
                "retryIgnorePreviousHosts",
            )
            if r.get(k) not in (None, "")
        ]
        if given:
            # (recent Istio's validateHTTPRetry refuses it: "http retry policy
            # configured when attempts are set to 0 (disabled)")
            ctx.warning(
                path,
                f"{dotted(path)}: attempts is 0 (or not given): retries are off, so "
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing "
                f"(recent Istio refuses this)",
            )
        return True, None  # Istio: "If 0, retries will be disabled"
    return True, HttpRetry(attempts, per_try, policies, codes, backoff, ignore_previous)


# The status codes Istio's validation takes in retryOn: those Go's
# http.StatusText() names (validateHTTPRetry: strconv.Atoi, then StatusText)
_ISTIO_STATUS_CODES = frozenset(
    {100, 101, 102, 103, *range(200, 209), 226, *range(300, 306), 307, 308}
    | {*range(400, 419), 421, 422, 423, 424, 425, 426, 428, 429, 431, 451}
    | {*range(500, 509), 510, 511}
)
_ATOI = re.compile(r"[+-]?[0-9]+")  # (Go's strconv.Atoi: ASCII digits, one sign)


def _retry_on(ctx: Ctx, value: Any, path: Path) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """retryOn: (policy names, status codes), each once, in order. As
    Istio's validation (validateHTTPRetry) takes it: split at each comma,
    every part a policy Envoy knows or a status code Go names, as written:
    no spaces around it, no empty part (a comma too many)."""
    if not isinstance(value, str):
        ctx.error(path, f"{dotted(path)} must be a string like '5xx,reset', not {type_name(value)}")
        return None
    policies: list[str] = []
    codes: list[int] = []
    ok = True
    for token in value.split(","):
        if not token.strip():
            ctx.error(
                path,
                f"{dotted(path)}: {value!r} has an empty policy (a comma too many; "
                f"Istio refuses it)",
            )
            ok = False
            continue
        if token != token.strip():
            ctx.error(
                path,
                f"{dotted(path)}: {token!r} has spaces around it (Istio refuses it: "
                f"write the list without spaces, like '5xx,reset')",
            )
            ok = False
            continue
        if _ATOI.fullmatch(token):  # (str.isdigit: '²' too, int() refuses it)
            code = int(token)
            if code not in _ISTIO_STATUS_CODES:
                ctx.error(
                    path,
                    f"{dotted(path)}: {token!r} is not an HTTP status code Istio knows "
                    f"(100..511, as Go's net/http names them)",
                )
                ok = False
            elif code not in codes:
                codes.append(code)
        elif token in RETRY_ON_POLICIES or token in RETRY_ON_NO_OPS:
            if token not in policies:
                policies.append(token)
        else:
            known = ", ".join((*RETRY_ON_POLICIES, *RETRY_ON_NO_OPS))
            ctx.error(
                path,
                f"{dotted(path)}: {token!r} is not a retry policy "
                f"(expected status codes or: {known})",
            )
            ok = False
    if not ok:
        return None
    if codes and "retriable-status-codes" not in policies:
        policies.append("retriable-status-codes")  # as Istio adds it
    return tuple(policies), tuple(codes)


def _matches(
    ctx: Ctx, value: Any, path: Path, proto: str
) -> tuple[tuple[Match, ...], tuple[MatchBlockDraft, ...] | None, dict[Match, Where]] | None:
    """match[]: OR'ed blocks; no block (or an empty one) matches everything.

    (matches, blocks, lines): where some block names ``gateways``, *blocks*
    is every block with the gateways it names (see ``RouteDraft.blocks``),
    and which of them apply is up to the gateway a route is compiled for
    (``_istio_gateway.routes_for``); else None. *lines*: each match's
    block (the first of blocks alike). None after an error."""
    items = listing(ctx, value, path)
    if items is None:
        return None
    out: list[Match] = []
    blocks: list[MatchBlockDraft] = []
    lines: dict[Match, Where] = {}
    catch_all = False
    ok = True
    for i, block in enumerate(items):
        bpath = (*path, i)
        if proto == "http":
            b = fields(
                ctx,
                block,
                bpath,
                allowed=(
                    "name",
                    "uri",
                    "scheme",
                    "method",
                    "authority",
                    "headers",
                    "withoutHeaders",
                    "queryParams",
                    "ignoreUriCase",
                    "sourceLabels",
                    "port",
                    "gateways",
                    "statPrefix",
                ),
                unimplemented=_HTTP_MATCH_UNIMPLEMENTED,
            )
            if isinstance(b, dict) and b.get("statPrefix") is not None:
                # (Envoy's route stat_prefix, a name for the route's own
                # statistics; a migration need not remove it)
                ctx.note(
                    (*bpath, "statPrefix"),
                    "statPrefix is not applied: /stats counts a route's decisions under the "
                    "route's name, as the README's admin endpoints say",
                )
        else:
            b = fields(
                ctx,
                block,
                bpath,
                allowed=("port", "sourceLabels"),
                unimplemented=("destinationSubnets", "sourceSubnet", "gateways", "sourceNamespace"),
            )
        if b is None:
            ok = False
            continue
        gateways = _gateway_refs(ctx, b.get("gateways"), (*bpath, "gateways"))
        m = _match_block(ctx, b, bpath)
        if m is None or gateways is False:
            ok = False
            continue
        if isinstance(gateways, tuple) and m.source_labels:
            # (pilot's sourceMatchHTTP: a block with gateways is tested on
            # them alone)
            ctx.warning(
                (*bpath, "sourceLabels"),
                "sourceLabels are not tested in a match block that names gateways (Istio "
                "tests the gateways alone); this block applies to every caller at its gateways",
            )
            m = dataclasses.replace(m, source_labels=Labels())
        blocks.append(MatchBlockDraft(m, gateways if isinstance(gateways, tuple) else ()))
        lines.setdefault(m, Where(ctx, bpath))
        if m == Match():
            catch_all = True  # a catch-all block makes the whole list a catch-all
        else:
            out.append(m)
    if not ok:
        return None
    if any(b.gateways for b in blocks):
        return tuple(b.match for b in blocks), tuple(blocks), lines
    return (() if catch_all else tuple(out)), None, lines


def _match_block(ctx: Ctx, b: dict[str, Any], path: Path) -> Match | None:
    ok = True
    attrs = {}
    for key in ("uri", "scheme", "method", "authority"):
        if b.get(key) is not None:
            sm = string_match(ctx, b[key], (*path, key), bare_ok=False)
            if sm is None:
                ok = False
            attrs[key] = sm
    headers = _header_matches(ctx, b.get("headers"), (*path, "headers"))
    without = _header_matches(ctx, b.get("withoutHeaders"), (*path, "withoutHeaders"))
    query = _query_matches(ctx, b.get("queryParams"), (*path, "queryParams"))
    ok = ok and headers is not None and without is not None and query is not None
    ignore_case = boolean(ctx, b.get("ignoreUriCase"), (*path, "ignoreUriCase"))
    ok = ok and ignore_case is not None
    uri = attrs.get("uri")
    if ignore_case and (uri is None or uri.kind == "regex"):
        # (Envoy's case_sensitive applies to an exact or prefix path; a
        # regex is compiled as written, and without a uri there is none)
        ctx.warning(
            (*path, "ignoreUriCase"),
            "ignoreUriCase does nothing here: "
            + (
                "it applies to an exact or prefix uri, and this block's uri is a regex, "
                "matched case-sensitively as written (write (?i) in it to ignore case)"
                if uri is not None
                else "this block has no uri match, and it applies to an exact or prefix uri"
            ),
        )
    source = labels(ctx, b.get("sourceLabels"), (*path, "sourceLabels"))
    port = None
    if b.get("port") is not None:
        port = _port_number(ctx, b["port"], (*path, "port"))
        ok = ok and port is not None
    if not ok or source is None or headers is None or without is None or query is None:
        return None
    return Match(
        uri=attrs.get("uri"),
        scheme=attrs.get("scheme"),
        method=attrs.get("method"),
        authority=attrs.get("authority"),
        headers=headers,
        source_labels=source,
        port=port,
        query=query,
        without_headers=without,
        # (Envoy's case_sensitive is a path setting: nothing without a uri)
        ignore_uri_case=bool(ignore_case) and attrs.get("uri") is not None,
    )


def _header_matches(ctx: Ctx, value: Any, path: Path) -> tuple[tuple[str, StringMatch], ...] | None:
    """headers / withoutHeaders: ``{name: StringMatch}``, names lowercase;
    ``{}`` (or nothing) and the regex ``*`` test presence, as Istio makes
    them. Sorted by name."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        ctx.error(path, f"{dotted(path)} must be a mapping of header name: match")
        return None
    out = []
    ok = True
    for hname, hval in value.items():
        sub = (*path, hname)
        if not isinstance(hname, str) or not hname:
            ctx.error(sub, f"header name {hname!r} must be a non-empty string")
            ok = False
        elif hname != hname.lower():
            ctx.error(sub, f"header name {hname} must be in lower case")
            ok = False
        elif not header_name(ctx, hname, sub):
            ok = False
        else:
            sm = string_match(ctx, hval, sub, bare_ok=False, present_ok=True)
            if sm is None:
                ok = False
            else:
                out.append((hname, sm))
    return tuple(sorted(out, key=lambda h: h[0])) if ok else None


def _query_matches(ctx: Ctx, value: Any, path: Path) -> tuple[tuple[str, StringMatch], ...] | None:
    """queryParams: ``{name: StringMatch}`` over the first value of each
    name in the target's query, as sent (case-sensitive names, nothing
    percent-decoded: Envoy's query parameter matcher); ``{}`` and the regex
    ``*`` test presence (``?debug`` has it, with an empty value)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        ctx.error(path, f"{dotted(path)} must be a mapping of query parameter name: match")
        return None
    out = []
    ok = True
    for name, qval in value.items():
        sub = (*path, name)
        if not isinstance(name, str) or not name:
            ctx.error(sub, f"query parameter name {name!r} must be a non-empty string")
            ok = False
            continue
        sm = string_match(ctx, qval, sub, bare_ok=False, present_ok=True)
        if sm is None:
            ok = False
        else:
            out.append((name, sm))
    return tuple(sorted(out, key=lambda q: q[0])) if ok else None


def _destinations(
    ctx: Ctx, value: Any, path: Path, env: Env, proto: Literal["http", "tcp"] = "http"
) -> list[DestinationDraft] | None:
    """A route's ``route`` list. An http route's entries (Istio's
    HTTPRouteDestination) may edit headers; a tcp route's (RouteDestination)
    have a destination and a weight alone, as in Istio's API: a tcp route
    relays bytes, with no HTTP head to edit."""
    allowed = ("destination", "weight", "headers") if proto == "http" else ("destination", "weight")
    entries = listing(ctx, value, path)
    if entries is None:
        return None
    if not entries:
        ctx.error(path, f"{dotted(path)} must have at least one destination")
        return None
    raw_weights: list[tuple[Any, Path]] = []
    parts: list[tuple[str, str | None, int | None, Path] | None] = []
    dest_headers: list[HeadEdits | None] = []
    ok = True
    for i, entry in enumerate(entries):
        epath = (*path, i)
        e = fields(
            ctx,
            entry,
            epath,
            allowed=allowed,
            unimplemented=_OLD_DESTINATION_HEADERS if proto == "http" else (),
            required=("destination",),
        )
        raw_weights.append((None if e is None else e.get("weight"), (*epath, "weight")))
        parts.append(None if e is None else _destination(ctx, e.get("destination"), epath, env))
        h_ok, h = True, None
        if e is not None and e.get("headers") is not None and proto == "http":
            h_ok, h = istio_headers(ctx, e["headers"], (*epath, "headers"))
        dest_headers.append(h)
        ok = ok and h_ok
    ws = weights(ctx, raw_weights, path, relative=True)  # (Istio 1.15 on)
    if ws is None or any(p is None for p in parts) or not ok:
        return None
    out = []
    for part, w, h in zip(parts, ws, dest_headers, strict=True):
        assert part is not None
        host, subset, port, epath = part
        out.append(DestinationDraft(host, w, port, subset, None, Where(ctx, epath), h))
    return out


def _destination(
    ctx: Ctx, value: Any, epath: Path, env: Env, *, key: str | int = "destination"
) -> tuple[str, str | None, int | None, Path] | None:
    path = (*epath, key)
    if not value:
        return None  # reported by the entry's required check
    d = fields(ctx, value, path, allowed=("host", "subset", "port"), required=("host",))
    if d is None or not d.get("host"):
        return None
    host = _host(ctx, d["host"], (*path, "host"), env)
    subset = None
    if d.get("subset") is not None:
        subset = dns_label(ctx, d["subset"], (*path, "subset"))
        if subset is None:
            return None
    port = None
    if d.get("port") is not None:
        p = fields(
            ctx,
            d["port"],
            (*path, "port"),
            allowed=("number",),
            unimplemented={"name": _PORT_BY_NAME},
            required=("number",),
        )
        if p is None or p.get("number") is None:
            return None
        port = _port_number(ctx, p["number"], (*path, "port", "number"))
        if port is None:
            return None
    if host is None:
        return None
    return host, subset, port, epath


# -- DestinationRule ---------------------------------------------------------


def read_destination_rule(ctx: Ctx, obj: dict[str, Any], env: Env) -> PolicyDraft | None:
    assert ctx.name is not None
    spec = fields(
        ctx,
        obj.get("spec"),
        ("spec",),
        allowed=("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"),
        required=("host",),
    )
    if spec is None or not spec.get("host"):
        return None
    host = _host(ctx, spec["host"], ("spec", "host"), env)
    selector, sel_ok = _workload_selector(ctx, spec.get("workloadSelector"))
    if spec.get("workloadSelector") is None:
        ok = _export_to(ctx, spec.get("exportTo"), env) and host is not None
    else:
        ok = _selector_export_to(ctx, spec.get("exportTo")) and host is not None
    ok = ok and sel_ok
    lb, hash_on, pool, outlier, port_level, tp_ok = _traffic_policy(
        ctx, spec.get("trafficPolicy"), ("spec", "trafficPolicy")
    )
    ok = ok and tp_ok
    subsets: dict[str, SubsetDraft] = {}
    for i, item in enumerate(listing(ctx, spec.get("subsets"), ("spec", "subsets")) or []):
        spath = ("spec", "subsets", i)
        s = fields(
            ctx,
            item,
            spath,
            allowed=("name", "labels", "trafficPolicy"),
            required=("name",),
        )
        if s is None or s.get("name") is None:
            ok = False
            continue
        name = dns_label(ctx, s["name"], (*spath, "name"))
        sel = labels(ctx, s.get("labels"), (*spath, "labels"))
        slb, shash, spool, soutlier, sport_level, stp_ok = _traffic_policy(
            ctx, s.get("trafficPolicy"), (*spath, "trafficPolicy")
        )
        if name is None or sel is None or not stp_ok:
            ok = False
            continue
        if name in subsets:
            ctx.error((*spath, "name"), f"subset {name} is defined twice in this DestinationRule")
            ok = False
            continue
        subsets[name] = SubsetDraft(
            name, sel, slb, Where(ctx, spath), spool, soutlier, shash, sport_level
        )
    stamp_ok, created = creation_timestamp(ctx, obj)
    if not ok or not stamp_ok or host is None:
        return None
    return PolicyDraft(
        ctx.name,
        ctx.namespace,
        host,
        lb,
        subsets,
        Where(ctx, ()),
        pool,
        outlier,
        hash_on,
        port_level,
        selector,
        created,
    )


def _workload_selector(ctx: Ctx, value: Any) -> tuple[Labels | None, bool]:
    """A DestinationRule's ``spec.workloadSelector``: its ``matchLabels``
    (Kubernetes label names and values), and whether it was read; None
    where there is none (``workloadSelector:`` with nothing is none too,
    as protobuf reads it). Which sidecars it then applies on is
    ``_table._policies``' to say. Without labels (``{}``, ``matchLabels:
    {}``) it selects every pod of its namespace, as pilot matches it (an
    empty set is a subset of any): a warning, as Istio's validation gives."""
    if value is None:
        return None, True
    path: Path = ("spec", "workloadSelector")
    if isinstance(value, dict) and "labels" in value and "matchLabels" not in value:
        # a Sidecar's and a ServiceEntry's workloadSelector say labels: say which to write
        ctx.error(
            (*path, "labels"),
            f"unknown field {dotted((*path, 'labels'))}: a DestinationRule's workloadSelector "
            "says matchLabels (labels is a Sidecar's or a ServiceEntry's); write matchLabels: "
            "{KEY: VALUE}",
        )
        value = {k: v for k, v in value.items() if k != "labels"}
        if not value:
            return None, False
    sel = fields(ctx, value, path, allowed=("matchLabels",))
    if sel is None:
        return None, False
    got = labels(ctx, sel.get("matchLabels"), (*path, "matchLabels"))
    if got is None:
        return None, False
    if not got and set(sel) <= {"matchLabels"}:
        ctx.warning(
            path,
            f"{dotted(path)} has no matchLabels: it selects every pod of namespace "
            f"{ctx.namespace}, whose sidecars take this DestinationRule over one without a "
            "workloadSelector (Istio warns: workload selector specified without labels)",
        )
    return got, True


def _selector_export_to(ctx: Ctx, value: Any) -> bool:
    """``spec.exportTo`` of a DestinationRule of a ``workloadSelector``:
    none, or its own namespace alone (``.`` or its name), as Istio's
    validation has it (pilot never exports such a rule: it applies on the
    sidecars of its own namespace only). Which namespace the sidecar is in
    is ``_table._policies``' to weigh, not an error here: a rule of
    another namespace applies on none of this one's pods, as in Istio."""
    path: Path = ("spec", "exportTo")
    items = listing(ctx, value, path)
    if items is None:
        return False
    ok = True
    for i, item in enumerate(items):
        e = text(ctx, item, (*path, i), required=True)
        if e is None:
            ok = False
        elif e not in (".", ctx.namespace):
            ctx.error(
                (*path, i),
                f"{dotted((*path, i))} {e!r}: a DestinationRule with a workloadSelector cannot "
                f"be exported beyond its own namespace ({ctx.namespace}: '.'); Istio refuses it "
                "and applies it on the sidecars of that namespace only",
            )
            ok = False
    if ok and len(items) > 1:
        ctx.error(
            path,
            f"{dotted(path)} holds {len(items)} entries: a DestinationRule with a "
            "workloadSelector may name its own namespace once ('.'), and no other "
            "(Istio refuses it)",
        )
        ok = False
    return ok


def _traffic_policy(
    ctx: Ctx, value: Any, path: Path
) -> tuple[
    str | None,
    HashOn | None,
    PoolSettings | None,
    OutlierPolicy | None,
    dict[int, PortPolicyDraft],
    bool,
]:
    """trafficPolicy → (its load balancer policy or None, what it hashes
    (policy HASH) or None, connectionPool or None, outlierDetection or
    None, its portLevelSettings by port number, ok)."""
    if value is None:
        return None, None, None, None, {}, True
    tp = fields(
        ctx,
        value,
        path,
        allowed=("loadBalancer", "connectionPool", "outlierDetection", "portLevelSettings", "tls"),
        unimplemented={
            "tunnel": "",
            "proxyProtocol": "",
            "retryBudget": "a route's retries are bounded by its own attempts",
        },
    )
    if tp is None:
        return None, None, None, None, {}, False
    if not any(v is not None for v in tp.values()):  # ({}, or only nulls: Istio refuses it)
        ctx.error(
            path,
            f"{dotted(path)} sets nothing (give it a loadBalancer, connectionPool, "
            "outlierDetection or portLevelSettings, or remove it)",
        )
        return None, None, None, None, {}, False
    lb, hash_on, pool, outlier, ok = _policy_components(ctx, tp, path)
    if tp.get("tls") is not None:
        ok = _client_tls(ctx, tp["tls"], (*path, "tls")) and ok
    port_level: dict[int, PortPolicyDraft] = {}
    if tp.get("portLevelSettings") is not None:
        got = _port_level_settings(ctx, tp["portLevelSettings"], (*path, "portLevelSettings"))
        ok = ok and got is not None
        port_level = got or {}
    return lb, hash_on, pool, outlier, port_level, ok


def _policy_components(
    ctx: Ctx, tp: dict[str, Any], path: Path
) -> tuple[str | None, HashOn | None, PoolSettings | None, OutlierPolicy | None, bool]:
    """The components a trafficPolicy and each of its portLevelSettings
    share → (load balancer policy or None, what it hashes or None,
    connectionPool or None, outlierDetection or None, ok)."""
    pool: PoolSettings | None = None
    pool_ok = True
    if tp.get("connectionPool") is not None:
        pool = _connection_pool(ctx, tp["connectionPool"], (*path, "connectionPool"))
        pool_ok = pool is not None
    outlier: OutlierPolicy | None = None
    outlier_ok = True
    if tp.get("outlierDetection") is not None:
        outlier = _outlier_detection(ctx, tp["outlierDetection"], (*path, "outlierDetection"))
        outlier_ok = outlier is not None
    lb, hash_on, lb_ok = _load_balancer(ctx, tp, path)
    return lb, hash_on, pool, outlier, lb_ok and pool_ok and outlier_ok


# a portLevelSettings entry's fields (Istio's PortTrafficPolicy, less tls,
# which _client_tls reads)
_PORT_POLICY_FIELDS = ("port", "loadBalancer", "connectionPool", "outlierDetection")
# Istio's ClientTLSSettings; of its modes, DISABLE alone is what the sidecar
# does (_client_tls)
_TLS_FIELDS = (
    "mode",
    "clientCertificate",
    "privateKey",
    "caCertificates",
    "credentialName",
    "subjectAltNames",
    "sni",
    "insecureSkipVerify",
    "caCrl",
)
_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


def _client_tls(ctx: Ctx, value: Any, path: Path) -> bool:
    """A trafficPolicy's (or a portLevelSettings entry's) ``tls``: whether
    it is accepted.

    The sidecar's upstream connections are plain TCP, always: that is mode
    ``DISABLE`` (also the mode of a ``tls`` without one, the enum's zero),
    which turns Istio's automatic mutual TLS off for the destination, so
    it is accepted and changes nothing. Its other fields do nothing with
    it, in Istio too: each is a warning. SIMPLE, MUTUAL and ISTIO_MUTUAL
    would have the sidecar originate TLS, which it does not: an error
    that names the field, as every field it does not implement."""
    tls = fields(ctx, value, path, allowed=_TLS_FIELDS)
    if tls is None or any(k not in _TLS_FIELDS for k in tls):
        return False
    mode: str | None = "DISABLE"
    if tls.get("mode") is not None:
        mode = text(ctx, tls["mode"], (*path, "mode"), required=True)
    if mode is None:
        return False
    if mode not in _TLS_MODES:
        ctx.error(
            (*path, "mode"),
            f"{dotted((*path, 'mode'))} {mode!r} is not known (Istio's are "
            f"{', '.join(_TLS_MODES)}; the sidecar takes DISABLE alone)",
        )
        return False
    if mode != "DISABLE":
        ctx.error(
            path,
            f"{dotted(path)} {NOT_IMPLEMENTED}; mode {mode} would have the sidecar originate "
            "TLS, and its upstream connections are plain TCP (mode DISABLE, which it accepts)",
        )
        return False
    for k, v in tls.items():
        if k != "mode" and v is not None:
            ctx.warning(
                (*path, k),
                f"{dotted((*path, k))} does nothing with mode DISABLE (nor in Istio); remove it",
            )
    return True


def _port_level_settings(ctx: Ctx, value: Any, path: Path) -> dict[int, PortPolicyDraft] | None:
    """trafficPolicy.portLevelSettings → each entry by its port number;
    None after an error.

    As Istio's validation: each entry needs ``port`` and at least one
    policy besides it ("port traffic policy must have at least one
    field"). Stricter than Istio, a port number outside 1..65535 (which
    no service port has) and a port given twice (Istio's pilot takes the
    first entry and ignores the other) are errors: neither would ever be
    honoured. ``tls`` is read as at the policy's top (mode DISABLE alone
    is accepted); an entry of ``tls`` alone still replaces the policy on
    its port, the defaults for the rest, as in pilot."""
    items = listing(ctx, value, path)
    if items is None:
        return None
    out: dict[int, PortPolicyDraft] = {}
    ok = True
    for i, item in enumerate(items):
        epath = (*path, i)
        entry = fields(
            ctx,
            item,
            epath,
            allowed=(*_PORT_POLICY_FIELDS, "tls"),
            required=("port",),
        )
        if entry is None or entry.get("port") is None:
            ok = False
            continue
        if any(k not in (*_PORT_POLICY_FIELDS, "tls") for k in entry):
            ok = False  # (reported: an unknown field)
        if entry.get("tls") is not None and not _client_tls(ctx, entry["tls"], (*epath, "tls")):
            ok = False
        ppath = (*epath, "port")
        sel = fields(
            ctx,
            entry["port"],
            ppath,
            allowed=("number",),
            unimplemented={"name": _PORT_BY_NAME},
            required=("number",),
        )
        if sel is None or sel.get("number") is None:
            ok = False
            continue
        number = _port_number(ctx, sel["number"], (*ppath, "number"))
        if number is None:
            ok = False
            continue
        if all(entry.get(k) is None for k in (*_PORT_POLICY_FIELDS[1:], "tls")):
            ctx.error(
                epath,
                f"{dotted(epath)} sets nothing for port {number} (give it a loadBalancer, "
                "connectionPool or outlierDetection, or remove it)",
            )
            ok = False
            continue
        lb, hash_on, pool, outlier, entry_ok = _policy_components(ctx, entry, epath)
        if not entry_ok:
            ok = False
            continue
        if number in out:
            ctx.error(
                (*ppath, "number"),
                f"port {number} is given twice in {dotted(path)} (first at line "
                f"{ctx.line_of(out[number].where.path)}); give each port one entry",
            )
            ok = False
            continue
        out[number] = PortPolicyDraft(number, lb, Where(ctx, epath), pool, outlier, hash_on)
    return out if ok else None


# loadBalancer.simple, as Istio's SimpleLB names them, to the policy the
# sidecar runs (routing.SIMPLE_POLICIES). LEAST_CONN is LEAST_REQUEST's
# deprecated name: the same policy, named LEAST_REQUEST everywhere after the
# load (validate -v, /config_dump), as Envoy names it. It counts requests in
# flight as Envoy's least request does (not connections), taking the
# endpoint with the fewest of all where Envoy compares two drawn at random
# (its FULL_SCAN, on purpose: the README's Load balancing says why).
# UNSPECIFIED is the default: ROUND_ROBIN here, where Istio's pilot takes
# LEAST_REQUEST since 1.14 (defaultLBAlgorithm; ROUND_ROBIN before, and
# with istiod's ENABLE_LEGACY_LB_ALGORITHM_DEFAULT). Given, it is a policy
# all the same: a subset's replaces the rule's, as pilot's
# MergeTrafficPolicy takes the subset's loadBalancer whole.
_SIMPLE_LB = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "RANDOM": "RANDOM",
    "UNSPECIFIED": "ROUND_ROBIN",
    "LEAST_CONN": "LEAST_REQUEST",
}
_SIMPLE_LB_SAID = (
    "ROUND_ROBIN, LEAST_REQUEST, RANDOM, UNSPECIFIED (the default, ROUND_ROBIN here) "
    "and LEAST_CONN (LEAST_REQUEST's deprecated name)"
)
# what the sidecar does where Istio's loadBalancer.warmup (1.24) or the
# deprecated warmupDurationSecs would ramp a new endpoint's share up
_NO_WARMUP = "a new endpoint takes its full share of requests at once (no slow start)"


def _load_balancer(
    ctx: Ctx, tp: dict[str, Any], path: Path
) -> tuple[str | None, HashOn | None, bool]:
    """trafficPolicy.loadBalancer → (its policy or None, what it hashes
    or None, ok): ``simple``, or ``consistentHash`` (policy HASH; one of
    the two, a oneof in Istio's API)."""
    if tp.get("loadBalancer") is None:
        return None, None, True
    lpath = (*path, "loadBalancer")
    lb = fields(
        ctx,
        tp["loadBalancer"],
        lpath,
        allowed=("simple", "consistentHash"),
        unimplemented={
            "localityLbSetting": "",
            "warmup": _NO_WARMUP,
            "warmupDurationSecs": _NO_WARMUP,
        },
    )
    if lb is None or any(k not in ("simple", "consistentHash") for k in lb):
        return None, None, False
    if lb.get("simple") is not None and lb.get("consistentHash") is not None:
        ctx.error(
            (*lpath, "consistentHash"),
            f"{dotted(lpath)} sets both simple and consistentHash (one of them: "
            "consistentHash is a policy of its own)",
        )
        return None, None, False
    if lb.get("consistentHash") is not None:
        hash_on = _consistent_hash(ctx, lb["consistentHash"], (*lpath, "consistentHash"))
        return ("HASH", hash_on, True) if hash_on is not None else (None, None, False)
    if lb.get("simple") is None:
        ctx.error(lpath, f"{dotted(lpath)} needs simple or consistentHash")
        return None, None, False
    simple = text(ctx, lb["simple"], (*lpath, "simple"), required=True)
    if simple is None:
        return None, None, False
    if simple not in _SIMPLE_LB:
        ctx.error(
            (*lpath, "simple"),
            f"load balancer {simple} "
            + (NOT_IMPLEMENTED if simple == "PASSTHROUGH" else "is not known")
            + f"; simple takes {_SIMPLE_LB_SAID}, or use a consistentHash",
        )
        return None, None, False
    return _SIMPLE_LB[simple], None, True


# What a consistentHash may hash on (Istio's hashKey oneof), and its
# table settings (the ring's, Maglev's), which rendezvous hashing needs not
_HASH_KEYS = ("httpHeaderName", "httpCookie", "httpQueryParameterName", "useSourceIp")
_HASH_TABLES = ("ringHash", "maglev", "minimumRingSize")
# the largest table size Envoy takes (a uint64 in its API: bounded here)
_MAX_HASH_TABLE = 2**63 - 1
# a cookie's Path: no ';' (it would end the attribute), no CR, LF or
# other control character, nothing but ASCII (the relays write header
# lines of edits as UTF-8 and the compiled one's cookie line as Latin-1:
# only ASCII is the same line in both, and a character Latin-1 lacks
# would make the compiled relay refuse the whole verdict)
_BAD_COOKIE_PATH = re.compile(r"[^\x20-\x7e]|;")
# a query parameter name that could never be sent as one (it would end
# the name, the parameter or the query), holds a control character, or is
# not ASCII (a request target is ASCII: it could never match; and the
# compiled relay cannot write a name Latin-1 lacks)
_BAD_QUERY_NAME = re.compile(r"[^\x21-\x7e]|[&=#]")


def _consistent_hash(ctx: Ctx, value: Any, path: Path) -> HashOn | None:
    """loadBalancer.consistentHash → what each request is hashed on
    (verdict.HashOn); None after an error.

    Exactly one of ``httpHeaderName`` (lowercased), ``httpCookie`` (``name``
    a cookie-name token; ``path``; ``ttl``: absent, the cookie is only read;
    given, a request without it gets one generated, with ``Max-Age`` the
    whole seconds of it, ``0s`` a session cookie) and
    ``httpQueryParameterName``, and ``useSourceIp: true`` (the client's
    address: at a sidecar every outbound request's source is the pod
    itself, so all of them go to one endpoint; at a gateway, the client's
    or that of the load balancer in front). ``ringHash.minimumRingSize``,
    ``maglev.tableSize`` and the deprecated ``minimumRingSize`` are checked
    and do nothing (a warning): l4proxy hashes by rendezvous
    (verdict.hash_order), which needs no table."""
    ch = fields(
        ctx,
        value,
        path,
        allowed=(*_HASH_KEYS, *_HASH_TABLES),
        unimplemented=("localityLbSetting",),
    )
    if ch is None or any(k not in (*_HASH_KEYS, *_HASH_TABLES) for k in ch):
        return None
    ok = _hash_tables(ctx, ch, path)
    keys = [k for k in _HASH_KEYS if ch.get(k) is not None]
    if not keys:
        ctx.error(
            path,
            f"{dotted(path)} needs one of httpHeaderName, httpCookie, httpQueryParameterName "
            "or useSourceIp",
        )
        return None
    if len(keys) > 1:
        ctx.error(
            (*path, keys[1]),
            f"{dotted(path)} sets {' and '.join(keys)}: one of them (what a request is hashed on)",
        )
        return None
    key = keys[0]
    kpath = (*path, key)
    if key == "useSourceIp":
        if ch[key] is not True:
            if ch[key] is not False:
                ctx.error(kpath, f"{dotted(kpath)} must be true or false, not {type_name(ch[key])}")
            else:
                ctx.error(
                    path,
                    f"{dotted(path)} needs one of httpHeaderName, httpCookie or "
                    "httpQueryParameterName (useSourceIp is false)",
                )
            return None
        return HashOn(HASH_SOURCE_IP, "") if ok else None
    hash_on: HashOn | None = None
    if key == "httpHeaderName":
        name = text(ctx, ch[key], kpath, required=True)
        if name is not None and header_name(ctx, name, kpath):
            hash_on = HashOn(HASH_HEADER, name.lower())
    elif key == "httpQueryParameterName":
        name = text(ctx, ch[key], kpath, required=True)
        if name is not None:
            if _BAD_QUERY_NAME.search(name):
                ctx.error(
                    kpath,
                    f"{dotted(kpath)} {name!r} is not a query parameter name "
                    "(no '&', '=', '#', space, control or non-ASCII character)",
                )
            else:
                hash_on = HashOn(HASH_QUERY, name)
    else:
        hash_on = _http_cookie(ctx, ch[key], kpath)
    return hash_on if ok else None


def _http_cookie(ctx: Ctx, value: Any, path: Path) -> HashOn | None:
    """consistentHash.httpCookie → HashOn(cookie); None after an error."""
    c = fields(
        ctx,
        value,
        path,
        allowed=("name", "path", "ttl"),
        unimplemented={
            "attributes": "the generated cookie has only Max-Age, Path and HttpOnly",
        },
        required=("name",),
    )
    if c is None or any(k not in ("name", "path", "ttl") for k in c) or c.get("name") in (None, ""):
        return None  # (fields() said why: an empty name once)
    ok = True
    name = text(ctx, c["name"], (*path, "name"), required=True)
    if name is not None and not header_name(
        ctx, name, (*path, "name"), what="cookie name", kind="a cookie name"
    ):
        ok = False
    cookie_path = ""
    if c.get("path") is not None:
        got = text(ctx, c["path"], (*path, "path"))
        if got is None:
            ok = False
        elif _BAD_COOKIE_PATH.search(got):
            ctx.error(
                (*path, "path"),
                f"{dotted((*path, 'path'))} {got!r} may hold no ';', no control character "
                "and nothing but ASCII",
            )
            ok = False
        else:
            cookie_path = got
    ttl: int | None = None
    if c.get("ttl") is not None:
        seconds = duration(ctx, c["ttl"], (*path, "ttl"))
        if seconds is None:
            ok = False
        else:
            ttl = int(seconds)  # whole seconds (Max-Age); 0: a session cookie
            if 0 < seconds < 1:
                ctx.warning(
                    (*path, "ttl"),
                    f"{dotted((*path, 'ttl'))} is under a second: the cookie's Max-Age is "
                    "whole seconds, so it is a session cookie (as Envoy makes it); say 0s "
                    "for one, or 1s or more",
                )
    if name is None or not ok:
        return None
    return HashOn(HASH_COOKIE, name, ttl, cookie_path)


def _hash_tables(ctx: Ctx, ch: dict[str, Any], path: Path) -> bool:
    """A consistentHash's ring or Maglev table sizes: checked (non-negative
    integers; at most one of ringHash and maglev), then a warning that they
    do nothing; False after an error."""
    ok = True
    given: list[Path] = []
    if ch.get("ringHash") is not None and ch.get("maglev") is not None:
        ctx.error(
            (*path, "maglev"),
            f"{dotted(path)} sets both ringHash and maglev (one of them)",
        )
        ok = False
    for table, size in (("ringHash", "minimumRingSize"), ("maglev", "tableSize")):
        if ch.get(table) is None:
            continue
        tpath = (*path, table)
        t = fields(ctx, ch[table], tpath, allowed=(size,))
        if t is None or any(k != size for k in t):
            ok = False
            continue
        if t.get(size) is not None:
            ok = integer(ctx, t[size], (*tpath, size), 0, _MAX_HASH_TABLE) is not None and ok
        given.append(tpath)
    if ch.get("minimumRingSize") is not None:
        mpath = (*path, "minimumRingSize")
        ok = integer(ctx, ch["minimumRingSize"], mpath, 0, _MAX_HASH_TABLE) is not None and ok
        given.append(mpath)
    if ok:
        for gpath in given:
            ctx.warning(
                gpath,
                f"{dotted(gpath)} has no effect: l4proxy orders a consistent hash's "
                "endpoints by rendezvous hashing, which needs no ring or table (the same "
                "guarantees: a key stays on its endpoint while it stays, an endpoint that "
                "goes moves only its own keys)",
            )
    return ok


# Istio's ConnectionPoolSettings fields that the sidecar does not honour,
# each with why or what to do instead
_TCP_POOL_UNIMPLEMENTED = {
    "tcpKeepalive": "the sidecar sets no TCP keepalive on upstream connections",
    "maxConnectionDuration": "use http.maxRequestsPerConnection to recycle connections",
    "idleTimeout": "use http.idleTimeout for pooled connections; `l4proxy run --idle-timeout` "
    "bounds a connection's idle time",
}
_HTTP_POOL_UNIMPLEMENTED = {
    "maxRetries": "it caps the retries in flight at once to the cluster in Envoy, which the "
    "sidecar does not count; a route's retries.attempts bounds each request's retries",
    "useClientProtocol": "the sidecar speaks HTTP/1.1 to every upstream",
    "maxConcurrentStreams": "the sidecar speaks HTTP/1.1 to every upstream (no streams)",
}
_H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")


def _connection_pool(ctx: Ctx, value: Any, path: Path) -> PoolSettings | None:
    """trafficPolicy.connectionPool → its settings (those not given: None);
    None after an error.

    Honoured: ``http.maxRequestsPerConnection`` (at most 2^29, as Istio;
    0, Istio's default, is not set, as in Istio's pilot, which sets Envoy's
    only when above 0: the sidecar's flag then), ``http.idleTimeout`` and
    ``tcp.connectTimeout`` (Istio's durations, at least 1ms, whole
    milliseconds, as Istio's validation), and the circuit breakers
    ``tcp.maxConnections``, ``http.http1MaxPendingRequests`` and
    ``http.http2MaxRequests`` (Istio's int32: up to 2^31-1; 0 is not set,
    unlimited, as in Istio's pilot, which sets Envoy's thresholds only above
    0; a negative one is an error, as in Istio's validation).
    ``http.h2UpgradePolicy`` DEFAULT
    and DO_NOT_UPGRADE are accepted and do nothing (the sidecar speaks
    HTTP/1.1 upstream and never upgrades); UPGRADE and every other field of
    Istio's API are refused by name.
    """
    cp = fields(ctx, value, path, allowed=("tcp", "http"))
    if cp is None:
        return None
    ok = all(k in ("tcp", "http") for k in cp)  # (fields() reported the others)
    max_requests: int | None = None
    idle: float | None = None
    connect: float | None = None
    # the circuit breakers, by Istio's name: (0: unset) or None
    limits: dict[str, int | None] = {}

    def limit(section: dict[str, Any], spath: Path, name: str) -> bool:
        if section.get(name) is None:
            return True
        n = integer(ctx, section[name], (*spath, name), 0, MAX_CIRCUIT_BREAKER)
        limits[name] = n
        return n is not None

    if cp.get("tcp") is not None:
        tpath = (*path, "tcp")
        tallowed = ("connectTimeout", "maxConnections")
        tcp = fields(
            ctx,
            cp["tcp"],
            tpath,
            allowed=tallowed,
            unimplemented=_TCP_POOL_UNIMPLEMENTED,
        )
        if tcp is None or any(k not in tallowed for k in tcp):
            ok = False
            tcp = tcp or {}
        if tcp.get("connectTimeout") is not None:
            connect = duration(ctx, tcp["connectTimeout"], (*tpath, "connectTimeout"), zero=False)
            ok = ok and connect is not None
        ok = limit(tcp, tpath, "maxConnections") and ok
    if cp.get("http") is not None:
        hpath = (*path, "http")
        allowed = (
            "maxRequestsPerConnection",
            "idleTimeout",
            "h2UpgradePolicy",
            "http1MaxPendingRequests",
            "http2MaxRequests",
        )
        http = fields(
            ctx, cp["http"], hpath, allowed=allowed, unimplemented=_HTTP_POOL_UNIMPLEMENTED
        )
        if http is None or any(k not in allowed for k in http):
            ok = False
            http = http or {}
        ok = limit(http, hpath, "http1MaxPendingRequests") and ok
        ok = limit(http, hpath, "http2MaxRequests") and ok
        if http.get("maxRequestsPerConnection") is not None:
            max_requests = integer(
                ctx,
                http["maxRequestsPerConnection"],
                (*hpath, "maxRequestsPerConnection"),
                0,
                MAX_REQUESTS_PER_CONNECTION,
            )
            ok = ok and max_requests is not None
        if http.get("idleTimeout") is not None:
            idle = duration(ctx, http["idleTimeout"], (*hpath, "idleTimeout"), zero=False)
            ok = ok and idle is not None
        if http.get("h2UpgradePolicy") is not None:
            upath = (*hpath, "h2UpgradePolicy")
            policy = text(ctx, http["h2UpgradePolicy"], upath, required=True)
            if policy == "UPGRADE":
                ctx.error(
                    upath,
                    f"{dotted(upath)} UPGRADE {NOT_IMPLEMENTED}; the sidecar speaks HTTP/1.1 "
                    "to every upstream (use DEFAULT or DO_NOT_UPGRADE)",
                )
                ok = False
            elif policy is not None and policy not in _H2_UPGRADE_POLICIES:
                ctx.error(
                    upath,
                    f"{dotted(upath)} {policy!r} is not known "
                    f"(use one of {', '.join(_H2_UPGRADE_POLICIES)})",
                )
                ok = False
            elif policy is None:
                ok = False
    if not ok:
        return None
    return PoolSettings(
        max_requests or None,
        idle,
        connect,
        limits.get("maxConnections") or None,
        limits.get("http1MaxPendingRequests") or None,
        limits.get("http2MaxRequests") or None,
    )


# Istio's OutlierDetection counters (UInt32Value; 0: off)
_MAX_COUNT = 2**32 - 1
_OUTLIER_FIELDS = (
    "consecutive5xxErrors",
    "consecutiveGatewayErrors",
    "splitExternalLocalOriginErrors",
    "consecutiveLocalOriginFailures",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "minHealthPercent",
    "consecutiveErrors",
)


def _outlier_detection(ctx: Ctx, value: Any, path: Path) -> OutlierPolicy | None:
    """trafficPolicy.outlierDetection → its policy, what it leaves unset
    Istio's (Envoy's) default (:class:`OutlierPolicy`); None after an error.

    ``consecutive5xxErrors`` and ``consecutiveGatewayErrors``: 0 and up (0:
    off); ``consecutiveLocalOriginFailures``: 0 and up, 0 being unset (5), as
    Istio's pilot sets Envoy's only above 0;
    ``consecutiveLocalOriginFailures`` counts only with
    ``splitExternalLocalOriginErrors`` (a warning otherwise, as it does
    nothing). ``interval`` and ``baseEjectionTime``: Istio's durations, at
    least 1ms. ``maxEjectionPercent`` 0..100, 0 being unset (10), as Istio's
    pilot sets Envoy's only above 0; ``minHealthPercent`` 0..100.

    ``consecutiveErrors``: the field Istio deprecated for the two above; it
    is still in Istio's API (``[deprecated=true]``, hidden from the docs), but
    its pilot has ignored it since 1.7 (istio/istio#24087): so here, with a
    warning that says what to set instead (Istio 1.6 and older read it as
    gateway errors alone, 5xx off).
    """
    od = fields(ctx, value, path, allowed=_OUTLIER_FIELDS)
    if od is None:
        return None
    ok = all(k in _OUTLIER_FIELDS for k in od)  # (fields() reported the others)
    base = OutlierPolicy()
    got: dict[str, Any] = {}

    def count(name: str, attr: str, hi: int = _MAX_COUNT) -> None:
        nonlocal ok
        if od.get(name) is None:
            return
        n = integer(ctx, od[name], (*path, name), 0, hi)
        if n is None:
            ok = False
        else:
            got[attr] = n

    def seconds(name: str, attr: str) -> None:
        nonlocal ok
        if od.get(name) is None:
            return
        d = duration(ctx, od[name], (*path, name), zero=False)
        if d is None:
            ok = False
        else:
            got[attr] = d

    count("consecutive5xxErrors", "consecutive_5xx")
    count("consecutiveGatewayErrors", "consecutive_gateway")
    count("consecutiveLocalOriginFailures", "consecutive_local")
    if got.get("consecutive_local") == 0:  # unset (5), as Istio's pilot sets it only above 0
        del got["consecutive_local"]
    seconds("interval", "interval")
    seconds("baseEjectionTime", "base_ejection")
    for name, attr in (
        ("maxEjectionPercent", "max_ejection_percent"),
        ("minHealthPercent", "min_health_percent"),
    ):
        count(name, attr, 100)
    if got.get("max_ejection_percent") == 0:  # unset, as in Istio's pilot
        del got["max_ejection_percent"]
    for attr in ("max_ejection_percent", "min_health_percent"):
        if attr in got:
            got[attr] = float(got[attr])
    if od.get("splitExternalLocalOriginErrors") is not None:
        split = boolean(
            ctx, od["splitExternalLocalOriginErrors"], (*path, "splitExternalLocalOriginErrors")
        )
        if split is None:
            ok = False
        else:
            got["split_local"] = split
    if "consecutive_local" in got and not got.get("split_local"):
        ctx.warning(
            (*path, "consecutiveLocalOriginFailures"),
            f"{dotted((*path, 'consecutiveLocalOriginFailures'))} does nothing without "
            "splitExternalLocalOriginErrors: true (the proxy's own failures then count "
            "towards consecutive5xxErrors and consecutiveGatewayErrors)",
        )
    if od.get("consecutiveErrors") is not None:
        epath = (*path, "consecutiveErrors")
        n = integer(ctx, od["consecutiveErrors"], epath, 0, 2**31 - 1)
        if n is None:
            ok = False
        else:  # (read, so that a wrong value is an error, as in Istio's validation)
            ctx.warning(
                epath,
                f"{dotted(epath)} is deprecated and ignored, as Istio's pilot ignores it "
                "since 1.7: set consecutiveGatewayErrors (what Istio 1.1 to 1.6 counted) or "
                "consecutive5xxErrors",
            )
    if not ok:
        return None
    return dataclasses.replace(base, **got)


# -- ServiceEntry ------------------------------------------------------------


def read_service_entry(ctx: Ctx, obj: dict[str, Any], env: Env) -> list[ServiceDraft] | None:
    assert ctx.name is not None
    spec = fields(
        ctx,
        obj.get("spec"),
        ("spec",),
        allowed=("hosts", "addresses", "ports", "resolution", "endpoints", "location", "exportTo"),
        unimplemented=("subjectAltNames", "workloadSelector"),
        required=("hosts", "ports"),
    )
    if spec is None:
        return None
    exported = _export_to(ctx, spec.get("exportTo"), env)
    hosts, ok = _hosts(ctx, spec, env)
    ok = ok and exported
    addresses: list[str] = []
    for i, a in enumerate(listing(ctx, spec.get("addresses"), ("spec", "addresses")) or []):
        apath = ("spec", "addresses", i)
        s = text(ctx, a, apath, required=True)
        try:
            net = ipaddress.ip_network(s or "", strict=True)
        except ValueError:
            ctx.error(apath, f"address {a!r} is not an IP address or CIDR block")
            ok = False
            continue
        single = net.num_addresses == 1
        addresses.append(str(net.network_address) if single else str(net))
    if spec.get("location") is not None:
        loc = text(ctx, spec["location"], ("spec", "location"))
        if loc not in ("MESH_EXTERNAL", "MESH_INTERNAL"):
            ctx.error(("spec", "location"), "location must be MESH_EXTERNAL or MESH_INTERNAL")
            ok = False
    ports = _ports(ctx, spec.get("ports"), ("spec", "ports"))
    eps_raw = listing(ctx, spec.get("endpoints"), ("spec", "endpoints"))
    resolution = "STATIC" if eps_raw else "DNS"  # Istio's NONE is not implemented
    if spec.get("resolution") is not None:
        rpath = ("spec", "resolution")
        r = text(ctx, spec["resolution"], rpath, required=True)
        if r == "NONE":
            ctx.error(
                rpath,
                f"resolution NONE {NOT_IMPLEMENTED}; use STATIC with endpoints, or DNS",
            )
            ok = False
        elif r not in ("STATIC", "DNS"):
            ctx.error(rpath, f"resolution {r!r} is not known (use STATIC or DNS)")
            ok = False
        else:
            resolution = r
    if ports is None or eps_raw is None or not ok:
        return None
    if resolution == "STATIC" and not eps_raw:
        ctx.error(("spec",), "resolution STATIC needs endpoints (add spec.endpoints, or use DNS)")
        return None
    # (each port its own copy of each endpoint; a DNS host without
    # endpoints is its own: checked before any is made)
    made = len(ports) * (len(eps_raw) or len(hosts))
    if not env.endpoints.take(made):
        before = env.endpoints.taken
        ctx.error(
            ("spec", "endpoints") if eps_raw else ("spec", "hosts"),
            f"its {len(ports):,} ports and {len(eps_raw) or len(hosts):,} "
            f"{'endpoints' if eps_raw else 'hosts (DNS, each its own endpoint)'} are "
            f"{made:,} endpoint entries (each port has its own copy of each endpoint)"
            f"{f', with the {before:,} before them' if before else ''}, more than the "
            f"{env.endpoints.limit:,} the rules may have: describe fewer ports or fewer "
            "endpoints",
        )
        return None
    per_port = _endpoints(ctx, eps_raw, ("spec", "endpoints"), ports, resolution)
    if per_port is None:
        return None
    out = []
    for h in hosts:
        if not eps_raw:
            # DNS without endpoints: the host name itself is the endpoint.
            per_port = tuple((p.number, (Endpoint(h, target),)) for p, target in ports)
        svc = Service(
            host=h,
            ports=tuple(p for p, _ in ports),
            port_endpoints=per_port,
            addresses=tuple(addresses),
            aliases=aliases(h, env),
            resolution=resolution,
        )
        out.append(ServiceDraft(ctx.name, svc, Where(ctx, ("spec", "hosts"))))
    return out


def _ports(ctx: Ctx, value: Any, path: Path) -> list[tuple[ServicePort, int]] | None:
    """ports[] → (ServicePort, default target port)."""
    items = listing(ctx, value, path)
    if items is None:
        return None
    out: list[tuple[ServicePort, int]] = []
    ok = True
    for i, item in enumerate(items):
        ppath = (*path, i)
        p = fields(
            ctx,
            item,
            ppath,
            allowed=("number", "name", "protocol", "targetPort"),
            required=("number", "name"),
        )
        if p is None or p.get("number") is None or p.get("name") is None:
            ok = False
            continue
        number = _port_number(ctx, p["number"], (*ppath, "number"))
        name = text(ctx, p["name"], (*ppath, "name"), required=True)
        target = number
        if p.get("targetPort") is not None:
            target = _port_number(ctx, p["targetPort"], (*ppath, "targetPort"))
        protocol = _protocol(name or "")
        if p.get("protocol") is not None:
            given = text(ctx, p["protocol"], (*ppath, "protocol"), required=True)
            if given is not None and given.upper() not in _PROTOCOLS:
                ctx.error(
                    (*ppath, "protocol"),
                    f"protocol {given!r} is not known (use one of {', '.join(_PROTOCOLS)})",
                )
                given = None
            protocol = given.upper() if given else ""
        if number is None or name is None or target is None or not protocol:
            ok = False
            continue
        if any(q.number == number for q, _ in out):
            ctx.error((*ppath, "number"), f"port {number} is listed twice")
            ok = False
            continue
        if any(q.name == name for q, _ in out):
            ctx.error((*ppath, "name"), f"port name {name} is used twice")
            ok = False
            continue
        out.append((ServicePort(number, name, protocol), target))
    return out if ok else None


def _protocol(name: str) -> str:
    """Istio 0.x's port naming convention, when protocol is not given."""
    base = name.split("-", 1)[0].lower()
    return {
        "http": "HTTP",
        "http2": "HTTP2",
        "grpc": "GRPC",
        "https": "HTTPS",
        "tls": "TLS",
        "mongo": "MONGO",
        "mysql": "MYSQL",
        "redis": "REDIS",
    }.get(base, "TCP")


def _endpoints(
    ctx: Ctx,
    items: list[Any],
    path: Path,
    ports: list[tuple[ServicePort, int]],
    resolution: str,
) -> tuple[tuple[int, tuple[Endpoint, ...]], ...] | None:
    per_port: dict[int, list[Endpoint]] = {p.number: [] for p, _ in ports}
    names = {p.name: p.number for p, _ in ports}
    ok = True
    for i, item in enumerate(items):
        epath = (*path, i)
        e = fields(
            ctx,
            item,
            epath,
            allowed=("address", "ports", "labels"),
            unimplemented=("network", "locality", "weight", "serviceAccount"),
            required=("address",),
        )
        if e is None or e.get("address") is None:
            ok = False
            continue
        address = text(ctx, e["address"], (*epath, "address"), required=True)
        if address is not None:
            try:
                address = str(ipaddress.ip_address(address))
            except ValueError:
                if resolution == "STATIC":
                    ctx.error(
                        (*epath, "address"),
                        f"endpoint address {address!r} is not an IP address "
                        "(resolution STATIC; use DNS for host names)",
                    )
                    address = None
        sel = labels(ctx, e.get("labels"), (*epath, "labels"))
        mapping: dict[int, int] = {}
        raw = e.get("ports")
        if raw is not None and not isinstance(raw, dict):
            ctx.error((*epath, "ports"), "endpoint ports must map port name: number")
            ok = False
            raw = None
        for pname, pnum in (raw or {}).items():
            sub = (*epath, "ports", pname)
            if pname not in names:
                # a port's number where its name goes ({8080: 18081}): say which name
                named = next((n for n, num in names.items() if num == pname), None)
                ctx.error(
                    sub,
                    f"endpoint port {pname!r} names no port of this ServiceEntry "
                    f"(ports: {', '.join(names)})"
                    + (
                        f"; an endpoint's ports are keyed by the port's name, not its "
                        f"number: {{{named}: {pnum}}}"
                        if named is not None and not isinstance(pname, str)
                        else ""
                    ),
                )
                ok = False
                continue
            num = _port_number(ctx, pnum, sub)
            if num is None:
                ok = False
            else:
                mapping[names[pname]] = num
        if address is None or sel is None:
            ok = False
            continue
        for p, target in ports:
            per_port[p.number].append(Endpoint(address, mapping.get(p.number, target), sel))
    if not ok:
        return None
    return tuple((number, tuple(eps)) for number, eps in per_port.items())
