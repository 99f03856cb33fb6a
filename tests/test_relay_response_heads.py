"""The compiled loop's response head recogniser, response_head(), judges the
common header line 32 bytes at a time (its name, ":" and first control byte
from one load; line_fast() in ext/relay.pyx) and any other line byte by
byte. Both ways must give the same verdict, byte for byte, on every input;
and where the loop takes a head itself (a final head, or an interim one
alone), the verdict must be what Python makes of it when the loop hands it
over (HttpRelay._response: parse_response_head(), response_framing(),
response_hop_by_hop()); a head Python would refuse is handed over, never
taken. Random heads and random mutations of them, seeded: lines of every
length around the 16- and 32-byte windows, last lines close to the end of
what was read, every kind of byte where the windows read at once."""

from __future__ import annotations

import random
from typing import Any

import pytest

from l4proxy.dataplane._exchange_py import response_hop_by_hop
from l4proxy.dataplane._framing_py import (
    Framing,
    FramingError,
    RequestHead,
    bodiless_head,
    parse_response_head,
    response_framing,
)
from l4proxy.dataplane._relay_py import Decision
from tests.conftest import load_twin

HOP_LINES, HOP_NAMED, HOP_KEEP, HOP_CLOSE = 1, 2, 4, 8

NAMES = [
    "Content-Length",
    "content-length",
    "CONTENT-LENGTH",
    "Transfer-Encoding",
    "transfer-encoding",
    "Connection",
    "connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Upgrade",
    "Server",
    "Date",
    "Content-Type",
    "ETag",
    "Vary",
    "X-A",
    "a",
    "Cache-Control",
    "Last-Modified",
    "X-Request-Id",
    "Access-Control-Allow-Origin",  # (longer than 15: byte by byte)
    "Strict-Transport-Security",
    "x_under",  # a token byte the 32-byte window does not take
    "x.dot",
    "X~1",
]
BAD_NAMES = ["", " X", "X ", "a b", "X(", "@x", "x\x7f", "\xe9t\xe9", "x\x00", "x\ty"]
VALUES = [
    "",
    "0",
    "2",
    "12",
    "0012",
    "1234567890",
    "123456789012345678",
    "1234567890123456789",
    "1, 1",
    "-1",
    "+1",
    "1 2",
    "chunked",
    "CHUNKED",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    "close",
    "Close",
    "keep-alive",
    "Keep-Alive",
    "keep-alive, close",
    "keep-alive, te",
    "upgrade",
    "x-a, x-b",
    ", ,close,",
    "timeout=5, max=100",
    "nginx/1.22.1",
    "Mon, 07 Dec 2026 00:55:52 GMT",
    "text/plain",
    "a\tb",
    '"6537cac7-264"',
    "h2c",
    "x" * 30,
    "y" * 70,
]
REASONS = ["OK", "", "No Content", "Not Modified", "Some Long Reason Phrase Here", "a\tb", "\xe9"]
STATUSES = [
    "200",
    "204",
    "304",
    "100",
    "101",
    "103",
    "199",
    "404",
    "500",
    "999",
    "099",
    "20",
    "2x0",
]


def _latin(s: str) -> bytes:
    return s.encode("latin-1")


def _line(rng: random.Random) -> bytes:
    """A header line, mostly well formed, its end included."""
    kind = rng.random()
    if kind < 0.05:
        name = rng.choice(BAD_NAMES)
    elif kind < 0.10:
        name = "".join(rng.choice("abcdefghij-XYZ0123456789") for _ in range(rng.randrange(1, 40)))
    else:
        name = rng.choice(NAMES)
    if rng.random() < 0.03:  # obs-fold: a line that starts with whitespace
        name = rng.choice([" ", "\t"]) + name
    value = rng.choice(VALUES)
    if rng.random() < 0.3:
        value = "v" * rng.randrange(0, 48)
    ows1 = rng.choice(["", " ", " ", " ", "  ", "\t", " \t"])
    ows2 = rng.choice(["", "", "", "", " ", "\t"])
    colon = ":" if rng.random() > 0.02 else rng.choice(["", " :", "::"])
    eol = rng.choice(["\r\n"] * 20 + ["\n", "\r\r\n", "\r"])
    return _latin(f"{name}{colon}{ows1}{value}{ows2}{eol}")


def _clean_line(rng: random.Random, framing: list[str]) -> bytes:
    """A header line as most servers send them (at most one framing line
    a head: *framing* holds the one sent)."""
    name = rng.choice(CLEAN_NAMES)
    if name.lower() in ("content-length", "transfer-encoding"):
        if framing:
            name = "X-After-" + framing[0]
        framing.append(name)
    value = {
        "content-length": str(rng.choice([0, 2, 3, 612, 10**12])),
        "transfer-encoding": "chunked",
        "connection": rng.choice(["keep-alive", "close", "Keep-Alive", "upgrade", "x-a"]),
    }.get(name.lower(), "v" * rng.randrange(0, 60))
    return _latin(f"{name}:{rng.choice(['', ' ', ' ', ' ', '  '])}{value}\r\n")


CLEAN_NAMES = [
    "Content-Length",
    "content-length",
    "Transfer-Encoding",
    "Connection",
    "Server",
    "Date",
    "Content-Type",
    "ETag",
    "X-A",
    "Cache-Control",
    "Last-Modified",
    "X-Request-Id",
    "Access-Control-Allow-Origin",
    "x_under",
]


def _head(rng: random.Random) -> bytes:
    """A response head (its status line, 0 to 12 header lines, its end),
    the start of a body after it, and then cut short at times: half of
    them as most servers send them."""
    clean = rng.random() < 0.5
    version = rng.choice(["1.1"] * 6 + ["1.0", "1.0", "2.0", "1.2", "0.9"])
    status = rng.choice(STATUSES[:4] * 4 + STATUSES)
    reason = rng.choice(REASONS)
    sp = " " if rng.random() > 0.03 else rng.choice(["", "  ", "\t"])
    status_line = f"HTTP/{version}{sp}{status}" + (f" {reason}" if rng.random() > 0.1 else "")
    if clean:
        status_line = (
            f"HTTP/1.{rng.choice('110')} {rng.choice(['200', '200', '204', '304', '100'])}"
        )
        status_line += rng.choice([" OK", " OK", "", " Some Reason"])
    eol = rng.choice(["\r\n"] * 12 + ["\n"])
    out = _latin(status_line) + _latin("\r\n" if clean else eol)
    framing: list[str] = []
    for _ in range(rng.randrange(0, 13)):
        out += _clean_line(rng, framing) if clean else _line(rng)
    out += _latin(rng.choice(["\r\n"] * 12 + ["\n"]) if not clean else "\r\n")
    out += b"b" * rng.choice([0, 0, 1, 2, 3, 5, 10, 17, 31, 40, 100])
    if rng.random() < 0.15:
        out = out[: rng.randrange(0, len(out) + 1)]
    return out


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    """*raw* with a few bytes replaced, inserted or removed."""
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        if not data:
            break
        at = rng.randrange(len(data))
        byte = rng.choice([0, 9, 10, 13, 32, 58, 127, 128, 255, rng.randrange(256)])
        what = rng.randrange(3)
        if what == 0:
            data[at] = byte
        elif what == 1:
            data.insert(at, byte)
        else:
            del data[at]
    return bytes(data)


def _python_verdict(raw: bytes, head_request: bool, max_head: int) -> Any:
    """What HttpRelay._response makes of *raw*: None (incomplete), "refused",
    or the fields it sets (as response_head() returns them, its result
    first: 1 a final head, 3 an interim one)."""
    try:
        resp = parse_response_head(raw, max_head)
        if resp is None:
            return None
        method = "HEAD" if head_request else "GET"
        req = RequestHead(method, "/", "/", "HTTP/1.1", (), None, 0, True, None, False, False)
        kind, length = response_framing(req, resp)
    except FramingError:
        return "refused"
    if kind == Framing.TUNNEL:
        return "refused"
    hl = resp.head_length
    if 100 <= resp.status < 200:
        return (3, hl, resp.headers)
    tokens = {t.lower() for t in resp.values("connection")}
    persistent = "close" not in tokens and (resp.version != "HTTP/1.0" or "keep-alive" in tokens)
    # (Python says lines and named fields together; the loop tells them apart:
    # a field named is a token but close, keep-alive and upgrade)
    named = bool(tokens - {"", "close", "keep-alive", "upgrade"})
    hop = (
        (HOP_LINES if response_hop_by_hop(raw[:hl]) else 0)
        | (HOP_NAMED if named else 0)
        | (HOP_KEEP if "keep-alive" in tokens else 0)
        | (HOP_CLOSE if "close" in tokens else 0)
    )
    return (1, hl, resp.status, int(kind), length, persistent, hop)


def _agree(relay: Any, raw: bytes, head_request: bool, max_head: int, seen: dict[int, int]) -> None:
    fast = relay._response_head(raw, head_request, True)
    slow = relay._response_head(raw, head_request, False)
    assert fast == slow, (raw, head_request, fast, slow)
    seen[fast[0]] = seen.get(fast[0], 0) + 1
    python = _python_verdict(raw, head_request, max_head)
    r, hl = fast[0], fast[1]
    if r == 0:  # incomplete: so it is to Python
        assert python is None, (raw, fast, python)
    elif r == 2:  # handed over: Python judges it (complete, or refused as too large)
        assert python is not None, (raw, fast)
    elif r == 3:  # an interim head alone
        assert python is not None and python != "refused", (raw, fast, python)
        assert python[0] == 3 and python[1] == hl and not python[2], (raw, fast, python)
    else:
        assert r == 1, (raw, fast)
        assert python is not None and python != "refused", (raw, fast, python)
        _, phl, status, framing, left, persistent, hop = python
        assert (hl, fast[2], fast[3], fast[4], fast[5]) == (phl, status, framing, left, persistent)
        assert fast[6] == hop, (raw, fast, python)
        # a 204's or 304's framing lines, which go, are Python's to drop
        assert bodiless_head(raw[:hl], status) == raw[:hl], (raw, fast)


@pytest.mark.parametrize("max_head", [65536, 300])
def test_response_heads_judged_both_ways_agree_with_python(max_head: int) -> None:
    relay = load_twin("relay", "compiled").HttpRelay(
        lambda h, o: Decision(), lambda *a: None, max_head=max_head
    )
    rng = random.Random(max_head)
    seen: dict[int, int] = {}
    try:
        for i in range(12000):
            raw = _head(rng)
            if i % 3 == 2:
                raw = _mutate(rng, raw)
            _agree(relay, raw, rng.random() < 0.1, max_head, seen)
    finally:
        relay.close()
    # every verdict was reached, the loop's own often (a 204 with a
    # Content-Length, a 204 or 304 with a Transfer-Encoding: Python's, 2)
    assert seen[1] > 1500 and seen[2] > 2000 and seen[0] > 200 and seen[3] > 20, seen


def test_every_byte_at_every_place_of_a_common_head() -> None:
    """Each byte value at each place of nginx's answer head (and of the
    same head with its last line at the end of what was read): the line
    with it judged as the byte by byte path judges it."""
    relay = load_twin("relay", "compiled").HttpRelay(lambda h, o: Decision(), lambda *a: None)
    head = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
        b"Date: Mon, 07 Dec 2026 00:55:52 GMT\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\n"
    )
    seen: dict[int, int] = {}
    try:
        for body in (b"v1\n", b"x" * 40):
            raw = head + body
            for at in range(len(head)):
                for byte in range(256):
                    mutated = raw[:at] + bytes([byte]) + raw[at + 1 :]
                    _agree(relay, mutated, False, 65536, seen)
    finally:
        relay.close()
    assert seen[1] > 10000 and seen[2] > 10000, seen
