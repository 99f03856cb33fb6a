"""Reading header edits: Istio's ``Headers`` and the Gateway API's ``HTTPHeaderFilter``.

Both become a :class:`~l4proxy.dataplane.verdict.HeadEdits` (names
lowercase, in Istio's order: its ``set`` and ``add`` maps sorted by name, as
pilot sorts them; the Gateway API's lists as given). What the relay cannot
or must not change is an error with the file and line: a pseudo-header
(``:path``), Host (the rewrite's authority or hostname is), a field that
frames the message or is hop-by-hop (the relay frames the bodies itself),
a name that is not an HTTP token, a value with CR, LF or NUL. An Istio value
goes to Envoy as a header format string: ``%%`` is a ``%``, and a
``%COMMAND%`` (request or stream data) is refused by name, as the relay does
not evaluate them. A Gateway API value is literal (the API has no
formatters).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from l4proxy.dataplane.verdict import HeadEdits
from l4proxy.rules._edits import FRAMING_HEADERS
from l4proxy.rules._schema import Ctx, dotted, fields, header_name, listing, type_name
from l4proxy.rules._yaml import Path

__all__ = ["check_name", "check_value", "gateway_header_filter", "istio_headers"]

_BAD_VALUE = re.compile(r"[\r\n\0]")
_FORMATTER = re.compile(r"%([A-Z_0-9]+(?:\([^)%]*\))?(?::[0-9]+)?)%")
Api = Literal["istio", "gateway"]
# the Gateway API's HTTPHeaderFilter: at most 16 of each list
_GATEWAY_MAX_ITEMS = 16


def check_name(ctx: Ctx, name: Any, path: Path, *, api: Api) -> str | None:
    """A header name a rule may edit, lowercase; None after an error."""
    if not isinstance(name, str) or not name:
        ctx.error(path, f"header name {name!r} must be a non-empty string")
        return None
    if name.startswith(":"):
        ctx.error(
            path,
            f"header {name}: a pseudo-header cannot be edited"
            + (" (use rewrite.uri or rewrite.authority)" if api == "istio" else ""),
        )
        return None
    if not header_name(ctx, name, path):
        return None
    low = name.lower()
    if low == "host":
        hint = "rewrite.authority" if api == "istio" else "a URLRewrite filter's hostname"
        ctx.error(path, f"header {name} cannot be edited here: use {hint} to change the Host")
        return None
    if low in FRAMING_HEADERS:
        ctx.error(
            path,
            f"header {name} cannot be edited: it frames the message or is hop-by-hop, and "
            "the proxy frames and forwards the bodies itself",
        )
        return None
    return low


def check_value(ctx: Ctx, value: Any, path: Path, *, api: Api) -> str | None:
    """A header value as the relay will send it; None after an error."""
    if not isinstance(value, str):
        hint = f' (quote it: "{value}")' if isinstance(value, int | float | bool) else ""
        ctx.error(path, f"{dotted(path)} must be a string, not {type_name(value)}{hint}")
        return None
    if _BAD_VALUE.search(value):
        ctx.error(path, f"{dotted(path)} {value!r} has a CR, LF or NUL, which no header may hold")
        return None
    if api == "gateway":
        if not value:
            ctx.error(path, f"{dotted(path)} must not be empty")
            return None
        if len(value) > 4096:
            ctx.error(path, f"{dotted(path)} is longer than 4096 characters (the API's limit)")
            return None
        return value
    if "%" not in value:
        return value
    # Envoy reads the value as a format string: %% is a literal %
    rest = value.replace("%%", "")
    if "%" in rest:
        m = _FORMATTER.search(rest)
        what = f"the Envoy formatter %{m.group(1)}%" if m else "a '%' that is not '%%'"
        ctx.error(
            path,
            f"{dotted(path)} {value!r} has {what}: Envoy reads header values as format "
            "strings, and l4proxy does not evaluate them (write %% for a literal %)",
        )
        return None
    return value.replace("%%", "%")


def istio_headers(ctx: Ctx, value: Any, path: Path) -> tuple[bool, HeadEdits | None]:
    """A VirtualService's ``headers`` (``{request, response}``, each
    ``{set, add, remove}``): (valid, the edits; None when there are none)."""
    h = fields(ctx, value, path, allowed=("request", "response"))
    if h is None:
        return False, None
    ok = True
    parts: list[
        tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]]
    ] = []
    for side in ("request", "response"):
        spath = (*path, side)
        ops = fields(ctx, h.get(side), spath, allowed=("set", "add", "remove"))
        if ops is None:
            ok = False
            parts.append(((), (), ()))
            continue
        lists: list[tuple[tuple[str, str], ...]] = []
        for op in ("set", "add"):
            opath = (*spath, op)
            got: dict[str, tuple[str, str]] = {}
            entries = ops.get(op)
            if entries is not None and not isinstance(entries, dict):
                ctx.error(opath, f"{dotted(opath)} must be a mapping of header name: value")
                ok = False
                entries = None
            for name, val in (entries or {}).items():
                npath = (*opath, name) if isinstance(name, str) else opath
                low = check_name(ctx, name, npath, api="istio")
                v = check_value(ctx, val, npath, api="istio")
                if low is None or v is None:
                    ok = False
                elif low in got:
                    ctx.error(
                        npath, f"header {name} is in {dotted(opath)} twice (names ignore case)"
                    )
                    ok = False
                elif not v:
                    # (Envoy drops a header whose value is empty: keep_empty_value
                    # false, as Istio leaves it; an existing one stays)
                    ctx.warning(
                        npath, f"{dotted(npath)} is empty, so it does nothing (as in Envoy)"
                    )
                else:
                    got[low] = (low, v)
            lists.append(tuple(got[k] for k in sorted(got)))  # (pilot sorts them)
        removes: list[str] = []
        rpath = (*spath, "remove")
        for i, name in enumerate(listing(ctx, ops.get("remove"), rpath) or []):
            low = check_name(ctx, name, (*rpath, i), api="istio")
            if low is None:
                ok = False
            elif low not in removes:
                removes.append(low)
        parts.append((lists[0], lists[1], tuple(removes)))
    if not ok:
        return False, None
    (qs, qa, qr), (ss, sa, sr) = parts
    if not any((qs, qa, qr, ss, sa, sr)):
        return True, None
    return True, HeadEdits(qs, qa, qr, ss, sa, sr)


def gateway_header_filter(
    ctx: Ctx, value: Any, path: Path
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]] | None:
    """An ``HTTPHeaderFilter`` (``{set, add, remove}``, lists of ``{name,
    value}`` and of names): (set, add, remove); None after an error. One
    action per header name, as the API says (names ignore case)."""
    f = fields(ctx, value, path, allowed=("set", "add", "remove"))
    if f is None:
        return None
    ok = True
    seen: dict[str, Path] = {}
    out: list[tuple[tuple[str, str], ...]] = []

    def once(low: str, at: Path) -> bool:
        if low in seen:
            ctx.error(
                at,
                f"header {low} has more than one action in {dotted(path)} (also at "
                f"{dotted(seen[low])}); the API allows one per name",
            )
            return False
        seen[low] = at
        return True

    for op in ("set", "add"):
        opath = (*path, op)
        items = listing(ctx, f.get(op), opath)
        if items is None:
            ok = False
            items = []
        if len(items) > _GATEWAY_MAX_ITEMS:
            ctx.error(opath, f"{dotted(opath)} has {len(items)} headers; the API allows 16")
            ok = False
        got: list[tuple[str, str]] = []
        for i, item in enumerate(items):
            ipath = (*opath, i)
            h = fields(ctx, item, ipath, allowed=("name", "value"), required=("name", "value"))
            if h is None or h.get("name") is None or h.get("value") is None:
                ok = False
                continue
            low = check_name(ctx, h["name"], (*ipath, "name"), api="gateway")
            v = check_value(ctx, h["value"], (*ipath, "value"), api="gateway")
            if low is None or v is None or not once(low, ipath):
                ok = False
            else:
                got.append((low, v))
        out.append(tuple(got))
    removes: list[str] = []
    rpath = (*path, "remove")
    names = listing(ctx, f.get("remove"), rpath)
    if names is None:
        return None
    if len(names) > _GATEWAY_MAX_ITEMS:
        ctx.error(rpath, f"{dotted(rpath)} has {len(names)} names; the API allows 16")
        ok = False
    for i, name in enumerate(names):
        low = check_name(ctx, name, (*rpath, i), api="gateway")
        if low is None or not once(low, (*rpath, i)):
            ok = False
        else:
            removes.append(low)
    if not ok:
        return None
    return out[0], out[1], tuple(removes)
