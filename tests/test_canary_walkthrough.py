"""The README's local canary walkthrough, run as it is written.

The block after the marker ``<!-- canary-local-walkthrough ...`` in the
README's canary section is run by bash from the repository root, in a
network namespace of its own (``unshare --net``, its loopback up): the
walkthrough's fixed addresses and ports (127.0.0.2-3:8080, 18080, 15000)
are then nobody else's. It must reach the promotion: ``set -e`` stops it at
a canary that does not exit 0, and whatever it started in the background
is killed as it ends, whichever way.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from l4proxy.rules import load_rules
from tests.test_canary_core import unstamped

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "<!-- canary-local-walkthrough"


def walkthrough() -> str:
    """The README's walkthrough block, as a reader copies it."""
    readme = (ROOT / "README.md").read_text()
    after = readme.split(MARKER, 1)[1]
    m = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert m is not None, "no ```sh block after the walkthrough's marker"
    return m.group(1)


def test_the_walkthrough_block_names_what_it_runs() -> None:
    """What the walkthrough copies is in the tree, and it ends promoted."""
    block = walkthrough()
    assert "cp deploy/examples/canary-local/bootcamp.yaml" in block
    example = ROOT / "deploy" / "examples" / "canary-local" / "bootcamp.yaml"
    result = load_rules([str(example)])  # loads as the gateway loads it, without a word
    assert [str(n) for n in result.notes if n.severity != "note"] == []
    assert "l4proxy canary bootcamp --stable v1 --canary v2" in block


@pytest.mark.netns  # root and namespaces (conftest's rule)
def test_the_readme_walkthrough_promotes_v2() -> None:
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        # the tree's l4proxy, the venv's python3 and l4proxy first
        "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    script = (
        "set -e\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"  # a failure leaves nothing
        "ip link set lo up\n"
        f"cd {ROOT}\n" + walkthrough()
    )
    proc = subprocess.Popen(
        ["unshare", "--net", "bash", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (out, err)
    lines = unstamped(out).splitlines()
    assert lines[0].startswith("bootcamp: v1 -> v2, steps 10,50,100 every 3 s;"), out
    checks = [line for line in lines if line.startswith("  v2 ")]
    assert [c.split()[1] for c in checks if " pass -> " in c][-3:] == ["10", "50", "100"], out
    assert "PROMOTED: v2 takes 100 % of bootcamp" in checks[-1], out
    assert lines[-1].startswith("bootcamp: v1 -> v2 promoted at 100 % "), out
