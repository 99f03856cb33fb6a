"""Counters and their Prometheus text exposition (``/stats``).

Counters are plain dicts keyed by label tuples: the event loop is the only
writer, so no locking. The pump keeps its own counters in its thread; they
are read through ``Pump.stats()`` when ``/stats`` is rendered.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
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


class Counters:
    def __init__(self) -> None:
        self._values: dict[str, dict[LabelSet, float]] = defaultdict(lambda: defaultdict(float))
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] += amount

    def add(self, name: str, labels: Mapping[str, str], amount: float = 1) -> None:
        """``inc`` with the labels as a mapping."""
        self.inc(name, amount, **labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

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

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            super().set(name, value, **labels)

    def snapshot(self) -> dict[str, dict[LabelSet, float]]:
        with self._lock:
            return super().snapshot()


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
    lines: list[str] = []
    names = sorted(set(values) | set(help_) | set(extra))
    for name in names:
        kind, text = help_.get(name, ("untyped", ""))
        if text:
            lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        if name in extra:
            lines.append(f"{name} {_fmt_value(extra[name])}")
        series = values.get(name, {})
        if not series and name not in extra:
            lines.append(f"{name} 0")
        for labels, v in sorted(series.items()):
            lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}")
    return "\n".join(lines) + "\n"


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
