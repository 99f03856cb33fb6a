"""Differential fuzz of consistent hashing's key extraction: seeded random
request heads (a header 0-2 times in any case with OWS, empty and obs-text
values; cookie lines with spacing, quoting, prefixes and duplicates; targets
with "?", "#", "&&", params without "=", percent-escapes) through the
compiled relay (a cached and a per-request verdict) over 5 backends: each
request lands where hash_order() puts HashOn.key_of's value of the head as
the worker parses it (peek.parse_head, its headers as request_headers joins
them) first."""

from __future__ import annotations

import random

import pytest

from l4proxy.dataplane.verdict import HASH_COOKIE, HASH_HEADER, HASH_QUERY, HashOn
from tests._scripted import _client
from tests.test_relay_consistent_hash import COOKIE_VALUE, Farm, _ask, _farm

OBS = bytes(range(0x80, 0x100))
VCHARS = b"abcXYZ019-_.~!$%*+/:=@[]^`{|}\"'" + OBS


def _value(rng: random.Random, allow: bytes = VCHARS) -> bytes:
    n = rng.choice([0, 1, 1, 2, 3, 5, 8])
    return bytes(rng.choice(allow) for _ in range(n))


def _ows(rng: random.Random) -> bytes:
    return rng.choice([b"", b"", b" ", b"\t", b" \t", b"  "])


def _header_lines(rng: random.Random) -> list[bytes]:
    lines = []
    for _ in range(rng.choice([0, 1, 1, 1, 2, 2])):
        name = rng.choice([b"x-user", b"X-User", b"X-USER", b"x-uSer"])
        v = _value(rng, b'abcXYZ019-_.~ \t!"' + OBS)
        lines.append(name + b":" + _ows(rng) + v.strip(b" \t") + _ows(rng))
    for _ in range(rng.choice([0, 1])):
        lines.insert(
            rng.randrange(len(lines) + 1),
            rng.choice([b"x-use", b"x-user2", b"x-users", b"y-user"]) + b": " + _value(rng),
        )
    return lines


def _pair(rng: random.Random) -> bytes:
    name = rng.choice([b"sid", b"sid", b"si", b"sid2", b"SID", b"asid", b"", b"sid "])
    v = _value(rng, b"abc019-_.~!$%+/:@[]^`{|}" + OBS)
    quoted = rng.choice(["", "", "both", "left", "right", "empty"])
    if quoted == "both":
        v = b'"' + v + b'"'
    elif quoted == "left":
        v = b'"' + v
    elif quoted == "right":
        v = v + b'"'
    elif quoted == "empty":
        v = b'""'
    eq = b"=" if rng.random() < 0.9 else b""
    return name + eq + v


def _cookie_lines(rng: random.Random) -> list[bytes]:
    lines = []
    for _ in range(rng.choice([0, 1, 1, 1, 2, 2])):
        pairs = [_pair(rng) for _ in range(rng.choice([1, 2, 3, 4]))]
        seps = [rng.choice([b";", b"; ", b" ;", b" ; ", b";\t", b";;", b"; ;"]) for _ in pairs]
        v = b"".join(p + s for p, s in zip(pairs, seps, strict=True))[: -len(seps[-1])]
        if rng.random() < 0.2:
            v += rng.choice([b";", b"; "])
        name = rng.choice([b"Cookie", b"cookie", b"COOKIE"])
        lines.append(name + b":" + _ows(rng) + v.strip(b" \t") + _ows(rng))
    return lines


def _target(rng: random.Random) -> bytes:
    path = rng.choice([b"/", b"/p", b"/a/b", b"/u=1"])
    if rng.random() < 0.15:
        return path + (b"#f?u=1" if rng.random() < 0.5 else b"")
    params = []
    for _ in range(rng.choice([0, 1, 2, 3, 4])):
        name = rng.choice([b"u", b"u", b"uu", b"U", b"", b"u%3D", b"%75", b"x"])
        kind = rng.random()
        if kind < 0.7:
            params.append(name + b"=" + _value(rng, b"abc019-_.~%=/?:@!$'()*+,;"))
        else:
            params.append(name)
    joins = [rng.choice([b"&", b"&", b"&&"]) for _ in params]
    q = b"".join(p + j for p, j in zip(params, joins, strict=True))
    q = q[: -len(joins[-1])] if joins else q
    t = path + b"?" + q
    r = rng.random()
    if r < 0.15:
        t += b"#" + rng.choice([b"", b"u=9", b"frag&u=8"])
    return t


def _request(rng: random.Random, kind: str) -> bytes:
    lines = [b"Host: a"]
    extra = _header_lines(rng) + _cookie_lines(rng)
    for x in extra:
        lines.insert(rng.randrange(len(lines) + 1), x)
    target = _target(rng) if kind == HASH_QUERY else b"/x"
    eol = b"\r\n"  # (the scripted backends read CRLF heads)
    return b"GET " + target + b" HTTP/1.1" + eol + b"".join(x + eol for x in lines) + eol


@pytest.mark.parametrize("ttl", [60.0, 0.0], ids=["cached", "per-request"])
@pytest.mark.parametrize(
    "on",
    [
        HashOn(HASH_HEADER, "x-user"),
        HashOn(HASH_COOKIE, "sid"),
        HashOn(HASH_COOKIE, "sid", ttl=60, path="/"),
        HashOn(HASH_QUERY, "u"),
    ],
    ids=["header", "cookie", "cookie-ttl", "query"],
)
def test_keys_land_where_the_pure_twin_reads_them(
    request: pytest.FixtureRequest, ttl: float, on: HashOn
) -> None:
    rng = random.Random(f"{on}{ttl}")
    farm: Farm = _farm(request, 5, on, ttl)
    c = _client(farm.relay)
    checked = absent = 0
    for i in range(400):
        req = _request(rng, on.kind)
        want = farm.expected(req)
        got, at = _ask(farm, c, req)
        assert got.startswith(b"HTTP/1.1 200"), (req, got)
        cookie = COOKIE_VALUE.search(got)
        assert (cookie is not None) == (want is None and on.ttl is not None), (req, got)
        if want is None:
            absent += 1
            if cookie is None:
                continue  # (a random key)
            want = cookie.group(1)
        checked += 1
        assert at == farm.order(want)[0], (i, req, want, at)
    assert checked > 100 and absent > 5, (checked, absent)
    c.close()
