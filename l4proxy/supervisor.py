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
new ones are only delayed. Restarts back off (0.1 s doubling to 5 s) while a
worker keeps dying within 10 s of its start.

A worker that stops answering its control socket for ``--watchdog-timeout``
seconds (hung, not dead) is killed, and so restarted.

The admin endpoint lives in the supervisor and asks the workers over their
control sockets (one JSON request and one JSON line back), summing counters
across workers. SIGTERM and SIGHUP are forwarded to every worker; the
supervisor exits when all workers have drained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from l4proxy.listener import Listener
from l4proxy.stats import LabelSet, render_prometheus

log = logging.getLogger("l4proxy.supervisor")

MIN_GAUGES = ("l4proxy_rules_generation", "l4proxy_rules_valid")


@dataclass
class WorkerSlot:
    index: int
    listeners: list[Listener]
    proc: asyncio.subprocess.Process | None = None
    control: socket.socket | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.1
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Supervisor:
    def __init__(self, args: argparse.Namespace, listener_sets: list[list[Listener]]) -> None:
        self.args = args
        self.slots = [WorkerSlot(i, ls) for i, ls in enumerate(listener_sets)]
        self.stopping = False
        self.restarts_total = 0

    # -- workers -------------------------------------------------------------
    def _worker_argv(self, slot: WorkerSlot, control_fd: int) -> list[str]:
        fds = ",".join(
            f"{lst.sock.fileno()}:{lst.mode}:{lst.address[0]}:{lst.address[1]}"
            for lst in slot.listeners
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
        ]

    async def spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair()
        argv = self._worker_argv(slot, child.fileno())
        pass_fds = [lst.sock.fileno() for lst in slot.listeners] + [child.fileno()]
        slot.proc = await asyncio.create_subprocess_exec(*argv, pass_fds=pass_fds)
        child.close()
        slot.control = parent
        slot.reader, slot.writer = await asyncio.open_connection(sock=parent)
        slot.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)
        asyncio.get_running_loop().create_task(self._watch(slot, slot.proc))

    async def _watch(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if slot.writer:
            slot.writer.close()
        slot.reader = slot.writer = None
        if self.stopping:
            return
        how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"status {code}"
        log.error("worker %d (pid %d) died with %s; restarting", slot.index, proc.pid, how)
        if time.monotonic() - slot.started_at < 10:
            slot.backoff = min(slot.backoff * 2, 5.0)
        else:
            slot.backoff = 0.1
        await asyncio.sleep(slot.backoff)
        if not self.stopping:
            slot.restarts += 1
            self.restarts_total += 1
            await self.spawn(slot)

    async def ask(self, slot: WorkerSlot, op: str, timeout: float = 3.0) -> Any:
        """One request/response on a worker's control socket; None if it cannot answer."""
        async with slot.lock:
            if slot.writer is None or slot.reader is None:
                return None
            try:
                slot.writer.write(json.dumps({"op": op}).encode() + b"\n")
                await slot.writer.drain()
                line = await asyncio.wait_for(slot.reader.readline(), timeout)
            except (OSError, TimeoutError, ConnectionError):
                return None
            if not line:
                return None
            return json.loads(line)

    # -- the admin's view, summed over workers ------------------------------
    async def gather(self, op: str) -> list[Any]:
        answers = await asyncio.gather(*(self.ask(s, op) for s in self.slots))
        return [a for a in answers if a is not None]

    async def ready(self) -> bool:
        if self.stopping:
            return False
        answers = await self.gather("ready")
        return len(answers) == len(self.slots) and all(answers)

    async def stats(
        self,
    ) -> tuple[dict[str, dict[LabelSet, float]], dict[str, Any], dict[str, float]]:
        values: dict[str, dict[LabelSet, float]] = defaultdict(lambda: defaultdict(float))
        help_: dict[str, Any] = {
            "l4proxy_worker_connections_total": ("counter", "Connections accepted, by worker.")
        }
        gauges: dict[str, float] = {}
        answers = await asyncio.gather(*(self.ask(s, "stats") for s in self.slots))
        for slot, ans in zip(self.slots, answers, strict=True):
            if ans is None:
                continue
            for name, labels, v in ans["counters"]:
                values[name][tuple((k, val) for k, val in labels)] += v
                if name == "l4proxy_connections_total":
                    values["l4proxy_worker_connections_total"][(("worker", str(slot.index)),)] += v
            help_.update({k: tuple(v) for k, v in ans["help"].items()})
            for k, v in ans["gauges"].items():
                if k in MIN_GAUGES:
                    gauges[k] = min(gauges.get(k, v), v)
                else:
                    gauges[k] = gauges.get(k, 0) + v
        gauges["l4proxy_workers"] = sum(1 for s in self.slots if s.writer is not None)
        gauges["l4proxy_worker_restarts_total"] = self.restarts_total
        return values, help_, gauges

    async def stats_text(self) -> str:
        values, help_, gauges = await self.stats()
        return render_prometheus(values, help_, gauges)

    async def stats_json(self) -> dict[str, Any]:
        values, _, gauges = await self.stats()
        out: dict[str, Any] = dict(gauges)
        for name, series in values.items():
            out[name] = [{"labels": dict(k), "value": v} for k, v in series.items()]
        return out

    async def config_dump(self) -> Any:
        return await self.first("config_dump")

    async def clusters(self) -> Any:
        # Outlier detection is per worker; worker 0's view is shown.
        return await self.first("clusters")

    async def first(self, op: str) -> Any:
        for slot in self.slots:
            ans = await self.ask(slot, op)
            if ans is not None:
                return ans
        return None

    # -- lifecycle -------------------------------------------------------------
    async def run(self, admin_start: Any) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        await admin_start(self, stop.set)
        for slot in self.slots:
            await self.spawn(slot)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        watchdog = loop.create_task(self._watchdog())
        await stop.wait()
        self.stopping = True
        watchdog.cancel()
        log.info("stopping: draining %d worker(s)", len(self.slots))
        # Close our copies now. The workers hold the same sockets (inherited
        # fds), so this alone stops nothing: each listener closes when its
        # worker closes its copy, inbound and gateway ones at once, outbound
        # ones once the app is gone (worker.drain, --drain-quiet). Kept open,
        # our copies would let handshakes complete into a queue nobody reads
        # until the drain ends, and those clients would hang, then be reset.
        for slot in self.slots:
            for lst in slot.listeners:
                lst.sock.close()
        self._forward(signal.SIGTERM)
        deadline = self.args.drain_duration + 10
        for slot in self.slots:
            if slot.proc and slot.proc.returncode is None:
                try:
                    await asyncio.wait_for(slot.proc.wait(), deadline)
                except TimeoutError:
                    slot.proc.kill()
                    await slot.proc.wait()
        log.info("stopped")
        return 0

    async def _watchdog(self) -> None:
        """Kill a worker that stopped answering (hung, not dead) so it is restarted.

        A worker whose event loop is stuck still holds its listening socket and
        accepts nothing: to the pod that is as bad as a crash, and no exit
        status would ever tell us.
        """
        limit = self.args.watchdog_timeout
        if limit <= 0:
            return
        interval = max(0.2, limit / 5)
        silent: dict[int, float] = {}
        while True:
            await asyncio.sleep(interval)
            for slot in self.slots:
                proc = slot.proc
                if proc is None or proc.returncode is not None or self.stopping:
                    silent.pop(slot.index, None)
                    continue
                if await self.ask(slot, "ready", timeout=interval) is not None:
                    silent.pop(slot.index, None)
                    continue
                first = silent.setdefault(slot.index, time.monotonic())
                if time.monotonic() - first >= limit:
                    log.error(
                        "worker %d (pid %d) has not answered for %.1fs; killing it",
                        slot.index,
                        proc.pid,
                        limit,
                    )
                    silent.pop(slot.index, None)
                    proc.kill()

    def _forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc and slot.proc.returncode is None:
                try:
                    os.kill(slot.proc.pid, sig)
                except ProcessLookupError:
                    pass
