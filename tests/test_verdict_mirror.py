"""The mirrored copy's head (``verdict.shadow_head``, ``shadow_host``): the
bytes both relay twins send to a mirror, specified here once."""

from __future__ import annotations

import pytest

from l4proxy.dataplane.verdict import (
    MIRROR_SCALE,
    AnswerStatus,
    Mirror,
    Verdict,
    shadow_head,
    shadow_host,
)


@pytest.mark.parametrize(
    ("host", "shadow"),
    [
        (b"reviews", b"reviews-shadow"),
        (b"reviews:9080", b"reviews-shadow:9080"),
        (b"reviews.default.svc.cluster.local:80", b"reviews.default.svc.cluster.local-shadow:80"),
        (b"198.18.0.1:8080", b"198.18.0.1-shadow:8080"),
        (b"[::1]:80", b"[::1]-shadow:80"),
        (b"[::1]", b"[::1]-shadow"),
        (b"", b"-shadow"),
    ],
)
def test_shadow_host(host: bytes, shadow: bytes) -> None:
    assert shadow_host(host) == shadow


def test_shadow_head_rewrites_host_and_drops_the_clients_hop_by_hop_lines() -> None:
    head = (
        b"POST /cart?id=1 HTTP/1.1\r\n"
        b"Host:  shop:8080 \r\n"
        b"Connection: keep-alive\r\n"
        b"content-length: 2\r\n"
        b"X-B3-Sampled: 1\r\n"
        b"\r\n"
    )
    assert shadow_head(head) == (
        b"POST /cart?id=1 HTTP/1.1\r\n"
        b"Host: shop-shadow:8080\r\n"
        b"content-length: 2\r\n"
        b"X-B3-Sampled: 1\r\n"
        b"\r\n"
    )


def test_shadow_head_drops_every_connection_line_any_case() -> None:
    head = (
        b"GET / HTTP/1.1\r\nhost: a\r\nKEEP-ALIVE: timeout=5\r\nconnection: x\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: close\r\nx-connection: kept\r\n\r\n"
    )
    assert shadow_head(head) == (b"GET / HTTP/1.1\r\nhost: a-shadow\r\nx-connection: kept\r\n\r\n")


def test_shadow_head_bare_lf_and_no_host() -> None:
    assert shadow_head(b"GET /x HTTP/1.0\nAccept: */*\n\n") == (
        b"GET /x HTTP/1.0\r\nAccept: */*\r\n\r\n"
    )


def test_shadow_head_keeps_repeated_hosts_each_rewritten() -> None:
    # (the head parsers refuse two Host lines; the function still says what it does)
    out = shadow_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b:1\r\n\r\n")
    assert out == b"GET / HTTP/1.1\r\nHost: a-shadow\r\nHost: b-shadow:1\r\n\r\n"


def test_shadow_head_starts_at_the_request_line() -> None:
    """Empty lines before the request line (the relays drop them before
    they stage a head): skipped, where the first ended the copy's head
    and its body went to the mirror as a request of its own."""
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
    for lead in (b"\r\n", b"\n", b"\r\n\r\n\n"):
        assert shadow_head(lead + head) == (
            b"POST /x HTTP/1.1\r\nHost: a-shadow\r\nContent-Length: 3\r\n\r\n"
        ), lead


def test_shadow_head_ignores_bytes_after_the_head() -> None:
    out = shadow_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\r\n")
    assert out == b"GET / HTTP/1.1\r\nHost: a-shadow\r\n\r\n"


def test_mirror_defaults_and_verdict_field() -> None:
    m = Mirror((("198.18.0.2", 80),))
    assert m.ppm == MIRROR_SCALE and m.balance_key is None
    assert Verdict().mirrors == ()
    assert Verdict(mirrors=(m,)).mirrors == (m,)


# -- the status of a copy's answer (AnswerStatus: both relays read it so) --------


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", 503),
        (b"HTTP/1.1 204\r\n\r\n", 204),  # (no reason phrase)
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", 101),  # final (no tunnel for a copy)
        # interim heads skipped, the final one counted
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\n", 201),
        (b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", 200),
        (b"HTTP/1.1 100 Continue\n\nHTTP/1.1 404 Not Found\n\n", 404),  # bare LFs
        (b"HTTP/1.1 100\r\nx: 1\r\n\r\nHTTP/1.1 102\r\n\r\nHTTP/1.1 500\r\n\r\n", 500),
        # none final before the end: 0
        (b"", 0),
        (b"HTTP/1.1 20", 0),
        (b"HTTP/1.1 100 Continue\r\n\r\n", 0),
        (b"HTTP/1.1 100 Continue\r\nx: 1\r\n", 0),
        # not HTTP/1.x: 0, and nothing after is read
        (b"HTTP/2.0 200 OK\r\n\r\n", 0),
        (b"HTTP/1.1  200 OK\r\n\r\n", 0),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", 0),
        (b"http/1.1 200 OK\r\n\r\n", 0),
        (b"SSH-2.0-OpenSSH_9.2\r\n", 0),
        (b"HTTP/1.1 100 Continue\r\n\r\ngarbage and more garbage", 0),
        # a code is three digits, whatever they are
        (b"HTTP/1.1 000 Zero\r\n\r\n", 0),
        (b"HTTP/1.1 999 Odd\r\n\r\n", 999),
        (b"HTTP/1.1 099 Odd\r\n\r\n", 99),
    ],
)
def test_answer_status(answer: bytes, status: int) -> None:
    # whole, then cut at every point into two reads, then a byte at a time:
    # the same status (the compiled relay's reads are cut anywhere)
    cuts: list[list[bytes]] = [[answer]]
    cuts += [[answer[:i], answer[i:]] for i in range(1, len(answer))]
    cuts.append([answer[i : i + 1] for i in range(len(answer))])
    for reads in cuts:
        a = AnswerStatus()
        for data in reads:
            a.feed(data)
        assert a.status == status, reads


def test_answer_status_is_done_at_the_final_head_and_reads_no_further() -> None:
    a = AnswerStatus()
    a.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert not a.done and a.status == 0
    a.feed(b"HTTP/1.1 302 Found\r\n")
    assert a.done and a.status == 302
    a.feed(b"\r\nHTTP/1.1 500 x\r\n\r\n")  # (a body that looks like a head: not read)
    assert a.status == 302
    bad = AnswerStatus()
    bad.feed(b"<html>")
    assert not bad.done
    bad.feed(b"</html>\n")
    assert bad.done and bad.status == 0


def test_a_mirror_carries_its_tag() -> None:
    m = Mirror((("198.18.0.2", 80),), tag="v2-copies")
    assert m.tag == "v2-copies" and Mirror(()).tag is None
