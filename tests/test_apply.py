"""``l4proxy create|replace|delete``: real files, and a real sidecar for --admin.

Every refusal must leave the directory byte for byte as it was.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from l4proxy.cli import main
from tests._hardening import wait_until
from tests.conftest import serving
from tests.mesh import L4PROXY, VIP, Mesh, binomial_ok, service_entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "deploy", "examples", "gateway-api")
REGISTRY = os.path.join(REPO, "tests", "data", "gateway-api", "registry-per-version.yaml")


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy(REGISTRY, d / "registry.yaml")
    shutil.copy(os.path.join(EXAMPLES, "gateway.yaml"), d / "gateway.yaml")
    return d


def l4(verb: str, f: str, d: Path, *extra: str) -> int:
    return main([verb, "-f", f, "--rules", str(d), *extra])


def ex(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def test_create_replace_delete_round_trip(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert l4("create", ex("httproute-all-v1.yaml"), rules) == 0
    assert (rules / "httproute-all-v1.yaml").read_bytes() == Path(
        ex("httproute-all-v1.yaml")
    ).read_bytes()
    # replace keeps the file's name and takes the new text
    assert l4("replace", ex("httproute-50-v2.yaml"), rules) == 0
    assert (rules / "httproute-all-v1.yaml").read_bytes() == Path(
        ex("httproute-50-v2.yaml")
    ).read_bytes()
    assert l4("delete", ex("httproute-all-v2.yaml"), rules) == 0
    assert sorted(snapshot(rules)) == ["gateway.yaml", "registry.yaml"]
    assert not [n for n in os.listdir(rules) if n.endswith(".tmp")]


def test_create_refuses_an_existing_object(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert l4("create", ex("httproute-all-v1.yaml"), rules) == 0
    before = snapshot(rules)
    capsys.readouterr()
    assert l4("create", ex("httproute-50-v2.yaml"), rules) == 1
    assert "HTTPRoute default/bootcamp already exists in" in capsys.readouterr().err
    assert snapshot(rules) == before


@pytest.mark.parametrize("name", ["route-v1.YAML", ".route-v1.yaml", "route-v1.txt"])
def test_create_refuses_a_name_the_sidecar_does_not_read(
    rules: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed as DIR/route-v1.YAML (the suffix is matched case and all), a
    hidden name or another suffix, the file was never read by the sidecar,
    and create said it had worked."""
    src = tmp_path / name
    src.write_text(Path(ex("httproute-all-v1.yaml")).read_text())
    before = snapshot(rules)
    assert l4("create", str(src), rules) == 2
    err = capsys.readouterr().err
    assert f"{src}: the sidecars would not read {name!r} in {rules}" in err
    assert snapshot(rules) == before and not (rules / name).exists()


@pytest.mark.parametrize("verb", ["replace", "delete"])
def test_replace_and_delete_need_the_objects(
    rules: Path, verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(rules)
    assert l4(verb, ex("httproute-50-v2.yaml"), rules) == 1
    assert "HTTPRoute default/bootcamp is not in" in capsys.readouterr().err
    assert snapshot(rules) == before


def test_a_create_that_makes_the_directory_invalid_changes_nothing(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        Path(ex("httproute-50-v2.yaml")).read_text().replace("weight: 50", "weight: 2000000", 1)
    )
    before = snapshot(rules)
    assert l4("create", str(bad), rules) == 1
    err = capsys.readouterr().err
    line = 1 + bad.read_text().splitlines().index("      weight: 2000000")
    assert f"{bad}:{line}: HTTPRoute bootcamp: weight 2000000 is not in range 0..1000000" in err
    assert "nothing changed" in err
    assert snapshot(rules) == before


def test_a_duplicate_name_in_another_file_is_refused(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Same HTTPRoute name as an installed one, but create checks by object:
    # a second Gateway named like the first is a duplicate.
    dup = tmp_path / "gateway2.yaml"
    dup.write_text(Path(ex("gateway.yaml")).read_text())
    before = snapshot(rules)
    assert l4("create", str(dup), rules) == 1
    assert "Gateway default/bootcamp-gateway already exists" in capsys.readouterr().err
    assert snapshot(rules) == before


def test_a_delete_that_leaves_a_dangling_parent_is_done_with_a_warning(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deleting the Gateway of a route revokes the route (it was refused:
    the route's unknown parent was a load error, and a sidecar kept the
    last good rules, the deleted Gateway's routes with them); the route's
    parentRef is said, as a warning."""
    assert l4("create", ex("httproute-50-v2.yaml"), rules) == 0
    capsys.readouterr()
    assert l4("delete", ex("gateway.yaml"), rules) == 0
    err = capsys.readouterr().err
    assert "warning: HTTPRoute bootcamp: unknown parent: no Gateway default/bootcamp-gateway" in err
    assert sorted(snapshot(rules)) == ["httproute-50-v2.yaml", "registry.yaml"]


def test_files_holding_other_objects_are_not_split(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = rules / "both.yaml"
    both.write_text(
        Path(ex("httproute-50-v2.yaml")).read_text()
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: other}\n"
    )
    before = snapshot(rules)
    assert l4("delete", ex("httproute-50-v2.yaml"), rules) == 1
    assert "also holds Service default/other" in capsys.readouterr().err
    assert snapshot(rules) == before


def test_unreadable_file_is_a_usage_error(rules: Path, tmp_path: Path) -> None:
    assert l4("create", str(tmp_path / "nope.yaml"), rules) == 2
    assert l4("create", ex("gateway.yaml"), tmp_path / "no-dir") == 2


def test_admin_reads_what_the_sidecar_serves_under_the_lock_after_validating(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The mark to wait past was read before the lock and the validation (seconds
    on big rule sets): another writer's change going live meanwhile was taken
    for this one. It is read last before the change, with the lock held."""
    held: list[bool] = []

    def stats(target: str) -> bytes:
        if not held:
            fd = os.open(rules / ".l4proxy.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(fd)
            return b"l4proxy_rules_generation 1\nl4proxy_rules_digest 5\n"
        return b"l4proxy_rules_generation 2\nl4proxy_rules_digest 6\n"

    with serving(stats) as admin:
        assert l4("create", ex("httproute-all-v1.yaml"), rules, "--admin", admin) == 0
        # A refused change asks the sidecar nothing.
        assert l4("create", ex("httproute-all-v1.yaml"), rules, "--admin", "127.0.0.1:1") == 1
    assert held == [True]
    assert "live: " in capsys.readouterr().out


def test_the_file_installed_is_the_text_judged(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The source is read once: what was validated is what goes into the
    directory. An editor saving the file between the check and the write
    (here, while the sidecar's mark is read) changes nothing installed;
    the source was read a second time to be copied, and an invalid text
    that no check saw went live."""
    source = tmp_path / "httproute-all-v1.yaml"
    judged = Path(ex("httproute-all-v1.yaml")).read_bytes()
    source.write_bytes(judged)

    def stats(target: str) -> bytes:
        source.write_bytes(b"kind: HTTPRoute\nspec: [not, a, mapping\n")  # (saved meanwhile)
        return b"l4proxy_rules_generation 1\nl4proxy_rules_digest 5\n"

    with serving(stats) as admin:
        # (the sidecar never moves past generation 1: exit 3, after the write)
        assert l4("create", str(source), rules, "--admin", admin, "--timeout", "0.2") == 3
    assert (rules / "httproute-all-v1.yaml").read_bytes() == judged
    assert "created " in capsys.readouterr().out


def test_admin_asks_again_while_no_worker_answers(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The supervisor's /stats has no rules mark in a round no worker answered
    (one restarting): the read before the change refused, exit 1, "is it
    l4proxy?". It is asked again."""
    reads: list[str] = []

    def stats(target: str) -> bytes:
        reads.append(target)
        if len(reads) <= 3:
            return b"l4proxy_workers 0\n"
        return b"l4proxy_rules_generation %d\nl4proxy_rules_digest %d\n" % (
            (1, 5) if len(reads) == 4 else (2, 6)
        )

    with serving(stats) as admin:
        assert l4("create", ex("httproute-all-v1.yaml"), rules, "--admin", admin) == 0
    assert len(reads) == 5
    assert "live: " in capsys.readouterr().out


# -- with a live sidecar ----------------------------------------------------------


def per_version(mesh: Mesh) -> list[str]:
    """ServiceEntries bootcamp-v1 and bootcamp-v2 (the examples' backends) of *mesh*'s pods."""
    return [
        service_entry(
            f"bootcamp-{v}",
            f"198.19.0.{11 + i}",
            8080,
            [e for e in mesh.endpoints() if e[1]["version"] == v],
        )
        for i, v in enumerate(("v1", "v2"))
    ]


@pytest.mark.netns
def test_admin_waits_for_the_new_generation_and_shifts_traffic(mesh: Mesh) -> None:
    mesh.write_rules(Path(ex("gateway.yaml")).read_text(), name="gateway.yaml")
    mesh.start("compiled-uvloop", *per_version(mesh))
    assert mesh.client is not None and mesh.sidecar is not None
    d = mesh.rules_dir
    step = mesh.client.run(
        [
            L4PROXY,
            "create",
            "-f",
            ex("httproute-all-v1.yaml"),
            "--rules",
            d,
            "--admin",
            "127.0.0.1:15000",
        ],
        check=False,
    )
    assert step.returncode == 0, step.stderr
    assert "live: 127.0.0.1:15000 serves rules generation" in step.stdout
    versions, _, failures = mesh.split(n=60)
    assert (versions["v1"], failures) == (60, [])
    step = mesh.client.run(
        [
            L4PROXY,
            "replace",
            "-f",
            ex("httproute-50-v2.yaml"),
            "--rules",
            d,
            "--admin",
            "127.0.0.1:15000",
        ],
        check=False,
    )
    assert step.returncode == 0, step.stderr
    versions, _, failures = mesh.split(n=200)
    assert not failures and binomial_ok(versions["v2"], 200, 0.5), versions
    # A refused change (a route with a field the API does not have) leaves
    # the sidecar on its generation: nothing to wait for.
    gen = mesh.sidecar.stat("l4proxy_rules_generation")
    broken = Path(d).parent / "broken-route.yaml"
    broken.write_text(
        Path(ex("httproute-all-v1.yaml"))
        .read_text()
        .replace("  name: bootcamp\nspec:", "  name: broken\nspec:\n  hostnamez: [a]", 1)
    )
    step = mesh.client.run(
        [L4PROXY, "create", "-f", str(broken), "--rules", d, "--admin", "127.0.0.1:15000"],
        check=False,
    )
    assert step.returncode == 1 and "nothing changed" in step.stderr, step.stderr
    assert "hostnamez" in step.stderr
    assert mesh.sidecar.stat("l4proxy_rules_generation") == gen


@pytest.mark.netns
def test_admin_sees_a_change_live_in_a_worker_restarted_meanwhile(mesh: Mesh) -> None:
    """A worker restarted after the change counts its loads from 1 again: the
    lowest generation over the workers stayed at its value before the change,
    and ``--admin`` timed out (exit 3) on a change that every worker served.
    The worker is killed once the file is in place and before the sidecar
    reloads it (the files must be still for a second first)."""
    mesh.write_rules(Path(ex("gateway.yaml")).read_text(), name="gateway.yaml")
    mesh.start("compiled-uvloop", *per_version(mesh))
    assert mesh.client is not None and mesh.sidecar is not None
    [worker] = mesh.sidecar.worker_pids()
    target = Path(mesh.rules_dir) / "httproute-all-v1.yaml"
    argv = [L4PROXY, "create", "-f", ex("httproute-all-v1.yaml"), "--rules", mesh.rules_dir]
    argv += ["--admin", "127.0.0.1:15000", "--timeout", "8"]
    step = mesh.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(target.exists, timeout=10, step=0.005)
        os.kill(worker, signal.SIGKILL)
        out, err = step.communicate(timeout=30)
    finally:
        if step.poll() is None:
            step.kill()
    assert step.returncode == 0, err
    assert mesh.sidecar.worker_pids() not in ([], [worker])
    assert "serves rules generation 1" in out  # the new worker's first load
    versions, _, failures = mesh.split(n=20)
    assert (versions["v1"], failures) == (20, [])


@pytest.mark.netns
def test_admin_times_out_with_exit_3_when_the_sidecar_does_not_reload(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.start("compiled-uvloop")
    assert mesh.client is not None
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.chmod(tmp_path, 0o755)
    step = mesh.client.run(
        [
            L4PROXY,
            "create",
            "-f",
            ex("gateway.yaml"),
            "--rules",
            str(other),
            "--admin",
            "127.0.0.1:15000",
            "--timeout",
            "0.5",
        ],
        check=False,
    )
    assert step.returncode == 3, step.stderr
    assert "still serves generation" in step.stderr
    # (it said no more: the sidecar had no error to report)
    assert f"; it reports no error: is it watching {other}? " in step.stderr, step.stderr


@pytest.mark.netns
@pytest.mark.parametrize("impl", ["compiled-uvloop", "pure-asyncio"])
def test_unresolved_backend_share_is_answered_500(mesh: Mesh, impl: str) -> None:
    v1 = service_entry(
        "bootcamp-v1", "198.19.0.11", 8080, [e for e in mesh.endpoints() if e[1]["version"] == "v1"]
    )
    route = Path(ex("httproute-50-v2.yaml")).read_text().replace("bootcamp-v2", "bootcamp-v3")
    mesh.write_rules(Path(ex("gateway.yaml")).read_text(), name="gateway.yaml")
    mesh.start(impl, v1, route)
    assert mesh.sidecar is not None
    lines = mesh.curl(f"http://{VIP}:8080/", 200)
    codes = Counter(ln for ln in lines if ln.isdigit() and len(ln) == 3)
    assert set(codes) == {"200", "500"}, codes
    assert sum(codes.values()) == 200
    assert binomial_ok(codes["500"], 200, 0.5), codes
    assert mesh.sidecar.stat('l4proxy_refused_total{reason="unresolved_backend"}') == codes["500"]
