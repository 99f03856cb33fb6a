"""Counters and their Prometheus text exposition (``/stats``).

Counters are plain dicts keyed by label tuples: the event loop is the only
writer, so no locking. The pump keeps its own counters in its thread; they
are read through ``Pump.stats()`` when ``/stats`` is rendered.

Theory of operation: a histogram is one series, never its buckets
-----------------------------------------------------------------
A histogram series (``istio_request_duration_milliseconds``: 19 buckets,
+Inf, ``_sum`` and ``_count``) is kept as one :class:`Histogram` per label
set: its bounds, a vector of cumulative bucket counts, its count and its
sum. It is expanded into Prometheus' samples, one line per bucket with the
label set and its ``le``, only as the page is written. Kept expanded, as
it was, each series was 22 label sets of ~25 labels each in the worker,
22 rows of JSON with all of those labels on the control channel, 22 rows
again per worker in the supervisor and 22 lines in a list before the page
was joined: with 444 series (a gateway in front of a backend answering
every status code), a scrape of an 8.6 MB page took the supervisor from 18
MB to 330 MB, past the pod's limit, and 2 to 5 seconds.

A :class:`Sample` is what a scrape reads of counters: their series and
their histograms, compact, summed over workers (:meth:`Sample.add`) without
expanding. The supervisor has it from each worker in a compact form too
(:mod:`l4proxy.sidecar._stats_wire`: each label name and value once, each
label set once, a histogram as one row of numbers); :class:`Exposition`
writes the page from it a family header or a series at a time
(:meth:`Exposition.pieces`), which the admin endpoint encodes into one
buffer: the page is held once, as bytes, and nothing else of it.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
import time
from array import array
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class Histogram:
    """One series of a histogram family: ``buckets[i]`` observations at
    most ``bounds[i]`` (ascending; cumulative, as Prometheus writes them),
    ``count`` in all (the +Inf bucket's) and ``total`` their sum. The
    buckets are an array of doubles (8 bytes each, where a list held a
    float object of 24 and its pointer: they are most of what a scrape
    keeps)."""

    __slots__ = ("bounds", "buckets", "count", "total")

    def __init__(
        self,
        bounds: tuple[float, ...],
        buckets: array[float] | None = None,
        count: float = 0.0,
        total: float = 0.0,
    ) -> None:
        self.bounds = bounds
        self.buckets = array("d", [0.0]) * len(bounds) if buckets is None else buckets
        self.count = count
        self.total = total

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (self.bounds, self.buckets, self.count, self.total) == (
            other.bounds,
            other.buckets,
            other.count,
            other.total,
        )

    def __repr__(self) -> str:
        return f"Histogram({self.bounds}, {list(self.buckets)}, {self.count}, {self.total})"

    def copy(self) -> Histogram:
        return Histogram(self.bounds, array("d", self.buckets), self.count, self.total)

    def add(self, other: Histogram) -> None:
        """*other*'s observations on top of these. Of other bounds (a row
        that had fewer buckets), each bucket of either is summed over those
        that have it, as their ``le`` samples were: the bounds become both's."""
        if other.bounds == self.bounds:
            mine = self.buckets
            for i, n in enumerate(other.buckets):
                mine[i] += n
        else:
            merged = dict(zip(self.bounds, self.buckets, strict=True))
            for le, n in zip(other.bounds, other.buckets, strict=True):
                merged[le] = merged.get(le, 0.0) + n
            self.bounds = tuple(sorted(merged))
            self.buckets = array("d", (merged[le] for le in self.bounds))
        self.count += other.count
        self.total += other.total


@dataclass
class Sample:
    """Counted series at one moment, compact (module docstring): each
    family's series by label set, and each histogram family's series as
    :class:`Histogram`\\ s. What a worker's counters hold, what it sends
    the supervisor, and what the supervisor sums over its workers."""

    series: dict[str, dict[LabelSet, float]] = field(default_factory=dict)
    histograms: dict[str, dict[LabelSet, Histogram]] = field(default_factory=dict)

    def add(self, other: Sample, most: Callable[[str], bool] = lambda name: False) -> None:
        """*other*'s counts on top of these: summed per series, or for a
        family *most* names (a per-worker state), the most of either. Its
        histograms are copied, never shared: *other* may change later."""
        for name, theirs in other.series.items():
            mine = self.series.setdefault(name, {})
            if most(name):
                for key, v in theirs.items():
                    mine[key] = max(mine.get(key, v), v)
            else:
                for key, v in theirs.items():
                    mine[key] = mine.get(key, 0.0) + v
        for family, hists in other.histograms.items():
            held = self.histograms.setdefault(family, {})
            for key, h in hists.items():
                m = held.get(key)
                if m is None:
                    held[key] = h.copy()
                else:
                    m.add(h)

    def without(self, drop: Callable[[str], bool]) -> Sample:
        """This sample less the series families *drop* names (shared, not copied)."""
        return Sample(
            {name: s for name, s in self.series.items() if not drop(name)}, self.histograms
        )

    def expanded(self) -> dict[str, dict[LabelSet, float]]:
        """Every sample by name and label set, as Prometheus reads them: a
        histogram's ``_bucket`` (with ``le``, +Inf too), ``_sum`` and
        ``_count`` each a family of its own (``/stats?format=json``, and
        what tests read). Its size is the page's: not for a scrape."""
        out = {name: dict(s) for name, s in self.series.items()}
        for family, hists in self.histograms.items():
            buckets = out.setdefault(family + "_bucket", {})
            sums = out.setdefault(family + "_sum", {})
            counts = out.setdefault(family + "_count", {})
            for key, h in hists.items():
                for le, n in zip(h.bounds, h.buckets, strict=True):
                    buckets[_with_le(key, _fmt_value(le))] = n
                buckets[_with_le(key, "+Inf")] = h.count
                sums[key] = h.total
                counts[key] = h.count
        return out


class Counters:
    def __init__(self) -> None:
        self._values: dict[str, dict[LabelSet, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[LabelSet, Histogram]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._labelled: set[str] = set()

    def describe(self, name: str, kind: str, help_text: str, labelled: bool = False) -> None:
        """*name*'s TYPE and HELP. *labelled*: its series have labels, so
        that while it has none /stats writes its HELP and TYPE alone (as
        Prometheus clients and Envoy do), where an unlabelled one's is
        ``NAME 0`` (a sample without labels beside a family's labelled
        ones is one more series: ``max by (file)`` shows a ``file=""``)."""
        self._help[name] = (kind, help_text)
        if labelled:
            self._labelled.add(name)
        else:
            self._labelled.discard(name)

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
        them at most ``bounds[i]`` (ascending) and above the bound before
        (a count past the last bound is +Inf's alone). Kept as one
        :class:`Histogram` and written as Prometheus clients write a
        histogram: every bucket, cumulative, zeros included (a series
        slower than the largest finite bound had only ``le="+Inf"``, and a
        reader could not tell where the finite buckets end), +Inf equal to
        ``_count``. Rows of a family share *bounds* (one tuple, not a copy
        per series)."""
        n = min(len(bounds), len(counts))
        row_bounds = tuple(bounds) if n == len(bounds) else tuple(bounds[:n])
        series = self._histograms[family]
        h = series.get(key)
        if h is None:
            h = series[key] = Histogram(row_bounds)
        if h.bounds == row_bounds:
            running = 0
            buckets = h.buckets
            for i in range(n):
                running += counts[i]
                buckets[i] += running
            h.count += count
            h.total += total
        else:
            running = 0
            cumulative = array("d")
            for i in range(n):
                running += counts[i]
                cumulative.append(running)
            h.add(Histogram(row_bounds, cumulative, count, total))

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][label_set(labels)] = value

    def discard(self, name: str, **labels: str) -> None:
        """Drop the series of *name* with *labels* (one of a thing gone: a
        gauge left at 0 for ever, a series per name ever seen)."""
        series = self._values.get(name)
        if series is not None:
            series.pop(label_set(labels), None)

    def _named(self, name: str) -> Mapping[LabelSet, float]:
        """The series of *name*, a histogram's ``_bucket``, ``_sum`` or
        ``_count`` too."""
        series = self._values.get(name)
        if series is not None:
            return series
        for part in _HISTOGRAM_PARTS:
            family = name.removesuffix(part)
            if family != name and family in self._histograms:
                sample = Sample({}, {family: self._histograms[family]})
                return sample.expanded().get(name, {})
        return {}

    def get(self, name: str, **labels: str) -> float:
        return self._named(name).get(label_set(labels), 0)

    def total(self, name: str) -> float:
        return sum(self._named(name).values())

    def help(self) -> dict[str, tuple[str, str]]:
        return dict(self._help)

    def labelled(self) -> frozenset[str]:
        """The families described as labelled (:meth:`describe`)."""
        return frozenset(self._labelled)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Writes that a snapshot must see all or none of (a histogram's
        buckets, +Inf, _sum and _count); nothing to do with one writer."""
        yield

    def sample(self) -> Sample:
        """A copy of what is counted now, compact (what a scrape reads)."""
        return Sample(
            {k: dict(v) for k, v in self._values.items()},
            {k: {key: h.copy() for key, h in v.items()} for k, v in self._histograms.items()},
        )

    def snapshot(self) -> dict[str, dict[LabelSet, float]]:
        """What is counted now, every sample by name (:meth:`Sample.expanded`)."""
        return self.sample().expanded()

    def render(self, extra: Mapping[str, float] | None = None) -> str:
        return Exposition(self.sample(), self._help, extra or {}, self._labelled).text()


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

    def _named(self, name: str) -> Mapping[LabelSet, float]:
        with self._lock:
            return dict(super()._named(name))

    def sample(self) -> Sample:
        with self._lock:
            return super().sample()


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
    "l4proxy_access_log_reopen_failures_total": (
        _C,
        "Access log reopens (SIGUSR1) that failed, the lines going on to the file open before.",
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


def _label_text(labels: Iterable[tuple[str, str]]) -> str:
    """``name="value",...`` (escaped as the text format says), no braces."""
    parts = []
    for k, v in labels:
        v = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return ",".join(parts)


def _fmt_labels(labels: Iterable[tuple[str, str]]) -> str:
    text = _label_text(labels)
    return "{" + text + "}" if text else ""


def _fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _histogram_text(family: str, key: LabelSet, h: Histogram) -> str:
    """The lines of one histogram series: its buckets by bound (``le`` in
    its sorted place among the labels), +Inf (its count), ``_sum`` and
    ``_count``. The label set is escaped once, not once per bucket."""
    i = bisect.bisect_left(key, ("le", ""))
    before, after = _label_text(key[:i]), _label_text(key[i:])
    opening = f'{family}_bucket{{{before}{"," if before else ""}le="'
    closing = f'"{"," if after else ""}{after}}} '
    lines = [
        f"{opening}{_fmt_value(le)}{closing}{_fmt_value(n)}\n"
        for le, n in zip(h.bounds, h.buckets, strict=True)
    ]
    lines.append(f"{opening}+Inf{closing}{_fmt_value(h.count)}\n")
    labels = _fmt_labels(key)
    lines.append(f"{family}_sum{labels} {_fmt_value(h.total)}\n")
    lines.append(f"{family}_count{labels} {_fmt_value(h.count)}\n")
    return "".join(lines)


class Exposition:
    """A ``/stats`` page to write: *sample* (counted series), *gauges*
    (read now, unlabelled), each family with its HELP and TYPE from
    *help_*, else :data:`METRIC_HELP`. A family without series is its
    HELP and TYPE, and a sample ``NAME 0`` unless *labelled* names it (a
    family whose series have labels: :meth:`Counters.describe`).

    Families go out in name order, a family's series in label-set order.
    A histogram's ``_bucket``, ``_sum`` and ``_count`` go out as its one
    family (TYPE histogram, named without the suffix), each label set's
    buckets in ``le`` order, +Inf last, then its sum and count. The
    sample's series of a histogram's parts, each sample apart (as
    :func:`render_prometheus` is given them), are taken as its histogram's.
    """

    def __init__(
        self,
        sample: Sample,
        help_: Mapping[str, tuple[str, str]],
        gauges: Mapping[str, float],
        labelled: Collection[str] = frozenset(),
    ) -> None:
        self.help = help_
        self.gauges = gauges
        self.labelled = labelled
        folded = {name for name in sample.series if self._histogram_of(name, sample.histograms)}
        if folded:  # (hand-made samples only: counters keep a histogram whole)
            sample = _fold(sample, folded, self._histogram_of)
        self.sample = sample

    def described(self, name: str) -> tuple[str, str]:
        return self.help.get(name) or METRIC_HELP.get(name) or ("untyped", "")

    def _histogram_of(self, name: str, histograms: Mapping[str, object]) -> str | None:
        """The histogram family whose ``_bucket``, ``_sum`` or ``_count``
        *name* is; None for any other."""
        for part in _HISTOGRAM_PARTS:
            base = name.removesuffix(part)
            if base != name and (base in histograms or self.described(base)[0] == "histogram"):
                return base
        return None

    def pieces(self, keep: Callable[[str], bool] | None = None) -> Iterator[str]:
        """The page's text, a family's header or one series at a time;
        with *keep*, the families whose name it takes (``/stats?filter=``:
        a histogram by its family's name, with its parts)."""
        series, hists, gauges = self.sample.series, self.sample.histograms, self.gauges
        families: set[str] = set(hists)  # (a histogram's parts under its one name)
        for name in set(series) | set(self.help) | set(gauges):
            base = self._histogram_of(name, hists)
            if base is not None:
                families.add(base)
            elif self.described(name)[0] != "histogram":
                families.add(name)
        for family in sorted(families):
            if keep is not None and not keep(family):
                continue
            kind, text = self.described(family)
            if family in hists:
                kind = "histogram"
            head = f"# HELP {family} {text}\n" if text else ""
            head += f"# TYPE {family} {kind}\n"
            if kind == "histogram":
                yield head
                of_family = hists.get(family, {})
                for key in sorted(of_family):
                    yield _histogram_text(family, key, of_family[key])
                continue
            values = series.get(family, {})
            if family in gauges:
                head += f"{family} {_fmt_value(gauges[family])}\n"
            elif not values and family not in self.labelled:
                head += f"{family} 0\n"
            yield head
            for key in sorted(values):
                yield f"{family}{_fmt_labels(key)} {_fmt_value(values[key])}\n"

    def text(self, keep: Callable[[str], bool] | None = None) -> str:
        return "".join(self.pieces(keep))

    def json(self) -> dict[str, Any]:
        """``/stats?format=json``: each gauge's value, and each family's
        samples as ``[{"labels": ..., "value": ...}]``, a histogram's
        buckets, sum and count each a family."""
        out: dict[str, Any] = dict(self.gauges)
        for name, values in self.sample.expanded().items():
            out[name] = [{"labels": dict(k), "value": v} for k, v in values.items()]
        return out


def _fold(
    sample: Sample, names: set[str], histogram_of: Callable[[str, Mapping[str, object]], str | None]
) -> Sample:
    """*sample* with the series *names* (histograms' parts, each sample
    apart) taken as their histograms' series: each label set's ``le``
    samples by bound (+Inf, and an ``le`` that is not a number, as its
    count where it has no ``_count``)."""
    out = Sample(
        {k: v for k, v in sample.series.items() if k not in names}, dict(sample.histograms)
    )
    parts: dict[str, dict[str, Mapping[LabelSet, float]]] = defaultdict(dict)
    for name in names:
        family = histogram_of(name, sample.histograms)
        assert family is not None
        parts[family][name.removeprefix(family)] = sample.series[name]
    for family, of in parts.items():
        les: dict[LabelSet, dict[float, float]] = defaultdict(dict)
        for labels, v in of.get("_bucket", {}).items():
            key = tuple(kv for kv in labels if kv[0] != "le")
            try:
                le = float(dict(labels).get("le", "+Inf"))
            except ValueError:
                le = math.inf
            les[key][le] = v
        sums, counts = of.get("_sum", {}), of.get("_count", {})
        held = out.histograms[family] = dict(out.histograms.get(family, {}))
        for key in set(les) | set(sums) | set(counts):
            finite = sorted(le for le in les.get(key, {}) if le != math.inf)
            count = counts.get(key, les.get(key, {}).get(math.inf, 0.0))
            h = Histogram(
                tuple(finite),
                array("d", (les[key][le] for le in finite)),
                count,
                sums.get(key, 0.0),
            )
            if key in held:
                held[key] = held[key].copy()
                held[key].add(h)
            else:
                held[key] = h
    return out


def render_prometheus(
    values: Mapping[str, Mapping[LabelSet, float]],
    help_: Mapping[str, tuple[str, str]],
    extra: Mapping[str, float],
) -> str:
    """The Prometheus text exposition (:class:`Exposition`) of *values*
    (counted series, each sample apart: a histogram's ``_bucket`` with
    ``le``, ``_sum``, ``_count``) and *extra* (gauges read now)."""
    sample = Sample({name: dict(series) for name, series in values.items()})
    return Exposition(sample, help_, extra).text()


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
