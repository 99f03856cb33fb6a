"""``l4proxy run --admin HOST:0`` binds a port the kernel picks, as Envoy's
admin address and every server take port 0, and the start-up line names
the port bound (``admin 127.0.0.1:PORT``): the supervisor's line, or with
``--single-process`` the worker's, the same way. ``--no-admin`` turns the
endpoint off (``admin off``). Before, port 0 turned it off, and the
single process never said where its admin endpoint was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest

from tests.test_run_cli import _log_until

L4PROXY = os.path.join(os.path.dirname(sys.executable), "l4proxy")
RUN = (L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0")
# the line that says where things listen: the supervisor's, or the single
# process's worker's
MODES = {
    "supervisor": (("--workers", "1"), " supervisor: 1 worker(s); listening: "),
    "single-process": (("--single-process",), " worker: listening: "),
}
ADMIN = re.compile(r"; admin (\S+); ")


def _admin_said(flags: tuple[str, ...], mode: str) -> str:
    """What the start-up line of ``l4proxy run`` with *flags* says after
    ``admin`` (and, for an address, the sidecar answered /help there
    before it stopped)."""
    extra, marker = MODES[mode]
    proc = subprocess.Popen([*RUN, *extra, *flags], stderr=subprocess.PIPE, text=True)
    try:
        log = _log_until(proc, lambda log: any(marker in ln for ln in log))
        [line] = [ln for ln in log if marker in ln]
        said = ADMIN.search(line)
        assert said is not None, line
        if said[1] != "off":
            with urllib.request.urlopen(f"http://{said[1]}/help", timeout=10) as answer:
                assert answer.status == 200 and b"/quitquitquit" in answer.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    return said[1]


@pytest.mark.parametrize("mode", list(MODES))
def test_admin_port_0_binds_a_port_the_start_up_line_names(mode: str) -> None:
    said = _admin_said(("--admin", "127.0.0.1:0"), mode)
    host, _, port = said.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0, said


@pytest.mark.parametrize("mode", list(MODES))
def test_no_admin_turns_it_off_and_the_line_says_so(mode: str) -> None:
    assert _admin_said(("--admin", "127.0.0.1:0", "--no-admin"), mode) == "off"
