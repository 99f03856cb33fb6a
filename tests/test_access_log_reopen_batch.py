"""A SIGUSR1 reopen splits the batch being filled: the lines taken before
it go to the renamed file, those taken after it to the new one, in both
twins' writers (the compiled relay's ``l4_alog``, the pure relay's
``accesslog.LineWriter``).

The writer takes its buffer whole as a batch. A reopen while lines wait in
the buffer switches after the batch that holds them, but lines taken after
the reopen and before the writer took that buffer were in the same batch
and went to the renamed file too: a request answered after logrotate's
signal, logged in the period before it (seen once in
``test_access_log_reopen``'s ``--single-process`` run under load). Here the
writer is held, deterministically, in a write to a full pipe: a line taken
then (*before*), the reopen, a line taken after it (*after*).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from l4proxy.dataplane.accesslog import AccessLog
from tests.conftest import load_twin

PIPE_SIZE = 4096


def _read_lines(fd: int, n: int, timeout: float = 10.0) -> list[bytes]:
    out = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while out.count(b"\n") < n:
        assert time.monotonic() < deadline, out.count(b"\n")
        try:
            out += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
    return out.splitlines(keepends=True)


def _queued(fd: int) -> int:
    import array
    import termios

    n = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, n)
    return n[0]


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_line_taken_after_the_reopen_goes_to_the_new_file(which: str, tmp_path: Path) -> None:
    twin = load_twin("relay", which)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    new_file = tmp_path / "access.log"
    new_fd = os.open(new_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        relay = twin.HttpRelay(lambda head, origin: None, lambda *a: None, access_log=AccessLog(w))
        os.close(w)  # (the relay's writer has its own)
        w = -1
        first = [b"first %03d %s\n" % (i, b"x" * 90) for i in range(100)]  # ~10 KiB
        for line in first:
            relay.access_log_line(line)
        # the writer took them as one batch and is held in its write: the
        # pipe full (its writes are whole lines of at most PIPE_BUF: the
        # first leaves less room than a line), more of the batch left
        deadline = time.monotonic() + 10
        while _queued(r) <= PIPE_SIZE - len(first[0]):
            assert time.monotonic() < deadline, _queued(r)
            time.sleep(0.01)
        relay.access_log_line(b"before the reopen\n")
        assert relay.reopen_access_log(new_fd)
        relay.access_log_line(b"after the reopen\n")
        got = _read_lines(r, len(first) + 1)  # (the writer goes on as the pipe drains)
        relay.close_access_log()
        assert got == [*first, b"before the reopen\n"]
        assert new_file.read_bytes() == b"after the reopen\n"
        stats = relay.stats()
        assert stats["access_log_lines"] == len(first) + 2
        assert stats["access_log_dropped"] == 0
    finally:
        for fd in (r, w, new_fd):
            if fd >= 0:
                os.close(fd)
