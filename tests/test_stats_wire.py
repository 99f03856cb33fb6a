"""A worker's counters on the control channel (l4proxy.sidecar._stats_wire):
what the supervisor decodes is what the worker counted, a slice at a time."""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest

from l4proxy.sidecar._stats_wire import SLICE, at_once, decode_sample, encode_sample
from l4proxy.stats import Counters, Histogram, label_set


def test_a_sample_crosses_the_channel_whole_a_slice_at_a_time() -> None:
    """What a worker sends the supervisor (encode_sample, JSON, then
    decode_sample) is the sample it counted: label values that need
    escaping, a histogram whose rows had fewer buckets (bounds of its
    own). Each side yields to the event loop once per SLICE series, and
    two workers' answers decoded with one shared table share their label
    sets (the supervisor keeps each once)."""
    c = Counters()
    for i in range(3 * SLICE):
        c.inc("x_total", i, route=f"r{i}", note='say "no"\nnow')
    c.set("y", 0.25)
    c.add_histogram("h", label_set({"a": "1"}), (1, 5), (1, 2, 3), 6, 10.0)
    c.add_histogram("h", label_set({"a": "2"}), (1, 5), (4,), 4, 0.5)  # le 1 only
    c.add_histogram("h", label_set({"a": "2"}), (1, 5), (0, 1), 1, 3.0)
    sample = c.sample()
    # (each le summed over the rows that had it, as their le samples were)
    assert sample.histograms["h"][(("a", "2"),)] == Histogram((1.0, 5.0), _doubles(4, 1), 5, 3.5)

    def yields_and_value(steps: Any) -> tuple[int, Any]:
        n = 0
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return n, stop.value
            n += 1

    sent, wire = yields_and_value(encode_sample(sample))
    wire = json.loads(json.dumps(wire))
    shared: dict[Any, Any] = {}
    taken, got = yields_and_value(decode_sample(wire, shared))
    assert got == sample
    assert sent == taken == (3 * SLICE + 1 + 2) // SLICE
    again = at_once(decode_sample(wire, shared))
    assert all(a is b for a, b in zip(again.series["x_total"], got.series["x_total"], strict=True))


def _doubles(*values: float) -> array[float]:
    return array("d", values)


def test_an_answer_not_of_the_samples_form_is_refused() -> None:
    """A histogram row of more buckets than its bounds, a label set of a
    name without its value: ValueError (the supervisor then counts that
    worker with its last answer), never a page that says something else."""
    c = Counters()
    c.add_histogram("h", label_set({"a": "1"}), (1, 5), (1, 2), 3, 1.0)
    c.inc("x_total", route="r")
    good = json.loads(json.dumps(at_once(encode_sample(c.sample()))))
    longer = json.loads(json.dumps(good))
    longer["histograms"]["h"][0].append(7)
    odd = json.loads(json.dumps(good))
    odd["sets"][0].pop()
    for wire in (longer, odd):
        with pytest.raises(ValueError):
            at_once(decode_sample(wire, {}))
