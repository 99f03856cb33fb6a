"""The report: a table of medians with ratios to HAProxy and to direct, targets, JSON.

Ratios are always taken inside one placement group (loopback, sidecar) and
one case, against that group's ``haproxy`` and ``direct`` rows measured in
the same run: absolute numbers on a shared 2-core machine are noise, ratios
measured side by side are not (design.md, "Peers to measure against").

For req/s a ratio above 1 is better; for latency and CPU, below 1.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.measure import Case, Sample, Summary
from bench.memory import MemoryResult

MB = 1024 * 1024

# Issue 11's targets (the per-request data plane), checked for every l4proxy
# row at this concurrency. The reference peer per mode: in keep-alive the
# better of HAProxy's tcp and http modes, with Connection: close HAProxy's
# http mode (it reuses upstream connections; its tcp mode cannot).
TARGET_CONNECTIONS = 50
RPS_VS_HAPROXY = 1.0
P99_VS_HAPROXY = 1.2
RPS_VS_ENVOY_HTTP = 4.0
REFERENCES = {"keepalive": ("haproxy", "haproxy-http"), "close": ("haproxy-http",)}
# judged against them: per request (the default) and per connection
L4PROXY_PEERS = ("l4proxy-request", "l4proxy")
# round-by-round pairs: each reference with the ratio the issue asks for
PAIRED_GOALS: dict[str, tuple[tuple[str, float], ...]] = {
    "keepalive": (("haproxy", 1.0), ("haproxy-http", 1.0), ("envoy-http", 4.0)),
    "close": (("haproxy-http", 1.0),),
}


def group_of(target: str) -> tuple[str, str]:
    group, _, peer = target.rpartition("/")
    return (group or "loopback"), peer


def ratio(value: float, reference: float | None) -> float | None:
    if reference is None or not reference or math.isnan(reference) or math.isnan(value):
        return None
    return value / reference


@dataclass
class Row:
    summary: Summary
    vs_haproxy: dict[str, float | None]
    vs_direct: dict[str, float | None]


FIGURES = ("rps", "p50_ms", "p99_ms", "cpu_per_10k")


def rows(summaries: Sequence[Summary]) -> list[Row]:
    index = {(s.target, s.case): s for s in summaries}
    out = []
    for s in summaries:
        group, _ = group_of(s.target)
        prefix = "" if group == "loopback" else f"{group}/"
        refs = {
            "haproxy": index.get((f"{prefix}haproxy", s.case)),
            "direct": index.get((f"{prefix}direct", s.case)),
        }
        ratios: dict[str, dict[str, float | None]] = {}
        for name, ref in refs.items():
            ratios[name] = {
                f: ratio(getattr(s, f), getattr(ref, f) if ref else None) for f in FIGURES
            }
        out.append(Row(s, ratios["haproxy"], ratios["direct"]))
    return out


def _num(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratios(a: float | None, b: float | None) -> str:
    def one(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    return f"{one(a)} / {one(b)}"


def _pipe_table(
    header: Sequence[str], body: Sequence[Sequence[str]], text_cols: int = 0
) -> list[str]:
    """A markdown table; the first *text_cols* columns left-aligned, numbers right."""
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < text_cols else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    sep = (
        "|"
        + "|".join(
            (":" + "-" * (w + 1)) if i < text_cols else ("-" * (w + 1) + ":")
            for i, w in enumerate(widths)
        )
        + "|"
    )
    return [line(header), sep, *(line(r) for r in body)]


def table(all_rows: Sequence[Row], order: Sequence[str]) -> str:
    """One markdown table per placement group; ratio cells are ×HAProxy / ×direct."""
    rank = {name: i for i, name in enumerate(order)}
    out: list[str] = []
    for group in ("loopback", "sidecar"):
        mine = [r for r in all_rows if group_of(r.summary.target)[0] == group]
        if not mine:
            continue
        mine.sort(
            key=lambda r: (
                r.summary.case.mode != "keepalive",
                r.summary.case.connections,
                rank.get(r.summary.target, 99),
            )
        )
        header = ["mode", "conns", "peer", "req/s", "×hap / ×dir", "p50 ms", "×hap / ×dir"]
        header += ["p99 ms", "×hap / ×dir", "cpu s/10k", "×hap / ×dir"]
        body = []
        for r in mine:
            s, h, d = r.summary, r.vs_haproxy, r.vs_direct
            peer = group_of(s.target)[1] + ("!" if s.errors else "")
            body.append(
                [
                    s.case.mode,
                    str(s.case.connections),
                    peer,
                    _num(s.rps),
                    _ratios(h["rps"], d["rps"]),
                    _num(s.p50_ms),
                    _ratios(h["p50_ms"], d["p50_ms"]),
                    _num(s.p99_ms),
                    _ratios(h["p99_ms"], d["p99_ms"]),
                    _num(s.cpu_per_10k),
                    _ratios(h["cpu_per_10k"], d["cpu_per_10k"]),
                ]
            )
        title = {
            "loopback": "loopback (gateway placement; wrk → proxy → nginx on 127.0.0.1)",
            "sidecar": "sidecar (pods; wrk uid 1000 → REDIRECT → proxy uid 1337 → backend pod)",
        }[group]
        out += [f"### {title}", "", *_pipe_table(header, body, text_cols=3), ""]
    if any(r.summary.errors for r in all_rows):
        out.append("`!`: wrk reported socket errors or non-2xx answers (see the JSON).")
    out.append("cpu s/10k: CPU seconds of the proxy (for direct: the backend) per 10k requests.")
    return "\n".join(out)


def memory_table(results: Sequence[MemoryResult]) -> str:
    if not results:
        return ""
    haproxy = next((m for m in results if m.target == "haproxy"), None)
    header = ["peer", "procs", "held", "RSS before MB", "RSS held MB", "PSS held MB", "KB/conn"]
    header += [f"RSS @{results[0].requested} MB", "×hap"]
    body = []
    for m in results:
        vs = ratio(m.rss_at_requested, haproxy.rss_at_requested if haproxy else None)
        body.append(
            [
                m.target,
                str(m.processes),
                str(m.held),
                f"{m.rss_before / MB:.1f}",
                f"{m.rss_held / MB:.1f}",
                f"{m.pss_held / MB:.1f}",
                f"{m.per_connection / 1024:.2f}",
                f"{m.rss_at_requested / MB:.1f}",
                "-" if vs is None else f"{vs:.2f}",
            ]
        )
    lines = ["### memory: idle client connections and their upstreams", ""]
    lines += _pipe_table(header, body, text_cols=1)
    if any(m.held < m.requested for m in results):
        lines.append(
            f"held < {results[0].requested}: the hard fd limit allows no more "
            "(2 fds per proxied connection); the last column extrapolates linearly."
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Verdict:
    target: str
    what: str
    value: float | None
    goal: str
    met: bool | None  # None: not measured

    def line(self) -> str:
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[self.met]
        shown = "-" if self.value is None else f"{self.value:.3f}"
        return f"{mark} {self.target:<18} {self.what:<40} {shown:>7} (goal {self.goal})"


def verdicts(all_rows: Sequence[Row], memory: Sequence[MemoryResult]) -> list[Verdict]:
    """Issue 11's targets for each l4proxy placement measured."""
    by_key = {(r.summary.target, r.summary.case): r for r in all_rows}
    out: list[Verdict] = []
    for target in sorted(
        {r.summary.target for r in all_rows if r.summary.target.endswith(L4PROXY_PEERS)}
    ):
        group, _ = group_of(target)
        prefix = "" if group == "loopback" else f"{group}/"
        for mode, names in REFERENCES.items():
            case = Case(mode, TARGET_CONNECTIONS)
            mine = by_key.get((target, case))
            refs = [r for n in names if (r := by_key.get((prefix + n, case)))]
            ref = max(refs, key=lambda r: r.summary.rps) if refs else None
            label = "/".join(names)
            rps = ratio(mine.summary.rps, ref.summary.rps) if mine and ref else None
            p99 = ratio(mine.summary.p99_ms, ref.summary.p99_ms) if mine and ref else None
            out.append(
                Verdict(
                    target,
                    f"{mode} c{TARGET_CONNECTIONS} req/s ×best({label})",
                    rps,
                    f"≥ {RPS_VS_HAPROXY}",
                    None if rps is None else rps >= RPS_VS_HAPROXY,
                )
            )
            out.append(
                Verdict(
                    target,
                    f"{mode} c{TARGET_CONNECTIONS} p99 ×best({label})",
                    p99,
                    f"≤ {P99_VS_HAPROXY}",
                    None if p99 is None else p99 <= P99_VS_HAPROXY,
                )
            )
        if group == "loopback":
            mine = by_key.get((target, Case("keepalive", TARGET_CONNECTIONS)))
            envoy = by_key.get(("envoy-http", Case("keepalive", TARGET_CONNECTIONS)))
            vs = ratio(mine.summary.rps, envoy.summary.rps) if mine and envoy else None
            out.append(
                Verdict(
                    target,
                    f"keepalive c{TARGET_CONNECTIONS} req/s ×envoy-http",
                    vs,
                    f"≥ {RPS_VS_ENVOY_HTTP}",
                    None if vs is None else vs >= RPS_VS_ENVOY_HTTP,
                )
            )
    mem = {m.target: m for m in memory}
    for name in (n for n in L4PROXY_PEERS if n in mem):
        mine_mb = mem[name].rss_at_requested / MB
        hap = mem.get("haproxy")
        hap_mb = hap.rss_at_requested / MB if hap else None
        vs = ratio(mine_mb, hap_mb)
        out.append(Verdict(name, "RSS ×haproxy", vs, "≤ 1.0", None if vs is None else vs <= 1.0))
        # Informational: PSS splits the pages l4proxy's supervisor and worker
        # share, which summed RSS counts twice (HAProxy is one process).
        pss = ratio(mem[name].pss_held, hap.pss_held if hap else None)
        out.append(
            Verdict(
                name,
                "PSS ×haproxy (same count held)",
                pss,
                "≤ 1.0",
                None if pss is None else pss <= 1.0,
            )
        )
    return out


# Two-sided 95 % critical values of Student's t, by degrees of freedom (1..30).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_T95 += (2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
_T95 += (2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Paired:
    """l4proxy's req/s over a peer's, round by round (the rounds interleave the
    peers, so a slow spell of the machine hits both sides of a pair): the
    geometric mean of the per-round ratios and its 95 % interval, read
    against the ratio the target asks for (*goal*)."""

    target: str
    case: Case
    peer: str
    ratios: tuple[float, ...]
    goal: float = 1.0

    @property
    def mean(self) -> float:
        return math.exp(statistics.fmean(math.log(r) for r in self.ratios))

    @property
    def interval(self) -> tuple[float, float] | None:
        n = len(self.ratios)
        if n < 3:
            return None
        logs = [math.log(r) for r in self.ratios]
        half = _T95[min(n - 1, len(_T95)) - 1] * statistics.stdev(logs) / math.sqrt(n)
        mid = statistics.fmean(logs)
        return math.exp(mid - half), math.exp(mid + half)

    @property
    def reading(self) -> str:
        """ahead / behind when the interval lies above / below the goal, else
        within noise."""
        iv = self.interval
        if iv is None:
            return "too few rounds"
        if iv[0] > self.goal:
            return "ahead"
        if iv[1] < self.goal:
            return "behind"
        return "within noise"

    def line(self) -> str:
        iv = self.interval
        shown = "" if iv is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"
        what = f"{self.target} {self.case} ÷ {self.peer}"
        reading = self.reading + (f" of {self.goal:g}" if self.goal != 1.0 else "")
        return f"{what:<48} {self.mean:.3f} {shown:<16} n={len(self.ratios):<3} {reading}"

    def as_dict(self) -> dict[str, object]:
        iv = self.interval
        return {
            "target": self.target,
            "mode": self.case.mode,
            "connections": self.case.connections,
            "peer": self.peer,
            "ratios": list(self.ratios),
            "mean": self.mean,
            "interval": list(iv) if iv else None,
            "goal": self.goal,
            "reading": self.reading,
        }


def paired(samples: Sequence[Sample]) -> list[Paired]:
    """Round-by-round req/s ratios of each l4proxy row at the targets'
    concurrency to the peers of its placement that a target names (PAIRED_GOALS)."""
    rps: dict[tuple[str, Case], dict[int, float]] = {}
    for s in samples:
        if s.wrk.rps > 0:
            rps.setdefault((s.target, s.case), {})[s.round] = s.wrk.rps
    out = []
    for (target, case), mine in sorted(rps.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if case.connections != TARGET_CONNECTIONS or not target.endswith(L4PROXY_PEERS):
            continue
        group, _ = group_of(target)
        prefix = "" if group == "loopback" else f"{group}/"
        for peer, goal in PAIRED_GOALS.get(case.mode, ()):
            theirs = rps.get((prefix + peer, case), {})
            ratios = tuple(mine[r] / theirs[r] for r in sorted(mine) if r in theirs)
            if ratios:
                out.append(Paired(target, case, peer, ratios, goal))
    return out


def write_json(
    path: str,
    samples: Sequence[Sample],
    summaries: Sequence[Summary],
    memory: Sequence[MemoryResult],
    meta: dict[str, Any],
) -> None:
    doc = {
        "meta": {"machine": platform.node(), "cpus": os.cpu_count(), **meta},
        "summaries": [s.as_dict() for s in summaries],
        "paired": [p.as_dict() for p in paired(samples)],
        "samples": [s.as_dict() for s in samples],
        "memory": [m.as_dict() for m in memory],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
