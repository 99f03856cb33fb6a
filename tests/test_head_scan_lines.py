"""The compiled request-head scanner (scan_into() in ext/_head_scan.pxi,
the relay's and peek.pyx's) takes the common header line at once: a name
of 1 to 15 letters, digits or "-" and its ":" from one 16-byte compare,
then its value's bytes to a CRLF 16 at a time ("Header lines at once"),
where it searched for the LF and judged the name a byte at a time; the
empty line that ends the head at once too. Every other line goes the way
it went. The scan must judge every head as the pure twin's HeadParser
does, fed whole, in two or in small pieces: the same head, or the same
error. Seeded: heads as clients send them
and heads with odd lines (bare LF, obs-fold, bad names and values, long
names, bare CR, NUL, DEL, obs-text), a third mutated a byte at a time."""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

from tests.conftest import load_twin

NAMES = [
    "Host",
    "host",
    "User-Agent",
    "Accept",
    "Accept-Encoding",
    "accept-language",  # (15: the longest taken at once)
    "Content-Length",  # (16 and more: byte by byte)
    "Transfer-Encoding",
    "Connection",
    "X-Forwarded-For",
    "x-request-id",
    "TE",
    "a",
    "X-1",
    "x_under",  # token bytes the 16-byte compare does not take
    "x.dot",
    "X~1",
    "Sec-Fetch-Mode",
    "Upgrade-Insecure-Requests",
]
BAD_NAMES = ["", " X", "X ", "a b", "X(", "@x", "x\x7f", "\xe9t", "x\x00", "x\ty", "x\ry"]
VALUES = [
    "",
    "svc.example:8080",
    "127.0.0.1:41095",
    "curl/8.0",
    "*/*",
    "gzip, deflate, br",
    "keep-alive",
    "close",
    "chunked",
    "12",
    "10.0.0.1, 10.0.0.2",
    "a\tb",
    "\xe9t\xe9",
    "x" * 15,
    "y" * 16,
    "z" * 31,
    "w" * 70,
    "a\rb",
    "a\x00b",
    "a\x7fb",
    "a\x01b",
]


def _latin(s: str) -> bytes:
    return s.encode("latin-1")


def _line(rng: random.Random, odd: bool) -> bytes:
    name = rng.choice(BAD_NAMES) if odd and rng.random() < 0.2 else rng.choice(NAMES)
    if odd and rng.random() < 0.05:
        name = rng.choice([" ", "\t"]) + name  # obs-fold
    value = rng.choice(VALUES[:13] if not odd else VALUES)
    if rng.random() < 0.2:
        value = "v" * rng.randrange(0, 40)
    ows = rng.choice(["", " ", " ", " ", "  ", "\t"])
    tail = rng.choice(["", "", "", " ", "\t"]) if odd else ""
    colon = ":" if not odd or rng.random() > 0.05 else rng.choice(["", " :", "::"])
    eol = rng.choice(["\r\n"] * 8 + ["\n", "\r\r\n"]) if odd else "\r\n"
    return _latin(f"{name}{colon}{ows}{value}{tail}{eol}")


CLEAN_NAMES = ["User-Agent", "Accept", "accept-language", "X-1", "x_under", "Sec-Fetch-Mode", "a"]


def _clean_line(rng: random.Random) -> bytes:
    """A header line as clients send them (no framing or Host line)."""
    value = rng.choice([*VALUES[:5], "*/*", "a\tb", "\xe9t\xe9", "v" * rng.randrange(0, 40)])
    return _latin(f"{rng.choice(CLEAN_NAMES)}:{rng.choice(['', ' ', ' ', '  '])}{value}\r\n")


def _head(rng: random.Random) -> bytes:
    """A request head, 0 to 20 header lines, then a few body bytes at times:
    half of them as clients send them (a Host line among lines of other
    names), half with any line."""
    odd = rng.random() < 0.5
    lead = rng.choice(["", "", "", "\r\n", "\n"]) if odd else ""
    method = rng.choice(["GET", "POST", "HEAD", "OPTIONS", "PRI"] if odd else ["GET", "HEAD"])
    target = rng.choice(["/", "/a?b=c", "*", "http://h/x", "/" + "p" * rng.randrange(60)])
    version = rng.choice(["1.1"] * 6 + ["1.0", "2.0"])
    eol = rng.choice(["\r\n", "\r\n", "\n"]) if odd else "\r\n"
    if not odd:
        target = rng.choice(["/", "/a?b=c", "/" + "p" * rng.randrange(60)])
        version = rng.choice(["1.1", "1.1", "1.0"])
    out = _latin(f"{lead}{method} {target} HTTP/{version}{eol}")
    lines = [_line(rng, True) if odd else _clean_line(rng) for _ in range(rng.randrange(0, 21))]
    if not odd:
        lines.insert(rng.randrange(len(lines) + 1), _latin(f"Host: {rng.choice(VALUES[1:3])}\r\n"))
    out += b"".join(lines)
    out += _latin(eol)
    out += b"b" * rng.choice([0, 0, 0, 1, 5, 16, 40])
    if rng.random() < 0.1:
        out = out[: rng.randrange(1, len(out) + 1)]
    return out


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(data))
        byte = rng.choice([0, 9, 10, 13, 32, 45, 58, 127, 128, 255, rng.randrange(256)])
        what = rng.randrange(3)
        if what == 0:
            data[at] = byte
        elif what == 1:
            data.insert(at, byte)
        elif len(data) > 1:
            del data[at]
    return bytes(data)


def _pieces(rng: random.Random, n: int) -> list[int]:
    kind = rng.randrange(3)
    if kind == 0:
        return [n]
    if kind == 1:
        cut = rng.randrange(1, n) if n > 1 else 1
        return [cut, n - cut]
    return [rng.randrange(1, 24) for _ in range(n // 4 + 2)]


def _judge(mod: ModuleType, raw: bytes, pieces: list[int], max_head: int) -> Any:
    """What *mod*'s HeadParser makes of *raw* fed in *pieces*: the head, the
    error (its class, status and reason) or None (more to come)."""
    parser = mod.HeadParser(max_head)
    at = 0
    out: Any = None
    try:
        for k in pieces:
            if at >= len(raw):
                break
            out = parser.feed(raw[at : at + k])
            at += k
            if out is not None:
                break
    except Exception as e:  # HeadError, NotHTTP: compared by what they say
        out = (type(e).__name__, e.args)
    return out


def test_request_heads_scanned_as_the_pure_twin_scans_them() -> None:
    compiled, pure = load_twin("peek", "compiled"), load_twin("peek", "pure")
    rng = random.Random(4011)
    kinds: dict[str, int] = {}
    for i in range(20000):
        raw = _head(rng)
        if i % 3 == 2:
            raw = _mutate(rng, raw)
        pieces = _pieces(rng, len(raw))
        max_head = rng.choice([65536, 65536, 80])
        got = _judge(compiled, raw, pieces, max_head)
        want = _judge(pure, raw, pieces, max_head)
        assert got == want, (raw, pieces, max_head, got, want)
        kind = "none" if got is None else "head" if type(got).__name__ == "RequestHead" else "error"
        kinds[kind] = kinds.get(kind, 0) + 1
    # heads, refusals and heads not all here, each often
    assert kinds["head"] > 4000 and kinds["error"] > 4000 and kinds["none"] > 500, kinds


def test_every_byte_at_every_place_of_a_browser_head() -> None:
    """Each byte value at each place of a browser's head (its lines at once
    but for the long names): judged as the pure twin judges it."""
    compiled, pure = load_twin("peek", "compiled"), load_twin("peek", "pure")
    head = (
        b"GET /index.html HTTP/1.1\r\nHost: www.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: */*\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\nConnection: keep-alive\r\n\r\n"
    )
    kinds: dict[str, int] = {}
    for at in range(len(head)):
        for byte in range(256):
            raw = head[:at] + bytes([byte]) + head[at + 1 :]
            got = _judge(compiled, raw, [len(raw)], 65536)
            assert got == _judge(pure, raw, [len(raw)], 65536), (raw, got)
            kind = (
                "none"
                if got is None
                else "head"
                if type(got).__name__ == "RequestHead"
                else "error"
            )
            kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds["head"] > 10000 and kinds["error"] > 10000, kinds
