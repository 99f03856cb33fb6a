"""A :class:`~l4proxy.stats.Sample` on the control channel: what a worker
answers the supervisor's ``stats`` with, and how each side works on it a
slice at a time.

The form (JSON): each label name and value once, each label set once, a
histogram series one row of numbers::

    strings     every label name and value, once
    sets        each label set: indices into strings, name, value, name, ...
    series      {family: [set, value, set, value, ...]}
    bounds      each histogram's bounds, once: [[b0, b1, ...], ...]
    histograms  {family: [[set, bounds, count, sum, bucket0, bucket1, ...], ...]}

1,000 Istio series of ~25 labels (with their 1,000 histograms) are ~300
KB, where a row per bucket with all its labels made 19 MB, and 444 series
took the supervisor past its pod's memory limit (see l4proxy.stats).

Both sides are generators that yield after every :data:`SLICE` series:
:func:`in_slices` runs one a slice per turn of the event loop, so that a
/ready or the watchdog's ping meanwhile waits for a slice, not for the
whole; :func:`at_once` runs one to its end.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Generator
from typing import Any, TypeVar

from l4proxy.stats import Histogram, LabelSet, Sample

T = TypeVar("T")

SLICE = 200  # series encoded or decoded between two turns of the event loop


def encode_sample(sample: Sample) -> Generator[None, None, dict[str, Any]]:
    """*sample* as the control channel carries it (module docstring); yields after
    every :data:`SLICE` series (:func:`in_slices`)."""
    strings: dict[str, int] = {}
    sets: dict[LabelSet, int] = {}
    set_rows: list[list[int]] = []

    def index(key: LabelSet) -> int:
        i = sets.get(key)
        if i is None:
            i = sets[key] = len(set_rows)
            row = []
            for k, v in key:
                row.append(strings.setdefault(k, len(strings)))
                row.append(strings.setdefault(v, len(strings)))
            set_rows.append(row)
        return i

    done = 0
    series: dict[str, list[float]] = {}
    for name, values in sample.series.items():
        flat = series[name] = []
        for key, v in values.items():
            flat += (index(key), v)
            done += 1
            if done % SLICE == 0:
                yield
    bounds: dict[tuple[float, ...], int] = {}
    histograms: dict[str, list[list[float]]] = {}
    for family, hists in sample.histograms.items():
        rows = histograms[family] = []
        for key, h in hists.items():
            b = bounds.setdefault(h.bounds, len(bounds))
            rows.append([index(key), b, h.count, h.total, *h.buckets])
            done += 1
            if done % SLICE == 0:
                yield
    return {
        "strings": list(strings),
        "sets": set_rows,
        "series": series,
        "bounds": [list(b) for b in bounds],
        "histograms": histograms,
    }


def decode_sample(wire: Any, shared: dict[Any, Any]) -> Generator[None, None, Sample]:
    """The Sample :func:`encode_sample` made *wire* of; yields after
    every :data:`SLICE` series. Label names, values, label sets and bounds
    equal to one in *shared* are that one (kept once for several workers'
    answers: give each answer of a scrape the same dict). Raises
    ValueError, KeyError, IndexError or TypeError for what is not of that
    form."""
    strings = [shared.setdefault(s, s) for s in wire["strings"]]
    if not all(isinstance(s, str) for s in strings):
        raise ValueError("a label name or value that is not a string")
    sets: list[LabelSet] = []
    for row in wire["sets"]:
        if len(row) % 2:
            raise ValueError("a label set of a name without its value")
        pairs = []
        for i in range(0, len(row), 2):
            pair = (strings[row[i]], strings[row[i + 1]])
            pairs.append(shared.setdefault(pair, pair))
        key = tuple(pairs)
        sets.append(shared.setdefault(key, key))
    sample = Sample()
    done = 0
    for name, flat in wire["series"].items():
        values = sample.series[name] = {}
        for i in range(0, len(flat) - 1, 2):
            values[sets[flat[i]]] = float(flat[i + 1])
            done += 1
            if done % SLICE == 0:
                yield
    bounds = []
    for b in wire["bounds"]:
        t = tuple(float(x) for x in b)
        bounds.append(shared.setdefault(t, t))
    for family, rows in wire["histograms"].items():
        hists = sample.histograms[family] = {}
        for row in rows:
            of = bounds[row[1]]
            buckets = array("d", row[4:])
            if len(buckets) != len(of):
                raise ValueError(f"{family}: {len(buckets)} buckets for {len(of)} bounds")
            hists[sets[row[0]]] = Histogram(of, buckets, float(row[2]), float(row[3]))
            done += 1
            if done % SLICE == 0:
                yield
    return sample


def at_once(steps: Generator[None, None, T]) -> T:
    """What a sliced generator (:func:`encode_sample`, ...) returns, run to its end."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result


async def in_slices(steps: Generator[None, None, T]) -> T:
    """What a sliced generator returns, run a slice per turn of the event
    loop: what the loop has to do meanwhile (a /ready, a connection to
    route) waits for a slice at most, not for the whole."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result
        await asyncio.sleep(0)
