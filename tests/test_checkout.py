"""The README's commands from any checkout: the skip rule, and the mirror.

``make demo`` and ``make test`` run processes as uid 1000 and 1337 from the
checkout; where those users cannot read it (a 0700 parent: root's home,
``mktemp -d``; or umask 077), ``tools/mirror`` has make run in a
world-readable mirror. These tests drive ``tools/mirror`` and the Makefile's
parse-time checks on small fake checkouts, with the mirror root pointed at a
temporary directory (``L4PROXY_MIRROR_ROOT``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.demo import tutorial as demo
from l4proxy.demo.podnet import PodNetworkError, unique_prefix
from tests.conftest import REPO, _skip_or_fail

TESTS = Path(REPO) / "tests"
MIRROR = os.path.join(REPO, "tools", "mirror")

# Skips that do not go through conftest's CI rule, and why that is right.
EXEMPT_SKIPS = {
    # nginx and haproxy are installed by `make bench`, valgrind by `python -m
    # bench.instructions`, perf by `python -m bench.kernel`; none is part of
    # `make test`.
    "test_bench_smoke.py": 3,
    # promtool (Debian's prometheus, a server and its tools: not installed by
    # `make test`) evaluates the canary's mirrored PromQL where it is there;
    # the query text is pinned by another test that always runs
    "test_canary_mirror.py": 1,
}


def test_no_skip_bypasses_the_ci_rule() -> None:
    bare = re.compile(r"pytest\.skip\(|importorskip\(|mark\.skipif\(|mark\.skip\(")
    found: dict[str, int] = {}
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("conftest.py", "test_checkout.py"):
            continue
        n = len(bare.findall(path.read_text()))
        if n:
            found[path.name] = n
    assert found == EXEMPT_SKIPS, "skip through tests.conftest._skip_or_fail (or seed_dir)"


def _pytest(env_extra: dict[str, str], absent: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(L4PROXY_SHARED=str(absent), **env_extra)
    tests = [
        "tests/test_inject.py::test_seed_old_api_is_injected_with_a_warning",
        "tests/test_config_load.py::test_the_three_seed_rules_together_are_duplicates",
    ]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def test_seed_tests_skip_without_shared_and_fail_under_ci(tmp_path: Path) -> None:
    local = _pytest({}, tmp_path / "absent")
    assert local.returncode == 0, local.stdout + local.stderr
    assert "2 skipped" in local.stdout and "no seed manifests at" in local.stdout
    ci = _pytest({"CI": "true"}, tmp_path / "absent")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "2 errors" in ci.stdout
    assert "CI=true and this test cannot run: no seed manifests" in ci.stdout


# -- tools/mirror and the Makefile -------------------------------------------


# Root (and setpriv) to run things as uid 1000 and 1337: the netns marker's check.
needs_root = pytest.mark.netns


def _as(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


@pytest.fixture
def places() -> Iterator[tuple[Path, Path]]:
    """(a directory every user can enter, one only root can enter)."""
    opened = Path(tempfile.mkdtemp(prefix="l4co-open-", dir="/var/tmp"))
    closed = Path(tempfile.mkdtemp(prefix="l4co-closed-", dir="/var/tmp"))
    opened.chmod(0o755)
    try:
        yield opened, closed
    finally:
        shutil.rmtree(opened)
        shutil.rmtree(closed)


def _checkout(parent: Path) -> Path:
    co = parent / "l4proxy"
    for rel, text in [
        ("l4proxy/__init__.py", "x = 1\n"),
        ("tests/tools/dial.py", "x = 2\n"),
        ("gone.txt", "deleted later\n"),
        (".gitignore", "/.venv/\n*.so\n"),
        (".git/HEAD", "ref: refs/heads/main\n"),
        (".venv/pyvenv.cfg", "home = /usr/bin\n"),
        ("l4proxy/dataplane/_ext/pump.so", "built here\n"),
    ]:
        (co / rel).parent.mkdir(parents=True, exist_ok=True)
        (co / rel).write_text(text)
    for d in [co, *co.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    shutil.copy(os.path.join(REPO, "Makefile"), co / "Makefile")
    (co / "tools").mkdir(mode=0o755)
    shutil.copy(MIRROR, co / "tools" / "mirror")
    return co


def _mirror(
    co: Path, mirrors: Path, *args: str, uid: int | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["bash", "tools/mirror", *args]
    return subprocess.run(
        argv if uid is None else _as(uid, *argv),
        cwd=co,
        env={**os.environ, "DEB_PACKAGES": "", "L4PROXY_MIRROR_ROOT": str(mirrors)},
        capture_output=True,
        text=True,
    )


@needs_root
def test_plan_runs_in_place_when_every_user_can_read_the_checkout(
    places: tuple[Path, Path],
) -> None:
    opened, _ = places
    co = _checkout(opened)
    r = _mirror(co, opened / "mirrors", "plan", "test")
    assert (r.returncode, r.stdout, r.stderr) == (0, "here\n", "")


@needs_root
def test_plan_mirrors_a_closed_checkout_and_says_so(places: tuple[Path, Path]) -> None:
    opened, closed = places
    co = _checkout(closed)
    r = _mirror(co, opened / "mirrors", "plan", "test")
    want = opened / "mirrors" / hashlib.sha256(str(co).encode()).hexdigest()[:16]
    assert r.stdout == f"mirror:{want}\n"
    assert (
        r.stderr.count("\n") == 1 and f"uid 1000 cannot read {co}/l4proxy/__init__.py" in r.stderr
    )
    assert f"world-readable mirror of this checkout, {want} (make clean removes it)" in r.stderr


@needs_root
def test_plan_mirrors_files_made_under_umask_077(places: tuple[Path, Path]) -> None:
    opened, _ = places
    co = _checkout(opened)
    (co / "tests" / "tools" / "dial.py").chmod(0o600)
    r = _mirror(co, opened / "mirrors", "plan", "demo")
    assert r.stdout.startswith("mirror:") and "uid 1000 cannot read" in r.stderr


@needs_root
def test_sync_makes_a_readable_root_owned_incremental_mirror(places: tuple[Path, Path]) -> None:
    if not shutil.which("rsync"):
        _skip_or_fail("needs rsync (make installs it)")
    opened, closed = places
    co = _checkout(closed)
    os.chown(co / "gone.txt", 1000, 1000)
    (co / "l4proxy" / "__init__.py").chmod(0o600)
    dest = opened / "mirrors" / "m"
    r = _mirror(co, opened / "mirrors", "sync", str(dest))
    assert r.returncode == 0, r.stderr
    for uid in (1000, 1337):
        assert (
            subprocess.run(_as(uid, "test", "-r", str(dest / "l4proxy/__init__.py"))).returncode
            == 0
        )
    assert (dest / ".l4proxy-origin").read_text() == f"{co}\n"
    assert (dest / "gone.txt").stat().st_uid == 0  # what root runs is root's
    # .git and ignored files stay behind; the mirror's own build outputs survive.
    assert not (dest / ".git").exists() and not (dest / ".venv").exists()
    assert not (dest / "l4proxy/dataplane/_ext/pump.so").exists()
    (dest / ".venv").mkdir()
    (dest / ".venv" / "pyvenv.cfg").write_text("the mirror's own\n")
    (dest / "l4proxy/dataplane/_ext/pump.so").write_text("built in the mirror\n")
    kept = (dest / "l4proxy/__init__.py").stat()
    (co / "gone.txt").unlink()
    (co / "new.txt").write_text("new\n")
    r = _mirror(co, opened / "mirrors", "sync", str(dest))
    assert r.returncode == 0, r.stderr
    assert not (dest / "gone.txt").exists() and (dest / "new.txt").read_text() == "new\n"
    assert (dest / ".venv" / "pyvenv.cfg").read_text() == "the mirror's own\n"
    assert (dest / "l4proxy/dataplane/_ext/pump.so").read_text() == "built in the mirror\n"
    now = (dest / "l4proxy/__init__.py").stat()
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not copied again


def _outside_make() -> dict[str, str]:
    """This environment without what an enclosing make (make test) passes down."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "L4PROXY_ORIGIN"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _make(
    co: Path, mirrors: Path, goal: str, uid: int | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["make", "--no-print-directory", goal]
    return subprocess.run(
        argv if uid is None else _as(uid, *argv),
        cwd=co,
        env={**_outside_make(), "L4PROXY_MIRROR_ROOT": str(mirrors)},
        capture_output=True,
        text=True,
    )


@needs_root
def test_make_stops_with_one_line_before_any_work(places: tuple[Path, Path]) -> None:
    opened, closed = places
    co = _checkout(opened)
    r = _make(co, opened / "mirrors", "demo", uid=1000)
    assert r.returncode == 2 and r.stdout == ""
    assert re.fullmatch(
        r"Makefile:\d+: \*\*\* make demo needs root .*sudo make demo\.  Stop\.\n", r.stderr
    )
    # Root, a closed checkout, and nowhere readable to mirror it to.
    co = _checkout(closed)
    before = sorted(p.name for p in co.iterdir())
    r = _make(co, closed / "mirrors", "test")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and "cannot enter" in r.stderr, r.stderr
    assert "clone the project into a directory every user can enter" in r.stderr
    assert sorted(p.name for p in co.iterdir()) == before and not (closed / "mirrors").exists()


@needs_root
def test_demo_says_in_one_line_when_its_users_cannot_run_it(
    places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, closed = places
    co = _checkout(closed)
    monkeypatch.setattr(demo, "HERE", str(co / "l4proxy"))
    why = demo._unreachable()
    assert why.startswith(f"uid 1000 cannot run {co}/l4proxy (a parent directory is closed")
    assert "make demo" in why and "\n" not in why
    monkeypatch.setattr(demo, "HERE", os.path.join(REPO, "l4proxy"))
    assert demo._unreachable() == ""


@needs_root
@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            PodNetworkError("nothing listens on port 8080 in pod bootcamp-v1-0 after 10.0s"),
            "l4proxy demo: nothing listens on port 8080 in pod bootcamp-v1-0 after 10.0s\n",
        ),
        (KeyError("app"), "l4proxy demo: failed: KeyError: 'app'\n"),
    ],
)
def test_demo_fails_in_one_line_never_a_traceback(
    exc: Exception,
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The failure of the issue ("make demo dies with a traceback"), raised
    # where the topology is built; nothing is built, so nothing is left.
    def up(self: demo.Tutorial) -> None:
        raise exc

    monkeypatch.setattr(demo.Tutorial, "up", up)
    monkeypatch.setattr(demo, "namespace_exists", lambda name: False)
    # (its own prefix: run() claims it, and the user's demo may hold l4demo)
    args = demo_parser().parse_args(["demo", "--prefix", unique_prefix("l4c")])
    assert demo.run(args) == 1
    assert not os.path.exists(demo.state_dir(args.prefix))
    assert capsys.readouterr().err == line


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    return parser
