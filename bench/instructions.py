"""``python -m bench.instructions``: user-space instructions per request, counted.

Throughput on a loaded or 2-core machine is noise, and a kernel in a VM
often lends no hardware counters; the instructions a proxy's own code runs
for one request are neither. Each peer runs under callgrind (valgrind) with
instrumentation off, so it starts at near native speed. Once it listens and
has served a few requests, instrumentation is switched on in each of its
processes (l4proxy's supervisor and worker), wrk drives keep-alive load
through it for ``--duration`` seconds, and the peer is stopped: its dumps'
instruction totals over the requests wrk counted is the figure, per peer.

What it is not: kernel time (the same syscalls for each peer, see the
note on issue 11: most of a request's CPU), cache misses, or speed under
valgrind (everything runs ~50 times slower and on one core at a time). It
says where l4proxy's user space stands against HAProxy's, and whether a
change to the compiled loop made a request cheaper, in one run, free of
noise. HAProxy's binary has no symbols: its figure is a total only.
``--annotate`` prints callgrind_annotate's top functions for l4proxy.

    python -m bench.instructions                    # l4proxy per request, HAProxy tcp and http
    python -m bench.instructions --peers l4proxy-request --duration 5 --annotate
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import peers, provision, rules, wrk
from bench.peers import Address, Backend
from bench.process import Process, ProcessError, free_port, wait_port
from bench.scenarios import L4PROXY_MODES, LoopbackBed, l4proxy_command

PEERS = ("l4proxy-request", "haproxy", "haproxy-http")
START_TIMEOUT = 180.0  # Python's start under valgrind, instrumentation off: ~10 s here
_TOTALS = re.compile(r"^totals:\s*(\d+)", re.MULTILINE)  # ("summary:" is 0 once toggled)


@dataclass(frozen=True)
class Count:
    peer: str
    requests: int
    instructions: int
    dumps: tuple[str, ...]
    loop: int = 0  # l4proxy: the compiled loop's own (run(), inclusive; no Python)

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests if self.requests else float("nan")

    @property
    def loop_per_request(self) -> float:
        return self.loop / self.requests if self.requests and self.loop else float("nan")


def dump_total(path: str) -> int:
    """The instructions (Ir) one callgrind dump counted (0 for an empty dump)."""
    with open(path, errors="replace") as f:
        found = _TOTALS.search(f.read())
    return int(found.group(1)) if found else 0


_LOOP = re.compile(r"^\s*([\d,]+) \(.*relay\.c:__pyx_f_\w*_5relay_run \[", re.MULTILINE)


def loop_total(path: str) -> int:
    """The instructions spent in the compiled relay's loop (relay.run(),
    callees included): what a request costs there, without what Python did
    meanwhile (under valgrind, time-driven work such as the verdict cache's
    1 s refresh is ~20 times more per request than at native speed)."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
        capture_output=True,
        text=True,
        check=False,
    )
    found = _LOOP.search(done.stdout)
    return int(found.group(1).replace(",", "")) if found else 0


def _peer_argv(peer: str, workdir: str, listen: Address, backends: list[Backend]) -> list[str]:
    if peer in ("haproxy", "haproxy-http"):
        conf = os.path.join(workdir, f"{peer}.cfg")
        with open(conf, "w") as f:
            f.write(
                peers.haproxy_conf(listen, backends, "http" if peer == "haproxy-http" else "tcp")
            )
        return ["haproxy", "-db", "-f", conf]
    if peer in L4PROXY_MODES:
        rules_dir = rules.write_rules(os.path.join(workdir, f"{peer}-rules"), backends)
        extra = ["--no-transparent", "--listen", str(listen), *L4PROXY_MODES[peer]]
        return l4proxy_command(rules_dir, extra, Address("127.0.0.1", free_port()))
    raise ValueError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")


def _control(pids: Sequence[int], switch: str) -> None:
    for pid in pids:
        subprocess.run(
            ["callgrind_control", "--instr=" + switch, str(pid)],
            capture_output=True,
            check=False,
            timeout=60,
        )


def _warm(url: str, proc: Process, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30", url],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.stdout == "200":
            warm = wrk.run(wrk.command(url, 4, 2.0))
            if warm.requests:
                return
        time.sleep(0.5)
    raise ProcessError(f"{proc.name} served nothing in {timeout:.0f}s:\n{proc.log_tail()}")


def count(
    peer: str,
    workdir: str,
    backends: list[Backend],
    duration: float,
    connections: int = 50,
    dump_instr: bool = False,
) -> Count:
    """Run *peer* under callgrind, count its instructions over *duration* s of
    wrk (*dump_instr*: per instruction in the dumps, not per source line)."""
    out = os.path.join(workdir, peer)
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "callgrind.out.*")):
        os.unlink(old)
    listen = Address("127.0.0.1", free_port())
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        "--instr-atstart=no",
        *(["--dump-instr=yes"] if dump_instr else []),
        f"--callgrind-out-file={out}/callgrind.out.%p",
        *_peer_argv(peer, out, listen, backends),
    ]
    proc = Process(peer, argv, os.path.join(out, "valgrind.log")).start()
    try:
        wait_port(listen.host, listen.port, timeout=START_TIMEOUT, proc=proc)
        url = f"http://{listen}/"
        # requests first (the first ones are decided in Python, slow under
        # valgrind): the pools, the verdict cache and the code warm
        _warm(url, proc)
        _control(proc.pids(), "on")
        time.sleep(0.5)  # (the switch reaches each process at its next scheduling)
        measured = wrk.run(wrk.command(url, connections, duration))
        _control(proc.pids(), "off")
    finally:
        proc.stop(timeout=60)
    dumps = tuple(sorted(glob.glob(os.path.join(out, "callgrind.out.*"))))
    total = sum(dump_total(d) for d in dumps)
    loop = sum(loop_total(d) for d in dumps) if peer in L4PROXY_MODES else 0
    return Count(peer, measured.requests, total, dumps, loop)


def annotate(c: Count, top: int = 25) -> str:
    biggest = max(c.dumps, key=dump_total)
    done = subprocess.run(
        ["callgrind_annotate", "--threshold=99", biggest], capture_output=True, text=True
    )
    lines = [ln for ln in done.stdout.splitlines() if re.match(r"^\s*[\d,]+ \(", ln)]
    return "\n".join(lines[: top + 1])


def report(counts: Sequence[Count]) -> str:
    rows = [
        f"{'peer':18s} {'requests':>9s} {'instructions':>14s} {'per request':>12s}"
        f" {'compiled loop':>14s}"
    ]
    for c in counts:
        loop = f"{c.loop_per_request:14.0f}" if c.loop else f"{'':14s}"
        rows.append(
            f"{c.peer:18s} {c.requests:9d} {c.instructions:14d} {c.per_request:12.0f} {loop}"
        )
    base = next((c for c in counts if c.peer == "haproxy"), None)
    if base is not None and base.requests and base.instructions:
        rows.append("")
        for c in counts:
            if c is not base and c.requests:
                rows.append(f"{c.peer}: {c.per_request / base.per_request:.2f}x HAProxy tcp's")
                if c.loop:
                    ratio = c.loop_per_request / base.per_request
                    rows.append(f"{c.peer}, its compiled loop alone: {ratio:.2f}x HAProxy tcp's")
    return "\n".join(rows) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list ({','.join(PEERS)})")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per peer (10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--annotate", action="store_true", help="l4proxy's top functions too")
    p.add_argument("--keep", metavar="DIR", help="write the callgrind dumps there and keep them")
    p.add_argument(
        "--dump-instr",
        action="store_true",
        help="costs per machine instruction in the dumps (with --keep: for kcachegrind or"
        " callgrind_annotate --auto=yes against objdump -dl of the extension), where the"
        " compiled code's source lines say little",
    )
    p.add_argument("--no-install", action="store_true", help="do not apt-get what is missing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    selected = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in selected if s not in PEERS]
    if unknown:
        print(f"error: unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
        return 2
    if not args.no_install:
        try:
            provision.ensure(extra_debian=("valgrind",))
        except provision.ProvisionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for program in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(program) is None:
            print(f"error: {program} is not installed (apt-get install valgrind wrk)")
            return 2
    counts = []
    with tempfile.TemporaryDirectory(prefix="l4proxy-instructions-") as scratch:
        workdir = args.keep or scratch
        os.makedirs(workdir, exist_ok=True)
        with LoopbackBed(os.path.join(workdir, "bed")) as bed:
            bed.start([])
            for peer in selected:
                print(f"{peer}: under callgrind ...", file=sys.stderr, flush=True)
                c = count(
                    peer, workdir, bed.backends, args.duration, args.connections, args.dump_instr
                )
                counts.append(c)
                if args.annotate and peer in L4PROXY_MODES:
                    print(annotate(c))
    print(report(counts), end="")
    return 0 if all(c.requests for c in counts) else 1


if __name__ == "__main__":
    sys.exit(main())
