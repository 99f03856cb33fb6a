"""SIGUSR1 reopens ``--access-log`` (logrotate's rename-then-signal), as
Envoy and nginx do; before, its default action killed the sidecar.

A real ``l4proxy run`` with two workers (and one ``--single-process``), in
both implementations: the log renamed, SIGUSR1 to the supervisor, and every
request's line is in one file exactly once: those before the signal in the
renamed file, those after it in the new one; no worker restarted, and no
process keeps the renamed file open (its fd inherited or opened, as its
writer's, points at the new one). A path
that cannot be reopened is said (once until a reopen succeeds, each
failure counted) and the lines go on to the old file; a SIGUSR1 storm
while the workers start kills nothing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import gateway_service
from tests.mesh import IMPLS
from tests.test_run_cli import L4PROXY, _get


class Sidecar:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin: int, err: Path) -> None:
        self.proc, self.port, self.admin, self.err = proc, port, admin, err

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_said(self, text: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.stderr().count(text) < count:
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.02)

    def request(self, marker: str) -> int:
        with socket.create_connection(("127.0.0.1", self.port), 10) as s:
            s.sendall(
                b"GET /%s HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n" % marker.encode()
            )
            return _status(_response(s))

    def wait_lines(self, count: int, timeout: float = 20) -> None:
        """Until the workers took *count* lines into their buffers."""
        deadline = time.monotonic() + timeout
        while True:
            stats = _get(f"http://127.0.0.1:{self.admin}/stats")[1]
            taken = re.findall(r"^l4proxy_access_log_lines_total(?:\{[^}]*\})? (\d+)", stats, re.M)
            if sum(int(n) for n in taken) >= count:
                return
            assert time.monotonic() < deadline, stats
            time.sleep(0.02)


@contextmanager
def sidecar(
    tmp_path: Path,
    impl: str,
    *extra: str,
    on_start: object = None,
    prefix: Sequence[str] = (),
) -> Iterator[Sidecar]:
    """A real ``l4proxy run`` (``--listen``, ``--admin``) in front of a
    Scripted backend, ready; *prefix* runs it (``unshare ...``: its pid is
    the supervisor's once it execs)."""
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    env_extra, impl_args = IMPLS[impl]
    err = tmp_path / "stderr"
    with err.open("wb") as err_file:
        proc = subprocess.Popen(
            [
                *prefix,
                # (port 0, read back from its first line: a port found free
                # and bound later may be another test's by then)
                *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
                *("--admin", "127.0.0.1:0", "--rules", str(rules)),
                *("--log-level", "debug", *impl_args, *extra),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            env={**os.environ, **env_extra},
        )
    car = Sidecar(proc, 0, 0, err)
    try:
        if callable(on_start):
            on_start(car)
        deadline = time.monotonic() + 30
        while True:  # the supervisor's (or a lone worker's) line says where it listens
            bound = re.search(
                r"listening: gateway:127\.0\.0\.1:(\d+); admin 127\.0\.0\.1:(\d+)", car.stderr()
            )
            if bound:
                car.port, car.admin = int(bound[1]), int(bound[2])
                break
            assert time.monotonic() < deadline and proc.poll() is None, car.stderr()
            time.sleep(0.02)
        while True:  # ready: every worker loaded its rules
            with suppress(OSError):
                if _get(f"http://127.0.0.1:{car.admin}/ready")[0] == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, car.stderr()
            time.sleep(0.05)
        yield car
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)
        backend.close()


def _tree(pid: int) -> list[int]:
    """*pid* and its children (a supervisor and its workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(k) for k in kids)]


def _holders(car: Sidecar, path: Path) -> list[str]:
    """The sidecar's fds open on *path*'s file (PID:FD)."""
    st = path.stat()
    held = []
    for pid in _tree(car.proc.pid):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):  # (one closed meanwhile)
                f = os.stat(f"/proc/{pid}/fd/{fd}")
                if (f.st_dev, f.st_ino) == (st.st_dev, st.st_ino):
                    held.append(f"{pid}:{fd}")
    return held


def _markers(path: Path) -> list[str]:
    return re.findall(r'"GET /(m-\d+) HTTP/1.1"', path.read_text()) if path.exists() else []


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", [("--workers", "2"), ("--single-process",)], ids=["2", "single"])
def test_sigusr1_reopens_the_renamed_access_log(
    impl: str, mode: tuple[str, ...], tmp_path: Path
) -> None:
    log_file = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    single = mode == ("--single-process",)
    with sidecar(tmp_path, impl, *mode, "--access-log", str(log_file)) as car:
        before = [f"m-{i}" for i in range(20)]
        after = [f"m-{i}" for i in range(20, 40)]
        assert [car.request(m) for m in before] == [200] * 20
        car.wait_lines(20)  # (a line is taken as its request ends: maybe after its answer)
        log_file.rename(rotated)
        car.proc.send_signal(signal.SIGUSR1)
        said = f"SIGUSR1: --access-log {log_file} reopened"
        car.wait_said(said, 1 if single else 3)  # (the supervisor's and each worker's)
        assert [car.request(m) for m in after] == [200] * 20
        assert car.proc.poll() is None
        if not single:
            assert car.stderr().count("restarting") == 0, car.stderr()
        car.wait_lines(40)
        car.proc.send_signal(signal.SIGUSR1)  # (a reopen with no rename: nothing moves)
        car.wait_said(said, 2 if single else 6)
        # no process holds the renamed file (a worker's inherited fd, a lone
        # process's own did: logrotate's deletion of it freed no space), and
        # the new one as many fds as the old one had (each writer switches
        # once its batch is written: its reopen's fd till then)
        holders = 2 if single else 1 + 2 * 2
        deadline = time.monotonic() + 20
        while _holders(car, rotated) or len(_holders(car, log_file)) != holders:
            assert time.monotonic() < deadline, (_holders(car, rotated), _holders(car, log_file))
            time.sleep(0.02)
        car.proc.terminate()  # the drain writes what was buffered
        assert car.proc.wait(timeout=60) == 0, car.stderr()
    # each line in one file, once: before the signal the renamed, after it the new
    assert sorted(_markers(rotated)) == sorted(before)
    assert sorted(_markers(log_file)) == sorted(after)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_path_that_cannot_be_reopened_is_said_and_the_old_file_goes_on(
    impl: str, tmp_path: Path
) -> None:
    log_file = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    with sidecar(tmp_path, impl, "--workers", "2", "--access-log", str(log_file)) as car:
        assert car.request("m-0") == 200
        car.wait_lines(1)
        log_file.rename(rotated)
        log_file.mkdir()  # (open() for writing: EISDIR)
        car.proc.send_signal(signal.SIGUSR1)
        car.wait_said(f"--access-log {log_file}: cannot reopen it: Is a directory")
        assert car.request("m-1") == 200
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()
    assert sorted(_markers(rotated)) == ["m-0", "m-1"]
    # the supervisor's one line: not forwarded to workers that would fail alike
    assert car.stderr().count("cannot reopen it") == 1, car.stderr()


def test_sigusr1_without_an_access_log_is_said_and_harmless(tmp_path: Path) -> None:
    with sidecar(tmp_path, "compiled-uvloop", "--workers", "2") as car:
        car.proc.send_signal(signal.SIGUSR1)
        car.wait_said("SIGUSR1: no --access-log to reopen")
        assert car.request("m-0") == 200
        assert car.proc.poll() is None


def test_a_sigusr1_storm_while_workers_start_kills_nothing(tmp_path: Path) -> None:
    """SIGUSR1 every 5 ms from the supervisor's first line until both workers
    serve, and ten more: the workers start with it blocked, then record it
    (signals); each is reopened at least once, none dies, none restarts."""
    log_file = tmp_path / "access.log"
    sent = [0]

    def storm(car: Sidecar) -> None:
        car.wait_said("supervisor: 2 worker(s)")
        deadline = time.monotonic() + 30
        extra = 10  # (a few more once both workers said they listen)
        while time.monotonic() < deadline and car.proc.poll() is None and extra:
            car.proc.send_signal(signal.SIGUSR1)
            sent[0] += 1
            time.sleep(0.005)
            extra -= car.stderr().count(" worker: listening") >= 2

    args = ("--workers", "2", "--access-log", str(log_file))
    with sidecar(tmp_path, "compiled-uvloop", *args, on_start=storm) as car:
        assert sent[0] > 0
        assert car.request("m-0") == 200
        assert car.proc.poll() is None
        text = car.stderr()
        assert "died" not in text and "restarting" not in text, text
        assert re.search(r"\[w0\] SIGUSR1: --access-log .* reopened", text), text
        assert re.search(r"\[w1\] SIGUSR1: --access-log .* reopened", text), text
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()
    assert _markers(log_file) == ["m-0"]


def _reopen_failures(car: Sidecar) -> int:
    stats = _get(f"http://127.0.0.1:{car.admin}/stats?filter=reopen_failures")[1]
    found = re.search(r"^l4proxy_access_log_reopen_failures_total (\d+)", stats, re.M)
    assert found, stats
    return int(found[1])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", [("--workers", "2"), ("--single-process",)], ids=["2", "single"])
def test_a_failing_reopen_is_said_once_until_one_succeeds(
    impl: str, mode: tuple[str, ...], tmp_path: Path
) -> None:
    """Ten SIGUSR1 into a path that cannot be opened: said once, counted
    ten times (before: ten error lines); the path fixed, the next reopen
    says it recovered and the lines go to the new file; failing again is
    said again."""
    log_file = tmp_path / "access.log"
    # (at error; each failure is said at debug, the level these sidecars log at)
    cannot = "ERROR l4proxy.accesslog: SIGUSR1: --access-log"
    with sidecar(tmp_path, impl, *mode, "--access-log", str(log_file)) as car:
        assert _reopen_failures(car) == 0
        log_file.rename(tmp_path / "access.log.1")
        log_file.mkdir()  # (open() for writing: EISDIR)
        for n in range(1, 11):  # (one at a time: signals sent at once coalesce)
            car.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while _reopen_failures(car) < n:
                assert time.monotonic() < deadline, car.stderr()
                time.sleep(0.02)
        assert _reopen_failures(car) == 10
        assert car.stderr().count(cannot) == 1, car.stderr()
        assert car.stderr().count("cannot reopen it: Is a directory") == 10
        log_file.rmdir()
        car.proc.send_signal(signal.SIGUSR1)
        car.wait_said(f"--access-log {log_file}: reopened again, after 10 reopen(s) that failed")
        if mode != ("--single-process",):  # (the supervisor said it; each worker reopens after)
            for w in ("[w0]", "[w1]"):
                car.wait_said(f"{w} SIGUSR1: --access-log {log_file} reopened")
        assert car.request("m-0") == 200
        car.wait_lines(1)
        log_file.rename(tmp_path / "access.log.2")
        log_file.mkdir()
        car.proc.send_signal(signal.SIGUSR1)
        car.wait_said(cannot, 2)  # (failing anew: said anew)
        assert _reopen_failures(car) == 11
        assert car.proc.poll() is None
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()
    assert _markers(tmp_path / "access.log.2") == ["m-0"]
    assert car.stderr().count(cannot) == 2, car.stderr()
