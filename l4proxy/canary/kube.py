"""``l4proxy canary ... --configmap [NAMESPACE/]NAME``: the rules ConfigMap, through the API.

Theory of operation
-------------------
On Kubernetes the sidecars mount their rules from a ConfigMap (read-only,
``l4proxy inject --configmap``); the kubelet refreshes the mounted files
when the object changes. So instead of a rules directory, the canary edits
that ConfigMap through the Kubernetes API, from a Job in the cluster (its
service account) or from a laptop (``kubectl proxy``, ``--kube-api``):

* **What it owns.** One data key, ``canary-SERVICE.yaml``: the same
  document as in a rules directory (the RouteRule, and while A/B testing
  the match documents after it; with ``--gateway-api`` the HTTPRoute on
  SERVICE's Service and each ``--gateway``), so the mounted volume looks
  exactly like ``--rules DIR`` would. And one annotation on the same
  ConfigMap, ``l4proxy.io/canary-SERVICE``: the rollout's state as JSON.
  Every other key, label and annotation is sent back as it was read, so the
  user's rule files keep their exact text. The state is an annotation, not
  a key or a ConfigMap of its own, because (1) the kubelet mounts only
  ``data``, so a check that changes no weight rewrites nothing the sidecars
  see; (2) the document and the state change in one request: they can never
  disagree; (3) RBAC stays ``get``/``update`` on one ``resourceNames``
  entry (``create`` cannot be limited by name, so a state ConfigMap of its
  own would need create on every ConfigMap of the namespace).
* **Optimistic concurrency.** Every change is GET, edit, PUT with the
  ``metadata.resourceVersion`` that was read. If someone changed the object
  meanwhile (``kubectl edit``, ``kubectl apply``, another canary), the API
  server answers 409 Conflict and nothing is written; the change is then
  computed again on the fresh object (:data:`ATTEMPTS` times at most), so a
  concurrent edit is never clobbered.
* **Transient failures.** An API server that does not answer (refused,
  reset, timed out) or answers 429 or 5xx (etcd timing out, a restart, a
  load balancer between) is asked again after :data:`BACKOFF`, GET and PUT
  alike: a PUT is safe to send again, its resourceVersion makes a second
  copy a 409, and a PUT whose answer was lost but that was applied is
  recognised on the next GET (the stored state is the one being written).
  One 503 on a rollback's PUT ended the command with the canary serving
  traffic. What still fails is :class:`~l4proxy.canary.command.Transient`:
  the command tries a rollback again for longer (``end_retry``).
* **Validated first.** The object as it would be is written into a
  temporary directory, one file per data key, as the kubelet mounts it, and
  loaded exactly as a sidecar loads its rules directory (and checked for a
  rule of the user's that competes with the canary's, as for ``--rules``);
  an invalid result is refused before any PUT. Errors name the key:
  ``configmap/NS/NAME/route.yaml:3: ...``.
* **Who runs it.** The state names the command that drives the rollout
  and its lease (see :mod:`l4proxy.canary.command`); a Job's next pod is
  another host, and waits for the lease of the pod before it to end. The
  Role reads one ConfigMap and no pods, so whether that pod is gone (its
  node lost) cannot be asked: its lease is what tells.
* **API access.** In a pod: ``https://$KUBERNETES_SERVICE_HOST:PORT`` with
  the service account's token and CA (the token is read again for every
  request: bound tokens rotate). Else ``--kube-api URL``, with
  ``--kube-token-file``/``--kube-ca-file`` when it is not ``kubectl proxy``.
  The standard library only (http.client, ssl); proxies from the
  environment are not used.

The decisions (the reference, the edit, what a status code means) are pure
functions, table-tested in tests/test_canary_kube.py against a real HTTP
server on 127.0.0.1 that answers as the API server does.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from l4proxy import __version__
from l4proxy.canary._analysis import Rollout
from l4proxy.canary.command import (
    ANY,
    CanaryError,
    Superseded,
    Transient,
    at_words,
    competing,
    documents_text,
    first_error,
    refuse_unattached,
    rule_name,
    stored_as,
)
from l4proxy.k8s_names import DNS1123_LABEL, DNS1123_SUBDOMAIN
from l4proxy.rules import ConfigError, ConfigUnreadable, load_rules
from l4proxy.rules.routing import RouteTable

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ANNOTATION_PREFIX = "l4proxy.io/canary-"
FIELD_MANAGER = "l4proxy-canary"
ATTEMPTS = 5
TIMEOUT = 10.0
# Seconds between the tries of a request that found the API server down or
# overloaded (about 8 s in all, plus up to TIMEOUT a try).
BACKOFF = (0.2, 0.5, 1.0, 2.0, 4.0)


class KubeError(CanaryError):
    """The API refused or could not be reached (exit 2, with what to do)."""


class KubeUnavailable(KubeError, Transient):
    """No answer, or 429/5xx: what asking again later may get past."""


def transient(status: int) -> bool:
    """429 Too Many Requests (API priority and fairness) and 5xx."""
    return status == 429 or status >= 500


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configmap",
        metavar="[NAMESPACE/]NAME",
        help="instead of --rules: the sidecars' rules ConfigMap, edited through the "
        "Kubernetes API (in a pod: its service account; else --kube-api)",
    )
    p.add_argument(
        "--kube-api",
        metavar="URL",
        help="the API server (kubectl proxy: http://127.0.0.1:8001); default in a pod: "
        "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT",
    )
    p.add_argument("--kube-token-file", metavar="PATH", help="bearer token for --kube-api")
    p.add_argument("--kube-ca-file", metavar="PATH", help="CA bundle for an https --kube-api")


# -- pure parts --------------------------------------------------------------------
def parse_ref(text: str, default_namespace: str) -> tuple[str, str]:
    """``[NAMESPACE/]NAME`` -> (namespace, name), both valid object names."""
    ns, _, name = text.rpartition("/")
    ns = ns or default_namespace
    if not DNS1123_LABEL.fullmatch(ns):
        raise KubeError(f"--configmap {text}: {ns!r} is not a namespace name")
    if not DNS1123_SUBDOMAIN.fullmatch(name):
        raise KubeError(f"--configmap {text}: {name!r} is not a ConfigMap name")
    return ns, name


def configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"


def doc_key(service: str) -> str:
    return f"{rule_name(service)}.yaml"


def state_annotation(service: str) -> str:
    return ANNOTATION_PREFIX + service.split(".", 1)[0]


def state_of(obj: Mapping[str, Any], service: str) -> Rollout | None:
    meta = obj.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(state_annotation(service))
    if raw is None:
        return None
    try:
        return Rollout.from_json(json.loads(raw))
    except ValueError as exc:
        raise KubeError(
            f"annotation {state_annotation(service)} of ConfigMap "
            f"{meta.get('namespace')}/{meta.get('name')}: {exc}; it is the canary's state: "
            "remove it (kubectl annotate configmap NAME "
            f"{state_annotation(service)}-) to start over"
        ) from exc


def edited(
    obj: Mapping[str, Any], service: str, state: Rollout | None, with_document: bool
) -> dict[str, Any]:
    """The object to PUT: *obj* with our annotation (and our key) set; the
    annotation removed where *state* is None (a waiting start given up).

    Everything else is kept as read, resourceVersion included (that is the
    precondition); managedFields is left out, so the API server keeps its own.
    """
    new: dict[str, Any] = copy.deepcopy(dict(obj))
    meta = new.setdefault("metadata", {})
    meta.pop("managedFields", None)
    annotations = meta.setdefault("annotations", {})
    if state is None:
        annotations.pop(state_annotation(service), None)
        return new
    annotations[state_annotation(service)] = json.dumps(
        state.to_json(), separators=(",", ":"), sort_keys=True
    )
    if with_document:
        new.setdefault("data", {})[doc_key(service)] = documents_text(state)
    return new


Outcome = Literal["done", "retry"]


def after_put(status: int, attempt: int, where: str, message: str) -> Outcome:
    """What a PUT's status means; *attempt* counts from 1."""
    if 200 <= status < 300:
        return "done"
    if status == 409:
        if attempt < ATTEMPTS:
            return "retry"
        raise KubeError(
            f"{where} changed under the canary {ATTEMPTS} times in a row (409 Conflict); "
            "someone keeps editing it: try again when they are done"
        )
    raise api_error("PUT", status, where, message)


def api_error(method: str, status: int, where: str, message: str) -> KubeError:
    verb = {"GET": "get", "PUT": "update"}.get(method, method.lower())
    ns_name = where.removeprefix("ConfigMap ")
    ns, _, name = ns_name.partition("/")
    if status == 404:
        return KubeError(
            f"{where} not found: create the sidecars' rules ConfigMap first "
            "(kubectl apply -k deploy/kubernetes/bootcamp), or name it with "
            "--configmap NAMESPACE/NAME"
        )
    if status == 401:
        return KubeError(
            f"{method} {where}: 401 Unauthorized ({message}): the token was refused "
            "(--kube-token-file, or the pod's service account token)"
        )
    if status == 403:
        return KubeError(
            f"{method} {where}: 403 Forbidden ({message}): the canary's service account "
            f"needs '{verb}' on configmaps/{name} in namespace {ns} "
            "(deploy/kubernetes/canary/rbac.yaml: Role l4proxy-canary, resourceNames)"
        )
    if status == 422:
        return KubeError(f"{method} {where}: 422 Invalid: {message}")
    if transient(status):
        return KubeUnavailable(f"{method} {where}: HTTP {status}: {message}")
    return KubeError(f"{method} {where}: HTTP {status}: {message}")


def status_message(body: bytes) -> str:
    """The ``message`` of a Kubernetes Status object, or the body's start."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip() or "(no body)"
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return str(doc["message"])
    return "(no message)"


def mounted_files(obj: Mapping[str, Any]) -> dict[str, str]:
    """key -> text of each data key, as the kubelet mounts it (one file per key)."""
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise KubeError("the ConfigMap's data is not a mapping")
    return {str(k): str(v) for k, v in data.items()}


@dataclass(frozen=True)
class Endpoint:
    base: str  # scheme://host:port[/prefix]
    token_file: str | None = None
    ca_file: str | None = None
    namespace_file: str | None = None  # in a pod: the pod's namespace


def endpoint(
    kube_api: str | None,
    token_file: str | None,
    ca_file: str | None,
    env: Mapping[str, str],
    sa_dir: str = SA_DIR,
) -> Endpoint:
    if kube_api:
        if not kube_api.startswith(("http://", "https://")):
            raise KubeError(f"--kube-api {kube_api}: a URL, http:// or https://")
        return Endpoint(kube_api.rstrip("/"), token_file, ca_file)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeError(
            "--configmap: not in a pod (KUBERNETES_SERVICE_HOST is unset): give the API "
            "server, e.g. run 'kubectl proxy' and add --kube-api http://127.0.0.1:8001"
        )
    if ":" in host:
        host = f"[{host}]"
    return Endpoint(
        f"https://{host}:{port}",
        token_file or os.path.join(sa_dir, "token"),
        ca_file or os.path.join(sa_dir, "ca.crt"),
        os.path.join(sa_dir, "namespace"),
    )


def relabel(text: str, tmpdir: str, where: str) -> str:
    return text.replace(tmpdir + os.sep, where + "/")


# -- I/O ----------------------------------------------------------------------------
class KubeClient:
    """GET and PUT of JSON objects; one connection per request."""

    def __init__(self, ep: Endpoint, timeout: float = TIMEOUT) -> None:
        self.ep = ep
        self.timeout = timeout
        parts = urllib.parse.urlsplit(ep.base)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.context: ssl.SSLContext | None = None
        if self.https:
            try:
                self.context = ssl.create_default_context(cafile=ep.ca_file)
            except OSError as exc:
                raise KubeError(f"{ep.ca_file}: cannot read the CA bundle: {exc}") from exc

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": f"l4proxy-canary/{__version__}"}
        if self.ep.token_file:
            try:
                with open(self.ep.token_file) as f:
                    token = f.read().strip()
            except OSError as exc:
                raise KubeError(f"{self.ep.token_file}: cannot read the token: {exc}") from exc
            h["Authorization"] = f"Bearer {token}"
        return h

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = self.headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise KubeUnavailable(
                f"{method} {self.ep.base}{path}: {exc}: is the API server reachable "
                "(kubectl proxy running, --kube-api right)?"
            ) from exc
        finally:
            conn.close()


class ConfigMapStore:
    """The canary's document and state in the rules ConfigMap (see the module doc)."""

    # after the requests' own BACKOFF: about two minutes for a rollback
    end_retry: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)

    def __init__(
        self, client: KubeClient, namespace: str, name: str, service: str, domain: str
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.service = service
        self.domain = domain
        self.path = configmap_path(namespace, name)
        self.where = f"ConfigMap {namespace}/{name}"
        self.document = doc_key(service)  # as the pods mount it: a file of that name

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """The client's request, asked again after each of :data:`BACKOFF`
        while the API server does not answer or answers 429/5xx; the last
        failure is raised (:class:`KubeUnavailable`)."""
        for delay in (*BACKOFF, None):
            try:
                status, data = self.client.request(method, path, body)
            except KubeUnavailable:
                if delay is None:
                    raise
            else:
                if not transient(status):
                    return status, data
                if delay is None:
                    raise api_error(method, status, self.where, status_message(data))
            time.sleep(delay)
        raise AssertionError("not reached")

    def get(self) -> dict[str, Any]:
        status, body = self.request("GET", self.path)
        if status != 200:
            raise api_error("GET", status, self.where, status_message(body))
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise KubeError(f"GET {self.where}: not JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("kind") != "ConfigMap":
            raise KubeError(f"GET {self.where}: the answer is not a ConfigMap")
        return obj

    # -- what canary.py calls ------------------------------------------------------
    def load_state(self) -> Rollout | None:
        return state_of(self.get(), self.service)

    def check_competing(
        self,
        obj: Mapping[str, Any] | None = None,
        *,
        gateway_api: bool = False,
        gateways: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.validate(obj if obj is not None else self.get(), None, gateway_api, gateways, port)

    def table(self, r: Rollout | None) -> RouteTable:
        """The rules as the sidecars would load the ConfigMap with *r*'s
        documents (None: as it is), one file per key as mounted."""
        obj = self.get()
        new = edited(obj, self.service, r, with_document=True) if r is not None else obj
        where = f"configmap/{self.namespace}/{self.name}"
        with tempfile.TemporaryDirectory(prefix="l4proxy-canary-") as tmp:
            self._mount(new, tmp, where)
            try:
                result = load_rules([tmp], namespace=self.namespace, domain=self.domain)
                ours = os.path.join(tmp, doc_key(self.service)) if r is not None else None
                refuse_unattached(result.notes, ours, lambda t: relabel(t, tmp, where))
                return result.table
            except ConfigUnreadable as exc:
                raise KubeError(relabel(str(exc), tmp, where)) from exc
            except ConfigError as exc:
                raise KubeError(
                    f"refused: the rules are invalid: {relabel(first_error(exc), tmp, where)}"
                ) from exc

    def save_state(self, r: Rollout, expected: Rollout | None = ANY) -> None:
        self._update(r, with_document=False, expected=expected)

    def put_back(self, previous: Rollout | None, expected: Rollout) -> None:
        """The state as it was, *previous* (None: the annotation removed),
        where it is still *expected* (a waiting start given up)."""
        self._update(previous, with_document=False, expected=expected)

    def install(self, r: Rollout) -> bool:
        return self._update(r, with_document=True)

    def would_install(self, r: Rollout) -> None:
        """What :meth:`install` refuses of *r*, refused alike, with no PUT
        (``--dry-run``): the ConfigMap as it would be, validated."""
        if r.phase == "rolled_back":
            return  # (written whatever the rest holds)
        g = r.gateway
        self.validate(
            edited(self.get(), self.service, r, with_document=True),
            r,
            g is not None,
            g.gateways if g is not None else (),
            g.port if g is not None else None,
        )

    def edited(self, r: Rollout) -> str:
        """Why the key ``canary-SERVICE.yaml`` does not hold what the
        command wrote for *r* (``kubectl edit``, a ``kubectl replace`` that
        dropped it); "" where it does."""
        text = mounted_files(self.get()).get(doc_key(self.service))
        if text == documents_text(r):
            return ""
        what = "removed" if text is None else "changed"
        return (
            f"key {doc_key(self.service)} of {self.where} was {what} under the canary "
            f"(it routed {at_words(r)})"
        )

    def commit(self, r: Rollout, expected: Rollout | None = ANY) -> bool:
        """State and document in one PUT, only while the stored rollout is
        *expected* (:class:`Superseded` otherwise): checked on the object
        each attempt reads, so a 409 retry does not put back a rollout that
        an abort replaced meanwhile."""
        return self._update(r, with_document=True, expected=expected)

    # -- internals -------------------------------------------------------------------
    @staticmethod
    def _mount(obj: Mapping[str, Any], tmp: str, where: str) -> dict[str, str]:
        """Write *obj*'s data keys into *tmp*, one file each, as the kubelet mounts them."""
        files = mounted_files(obj)
        for key, text in files.items():
            if "/" in key or key in (".", ".."):
                raise KubeError(f"{where}: key {key!r} is not a file name")
            with open(os.path.join(tmp, key), "w") as f:
                f.write(text)
        return files

    def validate(
        self,
        obj: Mapping[str, Any],
        r: Rollout | None,
        gateway_api: bool = False,
        gateways: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        """Refuse *obj* if the sidecars would refuse its rules (or ours compete)."""
        where = f"configmap/{self.namespace}/{self.name}"
        ours = doc_key(self.service)
        with tempfile.TemporaryDirectory(prefix="l4proxy-canary-") as tmp:
            files = self._mount(obj, tmp, where)
            others = sorted(
                os.path.join(tmp, k) for k in files if k != ours and not k.startswith(".")
            )
            found = competing(
                others,
                self.service,
                os.path.join(tmp, ours),
                rule_name(self.service),
                gateway_api,
                gateways,
                namespace=self.namespace,
                domain=self.domain,
                port=port,
            )
            if found:
                kind = "HTTPRoute" if gateway_api else "RouteRule"
                raise KubeError(
                    f"{relabel(found[0], tmp, where)}\n  l4proxy canary routes {self.service} "
                    f"through its own {kind} {rule_name(self.service)} (key {ours}), and a "
                    "rule without a match would compete with it: remove that rule from the "
                    "ConfigMap, or give it a match; then run this again"
                )
            if r is None:
                return
            try:
                load_rules([tmp], namespace=self.namespace, domain=self.domain)
            except ConfigUnreadable as exc:
                raise KubeError(relabel(str(exc), tmp, where)) from exc
            except ConfigError as exc:
                raise KubeError(
                    f"refused: the rules would be invalid {at_words(r)}: "
                    f"{relabel(first_error(exc), tmp, where)}; {self.where} is unchanged"
                ) from exc

    def _update(
        self, r: Rollout | None, with_document: bool, expected: Rollout | None = ANY
    ) -> bool:
        """PUT the state (and the document); whether the document changed
        (an identical one makes the kubelet change nothing, and the
        sidecars reload nothing: there is no new generation to wait for)."""
        query = "?" + urllib.parse.urlencode({"fieldManager": FIELD_MANAGER})
        key = doc_key(self.service)
        first: str | None = None
        for attempt in range(1, ATTEMPTS + 1):
            obj = self.get()
            if attempt == 1:
                first = mounted_files(obj).get(key)
            current = state_of(obj, self.service)
            # *r* stored already: a PUT of ours that was applied although its
            # answer was lost (a timeout, a 5xx, then 409 on sending it again)
            if (
                expected is not ANY
                and not stored_as(current, expected)
                and not stored_as(current, r)
            ):
                raise Superseded(current)
            new = edited(obj, self.service, r, with_document)
            # A state alone changes nothing the sidecars read; a rollback is
            # written whatever the rest holds (RulesWriter.install_locked).
            if with_document and r is not None and r.phase != "rolled_back":
                g = r.gateway
                self.validate(
                    new,
                    r,
                    g is not None,
                    g.gateways if g is not None else (),
                    g.port if g is not None else None,
                )
            status, body = self.request("PUT", self.path + query, new)
            if after_put(status, attempt, self.where, status_message(body)) == "done":
                return mounted_files(new).get(key) != first
        return False  # not reached: after_put raises on the last attempt


def store_of(
    args: argparse.Namespace,
    service: str,
    env: Mapping[str, str] | None = None,
    sa_dir: str = SA_DIR,
    client_of: Callable[[Endpoint], KubeClient] = KubeClient,
) -> ConfigMapStore:
    """The store for ``--configmap``: namespace from the reference, else the
    pod's own, else ``-n`` (default: default)."""
    ep = endpoint(
        args.kube_api,
        args.kube_token_file,
        args.kube_ca_file,
        os.environ if env is None else env,
        sa_dir,
    )
    default_ns = args.namespace
    if default_ns is None and ep.namespace_file:
        try:
            with open(ep.namespace_file) as f:
                default_ns = f.read().strip()
        except OSError:
            default_ns = None
    ns, name = parse_ref(args.configmap, default_ns or "default")
    if args.namespace is not None and args.namespace != ns:
        raise KubeError(
            f"-n {args.namespace} and --configmap {args.configmap}: the sidecars that mount "
            f"the ConfigMap run in {ns}; leave -n out"
        )
    return ConfigMapStore(client_of(ep), ns, name, service, args.domain)
