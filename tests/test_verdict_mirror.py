"""The mirrored copy's head (``verdict.shadow_head``, ``shadow_host``): the
bytes both relay twins send to a mirror, specified here once."""

from __future__ import annotations

import pytest

from l4proxy.dataplane.verdict import MIRROR_SCALE, Mirror, Verdict, shadow_head, shadow_host


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


def test_shadow_head_rewrites_host_and_closes() -> None:
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
        b"connection: close\r\n"
        b"\r\n"
    )


def test_shadow_head_drops_every_connection_line_any_case() -> None:
    head = (
        b"GET / HTTP/1.1\r\nhost: a\r\nKEEP-ALIVE: timeout=5\r\nconnection: x\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: close\r\nx-connection: kept\r\n\r\n"
    )
    assert shadow_head(head) == (
        b"GET / HTTP/1.1\r\nhost: a-shadow\r\nx-connection: kept\r\nconnection: close\r\n\r\n"
    )


def test_shadow_head_bare_lf_and_no_host() -> None:
    assert shadow_head(b"GET /x HTTP/1.0\nAccept: */*\n\n") == (
        b"GET /x HTTP/1.0\r\nAccept: */*\r\nconnection: close\r\n\r\n"
    )


def test_shadow_head_keeps_repeated_hosts_each_rewritten() -> None:
    # (the head parsers refuse two Host lines; the function still says what it does)
    out = shadow_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b:1\r\n\r\n")
    assert (
        out == b"GET / HTTP/1.1\r\nHost: a-shadow\r\nHost: b-shadow:1\r\nconnection: close\r\n\r\n"
    )


def test_shadow_head_ignores_bytes_after_the_head() -> None:
    out = shadow_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\r\n")
    assert out == b"GET / HTTP/1.1\r\nHost: a-shadow\r\nconnection: close\r\n\r\n"


def test_mirror_defaults_and_verdict_field() -> None:
    m = Mirror((("198.18.0.2", 80),))
    assert m.ppm == MIRROR_SCALE and m.balance_key is None
    assert Verdict().mirrors == ()
    assert Verdict(mirrors=(m,)).mirrors == (m,)
