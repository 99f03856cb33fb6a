"""A DestinationRule's ``workloadSelector`` on a real sidecar: the rule
applies on the sidecar of a pod its ``matchLabels`` select (the pod's
labels: ``--pod-labels``), in place of the host's rule without a selector,
and not on another pod's, as Istio's pilot picks the rule per proxy.

Observed on real sockets: one VirtualService routes every request to
subset ``pinned``, which the rule without a selector pins to v1 and the
rule of a selector to v2; which version answers says which rule the
sidecar applied, in both --http-routing modes. The choice is made when
the rules load (the table holds the chosen rule alone): the data plane is
unchanged, whichever of its twins serves the table."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.mesh import VIP, Mesh, service_entry

pytestmark = pytest.mark.netns

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bootcamp}
spec:
  hosts: [bootcamp]
  http:
  - route:
    - destination: {host: bootcamp, subset: pinned}
"""
EVERYONE_V1 = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bootcamp}
spec:
  host: bootcamp
  subsets:
  - name: pinned
    labels: {version: v1}
"""
CANARY_CALLERS_V2 = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bootcamp-canary-callers}
spec:
  host: bootcamp
  exportTo: ["."]
  workloadSelector:
    matchLabels: {track: canary}
  subsets:
  - name: pinned
    labels: {version: v2}
"""


@pytest.mark.parametrize(
    ("pod_labels", "version"),
    [
        pytest.param("app=client,track=canary", "v2", id="selected"),
        pytest.param("app=client,track=stable", "v1", id="not-selected"),
        pytest.param(None, "v1", id="no-labels"),
    ],
)
@pytest.mark.parametrize("routing", ["connection", "request"])
def test_a_workload_selector_rule_applies_on_the_pods_it_selects(
    mesh: Mesh, routing: str, pod_labels: str | None, version: str
) -> None:
    mesh.write_rules(
        service_entry("bootcamp", VIP, 8080, mesh.endpoints()),
        VS,
        EVERYONE_V1,
        CANARY_CALLERS_V2,
    )
    args = ["--http-routing", routing]
    if pod_labels is not None:
        args += ["--pod-labels", pod_labels]
    mesh.start_client(run_args=args)
    versions, _, failures = mesh.split(n=20)
    assert not failures and versions == {version: 20}, (versions, failures)


def _reloaded(mesh: Mesh, before: float) -> None:
    deadline = time.monotonic() + 15
    while mesh.sidecar.stat("l4proxy_reloads_total") <= before:
        assert time.monotonic() < deadline, mesh.sidecar_log(3000)
        time.sleep(0.1)


@pytest.mark.parametrize("routing", ["connection", "request"])
def test_a_reload_that_adds_or_removes_a_selecting_rule_changes_the_route(
    mesh: Mesh, routing: str
) -> None:
    """The choice follows the files: a rule of a workloadSelector that
    selects this pod, added by a reload, takes the host over on the
    running sidecar, and removed, hands it back to the rule without one."""
    mesh.write_rules(service_entry("bootcamp", VIP, 8080, mesh.endpoints()), VS, EVERYONE_V1)
    mesh.start_client(run_args=["--http-routing", routing, "--pod-labels", "track=canary"])
    versions, _, failures = mesh.split(n=10)
    assert not failures and versions == {"v1": 10}, (versions, failures)
    for docs, version in (((EVERYONE_V1, CANARY_CALLERS_V2), "v2"), ((EVERYONE_V1,), "v1")):
        before = mesh.sidecar.stat("l4proxy_reloads_total")
        mesh.write_rules(service_entry("bootcamp", VIP, 8080, mesh.endpoints()), VS, *docs)
        _reloaded(mesh, before)
        versions, _, failures = mesh.split(n=10)
        assert not failures and versions == {version: 10}, (version, versions, failures)


def test_a_relabelled_pod_takes_its_new_labels_at_a_workers_restart(mesh: Mesh) -> None:
    """``--pod-labels-file`` is read when a worker starts (README, *A
    DestinationRule's workloadSelector*; ``l4proxy run --help``): the file
    rewritten as the Downward API does on ``kubectl label pod``, a reload
    keeps the rule that applied; a worker sent SIGTERM hands over to a
    successor that reads the file again, and the rule of the selector
    applies."""
    mesh.write_rules(
        service_entry("bootcamp", VIP, 8080, mesh.endpoints()), VS, EVERYONE_V1, CANARY_CALLERS_V2
    )
    labels = os.path.join(mesh.rules_dir, "labels")  # (not *.yaml: no rule file)

    def label(track: str) -> None:
        with open(labels + ".tmp", "w") as f:
            f.write(f'app="client"\ntrack="{track}"\n')
        os.chmod(labels + ".tmp", 0o644)
        os.replace(labels + ".tmp", labels)

    label("stable")
    sidecar = mesh.start_client(
        run_args=["--http-routing", "request", "--workers", "1", "--pod-labels-file", labels]
    )
    versions, _, failures = mesh.split(n=10)
    assert not failures and versions == {"v1": 10}, (versions, failures)
    label("canary")
    before = sidecar.stat("l4proxy_reloads_total")
    os.kill(sidecar.proc.pid, signal.SIGHUP)
    _reloaded(mesh, before)
    versions, _, failures = mesh.split(n=10)
    assert not failures and versions == {"v1": 10}, (versions, failures)
    (old,) = sidecar.worker_pids()
    os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while old in sidecar.worker_pids() or len(sidecar.worker_pids()) != 1:
        assert time.monotonic() < deadline, mesh.sidecar_log(3000)
        time.sleep(0.1)
    versions, _, failures = mesh.split(n=10)
    assert not failures and versions == {"v2": 10}, (versions, failures)
