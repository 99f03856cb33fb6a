"""Install what the bench needs when it is missing: Debian peers and pip packages.

``make bench`` must work on a fresh Debian 12 machine: the Makefile's venv
target installs the project, and this module adds the bench-only pieces,
each only when absent (dpkg-query and importlib.metadata are offline and
quick, so a warm machine pays nothing).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

DEBIAN_PACKAGES = ("haproxy", "nginx", "libnginx-mod-stream", "wrk", "curl", "iproute2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(REPO, "requirements-bench.txt")


class ProvisionError(RuntimeError):
    pass


def _deb_installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return "ok installed" in done.stdout


def missing_debian(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str]:
    return [p for p in packages if not _deb_installed(p)]


def requirement_names(path: str = REQUIREMENTS) -> list[str]:
    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                for sep in ("==", ">=", "<=", "~=", "[", ";", " "):
                    line = line.split(sep, 1)[0]
                names.append(line)
    return names


def missing_pip(path: str = REQUIREMENTS) -> list[str]:
    out = []
    for name in requirement_names(path):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def ensure(extra_debian: tuple[str, ...] = ()) -> None:
    """apt-get / pip install whatever is missing (the peers, and *extra_debian*:
    valgrind for ``python -m bench.instructions``); raise ProvisionError if
    it cannot."""
    debs = missing_debian(DEBIAN_PACKAGES + extra_debian)
    if debs:
        if os.geteuid() != 0:
            raise ProvisionError(f"need root to apt-get install {' '.join(debs)}")
        print(f"bench: installing Debian packages: {' '.join(debs)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *debs],
        ):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ProvisionError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    pips = missing_pip()
    if pips:
        print(f"bench: installing pip packages: {' '.join(pips)}", file=sys.stderr)
        argv = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        done = subprocess.run(
            [*argv, "-r", REQUIREMENTS], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise ProvisionError(f"pip install -r {REQUIREMENTS} failed:\n{done.stderr[-2000:]}")
