"""The test process's own file descriptors, test by test.

Under ``make test`` a pytest-xdist worker runs half the suite in one
process, and what a test leaves behind stays for every test after it: a
socket, a pipe, an event loop left open is an fd more; a thread left
blocked in ``accept()`` on a listener that was closed under it holds an
fd *number* more, which ``/proc/self/fd`` does not list (the kernel takes
the number of the connection to come before it waits, and a close() of
the listener from another thread does not wake it). Either way the
numbers the next tests get climb, and past 1023 ``select.select()``
refuses them: a CI run's worker gave a test's sockets fd 1502.

Theory of operation. :class:`FdAudit` lists ``/proc/self/fd`` (each fd
and what ``os.readlink()`` says it is: ``socket:[INODE]``, ``pipe:[INODE]``,
a path) before each test's setup and after its teardown, module and
class fixtures' teardowns included when the test is the last to use
them. An fd present after a test and not before (or present with another
target: closed and opened again) is charged to that test; an fd charged
to a test and gone later is crossed off, and one that outlived the test
file it was opened in is a leak that something (the garbage collector, a
later test) closed by chance. What a module- or session-scoped fixture
opens is charged to the test that first used it; a module fixture's
descriptors closed by the module's last test are not a leak.

The numbers held and not listed are counted by :func:`held_unlisted`,
which takes every free number below the size of the fd table (F_DUPFD:
the lowest free at or above a start) and counts what it could not take:
as many fcntl() calls as there are free numbers. It runs after each test
only when ``L4PROXY_FD_AUDIT`` asks for the account (which then names
the tests whose threads took numbers), and once at the end otherwise.

Nothing here calls ``gc.collect()``: a descriptor that only the garbage
collector closes is counted as the tests see it, open until it runs.

The guard: at the teardown of the last test a process runs, the most fds
it listed after any test, plus the numbers held unlisted at the end (a
thread blocked in accept() never lets go of its number), must be within
:data:`GUARD_MARGIN` of what it listed before its first test; else that
teardown fails, naming the tests that left the most open and the threads
still alive. ``L4PROXY_FD_AUDIT=DIR`` also writes
``DIR/fd-audit-WORKER.txt``: every test that changed the count (before,
after, the fds it opened and left, what they are, a socket's addresses)
or took numbers unlisted, and the leaks.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field

# How many fd numbers more than before its first test a test process may
# use after any test: the suite's own at a time (module fixtures'
# sidecars, loops, listeners) stay under 100 above the start; select()
# refuses fds past 1023.
GUARD_MARGIN = 256


def snapshot() -> dict[int, str]:
    """This process's open descriptors past 2: fd -> what it is (its
    readlink). pytest's output capture points 1 and 2 at files of its own
    (dup2()), which changes what they are from test to test."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        if int(name) < 3:
            continue
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory listdir() read through, closed since
    return fds


def fd_table_size() -> int:
    """The size of this process's fd table (``FDSize`` in /proc/self/status):
    the kernel grows it (to a power of two) to take a number past it, and
    never shrinks it, so every number it ever gave is below it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    return 0


def held_unlisted(listed: set[int]) -> int:
    """How many fd numbers the kernel holds for this process that
    ``/proc/self/fd`` does not list (*listed*): numbers taken for an fd not
    installed yet, above all by a thread blocked in accept(). Every free
    number below the fd table's size is taken (and given back) to find
    them; other threads opening or closing fds meanwhile may move the count
    by as many."""
    top = max(max(listed, default=2), fd_table_size() - 1)
    taken: list[int] = []
    try:
        base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        taken.append(base)
        while taken[-1] <= top:
            taken.append(fcntl.fcntl(base, fcntl.F_DUPFD_CLOEXEC, 3))
    except OSError:  # out of fds (RLIMIT_NOFILE lowered since the table grew)
        top = max(taken, default=2)  # (what is known: up to the last number taken)
        listed = {fd for fd in listed if fd <= top}
    finally:
        for fd in taken:
            os.close(fd)
    free = sum(1 for fd in taken if 3 <= fd <= top)
    return max(0, (top - 2) - len({fd for fd in listed if fd >= 3}) - free)


def threads() -> Counter[str]:
    """The live threads, by name without its number ("Thread-12 (loop)"
    counts as "Thread (loop)")."""
    return Counter(re.sub(r"-\d+", "", t.name) for t in threading.enumerate())


def describe(fd: int, target: str) -> str:
    """*target*, and for a socket its addresses (local -> peer)."""
    if not target.startswith("socket:"):
        return target
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            local = s.getsockname()
            try:
                peer = s.getpeername()
            except OSError:
                peer = "-"
    except OSError:
        return target
    return f"{target} {local} -> {peer}"


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@dataclass
class FdAudit:
    # count the numbers held unlisted after each test, and say what each
    # socket charged to a test is connected to (L4PROXY_FD_AUDIT)
    detail: bool = False
    start: dict[int, str] = field(default_factory=dict)
    high: int = 0  # the most descriptors listed after a test
    high_fd: int = 0  # the highest fd number listed after a test
    high_after: str = ""  # the test after which the count was highest
    tests: int = 0
    # fd -> (what it is, the test that opened it), for fds opened during a
    # test and open since
    owner: dict[int, tuple[str, str]] = field(default_factory=dict)
    # (nodeid, before, after, [(fd, what) opened and left open])
    grew: list[tuple[str, int, int, list[tuple[int, str]]]] = field(default_factory=list)
    # (opened by, closed during, what) for fds that outlived their test file
    late: list[tuple[str, str, str]] = field(default_factory=list)
    # (nodeid, held unlisted before, after, threads it left) per test that
    # changed the count (detail only)
    unlisted: list[tuple[str, int, int, Counter[str]]] = field(default_factory=list)
    _before: dict[int, str] = field(default_factory=dict)
    _held: int = 0
    _threads: Counter[str] = field(default_factory=Counter)

    def before(self) -> None:
        self._before = snapshot()
        if not self.tests:
            self.start = dict(self._before)
            self.high = len(self.start)
            self.high_fd = max(self.start, default=0)
            if self.detail:
                self._held = held_unlisted(set(self.start))
                self._threads = threads()

    def after(self, nodeid: str) -> None:
        before, now = self._before, snapshot()
        self.tests += 1
        opened = [(fd, t) for fd, t in sorted(now.items()) if before.get(fd) != t]
        closed = [fd for fd, t in before.items() if now.get(fd) != t]
        for fd in closed:
            was = self.owner.pop(fd, None)
            if was and module_of(was[1]) != module_of(nodeid):
                self.late.append((was[1], nodeid, was[0]))
        if self.detail:
            opened = [(fd, describe(fd, t)) for fd, t in opened]
        for fd, target in opened:
            self.owner[fd] = (target, nodeid)
        if len(now) != len(before) or opened:
            self.grew.append((nodeid, len(before), len(now), opened))
        if len(now) > self.high:
            self.high, self.high_after = len(now), nodeid
        self.high_fd = max(self.high_fd, max(now, default=0))
        if self.detail:
            held, live = held_unlisted(set(now)), threads()
            if held != self._held:
                self.unlisted.append((nodeid, self._held, held, live - self._threads))
            self._held, self._threads = held, live

    def leaks(self) -> Counter[str]:
        """Per test, its fds still open, and those that outlived its file."""
        held = Counter(nodeid for _, nodeid in self.owner.values())
        held.update(opener for opener, _, _ in self.late)
        return held

    def over(self) -> str:
        """Why the guard fails ("" when it holds)."""
        held = held_unlisted(set(snapshot()))
        if self.high + held - len(self.start) <= GUARD_MARGIN:
            return ""
        top = "\n".join(f"  {n:5}  {nodeid}" for nodeid, n in self.leaks().most_common(10))
        alive = ", ".join(f"{n} {name}" for name, n in threads().most_common(8))
        return (
            f"this test process used {self.high + held - len(self.start)} fd numbers more "
            f"than before its first test, {GUARD_MARGIN} at most (past 1023 select() "
            f"refuses them): it listed {self.high} fds after {self.high_after} "
            f"({len(self.start)} at the start), and {held} numbers are held that "
            "/proc/self/fd does not list (threads blocked in accept() on listeners closed "
            f"under them).\nThe tests that left the most fds open:\n{top}\n"
            f"Threads alive: {alive}\nL4PROXY_FD_AUDIT=DIR writes the whole account."
        )

    def report(self) -> str:
        held = held_unlisted(set(snapshot()))
        lines = [
            f"tests: {self.tests}",
            f"fds listed before the first test: {len(self.start)}, the most after a test: "
            f"{self.high} (after {self.high_after}), the highest fd: {self.high_fd}",
            f"fd numbers held unlisted at the end: {held}; threads alive: "
            + ", ".join(f"{n} {name}" for name, n in threads().most_common()),
            "",
            "tests that left fds open (still open at the end, or closed in a later test file):",
        ]
        lines += [f"  {n:5}  {nodeid}" for nodeid, n in self.leaks().most_common()]
        lines += ["", "still open at the end (fd, what, opened by):"]
        lines += [f"  {fd:5}  {t}  {nodeid}" for fd, (t, nodeid) in sorted(self.owner.items())]
        lines += ["", "closed in a later test file (opened by, closed during, what):"]
        lines += [f"  {a}  ->  {b}  {t}" for a, b, t in self.late]
        lines += ["", "tests that changed the numbers held unlisted (before -> after: threads):"]
        for nodeid, n0, n1, left in self.unlisted:
            what = ", ".join(f"{n} {name}" for name, n in left.most_common())
            lines.append(f"  {n0} -> {n1}  {nodeid}: {what}")
        lines += ["", "every test that changed the count (before -> after: fds it opened):"]
        for nodeid, n0, n1, opened in self.grew:
            what = ", ".join(f"{fd}={t}" for fd, t in opened[:12])
            more = f" (+{len(opened) - 12} more)" if len(opened) > 12 else ""
            lines.append(f"  {n0} -> {n1}  {nodeid}: {what}{more}")
        return "\n".join(lines) + "\n"
