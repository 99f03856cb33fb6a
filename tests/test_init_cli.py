"""The l4proxy-init command line: flags, bad values, --help, --dry-run (no root needed)."""

from __future__ import annotations

import pytest
from l4proxy_init import CaptureOptions, UsageError
from l4proxy_init.apply import run
from l4proxy_init.cli import main

from .test_init_plan import SEED_RULES


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help, unknown flags
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_seed_args_dry_run_prints_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, "-p", "15001", "-u", "1337", "--dry-run", "--no-ipv6")
    assert code == 0, err
    assert out == (
        "# l4proxy-init --dry-run: IPv4 nat rules (nothing was changed)\n"
        "*nat\n" + SEED_RULES + "COMMIT\n"
    )
    assert err == "l4proxy-init: IPv4 nat: planned: nothing was changed\n"


def test_dry_run_with_ipv6_prints_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "-n", "--ipv6", "-x", "10.0.0.0/8,fd00::/8")
    assert code == 0
    v4, v6 = out.split("# l4proxy-init --dry-run: ")[1:]
    assert v4.startswith("IPv4") and "-d 10.0.0.0/8" in v4 and "fd00::/8" not in v4
    assert v6.startswith("IPv6") and "-d fd00::/8" in v6 and "10.0.0.0/8" not in v6


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "--help")
    assert code == 0
    for needle in ("l4proxy-init -p 15001 -u 1337", "--dry-run", "--cleanup", "exit codes", "-z"):
        assert needle in out


BAD = {
    ("-p", "0"): "-p: '0' is not a TCP port",
    ("-p", "65536"): "-p: '65536' is not a TCP port",
    ("-p", "http"): "-p: 'http' is not a TCP port",
    ("-z", "-1"): "-z",
    ("-u", "proxy"): "-u: 'proxy' is not a numeric UID",
    ("-u", "4294967295"): "-u: '4294967295' is not a numeric UID",
    ("-g", "1.5"): "-g: '1.5' is not a numeric GID",
    ("-u", ""): "no UID or GID left to exempt; the proxy's own connections would loop",
    ("-u", " , "): "no UID or GID left to exempt",
    ("-p", "\u00b95001"): "is not a TCP port",  # superscript one: isdigit(), not int()
    ("-u", "\u00b2"): "is not a numeric UID",
    ("-b", "8080,x"): "-b: 'x' is not a TCP port",
    ("-d", "99999"): "-d: '99999'",
    ("-o", "0"): "-o: '0'",
    ("-x", "10.0.0.0/33"): "-x: '10.0.0.0/33' is not an IPv4 or IPv6 CIDR",
    ("-i", "300.1.1.1"): "-i: '300.1.1.1' is not an IPv4 or IPv6 CIDR",
    ("-x", "*"): "-x: '*'",
    ("-x", "fe80::1%eth0"): "-x: 'fe80::1%eth0' has an IPv6 zone index",
    ("-i", "10.0.0.0/8,fe80::%eth0/64"): "-i: 'fe80::%eth0/64' has an IPv6 zone index",
    ("-m", "TPROXY"): "only REDIRECT is implemented",
    ("--backend", "iptables"): "invalid choice",
    ("--cleanup", "--dry-run"): "not allowed with",
    ("--ipv6", "--no-ipv6"): "not allowed with",
}


@pytest.mark.parametrize("args", list(BAD), ids=[" ".join(a) for a in BAD])
def test_bad_values_fail_in_one_line_before_anything(
    capsys: pytest.CaptureFixture[str], args: tuple[str, str]
) -> None:
    # --netns names a namespace that does not exist: a bad value must be
    # reported before the namespace is even looked up.
    code, out, err = call(capsys, "--netns", "l4proxy-no-such-ns", *args)
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert BAD[args] in err


def test_missing_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = call(capsys, "--netns", "l4proxy-no-such-ns", "-p", "15001")
    assert code == 4
    assert "network namespace 'l4proxy-no-such-ns' not found" in err
    assert "ip netns list" in err
    code, _, err = call(capsys, "--netns", "/proc/self/ns/no-such", "-n")
    assert code == 4 and "not found" in err


@pytest.mark.parametrize("value", ["", " ", "\t"])
def test_empty_netns_is_refused_not_the_current_namespace(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    # `--netns "$POD_NS"` with the variable unset: acting in the caller's own
    # namespace (the node's, when run from the node) would be the worst reading.
    code, out, err = call(capsys, "--netns", value, "-n", "--no-ipv6")
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "--netns: empty" in err
    # and the library entry point says the same (it used to treat "" as "no --netns")
    with pytest.raises(UsageError, match="--netns: empty"):
        run("dry-run", CaptureOptions(), value, "off", "auto")


LOAD_IPTC_COUNTING_PROCESSES = r"""
import os, subprocess, sys
for name in ("XTABLES_LIBDIR", "IPTABLES_LIBDIR"):
    os.environ.pop(name, None)
started = []
real = subprocess.Popen.__init__
def counting(self, args, *a, **kw):
    started.append(args if isinstance(args, str) else " ".join(map(str, args)))
    real(self, args, *a, **kw)
subprocess.Popen.__init__ = counting
from l4proxy_init.apply import load_iptc
load_iptc()
print("\n".join(started))
"""


def test_loading_python_iptables_runs_no_compiler_and_no_library_scan() -> None:
    """python-iptables alone runs ``ldconfig -N -v`` and gcc/ld probes (about
    20 processes, ~0.1 s) to find its own libraries, in each of init's family
    processes: load_iptc tells it where they are."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", LOAD_IPTC_COUNTING_PROCESSES],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    started = r.stdout.splitlines()
    assert not [a for a in started if "gcc" in a or " -N" in a or a.endswith("/ld")], started
    assert len(started) <= 6, started  # the ldconfig -p lookups of libxtables and libiptc
