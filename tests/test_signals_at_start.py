"""Signals in the sidecar's first steps, before its handlers exist.

``l4proxy run`` installs its handlers (signals.hold_signals) once its
entry point has imported what it needs: 12 to 40 ms here. A SIGHUP or
SIGUSR1 meanwhile (a kubelet's reload script, logrotate) took its default
action and killed the sidecar, a SIGTERM killed it undrained. The entry
point now blocks them at its first step (cli._hold_at_first_step), and
the handlers get them once they exist.

The storm: the process sends itself SIGHUP and SIGUSR1 (SIGTERM first, in
the stop's test) at each module it imports from the entry point's first
step until SIGHUP has a handler (tests/_signals_at_imports/sitecustomize.py:
an audit hook), the same two dozen places every run, where a storm from
outside also hits the interpreter's own start-up, which no code of ours
runs in (signals). Real ``l4proxy run``, both implementations, two workers
and ``--single-process``; the console script and ``python -m l4proxy``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from l4proxy import cli
from l4proxy.sidecar.signals import HELD, IGNORED
from tests.mesh import IMPLS
from tests.test_access_log_reopen import sidecar
from tests.test_run_cli import L4PROXY

HOOK_DIR = str(Path(__file__).parent / "_signals_at_imports")
SENT = re.compile(r"signals at imports: (\d+) sent before the handlers")


def _storm_env(signals: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        "L4PROXY_TEST_SIGNALS_AT_IMPORTS": signals,
        "PYTHONPATH": HOOK_DIR + (os.pathsep + path if path else ""),
    }


def _sent(text: str) -> int:
    found = SENT.findall(text)
    assert len(found) == 1, text  # (the supervisor's or lone process's alone)
    return int(found[0])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", [("--workers", "2"), ("--single-process",)], ids=["2", "single"])
def test_sighup_and_sigusr1_before_the_handlers_kill_nothing(
    impl: str, mode: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: killed by the first SIGHUP (exit status -1), every run."""
    for name, value in _storm_env("SIGHUP,SIGUSR1").items():
        monkeypatch.setenv(name, value)
    with sidecar(tmp_path, impl, *mode) as car:
        assert car.request("m-0") == 200
        text = car.stderr()
        assert _sent(text) >= 10, text  # (each import of the window had one)
        # the SIGUSR1 held, then taken as one once the handlers were there
        assert "SIGUSR1: no --access-log to reopen" in text, text
        assert "died" not in text and "restarting" not in text, text
        car.proc.terminate()
        assert car.proc.wait(timeout=60) == 0, car.stderr()


@pytest.mark.parametrize("entry", ["script", "module"])
@pytest.mark.parametrize("mode", [("--workers", "2"), ("--single-process",)], ids=["2", "single"])
def test_a_sigterm_before_the_handlers_stops_cleanly(
    entry: str, mode: tuple[str, ...], tmp_path: Path
) -> None:
    """A SIGTERM (then SIGHUP and SIGUSR1) before the handlers: held, and
    the process stops once they exist, exit 0 (the supervisor without
    starting its workers, a lone process after a drain of nothing).
    Before: killed by it (exit status -15)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    command = [L4PROXY] if entry == "script" else [sys.executable, "-m", "l4proxy"]
    proc = subprocess.run(
        [
            *command,
            *("run", "--no-transparent", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
            *("--rules", str(rules), *mode),
        ],
        capture_output=True,
        env={**os.environ, **_storm_env("SIGTERM,SIGHUP,SIGUSR1")},
        timeout=60,
    )
    text = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, text
    assert _sent(text) >= 10, text
    assert "stopped" in text and "Traceback" not in text, text
    assert "worker 0 started" not in text, text  # (stopped before any)


def test_the_entry_point_blocks_only_a_run_of_its_own() -> None:
    """What cli._hold_at_first_step blocks is what hold_signals then
    handles (or ignores), and only for ``l4proxy run`` through its entry
    points: a process that imports the module (this one) keeps its mask."""
    assert {getattr(signal, n) for n in cli.START_SIGNALS} == {*HELD, *IGNORED}
    assert cli._starts_run(["/venv/bin/l4proxy", "run", "--rules", "r"])
    assert cli._starts_run(["/src/l4proxy/__main__.py", "run", "--worker-fds", "3:x"])
    assert not cli._starts_run(["/venv/bin/l4proxy", "validate", "run"])
    assert not cli._starts_run(["/venv/bin/l4proxy", "--version"])
    assert not cli._starts_run(["/venv/bin/pytest", "run"])
    assert not cli._starts_run([])
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
