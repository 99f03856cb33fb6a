"""``python -m bench.kernel``: where a keep-alive request's CPU goes, kernel and user.

On a proxy's core most of a keep-alive request is the kernel's (recv, send,
epoll, loopback TCP): callgrind (``bench.instructions``) counts only the
user space, and req/s says nothing of where the time went. Here perf samples
each peer's threads with ``cpu-clock`` (a software clock: it needs no
hardware counters, which a VM often lacks) while wrk drives keep-alive load,
and the samples per symbol over the requests wrk counted give microseconds
per request, the kernel's and the peer's own code apart. Beside them, per
request: the system calls (perf stat on the syscall tracepoints, in a
second run of half the length: a tracepoint on every call slows a proxy
down) and the voluntary context switches (from /proc: each is a sleep in epoll_wait and a
wake-up some other core paid for). Peers run in interleaved rounds; each
peer's symbols are compared with the first peer's, dearer ones last.

Sampling costs the sampled proxy a few per cent, the same for each peer.
With ``--pin`` each proxy runs alone on its cores, as in ``python -m bench
--pin``; on a machine where the load cannot keep a proxy's core busy the
proxy sleeps between batches, and its sleeps are part of what is measured.

    python -m bench.kernel                            # HAProxy tcp against l4proxy
    python -m bench.kernel --pin 2:4-15 --threads 4 --backend-workers 6
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench import pin, provision, wrk
from bench.scenarios import LOOPBACK_PEERS, LoopbackBed, Target

PEERS = ("haproxy", "l4proxy-request")
FREQUENCY = 4999  # samples per second of a thread's CPU time (not a round number: no lockstep)
# The system calls a keep-alive request makes, counted one by one; every
# other one lands in "other".
SYSCALLS = ("recvfrom", "sendto", "read", "write", "epoll_wait", "epoll_pwait", "epoll_ctl")
SYSCALLS += ("clock_gettime", "futex", "splice", "writev", "readv")

# perf record's sampling: cpu-clock at exactly FREQUENCY (--strict-freq:
# a kernel that lowered the rate would make every figure too low)
_SAMPLE = ("record", "-q", "--strict-freq", "-F", str(FREQUENCY), "-e", "cpu-clock")

_REPORT_ROW = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+\[(.)\]\s+(.+?)\s*$")


@dataclass
class Split:
    """One peer's CPU over one or more measured runs."""

    peer: str
    requests: int = 0
    seconds: float = 0.0  # wrk's running time
    samples: dict[tuple[str, str], int] = field(default_factory=dict)  # (space, symbol)
    syscalls: dict[str, int] = field(default_factory=dict)
    sleeps: int = 0  # voluntary context switches
    frequency: int = FREQUENCY
    runs: list[float] = field(default_factory=list)  # each run's µs per request

    def add(self, other: Split) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.sleeps += other.sleeps
        self.runs += other.runs or [other.space_us("k") + other.space_us("u")]
        for key, n in other.samples.items():
            self.samples[key] = self.samples.get(key, 0) + n
        for name, n in other.syscalls.items():
            self.syscalls[name] = self.syscalls.get(name, 0) + n

    def us(self, samples: float) -> float:
        """*samples* as microseconds of CPU per request."""
        return samples / self.frequency / self.requests * 1e6 if self.requests else math.nan

    def space_us(self, space: str) -> float:
        return self.us(sum(n for (s, _), n in self.samples.items() if s == space))

    def per_request(self, count: int) -> float:
        return count / self.requests if self.requests else math.nan


def parse_report(text: str) -> dict[tuple[str, str], int]:
    """``perf report --stdio -n --sort sym`` rows -> {(space, symbol): samples};
    space is ``k`` (kernel) or ``u`` (user: perf's ``.``)."""
    rows: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        m = _REPORT_ROW.match(line)
        if m:
            space = "k" if m.group(2) == "k" else "u"
            key = (space, m.group(3))
            rows[key] = rows.get(key, 0) + int(m.group(1))
    return rows


def parse_stat(text: str) -> dict[str, int]:
    """``perf stat -x,`` lines -> {syscall name: count} (``raw_syscalls:sys_enter``
    as ``all``; uncounted events are left out)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            continue
        event = parts[2].strip()
        if event == "raw_syscalls:sys_enter":
            counts["all"] = int(parts[0])
        elif event.startswith("syscalls:sys_enter_"):
            counts[event.removeprefix("syscalls:sys_enter_")] = int(parts[0])
    return counts


def sleeps_of(pids: Iterable[int]) -> int:
    """Voluntary context switches of every thread of *pids* so far."""
    total = 0
    for pid in pids:
        for status in glob.glob(f"/proc/{pid}/task/*/status"):
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except OSError:
                continue  # the thread is gone
    return total


@functools.cache
def _stat_events(perf: str) -> list[str]:
    """The syscall tracepoints this kernel has (a kernel without one leaves it out)."""
    done = subprocess.run([perf, "list", "syscalls:sys_enter_*"], capture_output=True, text=True)
    have = set(re.findall(r"syscalls:sys_enter_(\w+)", done.stdout))
    return ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS if s in have]


class PerfError(RuntimeError):
    pass


def _attach(argv: list[str], log: str) -> subprocess.Popen[bytes]:
    """perf *argv* started, attached (its stderr in *log*); PerfError with
    what it said if it is gone already (an event it may not open)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    time.sleep(0.5)  # attached (the proxy is idle meanwhile: no samples, no calls)
    if proc.poll() is not None:
        with open(log, errors="replace") as f:
            raise PerfError(f"{' '.join(argv[:2])} exited {proc.returncode}: {f.read()[-2000:]}")
    return proc


def check_perf(perf: str) -> str | None:
    """Why perf cannot sample here (None: it can): _SAMPLE, and the
    syscall tracepoints."""
    for argv in (
        [perf, *_SAMPLE],
        [perf, "stat", "-x,", "-e", ",".join(_stat_events(perf))],
    ):
        done = subprocess.run(
            [*argv, "-o", os.devnull, "--", "true"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return f"{' '.join(argv[:2])} fails here: {done.stderr.strip()[-1000:]}"
    return None


def _detach(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)


def measure(
    perf: str, target: Target, duration: float, connections: int, threads: int, workdir: str
) -> Split:
    """Two wrk runs on *target*: one under perf record (the samples, the
    sleeps, req/s), then one of half the length under perf stat (the system
    calls: a tracepoint on every call slows a proxy down, more so the one
    that makes more)."""
    pids = target.process.pids()
    pid_list = ",".join(map(str, pids))
    data = os.path.join(workdir, f"{target.peer}.perf.data")
    stat_out = os.path.join(workdir, f"{target.peer}.stat")

    def load(seconds: float) -> wrk.WrkResult:
        argv = wrk.command(target.url, connections, seconds, threads=threads)
        return wrk.run(argv, target.launcher)

    record = _attach([perf, *_SAMPLE, "-o", data, "-p", pid_list], data + ".log")
    before = sleeps_of(pids)
    try:
        result = load(duration)
    finally:
        after = sleeps_of(pids)
        _detach(record)
    events = ",".join(_stat_events(perf))
    stat = _attach(
        [perf, "stat", "-x,", "-o", stat_out, "-e", events, "-p", pid_list], stat_out + ".log"
    )
    try:
        counted = load(max(1.0, duration / 2))
    finally:
        _detach(stat)
    done = subprocess.run(
        [perf, "report", "-i", data, "--stdio", "-n", "--sort", "sym", "--percent-limit", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    with open(stat_out) as f:
        calls = parse_stat(f.read())
    # calls per request of the counted run, scaled to the sampled run's
    # requests (none counted: no figure rather than a wrong 0)
    scale = result.requests / counted.requests if counted.requests else math.nan
    return Split(
        target.peer,
        requests=result.requests,
        seconds=result.duration_s,
        samples=parse_report(done.stdout),
        syscalls={} if math.isnan(scale) else {n: round(c * scale) for n, c in calls.items()},
        sleeps=after - before,
    )


def report(splits: Sequence[Split], top: int = 25) -> str:
    """The table per peer, then the symbols that differ most from the first peer's."""
    lines = [
        f"{'peer':18s} {'req/s':>8s} {'µs/req':>7s} {'kernel':>7s} {'user':>6s}"
        f" {'kernel %':>8s} {'syscalls':>8s} {'sleeps':>7s}"
    ]
    for s in splits:
        k, u = s.space_us("k"), s.space_us("u")
        rate = s.requests / s.seconds if s.seconds else math.nan
        share = k / (k + u) * 100 if k + u else math.nan  # (no samples: perf saw nothing)
        calls = s.per_request(s.syscalls["all"]) if "all" in s.syscalls else math.nan
        lines.append(
            f"{s.peer:18s} {rate:8.0f} {k + u:7.2f} {k:7.2f} {u:6.2f} {share:7.1f}%"
            f" {calls:8.2f} {s.per_request(s.sleeps):7.3f}"
        )
    lines += ["", "µs per request, run by run (the spread is the noise):"]
    lines += [f"  {s.peer:18s} " + " ".join(f"{x:6.2f}" for x in s.runs) for s in splits]
    lines += ["", "system calls per request:"]
    names = sorted({n for s in splits for n in s.syscalls if n != "all"})
    for name in names:
        counts = [s.per_request(s.syscalls.get(name, 0)) for s in splits]
        if any(c >= 0.001 for c in counts):
            lines.append(f"  {name:16s} " + " ".join(f"{c:8.3f}" for c in counts))
    if len(splits) < 2:
        return "\n".join(lines) + "\n"
    base = splits[0]
    keys = {key for s in splits for key in s.samples}
    for other in splits[1:]:
        diffs = sorted(
            (other.us(other.samples.get(k, 0)) - base.us(base.samples.get(k, 0)), k) for k in keys
        )
        lines += ["", f"µs per request, {other.peer} against {base.peer} ({top} largest gaps):"]
        shown = [d for d in diffs if abs(d[0]) >= 0.005]
        half = max(1, top // 2)
        picked = shown[:half] + shown[-half:] if len(shown) > top else shown
        for gap, (space, symbol) in picked:
            was, now = (
                base.us(base.samples.get((space, symbol), 0)),
                other.us(other.samples.get((space, symbol), 0)),
            )
            lines.append(f"  {gap:+7.3f}  {was:6.3f} {now:6.3f}  [{space}] {symbol[:60]}")
    return "\n".join(lines) + "\n"


def by_peer(runs: Iterable[Split]) -> list[Split]:
    """Runs summed per peer, in the order peers first appear."""
    total: dict[str, Split] = {}
    for r in runs:
        total.setdefault(r.peer, Split(r.peer, frequency=r.frequency)).add(r)
    return list(total.values())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.kernel",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog="examples:\n" + (__doc__.rsplit("\n\n", 1)[1] if __doc__ else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list ({','.join(PEERS)})")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per run (5)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--backend-workers", type=int, default=1, metavar="N", help="nginx workers")
    p.add_argument("--pin", metavar="PROXY:LOAD", help="cpu lists, as python -m bench --pin")
    p.add_argument("--top", type=int, default=30, help="symbols shown per comparison (30)")
    p.add_argument("--keep", metavar="DIR", help="keep perf's data files there")
    p.add_argument("--no-install", action="store_true", help="do not apt-get what is missing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    selected = [s.strip() for s in args.peers.split(",") if s.strip()]
    known = [p for p in LOOPBACK_PEERS if p != "direct"]  # (direct is the backends)
    unknown = [s for s in selected if s not in known]
    if unknown:
        print(f"error: unknown peer(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return 2
    pins = None
    if args.pin:
        try:
            pins = pin.parse(args.pin)
        except pin.PinError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not args.no_install:
        try:
            provision.ensure(extra_debian=("linux-perf",))
        except provision.ProvisionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    perf = shutil.which("perf")
    if perf is None or shutil.which("wrk") is None:
        print("error: perf and wrk are needed (apt-get install linux-perf wrk)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.duration < 1:
        print("error: --rounds and --duration must be at least 1", file=sys.stderr)
        return 2
    why = check_perf(perf)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the bed
    runs: list[Split] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="l4proxy-kernel-") as scratch:
        workdir = args.keep or scratch
        os.makedirs(workdir, exist_ok=True)
        with LoopbackBed(os.path.join(workdir, "bed"), args.backend_workers) as bed:
            targets = bed.start(selected)
            failures = dict(bed.failures)
            if not targets:
                print(f"error: no peer started: {failures}", file=sys.stderr)
                return 1
            if pins is not None:
                pin.pin_beds(targets, [bed], *pins)
            for r in range(args.rounds):
                for t in targets if r % 2 == 0 else targets[::-1]:
                    wrk.run(wrk.command(t.url, args.connections, 1.0), t.launcher)  # warm
                    print(f"round {r + 1}: {t.peer} ...", file=sys.stderr, flush=True)
                    try:
                        runs.append(
                            measure(perf, t, args.duration, args.connections, args.threads, workdir)
                        )
                    except PerfError as exc:
                        print(f"error: {t.peer}: {exc}", file=sys.stderr)
                        return 1
    print(report(by_peer(runs), args.top), end="")
    for peer, why in failures.items():
        print(f"not measured: {peer}: {why}")
    return 0 if all(r.requests for r in runs) and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
