"""Reading CORS policies: a VirtualService's ``http[].corsPolicy`` and an
HTTPRoute rule's ``CORS`` filter.

Both become a :class:`~l4proxy.rules.routing.CorsPolicy`, what Envoy's CORS
filter does with the route's policy as Istio's pilot translates it
(``TranslateCORSPolicy`` in ``pilot/pkg/networking/core/route/route.go``;
the Gateway API's filter through ``createCorsFilter`` in its gateway
conversion).

The VirtualService's ``CorsPolicy`` (Istio's validation, ``validateCORSPolicy``):

* ``allowOrigins``: StringMatches (``exact``, ``prefix``, ``regex``; none
  empty; Istio's StringMatch has no ``suffix``). The deprecated
  ``allowOrigin`` (strings, each an exact match) is read only when
  ``allowOrigins`` is absent, pilot's order (a warning, and another when
  both are given). An Origin is allowed when a match takes it
  or takes ``*`` (Envoy's ``isOriginAllowed``): ``exact: "*"`` and a regex
  such as ``.*`` allow every Origin.
* ``allowMethods``: GET, HEAD, POST, PUT, PATCH, DELETE, CONNECT, OPTIONS,
  TRACE (Istio's supportedMethods: no ``*``, which only the Gateway API's
  filter takes); ``allowHeaders`` and ``exposeHeaders``: any non-empty
  text (Istio's ``ValidateHTTPHeaderName`` checks only that), so
  ``"Content-Type, Authorization"`` is one entry; none may hold a CR, LF or
  NUL, which no header value can. Each list is joined with ``,``, as pilot
  joins it.
* ``maxAge``: a duration of at least 1ms (Istio's ``ValidateDuration``:
  ``0s`` is refused) in whole seconds ("accurate only to seconds
  precision", Istio's error otherwise), sent as its seconds.
* ``allowCredentials``: ``access-control-allow-credentials: true`` when
  true; nothing when false or absent.
* ``unmatchedPreflights``: ``FORWARD`` (and ``UNSPECIFIED``, the default)
  sends a preflight from an Origin not allowed upstream untouched;
  ``IGNORE`` answers it 200 without ``access-control-allow-origin`` (Envoy's
  ``forward_not_matching_preflights: false``).

A RouteRule's ``corsPolicy`` (Istio 0.7) has the same fields but
``allowOrigins`` and ``unmatchedPreflights``: its ``allowOrigin`` strings
are exact matches, and so Envoy took them (``*`` every Origin); its
``maxAge`` is sent as whole seconds (Istio 0.7's pilot sent the Duration's
text, a bug later fixed to seconds).

The Gateway API's ``HTTPCORSFilter``: ``allowOrigins`` (at most 64; ``*``
alone, or ``http``/``https`` origins ``scheme://host[:port]`` whose host may
hold ``*``, a greedy match to its left across labels; a missing port is the
scheme's default, as the API says), ``allowCredentials``, ``allowMethods``
(at most 9: the nine methods or ``*`` alone), ``allowHeaders`` and
``exposeHeaders`` (at most 64 header names, or ``*``), ``maxAge`` (whole
seconds, at least 1; 5 when absent, the CRD's default). Istio makes each
origin an exact match (its wildcards a TODO, kubernetes-sigs/gateway-api
#3648); l4proxy matches them as the API describes.
"""

from __future__ import annotations

import re
from typing import Any

from l4proxy.rules._regex import re2_compile
from l4proxy.rules._schema import (
    Ctx,
    boolean,
    dotted,
    duration,
    fields,
    header_name,
    integer,
    listing,
    string_match,
    text,
)
from l4proxy.rules._yaml import Path
from l4proxy.rules.routing import CorsPolicy, StringMatch

__all__ = ["CORS_METHODS", "gateway_cors", "istio_cors"]

# Istio's supportedMethods (Go's net/http method names), the Gateway API's
# HTTPMethod enum: the same nine
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")
_UNMATCHED = ("UNSPECIFIED", "FORWARD", "IGNORE")
_ISTIO_FIELDS = (
    "allowOrigins",
    "allowOrigin",
    "allowMethods",
    "allowHeaders",
    "exposeHeaders",
    "maxAge",
    "allowCredentials",
    "unmatchedPreflights",
)
# a RouteRule's CorsPolicy (config.istio.io/v1alpha2)
_ROUTE_RULE_FIELDS = (
    "allowOrigin",
    "allowMethods",
    "allowHeaders",
    "exposeHeaders",
    "maxAge",
    "allowCredentials",
)
_GATEWAY_FIELDS = (
    "allowOrigins",
    "allowCredentials",
    "allowMethods",
    "allowHeaders",
    "exposeHeaders",
    "maxAge",
)
GATEWAY_DEFAULT_MAX_AGE = 5  # seconds: HTTPCORSFilter.maxAge's +kubebuilder:default
_GATEWAY_MAX_ORIGINS = _GATEWAY_MAX_HEADERS = 64
_MAX_ORIGIN = 253  # (CORSOrigin's maxLength)
_MAX_AGE_S = 2**31 - 1  # (int32, the Gateway API's type)
# <scheme>://<host>(:<port>), the host a name (``*`` allowed) or [IPv6]
_ORIGIN = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[^/:?#\[\]@\s]+)(?::([0-9]{1,5}))?")
_DEFAULT_PORT = {"http": "80", "https": "443"}
_BAD_VALUE = re.compile(r"[\r\n\0]")


def istio_cors(
    ctx: Ctx, value: Any, path: Path, *, route_rule: bool = False
) -> tuple[bool, CorsPolicy | None]:
    """``http[].corsPolicy`` as Istio validates and translates it: (ok,
    policy). With *route_rule*, a RouteRule's ``corsPolicy`` (Istio 0.7):
    ``allowOrigin`` its one origin list (no deprecation then), no
    ``allowOrigins`` nor ``unmatchedPreflights``."""
    allowed = _ROUTE_RULE_FIELDS if route_rule else _ISTIO_FIELDS
    c = fields(ctx, value, path, allowed=allowed)
    if c is None:
        return False, None
    ok = True
    origins: list[StringMatch] = []
    if c.get("allowOrigins") is not None:
        for i, item in enumerate(listing(ctx, c["allowOrigins"], (*path, "allowOrigins")) or []):
            ipath = (*path, "allowOrigins", i)
            m = string_match(
                ctx,
                item,
                ipath,
                bare_ok=False,
                suffix="is not a field of Istio's StringMatch (exact, prefix, regex), which "
                "the Kubernetes API server refuses",
            )
            if m is None:
                ok = False
            elif m.value == "":
                ctx.error(ipath, f"{dotted(ipath)} must not be empty (Istio's validation)")
                ok = False
            else:
                origins.append(m)
        if c.get("allowOrigin") is not None:
            ctx.warning(
                (*path, "allowOrigin"),
                f"{dotted((*path, 'allowOrigin'))} is ignored: allowOrigins is given, which "
                "Istio reads first",
            )
    elif c.get("allowOrigin") is not None:
        apath = (*path, "allowOrigin")
        items = listing(ctx, c["allowOrigin"], apath)
        ok = ok and items is not None
        for i, item in enumerate(items or []):
            s = text(ctx, item, (*apath, i))
            if s is None:
                ok = False
            else:
                origins.append(StringMatch("exact", s))
        if not route_rule:
            ctx.warning(
                apath,
                f"{dotted(apath)} is deprecated; use allowOrigins: [{{exact: ...}}] (read as "
                "exact matches, as Istio reads it)",
            )
    methods = _names(ctx, c.get("allowMethods"), (*path, "allowMethods"), methods=True, star=False)
    allow = _names(ctx, c.get("allowHeaders"), (*path, "allowHeaders"), methods=False, token=False)
    expose = _names(
        ctx, c.get("exposeHeaders"), (*path, "exposeHeaders"), methods=False, token=False
    )
    max_age = ""
    if c.get("maxAge") is not None:
        mpath = (*path, "maxAge")
        seconds = duration(ctx, c["maxAge"], mpath, zero=False)  # (at least 1ms: Istio's)
        if seconds is None:
            ok = False
        elif seconds != int(seconds):
            ctx.error(
                mpath,
                f"{dotted(mpath)} {c['maxAge']!r}: max_age duration is accurate only to "
                "seconds precision (Istio's validation); write whole seconds",
            )
            ok = False
        else:
            max_age = str(int(seconds))
    credentials = boolean(ctx, c.get("allowCredentials"), (*path, "allowCredentials"))
    forward = True
    if c.get("unmatchedPreflights") is not None:
        upath = (*path, "unmatchedPreflights")
        u = c["unmatchedPreflights"]
        if u not in _UNMATCHED:
            ctx.error(upath, f"{dotted(upath)} must be one of {', '.join(_UNMATCHED)}, not {u!r}")
            ok = False
        forward = u != "IGNORE"
    if methods is None or allow is None or expose is None or credentials is None or not ok:
        return False, None
    if not origins:
        ctx.warning(
            path,
            f"{dotted(path)} allows no origin (no allowOrigins): no preflight is answered "
            "and no response gets CORS headers",
        )
    return True, CorsPolicy(
        tuple(origins),
        ",".join(methods),
        ",".join(allow),
        ",".join(expose),
        max_age,
        credentials,
        forward,
    )


def gateway_cors(ctx: Ctx, value: Any, path: Path) -> CorsPolicy | None:
    """An HTTPRoute rule's ``cors`` (HTTPCORSFilter), as the API validates it."""
    c = fields(ctx, value, path, allowed=_GATEWAY_FIELDS)
    if c is None:
        return None
    ok = True
    origins: list[StringMatch] = []
    opath = (*path, "allowOrigins")
    items = listing(ctx, c.get("allowOrigins"), opath)
    if items is None:
        ok = False
    elif len(items) > _GATEWAY_MAX_ORIGINS:
        ctx.error(opath, f"{dotted(opath)} has {len(items)} origins; the API allows 64")
        ok = False
    elif "*" in items and len(items) > 1:
        ctx.error(opath, "AllowOrigins cannot contain '*' alongside other origins (the API's rule)")
        ok = False
    for i, item in enumerate(items or []):
        m = _gateway_origin(ctx, item, (*opath, i))
        if m is None:
            ok = False
        else:
            origins.append(m)
    methods = _names(ctx, c.get("allowMethods"), (*path, "allowMethods"), methods=True, limit=9)
    if methods and "*" in methods and len(methods) > 1:
        ctx.error(
            (*path, "allowMethods"),
            "AllowMethods cannot contain '*' alongside other methods (the API's rule)",
        )
        ok = False
    allow = _names(ctx, c.get("allowHeaders"), (*path, "allowHeaders"), methods=False, limit=64)
    expose = _names(ctx, c.get("exposeHeaders"), (*path, "exposeHeaders"), methods=False, limit=64)
    max_age: int | None = GATEWAY_DEFAULT_MAX_AGE
    if c.get("maxAge") is not None:
        max_age = integer(ctx, c["maxAge"], (*path, "maxAge"), 1, _MAX_AGE_S)
    credentials = boolean(ctx, c.get("allowCredentials"), (*path, "allowCredentials"))
    if (
        not ok
        or methods is None
        or allow is None
        or expose is None
        or max_age is None
        or credentials is None
    ):
        return None
    return CorsPolicy(
        tuple(origins),
        ",".join(methods),
        ",".join(allow),
        ",".join(expose),
        str(max_age),
        credentials,
    )


def _gateway_origin(ctx: Ctx, value: Any, path: Path) -> StringMatch | None:
    """A CORSOrigin as a match of the Origin header: ``*`` every Origin
    (``exact: "*"``, as Istio converts it), else its scheme, its host (a
    ``*`` in it any run of characters but ``/`` and ``:``) and its port
    (the scheme's default when absent, which a browser leaves out)."""
    s = text(ctx, value, path)
    if s is None:
        return None
    if s == "*":
        return StringMatch("exact", "*")
    if len(s) > _MAX_ORIGIN:
        ctx.error(
            path,
            f"{dotted(path)} is {len(s):,} characters long: at most {_MAX_ORIGIN} "
            "(the API's maxLength)",
        )
        return None
    got = _ORIGIN.fullmatch(s)
    port = got.group(3) if got else None
    if got is None or (port is not None and not 1 <= int(port) <= 65535):
        ctx.error(
            path,
            f"{dotted(path)} {s!r} is not an origin: write '*' or <scheme>://<host>(:<port>), "
            "scheme http or https, no path (the API's form)",
        )
        return None
    scheme, host = got.group(1), got.group(2)
    host_re = "[^/:]*".join(re.escape(part) for part in host.split("*"))
    default = _DEFAULT_PORT[scheme]
    port_re = f"(?::{default})?" if port is None or port == default else f":{port}"
    pattern = f"{scheme}://{host_re}{port_re}"
    # (the match is ours, not a regex of the user's: Envoy's program-size
    # limit is not its to meet, and a long host passed it, a RegexError out
    # of the load, where l4proxy validate died with a traceback)
    return StringMatch("regex", pattern, re2_compile(pattern))


def _names(
    ctx: Ctx,
    value: Any,
    path: Path,
    *,
    methods: bool,
    limit: int | None = None,
    star: bool = True,
    token: bool = True,
) -> list[str] | None:
    """A list of methods (*methods*) or of header names, each ``*`` or one
    of them; None after an error. Without *star*, ``*`` is no method
    (Istio's supportedMethods has none; the Gateway API's allowMethods
    has). Without *token*, a header entry may be any text a header value
    can hold, not empty (Istio checks only that: ``Content-Type,
    Authorization`` is one entry, joined as it is)."""
    items = listing(ctx, value, path)
    if items is None:
        return None
    ok = True
    if limit is not None and len(items) > limit:
        ctx.error(path, f"{dotted(path)} has {len(items)} entries; the API allows {limit}")
        ok = False
    out: list[str] = []
    for i, item in enumerate(items):
        ipath = (*path, i)
        s = text(ctx, item, ipath)
        if s is None:
            ok = False
        elif s == "*" and (star or not methods):
            out.append(s)
        elif methods:
            if s not in CORS_METHODS:
                ctx.error(
                    ipath,
                    f"{s!r} is not a supported HTTP method (one of {', '.join(CORS_METHODS)}"
                    + (", or '*')" if star else "; Istio's validation takes no '*')"),
                )
                ok = False
            else:
                out.append(s)
        elif not token:
            if s == "" or _BAD_VALUE.search(s):
                ctx.error(
                    ipath,
                    f"{dotted(ipath)} {s!r} must not be empty nor hold a CR, LF or NUL "
                    "(it goes in a header's value)",
                )
                ok = False
            else:
                out.append(s)
        elif header_name(ctx, s, ipath):
            out.append(s)
        else:
            ok = False
    return out if ok else None
