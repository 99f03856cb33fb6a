"""The consistent-hash draw both relays apply (verdict.HashOn, hash_order):
what it reads of a request, and the guarantees a sticky session relies on."""

from __future__ import annotations

import pytest

from l4proxy.dataplane.verdict import (
    HASH_COOKIE,
    HASH_HEADER,
    HASH_QUERY,
    HASH_SOURCE_IP,
    HashOn,
    cookie_value,
    endpoint_hash,
    hash_key,
    hash_order,
)

EPS = [(f"198.18.0.{i}", 8080) for i in range(1, 6)]
HASHES = [endpoint_hash(e) for e in EPS]
KEYS = [hash_key(f"user-{i}".encode()) for i in range(5000)]


def test_fnv1a_known_values() -> None:
    # FNV-1a 64's published test vectors: the compiled twin must match them too
    assert hash_key(b"") == 0xCBF29CE484222325
    assert hash_key(b"a") == 0xAF63DC4C8601EC8C
    assert hash_key(b"foobar") == 0x85944171F73967E8


def test_order_is_a_permutation_and_stable() -> None:
    for key in KEYS[:50]:
        order = hash_order(key, HASHES)
        assert sorted(order) == list(range(len(EPS)))
        assert hash_order(key, HASHES) == order


def test_keys_spread_within_binomial_bounds() -> None:
    counts = [0] * len(EPS)
    for key in KEYS:
        counts[hash_order(key, HASHES)[0]] += 1
    mean = len(KEYS) / len(EPS)
    sd = (len(KEYS) * (1 / len(EPS)) * (1 - 1 / len(EPS))) ** 0.5
    assert all(abs(c - mean) < 4 * sd for c in counts), counts


def test_an_endpoint_gone_moves_only_its_own_keys_to_their_next() -> None:
    gone = 2
    rest = [h for i, h in enumerate(HASHES) if i != gone]
    moved = 0
    for key in KEYS:
        before = hash_order(key, HASHES)
        after = [i if i < gone else i + 1 for i in hash_order(key, rest)]
        if before[0] == gone:
            moved += 1
            assert after[0] == before[1]  # its retry order's next
        else:
            assert after[0] == before[0]
        assert after == [i for i in before if i != gone]
    assert moved > 0


def test_an_endpoint_added_takes_about_its_share_and_only_that() -> None:
    more = [*HASHES, endpoint_hash(("198.18.0.9", 8080))]
    taken = 0
    for key in KEYS:
        a, b = hash_order(key, HASHES)[0], hash_order(key, more)[0]
        if b != a:
            assert b == len(HASHES)  # only to the new one
            taken += 1
    share = len(KEYS) / len(more)
    assert abs(taken - share) < 4 * (len(KEYS) * (1 / 6) * (5 / 6)) ** 0.5


@pytest.mark.parametrize(
    ("target", "headers", "on", "want"),
    [
        ("/", {"x-user": "jason"}, HashOn(HASH_HEADER, "x-user"), b"jason"),
        ("/", {"x-user": ""}, HashOn(HASH_HEADER, "x-user"), b""),
        ("/", {}, HashOn(HASH_HEADER, "x-user"), None),
        ("/", {"x-user": "caf\xe9"}, HashOn(HASH_HEADER, "x-user"), b"caf\xe9"),
        ("/", {"cookie": "a=1; sid=abc; sid=def"}, HashOn(HASH_COOKIE, "sid"), b"abc"),
        ("/", {"cookie": 'sid="q v"'}, HashOn(HASH_COOKIE, "sid"), b"q v"),
        ("/", {"cookie": "SID=abc"}, HashOn(HASH_COOKIE, "sid"), None),
        ("/", {"cookie": "sid="}, HashOn(HASH_COOKIE, "sid"), None),
        ("/", {"cookie": "sidx=1;sid=2"}, HashOn(HASH_COOKIE, "sid"), b"2"),
        ("/p?u=a%20b&u=c", {}, HashOn(HASH_QUERY, "u"), b"a%20b"),
        ("/p?x=1&u", {}, HashOn(HASH_QUERY, "u"), b""),
        ("/p?x=1#u=2", {}, HashOn(HASH_QUERY, "u"), None),
        ("/p", {}, HashOn(HASH_QUERY, "u"), None),
    ],
)
def test_what_a_request_is_hashed_on(
    target: str, headers: dict[str, str], on: HashOn, want: bytes | None
) -> None:
    assert on.key_of(target, headers) == want


def test_generated_cookie_line() -> None:
    v = cookie_value(0xABC)
    assert v == "0000000000000abc"
    assert HashOn(HASH_COOKIE, "sid", 3600, "/").set_cookie(v) == (
        'sid="0000000000000abc"; Max-Age=3600; Path=/; HttpOnly'
    )
    assert HashOn(HASH_COOKIE, "sid", 0).set_cookie(v) == 'sid="0000000000000abc"; HttpOnly'
    # what the client sends back hashes as the request that made it
    on = HashOn(HASH_COOKIE, "sid", 60)
    assert on.key_of("/", {"cookie": 'sid="0000000000000abc"'}) == v.encode()


def test_the_source_ip_is_the_peers_packed_address() -> None:
    on = HashOn(HASH_SOURCE_IP, "")
    assert on.key_of("/", {"x-forwarded-for": "203.0.113.9"}, b"\xc6\x12\x00\x01") == (
        b"\xc6\x12\x00\x01"
    )
    assert on.key_of("/", {}) is None  # (unknown: a random key)
