"""The HTTP/1.x request-head peek, both twins, fed whole and one byte at a time.

Every behavioural test runs over ``twin`` (compiled, pure) x ``mode``
(``parse_head`` one-shot, one ``feed`` of the whole input, and ``feed`` one
byte at a time). The hypothesis tests at the end check that all of these
agree with each other on arbitrary bytes and arbitrary split points, and that
nothing but HeadError / NotHTTP ever escapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from l4proxy.dataplane import _impl, _peek_py
from l4proxy.dataplane import peek as chosen
from l4proxy.dataplane._peek_py import HeadError, NotHTTP, RequestHead
from tests.conftest import load_twin

CURL = (
    b"GET /api/v1/items?id=7 HTTP/1.1\r\n"
    b"Host: bootcamp.default.svc.cluster.local:8080\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)

MODES = ["parse_head", "feed_whole", "feed_bytewise"]


@pytest.fixture(params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("peek", request.param)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def feed_chunks(
    mod: ModuleType, chunks: Sequence[bytes], max_head: int = 65536
) -> RequestHead | None:
    """Feed *chunks* to a fresh parser; check the parser's invariants on the way.

    Once a head is returned, every later feed must return an equal head, and
    ``buffered`` must always be exactly the bytes fed.
    """
    parser = mod.HeadParser(max_head)
    head: RequestHead | None = None
    fed = b""
    for chunk in chunks:
        fed += chunk
        result = parser.feed(chunk)
        if head is not None:
            assert result == head, "a completed head changed on a later feed"
        head = result
        assert parser.buffered == fed
    return head


def parse(mod: ModuleType, mode: str, data: bytes, max_head: int = 65536) -> RequestHead | None:
    if mode == "parse_head":
        result = mod.parse_head(data, max_head)
        assert result is None or isinstance(result, RequestHead)
        return result
    if mode == "feed_whole":
        return feed_chunks(mod, [data], max_head)
    return feed_chunks(mod, [data[i : i + 1] for i in range(len(data))], max_head)


def error_of(mod: ModuleType, mode: str, data: bytes, max_head: int = 65536) -> HeadError:
    with pytest.raises(HeadError) as info:
        parse(mod, mode, data, max_head)
    return info.value


# -- valid heads ---------------------------------------------------------------


def test_typical_curl_head(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, CURL + b"body bytes")
    assert head == RequestHead(
        method="GET",
        target="/api/v1/items?id=7",
        path="/api/v1/items?id=7",
        version="HTTP/1.1",
        headers=(
            ("host", "bootcamp.default.svc.cluster.local:8080"),
            ("user-agent", "curl/7.88.1"),
            ("accept", "*/*"),
        ),
        host="bootcamp.default.svc.cluster.local:8080",
        head_length=len(CURL),
        keep_alive=True,
        content_length=None,
        chunked=False,
        expect_continue=False,
    )
    assert head.header("USER-agent") == "curl/7.88.1"
    assert head.header("x-missing") is None


def test_incomplete_head_needs_more(twin: ModuleType, mode: str) -> None:
    for cut in (0, 1, 5, len(CURL) // 2, len(CURL) - 2, len(CURL) - 1):
        assert parse(twin, mode, CURL[:cut]) is None, cut


def test_buffered_keeps_body_bytes_after_the_head(twin: ModuleType) -> None:
    parser = twin.HeadParser()
    assert parser.buffered == b""
    assert parser.feed(CURL[:10]) is None
    head = parser.feed(CURL[10:] + b"abc")
    assert head is not None and head.head_length == len(CURL)
    assert parser.feed(b"def") == head
    assert parser.buffered == CURL + b"abcdef"
    assert parser.buffered[head.head_length :] == b"abcdef"


def test_http10_without_host(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, b"GET /x HTTP/1.0\r\nAccept: */*\r\n\r\n")
    assert head is not None
    assert (head.version, head.host, head.keep_alive) == ("HTTP/1.0", None, False)


def test_http10_no_headers_at_all(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, b"GET / HTTP/1.0\r\n\r\n")
    assert head is not None and head.headers == () and head.head_length == 18


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("1.1", None, True),
        ("1.1", "close", False),
        ("1.1", "Keep-Alive, CLOSE", False),
        ("1.1", "Upgrade", True),
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
        ("1.0", " ,keep-alive , ", True),
        ("1.0", "close, keep-alive", False),
        ("1.2", None, True),  # a higher 1.x minor version has 1.1 semantics
    ],
)
def test_keep_alive(
    twin: ModuleType, mode: str, version: str, connection: str | None, keep_alive: bool
) -> None:
    data = f"GET / HTTP/{version}\r\nHost: a\r\n".encode()
    if connection is not None:
        data += f"Connection: {connection}\r\n".encode()
    head = parse(twin, mode, data + b"\r\n")
    assert head is not None and head.keep_alive is keep_alive


def test_header_names_in_odd_case(twin: ModuleType, mode: str) -> None:
    data = b"POST /f HTTP/1.1\r\nhOsT: Example.COM\r\nCONTENT-length: 3\r\nX-MiXeD: Va Lue\r\n\r\n"
    head = parse(twin, mode, data)
    assert head is not None
    assert [n for n, _ in head.headers] == ["host", "content-length", "x-mixed"]
    assert head.host == "Example.COM"  # as sent; the router normalizes
    assert head.content_length == 3
    assert head.header("X-MIXED") == "Va Lue"
    assert head.header("\u212a") is None  # KELVIN SIGN lowercases to "k": not ASCII


def test_header_values_ows_stripped_and_latin1(twin: ModuleType, mode: str) -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost:a\r\nX-A: \t two  words \t\r\nX-Empty:\r\n"
        b"X-Blank:   \r\nX-Latin: caf\xe9\r\nX-A: second\r\n\r\n"
    )
    head = parse(twin, mode, data)
    assert head is not None
    assert head.headers[1:] == (
        ("x-a", "two  words"),
        ("x-empty", ""),
        ("x-blank", ""),
        ("x-latin", "café"),
        ("x-a", "second"),
    )
    assert head.header("x-a") == "two  words"  # the first one
    assert head.host == "a"


@pytest.mark.parametrize(
    ("target", "header", "host", "path"),
    [
        ("http://example.com:8080/a/b?q=1", "Example.COM:8080", "example.com:8080", "/a/b?q=1"),
        ("http://example.com", "example.com:80", "example.com", "/"),
        ("HTTPS://[::1]:8443?x=1", "[::1]:8443", "[::1]:8443", "/?x=1"),
        ("https://a:443/", "a", "a:443", "/"),
        ("svc+x.y-z://bootcamp/", "bootcamp", "bootcamp", "/"),
        ("/plain?x=http://evil", "from-header", "from-header", "/plain?x=http://evil"),
    ],
)
def test_absolute_form_authority_wins(
    twin: ModuleType, mode: str, target: str, header: str, host: str, path: str
) -> None:
    head = parse(twin, mode, f"GET {target} HTTP/1.1\r\nHost: {header}\r\n\r\n".encode())
    assert head is not None
    assert (head.target, head.host, head.path) == (target, host, path)
    assert head.header("host") == header


@pytest.mark.parametrize(
    ("target", "header"),
    [
        ("http://b.example/x", "a.example"),
        ("http://a.example:8080/x", "a.example"),
        ("http://a.example/x", "a.example:8080"),
        ("https://a.example/x", "a.example:80"),
        ("http://a.example/x", "a.example:443"),
        ("svc://a:80/", "a"),
        ("http://a.example/x", ""),
    ],
)
def test_absolute_form_with_another_host_is_refused(
    twin: ModuleType, mode: str, target: str, header: str
) -> None:
    """RFC 9112 §3.2.2: a proxy makes Host from an absolute-form target;
    one that forwards the head as sent refuses a Host naming another host
    (see "Decisions" in _peek_py.py), as HAProxy does."""
    err = error_of(twin, mode, f"GET {target} HTTP/1.1\r\nHost: {header}\r\n\r\n".encode())
    assert err.status == 400
    assert "differs from the request-target's authority" in str(err)


def test_absolute_form_in_http10_without_host(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, b"GET http://a.b/c HTTP/1.0\r\n\r\n")
    assert head is not None and (head.host, head.path) == ("a.b", "/c")


def test_connect_and_options_asterisk(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
    assert head is not None and (head.host, head.path) == ("db.internal:5432", "")
    head = parse(twin, mode, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and (head.host, head.path, head.target) == ("a", "*", "*")


def test_expect_100_continue(twin: ModuleType, mode: str) -> None:
    data = b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 10\r\n\r\n"
    head = parse(twin, mode, data)
    assert head is not None and head.expect_continue and head.content_length == 10
    # RFC 9110 §10.1.1: a 100-continue expectation in HTTP/1.0 is ignored.
    head = parse(twin, mode, data.replace(b"1.1", b"1.0"))
    assert head is not None and not head.expect_continue
    head = parse(twin, mode, data.replace(b"100-Continue", b"200-ok"))
    assert head is not None and not head.expect_continue


@pytest.mark.parametrize("te", ["chunked", "CHUNKED", "Chunked", " chunked\t", "\tcHuNkEd  "])
def test_chunked(twin: ModuleType, mode: str, te: str) -> None:
    head = parse(
        twin, mode, f"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n".encode()
    )
    assert head is not None and head.chunked and head.content_length is None


# -- Transfer-Encoding other than exactly one chunked: 501 ---------------------------
# A server that takes a body for chunked only when the field says exactly
# "chunked" (and otherwise by Content-Length, or none) reads the chunked body
# that we framed as further requests: Envoy answers these 501
# (http1.invalid_transfer_encoding), as Go's net/http and nginx do (see
# "Decisions" in _peek_py.py).

TE_501 = [
    "gzip", "chunked, gzip", "chunked,chunked", "", "xchunked", "identity, chunked",
    "gzip, chunked", "gzip,,chunked", ",chunked", "chunked,", "chunked ,", " , chunked",
    "gzip;q=1 , chunked", "chunked;x=1", "chunked ;x=1", "gzip, chunked ;x=y",
    "gzip\r\nTransfer-Encoding: chunked", "chunked\r\nTransfer-Encoding: ",
    "\r\nTransfer-Encoding: chunked", "chunked\r\nTransfer-Encoding: chunked",
    "chunked\r\nTransfer-Encoding: gzip", "chunked\r\nX: y\r\nTransfer-Encoding: identity",
]  # fmt: skip


@pytest.mark.parametrize("te", TE_501)
def test_transfer_encoding_other_than_chunked_is_501(twin: ModuleType, mode: str, te: str) -> None:
    data = f"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n".encode()
    err = error_of(twin, mode, data)
    assert type(err) is HeadError and err.status == 501
    assert err.reason == "Transfer-Encoding other than chunked"
    assert err.details == "http1.invalid_transfer_encoding"


@pytest.mark.parametrize(
    ("values", "expected"),
    [(["0"], 0), (["5", "5"], 5), (["5, 5"], 5), (["007"], 7), (["9" * 18], 10**18 - 1)],
)
def test_content_length(twin: ModuleType, mode: str, values: list[str], expected: int) -> None:
    lines = "".join(f"Content-Length: {v}\r\n" for v in values)
    head = parse(twin, mode, f"POST / HTTP/1.1\r\nHost: a\r\n{lines}\r\n".encode())
    assert head is not None and head.content_length == expected and not head.chunked


# A bare LF ending the request line, a header line or the empty line: 400.
# A server that ends lines only at CRLF reads the head otherwise (see
# "Decisions" in _peek_py.py): here "X: y\nContent-Length: 5" is one field
# to it, and the body framed by that Content-Length its next request.
BARE_LF = [
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nX: y\nContent-Length: 5\r\n\r\n",
    b"GET / HTTP/1.0\n\n",
    b"GET / HTTP/1.0\r\n\n",
    b"\r\n\nGET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
]


@pytest.mark.parametrize("data", BARE_LF)
def test_bare_lf_line_endings_are_400(twin: ModuleType, mode: str, data: bytes) -> None:
    err = error_of(twin, mode, data + b"BODY")
    assert type(err) is HeadError and err.status == 400
    assert err.reason == "LF without CR in the request head"


@pytest.mark.parametrize("data", BARE_LF)
def test_twins_agree_on_bare_lf(data: bytes) -> None:
    twins = [load_twin("peek", "compiled"), load_twin("peek", "pure")]
    got = _check_agreement(twins, data + b"BODY", [len(data) // 2, len(data) - 1], 65536)
    assert got == ("error", HeadError, 400, "LF without CR in the request head")


@pytest.mark.parametrize("prefix", [b"\r\n", b"\n", b"\r\n\r\n\n"])
def test_leading_empty_lines_are_skipped(twin: ModuleType, mode: str, prefix: bytes) -> None:
    head = parse(twin, mode, prefix + CURL)
    assert head is not None and head.method == "GET"
    assert head.head_length == len(prefix) + len(CURL)  # counted from the stream start


def test_other_methods_and_targets(twin: ModuleType, mode: str) -> None:
    head = parse(
        twin, mode, b"M-SEARCH /%7Euser/;p?a=b&c HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n"
    )
    assert head is not None
    assert (head.method, head.path, head.host) == (
        "M-SEARCH",
        "/%7Euser/;p?a=b&c",
        "[fe80::1%25eth0]",
    )


def test_head_of_exactly_max_head_bytes(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, CURL + b"body", max_head=len(CURL))
    assert head is not None and head.head_length == len(CURL)


# -- not HTTP: decided from the first bytes ------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex("160301020001000001fc0303") + bytes(range(32))
NOT_HTTP = [
    pytest.param(TLS_CLIENT_HELLO, 1, id="tls-client-hello"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", 20, id="ssh-banner"),
    pytest.param(b"\x00\x00\x00\x0c\x00\x00\x00\x01", 1, id="binary"),
    pytest.param(b"*1\r\n$4\r\nPING\r\n", 3, id="redis"),
    pytest.param(b" GET / HTTP/1.1\r\n", 1, id="leading-space"),
    pytest.param(b"\r\rGET / HTTP/1.1\r\n", 2, id="cr-cr"),
    pytest.param(b"GET\t/ HTTP/1.1\r\n", 4, id="tab-after-method"),
    pytest.param(b"G" * 33 + b" / HTTP/1.1\r\n", 33, id="method-33-bytes"),
    pytest.param(b"GET  / HTTP/1.1\r\n", 5, id="empty-target"),
    pytest.param(b"GET /a\x00 HTTP/1.1\r\n", 7, id="nul-in-target"),
    pytest.param(b"GET /caf\xe9 HTTP/1.1\r\n", 9, id="non-ascii-target"),
    pytest.param(b"GET /\r\n\r\n", 6, id="http-0.9"),
    pytest.param(b"GET / FOO/1.1\r\n", 7, id="no-http-version"),
    pytest.param(b"GET /a b HTTP/1.1\r\n", 8, id="space-in-target"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 16, id="h2-preface"),
]


@pytest.mark.parametrize(("data", "decided_after"), NOT_HTTP)
def test_not_http(twin: ModuleType, mode: str, data: bytes, decided_after: int) -> None:
    err = error_of(twin, mode, data)
    assert type(err) is NotHTTP and err.status == 400
    # Decided early: the first `decided_after` bytes are enough, and one
    # byte fewer is not (so the proxy does not wait for 64 KiB).
    with pytest.raises(NotHTTP):
        twin.parse_head(data[:decided_after])
    assert twin.parse_head(data[: decided_after - 1]) is None


def test_method_of_32_bytes_is_still_http(twin: ModuleType, mode: str) -> None:
    head = parse(twin, mode, b"X" * 32 + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and head.method == "X" * 32


# -- malformed: 400, 505 ----------------------------------------------------------

BAD_400 = [
    # request line, after "HTTP/"
    (b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", "malformed HTTP version"),
    (b"GET / HTTP/11.1\r\nHost: a\r\n\r\n", "malformed HTTP version"),
    (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "malformed HTTP version"),
    (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", "malformed HTTP version"),
    (b"GET / HTTP/1.1\rHost: a\r\n\r\n", "CR without LF in the request line"),
    # header lines
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n  b\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n\tb\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n", "empty header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", "without a colon"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "invalid character in header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", "invalid character in header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX(y): x\r\n\r\n", "invalid character in header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX\xe9: x\r\n\r\n", "invalid character in header name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", "invalid character in header value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", "invalid character in header value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", "invalid character in header value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\r\n\r\n", "invalid character in header value"),
    # Host
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "without Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", "more than one Host"),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHOST: b\r\n\r\n", "more than one Host"),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
    (b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", "invalid Host"),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host"),
    # request-target forms
    (b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    (b"GET http:/a HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    (b"GET 1http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    (b"GET http:///path HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    (b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    (b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request-target"),
    # framing
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "conflicting",
    ),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", "conflicting"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", "invalid Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", "invalid Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", "invalid Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,\r\n\r\n", "invalid Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n", "invalid Content-Length"),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\n",
        "invalid Content",
    ),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xb9\r\n\r\n", "invalid Content-Length"),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "both Content-Length and Transfer-Encoding",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        "both Content-Length and Transfer-Encoding",
    ),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
]


@pytest.mark.parametrize(("data", "reason"), BAD_400)
def test_malformed_is_400(twin: ModuleType, mode: str, data: bytes, reason: str) -> None:
    err = error_of(twin, mode, data)
    assert type(err) is HeadError and err.status == 400
    assert reason in err.reason


# -- dot-segments in the path: 400 ------------------------------------------------
# Routes match the path as sent and it is forwarded as sent: a server that
# removes dot-segments would serve /private for /public/../private, routed
# by the rules for /public (see "Decisions" in _peek_py.py).

DOT_SEGMENTS = [
    "/a/./b", "/a/../b", "/..", "/.", "/a/.", "/a/..", "/./", "/../", "/a/%2e%2E/b",
    "/a/%2E%2e/b", "/a/.%2e", "/a/%2e.", "/a/%2e", "/a/%2E", "/a/%2e%2e", "/a/..?x=1",
    "/a/.?x", "/public/../private", "/public/%2e%2e/private", "/a//../b", "/a/../",
    "/a/..#f", "/a#/../b", "/public\\..\\private", "/a\\.", "/a/..\\b",
    "http://h/a/../b", "http://h/..", "http://h:80/%2e?q", "HTTP://h/a/./b?x=/../",
]  # fmt: skip
NOT_DOT_SEGMENTS = [
    "/", "/a/b..c", "/a/...", "/a/.../b", "/a/.hidden", "/a/..hidden", "/a/hidden.",
    "/a/b.", "/a?p=../x", "/a?p=/../x", "/a?/./", "/a/%2e%2e%2e", "/a/%2e%2", "/a/%2",
    "/a/%", "/a/%2f..", "/a/..%2fb", "/a/%2e%2fb", "/a/..%5cb", "/a.", "/.a", "/%2ea",
    "/a\\b", "/a#b", "http://h/a/b", "http://h?/../", "http://h", "http://h/a..b",
]  # fmt: skip


def test_every_byte_at_every_place_of_a_word_in_a_value(twin: ModuleType) -> None:
    """The compiled scanner judges a value 8 bytes at a time (4 when it is
    shorter, the last word overlapping the one before it): each byte value,
    at each place of values of every length the words fall differently in,
    is judged as RFC 9110 says: HTAB, SP, VCHAR and obs-text pass; other
    controls and DEL are refused."""
    field = {0x09, *range(0x20, 0x7F), *range(0x80, 0x100)}
    lengths = (1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24)
    refused = 0
    for length in lengths:
        for place in range(length):
            for byte in range(256):
                if byte == 0x0A:
                    continue  # an LF ends the line
                value = bytearray(b"v" * length)
                value[place] = byte
                data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + bytes(value) + b"\r\n\r\n"
                if byte in field:
                    head = twin.parse_head(data)
                    assert head is not None, (length, place, byte)
                    assert head.headers[1][1] == bytes(value).strip(b" \t").decode("latin-1")
                else:
                    refused += 1
                    with pytest.raises(HeadError, match="invalid character in header value"):
                        twin.parse_head(data)
    assert refused == 31 * sum(lengths)  # 0x00-0x1F but HTAB and LF, and DEL


KNOWN_FIELDS = {
    b"Host": b"a",
    b"Content-Length": b"3",
    b"Transfer-Encoding": b"chunked",
    b"Connection": b"keep-alive",
    b"Expect": b"100-continue",
}


def _outcome(mod: ModuleType, data: bytes) -> object:
    try:
        return mod.parse_head(data)
    except HeadError as err:
        return (err.status, err.reason)


def test_every_byte_in_the_names_and_values_the_scanner_knows() -> None:
    """The compiled scanner compares names and values with its lowercase
    literals a word at a time (case folded only where the literal has a
    letter): every byte value at every place of each name and value it
    knows is judged as the pure twin judges it, with the byte's capital,
    its neighbours 0x20 away and the other letters among them."""
    compiled, pure = load_twin("peek", "compiled"), load_twin("peek", "pure")
    differ = []
    for name, value in KNOWN_FIELDS.items():
        host = b"" if name == b"Host" else b"Host: a\r\n"
        for field, place in itertools.chain(
            ((0, k) for k in range(len(name))), ((1, k) for k in range(len(value)))
        ):
            for byte in range(256):
                parts = [bytearray(name), bytearray(value)]
                parts[field][place] = byte
                data = b"POST / HTTP/1.1\r\n%s%s: %s\r\n\r\n" % (host, *map(bytes, parts))
                if _outcome(compiled, data) != _outcome(pure, data):
                    differ.append(data)
    assert differ == []


def test_every_byte_at_every_place_of_a_request_line() -> None:
    """The compiled scanner judges a plain request line whole (the method's
    tokens, the target's visible bytes a word at a time, " HTTP/1.d" CRLF)
    and falls back to its byte-by-byte states for anything else: every byte
    value at every place of request lines whose targets end at different
    places of a word, with methods up to and past the longest allowed, is
    judged as the pure twin judges it."""
    compiled, pure = load_twin("peek", "compiled"), load_twin("peek", "pure")
    lines = [
        b"GET /abcdefghijklmnopqrstu HTTP/1.1",
        b"POST /a?b=c HTTP/1.0",
        b"M / HTTP/1.1",
        b"%s /x HTTP/1.1" % (b"M" * 32),
        b"%s /x HTTP/1.1" % (b"M" * 33),
        b"PRI * HTTP/2.0",
    ]
    differ = []
    for line in lines:
        for place in range(len(line) + 2):
            for byte in range(256):
                raw = bytearray(line + b"\r\n")
                raw[place] = byte
                data = bytes(raw) + b"Host: a\r\n\r\n"
                if _outcome(compiled, data) != _outcome(pure, data):
                    differ.append(data)
    assert differ == []


@pytest.mark.parametrize("target", DOT_SEGMENTS)
def test_a_dot_segment_in_the_path_is_400(twin: ModuleType, mode: str, target: str) -> None:
    err = error_of(twin, mode, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
    assert type(err) is HeadError and err.status == 400
    assert err.reason == "dot-segment (. or ..) in the request path"
    path = 0 if target.startswith("/") else target.index("/", target.index("//") + 2)
    assert _peek_py.has_dot_segment(target.encode(), path)


@pytest.mark.parametrize("target", NOT_DOT_SEGMENTS)
def test_dots_that_are_not_a_segment_pass(twin: ModuleType, mode: str, target: str) -> None:
    host = b"a" if target.startswith("/") else b"h"  # an absolute-form target's own
    head = parse(twin, mode, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(), host))
    assert head is not None and head.target == target
    assert not _peek_py.has_dot_segment(target.encode(), 0 if target.startswith("/") else 7)


@pytest.mark.parametrize(
    "data",
    [
        b"CONNECT ..:443 HTTP/1.1\r\nHost: a\r\n\r\n",  # authority-form: no path
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nReferer: http://h/../x\r\n\r\n",  # not the target
    ],
)
def test_dots_outside_a_path_pass(twin: ModuleType, mode: str, data: bytes) -> None:
    assert parse(twin, mode, data) is not None


def test_a_dot_segment_is_judged_in_its_order_among_the_errors(twin: ModuleType) -> None:
    """After Host and the target's form, before the framing headers: both
    twins raise the same error for a head with several."""
    no_host = b"GET /../ HTTP/1.1\r\n\r\n"
    assert "without Host" in error_of(twin, "parse_head", no_host).reason
    bad_cl = b"GET /../ HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"
    assert "dot-segment" in error_of(twin, "parse_head", bad_cl).reason


def test_bad_header_line_is_answered_before_the_head_completes(twin: ModuleType) -> None:
    parser = twin.HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x") is None  # line not complete
    with pytest.raises(HeadError, match="header name"):
        parser.feed(b"\r\n")


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"3.0", b"9.1"])
def test_unsupported_version_is_505(twin: ModuleType, mode: str, version: bytes) -> None:
    err = error_of(twin, mode, b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n")
    assert type(err) is HeadError and err.status == 505
    # Answered as soon as the request line is complete.
    with pytest.raises(HeadError):
        twin.parse_head(b"GET / HTTP/" + version + b"\r\n")


# -- size bound: 431 --------------------------------------------------------------


def test_head_over_max_head_is_431_as_soon_as_it_is_exceeded(twin: ModuleType) -> None:
    max_head = 200
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 400
    parser = twin.HeadParser(max_head)
    assert parser.feed(data[:max_head]) is None  # exactly max_head: still waiting
    with pytest.raises(HeadError) as info:
        parser.feed(data[max_head : max_head + 1])
    assert type(info.value) is HeadError and info.value.status == 431
    assert "200" in info.value.reason


@pytest.mark.parametrize(
    "data",
    [
        b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n",  # request line too long
        b"GET / HTTP/1.1\r\n" + b"X-H: v\r\n" * 50 + b"\r\n",  # many header lines
        b"\r\n" * 200 + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # endless empty lines
        # An error beyond the first max_head bytes is never seen: the outcome
        # depends only on that prefix, not on how the bytes were split.
        b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 300 + b"\x00\r\n\r\n",
    ],
)
def test_over_max_head_is_431(twin: ModuleType, mode: str, data: bytes) -> None:
    err = error_of(twin, mode, data, max_head=256)
    assert type(err) is HeadError and err.status == 431


def test_bytes_after_a_complete_head_do_not_count(twin: ModuleType) -> None:
    parser = twin.HeadParser(len(CURL))
    head = parser.feed(CURL)
    assert head is not None
    assert parser.feed(b"x" * 100_000) == head


# -- parser object --------------------------------------------------------------


def test_errors_are_sticky(twin: ModuleType) -> None:
    parser = twin.HeadParser()
    with pytest.raises(NotHTTP) as first:
        parser.feed(b"\x16\x03\x01")
    with pytest.raises(NotHTTP) as again:
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (again.value.status, again.value.reason) == (first.value.status, first.value.reason)
    assert parser.buffered.startswith(b"\x16\x03\x01GET")  # still forwarded verbatim


def test_feed_accepts_any_bytes_like(twin: ModuleType) -> None:
    parser = twin.HeadParser()
    assert parser.feed(bytearray(CURL[:20])) is None
    assert parser.feed(memoryview(CURL)[20:]) is not None
    assert twin.parse_head(bytearray(CURL)) == twin.parse_head(CURL)
    assert parser.feed(b"") is not None


@pytest.mark.parametrize("max_head", [0, -1])
def test_max_head_must_be_positive(twin: ModuleType, max_head: int) -> None:
    with pytest.raises(ValueError, match="max_head"):
        twin.HeadParser(max_head)
    with pytest.raises(ValueError, match="max_head"):
        twin.parse_head(CURL, max_head)


def test_result_is_immutable(twin: ModuleType) -> None:
    head = twin.parse_head(CURL)
    with pytest.raises(AttributeError):
        head.method = "POST"


def test_chooser_exports_the_chosen_twin() -> None:
    mod, implementation = _impl.load("peek")
    assert implementation == chosen.IMPLEMENTATION
    assert chosen.HeadParser is mod.HeadParser and chosen.parse_head is mod.parse_head
    assert chosen.HeadError is HeadError and chosen.NotHTTP is NotHTTP
    if _impl.NO_EXTENSIONS:
        assert chosen.IMPLEMENTATION == "pure"


def test_twins_share_the_result_and_error_types() -> None:
    compiled = load_twin("peek", "compiled")
    pure = load_twin("peek", "pure")
    for name in ("HeadError", "NotHTTP", "RequestHead"):
        assert getattr(compiled, name) is getattr(pure, name)
    assert issubclass(NotHTTP, HeadError)


def _feed_steps(mod: ModuleType, data: bytes, piece: int) -> int:
    """The scanner's own operation count (``HeadParser.steps``: loop turns plus
    bytes handed to each search) for *data* fed in *piece*-byte pieces."""
    parser = mod.HeadParser(len(data) + 1)
    for i in range(0, len(data), piece):
        assert parser.feed(data[i : i + piece]) is None
    steps: int = parser.steps
    return steps


@pytest.mark.parametrize("where", ["target", "header"])
def test_feeding_small_pieces_is_linear(twin: ModuleType, where: str) -> None:
    # A scanner that restarted its search at the start of the request line or
    # of the current header line on every feed (instead of where the last
    # search stopped) would hand each search everything since that start:
    # n^2 / (2 * piece) bytes in all. A linear one hands each byte to one
    # search and takes a few loop turns per feed: about n + 2 n / piece.
    # Counted, not timed: the same count on every run and machine.
    def make(n: int) -> bytes:
        if where == "target":
            return b"GET /" + b"a" * n
        return b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * n

    piece = 32
    for n in (128 * 1024, 512 * 1024):
        steps = _feed_steps(twin, make(n), piece)
        # Linear: <= 2 n (n + n / 16 + a constant). Quadratic: n^2 / 64, i.e.
        # 2,048 n at n = 128 KiB, three orders of magnitude above the bound.
        assert n <= steps <= 2 * n, (n, steps)


def test_the_count_catches_a_parser_that_rescans_the_line() -> None:
    """The bound above can fail: the pure twin, made to restart its LF search
    at the start of the header line on every feed (the bug the bound guards
    against), still parses correctly and counts ~n^2 / 64."""
    from l4proxy.dataplane import _peek_py

    class Rescanning(_peek_py.HeadParser):
        __slots__ = ()

        def feed(self, data: bytes) -> Any:
            if self._state == _peek_py._S_HEADERS:
                self._pos = self._line_start
            return super().feed(data)

    n, piece = 128 * 1024, 32
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * n
    parser = Rescanning(len(data) + 5)
    for i in range(0, len(data), piece):
        assert parser.feed(data[i : i + piece]) is None
    assert parser.steps > 500 * n
    assert parser.feed(b"\r\n\r\n") is not None  # and it still parses


# -- properties (hypothesis) ------------------------------------------------------

Outcome = tuple[Any, ...]


def outcome(mod: ModuleType, chunks: Sequence[bytes], max_head: int) -> Outcome:
    try:
        head = feed_chunks(mod, chunks, max_head)
    except HeadError as exc:  # anything else fails the test
        return ("error", type(exc), exc.status, exc.reason)
    return ("head", head)


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


FRAGMENTS = [
    b"GET", b"POST", b"CONNECT", b"OPTIONS", b"PRI", b" ", b"  ", b"/", b"/a?b", b"*",
    b"http://h:1/p", b"http://u@h", b"h:443", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0",
    b"HTTP/", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\t", b":", b",", b";", b"\x00", b"\x7f",
    b"\xe9", b"\x16\x03", b"Host: a", b"host: b:80", b"Host:", b"Content-Length: 5",
    b"content-length: 6", b"Content-Length: 5, 5", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip", b"Connection: close", b"Connection: keep-alive",
    b"Expect: 100-continue", b"X-A: b", b" x", b"0123456789", b"body",
    b".", b"..", b"/..", b"%2e", b"%2E", b"\\", b"#", b"?",  # dot-segments
]  # fmt: skip

VALID_HEAD_START = [
    b"GET / HTTP/1.1\r\nHost: a\r\n",
    b"POST /u HTTP/1.0\n",
    b"\r\nGET http://x/y HTTP/1.1\r\nHost: a\r\n",
]

http_ish = st.builds(
    lambda start, parts: start + b"".join(parts),
    st.sampled_from([b"", *VALID_HEAD_START]),
    st.lists(st.sampled_from(FRAGMENTS), max_size=25),
)


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    """A valid head with a few bytes replaced, inserted or deleted."""
    data = bytearray(draw(st.one_of(st.sampled_from([CURL + b"body"]), structured_heads)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 44, 58, 59, 127, 0xE9, *b"aZ/:*0.%\\?#"]))
        if op == "insert":
            data.insert(i, byte)
        elif i < len(data):
            if op == "replace":
                data[i] = byte
            else:
                del data[i]
    return bytes(data)


GOOD_LINES = [
    b"Host: a", b"host: b:80", b"Content-Length: 5", b"content-length: 6",
    b"Content-Length: 5, 5", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
    b"transfer-encoding: gzip, chunked", b"Transfer-Encoding: ,chunked ,", b"Connection: close",
    b"Connection: keep-alive",
    b"Expect: 100-continue", b"X-A: b\xe9",
]  # fmt: skip
BAD_LINES = [
    b"Host: a b", b"Host:", b"Content-Length: x", b"Content-Length: 5,",
    b"Transfer-Encoding: chunked, chunked", b" folded", b"Bad Name: x", b": e", b"NoColon",
    b"X: a\x00",
]  # fmt: skip
header_line = st.one_of(
    st.sampled_from(GOOD_LINES), st.sampled_from(GOOD_LINES), st.sampled_from(BAD_LINES)
)

TARGETS = [
    b"/", b"/a?b", b"*", b"http://h:1/p", b"http://u@h", b"h:443", b"http:///x", b"foo",
    b"/a/../b", b"/a/%2E./b", b"/a/.%2e", b"/a/...", b"/a\\.\\b", b"/a?../b", b"http://h/./p",
    b"http://h?/.",
]  # fmt: skip

# Well-formed request lines and header lines, mixed: reaches the cross-header
# rules (Host, Content-Length, Transfer-Encoding, target forms) often.
structured_heads = st.builds(
    lambda lead, method, target, version, host, lines, eol: (
        lead
        + method
        + b" "
        + target
        + b" "
        + version
        + eol
        + host
        + b"".join(lines)
        + eol
        + b"body"
    ),
    st.sampled_from([b"", b"\r\n", b"\n"]),
    st.sampled_from([b"GET", b"POST", b"POST", b"CONNECT", b"OPTIONS", b"PRI"]),
    st.sampled_from(TARGETS),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.9"]),
    st.sampled_from([b"", b"Host: a\r\n", b"Host: a\r\n"]),
    st.lists(
        st.builds(bytes.__add__, header_line, st.sampled_from([b"\r\n", b"\n"])),
        max_size=5,
    ),
    st.sampled_from([b"\r\n", b"\n"]),
)

inputs = st.one_of(st.binary(max_size=200), http_ish, structured_heads, mutated_heads())
max_heads = st.one_of(st.just(65536), st.just(65536), st.just(65536), st.integers(1, 120))
PROPERTY = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_agreement(
    twins: list[ModuleType], data: bytes, points: list[int], max_head: int
) -> Outcome:
    results = []
    for mod in twins:
        whole = outcome(mod, [data], max_head)
        results.append(whole)
        assert outcome(mod, [data[i : i + 1] for i in range(len(data))], max_head) == whole
        assert outcome(mod, split_at(data, points), max_head) == whole
        try:
            one_shot: Outcome = ("head", mod.parse_head(data, max_head))
        except HeadError as exc:
            one_shot = ("error", type(exc), exc.status, exc.reason)
        assert one_shot == whole
    assert all(r == results[0] for r in results), (data, results)
    return results[0]


@PROPERTY
@given(data=inputs, points=st.lists(st.integers(0, 10_000), max_size=6), max_head=max_heads)
def test_twins_agree_on_any_input_and_any_split(
    data: bytes, points: list[int], max_head: int
) -> None:
    twins = [load_twin("peek", "compiled"), load_twin("peek", "pure")]
    result = _check_agreement(twins, data, points, max_head)
    event(result[3] if result[0] == "error" else "complete" if result[1] else "need more")
    if result[0] == "head" and result[1] is not None:
        head: RequestHead = result[1]
        assert head.head_length <= min(len(data), max_head)
        assert data[: head.head_length].endswith(b"\n")


TOKEN = st.text("abcXYZ-_!#0189", min_size=1, max_size=12)
VALUE = st.text("ab yz:/;,.\t0189", max_size=20).map(lambda s: s.strip(" \t"))


@PROPERTY
@given(
    method=TOKEN,
    path=st.text("abz/?=&%.-~", max_size=20).map(lambda s: "/" + s),
    fields=st.lists(st.tuples(TOKEN, VALUE), max_size=6),
    eol=st.sampled_from(["\r\n", "\n"]),
    ows=st.sampled_from(["", " ", "\t", "  \t"]),
)
def test_generated_heads_round_trip(
    method: str, path: str, fields: list[tuple[str, str]], eol: str, ows: str
) -> None:
    fields = [(n, v) for n, v in fields if n.lower() not in FRAMING_NAMES]
    fields.append(("Host", "svc"))
    text = f"{method} {path} HTTP/1.1{eol}"
    text += "".join(f"{n}:{ows}{v}{ows}{eol}" for n, v in fields) + eol
    data = text.encode()
    twins = [load_twin("peek", "compiled"), load_twin("peek", "pure")]
    result = _check_agreement(twins, data + b"tail", [len(data) // 2], 65536)
    if eol == "\n":  # a bare LF ends the request line
        assert result == ("error", HeadError, 400, "LF without CR in the request head"), result
        return
    if _peek_py.has_dot_segment(path.encode()):  # "/." and "/a/.." are drawn too
        assert result[0] == "error" and "dot-segment" in result[3], result
        return
    assert result[0] == "head"
    head: RequestHead = result[1]
    assert (head.method, head.target, head.path, head.host) == (method, path, path, "svc")
    assert head.headers == tuple((n.lower(), v) for n, v in fields)
    assert head.head_length == len(data)


FRAMING_NAMES = {"host", "content-length", "transfer-encoding"}
