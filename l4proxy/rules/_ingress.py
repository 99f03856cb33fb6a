"""Ingress (extensions/v1beta1, networking.k8s.io/v1beta1 and v1) for gateway mode.

Path semantics:

* v1beta1 without ``pathType`` follows Istio 0.7: a path is exact unless it
  ends in ``.*``, which makes the rest a plain string prefix (``/bootcamp``
  matches only ``/bootcamp``; ``/bootcamp.*`` matches ``/bootcamp2`` too).
  No path means every path. A path ending in ``/*`` (the GKE idiom) is, as
  Istio converts it (``createFallbackStringMatch``), the string prefix before
  it: ``/*`` matches every path, ``/api/*`` is the prefix ``/api`` (``/api``,
  ``/api/users``, ``/apiary`` too); a note says so.
* ``pathType: Exact`` and ``Prefix`` follow Kubernetes (``Prefix`` compares
  whole path elements: ``/a`` matches ``/a/b`` but not ``/ab``);
  ``ImplementationSpecific`` means the Istio rule above.

Every Ingress in the rule files is served whatever its class (annotation or
``ingressClassName``): the rule file is the gateway's whole configuration.
A backend whose service has no ServiceEntry is a warning, not an error: the
path answers 503 until a ServiceEntry for it is loaded (Envoy's answer to
a route whose cluster it does not have; a path no rule has is 404).
"""

from __future__ import annotations

import re
from typing import Any

from l4proxy.rules._objects import Env, IngressDraft, fqdn
from l4proxy.rules._schema import (
    Ctx,
    Where,
    dns_label,
    dotted,
    fields,
    integer,
    listing,
    text,
)
from l4proxy.rules._yaml import Path
from l4proxy.rules.routing import IngressPath, PathType

API_VERSIONS = ("extensions/v1beta1", "networking.k8s.io/v1beta1", "networking.k8s.io/v1")
_PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")


def read_ingress(
    ctx: Ctx, obj: dict[str, Any], env: Env, api_version: str
) -> list[IngressDraft] | None:
    v1 = api_version == "networking.k8s.io/v1"
    default_key = "defaultBackend" if v1 else "backend"
    spec = fields(
        ctx,
        obj.get("spec"),
        ("spec",),
        allowed=("rules", default_key, "ingressClassName"),
        unimplemented=("tls",),
    )
    if spec is None:
        return None
    out: list[IngressDraft] = []
    ok = True
    if spec.get(default_key) is not None:
        bpath: Path = ("spec", default_key)
        target = _backend(ctx, spec[default_key], bpath, env, v1)
        if target is None:
            ok = False
        else:
            service, port = target
            out.append(
                IngressDraft(
                    IngressPath(_name(ctx), None, "", "Default", service, port), Where(ctx, bpath)
                )
            )
    for i, rule in enumerate(listing(ctx, spec.get("rules"), ("spec", "rules")) or []):
        rpath = ("spec", "rules", i)
        r = fields(ctx, rule, rpath, allowed=("host", "http"), required=("http",))
        if r is None or r.get("http") is None:
            ok = False
            continue
        host = None
        if r.get("host") is not None:
            host = text(ctx, r["host"], (*rpath, "host"), required=True)
            if host is None:
                ok = False
                continue
            host = host.lower().rstrip(".")
            if not _INGRESS_HOST.fullmatch(host):
                # Kubernetes refuses these: a port or an IP never matches a Host
                hint = f" (no port: {host.split(':', 1)[0]!r})" if ":" in host else ""
                ctx.error((*rpath, "host"), f"host {host!r} must be a DNS name{hint}")
                ok = False
                continue
        hpath = (*rpath, "http")
        h = fields(ctx, r["http"], hpath, allowed=("paths",), required=("paths",))
        for j, item in enumerate(
            listing(ctx, None if h is None else h.get("paths"), (*hpath, "paths")) or []
        ):
            ppath = (*hpath, "paths", j)
            got = _path(ctx, item, ppath, env, v1, host)
            if got is None:
                ok = False
            else:
                out.append(IngressDraft(got, Where(ctx, ppath)))
        if h is None:
            ok = False
    return out if ok else None


def _name(ctx: Ctx) -> str:
    return f"{ctx.namespace}/{ctx.name}"


_INGRESS_HOST = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _path(
    ctx: Ctx, value: Any, path: Path, env: Env, v1: bool, host: str | None
) -> IngressPath | None:
    p = fields(
        ctx,
        value,
        path,
        allowed=("path", "pathType", "backend"),
        required=("backend", "pathType") if v1 else ("backend",),
    )
    if p is None or p.get("backend") is None:
        return None
    raw = "/"
    if p.get("path") is not None:
        raw = text(ctx, p["path"], (*path, "path"), required=True) or ""
        if not raw.startswith("/"):
            ctx.error((*path, "path"), f"path {raw!r} must start with '/'")
            return None
    ptype = "ImplementationSpecific"
    if p.get("pathType") is not None:
        given = text(ctx, p["pathType"], (*path, "pathType"), required=True)
        if given not in _PATH_TYPES:
            ctx.error(
                (*path, "pathType"), f"pathType {given!r} is not one of {', '.join(_PATH_TYPES)}"
            )
            return None
        ptype = given
    elif v1:
        return None  # reported as required
    kind: PathType
    if ptype == "Exact":
        kind = "Exact"
    elif ptype == "Prefix":
        kind = "Prefix"
    elif p.get("path") is None:
        kind = "StringPrefix"  # no path: every path
    elif raw.endswith(".*"):
        kind, raw = "StringPrefix", raw[:-2]
    elif raw.endswith("/*"):
        # Istio's createFallbackStringMatch: "/*" is every path, "/api/*"
        # the string prefix "/api". It was an exact path nothing requests.
        kind, given, raw = "StringPrefix", raw, raw[:-2]
        ctx.note(
            (*path, "path"),
            f"path {given!r} ({ptype if p.get('pathType') else 'no pathType'}) is read as "
            "Istio reads it: "
            + (
                "every path"
                if not raw
                else f"the string prefix {raw!r}, which {raw}x matches too (pathType: Prefix "
                f"with path {raw} matches whole path elements only)"
            ),
        )
    else:
        kind = "Exact"
    target = _backend(ctx, p["backend"], (*path, "backend"), env, v1)
    if target is None:
        return None
    service, port = target
    return IngressPath(_name(ctx), host, raw, kind, service, port)


def _backend(ctx: Ctx, value: Any, path: Path, env: Env, v1: bool) -> tuple[str, int | str] | None:
    """→ (service FQDN, port number or name)."""
    if v1:
        b = fields(
            ctx,
            value,
            path,
            allowed=("service",),
            unimplemented=("resource",),
            required=("service",),
        )
        if b is None or b.get("service") is None:
            return None
        spath = (*path, "service")
        s = fields(ctx, b["service"], spath, allowed=("name", "port"), required=("name", "port"))
        if s is None or s.get("name") is None or s.get("port") is None:
            return None
        name = dns_label(ctx, s["name"], (*spath, "name"))
        ppath = (*spath, "port")
        pp = fields(ctx, s["port"], ppath, allowed=("number", "name"))
        if pp is None:
            return None
        if ("number" in pp) == ("name" in pp):
            ctx.error(ppath, f"{dotted(ppath)} needs exactly one of number, name")
            return None
        port: int | str | None
        if "number" in pp:
            port = integer(ctx, pp["number"], (*ppath, "number"), 1, 65535, what="port")
        else:
            port = text(ctx, pp["name"], (*ppath, "name"), required=True)
    else:
        b = fields(
            ctx,
            value,
            path,
            allowed=("serviceName", "servicePort"),
            unimplemented=("resource",),
            required=("serviceName", "servicePort"),
        )
        if b is None or b.get("serviceName") is None or b.get("servicePort") is None:
            return None
        name = dns_label(ctx, b["serviceName"], (*path, "serviceName"))
        sp = b["servicePort"]
        ppath = (*path, "servicePort")
        if isinstance(sp, str) and not (sp.isascii() and sp.isdigit()):
            port = sp
        else:
            port = integer(
                ctx, int(sp) if isinstance(sp, str) else sp, ppath, 1, 65535, what="servicePort"
            )
    if name is None or port is None:
        return None
    return fqdn(name, ctx.namespace, env), port
