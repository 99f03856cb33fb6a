"""Session persistence in the relays themselves, real sockets and Scripted
backends: the compiled relay from a verdict (cached, ttl 60; and asked per
request, ttl 0, freed before the response comes: the request's token line
must outlive it), and both twins asking decide() per request (the route
table's part done by the test: its endpoints, the session).

A verdict's session pins a request whose token names one of its choices'
endpoints (against the weights: one choice has weight 0 here), puts that
endpoint first (a dead one's request goes to the next of its choice), and
the final head gets the token of the endpoint that answered, after the
choice's response edits, unless the request's token named it. The relay's
own answer (every candidate dead) has none."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from l4proxy.dataplane._relay_py import Decision
from l4proxy.dataplane.verdict import (
    Choice,
    HeadEdits,
    SessionPersistence,
    Verdict,
    session_token,
)
from tests._scripted import Scripted, _client, _response
from tests.test_relay_edges import _relay

Endpoint = tuple[str, int]
COOKIE = SessionPersistence("cookie", "sid", "/shop", 600)
HEADER = SessionPersistence("header", "x-session")
EDITS = HeadEdits(response_add=(("x-added", "1"),))


def _dead() -> Endpoint:
    """An address that refuses connections."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return ("127.0.0.1", s.getsockname()[1])


@pytest.fixture
def ups() -> Iterator[list[Scripted]]:
    out = [Scripted([]) for _ in range(3)]
    yield out
    for u in out:
        u.close()


def _line(session: SessionPersistence, ep: Endpoint) -> bytes:
    name, value = session.line(ep)
    return f"{name}: {value}".encode()


def _get(s: socket.socket, extra: str = "") -> bytes:
    s.sendall(f"GET /shop/cart HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode())
    return _response(s)


def _served(ups: list[Scripted], before: list[int]) -> list[int]:
    return [i for i, u in enumerate(ups) if len(u.requests) > before[i]]


def _lines(answer: bytes) -> list[bytes]:
    return answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]


@pytest.mark.parametrize("ttl", [60.0, 0.0], ids=["cached", "per-request"])
@pytest.mark.parametrize("session", [COOKIE, HEADER], ids=["cookie", "header"])
def test_the_compiled_relay_pins_from_its_verdict(
    ups: list[Scripted], ttl: float, session: SessionPersistence
) -> None:
    """Choice one (weight 1): a dead endpoint, then ups 0 and 1; choice
    two (weight 0, never drawn): up 2. No token: choice one, its dead
    endpoint skipped, the token of the one that answered after the edits'
    line; up 2's token: up 2, no token line; the dead one's token: its
    next, with that one's token; a token of no endpoint (up 0's address,
    another port): drawn anew."""
    dead = _dead()
    eps = [u.endpoint for u in ups]
    verdict = Verdict(
        (
            Choice(1, (dead, eps[0], eps[1]), "ORDERED", edits=EDITS),
            Choice(0, (eps[2],), "ORDERED", edits=EDITS),
        ),
        ttl=ttl,
        session=session,
    )
    relay = _relay(
        "compiled",
        lambda h, o: Decision(local=(500, "decide is not asked")),
        resolve=lambda head, origin: verdict,
    )
    sends = (
        (lambda token: f"Cookie: a=b; sid={token}\r\n")
        if session.kind == "cookie"
        else (lambda token: f"X-Session: {token}\r\n")
    )
    got: list[tuple[list[int], list[bytes]]] = []
    try:
        s = _client(relay)
        for extra in [
            "",
            sends(session_token(eps[2])),
            sends(session_token(eps[2])),
            sends(session_token(dead)),
            sends(session_token((eps[0][0], 1))),
            sends("%%garbage%%"),
            sends(session_token(eps[1])),
        ]:
            before = [len(u.requests) for u in ups]
            answer = _get(s, extra)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            got.append((_served(ups, before), _lines(answer)[1:]))
        s.close()
    finally:
        relay.close()
    added = b"x-added: 1"
    assert got == [
        ([0], [added, _line(session, eps[0])]),
        ([2], [added]),
        ([2], [added]),
        ([0], [added, _line(session, eps[0])]),
        ([0], [added, _line(session, eps[0])]),
        ([0], [added, _line(session, eps[0])]),
        ([1], [added]),
    ]


def test_the_compiled_relay_s_own_answer_carries_no_token() -> None:
    """Every candidate of the pinned endpoint's choice refuses: the relay's
    503, edited, without a token line."""
    dead = [_dead(), _dead()]
    verdict = Verdict((Choice(1, tuple(dead), "ORDERED", edits=EDITS),), session=COOKIE)
    relay = _relay(
        "compiled",
        lambda h, o: Decision(local=(500, "decide is not asked")),
        resolve=lambda head, origin: verdict,
    )
    try:
        s = _client(relay)
        answer = _get(s, f"Cookie: sid={session_token(dead[1])}\r\n")
        s.close()
    finally:
        relay.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"x-added: 1" in _lines(answer)
    assert not any(line.startswith(b"set-cookie") for line in _lines(answer))


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_in_decide_mode_the_token_names_whoever_answered(which: str, ups: list[Scripted]) -> None:
    """decide() ordered the endpoints (a dead one first, as a pinned one
    gone); each twin gives the token of the one that answered, none when
    the request's token named it."""
    dead = _dead()
    eps = [u.endpoint for u in ups]

    def decide(head: Any, origin: Any) -> Decision:
        return Decision((dead, eps[1], eps[0]), tag="t", edits=EDITS, session=COOKIE)

    relay = _relay(which, decide)
    got = []
    try:
        s = _client(relay)
        for token in [session_token(dead), session_token(eps[1]), "x"]:
            before = [len(u.requests) for u in ups]
            answer = _get(s, f'Cookie: sid="{token}"\r\n')
            got.append((_served(ups, before), _lines(answer)[1:]))
        s.close()
    finally:
        relay.close()
    line = _line(COOKIE, eps[1])
    assert line == (
        b'set-cookie: sid="' + session_token(eps[1]).encode() + b'"; Max-Age=600; Path=/shop; '
        b"HttpOnly"
    )
    assert got == [
        ([1], [b"x-added: 1", line]),
        ([1], [b"x-added: 1"]),
        ([1], [b"x-added: 1", line]),
    ]
