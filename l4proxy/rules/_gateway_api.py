"""Gateway API (gateway.networking.k8s.io v1, v1beta1): HTTPRoute and Gateway.

Theory of operation
-------------------
An HTTPRoute attaches to parents (``spec.parentRefs``):

* a **Service** (``group: ""``, ``kind: Service``; GAMMA mesh routing): its
  rules route the sidecar's traffic to that Service, as a VirtualService for
  the same host would;
* a **Gateway** (the default kind): its rules route what arrives on the
  Gateway's listeners (``l4proxy run --listen``), per listener port and
  hostname. Each (listener, hostname) becomes a *gateway service*: a host
  with no endpoints whose routes are the attached rules, reached through a
  catch-all ingress path of that listener (see :mod:`l4proxy.rules.routing`).
  Every Gateway is served on the same local ports, so Gateways are merged
  onto one set of addresses: listeners of different Gateways on one port
  need distinct hostnames (the API's "compatible" listeners), as within
  one Gateway.

A parentRef that attaches to nothing is a warning at its line, and the
route is not served through it (the API's Accepted False; the rest of the
config is unaffected): a Gateway not in the files, no listener of its
``sectionName`` or ``port`` (NoMatchingParent), no listener that admits
the route's namespace (NotAllowedByListeners), or none of those whose
hostname meets one of the route's (NoMatchingListenerHostname; the
namespace is tested first, and both are said where both fail). Never an
error: a Gateway edited to admit fewer routes, or deleted, must revoke
them at the next load, where an error would keep the last good rules,
and the access just removed with them. The warning names its parentRef
(``Diagnostic.parent_ref``: the route and the index in ``spec.parentRefs``),
as its line may hold several. A route whose every parentRef attaches to
nothing serves nothing, and its backends are still checked after those
warnings, as Istio and Envoy Gateway report a parent's ResolvedRefs
whatever its Accepted: the user fixing the route learns all that is wrong
with it at once. Each such finding says it holds once the route attaches,
and none is an error (:func:`_once_attached`): the rules are not refused
for what serves nothing.

Precedence follows the API (``httproute_types.go``), not list order: every
match of every rule of every route on one parent is ranked (Exact path, then
the longest PathPrefix, then RegularExpression (its place is left to
implementations), then PathPrefix ``/``; then a method match; then the
most header matches; then the most query parameter matches), ties going to
the oldest route by ``metadata.creationTimestamp`` (RFC 3339, as ``kubectl
get -o yaml`` writes it; a route without one after those with one, as a
route yet to be created is the newest), then to the first by
``namespace/name``, then to rule and match order: on a Service parent
(GAMMA) as on a Gateway's listener and hostname (on a Service, a consumer
route of this namespace comes before the Service's own routes, whatever
their age). A match identical to one of another route ranked before it on the
same listener and hostname is never reached: a warning naming both (on
a Service parent, not warned of). Adjacent matches of one rule merge
back into one route, so an HTTPRoute compiles to the same table as the
equivalent VirtualService.

A path match's Exact or PathPrefix value is held to the CRD's validation
(:func:`_path_value`), and a header match's value may not hold CR, LF or
NUL: what the API server would refuse is an error at its line. So are the
CRDs' list bounds (maxItems, and the CEL rule of 128 matches a route:
:func:`_bounded`, :func:`_route_matches`; HTTPRoute's ``rules: []``, its
minItems 1: the API's default rule is for a route without rules), read
before the list's items,
parentRefs to one parent that do not tell themselves apart
(:func:`_distinct_parents`) and a rule name given twice.

Backends (``backendRefs``: a Service name and port; each version its own
Service) resolve like ServiceEntry hosts: a ServiceEntry for
``name.namespace.svc.<domain>``, else a ``resolution: DNS`` ServiceEntry
endpoint with that name (a headless per-version Service; the backend is then
that endpoint's labels). Weights are proportional (0 to 1,000,000, default 1,
0 means none); they are kept as percentages when that is exact. A backend
that resolves to nothing in the files is a warning and its share is answered
HTTP 500 (the API's rule) until a ServiceEntry names it; a rule whose every
backend resolves to nothing is an error. A backend in another namespace than
its route's needs a ReferenceGrant there (``read_reference_grant``) that
lets HTTPRoutes of the route's namespace refer to that Service: without
one it is RefNotPermitted, its share answered 500 as an unresolved one's
(``Destination.refused``), whatever the registry holds; a warning, never an
error, so that deleting a grant revokes it (an error keeps the last good
rules).

A rule's ``timeouts.request`` is the route's timeout (Envoy's route timeout,
as a VirtualService's ``http[].timeout``: 504 when it passes before the
response). Its ``retry`` (experimental, GEP-1731) is the route's retry
policy as Istio converts it to a VirtualService's ``http[].retries``:
``attempts`` (default 2; 0: none), the status ``codes``, and connection
failures, after a ``backoff`` (the base interval between tries);
``timeouts.backendRequest`` is then the per-try timeout, and without a
``retry`` (absent or null) the route's timeout in place of
``timeouts.request`` (the one try's: Istio's conversion); with ``attempts:
0`` it does nothing (Istio's too), said in a warning.

Filters, as Istio converts them: a rule's RequestHeaderModifier and
ResponseHeaderModifier (set, add, remove; one action per header name) and
a backendRef's become the route's and the destination's header edits
(:meth:`RouteTable.choices` merges them as Envoy applies Istio's lists);
URLRewrite's hostname the Host, its path ReplaceFullPath (the whole path,
the query kept) or ReplacePrefixMatch (the PathPrefix match's elements: the
API's table); RequestRedirect (scheme, hostname, path, port, statusCode 302
by default) the route's own answer, its Location built per request with the
API's port rules. The API's rules hold: each kind once, not both
RequestRedirect and URLRewrite, no backendRefs beside a RequestRedirect, a
ReplacePrefixMatch only with one PathPrefix match. A rule's RequestMirror
filters (any number: the one kind the API lets repeat) are the route's
mirrors: ``backendRef`` resolved as a backendRef's, ``percent`` (0..100) or
``fraction`` (``numerator`` / ``denominator``, 100 by default; not both)
its share, every request without either; a share of 0 mirrors nothing, as
Istio converts it. A ``CORS`` filter is the route's CORS policy
(``_cors``). Refused by name: ExtensionRef and ExternalAuth (with why), a
redirect, rewrite, mirror or CORS filter on a backendRef (Istio converts
none), TLS listeners and listener protocols other than HTTP. What needs
no refusal is a note: a Gateway's ``infrastructure`` (l4proxy creates
none), a route kind beside HTTPRoute in a listener's
``allowedRoutes.kinds`` (not served; its HTTPRoutes attach).

A rule's ``sessionPersistence`` (GEP-1619) is its route's
:class:`~l4proxy.dataplane.verdict.SessionPersistence`, as Envoy Gateway
configures Envoy's stateful session filter (:func:`_session_persistence`):
a cookie (the default) or a header whose value names the endpoint that
served the client, which its later requests go to across the rule's
weighted backends while it is one of them. The cookie's Path is the
matched path's (:func:`~l4proxy.rules.routing.session_cookie_path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from l4proxy.dataplane.verdict import (
    MIRROR_SCALE,
    SESSION_COOKIE,
    SESSION_HEADER,
    HeadEdits,
    SessionPersistence,
)
from l4proxy.rules._cors import gateway_cors
from l4proxy.rules._edits import FRAMING_HEADERS
from l4proxy.rules._errors import UNATTACHED, UNRESOLVED, Diagnostic, RouteParentRef
from l4proxy.rules._header_ops import gateway_header_filter
from l4proxy.rules._objects import (
    BackendDraft,
    Env,
    GatewayDraft,
    GrantDraft,
    HttpMatchDraft,
    HttpRouteDraft,
    HttpRuleDraft,
    IstioGatewayDraft,
    ListenerDraft,
    ParentDraft,
    PolicyDraft,
    RouteBudget,
    fqdn,
    oldest_first,
    policy_subset,
)
from l4proxy.rules._regex import RegexError, compile_regex, shown
from l4proxy.rules._schema import (
    NOT_IMPLEMENTED,
    Ctx,
    Where,
    creation_timestamp,
    dns_label,
    dns_subdomain,
    dotted,
    duration,
    fields,
    header_name,
    integer,
    listing,
    text,
)
from l4proxy.rules._yaml import Path
from l4proxy.rules.routing import (
    DEFAULT,
    DEFAULT_RETRY_BACKOFF,
    GATEWAY_HOST_PREFIX,
    REDIRECT_CODES,
    CorsPolicy,
    Destination,
    HttpRetry,
    IngressPath,
    Labels,
    Match,
    MirrorPolicy,
    Redirect,
    Route,
    Service,
    ServicePort,
    StringMatch,
    Subset,
    UriRewrite,
)

API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
# ReferenceGrant's: v1beta1 (the standard channel's), v1alpha2 (older), v1
GRANT_API_VERSIONS = (
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1alpha2",
    "gateway.networking.k8s.io/v1",
)
GROUP = "gateway.networking.k8s.io"
KINDS = ("HTTPRoute", "Gateway", "ReferenceGrant")  # (the kinds read)
MAX_WEIGHT = 1_000_000
UNRESOLVED_STATUS = 500
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\0]")
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Filters the relays cannot apply, with why (refused by name)
_FILTER_REFUSED = {
    "ExtensionRef": "l4proxy has no implementation-specific filters",
    "ExternalAuth": "calling an authorization service per request is not something the relays do",
}
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "CORS": "cors",
    "ExtensionRef": "extensionRef",
    "ExternalAuth": "externalAuth",
}
_MAX_FILTERS = 16
# The CRD's maxItems (HTTPRoute's, Gateway's): an API server refuses a longer
# list, so a file holding one is refused too, at the list's line
MAX_PARENT_REFS = 32
MAX_HOSTNAMES = 16
MAX_RULES = 16
MAX_MATCHES = 64  # per rule
MAX_ROUTE_MATCHES = 128  # across a route's rules (the CRD's CEL rule on spec.rules)
MAX_BACKEND_REFS = 16
MAX_NAME_MATCHES = 16  # a match's headers, its queryParams
MAX_HEADER_VALUE = 4096  # a header match's value (maxLength)
MAX_QUERY_VALUE = 1024  # a query parameter match's value (maxLength)
MAX_LISTENERS = 64
MAX_ROUTE_KINDS = 8
REDIRECT_STATUS = 302  # RequestRedirect's statusCode by default


def _bounded(ctx: Ctx, value: Any, path: Path, most: int, what: str) -> list[Any] | None:
    """*value* as a list (``listing``), None after an error: not a list, or
    longer than *most*, the CRD's maxItems for it (an API server refuses
    the object, so l4proxy refuses the file: an error at the list's line,
    before any of its items is read)."""
    items = listing(ctx, value, path)
    if items is not None and len(items) > most:
        ctx.error(
            path,
            f"{dotted(path)} has {len(items)} {what}; the API allows {most} (the CRD's "
            "maxItems: an API server refuses the object)",
        )
        return None
    return items


# -- Gateway -------------------------------------------------------------------


def read_gateway(ctx: Ctx, obj: dict[str, Any], env: Env) -> GatewayDraft | None:
    assert ctx.name is not None
    spec = fields(
        ctx,
        obj.get("spec"),
        ("spec",),
        allowed=("gatewayClassName", "listeners", "infrastructure"),
        unimplemented={
            "addresses": "the gateway listens where `l4proxy run --listen` says",
            "backendTLS": "",
        },
        required=("gatewayClassName", "listeners"),
    )
    if spec is None:
        return None
    if spec.get("infrastructure") is not None:
        # (labels and annotations for the Service and Deployment an
        # implementation creates: l4proxy creates none, and a Gateway
        # copied from a cluster should load as it is)
        ctx.note(
            ("spec", "infrastructure"),
            "spec.infrastructure is not applied: l4proxy creates no infrastructure for a "
            "Gateway (its pod and Service are deployed as they are)",
        )
    ok = text(ctx, spec.get("gatewayClassName"), ("spec", "gatewayClassName")) is not None
    listeners: list[ListenerDraft] = []
    items = _bounded(ctx, spec.get("listeners"), ("spec", "listeners"), MAX_LISTENERS, "listeners")
    if items is None:
        return None
    for i, item in enumerate(items):
        got = _listener(ctx, item, ("spec", "listeners", i))
        if got is None:
            ok = False
            continue
        for other in listeners:
            if other.name == got.name:
                got.where.error(f"listener name {got.name} is used twice in this Gateway")
                ok = False
            elif (other.port, other.hostname) == (got.port, got.hostname):
                got.where.error(
                    f"listeners {other.name} and {got.name} both serve port {got.port} "
                    f"for hostname {got.hostname or '(any)'}; keep one"
                )
                ok = False
        listeners.append(got)
    if not ok:
        return None
    return GatewayDraft(ctx.name, ctx.namespace, listeners, Where(ctx, ()))


def _listener(ctx: Ctx, value: Any, path: Path) -> ListenerDraft | None:
    lst = fields(
        ctx,
        value,
        path,
        allowed=("name", "port", "protocol", "hostname", "allowedRoutes"),
        unimplemented={"tls": "gateway listeners serve plain HTTP"},
        required=("name", "port", "protocol"),
    )
    if lst is None or any(lst.get(k) is None for k in ("name", "port", "protocol")):
        return None
    name = dns_label(ctx, lst["name"], (*path, "name"))
    port = integer(ctx, lst["port"], (*path, "port"), 1, 65535, what="port")
    proto = text(ctx, lst["protocol"], (*path, "protocol"), required=True)
    ok = name is not None and port is not None and proto is not None
    if proto is not None and proto != "HTTP":
        ctx.error(
            (*path, "protocol"),
            f"listener protocol {proto} {NOT_IMPLEMENTED}; gateway listeners serve plain "
            "HTTP (protocol: HTTP)",
        )
        ok = False
    hostname = None
    if lst.get("hostname") is not None:
        hostname = _hostname(ctx, lst["hostname"], (*path, "hostname"))
        ok = ok and hostname is not None
    all_ns = False
    if lst.get("allowedRoutes") is not None:
        got = _allowed_routes(ctx, lst["allowedRoutes"], (*path, "allowedRoutes"))
        if got is None:
            ok = False
        else:
            all_ns = got
    if not ok:
        return None
    assert name is not None and port is not None
    return ListenerDraft(name, port, hostname, all_ns, Where(ctx, path))


def _allowed_routes(ctx: Ctx, value: Any, path: Path) -> bool | None:
    """allowedRoutes → True for ``namespaces.from: All``, False for Same."""
    ar = fields(ctx, value, path, allowed=("namespaces", "kinds"))
    if ar is None:
        return None
    ok = True
    others: list[tuple[Path, str]] = []  # (where, kind) of the kinds but HTTPRoute
    http_route = False
    kinds = _bounded(ctx, ar.get("kinds"), (*path, "kinds"), MAX_ROUTE_KINDS, "kinds")
    if kinds is None:
        return None
    for i, k in enumerate(kinds):
        kpath = (*path, "kinds", i)
        kd = fields(ctx, k, kpath, allowed=("group", "kind"), required=("kind",))
        if kd is None:
            ok = False
        elif kd.get("kind") == "HTTPRoute" and kd.get("group", GROUP) == GROUP:
            http_route = True
        else:
            others.append((kpath, str(kd.get("kind"))))
    # Beside HTTPRoute another kind is a note (the listener serves its
    # HTTPRoutes, as the API has a listener go on with the kinds it
    # supports); without HTTPRoute the listener would take no route
    for kpath, kind in others:
        if http_route:
            ctx.note(
                kpath,
                f"route kind {kind} is not served (l4proxy's gateway speaks HTTP/1.x and "
                "serves HTTPRoutes only); this listener's HTTPRoutes attach",
            )
        else:
            ctx.error(kpath, f"route kind {kind!r} {NOT_IMPLEMENTED} (HTTPRoute only)")
            ok = False
    all_ns = False
    if ar.get("namespaces") is not None:
        npath = (*path, "namespaces")
        ns = fields(
            ctx,
            ar["namespaces"],
            npath,
            allowed=("from",),
            unimplemented={"selector": "use from: Same or All"},
        )
        if ns is None:
            return None
        frm = ns.get("from", "Same")
        if frm == "Selector":
            ctx.error((*npath, "from"), f"from: Selector {NOT_IMPLEMENTED}; use Same or All")
            ok = False
        elif frm not in ("Same", "All"):
            ctx.error((*npath, "from"), f"from {frm!r} is not one of Same, All, Selector")
            ok = False
        all_ns = frm == "All"
    return all_ns if ok else None


def _hostname(ctx: Ctx, value: Any, path: Path) -> str | None:
    h = text(ctx, value, path, required=True)
    if h is None:
        return None
    h = h.lower()
    if not _HOSTNAME.fullmatch(h) or re.fullmatch(r"[0-9.]+", h):
        ctx.error(
            path,
            f"hostname {h!r} must be a DNS name, optionally starting with '*.' (no IP, no port)",
        )
        return None
    return h


# -- HTTPRoute -----------------------------------------------------------------


def read_http_route(ctx: Ctx, obj: dict[str, Any], env: Env) -> HttpRouteDraft | None:
    assert ctx.name is not None
    spec = fields(
        ctx,
        obj.get("spec"),
        ("spec",),
        allowed=("parentRefs", "hostnames", "rules"),
        required=("parentRefs",),
    )
    if spec is None:
        return None
    ok = True
    parents: list[ParentDraft] = []
    refs = _bounded(
        ctx, spec.get("parentRefs"), ("spec", "parentRefs"), MAX_PARENT_REFS, "references"
    )
    ok = refs is not None
    for i, p in enumerate(refs or []):
        got = _parent(ctx, p, ("spec", "parentRefs", i))
        if got is None:
            ok = False
        else:
            parents.append(got)
    distinct = _distinct_parents(ctx, parents)
    ok = distinct is not None and ok
    parents = distinct or []
    hostnames: list[str] = []
    names = _bounded(ctx, spec.get("hostnames"), ("spec", "hostnames"), MAX_HOSTNAMES, "hostnames")
    ok = ok and names is not None
    for i, h in enumerate(names or []):
        got_h = _hostname(ctx, h, ("spec", "hostnames", i))
        if got_h is None:
            ok = False
        elif got_h not in hostnames:
            hostnames.append(got_h)
    raw_rules = _bounded(ctx, spec.get("rules"), ("spec", "rules"), MAX_RULES, "rules")
    if raw_rules is None or not _route_matches(ctx, raw_rules):
        return None
    if spec.get("rules") == []:  # (an explicit empty list: the CRD's default is not applied)
        ctx.error(
            ("spec", "rules"),
            "spec.rules is empty; the API wants 1 rule at least (the CRD's minItems: an API "
            "server refuses the object); without rules (none given, or null) a route has the "
            "API's default, one rule that matches every request, to no backend (500)",
        )
        return None
    if not raw_rules:
        raw_rules = [{}]  # the API's default: one rule, every request, no backend (404 → 500)
    rules: list[HttpRuleDraft] = []
    named: dict[str, int] = {}  # a rule's name: its index
    for i, r in enumerate(raw_rules):
        name = _rule_name(ctx.name, r, i, len(raw_rules))
        given = r.get("name") if isinstance(r, dict) else None
        if isinstance(given, str) and given in named:
            # (the experimental CRD's rule; l4proxy names its routes, and
            # their metrics, by the rule's name)
            ctx.error(
                ("spec", "rules", i, "name"),
                f"rule name {given} is also spec.rules[{named[given]}]'s; a rule's name must "
                "be unique within the route (the API's rule)",
            )
            ok = False
        elif isinstance(given, str):
            named[given] = i
        got_r = _rule(ctx, r, ("spec", "rules", i), name, env)
        if got_r is None:
            ok = False
        else:
            rules.append(got_r)
    stamp_ok, created = creation_timestamp(ctx, obj)
    if not ok or not stamp_ok:
        return None
    return HttpRouteDraft(
        ctx.name, ctx.namespace, parents, hostnames, rules, Where(ctx, ()), created
    )


def _route_matches(ctx: Ctx, rules: list[Any]) -> bool:
    """Whether the route's rules hold at most 128 matches in all (the CRD's
    CEL rule on ``spec.rules``: "While 16 rules and 64 matches per rule are
    allowed, the total number of matches across all rules in a route must
    be less than 128"); an error at ``spec.rules`` if not. A rule's
    ``matches`` that is no list counts 0 here (its own error says it)."""
    total = sum(
        len(r["matches"])
        for r in rules
        if isinstance(r, dict) and isinstance(r.get("matches"), list)
    )
    if total <= MAX_ROUTE_MATCHES:
        return True
    ctx.error(
        ("spec", "rules"),
        f"spec.rules has {total} matches in all; the API allows {MAX_ROUTE_MATCHES} across a "
        f"route's rules (and {MAX_MATCHES} in one rule): split the route",
    )
    return False


def _distinct_parents(ctx: Ctx, parents: list[ParentDraft]) -> list[ParentDraft] | None:
    """*parents* less those that repeat one (a warning each), None after an
    error: parentRefs naming the same parent must tell themselves apart
    (the CRD's CEL rules, as its experimental channel has them with
    ``port``): each gives a sectionName, or none does, and likewise a port,
    and no two give the same ones. An error at the later ref if not
    (before, the route attached twice, each match doubled).

    The CEL rules compare the namespace as written: ``{name: gw}`` and
    ``{name: gw, namespace: <the route's>}`` are two parents to them, so an
    API server admits the pair, and so does l4proxy. The same parent all
    the same: where the two give the same sectionName and port, the later
    is a warning and dropped (it would attach the route twice); where they
    differ, both attach, as the API has them."""
    ok = True
    kept: list[ParentDraft] = []
    seen: dict[tuple[str, str | None, str], list[ParentDraft]] = defaultdict(list)
    resolved: dict[tuple[str, str, str, str | None, int | None], ParentDraft] = {}
    for p in parents:
        key = (p.kind, p.written_namespace, p.name)
        what = f"{p.kind} {p.namespace}/{p.name}"
        clash = False
        for o in seen[key]:
            if (o.section is None) != (p.section is None) or (o.port is None) != (p.port is None):
                why = (
                    "give each a sectionName (or each a port), or none: a reference without one "
                    "takes the whole parent"
                )
            elif (o.section, o.port) == (p.section, p.port):
                why = "give each its own sectionName or port, or keep one"
            else:
                continue
            ctx.error(
                p.where.path,
                f"{dotted(p.where.path)} names {what} as {dotted(o.where.path)} does; {why} "
                "(the API's rule for 2 or more references to the same parent)",
            )
            ok = False
            clash = True
            break
        seen[key].append(p)
        if clash:
            continue
        same = resolved.setdefault((p.kind, p.namespace, p.name, p.section, p.port), p)
        if same is not p:
            p.where.warning(
                f"{dotted(p.where.path)} is ignored: it names {what} as {dotted(same.where.path)} "
                "does (one with the namespace written, one without), which would attach the "
                "route twice"
            )
            continue
        kept.append(p)
    return kept if ok else None


def _rule_name(route: str, item: Any, index: int, count: int) -> str:
    """Like VirtualService routes: ``route/name``, ``route`` alone, else ``route[i]``."""
    if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
        return f"{route}/{item['name']}"
    return route if count == 1 else f"{route}[{index}]"


def _group_kind(ref: dict[str, Any], group: str, kind: str) -> tuple[str, str]:
    g = ref.get("group", group)
    return ("" if g in ("core", None) else str(g)), str(ref.get("kind", kind))


def _parent(ctx: Ctx, value: Any, path: Path) -> ParentDraft | None:
    p = fields(
        ctx,
        value,
        path,
        allowed=("group", "kind", "name", "namespace", "port", "sectionName"),
        required=("name",),
    )
    if p is None or p.get("name") is None:
        return None
    group, kind = _group_kind(p, GROUP, "Gateway")
    name = dns_subdomain(ctx, p["name"], (*path, "name"))
    ns = ctx.namespace
    if p.get("namespace") is not None:
        ns = dns_label(ctx, p["namespace"], (*path, "namespace")) or ns
    port = None
    if p.get("port") is not None:
        port = integer(ctx, p["port"], (*path, "port"), 1, 65535, what="port")
        if port is None:
            return None
    section = None
    if p.get("sectionName") is not None:
        section = dns_label(ctx, p["sectionName"], (*path, "sectionName"))
        if section is None:
            return None
    if (group, kind) == ("", "Service"):
        if section is not None:
            ctx.error(
                (*path, "sectionName"),
                f"sectionName on a Service parent {NOT_IMPLEMENTED}; use port",
            )
            return None
        resolved: Any = "Service"
    elif (group, kind) == (GROUP, "Gateway"):
        resolved = "Gateway"
    else:
        ctx.error(
            path,
            f"parentRef {kind} (group {group or 'core'!r}) is not supported: attach to a "
            'Gateway (gateway mode) or to a Service (group: "", kind: Service; mesh routing)',
        )
        return None
    if name is None:
        return None
    written = ns if p.get("namespace") is not None else None
    return ParentDraft(resolved, name, ns, port, section, Where(ctx, path), written)


def _rule(ctx: Ctx, value: Any, path: Path, name: str, env: Env) -> HttpRuleDraft | None:
    r = fields(
        ctx,
        value,
        path,
        allowed=(
            "name",
            "matches",
            "backendRefs",
            "filters",
            "timeouts",
            "retry",
            "sessionPersistence",
        ),
    )
    if r is None:
        return None
    ok = True
    if "name" in r:
        ok = dns_label(ctx, r["name"], (*path, "name")) is not None
    timeouts = _timeouts(ctx, r.get("timeouts"), (*path, "timeouts"))
    timeout = None if timeouts is None else timeouts[0]
    ok = ok and timeouts is not None
    retries: HttpRetry | None = None
    backend = timeouts[1] if timeouts is not None else 0.0
    if r.get("retry") is not None:
        retry_ok, retries = _retry(ctx, r["retry"], (*path, "retry"), backend)
        ok = ok and retry_ok
        if retry_ok and retries is None and backend:
            # Istio's converter makes it the per-try timeout of a retry
            # policy that attempts 0 disables: gone with it
            bpath = (*path, "timeouts", "backendRequest")
            ctx.warning(
                bpath,
                f"{dotted(bpath)} does nothing: retry.attempts 0 turns the retry policy off, "
                f"and the per-try timeout with it (as in Istio); timeouts.request is the "
                f"route's timeout",
            )
    elif backend:
        # no retry (absent, or null): the one try's timeout is the route's,
        # as Istio's converter makes it (backendRequest over request)
        timeout = backend
    filters = _filters(ctx, r.get("filters"), (*path, "filters"), env, backend=False)
    ok = ok and filters is not None
    matches: list[HttpMatchDraft] = []
    raw_matches = _bounded(ctx, r.get("matches"), (*path, "matches"), MAX_MATCHES, "matches")
    ok = ok and raw_matches is not None
    for i, m in enumerate(raw_matches or []):
        got = _match(ctx, m, (*path, "matches", i))
        if got is None:
            ok = False
        else:
            matches.append(got)
    backends: list[BackendDraft] = []
    refs = _bounded(
        ctx, r.get("backendRefs"), (*path, "backendRefs"), MAX_BACKEND_REFS, "references"
    )
    ok = ok and refs is not None
    for i, b in enumerate(refs or []):
        got_b = _backend(ctx, b, (*path, "backendRefs", i), env)
        if got_b is None:
            ok = False
        else:
            backends.append(got_b)
    if filters is not None and ok:
        ok = _check_rule_filters(ctx, path, r, filters, matches, backends)
    session = None
    if r.get("sessionPersistence") is not None:
        # (Envoy Gateway's name for a rule's session: its route's and index)
        default = f"httproute-{ctx.namespace}-{ctx.name}-rule-{path[-1]}"
        spath = (*path, "sessionPersistence")
        session = _session_persistence(ctx, r["sessionPersistence"], spath, default)
        ok = ok and session is not None
    if not ok or timeout is None or filters is None:
        return None
    return HttpRuleDraft(
        name,
        matches,
        backends,
        Where(ctx, path),
        timeout,
        retries,
        filters.headers,
        filters.rewrite,
        filters.redirect,
        list(filters.mirrors) if filters.redirect is None else [],
        filters.cors,
        session,
    )


_SESSION_TYPES = {"Cookie": SESSION_COOKIE, "Header": SESSION_HEADER}
_SESSION_FIELDS = ("sessionName", "absoluteTimeout", "idleTimeout", "type", "cookieConfig")
MAX_SESSION_NAME = 128  # bytes (the API's maxLength)


def _session_persistence(
    ctx: Ctx, value: Any, path: Path, default_name: str
) -> SessionPersistence | None:
    """A rule's ``sessionPersistence`` (GEP-1619) as Envoy Gateway applies
    it (verdict.SessionPersistence); None after an error.

    ``type`` Cookie (the default) or Header; ``sessionName`` (at most 128
    bytes; a cookie name, or a header name that the relay may write: not
    Host nor one that frames the message or is hop-by-hop) names the
    cookie or the header, by default Envoy Gateway's
    ``httproute-NAMESPACE-NAME-rule-INDEX``; a cookie's
    ``cookieConfig.lifetimeType`` Session (the default: no Max-Age) or
    Permanent, which needs ``absoluteTimeout`` (the API's rule) and makes
    its whole seconds the cookie's Max-Age. What Envoy Gateway ignores is
    a warning here: ``absoluteTimeout`` with a session cookie or a header,
    ``cookieConfig`` with a header. ``idleTimeout`` is refused, as Envoy
    Gateway refuses it: a token names its endpoint and nothing more, so
    no proxy knows when a session was last used."""
    sp = fields(ctx, value, path, allowed=_SESSION_FIELDS)
    if sp is None or any(k not in _SESSION_FIELDS for k in sp):
        return None
    ok = True
    kind = SESSION_COOKIE
    if sp.get("type") is not None:
        given = text(ctx, sp["type"], (*path, "type"), required=True)
        if given is not None and given not in _SESSION_TYPES:
            ctx.error(
                (*path, "type"),
                f"{dotted((*path, 'type'))} {given!r} is not one of Cookie, Header",
            )
            given = None
        if given is None:
            return None
        kind = _SESSION_TYPES[given]
    absolute: float | None = None
    if sp.get("absoluteTimeout") is not None:
        apath = (*path, "absoluteTimeout")
        absolute = duration(ctx, sp["absoluteTimeout"], apath, gateway_api=True)
        ok = ok and absolute is not None
    if sp.get("idleTimeout") is not None:
        ipath = (*path, "idleTimeout")
        if duration(ctx, sp["idleTimeout"], ipath, gateway_api=True) is not None:
            ctx.error(
                ipath,
                f"{dotted(ipath)} is not implemented by l4proxy (nor by Envoy Gateway): a "
                "session token names its endpoint and nothing more, so no proxy knows when the "
                "session was last used; remove it (a cookie with lifetimeType Permanent and an "
                "absoluteTimeout expires in the browser)",
            )
        ok = False
    name = default_name
    if sp.get("sessionName") is not None:
        npath = (*path, "sessionName")
        got = text(ctx, sp["sessionName"], npath, required=True)
        if got is None:
            return None
        if len(got.encode()) > MAX_SESSION_NAME:
            ctx.error(
                npath,
                f"{dotted(npath)} is {len(got.encode())} bytes long; the API allows "
                f"{MAX_SESSION_NAME}",
            )
            return None
        name = got
        if kind == SESSION_COOKIE:
            if not header_name(ctx, name, npath, what=dotted(npath), kind="a cookie name"):
                return None
        else:
            if not header_name(ctx, name, npath, what=dotted(npath)):
                return None
            if name.lower() == "set-cookie":
                ctx.warning(
                    npath,
                    f"{dotted(npath)} Set-Cookie: an answer that gives a token loses every "
                    "cookie the pod set (the token's line replaces that header's, as Envoy "
                    "sets it); name another header, or use type Cookie",
                )
            if name.lower() == "host" or name.lower() in FRAMING_HEADERS:
                ctx.error(
                    npath,
                    f"{dotted(npath)} {name!r} cannot carry the session token: the response "
                    "header would be one the proxy frames the message by, a hop-by-hop one "
                    "or Host; name another header",
                )
                return None
    lifetime = "Session"
    cpath = (*path, "cookieConfig")
    if sp.get("cookieConfig") is not None:
        cc = fields(ctx, sp["cookieConfig"], cpath, allowed=("lifetimeType",))
        if cc is None or any(k != "lifetimeType" for k in cc):
            return None
        if cc.get("lifetimeType") is not None:
            lpath = (*cpath, "lifetimeType")
            lifetime = text(ctx, cc["lifetimeType"], lpath, required=True) or ""
            if lifetime not in ("Permanent", "Session"):
                if lifetime:
                    ctx.error(
                        lpath, f"{dotted(lpath)} {lifetime!r} is not one of Permanent, Session"
                    )
                return None
            if lifetime == "Permanent" and sp.get("absoluteTimeout") is None:
                ctx.error(
                    lpath,
                    f"{dotted((*path, 'absoluteTimeout'))} is required when "
                    f"{dotted(lpath)} is Permanent (the API's rule: it is the cookie's "
                    "lifetime, its Max-Age)",
                )
                return None
        if kind == SESSION_HEADER:
            ctx.warning(
                cpath,
                f"{dotted(cpath)} does nothing with type Header (a header token is no "
                "cookie; Envoy Gateway ignores it too)",
            )
    if not ok:
        return None
    max_age: int | None = None
    if absolute is not None:
        apath = (*path, "absoluteTimeout")
        if kind == SESSION_HEADER:
            ctx.warning(
                apath,
                f"{dotted(apath)} does nothing with type Header: the token does not expire "
                "(as Envoy Gateway, which ignores it)",
            )
        elif lifetime != "Permanent":
            ctx.warning(
                apath,
                f"{dotted(apath)} does nothing with a session cookie (cookieConfig."
                "lifetimeType Session, the default): the cookie lasts until the browser "
                "ends its session (as Envoy Gateway, which sets Max-Age only for lifetimeType "
                "Permanent)",
            )
        elif absolute < 1:
            ctx.warning(
                apath,
                f"{dotted(apath)} is under a second: the cookie's Max-Age is whole seconds, "
                "so it is a session cookie (as Envoy makes it); say 1s or more",
            )
        else:
            max_age = int(absolute)  # whole seconds, as Envoy's Max-Age
    if kind == SESSION_HEADER:
        name = name.lower()
    return SessionPersistence(kind, name, "", max_age)


class _Filters(NamedTuple):
    """What a rule's (or a backendRef's) filters do."""

    headers: HeadEdits | None = None
    rewrite: UriRewrite | None = None
    redirect: Redirect | None = None
    prefix_at: Path | None = None  # where a ReplacePrefixMatch is (the API's rule on matches)
    # RequestMirror filters: each one's backend and share (ppm)
    mirrors: tuple[tuple[BackendDraft, int], ...] = ()
    cors: CorsPolicy | None = None  # the CORS filter's policy


def _filters(ctx: Ctx, value: Any, path: Path, env: Env, *, backend: bool) -> _Filters | None:
    """``filters``: RequestHeaderModifier, ResponseHeaderModifier,
    URLRewrite (hostname; path ReplaceFullPath or ReplacePrefixMatch) and
    RequestRedirect on a rule; the header modifiers on a backendRef (as
    Istio supports them). The API's rules: a type's own field and no other,
    each kind at most once, not both RequestRedirect and URLRewrite, at
    most 16. None after an error."""
    items = listing(ctx, value, path)
    if items is None:
        return None
    ok = True
    if len(items) > _MAX_FILTERS:
        ctx.error(path, f"{dotted(path)} has {len(items)} filters; the API allows 16")
        ok = False
    seen: dict[str, Path] = {}
    request: tuple[Any, ...] = ((), (), ())
    response: tuple[Any, ...] = ((), (), ())
    authority: str | None = None
    rewrite: UriRewrite | None = None
    redirect: Redirect | None = None
    prefix_at: Path | None = None
    mirrors: list[tuple[BackendDraft, int]] = []
    cors: CorsPolicy | None = None
    for i, item in enumerate(items):
        fpath = (*path, i)
        f = fields(ctx, item, fpath, allowed=("type", *_FILTER_FIELDS.values()), required=("type",))
        if f is None or f.get("type") is None:
            ok = False
            continue
        ftype = f["type"]
        if ftype not in _FILTER_FIELDS:
            ctx.error(
                (*fpath, "type"),
                f"filter type {ftype!r} is not one of {', '.join(_FILTER_FIELDS)}",
            )
            ok = False
            continue
        own = _FILTER_FIELDS[ftype]
        others = [k for k in f if k not in ("type", own)]
        if others:
            ctx.error((*fpath, others[0]), f"{others[0]} must not be given with type {ftype}")
            ok = False
            continue
        if ftype in _FILTER_REFUSED:
            ctx.error(fpath, f"filter {ftype} {NOT_IMPLEMENTED}; {_FILTER_REFUSED[ftype]}")
            ok = False
            continue
        if backend and ftype in ("RequestRedirect", "URLRewrite", "RequestMirror", "CORS"):
            ctx.error(
                fpath,
                f"filter {ftype} on a backendRef {NOT_IMPLEMENTED}; put it on the rule "
                "(Istio supports only the header modifiers on a backendRef)",
            )
            ok = False
            continue
        if f.get(own) is None:
            ctx.error(fpath, f"{dotted((*fpath, own))} is required for a {ftype} filter")
            ok = False
            continue
        sub = (*fpath, own)
        if ftype == "RequestMirror":  # (the one kind the API lets repeat)
            mirror = _request_mirror(ctx, f[own], sub, env)
            if mirror is None:
                ok = False
            elif mirror[1] > 0:
                mirrors.append(mirror)
            continue
        if ftype in seen:
            ctx.error(
                fpath,
                f"filter {ftype} is given twice (also {dotted(seen[ftype])}); the API "
                "allows one of each",
            )
            ok = False
            continue
        seen[ftype] = fpath
        if ftype in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            got = gateway_header_filter(ctx, f[own], sub)
            if got is None:
                ok = False
            elif ftype == "RequestHeaderModifier":
                request = got
            else:
                response = got
        elif ftype == "CORS":
            cors = gateway_cors(ctx, f[own], sub)
            ok = ok and cors is not None
        elif ftype == "URLRewrite":
            rw = _url_rewrite(ctx, f[own], sub)
            if rw is None:
                ok = False
            else:
                rewrite, authority, at = rw
                prefix_at = prefix_at or at
        else:
            rd = _request_redirect(ctx, f[own], sub)
            if rd is None:
                ok = False
            else:
                redirect, at = rd
                prefix_at = prefix_at or at
    if "RequestRedirect" in seen and "URLRewrite" in seen:
        ctx.error(
            seen["URLRewrite"],
            "a rule cannot have both a RequestRedirect and a URLRewrite filter (the API's rule)",
        )
        ok = False
    if ok and mirrors and redirect is not None:
        ctx.warning(
            seen["RequestRedirect"],
            "this rule's RequestMirror filters do nothing: its RequestRedirect answers "
            "every request, and no request goes to a backend to copy (Istio configures no "
            "mirror either)",
        )
    if not ok:
        return None
    headers = None
    if any((*request, *response)) or authority is not None:
        headers = HeadEdits(*request, *response)._replace(authority=authority)
    return _Filters(headers, rewrite, redirect, prefix_at, tuple(mirrors), cors)


def _request_mirror(ctx: Ctx, value: Any, path: Path, env: Env) -> tuple[BackendDraft, int] | None:
    """A RequestMirror filter's ``requestMirror``: (its backend, its share in
    parts per million). ``backendRef`` a Service and port, as a rule's
    backendRef (no weight, no filters: a BackendObjectReference);
    ``percent`` (0..100) or ``fraction`` (``numerator`` 0.., ``denominator``
    1.., 100 by default, numerator at most denominator), not both (the
    API's rules); neither: every request. The share of a fraction is
    ``numerator * 1,000,000 // denominator``; 0 mirrors nothing (Istio sets
    no mirror policy for it), a warning."""
    m = fields(
        ctx, value, path, allowed=("backendRef", "percent", "fraction"), required=("backendRef",)
    )
    if m is None or m.get("backendRef") is None:
        return None
    bpath = (*path, "backendRef")
    ref = fields(
        ctx, m["backendRef"], bpath, allowed=("group", "kind", "name", "namespace", "port")
    )
    if ref is None or any(k in ref for k in ("weight", "filters")):
        return None
    b = _backend(ctx, ref, bpath, env)
    ok = b is not None
    ppm: int | None = MIRROR_SCALE
    if m.get("percent") is not None and m.get("fraction") is not None:
        ctx.error(
            (*path, "fraction"),
            "only one of percent or fraction may be specified in a RequestMirror filter "
            "(the API's rule)",
        )
        return None
    if m.get("percent") is not None:
        pct = integer(ctx, m["percent"], (*path, "percent"), 0, 100, what="percent")
        ppm = None if pct is None else pct * (MIRROR_SCALE // 100)
    elif m.get("fraction") is not None:
        ppm = _fraction(ctx, m["fraction"], (*path, "fraction"))
    if not ok or ppm is None:
        return None
    assert b is not None
    if ppm == 0:
        at = next(((*path, k) for k in ("percent", "fraction") if m.get(k) is not None), path)
        ctx.warning(
            at,
            f"{dotted(path)} mirrors nothing: its share is 0% (Istio configures no mirror for it)",
        )
    return b, ppm


def _fraction(ctx: Ctx, value: Any, path: Path) -> int | None:
    """A Fraction (``numerator``, ``denominator`` 100 by default) as parts
    per million, rounded down; None after an error."""
    f = fields(ctx, value, path, allowed=("numerator", "denominator"), required=("numerator",))
    if f is None or f.get("numerator") is None:
        return None
    num = integer(ctx, f["numerator"], (*path, "numerator"), 0, 2**31 - 1, what="numerator")
    den: int | None = 100
    if f.get("denominator") is not None:
        den = integer(
            ctx, f["denominator"], (*path, "denominator"), 1, 2**31 - 1, what="denominator"
        )
    if num is None or den is None:
        return None
    if num > den:
        ctx.error(
            (*path, "numerator"),
            f"numerator {num} must be less than or equal to denominator {den} (the API's rule)",
        )
        return None
    return num * MIRROR_SCALE // den


def _path_modifier(ctx: Ctx, value: Any, path: Path) -> tuple[str, str] | None:
    """An HTTPPathModifier: (type, value)."""
    p = fields(
        ctx,
        value,
        path,
        allowed=("type", "replaceFullPath", "replacePrefixMatch"),
        required=("type",),
    )
    if p is None or p.get("type") is None:
        return None
    ptype = p["type"]
    field = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}
    if ptype not in field:
        ctx.error(
            (*path, "type"),
            f"path type {ptype!r} is not one of ReplaceFullPath, ReplacePrefixMatch",
        )
        return None
    other = [k for k in field.values() if k != field[ptype] and k in p]
    if other:
        ctx.error((*path, other[0]), f"{other[0]} must not be given with type {ptype}")
        return None
    if p.get(field[ptype]) is None:
        ctx.error(path, f"{dotted((*path, field[ptype]))} is required for type {ptype}")
        return None
    v = text(ctx, p[field[ptype]], (*path, field[ptype]))
    if v is None:
        return None
    if len(v) > 1024 or not re.fullmatch(r"[!-~]*", v) or "?" in v or "#" in v:
        ctx.error(
            (*path, field[ptype]),
            f"{dotted((*path, field[ptype]))} {v!r} must be a path: visible ASCII without "
            "spaces, '?' or '#', at most 1024 characters",
        )
        return None
    if v and not v.startswith("/"):
        ctx.error((*path, field[ptype]), f"{dotted((*path, field[ptype]))} must start with '/'")
        return None
    return ptype, v


def _precise_hostname(ctx: Ctx, value: Any, path: Path) -> str | None:
    h = text(ctx, value, path, required=True)
    if h is not None and (not _HOSTNAME.fullmatch(h) or h.startswith("*.")):
        ctx.error(path, f"{dotted(path)} {h!r} is not a hostname (lowercase, no wildcard)")
        return None
    return h


def _url_rewrite(
    ctx: Ctx, value: Any, path: Path
) -> tuple[UriRewrite | None, str | None, Path | None] | None:
    """URLRewrite: (the path rewrite, the Host, where a ReplacePrefixMatch is)."""
    u = fields(ctx, value, path, allowed=("hostname", "path"))
    if u is None:
        return None
    host = None
    if u.get("hostname") is not None:
        host = _precise_hostname(ctx, u["hostname"], (*path, "hostname"))
        if host is None:
            return None
    rewrite = None
    at = None
    if u.get("path") is not None:
        pm = _path_modifier(ctx, u["path"], (*path, "path"))
        if pm is None:
            return None
        if pm[0] == "ReplaceFullPath":
            rewrite = UriRewrite("full", pm[1] or "/")
        else:
            rewrite, at = UriRewrite("segments", pm[1]), (*path, "path")
    return rewrite, host, at


def _request_redirect(ctx: Ctx, value: Any, path: Path) -> tuple[Redirect, Path | None] | None:
    """RequestRedirect: scheme (http, https), hostname, path, port,
    statusCode (302 by default; 301, 302, 303, 307, 308), with the API's
    port rules (see :class:`Redirect`)."""
    r = fields(ctx, value, path, allowed=("scheme", "hostname", "path", "port", "statusCode"))
    if r is None:
        return None
    ok = True
    scheme = host = None
    if r.get("scheme") is not None:
        scheme = r["scheme"]
        if scheme not in ("http", "https"):
            ctx.error(
                (*path, "scheme"), f"{dotted((*path, 'scheme'))} {scheme!r} is not http or https"
            )
            ok = False
    if r.get("hostname") is not None:
        host = _precise_hostname(ctx, r["hostname"], (*path, "hostname"))
        ok = ok and host is not None
    port = None
    if r.get("port") is not None:
        port = integer(ctx, r["port"], (*path, "port"), 1, 65535, what="port")
        ok = ok and port is not None
    status = REDIRECT_STATUS
    if r.get("statusCode") is not None:
        code = integer(ctx, r["statusCode"], (*path, "statusCode"), 300, 399, what="statusCode")
        if code is not None and code not in REDIRECT_CODES:
            ctx.error(
                (*path, "statusCode"),
                f"statusCode {code} is not one of 301, 302, 303, 307, 308",
            )
            code = None
        ok = ok and code is not None
        status = code or status
    full = prefix = None
    at = None
    if r.get("path") is not None:
        pm = _path_modifier(ctx, r["path"], (*path, "path"))
        if pm is None:
            ok = False
        elif pm[0] == "ReplaceFullPath":
            full = pm[1] or "/"
        else:
            prefix, at = pm[1], (*path, "path")
    if not ok:
        return None
    return Redirect(status, scheme, host, port, False, full, prefix, gateway=True), at


def _check_rule_filters(
    ctx: Ctx,
    path: Path,
    r: dict[str, Any],
    filters: _Filters,
    matches: list[HttpMatchDraft],
    backends: list[BackendDraft],
) -> bool:
    """The API's rules between a rule's filters and its other fields."""
    if filters.redirect is not None and r.get("backendRefs"):
        ctx.error(
            (*path, "backendRefs"),
            "a rule with a RequestRedirect filter cannot have backendRefs (the API's rule: "
            "the redirect is its answer)",
        )
        return False
    # (no match, or PathPrefix /, leaves the uri None: the API's default)
    uri = matches[0].match.uri if len(matches) == 1 else None
    if (
        filters.prefix_at is not None
        and matches
        and (len(matches) != 1 or (uri is not None and uri.kind != "path_prefix"))
    ):
        ctx.error(
            filters.prefix_at,
            "ReplacePrefixMatch needs exactly one match, of type PathPrefix (the API's rule)",
        )
        return False
    return True


def _timeouts(ctx: Ctx, value: Any, path: Path) -> tuple[float, float] | None:
    """(``timeouts.request``, ``timeouts.backendRequest``) in seconds (0:
    none, also for "0s"); None: an error. backendRequest is the per-try
    timeout of the rule's retry, or the route's timeout without one (as
    Istio converts it)."""
    t = fields(ctx, value, path, allowed=("request", "backendRequest"))
    if t is None:
        return None
    request: float | None = 0.0
    if t.get("request") is not None:
        request = duration(ctx, t["request"], (*path, "request"), gateway_api=True)
    backend: float | None = 0.0
    if t.get("backendRequest") is not None:
        backend = duration(ctx, t["backendRequest"], (*path, "backendRequest"), gateway_api=True)
        if backend and request and backend > request:
            # the API: "MUST be <= the value of the Request timeout"
            ctx.error(
                (*path, "backendRequest"),
                f"{dotted((*path, 'backendRequest'))} {t['backendRequest']} must not be longer "
                f"than timeouts.request ({t['request']})",
            )
            return None
    if request is None or backend is None:
        return None
    return request, backend


# Istio's conversion of an HTTPRoute retry: connection failures always (the
# API: "SHOULD retry on connection errors"), then the codes given
_GATEWAY_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled")


def _retry(ctx: Ctx, value: Any, path: Path, per_try: float) -> tuple[bool, HttpRetry | None]:
    """A rule's ``retry`` (GEP-1731) as the route's retry policy, the way
    Istio makes it a VirtualService's retries: ``attempts`` (default 2, as
    Istio's; 0: no retries), ``codes`` (400..599) as retriable status codes
    beside connect failures; ``backoff`` (a GEP-2257 duration, at least
    1ms) the base interval of Envoy's jittered exponential backoff between
    tries, as Istio passes it on (Envoy's 25 ms without it);
    ``timeouts.backendRequest`` the per-try timeout. (valid, the policy or
    None)."""
    r = fields(ctx, value, path, allowed=("codes", "attempts", "backoff"))
    if r is None:
        return False, None
    ok = True
    attempts: int | None = 2
    if r.get("attempts") is not None:
        attempts = integer(ctx, r["attempts"], (*path, "attempts"), 0, 2**31 - 1)
    backoff: float | None = DEFAULT_RETRY_BACKOFF
    if r.get("backoff") is not None:
        backoff = duration(ctx, r["backoff"], (*path, "backoff"), gateway_api=True, zero=False)
    codes: list[int] = []
    for i, c in enumerate(listing(ctx, r.get("codes"), (*path, "codes")) or []):
        code = integer(ctx, c, (*path, "codes", i), 400, 599, what="status code")
        if code is None:
            ok = False
        elif code not in codes:
            codes.append(code)
    if attempts is None or backoff is None or not ok:
        return False, None
    if attempts == 0:
        return True, None
    on = (*_GATEWAY_RETRY_ON, "retriable-status-codes") if codes else _GATEWAY_RETRY_ON
    return True, HttpRetry(attempts, per_try, on, tuple(codes), backoff)


def _match(ctx: Ctx, value: Any, path: Path) -> HttpMatchDraft | None:
    m = fields(ctx, value, path, allowed=("path", "headers", "queryParams", "method"))
    if m is None:
        return None
    ok = True
    uri: StringMatch | None = None
    path_rank, path_len = 3, 1  # the default: PathPrefix /, after every other path
    if m.get("path") is not None:
        ppath = (*path, "path")
        p = fields(ctx, m["path"], ppath, allowed=("type", "value"))
        if p is None:
            return None
        ptype = p.get("type", "PathPrefix")
        pval = p.get("value", "/")
        if not isinstance(pval, str) or (ptype != "RegularExpression" and not pval.startswith("/")):
            ctx.error((*ppath, "value"), f"path value {pval!r} must be a string starting with '/'")
            return None
        if ptype in ("Exact", "PathPrefix") and not _path_value(ctx, pval, (*ppath, "value")):
            return None
        if ptype == "Exact":
            uri, path_rank, path_len = StringMatch("exact", pval), 0, len(pval)
        elif ptype == "PathPrefix":
            path_len = len(pval.rstrip("/")) or 1
            if pval.rstrip("/"):
                uri, path_rank = StringMatch("path_prefix", pval.rstrip("/")), 1
        elif ptype == "RegularExpression":
            try:
                uri = StringMatch("regex", pval, compile_regex(pval))
            except RegexError as exc:
                ctx.error((*ppath, "value"), f"regular expression {shown(pval)} is invalid: {exc}")
                return None
            path_rank, path_len = 2, len(pval)
        else:
            ctx.error(
                (*ppath, "type"),
                f"path type {ptype!r} is not one of Exact, PathPrefix, RegularExpression",
            )
            return None
    headers = _name_matches(ctx, m.get("headers"), (*path, "headers"), fold=True)
    query = _name_matches(ctx, m.get("queryParams"), (*path, "queryParams"), fold=False)
    method = None
    if m.get("method") is not None:
        meth = text(ctx, m["method"], (*path, "method"), required=True)
        if meth not in _METHODS:
            if meth is not None:
                ctx.error((*path, "method"), f"method {meth!r} is not one of {', '.join(_METHODS)}")
            ok = False
        else:
            method = StringMatch("exact", meth)
    if headers is None or query is None or not ok:
        return None
    match = Match(uri=uri, method=method, headers=headers, query=query)
    rank = (path_rank, -path_len, 0 if method else 1, -len(headers), -len(query))
    return HttpMatchDraft(match, rank, Where(ctx, path))


# The CRD's rules on an Exact or PathPrefix value (HTTPPathMatch's CEL
# validations, in the order the CRD lists them): what the API server
# refuses is refused here, at its line, where it was loaded silently
_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+")
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")
_PATH_ENDINGS = ("/..", "/.")
MAX_PATH = 1024  # (HTTPPathMatch.value's maxLength)


def _path_value(ctx: Ctx, value: str, path: Path) -> bool:
    """Whether an Exact or PathPrefix match's *value* is one the CRD
    admits (an error at *path* if not): at most 1024 characters, no
    ``//``, ``/./``, ``/../``, ``%2f``, ``%2F`` or ``#``, not ending in
    ``/..`` or ``/.``, and only a path's characters (RFC 3986's pchar and
    ``/``: no space, no ``?``, a ``%`` only before two hex digits)."""
    said = f"{dotted(path)} {value!r}"
    why = ""
    if len(value) > MAX_PATH:
        why = f"is {len(value)} characters long; the API allows {MAX_PATH}"
    elif bad := next((b for b in _PATH_FORBIDDEN if b in value), None):
        why = f"must not contain {bad!r}"
    elif end := next((e for e in _PATH_ENDINGS if value.endswith(e)), None):
        why = f"must not end with {end!r}"
    elif not _PATH_CHARS.fullmatch(value):
        why = (
            "must only contain a path's characters (letters, digits, -._~!$&'()*+,;=:@ and /, "
            "or % and two hex digits: no space, no '?')"
        )
    if why:
        ctx.error(path, f"{said} {why} (the API's validation of an Exact or PathPrefix path)")
        return False
    return True


def _name_matches(
    ctx: Ctx, value: Any, path: Path, *, fold: bool
) -> tuple[tuple[str, StringMatch], ...] | None:
    """headers / queryParams: ``[{type, name, value}]`` → sorted (name, match).

    As the CRD has them: at most 16, a name an HTTPHeaderName (a token), a
    value required (1 to 4096 characters for a header, 1024 for a query
    parameter), a name given once (the list's map key: an error). Header
    names ignore case, and the API says that of equivalent names only the
    first is matched and the others ignored: ``Foo`` after ``foo`` is a
    warning and ignored (it counts for no precedence either)."""
    out: dict[str, StringMatch] = {}
    given: dict[str, Path] = {}  # each name as written: where
    items = _bounded(ctx, value, path, MAX_NAME_MATCHES, "matches")
    ok = items is not None
    for i, item in enumerate(items or []):
        ipath = (*path, i)
        h = fields(ctx, item, ipath, allowed=("type", "name", "value"), required=("name",))
        if h is None or h.get("name") is None:
            ok = False
            continue
        name = text(ctx, h["name"], (*ipath, "name"), required=True)
        # (value: required, 1 to 4096 characters for a header, 1024 for a
        # query parameter, as the CRD has it)
        what = "header name" if fold else "query parameter name"
        if h.get("value") is None:
            # (a VirtualService's match may be {} for "there": the API's may not)
            kind = "header" if fold else "query parameter"
            ctx.error(
                (*ipath, "value"),
                f"{dotted((*ipath, 'value'))} is required: the API has no presence match (to "
                f"match a {kind} that is there, whatever its value: type: RegularExpression, "
                "value: '.*')",
            )
            ok = False
            continue
        val = text(ctx, h.get("value"), (*ipath, "value"), required=True)
        htype = h.get("type", "Exact")
        if name is None or val is None or not header_name(ctx, name, (*ipath, "name"), what):
            ok = False
            continue
        longest = MAX_HEADER_VALUE if fold else MAX_QUERY_VALUE
        if len(val) > longest:
            ctx.error(
                (*ipath, "value"),
                f"{dotted((*ipath, 'value'))} is {len(val)} characters long; the API allows "
                f"{longest}",
            )
            ok = False
            continue
        if fold and _BAD_HEADER_VALUE.search(val):
            ctx.error(
                (*ipath, "value"),
                f"{dotted((*ipath, 'value'))} {val!r} has a CR, LF or NUL, which no header "
                "may hold (no request would match it)",
            )
            ok = False
            continue
        key = name.lower() if fold else name
        if name in given:
            # (a list map keyed by name: an API server refuses the object)
            ctx.error(
                (*ipath, "name"),
                f"{name} is matched twice in {dotted(path)} (also {dotted(given[name])}); keep one",
            )
            ok = False
            continue
        given[name] = ipath
        if key in out:
            # "foo" and "Foo": the API admits both, and says the first is
            # matched and the others ignored (header names ignore case)
            first = next(at for n, at in given.items() if n.lower() == key and at != ipath)
            ctx.warning(
                ipath,
                f"{dotted(ipath)} is ignored: header {name} is already matched by "
                f"{dotted(first)} (names ignore case; the API matches the first)",
            )
            continue
        if htype == "Exact":
            out[key] = StringMatch("exact", val)
        elif htype == "RegularExpression":
            try:
                out[key] = StringMatch("regex", val, compile_regex(val))
            except RegexError as exc:
                ctx.error((*ipath, "value"), f"regular expression {shown(val)} is invalid: {exc}")
                ok = False
        else:
            ctx.error((*ipath, "type"), f"type {htype!r} is not one of Exact, RegularExpression")
            ok = False
    return tuple(sorted(out.items())) if ok else None


def _backend(ctx: Ctx, value: Any, path: Path, env: Env) -> BackendDraft | None:
    b = fields(
        ctx,
        value,
        path,
        allowed=("group", "kind", "name", "namespace", "port", "weight", "filters"),
        required=("name",),
    )
    if b is None or b.get("name") is None:
        return None
    filters = _filters(ctx, b.get("filters"), (*path, "filters"), env, backend=True)
    if filters is None:
        return None
    group, kind = _group_kind(b, "", "Service")
    if (group, kind) != ("", "Service"):
        ctx.error(
            path,
            f"backendRef {kind} (group {group or 'core'!r}) {NOT_IMPLEMENTED}; "
            "backends are Services",
        )
        return None
    name = dns_label(ctx, b["name"], (*path, "name"))
    namespace = ctx.namespace
    if b.get("namespace") is not None:
        got_ns = dns_label(ctx, b["namespace"], (*path, "namespace"))
        if got_ns is None:
            return None
        namespace = got_ns
    if b.get("port") is None:
        ctx.error(path, f"{dotted((*path, 'port'))} is required for a Service backend")
        return None
    port = integer(ctx, b["port"], (*path, "port"), 1, 65535, what="port")
    weight = 1
    if b.get("weight") is not None:
        w = integer(ctx, b["weight"], (*path, "weight"), 0, MAX_WEIGHT, what="weight")
        if w is None:
            return None
        weight = w
    if name is None or port is None:
        return None
    host = fqdn(name, namespace, env)
    crossing = None if namespace == ctx.namespace else (ctx.namespace, namespace)
    return BackendDraft(host, name, port, weight, Where(ctx, path), filters.headers, crossing)


def read_reference_grant(ctx: Ctx, obj: dict[str, Any]) -> GrantDraft | None:
    """A ReferenceGrant: ``spec.from`` (group, kind, namespace each) and
    ``spec.to`` (group, kind, optional name), one to sixteen of each, as
    the CRD has them."""
    assert ctx.name is not None
    spec = fields(ctx, obj.get("spec"), ("spec",), allowed=("from", "to"), required=("from", "to"))
    if spec is None:
        return None
    sources: list[tuple[str, str, str]] = []
    targets: list[tuple[str, str, str | None]] = []
    ok = True
    for key in ("from", "to"):
        path: Path = ("spec", key)
        items = listing(ctx, spec.get(key), path)
        if items is None:
            ok = False
            continue
        if len(items) > 16:  # (none: "required" said it)
            ctx.error(path, f"{dotted(path)} must have at most 16 entries, not {len(items)}")
            ok = False
        for i, item in enumerate(items):
            ipath = (*path, i)
            third = "namespace" if key == "from" else "name"
            e = fields(
                ctx,
                item,
                ipath,
                allowed=("group", "kind", third),
                required=("kind", "namespace") if key == "from" else ("kind",),
            )
            if e is None:
                ok = False
                continue
            # ("": the core group, which "required" would refuse as empty)
            group = text(ctx, e.get("group"), (*ipath, "group"), required=False)
            if e.get("group") is None:
                ctx.error(ipath, f'{dotted((*ipath, "group"))} is required ("" for Services)')
            kind = text(ctx, e.get("kind"), (*ipath, "kind"), required=True)
            if key == "from":
                ns = dns_label(ctx, e.get("namespace"), (*ipath, "namespace"))
                if group is None or kind is None or ns is None:
                    ok = False
                    continue
                sources.append((group, kind, ns))
            else:
                name = None
                if e.get("name") is not None:
                    name = dns_subdomain(ctx, e["name"], (*ipath, "name"))
                    ok = ok and name is not None
                if group is None or kind is None:
                    ok = False
                    continue
                targets.append((group, kind, name))
    if not ok:
        return None
    return GrantDraft(ctx.name, ctx.namespace, tuple(sources), tuple(targets), Where(ctx, ()))


# -- compiling -------------------------------------------------------------------


def gateway_host(gw: GatewayDraft | IstioGatewayDraft, listener: str, hostname: str | None) -> str:
    """The gateway service's host: ``gateway:NAMESPACE/NAME/LISTENER/HOSTNAME``
    (an Istio Gateway's: its server port's name for LISTENER)."""
    return f"{GATEWAY_HOST_PREFIX}{gw.namespace}/{gw.name}/{listener}/{hostname or '*'}"


def _subset_name(labels: Labels) -> str:
    return "-".join(labels[k] for k in sorted(labels)) if labels else DEFAULT


def _hostname_meet(listener: str | None, route: str) -> str | None:
    """The hostnames both accept (None: none)."""
    if listener is None or listener == route:
        return route
    if listener.startswith("*.") and route.endswith(listener[1:]):
        return route
    if route.startswith("*.") and listener.endswith(route[1:]):
        return listener
    return None


def _specificity(hostname: str | None) -> tuple[int, int]:
    """Exact names first, then wildcards by their suffix's length, then none."""
    if hostname is None:
        return (0, 0)
    if hostname.startswith("*."):
        return (1, len(hostname))
    return (2, len(hostname))


def _covers(wider: str | None, hostname: str | None) -> bool:
    """Whether every name *hostname* accepts, *wider* accepts too (and is
    less specific): none covers all; ``*.example.com`` covers any name
    under it, of one label or more (the Gateway API's wildcard)."""
    if wider == hostname or _specificity(wider) >= _specificity(hostname):
        return False
    if wider is None:
        return True
    if not wider.startswith("*.") or hostname is None:
        return False
    return hostname.endswith(wider[1:])


def _wider_hostnames(hostname: str | None) -> Iterator[str | None]:
    """The hostnames that may cover *hostname* (:func:`_covers`): the
    wildcard of each of its parent domains, then none (all names)."""
    if hostname is not None:
        start = hostname.find(".")
        while start != -1:
            yield "*" + hostname[start:]
            start = hostname.find(".", start + 1)
        yield None


def _percentages(weights: list[int]) -> list[int]:
    """Proportional weights as percentages when that is exact (1:1 → 50:50)."""
    total = sum(weights)
    if total and all(w * 100 % total == 0 for w in weights):
        return [w * 100 // total for w in weights]
    return weights


def _endpoint_owner(services: dict[str, Service], host: str) -> tuple[Service, Labels] | None:
    """A DNS ServiceEntry endpoint named *host*: its service and labels."""
    for svc in services.values():
        if svc.resolution != "DNS":
            continue
        for ep in svc.endpoints:
            if ep.address.lower().rstrip(".") == host:
                return svc, Labels(ep.labels)
    return None


def _check_shared_ports(gateways: list[GatewayDraft]) -> None:
    """Listeners of different Gateways on one port and hostname: an error.

    Every Gateway is served on the same local ports (``l4proxy run
    --listen``), so Gateways are merged onto one set of addresses, which the
    API allows only for compatible listeners: on one port, HTTP listeners
    with distinct hostnames (a request takes the most specific hostname's
    listener, whichever Gateway it is of). Two on the same port and
    hostname conflict, as in one Gateway, and the first one's routes
    silently took every request of the second."""
    first: dict[tuple[int, str | None], tuple[GatewayDraft, ListenerDraft]] = {}
    for gw in gateways:
        for lst in gw.listeners:
            other_gw, other = first.setdefault((lst.port, lst.hostname), (gw, lst))
            if other_gw is gw:
                continue  # one Gateway's own listeners are checked by read_gateway
            lst.where.error(
                f"listener {lst.name} serves port {lst.port} for hostname "
                f"{lst.hostname or '(any)'}, as listener {other.name} of Gateway "
                f"{other_gw.namespace}/{other_gw.name} ({other.where.location}) does; "
                "Gateways share the gateway's ports, so one port and hostname is one "
                "listener: give one a hostname of its own or another port, or attach "
                "the routes to one Gateway"
            )


def _age(hr: HttpRouteDraft) -> tuple[bool, float, str]:
    """The API's order of routes whose matches tie: the oldest by
    ``creationTimestamp`` first (:func:`~l4proxy.rules._objects.oldest_first`),
    then by ``namespace/name``."""
    return (*oldest_first(hr.created), f"{hr.namespace}/{hr.name}")


def _warn_shadowed(
    ranked: list[tuple[Any, Match, HttpRouteDraft, Where | None]],
    listener: tuple[GatewayDraft, ListenerDraft, str | None],
) -> None:
    """A match of one route identical to a match of another route ranked
    before it, on one listener and hostname (*ranked*: their matches in
    the order they are tried): a warning at the later one naming both, as
    no request ever reaches it there."""
    gw, lst, hostname = listener
    first: dict[Match, tuple[HttpRouteDraft, Where | None]] = {}
    for _, m, hr, where in ranked:
        earlier = first.setdefault(m, (hr, where))
        if earlier[0] is hr or where is None:
            continue
        other, at = earlier
        if other.created is not None and other.created != hr.created:
            why = "created earlier"
        else:
            why = "first by namespace/name" + (
                ", neither has a creationTimestamp" if hr.created is None else ""
            )
        where.warning(
            f"this match is the same as one of HTTPRoute {other.namespace}/{other.name}"
            + (f" ({at.location})" if at is not None else "")
            + f" on hostname {hostname or '*'} of listener {lst.name} of Gateway "
            f"{gw.namespace}/{gw.name}, which the API's order tries first ({why}): this one "
            "is never reached there"
        )


def _not_attached(
    hr: HttpRouteDraft,
    gw: GatewayDraft,
    listeners: list[ListenerDraft],
    admitting: list[ListenerDraft],
) -> str:
    """Why *hr* attaches to none of *listeners* of *gw* (those its
    parentRef names), *admitting* the ones that admit its namespace: the
    namespace (NotAllowedByListeners), then the hostnames
    (NoMatchingListenerHostname), both where both fail. A warning, never
    an error: a Gateway changed to admit fewer routes must revoke them,
    where an error would keep the last good rules, and the access with
    them."""
    why: list[str] = []
    if not admitting:
        # (each of them is from: Same, the default, as All admits any)
        whose = "its listener's" if len(listeners) == 1 else "its listeners'"
        why.append(
            f"routes from namespace {hr.namespace} are not allowed ({whose} allowedRoutes."
            f"namespaces.from is Same, namespace {gw.namespace} alone: set allowedRoutes."
            "namespaces.from: All to admit them; NotAllowedByListeners)"
        )
    pool = admitting or listeners
    if hr.hostnames and all(
        _hostname_meet(lst.hostname, h) is None for lst in pool for h in hr.hostnames
    ):
        whose = (
            "the listeners'"
            if len(pool) == len(listeners)
            else f"those of the listeners that admit namespace {hr.namespace}"
        )
        why.append(f"its hostnames match none of {whose} hostnames (NoMatchingListenerHostname)")
    return (
        f"this HTTPRoute attaches to no listener of Gateway {gw.name}: {', and '.join(why)}; "
        "it is not served there, as if it were not in these files"
    )


def _warn_unattached(hr: HttpRouteDraft, index: int, message: str) -> None:
    """A warning of reason UNATTACHED at parentRef *index* of *hr*, which
    it names (``Diagnostic.parent_ref``): a program that asks which
    parentRef attaches to nothing is told exactly, where its line may be
    that of several (a flow sequence). (``hr.parents`` is the whole of
    ``spec.parentRefs``: a route with one not read is not compiled.)"""
    where = hr.parents[index].where
    where.ctx.report.add(
        Diagnostic(
            file=where.ctx.file,
            line=where.ctx.line_of(where.path),
            kind=where.ctx.kind,
            name=where.ctx.name,
            message=message,
            severity="warning",
            reason=UNATTACHED,
            parent_ref=RouteParentRef(hr.namespace, hr.name, index),
        )
    )


@contextlib.contextmanager
def _once_attached(hr: HttpRouteDraft) -> Iterator[None]:
    """The findings made within (of the backends of *hr*, a route whose
    every parentRef attaches to nothing, each warned of already) as
    warnings that say they hold once the route attaches; one that is an
    error says that it then refuses the rules. None is an error now, as
    nothing of the route is served: an error would refuse the rules for
    it, and a Gateway deleted together with its routes' Services would
    keep the last good rules, and the route, served. (Nor is one of reason
    UNRESOLVED: no request is sent to the backend of a route not served.)"""
    report = hr.where.ctx.report
    mark = len(report.diagnostics)
    yield
    report.diagnostics[mark:] = [
        dataclasses.replace(
            d,
            severity="warning",
            reason=None if d.reason == UNRESOLVED else d.reason,
            message=(
                "once this HTTPRoute attaches, an error that refuses the rules: "
                if d.severity == "error"
                else "once this HTTPRoute attaches: "
            )
            + d.message,
        )
        for d in report.diagnostics[mark:]
    ]


class Compiler:
    """HTTPRoutes and Gateways → routes per host, gateway services, ingress paths."""

    def __init__(
        self,
        services: dict[str, Service],
        policies: dict[str, PolicyDraft],
        routed_elsewhere: dict[str, Where],
        env: Env,
        grants: Iterable[GrantDraft] = (),
        budget: RouteBudget | None = None,
    ) -> None:
        self.budget = budget if budget is not None else RouteBudget()
        self.env = env
        self.services = services
        self.policies = policies
        self.routed_elsewhere = routed_elsewhere
        self.grants = tuple(grants)
        self.routes: dict[str, list[Route]] = {}
        self.gateway_services: list[Service] = []
        self.ingress: list[IngressPath] = []

    def compile(self, routes: Iterable[HttpRouteDraft], gateways: Iterable[GatewayDraft]) -> None:
        gateways = list(gateways)
        _check_shared_ports(gateways)
        by_gateway = {(g.namespace, g.name): g for g in gateways}
        # parent key → [(sort key, rule's route name, match or None, destinations)]
        entries: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        gateway_keys: dict[str, tuple[GatewayDraft, ListenerDraft, str | None]] = {}
        mirrors: dict[int, tuple[MirrorPolicy, ...]] = {}  # id(rule) → its route's
        # gateway key → [(sort key, match, its route, its line)]
        shadows: dict[str, list[tuple[Any, Match, HttpRouteDraft, Where | None]]]
        shadows = defaultdict(list)
        for hr in sorted(routes, key=_age):
            # (its parents first: where it attaches to nothing, that is
            # said before anything of its backends)
            keys, unattached = self._parent_keys(hr, by_gateway, gateway_keys)
            nowhere = bool(unattached) and len(unattached) == len(hr.parents)
            with _once_attached(hr) if nowhere else contextlib.nullcontext():
                dests = [self._destinations(rule) for rule in hr.rules]
                for i, rule in enumerate(hr.rules):
                    got = self._mirrors(rule)
                    if got is None:
                        dests[i] = None
                    else:
                        mirrors[id(rule)] = got
            each = sum(
                len(rule.matches) or 1
                for rule, rd in zip(hr.rules, dests, strict=True)
                if rd is not None
            )
            if keys and not self.budget.take(
                len(keys) * each,
                hr.where,
                f"its {each:,} rules' matches at {len(keys):,} parents and hostnames",
            ):
                continue
            for key, port, consumer in keys:
                for ri, (rule, rd) in enumerate(zip(hr.rules, dests, strict=True)):
                    if rd is None:
                        continue
                    ms = rule.matches or [HttpMatchDraft(Match(), (3, -1, 1, 0, 0), rule.where)]
                    for mi, md in enumerate(ms):
                        m = md.match
                        if port is not None:
                            m = Match(
                                uri=m.uri,
                                method=m.method,
                                headers=m.headers,
                                query=m.query,
                                port=port,
                            )
                        # this namespace's consumer routes before the
                        # Service's producer routes (GAMMA)
                        sort = (not consumer, md.rank, _age(hr), ri, mi)
                        entries[key].append((sort, (id(hr), ri), rule.name, m, rd, rule))
                        shadows[key].append((sort, m, hr, md.where))
        for items in entries.values():
            items.sort(key=lambda e: e[0])
        for key in gateway_keys:
            _warn_shadowed(sorted(shadows[key], key=lambda e: e[0]), gateway_keys[key])
        # Routes of a listener compete across hostnames: a request for
        # a.example.com that no a.example.com rule matches goes on to the
        # *.example.com rules, then to those without a hostname (the
        # Gateway API's precedence: the hostname first, then the match).
        # Each gateway service gets the rules of the hostnames that cover
        # its own after them, most specific first.
        # (the keys of each listener by hostname: a hostname's wider ones
        # are looked up, its parent domains' wildcards and none, where
        # comparing every pair of a listener's hostnames was a reload
        # thread's minutes for an HTTPRoute of 20,000 of them)
        by_listener: dict[tuple[int, int], dict[str | None, list[str]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for key, (gw, lst, hostname) in gateway_keys.items():
            by_listener[(id(gw), id(lst))][hostname].append(key)
        folded: dict[str, list[tuple[Any, ...]]] = {}
        for key, (gw, lst, hostname) in gateway_keys.items():
            if self.budget.spent:
                break
            named = by_listener[(id(gw), id(lst))]
            wider = sorted(
                (
                    (_specificity(other_h), other)
                    for other_h in _wider_hostnames(hostname)
                    if other_h in named and _covers(other_h, hostname)
                    for other in named[other_h]
                    if other != key
                ),
                reverse=True,
            )
            if not self.budget.take(
                sum(len(entries.get(other, ())) for _, other in wider),
                gw.where,
                f"the routes of wider hostnames that {key} takes after its own",
            ):
                break
            folded[key] = [
                *entries.get(key, []),
                *(e for _, other in wider for e in entries.get(other, [])),
            ]
        for key, items in {**entries, **folded}.items():
            compiled: list[Route] = []
            # a rule's matches in a row are one route of them all (every
            # request where one of them is Match()), made once: a route
            # replaced at each match was a rule of 40,000 matches' 6 s
            start = 0
            while start < len(items):
                _, rule_id, name, _, rd, rule = items[start]
                end = start
                while end < len(items) and items[end][1] == rule_id:
                    end += 1
                taken = tuple(e[3] for e in items[start:end])
                compiled.append(
                    Route(
                        name,
                        tuple(rd),
                        () if Match() in taken else taken,
                        unresolved_status=UNRESOLVED_STATUS,
                        timeout=rule.timeout,
                        retries=rule.retries,
                        headers=rule.headers,
                        rewrite=rule.rewrite,
                        redirect=rule.redirect,
                        mirrors=mirrors.get(id(rule), ()),
                        cors=rule.cors,
                        session=rule.session,
                    )
                )
                start = end
            self.routes[key] = compiled
        for key, (gw, lst, hostname) in gateway_keys.items():
            if key not in self.routes:
                continue
            self.gateway_services.append(
                Service(key, (ServicePort(lst.port, lst.name, "HTTP"),), role="gateway")
            )
            self.ingress.append(
                IngressPath(
                    f"{gw.namespace}/{gw.name}/{lst.name}",
                    hostname,
                    "/",
                    "Prefix",
                    key,
                    lst.port,
                    listener_port=lst.port,
                )
            )

    def _parent_keys(
        self,
        hr: HttpRouteDraft,
        by_gateway: dict[tuple[str, str], GatewayDraft],
        gateway_keys: dict[str, tuple[GatewayDraft, ListenerDraft, str | None]],
    ) -> tuple[list[tuple[str, int | None, bool]], list[int]]:
        """Where *hr*'s rules go, per parent: (host, port match or None,
        whether it is a consumer route: one from another namespace than its
        Service's, kept only for this sidecar's own namespace); and the
        indexes of its parentRefs that attach to nothing (each warned of,
        reason UNATTACHED)."""
        out: list[tuple[str, int | None, bool]] = []  # (host, port, a consumer route)
        unattached: list[int] = []
        for index, p in enumerate(hr.parents):
            if p.kind == "Service":
                if hr.namespace not in (p.namespace, self.env.namespace):
                    # A consumer route (GAMMA): it routes only the clients of
                    # its own namespace, and this sidecar's pod is not there.
                    continue
                host = fqdn(p.name, p.namespace, self.env)
                other = self.routed_elsewhere.get(host)
                if other is not None:
                    p.where.error(
                        f"host {host} is already routed by {other.ctx.kind} {other.ctx.name} "
                        f"({other.location}); route one host with one API"
                    )
                    continue
                if host not in self.services:
                    p.where.warning(
                        f"{host} has no ServiceEntry in these files; this HTTPRoute applies "
                        "once one is loaded"
                    )
                consumer = hr.namespace != p.namespace
                if (host, p.port, consumer) not in out:
                    out.append((host, p.port, consumer))
                continue
            gw = by_gateway.get((p.namespace, p.name))
            if gw is None:
                known = ", ".join(f"{ns}/{n}" for ns, n in sorted(by_gateway)) or "none"
                unattached.append(index)
                _warn_unattached(
                    hr,
                    index,
                    f"unknown parent: no Gateway {p.namespace}/{p.name} in these files "
                    f"(Gateways: {known}); this HTTPRoute is not served through it until one "
                    "is loaded",
                )
                continue
            listeners = [
                lst
                for lst in gw.listeners
                if (p.section is None or lst.name == p.section)
                and (p.port is None or lst.port == p.port)
            ]
            if not listeners:
                unattached.append(index)
                _warn_unattached(
                    hr,
                    index,
                    f"Gateway {gw.name} has no listener"
                    + (f" named {p.section}" if p.section else "")
                    + (f" on port {p.port}" if p.port else "")
                    + f" (listeners: {', '.join(f'{x.name}:{x.port}' for x in gw.listeners)}); "
                    "this HTTPRoute is not served through it (NoMatchingParent)",
                )
                continue
            # the API's order: the listeners that admit the route's
            # namespace, then of those the ones a hostname of it meets
            admitting = [
                lst for lst in listeners if hr.namespace == gw.namespace or lst.all_namespaces
            ]
            attached = False
            for lst in admitting:
                names: list[str | None]
                if hr.hostnames:
                    met = [_hostname_meet(lst.hostname, h) for h in hr.hostnames]
                    names = list(dict.fromkeys(h for h in met if h is not None))
                else:
                    names = [lst.hostname]
                for hostname in names:
                    key = gateway_host(gw, lst.name, hostname)
                    gateway_keys[key] = (gw, lst, hostname)
                    out.append((key, None, False))
                    attached = True
            if not attached:
                unattached.append(index)
                _warn_unattached(hr, index, _not_attached(hr, gw, listeners, admitting))
        return out, unattached

    def _destinations(self, rule: HttpRuleDraft) -> list[Destination] | None:
        if rule.redirect is not None:
            return []  # (it answers itself: no backendRefs, the API's rule)
        weighted = [b for b in rule.backends if b.weight > 0]
        if not weighted:
            rule.where.warning(
                "no backendRef with a weight above 0: every request this rule matches is "
                f"answered {UNRESOLVED_STATUS}"
            )
            return []
        out: list[Destination] = []
        unresolved: list[BackendDraft] = []
        refused: list[tuple[BackendDraft, str]] = []
        ok = True
        total = sum(b.weight for b in weighted)
        for b, w in zip(weighted, _percentages([b.weight for b in weighted]), strict=True):
            why = self._not_permitted(b)
            if why:
                refused.append((b, why))
                out.append(Destination(b.host, Subset(DEFAULT), w, b.port, b.headers, why))
                continue
            dest = self._resolve(b, w)
            if isinstance(dest, Destination):
                out.append(dest)
            elif dest is None:
                unresolved.append(b)
                out.append(Destination(b.host, Subset(DEFAULT), w, b.port, b.headers))
            else:
                ok = False
        if not ok:
            return None
        if unresolved and not refused and len(unresolved) == len(weighted):
            for b in unresolved:
                b.where.error(
                    f"backendRef {b.name} resolves to nothing: no ServiceEntry host and no DNS "
                    f"endpoint of a ServiceEntry is named {b.host} (add one to the registry)"
                )
            return None
        # (a reference not permitted is never a load error, even for a rule
        # with no other backend: deleting a ReferenceGrant must revoke it,
        # where an error would keep the last good rules, the grant's too)
        for b, why in refused:
            b.where.warning(
                f"backendRef {b.name}: {why}; its share ({b.weight} of {total}) is answered "
                f"{UNRESOLVED_STATUS} until one does"
            )
        for b in unresolved:
            b.where.warning(
                f"backendRef {b.name} resolves to nothing in these files (no ServiceEntry "
                f"host or DNS endpoint named {b.host}); its share ({b.weight} of {total}) is "
                f"answered {UNRESOLVED_STATUS} until one is loaded",
                UNRESOLVED,
            )
        return out

    def _mirrors(self, rule: HttpRuleDraft) -> tuple[MirrorPolicy, ...] | None:
        """The rule's RequestMirror filters, each backend resolved as a
        backendRef is (one that resolves to nothing in the files: a
        warning, and its copies are dropped until a ServiceEntry names
        it); None after an error."""
        out: list[MirrorPolicy] = []
        for b, ppm in rule.mirrors:
            why = self._not_permitted(b)
            if why:
                b.where.warning(f"mirror backendRef {b.name}: {why}; nothing is mirrored to it")
                out.append(
                    MirrorPolicy(
                        Destination(b.host, Subset(DEFAULT), 100, b.port, refused=why), ppm
                    )
                )
                continue
            dest = self._resolve(b, 100)
            if dest is False:
                return None
            if not isinstance(dest, Destination):
                b.where.warning(
                    f"mirror backendRef {b.name} resolves to nothing in these files (no "
                    f"ServiceEntry host or DNS endpoint named {b.host}); nothing is mirrored "
                    "to it until one is loaded"
                )
                dest = Destination(b.host, Subset(DEFAULT), 100, b.port)
            out.append(MirrorPolicy(dest, ppm))
        return tuple(out)

    def _not_permitted(self, b: BackendDraft) -> str:
        """Why *b*, a Service in another namespace than its route's, may not
        be referred to ("" it may): no ReferenceGrant in the Service's
        namespace permits HTTPRoutes of the route's namespace to refer to
        that Service (the API's rule; the grant is the owner's consent)."""
        if b.crossing is None:
            return ""
        route_ns, ns = b.crossing
        source = (GROUP, "HTTPRoute", route_ns)
        if any(
            g.namespace == ns and g.permits(source, ("", "Service", b.name)) for g in self.grants
        ):
            return ""
        return (
            f"Service {ns}/{b.name} is in another namespace, and no ReferenceGrant in {ns} "
            f"permits HTTPRoutes of {route_ns} to refer to it (RefNotPermitted)"
        )

    def _resolve(self, b: BackendDraft, weight: int) -> Destination | bool | None:
        """A Destination; None when unresolved; False after an error."""
        svc = self.services.get(b.host)
        policy = self.policies.get(b.host)
        if svc is not None:
            if svc.port(b.port) is None:
                ports = ", ".join(str(p.number) for p in svc.ports)
                b.where.error(f"port {b.port} is not a port of {b.host} (ports: {ports})")
                return False
            subset = policy_subset(policy, None, DEFAULT, Labels())
            return Destination(b.host, subset, weight, b.port, b.headers)
        owner = _endpoint_owner(self.services, b.host)
        if owner is None:
            return None
        svc, labels = owner
        others = sorted(
            {
                e.address
                for e in svc.endpoints
                if labels.selects(e.labels) and e.address.lower().rstrip(".") != b.host
            }
        )
        if others:
            b.where.error(
                f"backendRef {b.name} is a DNS endpoint of {svc.host}, but its labels "
                f"({labels}) also select {', '.join(others)}; give each version's endpoint "
                "its own labels"
            )
            return False
        if svc.port(b.port) is None:
            ports = ", ".join(str(p.number) for p in svc.ports)
            b.where.error(
                f"port {b.port} is not a port of {svc.host}, whose DNS endpoint {b.host} "
                f"is this backend (ports: {ports})"
            )
            return False
        policy = self.policies.get(svc.host)
        same = None
        if policy is not None:
            same = next((s for s in policy.subsets.values() if s.labels == labels), None)
        if same is not None:
            subset = policy_subset(policy, same, same.name, same.labels)
        else:
            subset = policy_subset(policy, None, _subset_name(labels), labels)
        return Destination(svc.host, subset, weight, b.port, b.headers)
