"""The compiled loop splits a request head once: summarize() reads the
header lines where the scan found them (scan_into()'s Lines) when the call
that completed the head judged them all, and splits them again with memchr
otherwise. Both ways must give the same summary, byte for byte."""

from __future__ import annotations

import random

import pytest

from l4proxy.dataplane._relay_py import Decision
from tests.conftest import load_twin

NAMES = [
    "Host",
    "content-length",
    "Transfer-Encoding",
    "connection",
    "Keep-Alive",
    "proxy-connection",
    "TE",
    "expect",
    "upgrade",
    "x-forwarded-for",
    "X-Forwarded-Proto",
    "x-request-id",
    "x-user",
    "X-B",
    "x-other",
    "accept",
]
VALUES = [
    "",
    "1",
    "12, 12",
    "chunked",
    "close",
    "keep-alive, te",
    "trailers",
    "100-continue",
    "websocket",
    "10.0.0.1, 10.0.0.2",
    "https",
    "a b",
    "svc:8080",
]


def _head(rng: random.Random) -> tuple[bytes, int]:
    """A request head the scan takes whole, with 0 to 40 header lines (the
    Lines hold 32), and its count of header lines. (Its lines end in
    CRLF: a bare LF is refused; empty lines before it may end in one.)"""
    eol = "\r\n"
    lead = rng.choice(["", "", "\r\n", "\n", "\r\n\r\n"])
    lines = []
    for _ in range(rng.randrange(0, 41)):
        ows = rng.choice(["", " ", "\t", "  ", " \t"])
        value = rng.choice(VALUES) + rng.choice(["", "", " ", "\t"])
        lines.append(f"{rng.choice(NAMES)}:{ows}{value}{eol}")
    method = rng.choice(["GET", "POST", "HEAD", "DELETE"])
    line = f"{method} /{rng.randrange(1000)}?q={rng.randrange(10)} HTTP/1.{rng.choice([0, 1])}"
    return f"{lead}{line}{eol}{''.join(lines)}{eol}".encode(), len(lines)


def _chunks(rng: random.Random, n: int) -> list[int]:
    """Pieces to scan the head in: whole, in two (the second often the
    header lines alone), or many small ones."""
    kind = rng.randrange(3)
    if kind == 0:
        return []
    if kind == 1:
        return [rng.randrange(1, n)]
    return [rng.randrange(1, 20) for _ in range(n // 5 + 1)]


@pytest.mark.parametrize("keys", [[], ["x-user", "x-b"]])
def test_the_lines_the_scan_found_summarize_as_a_split_does(keys: list[str]) -> None:
    relay = load_twin("relay", "compiled").HttpRelay(
        lambda h, o: Decision(), lambda *a: None, key_headers=keys
    )
    rng = random.Random(11)
    used = split = 0
    try:
        for _ in range(4000):
            head, n_lines = _head(rng)
            chunks = _chunks(rng, len(head))
            gateway = rng.random() < 0.5
            whole, agree = relay._split_once(head, chunks, gateway)
            assert agree, (head, chunks, gateway, whole)
            if n_lines > 32:
                assert not whole, head
            used += whole
            split += not whole
    finally:
        relay.close()
    # both ways were taken, often
    assert used > 1000 and split > 1000, (used, split)
