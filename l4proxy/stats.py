"""Counters and their Prometheus text exposition (``/stats``).

Counters are plain dicts keyed by label tuples: the event loop is the only
writer, so no locking. The pump keeps its own counters in its thread; they
are read through ``Pump.stats()`` when ``/stats`` is rendered.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

LabelSet = tuple[tuple[str, str], ...]

# The standard gauge of Prometheus clients: when the process serving /stats
# started (Unix time). Its counters count from then: a reader that sees it
# change knows they started again from 0, whatever their values (a sidecar
# restarted within an interval may show every counter higher than before).
START_TIME = "process_start_time_seconds"
START_TIME_HELP = ("gauge", "Start time of the process since unix epoch in seconds.")
_STARTED = time.time()


def process_start_time() -> float:
    """This process's :data:`START_TIME` (when this module was first imported)."""
    return _STARTED


def label_set(labels: Mapping[str, str]) -> LabelSet:
    """*labels* as a series' key: sorted by name."""
    return tuple(sorted(labels.items()))


def _with_le(key: LabelSet, le: str) -> LabelSet:
    """*key* (no ``le`` in it) with ``le`` put in its sorted place."""
    i = bisect.bisect_left(key, ("le", ""))
    return (*key[:i], ("le", le), *key[i:])


class Counters:
    def __init__(self) -> None:
        self._values: dict[str, dict[LabelSet, float]] = defaultdict(lambda: defaultdict(float))
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._values[name][label_set(labels)] += amount

    def add(self, name: str, labels: Mapping[str, str], amount: float = 1) -> None:
        """``inc`` with the labels as a mapping."""
        self.inc(name, amount, **labels)

    def add_set(self, name: str, key: LabelSet, amount: float = 1) -> None:
        """``add`` with the labels as a series' key (:func:`label_set`),
        sorted once by the caller for several series."""
        self._values[name][key] += amount

    def add_histogram(
        self,
        family: str,
        key: LabelSet,
        bounds: Sequence[float],
        counts: Sequence[int],
        count: float,
        total: float,
    ) -> None:
        """One row of histogram *family* under *key* (:func:`label_set`):
        *count* observations whose values sum to *total*, ``counts[i]`` of
        them at most ``bounds[i]`` and above the bound before (a count past
        the last bound is +Inf's alone). Written as Prometheus clients write
        a histogram: every bucket, cumulative, zeros included (a series
        slower than the largest finite bound had only ``le="+Inf"``, and a
        reader could not tell where the finite buckets end), +Inf equal to
        ``_count``."""
        buckets = self._values[family + "_bucket"]
        running = 0
        for le, n in zip(bounds, counts, strict=False):
            running += n
            buckets[_with_le(key, _fmt_value(le))] += running
        buckets[_with_le(key, "+Inf")] += count
        self._values[family + "_sum"][key] += total
        self._values[family + "_count"][key] += count

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][label_set(labels)] = value

    def discard(self, name: str, **labels: str) -> None:
        """Drop the series of *name* with *labels* (one of a thing gone: a
        gauge left at 0 for ever, a series per name ever seen)."""
        series = self._values.get(name)
        if series is not None:
            series.pop(label_set(labels), None)

    def get(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(label_set(labels), 0)

    def total(self, name: str) -> float:
        return sum(self._values.get(name, {}).values())

    def help(self) -> dict[str, tuple[str, str]]:
        return dict(self._help)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Writes that a snapshot must see all or none of (a histogram's
        buckets, +Inf, _sum and _count); nothing to do with one writer."""
        yield

    def snapshot(self) -> dict[str, dict[LabelSet, float]]:
        return {k: dict(v) for k, v in self._values.items()}

    def render(self, extra: Mapping[str, float] | None = None) -> str:
        return render_prometheus(self.snapshot(), self._help, extra or {})


class LockedCounters(Counters):
    """Counters written by another thread (the per-request relay's) and read
    by the event loop: each write and each snapshot holds a lock."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            yield

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            super().inc(name, amount, **labels)

    def add_set(self, name: str, key: LabelSet, amount: float = 1) -> None:
        with self._lock:
            super().add_set(name, key, amount)

    def add_histogram(
        self,
        family: str,
        key: LabelSet,
        bounds: Sequence[float],
        counts: Sequence[int],
        count: float,
        total: float,
    ) -> None:
        with self._lock:
            super().add_histogram(family, key, bounds, counts, count, total)

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            super().set(name, value, **labels)

    def discard(self, name: str, **labels: str) -> None:
        with self._lock:
            super().discard(name, **labels)

    def snapshot(self) -> dict[str, dict[LabelSet, float]]:
        with self._lock:
            return super().snapshot()


# The HELP and TYPE of the families a sidecar exports that are not
# described where they are counted (the gauges of /stats, read from the
# pump, the relay and the rule watcher when it is rendered): a family
# without either went out untyped, which promtool flags and Prometheus
# types as "unknown". A description given to Counters.describe() wins.
_C, _G = "counter", "gauge"
METRIC_HELP: dict[str, tuple[str, str]] = {
    "l4proxy_active_connections": (_G, "Client connections open now (relayed, in handshake)."),
    "l4proxy_relayed_connections_total": (_C, "Connections relayed at L4 (byte level)."),
    "l4proxy_bytes_upstream_total": (_C, "Bytes relayed at L4 from clients to upstreams."),
    "l4proxy_bytes_downstream_total": (_C, "Bytes relayed at L4 from upstreams to clients."),
    "l4proxy_resets_total": (_C, "L4 connections ended by a reset from either side."),
    "l4proxy_idle_timeouts_total": (_C, "L4 connections closed for --idle-timeout."),
    "l4proxy_pump_errors_total": (_C, "L4 connections ended by a socket error."),
    "l4proxy_spliced_connections_total": (_C, "L4 connections that moved bytes by splice(2)."),
    "l4proxy_pipes_in_use": (_G, "Splice pipes in use."),
    "l4proxy_pipes_pooled": (_G, "Splice pipes pooled for reuse."),
    "l4proxy_pipe_refusals_total": (
        _C,
        "Times a direction got no splice pipe (--max-pipes, EMFILE) and copied instead.",
    ),
    "l4proxy_urgent_marks_total": (_C, "Urgent (MSG_OOB) marks crossed, relayed inline."),
    "l4proxy_rules_generation": (
        _G,
        "Rule loads that went live in this process (lowest worker's).",
    ),
    "l4proxy_rules_digest": (_G, "Which rule files are served (-1: the workers differ)."),
    "l4proxy_reloads_total": (_C, "Rule loads that went live."),
    "l4proxy_reload_failures_total": (_C, "Rule loads refused (the last good rules serve)."),
    "l4proxy_rules_valid": (_G, "1 when the last rule load went live, 0 when it was refused."),
    "l4proxy_rules_warnings": (
        _G,
        "Warnings of the rules served (a route attached to nothing, a binding dropped, a server "
        "not served: /config_dump's notes); validate --strict fails on them.",
    ),
    "l4proxy_workers": (_G, "Worker processes running."),
    "l4proxy_worker_restarts_total": (_C, "Workers started again after they ended."),
    "l4proxy_worker_spawn_failures_total": (_C, "Worker starts that failed."),
    "l4proxy_control_channel_resets_total": (
        _C,
        "Workers replaced for a malformed control frame.",
    ),
    "l4proxy_control_late_answers_total": (_C, "Control answers that came too late, dropped."),
    "l4proxy_http_connections_total": (_C, "Client connections the per-request relay took."),
    "l4proxy_http_requests_total": (_C, "Requests the per-request relay routed or answered."),
    "l4proxy_http_local_answers_total": (
        _C,
        "Requests answered by the proxy itself (404, 503, a redirect, ...).",
    ),
    "l4proxy_http_spliced_bodies_total": (_C, "Bodies moved by splice(2)."),
    "l4proxy_http_metrics_dropped_total": (
        _C,
        "Requests, decisions or copies the compiled relay's metrics rows could not count.",
    ),
    "l4proxy_http_verdict_cache_hits_total": (_C, "Requests routed by a cached verdict."),
    "l4proxy_http_verdict_cache_misses_total": (_C, "Requests whose verdict Python gave."),
    "l4proxy_http_mirrored_total": (_C, "Mirrored copies started."),
    "l4proxy_http_mirror_dropped_total": (
        _C,
        "Mirrored copies not sent (the in-flight cap, a body over the replay limit, ...).",
    ),
    "l4proxy_http_mirror_failed_total": (
        _C,
        "Mirrored copies that failed (connect, send, receive, deadline).",
    ),
    "l4proxy_http_mirror_active": (_G, "Mirrored copies in flight."),
    "l4proxy_http_mirror_idle": (_G, "Idle pooled connections to mirrors."),
    "l4proxy_http_mirror_connects_total": (_C, "Connections opened to mirrors."),
    "l4proxy_upstream_pool_opened_total": (_C, "Upstream connections opened."),
    "l4proxy_upstream_pool_reused_total": (_C, "Requests sent on a pooled upstream connection."),
    "l4proxy_upstream_pool_returned_total": (
        _C,
        "Upstream connections back to idle after a response.",
    ),
    "l4proxy_upstream_pool_closed_unreusable_total": (
        _C,
        "Upstream connections closed after a response that allows no reuse.",
    ),
    "l4proxy_upstream_pool_closed_max_requests_total": (
        _C,
        "Upstream connections closed at --pool-max-requests (maxRequestsPerConnection).",
    ),
    "l4proxy_upstream_pool_closed_overflow_total": (
        _C,
        "Upstream connections closed because the idle pool was full.",
    ),
    "l4proxy_upstream_pool_evicted_total": (_C, "Idle upstream connections the server closed."),
    "l4proxy_upstream_pool_expired_total": (
        _C,
        "Idle upstream connections closed past --pool-idle-timeout.",
    ),
    "l4proxy_upstream_pool_closed_removed_total": (
        _C,
        "Upstream connections closed because their endpoint left the rules.",
    ),
    "l4proxy_upstream_pool_idle": (_G, "Idle pooled upstream connections."),
    "l4proxy_upstream_rq_retry_total": (_C, "Retries of routes' retry policies."),
    "l4proxy_access_log_lines_total": (_C, "Access log lines written (--access-log)."),
    "l4proxy_access_log_dropped_total": (
        _C,
        "Access log lines dropped: the buffer was full (the log's reader is slow) or made none.",
    ),
    "l4proxy_access_log_write_errors_total": (
        _C,
        "Access log writes that failed, their lines lost.",
    ),
    "istio_request_duration_milliseconds": (
        "histogram",
        "Request durations by source, destination and response code (ms).",
    ),
    "istio_tcp_connections_opened_total": (
        _C,
        "TCP connections relayed at L4, by source and destination, counted when relayed.",
    ),
    "istio_tcp_connections_closed_total": (
        _C,
        "TCP connections relayed at L4 that ended, by source and destination.",
    ),
    "istio_tcp_received_bytes_total": (
        _C,
        "Bytes from clients to upstreams of TCP connections, counted at their end.",
    ),
    "istio_tcp_sent_bytes_total": (
        _C,
        "Bytes from upstreams to clients of TCP connections, counted at their end.",
    ),
    "l4proxy_mirror_request_duration_milliseconds": (
        "histogram",
        "Mirrored copies' durations by the mirror's service and version, and answer code (ms).",
    ),
}
_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def _fmt_labels(labels: Iterable[tuple[str, str]]) -> str:
    parts = []
    for k, v in labels:
        v = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def render_prometheus(
    values: Mapping[str, Mapping[LabelSet, float]],
    help_: Mapping[str, tuple[str, str]],
    extra: Mapping[str, float],
) -> str:
    """The Prometheus text exposition of *values* (counted series) and
    *extra* (gauges read now), each family with its HELP and TYPE from
    *help_*, else :data:`METRIC_HELP`. A histogram's ``_bucket``, ``_sum``
    and ``_count`` series go out as its one family (TYPE histogram, named
    without the suffix), each label set's buckets in ``le`` order, +Inf
    last, then its sum and count."""

    def described(name: str) -> tuple[str, str]:
        return help_.get(name) or METRIC_HELP.get(name) or ("untyped", "")

    def histogram_of(name: str) -> str | None:
        for part in _HISTOGRAM_PARTS:
            base = name.removesuffix(part)
            if base != name and described(base)[0] == "histogram":
                return base
        return None

    families: set[str] = set()  # (a histogram's parts under its one name)
    for name in set(values) | set(help_) | set(extra):
        base = histogram_of(name)
        if base is not None:
            families.add(base)
        elif described(name)[0] != "histogram":
            families.add(name)
    lines: list[str] = []
    for family in sorted(families):
        kind, text = described(family)
        if text:
            lines.append(f"# HELP {family} {text}")
        lines.append(f"# TYPE {family} {kind}")
        if kind == "histogram":
            lines += _histogram_lines(family, values)
            continue
        name = family
        if name in extra:
            lines.append(f"{name} {_fmt_value(extra[name])}")
        series = values.get(name, {})
        if not series and name not in extra:
            lines.append(f"{name} 0")
        for labels, v in sorted(series.items()):
            lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}")
    return "\n".join(lines) + "\n"


def _le(labels: LabelSet) -> float:
    """A bucket's bound (``le``; +Inf and a malformed one last)."""
    value = dict(labels).get("le", "+Inf")
    try:
        return float(value)
    except ValueError:
        return math.inf


def _histogram_lines(family: str, values: Mapping[str, Mapping[LabelSet, float]]) -> list[str]:
    """The series of histogram *family*: per label set (but ``le``), its
    buckets by bound, then its ``_sum`` and ``_count``."""
    sums = values.get(family + "_sum", {})
    counts = values.get(family + "_count", {})
    buckets: dict[LabelSet, list[tuple[LabelSet, float]]] = defaultdict(list)
    for labels, v in values.get(family + "_bucket", {}).items():
        buckets[tuple(kv for kv in labels if kv[0] != "le")].append((labels, v))
    lines = []
    for key in sorted(set(buckets) | set(sums) | set(counts)):
        for labels, v in sorted(buckets.get(key, ()), key=lambda lv: _le(lv[0])):
            lines.append(f"{family}_bucket{_fmt_labels(labels)} {_fmt_value(v)}")
        if key in sums:
            lines.append(f"{family}_sum{_fmt_labels(key)} {_fmt_value(sums[key])}")
        if key in counts:
            lines.append(f"{family}_count{_fmt_labels(key)} {_fmt_value(counts[key])}")
    return lines


# -- which rules a sidecar serves -------------------------------------------------
GENERATION = "l4proxy_rules_generation"
DIGEST = "l4proxy_rules_digest"
DIGEST_DISAGREE = -1  # the supervisor's digest while its workers serve different files


@dataclass(frozen=True)
class RulesMark:
    """Which rules a sidecar serves, as its ``/stats`` says.

    ``generation`` (the lowest over the workers) counts rule loads per
    process and starts again at 1 in a restarted worker: a change made
    while one restarted left the lowest generation at or below its value
    before the change although the change was live. ``digest`` names the
    files the tables were loaded from (the same in every worker that loaded
    the same files; DIGEST_DISAGREE while they differ; None from an l4proxy
    that had no digest). A writer reads the mark, changes the files, and
    waits until the mark it reads is :meth:`past` the first.
    """

    generation: int
    digest: int | None = None

    @classmethod
    def of(cls, values: Mapping[str, float | None]) -> RulesMark | None:
        """From /stats' unlabelled values by name (None: not an l4proxy).
        A value that is not a finite number (NaN, +Inf: not l4proxy's) is
        taken as absent; int() of it raised ValueError or OverflowError."""
        gen, digest = (values.get(name) for name in (GENERATION, DIGEST))
        if gen is None or not math.isfinite(gen):
            return None
        return cls(int(gen), None if digest is None or not math.isfinite(digest) else int(digest))

    @classmethod
    def parse(cls, text: str) -> RulesMark | None:
        """From /stats' Prometheus text."""
        found: dict[str, float | None] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in (GENERATION, DIGEST):
                with contextlib.suppress(ValueError):
                    found[name] = float(value.split()[0])
        return cls.of(found)

    def past(self, before: RulesMark) -> bool:
        """Every worker serves files other than those of *before*."""
        if self.digest is None or before.digest is None:
            return self.generation > before.generation
        if self.digest in (DIGEST_DISAGREE, 0):
            return False  # workers on different files, or one that loaded none
        if before.digest == DIGEST_DISAGREE:  # which files came before is unknown
            return self.generation > before.generation
        return self.digest != before.digest
