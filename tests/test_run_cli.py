"""``l4proxy run``'s command line: values that used to start a sidecar that
then misbehaved are usage errors (exit 2, one line naming the flag)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from l4proxy.cli import build_parser
from tests.conftest import free_ports

L4PROXY = os.path.join(os.path.dirname(sys.executable), "l4proxy")


def test_a_rules_path_that_is_a_pipe_is_a_usage_error(tmp_path: Path) -> None:
    """--rules naming a FIFO (or <(...)): the worker's open waited for a writer
    for ever, a sidecar never ready; and a pipe is read once, the sidecar
    reads its rules again at every change."""
    pipe = tmp_path / "rules.yaml"
    os.mkfifo(pipe)
    done = subprocess.run(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", "--rules", str(pipe)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"--rules {pipe}: not a regular file or a directory" in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # crash-looped every worker (Pump: idle_timeout must be > 0)
        (["--idle-timeout", "0"], "must be more than 0 seconds"),
        # nan passed every "< 0" check: no timeout at all, or SIGABRT in libuv
        (["--header-timeout", "nan"], "not a finite number"),
        (["--connect-timeout", "inf"], "not a finite number"),
        (["--connect-timeout", "-1"], "must be more than 0 seconds"),
        # polled the rule files at 100 % CPU
        (["--reload-interval", "0"], "at least 0.01 seconds"),
        (["--reload-interval", "1e-6"], "at least 0.01 seconds"),
        # ready, and every connection refused (a negative limit is "true")
        (["--max-connections", "-1"], "must not be negative"),
        # taken as "the default", silently
        (["--max-pipes", "-5"], "must not be negative"),
        # the first ejection for ever (min(nan, 300) is nan)
        (["--ejection-time", "nan"], "not a finite number"),
        (["--drain-duration", "nan"], "not a finite number"),
        (["--drain-duration", "-5"], "must not be negative"),
        (["--watchdog-timeout", "nan"], "not a finite number"),
        (["--port", "70000"], "out of range 1..65535"),
        (["--inbound-port", "-1"], "must not be negative"),
        (["--workers", "0"], "from 1 to 256 workers"),
        (["--pool-max-idle", "-1"], "must not be negative"),
        (["--pool-idle-timeout", "0"], "must be more than 0 seconds"),
        (["--namespace", ""], "not a namespace name"),
    ],
)
def test_values_that_made_a_sidecar_misbehave_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser("run").parse_args(["run", "--rules", "/etc/l4proxy", *argv])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # (not argparse's usage block above it: 20 lines)
    (err,) = lines
    assert argv[0] in err and message in err, err
    assert err.startswith("l4proxy run: error: ") and err.endswith(" (see l4proxy run --help)")


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["canary", "reviews", "--bogus"], "l4proxy canary"),
        (["run", "--bogus", "x"], "l4proxy run"),
        (["validate", "rules.yaml", "--bogus"], "l4proxy validate"),
        (["--bogus"], "l4proxy"),
    ],
)
def test_an_argument_no_parser_takes_points_at_its_subcommands_help(
    argv: list[str], prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse reports these from the top-level parser: `see l4proxy --help`,
    # which lists the subcommands, not the flag the user reached for
    with pytest.raises(SystemExit) as exc:
        build_parser(argv[0] if argv[0] != "--bogus" else None).parse_args(argv)
    assert exc.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"{prog}: error: unrecognized arguments: ")
    assert "--bogus" in err and err.endswith(f" (see {prog} --help)"), err


def test_the_defaults_and_zero_where_it_means_off_still_parse() -> None:
    args = build_parser("run").parse_args(
        ["run", "--drain-duration", "0", "--drain-quiet", "0", "--watchdog-timeout", "0"]
    )
    assert (args.connect_timeout, args.header_timeout, args.idle_timeout) == (10, 10, 3600)
    assert (args.drain_duration, args.drain_quiet, args.watchdog_timeout) == (0, 0, 0)
    assert args.max_connections == 0 and args.reload_interval == 1.0
    assert args.max_pipes is None  # the default: max_pipes_for()'s
    assert build_parser("run").parse_args(["run", "--max-pipes", "0"]).max_pipes == 0


@pytest.mark.parametrize("value", [":0", ":15000", "[]:15000"])
def test_an_admin_address_without_its_host_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--admin :PORT`` bound every interface (0.0.0.0, as ``--listen``'s
    ``:PORT``): an endpoint that drains the sidecar on a POST, open to
    whoever reaches the pod. Envoy's admin address names its host, Istio's
    is 127.0.0.1:15000: exit 2, naming both hosts a user may have meant."""
    with pytest.raises(SystemExit) as exc:
        build_parser("run").parse_args(["run", "--admin", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--admin" in err and "names no host" in err, err
    port = value.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port} for loopback" in err and f"0.0.0.0:{port} for every" in err, err


def test_the_listeners_port_alone_is_every_interface_and_the_admins_host_is_kept() -> None:
    """``:PORT`` is 0.0.0.0 where a listener is meant to be reached from
    outside (``--listen``, ``--stats-listen``, as Istio's 0.0.0.0:15090);
    ``--admin`` keeps the host it is given, loopback by default."""
    args = build_parser("run").parse_args(
        ["run", "--listen", ":8080", "--stats-listen", ":15090", "--admin", "0.0.0.0:15000"]
    )
    assert args.listen == [("0.0.0.0", 8080)] and args.stats_listen == ("0.0.0.0", 15090)
    assert args.admin == ("0.0.0.0", 15000)
    assert build_parser("run").parse_args(["run"]).admin == ("127.0.0.1", 15000)


@pytest.mark.parametrize("command", ["run", "demo"])
def test_the_readme_names_every_option_the_help_shows(command: str) -> None:
    """Each of run's and demo's options is named in the README (run's --domain
    was nowhere; its list of options, and demo's, now name them all)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (sub,) = (
        a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)
    )
    shown = [
        o
        for a in sub.choices[command]._actions
        if a.help != argparse.SUPPRESS
        for o in a.option_strings
        if o.startswith("--") and o != "--help"
    ]
    missing = [o for o in shown if not re.search(re.escape(o) + r"(?![\w-])", readme)]
    assert shown and not missing, missing


def test_the_help_says_the_environment_a_worker_starts_with() -> None:
    """``l4proxy run --help``'s environment paragraph names each variable
    worker_env sets, with its value, and how to have pymalloc back (an
    override a worker keeps)."""
    from l4proxy.sidecar.lean import worker_env

    (sub,) = (a for a in build_parser("run")._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["run"].format_help().split())
    defaults = worker_env({})
    assert defaults and all(f"{k}={v}" in text for k, v in defaults.items()), text
    assert "PYTHONMALLOC=pymalloc" in text
    assert worker_env({"PYTHONMALLOC": "pymalloc"})["PYTHONMALLOC"] == "pymalloc"


def test_the_pod_labels_file_is_read_as_the_downward_api_writes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels"
    labels.write_text('app="bootcamp"\nversion="v2"\nexample.com/team="a.b-c_d"\n')
    args = build_parser("run").parse_args(
        ["run", "--pod-labels-file", str(labels), "--pod-labels", "version=v3"]
    )
    assert args.pod_labels_file == {
        "app": "bootcamp",
        "version": "v2",
        "example.com/team": "a.b-c_d",
    }
    assert args.pod_labels == {"version": "v3"}  # (wins: the worker merges them so)
    for text, where in (("app=bootcamp\n", ":1:"), ('app="a"\nx\n', ":2:")):
        labels.write_text(text)
        with pytest.raises(SystemExit) as exc:
            build_parser("run").parse_args(["run", "--pod-labels-file", str(labels)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{labels}{where}" in err and "Downward API" in err, err
    with pytest.raises(SystemExit):
        build_parser("run").parse_args(["run", "--pod-labels-file", str(tmp_path / "none")])
    assert "cannot read" in capsys.readouterr().err


def test_a_rules_path_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    """A typo in --rules started a ready sidecar that routed by no rules (an
    ERROR line in its log); an empty directory is still fine (rules come later)."""
    missing = tmp_path / "rulez"
    done = subprocess.run(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", "--rules", str(missing)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"--rules {missing}: no such file or directory" in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # a traceback (http.client.InvalidURL), after the directory was changed
        (["create", "-f", "r.yaml", "--rules", "/x", "--admin", "127.0.0.1:abc"], "HOST:PORT"),
        # waited for ever
        (["create", "-f", "r.yaml", "--rules", "/x", "--timeout", "nan"], "finite number"),
        # exit 1 "invalid", over the -1 MiB limit
        (["validate", "--max-bytes", "0", "/x"], "more than 0"),
    ],
)
def test_the_rule_commands_refuse_such_values_too(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser(argv[0]).parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


_free_ports = free_ports  # (the name test_access_log_run.py imports)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_not_ready_until_the_rules_given_were_loaded(tmp_path: Path) -> None:
    """A first rule set refused (invalid here; unreadable by uid 1337 alike)
    left /ready at 200 LIVE: the pod went ready, and every connection passed
    through unrouted. /ready says 503 until a set loads."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("kind: [\n")
    admin_port, listen_port = free_ports(2)
    admin = f"127.0.0.1:{admin_port}"
    proc = subprocess.Popen(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", f"127.0.0.1:{listen_port}"),
            *("--admin", admin, "--rules", str(rules), "--reload-interval", "0.1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        stats = ""
        while "l4proxy_rules_valid 0" not in stats:  # the worker has refused the set
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                stats = _get(f"http://{admin}/stats")[1]
        assert _get(f"http://{admin}/ready")[0] == 503
        (rules / "bad.yaml").write_text("# no rules yet\n")  # valid: no documents
        while _get(f"http://{admin}/ready") != (200, "LIVE\n"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_briefly(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``l4proxy run ARGV``, which should exit; one still running at *timeout*
    is stopped (SIGTERM) and fails the test, with its log."""
    proc = subprocess.Popen([L4PROXY, "run", *argv], stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"still running after {timeout}s:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_a_usage_error_with_several_workers_too(workers: str) -> None:
    """Several workers bind the port with SO_REUSEPORT, which shared it with any
    other socket of the same user that set it: a second sidecar on the same
    --listen port started and took part of the traffic, silently."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        done = _run_briefly(
            [
                *("--no-transparent", "--listen", f"127.0.0.1:{port}"),
                *("--admin", "127.0.0.1:0", "--workers", workers),
            ]
        )
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    assert f"cannot bind a listener on 127.0.0.1:{port}: " in done.stderr
    assert "Address already in use" in done.stderr


def _log_until(proc: subprocess.Popen[str], done: Callable[[list[str]], bool]) -> list[str]:
    """*proc*'s stderr lines until done(lines) (an exit first fails the test)."""
    assert proc.stderr is not None
    log: list[str] = []
    while not done(log):
        line = proc.stderr.readline()
        assert line, f"exited ({proc.wait()}):\n{''.join(log)}"
        log.append(line)
    return log


def test_port_0_is_one_port_for_all_the_workers() -> None:
    """--listen HOST:0 --workers 2: each worker's listener got a port of its own
    from the kernel, and only the first worker's was logged."""
    proc = subprocess.Popen(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", "--workers", "2"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = _log_until(proc, lambda log: sum("worker: listening: " in ln for ln in log) == 2)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    [supervisor] = [line for line in log if "supervisor: 2 worker(s); listening: " in line]
    listening = supervisor.split("listening: ")[1].split(";")[0]
    workers = [line.split("listening: ")[1].split(";")[0] for line in log if "worker:" in line]
    assert workers == [listening, listening], log


RUN_AS_1337 = ("setpriv", "--reuid=1337", "--regid=1337", "--clear-groups")


@pytest.mark.netns  # (root, to run it as 1337)
@pytest.mark.parametrize("flags", [["--uid", "1337", "--gid", "1337"], ["--gid", "1337"]])
def test_uid_and_gid_of_the_user_it_already_runs_as_are_nothing_to_do(flags: list[str]) -> None:
    """An image with USER 1337:1337 (or a pod's runAsUser and runAsGroup 1337)
    and the injected --uid 1337 --gid 1337: setgroups was called first, which
    only root may, and the sidecar exited 2 ("cannot drop privileges"), a
    crash loop."""
    proc = subprocess.Popen(
        [
            *(*RUN_AS_1337, L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", *flags),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = _log_until(proc, lambda log: any("worker: listening: " in ln for ln in log))
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert next(ln for ln in log if "supervisor:" in ln).rstrip().endswith("; uid 1337")


@pytest.mark.parametrize("flag", ["--uid", "--gid"])
def test_a_user_or_group_name_that_does_not_exist_is_said_so(flag: str) -> None:
    done = subprocess.run(
        [
            *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", flag, "no-such-l4proxy-name"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    # (it said: "getpwnam(): name not found: 'no-such-l4proxy-name'", quoted)
    assert (
        f"{flag} no-such-l4proxy-name: no such {'user' if flag == '--uid' else 'group'} here "
        f"(give its number, e.g. {flag} 1337)"
    ) in done.stderr, done.stderr
    assert "getpw" not in done.stderr and "getgr" not in done.stderr


@pytest.mark.netns
def test_uid_and_gid_a_user_cannot_take_are_still_an_error() -> None:
    done = subprocess.run(
        [
            *(*RUN_AS_1337, L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", "127.0.0.1:0", "--uid", "1337", "--gid", "1338"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "cannot drop privileges to uid=1337 gid=1338: [Errno 1]" in done.stderr


def test_a_pod_labels_file_that_does_not_end_is_refused_at_its_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--pod-labels-file /dev/zero: exit 2 once 4 MiB are read, in a child
    whose address space is capped at 512 MiB (before: read until memory
    ran out, a MemoryError's traceback, exit 1); a file one byte over the
    bound the same, one at it read."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))\n"
        "from l4proxy.cli import build_parser\n"
        "build_parser('run').parse_args(['run', '--pod-labels-file', '/dev/zero'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "cannot read /dev/zero: more than 4 MiB" in done.stderr
    assert "MemoryError" not in done.stderr
    labels = tmp_path / "labels"
    line = 'app="' + "a" * 62 + '"\n'  # 70 bytes
    labels.write_text(line * ((4 << 20) // len(line)) + "x" * ((4 << 20) % len(line)))
    with pytest.raises(SystemExit):  # (at the bound: read, its last line refused)
        build_parser("run").parse_args(["run", "--pod-labels-file", str(labels)])
    assert "Downward API labels file" in capsys.readouterr().err
    with labels.open("a") as f:
        f.write("x")
    with pytest.raises(SystemExit):
        build_parser("run").parse_args(["run", "--pod-labels-file", str(labels)])
    assert "more than 4 MiB" in capsys.readouterr().err
