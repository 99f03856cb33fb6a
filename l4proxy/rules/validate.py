"""``l4proxy validate``: check rule files exactly as the sidecar would load them.

Exit status: 0 valid, 1 invalid (errors printed as ``FILE:LINE: KIND NAME:
MESSAGE``, istioctl style), or with ``--strict`` any warning, 2 a path
cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from l4proxy.dataplane.verdict import _RETRY_CONNECT, FAULT_SCALE
from l4proxy.k8s_names import namespace_arg, pod_labels_arg, pod_labels_file_arg
from l4proxy.rules import (
    DEFAULT_MAX_BYTES,
    RULE_KINDS,
    ConfigError,
    ConfigUnreadable,
    Diagnostic,
    ObjectSummary,
    load_rules,
)
from l4proxy.rules._regex import re2_compile
from l4proxy.rules.routing import DEFAULT_RETRY_BACKOFF, StringMatch, endpoint_name

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2

DESCRIPTION = """\
Check rule files the way the sidecar loads them, without running it: every
document of every file, then the documents against each other (routes against
DestinationRule subsets, label selections against ServiceEntry endpoints,
duplicate names). Prints what it understood; --verbose prints the compiled
route table too.

Kinds read: RouteRule (config.istio.io/v1alpha2), VirtualService and
DestinationRule (networking.istio.io/v1alpha3, v1beta1, v1), ServiceEntry (the
service registry: hosts, VIP addresses, ports, endpoints with labels) and
Ingress (extensions/v1beta1, networking.k8s.io/v1), HTTPRoute and Gateway
(gateway.networking.k8s.io/v1, v1beta1), and Istio's Gateway
(networking.istio.io: HTTP servers, bound by VirtualServices' gateways).
Kubernetes objects
(Deployment, Service, ...) are skipped, so one manifest file can hold both.
"""

EPILOG = """\
examples:
  l4proxy validate bootcamp-route-rule-50-v2.yaml registry.yaml
  l4proxy validate /etc/l4proxy/rules          # a directory, e.g. a ConfigMap mount
  l4proxy validate -v deploy/examples/rules    # also print the route table
  l4proxy validate -n shop rules.yaml          # objects without a namespace are in 'shop'
  l4proxy validate --strict rules/             # in CI: a warning fails too
  l4proxy validate --pod-labels app=web rules/ # as the sidecar of a pod of these labels

an error reads like istioctl's:
  bootcamp.yaml:12: RouteRule bootcamp-default: route weights total 90 (must total 100)

warnings (a binding dropped, a server not served, a route never reached)
never make a set invalid: the sidecar loads it and serves it as they say.
--strict fails on them too, as istioctl analyze --failure-threshold Warning
does, so that a typo that only drops a binding fails a CI check (notes,
which -v prints, never fail).

exit status:
  0  valid: the sidecar would load these files (with --strict: and no warning)
  1  invalid: fix the errors printed (nothing of an invalid set is applied;
     a running sidecar keeps serving its last good rules); with --strict,
     valid but with warnings
  2  a path does not exist or cannot be read
"""


def _positive_bytes(value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of bytes, more than 0")
    return int(value)


def _pod_labels(args: argparse.Namespace) -> dict[str, str] | None:
    """The pod's labels as ``l4proxy run`` merges its options (--pod-labels
    over --pod-labels-file's); None where neither is given (not known)."""
    given = getattr(args, "pod_labels", None)
    from_file = getattr(args, "pod_labels_file", None)
    if given is None and from_file is None:
        return None
    return {**(from_file or {}), **(given or {})}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "validate",
        help="check rule files the way the sidecar would",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="rule file or directory")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print notes (skipped objects) and the compiled route table",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on a warning too, not only on an error (for CI; notes never fail)",
    )
    p.add_argument(
        "-n",
        "--namespace",
        default="default",
        type=namespace_arg,
        help="namespace of objects without metadata.namespace, and of the pod "
        "(whose short service names resolve) (default: %(default)s)",
    )
    p.add_argument(
        "--domain",
        default="cluster.local",
        help="cluster DNS domain (default: %(default)s)",
    )
    p.add_argument(
        "--pod-labels",
        type=pod_labels_arg,
        default=None,
        metavar="K=V,...",
        help="the labels of the pod whose sidecar loads the files (its --pod-labels, read "
        "alike, each over the same key of --pod-labels-file's): the DestinationRules whose "
        "workloadSelector selects it apply in place of the others, as on that sidecar; "
        "without either option none of them does, with a note each",
    )
    p.add_argument(
        "--pod-labels-file",
        type=pod_labels_file_arg,
        default=None,
        metavar="PATH",
        help="the pod's labels from a Downward API labels file, as l4proxy run "
        "--pod-labels-file reads it",
    )
    p.add_argument(
        "--max-bytes",
        type=_positive_bytes,
        default=DEFAULT_MAX_BYTES,
        metavar="BYTES",
        help="refuse files larger than this (default: %(default)s, 16 MiB, the sidecar's limit)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        result = load_rules(
            args.paths,
            namespace=args.namespace,
            domain=args.domain,
            max_bytes=args.max_bytes,
            pod_labels=_pod_labels(args),
        )
    except ConfigUnreadable as exc:
        _print_diagnostics(exc.diagnostics, err, verbose=args.verbose)
        print("cannot read every path given; nothing validated", file=err)
        return EXIT_UNREADABLE
    except ConfigError as exc:
        _print_diagnostics(exc.diagnostics, err, verbose=args.verbose)
        if exc.documents:
            print(summary(exc.documents), file=out)
        print(f"invalid: {_plural(len(exc.errors), 'error')}", file=err)
        return EXIT_INVALID
    _print_diagnostics(result.notes, err, verbose=args.verbose)
    print(summary(result.documents), file=out)
    if args.verbose:
        print(format_table(result.table.to_json()), file=out, end="")
    warnings = sum(1 for d in result.notes if d.severity == "warning")
    if warnings and args.strict:
        print(
            f"invalid under --strict: {_plural(warnings, 'warning')} (the sidecar would load "
            f"{_plural(len(result.sources), 'file')} and serve them as the warnings say)",
            file=err,
        )
        return EXIT_INVALID
    tail = f" ({_plural(warnings, 'warning')})" if warnings else ""
    print(f"valid: {_plural(len(result.sources), 'file')}{tail}", file=out)
    return EXIT_VALID


def _print_diagnostics(diags: Sequence[Diagnostic], err: TextIO, *, verbose: bool) -> None:
    """Each file's in the order of its lines (the checks find them in
    another: a document's fields, then the objects together), the files in
    the order they were read."""
    files: dict[str, int] = {}
    for d in diags:
        files.setdefault(d.file, len(files))
    for d in sorted(diags, key=lambda d: (files[d.file], d.line or 0)):
        if d.severity != "note" or verbose:
            print(str(d), file=err)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(documents: Sequence[ObjectSummary]) -> str:
    """``4 documents: 1 RouteRule, 1 ServiceEntry; 2 skipped (Deployment a, Service b)``."""
    used = Counter(d.kind for d in documents if not d.skipped)
    order = [k for k in RULE_KINDS if used[k]] + sorted(k for k in used if k not in RULE_KINDS)
    parts = [f"{used[k]} {k}" for k in order]
    text = f"{_plural(len(documents), 'document')}: " + (", ".join(parts) or "no rules")
    skipped = [d for d in documents if d.skipped]
    if skipped:
        text += f"; {len(skipped)} skipped ({', '.join(f'{d.kind} {d.name}' for d in skipped)})"
    return text


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "all endpoints"


def _describe_match(m: dict[str, Any]) -> str:
    parts = []
    for key in ("uri", "scheme", "method", "authority"):
        if key in m:
            ((kind, value),) = m[key].items()
            said = f"{key} {kind} {value!r}"
            if key == "uri" and m.get("ignore_uri_case"):
                # (Envoy's case_sensitive leaves a regex as it is)
                said += (
                    " in any case"
                    if kind in ("exact", "prefix")
                    else " (case-sensitive: ignoreUriCase applies to exact and prefix)"
                )
            parts.append(said)
    for what, key in (("header", "headers"), ("query", "query")):
        for name, sm in m.get(key, {}).items():
            ((kind, value),) = sm.items()
            parts.append(
                f"{what} {name} " + ("present" if kind == "present" else f"{kind} {value!r}")
            )
    for name, sm in m.get("without_headers", {}).items():
        ((kind, value),) = sm.items()
        parts.append(
            f"header {name} " + ("absent" if kind == "present" else f"not {kind} {value!r}")
        )
    if "source_labels" in m:
        parts.append(f"caller {_labels(m['source_labels'])}")
    if "port" in m:
        parts.append(f"port {m['port']}")
    return " and ".join(parts) or "any request"


def _retries(rt: dict[str, Any]) -> str:
    """A route's retry policy, as 'validate -v' prints it."""
    on = ",".join(rt["retry_on"]) or "nothing"
    codes = f" (codes {','.join(str(c) for c in rt['codes'])})" if rt["codes"] else ""
    per_try = f", {rt['per_try_timeout']:g} s per try" if rt["per_try_timeout"] else ""
    # (Envoy's default base interval is not said)
    backoff = rt.get("backoff", DEFAULT_RETRY_BACKOFF)
    after = f", backoff {backoff * 1000:g} ms" if backoff != DEFAULT_RETRY_BACKOFF else ""
    if not rt.get("ignore_previous_hosts", True):
        after += ", previous endpoints not avoided"
    said = f"retries {rt['attempts']} on {on}{codes}{per_try}{after}"
    if _fires(rt):
        return said
    if not _RETRY_CONNECT.isdisjoint(rt["retry_on"]):
        # (connect-failure, reset-before-request: a failed connect spends
        # its tries, as Envoy's; nothing held for a replay)
        return f"{said}: only a failed connect is retried here"
    # (the relays take it as no policy, holding nothing for a replay:
    # l4proxy.dataplane.verdict.RetryPolicy.in_effect)
    why = "none of these policies fires on HTTP/1.1 beyond the relay's own retries"
    if rt["per_try_timeout"]:
        return f"{said}: only the per-try timeout has effect here ({why})"
    return f"{said}: no effect here ({why})"


# the retryOn policies that retry a response or a reset on an HTTP/1.1
# exchange (retriable-status-codes: with a code); connect-failure and
# reset-before-request retry a failed connect alone (_RETRY_CONNECT); the
# others occur only in HTTP/2, HTTP/3 or gRPC, or need what Istio does not
# configure
_FIRING_RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "retriable-4xx"})


def _fires(rt: dict[str, Any]) -> bool:
    on = set(rt["retry_on"])
    return bool(on & _FIRING_RETRY_ON) or ("retriable-status-codes" in on and bool(rt["codes"]))


def _pool(cp: dict[str, Any]) -> str:
    """Connection pool settings (``PoolSettings.to_json()``) in words; what
    is not said is the sidecar's flag (a circuit breaker: unlimited), and a
    value another destination reaches the endpoint without (``or_flag``) is
    the stricter of it and the flag. The circuit breakers come last, as
    ``max 1 connection, 1 pending, 100 active``."""
    said = []
    bound = set(cp.get("or_flag", ()))
    n = cp.get("max_requests_per_connection")
    if n is not None:
        said.append(
            "unlimited requests per connection"
            if n == 0
            else f"{n} request{'s' if n != 1 else ''} per connection"
        )
        if "max_requests_per_connection" in bound:
            said[-1] += " (or the flag's, if fewer)"
    for name in ("idle_timeout", "connect_timeout"):
        if cp.get(name) is not None:
            said.append(f"{name.replace('_', ' ')} {_duration(cp[name])}")
            if name in bound:
                said[-1] += " (or the flag's, if shorter)"
    limits = []
    for name, unit in (
        ("max_connections", "connection"),
        ("http1_max_pending_requests", "pending"),
        ("http2_max_requests", "active"),
    ):
        n = cp.get(name)
        if n is not None:
            plural = "s" if unit == "connection" and n != 1 else ""
            limits.append(f"{n} {unit}{plural}")
    if limits:
        said.append("max " + ", ".join(limits))
    return ", ".join(said) or "the sidecar's flags"


def _outlier(od: dict[str, Any]) -> str:
    """An outlier detection policy (``OutlierPolicy.to_json()``) in words."""

    def count(n: int) -> str:
        return f"x{n}" if n else "off"

    said = [
        f"5xx {count(od['consecutive_5xx_errors'])}",
        f"gateway {count(od['consecutive_gateway_errors'])}",
    ]
    if od["split_external_local_origin_errors"]:
        said.append(f"local origin {count(od['consecutive_local_origin_failures'])} (split)")
    said.append(
        f"eject {_duration(od['base_ejection_time'])} "
        f"(x n, max {_duration(od['max_ejection_time'])})"
    )
    said.append(f"interval {_duration(od['interval'])}")
    said.append(f"max {od['max_ejection_percent']:g}% ejected")
    panic = od["min_health_percent"]
    said.append(
        "panic below 0% (never: all ejected -> 503)"
        if not panic
        else f"panic below {panic:g}% healthy (then all endpoints)"
    )
    return ", ".join(said)


def _balancer(d: dict[str, Any]) -> str:
    """A service's or destination's load balancer: its policy, or what a
    consistent hash hashes on (``consistent hash on header x-user``,
    ``... on cookie sid (generated, ttl 3600s, path /)``)."""
    on = d.get("hash_on")
    if d["load_balancer"] != "HASH" or not on:
        return str(d["load_balancer"])
    if on["kind"] == "source_ip":
        return "consistent hash on the client's address"
    what = {"header": "header", "cookie": "cookie", "query": "query parameter"}[on["kind"]]
    out = f"consistent hash on {what} {on['name']}"
    if on["kind"] == "cookie":
        if on["ttl"] is None:
            said = ["never generated"]
        elif on["ttl"]:
            said = ["generated", f"ttl {on['ttl']}s"]
        else:
            said = ["generated", "session cookie"]
        if on["path"]:
            said.append(f"path {on['path']}")
        out += f" ({', '.join(said)})"
    return out


def _policy(d: dict[str, Any], *, whole: bool = False) -> str:
    """A service's, destination's or port's traffic policy in words: its
    load balancer, then its connection pool and outlier detection where
    set (``Subset.policy_json()``); *whole* (a port's, which replaces the
    others whole): those it leaves unset said too."""
    said = _balancer(d)
    if d.get("connection_pool"):
        said += f"; pool: {_pool(d['connection_pool'])}"
    elif whole:
        said += "; pool: the sidecar's flags"
    if d.get("outlier_detection"):
        said += f"; outlier detection: {_outlier(d['outlier_detection'])}"
    elif whole:
        said += "; no outlier detection"
    return said


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _kind(r: dict[str, Any]) -> str:
    """A route's kind where it is tcp, and the ports of its service that
    its kind keeps it from (``not_on``: an HTTP port for a tcp route, a TCP
    port it does not name for an http route of a service with HTTP ports),
    after its name in 'validate -v'."""
    tcp = r["protocol"] == "tcp"
    said = ["tcp"] if tcp else []
    not_on = r.get("not_on")
    if not_on:
        what = "HTTP" if tcp else "TCP"
        said.append(
            f"not on {what} {_ports(not_on)}" + ("" if r.get("ports") else ": routes nothing")
        )
    return f" ({'; '.join(said)})" if said else ""


def _format_routes(routes: list[dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for i, r in enumerate(routes, 1):
        when = " or ".join(_describe_match(m) for m in r["match"]) or "any request"
        proto = _kind(r)
        lines.append(f"{indent}{i}. {r['name']}{proto}: {when}")
        total = sum(d["weight"] for d in r["route"])
        for d in r["route"]:
            port = f" port {d['port']}" if d["port"] is not None else ""
            share = 100 * d["weight"] / total if total else 0.0
            pct = f"{share:>3.0f}%" if share == int(share) else f"{share:>5.1f}%"
            # a destination with a port takes that port's policy alone;
            # one without, each port's where portLevelSettings name it
            levels = d.get("port_level", [])
            own = next((pl for pl in levels if pl["port"] == d["port"]), None)
            said = (
                _policy(own, whole=True) + "; its port's portLevelSettings" if own else _policy(d)
            )
            if d.get("refused"):  # (a backend no ReferenceGrant permits)
                lines.append(
                    f"{indent}     {pct}  {d['host']}{port}: answered "
                    f"{r.get('unresolved_status', 503)} (not permitted: no ReferenceGrant)"
                )
                continue
            lines.append(
                f"{indent}     {pct}  {d['host']}{port} subset {d['subset']} "
                f"({_labels(d['labels'])}; {said})"
            )
            if d["port"] is None:
                lines.extend(
                    f"{indent}            on port {pl['port']} (portLevelSettings): "
                    f"{_policy(pl, whole=True)}"
                    for pl in levels
                )
            if d.get("headers"):
                lines.append(f"{indent}            its {_headers(d['headers'])}")
        if r.get("redirect"):
            lines.append(f"{indent}     {_redirect(r['redirect'])}")
        elif r.get("direct_response"):
            a = r["direct_response"]
            extra = "".join(f"; {n}: {v}" for n, v in a["headers"])
            lines.append(
                f"{indent}     answered {a['status']} with a body of "
                f"{len(a['body'].encode())} bytes{extra}"
            )
        elif not r["route"]:
            lines.append(f"{indent}     no backend: answered {r['unresolved_status']}")
        elif r.get("unresolved_status", 503) != 503:
            lines.append(
                f"{indent}     (a backend without endpoints is answered {r['unresolved_status']})"
            )
        if r.get("timeout"):
            lines.append(f"{indent}     timeout {r['timeout']:g} s (then 504)")
        if r.get("retries"):
            lines.append(f"{indent}     {_retries(r['retries'])}")
        if r.get("fault"):
            lines.append(f"{indent}     {_fault(r['fault'])}")
        for m in r.get("mirrors", ()):
            lines.append(f"{indent}     {_mirror(m)}")
        if r.get("cors"):
            lines.extend(f"{indent}     {line}" for line in _cors(r["cors"]))
        if r.get("session_persistence"):
            lines.append(f"{indent}     {_session(r['session_persistence'])}")
        if r.get("rewrite"):
            rw = r["rewrite"]
            if rw["kind"] == "regex":
                lines.append(
                    f"{indent}     rewrites each match of '{rw['match']}' in the path "
                    f"to '{rw['value']}'"
                )
            else:
                what = {
                    "prefix": "the matched uri prefix (the whole path for an exact or regex match)",
                    "segments": "the matched path prefix",
                    "full": "the whole path",
                }[rw["kind"]]
                lines.append(f"{indent}     rewrites {what} to {rw['value']!r}")
        if r.get("headers"):
            lines.append(f"{indent}     {_headers(r['headers'])}")
    return lines


def _session(sp: dict[str, Any]) -> str:
    """A route's session persistence, as 'validate -v' prints it."""
    if sp["kind"] == "header":
        return f"session persistence: header {sp['name']} names the endpoint"
    life = "a session cookie" if sp["max_age"] is None else f"Max-Age={sp['max_age']}"
    paths = ", ".join(f"Path={p}" for p in sp["paths"])
    return f"session persistence: cookie {sp['name']} names the endpoint ({paths}; {life})"


def _fault(f: dict[str, Any]) -> str:
    """A route's fault injection, as 'validate -v' prints it."""
    said = []
    if f["delay_ppm"]:
        said.append(f"delays {_share(f['delay_ppm'])} by {f['delay']:g} s")
    if f["abort_ppm"]:
        said.append(f"aborts {_share(f['abort_ppm'])} with {f['abort_status']}")
    return "fault: " + "; ".join(said)


def _mirror(m: dict[str, Any]) -> str:
    """A route's mirror, as 'validate -v' prints it."""
    pct = m["percent"]
    share = "every request" if pct >= 100 else f"{pct:g}% of the requests"
    port = f" port {m['port']}" if m["port"] is not None else ""
    if m.get("refused"):  # (a backend no ReferenceGrant permits)
        return (
            f"mirror to {m['host']}{port} refused (not permitted: no ReferenceGrant): "
            "nothing is mirrored"
        )
    return (
        f"mirrors {share} to {m['host']}{port} subset {m['subset']} "
        f"({_labels(m['labels'])}; fire and forget, Host -shadow)"
    )


def _cors(c: dict[str, Any]) -> list[str]:
    """A route's CORS policy, as 'validate -v' prints it."""
    origins = ", ".join(f"{k} {v!r}" for m in c["allow_origins"] for k, v in m.items())
    # (a match that takes '*' allows every Origin: CorsPolicy.allows, Envoy's test)
    # (a regex loaded already: compiled as it was, without Envoy's size limit
    # that a Gateway API origin's own pattern need not meet)
    anyone = any(
        StringMatch(k, v, re2_compile(v) if k == "regex" else None).matches("*")
        for m in c["allow_origins"]
        for k, v in m.items()
    )
    unmatched = (
        "answered 200 without allow-origin (IGNORE)"
        if c["unmatched_preflights"] == "IGNORE"
        else "sent upstream (FORWARD)"
    )
    if anyone:
        said = [
            f"CORS: origins {origins}: any origin allowed, its preflights answered 200 here, "
            "its responses' allow-origin echoed",
            "  requests without Origin untouched",
        ]
    else:
        said = [
            f"CORS: origins {origins or '(none)'}: their preflights answered 200 here, their "
            "responses' allow-origin echoed",
            f"  other origins' preflights {unmatched}; requests without Origin untouched",
        ]
    lines = [
        ("allow-methods", c["allow_methods"]),
        ("allow-headers", c["allow_headers"]),
        ("max-age", c["max_age"]),
        ("expose-headers", c["expose_headers"]),
        ("allow-credentials", "true" if c["allow_credentials"] else ""),
    ]
    said.extend(f"  {n}: {v}" for n, v in lines if v)
    return said


def _share(ppm: int) -> str:
    """A fault's share of the requests, parts per million as a percent."""
    if ppm >= FAULT_SCALE:
        return "every request"
    return f"{ppm * 100 / FAULT_SCALE:g}% of the requests"


def _headers(h: dict[str, Any]) -> str:
    """A route's or destination's header edits, as 'validate -v' prints them."""
    said = []
    if "authority" in h:
        said.append(f"Host rewritten to {h['authority']!r}")
    for side in ("request", "response"):
        for op, verb in (("set", "sets"), ("add", "adds"), ("remove", "removes")):
            got = h.get(side, {}).get(op)
            if got:
                items = ", ".join(g if op == "remove" else f"{g[0]}: {g[1]}" for g in got)
                said.append(f"{side} {verb} {items}")
    return "headers: " + "; ".join(said)


def _redirect(rd: dict[str, Any]) -> str:
    """A route's redirect, as 'validate -v' prints it."""
    scheme = rd["scheme"] or "(the request's scheme)"
    host = rd["host"] or "(the request's host)"
    port = rd["port"]
    port_s = "" if port is None else (":(its port)" if port == "from request" else f":{port}")
    if rd["path"] is not None:
        path = rd["path"]
    elif rd["prefix"] is not None:
        path = f"(the request's path, its matched prefix replaced by {rd['prefix']!r})"
    else:
        path = "(the request's path)"
    extra = "".join(f"; {n}: {v}" for n, v in rd["headers"])
    return f"redirect {rd['status']} to {scheme}://{host}{port_s}{path}{extra}"


def _otherwise(
    service: dict[str, Any], refusing: list[int] | None, caught: list[int] | None = None
) -> str:
    """What a request no route matches gets: 404 on the ports of a
    VirtualService's or HTTPRoute's host that its routes serve, else the
    round robin (RouteRule; the ports no route names); nothing on the
    ports where a route takes every request (*caught*)."""
    ports = [p["number"] for p in service["ports"]]
    left = [p for p in ports if p not in (caught or ())]
    if not left:
        return "      otherwise: nothing (a route takes every request)"
    refusing = [p for p in refusing or () if p in left]
    if not refusing:
        if len(left) == len(ports):
            return f"      otherwise: {_default_route(service, left)}"
        return f"      otherwise: on {_ports(left)} {_default_route(service, left)}"
    if refusing == left and len(left) == len(ports):
        return "      otherwise: 404 (no route matched)"
    rest = [p for p in left if p not in refusing]
    said = f"      otherwise: 404 on {_ports(refusing)} (no route matched)"
    return said + (f"; on {_ports(rest)} {_default_route(service, rest)}" if rest else "")


def _default_route(service: dict[str, Any], ports: list[int]) -> str:
    """The default route of a service on *ports*: all its endpoints, by its
    own load balancer (its DestinationRule's, else round robin), or on a
    port of its portLevelSettings that port's."""
    port_level = {pl["port"]: pl for pl in service.get("port_level", [])}
    hows: dict[str, list[int]] = {}
    for port in ports:
        hows.setdefault(_how(port_level.get(port, service)), []).append(port)
    said = "over all endpoints (route 'default')"
    if len(hows) == 1:
        return f"{next(iter(hows))} {said}"
    return "; ".join(f"on {_ports(numbers)} {how}" for how, numbers in hows.items()) + f" {said}"


def _how(policy: dict[str, Any]) -> str:
    """A load balancer as the default route's line says it."""
    return "round robin" if policy["load_balancer"] == "ROUND_ROBIN" else _balancer(policy)


def _ports(numbers: list[int]) -> str:
    return ("port " if len(numbers) == 1 else "ports ") + ", ".join(str(p) for p in numbers)


def format_table(t: dict[str, Any]) -> str:
    """The compiled table (``RouteTable.to_json()``) in readable form."""
    lines: list[str] = [f"route table (namespace {t['namespace']}, domain {t['domain']}):"]
    pools: dict[str, dict[str, Any]] = t.get("connection_pools", {})
    outliers: dict[str, dict[str, Any]] = t.get("outlier_policies", {})
    known = set()
    for s in t["services"]:
        known.add(s["host"])
        if s.get("role") == "gateway":
            ports = ", ".join(str(p["number"]) for p in s["ports"])
            lines.append(f"  gateway listener {s['host']} (local port {ports})")
            lines.append("    routes, first match wins:")
            lines.extend(_format_routes(t["routes"].get(s["host"], []), "      "))
            # (nothing is left where a route takes every request: the
            # README's promise, as for a service's routes)
            if t.get("caught", {}).get(s["host"]):
                lines.append("      otherwise: nothing (a route takes every request)")
            else:
                lines.append("      otherwise: 404 (no route matched)")
            continue
        also = f" (also {', '.join(s['aliases'])})" if s["aliases"] else ""
        lines.append(f"  service {s['host']}{also}")
        addrs = ", ".join(s["addresses"]) or "none"
        pool = (
            f"; connection pool: {_pool(s['connection_pool'])}" if s.get("connection_pool") else ""
        )
        lines.append(
            f"    addresses {addrs}; resolution {s['resolution']}; "
            f"load balancer {_balancer(s)}{pool}"
        )
        if s.get("outlier_detection"):
            lines.append(f"    outlier detection: {_outlier(s['outlier_detection'])}")
        levels = {pl["port"]: pl for pl in s.get("port_level", [])}
        for p in s["ports"]:
            layer = "L7" if p["http"] else "L4"
            lines.append(f"    port {p['number']} {p['name']} ({p['protocol']}, {layer}):")
            if p["number"] in levels:
                policy = _policy(levels[p["number"]], whole=True)
                lines.append(f"      portLevelSettings: load balancer {policy}")
            for ep in s["endpoints"].get(str(p["number"]), []):
                ep_pool = pools.get(endpoint_name(ep["address"], ep["port"]))
                said = f"  pool: {_pool(ep_pool)}" if ep_pool else ""
                lines.append(f"      {ep['address']}:{ep['port']}  {_labels(ep['labels'])}{said}")
                # the policy it is held to, where not the host's own (a
                # subset's, or several destinations' merged: the most eager)
                held = outliers.get(endpoint_name(ep["address"], ep["port"]))
                if held and held != s.get("outlier_detection"):
                    lines.append(f"        outlier detection: {_outlier(held)}")
        routes = t["routes"].get(s["host"], [])
        if routes:
            lines.append("    routes, first match wins:")
            lines.extend(_format_routes(routes, "      "))
            lines.append(
                _otherwise(
                    s, t.get("unmatched", {}).get(s["host"]), t.get("caught", {}).get(s["host"])
                )
            )
        else:
            lines.append(f"    no routes: {_default_route(s, [p['number'] for p in s['ports']])}")
    orphans = {h: r for h, r in t["routes"].items() if h not in known}
    for host, routes in orphans.items():
        lines.append(f"  routes for {host} (no ServiceEntry yet: not applied):")
        lines.extend(_format_routes(routes, "    "))
    if t["ingress"]:
        lines.append("  ingress (gateway mode):")
        for p in t["ingress"]:
            host = p["host"] or "any host"
            where = (
                "default backend"
                if p["path_type"] == "Default"
                else (f"{p['path'] or '/'} ({p['path_type']})")
            )
            if p.get("listener_port") is not None:
                lines.append(f"    {host} port {p['listener_port']} -> {p['service']}")
                continue
            lines.append(f"    {host} {where} -> {p['service']}:{p['port']}  [{p['name']}]")
    if len(lines) == 1:
        lines.append("  empty")
    return "\n".join(lines) + "\n"
