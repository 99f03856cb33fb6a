"""A header a request sends on several lines is matched on all its values,
as Envoy's header matchers read them: joined with ``,``, and a ``cookie``'s
with ``; `` (``request_headers``), never by its last line alone. A review
saw a session-affinity canary's cookie missed when a client sent a second
Cookie line after it (half the requests of a pinned user went to stable).

The compiled relay keys its cached verdicts by each key header's last
line: a head with a key header on several lines is neither looked up nor
cached (``make_key``), so no request is answered with the verdict of
another whose last line it shares."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from l4proxy.rules.routing import Request, request_headers
from tests._scripted import OK_BODY, Scripted, _response
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
)
from tests.test_rules_head_edits import HOST, choices, istio


def test_repeated_fields_are_joined_as_envoy_joins_them() -> None:
    fields = [
        ("x-user", "alice"),
        ("cookie", "a=1"),
        ("host", "h"),
        ("x-user", "bob"),
        ("cookie", "sid=2"),
        ("x-user", ""),
    ]
    assert request_headers(fields) == {"x-user": "alice,bob,", "cookie": "a=1; sid=2", "host": "h"}
    assert request_headers([("x", "1")]) == {"x": "1"}
    assert request_headers([]) == {}


MATCHES = """\
  - match:
    - headers:
        cookie: {regex: '(^|.*; ?)sid=canary(;.*)?'}
    route:
    - destination: {host: bootcamp, subset: v2}
  - match:
    - headers:
        x-user: {exact: 'alice,bob'}
    route:
    - destination: {host: bootcamp, subset: v2}
  - route:
    - destination: {host: bootcamp, subset: v1}
"""


@pytest.mark.parametrize(
    ("lines", "subset"),
    [
        ([("cookie", "sid=canary"), ("cookie", "a=1")], "v2"),
        ([("cookie", "a=1"), ("cookie", "sid=canary")], "v2"),
        ([("cookie", "a=1"), ("cookie", "b=2")], "v1"),
        ([("x-user", "alice"), ("x-user", "bob")], "v2"),
        ([("x-user", "bob")], "v1"),
        ([("x-user", "bob"), ("x-user", "alice")], "v1"),
    ],
)
def test_a_match_reads_every_line(
    tmp_path: Path, lines: list[tuple[str, str]], subset: str
) -> None:
    table = istio(tmp_path, MATCHES)
    svc = table.service(HOST)
    assert svc is not None
    request = Request(path="/", authority="bootcamp:8080", headers=request_headers(lines))
    (got,) = table.choices(svc, 8080, request).subsets
    assert got.subset == subset
    assert choices(table, "/").subsets[0].subset == "v1"


VERSIONS = gateway_subsets("v1", "v2") + gateway_routes(
    f"""\
  - match:
    - headers:
        cookie: {{regex: '(^|.*; ?)sid=canary(;.*)?'}}
    - headers:
        x-user: {{exact: 'alice,bob'}}
    route:
    - destination: {{host: {GATEWAY_HOST}, subset: v2}}
  - route:
    - destination: {{host: {GATEWAY_HOST}, subset: v1}}
"""
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_worker_routes_a_repeated_header_by_all_its_lines(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one keep-alive connection, heads whose last line is the same as
    an earlier head's (its verdict cached by the compiled twin) but whose
    earlier lines change the match: each goes where all its lines send it."""
    _worker_twin(which, monkeypatch)
    v1, v2 = Scripted([]), Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(v1.endpoint[1], v2.endpoint[1], labels=("v1", "v2")) + VERSIONS
    )
    heads = [
        ("x-user: bob", "v1"),
        ("x-user: alice\r\nx-user: bob", "v2"),
        ("x-user: bob", "v1"),
        ("x-user: alice\r\nx-user: bob", "v2"),
        ("cookie: a=1", "v1"),
        ("cookie: sid=canary\r\ncookie: a=1", "v2"),
        ("cookie: a=1", "v1"),
        ("cookie: a=1\r\nCookie: sid=canary", "v2"),
        ("cookie: sid=canary", "v2"),
        ("cookie: a=1\r\ncookie: sid=canary", "v2"),
    ]
    answers: list[bytes] = []

    def ask(s: socket.socket, i: int, lines: str) -> bytes:
        s.sendall(f"GET /p{i} HTTP/1.1\r\nHost: gw\r\n{lines}\r\n\r\n".encode())
        return _response(s)

    async def run() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, _, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for i, (lines, _) in enumerate(heads):
                    answers.append(await loop.run_in_executor(None, ask, s, i, lines))

    try:
        asyncio.run(run())
    finally:
        v1.close()
        v2.close()
    assert all(a.endswith(OK_BODY) for a in answers)
    served = {}
    for version, up in (("v1", v1), ("v2", v2)):
        for r in up.requests:
            target = bytes(r).split(b" ", 2)[1]
            served[int(target.removeprefix(b"/p"))] = version
    assert served == {i: want for i, (_, want) in enumerate(heads)}
