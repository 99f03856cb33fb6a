"""The supervisor keeps its workers whatever they do (issue 12, "Trust").

The sidecar runs as it does in a pod (``l4proxy run`` as uid 1337 in a pod's
network namespace); the failures are real ones: SIGSTOP, SIGKILL, a realtime
signal, a SIGHUP storm, a file-descriptor limit on the supervisor, an answer
of hundreds of KiB. The last tests run the real :class:`Supervisor` with a
scripted worker process, to make a worker write garbage on its control socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from l4proxy.dataplane.listener import Listener, bind_listener
from l4proxy.demo.podnet import PodNetwork
from l4proxy.sidecar._stats_wire import at_once, encode_sample
from l4proxy.sidecar.supervisor import Supervisor, WorkerSlot, describe_exit, merge_clusters
from l4proxy.stats import START_TIME, Counters, RulesMark, process_start_time
from tests.mesh import IMPLS, Mesh, Sidecar, service_entry

netns = pytest.mark.netns

BIG_VIP = "198.19.0.50"


@pytest.fixture
def bare(pod_network: PodNetwork) -> Iterator[Mesh]:
    """A Mesh with no backends: the tests here only talk to the admin endpoint."""
    with Mesh(pod_network) as m:
        yield m


def _start(m: Mesh, *run_args: str, impl: str = "compiled-uvloop") -> Sidecar:
    env, args = IMPLS[impl]
    m.env.update(env)
    pod = m.net.add_pod("client", labels={"app": "client"})
    m.client = pod
    m.sidecar = m.start_sidecar(pod, (*args, *run_args))
    return m.sidecar


def _wait(cond: object, what: str, m: Mesh, timeout: float = 20) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s:\n{m.sidecar_log(5000)}")


def _replaced(m: Mesh, old: int) -> int:
    """Wait for the one worker to be a live process other than *old*; its pid."""
    assert m.sidecar is not None
    sc = m.sidecar
    _wait(lambda: sc.worker_pids() not in ([], [old]), f"worker {old} replaced", m)
    [new] = sc.worker_pids()
    return new


def _ready(m: Mesh) -> None:
    assert m.sidecar is not None
    sc = m.sidecar
    _wait(lambda: sc.admin("/ready").strip() == "LIVE", "/ready LIVE", m)


# -- the channel ---------------------------------------------------------------


def _endpoints(n: int) -> list[tuple[str, dict[str, str]]]:
    """n endpoint addresses (data only: nothing is dialled), versions v0..v2."""
    return [(f"198.18.{100 + i // 250}.{i % 250 + 1}", {"version": f"v{i % 3}"}) for i in range(n)]


@netns
def test_config_dump_of_5000_endpoints_then_the_watchdog_still_works(bare: Mesh) -> None:
    """Issue 12: over 64 KiB failed, and the leftover bytes killed the watchdog."""
    eps = [
        (f"198.18.{100 + i // 250}.{i % 250 + 1}", {"version": f"v{i % 3}"}) for i in range(5000)
    ]
    bare.write_rules(service_entry("big", BIG_VIP, 8080, eps), name="big.yaml")
    sc = _start(bare, "--watchdog-timeout", "2")
    [first] = sc.worker_pids()
    for _ in range(2):  # twice: nothing of the first answer may be left over
        dump = json.loads(sc.admin("/config_dump"))
        [svc] = dump["table"]["services"]
        assert svc["host"] == "big.default.svc.cluster.local"
        assert len(svc["endpoints"]["8080"]) == 5000
        assert svc["endpoints"]["8080"][4999]["address"] == "198.18.119.250"
    assert "l4proxy_rules_generation 1" in sc.admin("/stats").splitlines()
    # The watchdog is alive: a stopped worker is still replaced.
    os.kill(first, signal.SIGSTOP)
    _replaced(bare, first)
    assert "has not answered for 2.0s; killing it" in bare.sidecar_log()
    _ready(bare)
    [svc] = json.loads(sc.admin("/config_dump"))["table"]["services"]
    assert len(svc["endpoints"]["8080"]) == 5000


@netns
def test_a_worker_stopped_past_the_timeout_does_not_shift_the_answers(bare: Mesh) -> None:
    """Issue 12: the late answer stayed queued; /config_dump then served /stats, for good."""
    sc = _start(bare, "--watchdog-timeout", "30")
    [worker] = sc.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        # Asked while stopped: no answer within 3 s (the admin shows what it has).
        with pytest.raises(subprocess.CalledProcessError):
            sc.admin("/ready")  # 503 NOT READY
        sc.admin("/stats")
        time.sleep(max(0.0, 4 - (time.monotonic() - t0)))
    finally:
        os.kill(worker, signal.SIGCONT)
    for _ in range(3):
        dump = json.loads(sc.admin("/config_dump"))
        assert isinstance(dump, dict) and dump["generation"] == 1, dump
        assert "table" in dump and "counters" not in dump
        stats = sc.admin("/stats").splitlines()
        assert "l4proxy_rules_generation 1" in stats
        assert sc.admin("/ready").strip() == "LIVE"
    assert sc.worker_pids() == [worker]  # slow is not hung: nobody was replaced
    assert sc.stat("l4proxy_control_late_answers_total") >= 2


# -- keepers: any exit status, any spawn failure -------------------------------


REFUSING_VIP = "198.19.0.51"


@netns
def test_clusters_sums_the_connect_failures_of_every_worker(bare: Mesh) -> None:
    """--workers 2, one endpoint that refuses every connect: each worker
    counts (and ejects on) the failures it met itself, and /clusters showed
    worker 0's alone. Connections until both workers have met three (the
    kernel spreads them, SO_REUSEPORT): /clusters shows the sum, which is
    /stats' summed count, and the endpoint ejected in both."""
    env, args = IMPLS["compiled-uvloop"]
    bare.env.update(env)
    refusing = bare.net.add_pod("refusing", labels={"app": "db"})  # nothing listens
    bare.write_rules(
        service_entry("db", REFUSING_VIP, 8080, [(refusing.ipv4, {})], "TCP", "tcp-db")
    )
    sc = bare.start_client(run_args=(*args, "--workers", "2", "--ejection-time", "300"))
    assert len(sc.worker_pids()) == 2
    svc = "db.default.svc.cluster.local"

    def endpoint() -> dict[str, Any]:
        [cluster] = [
            c for c in json.loads(sc.admin("/clusters?format=json")) if c["service"] == svc
        ]
        assert cluster["unanswered_workers"] == []
        [ep] = cluster["endpoints"]
        return ep  # type: ignore[no-any-return]

    for _ in range(100):  # 400 connections: both get 3 but for a 1 in 2**390 draw
        ep = endpoint()
        per_worker = [w["connect_failures"] for w in ep["workers"]]
        if len(per_worker) == 2 and min(per_worker) >= 3:
            break
        codes = [ln for ln in bare.curl(f"http://{REFUSING_VIP}:8080/", n=4) if ln]
        assert codes == ["000"] * 4, codes
    else:
        raise AssertionError(f"both workers never met 3 failures: {ep}")
    ep = endpoint()
    assert [w["worker"] for w in ep["workers"]] == [0, 1], ep
    total = sum(w["connect_failures"] for w in ep["workers"])
    assert ep["connect_failures"] == total == sc.stat("l4proxy_upstream_connect_failures_total")
    assert ep["ejections"] == sum(w["ejections"] for w in ep["workers"]) == 2, ep
    assert ep["healthy"] is False and ep["ejected_in"] == [0, 1], ep
    assert "refused" in str(ep["last_error"]).lower(), ep
    text = sc.admin("/clusters").splitlines()
    base = f"{svc}::{refusing.ipv4}:8080"
    assert f"{base}::connect_failures::{total}" in text, text
    assert f"{base}::health_flags::failed_outlier_check" in text, text
    assert f"{base}::ejected_in::0,1" in text, text
    assert f"{base}::cx_active::0" in text, text
    assert not any("unanswered_workers" in line for line in text), text


@netns
def test_a_worker_killed_by_a_realtime_signal_is_replaced(bare: Mesh) -> None:
    """Issue 12: signal.Signals(40) raised ValueError and the slot was never restarted."""
    sc = _start(bare)
    [first] = sc.worker_pids()
    os.kill(first, 40)
    _replaced(bare, first)
    _ready(bare)
    assert "died with signal 40 (SIGRTMIN+6)" in bare.sidecar_log()
    assert sc.stat("l4proxy_worker_restarts_total") == 1


def _nofile_soft(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    return int(line.split()[3])


def _set_nofile_soft(pid: int, n: int) -> None:
    # As the supervisor's own uid/gid: prlimit(2) on another process needs
    # that or CAP_SYS_RESOURCE, which a container's root may lack.
    subprocess.run(
        [
            *("setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"),
            *("prlimit", "--pid", str(pid), f"--nofile={n}:"),
        ],
        check=True,
    )
    assert _nofile_soft(pid) == n


def _open_fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


@netns
def test_spawn_failures_are_retried_until_spawning_works(bare: Mesh) -> None:
    """A real EMFILE: the supervisor's RLIMIT_NOFILE lowered (prlimit(2)) so that
    its next socketpair fails, the worker killed; then the limit restored."""
    sc = _start(bare)
    sup = sc.proc.pid
    [first] = sc.worker_pids()
    fds = _open_fds(sup)
    # Below the first free fd number no new fd can be made at all.
    first_free = next(i for i in range(len(fds) + 1) if i >= len(fds) or fds[i] != i)
    soft = _nofile_soft(sup)
    _set_nofile_soft(sup, first_free)
    try:
        os.kill(first, signal.SIGKILL)
        _wait(
            lambda: bare.sidecar_log().count("cannot start worker 0") >= 2,
            "two failed spawns",
            bare,
        )
        assert "Too many open files" in bare.sidecar_log()
    finally:
        _set_nofile_soft(sup, soft)
    _replaced(bare, first)
    _ready(bare)
    assert sc.stat("l4proxy_worker_spawn_failures_total") >= 2
    assert sc.stat("l4proxy_worker_restarts_total") == 1


# -- signals ---------------------------------------------------------------------


@netns
@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_sighup_storm_after_a_worker_crash_kills_nothing(bare: Mesh, impl: str) -> None:
    """Issue 12: SIGHUP every 50 ms for 2 s after a crash killed 4 starting workers."""
    sc = _start(bare, impl=impl)
    [first] = sc.worker_pids()
    os.kill(first, signal.SIGKILL)
    seen: set[int] = set()
    for _ in range(40):  # every 50 ms for 2 s
        sc.proc.send_signal(signal.SIGHUP)
        seen.update(sc.worker_pids())
        time.sleep(0.05)
    assert sc.alive()
    _ready(bare)
    seen.update(sc.worker_pids())
    seen.discard(first)
    log = bare.sidecar_log()
    assert log.count("died with") == 1, log  # the SIGKILL, nothing else
    assert "died with signal 1 " not in log
    assert len(seen) == 1, seen  # one replacement, and it lived through the storm
    assert sc.stat("l4proxy_worker_restarts_total") == 1
    assert sc.stat("l4proxy_reloads_total") >= 2  # the reloads were honoured, not dropped


@netns
def test_a_sighup_to_a_worker_that_is_loading_its_first_rules(bare: Mesh) -> None:
    """A SIGHUP sent straight to a starting worker (not through the supervisor)."""
    bare.write_rules(service_entry("big", BIG_VIP, 8080, _endpoints(5000)), name="big.yaml")
    sc = _start(bare)
    [first] = sc.worker_pids()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    hit: set[int] = set()
    while time.monotonic() < deadline:
        for pid in sc.worker_pids():
            if pid != first:
                try:
                    os.kill(pid, signal.SIGHUP)
                    hit.add(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.005)
    _ready(bare)
    assert len(hit) == 1 and sc.worker_pids() == list(hit), (hit, bare.sidecar_log(5000))
    assert bare.sidecar_log().count("died with") == 1


@netns
def test_sighup_reloads_a_single_process_sidecar(bare: Mesh) -> None:
    """--single-process: the early handler hands over to the loop's; SIGHUP reloads."""
    started = time.time()
    sc = _start(bare, "--single-process")
    assert sc.worker_pids() == []
    before = sc.stat("l4proxy_reloads_total")
    # process_start_time_seconds: when this process started (its counters' zero)
    start = sc.stat(START_TIME)
    assert started - 1 <= start <= time.time(), (started, start)
    sc.proc.send_signal(signal.SIGHUP)
    _wait(lambda: sc.stat("l4proxy_reloads_total") > before, "a reload after SIGHUP", bare)
    assert sc.alive()
    assert sc.stat(START_TIME) == start  # a reload is not a restart


RUN_GATEWAY = ("run", "--no-transparent", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")


def _caught(pid: int) -> int:
    """The signals *pid* has a handler for (SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("SigCgt:")).split()[1], 16)


@netns  # (root: a PID namespace)
def test_a_sigterm_to_a_starting_supervisor_that_is_pid_1_stops_it() -> None:
    """PID 1 of a PID namespace (a container without an init) is sent only the
    signals it has a handler for. Only SIGHUP had one while it started: a
    SIGTERM then (a pod deleted as it starts) was discarded, and the sidecar
    ran on until the kubelet's SIGKILL. Here the SIGTERM comes as soon as the
    supervisor can hear a SIGHUP."""
    proc = subprocess.Popen(
        ["unshare", "-fp", "--mount-proc", sys.executable, "-m", "l4proxy", *RUN_GATEWAY],
        stderr=subprocess.PIPE,
        text=True,
    )
    pid1 = 0
    try:
        while not pid1:
            assert proc.poll() is None
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                pid1 = int((f.read().split() or ["0"])[0])  # (as this namespace sees it)
            time.sleep(0.0005)  # (not a busy loop against the process it waits for)
        while not _caught(pid1) & (1 << (signal.SIGHUP - 1)):
            assert proc.poll() is None
            time.sleep(0.0005)
        os.kill(pid1, signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            if pid1:  # (unshare's child does not die with it: no --kill-child)
                os.kill(pid1, signal.SIGKILL)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopping: draining 0 worker(s)" in err and err.rstrip().endswith("stopped"), err


def test_a_sigterm_while_a_worker_starts_makes_it_drain_once_started() -> None:
    """The supervisor forwards SIGTERM to its workers; one still starting had
    no handler yet and was killed (no drain: what its listener had queued was
    reset). Workers now start with SIGTERM blocked, held until their loop
    runs: the worker drains."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4proxy", *RUN_GATEWAY], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        while not any("worker 0 started (pid" in ln for ln in log):
            line = proc.stderr.readline()
            assert line, "".join(log)
            log.append(line)
        proc.terminate()  # the worker is still importing: hundreds of ms
        log.append(proc.communicate(timeout=30)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = "".join(log)
    assert proc.returncode == 0, text
    assert "[w0] draining for up to" in text and "[w0] stopped" in text, text


# -- the real Supervisor with a scripted worker (garbage on the channel) --------

SCRIPTED_WORKER = r"""
import os, signal, socket, sys, time
from l4proxy.sidecar.channel import FrameDecoder, MAX_REQUEST, decode_request, encode_answer
from l4proxy.sidecar._stats_wire import at_once, encode_sample
from l4proxy.stats import Counters
mode, marker = sys.argv[1], sys.argv[2]
fd = int(sys.argv[sys.argv.index("--control-fd") + 1])
first = not os.path.exists(marker)
with open(marker, "a") as f:
    f.write(f"{os.getpid()}\n")
sock = socket.socket(fileno=fd)
sock.setblocking(True)
if mode == "deaf":  # a drain that never ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if first and mode == "slow-start":  # loading a big rule set: silent for a while
    time.sleep(float(sys.argv[3]))
decoder = FrameDecoder(MAX_REQUEST)
stats_answered = 0
while True:
    data = sock.recv(65536)
    if not data:
        sys.exit(0)
    for frame in decoder.feed(data):
        op = decode_request(frame)
        if first and mode == "garbage":
            sock.sendall(b"\x00\x00\x00\x08" + frame.id.to_bytes(4, "big") + b"not json")
        elif first and mode == "oversize":
            sock.sendall(b"\xff\xff\xff\xff" + frame.id.to_bytes(4, "big") + b"x" * 1000)
        elif first and mode == "json-line":
            sock.sendall(b'{"ready": true}\n' * 4)
        elif mode == "counting" and op == "stats":  # 10 more requests at each ask
            stats_answered += 1
            counters = Counters()
            counters.inc("l4proxy_requests_total", 10 * stats_answered, route="r")
            help_ = {"l4proxy_requests_total": ["counter", "Requests."]}
            sample = at_once(encode_sample(counters.sample()))
            labelled = ["l4proxy_requests_total"]
            answer = {"sample": sample, "help": help_, "gauges": {}, "labelled": labelled}
            sock.sendall(encode_answer(frame.id, answer))
        else:
            sock.sendall(encode_answer(frame.id, True if op == "ready" else {"op": op}))
"""


class ScriptedSupervisor(Supervisor):
    def __init__(
        self, mode: str, marker: str, listeners: list[Listener], start: float = 120.0, *extra: str
    ) -> None:
        args = argparse.Namespace(
            raw_argv=[], watchdog_timeout=1.0, watchdog_start_timeout=start, drain_duration=1.0
        )
        super().__init__(args, [listeners])
        self.mode, self.marker, self.extra = mode, marker, extra

    def _worker_argv(self, slot: WorkerSlot, control_fd: int) -> list[str]:
        script = [sys.executable, "-c", SCRIPTED_WORKER, self.mode, self.marker, *self.extra]
        return [*script, "--control-fd", str(control_fd)]


async def _stop(
    sup: Supervisor, slot: WorkerSlot, keeper: asyncio.Task, watchdog: asyncio.Task | None = None
) -> None:
    """Stop a scripted supervisor's keeper (and watchdog), its worker killed."""
    sup.stopping = True
    if watchdog is not None:
        watchdog.cancel()
    if slot.proc and slot.proc.returncode is None:
        slot.proc.kill()
    await asyncio.wait_for(keeper, 10)


def _pids(marker: str) -> list[int]:
    with open(marker) as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("mode", ["garbage", "oversize", "json-line"])
def test_a_worker_that_writes_garbage_is_replaced_and_the_watchdog_lives_on(mode: str) -> None:
    marker = os.path.join(tempfile.mkdtemp(prefix="l4sup-"), "pids")
    lst = bind_listener("127.0.0.1", 0, "gateway")
    sup = ScriptedSupervisor(mode, marker, [lst])
    [slot] = sup.slots

    async def until(cond: object, timeout: float = 15) -> None:
        assert callable(cond)
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def main() -> None:
        keeper = asyncio.get_running_loop().create_task(sup._keep(slot))
        watchdog = asyncio.get_running_loop().create_task(sup._watchdog())
        try:
            await until(lambda: slot.link is not None)
            # The first incarnation answers with garbage: None, and it is replaced.
            assert await sup.ask(slot, "stats") is None
            await until(lambda: os.path.exists(marker) and len(_pids(marker)) == 2)
            await until(lambda: slot.link is not None and slot.proc is not None)
            assert await sup.ask(slot, "stats") == {"op": "stats"}
            assert await sup.ready()
            assert sup.channel_resets_total == 1 and sup.restarts_total == 1
            # The watchdog survived all that: it still kills a stopped worker.
            assert slot.proc is not None
            second = slot.proc.pid
            os.kill(second, signal.SIGSTOP)
            await until(lambda: len(_pids(marker)) == 3)
            await until(lambda: slot.link is not None)
            assert await sup.ask(slot, "config_dump") == {"op": "config_dump"}
            assert not watchdog.done() and not keeper.done()
        finally:
            await _stop(sup, slot, keeper, watchdog)

    try:
        asyncio.run(main())
    finally:
        lst.sock.close()


@pytest.mark.parametrize(
    "code,text",
    [
        (0, "status 0"),
        (3, "status 3"),
        (-9, "signal 9 (SIGKILL)"),
        (-1, "signal 1 (SIGHUP)"),
        (-40, "signal 40 (SIGRTMIN+6)"),
        (-34, "signal 34 (SIGRTMIN)"),
        (-64, "signal 64 (SIGRTMAX)"),
        (-200, "signal 200 (unknown)"),
    ],
)
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code) == text


@pytest.mark.parametrize(("silence", "killed"), [(1.6, False), (60.0, True)])
def test_a_worker_still_starting_gets_the_start_allowance_not_the_watchdog_timeout(
    silence: float, killed: bool
) -> None:
    """A worker answers once its rules are loaded; a big rule set on a small
    CPU share can take longer than --watchdog-timeout. It was killed like a
    hung one, and its successor too, for ever (the pod never ready). Here:
    watchdog 1 s, start allowance 2.5 s; a worker silent for 1.6 s at start
    lives, one silent for 60 s is killed once the allowance is over."""
    marker = os.path.join(tempfile.mkdtemp(prefix="l4sup-"), "pids")
    lst = bind_listener("127.0.0.1", 0, "gateway")
    sup = ScriptedSupervisor("slow-start", marker, [lst], 2.5, str(silence))
    [slot] = sup.slots

    async def main() -> list[int]:
        keeper = asyncio.get_running_loop().create_task(sup._keep(slot))
        watchdog = asyncio.get_running_loop().create_task(sup._watchdog())
        try:
            while slot.link is None:
                await asyncio.sleep(0.05)
            await asyncio.sleep(4.0)  # past the allowance: watched at 1 s from here on
            # a successor writes its pid once its interpreter is up: on a
            # loaded machine that may be seconds after the kill
            for _ in range(200 if killed else 0):
                if len(_pids(marker)) > 1:
                    break
                await asyncio.sleep(0.1)
            return _pids(marker)
        finally:
            await _stop(sup, slot, keeper, watchdog)

    try:
        pids = asyncio.run(main())
    finally:
        lst.sock.close()
    assert (len(pids) > 1) is killed, pids


def test_summed_counters_never_go_down_when_a_worker_is_silent_or_replaced() -> None:
    """/stats sums the workers' counters. A worker that did not answer (busy,
    restarting) dropped out of the sum, and a replaced one took its history
    with it: the sum went down, which Prometheus' rate() and l4proxy canary
    read as a reset and count the whole history again. A silent worker now
    counts with its last answer, and a dead one's last counts stay."""
    marker = os.path.join(tempfile.mkdtemp(prefix="l4sup-"), "pids")
    lst = bind_listener("127.0.0.1", 0, "gateway")
    sup = ScriptedSupervisor("counting", marker, [lst])
    [slot] = sup.slots
    sums: list[float] = []
    kinds: list[object] = []

    starts: set[float] = set()

    async def requests_total() -> float:
        stats = await sup.stats()
        kinds.append(stats.help.get("l4proxy_requests_total"))
        starts.add(stats.gauges[START_TIME])
        return sum(stats.sample.series["l4proxy_requests_total"].values())

    async def main() -> None:
        keeper = asyncio.get_running_loop().create_task(sup._keep(slot))
        try:
            while slot.link is None:
                await asyncio.sleep(0.05)
            sums.append(await requests_total())  # 10
            sums.append(await requests_total())  # 20
            assert slot.proc is not None
            first = slot.proc
            os.kill(first.pid, signal.SIGSTOP)  # silent: its last answer stands in
            sums.append(await requests_total())
            os.kill(first.pid, signal.SIGKILL)  # replaced: its counts stay
            await first.wait()
            while slot.link is None or slot.proc is first:
                await asyncio.sleep(0.05)
            sums.append(await requests_total())  # the new one's 10, on top
        finally:
            await _stop(sup, slot, keeper)

    try:
        asyncio.run(main())
    finally:
        lst.sock.close()
    assert sums == [10, 20, 20, 30]  # was [10, 20, 0, 10]
    assert kinds == [("counter", "Requests.")] * 4  # typed while silent too
    # The sums count from the supervisor's start, and say so across the
    # replacement (a reader must not take it for a restart).
    assert starts == {process_start_time()}


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode = None


class _Link:
    """A worker's control link that answers every request with *answer*
    (None: silent), after *delay*; *then*: the slot's process right after
    it answered (the worker died and was replaced meanwhile)."""

    closed = False
    stale = 0

    def __init__(
        self,
        answer: dict[str, object] | None,
        delay: float = 0.0,
        slot: WorkerSlot | None = None,
        then: _Proc | None = None,
    ) -> None:
        self.answer, self.delay, self.slot, self.then = answer, delay, slot, then
        self.asked = 0

    async def ask(self, op: str, timeout: float) -> object:
        self.asked += 1
        await asyncio.sleep(self.delay)
        if self.slot is not None:
            self.slot.proc = self.then  # type: ignore[assignment]
        return self.answer


def _raw(conns: int, bytes_up: int, dns_addresses: int) -> dict[str, object]:
    """A worker's stats_raw(): a counter, a labelled gauge, two unlabelled totals."""
    counters = Counters()
    counters.inc("l4proxy_connections_total", conns, listener="outbound")
    counters.set("l4proxy_dns_addresses", dns_addresses, hostname="db.example")
    return {
        "sample": at_once(encode_sample(counters.sample())),
        "gauges": {
            "l4proxy_relayed_connections_total": conns,
            "l4proxy_bytes_upstream_total": bytes_up,
            "l4proxy_rules_generation": 1,
            "l4proxy_rules_valid": 1,
        },
        "help": {
            "l4proxy_connections_total": ["counter", "Connections."],
            "l4proxy_dns_addresses": ["gauge", "Addresses."],
        },
        "labelled": ["l4proxy_connections_total", "l4proxy_dns_addresses"],
    }


def _scrape(sup: Supervisor) -> dict[str, float]:
    text = asyncio.run(sup.stats_text())
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_totals_reported_as_gauges_and_dns_gauges_survive_silence_and_restarts() -> None:
    """A worker's unlabelled totals (bytes, relayed connections, reloads, pool
    counts) came among its gauges, summed over the workers that answered: they
    went down while one was silent, and again when it was replaced. The DNS
    gauges (a name's addresses, stale) were summed over workers and added up
    across restarts: 3 addresses read 6, then 9, then 12."""
    sup = Supervisor(argparse.Namespace(), [[], []])
    s0, s1 = sup.slots
    s0.proc, s0.link = _Proc(100), _Link(_raw(1000, 10**6, 3))  # type: ignore[assignment]
    s1.proc, s1.link = _Proc(101), _Link(_raw(1000, 10**6, 3))  # type: ignore[assignment]
    seen = [_scrape(sup)]
    s1.link = _Link(None)  # type: ignore[assignment]  # busy past 3 s, or restarting
    seen.append(_scrape(sup))
    for pid in (202, 303):  # replaced, twice
        s1.proc, s1.link = _Proc(pid), _Link(_raw(5, 500, 3))  # type: ignore[assignment]
        seen.append(_scrape(sup))
    up = [s["l4proxy_bytes_upstream_total"] for s in seen]
    relayed = [s["l4proxy_relayed_connections_total"] for s in seen]
    dns = [s['l4proxy_dns_addresses{hostname="db.example"}'] for s in seen]
    assert up == [2_000_000, 2_000_000, 2_000_500, 2_001_000]  # was: 2e6, 1e6, 1000500, ...
    assert relayed == [2000, 2000, 2005, 2010]
    assert dns == [3, 3, 3, 3]  # was: 6, 3, 9, 12
    assert [s["l4proxy_rules_generation"] for s in seen] == [1] * 4  # the gauges as before


def test_rules_digest_is_the_workers_when_they_agree() -> None:
    """/stats' l4proxy_rules_digest: the files every answering worker serves;
    -1 while they differ (one has not reloaded yet), which no writer waiting
    for its change takes for live (RulesMark.past)."""

    def raw(gen: int, digest: int) -> dict[str, object]:
        r = _raw(1, 0, 0)
        r["gauges"] = {**r["gauges"], "l4proxy_rules_generation": gen}  # type: ignore[dict-item]
        r["gauges"]["l4proxy_rules_digest"] = digest  # type: ignore[index]
        return r

    sup = Supervisor(argparse.Namespace(), [[], []])
    s0, s1 = sup.slots
    s0.proc, s0.link = _Proc(100), _Link(raw(5, 77))  # type: ignore[assignment]
    s1.proc, s1.link = _Proc(101), _Link(raw(5, 77))  # type: ignore[assignment]
    before = _scrape(sup)
    s0.link = _Link(raw(6, 88))  # type: ignore[assignment]  # reloaded; s1 not yet
    midway = _scrape(sup)
    s1.proc, s1.link = _Proc(202), _Link(raw(1, 88))  # type: ignore[assignment]  # restarted
    after = _scrape(sup)
    digests = [s["l4proxy_rules_digest"] for s in (before, midway, after)]
    assert digests == [77, -1, 88]
    assert [s["l4proxy_rules_generation"] for s in (before, midway, after)] == [5, 5, 1]
    marks = [
        RulesMark(int(s["l4proxy_rules_generation"]), int(s["l4proxy_rules_digest"]))
        for s in (before, midway, after)
    ]
    assert [m.past(marks[0]) for m in marks] == [False, False, True]


def test_an_answer_counts_for_the_process_that_was_asked() -> None:
    """A worker answered, then died and was replaced while the round waited
    on a slower sibling: its answer was filed under the new process, and the
    next scrape (the new worker's own small count) took the sum down."""
    sup = Supervisor(argparse.Namespace(), [[], []])
    s0, s1 = sup.slots
    s0.proc, s0.link = _Proc(100), _Link(_raw(100, 0, 0))  # type: ignore[assignment]
    s1.proc, s1.link = _Proc(900), _Link(None, delay=0.1)  # type: ignore[assignment]
    key = 'l4proxy_connections_total{listener="outbound"}'
    sums = [_scrape(sup)[key]]
    s0.link = _Link(_raw(1000, 0, 0), delay=0.02, slot=s0, then=_Proc(200))  # type: ignore[assignment]
    sums.append(_scrape(sup)[key])
    s0.link = _Link(_raw(3, 0, 0))  # type: ignore[assignment]  # the new worker's own count
    sums.append(_scrape(sup)[key])
    assert sums == [100, 1000, 1003]  # was: 100, 1000, 103


def test_a_worker_replaced_as_the_round_starts_is_counted_as_itself() -> None:
    """The pids were read before the round's requests went out, one loop turn
    later: a replacement that came up in between answered through its own
    link, filed under its predecessor's pid (1000, then 5: a reset to rate())."""
    sup = Supervisor(argparse.Namespace(), [[]])
    [slot] = sup.slots
    slot.proc, slot.link = _Proc(100), _Link(_raw(1000, 0, 0))  # type: ignore[assignment]
    key = 'l4proxy_connections_total{listener="outbound"}'
    sums = [_scrape(sup)[key]]

    def replace() -> None:
        slot.proc, slot.link = _Proc(200), _Link(_raw(5, 0, 0))  # type: ignore[assignment]

    async def round_with_a_replacement() -> str:
        scrape = asyncio.ensure_future(sup.stats_text())
        await asyncio.sleep(0)  # the round has read the slot, its requests not sent yet
        asyncio.get_running_loop().call_soon(replace)
        return await scrape

    asyncio.run(round_with_a_replacement())
    slot.link = _Link(_raw(7, 0, 0))  # type: ignore[assignment]
    sums.append(_scrape(sup)[key])
    assert sums == [1000, 1007]  # the first process's 1000, then the second's 7


def test_concurrent_scrapes_share_one_round_of_requests() -> None:
    """64 admin clients scraping at once asked each worker 64 times; a worker
    answers in turn, so with a slow /stats the queue grew past the watchdog's
    ready ping. Now the scrapes that come during a round share it."""
    sup = Supervisor(argparse.Namespace(), [[]])
    [slot] = sup.slots
    link = _Link(_raw(7, 0, 0), delay=0.05)
    slot.proc, slot.link = _Proc(100), link  # type: ignore[assignment]

    async def main() -> list[str]:
        return list(await asyncio.gather(*(sup.stats_text() for _ in range(64))))

    texts = asyncio.run(main())
    assert link.asked == 1
    assert all('l4proxy_connections_total{listener="outbound"} 7' in t for t in texts)
    asyncio.run(sup.stats_text())  # and a later scrape asks again
    assert link.asked == 2


class _HeldLink:
    """A worker's control link whose answers wait for *release* (a worker busy
    building /config_dump answers); counts the requests it was sent, and the
    most ever waiting at once."""

    closed = False
    stale = 0

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked: dict[str, int] = {}
        self.waiting = 0
        self.most_waiting = 0

    async def ask(self, op: str, timeout: float | None) -> object:
        self.asked[op] = self.asked.get(op, 0) + 1
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            async with asyncio.timeout(timeout):
                await self.release.wait()
        except TimeoutError:
            return None  # (the worker answers anyway, later: queued at it)
        finally:
            self.waiting -= 1
        return _held_answer(op)


def _held_answer(op: str) -> object:
    """What _HeldLink answers: a /clusters answer is a list of clusters."""
    if op == "clusters":
        return [{"service": op, "endpoints": []}]
    return {"op": op}


@pytest.mark.parametrize("op", ["config_dump", "clusters"])
def test_heavy_requests_are_one_in_flight_per_worker_even_past_their_timeout(op: str) -> None:
    """Every /config_dump (or /clusters) sent one more request to the worker,
    given up on after 3 s but still built and encoded there in turn: 20
    clients looping on /config_dump of a big table queued answers without
    bound ahead of the watchdog's ready ping, and the watchdog killed the
    healthy worker. Now concurrent callers share one request, and one that
    timed out stays in flight until its late answer comes."""
    sup = Supervisor(argparse.Namespace(), [[]])
    sup.SHARED_ASK_TIMEOUT_S = 0.05
    [slot] = sup.slots
    link = _HeldLink()
    slot.proc, slot.link = _Proc(100), link  # type: ignore[assignment]
    ask = getattr(sup, op)

    async def main() -> tuple[list[object], list[object], list[object]]:
        timed_out = list(await asyncio.gather(*(ask() for _ in range(20))))
        later = [await ask() for _ in range(5)]  # each after the one before gave up
        link.release.set()  # the worker gets to them: the late answer
        await asyncio.sleep(0)
        while link.waiting:
            await asyncio.sleep(0.01)
        after = list(await asyncio.gather(*(ask() for _ in range(20))))
        return timed_out, later, after

    timed_out, later, after = asyncio.run(main())
    assert timed_out == [None] * 20 and later == [None] * 5
    if op == "clusters":  # merged (merge_clusters): who answered is said
        assert after == [[{"service": op, "endpoints": [], "unanswered_workers": []}]] * 20
    else:
        assert after == [_held_answer(op)] * 20
    assert link.asked == {op: 2}  # was 45: one per call
    assert link.most_waiting == 1


def _cluster_ep(address: str, healthy: bool = True, **state: object) -> dict[str, object]:
    """One endpoint of a worker's /clusters answer (WorkerView.clusters_now)."""
    ep: dict[str, object] = {
        "address": address,
        "port": 8080,
        "labels": {"version": "v1"},
        "healthy": healthy,
        "ejected_for_s": 0.0 if healthy else 9.5,
        "ejections": 0 if healthy else 1,
        "consecutive_failures": 0,
        "connect_failures": 0,
        "response_failures": 0,
        "successes": 0,
        "last_error": None,
        "ejections_suppressed": 0,
    }
    ep.update(state)
    return ep


def test_clusters_merges_every_workers_view_and_names_a_silent_one() -> None:
    """/clusters asked worker 0 only: each worker's counts and ejections are
    its own (outlier detection, pools, connections per worker), so with
    --workers N it showed a fraction of the traffic and missed an endpoint
    another worker had ejected. Now the counts are summed, the endpoint is
    failed where any worker ejects it (which ones: ejected_in), each worker's
    view is kept (workers), and a worker that does not answer in time is
    named instead of holding up the answer."""
    from l4proxy.sidecar.admin import clusters_text

    sup = Supervisor(argparse.Namespace(), [[], [], []])
    sup.SHARED_ASK_TIMEOUT_S = 0.05
    s0, s1, s2 = sup.slots
    svc = "db.default.svc.cluster.local"
    dns = [{"name": "db.example", "addresses": ["10.0.0.1"], "last_error": None, "failures": 0}]
    w0 = [
        {
            "service": svc,
            "endpoints": [
                _cluster_ep("10.0.0.1", rq_active=2, cx_idle=1, successes=5),
                _cluster_ep(
                    "10.0.0.2",
                    connect_failures=1,
                    consecutive_failures=1,
                    last_error="a",
                    rq_active=0,
                    cx_idle=0,
                ),
            ],
            "dns": dns,
        }
    ]
    w1 = [
        {
            "service": svc,
            "endpoints": [
                _cluster_ep("10.0.0.1", rq_active=3, cx_idle=4, successes=1),
                _cluster_ep(
                    "10.0.0.2",
                    False,
                    connect_failures=3,
                    last_error="refused",
                    ejections_suppressed=2,
                    rq_active=0,
                    cx_idle=0,
                ),
                # only this worker has reloaded to the rules that name it
                _cluster_ep("10.0.0.3", rq_active=1, cx_idle=0),
            ],
            "dns": dns,
        }
    ]
    held = _HeldLink()  # worker 2: busy past the timeout
    s0.proc, s0.link = _Proc(100), _Link(w0)  # type: ignore[assignment]
    s1.proc, s1.link = _Proc(101), _Link(w1)  # type: ignore[assignment]
    s2.proc, s2.link = _Proc(102), held  # type: ignore[assignment]
    [cluster] = asyncio.run(sup.clusters())
    assert cluster["service"] == svc and cluster["dns"] == dns
    assert cluster["unanswered_workers"] == [2]
    one, two, three = cluster["endpoints"]
    assert (one["rq_active"], one["cx_idle"], one["successes"]) == (5, 5, 6)
    assert one["healthy"] is True and one["ejected_in"] == []
    assert [w["worker"] for w in one["workers"]] == [0, 1]
    assert [w["rq_active"] for w in one["workers"]] == [2, 3]
    assert two["healthy"] is False and two["ejected_in"] == [1]
    assert (two["connect_failures"], two["ejections"], two["ejections_suppressed"]) == (4, 1, 2)
    assert (two["ejected_for_s"], two["consecutive_failures"]) == (9.5, 1)
    assert two["last_error"] == "a"  # the lowest-numbered worker's
    assert [w["last_error"] for w in two["workers"]] == ["a", "refused"]
    assert two["labels"] == {"version": "v1"} and two["port"] == 8080
    assert three["address"] == "10.0.0.3" and [w["worker"] for w in three["workers"]] == [1]
    assert held.asked == {"clusters": 1}
    text = clusters_text([cluster]).splitlines()
    assert f"{svc}::unanswered_workers::2" in text
    assert f"{svc}::10.0.0.1:8080::health_flags::healthy" in text
    assert f"{svc}::10.0.0.1:8080::ejected_in::-" in text
    assert f"{svc}::10.0.0.1:8080::rq_active::5" in text
    assert f"{svc}::10.0.0.2:8080::health_flags::failed_outlier_check" in text
    assert f"{svc}::10.0.0.2:8080::ejected_in::1" in text
    assert f"{svc}::10.0.0.2:8080::connect_failures::4" in text
    # connection mode: cx_active summed alike; no worker answering: None (503)
    s0.link = _Link([{"service": svc, "endpoints": [_cluster_ep("10.0.0.1", cx_active=2)]}])  # type: ignore[assignment]
    s1.link = _Link([{"service": svc, "endpoints": [_cluster_ep("10.0.0.1", cx_active=7)]}])  # type: ignore[assignment]
    s2.link = None
    [cluster] = asyncio.run(sup.clusters())
    assert cluster["endpoints"][0]["cx_active"] == 9 and "rq_active" not in cluster["endpoints"][0]
    assert cluster["unanswered_workers"] == [2]
    s0.link = s1.link = _Link(None)  # type: ignore[assignment]
    assert asyncio.run(sup.clusters()) is None


def test_workers_still_draining_at_the_deadline_are_killed_together() -> None:
    """Two workers that never finish their drain (SIGTERM ignored): both are
    killed at the one deadline, --drain-duration (1 s) + the grace (0.5 s
    here). The supervisor waited for one, then gave the next a whole
    deadline of its own: 3 s for two, N times the drain for N, past the pod's
    grace period (Kubernetes kills the pod at 30 s)."""
    marker = os.path.join(tempfile.mkdtemp(prefix="l4sup-"), "pids")
    lsts = [bind_listener("127.0.0.1", 0, "gateway") for _ in range(2)]
    sup = ScriptedSupervisor("deaf", marker, [lsts[0]])
    sup.slots.append(WorkerSlot(1, [lsts[1]]))
    sup.DRAIN_GRACE_S = 0.5

    async def main() -> tuple[float, list[int | None]]:
        loop = asyncio.get_running_loop()
        keepers = [loop.create_task(sup._keep(slot)) for slot in sup.slots]
        # an answer: each worker is past its start, SIGTERM ignored
        while len(await sup.gather("ready")) < 2:
            await asyncio.sleep(0.05)
        sup.stopping = True
        sup._forward(signal.SIGTERM)
        began = time.monotonic()
        await asyncio.wait_for(sup._reap_all(), 10)
        took = time.monotonic() - began
        await asyncio.wait_for(asyncio.gather(*keepers), 10)
        return took, [slot.proc.returncode if slot.proc else None for slot in sup.slots]

    try:
        took, codes = asyncio.run(main())
    finally:
        for lst in lsts:
            lst.sock.close()
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    assert 1.4 < took < 2.25, took  # one deadline (1.5 s), not two (3 s)


def _ep(port: int, version: str, **fields: Any) -> dict[str, Any]:
    return {"address": "10.0.0.1", "port": port, "labels": {"version": version}, **fields}


def test_clusters_merge_keeps_one_address_with_two_label_sets_apart() -> None:
    """One address:port may be two endpoints of a service (two ServiceEntry
    endpoints told apart by labels, for two subsets): each worker reports
    both, with the same per-address counts; merged per (address, port,
    labels), each is summed once over the workers, not once per entry."""
    worker = [
        {
            "service": "svc",
            "endpoints": [
                _ep(9000, "a", healthy=True, connect_failures=2, cx_active=1),
                _ep(9000, "b", healthy=True, connect_failures=2, cx_active=1),
            ],
        }
    ]
    other = [
        {
            "service": "svc",
            "endpoints": [
                _ep(9000, "a", healthy=False, connect_failures=3, cx_active=1),
                _ep(9000, "b", healthy=False, connect_failures=3, cx_active=1),
            ],
        }
    ]
    merged = merge_clusters([(0, worker), (1, other)])
    assert merged is not None
    [svc] = merged
    assert [ep["labels"] for ep in svc["endpoints"]] == [{"version": "a"}, {"version": "b"}]
    for ep in svc["endpoints"]:
        assert (ep["connect_failures"], ep["cx_active"], ep["ejected_in"]) == (5, 2, [1]), ep
        assert [w["worker"] for w in ep["workers"]] == [0, 1]
    # one worker alone: its own figures, as --single-process shows them
    [alone] = merge_clusters([(0, worker)]) or []
    assert [ep["connect_failures"] for ep in alone["endpoints"]] == [2, 2]


def test_clusters_merge_names_a_malformed_answer_and_keeps_unknown_fields() -> None:
    """An answer not shaped as a worker's (a bug, a version skew) counts as
    none: named in unanswered_workers, the others merged, never an error; a
    field the merge does not know is carried as the first worker says it."""
    good = [{"service": "svc", "endpoints": [_ep(9000, "a", healthy=True, new_field=7)]}]
    for bad in (
        {"service": "svc"},
        [{"service": "svc"}],
        [{"service": "svc", "endpoints": [{}]}],
        [None],
    ):
        merged = merge_clusters([(0, good), (1, bad), (2, None)])
        assert merged is not None
        [svc] = merged
        assert svc["unanswered_workers"] == [1, 2]
        [ep] = svc["endpoints"]
        assert ep["new_field"] == 7 and ep["healthy"] is True
    assert merge_clusters([(0, {"nonsense": 1}), (1, None)]) is None


def test_config_dump_asks_the_other_workers_at_once_when_the_first_is_busy() -> None:
    """/config_dump is the first worker's answer; when that one is busy past
    the timeout, the others are asked at once (not in turn, one timeout
    each: N hung workers were N waits): worker 2 is asked before the wait on
    worker 1, also busy, is over, and its answer is the one given."""
    sup = Supervisor(argparse.Namespace(), [[], [], []])
    sup.SHARED_ASK_TIMEOUT_S = 0.05
    s0, s1, s2 = sup.slots
    s0.proc, s0.link = _Proc(100), _HeldLink()  # type: ignore[assignment]
    s1.proc, s1.link = _Proc(101), _HeldLink()  # type: ignore[assignment]
    s2.proc, s2.link = _Proc(102), _Link({"generation": 7})  # type: ignore[assignment]
    events: list[tuple[str, int]] = []
    ask_shared = sup._ask_shared

    async def logged(slot: WorkerSlot, op: str) -> Any:
        events.append(("asked", slot.index))
        try:
            return await ask_shared(slot, op)
        finally:
            events.append(("over", slot.index))

    sup._ask_shared = logged  # type: ignore[method-assign]
    assert asyncio.run(sup.config_dump()) == {"generation": 7}
    assert events.index(("asked", 2)) < events.index(("over", 1)), events
    assert events[:2] == [("asked", 0), ("over", 0)]
