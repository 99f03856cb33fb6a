"""``l4proxy run --access-log``: several workers write to one standard
output (a pipe) or one file, and no line is ever torn or interleaved with
another (each is one write of at most PIPE_BUF; the file opened
O_APPEND); a drain writes what was buffered; a path that cannot be
opened is a usage error."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests._scripted import Scripted, _response, _status
from tests._worker import gateway_service
from tests.test_access_log_worker import TEXT_LINE
from tests.test_run_cli import L4PROXY, _free_ports, _get

CLIENTS = 6
REQUESTS = 40  # per client, on connections of 5 requests each


def _load(address: tuple[str, int], client: int, statuses: list[int]) -> None:
    """REQUESTS requests with User-Agents of 1 to 3.5 KB: lines long
    enough that two workers' writes would tear them if they were not
    atomic."""
    for start in range(0, REQUESTS, 5):
        with socket.create_connection(address, 10) as s:
            for i in range(start, start + 5):
                ua = f"client-{client}-{i}-".encode() + b"u" * (1000 + 97 * (i * 7 % 27))
                s.sendall(
                    b"GET /items/%d HTTP/1.1\r\nHost: gw\r\nUser-Agent: " % i + ua + b"\r\n\r\n"
                )
                statuses.append(_status(_response(s)))


@pytest.mark.parametrize(
    ("where", "fmt"), [("-", "json"), ("file", "text")], ids=["stdout-json", "file-text"]
)
def test_two_workers_lines_are_whole(where: str, fmt: str, tmp_path: Path) -> None:
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    admin_port, port = _free_ports(2)
    log_file = tmp_path / "access.log"
    target = "-" if where == "-" else str(log_file)
    proc = subprocess.Popen(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", f"127.0.0.1:{port}"),
            *("--admin", f"127.0.0.1:{admin_port}", "--rules", str(rules), "--workers", "2"),
            *("--access-log", target, "--access-log-format", fmt),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    out: list[bytes] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    statuses: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while True:  # ready: every worker loaded its rules
            with contextlib.suppress(OSError):
                if _get(f"http://127.0.0.1:{admin_port}/ready")[0] == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        threads = [
            threading.Thread(target=_load, args=(("127.0.0.1", port), c, statuses))
            for c in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = _get(f"http://127.0.0.1:{admin_port}/stats")[1]
    finally:
        proc.terminate()  # the drain writes what the workers buffered
        proc.wait(timeout=60)
        backend.close()
    reader.join(10)
    assert proc.returncode == 0
    assert statuses == [200] * (CLIENTS * REQUESTS)
    per_worker = [
        float(line.rsplit(" ", 1)[1])
        for line in stats.splitlines()
        if line.startswith("l4proxy_worker_connections_total{")
    ]
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), stats  # (both served)
    data = out[0] if where == "-" else log_file.read_bytes()
    lines = data.splitlines(keepends=True)
    assert len(lines) == CLIENTS * REQUESTS
    seen = set()
    for line in lines:
        assert len(line) <= 4096
        if fmt == "json":
            d = json.loads(line)
            ua, status = d["user_agent"], d["response_code"]
        else:
            m = TEXT_LINE.fullmatch(line.decode("ascii"))
            assert m, line
            ua, status = m["ua"], int(m["code"])
        assert status == 200
        seen.add(ua.split("-u", 1)[0])
    assert len(seen) == CLIENTS * REQUESTS  # every request's line, whole, once


def test_an_access_log_that_cannot_be_opened_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    done = subprocess.run(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", "--access-log", str(missing)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"--access-log {missing}: cannot open it: No such file or directory" in done.stderr


def test_a_named_pipe_without_a_reader_is_a_usage_error_not_a_hang(tmp_path: Path) -> None:
    """open() of a FIFO for writing waited for a reader: the sidecar never
    started. Opened without waiting, none is ENXIO: exit 2, at once; with
    a reader, the lines go to it."""
    from l4proxy.sidecar.access_log_file import open_access_log

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        open_access_log(str(fifo))
    assert info.value.errno == errno.ENXIO
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_access_log(str(fifo))
        assert os.get_blocking(fd)  # (the writers' threads wait on it)
        os.write(fd, b"a line\n")
        os.close(fd)
        assert os.read(reader, 100) == b"a line\n"
    finally:
        os.close(reader)


def test_the_access_log_is_appended_to_or_standard_output() -> None:
    """A file is opened for appending (a restarted sidecar adds its lines
    after the last run's, as Envoy's file access log), created if need be;
    ``-`` and /dev/stdout are standard output (a duplicate: the relays
    close theirs)."""
    from l4proxy.sidecar.access_log_file import open_access_log

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "access.log")
        for line in (b"first run\n", b"second run\n"):
            fd = open_access_log(path)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        with open(path, "rb") as f:
            assert f.read() == b"first run\nsecond run\n"
    for name in ("-", "/dev/stdout"):
        fd = open_access_log(name)
        try:
            assert fd != 1 and os.path.samestat(os.fstat(fd), os.fstat(1))
        finally:
            os.close(fd)
