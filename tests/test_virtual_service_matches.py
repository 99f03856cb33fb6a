"""A VirtualService's ``http[].match`` fields beyond uri and headers, as
Istio configures Envoy: ``queryParams`` (first value, as sent), a presence
match (``{}`` or the regex ``*``) of a header or a query parameter,
``withoutHeaders`` (inverted, an absent header read as empty; a presence
match inverted: the header is absent) and ``ignoreUriCase`` (exact and
prefix uri in any ASCII case; a regex as written).

The semantics on the route table (loaded from YAML, as a user writes
them), the loader's errors at their line, then a real worker of each relay
twin routing one keep-alive connection's requests, in an order that makes
a verdict cached for one request the wrong answer for the next were the
relay's cache keyed on less than the route reads."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from l4proxy.rules import ConfigError, load_rules
from l4proxy.rules.routing import Request, RouteTable
from tests._scripted import Scripted, _response
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_subsets,
    gateway_worker,
)

HOST = GATEWAY_HOST

SUBSETS = gateway_subsets("v1", "v2", api="v1")

# Each group is a route that sends what it matches to v2; what no route
# matches goes to v1 (route "rest"). Apart, so that what one group makes
# the relay's cache key on does not hide what another's needs.
GROUPS = {
    "query": """
    - queryParams: {canary: {exact: "true"}}
    - queryParams: {debug: {}}
      uri: {prefix: /q}""",
    "present": """
    - headers: {x-canary: {}}
    - headers: {x-any: {regex: "*"}}""",
    "without": """
    - uri: {prefix: /beta}
      withoutHeaders: {x-env: {prefix: prod}}
    - uri: {prefix: /nocookie}
      withoutHeaders: {cookie: {}}
    - uri: {prefix: /empty}
      withoutHeaders: {x-e: {exact: ""}}""",
    "anycase": """
    - uri: {exact: /Login}
      ignoreUriCase: true
    - uri: {prefix: /Static/}
      ignoreUriCase: true""",
    "anycase_regex": """
    - uri: {regex: "/Only[0-9]"}
      ignoreUriCase: true""",
}


def routes(*groups: str) -> str:
    http = "".join(
        f"""\
  - name: {g}
    match:{GROUPS[g]}
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
"""
        for g in groups
    )
    rest = f"""\
  - name: rest
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"""
    return gateway_routes(http + rest, api="v1")


# (group, target, header lines, whether the group's route takes it)
CASES: list[tuple[str, str, tuple[tuple[str, str], ...], bool]] = [
    ("query", "/?canary=true", (), True),
    ("query", "/?canary=false", (), False),
    ("query", "/?a=1&canary=true", (), True),
    ("query", "/?canary=true&canary=false", (), True),  # (the first value)
    ("query", "/?canary=false&canary=true", (), False),
    ("query", "/?canary=TRUE", (), False),
    ("query", "/?Canary=true", (), False),  # (names are case-sensitive)
    ("query", "/?canary=%74rue", (), False),  # (as sent: nothing decoded)
    ("query", "/q?debug", (), True),  # (present, with an empty value)
    ("query", "/q?debug=0", (), True),
    ("query", "/q?debugger=1", (), False),
    ("query", "/r?debug", (), False),  # (the block's uri too)
    ("present", "/", (("x-canary", "yes"),), True),
    ("present", "/", (("x-canary", ""),), True),  # (an empty value is there)
    ("present", "/", (("x-any", "1"),), True),
    ("present", "/", (("x-other", "1"),), False),
    ("without", "/beta", (), True),  # (absent: read as empty, not prod)
    ("without", "/beta", (("x-env", "staging"),), True),
    ("without", "/beta", (("x-env", "prod-eu"),), False),
    ("without", "/beta", (("x-env", "Prod"),), True),
    ("without", "/nocookie", (), True),
    ("without", "/nocookie", (("cookie", "a=b"),), False),
    ("without", "/empty", (), False),  # (absent is empty: it matches exact "")
    ("without", "/empty", (("x-e", "x"),), True),
    ("without", "/empty", (("x-e", ""),), False),
    ("anycase", "/login", (), True),
    ("anycase", "/LOGIN", (), True),
    ("anycase", "/Login?x=1", (), True),
    ("anycase", "/logins", (), False),
    ("anycase", "/static/app.js", (), True),
    ("anycase", "/STATIC/app.js", (), True),
    ("anycase", "/staticx", (), False),
    ("anycase_regex", "/Only1", (), True),
    ("anycase_regex", "/only1", (), False),  # (a regex is matched as written)
]


def _table(tmp_path: Path, text: str) -> RouteTable:
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    return load_rules([str(rules)]).table


def _route_of(table: RouteTable, target: str, headers: tuple[tuple[str, str], ...]) -> str:
    svc = next(s for s in table.services() if s.host == HOST)
    request = Request(path=target, authority="svc", headers=dict(headers))
    return table.decide(svc, 8080, request, {}).route.removeprefix("svc/")


def test_each_field_takes_the_requests_istio_s_envoy_would(tmp_path: Path) -> None:
    table = _table(tmp_path, gateway_service(1, 2, labels=("v1", "v2")) + SUBSETS + routes(*GROUPS))
    got = [(t, dict(h), _route_of(table, t, h)) for _, t, h, _ in CASES]
    assert got == [(t, dict(h), g if hit else "rest") for g, t, h, hit in CASES]


def test_validate_names_the_fields_of_a_route(tmp_path: Path) -> None:
    table = _table(tmp_path, gateway_service(1, 2, labels=("v1", "v2")) + SUBSETS + routes(*GROUPS))
    rs = table.to_json()["routes"][HOST]
    matches = {r["name"].removeprefix("svc/"): r["match"] for r in rs}
    assert matches["query"] == [
        {"query": {"canary": {"exact": "true"}}},
        {"uri": {"prefix": "/q"}, "query": {"debug": {"present": ""}}},
    ]
    assert matches["present"] == [
        {"headers": {"x-canary": {"present": ""}}},
        {"headers": {"x-any": {"present": ""}}},
    ]
    assert matches["without"][0] == {
        "uri": {"prefix": "/beta"},
        "without_headers": {"x-env": {"prefix": "prod"}},
    }
    assert matches["anycase"][0] == {"uri": {"exact": "/Login"}, "ignore_uri_case": True}


def test_validate_says_ignore_uri_case_leaves_a_regex_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(1, 2, labels=("v1", "v2")) + SUBSETS + routes(*GROUPS))
    assert main(["validate", "-v", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "uri exact '/Login' in any case or uri prefix '/Static/' in any case" in out
    assert (
        "uri regex '/Only[0-9]' (case-sensitive: ignoreUriCase applies to exact and prefix)" in out
    ), out


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("queryParams: [canary]", "queryParams must be a mapping of query parameter name: match"),
        ("queryParams: {canary: true}", "must be a mapping with one of exact, prefix, regex"),
        ("queryParams: {canary: {regex: '('}}", "is invalid"),
        ("withoutHeaders: {X-Env: {exact: a}}", "header name X-Env must be in lower case"),
        ("withoutHeaders: {x-env: {suffix: a}}", "suffix"),
        ("withoutHeaders: x-env", "withoutHeaders must be a mapping of header name: match"),
        ("ignoreUriCase: yes-please", "ignoreUriCase must be true or false"),
    ],
)
def test_a_bad_field_is_an_error_at_its_line(tmp_path: Path, match: str, message: str) -> None:
    text = f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [{HOST}]
  http:
  - match:
    - uri: {{prefix: /}}
      {match}
    route: [{{destination: {{host: {HOST}}}}}]
"""
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(1) + "---\n" + text)
    with pytest.raises(ConfigError) as info:
        load_rules([str(rules)])
    errors = [str(e) for e in info.value.errors]
    line = gateway_service(1).count("\n") + 2 + 8  # (the match's second line)
    assert any(f"rules.yaml:{line}:" in e and message in e for e in errors), errors


def _ask(s: socket.socket, target: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gw", *(f"{n}: {v}" for n, v in headers)]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return _response(s)


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_worker_routes_every_request_by_these_fields(
    which: str, group: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's cases twice, on one keep-alive connection, the second
    round in reverse: each request reaches the version its route names."""
    _worker_twin(which, monkeypatch)
    v1, v2 = Scripted([]), Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        gateway_service(v1.endpoint[1], v2.endpoint[1], labels=("v1", "v2"))
        + SUBSETS
        + routes(group)
    )
    cases = [c for c in CASES if c[0] == group]
    order = [*cases, *reversed(cases)]

    stats: dict[str, int] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, worker, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for _, target, headers, _ in order:
                    got = await loop.run_in_executor(None, _ask, s, target, headers)
                    assert got.startswith(b"HTTP/1.1 200 "), got
            assert worker.relay is not None
            stats.update(worker.relay.stats())

    try:
        asyncio.run(main())
    finally:
        v1.close()
        v2.close()
    assert [r.split(b" ", 2)[1].decode() for r in v2.requests] == [
        t for _, t, _, hit in order if hit
    ]
    assert [r.split(b" ", 2)[1].decode() for r in v1.requests] == [
        t for _, t, _, hit in order if not hit
    ]
    if which == "compiled":
        # the second round's requests came from cached verdicts (a test
        # the loop cannot evaluate, a header not among its keys, would
        # send each to Python)
        assert stats["verdict_cache_hits"] >= len(cases), stats
