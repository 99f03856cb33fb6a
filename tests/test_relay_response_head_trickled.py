"""A response head trickled in (an upstream that writes it a few bytes at a
time: a slow or a slowloris-ish server), through each relay twin on real
sockets: the pure one, the compiled one deciding per request and from a
cached verdict.

Each read of such a head judged it again from its start (the compiled
relay's response_head(), the pure twin's parse_response_head(): a copy and
two searches), so the work grew with the square of its size: a 60 KiB head
in 1-byte writes cost the compiled relay 1.8 s of CPU, the pure one 2.3 s
(0.6 s and 1.2 s now, the reads themselves). Now a read that cannot hold
the head's end (no empty line: an LF, then LF or CR LF) is looked at from
where the last look stopped, and the head is judged once, when its end may
have come. ``response_head_rescan_bytes`` (stats(), both twins) counts the
bytes looked at after the read that began a head: linear in its size,
however it is split. Operations are counted, never timed.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests._scripted import (
    GET,
    Scripted,
    Step,
    _client,
    _closed_stats,
    _proxy,
    _response,
    mode_fixture,  # noqa: F401  (the fixture mode)
)


def _big_head(eol: bytes, lines: int) -> bytes:
    """A response head of *lines* short header lines (about 9 bytes each),
    each line ending in *eol*, then a body of 2 bytes."""
    head = [b"HTTP/1.1 200 OK"] + [b"X-h%d: v" % (i % 100) for i in range(lines)]
    return eol.join([*head, b"Content-Length: 2"]) + eol + eol + b"ok"


def _trickle(answer: bytes, piece: int, pause: float) -> Step:
    """A Scripted step writing *answer* *piece* bytes at a time, each write
    its own segment (TCP_NODELAY), *pause* seconds apart."""

    def step(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(answer), piece):
            conn.sendall(answer[i : i + piece])
            time.sleep(pause)

    return step


def _one(mode: tuple[str, str], step: Step, **kw: Any) -> tuple[bytes, dict[str, int]]:
    """One GET through a relay to a backend answering with *step*: the
    response and the relay's stats."""
    up = Scripted([step])
    relay = _proxy(mode, (up.endpoint,), None, **kw)
    try:
        a = _client(relay)
        a.sendall(GET)
        got = _response(a)
        stats = _closed_stats(a, relay)
    finally:
        relay.close()
        up.close()
    return got, stats


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "bare-lf"])
def test_a_trickled_head_is_looked_at_linearly(mode: tuple[str, str], eol: bytes) -> None:
    """A 16 KiB head of short lines in 16-byte writes (about 1,000 reads):
    answered as its CRLF version, and the bytes looked at past the first
    read stay within twice the head and two per read (each read's new
    bytes and the two before them, then the head once, judged whole),
    where judging it from its start at each read looked at about
    1,000 x 8 KiB = 8 MiB."""
    answer = _big_head(eol, 1700)  # 16 KiB with CRLF, 14 KiB with LF
    piece = 16
    got, stats = _one(mode, _trickle(answer, piece, 0.0005))
    assert got == _big_head(b"\r\n", 1700), got[:200]
    assert stats["errors"] == 0, stats
    head = len(answer) - 2
    reads = -(-len(answer) // piece)
    scanned = stats["response_head_rescan_bytes"]
    assert head <= scanned <= 2 * head + 2 * reads, (scanned, head, reads)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\nok",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    ],
    ids=["crlf", "bare-lf", "lf-crlf", "crlf-lf", "interim", "interim-bare-lf"],
)
def test_a_head_in_one_byte_writes_ends_where_it_ends(mode: tuple[str, str], answer: bytes) -> None:
    """Every split of the empty line that ends a head (LF | LF, LF | CR LF,
    LF CR | LF): the head's end is found when its last byte comes, the
    answer whole, with CRLF line ends (a miss would leave the client
    waiting: _response's timeout)."""
    got, stats = _one(mode, _trickle(answer, 1, 0.002))
    assert got == answer.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), got
    assert stats["errors"] == 0, stats


def test_a_trickled_head_past_max_head_is_refused(mode: tuple[str, str]) -> None:
    """A head that has no end by max_head bytes is refused (502, the same
    reason as in one read): the look for its end does not wait past it."""
    answer = b"HTTP/1.1 200 OK\r\n" + b"X-h: v\r\n" * 700  # 5,617 bytes, no end
    got, _ = _one(mode, _trickle(answer, 64, 0.0005), max_head=4096)
    assert got.startswith(b"HTTP/1.1 502 "), got
    assert b"response head larger than 4096 bytes" in got, got
