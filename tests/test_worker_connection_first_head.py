"""``--http-routing connection``: what a real worker on a gateway listener
does with a connection's first request head before the pump relays the
connection's bytes, as the per-request relay does with each head
(tests/test_worker_leading_empty_lines.py, test_relay_local_answers.py).

* Empty lines before the first request line (CRLF or a bare LF; RFC 9112
  §2.2 says a server SHOULD ignore at least one, and the head parser
  skips them) are not sent upstream: the backend reads the head from its
  request line. The bytes after that head go as they came, an empty line
  before a pipelined second request included. Before, the pump sent the
  peeked bytes whole, the empty lines first (a backend that takes an
  empty line for a request of its own answered it).
* A first ``OPTIONS *`` (asterisk-form: no path a route could match) is
  answered 404 with no body and no backend asked, as the per-request
  relay answers it (Envoy's absolute_path_rejected). Before, it was
  routed by the table and sent to the backend.
* An HTTP/1.0 request with Transfer-Encoding (RFC 9112 §6.1: its framing
  is faulty, even with a Content-Length, and the connection closes after
  it) is answered 400 and closed, nothing of it sent upstream, per
  connection and per request (both relay twins; a first request and one
  behind an HTTP/1.1 request on the same connection). This was so
  already (the head parser's refusal); the tests keep it so.

Per connection the worker's head parser runs as each twin (its
peek.HeadParser replaced); per request each relay twin runs.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from l4proxy.dataplane import peek
from tests._scripted import Scripted, _response, _status
from tests._worker import gateway_service, gateway_worker
from tests.test_relay_retries import _worker_twin

LEADS = {"crlf": b"\r\n", "lf": b"\n", "two-crlf": b"\r\n\r\n", "mixed": b"\n\r\n\n"}
FIRST = b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"
SECOND = b"GET /b HTTP/1.1\r\nHost: gw\r\n\r\n"
OPTIONS = b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n"
CHUNKED_10 = {
    "te": b"POST /c HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te-and-cl": b"POST /c HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 20\r\n\r\n",
}
# the chunked body, which holds a request a server that ignored the
# Transfer-Encoding would read as one of its own
INNER = b"GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(INNER), INNER)


def _peek_twin(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker reads a connection's first head (per connection) with
    *which* head parser twin."""
    from tests.conftest import load_twin

    monkeypatch.setattr(peek, "HeadParser", load_twin("peek", which).HeadParser)


@pytest.fixture(params=["pure", "compiled"])
def peek_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The worker reads its heads per connection with this head parser twin."""
    _peek_twin(request.param, monkeypatch)
    return str(request.param)


# per connection with each head parser twin, per request with each relay twin
ROUTINGS = ["connection-pure", "connection-compiled", "request-pure", "request-compiled"]


def _routing(routing: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Set up the twins *routing* (one of ROUTINGS) names; its mode."""
    mode, _, which = routing.partition("-")
    if mode == "connection":
        _peek_twin(which, monkeypatch)
    else:
        _worker_twin(which, monkeypatch)
    return mode


def _exchange(address: tuple[str, int], data: bytes, answers: int) -> tuple[list[bytes], bytes]:
    """*data* in one write on a new connection, *answers* answers read
    back, then what follows them until the worker closes (b"" for a
    FIN; the test's 5 s timeout: not closed)."""
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(data)
        got = [_response(s) for _ in range(answers)]
        s.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    return got, rest


def _run(
    rules: Path, routing: str, data: bytes, answers: int
) -> tuple[list[bytes], bytes, dict[str, float]]:
    """The exchange with a worker on *rules*, and its refusals by reason."""
    result: list[tuple[list[bytes], bytes]] = []
    refused: dict[str, float] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing=routing) as (_, worker, address):
            loop = asyncio.get_running_loop()
            result.append(await loop.run_in_executor(None, _exchange, address, data, answers))
            for labels, value in (
                worker.counters.snapshot().get("l4proxy_refused_total", {}).items()
            ):
                refused[dict(labels)["reason"]] = value

    asyncio.run(main())
    return result[0][0], result[0][1], refused


def _requests(backend: Scripted, n: int) -> list[bytes]:
    """What *backend* read, once it read *n* requests (or 5 s passed)."""
    deadline = time.monotonic() + 5
    while len(backend.requests) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    with backend.lock:
        return list(backend.requests)


# (per connection a second head is not read: the first decides)
BEHIND = [(r, r.startswith("request")) for r in ROUTINGS]
BEHIND_IDS = [
    f"{r}-behind-a-request" if r.startswith("request") else f"{r}-first" for r in ROUTINGS
]


def refused_and_closed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    routing: str,
    behind: bool,
    head: bytes,
    status: int,
    status_line: bytes,
    text: bytes,
    reason: str,
) -> None:
    """*head* through a real worker on a gateway listener routed as
    *routing* (behind FIRST when *behind*) is answered *status* with
    *status_line*, ``connection: close`` and the body *text*, then the
    connection closes; the backend read FIRST alone (or nothing), and per
    connection the refusal is counted under *reason*."""
    mode = _routing(routing, monkeypatch)
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    try:
        answers, rest, refused = _run(rules, mode, (FIRST if behind else b"") + head, 1 + behind)
        time.sleep(0.1)  # (a request sent to it would be read by now)
        seen = _requests(backend, 1 if behind else 0)
    finally:
        backend.close()
    assert [_status(a) for a in answers] == ([200, status] if behind else [status]), answers
    refusal = answers[-1]
    assert refusal.startswith(status_line + b"\r\n"), refusal
    assert b"\r\nconnection: close\r\n" in refusal, refusal
    assert refusal.endswith(b"\r\n\r\n" + text), refusal
    assert rest == b""  # closed after it
    assert len(seen) == (1 if behind else 0), seen
    assert all(r.startswith(b"GET /a HTTP/1.1\r\n") for r in seen), seen
    if mode == "connection":
        assert refused == {reason: 1}, refused


@pytest.mark.parametrize("lead", list(LEADS))
def test_empty_lines_before_the_first_request_line_are_not_sent_upstream(
    tmp_path: Path, peek_twin: str, lead: str
) -> None:
    """Empty lines, the first head and a second request with an empty line
    before it, in one write: the backend reads the first head from its
    request line, and the bytes after it as sent (its empty line kept)."""
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    try:
        answers, rest, _ = _run(rules, "connection", LEADS[lead] + FIRST + b"\r\n" + SECOND, 2)
        seen = _requests(backend, 2)
    finally:
        backend.close()
    assert [_status(a) for a in answers] == [200, 200], answers
    assert seen == [FIRST, b"\r\n" + SECOND], seen
    assert rest == b""


@pytest.mark.parametrize("routing", ROUTINGS)
def test_a_first_options_asterisk_is_answered_404_without_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routing: str
) -> None:
    """OPTIONS * at a gateway listener: 404, no body, nothing sent to the
    backend, per connection as per request; per connection the worker
    closes after it (every local answer of that mode closes) and counts
    it as a refusal, absolute_path_rejected."""
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    mode = _routing(routing, monkeypatch)
    try:
        answers, rest, refused = _run(rules, mode, OPTIONS, 1)
        time.sleep(0.1)  # (a request sent to it would be read by now)
        seen = _requests(backend, 0)
    finally:
        backend.close()
    head, _, body = answers[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n"), answers
    assert b"\r\ncontent-length: 0" in head and body == b"", answers
    assert seen == [] and rest == b""
    if mode == "connection":
        assert b"\r\nconnection: close" in head
        assert refused == {"absolute_path_rejected": 1}, refused


@pytest.mark.parametrize("form", list(CHUNKED_10))
@pytest.mark.parametrize(
    ("routing", "behind"),
    # (per connection a second head is not read: the first decides)
    [(r, False) for r in ROUTINGS] + [(r, True) for r in ROUTINGS if r.startswith("request")],
    ids=[f"{r}-first" for r in ROUTINGS]
    + [f"{r}-behind-a-request" for r in ROUTINGS if r.startswith("request")],
)
def test_an_http10_request_with_transfer_encoding_is_refused_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routing: str, behind: bool, form: str
) -> None:
    """POST HTTP/1.0 with Transfer-Encoding: chunked (and a Content-Length
    too), its chunked body holding a request: 400 that says why and
    connection: close, then EOF; the backend reads none of it (only the
    HTTP/1.1 request before it, when there is one). Per connection a
    second request is no head the worker reads (the first decides the
    connection), so that case is per request only."""
    mode = _routing(routing, monkeypatch)
    backend = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(backend.endpoint[1]))
    data = (FIRST if behind else b"") + CHUNKED_10[form] + BODY
    try:
        answers, rest, _ = _run(rules, mode, data, 2 if behind else 1)
        time.sleep(0.1)  # (a request sent to it would be read by now)
        seen = _requests(backend, 1 if behind else 0)
    finally:
        backend.close()
    assert [_status(a) for a in answers] == ([200, 400] if behind else [400]), answers
    refusal = answers[-1]
    assert b"\r\nconnection: close\r\n" in refusal, refusal
    assert refusal.endswith(b"\r\n\r\nTransfer-Encoding in an HTTP/1.0 request"), refusal
    assert rest == b""  # closed after it: the body is no request
    assert len(seen) == (1 if behind else 0), seen
    assert all(r.startswith(b"GET /a HTTP/1.1\r\n") for r in seen), seen
