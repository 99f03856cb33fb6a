"""``--access-log`` on a full disk: requests unaffected, lost lines counted,
no line torn, and the writing goes on once space is freed.

Each twin's writer alone first, under a file size limit (RLIMIT_FSIZE: a
short write, then EFBIG, as a full disk's short write then ENOSPC, no root
needed); then a real ``l4proxy run`` (two workers, both implementations)
logging to a 64 KiB
tmpfs of its own (``unshare --mount``: root) that a filler half fills; the
requests' lines fill the rest. A short write (the last page's room) left a
line's start at the file's end, and the next line written once the filler
was gone was glued to it: one line that no reader can parse, and a request
whose line was counted written though it was torn. The writers now cut such
a start off again (``l4_alog_cut``, ``LineWriter._cut``): the file holds
whole lines only, and its lines plus the dropped count make every request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _skip_or_fail, load_twin
from tests.mesh import IMPLS
from tests.test_access_log_reopen import Sidecar, sidecar
from tests.test_run_cli import _get

# One twin's relay writes 200 lines of 98 bytes to a file that may grow to
# 10,000 (102 whole lines and 4 bytes of the 103rd), then closes its log.
WRITER = """
import json, os, resource, sys
from l4proxy.dataplane import _impl
from l4proxy.dataplane.accesslog import AccessLog
which, path = sys.argv[1:]
twin = _impl.load_pure("relay") if which == "pure" else _impl.load_compiled("relay")
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
relay = twin.HttpRelay(lambda head, origin: None, lambda *a: None, access_log=AccessLog(fd))
os.close(fd)  # (the relay's writer has its own)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
for i in range(200):
    relay.access_log_line(b"line %04d %s\\n" % (i, b"x" * 87))
relay.close_access_log()
print(json.dumps({k: v for k, v in relay.stats().items() if k.startswith("access_log")}))
"""

LINE = re.compile(r'^\[[^\]]+\] "GET /(m-\d+) HTTP/1\.1" 200 ')


def _counter(car: Sidecar, name: str) -> int:
    stats = _get(f"http://127.0.0.1:{car.admin}/stats")[1]
    return sum(int(n) for n in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\d+)", stats, re.M))


def _settled(car: Sidecar, log: Path, requests: int) -> tuple[list[str], int]:
    """The log's lines and the dropped count once every request's line was
    written or dropped (the writers take theirs every 0.1 s)."""
    car.wait_lines(requests)
    deadline = time.monotonic() + 20
    while True:
        lines = log.read_text(errors="replace").splitlines()
        dropped = _counter(car, "l4proxy_access_log_dropped_total")
        if len(lines) + dropped >= requests:
            return lines, dropped
        assert time.monotonic() < deadline, (len(lines), dropped, car.stderr())
        time.sleep(0.05)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_line_a_short_write_began_is_cut_off_when_the_next_write_fails(
    which: str, tmp_path: Path
) -> None:
    load_twin("relay", which)  # (not built: skipped, failed under CI)
    path = tmp_path / "access.log"
    done = subprocess.run(
        [sys.executable, "-c", WRITER, which, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stats = json.loads(done.stdout)
    data = path.read_bytes()
    assert data.endswith(b"\n")  # (the 103rd line's 4 bytes were left, before)
    lines = data.splitlines(keepends=True)
    assert lines == [b"line %04d %s\n" % (i, b"x" * 87) for i in range(102)]
    assert stats["access_log_lines"] == 200
    assert stats["access_log_dropped"] == 200 - 102
    assert stats["access_log_write_errors"] >= 1


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_full_disk_drops_whole_lines_and_the_log_goes_on_once_space_is_freed(
    impl: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        _skip_or_fail("a tmpfs of the sidecar's own (unshare --mount) needs root here")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f'mount -t tmpfs -o size=64k l4proxy-test "{disk}" && exec "$@"'
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh")
    args = ("--workers", "2", "--access-log", str(disk / "access.log"))
    with sidecar(tmp_path, impl, *args, prefix=prefix) as car:
        # the sidecar's view of the disk (its mount namespace's)
        seen = Path(f"/proc/{car.proc.pid}/root") / disk.relative_to("/")
        log = seen / "access.log"
        (seen / "filler").write_bytes(b"x" * 32768)  # (half of it)
        first = [f"m-{i}" for i in range(300)]  # (~80 KiB of lines)
        assert [car.request(m) for m in first] == [200] * 300
        lines, dropped = _settled(car, log, 300)
        assert dropped > 0 and _counter(car, "l4proxy_access_log_write_errors_total") > 0
        (seen / "filler").unlink()  # space again: the lines go on to the same file
        then = [f"m-{i}" for i in range(300, 320)]
        assert [car.request(m) for m in then] == [200] * 20
        lines, dropped = _settled(car, log, 320)
        assert car.proc.poll() is None
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()
    torn = [line for line in lines if not LINE.match(line) or line.count('"GET /') != 1]
    assert torn == []
    markers = [LINE.match(line).group(1) for line in lines]  # type: ignore[union-attr]
    assert len(set(markers)) == len(markers)
    assert set(then) <= set(markers)  # every line after the space came back
    assert len(lines) + dropped == 320
