"""A VirtualService's ``rewrite.uriRegexRewrite`` (Envoy's ``regex_rewrite``):
every match of an RE2 regex in the request's path replaced by a rewrite
string whose ``\\N`` are the regex's groups, the query kept.

Loaded from real YAML (the VirtualService reference's example, on the
bootcamp registry) and read back through ``RouteTable.choices()`` and
``decide()``: the new path is a whole-path ``PathRewrite`` computed per
request, so the host's verdicts read the whole target (each path a verdict
of its own); ``global_replace`` is RE2's ``GlobalReplace`` (an empty match
right after a match is skipped); ``validate -v`` and ``/config_dump`` say
it; a real worker of each twin sends two paths of one keep-alive
connection up rewritten each its own way. Its refusals are in
tests/test_rules_head_edits.py's error table.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from l4proxy.cli import main
from l4proxy.dataplane.verdict import HeadEdits, PathRewrite
from l4proxy.rules._edits import rewrite_target
from l4proxy.rules._regex import compile_regex, global_replace
from l4proxy.rules.routing import Request
from tests._scripted import OK_BODY, Scripted, _response
from tests._worker import (
    GATEWAY_HOST,
    _worker_twin,
    connected,
    gateway_routes,
    gateway_service,
    gateway_worker,
)
from tests.test_config_errors import REGISTRY
from tests.test_rules_head_edits import DR, HOST, VS, choices, edits_of, istio, write

# The VirtualService reference's HTTPRewrite example, on bootcamp
EXAMPLE = """\
  - match:
    - uri:
        prefix: /service
    rewrite:
      uriRegexRewrite:
        match: ^/service/([^/]+)(/.*)$
        rewrite: \\2/instance/\\1
    route:
    - destination:
        host: bootcamp
        subset: v1
"""


def test_the_reference_example_rewrites_each_path_its_own_way(tmp_path: Path) -> None:
    table = istio(tmp_path, EXAMPLE)
    (e,) = edits_of(table, "/service/foo/v1/api?x=1").values()
    assert e == HeadEdits(path=PathRewrite(-1, "/v1/api/instance/foo"))
    assert e.path is not None
    assert rewrite_target("/service/foo/v1/api?x=1", e.path) == "/v1/api/instance/foo?x=1"
    (other,) = edits_of(table, "/service/bar/x").values()
    assert other == HeadEdits(path=PathRewrite(-1, "/x/instance/bar"))
    # a path the regex does not match goes up as it came
    (same,) = edits_of(table, "/service").values()
    assert same == HeadEdits(path=PathRewrite(-1, "/service"))
    # the pure twin's decision: the same edits
    svc = table.service(HOST)
    assert svc is not None
    d = table.decide(svc, 8080, Request(path="/service/foo/v1/api?x=1", authority="bootcamp"))
    assert d.edits == e
    # the new path depends on the whole old one: no test can stand for it
    assert table.request_shape(svc).tests is None


def test_a_new_path_without_its_slash_gets_one(tmp_path: Path) -> None:
    """A review: "\\1" of "^/(.*)$" gave "foo", which the pure twin's
    absolute-form edit glued to the Host (``http://shop/foo`` went up with
    Host ``shopfoo``), while the compiled one left the target alone."""
    http = EXAMPLE.replace("^/service/([^/]+)(/.*)$", "'^/(.*)$'").replace(
        "\\2/instance/\\1", "'\\1'"
    )
    table = istio(tmp_path, http)
    (e,) = edits_of(table, "/service/foo?q=1").values()
    assert e == HeadEdits(path=PathRewrite(-1, "/service/foo"))
    (e,) = edits_of(table, "/service").values()
    assert e == HeadEdits(path=PathRewrite(-1, "/service"))


def test_every_match_is_replaced(tmp_path: Path) -> None:
    http = EXAMPLE.replace("^/service/([^/]+)(/.*)$", "'-'").replace("\\2/instance/\\1", "'_'")
    table = istio(tmp_path, http)
    (e,) = edits_of(table, "/service/a-b-c").values()
    assert e == HeadEdits(path=PathRewrite(-1, "/service/a_b_c"))


@pytest.mark.parametrize(
    ("regex", "rewrite", "text", "out"),
    [
        ("a*", "-", "baaac", "-b-c-"),  # RE2's GlobalReplace, not Python's '-b--c-'
        ("", "-", "ab", "-a-b-"),
        ("o", "[\\0]", "/foo/bo", "/f[o][o]/b[o]"),
        ("(x)?y", "<\\1>", "/y/xy", "/<>/<x>"),  # a group that took no part: empty
        ("x", "\\\\", "/x", "/\\"),
        ("^/a", "/b", "/a/a", "/b/a"),  # ^ anchors at the path's start only
        ("z", "q", "/abc", "/abc"),
    ],
)
def test_global_replace_is_re2s(regex: str, rewrite: str, text: str, out: str) -> None:
    assert global_replace(compile_regex(regex), rewrite, text) == out


def test_validate_and_config_dump_say_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path, DR + VS + EXAMPLE)
    assert main(["validate", "-v", f, REGISTRY]) == 0
    out = capsys.readouterr().out
    assert (
        "rewrites each match of '^/service/([^/]+)(/.*)$' in the path to '\\2/instance/\\1'"
    ) in out
    table = istio(tmp_path, EXAMPLE)
    (route,) = table.to_json()["routes"][HOST]  # type: ignore[index]
    assert route["rewrite"] == {
        "kind": "regex",
        "match": "^/service/([^/]+)(/.*)$",
        "value": "\\2/instance/\\1",
    }
    json.dumps(route)


def test_a_raw_connection_is_not_rewritten(tmp_path: Path) -> None:
    table = istio(tmp_path, EXAMPLE)
    svc = table.service(HOST)
    assert svc is not None
    assert table.decide(svc, 8080, None).edits is None
    assert choices(table, "/service/a/b").subsets[0].edits is not None


REWRITE = gateway_routes(
    f"""\
  - rewrite:
      uriRegexRewrite: {{match: '^/service/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1'}}
    route:
    - destination: {{host: {GATEWAY_HOST}}}
"""
)


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_worker_rewrites_each_request_of_a_keepalive_connection(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests on one connection, two of them to the same path: each
    goes up with its own path rewritten (the compiled twin's verdict cache
    keyed by the whole target: a path served from the cache gets its own
    rewrite, never another path's)."""
    _worker_twin(which, monkeypatch)
    up = Scripted([])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(up.endpoint[1]) + REWRITE)
    targets = ["/service/foo/v1/a?q=1", "/service/bar/v2/b", "/service/foo/v1/a?q=2", "/other"]
    answers: list[bytes] = []

    def ask(s: socket.socket, target: str) -> bytes:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        return _response(s)

    async def run() -> None:
        async with gateway_worker(rules, http_routing="request") as (_, _, address):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for t in targets:
                    answers.append(await loop.run_in_executor(None, ask, s, t))

    try:
        asyncio.run(run())
    finally:
        up.close()
    assert all(a.endswith(OK_BODY) for a in answers)
    assert [r.split(b"\r\n", 1)[0] for r in up.requests] == [
        b"GET /v1/a/instance/foo?q=1 HTTP/1.1",
        b"GET /v2/b/instance/bar HTTP/1.1",
        b"GET /v1/a/instance/foo?q=2 HTTP/1.1",
        b"GET /other HTTP/1.1",
    ]
