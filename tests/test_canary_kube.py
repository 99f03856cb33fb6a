"""``l4proxy canary --configmap``: the rules ConfigMap through the Kubernetes API.

No cluster here: the API server is a real HTTP server on 127.0.0.1 that
answers the two endpoints the canary uses (GET and PUT of
/api/v1/namespaces/NS/configmaps/NAME) as the API server does: 404 and 403
Status objects, 409 Conflict on a stale metadata.resourceVersion. Each test
asserts the exact requests sent. The decisions are pure and table-tested."""

from __future__ import annotations

import copy
import http.server
import json
import re
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from l4proxy.canary import kube
from l4proxy.canary._analysis import Rollout
from l4proxy.canary.kube import (
    ATTEMPTS,
    ConfigMapStore,
    Endpoint,
    KubeClient,
    KubeError,
    after_put,
    api_error,
    doc_key,
    edited,
    endpoint,
    parse_ref,
    state_annotation,
    state_of,
)
from l4proxy.cli import main
from l4proxy.rules.watch import FILE_HELD
from l4proxy.stats import DIGEST, GENERATION
from tests.conftest import _skip_or_fail
from tests.test_canary_core import unstamped

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "kubernetes" / "bootcamp" / "base" / "rules"
CM_PATH = "/api/v1/namespaces/default/configmaps/l4proxy-rules"
PUT_PATH = CM_PATH + "?fieldManager=l4proxy-canary"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token"


# -- pure parts, table-tested ---------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("l4proxy-rules", ("pod-ns", "l4proxy-rules")),
        ("shop/l4proxy-rules", ("shop", "l4proxy-rules")),
        ("shop/rules.v2", ("shop", "rules.v2")),
        ("Shop/rules", "'Shop' is not a namespace name"),
        ("shop/", "'' is not a ConfigMap name"),
        ("a/b/c", "'a/b' is not a namespace name"),
    ],
)
def test_parse_ref(text: str, want: object) -> None:
    if isinstance(want, tuple):
        assert parse_ref(text, "pod-ns") == want
    else:
        with pytest.raises(KubeError, match=str(want)):
            parse_ref(text, "pod-ns")


@pytest.mark.parametrize(
    ("api", "env", "want"),
    [
        (
            None,
            {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            Endpoint("https://10.96.0.1:443", "/sa/token", "/sa/ca.crt", "/sa/namespace"),
        ),
        (
            None,
            {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"},
            Endpoint("https://[fd00::1]:6443", "/sa/token", "/sa/ca.crt", "/sa/namespace"),
        ),
        (
            "http://127.0.0.1:8001/",
            {"KUBERNETES_SERVICE_HOST": "10.96.0.1"},
            Endpoint("http://127.0.0.1:8001", None, None, None),
        ),
        (None, {}, "not in a pod .* run .kubectl proxy."),
        ("127.0.0.1:8001", {}, "a URL, http:// or https://"),
    ],
)
def test_endpoint(api: str | None, env: dict[str, str], want: object) -> None:
    if isinstance(want, Endpoint):
        assert endpoint(api, None, None, env, "/sa") == want
    else:
        with pytest.raises(KubeError, match=str(want)):
            endpoint(api, None, None, env, "/sa")


W = "ConfigMap default/l4proxy-rules"


@pytest.mark.parametrize(
    ("status", "attempt", "want"),
    [
        (200, 1, "done"),
        (201, 3, "done"),
        (409, 1, "retry"),
        (409, ATTEMPTS - 1, "retry"),
        (409, ATTEMPTS, "changed under the canary 5 times in a row"),
        (403, 1, "needs 'update' on configmaps/l4proxy-rules in namespace default .*rbac.yaml"),
        (404, 1, "not found: create the sidecars' rules ConfigMap first"),
        (401, 1, "401 Unauthorized .* token"),
        (422, 1, "422 Invalid: boom"),
        (500, 1, "HTTP 500: boom"),
    ],
)
def test_after_put(status: int, attempt: int, want: str) -> None:
    if want in ("done", "retry"):
        assert after_put(status, attempt, W, "boom") == want
    else:
        with pytest.raises(KubeError, match=want):
            after_put(status, attempt, W, "boom")


def test_a_forbidden_get_names_the_get_verb() -> None:
    assert "needs 'get' on configmaps/l4proxy-rules" in str(api_error("GET", 403, W, "x"))


R = Rollout("bootcamp", "v1", "v2", weight=25, step=1, steps=(5, 25, 50, 100), updated=1.5)


def test_edited_changes_only_our_key_and_annotation() -> None:
    obj = configmap({"a.yaml": "x: 1\n", "z.txt": "  keep me\t\n"})
    obj["metadata"]["annotations"] = {"user/thing": "1"}
    obj["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    before = copy.deepcopy(obj)
    new = edited(obj, "bootcamp", R, with_document=True)
    assert obj == before  # not changed in place
    assert new["metadata"]["resourceVersion"] == "1"  # the precondition
    assert "managedFields" not in new["metadata"]
    assert new["data"]["a.yaml"] == "x: 1\n" and new["data"]["z.txt"] == "  keep me\t\n"
    assert set(new["data"]) == {"a.yaml", "z.txt", "canary-bootcamp.yaml"}
    assert new["metadata"]["annotations"]["user/thing"] == "1"
    assert state_of(new, "bootcamp") == R
    only_state = edited(obj, "bootcamp", R, with_document=False)
    assert set(only_state["data"]) == {"a.yaml", "z.txt"}
    assert (doc_key("bootcamp.default"), state_annotation("bootcamp.default")) == (
        "canary-bootcamp.yaml",
        "l4proxy.io/canary-bootcamp",
    )


def test_a_broken_state_annotation_says_how_to_start_over() -> None:
    obj = configmap({})
    obj["metadata"]["annotations"] = {"l4proxy.io/canary-bootcamp": "{"}
    how = re.escape("kubectl annotate configmap NAME l4proxy.io/canary-bootcamp-")
    with pytest.raises(KubeError, match=how):
        state_of(obj, "bootcamp")
    assert state_of(configmap({}), "bootcamp") is None


# -- a fake API server on 127.0.0.1 ----------------------------------------------------
def configmap(data: dict[str, str], rv: int = 1) -> dict[str, Any]:
    return {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {
            "name": "l4proxy-rules",
            "namespace": "default",
            "uid": "6f1c2d3e-0000-4000-8000-000000000001",
            "resourceVersion": str(rv),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app.kubernetes.io/part-of": "l4proxy"},
        },
        "data": data,
    }


def bootcamp_data(with_route: bool = False) -> dict[str, str]:
    names = ["registry.yaml", "ingress.yaml"] + (["route.yaml"] if with_route else [])
    return {n: (RULES / n).read_text() for n in names}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAPI:
    url: str = ""
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Req] = field(default_factory=list)
    rv: int = 1
    forbid: set[str] = field(default_factory=set)  # methods answered 403
    before_put: Callable[[FakeAPI], None] | None = None  # a concurrent writer
    prometheus: dict[str, str] = field(default_factory=dict)  # query part -> value
    # The kubelet and the sidecars, as Prometheus scrapes them: each pod of
    # *pods* serves the ConfigMap's data as it was *kubelet_lag* reads of the
    # rules marks ago (the data at each read in *seen*); *judged* says, for
    # each query of the canary's numbers, whether they served the data then
    pods: tuple[str, ...] = ("caller-0",)
    kubelet_lag: int = 0
    seen: list[str] = field(default_factory=list)
    judged: list[bool] = field(default_factory=list)
    # the keys every pod holds back (l4proxy_rules_file_held 1 of each, as
    # mounted): its digest moves with the data all the same, as another
    # key's change moves it beside a key held back
    held: tuple[str, ...] = ()
    # what goes wrong with the next requests of a method, in turn: "503" (not
    # applied), "applied 504" (applied, its answer lost), "drop" (the
    # connection closed with no answer)
    faults: dict[str, list[str]] = field(default_factory=dict)

    def edit(self, path: str, change: Callable[[dict[str, Any]], None]) -> None:
        """What ``kubectl edit`` does between our GET and our PUT."""
        change(self.objects[path])
        self.rv += 1
        self.objects[path]["metadata"]["resourceVersion"] = str(self.rv)

    def api(self) -> list[Req]:
        return [r for r in self.requests if not r.path.startswith("/api/v1/query")]

    def data(self) -> str:
        return json.dumps(self.objects.get(CM_PATH, {}).get("data"), sort_keys=True)

    def served(self) -> str | None:
        return self.seen[max(0, len(self.seen) - 1 - self.kubelet_lag)] if self.seen else None

    def marks(self) -> list[dict[str, Any]]:
        """The rules marks the sidecars report (a digest of what they serve)."""
        self.seen.append(self.data())
        served = self.served() or ""
        generation = len(set(self.seen[: len(self.seen) - self.kubelet_lag])) or 1
        rows: list[dict[str, Any]] = []
        for pod in self.pods:
            labels = {"job": "pods", "instance": f"{pod}:15090", "pod": pod}
            digest = zlib.crc32((pod + served).encode()) + 1
            for name, v in ((GENERATION, generation), (DIGEST, digest)):
                rows.append({"metric": {"__name__": name, **labels}, "value": [1, str(v)]})
            for key in self.held:
                held = {"__name__": FILE_HELD, "file": f"/etc/l4proxy/{key}", **labels}
                rows.append({"metric": held, "value": [1, "1"]})
        return rows


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI()

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, code: int, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            if parts.path == "/api/v1/query":  # Prometheus, same server
                q = urllib.parse.parse_qs(parts.query)["query"][0]
                self.requests_append(None)
                if GENERATION in q:
                    result = fake.marks()
                else:
                    fake.judged.append(fake.served() == fake.data())
                    value = next(v for k, v in fake.prometheus.items() if k in q)
                    result = [{"metric": {}, "value": [1, value]}]
                data = {"resultType": "vector", "result": result}
                self.answer(200, {"status": "success", "data": data})
                return
            self.requests_append(None)
            self.serve("GET", parts.path, None)

        def do_PUT(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(n))
            self.requests_append(body)
            self.serve("PUT", urllib.parse.urlsplit(self.path).path, body)

        def requests_append(self, body: Any) -> None:
            fake.requests.append(Req(self.command, self.path, dict(self.headers), body))

        def serve(self, method: str, path: str, body: Any) -> None:
            name = path.rsplit("/", 1)[-1]
            queue = fake.faults.get(method)
            fault = queue.pop(0) if queue else None
            if fault == "drop":
                self.close_connection = True
                return
            if fault == "503":
                self.answer(503, status(503, "ServiceUnavailable", "etcdserver: request timed out"))
                return
            if method in fake.forbid:
                verb = {"GET": "get", "PUT": "update"}[method]
                self.answer(
                    403,
                    status(
                        403,
                        "Forbidden",
                        f'configmaps "{name}" is forbidden: User "system:serviceaccount:default:'
                        f'l4proxy-canary" cannot {verb} resource "configmaps" in API group "" '
                        'in the namespace "default"',
                    ),
                )
                return
            if path not in fake.objects:
                self.answer(404, status(404, "NotFound", f'configmaps "{name}" not found'))
                return
            if method == "GET":
                self.answer(200, fake.objects[path])
                return
            if fake.before_put is not None:
                hook, fake.before_put = fake.before_put, None
                hook(fake)
            stored = fake.objects[path]
            if body["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
                self.answer(
                    409,
                    status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on configmaps "{name}": the object has '
                        "been modified; please apply your changes to the latest version and "
                        "try again",
                    ),
                )
                return
            fake.rv += 1
            new = copy.deepcopy(body)
            new["metadata"]["resourceVersion"] = str(fake.rv)
            fake.objects[path] = new
            if fault == "applied 504":
                self.answer(504, status(504, "Timeout", "context deadline exceeded"))
                return
            self.answer(200, new)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    fake.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield fake
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tries are counted, not timed: no waiting between them."""
    monkeypatch.setattr(kube, "BACKOFF", (0.0,) * len(kube.BACKOFF))
    monkeypatch.setattr(ConfigMapStore, "end_retry", (0.0,) * len(ConfigMapStore.end_retry))


@pytest.fixture
def token(tmp_path: Path) -> str:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return str(p)


def store(api: FakeAPI, token: str | None) -> ConfigMapStore:
    client = KubeClient(Endpoint(api.url, token, None))
    return ConfigMapStore(client, "default", "l4proxy-rules", "bootcamp", "cluster.local")


def test_install_sends_get_then_put_with_the_resource_version(api: FakeAPI, token: str) -> None:
    data = bootcamp_data()
    api.objects[CM_PATH] = configmap(data)
    store(api, token).commit(R)
    get, put = api.requests
    assert (get.method, get.path, get.body) == ("GET", CM_PATH, None)
    assert (put.method, put.path) == ("PUT", PUT_PATH)
    for r in (get, put):
        assert r.headers["Authorization"] == f"Bearer {TOKEN}"
        assert r.headers["Accept"] == "application/json"
    assert put.headers["Content-Type"] == "application/json"
    assert put.body["metadata"]["resourceVersion"] == "1"
    want = edited(configmap(data), "bootcamp", R, with_document=True)
    assert put.body == want
    stored = api.objects[CM_PATH]
    for k, v in data.items():
        assert stored["data"][k] == v  # the user's keys, byte for byte
    doc = yaml.safe_load(stored["data"]["canary-bootcamp.yaml"])
    assert doc["metadata"]["name"] == "canary-bootcamp"
    assert [(x["labels"]["version"], x["weight"]) for x in doc["spec"]["route"]] == [
        ("v1", 75),
        ("v2", 25),
    ]
    assert store(api, token).load_state() == R
    # What it sends is a ConfigMap the API server accepts (schema, strict).
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        _skip_or_fail("kubernetes-validate not installed (requirements-dev.txt)")
        return
    kubernetes_validate.validate(put.body, "1.37.0", strict=True)


def test_no_token_file_sends_no_authorization(api: FakeAPI) -> None:
    api.objects[CM_PATH] = configmap(bootcamp_data())
    store(api, None).load_state()
    assert "Authorization" not in api.requests[0].headers


def test_a_conflict_is_retried_on_the_fresh_object(api: FakeAPI, token: str) -> None:
    api.objects[CM_PATH] = configmap(bootcamp_data())

    def kubectl_edit(fake: FakeAPI) -> None:
        def change(obj: dict[str, Any]) -> None:
            obj["data"]["notes.txt"] = "edited meanwhile\n"
            obj["metadata"].setdefault("annotations", {})["team"] = "web"

        fake.edit(CM_PATH, change)

    api.before_put = kubectl_edit
    store(api, token).commit(R)
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", CM_PATH),
        ("PUT", PUT_PATH),  # 409: resourceVersion 1, the object is at 2
        ("GET", CM_PATH),
        ("PUT", PUT_PATH),
    ]
    assert [r.body["metadata"]["resourceVersion"] for r in api.requests if r.body] == ["1", "2"]
    stored = api.objects[CM_PATH]
    assert stored["data"]["notes.txt"] == "edited meanwhile\n"  # not clobbered
    assert stored["metadata"]["annotations"]["team"] == "web"
    assert "canary-bootcamp.yaml" in stored["data"]
    assert stored["metadata"]["resourceVersion"] == "3"


def test_a_conflict_never_puts_back_a_rollout_an_abort_replaced(api: FakeAPI, token: str) -> None:
    """The controller's PUT of its next step meets a 409: another shell's
    abort landed between its GET and its PUT. The retry sent the same
    step over the fresh object, and the aborted canary went on."""
    from l4proxy.canary._analysis import roll_back
    from l4proxy.canary.command import Superseded

    api.objects[CM_PATH] = configmap(bootcamp_data())
    store(api, token).commit(R)
    aborted = roll_back(R, 2.0)

    def abort_meanwhile(fake: FakeAPI) -> None:
        fake.before_put = None

        def change(obj: dict[str, Any]) -> None:
            state = json.dumps(aborted.to_json(), separators=(",", ":"), sort_keys=True)
            obj["metadata"]["annotations"]["l4proxy.io/canary-bootcamp"] = state

        fake.edit(CM_PATH, change)

    api.before_put = abort_meanwhile
    step = Rollout("bootcamp", "v1", "v2", weight=50, step=2, steps=R.steps, updated=3.0)
    with pytest.raises(Superseded) as info:
        store(api, token).commit(step, expected=R)
    assert info.value.current == aborted
    stored = api.objects[CM_PATH]["metadata"]["annotations"]["l4proxy.io/canary-bootcamp"]
    assert json.loads(stored)["phase"] == "rolled_back"


def test_a_commit_says_whether_the_document_changed(api: FakeAPI, token: str) -> None:
    """A resume at the same weight PUTs an identical document: the kubelet
    changes nothing and no sidecar reloads, so the controller must not wait
    for a new rules generation (it timed out, exit 2, on every resume)."""
    api.objects[CM_PATH] = configmap(bootcamp_data())
    assert store(api, token).commit(R) is True
    assert store(api, token).commit(R, expected=R) is False  # the same document again


def test_the_key_edited_under_the_canary_is_told(api: FakeAPI, token: str) -> None:
    """Before each verdict the command compares its key with what it wrote
    (a ``kubectl edit`` of the weights mid-interval was judged as the
    weight it had written): as written, ""; changed or removed, it says so."""
    api.objects[CM_PATH] = configmap(bootcamp_data())
    assert store(api, token).commit(R) is True
    assert store(api, token).edited(R) == ""
    key = "canary-bootcamp.yaml"

    def all_v2(obj: dict[str, Any]) -> None:
        obj["data"][key] = obj["data"][key].replace("weight: 25", "weight: 100")

    api.edit(CM_PATH, all_v2)
    assert store(api, token).edited(R) == (
        f"key {key} of ConfigMap default/l4proxy-rules was changed under the canary "
        "(it routed at weight 25)"
    )
    api.edit(CM_PATH, lambda obj: obj["data"].pop(key))
    assert " was removed under the canary " in store(api, token).edited(R)


def test_a_mirrored_step_puts_the_same_document_validated(api: FakeAPI, token: str) -> None:
    """--mirror: weight 0 while progressing, the mirror to the canary in the
    key (loaded as the kubelet mounts it, not refused), gone at the next step."""
    api.objects[CM_PATH] = configmap(bootcamp_data())
    mirrored = Rollout("bootcamp", "v1", "v2", weight=0, step=0, steps=(0, 5, 100), updated=1.0)
    assert store(api, token).commit(mirrored) is True
    doc = yaml.safe_load(api.objects[CM_PATH]["data"]["canary-bootcamp.yaml"])
    assert doc["spec"]["mirror"] == {"name": "bootcamp", "labels": {"version": "v2"}}
    assert [(x["labels"]["version"], x["weight"]) for x in doc["spec"]["route"]] == [("v1", 100)]
    assert store(api, token).load_state() == mirrored
    step = replace(mirrored, step=1, weight=5, updated=2.0)
    assert store(api, token).commit(step, expected=mirrored) is True
    doc = yaml.safe_load(api.objects[CM_PATH]["data"]["canary-bootcamp.yaml"])
    assert "mirror" not in doc["spec"]


def test_a_conflict_every_time_gives_up_without_writing(api: FakeAPI, token: str) -> None:
    api.objects[CM_PATH] = configmap(bootcamp_data())
    puts = 0

    def always(fake: FakeAPI) -> None:
        nonlocal puts
        puts += 1
        fake.edit(CM_PATH, lambda obj: None)
        if puts < ATTEMPTS:
            fake.before_put = always

    api.before_put = always
    with pytest.raises(KubeError, match="changed under the canary 5 times in a row"):
        store(api, token).commit(R)
    assert [r.method for r in api.requests] == ["GET", "PUT"] * ATTEMPTS
    assert "canary-bootcamp.yaml" not in api.objects[CM_PATH]["data"]


def test_an_invalid_result_is_refused_without_a_put(api: FakeAPI, token: str) -> None:
    data = bootcamp_data()
    data["broken.yaml"] = "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nspec: [\n"
    api.objects[CM_PATH] = configmap(data)
    with pytest.raises(KubeError) as exc:
        store(api, token).commit(R)
    assert "refused: the rules would be invalid at weight 25: configmap/default/l4proxy-rules/" in (
        str(exc.value)
    )
    assert "broken.yaml" in str(exc.value) and "unchanged" in str(exc.value)
    assert [r.method for r in api.requests] == ["GET"]


def test_an_invalid_result_while_mirrored_says_mirrored(api: FakeAPI, token: str) -> None:
    """Not "at weight 0": the document refused is the mirrored one."""
    data = bootcamp_data()
    data["broken.yaml"] = "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nspec: [\n"
    api.objects[CM_PATH] = configmap(data)
    mirrored = replace(R, weight=0, step=0, steps=(0, 5, 25, 50, 100))
    with pytest.raises(KubeError, match="refused: the rules would be invalid while mirrored "):
        store(api, token).commit(mirrored)


def test_a_competing_rule_in_the_configmap_is_named(api: FakeAPI, token: str) -> None:
    api.objects[CM_PATH] = configmap(bootcamp_data(with_route=True))
    with pytest.raises(KubeError) as exc:
        store(api, token).check_competing()
    first = str(exc.value).splitlines()[0]
    assert first == (
        "configmap/default/l4proxy-rules/route.yaml:4: RouteRule bootcamp-default routes "
        "every request of bootcamp"
    )
    with pytest.raises(KubeError, match=r"route\.yaml"):
        store(api, token).commit(R)
    assert [r.method for r in api.requests] == ["GET", "GET"]


@pytest.mark.parametrize(
    ("forbid", "methods", "message"),
    [
        ({"GET"}, ["GET"], "GET ConfigMap default/l4proxy-rules: 403 Forbidden .* needs 'get'"),
        ({"PUT"}, ["GET", "PUT"], "PUT ConfigMap .* cannot update resource .* needs 'update'"),
    ],
)
def test_forbidden_names_the_rbac_it_needs(
    api: FakeAPI, token: str, forbid: set[str], methods: list[str], message: str
) -> None:
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.forbid = forbid
    with pytest.raises(KubeError, match=message):
        store(api, token).commit(R)
    assert [r.method for r in api.requests] == methods


def test_a_missing_configmap_says_create_it(api: FakeAPI, token: str) -> None:
    with pytest.raises(KubeError, match="ConfigMap default/l4proxy-rules not found: create"):
        store(api, token).load_state()


def test_an_unreachable_api_server_says_so(token: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    client = KubeClient(Endpoint(f"http://127.0.0.1:{closed}", token, None))
    st = ConfigMapStore(client, "default", "l4proxy-rules", "bootcamp", "cluster.local")
    with pytest.raises(KubeError, match="is the API server reachable"):
        st.load_state()


def test_an_api_server_down_for_a_moment_is_asked_again(api: FakeAPI, token: str) -> None:
    """One 503 (etcd timing out), a connection closed with no answer: each
    request is sent again after a pause (kube.BACKOFF), GET and PUT alike.
    A rollback's PUT answered 503 once ended the command (exit 2) with the
    canary serving traffic."""
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.faults = {"GET": ["drop"], "PUT": ["503", "drop"]}
    assert store(api, token).commit(R) is True
    assert [r.method for r in api.requests] == ["GET", "GET", "PUT", "PUT", "PUT"]
    assert store(api, token).load_state() == R


def test_a_put_applied_whose_answer_was_lost_is_not_someone_elses(api: FakeAPI, token: str) -> None:
    """The PUT was applied but its answer lost (504): sent again, it meets a
    409 (its own resourceVersion is stale now), and the fresh object holds
    the state being written: that is this write, done, not an abort by
    someone else (Superseded), and the document did change."""
    api.objects[CM_PATH] = configmap(bootcamp_data())
    store(api, token).commit(R)
    api.requests.clear()
    step = Rollout("bootcamp", "v1", "v2", weight=50, step=2, steps=R.steps, updated=3.0)
    api.faults = {"PUT": ["applied 504"]}
    assert store(api, token).commit(step, expected=R) is True
    assert [r.method for r in api.requests] == ["GET", "PUT", "PUT", "GET", "PUT"]
    assert store(api, token).load_state() == step


def test_an_api_server_down_for_good_says_so_after_the_tries(api: FakeAPI, token: str) -> None:
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.faults = {"PUT": ["503"] * 100}
    with pytest.raises(kube.KubeUnavailable, match=r"PUT ConfigMap .* HTTP 503: etcdserver"):
        store(api, token).commit(R)
    assert [r.method for r in api.requests] == ["GET"] + ["PUT"] * (len(kube.BACKOFF) + 1)
    api.faults = {}
    api.forbid = {"PUT"}  # a refusal is not asked again
    api.requests.clear()
    with pytest.raises(KubeError, match="403"):
        store(api, token).commit(R)
    assert [r.method for r in api.requests] == ["GET", "PUT"]


def test_the_path_prefix_of_the_api_url_is_kept(api: FakeAPI) -> None:
    api.objects["/k8s" + CM_PATH] = configmap(bootcamp_data())
    client = KubeClient(Endpoint(api.url + "/k8s", None, None))
    ConfigMapStore(client, "default", "l4proxy-rules", "bootcamp", "cluster.local").load_state()
    assert api.requests[0].path == "/k8s" + CM_PATH


# -- the command, end to end against the fake API server (and its Prometheus) ------------
def canary(api: FakeAPI, token: str, *more: str) -> list[str]:
    return [
        "canary",
        *more,
        "--configmap",
        "default/l4proxy-rules",
        "--kube-api",
        api.url,
        "--kube-token-file",
        token,
    ]


def test_a_rollout_through_the_api_promotes(
    api: FakeAPI, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bootcamp_data()
    api.objects[CM_PATH] = configmap(data)
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    argv = canary(api, token, "bootcamp")
    argv += ["--stable", "v1", "--canary", "v2", "--steps", "50,100", "--interval", "0.01"]
    argv += ["--prometheus", api.url, "--json"]
    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["start", "check", "promoted"]
    puts = [r.body for r in api.api() if r.method == "PUT"]
    weights = [json.loads(b["metadata"]["annotations"]["l4proxy.io/canary-bootcamp"]) for b in puts]
    assert [(w["phase"], w["weight"]) for w in weights] == [
        ("progressing", 50),
        ("progressing", 100),
        ("promoted", 100),
    ]
    assert [r.method for r in api.api()][:2] == ["GET", "GET"]  # competing check, state
    final = api.objects[CM_PATH]
    assert {k: final["data"][k] for k in data} == data
    doc = yaml.safe_load(final["data"]["canary-bootcamp.yaml"])
    assert [(x["labels"]["version"], x["weight"]) for x in doc["spec"]["route"]] == [("v2", 100)]
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in api.api())
    # status and abort by hand, through the API too; a promotion stands (an
    # abort after it sent every request back to v1): refused, and no PUT
    assert main(canary(api, token, "status", "bootcamp")) == 0
    assert "bootcamp: v1 -> v2 promoted at 100 %" in capsys.readouterr().out
    api.requests.clear()
    assert main(canary(api, token, "abort", "bootcamp")) == 2
    assert "was promoted (v2 takes 100 %)" in capsys.readouterr().err
    assert [r.method for r in api.api()] == ["GET"]
    assert _stored(api) == ("promoted", [("v2", 100)])


def test_a_dry_run_through_the_api_gets_and_never_puts(
    api: FakeAPI, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run with --configmap: the ConfigMap read (GET), each step's
    ConfigMap validated as a PUT of it would be, and no PUT; a competing
    key is refused with a run's error, and no PUT either."""
    data = bootcamp_data()
    api.objects[CM_PATH] = configmap(data)
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    argv = canary(api, token, "bootcamp", "--stable", "v1", "--canary", "v2")
    argv += ["--steps", "50,100", "--prometheus", api.url, "--dry-run"]
    assert main(argv) == 0
    out = unstamped(capsys.readouterr().out)
    assert "A run writes RouteRule canary-bootcamp to key canary-bootcamp.yaml of ConfigMap " in out
    assert "  step 1/2: v1 50 %, v2 50 %; every 60 s a check of v2's requests: " in out, out
    assert {r.method for r in api.api()} == {"GET"}
    assert api.objects[CM_PATH] == configmap(data)
    api.objects[CM_PATH] = configmap(bootcamp_data(with_route=True))
    api.requests.clear()
    assert main(argv) == 2
    dry = unstamped(capsys.readouterr().err)
    assert main(argv[:-1]) == 2
    assert unstamped(capsys.readouterr().err) == dry
    assert "route.yaml:4: RouteRule bootcamp-default routes every request of bootcamp" in dry
    assert {r.method for r in api.api()} == {"GET"}


def _failing_rollout(api: FakeAPI, token: str, put_faults: list[str]) -> int:
    """A canary answering 50 % 5xx, --threshold 1: a PUT at 50 %, then the
    rollback's; *put_faults* for the PUTs in turn ("": none)."""
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.prometheus = {"increase": "100", "* 100": "50", "histogram_quantile": "12"}
    api.faults = {"PUT": put_faults}
    argv = canary(api, token, "bootcamp")
    argv += ["--stable", "v1", "--canary", "v2", "--steps", "50,100", "--interval", "0.01"]
    return main([*argv, "--prometheus", api.url, "--threshold", "1"])


def _stored(api: FakeAPI) -> tuple[str, list[tuple[str, int]]]:
    obj = api.objects[CM_PATH]
    state = json.loads(obj["metadata"]["annotations"]["l4proxy.io/canary-bootcamp"])
    doc = yaml.safe_load(obj["data"]["canary-bootcamp.yaml"])
    return state["phase"], [(x["labels"]["version"], x["weight"]) for x in doc["spec"]["route"]]


# -- --gateway-api through the API: the HTTPRoute on SERVICE's Service and a Gateway ------
GATEWAY_RULES = ROOT / "deploy" / "kubernetes" / "bootcamp-gateway-api" / "rules"
GATEWAY_API = ["--gateway-api", "--stable", "bootcamp-v1", "--canary", "bootcamp-v2"]
# Namespace shop's Gateway of the same name as ours, and a route there on it
# that takes every request: another Gateway's (a key of the same ConfigMap)
SHOP = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bootcamp-gateway, namespace: shop}
spec:
  gatewayClassName: l4proxy
  listeners: [{name: http, port: 8081, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: site, namespace: shop}
spec:
  hosts: [site.shop.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 198.18.0.99}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: site, namespace: shop}
spec:
  parentRefs: [{name: bootcamp-gateway}]
  rules:
  - backendRefs: [{name: site, port: 8080}]
"""


def gateway_data(*names: str) -> dict[str, str]:
    """deploy/kubernetes/bootcamp-gateway-api's rules ConfigMap: the
    registry (the backends are DNS endpoints of bootcamp) and the Gateway,
    and *names* of its other keys (httproute.yaml: the user's route)."""
    return {n: (GATEWAY_RULES / n).read_text() for n in ("registry.yaml", "gateway.yaml", *names)}


def _gateway_rollout(api: FakeAPI, token: str, *more: str) -> int:
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    argv = canary(api, token, "bootcamp", *GATEWAY_API, *more)
    argv += ["--steps", "50,100", "--interval", "0.01", "--prometheus", api.url, "--json"]
    return main(argv)


def _http_route(put: Req) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(put.body["data"]["canary-bootcamp.yaml"])
    return doc


@pytest.mark.parametrize("shop", [False, True], ids=["alone", "same-named-gateway-in-shop"])
def test_a_gateway_api_rollout_through_the_api_attaches_to_the_gateway(
    api: FakeAPI, token: str, capsys: pytest.CaptureFixture[str], shop: bool
) -> None:
    """The ConfigMap store with --gateway (the kubelet's view of the key,
    validated as mounted): each PUT's key is the HTTPRoute on bootcamp's
    Service and bootcamp-gateway, its backends weighted, and the state
    holds the mode. A catch-all route on shop's Gateway of the same name,
    another key, is no rival (it was refused, matched by name alone)."""
    data = gateway_data()
    if shop:
        data["shop.yaml"] = SHOP
    api.objects[CM_PATH] = configmap(data)
    assert _gateway_rollout(api, token, "--gateway", "bootcamp-gateway") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["start", "check", "promoted"]
    assert events[0]["gateway_api"] == {"port": 8080, "gateways": ["bootcamp-gateway"]}
    puts = [r for r in api.api() if r.method == "PUT"]
    routes = [_http_route(put) for put in puts]
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in routes} == {
        ("HTTPRoute", "canary-bootcamp")
    }
    assert all(
        doc["spec"]["parentRefs"]
        == [
            {"group": "", "kind": "Service", "name": "bootcamp", "port": 8080},
            {"name": "bootcamp-gateway"},
        ]
        for doc in routes
    )
    weights = [
        [(b["name"], b["weight"]) for b in doc["spec"]["rules"][-1]["backendRefs"]]
        for doc in routes
    ]
    assert weights == [
        [("bootcamp-v1", 50), ("bootcamp-v2", 50)],
        [("bootcamp-v1", 0), ("bootcamp-v2", 100)],
        [("bootcamp-v1", 0), ("bootcamp-v2", 100)],
    ]
    states = [
        json.loads(p.body["metadata"]["annotations"]["l4proxy.io/canary-bootcamp"]) for p in puts
    ]
    assert [(st["phase"], st["gateway"]) for st in states] == [
        ("progressing", {"port": 8080, "gateways": ["bootcamp-gateway"]}),
        ("progressing", {"port": 8080, "gateways": ["bootcamp-gateway"]}),
        ("promoted", {"port": 8080, "gateways": ["bootcamp-gateway"]}),
    ]
    final = api.objects[CM_PATH]["data"]
    assert {k: final[k] for k in data} == data  # the user's keys, byte for byte


@pytest.mark.parametrize(
    ("data", "gateway", "message"),
    [
        # the example's own route: on bootcamp's Service and the Gateway, every request
        (
            gateway_data("httproute.yaml"),
            "bootcamp-gateway",
            "l4proxy canary: configmap/default/l4proxy-rules/httproute.yaml:6: HTTPRoute "
            "bootcamp routes every request of Service bootcamp",
        ),
        (
            gateway_data(),
            "nosuch",
            "l4proxy canary: --gateway nosuch: no such Gateway in the rules",
        ),
    ],
    ids=["competing-route", "no-such-gateway"],
)
def test_a_gateway_api_rollout_through_the_api_is_refused_before_any_put(
    api: FakeAPI,
    token: str,
    capsys: pytest.CaptureFixture[str],
    data: dict[str, str],
    gateway: str,
    message: str,
) -> None:
    api.objects[CM_PATH] = configmap(data)
    assert _gateway_rollout(api, token, "--gateway", gateway) == 2
    assert message in capsys.readouterr().err
    assert [r.method for r in api.api() if r.method != "GET"] == []
    assert api.objects[CM_PATH] == configmap(data)


def test_a_configmap_change_is_judged_once_prometheus_shows_it_live(
    api: FakeAPI, token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's case: --configmap with --prometheus judged each step
    at once, while the kubelet had not projected the PUT into the pods yet
    (up to ~150 s): the step to 100 % passed on traffic routed at 50 %, and
    was promoted. Each step now waits until Prometheus shows every sidecar
    serving the ConfigMap as PUT (its rules marks past those before it)."""
    from l4proxy.canary.command import PrometheusMetrics

    monkeypatch.setattr(PrometheusMetrics, "POLL", 0.01)
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    api.pods, api.kubelet_lag = ("caller-0", "caller-1"), 3
    argv = canary(api, token, "bootcamp")
    argv += ["--stable", "v1", "--canary", "v2", "--steps", "50,100", "--interval", "0.01"]
    assert main([*argv, "--prometheus", api.url, "--wait-live", "10"]) == 0
    captured = capsys.readouterr()
    assert "PROMOTED" in captured.out and "warning" not in captured.err
    assert api.judged == [True] * 6  # two checks of three queries, on live weights only
    assert _stored(api) == ("promoted", [("v2", 100)])


def test_a_configmap_key_the_sidecars_hold_back_is_not_live_nor_served(
    api: FakeAPI, token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecars hold the canary's key back (they refuse it as written,
    and serve it as last loaded), while their digests move (as another
    key's change moves them): the step to 50 % was judged as live and the
    rollout went on. As Prometheus scrapes them
    (l4proxy_rules_file_held{file}, the key's name in their mount), the
    step is not live, a failed check, and the rollback is NOT SERVED
    (exit 4)."""
    from l4proxy.canary.command import PrometheusMetrics

    monkeypatch.setattr(PrometheusMetrics, "POLL", 0.01)
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    api.held = ("canary-bootcamp.yaml",)
    argv = canary(api, token, "bootcamp")
    argv += ["--stable", "v1", "--canary", "v2", "--steps", "50,100", "--interval", "0.01"]
    code = main([*argv, "--prometheus", api.url, "--wait-live", "0.2", "--threshold", "1"])
    out, err = capsys.readouterr()
    assert code == 4, (out, err)
    assert "not live: {instance=" in out and (
        "holds /etc/l4proxy/canary-bootcamp.yaml back 0.2 s after the change" in out
    )
    assert "fail -> ROLLBACK NOT SERVED: 100 % to v1 is written, but the sidecars hold " in out
    assert api.judged == []  # no interval was judged at a weight not served
    assert _stored(api) == ("rolled_back", [("v1", 100)])


def test_a_configmap_key_held_back_beside_the_canarys_is_warned_of_once(
    api: FakeAPI, token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another key held back does not keep the canary's from being served:
    promoted, and a warning names it, once."""
    from l4proxy.canary.command import PrometheusMetrics

    monkeypatch.setattr(PrometheusMetrics, "POLL", 0.01)
    api.objects[CM_PATH] = configmap(bootcamp_data())
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    api.held = ("typo.yaml",)
    argv = canary(api, token, "bootcamp")
    argv += ["--stable", "v1", "--canary", "v2", "--steps", "50,100", "--interval", "0.01"]
    assert main([*argv, "--prometheus", api.url, "--wait-live", "10"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1, err
    assert 'job="pods",pod="caller-0"} holds /etc/l4proxy/typo.yaml back (its text ' in err
    assert api.judged == [True] * 6


def test_a_rollout_held_by_a_lost_pod_is_taken_over_once_its_hold_ends(
    api: FakeAPI, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Job's pod that ran the rollout was lost with its node: the state
    annotation still names it, its lease running. The Job's next pod (this
    process: another host) was refused, exit 2, and the Job failed. It
    waits for the lease to end, reading the ConfigMap again (a renewal
    would show there), then takes the rollout over: its first PUT comes
    after the lease, and names it. (Whether the pod is gone cannot be
    asked: the Role reads one ConfigMap, no pods.)"""
    import os
    import socket
    import time

    from l4proxy.canary._analysis import Owner

    lease_until = time.time() + 1.0
    lost = Owner("l4proxy-canary-bootcamp-x7k2p", 1, "pid:[4026532999]", 4242, lease_until)
    held = Rollout("bootcamp", "v1", "v2", weight=50, steps=(50, 100), owner=lost)
    api.objects[CM_PATH] = kube.edited(configmap(bootcamp_data()), "bootcamp", held, True)
    api.prometheus = {"increase": "100", "* 100": "100", "histogram_quantile": "12"}
    first_put: list[float] = []
    api.before_put = lambda fake: first_put.append(time.time())
    argv = canary(api, token, "bootcamp")
    argv += ["--stable", "v1", "--canary", "v2", "--steps", "50,100", "--interval", "0.01"]
    assert main([*argv, "--prometheus", api.url, "--wait-live", "10"]) == 0
    out = capsys.readouterr().out
    assert "run by pid 1 on l4proxy-canary-bootcamp-x7k2p, elsewhere " in out
    assert "taken over from pid 1 on l4proxy-canary-bootcamp-x7k2p: its hold ended" in out
    assert first_put[0] >= lease_until
    puts = [r.body for r in api.api() if r.method == "PUT"]
    state = json.loads(puts[0]["metadata"]["annotations"]["l4proxy.io/canary-bootcamp"])
    assert (state["phase"], state["weight"]) == ("progressing", 50)
    assert (state["owner"]["host"], state["owner"]["pid"]) == (socket.gethostname(), os.getpid())
    assert _stored(api) == ("promoted", [("v2", 100)])


def test_a_rollback_put_answered_503_is_sent_again(
    api: FakeAPI, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's case: one 503 on the rollback's PUT ended the command
    (exit 2) with the canary at 50 % and the state progressing."""
    assert _failing_rollout(api, token, ["", "503"]) == 1
    assert "ROLLED BACK" in capsys.readouterr().out
    assert _stored(api) == ("rolled_back", [("v1", 100)])


def test_a_rollback_the_api_server_never_takes_says_it_was_not_applied(
    api: FakeAPI, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The API server answers 503 to every PUT after the first: the
    rollback is tried (kube.BACKOFF) and tried again (end_retry), then the
    command exits 2 saying loudly that the canary still gets its traffic."""
    tries = (len(kube.BACKOFF) + 1) * (len(ConfigMapStore.end_retry) + 1)
    assert _failing_rollout(api, token, ["", *["503"] * tries]) == 2
    err = capsys.readouterr().err
    assert "the rollback was NOT applied" in err and "HTTP 503" in err
    assert "still routes as before (50 %)" in err and "l4proxy canary abort bootcamp" in err
    assert [r.method for r in api.api()].count("PUT") == 1 + tries
    assert _stored(api) == ("progressing", [("v1", 50), ("v2", 50)])


def test_rules_and_configmap_are_one_or_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["canary", "status", "bootcamp", "--kube-api", "http://127.0.0.1:1"]
    assert main([*argv, "--rules", str(tmp_path), "--configmap", "x"]) == 2
    assert main(argv) == 2
    assert capsys.readouterr().err.count("give the rules: --rules PATH, or --configmap") == 2


def test_in_a_pod_the_namespace_is_the_pods(tmp_path: Path) -> None:
    import argparse

    from l4proxy.canary.kube import store_of

    (tmp_path / "namespace").write_text("shop\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    (tmp_path / "ca.crt").write_text("")
    args = argparse.Namespace(
        configmap="l4proxy-rules",
        kube_api=None,
        kube_token_file=None,
        kube_ca_file=None,
        namespace=None,
        domain="cluster.local",
    )
    seen: list[Endpoint] = []

    def client_of(ep: Endpoint) -> KubeClient:
        seen.append(ep)
        return KubeClient(Endpoint("http://127.0.0.1:1"))

    st = store_of(args, "bootcamp", env, str(tmp_path), client_of)
    assert (st.namespace, st.name, st.path) == (
        "shop",
        "l4proxy-rules",
        "/api/v1/namespaces/shop/configmaps/l4proxy-rules",
    )
    assert seen[0].token_file == str(tmp_path / "token")
    args.namespace = "web"  # -n names the namespace of a bare NAME
    assert store_of(args, "bootcamp", env, str(tmp_path), client_of).namespace == "web"
    args.configmap = "shop/l4proxy-rules"
    with pytest.raises(KubeError, match=r"-n web and --configmap shop/l4proxy-rules: .* in shop"):
        store_of(args, "bootcamp", env, str(tmp_path), client_of)


# -- deploy/kubernetes/canary and l4proxy inject --http-routing -------------------------
def test_the_job_manifests_grant_only_what_the_command_sends() -> None:
    """The Job's command parses as l4proxy's; its ConfigMap is the Role's one
    resourceName; the verbs cover the GET and PUT asserted above; the bound
    account is the Job's. (Schema and kustomize build: tests/test_deploy.py.)"""
    from l4proxy.canary.command import EXIT_ERROR, EXIT_LEFT, EXIT_NOT_SERVED, EXIT_ROLLED_BACK
    from l4proxy.cli import build_parser
    from tests.test_deploy import K8S, kustomize

    objs = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(K8S / "canary")}
    assert all(o["metadata"]["namespace"] == "default" for o in objs.values())
    (rule,) = objs[("Role", "l4proxy-canary")]["rules"]
    assert rule == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["l4proxy-rules"],
        "verbs": ["get", "update", "patch"],
    }
    binding = objs[("RoleBinding", "l4proxy-canary")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "l4proxy-canary",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "l4proxy-canary", "namespace": "default"}
    ]
    assert ("ServiceAccount", "l4proxy-canary") in objs
    job = objs[("Job", "l4proxy-canary-bootcamp")]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "l4proxy-canary" and pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"][:2] == ["l4proxy", "canary"]
    args = build_parser("canary").parse_args(c["command"][1:])
    assert (args.words, args.stable, args.canary) == (["bootcamp"], "v1", "v2")
    assert args.rules is None and args.kube_api is None  # in-cluster: the service account
    assert parse_ref(args.configmap, "default") == ("default", rule["resourceNames"][0])
    assert args.prometheus == "http://prometheus.istio-system:9090"
    assert args.on_abort == "leave"  # no terminal in a pod; the next pod resumes
    # every end but a promotion fails the Job: rolled back, an error, and
    # an end not served (retried, it would say "rolled back" and lose
    # that); interrupted (3) is retried, and the next pod resumes
    fail = job["spec"]["podFailurePolicy"]["rules"][0]
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["operator"] == "In"
    assert fail["onExitCodes"]["values"] == [EXIT_ROLLED_BACK, EXIT_ERROR, EXIT_NOT_SERVED]
    assert EXIT_LEFT not in fail["onExitCodes"]["values"] and job["spec"]["backoffLimit"] > 0
    assert {"name": "tmp", "mountPath": "/tmp"}.items() <= c["volumeMounts"][0].items()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def _configmap_volume(root: Path, data: dict[str, str]) -> Path:
    """*data* laid out as the kubelet mounts a ConfigMap volume at *root*:
    the keys in a timestamped directory, ``..data`` a link to it, and
    each key a link to ``..data/KEY`` (an atomic update swaps ``..data``)."""
    stamped = root / "..2026_12_07_06_00_00.1234567890"
    stamped.mkdir(parents=True)
    for key, text in data.items():
        (stamped / key).write_text(text)
    (root / "..data").symlink_to(stamped.name)
    for key in data:
        (root / key).symlink_to(f"..data/{key}")
    return root


def _job_webhooks() -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The canary Job's --webhooks, the volume mounted there and its mount."""
    from l4proxy.cli import build_parser
    from tests.test_deploy import K8S, kustomize

    objs = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(K8S / "canary")}
    pod = objs[("Job", "l4proxy-canary-bootcamp")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (where,) = build_parser("canary").parse_args(c["command"][1:]).webhooks
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == where]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    # the ConfigMap is the user's to give: not in the kustomization
    assert not [o for o in objs.values() if o["kind"] == "ConfigMap"]
    return where, volume, mount


def test_the_job_takes_its_webhooks_from_an_optional_configmap(tmp_path: Path) -> None:
    """The Job mounts the ConfigMap l4proxy-canary-webhooks, optional, read
    only, where --webhooks reads a directory: with the example ConfigMap
    (deploy/kubernetes/canary/webhooks.yaml), as the kubelet lays it out,
    the command takes its hooks; without it (an empty directory), none.
    (It had no way to give any.)"""
    import argparse

    from l4proxy.canary.command import CanaryError, webhooks_of
    from tests.test_deploy import K8S

    where, volume, mount = _job_webhooks()
    assert where == "/etc/l4proxy-canary/webhooks"
    assert volume["configMap"] == {"name": "l4proxy-canary-webhooks", "optional": True}
    assert mount["readOnly"] is True
    example = yaml.safe_load((K8S / "canary" / "webhooks.yaml").read_text())
    assert (example["kind"], example["metadata"]["name"]) == (
        "ConfigMap",
        volume["configMap"]["name"],
    )
    mounted = _configmap_volume(tmp_path / "mounted", example["data"])

    def given(path: Path) -> tuple[Any, ...]:
        return webhooks_of(argparse.Namespace(webhook=[], webhooks=[str(path)]))

    hooks = given(mounted)
    assert [(h.name, h.type) for h in hooks] == [
        ("load-test", "rollout"),
        ("promotion gate", "confirm-promotion"),
        ("rollback switch", "rollback"),
    ]
    (tmp_path / "absent").mkdir()  # an optional ConfigMap that is not there
    assert given(tmp_path / "absent") == ()
    # each key in name order; one that is not webhooks is named
    both = _configmap_volume(
        tmp_path / "both",
        {"b.yaml": "- {name: b, url: 'http://b/'}", "a.yaml": "- {name: a, url: 'http://a/'}"},
    )
    assert [h.name for h in given(both)] == ["a", "b"]
    broken = _configmap_volume(tmp_path / "broken", {"notes.txt": "some notes"})
    with pytest.raises(CanaryError, match=r"--webhooks .*/broken/notes\.txt: webhooks is not a"):
        given(broken)


def test_a_rollout_calls_the_webhooks_of_a_mounted_configmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real rollout given the Job's --webhooks directory, a ConfigMap
    volume of two keys: the hooks of both are called."""
    from tests.test_canary_webhooks import HookServer, always, rollout

    rules = tmp_path / "rules"
    rules.mkdir()
    with HookServer({"load": always(200), "notify": always(200)}).serving() as hooks:
        mounted = _configmap_volume(
            tmp_path / "webhooks",
            {
                "load.yaml": f"- {{name: load, url: '{hooks.url}/load'}}",
                "notify.yaml": yaml.safe_dump(
                    {
                        "webhooks": [
                            {"name": "n", "type": "post-rollout", "url": f"{hooks.url}/notify"}
                        ]
                    }
                ),
            },
        )
        code = rollout(rules, "--steps", "50", "--webhooks", str(mounted))
    capsys.readouterr()
    assert code == 0
    assert (len(hooks.of("load")), len(hooks.of("notify"))) == (1, 1)


def test_inject_http_routing_reaches_the_sidecar_command() -> None:
    from l4proxy.inject import InjectOptions, inject_text

    plain = (ROOT / "deploy/kubernetes/bootcamp/plain/bootcamp.yaml").read_text()
    out = inject_text(plain, InjectOptions(http_routing="connection")).text
    for dep in (d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"):
        sidecar = dep["spec"]["template"]["spec"]["initContainers"][1]
        assert sidecar["command"] == [
            "l4proxy", "run", "--rules", "/etc/l4proxy",
            "--pod-labels-file", "/etc/l4proxy-pod/labels", "--http-routing", "connection",
            "--drain-quiet", "0",
        ]  # fmt: skip
    # injecting again with the default (request, l4proxy run's own) takes it out
    again = inject_text(out, InjectOptions()).text
    assert again == inject_text(plain, InjectOptions()).text
    for dep in (d for d in yaml.safe_load_all(again) if d and d["kind"] == "Deployment"):
        sidecar = dep["spec"]["template"]["spec"]["initContainers"][1]
        assert sidecar["command"] == [
            "l4proxy", "run", "--rules", "/etc/l4proxy",
            "--pod-labels-file", "/etc/l4proxy-pod/labels", "--drain-quiet", "0",
        ]  # fmt: skip
    from l4proxy.cli import build_parser

    assert build_parser("inject").parse_args(["inject", "-f", "x.yaml"]).http_routing == "request"
    assert build_parser("run").parse_args(["run"]).http_routing == "request"
