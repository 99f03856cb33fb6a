"""``l4proxy demo --down``, the demo's record of what it made, and its signals.

A demo that dies without cleaning up is made here by a process that builds a
small part of the topology through :class:`l4proxy.demo.tutorial.Tutorial`
(the record, two namespaces, a process in a session of its own with a child,
as a sidecar and its worker) and then kills itself with SIGKILL. Every prefix
is this process's own (``l4e<pid>``): nothing here can meet a user's demo
(``l4demo-*``) or another test run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.demo import tutorial as demo
from l4proxy.demo.podnet import namespace_exists, namespace_pids, stop_processes, unique_prefix
from tests.conftest import running

pytestmark = pytest.mark.netns

PREFIX = unique_prefix("l4e")

# Records the topology, starts a "sidecar" (a session leader with a child in
# the pod), prints what it made as JSON, and dies without unwinding.
CRASH = """
import io, json, os, signal, sys, time
from l4proxy.demo import tutorial as demo
tut = demo.Tutorial(demo.read_manifests(demo.DEFAULT_MANIFESTS), out=io.StringIO(),
                    prefix=sys.argv[1])
tut.claim()
tut.net.open()
pod = tut.net.add_pod("app")
tut._spawn(pod, ["sh", "-c", "sleep 600 & echo $! >&2; exec sleep 600"], "app.sidecar")
worker = ""
with open(os.path.join(tut.log_dir, "app.sidecar.log")) as f:
    while not worker.endswith("\\n"):
        time.sleep(0.01)
        worker += f.read()
print(json.dumps({"netns": pod.netns, "leader": tut.procs[0].pid, "worker": int(worker),
                  "dirs": [tut.rules_dir, tut.log_dir]}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4proxy", "demo", "--prefix", PREFIX, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _tutorial() -> demo.Tutorial:
    return demo.Tutorial(
        demo.read_manifests(demo.DEFAULT_MANIFESTS), out=io.StringIO(), prefix=PREFIX
    )


@pytest.fixture(autouse=True)
def _leave_nothing() -> Iterator[None]:
    """Whatever a test leaves of its prefix (a failure halfway) is removed."""
    yield
    left = [n for n in os.listdir("/var/run/netns") if n.startswith(f"{PREFIX}-")]
    stop_processes(left)
    for n in left:
        subprocess.run(["ip", "netns", "del", n], check=False)
        shutil.rmtree(f"/etc/netns/{n}", ignore_errors=True)
    shutil.rmtree(demo.state_dir(PREFIX), ignore_errors=True)


@pytest.fixture
def bystander() -> str:
    """A namespace of the same prefix that no demo recorded (another
    program's): --down must leave it alone."""
    name = f"{PREFIX}-bystander"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def test_down_removes_what_a_dead_demo_recorded_and_nothing_else(bystander: str) -> None:
    crash = subprocess.run(
        [sys.executable, "-c", CRASH, PREFIX], capture_output=True, text=True, timeout=60
    )
    assert crash.returncode == -9, crash.stderr
    made = json.loads(crash.stdout)
    with open(os.path.join(demo.state_dir(PREFIX), demo.STATE_FILE)) as f:
        state = json.load(f)
    assert state["namespaces"] == [f"{PREFIX}-node", f"{PREFIX}-app"]
    assert state["dirs"] == made["dirs"]
    # The demo is gone; its sidecar and the sidecar's worker run on.
    assert namespace_pids([made["netns"]])[made["netns"]] == sorted(
        [made["leader"], made["worker"]]
    )

    r = _cli("--down")
    assert r.returncode == 0, r.stderr
    assert "removed 2 namespace(s)" in r.stdout
    assert not running(made["leader"]) and not running(made["worker"])
    assert not namespace_exists(f"{PREFIX}-node") and not namespace_exists(f"{PREFIX}-app")
    assert not any(os.path.exists(d) for d in made["dirs"])
    assert not os.path.exists(demo.state_dir(PREFIX))
    assert namespace_exists(bystander)

    # Nothing recorded any more: the bystander is not --down's to remove.
    again = _cli("--down")
    assert again.returncode == 1
    assert bystander in again.stderr and "ip netns del" in again.stderr
    assert namespace_exists(bystander)


def test_down_removes_a_demo_an_earlier_l4proxy_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before the record, --keep wrote STATE_DIR/pids (the sidecars'
    sessions) and links to its rules and logs there: --down read only
    STATE_DIR/l4demo/state.json, refused, and the old sidecars ran on. As a
    user's would be, but in a state directory and prefix of this test's."""
    monkeypatch.setattr(demo, "STATE_DIR", str(tmp_path))
    monkeypatch.setattr(demo, "PREFIX", PREFIX)  # the default prefix, here
    node, app = f"{PREFIX}-node", f"{PREFIX}-app"
    for name in (node, app):
        subprocess.run(["ip", "netns", "add", name], check=True)
    # a sidecar as the old demo started it: a session of its own, and a worker
    sidecar = subprocess.Popen(
        ["ip", "netns", "exec", app, "sh", "-c", "sleep 600 & echo $!; exec sleep 600"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert sidecar.stdout is not None
    worker = int(sidecar.stdout.readline())
    (tmp_path / "pids").write_text(f"{sidecar.pid}\n")
    dirs = []
    for name in ("rules", "logs"):
        dirs.append(tempfile.mkdtemp(prefix=f"{demo.TEMP_PREFIX}{name}-"))
        (tmp_path / name).symlink_to(dirs[-1])

    assert demo._down(PREFIX) == 0
    sidecar.wait(timeout=10)
    assert not running(worker)
    assert not namespace_exists(node) and not namespace_exists(app)
    assert not any(os.path.exists(d) for d in dirs)
    assert list(tmp_path.iterdir()) == []
    # and a demo of that prefix can be made again
    assert not os.path.exists(demo.state_dir(PREFIX))


def test_down_refuses_while_the_demo_that_recorded_it_runs() -> None:
    tut = _tutorial()
    try:
        tut.claim()  # this process is the running demo
        r = _cli("--down")
        assert r.returncode == 2
        assert f"still running (pid {os.getpid()})" in r.stderr
        assert os.path.exists(os.path.join(tut.state_dir, demo.STATE_FILE))
    finally:
        tut.down()
    assert not os.path.exists(tut.state_dir)


def test_one_run_of_a_prefix_at_a_time() -> None:
    first, second = _tutorial(), _tutorial()
    try:
        first.claim()
        with pytest.raises(demo.DemoBusy, match=r"--down --prefix"):
            second.claim()
        second.down()  # not its record: left alone
        assert os.path.exists(os.path.join(first.state_dir, demo.STATE_FILE))
    finally:
        first.down()
    assert not os.path.exists(first.state_dir)


# Signals as the demo gets them (run() in l4proxy/demo/tutorial.py), and a
# second and third while it unwinds and while it cleans up.
SIGNALS = """
import os, signal, sys, time
from l4proxy.demo import tutorial as demo
first = getattr(signal, sys.argv[1])
with demo._signals_as_exceptions() as stop:
    try:
        os.kill(os.getpid(), first)
        time.sleep(10)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        for again in demo.STOP_SIGNALS:  # while it unwinds
            os.kill(os.getpid(), again)
    finally:
        came = stop.cleanup_begins()
        for again in demo.STOP_SIGNALS:  # while it cleans up
            os.kill(os.getpid(), again)
        time.sleep(0.2)
        print("cleaned up", came, flush=True)
"""


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_unwinds_and_nothing_interrupts_the_cleanup(first: str) -> None:
    """Ctrl-C, kill and a closed terminal (SIGHUP, which killed the demo on
    the spot and left every sidecar running) all unwind into the cleanup, and
    no further signal cuts it short."""
    r = subprocess.run(
        [sys.executable, "-c", SIGNALS, first], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout) == (0, "interrupted\ncleaned up True\n"), r.stderr
    assert r.stderr.count("cleaning up, a moment") == 2 * len(demo.STOP_SIGNALS)


# A signal's KeyboardInterrupt lost (Python prints and drops one raised in an
# at-fork callback: logging's, as the demo starts a pod's process), then the
# next signal.
LOST = """
import os, signal, time
from l4proxy.demo import tutorial as demo
with demo._signals_as_exceptions() as stop:
    try:
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(10)
        except KeyboardInterrupt:
            print("lost", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # (noted: the first one's raise is on its way)
        time.sleep(0.1)
        stop.checkpoint()
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        print("came", stop.cleanup_begins(), flush=True)
"""


def test_a_signal_after_a_lost_one_still_stops_the_demo() -> None:
    """The demo ran its whole step after a closed terminal (SIGHUP), kill and
    Ctrl-C, and exited 0: the first signal's KeyboardInterrupt landed in
    logging's at-fork callback and was dropped, and the others were taken
    for signals during the cleanup. Now the demo's next checkpoint raises
    the lost one, and the cleanup says that one came (run() exits 130 if
    it was lost after the last checkpoint)."""
    r = subprocess.run([sys.executable, "-c", LOST], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "lost\ninterrupted\ncame True\n"), r.stderr


def test_a_closed_terminal_stops_the_demo_and_its_pods() -> None:
    """SIGHUP while the topology is built (the app pods' sidecars running),
    then SIGTERM and SIGINT: exit 130, nothing left behind."""
    # 300 requests: the step runs for seconds after the client pod is recorded
    # (with 1, the whole demo could end, 3 s on CI, before the signals came)
    args = ["--prefix", PREFIX, "--step", "all-v1", "--requests", "300", "--keepalive", "0"]
    demo_run = subprocess.Popen(
        [sys.executable, "-m", "l4proxy", "demo", *args, "--no-canary"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = os.path.join(demo.state_dir(PREFIX), demo.STATE_FILE)
    recorded: list[str] = []
    deadline = time.monotonic() + 60
    while f"{PREFIX}-client" not in recorded and demo_run.poll() is None:
        assert time.monotonic() < deadline, "the demo did not get to the client pod"
        time.sleep(0.02)
        try:
            with open(state) as f:
                recorded = json.load(f)["namespaces"]
        except (FileNotFoundError, ValueError):
            pass
    pods = [pid for pids in namespace_pids(recorded).values() for pid in pids]
    assert pods, "no sidecar or app runs yet"
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        demo_run.send_signal(signum)
    out, err = demo_run.communicate(timeout=60)
    assert demo_run.returncode == 130, out + err
    assert "interrupted; cleaning up" in err
    assert not [pid for pid in pods if running(pid)]
    assert not [n for n in recorded if namespace_exists(n)]
    assert not os.path.exists(demo.state_dir(PREFIX))
