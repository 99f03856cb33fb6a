"""Rounds of wrk runs, interleaved, and their medians.

One *case* is a client behaviour (keep-alive or ``Connection: close``) at a
concurrency. A round runs every case against every target; the order of
targets rotates from round to round so that none always runs first after a
pause (or always right after Envoy warmed the caches). On a shared 2-core
machine absolute numbers drift over minutes; interleaving keeps the drift
out of the ratios, and the median drops the round another job disturbed.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import wrk
from bench.scenarios import Target
from bench.wrk import WrkResult

MODES = ("keepalive", "close")


@dataclass(frozen=True)
class Case:
    mode: str  # "keepalive" | "close"
    connections: int

    def __str__(self) -> str:
        return f"{self.mode} c{self.connections}"


@dataclass(frozen=True)
class Sample:
    target: str
    case: Case
    round: int
    wrk: WrkResult
    cpu_s: float  # CPU seconds the billed process spent during the run

    @property
    def cpu_per_10k(self) -> float:
        return self.cpu_s / self.wrk.requests * 10_000 if self.wrk.requests else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "mode": self.case.mode,
            "connections": self.case.connections,
            "round": self.round,
            "cpu_s": self.cpu_s,
            "cpu_per_10k": self.cpu_per_10k,
            **self.wrk.as_dict(),
        }


@dataclass(frozen=True)
class Summary:
    """Medians over rounds for one target and case."""

    target: str
    case: Case
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_10k: float
    errors: int
    rounds: int

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "mode": self.case.mode,
            "connections": self.case.connections,
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "cpu_per_10k": self.cpu_per_10k,
            "errors": self.errors,
            "rounds": self.rounds,
        }


def cases(modes: Sequence[str], connections: Sequence[int]) -> list[Case]:
    return [Case(m, c) for m in modes for c in connections]


def measure(
    target: Target,
    case: Case,
    duration_s: float,
    threads: int = 1,
    paths: int = 1,
    body: str = "none",
) -> Sample:
    argv = wrk.command(
        target.url,
        case.connections,
        duration_s,
        close=case.mode == "close",
        threads=threads,
        paths=paths,
        body=body,
    )
    before = target.process.cpu_seconds()
    result = wrk.run(argv, target.launcher)
    cpu = target.process.cpu_seconds() - before
    return Sample(target.name, case, 0, result, cpu)


def warm_up(targets: Sequence[Target], duration_s: float = 1.0) -> None:
    """One short keep-alive run each: connection pools, page cache, branch predictors."""
    for t in targets:
        measure(t, Case("keepalive", 50), duration_s)


def run_rounds(
    targets: Sequence[Target],
    all_cases: Sequence[Case],
    rounds: int,
    duration_s: float,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
    paths: int = 1,
    body: str = "none",
) -> list[Sample]:
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    samples: list[Sample] = []
    total = rounds * len(all_cases) * len(targets)
    started = time.monotonic()
    for r in range(rounds):
        for case in all_cases:
            shift = (r + all_cases.index(case)) % len(targets)
            for t in [*targets[shift:], *targets[:shift]]:
                s = measure(t, case, duration_s, threads, paths, body)
                samples.append(Sample(s.target, case, r + 1, s.wrk, s.cpu_s))
                flag = f"  ({s.wrk.errors} errors)" if s.wrk.errors else ""
                say(
                    f"[{len(samples)}/{total} {time.monotonic() - started:5.0f}s] round {r + 1} "
                    f"{case!s:<13} {t.name:<18} {s.wrk.rps:>10.0f} req/s  "
                    f"p99 {s.wrk.p99_ms:7.2f} ms{flag}"
                )
    return samples


def summarize(samples: Sequence[Sample]) -> list[Summary]:
    groups: dict[tuple[str, Case], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.target, s.case), []).append(s)
    return [
        Summary(
            target=target,
            case=case,
            rps=statistics.median(s.wrk.rps for s in group),
            p50_ms=statistics.median(s.wrk.p50_ms for s in group),
            p99_ms=statistics.median(s.wrk.p99_ms for s in group),
            cpu_per_10k=statistics.median(s.cpu_per_10k for s in group),
            errors=sum(s.wrk.errors for s in group),
            rounds=len(group),
        )
        for (target, case), group in groups.items()
    ]
