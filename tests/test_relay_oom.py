"""The compiled relay out of memory: every allocation it makes, failed in turn.

tests/tools/failmalloc.c, preloaded, fails the nth allocation the relay's
extension makes itself (Python's own never fail); tests/tools/oom_relay.py
sends one request through a fresh relay per nth. Whatever fails, the process
lives, and a request is forwarded whole or not at all: a head built with a
part left out (the relay ignored a failed append) let the upstream read a
request's body as a request of its own, one routing refuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_twin

TOOLS = Path(__file__).parent / "tools"
ROUNDS = 24  # more than the allocations one request makes (the last rounds fail none)


@pytest.fixture(scope="module")
def failmalloc(tmp_path_factory: pytest.TempPathFactory) -> str:
    load_twin("relay", "compiled")  # skipped (or failed, in CI) when not built
    out = tmp_path_factory.mktemp("failmalloc") / "failmalloc.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-o", str(out), str(TOOLS / "failmalloc.c")],
        check=True,
    )
    return str(out)


def _run(failmalloc: str, mode: str) -> list[dict]:
    env = dict(os.environ, LD_PRELOAD=failmalloc)
    done = subprocess.run(
        [sys.executable, str(TOOLS / "oom_relay.py"), str(ROUNDS), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("mode", ["fast", "decide"])
def test_no_allocation_failure_crashes_or_sends_part_of_a_request(
    failmalloc: str, mode: str
) -> None:
    """``fast``: verdicts cached and applied in the C loop; ``decide``: Python
    answers every head (the verdict's own allocations are in the sweep too)."""
    rounds = _run(failmalloc, mode)
    assert [r["nth"] for r in rounds] == list(range(1, ROUNDS + 1))  # no crash
    failed = [r for r in rounds if r["failed"]]
    assert len(failed) >= 6, rounds  # the sweep reached the request's allocations
    assert not rounds[-1]["failed"], rounds[-1]  # ... and went past the last one
    for r in rounds:
        assert "GET /admin" not in r["served"], r  # the body was never a request
        if r["served"]:
            assert r["served"] == ["POST /public"], r
        if not r["failed"]:
            assert r["client"].endswith("served /public"), r


def test_a_hand_off_whose_bytes_cannot_be_stored_raises_and_closes(failmalloc: str) -> None:
    """add() copies the bytes read before the hand-off: a failed copy was
    written through NULL."""
    rounds = _run(failmalloc, "add")
    assert [r["nth"] for r in rounds] == list(range(1, ROUNDS + 1))  # no crash
    for r in rounds:
        if r["add"] == "MemoryError":  # the caller knows, and the client is closed
            assert r["failed"] == 1 and r["client"] in ("", "<ConnectionResetError>"), r
        elif r["failed"]:  # failed later, in the loop: an answer, or the connection closed
            assert r["client"].startswith(("HTTP/1.1 404 ", "<Connection")) or r["client"] == "", r
        else:
            assert r["client"].startswith("HTTP/1.1 404 "), r
    assert sum(r["add"] == "MemoryError" for r in rounds) == 2, rounds  # record, then bytes
