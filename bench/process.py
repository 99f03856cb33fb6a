"""Processes under measurement: start, wait until they serve, account CPU and memory.

A proxy under test may be a process tree (nginx: master + worker; a command
wrapped in ``ip netns exec`` / ``setpriv``, which exec and keep the pid), so
CPU time and RSS are summed over the started process and its descendants.
``/proc/<pid>/stat`` reports the whole thread group, which is what we want
for l4proxy: the event loop and the pump thread are one bill.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

# Wraps an argv so that it runs somewhere else (a pod's namespace, another uid).
Launcher = Callable[[Sequence[str]], list[str]]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def on_host(argv: Sequence[str]) -> list[str]:
    return list(argv)


class ProcessError(RuntimeError):
    pass


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it).

    10,000 idle connections through a proxy need 20,000 descriptors in the
    proxy; without CAP_SYS_RESOURCE the hard limit is the ceiling.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(host: str, port: int, timeout: float = 15.0, proc: Process | None = None) -> None:
    """Block until a TCP connect to host:port succeeds (only for this machine's own addresses)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise ProcessError(f"{proc.name} exited {proc.returncode()}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    tail = f":\n{proc.log_tail()}" if proc is not None else ""
    raise ProcessError(f"nothing listens on {host}:{port} after {timeout}s{tail}")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields start after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """*pid* and all its descendants that are alive now."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (each the sum over its threads)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3); utime and stime are fields 14 and 15.
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def pss_bytes(pids: Sequence[int]) -> int:
    """Proportional set size: shared pages split between the processes sharing them.

    Fairer than summed RSS for a process tree (l4proxy's supervisor and
    worker share the interpreter's and the extensions' pages).
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class Process:
    """One started program, its log file, and its bill (CPU, RSS)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str,
        launcher: Launcher = on_host,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = launcher(argv)
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # a Ctrl-C on the bench reaches us, not the peers
            )
        return self

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ProcessError(f"{self.name} was not started")
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_bytes(self) -> int:
        return rss_bytes(self.pids())

    def pss_bytes(self) -> int:
        return pss_bytes(self.pids())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
