"""Message framing (l4proxy.dataplane.framing): where bodies end, and what is refused.

Every body case runs on both twins (compiled ``l4proxy.dataplane._ext.framing`` and
pure ``l4proxy.dataplane._framing_py``), on the whole buffer and again in small pieces
(h11's rule): the outcome must not depend on how the bytes were split, nor
on which twin framed them (also fuzzed against each other).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.dataplane._framing_py import (
    MAX_CHUNK_LINE,
    Framing,
    FramingError,
    ResponseHead,
    crlf_head,
    head_may_end,
    parse_response_head,
    request_framing,
    response_framing,
)
from l4proxy.dataplane._peek_py import parse_head
from tests.conftest import load_twin

NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture(params=["compiled", "pure"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("framing", request.param)


def run(framer: Any, data: bytes, step: int = 0) -> int:
    """Feed *data* whole (step 0) or in *step*-byte pieces; bytes consumed."""
    if not step:
        return framer.feed(data)
    used = 0
    for i in range(0, len(data), step):
        piece = data[i : i + step]
        k = framer.feed(piece)
        used += k
        if framer.done:
            break
        assert k == len(piece)  # an unfinished body swallows all it is fed
    return used


CHUNKED_OK = [
    (b"5\r\nhello\r\n0\r\n\r\n", "one chunk"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "two chunks"),
    (b"0\r\n\r\n", "empty body"),
    (b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n", "hex in both cases"),
    (b"0005\r\nhello\r\n000\r\n\r\n", "leading zeros"),
    (b"0000000000000000000000005\r\nhello\r\n0\r\n\r\n", "many leading zeros"),
    (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", "extensions"),
    (b'5 ;a="q s";b\r\nhello\r\n0\r\n\r\n', "BWS before ';' and a quoted value"),
    (b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n", "trailers"),
    (b"4\r\n\r\n\r\n\r\n0\r\n\r\n", "data that looks like framing"),
]


@pytest.mark.parametrize("step", [0, 1, 3])
@pytest.mark.parametrize(("body", "why"), CHUNKED_OK, ids=[w for _, w in CHUNKED_OK])
def test_chunked_body_ends_exactly_where_it_should(
    twin: ModuleType, body: bytes, why: str, step: int
) -> None:
    f = twin.BodyFramer(Framing.CHUNKED)
    assert run(f, body + NEXT, step) == len(body)
    assert f.done


CHUNKED_BAD = [
    (b"5\nhello\r\n0\r\n\r\n", "bare LF in a chunk-size line"),
    (b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF"),
    (b"5\r\nhelloX\r\n0\r\n\r\n", "chunk data not followed by CRLF"),
    (b"5\r\nhello\rX0\r\n\r\n", "chunk data not followed by CRLF"),
    (b"\r\nhello\r\n", "chunk size is not hexadecimal"),
    (b" 5\r\nhello\r\n0\r\n\r\n", "chunk size is not hexadecimal"),
    (b"-1\r\n", "chunk size is not hexadecimal"),
    (b"+5\r\nhello\r\n", "chunk size is not hexadecimal"),
    (b"0x5\r\nhello\r\n", "invalid byte after the chunk size"),
    (b"5 x\r\nhello\r\n", "invalid byte after the chunk size"),
    (b"5\x00\r\nhello\r\n", "invalid byte after the chunk size"),
    (b"8000000000000000\r\n", "chunk size overflows"),
    (b"ffffffffffffffffff\r\n", "chunk size overflows"),
    (b"5;a\nb\r\nhello\r\n", "bare LF in a chunk-size line"),
    (b"5;a\x01\r\nhello\r\n", "control byte in a chunk extension"),
    (b"5;a\x00\r\nhello\r\n", "control byte in a chunk extension"),
    (b"5;a\rb\r\nhello\r\n", "CR without LF after the chunk size"),
    (b"0\r\n:y\r\n\r\n", "trailer line malformed"),
    (b"0\r\nX: \x7f\r\n\r\n", "trailer line malformed"),
    (b"5;" + b"x" * MAX_CHUNK_LINE + b"\r\n", "chunk-size line longer than 4096 bytes"),
    (b"0\r\n\n", "bare LF in the trailer section"),
    (b"0\r\nX: y\n\r\n", "bare LF in the trailer section"),
    (b"0\r\nX: y\r\n folded\r\n\r\n", "trailer line malformed"),
    (b"0\r\nX : y\r\n\r\n", "trailer line malformed"),
    (b"0\r\nnocolon\r\n\r\n", "trailer line without a colon"),
    (b"0\r\nX: y\rz\r\n\r\n", "CR without LF in the trailer section"),
    (b"0\r\n\rX", "CR without LF at the end of the trailers"),
]


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize(("body", "why"), CHUNKED_BAD, ids=[w for _, w in CHUNKED_BAD])
def test_chunked_refusals(twin: ModuleType, body: bytes, why: str, step: int) -> None:
    f = twin.BodyFramer(Framing.CHUNKED, error_status=400)
    with pytest.raises(FramingError) as e:
        run(f, body, step)
    assert (e.value.status, e.value.reason) == (400, why)
    with pytest.raises(FramingError) as again:  # and again, for good
        f.feed(b"0\r\n\r\n")
    assert again.value.used == 0


def test_a_refusal_counts_the_bytes_framed_before_the_refused_one(twin: ModuleType) -> None:
    """Fed whole, a valid chunk then a bad chunk-size line: the error's
    ``used`` is every byte before the refused LF, as many as a feed of the
    valid chunk alone, then of the next line's "5", returns."""
    body = b"5\r\nhello\r\n5\nhello\r\n0\r\n\r\n"
    with pytest.raises(FramingError) as e:
        twin.BodyFramer(Framing.CHUNKED, error_status=502).feed(body)
    assert (e.value.reason, e.value.used) == ("bare LF in a chunk-size line", 11)
    f = twin.BodyFramer(Framing.CHUNKED, error_status=502)
    assert (f.feed(body[:10]), f.feed(body[10:11])) == (10, 1)
    with pytest.raises(FramingError) as e:
        f.feed(body[11:])
    assert e.value.used == 0


def test_trailer_section_is_bounded(twin: ModuleType) -> None:
    f = twin.BodyFramer(Framing.CHUNKED, error_status=502, max_trailers=100)
    with pytest.raises(FramingError) as e:
        f.feed(b"0\r\n" + b"X: " + b"y" * 200 + b"\r\n\r\n")
    assert e.value.status == 502 and "trailer section larger than 100" in e.value.reason


def test_chunk_data_is_skipped_blind_by_count(twin: ModuleType) -> None:
    size = 1 << 30
    f = twin.BodyFramer(Framing.CHUNKED)
    assert f.feed(b"40000000\r\n") == 10
    assert f.blind() == size
    f.skip(size - 1)
    assert f.blind() == 1 and not f.done
    assert f.feed(b"x\r\n0\r\n\r\nrest") == 8
    assert f.done and f.blind() == 0
    with pytest.raises(ValueError):
        f.skip(1)


def test_length_body_and_blind_skip(twin: ModuleType) -> None:
    f = twin.BodyFramer(Framing.LENGTH, 10)
    assert f.blind() == 10
    f.skip(4)
    assert f.feed(b"123456789") == 6 and f.done
    assert twin.BodyFramer(Framing.NONE).done and twin.BodyFramer(Framing.NONE).feed(b"x") == 0
    assert twin.BodyFramer(Framing.LENGTH, 0).done


def test_close_and_tunnel_never_end(twin: ModuleType) -> None:
    for kind in (Framing.CLOSE, Framing.TUNNEL):
        f = twin.BodyFramer(kind)
        assert f.feed(b"anything\r\n\r\n") == 12 and not f.done


def chunk_stream() -> st.SearchStrategy[bytes]:
    chunk = st.binary(min_size=1, max_size=40).map(lambda d: b"%x\r\n%s\r\n" % (len(d), d))
    trailer = st.sampled_from([b"", b"X-A: 1\r\n", b'Etag: "v"\r\nX-B:\r\n'])
    return st.tuples(st.lists(chunk, max_size=6), trailer).map(
        lambda t: b"".join(t[0]) + b"0\r\n" + t[1] + b"\r\n"
    )


def both() -> list[ModuleType]:
    return [load_twin("framing", "compiled"), load_twin("framing", "pure")]


@settings(max_examples=300, deadline=None)
@given(chunk_stream(), st.data())
def test_any_split_of_a_valid_chunked_body_ends_at_the_same_byte(
    body: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body) + len(NEXT)), max_size=8)))
    stream = body + NEXT
    for twin in both():
        f = twin.BodyFramer(Framing.CHUNKED)
        used, prev = 0, 0
        for cut in [*cuts, len(stream)]:
            if f.done:
                break
            used += f.feed(stream[prev:cut])
            prev = cut
        assert f.done and used == len(body)


# Mostly the bytes chunked framing is made of, so the fuzz reaches deep states.
FRAMING_BYTES = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"0", b"5", b"a", b"F", b";", b" ", b"\t", b":", b"X", b"=",
                         b"\n", b"\r", b"\x00", b"\x7f", b"\xff", b"0\r\n", b"hello"]),
        st.binary(max_size=4),
    ),
    max_size=60,
).map(b"".join)  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(FRAMING_BYTES, st.integers(1, 7), st.sampled_from([16, 65536]))
def test_twins_agree_on_any_bytes_at_any_split(data: bytes, step: int, max_trailers: int) -> None:
    """Frame it or raise FramingError, the same way for both twins and any
    split; an error at the same byte (the bytes framed before it: those fed
    before the piece that raised, and its ``used``)."""

    def outcome(twin: ModuleType, step: int) -> tuple[str, int | str, int]:
        f = twin.BodyFramer(Framing.CHUNKED, max_trailers=max_trailers)
        framed = 0
        try:
            for i in range(0, len(data), step or len(data) or 1):
                piece = data[i : i + (step or len(data))]
                framed += f.feed(piece)
                if f.done:
                    break
            return ("ok" if f.done else "more", framed, 0)
        except FramingError as e:
            assert 0 <= e.used < len(piece)  # the refused byte is not framed
            return ("error", e.reason, framed + e.used)

    twins = both()
    whole = outcome(twins[1], 0)
    for twin in twins:
        assert outcome(twin, 0) == whole
        assert outcome(twin, step) == whole
    if whole[0] == "ok":
        assert isinstance(whole[1], int) and 0 < whole[1] <= len(data)


# -- response heads ---------------------------------------------------------


def test_response_head_parses_and_counts_its_bytes() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  spaced value \r\n\r\nhello"
    head = parse_response_head(raw)
    assert head == ResponseHead(
        "HTTP/1.1", 200, "OK", (("content-length", "5"), ("x-a", "spaced value")), len(raw) - 5
    )
    assert parse_response_head(b"HTTP/1.0 204\r\n\r\n") == ResponseHead("HTTP/1.0", 204, "", (), 16)
    # a legacy server's head may end its lines in a bare LF: said
    lf = parse_response_head(b"HTTP/1.1 200 OK\nA: b\r\n\n")
    assert lf == ResponseHead("HTTP/1.1", 200, "OK", (("a", "b"),), 23, bare_lf=True)
    assert not head.bare_lf
    for partial in (
        b"",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n\r",
        b"HTTP/1.1 200 OK\nA: b\r\n",
    ):
        assert parse_response_head(partial) is None


RESPONSE_HEAD_BAD = [
    (b"HTTP/1.1 20 OK\r\n\r\n", "malformed response status line"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "malformed response status line"),
    (b"HTTP/2.0 200 OK\r\n\r\n", "response HTTP version is not 1.x"),
    (b"ICY 200 OK\r\n\r\n", "malformed response status line"),
    (b"\r\n\r\n", "empty response status line"),
    (b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n", "malformed response header line (code 11)"),
    (b"HTTP/1.1 200 OK\r\nA : b\r\n\r\n", "malformed response header line (code 14)"),
    (b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n", "CR without LF in the response head"),
    # a bare CR beside bare LFs (which end lines: below)
    (b"HTTP/1.1 200 OK\nA: b\rc\n\n", "CR without LF in the response head"),
    (b"HTTP/1.1 200 OK\rA: b\n\n", "CR without LF in the response head"),
    (b"\n\r\n", "empty response status line"),
    (b"HTTP/1.1 200 OK\nA: b\n c\n\n", "malformed response header line (code 11)"),
]


# a bare LF ending any line (the status line, a header line, the empty
# line): the line ends there, as with CRLF, and the head says so; it goes
# on as crlf_head() writes it, each line ending in CRLF
RESPONSE_HEAD_LF = [
    b"HTTP/1.1 200 OK\nA: b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nA: b\nC: d\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nA: b\n\r\n",
    b"HTTP/1.1 200 OK\r\nA: b\r\n\n",
    b"HTTP/1.1 200 OK\nA: b\n\n",
]


@pytest.mark.parametrize("raw", RESPONSE_HEAD_LF)
def test_response_head_bare_lf_ends_a_line(raw: bytes) -> None:
    crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, want = parse_response_head(raw + b"ok"), parse_response_head(crlf + b"ok")
    assert head is not None and want is not None
    assert head.bare_lf and not want.bare_lf
    assert head._replace(head_length=0, bare_lf=False) == want._replace(head_length=0)
    assert head.head_length == len(raw)
    assert crlf_head(raw) == crlf
    assert crlf_head(crlf) == crlf  # (a CRLF head: as it is)
    assert parse_response_head(crlf_head(raw)) == want._replace(head_length=len(crlf))


@pytest.mark.parametrize(("raw", "why"), RESPONSE_HEAD_BAD, ids=[w for _, w in RESPONSE_HEAD_BAD])
def test_response_head_refusals(raw: bytes, why: str) -> None:
    with pytest.raises(FramingError) as e:
        parse_response_head(raw)
    assert (e.value.status, e.value.reason) == (502, why)


def test_response_head_is_bounded() -> None:
    with pytest.raises(FramingError, match="larger than 100 bytes"):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 200, max_head=100)


# -- which framing ----------------------------------------------------------


def req(raw: bytes) -> object:
    head = parse_head(raw)
    assert head is not None
    return head


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
UPGRADE = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
CONNECT = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (GET, (Framing.NONE, 0)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n", (Framing.LENGTH, 7)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", (Framing.NONE, 0)),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", (Framing.CHUNKED, 0)),
        (CONNECT, (Framing.NONE, 0)),
    ],
)
def test_request_framing(raw: bytes, expected: tuple[Framing, int]) -> None:
    head = parse_head(raw)
    assert head is not None and request_framing(head) == expected


RESPONSES = [
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", (Framing.LENGTH, 5)),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", (Framing.LENGTH, 5)),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", (Framing.NONE, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", (Framing.CHUNKED, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", (Framing.CHUNKED, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", (Framing.CLOSE, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, identity\r\n\r\n", (Framing.CLOSE, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xgzip\xa0\r\n\r\n", (Framing.CLOSE, 0)),
    # empty list elements are no coding (RFC 9110 §5.6.1)
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n", (Framing.CHUNKED, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked ,\r\n\r\n", (Framing.CHUNKED, 0)),
    (
        GET,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
        (Framing.CHUNKED, 0),
    ),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\n", (Framing.CLOSE, 0)),
    # a HEAD's answer has no body: its codings are not read
    (HEAD, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", (Framing.NONE, 0)),
    (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,\tchunked \r\n\r\n", (Framing.CHUNKED, 0)),
    (GET, b"HTTP/1.1 200 OK\r\n\r\n", (Framing.CLOSE, 0)),
    (HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", (Framing.NONE, 0)),
    (GET, b"HTTP/1.1 204 No Content\r\n\r\n", (Framing.NONE, 0)),
    (GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", (Framing.NONE, 0)),
    (GET, b"HTTP/1.1 100 Continue\r\n\r\n", (Framing.NONE, 0)),
    (GET, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", (Framing.NONE, 0)),
    # a 1xx's Content-Length of 0 frames nothing (Envoy's one exception)
    (GET, b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n", (Framing.NONE, 0)),
    (
        UPGRADE,
        b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
        (Framing.TUNNEL, 0),
    ),
    (UPGRADE, b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n", (Framing.TUNNEL, 0)),
    (CONNECT, b"HTTP/1.1 200 Connection established\r\n\r\n", (Framing.TUNNEL, 0)),
    (CONNECT, b"HTTP/1.1 407 Auth\r\nContent-Length: 2\r\n\r\n", (Framing.LENGTH, 2)),
]


@pytest.mark.parametrize(("request_raw", "raw", "expected"), RESPONSES)
def test_response_framing(request_raw: bytes, raw: bytes, expected: tuple[Framing, int]) -> None:
    request, response = parse_head(request_raw), parse_response_head(raw)
    assert request is not None and response is not None
    assert response_framing(request, response) == expected


BAD_CL = "invalid Content-Length in the response"
NOT_ONCE_AND_LAST = "chunked not once and last in the response's Transfer-Encoding"
RESPONSES_BAD = [
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
     "both Content-Length and Transfer-Encoding in the response"),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     "conflicting Content-Length values in the response"),
    *(
        (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n" % te, NOT_ONCE_AND_LAST)
        for te in (
            b"chunked, chunked",
            b"chunked\r\nTransfer-Encoding: chunked",
            b"gzip, chunked\r\nTransfer-Encoding: chunked",
            b"chunked, gzip",
            b"chunked, identity",
            b"chunked\xa0",
            b"chunked;q=1",
            b'"chunked"',
            b"xchunked",
            b"CHUNKED, Chunked",
        )
    ),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", BAD_CL),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n", BAD_CL),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n", BAD_CL),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: \xa05\r\n\r\n", BAD_CL),  # NBSP: not OWS
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5\x85\r\n\r\n", BAD_CL),  # nor NEL
    (HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", BAD_CL),
    (GET, b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
     "Transfer-Encoding in an HTTP/1.0 response"),
    (GET, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
     "101 Switching Protocols without an Upgrade request"),
    # a server MUST NOT send them in a 1xx (RFC 9110 §8.6, RFC 9112 §6.1)
    (GET, b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n",
     "Content-Length in a 1xx response"),
    (UPGRADE, b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\n",
     "Content-Length in a 1xx response"),
    (GET, b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n",
     "Transfer-Encoding in a 1xx response"),
    (HEAD, b"HTTP/1.1 100 Continue\r\nTransfer-Encoding:\r\n\r\n",
     "Transfer-Encoding in a 1xx response"),
    (GET, b"HTTP/1.1 100 Continue\r\nContent-Length: 05\r\n\r\n",
     "Content-Length in a 1xx response"),
]  # fmt: skip


@pytest.mark.parametrize(("request_raw", "raw", "why"), RESPONSES_BAD)
def test_response_framing_refusals(request_raw: bytes, raw: bytes, why: str) -> None:
    request, response = parse_head(request_raw), parse_response_head(raw)
    assert request is not None and response is not None
    with pytest.raises(FramingError) as e:
        response_framing(request, response)
    assert (e.value.status, e.value.reason) == (502, why)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_a_trickled_head_is_judged_once_its_end_may_be_there(eol: bytes, step: int) -> None:
    """head_may_end (the pure relay's look for a response head's end, and
    its copies' answers'): a head read in *step*-byte pieces is parsed at
    its first read, then not again until the read that completes its empty
    line (one straddling two reads found), and the bytes it looks at stay
    linear in the head's size (each look from where the last one stopped,
    less two bytes; then one parse of the whole)."""
    head = b"HTTP/1.1 200 OK" + eol + b"".join(b"X-%d: v" % i + eol for i in range(40)) + eol
    buf, clean, looked, parsed_at = bytearray(), 0, 0, []
    for i in range(0, len(head), step):
        old = len(buf)
        buf += head[i : i + step]
        parse, clean, n = head_may_end(buf, old, clean, 65536)
        looked += n
        if parse:
            parsed_at.append(len(buf))
            complete = parse_response_head(bytes(buf), 65536) is not None
            assert complete == (len(buf) == len(head)), len(buf)
    assert parsed_at == [min(step, len(head)), len(head)]
    assert looked <= len(head) + 2 * (len(head) // step + 1) + len(head)
