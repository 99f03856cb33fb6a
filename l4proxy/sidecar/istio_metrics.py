"""Istio's standard metrics, as an l4proxy sidecar reports them.

Istio's sidecars export ``istio_requests_total``, the histogram
``istio_request_duration_milliseconds`` and, for TCP,
``istio_tcp_connections_opened_total``, ``istio_tcp_connections_closed_total``,
``istio_tcp_received_bytes_total`` and ``istio_tcp_sent_bytes_total``
("Istio Standard Metrics"), every series labelled by who called
(``source_*``), what was called (``destination_*``) and how
(``request_protocol``, ``response_code``, ...). Istio's Grafana dashboards,
Kiali, Flagger and Argo Rollouts select and group by those labels: a label
that is missing is an empty panel, never an error. This module names the
families, the histogram's buckets and the labels and where each value comes
from; the worker (``worker.py``) counts.

Where the values come from
--------------------------
l4proxy reports at the caller's side only, ``reporter="source"`` (a
sidecar relays what reaches its pod's app at L4, and counts no request
there).

* ``source_*``: this pod, known once, at start (:func:`source_labels`):
  ``--namespace`` ($POD_NAMESPACE, from the Downward API as ``l4proxy
  inject`` sets it), the pod's labels (``--pod-labels``,
  ``--pod-labels-file``: the Downward API's file, which ``l4proxy inject``
  mounts) and ``--cluster-name``. At a gateway, the gateway's own pod.
* ``destination_*``: a row's tag (the destination service's host, its
  version and workload, and the labels Istio reads of the pod that
  answered, :func:`peer_labels`), made into labels when the row is added
  (the compiled relay's rows once a second, the pure relay's per request,
  a TCP connection's when it is handed to the pump): nothing more is
  built or kept per request in the compiled loop.
* what l4proxy does not know takes the value Istio reports when it does
  not know it either: ``source_principal`` and ``destination_principal``
  ``unknown`` (no mTLS), ``connection_security_policy`` ``unknown``
  (Istio's at ``reporter="source"``), ``grpc_response_status`` empty (no
  gRPC is told apart), a destination no pod answered: ``unknown`` in
  its workload, namespace, app, cluster and canonical service, and
  ``latest`` in its canonical revision (Istio's PassthroughCluster rows).
* ``response_flags``: Envoy's RESPONSE_FLAGS, the value the
  request's access log line shows (``-`` for none, else ``UF,URX``,
  ``NR``, ``DC``, ...: :func:`~l4proxy.dataplane.accesslog.shown_flags`
  and :func:`response_flags`), whether the log is on or not. The relays
  report a request's flag bits with it (the pure relay's ``report``, the
  compiled relay's rows, keyed by tag, status and bits); the worker
  makes the text when it adds the row, with a route's own answer's
  (NR, NC) from its tag, as the log takes them. A TCP connection's
  series say its line's flags too: ``-`` for one an upstream took
  (tcp_proxy's for how an established one ended: none); one no upstream
  took is counted as Istio's stats filter counts it, opened and closed at
  its close, no byte sent: ``UF,URX`` (every connect failed, under the
  last endpoint tried), ``UH`` (none to try: under its subset; REGISTRY_ONLY's
  ``BlackHoleCluster``), ``UO`` (tcp.maxConnections).

Istio's ``istio_request_bytes`` and ``istio_response_bytes`` are not
reported (the README says what they would cost).

Cardinality: every value is a pod's label, a namespace, a service's host,
a status code, a constant, or a combination of the 15 response flags
l4proxy sets (:data:`~l4proxy.dataplane.accesslog.FLAG_NAMES`, in Envoy's
order, so one set is one value); nothing is unique to a request or to a
client's address. A failed request's flags say why it ended (one
reason, the failure or the local answer that ended it) with DI and URX
where they apply, and a status comes with few of them (a 200: ``-``, ``DI``, or where its body
was cut ``UC``, ``DC``, ``UT``; a 503: ``UF``, ``UF,URX``, ``UH``, ``UO``,
``OM``, ``URX``): a few series per destination and status, never one
per request.
"""

from __future__ import annotations

from collections.abc import Mapping

from l4proxy.dataplane.accesslog import flags_text
from l4proxy.rules.routing import Labels

# Istio's request-duration buckets (ms): Envoy's default histogram buckets
# (HistogramSettingsImpl::defaultBuckets), which Istio's stats keep, 0.5 ms
# to an hour. The compiled relay holds at most MAX_BUCKETS - 1 (23).
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"  # a histogram: _bucket, _sum, _count
# a mirrored copy's answers (l4proxy's own families, their labels as Istio's were)
MIRROR_REQUESTS = "l4proxy_mirror_requests_total"
MIRROR_DURATION = "l4proxy_mirror_request_duration_milliseconds"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_CLOSED = "istio_tcp_connections_closed_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"  # client to upstream (the request's)
TCP_SENT = "istio_tcp_sent_bytes_total"  # upstream to client (the response's)

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's cluster name unless global.multiCluster.clusterName
LATEST = "latest"  # Istio's canonical revision of a workload whose labels name none

# the pod labels Istio's metrics read (istio/proxy's peer metadata; Istio's
# pkg/kube/labels for the canonical service), each list in Istio's order
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
APP_LABELS = ("app.kubernetes.io/name", "app")
VERSION_LABELS = ("app.kubernetes.io/version", "version")
CANONICAL_NAME_LABELS = (CANONICAL_NAME, *APP_LABELS)
CANONICAL_REVISION_LABELS = (CANONICAL_REVISION, *VERSION_LABELS)
READ_LABELS = frozenset(CANONICAL_NAME_LABELS + CANONICAL_REVISION_LABELS)

NO_PEER = Labels()
NO_FLAGS = "-"  # response_flags of a request or connection without one (Istio's, Envoy's)


def _first(labels: Mapping[str, str], keys: tuple[str, ...], default: str) -> str:
    """The value of the first of *keys* that *labels* has, else *default*."""
    for key in keys:
        value = labels.get(key)
        if value is not None:
            return value
    return default


def peer_labels(labels: Mapping[str, str]) -> Labels:
    """Of a pod's *labels*, those Istio's metrics read (:data:`READ_LABELS`):
    what a row's tag keeps of the pod that answered, so that two pods of
    one workload (another pod-template-hash) are one tag."""
    if not labels:
        return NO_PEER
    return Labels({k: v for k, v in labels.items() if k in READ_LABELS})


def workload_name(labels: Mapping[str, str]) -> str:
    """A pod's workload as l4proxy names it: ``APP-VERSION`` from its
    ``app`` and ``version`` labels, as :func:`~l4proxy.rules.routing.version_and_workload`
    names a destination's (one pod is the same workload whichever side
    reports it); ``APP`` without a version; ``unknown`` without an app.
    Istio names it by the pod's owner (a Deployment), which the Downward
    API does not tell a pod."""
    app = labels.get("app")
    if app is None:
        return UNKNOWN
    version = labels.get("version")
    return app if version is None else f"{app}-{version}"


def service_namespace(host: str) -> str:
    """The namespace of a Kubernetes Service's host (``NAME.NS.svc.DOMAIN``);
    ``unknown`` for any other (a ServiceEntry's hosts do not say theirs)."""
    parts = host.split(".", 3)
    if len(parts) >= 3 and parts[2] == "svc" and parts[1]:
        return parts[1]
    return UNKNOWN


def source_labels(
    pod_labels: Mapping[str, str], namespace: str, cluster: str = DEFAULT_CLUSTER
) -> dict[str, str]:
    """The ``reporter`` and ``source_*`` labels of every series this
    sidecar reports: its pod's (*pod_labels*, *namespace*), in *cluster*."""
    workload = workload_name(pod_labels)
    return {
        "reporter": "source",
        "source_workload": workload,
        "source_workload_namespace": namespace or UNKNOWN,
        "source_principal": UNKNOWN,
        "source_app": _first(pod_labels, APP_LABELS, UNKNOWN),
        "source_version": _first(pod_labels, VERSION_LABELS, UNKNOWN),
        "source_canonical_service": _first(pod_labels, CANONICAL_NAME_LABELS, workload),
        "source_canonical_revision": _first(pod_labels, CANONICAL_REVISION_LABELS, LATEST),
        "source_cluster": cluster,
    }


def destination_labels(
    service: str,
    name: str,
    version: str,
    workload: str,
    peer: Mapping[str, str] = NO_PEER,
    cluster: str = DEFAULT_CLUSTER,
) -> dict[str, str]:
    """The ``destination_*`` labels of a row: its *service* (host) and
    *name*, the *version* and *workload* l4proxy labels it with, and *peer*
    (:func:`peer_labels` of the pod that answered; empty: none, or pods
    whose versions differ). A *workload* ``unknown`` is a destination no
    pod is known of: its workload's namespace, app, cluster and canonical
    service are ``unknown`` too."""
    namespace = service_namespace(service)
    known = workload != UNKNOWN
    return {
        "destination_service": service,
        "destination_service_name": name,
        "destination_service_namespace": namespace,
        "destination_version": version,
        "destination_workload": workload,
        "destination_workload_namespace": namespace if known else UNKNOWN,
        "destination_principal": UNKNOWN,
        "destination_app": _first(peer, APP_LABELS, UNKNOWN),
        "destination_canonical_service": (
            _first(peer, CANONICAL_NAME_LABELS, workload) if known else UNKNOWN
        ),
        "destination_canonical_revision": _first(peer, CANONICAL_REVISION_LABELS, LATEST),
        "destination_cluster": cluster if known and namespace != UNKNOWN else UNKNOWN,
    }


def response_flags(shown: int) -> str:
    """``response_flags`` of a request whose line shows the flag bits
    *shown* (:func:`~l4proxy.dataplane.accesslog.shown_flags`): their
    names, comma-joined in Envoy's order; ``-`` for none."""
    return flags_text(shown) if shown else NO_FLAGS


def request_labels(
    source: Mapping[str, str],
    destination: Mapping[str, str],
    status: int,
    flags: str = NO_FLAGS,
) -> dict[str, str]:
    """The labels of an HTTP request's series (``istio_requests_total``,
    ``istio_request_duration_milliseconds``): *source*'s, *destination*'s,
    and how it went (*status* 0: no response began; *flags*: its
    :func:`response_flags`)."""
    return {
        **source,
        **destination,
        "request_protocol": "http",
        "response_code": str(status),
        "response_flags": flags,
        "grpc_response_status": "",
        "connection_security_policy": UNKNOWN,
    }


def tcp_labels(
    source: Mapping[str, str], destination: Mapping[str, str], flags: str = NO_FLAGS
) -> dict[str, str]:
    """The labels of a TCP connection's series (``istio_tcp_*``): no
    response code, ``request_protocol`` ``tcp``, and *flags*, its
    :func:`response_flags`: ``-`` for a connection an upstream took,
    why none did for one refused (``UF,URX``, ``UH``, ``UO``)."""
    return {
        **source,
        **destination,
        "request_protocol": "tcp",
        "response_flags": flags,
        "connection_security_policy": UNKNOWN,
    }
