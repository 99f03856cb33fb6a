"""Counters and their Prometheus text exposition (``/stats``).

Counters are plain dicts keyed by label tuples: the event loop is the only
writer, so no locking. The pump keeps its own counters in its thread; they
are read through ``Pump.stats()`` when ``/stats`` is rendered.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

LabelSet = tuple[tuple[str, str], ...]


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
