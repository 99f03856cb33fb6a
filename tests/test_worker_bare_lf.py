"""A request head with a bare LF (a line ending in LF without its CR: the
request line, a header line, the empty line that ends the head), through a
real worker on a gateway listener: per request with each relay twin
(pipelined behind a good request), and per connection with each head
parser twin (the first head).

It is answered 400 with ``connection: close`` and the connection closed;
nothing of it reaches the backend. It was forwarded as sent: a backend that
ends lines only at CRLF, reading an LF inside a value as SP (RFC 9110
§5.5), read ``X: y\\nContent-Length: 50`` as one field, so no body, and the
body the relay framed by that Content-Length as a request of its own (the
smuggled ``GET /smuggled``), one no route saw. llhttp (strict) and Node
refuse such a head; HAProxy and nginx send it on with CRLF. Empty lines
before the request line may still end in a bare LF (they are dropped:
tests/test_worker_leading_empty_lines.py). The compiled relay scans heads
itself (scan_into(), shared with the compiled head parser) and hands a
refused one to the pure relay, which answers it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_worker_connection_first_head import BEHIND, BEHIND_IDS, INNER, refused_and_closed

HEADS = {
    "request-line": b"GET /x HTTP/1.1\nHost: gw\r\n\r\n",
    "header-line": b"POST /x HTTP/1.1\r\nHost: gw\r\nX: y\nContent-Length: %d\r\n\r\n%s"
    % (len(INNER), INNER),
    "last-header-line": b"GET /x HTTP/1.1\r\nHost: gw\n\r\n" + INNER,
    "empty-line": b"GET /x HTTP/1.1\r\nHost: gw\r\n\n" + INNER,
    "every-line": b"GET /x HTTP/1.1\nHost: gw\n\n" + INNER,
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize(("routing", "behind"), BEHIND, ids=BEHIND_IDS)
def test_a_bare_lf_in_a_request_head_is_400_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routing: str, behind: bool, head: str
) -> None:
    refused_and_closed(
        tmp_path,
        monkeypatch,
        routing,
        behind,
        HEADS[head],
        400,
        b"HTTP/1.1 400 Bad Request",
        b"LF without CR in the request head",
        "bad_request_400",
    )
