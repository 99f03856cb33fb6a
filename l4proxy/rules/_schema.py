"""Reading one object's fields: typed accessors that report instead of raising.

Every accessor takes the object's :class:`Ctx` and the *path* of the value
inside the object (``("spec", "route", 0, "weight")``), reports a diagnostic
at that path's line when the value is wrong, and returns None. The kind
readers therefore find every problem of a file in one pass instead of
stopping at the first.
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from l4proxy.k8s_names import DNS1123_LABEL, DNS1123_SUBDOMAIN, LABEL_KEY, LABEL_SYNTAX, LABEL_VALUE
from l4proxy.rules._errors import Diagnostic, Severity
from l4proxy.rules._regex import RegexError, compile_regex, shown
from l4proxy.rules._yaml import Document, Path
from l4proxy.rules.routing import Labels, StringMatch

NOT_IMPLEMENTED = "is not implemented by l4proxy; remove it (the sidecar would not honour it)"
# RFC 9110 §5.1: a field name is a token (§5.6.2), ASCII; the Gateway API's
# HTTPHeaderName says the same
_FIELD_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# Istio's durations (protobuf Duration as Istio's validation reads it, Go's
# time.ParseDuration): "5s", "0.5s", "250ms", "1m30s"; no sign
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|µs|ns)")
# The Gateway API's Duration (GEP-2257): "1h", "1m30s", "500ms", no fractions
_GATEWAY_DURATION = re.compile(r"([0-9]{1,5}(h|ms|m|s)){1,4}")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
MAX_DURATION_S = 315_576_000_000  # protobuf Duration's largest
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


@dataclass
class Report:
    """Every diagnostic of one load, in the order found."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def add(self, d: Diagnostic) -> None:
        self.diagnostics.append(d)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)


def dotted(path: Path) -> str:
    """``("spec", "route", 0, "weight")`` → ``spec.route[0].weight``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Ctx:
    """One object being read: its document, kind, name and namespace."""

    report: Report
    doc: Document
    base: Path  # where the object sits in the document (``("items", 3)`` in a List)
    kind: str
    name: str | None = None
    namespace: str = "default"

    @property
    def file(self) -> str:
        return self.doc.file

    @property
    def line(self) -> int:
        return self.doc.line_of(self.base)

    def line_of(self, path: Path) -> int:
        return self.doc.line_of((*self.base, *path))

    def diag(
        self, path: Path, message: str, severity: Severity = "error", reason: str | None = None
    ) -> None:
        self.report.add(
            Diagnostic(
                file=self.doc.file,
                line=self.line_of(path),
                kind=self.kind,
                name=self.name,
                message=message,
                severity=severity,
                reason=reason,
            )
        )

    def error(self, path: Path, message: str) -> None:
        self.diag(path, message)

    def warning(self, path: Path, message: str) -> None:
        self.diag(path, message, "warning")

    def note(self, path: Path, message: str) -> None:
        self.diag(path, message, "note")


@dataclass(frozen=True)
class Where:
    """A place in an object, kept for checks that need other documents first."""

    ctx: Ctx
    path: Path

    def error(self, message: str) -> None:
        self.ctx.error(self.path, message)

    def warning(self, message: str, reason: str | None = None) -> None:
        self.ctx.diag(self.path, message, "warning", reason)

    def note(self, message: str) -> None:
        self.ctx.diag(self.path, message, "note")

    @property
    def location(self) -> str:
        return f"{self.ctx.file}:{self.ctx.line_of(self.path)}"


def type_name(value: Any) -> str:
    """What *value* is, for a message that says what it should be: a
    scalar with its value as YAML read it (``the string '1e3'``, ``the
    number 100.0``: what the user wrote may not be what YAML made of it),
    a list or a mapping by kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def fields(
    ctx: Ctx,
    value: Any,
    path: Path,
    *,
    allowed: Collection[str],
    unimplemented: Mapping[str, str] | Collection[str] = (),
    required: Collection[str] = (),
) -> dict[str, Any] | None:
    """Check that *value* is a mapping with known fields; report the others.

    *unimplemented* lists fields of the upstream API that l4proxy refuses (a
    mapping gives a hint for each); anything else unknown is reported as a
    probable typo with the accepted names. A *required* field that is
    missing where a field was refused is said in that field's error, not
    in one of its own: the refused one is most likely what was written in
    its place (``port: {name: http}``, ``port: {numbr: 80}``), and one
    error says both.
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        # a port (a selector, a server's) written as a Service's port: say how to write it
        selector = (
            path
            and path[-1] == "port"
            and "number" in allowed
            and isinstance(value, int)
            and not isinstance(value, bool)
        )
        hint = f" (write it port: {{number: {value}}})" if selector else ""
        ctx.error(
            path, f"{dotted(path) or 'document'} must be a mapping, not {type_name(value)}{hint}"
        )
        return None
    missing = [key for key in required if value.get(key) is None]
    said = ""  # (the missing ones, said in the first refused field's error)
    if missing and any(key not in allowed for key in value):
        said = "; " + " and ".join(dotted((*path, key)) for key in missing)
        said += " is required" if len(missing) == 1 else " are required"
        missing = []
    for key in value:
        if key in allowed:
            continue
        sub = (*path, key)
        if key in unimplemented:
            hint = unimplemented[key] if isinstance(unimplemented, Mapping) else ""
            message = f"{dotted(sub)} {NOT_IMPLEMENTED}" + (f"; {hint}" if hint else "")
        else:
            message = f"unknown field {dotted(sub)} (expected one of: {', '.join(sorted(allowed))})"
        ctx.error(sub, message + said)
        said = ""
    for key in required:
        if key in missing:
            ctx.error(path, f"{dotted((*path, key))} is required")
        elif value.get(key) is not None and value[key] in ("", [], {}):
            ctx.error((*path, key), f"{dotted((*path, key))} must not be empty")
    return value


def text(ctx: Ctx, value: Any, path: Path, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            ctx.error(path, f"{dotted(path)} is required")
        return None
    if not isinstance(value, str):
        ctx.error(path, f"{dotted(path)} must be a string, not {type_name(value)}")
        return None
    if required and not value:
        ctx.error(path, f"{dotted(path)} must not be empty")
        return None
    return value


def boolean(ctx: Ctx, value: Any, path: Path, *, default: bool = False) -> bool | None:
    """A true or false field: *default* when absent; None after an error."""
    if value is None:
        return default
    if not isinstance(value, bool):
        ctx.error(path, f"{dotted(path)} must be true or false, not {type_name(value)}")
        return None
    return value


def integer(
    ctx: Ctx, value: Any, path: Path, lo: int, hi: int, *, what: str | None = None
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.error(path, f"{dotted(path)} must be an integer, not {type_name(value)}")
        return None
    if not lo <= value <= hi:
        ctx.error(path, f"{what or dotted(path)} {value} is not in range {lo}..{hi}")
        return None
    return value


def duration(
    ctx: Ctx, value: Any, path: Path, *, gateway_api: bool = False, zero: bool = True
) -> float | None:
    """A duration string as seconds (0: none given, "0s": no timeout).

    Istio's form by default ("5s", "0.5s", "250ms", "1m30s"; at least 1ms
    unless 0, in whole milliseconds, as Istio's validation asks); with
    *gateway_api*, GEP-2257's ("1h", "1m30s", "500ms": whole numbers, at
    most four parts). A number is refused: "5" says no unit. Without *zero*,
    "0s" is refused too (Istio 0.7's RouteRule: "greater than 1ms").
    """
    example = "'10s' or '500ms'" if gateway_api else "'5s', '0.5s' or '250ms'"
    if not isinstance(value, str):
        ctx.error(
            path, f"{dotted(path)} must be a duration string like {example}, not {type_name(value)}"
        )
        return None
    parts = None
    if gateway_api:
        if _GATEWAY_DURATION.fullmatch(value):
            parts = _DURATION_PART.findall(value)
    elif value and _DURATION_PART.sub("", value) == "":
        parts = _DURATION_PART.findall(value)
    if not parts:
        ctx.error(path, f"{dotted(path)} {value!r} is not a duration (write it like {example})")
        return None
    seconds = sum(float(n) * _UNIT_S[unit] for n, unit in parts)
    if seconds == 0 and zero:
        return 0.0
    ms = seconds * 1000
    if seconds > MAX_DURATION_S or ms < 1 or abs(ms - round(ms)) > 1e-6:
        ctx.error(
            path,
            f"{dotted(path)} {value!r} must be "
            + ("0 (no timeout) or " if zero else "")
            + f"whole milliseconds from 1ms to {MAX_DURATION_S}s",
        )
        return None
    return round(ms) / 1000


def creation_timestamp(ctx: Ctx, obj: dict[str, Any]) -> tuple[bool, float | None]:
    """An object's ``metadata.creationTimestamp`` (RFC 3339, as ``kubectl
    get -o yaml`` writes it: ``"2024-01-01T00:00:00Z"``; unquoted, YAML
    reads it as a timestamp, which is taken too, a zone-less one as UTC)
    as seconds since the epoch, None where it is not given (rule files
    written by hand). (False, None) after an error at its line."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or meta.get("creationTimestamp") is None:
        return True, None
    value = meta["creationTimestamp"]
    if isinstance(value, datetime.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
        return True, stamp.timestamp()
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        with contextlib.suppress(ValueError):  # (a 13th month, a 25th hour)
            when = datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
            return True, when.timestamp()
    path = ("metadata", "creationTimestamp")
    ctx.error(
        path,
        f"{dotted(path)} {value!r} is not an RFC 3339 time (as kubectl writes it: "
        '"2024-01-01T00:00:00Z")',
    )
    return False, None


def listing(ctx: Ctx, value: Any, path: Path) -> list[Any] | None:
    if value is None:
        return []
    if not isinstance(value, list):
        ctx.error(path, f"{dotted(path)} must be a list, not {type_name(value)}")
        return None
    return value


def dns_label(ctx: Ctx, value: Any, path: Path) -> str | None:
    s = text(ctx, value, path, required=True)
    if s is not None and not DNS1123_LABEL.fullmatch(s):
        ctx.error(
            path,
            f"{dotted(path)} {s!r} is not a DNS-1123 label "
            "(lowercase letters, digits and '-', at most 63)",
        )
        return None
    return s


def dns_subdomain(ctx: Ctx, value: Any, path: Path) -> str | None:
    s = text(ctx, value, path, required=True)
    if s is not None and not DNS1123_SUBDOMAIN.fullmatch(s):
        ctx.error(
            path,
            f"{dotted(path)} {s!r} is not a valid name (lowercase letters, digits, '-' and '.')",
        )
        return None
    return s


def header_name(
    ctx: Ctx, name: str, path: Path, what: str = "header name", kind: str = "an HTTP field name"
) -> bool:
    """Whether *name* is an HTTP header name (no request has another, and
    the compiled relay compares names as ASCII bytes), or another name an
    HTTP token must be (a cookie's: *what* and *kind* say which); an error
    if not."""
    if _FIELD_NAME.fullmatch(name):
        return True
    ctx.error(path, f"{what} {name!r} is not {kind} (letters, digits and !#$%&'*+-.^_`|~ only)")
    return False


def labels(ctx: Ctx, value: Any, path: Path) -> Labels | None:
    if value is None:
        return Labels()
    if not isinstance(value, dict):
        ctx.error(path, f"{dotted(path)} must be a mapping of label: value, not {type_name(value)}")
        return None
    ok = True
    for k, v in value.items():
        sub = (*path, k)
        if not isinstance(k, str) or not LABEL_KEY.fullmatch(k):
            ctx.error(
                sub,
                f"label name {k!r} in {dotted(path)} is not a valid label name "
                f"(Kubernetes': {LABEL_SYNTAX}, after an optional DNS prefix and '/', "
                "as in app.kubernetes.io/name)",
            )
            ok = False
        elif not isinstance(v, str):
            # (the value as YAML wrote it: null an empty value, true "true")
            written = "" if v is None else str(v).lower() if isinstance(v, bool) else v
            ctx.error(
                sub,
                f"label {k} in {dotted(path)} must be a string, not {type_name(v)} "
                f'(quote it: {k}: "{written}")',
            )
            ok = False
        elif not LABEL_VALUE.fullmatch(v):
            ctx.error(
                sub,
                f"label {k}={v!r} in {dotted(path)} is not a valid label value "
                f"(Kubernetes': {LABEL_SYNTAX}, or empty)",
            )
            ok = False
    return Labels(value) if ok else None


def string_match(
    ctx: Ctx,
    value: Any,
    path: Path,
    *,
    bare_ok: bool,
    suffix: str = "",
    present_ok: bool = False,
) -> StringMatch | None:
    """Istio StringMatch: ``{exact|prefix|regex: s}``; a bare string is exact if *bare_ok*.
    *suffix*: what to say of a ``suffix`` (the default: not implemented).
    *present_ok* (a header's or a query parameter's match): no match at
    all (``{}`` or nothing) or the regex ``*`` is a presence match, as
    Istio makes them (``canBeConvertedToPresentMatch``)."""
    if isinstance(value, str) and bare_ok:
        return StringMatch("exact", value)
    if present_ok and (value is None or value == {} or value == {"regex": "*"}):
        return StringMatch("present", "")
    if not isinstance(value, dict):
        ctx.error(
            path,
            f"{dotted(path)} must be a mapping with one of exact, prefix, regex, "
            f"not {type_name(value)}",
        )
        return None
    kinds = [k for k in value if k in ("exact", "prefix", "regex")]
    for k in value:
        if k not in ("exact", "prefix", "regex"):
            sub = (*path, k)
            if k == "suffix":
                ctx.error(sub, f"{dotted(sub)} {suffix or NOT_IMPLEMENTED}; use a regex instead")
            else:
                ctx.error(sub, f"unknown field {dotted(sub)} (expected exact, prefix or regex)")
    if len(kinds) != 1:
        if kinds or not value:
            ctx.error(path, f"{dotted(path)} must have exactly one of exact, prefix, regex")
        return None
    kind = kinds[0]
    s = text(ctx, value[kind], (*path, kind))
    if s is None:
        return None
    if kind == "regex":
        try:
            pattern = compile_regex(s)
        except RegexError as exc:
            ctx.error((*path, kind), f"regex {shown(s)} in {dotted(path)} is invalid: {exc}")
            return None
        return StringMatch("regex", s, pattern)
    return StringMatch("exact" if kind == "exact" else "prefix", s)
