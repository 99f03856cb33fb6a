"""From paths to a RouteTable: find the files, read each document, dispatch by kind.

A directory is read the way a Kubernetes ConfigMap mount needs: its visible
``*.yaml``, ``*.yml`` and ``*.json`` entries, following symlinks, in name
order; hidden names (``..data``, ``..2024_01_01_00_00_00.123``) are skipped,
so each file is read once through its visible name even while the kubelet
swaps ``..data``. Sub-directories are not descended into (like
``kubectl apply -f DIR`` without ``-R``). What a directory holds must be a
regular file (after symlinks): a named pipe or a device there is an error
naming it, not a wait for a writer. A path named on its own is read as it
is (``l4proxy validate <(kubectl get ...)``), except by the sidecar.

A document goes to the reader of its kind and API group: ``_routerule``,
``_networking`` (VirtualService, DestinationRule, ServiceEntry),
``_ingress``, ``_gateway_api`` (HTTPRoute, ReferenceGrant, and a Gateway of
gateway.networking.k8s.io) and ``_istio_gateway_servers`` (a Gateway of
networking.istio.io: the two kinds share a name, and a file may hold one of
each named alike). Kubernetes' own objects are skipped with a note; an
Istio kind l4proxy does not implement is an error that says what to use.

The load is all or nothing: every problem of every file is collected, and if
any is an error, :class:`ConfigError` carries them all and no table is made.
Reading and loading are two steps (:func:`read_rules`, then
:func:`load_rules` of what was read) so that the sidecar can load the same
texts again with a file's text replaced or left out, without reading the
files again (:mod:`~l4proxy.rules.watch`: a broken file held at its last good
version).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from l4proxy.rules import _gateway_api, _ingress, _istio_gateway_servers, _networking, _routerule
from l4proxy.rules._errors import ConfigError, ConfigUnreadable, Diagnostic, ObjectSummary
from l4proxy.rules._objects import Env, fqdn
from l4proxy.rules._schema import Ctx, Report, Where, dns_label, dns_subdomain, fields, type_name
from l4proxy.rules._table import Drafts, build_table
from l4proxy.rules._yaml import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_NODES,
    Document,
    NodeBudget,
    Path,
    SourceProblem,
    Unreadable,
    parse_documents,
    read_file,
)
from l4proxy.rules.routing import RouteTable

RULE_SUFFIXES = (".yaml", ".yml", ".json")
RULE_KINDS = (
    "RouteRule",
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "Ingress",
    "HTTPRoute",
    "Gateway",
    "ReferenceGrant",
)

# Istio kinds we know but do not implement, with what to use instead.
_ISTIO_UNIMPLEMENTED = {
    "DestinationPolicy": "use a DestinationRule with trafficPolicy.loadBalancer",
    "EgressRule": "describe the external service with a ServiceEntry",
    "Sidecar": "",
    "EnvoyFilter": "",
    "WorkloadEntry": "list the workload as a ServiceEntry endpoint",
}
# Gateway API kinds l4proxy does not read, with what does their work here
_GATEWAY_API_HINTS = {
    "BackendLBPolicy": "for sticky sessions give the HTTPRoute rule a sessionPersistence "
    "(GEP-1619, the same fields), which l4proxy supports",
}
# API groups of Kubernetes' own objects, skipped so that one manifest file can
# hold the Deployments and Services next to the rules.
_K8S_GROUPS = ("", "apps", "batch", "extensions", "policy", "autoscaling")


@dataclass
class RuleFiles:
    """The rule files of some paths as read, for :func:`load_rules`.

    ``files`` holds each file found, in load order: its path (as found: a
    directory's entry as DIR/NAME) and its text, or the problem that kept it
    from being taken as text (too big, not UTF-8, not a regular file: an
    error of that file). ``unreadable`` names what could not be read at all
    (a path missing, a directory that cannot be listed, a file that cannot
    be opened), ``notes`` what the search of the directories skipped.
    """

    files: list[tuple[str, str | Diagnostic]] = field(default_factory=list)
    unreadable: list[Diagnostic] = field(default_factory=list)
    notes: list[Diagnostic] = field(default_factory=list)

    def replaced(self, texts: Mapping[str, str | None]) -> RuleFiles:
        """These files with the text of each path in *texts* replaced by its
        value, or left out where that is None."""
        files: list[tuple[str, str | Diagnostic]] = []
        for path, got in self.files:
            if path not in texts:
                files.append((path, got))
            elif (text := texts[path]) is not None:
                files.append((path, text))
        return RuleFiles(files, list(self.unreadable), list(self.notes))


@dataclass
class LoadResult:
    """A valid rule set: the table, what was noted on the way, and what was read."""

    table: RouteTable
    notes: list[Diagnostic] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    documents: list[ObjectSummary] = field(default_factory=list)


def rule_files(paths: Sequence[str], report: Report) -> tuple[list[str], list[Diagnostic]]:
    """Expand *paths* into the files to read; missing paths are returned apart."""
    files: list[str] = []
    unreadable: list[Diagnostic] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                unreadable.append(Diagnostic(file=path, message=f"cannot list: {exc.strerror}"))
                continue
            found = False
            for name in names:
                if name.startswith("."):
                    continue  # ConfigMap internals (..data, ..2024_...) and dotfiles
                full = os.path.join(path, name)
                if os.path.isdir(full):
                    report.add(
                        Diagnostic(
                            file=full,
                            message="directory skipped (sub-directories are not read)",
                            severity="note",
                        )
                    )
                    continue
                if not name.endswith(RULE_SUFFIXES):
                    report.add(
                        Diagnostic(
                            file=full,
                            message="skipped (only *.yaml, *.yml and *.json files are read)",
                            severity="note",
                        )
                    )
                    continue
                files.append(full)
                found = True
            if not found:
                report.add(
                    Diagnostic(
                        file=path,
                        message="no *.yaml, *.yml or *.json files here; no rules from it",
                        severity="note",
                    )
                )
        elif os.path.lexists(path) or os.path.exists(path):
            files.append(path)
        else:
            unreadable.append(Diagnostic(file=path, message="no such file or directory"))
    # A file named twice (DIR and DIR/r.yaml, DIR and DIR/) is read once: read
    # twice, each of its objects was its own duplicate, and the whole rule set
    # was refused.
    once: dict[str, str] = {}
    for path in files:
        once.setdefault(os.path.realpath(path), path)
    return list(once.values()), unreadable


def read_rules(
    paths: Sequence[str], *, max_bytes: int = DEFAULT_MAX_BYTES, read_pipes: bool = True
) -> RuleFiles:
    """Find the rule files of *paths* and read each (see :class:`RuleFiles`).

    A path named on its own is read as it is (a pipe too) unless
    *read_pipes* is False: the sidecar reads its rules again at every
    change, and the open of a pipe without a writer never returned.
    """
    if isinstance(paths, str):
        paths = [paths]
    report = Report()
    found, unreadable = rule_files(paths, report)
    read = RuleFiles(unreadable=unreadable, notes=report.diagnostics)
    named = set(paths) if read_pipes else set()
    for path in found:
        try:
            text = read_file(path, max_bytes=max_bytes, regular_only=path not in named)
        except Unreadable as exc:
            read.unreadable.append(Diagnostic(file=path, message=f"cannot read: {exc}"))
            continue
        except SourceProblem as exc:
            problem = Diagnostic(file=path, line=exc.line, column=exc.column, message=exc.message)
            read.files.append((path, problem))
            continue
        read.files.append((path, text))
    return read


def load_rules(
    paths: Sequence[str],
    *,
    namespace: str = "default",
    domain: str = "cluster.local",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_nodes: int = DEFAULT_MAX_NODES,
    seed: int | None = None,
    read_pipes: bool = True,
    read: RuleFiles | None = None,
    pod_labels: Mapping[str, str] | None = None,
) -> LoadResult:
    """Load rule documents from files and directories into one RouteTable.

    *namespace* is the namespace of objects without ``metadata.namespace``
    (and whose short names a Host header may use); *domain* the cluster DNS
    domain. *read*: the files as :func:`read_rules` read them, loaded in
    place of reading *paths* (then *max_bytes* and *read_pipes* are
    :func:`read_rules`' business). *pod_labels*: the labels of the pod the
    sidecar runs in, which pick the DestinationRules of a
    ``workloadSelector`` that apply; None: not known (``validate``
    without ``--pod-labels``), where none of them does. Raises :class:`ConfigUnreadable` when a
    path cannot be read, :class:`ConfigError` when anything is invalid.
    """
    if read is None:
        read = read_rules(paths, max_bytes=max_bytes, read_pipes=read_pipes)
    env = Env(namespace, domain, pod_labels=None if pod_labels is None else dict(pod_labels))
    report = Report(list(read.notes))
    drafts = Drafts()
    summaries: list[ObjectSummary] = []
    seen: dict[tuple[str, str, str], Where] = {}
    sources: list[str] = []
    budget = NodeBudget(max_nodes)  # one for the whole load
    for path, text in read.files:
        if isinstance(text, Diagnostic):  # (not taken as text: an error of this file)
            report.add(text)
            continue
        sources.append(path)
        try:
            for doc in parse_documents(text, path, budget=budget):
                _read_object(report, doc, (), doc.value, env, drafts, summaries, seen)
        except SourceProblem as exc:
            report.add(Diagnostic(file=path, line=exc.line, column=exc.column, message=exc.message))
    if read.unreadable:
        raise ConfigUnreadable(read.unreadable + report.diagnostics, summaries)
    if report.has_errors:
        raise ConfigError(report.diagnostics, summaries)
    table = build_table(drafts, env, seed)
    if report.has_errors:
        raise ConfigError(report.diagnostics, summaries)
    return LoadResult(table, report.diagnostics, sources, summaries)


def _read_object(
    report: Report,
    doc: Document,
    base: Path,
    value: Any,
    env: Env,
    drafts: Drafts,
    summaries: list[ObjectSummary],
    seen: dict[tuple[str, str, str], Where],
) -> None:
    line = doc.line_of(base)
    if not isinstance(value, dict):
        report.add(
            Diagnostic(
                file=doc.file,
                line=line,
                message=f"document is {type_name(value)}, not a mapping (each document must be "
                "one object with apiVersion, kind, metadata and spec)",
            )
        )
        return
    kind = value.get("kind")
    api = value.get("apiVersion")
    if not isinstance(kind, str) or not kind or not isinstance(api, str) or not api:
        missing = " and ".join(
            k for k in ("apiVersion", "kind") if not isinstance(value.get(k), str) or not value[k]
        )
        report.add(
            Diagnostic(
                file=doc.file,
                line=line,
                message=f"document has no {missing} (each document needs apiVersion, kind, "
                "metadata and spec)",
            )
        )
        return
    ctx = Ctx(report, doc, base, kind, None, env.namespace)
    if kind == "List" and api == "v1":
        items = value.get("items")
        if not isinstance(items, list):
            ctx.error(("items",), "a List needs items: a list of objects")
            return
        for i, item in enumerate(items):
            _read_object(report, doc, (*base, "items", i), item, env, drafts, summaries, seen)
        return
    meta = value.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    group = api.rsplit("/", 1)[0] if "/" in api else ""
    if group == _gateway_api.GROUP and kind == "GatewayClass":
        # (an implementation's install names its class: a manifest copied
        # from a quickstart holds one beside its Gateway and routes)
        shown = name if isinstance(name, str) else "(unnamed)"
        ctx.name = shown
        ctx.note(
            (),
            "skipped (l4proxy serves every Gateway in these files, whatever its gatewayClassName)",
        )
        summaries.append(ObjectSummary(kind, shown, env.namespace, doc.file, line, skipped=True))
        return
    if group == _gateway_api.GROUP and kind not in _gateway_api.KINDS:
        hint = _GATEWAY_API_HINTS.get(kind, "")
        ctx.error(
            ("kind",),
            f"kind {kind} ({api}) is not implemented by l4proxy; of the Gateway API it "
            f"reads {', '.join(_gateway_api.KINDS)} (GatewayClass: skipped)"
            + (f"; {hint}" if hint else ""),
        )
        return
    istio_gateway = kind == "Gateway" and group == _istio_gateway_servers.GROUP
    gateway_kind = kind in _gateway_api.KINDS and not istio_gateway
    if (
        kind not in RULE_KINDS
        or (kind == "Ingress" and api not in _ingress.API_VERSIONS)
        or (gateway_kind and group != _gateway_api.GROUP)
    ):
        if group in _K8S_GROUPS or group.endswith(".k8s.io"):
            shown = name if isinstance(name, str) else "(unnamed)"
            ctx.name = shown
            ctx.note((), "skipped (a Kubernetes object, not a rule)")
            summaries.append(
                ObjectSummary(
                    kind,
                    shown,
                    ns if isinstance(ns, str) else env.namespace,
                    doc.file,
                    line,
                    skipped=True,
                )
            )
            if kind == "Service" and isinstance(name, str):
                drafts.k8s_services.add(
                    fqdn(name, ns if isinstance(ns, str) else env.namespace, env)
                )
            return
        if group.endswith("istio.io"):
            hint = _ISTIO_UNIMPLEMENTED.get(kind, "")
            ctx.error(
                ("kind",),
                f"kind {kind} ({api}) is not implemented by l4proxy"
                + (f"; {hint}" if hint else "")
                + f" (it reads {', '.join(RULE_KINDS)})",
            )
        else:
            ctx.error(
                ("kind",),
                f"unknown kind {kind} ({api}); l4proxy reads {', '.join(RULE_KINDS)} "
                "and skips Kubernetes objects: remove it or move it to another file",
            )
        return
    versions = {
        "RouteRule": _routerule.API_VERSIONS,
        "Ingress": _ingress.API_VERSIONS,
        "HTTPRoute": _gateway_api.API_VERSIONS,
        "Gateway": _networking.API_VERSIONS if istio_gateway else _gateway_api.API_VERSIONS,
        "ReferenceGrant": _gateway_api.GRANT_API_VERSIONS,
    }.get(kind, _networking.API_VERSIONS)
    if api not in versions:
        ctx.error(
            ("apiVersion",),
            f"apiVersion {api} is not supported for {kind} (use {' or '.join(versions)})",
        )
        return
    outer = ("apiVersion", "kind", "metadata", "spec", "status")
    top = fields(ctx, value, (), allowed=outer, required=("metadata",))
    if top is not None and top.get("spec") is None:
        # spec's fields written at the top (not indented under it): each is
        # an unknown field above; the kind's own checks of a spec it lacks
        # (hosts required, a route needed) would only repeat that
        stray = [str(k) for k in top if k not in outer]
        ctx.error(
            (),
            "spec is required"
            + (
                f" ({', '.join(stray)}: indent {'it' if len(stray) == 1 else 'them'} under spec:)"
                if stray
                else ""
            ),
        )
        return
    if top is not None and top["spec"] in ("", [], {}):
        ctx.error(("spec",), "spec must not be empty")
    if top is None or not isinstance(meta, dict):
        if top is not None and meta is not None:
            ctx.error(("metadata",), f"metadata must be a mapping, not {type_name(meta)}")
        return
    got_name = dns_subdomain(ctx, name, ("metadata", "name"))
    if ns is not None:
        ctx.namespace = dns_label(ctx, ns, ("metadata", "namespace")) or env.namespace
    if got_name is None:
        return
    ctx.name = got_name
    summaries.append(ObjectSummary(kind, got_name, ctx.namespace, doc.file, line))
    # (an Istio Gateway and a Gateway API one may share a name)
    key = (f"{kind}.{group}" if istio_gateway else kind, ctx.namespace, got_name)
    first = seen.get(key)
    if first is not None:
        ctx.error(
            ("metadata", "name"),
            f"duplicate name: {kind} {ctx.namespace}/{got_name} is already defined at "
            f"{first.location} (each kind/namespace/name once; rule files that replace "
            "each other must be loaded one at a time)",
        )
        return
    seen[key] = Where(ctx, ("metadata", "name"))
    if kind == "RouteRule":
        rr = _routerule.read_route_rule(ctx, value, env)
        if rr is not None:
            drafts.rules.append(rr)
    elif kind == "VirtualService":
        vs = _networking.read_virtual_service(ctx, value, env)
        if vs is not None:
            drafts.rules.append(vs)
    elif kind == "DestinationRule":
        dr = _networking.read_destination_rule(ctx, value, env)
        if dr is not None:
            drafts.policies.append(dr)
    elif kind == "ServiceEntry":
        drafts.services.extend(_networking.read_service_entry(ctx, value, env) or [])
    elif kind == "HTTPRoute":
        hr = _gateway_api.read_http_route(ctx, value, env)
        if hr is not None:
            drafts.http_routes.append(hr)
    elif istio_gateway:
        igw = _istio_gateway_servers.read_gateway(ctx, value, env)
        if igw is not None:
            drafts.istio_gateways.append(igw)
    elif kind == "Gateway":
        gw = _gateway_api.read_gateway(ctx, value, env)
        if gw is not None:
            drafts.gateways.append(gw)
    elif kind == "ReferenceGrant":
        grant = _gateway_api.read_reference_grant(ctx, value)
        if grant is not None:
            drafts.grants.append(grant)
    else:
        drafts.ingress.extend(_ingress.read_ingress(ctx, value, env, api) or [])
