"""The access log's line and its writer, pure (l4proxy/dataplane/accesslog.py):
Istio's TEXT and JSON formats field for field, the escaping that keeps a
client from forging a line, the caps that keep a line one atomic write,
and the writer that never makes the relay wait (a pipe nobody reads, a
write that fails). Through a real worker, both relay twins:
test_access_log_worker.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import select
import time
from collections.abc import Iterator

import pytest

from l4proxy.dataplane import accesslog as al

# a text line: printable ASCII, and backslashes that start a whole escape
ESCAPE = rb'\\(?:\\|"|x[0-9A-F]{2})'
TEXT_LINE = re.compile(rb"(?:[\x20-\x5b\x5d-\x7e]|" + ESCAPE + rb")*\n")
START = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
SUBSET = al.TagLog("outbound|8080|v2|svc.default.svc.cluster.local", "canary")


def _record(**changes: object) -> al.Record:
    rec = al.Record(
        start=START,
        method=b"GET",
        path=b"/items/1?q=2",
        protocol=b"HTTP/1.1",
        status=200,
        local=False,
        flags=0,
        received=0,
        sent=153,
        duration_ms=4,
        forwarded_for=b"10.0.0.1",
        user_agent=b"curl/8.5.0",
        request_id=b"3f2a",
        authority=b"svc:8080",
        upstream_host="10.1.0.7:8080",
        tag=SUBSET,
        upstream_local="10.1.0.2:40512",
        downstream_local="198.19.0.10:8080",
        downstream_remote="10.1.0.2:51000",
    )
    return rec._replace(**changes)


def test_a_text_line_is_istios_default_format_field_for_field() -> None:
    line = al.format_line(_record())
    assert line == (
        b'[2023-11-14T22:13:20.250Z] "GET /items/1?q=2 HTTP/1.1" 200 - via_upstream - "-" '
        b'0 153 4 - "10.0.0.1" "curl/8.5.0" "3f2a" "svc:8080" "10.1.0.7:8080" '
        b"outbound|8080|v2|svc.default.svc.cluster.local 10.1.0.2:40512 198.19.0.10:8080 "
        b"10.1.0.2:51000 - canary\n"
    )


def test_a_json_line_has_istios_keys_numbers_as_numbers_and_null_for_unset() -> None:
    line = al.format_line(_record(user_agent=None), json=True)
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    d = json.loads(line)
    assert list(d) == list(al.JSON_KEYS)
    assert d["start_time"] == "2023-11-14T22:13:20.250Z"
    assert (d["method"], d["path"], d["protocol"]) == ("GET", "/items/1?q=2", "HTTP/1.1")
    assert (d["response_code"], d["bytes_received"], d["bytes_sent"], d["duration"]) == (
        200,
        0,
        153,
        4,
    )
    assert d["response_flags"] == "-"  # (a string, as Envoy's)
    assert d["response_code_details"] == "via_upstream"
    assert d["upstream_cluster"] == "outbound|8080|v2|svc.default.svc.cluster.local"
    for unset in (
        "user_agent",
        "upstream_service_time",
        "connection_termination_details",
        "upstream_transport_failure_reason",
        "requested_server_name",
    ):
        assert d[unset] is None, unset


def test_flags_are_comma_joined_in_envoys_order() -> None:
    assert al.flags_text(0) == "-"
    assert al.flags_text(al.URX | al.UF) == "UF,URX"
    assert al.flags_text(al.DC | al.UH | al.DI) == "UH,DI,DC"
    every = al.flags_text(al.FLAGS)
    assert every.split(",") == list(al.FLAG_NAMES)


@pytest.mark.parametrize(
    ("flags", "status", "local", "expected"),
    [
        (al.UH, 503, True, "no_healthy_upstream"),
        (al.UF | al.URX, 503, True, "upstream_reset_before_response_started{connection_failure}"),
        (al.UO, 503, True, "upstream_reset_before_response_started{overflow}"),
        (al.UT, 504, True, "upstream_response_timeout"),
        (al.UC, 502, True, "upstream_reset_before_response_started{connection_termination}"),
        (
            al.UC | al.CUT,
            200,
            False,
            "upstream_reset_after_response_started{connection_termination}",
        ),
        (al.FI, 503, True, "fault_filter_abort"),
        (al.DI, 200, False, "via_upstream"),
        (al.URX, 503, False, "via_upstream"),
        (al.CUT, 0, False, "downstream_remote_disconnect"),
        (al.LOCAL_VERDICT, 404, True, "route_not_found"),
        (0, 500, True, "direct_response"),
    ],
)
def test_response_code_details_say_why_in_envoys_words(
    flags: int, status: int, local: bool, expected: str
) -> None:
    tag = al.TagLog("", "", al.NR, "route_not_found")
    line = al.format_line(_record(flags=flags, status=status, local=local, tag=tag), json=True)
    assert json.loads(line)["response_code_details"] == expected


def test_a_request_cut_with_no_other_reason_is_dc() -> None:
    d = json.loads(al.format_line(_record(flags=al.CUT, status=0), json=True))
    assert d["response_flags"] == "DC"
    d = json.loads(al.format_line(_record(flags=al.CUT | al.UT, status=200), json=True))
    assert d["response_flags"] == "UT"  # (the route timeout cut it, not its client)


def test_a_routes_own_answer_has_its_tags_flags_and_no_cluster() -> None:
    nr = al.TagLog("", "", al.NR, "route_not_found")
    rec = _record(status=404, local=True, flags=al.LOCAL_VERDICT, tag=nr, upstream_host=None)
    line = al.format_line(rec)
    assert b" 404 NR route_not_found " in line
    assert b'"-" - - 198.19.0.10:8080' in line  # no upstream host, cluster, local address
    assert line.endswith(b" - -\n")  # no server name, no route


def test_a_client_cannot_forge_a_line_or_a_field() -> None:
    """Quotes, backslashes, CR, LF, controls and bytes past ASCII in what a
    client sends come out escaped: one line, every quoted field closed
    where the format closes it; the JSON parses to what was sent."""
    evil = b'x" 200 - via_upstream\r\n[2023-11-14T22:13:20.250Z] "GET /admin\\\x00\x7f\xe9'
    line = al.format_line(_record(user_agent=evil, path=b'/a"b'))
    assert line.count(b"\n") == 1 and b"\r" not in line
    assert all(0x20 <= b < 0x7F for b in line[:-1]), line
    assert b'"x\\" 200 - via_upstream\\x0D\\x0A[2023' in line
    assert b"\\\\\\x00\\x7F\\xE9" in line
    assert TEXT_LINE.fullmatch(line), line
    assert re.sub(ESCAPE, b"", line).count(b'"') == 14  # 7 quoted fields, each closed
    d = json.loads(al.format_line(_record(user_agent=evil), json=True))
    assert d["user_agent"] == evil.decode("latin-1")


def test_valid_utf8_is_written_as_it_is_and_any_other_byte_escaped() -> None:
    """A valid UTF-8 character from U+00A0 is written as it is, in TEXT and
    JSON (Envoy's); a byte of no valid character (alone, a surrogate's, an
    overlong form's, past U+10FFFF, a character cut short) and a C1 control
    are escaped; a cut never splits a character."""
    name = "café 路由 🚀".encode()
    assert al.escape(name, 100) == name and al.escape(name, 100, json=True) == name
    bad = b"\xe9 \xc2\x9b \xed\xa0\x80 \xc0\xaf \xf4\x90\x80\x80 \xe2\x82"
    assert al.escape(bad, 200) == (
        rb"\xE9 \xC2\x9B \xED\xA0\x80 \xC0\xAF \xF4\x90\x80\x80 \xE2\x82"
    )
    got = json.loads(b'"' + al.escape(bad, 200, json=True) + b'"')
    assert got == "\xe9 \x9b \xed\xa0\x80 \xc0\xaf \xf4\x90\x80\x80 \xe2\x82"
    eight = "路由" * 4  # (3 bytes a character: 8 bytes of room take 2)
    assert al.escape(eight.encode(), 8 + len(al.TRUNCATED)) == "路由".encode() + al.TRUNCATED
    line = al.format_line(_record(tag=al.TagLog("outbound|8080|v2|svc", "カナリア")))
    assert line.endswith(" - カナリア\n".encode())


def test_any_bytes_give_a_line_of_valid_utf8_and_json_that_parses() -> None:
    """Random values of the bytes that matter (seeded): TEXT is valid UTF-8
    without a control character; JSON parses to the value read as UTF-8,
    each byte of no valid character read as ISO-8859-1."""
    rnd = random.Random(7)
    alphabet = b'A"\\\x7f\n\x80\x9f\xa0\xbf\xc0\xc1\xc2\xdf\xe0\xed\xef\xf0\xf4\xf5\xff'
    for _ in range(3000):
        value = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(10)))
        text = al.escape(value, 1000).decode("utf-8")  # (strict)
        assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in text), value
        expected = "".join(
            chr(ord(ch) - 0xDC00) if 0xDC80 <= ord(ch) <= 0xDCFF else ch
            for ch in value.decode("utf-8", "surrogateescape")
        )
        assert json.loads(b'"' + al.escape(value, 1000, json=True) + b'"') == expected, value


def _worst() -> al.Record:
    return _record(
        method=b"\x01" * 100,
        path=b'"' * 5000,
        protocol=b"\xff" * 100,
        forwarded_for=b"\x00" * 5000,
        user_agent=b"\x7f" * 5000,
        request_id=b"\\" * 5000,
        authority=b"\x80" * 5000,
        upstream_host="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        upstream_local="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        downstream_local="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        downstream_remote="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        tag=al.TagLog("\x01" * 900, "\x01" * 900, al.NR, "\x01" * 900),
        flags=al.FLAGS | al.LOCAL_VERDICT,
        status=999,
        received=2**63 - 1,
        sent=2**63 - 1,
        duration_ms=2**63 - 1,
    )


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_line_is_at_most_pipe_buf_whatever_the_values(as_json: bool) -> None:
    """Every value at its cap, escaped as long as escaping makes it: still
    one write of at most PIPE_BUF; a value cut ends with the marker, at a
    whole escape (the JSON still parses)."""
    line = al.format_line(_worst(), as_json)
    assert len(line) <= al.LINE_MAX == select.PIPE_BUF
    assert line.count(b"\n") == 1 and al.TRUNCATED in line
    if as_json:
        d = json.loads(line)
        assert d["path"].endswith(al.TRUNCATED.decode()) and len(d["path"]) < 1024
    else:  # every backslash starts a whole escape
        assert TEXT_LINE.fullmatch(line), line


def test_escape_cuts_at_a_whole_escape() -> None:
    out = al.escape(b"\x01" * 40, 30)
    assert out == b"\\x01" * 4 + al.TRUNCATED  # 16 bytes of escapes fit before the marker
    assert al.escape(b"abc", 3) == b"abc"  # (fits: not cut)
    assert al.escape(b"a" * 20, 3 + len(al.TRUNCATED)) == b"aaa" + al.TRUNCATED


def test_a_cut_kept_at_its_end_starts_at_an_element() -> None:
    """X-Forwarded-For cut keeps its end (the proxies in front append
    theirs), after the marker: from the start of an element (past a comma
    and its spaces) where one is in what fits, else from a whole
    character."""
    value = b"1.1.1.1, 2.2.2.2, 3.3.3.3,4.4.4.4"
    room = len(al.TRUNCATED)
    assert al.escape(value, 33, keep_end=True) == value  # (fits: not cut)
    assert al.escape(value, room + 16, keep_end=True) == al.TRUNCATED + b"3.3.3.3,4.4.4.4"
    assert al.escape(value, room + 15, keep_end=True) == al.TRUNCATED + b"3.3.3.3,4.4.4.4"
    assert al.escape(value, room + 14, keep_end=True) == al.TRUNCATED + b"4.4.4.4"
    assert al.escape(value, room + 5, keep_end=True) == al.TRUNCATED + b"4.4.4"  # (no comma)
    assert al.escape(b"x" * 20 + "é路".encode(), room + 4, keep_end=True) == (
        al.TRUNCATED + "路".encode()  # (é and 路: 5 bytes, 路 alone fits)
    )
    line = al.format_line(_record(forwarded_for=b"6.6.6.6, " * 40 + b"10.0.0.1"))
    assert b'"' + al.TRUNCATED + b"6.6.6.6, " in line and b', 10.0.0.1" "curl/8.5.0"' in line


def test_chunks_are_whole_lines_of_at_most_pipe_buf() -> None:
    lines = [b"%d " % i + b"x" * (i * 37 % 3000) + b"\n" for i in range(200)]
    data = b"".join(lines)
    chunks = [bytes(c) for c in al.chunks(data)]
    assert b"".join(chunks) == data
    assert all(len(c) <= al.LINE_MAX and c.endswith(b"\n") for c in chunks)
    assert len(chunks) < len(lines)  # (several lines a write)


# -- the writer ----------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # (a page: full after a few lines)
    try:
        yield r, w
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def _read_all(fd: int, n: int, timeout: float = 5.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while out.count(b"\n") < n and time.monotonic() < deadline:
        try:
            out += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
    return out


def test_the_writer_writes_every_line_whole(pipe: tuple[int, int]) -> None:
    r, w = pipe
    writer = al.LineWriter(os.dup(w))
    try:
        lines = [b"line %d %s\n" % (i, b"y" * (i % 500)) for i in range(300)]
        for line in lines:
            writer.line(line)
        got = _read_all(r, len(lines))
        assert got.splitlines(keepends=True) == lines
        assert writer.flush(1.0)
        assert writer.stats() == {
            "access_log_lines": 300,
            "access_log_dropped": 0,
            "access_log_write_errors": 0,
        }
    finally:
        writer.close(0.5)


def test_a_reader_that_never_reads_costs_lines_never_a_wait(pipe: tuple[int, int]) -> None:
    """The pipe full and its reader stopped: line() still returns at once
    (counted: what the buffer took, what it dropped), the writer blocked in
    its write; close() gives up on it within its timeout."""
    r, w = pipe
    writer = al.LineWriter(os.dup(w), limit=al.LINE_MAX * 2)
    thread = writer._thread
    line = b"z" * 199 + b"\n"
    started = time.monotonic()
    for _ in range(1000):
        writer.line(line)
    assert time.monotonic() - started < 1.0  # (1000 appends: no write waited for)
    deadline = time.monotonic() + 5
    while writer.stats()["access_log_dropped"] == 0 and time.monotonic() < deadline:
        writer.line(line)
    stats = writer.stats()
    assert stats["access_log_dropped"] > 0
    assert stats["access_log_lines"] + stats["access_log_dropped"] >= 1000
    assert not writer.flush(0.2)  # (it cannot: nobody reads)
    started = time.monotonic()
    writer.close(0.2)
    assert time.monotonic() - started < 2.0
    assert thread.is_alive()  # (blocked in its write: left to end by itself)
    os.close(r)  # its write fails (EPIPE): it drops the rest, ends, closes its fd
    thread.join(5)
    assert not thread.is_alive()


def test_a_write_error_is_counted_and_the_writer_goes_on(
    pipe: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    """EPIPE (the reader gone): the batch dropped, counted, logged once; the
    writer goes on (the next lines fail the same way, counted, not logged)."""
    r, w = pipe
    os.close(r)
    writer = al.LineWriter(os.dup(w))
    try:
        writer.line(b"first\n")
        writer.flush(1.0)
        writer.line(b"second\n")
        writer.line(b"third\n")
        writer.flush(1.0)
        stats = writer.stats()
        assert 2 <= stats["access_log_write_errors"] <= 3  # (the last two: one batch or two)
        assert stats["access_log_dropped"] == 3 and stats["access_log_lines"] == 3
        warnings = [rec for rec in caplog.records if "access log" in rec.getMessage()]
        assert len(warnings) == 1 and os.strerror(errno.EPIPE) in warnings[0].getMessage()
    finally:
        writer.close(0.5)
