"""The supervisor: holds the listeners, runs the workers, restarts a dead one.

Theory of operation
-------------------
``l4proxy run`` starts as the supervisor. It binds every listening socket
(one set per worker, with ``SO_REUSEPORT`` when there are several, so the
kernel spreads connections across workers), binds the admin endpoint, drops
privileges, and then starts each worker as a fresh interpreter
(``python -m l4proxy run ... --worker-fds``) that inherits its listening
sockets and one end of a control socketpair. A fresh process rather than a
fork: the worker starts with no inherited event loop, threads or signal
state.

The supervisor never closes a worker's listening sockets. If a worker dies
(a crash, an abort in a C library, the OOM killer), the kernel keeps
completing handshakes into the same accept queue, and the replacement worker
accepts them: connections that were in flight in the dead worker are lost,
new ones are only delayed. A worker sent a SIGTERM alone (not a stop of
the supervisor's: someone recycling it) hands its listeners over: it says
so on its control channel (its answer to ``leaving``, asked as it starts;
the supervisor says ``stopping`` to each worker before its own stop's
SIGTERM, so the two are told apart: run._Leaving), the slot's next worker
starts at once, and once that one answers (it accepts from then on, from
the same sockets) the old one is told ``handover``: it stops accepting
and closes its copies without ending their listening (Worker.hand_over),
drains its connections and exits (_wait_worker, _see_out). The slot has
two workers meanwhile: a stop drains both, /ready and /state take the
old one's answer for its slot until it hands over, /stats counts it
until it exits, with the final counts it gives as it exits (its answer
to ``final``: _take_final); a successor that does not start is restarted with the
slot's back-off, the old one serving its slot until one answers.
Before, its drain retired its listeners for every copy
(worker._stop_listening) and each client of the slot was refused until
it exited. One that drained so all the same (its control channel gone)
left them retired: the next one is given them listening again
(listener.listen_again). Restarts back off (0.1 s doubling to 5 s)
while a worker keeps dying within 10 s of its start. Each slot has one keeper task
that spawns, waits and respawns; it cannot die: any exit status (realtime
signals included) and any failure to spawn (EMFILE, ENOMEM) is logged and
retried with the same back-off, so a slot is never left empty for good.

A worker that stops answering its control socket for ``--watchdog-timeout``
seconds (hung, not dead) is killed, and so restarted; so is one that
answers while its per-request relay's thread has gone that long without a
turn (stuck: an endless loop, a deadlock; its answer to the watchdog's
``alive`` says so: the relays' "Liveness"), which serves nothing and, in the
compiled relay, never reads the SIGTERM it alone hears. The watchdog too
logs whatever one check raises and goes on. A worker that writes a malformed
frame on its control socket is replaced at once (channel explains why).

The admin endpoint lives in the supervisor and asks the workers over their
control sockets (framed requests with ids: see channel), summing counters
across workers; /clusters merges every worker's view of each endpoint (its
counts summed, ejected where any worker ejects it: merge_clusters). What it
tells them (/logging's levels, /healthcheck/fail's flag) is kept here too,
for each worker started later.
A worker answers its heavy requests (stats, config_dump, clusters) in
turn, in a lane apart from ready, state and the rest (channel), so
concurrent admin requests share what is asked of it: one /stats round at a
time, and at most one /config_dump and one /clusters request in flight to
each worker, even past the admin's timeout (a late answer is still built
and sent, and a queue of them grew without bound). A worker sends its
counters compact, and they are summed compact (stats: a histogram series
is one vector, never a row per bucket). SIGTERM and SIGHUP are forwarded
to every worker (SIGHUP and SIGUSR1 to one draining on a SIGTERM of its
own too); the supervisor exits when all workers have drained. It
keeps its copies of a slot's listeners until the slot's worker exits (a
worker's drain ends the listening of each listener it retires, for every
copy: worker._stop_listening), so that a slot whose worker is dead at the
stop (its restart waiting out the back-off), or dies during its drain
(a crash, a kill), while one of its listeners still listens, gets one more
worker at once, which drains those listeners: the supervisor's copy of
them is the last one then, and its close would reset every connection in
their accept queues (run, _keep, _drains_anew).
Workers are started with SIGHUP and SIGTERM (and SIGINT) blocked, so a
reload forwarded to one still starting waits for its handler instead of
killing it, and a stop makes it drain once started (signals).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from l4proxy.dataplane.listener import Listener, listen_again
from l4proxy.sidecar import watchdog
from l4proxy.sidecar._stats_wire import decode_sample, in_slices
from l4proxy.sidecar.access_log_file import REOPEN_FAILURES, reopen_access_log, reopen_failures
from l4proxy.sidecar.admin import DRAINING, LIVE, least_state
from l4proxy.sidecar.channel import SupervisorEnd
from l4proxy.sidecar.lean import worker_env
from l4proxy.sidecar.loglevels import apply_log_levels, merge_log_spec
from l4proxy.sidecar.signals import (
    HeldSignals,
    done_with_signals,
    say_ignored,
    start_signals_blocked,
)
from l4proxy.stats import (
    DIGEST,
    DIGEST_DISAGREE,
    START_TIME,
    START_TIME_HELP,
    Exposition,
    Sample,
    process_start_time,
)

log = logging.getLogger("l4proxy.supervisor")

MIN_GAUGES = ("l4proxy_rules_generation", "l4proxy_rules_valid")
# per-worker states that are the same files' (each worker loads them): the most
MAX_GAUGES = ("l4proxy_rules_warnings",)
# the supervisor's own family: each worker's l4proxy_connections_total, by worker
WORKER_CONNECTIONS = "l4proxy_worker_connections_total"


@dataclass
class Leaving:
    """A worker that drains on a SIGTERM of its own (sent to it alone, not
    a stop: Supervisor._wait_worker), its slot's next worker started at
    once: until it exits (Supervisor._see_out). Its last counts (/stats)
    are its own, added to its slot's base at its exit: those it gives as
    it exits (its answer to ``final``, asked with its word taken), else
    its last scrape's (killed, or dead: what it counted since is lost)."""

    proc: asyncio.subprocess.Process
    link: SupervisorEnd
    since: float  # (loop time) its word came
    last: Sample = field(default_factory=Sample)
    handed_over: bool = False  # told that its successor accepts
    task: asyncio.Task[None] | None = None
    final: asyncio.Future[Any] | None = None  # its answer to ``final`` (run._Leaving.finish)


@dataclass
class WorkerSlot:
    index: int
    listeners: list[Listener]
    proc: asyncio.subprocess.Process | None = None
    link: SupervisorEnd | None = None
    # the worker's answer to "leaving", asked as it starts: True at its SIGTERM
    notice: asyncio.Future[Any] | None = None
    leaving: list[Leaving] = field(default_factory=list)  # (Supervisor._see_out's)
    started_at: float = 0.0
    answered: bool = False  # since it started: it is past its start-up
    restarts: int = 0
    backoff: float = 0.1
    keeper: asyncio.Task[None] | None = None  # (Supervisor._keep's)
    # /stats sums counters over workers, and a sum that went down would read
    # as a reset to Prometheus' rate() and to l4proxy canary (the whole
    # history counted again): a worker that does not answer (busy,
    # restarting) counts with its last answer, and a dead one's last counts
    # stay in the slot's base.
    # (The worker's unlabelled totals, l4proxy_bytes_upstream_total and the
    # like, come among its "gauges" and are kept the same way; its labelled
    # gauges, the DNS ones, are the state of a process: a dead one's are
    # dropped, never added to the base.) Both are compact (stats.Sample: a
    # histogram series is one vector, not a row per bucket).
    counted_pid: int | None = None
    last: Sample = field(default_factory=Sample)
    base: Sample = field(default_factory=Sample)
    # the stop's: its worker's answer to ``final`` (Supervisor._stop_one),
    # its counts as it exits, and the process they were taken for: a stats
    # answer of that process that comes after them is older (count)
    final: asyncio.Future[Any] | None = None
    final_pid: int | None = None

    def count(
        self,
        answer: Sample | None,
        pid: int | None,
        is_gauge: Callable[[str], bool] = lambda name: False,
    ) -> None:
        """Take *answer* (None: the worker did not answer) as the counts of
        process *pid* (the one that was asked: the slot may have a new one
        since); the last counts of the process before it go to the base."""
        if answer is None or (pid is not None and pid == self.final_pid):
            return
        if self.counted_pid is not None and self.counted_pid != pid:
            self.base.add(self.last.without(is_gauge))
        self.counted_pid = pid
        self.last = answer


# /clusters: what each worker counts on its own, summed over the workers
CLUSTER_SUMS = (
    "connect_failures",
    "response_failures",
    "status_failures",
    "successes",
    "ejections",
    "ejections_suppressed",
    "rq_active",
    "cx_idle",
    "cx_active",
    "rq_pending",
    "rq_pending_overflow",
    "cx_overflow",
)
_ENDPOINT_KEYS = ("address", "port", "labels")


def merge_clusters(answers: list[tuple[int, Any]]) -> list[dict[str, Any]] | None:
    """The workers' /clusters answers (worker index, answer or None) as one.

    Each worker keeps its own outlier detection and its own connections, so
    an endpoint's counts (CLUSTER_SUMS) are summed over the workers that
    answered. It is healthy only where every worker holds it healthy:
    ``ejected_in`` lists the workers that eject it, ``ejected_for_s`` and
    ``consecutive_failures`` are the most of any worker, ``last_error`` the
    lowest-numbered worker's that has one, and ``workers`` holds each
    worker's own view (its ``worker`` index, and what it reported). Every
    cluster names the workers that did not answer (``unanswered_workers``).
    Clusters and endpoints come in the first answer's order; those only some
    workers know (one not yet reloaded) follow, from those workers only. A
    cluster's ``dns`` is the first answer's (each worker resolves the same
    names). None when no worker answered.
    """
    # an answer not of the shape a worker sends (a bug, a version skew) is
    # counted as none: the endpoint answers the others', never an error
    unanswered = [i for i, a in answers if not _clusters_shaped(a)]
    got = [(i, a) for i, a in answers if _clusters_shaped(a)]
    if not got:
        return None
    clusters: dict[str, dict[str, Any]] = {}
    # per cluster, per endpoint (its labels too: one address:port may be two
    # endpoints of a service, told apart by their labels): each worker's view
    views: dict[str, dict[tuple[Any, Any, str], list[tuple[int, dict[str, Any]]]]] = {}
    for index, answer in got:
        for c in answer:
            service = c["service"]
            if service not in clusters:
                clusters[service] = {k: v for k, v in c.items() if k != "endpoints"}
                views[service] = {}
            elif "dns" in c and "dns" not in clusters[service]:
                clusters[service]["dns"] = c["dns"]
            for ep in c["endpoints"]:
                key = (ep["address"], ep["port"], json.dumps(ep.get("labels"), sort_keys=True))
                views[service].setdefault(key, []).append((index, ep))
    out = []
    for service, cluster in clusters.items():
        eps = [_merge_endpoint(per_worker) for per_worker in views[service].values()]
        out.append({**cluster, "endpoints": eps, "unanswered_workers": unanswered})
    return out


def _clusters_shaped(answer: Any) -> bool:
    """A list of clusters, each a dict with its service and a list of
    endpoints, each a dict with its address and port."""
    return isinstance(answer, list) and all(
        isinstance(c, dict)
        and "service" in c
        and isinstance(c.get("endpoints"), list)
        and all(isinstance(ep, dict) and "address" in ep and "port" in ep for ep in c["endpoints"])
        for c in answer
    )


def _merge_endpoint(per_worker: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    first = per_worker[0][1]
    # what this merge does not know (a field added later) as the first
    # worker says it, then what it does
    merged: dict[str, Any] = dict(first)
    ejected_in = [i for i, ep in per_worker if not ep.get("healthy", True)]
    merged["healthy"] = not ejected_in
    merged["ejected_for_s"] = max(ep.get("ejected_for_s", 0.0) for _, ep in per_worker)
    merged["consecutive_failures"] = max(ep.get("consecutive_failures", 0) for _, ep in per_worker)
    for key in CLUSTER_SUMS:
        if any(key in ep for _, ep in per_worker):
            merged[key] = sum(ep.get(key, 0) for _, ep in per_worker)
    merged["last_error"] = next(
        (ep["last_error"] for _, ep in per_worker if ep.get("last_error")), None
    )
    merged["ejected_in"] = ejected_in
    merged["workers"] = [
        {"worker": i, **{k: v for k, v in ep.items() if k not in _ENDPOINT_KEYS}}
        for i, ep in per_worker
    ]
    return merged


def describe_exit(code: int) -> str:
    """'status 3', 'signal 9 (SIGKILL)', 'signal 40 (SIGRTMIN+6)' for a returncode."""
    if code >= 0:
        return f"status {code}"
    n = -code
    try:
        name = signal.Signals(n).name
    except ValueError:  # realtime signals have no Signals member (issue 12)
        rtmin, rtmax = signal.SIGRTMIN, signal.SIGRTMAX
        name = f"SIGRTMIN+{n - rtmin}" if rtmin <= n <= rtmax else "unknown"
    return f"signal {n} ({name})"


def _last_good_memory() -> int | None:
    """A memory file for the workers' rule files' last good versions (see
    _last_good_argv), empty: its layout and checks are
    l4proxy.rules._last_good's (the supervisor imports no rules). None
    where there is none: then each worker keeps its own, and one restarted
    while a file is broken has none to load (its first load is refused)."""
    try:
        return os.memfd_create("l4proxy-rules-last-good", os.MFD_CLOEXEC)
    except OSError as exc:
        log.warning(
            "no memory file for the rule files' last good versions (%s): a worker "
            "restarted while a rule file is broken is not ready until the file is fixed",
            exc,
        )
        return None


def _listening(sock: socket.socket) -> bool:
    """Whether *sock* (a copy of a worker's listener) still listens: not
    closed, and not retired by a worker's drain (worker._stop_listening)."""
    if sock.fileno() == -1:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def _health_check_op(failed: bool) -> str:
    """The control request that tells a worker the health-check flag."""
    return "healthcheck fail" if failed else "healthcheck ok"


class Supervisor:
    # past --drain-duration, what a worker gets to close before it is killed
    DRAIN_GRACE_S = watchdog.DRAIN_GRACE_S
    # what a /config_dump or /clusters waits for one worker's answer
    SHARED_ASK_TIMEOUT_S = 3.0

    def __init__(self, args: argparse.Namespace, listener_sets: list[list[Listener]]) -> None:
        self.args = args
        self.slots = [WorkerSlot(i, ls) for i, ls in enumerate(listener_sets)]
        self.last_good_fd = _last_good_memory() if getattr(args, "rules", None) else None
        self._stop_event = asyncio.Event()  # set with stopping: wakes a keeper's back-off
        self.stop_deadline: float | None = None  # (loop time; _stop_deadline)
        self.restarts_total = 0
        self.spawn_failures_total = 0
        self.channel_resets_total = 0
        self.late_answers_gone = 0  # counted by links since closed
        self.help_seen: dict[str, tuple[str, ...]] = {}  # workers' metric types and help
        self.labelled_seen: set[str] = set()  # and which of those families have labels
        self._keepers: list[asyncio.Task[None]] = []
        self._stats_round: asyncio.Future[Any] | None = None  # stats(): the round under way
        # config_dump and clusters: the request under way to each worker, per
        # op, and the link it went out on (_ask_shared)
        self._heavy: dict[tuple[int, str], tuple[SupervisorEnd, asyncio.Task[Any]]] = {}
        self.health_check_failed = False  # /healthcheck/fail (admin: Server state)
        # /logging's changes so far (admin.log_spec), for each worker started later
        self.log_spec = ""
        # the requests of those and of the flag to a worker as it starts
        self._log_asks: set[asyncio.Future[Any]] = set()
        # the pids of the workers that drain on a SIGTERM of their own since
        # the /stats round under way began (None: no round): their answers
        # to it are their Leaving's counts, not their slot's (_stats)
        self._left_in_round: set[int] | None = None

    @property
    def stopping(self) -> bool:
        """The stop began (SIGTERM, /quitquitquit): no worker is restarted
        any more, and a keeper waiting out a restart's back-off wakes up."""
        return self._stop_event.is_set()

    @stopping.setter
    def stopping(self, value: bool) -> None:
        if value:
            self._stop_event.set()
        else:
            self._stop_event.clear()

    # -- workers -------------------------------------------------------------
    def _worker_argv(self, slot: WorkerSlot, control_fd: int) -> list[str]:
        fds = ",".join(
            f"{lst.sock.fileno()}:{lst.mode}:{lst.address[0]}:{lst.address[1]}"
            for lst in slot.listeners
            if lst.sock.fileno() != -1  # (a stop's: _drains_anew closed it)
        )
        return [
            sys.executable,
            "-m",
            "l4proxy",
            *self.args.raw_argv,
            "--worker-fds",
            fds,
            "--control-fd",
            str(control_fd),
            "--worker-index",
            str(slot.index),
            *self._access_log_argv(),
            *self._last_good_argv(),
            *(("--health-check-failed",) if self.health_check_failed else ()),
        ]

    def _last_good_argv(self) -> list[str]:
        """The memory file where the workers keep the rule files' last good
        versions (l4proxy.rules._last_good), created once here and shared by
        every worker, so that one restarted while a file is broken serves
        that file's last good version as the others do."""
        fd = self.last_good_fd
        return ["--rules-last-good-fd", str(fd)] if fd is not None else []

    def _access_log_argv(self) -> list[str]:
        """--access-log's fd, opened once here (before privileges dropped),
        shared by every worker: their lines are whole writes to one file
        description (a pipe's, or a file's opened O_APPEND)."""
        fd = getattr(self.args, "access_log_fd", -1)
        return ["--access-log-fd", str(fd)] if fd >= 0 else []

    async def spawn(self, slot: WorkerSlot) -> asyncio.subprocess.Process:
        """Start slot's worker; raises what fork/exec raise (EMFILE, ENOMEM, EAGAIN)."""
        if not self.stopping:
            # (a worker that drained on a SIGTERM of its own retired them:
            # listen_again; during a stop they are as the last one left them)
            for lst in slot.listeners:
                listen_again(lst)
        parent, child = socket.socketpair()
        try:
            told_failed = self.health_check_failed  # (what its argv says)
            argv = self._worker_argv(slot, child.fileno())
            pass_fds = [lst.sock.fileno() for lst in slot.listeners if lst.sock.fileno() != -1]
            pass_fds.append(child.fileno())
            if getattr(self.args, "access_log_fd", -1) >= 0:
                pass_fds.append(self.args.access_log_fd)
            if self.last_good_fd is not None:
                pass_fds.append(self.last_good_fd)
            # SIGHUP and SIGTERM blocked across the fork: the worker starts
            # with them pending rather than fatal until its handlers exist
            # (signals).
            with start_signals_blocked():
                proc = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=pass_fds, env=worker_env(os.environ)
                )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        slot.proc = proc
        slot.started_at = time.monotonic()
        slot.answered = False
        link = SupervisorEnd(parent, lambda why: self._channel_broken(slot, proc, why))
        try:
            await link.open()
        except BaseException:
            link.close()
            proc.kill()
            raise
        slot.link = link
        slot.final = None
        slot.notice = link.tell("leaving")  # (answered at its SIGTERM: _wait_worker)
        if self.log_spec:  # (no await since slot.link: a /logging now asks this link too)
            ask = asyncio.ensure_future(link.ask(f"logging {self.log_spec}", None))
            self._log_asks.add(ask)
            ask.add_done_callback(self._log_asks.discard)
        if self.health_check_failed != told_failed:  # (changed since its argv was made)
            ask = asyncio.ensure_future(link.ask(_health_check_op(self.health_check_failed), None))
            self._log_asks.add(ask)
            ask.add_done_callback(self._log_asks.discard)
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        return proc

    def _channel_broken(self, slot: WorkerSlot, proc: asyncio.subprocess.Process, why: str) -> None:
        """The worker wrote something that is not a frame: replace it (channel)."""
        self.channel_resets_total += 1
        if proc.returncode is None:
            log.error(
                "worker %d (pid %d) broke the control channel (%s); replacing it",
                slot.index,
                proc.pid,
                why,
            )
            proc.kill()

    async def _keep(self, slot: WorkerSlot) -> None:
        """Keep a worker running in *slot* until the supervisor stops.

        Cannot die: whatever one round raises (a spawn that fails with EMFILE
        or ENOMEM, an exit status nobody foresaw) is logged, and the next round
        starts after the back-off. A keeper that died would leave its slot
        empty for good, and /ready 503 (issue 12).

        A stop that comes while the slot has no worker (dead, its restart
        waiting out the back-off) starts one at once, to drain: the
        supervisor's copy of its listeners is then the last one, and closing
        it would reset what their accept queues hold (see :meth:`run`). So
        does a worker's death during the stop while one of its listeners
        still listens (:meth:`_drains_anew`), as often as that happens
        before the stop's deadline: the first at once, each after it after
        the slot's back-off (one that cannot start is not started again and
        again until the deadline).
        """
        slot.keeper = asyncio.current_task()
        first = True
        to_drain = False  # the stop came while the slot had no worker
        while not self.stopping or to_drain:
            try:
                if to_drain and not self._drains_anew(slot):
                    self._let_go(slot)  # (none listens, or the stop's deadline passed)
                    return
                try:
                    proc = await self.spawn(slot)
                except Exception as exc:
                    self.spawn_failures_total += 1
                    if to_drain:
                        log.error(
                            "cannot start worker %d to drain its listeners: %s; what their "
                            "queues hold is reset",
                            slot.index,
                            exc,
                        )
                        return
                    slot.backoff = min(slot.backoff * 2, 5.0)
                    log.error(
                        "cannot start worker %d: %s; retrying in %.1fs",
                        slot.index,
                        exc,
                        slot.backoff,
                    )
                    to_drain = await self._back_off(slot.backoff)
                    continue
                if not first:
                    slot.restarts += 1
                    self.restarts_total += 1
                first = False
                if self.stopping and proc.returncode is None:
                    # started while the stop began: drain it too
                    self._stop_one(proc, slot.link, slot)
                    if to_drain:
                        log.info(
                            "worker %d started to drain its listeners (pid %d)",
                            slot.index,
                            proc.pid,
                        )
                code = await self._wait_worker(slot, proc)
                if code is None:  # its own SIGTERM: its successor starts (_see_out)
                    # after the slot's back-off where it left within 10 s of
                    # its start, as a restart: something that SIGTERMs each
                    # worker as it starts had its successors started at once
                    if time.monotonic() - slot.started_at < 10:
                        slot.backoff = min(slot.backoff * 2, 5.0)
                        log.warning(
                            "worker %d (pid %d) left %.1fs after its start: its successor "
                            "starts in %.1fs (the slot's back-off)",
                            slot.index,
                            proc.pid,
                            time.monotonic() - slot.started_at,
                            slot.backoff,
                        )
                        to_drain = await self._back_off(slot.backoff)
                        if to_drain and self._serving(slot) is not None:
                            return  # (the stop came meanwhile: that one drains them)
                    else:
                        slot.backoff = 0.1
                    continue
                if self.stopping and slot.final is not None:
                    await self._take_slot_final(slot, proc.pid)
                if slot.link is not None:
                    slot.link.close()
                    self.late_answers_gone += slot.link.stale
                    slot.link = None
                if self.stopping:
                    if code != 0 and self._drains_anew(slot):
                        # Dead during the stop (as it began, or in its drain),
                        # a listener of its still listening: our copy is the
                        # last one, its queue served by one more worker; at
                        # once the first time, after the back-off where one
                        # started to drain died too (one that cannot start
                        # was started again and again until the deadline).
                        delay = 0.0
                        if to_drain:
                            slot.backoff = min(slot.backoff * 2, 5.0)
                            delay = slot.backoff
                        log.error(
                            "worker %d (pid %d) died with %s while draining: its "
                            "connections were cut; starting one to drain its listeners%s",
                            slot.index,
                            proc.pid,
                            describe_exit(code),
                            f" in {delay:.1f}s" if delay else "",
                        )
                        to_drain = True
                        await self._pause_in_stop(delay)
                        continue
                    self._let_go(slot)
                    if code != 0 and not self._stop_deadline_passed():  # (past it: killed, said)
                        log.error(
                            "worker %d (pid %d) died with %s while draining: its "
                            "connections were cut",
                            slot.index,
                            proc.pid,
                            describe_exit(code),
                        )
                    return
                if time.monotonic() - slot.started_at < 10:
                    slot.backoff = min(slot.backoff * 2, 5.0)
                else:
                    slot.backoff = 0.1
                if code == 0:
                    # a clean exit outside a stop is a drain of its own
                    # that did not hand over (_wait_worker: its word never
                    # came, its control channel gone): nothing failed
                    log.warning(
                        "worker %d (pid %d) stopped on its own (status 0: it drained, "
                        "a SIGTERM to it alone?); starting another",
                        slot.index,
                        proc.pid,
                    )
                else:
                    log.error(
                        "worker %d (pid %d) died with %s; restarting",
                        slot.index,
                        proc.pid,
                        describe_exit(code),
                    )
                to_drain = await self._back_off(slot.backoff)
            except Exception:
                log.exception("worker %d: unexpected error in its keeper; going on", slot.index)
                if to_drain:
                    return
                slot.backoff = min(slot.backoff * 2, 5.0)
                to_drain = await self._back_off(slot.backoff)

    async def _wait_worker(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> int | None:
        """*proc*'s exit status; None where it said that it drains on a
        SIGTERM of its own (its answer to ``leaving``: run._Leaving) while
        the supervisor does not stop: moved to the slot's ``leaving``, it
        serves on until its successor, started now, accepts (_see_out)."""
        exited = asyncio.ensure_future(proc.wait())
        notice, link = slot.notice, slot.link
        if notice is not None and link is not None and not self.stopping:
            await asyncio.wait({exited, notice}, return_when=asyncio.FIRST_COMPLETED)
            own = not notice.cancelled() and notice.done() and notice.result() is True
            if own and not exited.done() and not self.stopping and slot.link is link:
                leaving = Leaving(proc, link, asyncio.get_running_loop().time(), slot.last)
                slot.last, slot.counted_pid = Sample(), None  # (its counts: the Leaving's)
                slot.proc, slot.link, slot.notice = None, None, None
                slot.leaving.append(leaving)
                if self._left_in_round is not None:
                    self._left_in_round.add(proc.pid)
                leaving.task = asyncio.get_running_loop().create_task(
                    self._see_out(slot, leaving, exited)
                )
                # its answers keep their clients until its hand-over
                # (run._Leaving.serving), where each said close from its SIGTERM on
                self._told(link.tell("serving"))
                # and its final counts, answered as it exits (_take_final)
                leaving.final = link.tell("final")
                log.warning(
                    "worker %d (pid %d) drains on a SIGTERM of its own (sent to it alone, not "
                    "a stop): starting the next worker of its slot now; it serves until that "
                    "one accepts, then hands its listeners over",
                    slot.index,
                    proc.pid,
                )
                return None
        return await exited

    async def _see_out(
        self, slot: WorkerSlot, leaving: Leaving, exited: asyncio.Future[int]
    ) -> None:
        """A worker that drains on its own SIGTERM (_wait_worker): told
        ``handover`` once its slot's next worker answers (it accepts from
        before it answers), then waited for: killed past its own drain's
        bound (its wait for the hand-over and its drain, --drain-duration
        each, and DRAIN_GRACE_S), or the stop's deadline, as any worker."""
        loop = asyncio.get_running_loop()
        stop = asyncio.ensure_future(self._stop_event.wait())
        code: int | None = None
        on_stop = False
        try:
            await self._hand_over(slot, leaving, exited, stop)
            # (its drain's bound, from the hand-over: it serves until then)
            bound = loop.time() + self.args.drain_duration + self.DRAIN_GRACE_S
            while not exited.done():
                deadline = bound if not self.stopping else min(bound, self._stop_deadline())
                waits: set[asyncio.Future[Any]] = {exited} if stop.done() else {exited, stop}
                await asyncio.wait(
                    waits,
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not exited.done() and loop.time() >= deadline:
                    log.warning(
                        "worker %d (pid %d) still draining at its deadline: killed",
                        slot.index,
                        leaving.proc.pid,
                    )
                    leaving.proc.kill()
                    await exited
            code = exited.result()
            await self._take_final(slot, leaving)
            # (a stop before its hand-over: it drained as at a stop, told so)
            on_stop = stop.done() and not leaving.handed_over
        finally:
            stop.cancel()
            leaving.link.close()
            self.late_answers_gone += leaving.link.stale
            slot.base.add(leaving.last.without(self._is_gauge))
            slot.leaving.remove(leaving)
        why = "on the supervisor's stop, before its hand-over" if on_stop else "on its own SIGTERM"
        if code == 0:
            log.info(
                "worker %d (pid %d) drained %s and exited (status 0)",
                slot.index,
                leaving.proc.pid,
                why,
            )
        else:
            log.error(
                "worker %d (pid %d) died with %s while draining %s",
                slot.index,
                leaving.proc.pid,
                describe_exit(code),
                why,
            )

    # what an exited worker's final counts, written before its exit, are
    # waited for (its channel's end, read at once, answers None first)
    FINAL_WAIT_S = 2.0

    async def _take_final(self, slot: WorkerSlot, leaving: Leaving) -> None:
        """*leaving*, exited, gave its final counts (its answer to
        ``final``, written before it exits: run._Leaving.finish): they are
        its last, which its exit adds to its slot's base (_see_out), in
        place of its last scrape's. Those are what it counted up to the
        last /stats round that asked it, and what it counted after (the
        requests it finished in its drain) was lost: l4proxy canary, which
        promotes or rolls back from these counts, missed a recycled
        worker's last requests. A scrape's answer that comes after it is
        no matter: the Leaving is gone from its slot by then. Killed
        (its deadline, the watchdog) or dead, it gave none: its last
        scrape's stand."""
        final = await self._final_counts(slot, leaving.final)
        if final is not None:
            leaving.last = final

    async def _take_slot_final(self, slot: WorkerSlot, pid: int) -> None:
        """*slot*'s worker, process *pid*, exited in the stop: its final
        counts (its answer to ``final``, asked with the stop's
        ``stopping``: _stop_one) are its last (count), in place of its
        last scrape's, for the /stats scraped in the rest of the stop
        (the other workers still draining): what it served after its last
        scrape (its last requests, its drain's) was missing there, as a
        leaving worker's was (_take_final). None answered (killed, dead):
        its last scrape's stand."""
        final = await self._final_counts(slot, slot.final)
        slot.final = None
        if final is not None:
            slot.count(final, pid, self._is_gauge)
            slot.final_pid = pid

    async def _final_counts(
        self, slot: WorkerSlot, final: asyncio.Future[Any] | None
    ) -> Sample | None:
        """The counts a worker answered to ``final`` (*final*, its exit
        awaited), FINAL_WAIT_S at most; None: none, or not of the form."""
        if final is None:
            return None
        try:
            answer = await asyncio.wait_for(asyncio.shield(final), self.FINAL_WAIT_S)
        except TimeoutError:
            return None
        if answer is None:
            return None
        decoded = await self._decode_stats(slot, answer, {})
        if decoded is None:
            return None
        self.help_seen.update(decoded[2])
        self.labelled_seen.update(decoded[3])
        return decoded[0]

    async def _hand_over(
        self,
        slot: WorkerSlot,
        leaving: Leaving,
        exited: asyncio.Future[int],
        stop: asyncio.Future[Any],
    ) -> None:
        """Tell *leaving* ``handover`` once its slot's next worker answers
        (run._serve starts accepting before it serves its channel): it then
        lets go of its copies of the listeners without ending their
        listening (Worker.hand_over). Not once it exited or the stop came
        (told ``stopping``: it drains as any). Until then it serves its
        slot, however long its successor takes (one that does not start is
        restarted after the slot's back-off, _keep): said once past
        --drain-duration, where it handed over to nobody then and the slot
        served nothing until a successor started."""
        loop = asyncio.get_running_loop()
        until = leaving.since + self.args.drain_duration
        said = False
        older = self._serving(slot)
        if older is not None and older is not leaving and not exited.done() and not stop.done():
            # A successor that leaves while the worker before it still
            # serves the slot (its own SIGTERM, before it answered): it
            # hands over at once, that one serving on, so that workers
            # SIGTERMed as they start add none that waits for the next.
            self._tell_handover(slot, leaving, older.proc.pid)
            return
        while not exited.done() and not stop.done():
            if not said and loop.time() >= until:
                said = True
                log.warning(
                    "worker %d (pid %d): its successor has not started (no answer within "
                    "%.1fs: --drain-duration); it keeps serving until one does",
                    slot.index,
                    leaving.proc.pid,
                    self.args.drain_duration,
                )
            link = slot.link
            if link is None or link.closed:  # (its successor not started yet)
                await asyncio.wait({exited, stop}, timeout=0.05)
                continue
            answered = asyncio.ensure_future(self._ask_link(slot, link, "alive", None))
            await asyncio.wait(
                {exited, stop, answered},
                timeout=max(0.05, until - loop.time()) if not said else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not answered.done():
                answered.cancel()
                continue
            if answered.result() is None or stop.done() or exited.done():
                # (its successor died before it answered: the next one)
                await asyncio.wait({exited, stop}, timeout=0.05)
                continue
            self._tell_handover(slot, leaving, slot.proc.pid if slot.proc is not None else 0)
            return

    def _serving(self, slot: WorkerSlot) -> Leaving | None:
        """The oldest of *slot*'s workers that drain on a SIGTERM of their
        own and still serve it (not handed over, not exited)."""
        for leaving in slot.leaving:
            if not leaving.handed_over and leaving.proc.returncode is None:
                return leaving
        return None

    def _tell_handover(self, slot: WorkerSlot, leaving: Leaving, successor: int) -> None:
        leaving.handed_over = True
        self._told(leaving.link.tell("handover"))
        log.info(
            "worker %d (pid %d) accepts: pid %d hands its listeners over to it and drains",
            slot.index,
            successor,
            leaving.proc.pid,
        )

    def _told(self, fut: asyncio.Future[Any]) -> None:
        """Keep a request told (SupervisorEnd.tell) until it is answered."""
        self._log_asks.add(fut)
        fut.add_done_callback(self._log_asks.discard)

    def _is_gauge(self, name: str) -> bool:
        return self.help_seen.get(name, ("counter",))[0] == "gauge"

    def _stop_one(
        self,
        proc: asyncio.subprocess.Process | None,
        link: SupervisorEnd | None,
        slot: WorkerSlot | None = None,
    ) -> None:
        """The stop's SIGTERM to *proc*, told ``stopping`` first on its
        channel (run._Leaving: not a SIGTERM of its own); *slot*'s worker
        (not one draining on its own SIGTERM, asked already) is asked for
        its final counts too (_take_slot_final)."""
        if proc is None or proc.returncode is not None:
            return
        if link is not None:
            self._told(link.tell("stopping"))
            if slot is not None and slot.link is link and slot.final is None:
                slot.final = link.tell("final")
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _drains_anew(self, slot: WorkerSlot) -> bool:
        """Whether a worker of *slot* that exited during the stop leaves
        listeners to another, to drain: one of the supervisor's copies
        still listens (the worker's drain had not retired it:
        worker._stop_listening ends the listening for every copy), and the
        stop's deadline has not passed. The copies that listen no more
        are closed (the next worker is given the others)."""
        if self.stop_deadline is None or self._stop_deadline_passed():
            return False
        for lst in slot.listeners:
            if not _listening(lst.sock):
                lst.sock.close()
        return any(lst.sock.fileno() != -1 for lst in slot.listeners)

    async def _pause_in_stop(self, delay: float) -> None:
        """Sleep *delay* s, the stop's deadline at the latest."""
        if delay > 0:
            left = self._stop_deadline() - asyncio.get_running_loop().time()
            await asyncio.sleep(max(0.0, min(delay, left)))

    def _stop_deadline_passed(self) -> bool:
        deadline = self.stop_deadline
        return deadline is not None and asyncio.get_running_loop().time() >= deadline

    async def _back_off(self, delay: float) -> bool:
        """Sleep *delay* s, or less if the stop comes meanwhile: whether it did."""
        if not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
        return self.stopping

    def _let_go(self, slot: WorkerSlot) -> None:
        """Close the supervisor's copies of *slot*'s listening sockets (once
        stopping; again: nothing)."""
        for lst in slot.listeners:
            lst.sock.close()

    async def ask(self, slot: WorkerSlot, op: str, timeout: float = 3.0) -> Any:
        """One request to a worker; None if it cannot answer in time (channel)."""
        return await self._ask_link(slot, slot.link, op, timeout)

    async def _ask_link(
        self, slot: WorkerSlot, link: SupervisorEnd | None, op: str, timeout: float | None = 3.0
    ) -> Any:
        """*timeout* None: until the answer comes or the link closes."""
        if link is None:
            return None
        answer = await link.ask(op, timeout)
        if answer is not None and slot.link is link:
            slot.answered = True
        return answer

    # -- the admin's view, summed over workers ------------------------------
    async def gather(self, op: str) -> list[Any]:
        answers = await asyncio.gather(*(self.ask(s, op) for s in self.slots))
        return [a for a in answers if a is not None]

    async def ready(self) -> bool:
        if self.stopping:
            return False
        answers = await asyncio.gather(
            *(self._ask_slot(s, "ready", lambda a: a is True) for s in self.slots)
        )
        return all(answers)

    async def state(self) -> str:
        """The server state (admin: Server state): DRAINING once stopping,
        else the workers' as one (least_state)."""
        if self.stopping:
            return DRAINING
        return least_state(
            await asyncio.gather(
                *(self._ask_slot(s, "state", lambda a: a == LIVE) for s in self.slots)
            )
        )

    async def _ask_slot(self, slot: WorkerSlot, op: str, good: Callable[[Any], bool]) -> Any:
        """*op* (``ready``, ``state``) asked of *slot*'s worker, and of
        one that drains on its own SIGTERM and serves the slot until it
        hands over (_see_out: its successor starting, not answering yet):
        the first *good* answer, else the slot's worker's. Before, the
        slot was unready until its successor answered."""
        serving = [lv.link for lv in slot.leaving if not lv.handed_over]
        if not serving:
            return await self.ask(slot, op)
        current = asyncio.ensure_future(self.ask(slot, op))
        asks = {current, *(asyncio.ensure_future(self._ask_link(slot, ln, op)) for ln in serving)}
        try:
            for answered in asyncio.as_completed(asks):
                answer = await answered
                if good(answer):
                    return answer
        finally:
            for ask in asks:
                ask.cancel()
        return current.result()

    async def fail_health_check(self, failed: bool) -> None:
        """/healthcheck/fail (*failed*) and /healthcheck/ok: the flag, and
        each worker told (Worker.fail_health_check: its gateway listeners'
        answers say close while it is set), waited for up to 3 s each. A
        worker that does not answer in time still reads it in turn; one
        started later gets the flag on its command line, before it
        accepts, and the change where one came while it started."""
        self.health_check_failed = failed
        op = _health_check_op(failed)
        await asyncio.gather(*(self.ask(s, op) for s in self.slots))

    async def logging(self, spec: str) -> list[tuple[str, dict[str, str] | None]]:
        """/logging: *spec*'s levels set here and in every worker (none: only
        listed), and each process's levels then; a worker that does not
        answer in time gets them when it can, and one started later at its
        start (self.log_spec)."""
        levels = apply_log_levels(spec)
        self.log_spec = merge_log_spec(self.log_spec, spec)
        op = f"logging {spec}" if spec else "logging"
        answers = await asyncio.gather(*(self.ask(s, op) for s in self.slots))
        views: list[tuple[str, dict[str, str] | None]] = [("supervisor", levels)]
        for slot, answer in zip(self.slots, answers, strict=True):
            views.append((f"worker {slot.index}", answer if isinstance(answer, dict) else None))
        return views

    async def stats(self) -> Exposition:
        """The workers' /stats, summed. One round at a time, shared by every
        scrape that comes meanwhile: a worker answers its heavy control
        requests in turn, and a request the supervisor gave up on (3 s) is
        still answered, so a scrape per admin client each round (64 clients,
        a slow /stats) queued without bound at the worker."""
        if self._stats_round is None:
            self._stats_round = asyncio.ensure_future(self._stats())
            self._stats_round.add_done_callback(self._stats_round_done)
        return await asyncio.shield(self._stats_round)

    def _stats_round_done(self, fut: asyncio.Future[Any]) -> None:
        self._stats_round = None
        if not fut.cancelled():
            fut.exception()  # retrieved: each waiter got it raised already

    async def _stats(self) -> Exposition:
        """A /stats round (:meth:`stats`), noting the workers that drain on a
        SIGTERM of their own from its start: one asked as its slot's worker
        that said so before its answer was counted (_wait_worker moved its
        counts to its Leaving) answered for its Leaving. Taken for its
        slot's, that answer came on top of its Leaving's counts, then went
        to the slot's base at its successor's first answer, and again at
        its exit: its whole history counted twice for good."""
        left: set[int] = set()
        self._left_in_round = left
        try:
            return await self._stats_summed(left)
        finally:
            self._left_in_round = None

    async def _stats_summed(self, left: set[int]) -> Exposition:
        help_: dict[str, Any] = {
            WORKER_CONNECTIONS: ("counter", "Connections accepted, by worker."),
            "l4proxy_worker_spawn_failures_total": (
                "counter",
                "Worker starts that failed (fork/exec: EMFILE, ENOMEM); retried with back-off.",
            ),
            "l4proxy_control_channel_resets_total": (
                "counter",
                "Workers replaced because their control channel carried a malformed frame.",
            ),
            "l4proxy_control_late_answers_total": (
                "counter",
                "Worker answers that came after their request timed out (dropped).",
            ),
        }
        gauges: dict[str, float] = {}
        # Each slot's process and link as one: asked through that link, an
        # answer counts for that process (a worker replaced while the round
        # waits is another process, whose first answer must not be taken for
        # the last of the one before).
        asked = [(s, s.proc.pid if s.proc is not None else None, s.link) for s in self.slots]
        pids = [pid for _, pid, _ in asked]
        # and those draining on their own SIGTERM (_see_out): their counts
        # are their own until they exit (then their slot's base)
        leaving = [(s, lv) for s in self.slots for lv in s.leaving]
        answers = await asyncio.gather(
            *(self._ask_link(slot, link, "stats") for slot, _, link in asked),
            *(self._ask_link(slot, lv.link, "stats") for slot, lv in leaving),
        )
        shared: dict[Any, Any] = {}  # label names, values and sets: once for every worker
        decoded = [
            await self._decode_stats(slot, ans, shared)
            for slot, ans in zip(
                [*self.slots, *(slot for slot, _ in leaving)], answers, strict=True
            )
        ]
        del answers, shared
        for d in decoded:
            if d is not None:
                self.help_seen.update(d[2])
                self.labelled_seen.update(d[3])
        for (_, lv), d in zip(leaving, decoded[len(self.slots) :], strict=True):
            if d is not None:
                lv.last = d[0]
        decoded, left_decoded = decoded[: len(self.slots)], decoded[len(self.slots) :]

        def is_gauge(name: str) -> bool:
            return self.help_seen.get(name, ("counter",))[0] == "gauge"

        total = Sample()
        for slot, pid, d in zip(self.slots, pids, decoded, strict=True):
            if pid is not None and pid in left:
                for lv in slot.leaving:  # (none: it exited since, its counts in the base)
                    if lv.proc.pid == pid and d is not None:
                        lv.last = d[0]
            else:
                slot.count(None if d is None else d[0], pid, is_gauge)
            connections = 0.0
            parts = (slot.base, slot.last, *(lv.last for lv in slot.leaving))
            for part in parts:
                # a per-worker state (a name's addresses): the most, not the sum
                total.add(part, most=is_gauge)
                connections += sum(part.series.get("l4proxy_connections_total", {}).values())
            if any("l4proxy_connections_total" in p.series for p in parts):
                by_worker = total.series.setdefault(WORKER_CONNECTIONS, {})
                by_worker[(("worker", str(slot.index)),)] = connections
            await asyncio.sleep(0)  # (a slot's sums are a slice: see _stats_wire.in_slices)
            if d is None:
                continue
            for k, v in d[1].items():
                if k.endswith("_total"):
                    continue  # summed with the counters above (kept across restarts)
                if k in MIN_GAUGES:
                    gauges[k] = min(gauges.get(k, v), v)
                elif k in MAX_GAUGES:
                    gauges[k] = max(gauges.get(k, v), v)
                elif k == DIGEST:  # the workers' files, when they all serve the same
                    gauges[k] = v if gauges.get(k, v) == v else DIGEST_DISAGREE
                else:
                    gauges[k] = gauges.get(k, 0) + v
        # those draining on a SIGTERM of their own: what they hold open
        # (l4proxy_active_connections: their requests in flight), where only
        # each slot's current worker's was summed; their rules (generation,
        # digest) are no longer what the pod serves
        for d in left_decoded:
            for k, v in (d[1] if d is not None else {}).items():
                if not k.endswith("_total") and k not in (*MIN_GAUGES, *MAX_GAUGES, DIGEST):
                    gauges[k] = gauges.get(k, 0) + v
        help_.update(self.help_seen)
        # SIGUSR1's reopens that failed: its own with its workers' (access_log_file)
        failed = total.series.setdefault(REOPEN_FAILURES, {})
        failed[()] = failed.get((), 0.0) + reopen_failures()
        # the supervisor's: its summed counters count from its start (a
        # replaced worker's do not start them again)
        gauges[START_TIME] = process_start_time()
        help_[START_TIME] = START_TIME_HELP
        gauges["l4proxy_workers"] = sum(1 for s in self.slots if s.link and not s.link.closed)
        gauges["l4proxy_worker_restarts_total"] = self.restarts_total
        gauges["l4proxy_worker_spawn_failures_total"] = self.spawn_failures_total
        gauges["l4proxy_control_channel_resets_total"] = self.channel_resets_total
        gauges["l4proxy_control_late_answers_total"] = self.late_answers_gone + sum(
            s.link.stale for s in self.slots if s.link
        )
        return Exposition(total, help_, gauges, self.labelled_seen | {WORKER_CONNECTIONS})

    async def _decode_stats(
        self, slot: WorkerSlot, answer: Any, shared: dict[Any, Any]
    ) -> tuple[Sample, dict[str, float], dict[str, tuple[str, ...]], set[str]] | None:
        """A worker's stats answer (WorkerView.stats_raw): its counters
        (_stats_wire.decode_sample, a slice per loop turn), its unlabelled totals
        among them; its gauges; its families' HELP and TYPE; which of those
        families have labels. None for none,
        and for one not of that form (a bug: logged, and the worker counts
        with its last answer, as a silent one does)."""
        if answer is None:
            return None
        try:
            sample = await in_slices(decode_sample(answer["sample"], shared))
            gauges = {str(k): float(v) for k, v in answer["gauges"].items()}
            help_ = {str(k): tuple(str(x) for x in v) for k, v in answer["help"].items()}
            labelled = {str(name) for name in answer["labelled"]}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            log.warning("worker %d: a stats answer not of the form expected (%r)", slot.index, exc)
            return None
        for name, v in gauges.items():
            if name.endswith("_total"):  # a counter (the pump's, the relay's): kept as one
                totals = sample.series.setdefault(name, {})
                totals[()] = totals.get((), 0.0) + v
        return sample, gauges, help_, labelled

    async def stats_text(self) -> str:
        return (await self.stats()).text()

    async def stats_json(self) -> dict[str, Any]:
        return (await self.stats()).json()

    async def config_dump(self) -> Any:
        return await self.first("config_dump")

    async def clusters(self) -> Any:
        """Every live worker's /clusters, merged (merge_clusters); None when
        none answered. Asked at once, each within SHARED_ASK_TIMEOUT_S: a
        worker that does not answer in time (busy, restarting) is left out
        and named, it does not hold up the rest."""
        answers = await asyncio.gather(*(self._ask_shared(s, "clusters") for s in self.slots))
        return merge_clusters([(s.index, a) for s, a in zip(self.slots, answers, strict=True)])

    async def first(self, op: str) -> Any:
        """The first worker's answer to *op* (/config_dump: every worker has
        the same table); when it has none in time (busy, restarting), the
        first of the others', asked at once: two waits at most, where asking
        them in turn made N hung workers N waits of SHARED_ASK_TIMEOUT_S."""
        if not self.slots:
            return None
        ans = await self._ask_shared(self.slots[0], op)
        if ans is not None:
            return ans
        rest = await asyncio.gather(*(self._ask_shared(s, op) for s in self.slots[1:]))
        return next((a for a in rest if a is not None), None)

    async def _ask_shared(self, slot: WorkerSlot, op: str) -> Any:
        """*op* asked of *slot*'s worker once for every caller meanwhile.

        /config_dump and /clusters build and encode the whole table on the
        worker's event loop, and a worker answers such requests in turn.
        Asked once per admin request, with each request given up on after
        3 s but still answered, 20 clients looping on /config_dump of a big
        table queued answers without bound (ahead of the watchdog's ready
        ping, until ready had a lane of its own: the watchdog killed a
        healthy worker). So the request stays in
        flight, counted, until its answer comes (however late) or the link
        closes (the worker gone), and every caller meanwhile waits on that
        one (each for SHARED_ASK_TIMEOUT_S): at most one such request per op is ever
        queued at a worker.
        """
        link = slot.link
        if link is None:
            return None
        key = (slot.index, op)
        entry = self._heavy.get(key)
        if entry is None or entry[0] is not link:
            # No timeout: bounded by the link's life (a hung worker's is ended
            # by the watchdog, and its close answers None).
            task = asyncio.ensure_future(self._ask_link(slot, link, op, None))
            entry = (link, task)
            self._heavy[key] = entry

            def done(fut: asyncio.Future[Any], entry: Any = entry) -> None:
                if self._heavy.get(key) is entry:
                    del self._heavy[key]
                if not fut.cancelled():
                    fut.exception()  # retrieved: each waiter got it raised already

            task.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(entry[1]), self.SHARED_ASK_TIMEOUT_S)
        except TimeoutError:
            return None

    # -- lifecycle -------------------------------------------------------------
    async def run(self, admin_start: Any, held: HeldSignals | None = None) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Signal handling first (signals): a SIGHUP from here on reaches
        # the workers that exist, and never kills one that is starting.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_access_log)
        say_ignored(loop)  # (SIGUSR2)
        if held is not None and held.reopen_requested:
            self._reopen_access_log()
        if held is not None and held.stop_requested:
            stop.set()  # a SIGTERM while starting (as PID 1, lost before: signals)
        await admin_start(self, stop.set)
        if not stop.is_set():  # (stopped already: no worker to start and drain)
            self._keepers = [loop.create_task(self._keep(slot)) for slot in self.slots]
        watchdog = loop.create_task(self._watchdog())
        await stop.wait()
        self.stopping = True
        watchdog.cancel()
        log.info("stopping: draining %d worker(s)", len(self._keepers))
        # Our copies of each slot's listening sockets stay open until its
        # worker exits (_keep): the worker holds the same sockets (inherited
        # fds), and each listener stops listening when its worker's drain
        # retires it, inbound and gateway ones at once, outbound ones once
        # the app is gone (worker.drain, --drain-quiet), serving what its
        # queue holds first (Worker.stop_accepting), for our copy too
        # (worker._stop_listening: shutdown(SHUT_RD)), so that a client is
        # refused then, not queued on a socket nobody serves. Closing the
        # last copy of a listening socket resets every connection in its
        # accept queue, whose clients sent their requests already: a slot
        # whose worker is dead (its restart in the back-off), or dies during
        # the stop with a listener still listening (one that died an instant
        # before the SIGTERM, its exit not reaped yet; a crash or a kill
        # mid-drain), gets a worker at once from its keeper, which drains as
        # any does (its queue served), within the stop's deadline
        # (_drains_anew). Before, our copies were closed once the worker
        # answered after the SIGTERM, and a worker that died later in its
        # drain reset its queues.
        self._stop_deadline()  # (from the SIGTERM on)
        for slot in self.slots:  # (those draining on their own SIGTERM too: _see_out)
            self._stop_one(slot.proc, slot.link, slot)
            for v in slot.leaving:
                self._stop_one(v.proc, v.link)
        await self._reap_all()
        for slot in self.slots:  # (whatever is left: a start that failed)
            self._let_go(slot)
        done_with_signals(loop)  # (a late SIGTERM, SIGHUP: no death by signal now)
        log.info("stopped")
        return 0

    async def _reap_all(self) -> None:
        """Wait for the draining workers, killing those still there at one
        deadline: they drain at once, so one that outlives it is killed then,
        not a whole drain after the one before it was (N hung workers took
        N times the drain, well past Kubernetes' grace period)."""
        deadline = self._stop_deadline()
        leaving = [v.task for slot in self.slots for v in slot.leaving if v.task is not None]
        await asyncio.gather(*(self._reap(slot, deadline) for slot in self.slots), *leaving)

    def _stop_deadline(self) -> float:
        """The stop's one deadline (loop time): --drain-duration and
        DRAIN_GRACE_S from its first call."""
        if self.stop_deadline is None:
            now = asyncio.get_running_loop().time()
            self.stop_deadline = now + self.args.drain_duration + self.DRAIN_GRACE_S
        return self.stop_deadline

    async def _reap(self, slot: WorkerSlot, deadline: float) -> None:
        """Wait for a draining worker until *deadline* (loop time), then kill
        it; and for the one its keeper starts meanwhile to drain a slot
        that had none (_keep), the same way."""
        loop = asyncio.get_running_loop()
        while True:
            proc = slot.proc
            if proc is not None and proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    log.warning("worker %d still draining at the deadline: killed", slot.index)
                    proc.kill()
                    await proc.wait()
            keeper = slot.keeper
            if keeper is None or keeper.done():
                return
            await asyncio.wait({keeper}, timeout=max(0.0, deadline - loop.time()))
            if keeper.done() or slot.proc is proc:
                return  # (the deadline passed with no other worker started)

    async def _watchdog(self) -> None:
        """Kill a worker that stopped answering (hung, not dead) so it is restarted.

        A worker whose event loop is stuck still holds its listening socket and
        accepts nothing: to the pod that is as bad as a crash, and no exit
        status would ever tell us. Nor does an event loop that answers
        while the relay's thread is stuck: ``alive`` says how long that
        thread has gone without a turn, and one stuck as long is killed.
        """
        limit = self.args.watchdog_timeout
        if limit <= 0:
            return
        interval = watchdog.check_interval(limit)
        silent: dict[int, float] = {}  # worker pid -> since when it has not answered
        while True:
            await asyncio.sleep(interval)
            for slot in self.slots:
                # One slot's failure (whatever it is) must not end the watch of
                # all of them: before issue 12, one oversize answer did.
                try:
                    await self._watch_one(slot, silent, limit, interval)
                except Exception:
                    log.exception("watchdog: unexpected error checking worker %d", slot.index)

    async def _watch_one(
        self, slot: WorkerSlot, silent: dict[int, float], limit: float, interval: float
    ) -> None:
        live = {s.proc.pid for s in self.slots if s.proc and s.proc.returncode is None}
        live |= {v.proc.pid for s in self.slots for v in s.leaving if v.proc.returncode is None}
        for pid in [p for p in silent if p not in live]:
            del silent[pid]
        if self.stopping:
            return
        # Those draining on a SIGTERM of their own (_see_out) too: one hung
        # holds what it took (its requests in flight, stalled) until its
        # deadline (--drain-duration and 10 s after its hand-over; none
        # before: it serves until its successor answers), where the
        # watchdog killed it at --watchdog-timeout before its SIGTERM.
        for leaving in list(slot.leaving):
            if leaving.proc.returncode is None:
                await self._watch_proc(slot, leaving.proc, leaving.link, silent, limit, interval)
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return
        await self._watch_proc(slot, proc, slot.link, silent, limit, interval)

    async def _watch_proc(
        self,
        slot: WorkerSlot,
        proc: asyncio.subprocess.Process,
        link: SupervisorEnd | None,
        silent: dict[int, float],
        limit: float,
        interval: float,
    ) -> None:
        stalled = await self._ask_link(slot, link, "alive", timeout=interval)
        if stalled is not None:
            silent.pop(proc.pid, None)
            # It answered: its event loop turns. Its relay's thread (the
            # per-request relay's own) may not: stuck, it serves nothing
            # and never hears a stop; a hung worker all the same.
            if isinstance(stalled, (int, float)) and stalled >= limit and proc.returncode is None:
                log.error(
                    "worker %d (pid %d): its relay thread has not turned for %.1fs; killing it",
                    slot.index,
                    proc.pid,
                    stalled,
                )
                proc.kill()
            return
        first = silent.setdefault(proc.pid, time.monotonic())
        # A worker answers once its rules are loaded and its relays started:
        # until then (a big rule set on a small CPU share) it gets the
        # start-up allowance, or it would be killed, restarted and killed
        # again, and the pod would never be ready.
        if not slot.answered and link is slot.link:  # (one that said it leaves: past it)
            limit = max(limit, getattr(self.args, "watchdog_start_timeout", 120.0))
        if time.monotonic() - first >= limit and proc.returncode is None:
            log.error(
                "worker %d (pid %d) has not answered for %.1fs%s; killing it",
                slot.index,
                proc.pid,
                limit,
                "" if slot.answered or link is not slot.link else " since it started",
            )
            silent.pop(proc.pid, None)
            proc.kill()

    def _reopen_access_log(self) -> None:
        """SIGUSR1 (access_log_file): our copy of --access-log's fd, the one
        each worker started from now on inherits, points at PATH opened
        anew; then each worker reopens its own. One that fails here fails
        there too (the same user, the same path): not forwarded."""
        fd = getattr(self.args, "access_log_fd", -1)
        path = getattr(self.args, "access_log", None)

        def point(new: int) -> None:
            os.dup2(new, fd, inheritable=False)

        if reopen_access_log(path, point):
            log.info("SIGUSR1: --access-log %s reopened", path)
            self._forward(signal.SIGUSR1)

    def _forward(self, sig: int) -> None:
        """*sig* (SIGHUP, SIGUSR1) to every worker, those draining on a
        SIGTERM of their own too (_see_out): one serves its slot until its
        successor answers, and a reload skipped there served the old rules
        meanwhile (--reload-interval's poll aside), a reopen skipped wrote
        its access log lines to the rotated file until it exited."""
        for slot in self.slots:
            for proc in [slot.proc, *(lv.proc for lv in slot.leaving)]:
                if proc and proc.returncode is None:
                    try:
                        os.kill(proc.pid, sig)
                    except ProcessLookupError:
                        pass
