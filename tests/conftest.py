"""Shared fixtures.

* ``netns``-marked tests need root and network namespaces. Without them they
  skip locally, and **fail** when ``CI=true`` (CI must run them).
* ``slow`` tests (soaks) run only with ``--soak`` (``make soak``).
* :func:`twin` parametrizes a test over the compiled and the pure-Python
  implementation of a module; a missing compiled build fails under CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from types import ModuleType

import pytest

from l4proxy import _impl
from l4proxy.podnet import PodNetwork
from tests.mesh import Mesh

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
SEED = os.path.join(os.path.dirname(REPO), "shared", "seed", "istio-request-routing")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests (make soak)")


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


_netns_ok: tuple[bool, str] | None = None


def _check_netns() -> tuple[bool, str]:
    global _netns_ok
    if _netns_ok is None:
        if os.geteuid() != 0:
            _netns_ok = (False, "needs root (network namespaces, iptables)")
        elif not shutil.which("ip"):
            _netns_ok = (False, "needs iproute2's ip")
        else:
            name = f"l4probe{os.getpid()}"
            r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if r.returncode != 0:
                _netns_ok = (False, f"cannot create a network namespace: {r.stderr.strip()}")
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                _netns_ok = (True, "")
    return _netns_ok


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("slow") and not item.config.getoption("--soak"):
        pytest.skip("soak test: run with make soak (pytest --soak)")
    if item.get_closest_marker("netns"):
        ok, why = _check_netns()
        if not ok:
            _skip_or_fail(why)


def load_twin(name: str, which: str) -> ModuleType:
    """Import the ``which`` ("compiled" or "pure") twin of module *name*."""
    if which == "pure":
        return _impl.load_pure(name)
    try:
        return _impl.load_compiled(name)
    except ImportError as exc:
        _skip_or_fail(f"compiled l4proxy._ext.{name} is not built ({exc})")
        raise  # unreachable


@pytest.fixture
def pod_network() -> Iterator[PodNetwork]:
    """A fresh bridge + node namespace; pods added by the test; always removed."""
    ok, why = _check_netns()
    if not ok:
        _skip_or_fail(why)
    with PodNetwork() as net:
        yield net


@pytest.fixture
def pod_network6() -> Iterator[PodNetwork]:
    ok, why = _check_netns()
    if not ok:
        _skip_or_fail(why)
    with PodNetwork(ipv6=True) as net:
        yield net


@pytest.fixture
def mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    """Bootcamp v1 ×2 + v2 ×1 in pods; the test starts the client (Mesh.start)."""
    m = Mesh(pod_network)
    try:
        m.start_backends()
        yield m
    finally:
        if m.sidecar and not m.sidecar.alive():
            print(m.sidecar_log())
        m.close()
