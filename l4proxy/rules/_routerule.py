"""RouteRule (config.istio.io/v1alpha2), as Istio 0.7 accepted it.

A RouteRule compiles to one route of its destination host. The loader orders
a host's rules by precedence, higher first; rules of equal precedence are
ordered by (namespace, name) ascending, which is what Istio 0.7 did by config
key and is deterministic whatever the file order. ``httpReqTimeout``,
``httpReqRetries`` and ``httpFault`` are the route's timeout, retry policy
and fault injection, as Istio 0.7's pilot configured Envoy with them
(``httpFault``: see ``_fault``). ``mirror`` (an IstioService: ``name``,
``namespace``, ``domain`` and ``labels``, the version to copy to) is the
route's mirror of every request, as Istio 0.7's pilot made Envoy's
``shadow`` of it (no share: v1alpha2 has none); its labels select
endpoints as a ``route[]`` entry's do. ``corsPolicy`` is the route's CORS
policy (``_cors``: ``allowOrigin`` exact origins).
"""

from __future__ import annotations

from typing import Any

from l4proxy.dataplane.verdict import MIRROR_SCALE
from l4proxy.rules._cors import istio_cors
from l4proxy.rules._fault import route_rule_fault
from l4proxy.rules._objects import (
    DestinationDraft,
    Env,
    RouteDraft,
    RuleDraft,
    weights,
)
from l4proxy.rules._schema import (
    Ctx,
    Where,
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
)
from l4proxy.rules._yaml import Path
from l4proxy.rules.routing import DEFAULT_RETRY_BACKOFF, HttpRetry, Labels, Match, StringMatch

KIND = "RouteRule"
API_VERSIONS = ("config.istio.io/v1alpha2",)

_SPEC_UNIMPLEMENTED = (
    "redirect",
    "rewrite",
    "websocketUpgrade",
    "l4Fault",
    "appendHeaders",
)
_BY_LABELS = "match the caller by its labels (match.source.labels)"
# Keys of match.request.headers that are request attributes, not headers.
_SPECIAL = ("uri", "scheme", "method", "authority")


def read_route_rule(ctx: Ctx, obj: dict[str, Any], env: Env) -> RuleDraft | None:
    assert ctx.name is not None
    raw = obj.get("spec")
    if isinstance(raw, dict) and "route" in raw and "redirect" in raw:
        ctx.error(("spec", "redirect"), "rule cannot contain both route and redirect")
        raw = {k: v for k, v in raw.items() if k != "redirect"}
    spec = fields(
        ctx,
        raw,
        ("spec",),
        allowed=(
            "destination",
            "precedence",
            "match",
            "route",
            "httpReqTimeout",
            "httpReqRetries",
            "httpFault",
            "mirror",
            "corsPolicy",
        ),
        unimplemented=_SPEC_UNIMPLEMENTED,
        required=("destination",),
    )
    if spec is None:
        return None
    host = _destination(ctx, spec.get("destination"), ("spec", "destination"), env, rule=True)
    precedence = 0
    if "precedence" in spec:
        p = integer(ctx, spec["precedence"], ("spec", "precedence"), -(2**31), 2**31 - 1)
        precedence = p if p is not None else 0
    matches = _match(ctx, spec.get("match"), ("spec", "match"))
    dests = _route(ctx, spec.get("route"), ("spec", "route"), host, env)
    timeout: float | None = 0.0
    if spec.get("httpReqTimeout") is not None:
        timeout = _timeout(ctx, spec["httpReqTimeout"], ("spec", "httpReqTimeout"))
    retries_ok, retries = True, None
    if spec.get("httpReqRetries") is not None:
        retries_ok, retries = _retries(
            ctx, spec["httpReqRetries"], ("spec", "httpReqRetries"), timeout or 0.0
        )
    fault_ok, fault = True, None
    if spec.get("httpFault") is not None:
        fault_ok, fault = route_rule_fault(ctx, spec["httpFault"], ("spec", "httpFault"))
    mirror_ok, mirrors = True, []
    if spec.get("mirror") is not None:
        mirror = _mirror(ctx, spec["mirror"], ("spec", "mirror"), env)
        mirror_ok = mirror is not None
        mirrors = [(mirror, MIRROR_SCALE)] if mirror is not None else []
    cors_ok, cors = True, None
    if spec.get("corsPolicy") is not None:
        cors_ok, cors = istio_cors(ctx, spec["corsPolicy"], ("spec", "corsPolicy"), route_rule=True)
    if (
        not cors_ok
        or host is None
        or matches is None
        or dests is None
        or timeout is None
        or not retries_ok
        or not fault_ok
        or not mirror_ok
    ):
        return None
    route = RouteDraft(
        ctx.name, "http", matches, dests, timeout, retries, fault=fault, mirrors=mirrors, cors=cors
    )
    return RuleDraft(KIND, ctx.name, ctx.namespace, [host], [route], Where(ctx, ()), precedence)


def _timeout(ctx: Ctx, value: Any, path: Path) -> float | None:
    """httpReqTimeout.simpleTimeout.timeout → the route's timeout in seconds.

    Istio 0.7 required the duration and refused one under 1ms ("0s" too);
    a rule without httpReqTimeout has no timeout here (Envoy's default then
    was 15 s).
    """
    if isinstance(value, str):  # the v1alpha3 spelling, timeout: 5s
        ctx.error(
            path,
            f"{dotted(path)} must be a mapping: httpReqTimeout: "
            f"{{simpleTimeout: {{timeout: {value}}}}}",
        )
        return None
    t = fields(
        ctx,
        value,
        path,
        allowed=("simpleTimeout",),
        unimplemented={"custom": "use simpleTimeout"},
    )
    spath = (*path, "simpleTimeout")
    if t is None or "custom" in t:
        return None
    if t.get("simpleTimeout") is None:
        ctx.error(path, f"{dotted(spath)} is required (simpleTimeout: {{timeout: 10s}})")
        return None
    s = fields(
        ctx,
        t["simpleTimeout"],
        spath,
        allowed=("timeout",),
        unimplemented={
            "overrideHeaderName": "the timeout comes from the rule, never from a request header"
        },
        required=("timeout",),
    )
    if s is None or s.get("timeout") is None:
        return None
    return duration(ctx, s["timeout"], (*spath, "timeout"), zero=False)


# Envoy's retry_on for every RouteRule retry policy (Istio 0.7's pilot,
# buildHTTPRoute: "the safest retry policies as per envoy docs")
RULE_RETRY_ON = ("5xx", "connect-failure", "refused-stream")


def _retries(ctx: Ctx, value: Any, path: Path, timeout: float) -> tuple[bool, HttpRetry | None]:
    """httpReqRetries.simpleRetry → the route's retry policy: (valid, the
    policy); None when there is none.

    As Istio 0.7: ``attempts`` at least 0 (0 or absent: no policy at all,
    its per-try timeout with it), ``perTryTimeout`` required (its
    validation refused a missing duration) and at least 1ms; the policy is
    Envoy's ``5xx,connect-failure,refused-stream`` (no status code beside
    it), retried after Envoy's default backoff. Pilot ignored
    ``overrideHeaderName`` (the attempts from a request header): refused
    here, as ``custom`` is.
    """
    if isinstance(value, str):
        ctx.error(
            path,
            f"{dotted(path)} must be a mapping: httpReqRetries: "
            "{simpleRetry: {attempts: 3, perTryTimeout: 2s}}",
        )
        return False, None
    r = fields(
        ctx,
        value,
        path,
        allowed=("simpleRetry",),
        unimplemented={"custom": "use simpleRetry"},
    )
    spath = (*path, "simpleRetry")
    if r is None or "custom" in r:
        return False, None
    if r.get("simpleRetry") is None:
        ctx.error(
            path, f"{dotted(spath)} is required (simpleRetry: {{attempts: 3, perTryTimeout: 2s}})"
        )
        return False, None
    allowed = ("attempts", "perTryTimeout")
    s = fields(
        ctx,
        r["simpleRetry"],
        spath,
        allowed=allowed,
        unimplemented={
            "overrideHeaderName": "the attempts come from the rule, never from a request header"
        },
        required=("perTryTimeout",),
    )
    if s is None:
        return False, None
    ok = all(k in allowed for k in s) and s.get("perTryTimeout") is not None
    attempts: int | None = 0
    if s.get("attempts") is not None:
        attempts = integer(ctx, s["attempts"], (*spath, "attempts"), 0, 2**31 - 1)
    per_try: float | None = 0.0
    if s.get("perTryTimeout") is not None:
        ppath = (*spath, "perTryTimeout")
        per_try = duration(ctx, s["perTryTimeout"], ppath, zero=False)
        if per_try is not None and timeout and per_try > timeout:
            ctx.warning(
                ppath,
                f"{dotted(ppath)} {s['perTryTimeout']} is longer than the rule's "
                f"httpReqTimeout ({timeout:g}s), which bounds every try together",
            )
    if attempts is None or per_try is None or not ok:
        return False, None
    if attempts == 0:
        return True, None  # (pilot made a retry policy only for attempts > 0)
    return True, HttpRetry(attempts, per_try, RULE_RETRY_ON, (), DEFAULT_RETRY_BACKOFF)


def _destination(ctx: Ctx, value: Any, path: Path, env: Env, *, rule: bool) -> str | None:
    """An IstioService reference → FQDN host."""
    if not value:
        if not rule:  # spec.destination's emptiness is reported by its required check
            ctx.error(path, f"{dotted(path)} must not be empty (name the service)")
        return None
    d = fields(
        ctx,
        value,
        path,
        allowed=("name", "namespace", "domain", "labels"),
        unimplemented={"service": "name the service with name (and namespace, domain)"},
        required=("name",),
    )
    if d is None or not d.get("name"):
        return None
    name = dns_label(ctx, d["name"], (*path, "name"))
    ns = ctx.namespace
    if d.get("namespace") is not None:
        ns = dns_label(ctx, d["namespace"], (*path, "namespace")) or ns
    domain = env.domain
    if d.get("domain") is not None:
        domain = text(ctx, d["domain"], (*path, "domain"), required=True) or domain
    if d.get("labels"):
        if rule:
            ctx.error(
                (*path, "labels"),
                "route rule destination labels must be empty (select versions with route[].labels)",
            )
        else:
            ctx.error(
                (*path, "labels"),
                f"{dotted((*path, 'labels'))} is not supported here; "
                "put the labels on the route entry",
            )
        return None
    if name is None:
        return None
    return f"{name}.{ns}.svc.{domain.lower().rstrip('.')}"


def _mirror(ctx: Ctx, value: Any, path: Path, env: Env) -> DestinationDraft | None:
    """``spec.mirror``: an IstioService whose ``labels`` pick the version
    that gets the copies (none: every endpoint of the service)."""
    if isinstance(value, dict) and "labels" in value:
        sel = labels(ctx, value["labels"], (*path, "labels"))
        value = {k: v for k, v in value.items() if k != "labels"}
    else:
        sel = Labels()
    host = _destination(ctx, value, path, env, rule=False)
    if host is None or sel is None:
        return None
    return DestinationDraft(host, 100, None, None, sel, Where(ctx, path))


def _match(ctx: Ctx, value: Any, path: Path) -> tuple[Match, ...] | None:
    """The rule's single match block (conditions ANDed); none = catch-all."""
    if value is None:
        return ()
    m = fields(
        ctx,
        value,
        path,
        allowed=("source", "request"),
        unimplemented=("tcp", "udp"),
    )
    if m is None:
        return None
    ok = True
    source = Labels()
    if m.get("source") is not None:
        spath = (*path, "source")
        s = fields(
            ctx,
            m["source"],
            spath,
            allowed=("labels",),
            unimplemented={k: _BY_LABELS for k in ("name", "namespace", "domain", "service")},
        )
        got = labels(ctx, s.get("labels"), (*spath, "labels")) if s is not None else None
        if got is None:
            ok = False
        else:
            source = got
    attrs: dict[str, StringMatch] = {}
    headers: list[tuple[str, StringMatch]] = []
    if m.get("request") is not None:
        rpath = (*path, "request")
        r = fields(ctx, m["request"], rpath, allowed=("headers",))
        hdrs = r.get("headers") if r is not None else None
        hpath = (*rpath, "headers")
        if r is None:
            ok = False
        elif hdrs is not None and not isinstance(hdrs, dict):
            ctx.error(hpath, f"{dotted(hpath)} must be a mapping of header name: match")
            ok = False
        else:
            for hname, hval in (hdrs or {}).items():
                sub = (*hpath, hname)
                if not isinstance(hname, str) or not hname:
                    ctx.error(sub, f"header name {hname!r} must be a non-empty string")
                    ok = False
                    continue
                if hname != hname.lower():
                    ctx.error(sub, f"header name {hname} must be in lower case")
                    ok = False
                    continue
                if not header_name(ctx, hname, sub):
                    ok = False
                    continue
                sm = string_match(ctx, hval, sub, bare_ok=True)
                if sm is None:
                    ok = False
                elif hname in _SPECIAL:
                    attrs[hname] = sm
                else:
                    headers.append((hname, sm))
    if not ok:
        return None
    block = Match(
        uri=attrs.get("uri"),
        scheme=attrs.get("scheme"),
        method=attrs.get("method"),
        authority=attrs.get("authority"),
        headers=tuple(sorted(headers, key=lambda h: h[0])),
        source_labels=source,
    )
    return () if block == Match() else (block,)


def _route(
    ctx: Ctx, value: Any, path: Path, host: str | None, env: Env
) -> list[DestinationDraft] | None:
    """route[]: weighted label selections; omitted = the whole service."""
    entries = listing(ctx, value, path)
    if entries is None:
        return None
    if not entries:
        if host is None:
            return None
        return [DestinationDraft(host, 100, None, None, Labels(), Where(ctx, path))]
    drafts: list[tuple[str | None, Labels | None, Path]] = []
    raw_weights: list[tuple[Any, Path]] = []
    ok = True
    for i, entry in enumerate(entries):
        epath = (*path, i)
        e = fields(ctx, entry, epath, allowed=("labels", "weight", "destination"))
        if e is None:
            ok = False
            continue
        sel = labels(ctx, e.get("labels"), (*epath, "labels"))
        target = host
        if e.get("destination") is not None:
            target = _destination(ctx, e["destination"], (*epath, "destination"), env, rule=False)
            if target is None:
                ok = False
        drafts.append((target, sel, epath))
        raw_weights.append((e.get("weight"), (*epath, "weight")))
    if not ok:
        return None
    ws = weights(ctx, raw_weights, path)
    if ws is None:
        return None
    out = []
    for (target, sel, epath), w in zip(drafts, ws, strict=True):
        if target is None or sel is None:
            return None
        out.append(DestinationDraft(target, w, None, None, sel, Where(ctx, epath)))
    return out
