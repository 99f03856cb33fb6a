"""A chunked body that errs after a valid chunk: what was framed goes on
first, however the bytes were split into reads (both twins, real sockets).

A response (or a request) body holds a complete chunk, then a chunk-size
line with a bare LF. The relay forwards every byte before the refused one,
then gives up as it always did: the client connection is cut after a
response's bytes, a request is answered 400 and its upstream closed. The
bytes forwarded used to depend on the reads: a read holding the valid chunk
and the bad line was dropped whole, the chunk with it, while the same chunk
in a read of its own was forwarded (the twins' ``bad_chunk_mid`` case
flaked on it when the backend's two segments came together). HAProxy and
Envoy forward what they parsed, then abort.

Each case sends the bytes in one segment, in two (the head, then the valid
chunk and the bad line together), and in two with the valid chunk apart
(the bad line sent once the other side has the chunk: a read of its own,
surely); the other side must get the same bytes in all three.

Under a retry policy a response whose body errs is never tried again:
its final head went to the client before any body byte was framed (there
is no body error while nothing reached the client), in both twins, however
the bytes were split.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from l4proxy.dataplane.verdict import RetryPolicy
from tests._scripted import (
    GET,
    Scripted,
    _client,
    _proxy,
    mode_fixture,  # noqa: F401  (the fixture mode)
    policy,
)
from tests.test_relay_edges import Backend, _read_all
from tests.test_relay_edges_count import Counted

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
GOOD = b"5\r\nhello\r\n"  # a complete chunk
BAD = b"5\nhello\r\n0\r\n\r\n"  # a bare LF ends its chunk-size line: refused there
FRAMED = GOOD + b"5"  # every body byte before the refused LF
WAIT = 5.0

# the response's bytes, segment by segment; the backend sends the next one
# once the client has every byte of those before
RESPONSE_SPLITS = {
    "one_segment": [HEAD + GOOD + BAD],
    "body_in_one": [HEAD, GOOD + BAD],
    "chunk_apart": [HEAD + GOOD, BAD],
}
RETRIES = {"no_policy": None, "5xx_policy": policy(3, "5xx,reset")}


def _response_through(
    mode: tuple[str, str],
    pieces: list[bytes],
    retry: RetryPolicy | None,
) -> tuple[bytes, str, int, list[int]]:
    """A GET answered with *pieces*: what the client got, how its connection
    ended, the requests the backend saw, the statuses counted."""
    go = [threading.Event() for _ in pieces[1:]]

    def answer(conn: socket.socket) -> None:
        for i, piece in enumerate(pieces):
            if i and not go[i - 1].wait(WAIT):
                return
            conn.sendall(piece)

    up = Scripted([answer])
    counted = Counted()
    relay = _proxy(mode, (up.endpoint,), retry, counted)
    try:
        a = _client(relay)
        a.sendall(GET)
        a.settimeout(WAIT)
        got = b""
        due = 0
        for i, piece in enumerate(pieces[:-1]):
            # the relay forwards the head as it is: the client has every
            # byte the backend sent so far, the next piece a read of its own
            due += len(piece)
            while len(got) < due:
                data = a.recv(65536)
                assert data, got
                got += data
            go[i].set()
        rest, how = _read_all(a, WAIT)
        a.close()
        relay.flush_reports(1.0)
    finally:
        relay.close()
        up.close()
    return got + rest, how, len(up.requests), [s for s, _ in counted.rows]


@pytest.mark.parametrize("retry", sorted(RETRIES))
@pytest.mark.parametrize("split", sorted(RESPONSE_SPLITS))
def test_a_response_chunk_before_a_bad_chunk_line_reaches_the_client(
    mode: tuple[str, str],
    split: str,
    retry: str,
) -> None:
    got, how, requests, statuses = _response_through(mode, RESPONSE_SPLITS[split], RETRIES[retry])
    assert got == HEAD + FRAMED, got
    assert how != "timeout"  # cut: the client cannot take it for the whole body
    assert requests == 1  # not retried: the head and a chunk went out
    assert statuses == [200]  # counted once, with the head the client got


# the request's bytes, segment by segment; the client sends the next one
# once the backend has every byte the relay forwarded of those before
REQUEST_HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
REQUEST_SPLITS = {
    "one_segment": [REQUEST_HEAD + GOOD + BAD],
    "body_in_one": [REQUEST_HEAD, GOOD + BAD],
    "chunk_apart": [REQUEST_HEAD + GOOD, BAD],
}


def _request_through(
    mode: tuple[str, str],
    pieces: list[bytes],
    retry: RetryPolicy | None,
) -> tuple[bytes, str, bytes, list[int]]:
    """A chunked POST sent as *pieces*: what the client got, how its
    connection ended, every byte the backend received, the statuses counted."""
    received = bytearray()
    lock = threading.Lock()
    ended = threading.Event()

    def record(conn: socket.socket) -> None:  # never answers: reads to the end
        conn.settimeout(WAIT)
        try:
            while data := conn.recv(65536):
                with lock:
                    received.extend(data)
        finally:
            ended.set()

    def backend_has(body: int) -> bool:
        """The backend has the head (as the relay rewrote it) and *body*
        bytes after it, within WAIT."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with lock:
                _, sep, after = bytes(received).partition(b"\r\n\r\n")
            if sep and len(after) >= body:
                return True
            time.sleep(0.002)
        return False

    backend = Backend(record)
    counted = Counted()
    relay = _proxy(mode, (backend.endpoint,), retry, counted)
    try:
        a = _client(relay)
        for i, piece in enumerate(pieces):
            # the relay forwarded all of the pieces before: the next one is
            # a read of its own
            assert not i or backend_has(len(b"".join(pieces[:i])) - len(REQUEST_HEAD))
            a.sendall(piece)
        got, how = _read_all(a, WAIT)
        a.close()
        assert ended.wait(WAIT)
        relay.flush_reports(1.0)
    finally:
        relay.close()
        backend.close()
    return got, how, bytes(received), [s for s, _ in counted.rows]


@pytest.mark.parametrize("retry", sorted(RETRIES))
@pytest.mark.parametrize("split", sorted(REQUEST_SPLITS))
def test_a_request_chunk_before_a_bad_chunk_line_reaches_the_upstream(
    mode: tuple[str, str],
    split: str,
    retry: str,
) -> None:
    got, how, upstream, statuses = _request_through(mode, REQUEST_SPLITS[split], RETRIES[retry])
    head, sep, body = upstream.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /x HTTP/1.1\r\n") and sep
    assert body == FRAMED, upstream
    assert got.startswith(b"HTTP/1.1 400 "), got
    assert b"bare LF in a chunk-size line" in got
    assert how == "EOF"
    assert statuses == [400]
