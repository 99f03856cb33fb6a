"""The admin endpoint as an Envoy operator uses it: ``/stats?filter=``,
``/help``, ``/server_info``, ``/healthcheck/fail`` and ``/ok``, ``/logging``.

A review found ``/stats?filter=rules_gen`` silently ignored (every family
came back) and the rest missing. Each is asked here of a real ``l4proxy
run`` (a supervisor and its workers, or ``--single-process``) on loopback,
its ports 0 and read back from its log, in front of an HTTP server on
127.0.0.1; the pure parts (states, log specs, the family filter) are tested
on their own first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy import __version__
from l4proxy.cli import build_parser
from l4proxy.sidecar.admin import (
    DRAINING,
    INITIALIZING,
    LIVE,
    PRE_INITIALIZING,
    STALLED,
    least_state,
    served_state,
)
from l4proxy.sidecar.loglevels import LOGGERS, logging_changes, merge_log_spec
from l4proxy.stats import Exposition, Sample
from tests._worker import gateway_service
from tests.conftest import free_ports, running, serving

L4PROXY = os.path.join(os.path.dirname(sys.executable), "l4proxy")
REPO = Path(__file__).resolve().parent.parent

# -- the pure parts --------------------------------------------------------------


@pytest.mark.parametrize(
    "states,expected",
    [
        ([LIVE, LIVE], LIVE),
        ([LIVE, INITIALIZING], INITIALIZING),
        ([INITIALIZING, None], PRE_INITIALIZING),  # a worker that did not answer
        ([LIVE, DRAINING, None], DRAINING),
        ([LIVE, STALLED, None], STALLED),  # a relay thread stuck (the watchdog's to kill)
        ([STALLED, DRAINING], DRAINING),
        ([LIVE, "garbage"], PRE_INITIALIZING),  # an answer not of the shape: none
        ([], PRE_INITIALIZING),
    ],
)
def test_the_workers_states_as_one(states: list[str | None], expected: str) -> None:
    assert least_state(states) == expected


def test_a_failed_health_check_makes_only_a_live_server_draining() -> None:
    """Envoy's serverState(): the initialisation's state first."""
    assert served_state(LIVE, True) == DRAINING
    assert served_state(LIVE, False) == LIVE
    assert served_state(INITIALIZING, True) == INITIALIZING
    assert served_state(PRE_INITIALIZING, True) == PRE_INITIALIZING
    assert served_state(DRAINING, False) == DRAINING


def test_the_logging_query_in_envoy_s_forms() -> None:
    params = {
        "l4proxy.rules": ["ERROR"],
        "paths": ["l4proxy.worker:debug,l4proxy.dns:warn"],
        "level": ["info"],
    }
    assert logging_changes(params) == [
        ("*", "info"),
        ("l4proxy.worker", "debug"),
        ("l4proxy.dns", "warn"),
        ("l4proxy.rules", "error"),
    ]
    for bad, why in (
        ({"level": ["trace"]}, "level 'trace'"),  # Envoy's, but Python has none
        ({"level": [""]}, "level ''"),
        ({"paths": ["l4proxy.nope:debug"]}, "no logger 'l4proxy.nope'"),
        ({"paths": ["l4proxy.worker"]}, "expected NAME:LEVEL"),
        ({"filter": ["x"]}, "no logger 'filter'"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)):
            logging_changes(bad)


def test_a_worker_started_later_gets_the_changes_that_still_count() -> None:
    spec = merge_log_spec("", "l4proxy.worker=debug,l4proxy.dns=error")
    assert spec == "l4proxy.worker=debug,l4proxy.dns=error"
    assert merge_log_spec(spec, "l4proxy.worker=info") == "l4proxy.dns=error,l4proxy.worker=info"
    assert merge_log_spec(spec, "*=warning") == "*=warning"
    assert merge_log_spec("*=warning", "l4proxy.dns=debug") == "*=warning,l4proxy.dns=debug"


def test_the_loggers_are_those_the_modules_name() -> None:
    """A logger added to a module and not to LOGGERS could not be set by
    name (400), and one in LOGGERS that no module uses sets nothing."""
    named = set()
    for path in (REPO / "l4proxy").rglob("*.py"):
        named |= set(re.findall(r'getLogger\("(l4proxy[\w.]*)"\)', path.read_text()))
    assert named == set(LOGGERS)


def test_the_family_filter_keeps_a_histogram_whole() -> None:
    values = {
        "istio_request_duration_milliseconds_bucket": {(("le", "5"),): 1.0, (("le", "+Inf"),): 2},
        "istio_request_duration_milliseconds_sum": {(): 7.0},
        "istio_request_duration_milliseconds_count": {(): 2.0},
        "istio_requests_total": {(("response_code", "200"),): 2.0},
    }
    help_ = {
        "istio_request_duration_milliseconds": ("histogram", "Durations."),
        "istio_requests_total": ("counter", "Requests."),
    }
    page = Exposition(Sample(values), help_, {"l4proxy_rules_generation": 3})
    got = page.text(lambda name: "duration" in name).splitlines()
    assert got[:2] == [
        "# HELP istio_request_duration_milliseconds Durations.",
        "# TYPE istio_request_duration_milliseconds histogram",
    ]
    samples = [line.split("{")[0].split(" ")[0] for line in got[2:]]
    assert samples == ["istio_request_duration_milliseconds_bucket"] * 2 + [
        "istio_request_duration_milliseconds_sum",
        "istio_request_duration_milliseconds_count",
    ]
    assert page.text(lambda name: False) == ""
    assert page.text(lambda name: True) == page.text()


# -- a real sidecar ------------------------------------------------------------------


class Run:
    """``l4proxy run`` on loopback: a gateway listener on port 0 routed to
    *backend* (an Ingress default backend), the admin endpoint on a port
    free at the start, its log in a file."""

    def __init__(self, tmp: Path, backend: str, *flags: str, rules: str | None = None) -> None:
        self.rules = tmp / "rules"
        self.rules.mkdir()
        port = int(backend.rsplit(":", 1)[1])
        (self.rules / "gateway.yaml").write_text(gateway_service(port) if rules is None else rules)
        self.log_path = tmp / "log"
        # (a port free now, known before start, as test_run_cli takes one)
        self.admin = f"127.0.0.1:{free_ports(1)[0]}"
        argv = [
            *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
            *("--admin", self.admin, "--rules", str(self.rules), "--reload-interval", "0.1"),
            *flags,
        ]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        workers = 1 if "--single-process" in flags else int(flags[flags.index("--workers") + 1])
        self.until(lambda: self.log().count(" worker: listening: ") == workers, "workers started")
        line = next(ln for ln in self.log().splitlines() if " worker: listening: " in ln)
        self.listen = line.split("listening: gateway:")[1].split(";")[0]
        stats = re.search(r"stats endpoint \(read-only /stats, /ready\) on (\S+)", self.log())
        self.stats = stats.group(1) if stats else None

    def workers(self) -> list[int]:
        """The supervisor's live worker processes (its children)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            pids = [int(x) for x in f.read().split()]
        return [pid for pid in pids if running(pid)]

    def log(self) -> str:
        return self.log_path.read_text()

    def until(self, cond: object, what: str, timeout: float = 30) -> None:
        assert callable(cond)
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}):\n{self.log()}"
            assert time.monotonic() < deadline, f"{what} within {timeout}s:\n{self.log()}"
            time.sleep(0.05)

    def get(self, path: str, method: str = "GET", at: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://{at or self.admin}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def through(self) -> tuple[int, str]:
        """One request through the gateway listener."""
        return self.get("/", at=self.listen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture
def backend() -> Iterator[str]:
    with serving(lambda target: b"from the backend\n") as address:
        yield address


@contextlib.contextmanager
def sidecar(tmp: Path, backend: str, *flags: str, rules: str | None = None) -> Iterator[Run]:
    run = Run(tmp, backend, *flags, rules=rules)
    try:
        run.until(lambda: run.get("/ready") == (200, "LIVE\n"), "/ready LIVE")
        yield run
    finally:
        run.close()


def families(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]


def test_stats_filter_is_a_regex_over_the_family_names(tmp_path: Path, backend: str) -> None:
    """/stats?filter=rules_gen returned every family (the filter was not
    read). It is Envoy's: RE2, searched in each name, the whole family of
    each name that has a match (a histogram's buckets, sum and count), in
    each format, on --stats-listen too; a pattern RE2 refuses is a 400."""
    with sidecar(tmp_path, backend, "--workers", "2", "--stats-listen", "127.0.0.1:0") as run:
        assert run.through() == (200, "from the backend\n")
        status, text = run.get("/stats?filter=rules_gen")
        assert status == 200
        assert families(text) == ["l4proxy_rules_generation"], text
        assert "l4proxy_rules_generation 1" in text.splitlines()
        assert len(families(run.get("/stats")[1])) > 20  # unfiltered, for contrast
        status, text = run.get("/stats/prometheus?filter=request_duration&usedonly")
        assert families(text) == ["istio_request_duration_milliseconds"], text
        kinds = {re.split("[{ ]", ln)[0] for ln in text.splitlines() if not ln.startswith("#")}
        assert kinds == {
            f"istio_request_duration_milliseconds_{p}" for p in ("bucket", "sum", "count")
        }
        status, text = run.get("/stats?filter=%5El4proxy_rules_(generation%7Cvalid)%24")
        assert families(text) == ["l4proxy_rules_generation", "l4proxy_rules_valid"], text
        status, body = run.get("/stats?format=json&filter=rules_gen")
        assert status == 200 and json.loads(body) == {"l4proxy_rules_generation": 1}
        everything = families(run.get("/stats")[1])
        assert families(run.get("/stats?filter=")[1]) == everything  # empty: no filter
        for bad in ("(", "%28%3F%3Da%29"):  # "(", and a lookahead, which RE2 has not
            status, body = run.get(f"/stats?filter={bad}")
            assert status == 400 and "is not a regular expression (RE2)" in body, body
        assert run.stats is not None
        status, text = run.get("/stats?filter=rules_gen", at=run.stats)
        assert status == 200 and families(text) == ["l4proxy_rules_generation"], text


def test_help_lists_what_answers_and_a_404_points_to_it(tmp_path: Path, backend: str) -> None:
    with sidecar(tmp_path, backend, "--workers", "1") as run:
        status, text = run.get("/help")
        assert status == 200
        head, *lines = text.splitlines()
        assert head == "admin commands are:"
        listed = {}
        for line in lines:
            m = re.fullmatch(r"  (/[\w/]*): (\S.*)", line)
            assert m is not None, line
            listed[m.group(1)] = m.group(2)
        assert {"/stats", "/ready", "/server_info", "/logging", "/healthcheck/fail"} <= set(listed)
        for path, what in listed.items():  # a GET changes nothing: POST ones answer 405
            status, _ = run.get(path)
            assert status == (405 if what.startswith("POST:") else 200), path
        assert run.proc.poll() is None  # GET /quitquitquit did not stop it
        status, body = run.get("/nope")
        assert status == 404 and "/nope" in body and "GET /help" in body, body


def run_options() -> tuple[set[str], set[str]]:
    """l4proxy run's options by dest: those --help shows, those it hides."""
    (sub,) = (a for a in build_parser("run")._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices["run"]._actions if a.option_strings and a.dest != "help"]
    shown = {a.dest for a in actions if a.help != argparse.SUPPRESS}
    return shown, {a.dest for a in actions if a.help == argparse.SUPPRESS}


@pytest.mark.parametrize("flags", [("--workers", "2"), ("--single-process",)])
def test_server_info_says_what_runs(tmp_path: Path, backend: str, flags: tuple[str, ...]) -> None:
    with sidecar(tmp_path, backend, *flags, "--drain-quiet", "1") as run:
        status, body = run.get("/server_info")
        assert status == 200
        info = json.loads(body)
        assert sorted(info) == [
            "command_line_options",
            "hot_restart_version",
            "state",
            "uptime_all_epochs",
            "uptime_current_epoch",
            "version",
        ]
        assert info["version"] == __version__ and info["state"] == LIVE
        assert info["hot_restart_version"] == "disabled"
        assert re.fullmatch(r"\d+s", info["uptime_current_epoch"])
        assert info["uptime_all_epochs"] == info["uptime_current_epoch"]  # no hot restart
        opts = info["command_line_options"]
        # (--listen 127.0.0.1:0: the port bound, as the worker's line says it)
        assert opts["admin"] == run.admin and opts["listen"] == [run.listen]
        assert opts["rules"] == [str(run.rules)] and opts["drain_quiet"] == 1.0
        assert opts["workers"] == (1 if "--single-process" in flags else 2)
        assert opts["single_process"] == ("--single-process" in flags)
        assert opts["idle_timeout"] == 3600.0  # a default, as it is in effect
        for internal in ("raw_argv", "func", "command"):
            assert internal not in opts
        # every option of l4proxy run --help, and none of those it hides (how the
        # supervisor starts a worker: rules_last_good_fd was shown as -1)
        shown, hidden = run_options()
        assert hidden and not hidden & set(opts), hidden & set(opts)
        assert set(opts) == shown, set(opts) ^ shown


@pytest.mark.parametrize("flags", [("--workers", "2"), ("--single-process",)])
def test_server_info_says_the_addresses_bound_for_port_0(
    tmp_path: Path, backend: str, flags: tuple[str, ...]
) -> None:
    """--admin, --stats-listen and --listen on port 0: command_line_options
    says each address as bound, the one the start-up lines name and that
    answers, as every other option says its value in effect. Before, it
    said ``127.0.0.1:0`` for each, which reaches nothing."""
    ports_0 = ("--admin", "127.0.0.1:0", "--stats-listen", "127.0.0.1:0")
    run = Run(tmp_path, backend, *flags, *ports_0)
    try:
        said = re.search(r"; admin (\S+); ", run.log())
        assert said is not None, run.log()
        run.admin = said.group(1)
        run.until(lambda: run.get("/ready") == (200, "LIVE\n"), "/ready LIVE")
        opts = json.loads(run.get("/server_info")[1])["command_line_options"]
        assert run.stats is not None
        assert (opts["admin"], opts["stats_listen"], opts["listen"]) == (
            run.admin,
            run.stats,
            [run.listen],
        )
        for address in (opts["admin"], opts["stats_listen"], opts["listen"][0]):
            assert not address.endswith(":0"), opts
        assert run.get("/ready", at=opts["stats_listen"]) == (200, "LIVE\n")
        assert run.get("/", at=opts["listen"][0]) == (200, "from the backend\n")
    finally:
        run.close()


@pytest.mark.parametrize("flags", [("--workers", "2"), ("--single-process",)])
def test_healthcheck_fail_takes_ready_down_and_serves_on(
    tmp_path: Path, backend: str, flags: tuple[str, ...]
) -> None:
    stats = ("--stats-listen", "127.0.0.1:0")
    with sidecar(tmp_path, backend, *flags, *stats) as run:
        assert run.stats is not None
        assert run.get("/healthcheck/fail") == (405, "use POST\n")  # a GET changes nothing
        assert run.get("/ready") == (200, "LIVE\n")
        assert run.get("/healthcheck/fail", "POST") == (200, "OK\n")
        assert run.get("/ready") == (503, "DRAINING\n")
        assert run.get("/ready", at=run.stats) == (503, "DRAINING\n")
        assert json.loads(run.get("/server_info")[1])["state"] == DRAINING
        for _ in range(3):  # still served, each on a new connection (answers say close)
            assert run.through() == (200, "from the backend\n")
        assert run.get("/healthcheck/ok") == (405, "use POST\n")
        assert run.get("/ready") == (503, "DRAINING\n")
        assert run.get("/healthcheck/ok", "POST") == (200, "OK\n")
        assert run.get("/ready") == (200, "LIVE\n")
        assert run.get("/ready", at=run.stats) == (200, "LIVE\n")
        assert "/healthcheck/fail: /ready answers 503 until /healthcheck/ok" in run.log()


def test_a_health_check_failed_before_the_first_rules_holds_after(
    tmp_path: Path, backend: str
) -> None:
    run = Run(tmp_path, backend, "--workers", "2", rules="kind: [\n")
    try:
        run.until(lambda: run.get("/ready") == (503, "INITIALIZING\n"), "/ready INITIALIZING")
        assert run.get("/healthcheck/fail", "POST") == (200, "OK\n")
        assert run.get("/ready") == (503, "INITIALIZING\n")  # not loaded says first
        (run.rules / "gateway.yaml").write_text(gateway_service(int(backend.rsplit(":", 1)[1])))
        initializing = (503, "INITIALIZING\n")
        run.until(lambda: run.get("/ready") != initializing, "the rules loaded in both workers")
        assert run.get("/ready") == (503, "DRAINING\n")  # then the flag
        assert run.through() == (200, "from the backend\n")
        assert run.get("/healthcheck/ok", "POST") == (200, "OK\n")
        assert run.get("/ready") == (200, "LIVE\n")
    finally:
        run.close()


def test_a_drain_is_draining_whatever_healthcheck_ok_says(tmp_path: Path, backend: str) -> None:
    run = Run(tmp_path, backend, "--workers", "2", "--drain-quiet", "4", "--drain-duration", "6")
    try:
        run.until(lambda: run.get("/ready") == (200, "LIVE\n"), "/ready LIVE")
        run.proc.send_signal(signal.SIGTERM)
        run.until(lambda: run.get("/ready") == (503, "DRAINING\n"), "/ready DRAINING")
        assert run.get("/healthcheck/ok", "POST") == (200, "OK\n")
        assert run.get("/ready") == (503, "DRAINING\n")
        assert run.proc.wait(timeout=30) == 0
    finally:
        run.close()


def _levels(text: str) -> dict[str, dict[str, str] | None]:
    """/logging's text: each process's levels (None: it did not answer)."""
    out: dict[str, dict[str, str] | None] = {}
    who = ""
    for line in text.splitlines():
        if line.startswith("active loggers"):
            who = line[len("active loggers") :].split(":")[0].strip(" ()")
            out[who] = None if line.endswith("no answer") else {}
        else:
            name, level = line.strip().split(": ")
            levels = out[who]
            assert levels is not None
            levels[name] = level
    return out


def test_logging_sets_the_levels_of_the_supervisor_and_every_worker(
    tmp_path: Path, backend: str
) -> None:
    """POST /logging reaches the workers over their control channel: their
    own lines change (a connection's decision, logged at debug by
    l4proxy.worker), and a worker the supervisor starts later is given the
    levels set so far."""
    processes = ["supervisor", "worker 0", "worker 1"]
    flags = ("--workers", "2", "--http-routing", "connection")  # (the L4 decision's line)
    with sidecar(tmp_path, backend, *flags) as run:
        status, text = run.get("/logging")
        assert status == 200
        before = _levels(text)
        assert list(before) == processes
        assert all(levels == dict.fromkeys(LOGGERS, "info") for levels in before.values())
        assert run.through() == (200, "from the backend\n")
        assert "DEBUG l4proxy.worker" not in run.log()

        status, text = run.get("/logging?paths=l4proxy.worker:debug", "POST")
        assert status == 200, text
        for who, levels in _levels(text).items():
            assert levels == {**dict.fromkeys(LOGGERS, "info"), "l4proxy.worker": "debug"}, who
        for _ in range(4):  # whichever worker takes them (SO_REUSEPORT)
            assert run.through() == (200, "from the backend\n")
        debug = [ln for ln in run.log().splitlines() if "DEBUG l4proxy.worker: [w" in ln]
        assert len(debug) == 4 and all(" route=" in ln for ln in debug), run.log()

        assert run.get("/logging?level=debug")[0] == 405  # a GET changes nothing
        assert run.get("/logging?level=trace", "POST")[0] == 400
        status, body = run.get("/logging?paths=l4proxy.nope:debug", "POST")
        assert status == 400 and "no logger 'l4proxy.nope'" in body, body
        status, text = run.get("/logging?level=warning", "POST")  # every logger, by name too
        after = _levels(text)
        assert all(levels == dict.fromkeys(LOGGERS, "warning") for levels in after.values())
        assert "admin: log levels set: *=warning" in run.log()

        # a restarted worker is given the levels set so far
        first = re.search(r"worker 0 started \(pid (\d+)\)", run.log())
        assert first is not None
        os.kill(int(first.group(1)), signal.SIGKILL)  # (its restart is logged at info: not now)
        old = int(first.group(1))
        run.until(lambda: old not in run.workers() and len(run.workers()) == 2, "worker 0 again")
        run.until(lambda: _levels(run.get("/logging")[1])["worker 0"] is not None, "an answer")
        assert _levels(run.get("/logging")[1])["worker 0"] == dict.fromkeys(LOGGERS, "warning")


def test_logging_in_a_single_process(tmp_path: Path, backend: str) -> None:
    with sidecar(tmp_path, backend, "--single-process") as run:
        status, text = run.get("/logging?l4proxy.rules=error", "POST")
        assert status == 200
        assert _levels(text) == {"": {**dict.fromkeys(LOGGERS, "info"), "l4proxy.rules": "error"}}
