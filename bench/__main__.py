"""``python -m bench``: run the benchmark and print the report.

exit codes: 0 the run finished (missed targets are reported, not failures),
1 a measurement could not be made, 2 usage error or missing prerequisites.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.scenarios import Bed, Target
from types import FrameType

from bench import provision

DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "l4proxy-bench")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,50,400, got {value!r}") from None


def parser() -> argparse.ArgumentParser:
    from bench.scenarios import GROUPS, LOOPBACK_PEERS, SIDECAR_PEERS

    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark l4proxy against HAProxy, nginx stream and Envoy with wrk.",
        epilog="examples:\n"
        "  make bench                                  # the full run (about 10 minutes)\n"
        "  make bench BENCH_ARGS=--quick               # 1 s per measurement, one round\n"
        "  python -m bench --quick --scenarios loopback --peers haproxy,l4proxy\n"
        "  python -m bench --modes close --connections 50 --profile-only\n\n"
        "Ratios are ×HAProxy / ×direct of the same placement, measured in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="1 s per measurement, one round")
    p.add_argument("--duration", type=float, default=None, help="seconds per wrk run (3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    p.add_argument(
        "--connections", type=_ints, default=[1, 50, 400], help="concurrencies (1,50,400)"
    )
    p.add_argument(
        "--modes", type=_csv, default=["keepalive", "close"], help="keepalive,close (both)"
    )
    p.add_argument(
        "--scenarios",
        type=_csv,
        default=list(GROUPS),
        help=f"placements: {','.join(GROUPS)} (both)",
    )
    p.add_argument(
        "--peers",
        type=_csv,
        default=list(LOOPBACK_PEERS),
        help=f"peers: {','.join(LOOPBACK_PEERS)} (all; the sidecar placement has "
        f"{', '.join(SIDECAR_PEERS)})",
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument(
        "--backend-workers",
        type=int,
        default=1,
        metavar="N",
        help="nginx worker processes serving the backends (1); on a many-core machine "
        "give them enough that direct is well above every proxy",
    )
    p.add_argument(
        "--pin",
        metavar="PROXY:LOAD",
        help="pin every proxy to the PROXY cpus and wrk and the backends to LOAD "
        "(taskset lists: 1:0, 2:4-15), so that a proxy's req/s is what its own "
        "cores do (default: no pinning)",
    )
    p.add_argument(
        "--body",
        choices=("none", "length", "chunked"),
        default="none",
        help="GETs (none), or POSTs of 5 bytes framed by Content-Length (length) or "
        "chunked (default: none)",
    )
    p.add_argument(
        "--paths",
        type=int,
        default=1,
        help="distinct request targets per connection, cycled (1: the same URL every "
        "time; real traffic has ids and queries in its paths)",
    )
    p.add_argument(
        "--memory",
        type=int,
        default=None,
        metavar="N",
        help="idle connections for the memory test (10000; --quick: 2000; 0: skip)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy profile of l4proxy under Connection: close load (on unless --quick)",
    )
    p.add_argument(
        "--profile-only", action="store_true", help="only the profile (no table, no memory)"
    )
    p.add_argument(
        "--json",
        default=os.path.join(DEFAULT_OUT, "latest.json"),
        metavar="PATH",
        help=f"raw numbers (default {DEFAULT_OUT}/latest.json; the table goes beside it, .md)",
    )
    p.add_argument("--no-install", action="store_true", help="do not apt-get/pip install peers")
    p.add_argument(
        "--editable",
        action="store_true",
        help="run l4proxy through make's editable install, as the tests do; by default it "
        "runs as installed in a pod (the editable install's import hook costs ~0.9 MB of RSS "
        "per process: see bench/scenarios.py installed_l4proxy)",
    )
    return p


MAIN_PID = os.getpid()


def _terminate(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != MAIN_PID:
        # A forked helper (pyroute2 forks for namespace work and stops its
        # children with SIGTERM) inherits this handler; unwinding there
        # would run the beds' cleanup and delete the live namespaces.
        os._exit(128 + signum)
    raise SystemExit(128 + signum)  # unwinds through the beds' cleanup


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.no_install:
        try:
            provision.ensure()
        except provision.ProvisionError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    # Imported after provisioning: the peers' modules look their programs up.
    from bench import measure, memory, pin, profile, report, scenarios
    from bench.peers import missing_programs
    from bench.process import raise_fd_limit
    from bench.scenarios import LOOPBACK_PEERS, SIDECAR_PEERS, LoopbackBed, SidecarBed

    scenarios.EDITABLE = args.editable

    missing = missing_programs(args.peers)
    if missing:
        print(f"bench: missing: {', '.join(missing)} (run without --no-install)", file=sys.stderr)
        return 2
    raise_fd_limit()
    pins = None
    if args.pin:
        try:
            pins = pin.parse(args.pin)
        except pin.PinError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    duration = args.duration or (1.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    mem_count = args.memory if args.memory is not None else (2000 if args.quick else 10000)
    do_profile = args.profile if args.profile is not None else not args.quick
    unknown = set(args.peers) - set(LOOPBACK_PEERS)
    if unknown or set(args.modes) - set(measure.MODES):
        print(f"bench: unknown peers/modes: {sorted(unknown) or args.modes}", file=sys.stderr)
        return 2
    if args.backend_workers < 1:
        print(
            f"bench: --backend-workers wants 1 or more, not {args.backend_workers}", file=sys.stderr
        )
        return 2

    out_dir = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="l4bench-")
    os.chmod(workdir, 0o755)  # the sidecar drops to uid 1337 and reads its rules here
    failures: dict[str, str] = {}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        beds: list[Bed] = []
        if "loopback" in args.scenarios:
            bed = stack.enter_context(LoopbackBed(workdir, args.backend_workers))
            beds.append(bed)
            targets += bed.start(args.peers)
            failures.update({f"loopback/{k}": v for k, v in bed.failures.items()})
        if "sidecar" in args.scenarios:
            side = stack.enter_context(SidecarBed(workdir, args.backend_workers))
            beds.append(side)
            try:
                targets += side.start([p for p in args.peers if p in SIDECAR_PEERS])
            except Exception as exc:
                failures["sidecar"] = str(exc)
                print(f"bench: sidecar placement not measured: {exc}", file=sys.stderr)
            failures.update({f"sidecar/{k}": v for k, v in side.failures.items()})
        if not targets:
            print("bench: nothing to measure", file=sys.stderr)
            return 1
        if pins is not None:
            from bench import pin

            pin.pin_beds(targets, beds, *pins)
        print(
            "bench: targets: "
            + ", ".join(f"{t.name} ({t.notes.get('versions', '?')})" for t in targets),
            file=sys.stderr,
        )

        samples: list[measure.Sample] = []
        if not args.profile_only:
            all_cases = measure.cases(args.modes, args.connections)
            measure.warm_up(targets)
            samples = measure.run_rounds(
                targets, all_cases, rounds, duration, args.threads, paths=args.paths, body=args.body
            )
        summaries = measure.summarize(samples)
        rows = report.rows(summaries)

        mem_results: list[memory.MemoryResult] = []
        if mem_count > 0 and not args.profile_only:
            for t in targets:
                if t.group == "loopback" and t.peer != "direct":
                    print(f"bench: memory: {t.name} holding {mem_count} idle", file=sys.stderr)
                    try:
                        mem_results.append(memory.hold_idle(t, mem_count))
                    except (OSError, memory.MemoryTestError) as exc:
                        failures[f"memory/{t.name}"] = str(exc)
                        print(f"bench: memory test of {t.name} failed: {exc}", file=sys.stderr)

        prof: profile.Profile | None = None
        # the per-request relay when it is measured (the default data plane
        # of HTTP ports), else the per-connection one
        gateway = next((t for t in targets if t.name == "l4proxy-request"), None) or next(
            (t for t in targets if t.name == "l4proxy"), None
        )
        if (do_profile or args.profile_only) and gateway is not None:
            try:
                prof = profile.profile_close_load(gateway, out_dir)
            except (RuntimeError, OSError) as exc:
                failures["profile"] = str(exc)
                print(f"bench: profile failed: {exc}", file=sys.stderr)
        implementation = _l4proxy_implementation()

    if failures:
        print(f"bench: logs of the run kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    order = [*LOOPBACK_PEERS, *(f"sidecar/{p}" for p in SIDECAR_PEERS)]
    parts = [
        f"## l4proxy bench: {rounds} round(s) × {duration:g} s, medians; "
        f"wrk -t{args.threads}; {os.cpu_count()} CPUs"
        + (f"; {args.backend_workers} backend workers" if args.backend_workers != 1 else "")
        + (f"; {args.paths} distinct paths" if args.paths > 1 else "")
        + (f"; POST bodies: {args.body}" if args.body != "none" else "")
        + (f"; pinned (proxy:load cpus) {args.pin}" if args.pin else ""),
        "",
    ]
    if rows:
        parts += [report.table(rows, order), ""]
    if mem_results:
        parts.append(report.memory_table(mem_results))
    verdicts = report.verdicts(rows, mem_results)
    if verdicts:
        parts += ["### issue 11 targets", "", "```", *(v.line() for v in verdicts), "```", ""]
    pairs = report.paired(samples)
    if pairs:
        parts += [
            "### req/s round by round (l4proxy ÷ peer in the same round: "
            "geometric mean, 95 % interval)",
            "",
            "```",
            *(p.line() for p in pairs),
            "```",
            "",
        ]
    if prof is not None:
        parts += [
            f"### profile: {gateway.name if gateway else 'l4proxy'}, Connection: close, 50 conns",
            "",
            "```",
            prof.text(),
            "```",
        ]
    if failures:
        parts += ["### not measured", ""] + [
            f"- {k}: {v.splitlines()[0]}" for k, v in failures.items()
        ]
    text = "\n".join(parts) + "\n"
    print(text)
    meta = {
        "duration_s": duration,
        "rounds": rounds,
        "wrk_threads": args.threads,
        "backend_workers": args.backend_workers,
        "paths": args.paths,
        "body": args.body,
        "pin": args.pin,
        "elapsed_s": round(time.monotonic() - started, 1),
        "l4proxy_implementation": implementation,
        "failures": failures,
        "verdicts": [v.__dict__ for v in verdicts],
        "profile": prof.__dict__ if prof else None,
    }
    report.write_json(args.json, samples, summaries, mem_results, meta)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(text)
    print(f"bench: raw numbers in {args.json}", file=sys.stderr)
    return 1 if failures and not samples else 0


def _l4proxy_implementation() -> str:
    """Which twins l4proxy runs (compiled or pure peek/pump), as it would choose them."""
    try:
        from l4proxy.dataplane import peek, pump

        return f"peek={peek.IMPLEMENTATION} pump={pump.IMPLEMENTATION}"
    except Exception as exc:  # l4proxy itself broken: the run says so elsewhere
        return f"unknown ({exc})"


if __name__ == "__main__":
    sys.exit(main())
