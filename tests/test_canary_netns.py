"""``l4proxy canary`` against real sidecars in namespaces (issue 13).

The client pod's sidecar runs ``--http-routing request`` (per-request
metrics); a keep-alive load client (uid 1000) sends requests to the Service
VIP throughout; the command runs in the client pod (the sidecar's admin is
on its loopback) as root, on the rules directory the sidecar watches.
Bad versions are bootcamp pods with ``--fail-rate`` (seeded) or ``--delay-ms``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.mesh import L4PROXY, PYTHON, VIP, Mesh, route_rule

pytestmark = pytest.mark.netns

PER_REQUEST = ("--http-routing", "request")
FAST = ("--interval", "1", "--threshold", "2", "--min-requests", "5", "--wait-live", "10")

LOAD = r"""
import http.client, sys, time
host, port = sys.argv[1], int(sys.argv[2])
c = None
while True:
    try:
        if c is None:
            c = http.client.HTTPConnection(host, port, timeout=10)
        c.request("GET", "/", headers={"Host": "bootcamp"})
        c.getresponse().read()
    except Exception:
        c = None
        time.sleep(0.01)
"""


def add_version(mesh: Mesh, version: str, *app_args: str) -> None:
    pod = mesh.net.add_pod(f"bc-{version}-0", labels={"app": "bootcamp", "version": version})
    mesh.procs.append(
        pod.popen(
            [
                PYTHON,
                "-m",
                "l4proxy.demo.bootcamp",
                "--port",
                "8080",
                "--pod",
                f"bootcamp-{version}-0",
                "--version",
                version[1:],
                *app_args,
            ],
            user=1000,
            env=mesh.env,
        )
    )
    pod.wait_listening(8080)
    mesh.bootcamp.append(pod)


@pytest.fixture
def load(mesh: Mesh) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(conns: int = 2) -> None:
        assert mesh.client is not None
        for _ in range(conns):
            procs.append(
                mesh.client.popen([PYTHON, "-c", LOAD, VIP, "8080"], user=1000, env=mesh.env)
            )

    yield start
    for p in procs:
        p.kill()
        p.wait()


def canary(mesh: Mesh, *args: str) -> subprocess.Popen[str]:
    assert mesh.client is not None
    return mesh.client.popen(  # type: ignore[return-value]
        [L4PROXY, "canary", *args, "--metrics", "127.0.0.1:15000", "--json"],
        env=mesh.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str], timeout: float = 60) -> tuple[int, list[dict[str, Any]], str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, [json.loads(ln) for ln in out.splitlines() if ln.strip()], err


def weights(events: Sequence[dict[str, Any]]) -> list[int]:
    return [e["weight"] for e in events]


def versions_served(mesh: Mesh, n: int = 40) -> set[str]:
    versions, _, failures = mesh.split(n=n)
    assert not failures, failures
    return {v for v, c in versions.items() if c}


def test_promotion_in_a_rules_file_keeps_the_users_documents(mesh: Mesh, load: Any) -> None:
    mesh.start("compiled-uvloop", run_args=PER_REQUEST)
    # The user's own file: the registry, a comment, another service's rule.
    registry = os.path.join(mesh.rules_dir, "registry.yaml")
    with open(registry) as f:
        user_text = (
            "# the user's file: comments and order must survive\n"
            + f.read()
            + "\n---\n"
            + route_rule({"v1": 100}, name="other").replace("name: bootcamp", "name: other")
        )
    mesh.write_rules(user_text, name="registry.yaml")
    load()
    p = canary(
        mesh,
        "bootcamp",
        "--stable",
        "v1",
        "--canary",
        "v2",
        "--rules",
        registry,
        "--steps",
        "25,50,100",
        *FAST,
    )
    code, events, err = finish(p)
    assert code == 0, err
    assert [e["event"] for e in events] == ["start", "check", "check", "promoted"]
    assert weights(events) == [25, 50, 100, 100]
    assert all(e["check"]["verdict"] == "pass" for e in events[1:])
    with open(registry) as f:
        now = f.read()
    assert now.startswith(user_text + "---\n")  # every byte of the user's documents
    assert "name: canary-bootcamp" in now and "weight: 100" in now
    assert versions_served(mesh) == {"v2"}
    assert sorted(os.listdir(mesh.rules_dir)) == sorted(
        [".canary-bootcamp.state.json", ".l4proxy.lock", "registry.yaml", "sidecar.log"]
    )


def test_rollback_on_errors_then_on_latency(mesh: Mesh, load: Any) -> None:
    add_version(mesh, "v3", "--fail-rate", "0.3", "--seed", "7")
    add_version(mesh, "v4", "--delay-ms", "150")
    mesh.start("compiled-uvloop", run_args=PER_REQUEST)
    load(3)
    p = canary(
        mesh,
        "bootcamp",
        "--stable",
        "v1",
        "--canary",
        "v3",
        "--rules",
        mesh.rules_dir,
        "--steps",
        "25,50,100",
        *FAST,
    )
    code, events, err = finish(p)
    assert code == 1, err
    assert events[-1]["event"] == "rolled_back" and events[-1]["weight"] == 0
    assert all("success rate" in " ".join(e["check"]["reasons"]) for e in events[1:])
    assert versions_served(mesh) == {"v1"}
    # A new rollout (other versions) after one ended; p99 ~150 ms > 100 ms.
    p = canary(
        mesh,
        "bootcamp",
        "--stable",
        "v1",
        "--canary",
        "v4",
        "--rules",
        mesh.rules_dir,
        "--steps",
        "25,50,100",
        "--max-p99",
        "100",
        *FAST,
    )
    code, events, err = finish(p)
    assert code == 1, err
    assert events[0]["event"] == "start" and events[-1]["event"] == "rolled_back"
    assert all(e["check"]["reasons"][0].startswith("p99 ") for e in events[1:])
    assert versions_served(mesh) == {"v1"}
    # Rolled back stays rolled back: the same command again sends nothing to v4.
    p = canary(
        mesh, "bootcamp", "--stable", "v1", "--canary", "v4", "--rules", mesh.rules_dir, *FAST
    )
    code, events, _ = finish(p)
    assert code == 1 and [e["weight"] for e in events] == [0]


def test_halt_without_traffic_then_abort(mesh: Mesh) -> None:
    mesh.start("compiled-uvloop", run_args=PER_REQUEST)
    p = canary(
        mesh,
        "bootcamp",
        "--stable",
        "v1",
        "--canary",
        "v2",
        "--rules",
        mesh.rules_dir,
        "--steps",
        "10,100",
        "--on-abort",
        "leave",
        *FAST,
    )
    assert p.stdout is not None
    lines = [p.stdout.readline() for _ in range(4)]  # start + three intervals
    p.send_signal(signal.SIGTERM)
    code, rest, _ = finish(p)
    events = [json.loads(ln) for ln in lines] + rest
    assert code == 3
    assert [e["check"]["verdict"] for e in events[1:]] == ["halt"] * 3
    assert set(weights(events)) == {10} and events[-1]["failed_checks"] == 0
    assert mesh.client is not None
    status = mesh.client.run(
        [L4PROXY, "canary", "status", "bootcamp", "--rules", mesh.rules_dir, "--json"]
    )
    assert json.loads(status.stdout)["phase"] == "progressing"
    r = mesh.client.run(
        [
            L4PROXY,
            "canary",
            "abort",
            "bootcamp",
            "--rules",
            mesh.rules_dir,
            "--metrics",
            "127.0.0.1:15000",
        ],
        check=False,
    )
    assert r.returncode == 1 and "rolled back at 0 %" in r.stdout
    assert versions_served(mesh) == {"v1"}


def test_resume_after_the_command_is_killed(mesh: Mesh, load: Any) -> None:
    mesh.start("compiled-uvloop", run_args=PER_REQUEST)
    load()
    args = (
        "bootcamp",
        "--stable",
        "v1",
        "--canary",
        "v2",
        "--rules",
        mesh.rules_dir,
        "--steps",
        "20,30,40,50,100",
        *FAST,
    )
    p = canary(mesh, *args)
    assert p.stdout is not None
    seen = [json.loads(p.stdout.readline()) for _ in range(3)]  # start, 20 -> 30, 30 -> 40
    p.kill()  # SIGKILL: no handler runs
    p.wait()
    assert seen[-1]["weight"] == 40
    time.sleep(0.2)
    code, events, err = finish(canary(mesh, *args))
    assert code == 0, err
    assert events[0]["event"] == "resume" and events[0]["weight"] >= 40
    assert weights(events)[-1] == 100 and 20 not in weights(events)
