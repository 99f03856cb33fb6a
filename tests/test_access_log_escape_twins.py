"""The compiled relay's log_escape() (through ``HttpRelay._log_escape``, for
tests) byte for byte against its twin, accesslog.escape(): a seeded fuzz of
values built to hit every rule of "Escaping" (printable ASCII, quotes and
backslashes, C0 controls, DEL, C1 controls, valid UTF-8 at its range
edges, bytes of no valid character: overlong forms, surrogates, past
U+10FFFF, cut sequences), at lengths around the caps, cut at the end or
with the end kept (X-Forwarded-For's elements: commas, spaces, tabs),
TEXT and JSON, a value on one header line or several (the compiled relay
joins them by ``,``; the pure twin is given them joined). The worker tests
compare whole lines of a few chosen values; this compares the escaping
alone, on thousands.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from l4proxy.dataplane import accesslog as al
from tests.conftest import load_twin

SEED = 20240517
CASES = 10000

# the pieces a value is made of, by kind (each one character or one stray byte)
ASCII = [bytes((b,)) for b in range(0x20, 0x7F)]
QUOTES = [b'"', b"\\"]
C0 = [bytes((b,)) for b in range(0x20)]
DEL = [b"\x7f"]
C1 = [bytes((0xC2, b)) for b in range(0x80, 0xA0)]
VALID = [  # (the edges of each length's ranges, and a few of the common)
    chr(cp).encode()
    for cp in (
        *(0xA0, 0xFF, 0x100, 0x7FF, 0x800, 0xFFF, 0x1000, 0xD7FF, 0xE000, 0xFFFD, 0xFFFF),
        *(0x10000, 0x3FFFF, 0x40000, 0xFFFFF, 0x100000, 0x10FFFF, 0x4E2D, 0x65E5, 0x1F600),
    )
]
INVALID = (
    [bytes((b,)) for b in (0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xF0, 0xF4)]
    + [bytes((b,)) for b in range(0xF5, 0x100)]
    + [
        b"\xc0\x80",  # overlong NUL
        b"\xc1\xbf",
        b"\xe0\x80\x80",  # overlong
        b"\xe0\x9f\xbf",
        b"\xed\xa0\x80",  # a surrogate
        b"\xed\xbf\xbf",
        b"\xf0\x80\x80\x80",  # overlong
        b"\xf0\x8f\xbf\xbf",
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xf4\x8f\xbf",  # cut short
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\xc2",
        b"\xe2\x28\xa1",  # a second byte that continues nothing
    ]
)
ELEMENTS = [b",", b", ", b" ,", b"\t", b" ", b",,", b", \t"]
KINDS = [ASCII, QUOTES, C0, DEL, C1, VALID, INVALID, ELEMENTS]
WEIGHTS = [8, 1, 1, 1, 1, 3, 2, 2]


@pytest.fixture(scope="module")
def relay() -> Iterator[Any]:
    """A compiled relay, never started: its _log_escape() is all we call."""
    r = load_twin("relay", "compiled").HttpRelay(lambda head, origin: None, lambda *a: None)
    yield r
    r.close()


def _value(rng: random.Random, escaped: int, kinds: list[list[bytes]]) -> bytes:
    """Pieces of *kinds* until the value is about *escaped* bytes escaped
    (text: the longer of the two formats, roughly)."""
    out = bytearray()
    weights = [WEIGHTS[KINDS.index(k)] for k in kinds]
    size = 0
    while size < escaped:
        piece = rng.choice(rng.choices(kinds, weights)[0])
        out += piece
        size += 4 * len(piece) if piece[0] < 0x20 or piece[0] >= 0x7F else len(piece)
    return bytes(out)


def _spans(rng: random.Random, value: bytes) -> list[bytes]:
    """*value* as a header's lines: split at some of its commas (the
    compiled relay joins the lines by one), one line most often."""
    if rng.random() < 0.6 or b"," not in value:
        return [value]
    parts = value.split(b",")
    spans = [parts[0]]
    for part in parts[1:]:
        if len(spans) < 16 and rng.random() < 0.5:
            spans.append(part)
        else:
            spans[-1] += b"," + part
    return spans


def _case(rng: random.Random) -> tuple[list[bytes], int, bool, bool]:
    cap = rng.choice([*al.CAPS.values(), 14, 15, 16, 17, 20, 24, 40, 64])
    if cap > 300 and rng.random() < 0.8:  # (the long ones: fewer, they cost the most)
        cap = rng.choice([32, 64, 128])
    # escaped lengths around the cap: under, at, just past, far past
    target = rng.choice([rng.randrange(cap + 1), cap - 1, cap, cap + 1, cap + rng.randrange(1, 9)])
    target = max(0, target if rng.random() < 0.9 else 2 * cap)
    kinds = rng.sample(KINDS, rng.randrange(1, len(KINDS) + 1))
    value = _value(rng, target, kinds)
    return _spans(rng, value), cap, rng.random() < 0.5, rng.random() < 0.5


@pytest.mark.parametrize("json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("keep_end", [False, True], ids=["cut", "end"])
def test_chosen_values_escape_alike(relay: Any, json: bool, keep_end: bool) -> None:
    """A value of each kind alone, and mixed, at a cap it fits and one it
    does not: the same bytes from both twins."""
    values = [
        b"",
        b"plain",
        b'say "hi" \\ bye',
        bytes(range(0x20)) + b"\x7f",
        b"".join(C1),
        b"".join(VALID),
        b"".join(INVALID),
        b"10.0.0.1, 10.0.0.2,\t10.0.0.3 ,10.0.0.4",
        b"\xe4\xb8\xad" * 40,
        b"a," * 100,
    ]
    for value in values:
        for cap in (14, 15, 32, 64, 256):
            want = al.escape(value, cap, json, keep_end)
            assert relay._log_escape([value], cap, json, keep_end) == want, (value, cap)


def test_a_seeded_fuzz_escapes_alike(relay: Any) -> None:
    """CASES values (seeded): the compiled escape's bytes are the pure
    one's, never past the cap (_log_escape checks its block); what differs
    is named with the case that shows it."""
    rng = random.Random(SEED)
    cut = kept = 0
    for i in range(CASES):
        spans, cap, json, keep_end = _case(rng)
        joined = b",".join(spans)
        want = al.escape(joined, cap, json, keep_end)
        got = relay._log_escape(spans, cap, json, keep_end)
        assert got == want, (i, spans, cap, json, keep_end)
        assert len(want) <= cap, (i, spans, cap)
        if want.endswith(al.TRUNCATED) and not keep_end:
            cut += 1
        elif want.startswith(al.TRUNCATED) and keep_end:
            kept += 1
    # the fuzz reached both cuts often (a generator that never passed a cap
    # would compare nothing that matters)
    assert cut > CASES // 10 and kept > CASES // 10, (cut, kept)
