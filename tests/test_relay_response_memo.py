"""The compiled loop keeps the last final response head it judged for an
endpoint (R.memo, response_head_memo() in ext/relay.pyx: "Heads seen
before"), and a response that begins with the same bytes, the empty line
included, takes that head's verdict without its lines being judged. The
verdict must be the one response_head() makes of the response judged
afresh, byte by byte, on every input: a head repeated with another body, a
HEAD request's answer after a GET's of the same head (no body then), the
same head cut short, and the head with one byte changed, inserted or
removed anywhere in it. Seeded; every case is checked through a slot that
holds a head judged just before."""

from __future__ import annotations

import random
from typing import Any

from l4proxy.dataplane._relay_py import Decision
from tests.conftest import load_twin
from tests.test_relay_response_heads import _head, _mutate

NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
    b"Date: Mon, 07 Dec 2026 00:55:52 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\n"
)
SLOTS = 8  # MEMO_HEADS


def _relay() -> Any:
    return load_twin("relay", "compiled").HttpRelay(lambda h, o: Decision(), lambda *a: None)


def _check(relay: Any, raw: bytes, head_request: bool, slot: int) -> tuple[int, ...]:
    """*raw* judged through the memo's *slot* and afresh byte by byte: the same."""
    kept = relay._response_head(raw, head_request, True, slot)
    fresh = relay._response_head(raw, head_request, False)
    assert kept == fresh, (raw, head_request, slot, kept, fresh)
    return tuple(kept)


def _complete_heads(rng: random.Random, count: int) -> list[bytes]:
    """*count* heads the loop takes itself (judged 1), their bodies cut off."""
    relay = _relay()
    heads: list[bytes] = []
    try:
        while len(heads) < count:
            raw = _head(rng)
            r, hl = relay._response_head(raw, False, False)[:2]
            if r == 1:
                heads.append(raw[:hl])
    finally:
        relay.close()
    return heads


def test_a_head_seen_before_gets_the_verdict_it_gets_afresh() -> None:
    rng = random.Random(1107)
    heads = _complete_heads(rng, 300)
    relay = _relay()
    hits = 0
    try:
        for _ in range(30000):
            slot = rng.randrange(SLOTS)
            head = rng.choice(heads)
            body = b"b" * rng.choice([0, 0, 1, 3, 17, 60])
            # the slot holds this head (as a response before this one left it)
            first = _check(relay, head + b"x" * rng.choice([0, 5]), rng.random() < 0.2, slot)
            assert first[0] == 1 and first[1] == len(head)
            kind = rng.randrange(6)
            if kind == 0:  # the same head, another body: taken from the slot
                raw = head + body
                hits += 1
            elif kind == 1:  # cut short, by up to the whole empty line and more
                raw = (head + body)[: len(head) - rng.randrange(1, min(len(head), 40))]
            elif kind == 2:  # one byte changed, inserted or removed in the head
                raw = _mutate(rng, head) + body
            elif kind == 3:  # a byte changed at the head's end (its empty line)
                at = len(head) - rng.randrange(1, 5)
                raw = head[:at] + bytes([rng.choice([10, 13, 32, 65])]) + head[at + 1 :] + body
            elif kind == 4:  # another head of the set
                raw = rng.choice(heads) + body
            else:  # the head with a line more before its end
                raw = head[:-2] + b"X-More: 1\r\n\r\n" + body
            _check(relay, raw, rng.random() < 0.3, slot)
    finally:
        relay.close()
    assert hits > 4000


def test_every_byte_at_every_place_after_nginx_head() -> None:
    """nginx's answer, then the same with each byte value at each place of
    its head: judged as afresh (the slot holds nginx's head each time)."""
    relay = _relay()
    verdicts: dict[int, int] = {}
    try:
        for body in (b"v1\n", b"x" * 40):
            for at in range(len(NGINX)):
                for byte in range(256):
                    assert _check(relay, NGINX + body, False, 3)[:2] == (1, len(NGINX))
                    raw = NGINX[:at] + bytes([byte]) + NGINX[at + 1 :] + body
                    r = _check(relay, raw, False, 3)[0]
                    verdicts[r] = verdicts.get(r, 0) + 1
    finally:
        relay.close()
    assert verdicts[1] > 10000 and verdicts[2] > 10000, verdicts


def test_a_head_request_answer_after_a_get_answer_of_the_same_head() -> None:
    """The framing is the request's (a HEAD's answer has no body), not the
    one kept with the head."""
    relay = _relay()
    try:
        get = _check(relay, NGINX + b"v1\n", False, 0)
        head = _check(relay, NGINX, True, 0)
        again = _check(relay, NGINX + b"v1\n", False, 0)
    finally:
        relay.close()
    assert get == again and get[4] == 3 and head[4] == 0 and get[3] != head[3]
