"""``l4proxy inject``: every workload kind, idempotence, untouched documents,
options, old API versions, errors; the output validated with
``kubernetes-validate --strict`` (its Python API) for a current Kubernetes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from l4proxy import inject as inject_module
from l4proxy.cli import main
from l4proxy.inject import (
    INIT_NAME,
    PODINFO_VOLUME,
    SIDECAR_NAME,
    STATUS_ANNOTATION,
    VOLUME_NAME,
    InjectError,
    InjectOptions,
    inject_text,
    split_documents,
)
from tests.conftest import import_or_skip

kubernetes_validate = import_or_skip(
    "kubernetes_validate", "pip install kubernetes-validate (requirements-dev.txt)"
)
K8S_CURRENT = "1.37.0"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"

POD_SPEC = {
    "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}],
}


def _template(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels or {"app": "a"}},
        "spec": json.loads(json.dumps(POD_SPEC)),
    }


def workloads() -> dict[str, dict[str, Any]]:
    sel = {"matchLabels": {"app": "a"}}
    job_tpl = _template()
    job_tpl["spec"]["restartPolicy"] = "Never"
    return {
        "Pod": {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "labels": {"app": "a"}},
            "spec": _template()["spec"],
        },
        "Deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"selector": sel, "template": _template()},
        },
        "StatefulSet": {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "s"},
            "spec": {"selector": sel, "serviceName": "s", "template": _template()},
        },
        "DaemonSet": {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "ds"},
            "spec": {"selector": sel, "template": _template()},
        },
        "ReplicaSet": {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": "rs"},
            "spec": {"selector": sel, "template": _template()},
        },
        "Job": {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "j"},
            "spec": {"template": job_tpl},
        },
        "CronJob": {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "cj"},
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": job_tpl}}},
        },
    }


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    kind = obj["kind"]
    if kind == "Pod":
        return obj
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]  # type: ignore[no-any-return]


def _validate(text: str, version: str = K8S_CURRENT) -> None:
    for doc in yaml.safe_load_all(text):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("kind", list(workloads()))
@pytest.mark.parametrize("sidecar", ["native", "container"])
def test_every_kind_is_injected_and_validates(kind: str, sidecar: str) -> None:
    text = yaml.safe_dump(workloads()[kind], sort_keys=False)
    res = inject_text(text, InjectOptions(sidecar=sidecar))
    assert res.injected == [f"{kind} {workloads()[kind]['metadata']['name']}"]
    if sidecar == "container" and kind in ("Job", "CronJob"):  # the sidecar never exits
        assert len(res.warnings) == 1 and "never completes" in res.warnings[0], res.warnings
    else:
        assert not res.warnings
    obj = yaml.safe_load(res.text)
    tpl = _pod_spec(obj)
    spec = tpl["spec"]
    init = [c["name"] for c in spec["initContainers"]]
    apps = [c["name"] for c in spec["containers"]]
    if sidecar == "native":
        assert init == [INIT_NAME, SIDECAR_NAME] and apps == ["app"]
        assert spec["initContainers"][1]["restartPolicy"] == "Always"
        assert "startupProbe" in spec["initContainers"][1]
    else:
        assert init == [INIT_NAME] and apps == [SIDECAR_NAME, "app"]
    assert [v["name"] for v in spec["volumes"]] == [VOLUME_NAME, PODINFO_VOLUME]
    status = json.loads(tpl["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status["sidecar"] == sidecar and status["volumes"] == [VOLUME_NAME, PODINFO_VOLUME]
    _validate(res.text)
    if sidecar == "container":
        _validate(res.text, "1.25.0")  # the oldest schema shipped; no native sidecars there


def test_init_and_sidecar_security_and_probe() -> None:
    res = inject_text(yaml.safe_dump(workloads()["Pod"]), InjectOptions())
    spec = yaml.safe_load(res.text)["spec"]
    init, sidecar = spec["initContainers"]
    assert init["command"] == ["l4proxy-init", "-p", "15001", "-u", "1337"]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert sc["privileged"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sidecar["command"] == [
        "l4proxy",
        "run",
        "--rules",
        "/etc/l4proxy",
        "--pod-labels-file",
        "/etc/l4proxy-pod/labels",
        "--drain-quiet",
        "0",
    ]
    ssc = sidecar["securityContext"]
    assert ssc["runAsUser"] == 1337 and ssc["runAsNonRoot"] is True
    assert ssc["readOnlyRootFilesystem"] is True and ssc["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["readinessProbe"]["exec"]["command"] == ["l4proxy-ready"]
    assert sidecar["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert sidecar["volumeMounts"] == [
        {"name": VOLUME_NAME, "mountPath": "/etc/l4proxy", "readOnly": True},
        {"name": PODINFO_VOLUME, "mountPath": "/etc/l4proxy-pod", "readOnly": True},
    ]
    assert spec["volumes"] == [
        {"name": VOLUME_NAME, "configMap": {"name": "l4proxy-rules"}},
        {
            "name": PODINFO_VOLUME,
            "downwardAPI": {
                "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
            },
        },
    ]
    assert "&id" not in res.text  # no YAML anchors


def test_other_documents_byte_for_byte_and_twice_is_once() -> None:
    service = (
        "# keep me\napiVersion: v1\nkind: Service\n"
        "metadata: {name: s}   # odd  spacing\nspec:\n  ports: [{port: 80}]\n"
    )
    deploy = "# the app\n" + yaml.safe_dump(workloads()["Deployment"], sort_keys=False)
    cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: |\n    x: 1\n"
    text = f"{service}---\n{deploy}---\n{cm}"
    once = inject_text(text, InjectOptions()).text
    docs = split_documents(once)
    assert docs[0] == service
    assert docs[1].startswith("---\n# the app\napiVersion: apps/v1\n")
    assert docs[2] == "---\n" + cm
    assert inject_text(once, InjectOptions()).text == once
    # Other options update the injection in place (nothing added twice).
    other = InjectOptions(image="reg.example/l4proxy:2", exclude_inbound_ports=(9090,))
    updated = inject_text(once, other).text
    spec = yaml.safe_load(split_documents(updated)[1])["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_NAME, SIDECAR_NAME]
    assert spec["initContainers"][0]["image"] == "reg.example/l4proxy:2"
    assert spec["initContainers"][0]["command"][-2:] == ["-d", "9090"]
    assert len(spec["volumes"]) == 2
    assert inject_text(updated, InjectOptions()).text == once


def test_user_init_containers_volumes_and_list() -> None:
    dep = workloads()["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "migrate", "image": "m:1"}]
    spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    doc = {"apiVersion": "v1", "kind": "List", "items": [dep, workloads()["Job"]]}
    res = inject_text(yaml.safe_dump(doc), InjectOptions(exclude_outbound_ports=(5432, 6379)))
    assert res.injected == ["Deployment d", "Job j"]
    out = yaml.safe_load(res.text)["items"][0]["spec"]["template"]["spec"]
    assert [c["name"] for c in out["initContainers"]] == [INIT_NAME, SIDECAR_NAME, "migrate"]
    assert out["initContainers"][0]["command"][-2:] == ["-o", "5432,6379"]
    assert [v["name"] for v in out["volumes"]] == ["data", VOLUME_NAME, PODINFO_VOLUME]


def test_opt_out_host_network_and_proxy_uid_warnings() -> None:
    pod = workloads()["Pod"]
    pod["metadata"]["annotations"] = {"l4proxy.io/inject": "false"}
    text = yaml.safe_dump(pod)
    res = inject_text(text, InjectOptions())
    assert res.text == text and res.skipped == ["Pod p"]
    host = workloads()["DaemonSet"]
    host["spec"]["template"]["spec"]["hostNetwork"] = True
    res = inject_text(yaml.safe_dump(host), InjectOptions())
    assert res.skipped == ["DaemonSet ds"] and "hostNetwork" in res.warnings[0]
    pod = workloads()["Pod"]
    pod["spec"]["securityContext"] = {"runAsUser": 1337}
    res = inject_text(yaml.safe_dump(pod), InjectOptions())
    assert "not captured" in res.warnings[0]


def test_seed_old_api_is_injected_with_a_warning(seed_dir: str) -> None:
    with open(os.path.join(seed_dir, "bootcamp.yaml")) as f:
        seed = f.read()
    res = inject_text(seed, InjectOptions(), "bootcamp.yaml")
    assert res.injected == ["Deployment bootcamp-v1", "Deployment bootcamp-v2"]
    assert len(res.warnings) == 2
    assert "apps/v1beta1, which Kubernetes no longer serves (removed in 1.16)" in res.warnings[0]
    docs = [d for d in yaml.safe_load_all(res.text) if d]
    assert [d["apiVersion"] for d in docs] == ["apps/v1beta1"] * 2  # as they were
    # No schema for apps/v1beta1 ships for a current version; the injected pod
    # templates themselves are valid: the same documents on apps/v1 pass.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(docs[0], K8S_CURRENT, strict=True)
    for d in docs:
        d["apiVersion"] = "apps/v1"
        d["spec"]["selector"]["matchLabels"] = dict(d["spec"]["template"]["metadata"]["labels"])
        kubernetes_validate.validate(d, K8S_CURRENT, strict=True)
    assert inject_text(res.text, InjectOptions()).text == res.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1\n", "not valid YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n", "no containers"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n",
            "no Pod template",
        ),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(InjectError, match=message):
        inject_text(text, InjectOptions())


def test_a_comment_on_the_separator_keeps_the_documents_apart() -> None:
    """``--- # the app`` before a Pod: the rewritten Pod was written straight
    after the Service with no separator, one document, and kubectl kept the Pod
    only (the Service was lost without a word)."""
    svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n"
    pod = yaml.safe_dump(workloads()["Pod"], sort_keys=False)
    for sep in ("--- # the app\n", "--- !!map\n"):
        res = inject_text(svc + sep + pod, InjectOptions())
        docs = [d for d in yaml.safe_load_all(res.text) if d]
        assert [d["kind"] for d in docs] == ["Service", "Pod"], res.text
    assert "--- # the app\n" in inject_text(svc + "--- # the app\n" + pod, InjectOptions()).text


def test_a_container_of_the_users_called_l4proxy_is_never_taken_for_ours() -> None:
    """The gateway's own container is called l4proxy: injecting the whole
    bootcamp example replaced it by the sidecar (its --no-transparent --listen
    gone) or removed it (no containers left, which the API server refuses).
    Only what the status annotation records is replaced; a clash is an error."""
    pod = workloads()["Pod"]
    pod["spec"]["containers"] = [{"name": SIDECAR_NAME, "image": "l4proxy:0.1.0"}]
    with pytest.raises(InjectError, match="already has 'l4proxy', which l4proxy inject did not"):
        inject_text(yaml.safe_dump(pod), InjectOptions(sidecar="container"))
    with pytest.raises(InjectError, match="already has 'l4proxy'"):
        inject_text(yaml.safe_dump(pod), InjectOptions())
    pod = workloads()["Pod"]
    pod["spec"]["initContainers"] = [{"name": INIT_NAME, "image": "mine"}]
    with pytest.raises(InjectError, match="initContainers already has 'l4proxy-init'"):
        inject_text(yaml.safe_dump(pod), InjectOptions())
    # and our own, recorded, are replaced: native -> container -> native
    once = inject_text(yaml.safe_dump(workloads()["Pod"]), InjectOptions()).text
    moved = inject_text(once, InjectOptions(sidecar="container")).text
    assert inject_text(moved, InjectOptions()).text == once


def test_the_shipped_gateway_is_left_alone() -> None:
    gateway = (DEPLOY / "bootcamp" / "gateway" / "gateway.yaml").read_text()
    res = inject_text(gateway, InjectOptions())
    assert res.text == gateway and res.skipped == ["Deployment l4proxy-gateway"]


def test_a_tcp_socket_probe_on_a_captured_port_is_warned_about() -> None:
    """Once capture is on, the sidecar accepts every inbound connection for the
    app: a tcpSocket probe passes whether the app listens or not."""
    pod = workloads()["Pod"]
    app = pod["spec"]["containers"][0]
    app["ports"] = [{"name": "http", "containerPort": 8080}]
    app["readinessProbe"] = {"tcpSocket": {"port": "http"}}
    app["livenessProbe"] = {"tcpSocket": {"port": 9000}}
    res = inject_text(yaml.safe_dump(pod), InjectOptions(exclude_inbound_ports=(9000,)))
    assert len(res.warnings) == 1 and "tcpSocket probe on port 8080" in res.warnings[0]
    assert "--exclude-inbound-ports 8080" in res.warnings[0]


def test_container_mode_captures_after_the_users_init_containers() -> None:
    """As a container the proxy starts after every init container: with
    l4proxy-init first, the user's init containers' connections were sent to
    port 15001, where nothing listened yet."""
    dep = workloads()["Deployment"]
    dep["spec"]["template"]["spec"]["initContainers"] = [{"name": "migrate", "image": "m:1"}]
    res = inject_text(yaml.safe_dump(dep), InjectOptions(sidecar="container"))
    spec = yaml.safe_load(res.text)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["migrate", INIT_NAME]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"containers": ["app"]}, "spec.containers must be a list of mappings"),
        ({"volumes": {"name": "data"}}, "spec.volumes must be a list of mappings"),
        ({"initContainers": "migrate"}, "spec.initContainers must be a list of mappings"),
    ],
)
def test_malformed_lists_are_errors_not_tracebacks_or_drops(
    change: dict[str, Any], message: str
) -> None:
    pod = workloads()["Pod"]
    pod["spec"].update(change)
    with pytest.raises(InjectError, match=message):
        inject_text(yaml.safe_dump(pod), InjectOptions())
    pod = workloads()["Pod"]
    pod["metadata"]["annotations"] = ["a"]
    with pytest.raises(InjectError, match="annotations must be a mapping"):
        inject_text(yaml.safe_dump(pod), InjectOptions())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stats-port", "70000"], "not a TCP port"),
        (["--stats-port", "15000"], "admin endpoint's port"),
        (["--stats-port", "15001"], "the proxy's port"),
        (["--configmap", "default/l4proxy-rules"], "no NAMESPACE/"),
    ],
)
def test_options_that_would_crash_loop_the_sidecar_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump(workloads()["Pod"]))
    with pytest.raises(SystemExit) as exc:
        main(["inject", "-f", str(src), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


TYPED = """\
apiVersion: v1
kind: Pod
metadata:
  name: p
  labels: {flag: "n", other: "yes", count: "3"}
  annotations:
    deployed-at: 2024-01-01T10:00:00Z
    at: 12:30
spec:
  containers:
  - name: app
    image: app:1
    env:
    - {name: A, value: "y"}
    - {name: B, value: "1e3"}
    - {name: C, value: "0o17"}
    - {name: D, value: "on"}
    - {name: E, value: "~"}
"""


def test_a_rewritten_document_means_to_kubectl_what_it_meant() -> None:
    """Read and written by PyYAML's YAML 1.1: ``12:30`` became 750, the time
    stamp came back as '2024-01-01 10:00:00+00:00', and the strings "n", "y",
    "1e3", "0o17" went out unquoted, which kubectl reads as a bool or a
    number (and refuses as a label or an env value)."""
    out = inject_text(TYPED, InjectOptions()).text
    for text in (TYPED, out):
        obj = yaml.load(text, Loader=inject_module._Loader)  # a SafeLoader
        meta = obj["metadata"]
        assert {k: meta["labels"][k] for k in ("flag", "other", "count")} == {
            "flag": "n",
            "other": "yes",
            "count": "3",
        }
        assert meta["annotations"]["deployed-at"] == "2024-01-01T10:00:00Z"
        assert meta["annotations"]["at"] == "12:30"
        env = {e["name"]: e["value"] for e in obj["spec"]["containers"][0]["env"]}
        assert env == {"A": "y", "B": "1e3", "C": "0o17", "D": "on", "E": "~"}
    # every one of them quoted in the output, so any YAML reader agrees
    for value in ("'n'", "'yes'", "'3'", "'2024-01-01T10:00:00Z'", "'12:30'", "'y'", "'1e3'"):
        assert value in out, value
    assert yaml.safe_load(out)["metadata"]["annotations"]["at"] == "12:30"  # YAML 1.1 too


def test_split_documents_round_trip() -> None:
    text = "a: 1\n---\nb: 2\n--- # c\n\n---\nc: |\n  ---x\n...\n"
    assert "".join(split_documents(text)) == text
    assert split_documents("---\na: 1\n") == ["---\na: 1\n"]


# -- the command line ------------------------------------------------------------


def test_cli_file_stdin_output_and_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump(workloads()["Deployment"], sort_keys=False))
    out = tmp_path / "out.yaml"
    assert main(["inject", "-f", str(src), "-o", str(out), "--configmap", "my-rules"]) == 0
    spec = yaml.safe_load(out.read_text())["spec"]["template"]["spec"]
    assert spec["volumes"][0]["configMap"]["name"] == "my-rules"

    monkeypatch.setattr(sys, "stdin", io.StringIO(out.read_text()))
    assert main(["inject", "-f", "-", "--configmap", "my-rules"]) == 0
    assert capsys.readouterr().out == out.read_text()

    monkeypatch.setattr(sys, "stdin", io.StringIO("a: [\n"))
    assert main(["inject", "-f", "-"]) == 1
    assert "l4proxy inject: error: <stdin> document 1: not valid YAML" in capsys.readouterr().err
    assert main(["inject", "-f", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["inject", "-f", str(src), "--exclude-inbound-ports", "99999"])
    assert exc.value.code == 2


def test_cli_help_teaches_and_warns_on_stderr(seed_dir: str) -> None:
    l4proxy = os.path.join(os.path.dirname(sys.executable), "l4proxy")
    helptext = subprocess.run(
        [l4proxy, "inject", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for needle in ("l4proxy-init -p 15001 -u 1337", "kube-inject", "examples:", "exit codes"):
        assert needle in helptext
    assert "inject" in subprocess.run([l4proxy, "--help"], capture_output=True, text=True).stdout
    proc = subprocess.run(
        [l4proxy, "inject", "-f", os.path.join(seed_dir, "bootcamp.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stderr.count("warning:") == 2 and "apps/v1beta1" in proc.stderr
    assert proc.stdout.count(f"name: {SIDECAR_NAME}\n") == 2


# -- what inject adds and takes out again ----------------------------------------


def test_the_users_prometheus_annotations_are_never_lost() -> None:
    """--stats-port wrote its prometheus.io/* over the app's own (scraping the
    sidecar instead of the app), and injecting again without it deleted them:
    the app's metrics were gone for good. The user's win, with a warning, and
    only what inject added (the status records it) is taken out again."""
    dep = workloads()["Deployment"]
    theirs = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    dep["spec"]["template"]["metadata"]["annotations"] = dict(theirs)
    text = yaml.safe_dump(dep, sort_keys=False)
    res = inject_text(text, InjectOptions(stats_port=15090))
    tpl = yaml.safe_load(res.text)["spec"]["template"]
    notes = tpl["metadata"]["annotations"]
    assert {k: v for k, v in notes.items() if k != STATUS_ANNOTATION} == theirs
    assert json.loads(notes[STATUS_ANNOTATION])["annotations"] == {}
    (warning,) = res.warnings
    assert "kept the template's own prometheus.io/*" in warning
    assert "port 15090" in warning and "http-envoy-prom" in warning
    sidecar = tpl["spec"]["initContainers"][1]
    assert sidecar["ports"] == [{"name": "http-envoy-prom", "containerPort": 15090}]
    assert sidecar["command"][-2:] == ["--stats-listen", "0.0.0.0:15090"]
    again = inject_text(res.text, InjectOptions())
    notes = yaml.safe_load(again.text)["spec"]["template"]["metadata"]["annotations"]
    assert {k: v for k, v in notes.items() if k != STATUS_ANNOTATION} == theirs
    assert again.text == inject_text(text, InjectOptions()).text
    # a template with only some of them (scrape every port): none of ours either
    dep["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true"}
    res = inject_text(yaml.safe_dump(dep), InjectOptions(stats_port=15090))
    notes = yaml.safe_load(res.text)["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and "prometheus.io/port" not in notes
    assert len(res.warnings) == 1


def test_stats_port_annotations_are_ours_only_while_they_hold_what_we_wrote() -> None:
    plain = yaml.safe_dump(workloads()["Deployment"], sort_keys=False)
    once = inject_text(plain, InjectOptions(stats_port=15090))
    assert not once.warnings
    notes = yaml.safe_load(once.text)["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == "15090"
    status = json.loads(notes[STATUS_ANNOTATION])
    assert status["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15090",
        "prometheus.io/path": "/stats/prometheus",
    }
    assert inject_text(once.text, InjectOptions(stats_port=15090)).text == once.text
    _validate(once.text)
    _validate(inject_text(plain, InjectOptions(stats_port=15090, sidecar="container")).text)
    moved = inject_text(once.text, InjectOptions(stats_port=15091)).text
    assert "prometheus.io/port: '15091'" in moved
    assert inject_text(moved, InjectOptions()).text == inject_text(plain, InjectOptions()).text
    # the user changed our path since: the three are theirs now, and stay (the
    # scrape whole, not a path without its port and scrape)
    edited = once.text.replace("prometheus.io/path: /stats/prometheus", "prometheus.io/path: /m")
    for opts in (InjectOptions(), InjectOptions(stats_port=15090)):
        res = inject_text(edited, opts)
        notes = yaml.safe_load(res.text)["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/path"] == "/m" and notes["prometheus.io/port"] == "15090"
        assert notes["prometheus.io/scrape"] == "true"
        assert json.loads(notes[STATUS_ANNOTATION]).get("annotations", {}) == {}
    # an older inject's status (statsPort, no list) added all three
    old = yaml.safe_load(once.text)
    tpl_notes = old["spec"]["template"]["metadata"]["annotations"]
    status.pop("annotations")
    tpl_notes[STATUS_ANNOTATION] = json.dumps(status)
    out = inject_text(yaml.safe_dump(old, sort_keys=False), InjectOptions()).text
    assert out == inject_text(plain, InjectOptions()).text


def test_container_mode_starts_the_proxy_before_the_app_and_serves_inbound_at_sigterm() -> None:
    """--sidecar container appended the sidecar after the app's containers with
    nothing holding them: the app started first and its first connections were
    refused (Istio's holdApplicationUntilProxyStarts, istio#11130); and at
    SIGTERM, which the app and the sidecar get together, inbound stopped at once
    while the app still served what the endpoints sent. The sidecar is first,
    its postStart hook waits for /ready, and it drains inbound for 5 s."""
    dep = workloads()["Deployment"]
    dep["spec"]["template"]["spec"]["containers"].append({"name": "worker", "image": "w:1"})
    res = inject_text(yaml.safe_dump(dep), InjectOptions(sidecar="container"))
    tpl = yaml.safe_load(res.text)["spec"]["template"]
    containers = tpl["spec"]["containers"]
    assert [c["name"] for c in containers] == [SIDECAR_NAME, "app", "worker"]
    sidecar = containers[0]
    assert sidecar["lifecycle"] == {
        "postStart": {"exec": {"command": ["l4proxy-ready", "--wait", "60"]}}
    }
    assert "restartPolicy" not in sidecar and "startupProbe" not in sidecar
    command = sidecar["command"]
    assert command[command.index("--drain-inbound") + 1] == "5"
    # kubectl logs/exec without -c still pick the app, not the first container
    notes = tpl["metadata"]["annotations"]
    assert notes["kubectl.kubernetes.io/default-container"] == "app"
    _validate(res.text, "1.25.0")
    # native: none of it (the startup probe holds the app; the app is gone at SIGTERM)
    native = inject_text(res.text, InjectOptions())
    tpl = yaml.safe_load(native.text)["spec"]["template"]
    assert "kubectl.kubernetes.io/default-container" not in tpl["metadata"]["annotations"]
    (sidecar,) = [c for c in tpl["spec"]["initContainers"] if c["name"] == SIDECAR_NAME]
    assert "lifecycle" not in sidecar and "--drain-inbound" not in sidecar["command"]
    assert native.text == inject_text(yaml.safe_dump(dep), InjectOptions()).text
    # the user's own default-container is theirs, and stays
    dep["spec"]["template"]["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/default-container": "worker"
    }
    text = inject_text(yaml.safe_dump(dep), InjectOptions(sidecar="container")).text
    again = inject_text(text, InjectOptions()).text
    notes = yaml.safe_load(again)["spec"]["template"]["metadata"]["annotations"]
    assert notes["kubectl.kubernetes.io/default-container"] == "worker"


@pytest.mark.parametrize("sidecar", ["native", "container"])
def test_both_containers_run_under_the_runtime_default_seccomp_profile(sidecar: str) -> None:
    """No seccompProfile: Unconfined on a default kubelet, and Pod Security
    "restricted" refuses the pod (it asks RuntimeDefault or Localhost)."""
    res = inject_text(yaml.safe_dump(workloads()["Pod"]), InjectOptions(sidecar=sidecar))
    spec = yaml.safe_load(res.text)["spec"]
    ours = [c for c in spec["initContainers"] + spec["containers"] if c["name"] != "app"]
    assert sorted(c["name"] for c in ours) == sorted([INIT_NAME, SIDECAR_NAME])
    for c in ours:
        assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
    _validate(res.text)


def test_the_pod_security_note_is_said_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NET_ADMIN and NET_RAW on l4proxy-init break Pod Security baseline: the
    namespace needs the privileged level, which inject says once per run."""
    src = tmp_path / "in.yaml"
    src.write_text(
        yaml.safe_dump_all([workloads()["Deployment"], workloads()["Job"]], sort_keys=False)
    )
    assert main(["inject", "-f", str(src)]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "pod-security.kubernetes.io/enforce=privileged" in err
    assert "warning" not in err
    pod = workloads()["Pod"]
    pod["metadata"]["annotations"] = {"l4proxy.io/inject": "false"}
    src.write_text(yaml.safe_dump(pod))
    assert main(["inject", "-f", str(src)]) == 0
    assert "note:" not in capsys.readouterr().err  # nothing injected, nothing to say


# -- per-workload annotations -------------------------------------------------------


def _annotated_pod(notes: dict[str, str]) -> dict[str, Any]:
    pod = workloads()["Pod"]
    pod["metadata"]["annotations"] = dict(notes)
    return pod


def test_exclusion_annotations_reach_l4proxy_init() -> None:
    """l4proxy.io/exclude* and Istio's traffic.sidecar.istio.io/exclude* were
    ignored: a workload's database port or metadata-server range was captured
    whatever its manifest said. They add to the command line's."""
    pod = _annotated_pod(
        {
            "l4proxy.io/excludeInboundPorts": "9090, 9091",
            "traffic.sidecar.istio.io/excludeInboundPorts": "9091,8443",
            "l4proxy.io/excludeOutboundPorts": "5432",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "6379",
            "l4proxy.io/excludeOutboundIPRanges": "169.254.169.254/32",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.1.2.3/8,fd00::/8",
        }
    )
    app = pod["spec"]["containers"][0]
    app["readinessProbe"] = {"tcpSocket": {"port": 9090}}  # excluded: no warning
    res = inject_text(yaml.safe_dump(pod), InjectOptions(exclude_inbound_ports=(8080,)))
    assert not res.warnings, res.warnings
    init = yaml.safe_load(res.text)["spec"]["initContainers"][0]
    assert init["command"] == [
        "l4proxy-init", "-p", "15001", "-u", "1337",
        "-d", "8080,9090,9091,8443",
        "-o", "5432,6379",
        "-x", "169.254.169.254/32,10.0.0.0/8,fd00::/8",
    ]  # fmt: skip
    _validate(res.text)
    # removing the annotation and injecting again takes the exclusion out
    again = yaml.safe_load(res.text)
    again["metadata"]["annotations"] = {
        k: v for k, v in again["metadata"]["annotations"].items() if "IPRanges" not in k
    }
    out = inject_text(yaml.safe_dump(again), InjectOptions(exclude_inbound_ports=(8080,))).text
    assert "-x" not in yaml.safe_load(out)["spec"]["initContainers"][0]["command"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("l4proxy.io/excludeInboundPorts", "0", "'0' is not a TCP port"),
        ("l4proxy.io/excludeInboundPorts", "9090;9091", "'9090;9091' is not a TCP port"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "70000", "'70000' is not a TCP"),
        ("l4proxy.io/excludeOutboundPorts", "*", "'\\*' is not a TCP port"),
        ("l4proxy.io/excludeOutboundIPRanges", "10.0.0.0/33", "'10.0.0.0/33' is not an IPv4"),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "fe80::1%eth0", "'fe80::1%eth0' has"),
        ("l4proxy.io/excludeOutboundIPRanges", "*", "'\\*' is not an IPv4 or IPv6 CIDR"),
    ],
)
def test_bad_exclusion_annotations_are_errors_naming_the_workload(
    key: str, value: str, message: str
) -> None:
    """(l4proxy-init would have refused them in the pod: a crash-looping init
    container instead of an error here.)"""
    with pytest.raises(InjectError, match=f"document 1: Pod p: annotation {key}: {message}"):
        inject_text(yaml.safe_dump(_annotated_pod({key: value})), InjectOptions(), "in.yaml")


def test_istios_opt_out_is_warned_about_not_honoured() -> None:
    for where in ("annotations", "labels"):
        pod = workloads()["Pod"]
        pod["metadata"][where] = {"sidecar.istio.io/inject": "false"}
        res = inject_text(yaml.safe_dump(pod), InjectOptions())
        assert res.injected == ["Pod p"]
        (warning,) = res.warnings
        assert 'sidecar.istio.io/inject: "false" is Istio\'s' in warning
        assert 'l4proxy.io/inject: "false"' in warning


@pytest.mark.parametrize("sidecar", ["native", "container"])
def test_opting_out_an_injected_template_takes_out_what_inject_added(sidecar: str) -> None:
    """l4proxy.io/inject: "false" on an injected template left the init
    container and the sidecar in place (the template was "left alone"): the
    pod stayed captured. What the status records is taken out, and only that."""
    dep = workloads()["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "migrate", "image": "m:1"}]
    spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    dep["spec"]["template"]["metadata"]["annotations"] = {"team": "a"}
    plain = yaml.safe_load(yaml.safe_dump(dep))
    injected = yaml.safe_load(
        inject_text(yaml.safe_dump(dep), InjectOptions(sidecar=sidecar, stats_port=15090)).text
    )
    notes = injected["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/port" in notes
    notes["l4proxy.io/inject"] = "false"
    res = inject_text(yaml.safe_dump(injected), InjectOptions(), "in.yaml")
    assert res.skipped == ["Deployment d"] and not res.injected
    (warning,) = res.warnings
    assert 'l4proxy.io/inject: "false": took out what an earlier l4proxy inject added' in warning
    assert "initContainers l4proxy-init" in warning and "volumes l4proxy-rules" in warning
    plain["spec"]["template"]["metadata"]["annotations"]["l4proxy.io/inject"] = "false"
    assert yaml.safe_load(res.text) == plain
    # and once out, nothing more happens
    assert inject_text(res.text, InjectOptions()).text == res.text


def test_host_network_on_an_injected_template_takes_out_the_capture() -> None:
    once = yaml.safe_load(inject_text(yaml.safe_dump(workloads()["Pod"]), InjectOptions()).text)
    once["spec"]["hostNetwork"] = True
    res = inject_text(yaml.safe_dump(once), InjectOptions())
    out = yaml.safe_load(res.text)
    assert "initContainers" not in out["spec"] and "volumes" not in out["spec"]
    assert "annotations" not in out["metadata"]
    assert len(res.warnings) == 2 and "hostNetwork: true, not injected" in res.warnings[0]


# -- the sidecar's resources ---------------------------------------------------------


def _sidecar(text: str) -> dict[str, Any]:
    spec = yaml.safe_load(text)["spec"]
    (c,) = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "l4proxy"
    ]
    return c  # type: ignore[no-any-return]


def test_an_annotated_limit_survives_reinjection() -> None:
    """Re-injecting put the default resources back over the sidecar's tuned
    ones, and there was no way to set them. The template's annotations (and
    the options) set them; a hand edit that re-injecting replaces is warned about."""
    pod = _annotated_pod({"l4proxy.io/proxyMemoryLimit": "512Mi", "l4proxy.io/proxyCPU": "200m"})
    once = inject_text(yaml.safe_dump(pod), InjectOptions())
    assert _sidecar(once.text)["resources"] == {
        "requests": {"cpu": "200m", "memory": "64Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert not once.warnings
    again = inject_text(once.text, InjectOptions(image="reg.example/l4proxy:2"))
    assert _sidecar(again.text)["resources"]["limits"] == {"memory": "512Mi"}
    assert not again.warnings
    _validate(again.text)
    # a hand edit is replaced, with a warning that says how to keep it
    edited = yaml.safe_load(once.text)
    edited["spec"]["initContainers"][1]["resources"] = {"limits": {"memory": "1Gi"}}
    res = inject_text(yaml.safe_dump(edited), InjectOptions())
    assert _sidecar(res.text)["resources"]["limits"] == {"memory": "512Mi"}
    (warning,) = res.warnings
    assert '{"limits":{"memory":"1Gi"}} became' in warning and "l4proxy.io/proxyCPU" in warning


def test_resource_options_and_istios_annotations() -> None:
    opts = InjectOptions(
        proxy_cpu="100m", proxy_memory="128Mi", proxy_cpu_limit="1", proxy_memory_limit="1Gi"
    )
    res = inject_text(yaml.safe_dump(workloads()["Pod"]), opts)
    assert _sidecar(res.text)["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    _validate(res.text)
    # a template's annotation wins over the option; Istio's name works; ours over Istio's
    pod = _annotated_pod(
        {
            "sidecar.istio.io/proxyCPU": "300m",
            "sidecar.istio.io/proxyCPULimit": "2",
            "l4proxy.io/proxyMemoryLimit": "2Gi",
            "sidecar.istio.io/proxyMemoryLimit": "3Gi",
        }
    )
    res = inject_text(yaml.safe_dump(pod), opts)
    assert _sidecar(res.text)["resources"] == {
        "requests": {"cpu": "300m", "memory": "128Mi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    (warning,) = res.warnings
    assert "l4proxy.io/proxyMemoryLimit=2Gi and sidecar.istio.io/proxyMemoryLimit=3Gi" in warning


@pytest.mark.parametrize(
    ("notes", "message"),
    [
        ({"l4proxy.io/proxyCPU": "lots"}, "annotation l4proxy.io/proxyCPU: 'lots' is not a"),
        ({"sidecar.istio.io/proxyMemory": "-1Mi"}, "proxyMemory: '-1Mi' is not a Kubernetes"),
        ({"l4proxy.io/proxyMemory": "128MB"}, "'128MB' is not a Kubernetes quantity"),
        ({"l4proxy.io/proxyMemory": "512Mi"}, "memory request 512Mi is above its limit 256Mi"),
        (
            {"l4proxy.io/proxyCPU": "2", "l4proxy.io/proxyCPULimit": "1500m"},
            "cpu request 2 is above its limit 1500m",
        ),
    ],
)
def test_bad_resources_are_errors_naming_the_workload(notes: dict[str, str], message: str) -> None:
    with pytest.raises(InjectError, match=f"Pod p: .*{message}"):
        inject_text(yaml.safe_dump(_annotated_pod(notes)), InjectOptions())


def test_quantities() -> None:
    q = inject_module.quantity
    assert q("250m") == q("0.25") and q("1Gi") == 1024**3 and q("1e3") == q("1k") == 1000
    assert q("128Mi") == 128 * 1024**2 and q(".5") == q("500m")
    for bad in ("", "Mi", "1.2.3", "-1", "1 Gi", "1GB", "1mi"):
        assert q(bad) is None, bad


def test_resource_options_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump(workloads()["Pod"]))
    argv = ["inject", "-f", str(src), "--proxy-cpu", "100m", "--proxy-memory-limit", "1Gi"]
    assert main(argv) == 0
    resources = _sidecar(capsys.readouterr().out)["resources"]
    assert resources == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}}
    with pytest.raises(SystemExit) as exc:
        main(["inject", "-f", str(src), "--proxy-cpu-limit", "two"])
    assert exc.value.code == 2 and "not a Kubernetes quantity" in capsys.readouterr().err
    assert main(["inject", "-f", str(src), "--proxy-memory", "1Gi"]) == 1
    assert "memory request 1Gi is above its limit 256Mi" in capsys.readouterr().err


def test_the_stats_port_is_not_captured_inbound() -> None:
    """--stats-port's listener is the sidecar's own: a scrape captured went
    through the proxy (refused once it drains). Excluded as Istio excludes 15090."""
    opts = InjectOptions(stats_port=15090, exclude_inbound_ports=(9000,))
    res = inject_text(yaml.safe_dump(workloads()["Pod"]), opts)
    init = yaml.safe_load(res.text)["spec"]["initContainers"][0]
    assert init["command"][-2:] == ["-d", "9000,15090"]
    off = inject_text(res.text, InjectOptions(exclude_inbound_ports=(9000,))).text
    assert yaml.safe_load(off)["spec"]["initContainers"][0]["command"][-2:] == ["-d", "9000"]
    pod = _annotated_pod({"l4proxy.io/excludeInboundPorts": "15090"})  # said twice: once
    res = inject_text(yaml.safe_dump(pod), InjectOptions(stats_port=15090))
    assert yaml.safe_load(res.text)["spec"]["initContainers"][0]["command"][-2:] == ["-d", "15090"]


def test_a_native_sidecar_stops_without_waiting_for_quiet() -> None:
    """A native sidecar gets SIGTERM after the app's containers have exited; its
    default --drain-quiet 5 waited 5 s for outbound calls that cannot come,
    on every pod's termination and every Job's completion."""
    for kind in ("Job", "Deployment"):
        res = inject_text(yaml.safe_dump(workloads()[kind]), InjectOptions(stats_port=15090))
        sidecar = _pod_spec(yaml.safe_load(res.text))["spec"]["initContainers"][1]
        command = sidecar["command"]
        assert command[command.index("--drain-quiet") + 1] == "0"
        assert command[-2:] == ["--stats-listen", "0.0.0.0:15090"]
    # as a container it gets SIGTERM with the app, whose calls still need it
    res = inject_text(yaml.safe_dump(workloads()["Pod"]), InjectOptions(sidecar="container"))
    assert "--drain-quiet" not in _sidecar(res.text)["command"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_writes_the_sidecars_lines_to_its_standard_output(fmt: str) -> None:
    """--access-log text|json: the sidecar runs with --access-log - (kubectl
    logs POD -c l4proxy, Istio's meshConfig.accessLogFile /dev/stdout) in
    that format, the status says so; by default it writes none, and the
    command the sidecar gets parses as l4proxy run's."""
    from l4proxy.cli import build_parser

    text = yaml.safe_dump(workloads()["Pod"])
    res = inject_text(text, InjectOptions(access_log=fmt))
    command = _sidecar(res.text)["command"]
    assert command[-4:] == ["--access-log", "-", "--access-log-format", fmt]
    status = json.loads(yaml.safe_load(res.text)["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status["accessLog"] == fmt
    i = command.index("--pod-labels-file")  # (the pod's file: not here)
    args = build_parser("run").parse_args(command[1:i] + command[i + 2 :])
    assert (args.access_log, args.access_log_format) == ("-", fmt)
    plain = _sidecar(inject_text(text, InjectOptions()).text)["command"]
    assert "--access-log" not in plain
