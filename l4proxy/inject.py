"""``l4proxy inject``: add l4proxy's init container, sidecar and rule volume to
every Pod template of a Kubernetes manifest (what ``istioctl kube-inject`` did).

Theory of operation
-------------------
The input is split into YAML documents *as text* (at ``---`` lines). A
document whose object has a Pod template (Pod, Deployment, StatefulSet,
DaemonSet, ReplicaSet, ReplicationController, Job, CronJob, or a ``List`` of
them) is parsed, changed and written back; every other document is copied
byte for byte, comments included. (A changed document loses its comments
inside the object: PyYAML does not keep them. Its leading comment lines are
kept.)

Injection is a pure function of (template, options): it first removes what an
earlier injection added (the containers ``l4proxy-init`` and ``l4proxy`` and
the volumes ``l4proxy-rules`` and ``l4proxy-podinfo``, as its status annotation
records them: a container or volume of the user's with one of those names is
an error, never replaced),
then adds them afresh. So injecting twice
equals injecting once, and injecting again with other options updates a
manifest in place. The template's ``l4proxy.io/status`` annotation records
what was added and with which image; it holds no time stamp, on purpose.

The sidecar is by default a Kubernetes *native sidecar* (an init container
with ``restartPolicy: Always``, Kubernetes 1.29 and later): it starts before
the app's containers and is ready (its startup probe) before they run, so an
app's first connection is not refused, and it stops after them, so a Job's
pod completes. ``--sidecar container`` puts it first among the app's
containers instead, for older clusters: its postStart hook (``l4proxy-ready
--wait``) holds the app's containers until the proxy is ready, and it keeps
accepting inbound for a few seconds after SIGTERM (``--drain-inbound``), which
it gets together with the app.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import yaml

from l4proxy import __version__
from l4proxy.k8s_names import DNS1123_SUBDOMAIN

INIT_NAME = "l4proxy-init"
SIDECAR_NAME = "l4proxy"
VOLUME_NAME = "l4proxy-rules"
PODINFO_VOLUME = "l4proxy-podinfo"  # the pod's labels (Downward API), for match.source
PODINFO_MOUNT = "/etc/l4proxy-pod"
STATUS_ANNOTATION = "l4proxy.io/status"
INJECT_ANNOTATION = "l4proxy.io/inject"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
ISTIO_INJECT = "sidecar.istio.io/inject"
# Per-template capture exclusions, PREFIX + excludeInboundPorts,
# excludeOutboundPorts or excludeOutboundIPRanges: l4proxy's names and Istio's;
# they add to the command line's --exclude-inbound-ports/--exclude-outbound-ports.
EXCLUDE_PREFIXES = ("l4proxy.io/", "traffic.sidecar.istio.io/")
# The sidecar's resources: option -> annotation name, after l4proxy.io/ or
# Istio's sidecar.istio.io/; an annotation wins over the command line (it is
# the workload's own), l4proxy's over Istio's.
PROXY_CPU, PROXY_MEMORY, PROXY_MEMORY_LIMIT = "50m", "64Mi", "256Mi"
RESOURCE_ANNOTATIONS = {
    "proxy_cpu": "proxyCPU",
    "proxy_memory": "proxyMemory",
    "proxy_cpu_limit": "proxyCPULimit",
    "proxy_memory_limit": "proxyMemoryLimit",
}
RESOURCE_PREFIXES = ("l4proxy.io/", "sidecar.istio.io/")
RULES_MOUNT = "/etc/l4proxy"
PROXY_UID = 1337
PROXY_PORT = 15001
READY_WAIT_S = 60  # container mode: the most the app's start waits for the proxy
DRAIN_INBOUND_S = 5  # container mode: inbound accepted this long after SIGTERM
DEFAULT_IMAGE = f"l4proxy:{__version__}"
DEFAULT_CONFIGMAP = "l4proxy-rules"

# kind -> path from the object to its Pod template ("" = the object is the pod).
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

# apiVersion/kind pairs current Kubernetes no longer serves, and the release
# that stopped serving them.
REMOVED_APIS: dict[tuple[str, str], str] = {
    ("apps/v1beta1", "Deployment"): "1.16",
    ("apps/v1beta1", "StatefulSet"): "1.16",
    ("apps/v1beta2", "Deployment"): "1.16",
    ("apps/v1beta2", "StatefulSet"): "1.16",
    ("apps/v1beta2", "DaemonSet"): "1.16",
    ("apps/v1beta2", "ReplicaSet"): "1.16",
    ("extensions/v1beta1", "Deployment"): "1.16",
    ("extensions/v1beta1", "DaemonSet"): "1.16",
    ("extensions/v1beta1", "ReplicaSet"): "1.16",
    ("batch/v2alpha1", "CronJob"): "1.21",
    ("batch/v1beta1", "CronJob"): "1.25",
}
CURRENT_API = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "ReplicaSet": "apps/v1",
    "CronJob": "batch/v1",
}

EPILOG = f"""\
what is added to each Pod template:
  initContainers     {INIT_NAME} (first; with --sidecar container last, after yours):
                     l4proxy-init -p {PROXY_PORT} -u {PROXY_UID} [-d PORTS] [-o PORTS] [-x CIDRS]
                     (-d includes --stats-port: the sidecar's own, not captured)
                     as root with only NET_ADMIN and NET_RAW, read-only root filesystem:
                     installs the iptables rules that send the pod's TCP to the sidecar
                     (so the namespace needs the Pod Security level privileged)
  the sidecar        {SIDECAR_NAME}: l4proxy run --rules {RULES_MOUNT}
                     --pod-labels-file {PODINFO_MOUNT}/labels [--drain-quiet 0: native,
                     stopped once the app has exited], as uid {PROXY_UID},
                     read-only root filesystem, no capabilities (both containers:
                     seccompProfile RuntimeDefault); readiness (and startup)
                     probe: the exec command l4proxy-ready, which asks the admin
                     endpoint's /ready on 127.0.0.1:15000 from inside the pod.
                     With --sidecar container: the first container, a postStart hook
                     l4proxy-ready --wait {READY_WAIT_S} (the app starts once the proxy is
                     ready), --drain-inbound {DRAIN_INBOUND_S}, and the annotation
                     kubectl.kubernetes.io/default-container: the first app container
  volumes            {VOLUME_NAME}: the rule ConfigMap (--configmap), mounted read-only
                     at {RULES_MOUNT}; {PODINFO_VOLUME}: the pod's labels (Downward API)
                     at {PODINFO_MOUNT}, for RouteRule match.source / sourceLabels
  annotations        {STATUS_ANNOTATION} on the template: what was injected; with
                     --stats-port, prometheus.io/scrape, /port, /path, unless the
                     template has prometheus.io/* of its own (those are kept)
A template annotated {INJECT_ANNOTATION}: "false", or with hostNetwork: true, is left
alone (capturing a host-network pod would capture the node's traffic), and what an
earlier injection added to it is taken out. ({ISTIO_INJECT}: "false" is not
honoured: a warning says so.)

per-template annotations (Istio's traffic.sidecar.istio.io/ names work too; both add
to the options above):
  l4proxy.io/excludeInboundPorts: "9090,9091"       l4proxy-init -d
  l4proxy.io/excludeOutboundPorts: "5432"           l4proxy-init -o
  l4proxy.io/excludeOutboundIPRanges: "10.0.0.0/8"  l4proxy-init -x (CIDRs)
and (Istio's sidecar.istio.io/ names work too; they win over the options):
  l4proxy.io/proxyCPU, proxyMemory                  the sidecar's requests
  l4proxy.io/proxyCPULimit, proxyMemoryLimit        its limits (Kubernetes quantities)
Set resources this way: re-injecting replaces hand edits of the sidecar.

examples:
  l4proxy inject -f bootcamp.yaml -o bootcamp-injected.yaml
  kubectl get deploy bootcamp-v1 -o yaml | l4proxy inject -f - | kubectl apply -f -
  l4proxy inject -f app.yaml --image registry.example/l4proxy:{__version__} \\
      --configmap my-rules --exclude-inbound-ports 9090 --exclude-outbound-ports 5432

Injecting an injected manifest changes nothing; with other options it updates
what was injected. Documents without a Pod template (Services, ConfigMaps, ...)
are copied byte for byte. Old API versions (apps/v1beta1, extensions/v1beta1,
...) are injected as they are, with a warning: current Kubernetes no longer
serves them.

exit codes: 0 written, 1 the input is not valid YAML or a Pod template is
malformed, 2 usage error or unreadable input.
"""


class InjectError(Exception):
    """The manifest cannot be injected (exit code 1)."""


STATS_PORT_NAME = "http-envoy-prom"  # Istio's name for its sidecars' scrape port


def prometheus_annotations(port: int) -> dict[str, str]:
    """What ``--stats-port PORT`` adds to a template that has none of its own."""
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/stats/prometheus",
    }


def _take_out_ours(annotations: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """Remove from *annotations* those an earlier injection added, while they
    hold what it wrote; the keys removed. The prometheus.io/* go together: one
    of them edited (or deleted) by hand makes them all the user's, so a
    scrape is never left half configured."""
    ours = _ours_before(before)
    prometheus = {k: v for k, v in ours.items() if k.startswith("prometheus.io/")}
    if any(annotations.get(k) != v for k, v in prometheus.items()):
        ours = {k: v for k, v in ours.items() if k not in prometheus}
    removed = [k for k, v in ours.items() if annotations.get(k) == v]
    for key in removed:
        del annotations[key]
    return removed


def _ours_before(before: dict[str, Any]) -> dict[str, str]:
    """The annotations an earlier injection added, with the values it wrote."""
    recorded = before.get("annotations")
    if isinstance(recorded, dict):
        return {str(k): str(v) for k, v in recorded.items()}
    port = before.get("statsPort")
    if isinstance(port, int) and not isinstance(port, bool):
        # an older inject's status: with statsPort it added all three, always
        return prometheus_annotations(port)
    return {}


@dataclass(frozen=True)
class InjectOptions:
    image: str = DEFAULT_IMAGE
    configmap: str = DEFAULT_CONFIGMAP
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()  # from the template's annotations
    sidecar: str = "native"  # or "container"
    pull_policy: str | None = None
    http_routing: str = "request"  # "connection": route by each connection's first head
    stats_port: int = 0  # --stats-listen 0.0.0.0:PORT and Prometheus annotations; 0: off
    access_log: str = ""  # "text" or "json": --access-log - in that format; "": off
    # the sidecar's resources (Kubernetes quantities); None: the defaults
    proxy_cpu: str | None = None
    proxy_memory: str | None = None
    proxy_cpu_limit: str | None = None
    proxy_memory_limit: str | None = None

    def proxy_resources(self) -> dict[str, dict[str, str]]:
        limits = {"cpu": self.proxy_cpu_limit} if self.proxy_cpu_limit else {}
        return {
            "requests": {
                "cpu": self.proxy_cpu or PROXY_CPU,
                "memory": self.proxy_memory or PROXY_MEMORY,
            },
            "limits": {**limits, "memory": self.proxy_memory_limit or PROXY_MEMORY_LIMIT},
        }

    def status(self, added: dict[str, str] | None = None) -> str:
        return json.dumps(
            {
                "version": __version__,
                "image": self.image,
                "sidecar": self.sidecar,
                "initContainers": [INIT_NAME, SIDECAR_NAME]
                if self.sidecar == "native"
                else [INIT_NAME],
                "containers": [SIDECAR_NAME] if self.sidecar == "container" else [],
                "volumes": [VOLUME_NAME, PODINFO_VOLUME],
                **({"statsPort": self.stats_port} if self.stats_port else {}),
                **({"accessLog": self.access_log} if self.access_log else {}),
                # the annotations inject added, as it wrote them: only those are
                # taken out again (the user's are never recorded, and stay)
                **({"annotations": added} if added or self.stats_port else {}),
            },
            separators=(",", ":"),
        )


PSA_NOTE = (
    f"{INIT_NAME} runs as root with NET_ADMIN and NET_RAW, which the Pod Security "
    "Standards baseline and restricted levels refuse: the namespace needs "
    "pod-security.kubernetes.io/enforce=privileged (as Istio without its CNI plugin); "
    "the sidecar itself meets restricted"
)


@dataclass
class InjectResult:
    text: str
    injected: list[str] = field(default_factory=list)  # "Kind name" of each injected template
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """Said once per run, whatever the number of templates."""
        return [PSA_NOTE] if self.injected else []


def _ports(values: Sequence[int]) -> str:
    return ",".join(str(p) for p in values)


def init_container(opts: InjectOptions) -> dict[str, Any]:
    command = ["l4proxy-init", "-p", str(PROXY_PORT), "-u", str(PROXY_UID)]
    if opts.exclude_inbound_ports:
        command += ["-d", _ports(opts.exclude_inbound_ports)]
    if opts.exclude_outbound_ports:
        command += ["-o", _ports(opts.exclude_outbound_ports)]
    if opts.exclude_outbound_cidrs:
        command += ["-x", ",".join(opts.exclude_outbound_cidrs)]
    c: dict[str, Any] = {"name": INIT_NAME, "image": opts.image}
    if opts.pull_policy:
        c["imagePullPolicy"] = opts.pull_policy
    c.update(
        {
            "command": command,
            "securityContext": {
                # iptables needs root in the pod's network namespace, with
                # NET_ADMIN and NET_RAW, and nothing else.
                "runAsUser": 0,
                "runAsGroup": 0,
                "runAsNonRoot": False,
                "privileged": False,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                # the runtime's default filter (unset is Unconfined on most kubelets)
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {
                "requests": {"cpu": "10m", "memory": "32Mi"},
                "limits": {"memory": "64Mi"},
            },
        }
    )
    return c


def sidecar_container(opts: InjectOptions) -> dict[str, Any]:
    probe = {"exec": {"command": ["l4proxy-ready"]}}
    c: dict[str, Any] = {"name": SIDECAR_NAME, "image": opts.image}
    if opts.pull_policy:
        c["imagePullPolicy"] = opts.pull_policy
    if opts.sidecar == "native":
        c["restartPolicy"] = "Always"
    c.update(
        {
            "command": ["l4proxy", "run", "--rules", RULES_MOUNT]
            + ["--pod-labels-file", f"{PODINFO_MOUNT}/labels"]
            + (["--http-routing", "connection"] if opts.http_routing == "connection" else [])
            # As a container it gets SIGTERM with the app, while endpoints still
            # send the pod requests the app is serving: keep accepting them.
            + (["--drain-inbound", str(DRAIN_INBOUND_S)] if opts.sidecar == "container" else [])
            # A native sidecar gets SIGTERM once the app's containers have
            # exited: no outbound call is left to wait 5 quiet seconds for (each
            # termination, and a Job's completion, waited for them).
            + (["--drain-quiet", "0"] if opts.sidecar == "native" else [])
            + (["--stats-listen", f"0.0.0.0:{opts.stats_port}"] if opts.stats_port else [])
            # (standard output: kubectl logs POD -c l4proxy, as Istio's /dev/stdout)
            + (
                ["--access-log", "-", "--access-log-format", opts.access_log]
                if opts.access_log
                else []
            ),
            "env": [
                {
                    "name": "POD_NAMESPACE",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                }
            ],
            "securityContext": {
                "runAsUser": PROXY_UID,
                "runAsGroup": PROXY_UID,
                "runAsNonRoot": True,
                "privileged": False,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},  # as Pod Security "restricted" asks
            },
            **(
                {"ports": [{"name": STATS_PORT_NAME, "containerPort": opts.stats_port}]}
                if opts.stats_port
                else {}
            ),
            "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 2},
            "resources": opts.proxy_resources(),
            "volumeMounts": [
                {"name": VOLUME_NAME, "mountPath": RULES_MOUNT, "readOnly": True},
                {"name": PODINFO_VOLUME, "mountPath": PODINFO_MOUNT, "readOnly": True},
            ],
        }
    )
    if opts.sidecar == "native":
        # The kubelet starts the app's containers once this succeeds.
        c["startupProbe"] = {**probe, "periodSeconds": 1, "failureThreshold": 60}
    else:
        # The kubelet starts the next container (the app's) only once this
        # hook has returned: the app's first connection finds the proxy.
        c["lifecycle"] = {
            "postStart": {"exec": {"command": ["l4proxy-ready", "--wait", str(READY_WAIT_S)]}}
        }
    return c


def rules_volume(opts: InjectOptions) -> dict[str, Any]:
    return {"name": VOLUME_NAME, "configMap": {"name": opts.configmap}}


def podinfo_volume() -> dict[str, Any]:
    """The pod's labels as a file: RouteRule match.source and sourceLabels
    match on them (without them no such rule matches in an injected pod)."""
    return {
        "name": PODINFO_VOLUME,
        "downwardAPI": {
            "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
        },
    }


def _without(items: Any, names: Sequence[str]) -> list[Any]:
    if not isinstance(items, list):
        return []
    return [i for i in items if not (isinstance(i, dict) and i.get("name") in names)]


def _list_of_mappings(spec: dict[str, Any], key: str, what: str) -> list[Any]:
    """spec[key] as a list of mappings ([] when absent); anything else is an error
    (it was dropped, or it raised an AttributeError)."""
    items = spec.get(key)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InjectError(f"{what}: spec.{key} must be a list of mappings")
    return items


def _tcp_probe_ports(container: dict[str, Any]) -> list[int]:
    """The ports of a container's tcpSocket probes (a named port resolved)."""
    named = {
        p.get("name"): p.get("containerPort")
        for p in container.get("ports") or []
        if isinstance(p, dict)
    }
    out = []
    for key in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(key)
        tcp = probe.get("tcpSocket") if isinstance(probe, dict) else None
        port = tcp.get("port") if isinstance(tcp, dict) else None
        port = named.get(port, port) if isinstance(port, str) else port
        if isinstance(port, int) and port not in out:
            out.append(port)
    return out


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _injected_before(annotations: dict[str, Any]) -> dict[str, Any]:
    """What an earlier ``l4proxy inject`` recorded in the status annotation."""
    try:
        before = json.loads(str(annotations.get(STATUS_ANNOTATION) or "{}"))
    except ValueError:
        return {}
    return before if isinstance(before, dict) else {}


def _annotated(annotations: dict[str, Any], name: str) -> list[tuple[str, list[str]]]:
    """(key, items) of each of the template's PREFIX + *name* annotations."""
    out = []
    for key in (prefix + name for prefix in EXCLUDE_PREFIXES):
        if annotations.get(key) is not None:
            out.append((key, [i.strip() for i in str(annotations[key]).split(",") if i.strip()]))
    return out


def _annotated_ports(annotations: dict[str, Any], name: str, what: str) -> list[int]:
    ports = []
    for key, items in _annotated(annotations, name):
        for item in items:
            if not (item.isascii() and item.isdigit()) or not 1 <= int(item) <= 65535:
                raise InjectError(
                    f"{what}: annotation {key}: {item!r} is not a TCP port (1-65535; "
                    "a comma-separated list, e.g. 9090,9091)"
                )
            ports.append(int(item))
    return ports


def _annotated_cidrs(annotations: dict[str, Any], what: str) -> list[str]:
    """The excludeOutboundIPRanges as l4proxy-init -x reads them (host bits
    masked, as iptables does)."""
    nets = []
    for key, items in _annotated(annotations, "excludeOutboundIPRanges"):
        for item in items:
            if "%" in item:
                raise InjectError(
                    f"{what}: annotation {key}: {item!r} has an IPv6 zone index (%...), "
                    "which an iptables rule cannot match"
                )
            try:
                nets.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise InjectError(
                    f"{what}: annotation {key}: {item!r} is not an IPv4 or IPv6 CIDR "
                    "(a comma-separated list, e.g. 10.0.0.0/8,fd00::/8)"
                ) from None
    return nets


_QUANTITY = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?"
)
_SUFFIX = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{
        s: Decimal(10) ** e
        for s, e in zip("numkMGTPE", (-9, -6, -3, 3, 6, 9, 12, 15, 18), strict=True)
    },
}


def quantity(text: str) -> Decimal | None:
    """A Kubernetes resource quantity's value (``250m``, ``1.5``, ``128Mi``,
    ``1e3``); None if *text* is not one (or is negative)."""
    m = _QUANTITY.fullmatch(text.strip())
    if m is None:
        return None
    suffix = m["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(m["number"]) * Decimal(10) ** int(suffix[1:])
    return Decimal(m["number"]) * _SUFFIX.get(suffix, Decimal(1))


def _resources_of(
    opts: InjectOptions, annotations: dict[str, Any], what: str, warnings: list[str]
) -> InjectOptions:
    """*opts* with the template's proxyCPU/proxyMemory/... annotations, checked."""
    chosen: dict[str, Any] = {}
    for option, name in RESOURCE_ANNOTATIONS.items():
        found = {
            prefix + name: str(annotations[prefix + name]).strip()
            for prefix in RESOURCE_PREFIXES
            if annotations.get(prefix + name) is not None
        }
        for key, value in found.items():
            if quantity(value) is None:
                raise InjectError(
                    f"{what}: annotation {key}: {value!r} is not a Kubernetes quantity "
                    "(e.g. 100m or 0.5 CPU, 128Mi or 1Gi memory)"
                )
        if len(set(found.values())) > 1:
            warnings.append(
                f"{what}: {' and '.join(f'{k}={v}' for k, v in found.items())} differ: "
                f"{next(iter(found))} is the one used"
            )
        chosen[option] = next(iter(found.values()), getattr(opts, option))
    opts = replace(opts, **chosen)
    resources = opts.proxy_resources()
    for kind in ("cpu", "memory"):
        request, limit = resources["requests"][kind], resources["limits"].get(kind)
        if limit is not None and (quantity(request) or 0) > (quantity(limit) or 0):
            raise InjectError(
                f"{what}: the sidecar's {kind} request {request} is above its limit {limit} "
                f"(the API server refuses such a pod): set the {kind} limit too "
                f"(--proxy-{kind}-limit or the annotation "
                f"l4proxy.io/{RESOURCE_ANNOTATIONS[f'proxy_{kind}_limit']})"
            )
    return opts


T = TypeVar("T")


def _unique(values: Sequence[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(values))


def _remove_injection(
    meta: dict[str, Any],
    spec: dict[str, Any],
    annotations: dict[str, Any],
    why: str,
    what: str,
    warnings: list[str],
) -> None:
    """A template left alone that an earlier injection changed: take out what
    that injection recorded (its containers, volumes and annotations), and
    nothing of the user's."""
    if STATUS_ANNOTATION not in annotations:
        return
    before = _injected_before(annotations)
    removed = []
    for key, names in (
        ("initContainers", (INIT_NAME, SIDECAR_NAME)),
        ("containers", (SIDECAR_NAME,)),
        ("volumes", (VOLUME_NAME, PODINFO_VOLUME)),
    ):
        items = _list_of_mappings(spec, key, what)
        ours = [n for n in names if n in (before.get(key) or ())]
        kept = _without(items, ours)
        removed += [f"{key} {i.get('name')}" for i in items if i not in kept]
        if len(kept) != len(items):
            if kept or key == "containers":
                spec[key] = kept
            else:
                del spec[key]
    notes = dict(annotations)
    removed += [f"annotation {key}" for key in _take_out_ours(notes, before)]
    del notes[STATUS_ANNOTATION]
    removed.append(f"annotation {STATUS_ANNOTATION}")
    if notes:
        meta["annotations"] = notes
    else:
        meta.pop("annotations", None)
    warnings.append(
        f"{what}: {why}: took out what an earlier l4proxy inject added ({', '.join(removed)})"
    )


def inject_template(
    template: dict[str, Any], opts: InjectOptions, what: str, warnings: list[str], kind: str = "Pod"
) -> bool:
    """Inject one Pod template in place. False: left alone on purpose."""
    meta = template.setdefault("metadata", {})
    if meta is None:
        meta = template["metadata"] = {}
    spec = template.get("spec")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise InjectError(f"{what}: the Pod template has no spec (or metadata is not a mapping)")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InjectError(f"{what}: metadata.annotations must be a mapping")
    if str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false":
        _remove_injection(meta, spec, annotations, f'{INJECT_ANNOTATION}: "false"', what, warnings)
        return False
    if spec.get("hostNetwork") is True:
        warnings.append(
            f"{what}: hostNetwork: true, not injected (l4proxy-init would capture the node's "
            "traffic)"
        )
        _remove_injection(meta, spec, annotations, "hostNetwork: true", what, warnings)
        return False
    labels = meta.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    if "false" in (str(d.get(ISTIO_INJECT, "")).lower() for d in (annotations, labels)):
        warnings.append(
            f"{what}: {ISTIO_INJECT}: \"false\" is Istio's, not l4proxy's: injected all the "
            f'same; annotate the template {INJECT_ANNOTATION}: "false" to leave it alone'
        )
    opts = replace(
        opts,
        exclude_inbound_ports=_unique(
            [
                *opts.exclude_inbound_ports,
                *_annotated_ports(annotations, "excludeInboundPorts", what),
                # the sidecar serves it itself: not through its own capture (as
                # Istio excludes 15090 and 15021), so a scrape reaches it while it
                # drains and is no inbound connection of the app's
                *([opts.stats_port] if opts.stats_port else []),
            ]
        ),
        exclude_outbound_ports=_unique(
            [
                *opts.exclude_outbound_ports,
                *_annotated_ports(annotations, "excludeOutboundPorts", what),
            ]
        ),
        exclude_outbound_cidrs=_unique(
            [*opts.exclude_outbound_cidrs, *_annotated_cidrs(annotations, what)]
        ),
    )
    opts = _resources_of(opts, annotations, what, warnings)
    containers = _list_of_mappings(spec, "containers", what)
    init_containers = _list_of_mappings(spec, "initContainers", what)
    volumes = _list_of_mappings(spec, "volumes", what)
    if not containers:
        raise InjectError(f"{what}: the Pod template has no containers")
    # Only what an earlier injection recorded is ours to replace: a container
    # of the user's that is called l4proxy (l4proxy as a gateway) was removed.
    before = _injected_before(annotations)
    ours_before = {
        "containers": set(before.get("containers") or ()),
        "initContainers": set(before.get("initContainers") or ()),
        "volumes": set(before.get("volumes") or ()),
    }
    for key, items, names in (
        ("containers", containers, (SIDECAR_NAME,)),
        ("initContainers", init_containers, (INIT_NAME, SIDECAR_NAME)),
        ("volumes", volumes, (VOLUME_NAME, PODINFO_VOLUME)),
    ):
        for item in items:
            name = item.get("name")
            if name in names and name not in ours_before[key]:
                raise InjectError(
                    f"{what}: spec.{key} already has {name!r}, which l4proxy inject did not "
                    f'add: rename it, or annotate the template {INJECT_ANNOTATION}: "false"'
                )
    app_containers = _without(containers, [SIDECAR_NAME])
    if not app_containers:
        raise InjectError(f"{what}: the Pod template has no containers besides the sidecar")
    resources = opts.proxy_resources()
    for old in init_containers + containers:
        if old.get("name") == SIDECAR_NAME and old.get("resources", resources) != resources:
            warnings.append(
                f"{what}: the sidecar's resources {_json(old.get('resources'))} became "
                f"{_json(resources)}: to keep yours, annotate the template "
                "l4proxy.io/proxyCPU, proxyMemory, proxyCPULimit, proxyMemoryLimit (or pass "
                "--proxy-cpu, ...)"
            )
    for c in app_containers:
        for port in _tcp_probe_ports(c):
            if port not in opts.exclude_inbound_ports:
                warnings.append(
                    f"{what}: container {c.get('name')} has a tcpSocket probe on port {port}: "
                    "once its inbound TCP is captured the sidecar accepts for the app, and the "
                    f"probe passes whether the app listens or not; use httpGet or exec, or "
                    f"--exclude-inbound-ports {port}"
                )
        uid = (c.get("securityContext") or {}).get("runAsUser")
        pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
        if (uid if uid is not None else pod_uid) == PROXY_UID:
            warnings.append(
                f"{what}: container {c.get('name')} runs as uid {PROXY_UID}, the proxy's: its "
                "traffic is not captured"
            )
    init = _without(init_containers, [INIT_NAME, SIDECAR_NAME])
    # Native sidecar: ours first; capture is on from there, and the user's
    # init containers find the proxy running. As a container the proxy only
    # starts after every init container: capture must come last, or their
    # connections go to a port nobody listens on yet.
    if opts.sidecar == "native":
        all_init = [init_container(opts), sidecar_container(opts), *init]
    else:
        all_init = [*init, init_container(opts)]
        if kind in ("Job", "CronJob"):
            warnings.append(
                f"{what}: --sidecar container in a {kind}: the sidecar never exits, so the "
                "pod never completes (native sidecars, the default, stop with the app)"
            )
    new_spec: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "containers":  # initContainers just before containers, as one reads them
            new_spec["initContainers"] = all_init
            # As a container the sidecar comes first: the kubelet starts the
            # containers in order, and its postStart hook holds the next one
            # until the proxy is ready (Istio's holdApplicationUntilProxyStarts).
            sidecar = [sidecar_container(opts)] if opts.sidecar == "container" else []
            new_spec["containers"] = sidecar + app_containers
        elif key != "initContainers":
            new_spec[key] = value
    spec.clear()
    spec.update(new_spec)
    spec["volumes"] = [
        *_without(volumes, [VOLUME_NAME, PODINFO_VOLUME]),
        rules_volume(opts),
        podinfo_volume(),
    ]
    annotations = dict(annotations)
    # Annotations: only those inject added are taken out, and only while they
    # still hold what it wrote; the user's own are never replaced (their
    # prometheus.io/* scrape the app's metrics).
    _take_out_ours(annotations, before)
    added: dict[str, str] = {}
    if opts.stats_port:
        wanted = prometheus_annotations(opts.stats_port)
        users = {k: v for k, v in annotations.items() if str(k).startswith("prometheus.io/")}
        if not users:
            added.update(wanted)
        elif users != wanted:
            warnings.append(
                f"{what}: kept the template's own prometheus.io/* annotations "
                f"({', '.join(f'{k}={v}' for k, v in users.items())}): the app's metrics "
                f"win; the sidecar still serves /stats/prometheus on port {opts.stats_port} "
                f"(container port {STATS_PORT_NAME}): scrape it with a PodMonitor or a job "
                "on the port name *-envoy-prom, as Istio's envoy-stats does"
            )
    if opts.sidecar == "container" and DEFAULT_CONTAINER not in annotations:
        # the sidecar is the first container: kubectl logs/exec would pick it
        added[DEFAULT_CONTAINER] = str(app_containers[0].get("name"))
    annotations.update(added)
    annotations[STATUS_ANNOTATION] = opts.status(added)
    meta["annotations"] = annotations
    return True


def _template_of(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    node: Any = obj
    for key in TEMPLATE_PATHS[kind]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def inject_object(obj: Any, opts: InjectOptions, where: str, result: InjectResult) -> bool:
    """Inject every Pod template in *obj* (in place). True if anything changed."""
    if not isinstance(obj, dict):
        return False
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List")):
        items = obj.get("items")
        changed = False
        for i, item in enumerate(items if isinstance(items, list) else []):
            changed |= inject_object(item, opts, f"{where} items[{i}]", result)
        return changed
    if kind not in TEMPLATE_PATHS:
        return False
    assert isinstance(kind, str)
    name = (obj.get("metadata") or {}).get("name", "?")
    what = f"{where}: {kind} {name}"
    template = _template_of(obj, kind)
    if template is None:
        raise InjectError(f"{what}: no Pod template at {'.'.join(TEMPLATE_PATHS[kind])}")
    api = str(obj.get("apiVersion", ""))
    removed = REMOVED_APIS.get((api, kind))
    if removed is not None:
        result.warnings.append(
            f"{what} uses {api}, which Kubernetes no longer serves (removed in {removed}); "
            f"injected as it is: change it to {CURRENT_API[kind]} before applying it to a "
            "current cluster"
        )
    before = copy.deepcopy(template)
    if inject_template(template, opts, what, result.warnings, kind):
        result.injected.append(f"{kind} {name}")
    else:  # (what an earlier injection added is taken out)
        result.skipped.append(f"{kind} {name}")
    return template != before


_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$")


def split_documents(text: str) -> list[str]:
    """The documents of a YAML stream as text; joined again they are *text*.

    Each chunk after the first starts with its ``---`` line.
    """
    chunks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if _SEPARATOR.match(line.rstrip("\r\n")) and (chunks[-1] or len(chunks) > 1):
            chunks.append([])
        chunks[-1].append(line)
    return ["".join(c) for c in chunks if c]


class _Loader(yaml.SafeLoader):
    """YAML as kubectl reads it (go-yaml, through sigs.k8s.io/yaml).

    PyYAML's YAML 1.1 and kubectl disagree on plain scalars, and a document
    inject rewrote changed meaning: ``12:30`` became 750 (sexagesimal), an
    unquoted time stamp became a datetime and was written back in another
    form, ``1e3`` stayed a string but kubectl reads a number. So: booleans
    as kubectl reads them (y/n/yes/no/on/off/true/false), integers and floats
    as go-yaml's, null, merge keys; nothing else is implicit.
    """

    bool_values: ClassVar[dict[str, bool]] = {**yaml.SafeLoader.bool_values, "y": True, "n": False}


_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    (
        "bool",
        r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$",
        "yYnNtTfFoO",
    ),
    (
        "int",
        r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    ),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("merge", r"^(?:<<)$", "<"),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader


class _Dumper(yaml.SafeDumper):
    """Block style, lists indented under their key like kubectl writes them.

    A string is quoted when kubectl (:class:`_Loader`) or YAML 1.1 would
    read it as something else: ``"n"`` stays a string for both."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True  # no &id001 anchors: Kubernetes users read these files


for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _Dumper.add_implicit_resolver(_tag, _regexp, [_first])


def _dump(obj: Any) -> str:
    return yaml.dump(
        obj, Dumper=_Dumper, default_flow_style=False, sort_keys=False, allow_unicode=True
    )


def _header(chunk: str) -> tuple[str, str]:
    """(``---`` line and leading comment/blank lines, the rest)."""
    lines = chunk.splitlines(keepends=True)
    i = 0
    if lines and _SEPARATOR.match(lines[0].rstrip("\r\n")):
        after = lines[0].rstrip("\r\n")[3:].strip()
        if after and not after.startswith("#"):
            # content on the separator line (--- {...}, --- !tag): YAML read
            # it with the rest, and the document is written anew below ---
            return "---\n", chunk
        i = 1  # "---" or "--- # a comment": kept as it is
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1
    return "".join(lines[:i]), "".join(lines[i:])


def inject_text(text: str, opts: InjectOptions, source: str = "<stdin>") -> InjectResult:
    result = InjectResult(text="")
    out: list[str] = []
    for index, chunk in enumerate(split_documents(text)):
        where = f"{source} document {index + 1}"
        try:
            obj = _load(chunk)
        except yaml.YAMLError as exc:
            raise InjectError(f"{where}: not valid YAML: {exc}") from None
        if not inject_object(obj, opts, where, result):
            out.append(chunk)
            continue
        header, _ = _header(chunk)
        if header and not header.endswith("\n"):
            header += "\n"
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(header + _dump(obj))
    result.text = "".join(out)
    return result


def _port_list(value: str) -> tuple[int, ...]:
    ports = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise argparse.ArgumentTypeError(f"{item!r} is not a TCP port (1-65535)")
        ports.append(int(item))
    return tuple(dict.fromkeys(ports))


ADMIN_PORT = 15000


def _stats_port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (1-65535, or 0: off)")
    port = int(value)
    if port in (ADMIN_PORT, PROXY_PORT):
        what = "the admin endpoint's" if port == ADMIN_PORT else "the proxy's"
        raise argparse.ArgumentTypeError(f"{port} is {what} port in the pod; 15090 is Istio's")
    return port


def _quantity(value: str) -> str:
    if quantity(value) is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Kubernetes quantity (e.g. 100m or 0.5 CPU, 128Mi or 1Gi memory)"
        )
    return value.strip()


def _configmap_name(value: str) -> str:
    if not DNS1123_SUBDOMAIN.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a ConfigMap name (lower-case letters, digits, '-' and '.'; "
            "the ConfigMap must be in the pod's namespace, so no NAMESPACE/)"
        )
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inject",
        help="add the l4proxy init container and sidecar to Kubernetes manifests",
        description="Add l4proxy's init container, sidecar and rule volume to every Pod\n"
        "template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob)\n"
        "in a multi-document Kubernetes manifest, like istioctl kube-inject.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-f", "--filename", required=True, metavar="IN.yaml", help="manifest to read; - is stdin"
    )
    p.add_argument(
        "-o", "--output", default="-", metavar="OUT.yaml", help="where to write (default: stdout)"
    )
    p.add_argument("--image", default=DEFAULT_IMAGE, help="image of both containers (%(default)s)")
    p.add_argument(
        "--image-pull-policy",
        choices=["Always", "IfNotPresent", "Never"],
        default=None,
        help="imagePullPolicy of both containers (default: Kubernetes decides)",
    )
    p.add_argument(
        "--configmap",
        type=_configmap_name,
        default=DEFAULT_CONFIGMAP,
        metavar="NAME",
        help=f"ConfigMap holding the rule files, mounted at {RULES_MOUNT} (%(default)s)",
    )
    p.add_argument(
        "--exclude-inbound-ports",
        type=_port_list,
        default=(),
        metavar="PORTS",
        help="inbound ports not captured, e.g. 9090,9091 (l4proxy-init -d)",
    )
    p.add_argument(
        "--exclude-outbound-ports",
        type=_port_list,
        default=(),
        metavar="PORTS",
        help="outbound destination ports not captured, e.g. 5432 (l4proxy-init -o)",
    )
    p.add_argument(
        "--sidecar",
        choices=["native", "container"],
        default="native",
        help="native: an init container with restartPolicy Always (Kubernetes >= 1.29: "
        "starts first, stops last, Jobs complete); container: among the app's containers "
        "(older clusters) (%(default)s)",
    )
    p.add_argument(
        "--http-routing",
        choices=["connection", "request"],
        default="request",
        help="the sidecar's l4proxy run --http-routing; request: every request routed on "
        "its own and counted (istio_requests_total: what l4proxy canary reads); "
        "connection: by each connection's first request head (%(default)s)",
    )
    p.add_argument(
        "--stats-port",
        type=_stats_port,
        default=0,
        metavar="PORT",
        help="the sidecar serves read-only /stats on 0.0.0.0:PORT (l4proxy run "
        "--stats-listen) for Prometheus and l4proxy canary --metrics; 15090 is "
        "Istio's (off)",
    )
    p.add_argument(
        "--access-log",
        choices=["off", "text", "json"],
        default="off",
        help="the sidecar writes a line per request to its standard output (kubectl logs "
        "POD -c l4proxy), in Istio's TEXT format or as JSON, as Istio's "
        "meshConfig.accessLogFile /dev/stdout does (l4proxy run --access-log -) (%(default)s)",
    )
    for flag, what, default in (
        ("--proxy-cpu", "CPU request", PROXY_CPU),
        ("--proxy-memory", "memory request", PROXY_MEMORY),
        ("--proxy-cpu-limit", "CPU limit", "none"),
        ("--proxy-memory-limit", "memory limit", PROXY_MEMORY_LIMIT),
    ):
        name = RESOURCE_ANNOTATIONS[flag[2:].replace("-", "_")]
        p.add_argument(
            flag,
            type=_quantity,
            default=None,
            metavar="QUANTITY",
            help=f"the sidecar's {what} ({default}); a template's annotation "
            f"l4proxy.io/{name} (or sidecar.istio.io/{name}) wins",
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = "<stdin>" if args.filename == "-" else args.filename
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"l4proxy inject: error: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    opts = InjectOptions(
        image=args.image,
        configmap=args.configmap,
        exclude_inbound_ports=args.exclude_inbound_ports,
        exclude_outbound_ports=args.exclude_outbound_ports,
        sidecar=args.sidecar,
        pull_policy=args.image_pull_policy,
        http_routing=args.http_routing,
        stats_port=args.stats_port,
        access_log="" if args.access_log == "off" else args.access_log,
        proxy_cpu=args.proxy_cpu,
        proxy_memory=args.proxy_memory,
        proxy_cpu_limit=args.proxy_cpu_limit,
        proxy_memory_limit=args.proxy_memory_limit,
    )
    try:
        result = inject_text(text, opts, source)
    except InjectError as exc:
        print(f"l4proxy inject: error: {exc}", file=sys.stderr)
        return 1
    for w in result.warnings:
        print(f"l4proxy inject: warning: {w}", file=sys.stderr)
    for note in result.notes:
        print(f"l4proxy inject: note: {note}", file=sys.stderr)
    if not result.injected:
        print(f"l4proxy inject: warning: {source}: no Pod template was injected", file=sys.stderr)
    try:
        if args.output == "-":
            sys.stdout.write(result.text)
            sys.stdout.flush()
        else:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(result.text)
    except OSError as exc:
        print(f"l4proxy inject: error: cannot write {args.output}: {exc}", file=sys.stderr)
        return 2
    return 0
