"""A mirrored copy's answer head trickled in (a mirror that writes it a few
bytes at a time), through each relay twin on real sockets: the pure one,
the compiled one deciding per request and from a cached verdict.

Each read of such a head judged it again from its start (the compiled
relay's shadow_answer_head(), the pure twin's parse_response_head() on the
whole head: a copy and two searches), work that grew with the square of
its size, CPU of the sidecar's spent on an answer it throws away. Now a
read that cannot hold the head's end (no empty line: an LF, then LF or CR
LF) is looked at from where the last look stopped, and the head is judged
once, when its end may have come, as a primary's answer head is (see
tests/test_relay_response_head_trickled.py). ``mirror_head_rescan_bytes``
(stats(), both twins) counts the bytes looked at after the read that began
a copy's answer head: linear in its size, however it is split. Operations
are counted, never timed; a copy's end is waited for by polling the relay's
gauges.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from l4proxy.dataplane.verdict import shadow_head
from tests._scripted import (
    GET,
    OK_BODY,
    Scripted,
    _answer,
    _client,
    _response,
    _until,
    mode_fixture,  # noqa: F401  (the fixture mode)
)
from tests.conftest import accept_until_closed, sent_up
from tests.test_relay_mirror import COPY, _mirrored, _read_request, _Reports, _settled
from tests.test_relay_response_head_trickled import _big_head

Endpoint = tuple[str, int]


class Trickling:
    """A keep-alive mirror answering every request with *answer*, *piece*
    bytes at a time, each write its own segment (TCP_NODELAY), *pause*
    seconds apart; then it reads the next request on the same connection.
    What it saw: requests, connections accepted, and those the relay
    closed (a FIN) or reset while it waited for a request or wrote."""

    def __init__(self, answer: bytes, piece: int, pause: float) -> None:
        self.answer, self.piece, self.pause = answer, piece, pause
        self.requests: list[bytes] = []
        self.accepted = self.ended = self.reset = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint: Endpoint = ("127.0.0.1", self.listener.getsockname()[1])
        accept_until_closed(self.listener, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while (got := _read_request(conn, buf)) is not None:
                request, buf = got
                with self.lock:
                    self.requests.append(request)
                for i in range(0, len(self.answer), self.piece):
                    conn.sendall(self.answer[i : i + self.piece])
                    time.sleep(self.pause)
            with self.lock:
                self.ended += 1
        except (ConnectionResetError, BrokenPipeError):
            with self.lock:
                self.reset += 1
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        self.listener.close()


def _copies(mode: tuple[str, str], mirror: Trickling, n: int, **kw: Any) -> dict[str, int]:
    """*n* GETs, each on a client connection of its own once the copy of
    the one before ended, through a relay mirroring each to *mirror*: each
    answered the primary's 200 whole; the relay's stats at the end, its
    copies' reports (COPY's statuses) under the key "reported"."""
    up, reports = Scripted([]), _Reports()
    with _mirrored(mode, up, mirror, **reports.kw(mode), **kw) as relay:
        for i in range(n):
            a = _client(relay)
            a.sendall(GET)
            assert _response(a) == _answer(200, OK_BODY)
            assert _until(lambda n=i + 1: relay.stats()["mirrored"] == n, 5.0)
            _settled(relay)
            a.close()
        stats = _settled(relay)
        relay.flush_reports()
    assert up.requests == [sent_up(GET)] * n
    assert mirror.requests == [shadow_head(sent_up(GET))] * n
    return {**stats, "reported": reports.of(COPY)}


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "bare-lf"])
def test_a_copys_trickled_answer_head_is_looked_at_linearly(
    mode: tuple[str, str], eol: bytes
) -> None:
    """Two copies, one after the other, each answered a 16 KiB head of
    short lines in 16-byte writes (about 1,000 reads) and a 2-byte body:
    each read to its end (both on one connection, idle after), reported
    200, and the bytes looked at past each head's first read stay within
    twice the head and two per write (each read's new bytes and the two
    before them, then the head once, judged whole), where judging it from
    its start at each read looked at about 1,000 x 8 KiB = 8 MiB a copy."""
    answer = _big_head(eol, 1700)  # 16 KiB with CRLF, 14 KiB with LF
    piece = 16
    mirror = Trickling(answer, piece, 0.0005)
    stats = _copies(mode, mirror, 2)
    assert stats["reported"] == [200, 200]
    assert mirror.accepted == stats["mirror_connects"] == 1
    assert stats["mirror_idle"] == 1
    assert stats["mirror_failed"] == stats["mirror_dropped"] == stats["errors"] == 0
    head = len(answer) - 2
    writes = -(-len(answer) // piece)
    scanned = stats["mirror_head_rescan_bytes"]
    assert 2 * head <= scanned <= 2 * (2 * head + 2 * writes), (scanned, head, writes)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\nok",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nT: 1\r\n\r\n",
    ],
    ids=["crlf", "bare-lf", "lf-crlf", "crlf-lf", "interim", "interim-bare-lf", "chunked"],
)
def test_a_copys_answer_in_one_byte_writes_ends_where_it_ends(
    mode: tuple[str, str], answer: bytes
) -> None:
    """Every split of the empty line that ends a head (LF | LF, LF | CR LF,
    LF CR | LF), after an interim head too: the head's end is found when
    its last byte comes and the answer read to its end by its framing, so
    the second copy goes on the first one's connection (a missed end would
    leave the copy waiting to its deadline, its connection never reused)."""
    mirror = Trickling(answer, 1, 0.001)
    stats = _copies(mode, mirror, 2, timeout=30.0)
    assert stats["reported"] == [200, 200]
    assert mirror.accepted == stats["mirror_connects"] == 1
    assert stats["mirror_idle"] == 1
    assert stats["mirror_failed"] == stats["mirror_dropped"] == 0


def test_a_copys_trickled_answer_head_past_max_head_ends_it(mode: tuple[str, str]) -> None:
    """A copy's answer head that has no end by max_head bytes ends the copy
    with a reset (not failed, its connection never reused: the next copy
    on a new one), as in one read: the look for its end does not wait past
    it. The primary's answers are as ever."""
    answer = b"HTTP/1.1 200 OK\r\n" + b"X-h: v\r\n" * 700  # 5,617 bytes, no end
    mirror = Trickling(answer, 64, 0.0005)
    stats = _copies(mode, mirror, 2, max_head=4096)
    assert mirror.accepted == stats["mirror_connects"] == 2
    assert _until(lambda: mirror.reset == 2, 5.0), (mirror.reset, mirror.ended)
    assert stats["mirror_idle"] == 0
    assert stats["mirror_failed"] == stats["mirror_dropped"] == 0
    assert stats["reported"] == [200, 200]
