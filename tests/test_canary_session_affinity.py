"""``l4proxy canary --gateway-api --session-affinity COOKIE``: Flagger's
sticky canary. While the canary has a weight its answers set a cookie of
the rollout's, and a request that sends it back goes to the canary; once
the rollout ends (or, mirrored, for the rollout before) the cookie is
deleted. The documents are loaded with the rules loader the sidecars run,
the sticky regex is run by the rules' RE2, and the end-to-end test counts
answers of a real sidecar in namespaces."""

from __future__ import annotations

import json
import pathlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import pytest
import yaml

from l4proxy.canary._analysis import (
    COOKIE_LETTERS,
    MAX_COOKIE_NAME,
    PATH_ONLY,
    Conflict,
    CookieAttributes,
    Policy,
    Rollout,
    SessionAffinity,
    advance,
    check,
    cookie_prefix_problem,
    new_cookie_value,
    resume,
)
from l4proxy.canary.command import (
    cookie_regex,
    document,
    documents_text,
    route_words,
    save_state,
    set_cookie,
)
from l4proxy.demo.bootcamp import tally
from l4proxy.rules._regex import compile_regex
from l4proxy.rules.routing import Request, RouteTable
from tests.mesh import IMPLS, L4PROXY, VIP, Mesh
from tests.test_apply import per_version
from tests.test_canary_core import GOOD
from tests.test_canary_gateway_api import GATEWAY_API, HOST, _canary, _sidecar, _table
from tests.test_canary_gateway_api import R as WEIGHTED
from tests.test_canary_netns import PER_REQUEST, canary, finish

VALUE = "LpsIaLdoNZ"
A = SessionAffinity("flagger-cookie", VALUE, max_age=21600)
STICKY = replace(WEIGHTED, affinity=A)  # at 25 %, step 1 of 5,25,100
PAIR = f"flagger-cookie={VALUE}"
# every attribute, and the Set-Cookie's tail they make (Flagger's order)
EVERY = CookieAttributes("/app", "example.com", True, True, "None", True)
EVERY_TAIL = "Domain=example.com; HttpOnly; Partitioned; Path=/app; SameSite=None; Secure"
EVERY_OPTIONS = (
    "--cookie-path /app --cookie-domain example.com --cookie-secure --cookie-http-only "
    "--cookie-same-site None --cookie-partitioned"
)
ADMIN = "127.0.0.1:15000"  # the client pod's sidecar's
P = Policy(steps=(5, 25, 100), interval=1, threshold=2)


@dataclass(frozen=True)
class Routed:
    """Where a request went by a loaded table: (backend, weight) of each
    destination with a weight, what each adds to the response, its copies."""

    route: str
    split: tuple[tuple[str, int], ...]
    set_cookie: tuple[tuple[str, tuple[str, ...]], ...]
    mirrored: bool


def _routed(table: RouteTable, cookie: str | None = None) -> Routed:
    svc = table.service(HOST)
    assert svc is not None
    headers: Mapping[str, str] = {} if cookie is None else {"cookie": cookie}
    rc = table.choices(svc, 8080, Request(path="/", authority="bootcamp:8080", headers=headers))
    live = [ws for ws in rc.subsets if ws.weight]
    return Routed(
        rc.route,
        tuple((ws.service.host.split(".")[0], ws.weight) for ws in live),
        tuple(
            (
                ws.service.host.split(".")[0],
                tuple(
                    v for k, v in (ws.edits.response_add if ws.edits else ()) if k == "set-cookie"
                ),
            )
            for ws in live
        ),
        bool(rc.mirrors),
    )


# -- the documents, through the rules loader ---------------------------------------------
def test_weighted_the_canary_sets_the_cookie_and_its_holders_stay(tmp_path: pathlib.Path) -> None:
    table = _table(tmp_path, STICKY)
    fresh = _routed(table)
    assert fresh.split == (("bootcamp-v1", 75), ("bootcamp-v2", 25))
    # only the canary's answers carry it (no --primary-cookie: stable's none)
    assert fresh.set_cookie == (
        ("bootcamp-v1", ()),
        ("bootcamp-v2", (f"{PAIR}; Max-Age=21600; Path=/",)),
    )
    for held in (PAIR, f"a=1; {PAIR}", f"{PAIR}; b=2", f"a=1;{PAIR};b=2"):
        sticky = _routed(table, held)
        assert (sticky.split, sticky.set_cookie) == (
            (("bootcamp-v2", 100),),
            (("bootcamp-v2", ()),),
        ), held
    # a cookie of another value (another rollout's): drawn by weight again
    assert _routed(table, "flagger-cookie=McxKdLQoIN").split == fresh.split


def test_the_cookie_is_the_rules_own_not_a_copy_of_flaggers_regex() -> None:
    doc = yaml.safe_load(document(STICKY))
    sticky, weighted = doc["spec"]["rules"]
    assert sticky["matches"] == [
        {"headers": [{"name": "Cookie", "type": "RegularExpression", "value": cookie_regex(PAIR)}]}
    ]
    assert [b["name"] for b in sticky["backendRefs"]] == ["bootcamp-v2"]
    assert "matches" not in weighted and [b["weight"] for b in weighted["backendRefs"]] == [75, 25]


def test_mirrored_no_cookie_is_handed_out(tmp_path: pathlib.Path) -> None:
    """A mirrored interval (weight 0): the document is the one without
    session affinity (no rule of this rollout's cookie, no Set-Cookie)."""
    mirrored = replace(STICKY, weight=0, step=0, steps=(0, 5, 25, 100))
    assert document(mirrored) == document(replace(mirrored, affinity=None))
    routed = _routed(_table(tmp_path, mirrored), PAIR)
    assert (routed.split, routed.set_cookie, routed.mirrored) == (
        (("bootcamp-v1", 100),),
        (("bootcamp-v1", ()),),
        True,
    )


def test_mirrored_the_previous_rollouts_cookie_is_deleted(tmp_path: pathlib.Path) -> None:
    old = "flagger-cookie=McxKdLQoIN"
    mirrored = replace(
        STICKY, weight=0, step=0, steps=(0, 5, 25, 100), affinity=replace(A, previous=old)
    )
    table = _table(tmp_path, mirrored)
    held = _routed(table, f"x=1; {old}")
    # routed as every request is (stable, copied to the canary), and deleted
    assert (held.split, held.set_cookie, held.mirrored) == (
        (("bootcamp-v1", 100),),
        (("bootcamp-v1", (f"{old}; Max-Age=0; Path=/",)),),
        True,
    )
    fresh = _routed(table)
    assert (fresh.split, fresh.set_cookie, fresh.mirrored) == (
        (("bootcamp-v1", 100),),
        (("bootcamp-v1", ()),),
        True,
    )
    assert _routed(table, PAIR).set_cookie == (("bootcamp-v1", ()),)  # this one's: not yet


@pytest.mark.parametrize(
    ("ended", "backend"),
    [
        (replace(STICKY, phase="rolled_back", weight=0), "bootcamp-v1"),
        # promoted: the holders reach the canary, as everyone does now, and
        # the cookie, which says nothing any more, goes
        (replace(STICKY, phase="promoted", weight=100, step=2), "bootcamp-v2"),
    ],
    ids=["rolled-back", "promoted"],
)
def test_at_the_end_the_cookie_is_deleted(
    tmp_path: pathlib.Path, ended: Rollout, backend: str
) -> None:
    table = _table(tmp_path, ended)
    held = _routed(table, f"{PAIR}; b=2")
    assert (held.split, held.set_cookie) == (
        ((backend, 100),),
        ((backend, (f"{PAIR}; Max-Age=0; Path=/",)),),
    )
    fresh = _routed(table)
    assert (fresh.split, fresh.set_cookie) == (((backend, 100),), ((backend, ()),))


OLD = "flagger-cookie=McxKdLQoIN"  # the cookie of the rollout before
MIRRORED = replace(STICKY, weight=0, step=0, steps=(0, 5, 25, 100))


@pytest.mark.parametrize(
    "ended",
    [
        replace(MIRRORED, phase="rolled_back"),
        replace(MIRRORED, phase="promoted", weight=100),  # promoted by hand
    ],
    ids=["rolled-back", "promoted"],
)
def test_a_rollout_that_ended_mirrored_deletes_no_cookie_of_its_own(
    tmp_path: pathlib.Path, ended: Rollout
) -> None:
    """Its canary never had a weight, so its cookie was never handed out:
    no rule for it (a client cannot hold it), and the one before it still
    deleted, as while it was mirrored."""
    assert not ended.had_weight
    assert document(ended) == document(replace(ended, affinity=None))
    backend = "bootcamp-v2" if ended.phase == "promoted" else "bootcamp-v1"
    before = replace(ended, affinity=replace(A, previous=OLD))
    table = _table(tmp_path, before)
    assert _routed(table, f"x=1; {OLD}").set_cookie == ((backend, (f"{OLD}; Max-Age=0; Path=/",)),)
    assert _routed(table, PAIR).set_cookie == ((backend, ()),)


@pytest.mark.parametrize(
    ("r", "had"),
    [
        (MIRRORED, False),
        (STICKY, True),
        (replace(MIRRORED, phase="rolled_back"), False),
        (replace(MIRRORED, phase="promoted", weight=100), False),
        (replace(MIRRORED, phase="rolled_back", step=1), True),  # at 5 %, then rolled back
        (replace(STICKY, phase="promoted", weight=100, step=2), True),
        (replace(STICKY, phase="rolled_back", weight=0), True),
        (replace(MIRRORED, phase="rolled_back", step=7), True),  # hand-edited: as if it had
    ],
    ids=[
        "mirrored",
        "weighted",
        "rolled-back-mirrored",
        "promoted-mirrored",
        "rolled-back-at-5",
        "promoted",
        "rolled-back-at-25",
        "step-out-of-range",
    ],
)
def test_had_weight(r: Rollout, had: bool) -> None:
    assert r.had_weight is had


def test_the_primary_cookie_pins_stable_for_a_step(tmp_path: pathlib.Path) -> None:
    a = replace(A, primary_cookie="primary-cookie", primary_max_age=60)
    at25 = replace(STICKY, affinity=a)
    primary = f"primary-cookie={a.primary_value(1)}"
    table = _table(tmp_path, at25)
    assert _routed(table).set_cookie == (
        ("bootcamp-v1", (f"{primary}; Max-Age=60; Path=/",)),
        ("bootcamp-v2", (f"{PAIR}; Max-Age=21600; Path=/",)),
    )
    assert _routed(table, f"a=1; {primary}").split == (("bootcamp-v1", 100),)
    assert _routed(table, PAIR).split == (("bootcamp-v2", 100),)
    # holding both (stable's cookie of a step, then the canary's): the canary's rule first
    assert _routed(table, f"{primary}; {PAIR}").split == (("bootcamp-v2", 100),)
    # the next step has a value of its own: last step's holders are drawn again
    at100 = replace(at25, step=2, weight=100)
    assert a.primary_value(2) != a.primary_value(1)
    assert _routed(_table(tmp_path, at100), primary).split == (("bootcamp-v2", 100),)


def test_the_primary_value_is_the_rollouts_and_the_steps() -> None:
    a = replace(A, primary_cookie="p")
    assert a.primary_value(1) == a.primary_value(1) == replace(a, max_age=5).primary_value(1)
    assert a.primary_value(1) != replace(a, value="McxKdLQoIN").primary_value(1)
    assert re.fullmatch(r"[A-Za-z]{10}", a.primary_value(1))


# -- the attributes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attributes", "tail"),
    [
        (PATH_ONLY, "Path=/"),
        (EVERY, EVERY_TAIL),
        (CookieAttributes(secure=True), "Path=/; Secure"),
        (CookieAttributes(http_only=True), "HttpOnly; Path=/"),
        (CookieAttributes(same_site="Lax"), "Path=/; SameSite=Lax"),
        (CookieAttributes(same_site="Strict", secure=True), "Path=/; SameSite=Strict; Secure"),
        (CookieAttributes(partitioned=True, secure=True), "Partitioned; Path=/; Secure"),
        (
            CookieAttributes("/a/b-c", "A-1.Example.com"),
            "Domain=A-1.Example.com; Path=/a/b-c",
        ),
    ],
    ids=["default", "every", "secure", "http-only", "lax", "strict", "partitioned", "domain"],
)
def test_set_cookie_writes_the_attributes_after_max_age_in_flaggers_order(
    attributes: CookieAttributes, tail: str
) -> None:
    assert set_cookie(PAIR, 60, attributes) == f"{PAIR}; Max-Age=60; {tail}"
    assert set_cookie(PAIR, 0, attributes) == f"{PAIR}; Max-Age=0; {tail}"


def test_both_cookies_and_the_deletion_carry_the_attributes(tmp_path: pathlib.Path) -> None:
    a = replace(A, primary_cookie="primary-cookie", attributes=EVERY)
    at25 = replace(STICKY, affinity=a)
    primary = f"primary-cookie={a.primary_value(1)}"
    assert _routed(_table(tmp_path, at25)).set_cookie == (
        ("bootcamp-v1", (f"{primary}; Max-Age=60; {EVERY_TAIL}",)),
        ("bootcamp-v2", (f"{PAIR}; Max-Age=21600; {EVERY_TAIL}",)),
    )
    # the holders still stay (the attributes are the browser's business)
    assert _routed(_table(tmp_path, at25), PAIR).split == (("bootcamp-v2", 100),)
    ended = replace(at25, phase="rolled_back", weight=0)
    assert _routed(_table(tmp_path, ended), f"a=1; {PAIR}").set_cookie == (
        ("bootcamp-v1", (f"{PAIR}; Max-Age=0; {EVERY_TAIL}",)),
    )


def test_the_previous_cookie_is_deleted_with_the_attributes_it_was_set_with(
    tmp_path: pathlib.Path,
) -> None:
    """This rollout's attributes are others: a deletion with them would
    name another path and domain, and delete nothing."""
    a = replace(
        A, attributes=CookieAttributes(secure=True), previous=OLD, previous_attributes=EVERY
    )
    assert _routed(_table(tmp_path, replace(MIRRORED, affinity=a)), OLD).set_cookie == (
        ("bootcamp-v1", (f"{OLD}; Max-Age=0; {EVERY_TAIL}",)),
    )
    ended = replace(MIRRORED, phase="rolled_back", affinity=a)  # ended mirrored: still
    assert _routed(_table(tmp_path, ended), OLD).set_cookie == (
        ("bootcamp-v1", (f"{OLD}; Max-Age=0; {EVERY_TAIL}",)),
    )


# -- the regex, as the sidecars run it --------------------------------------------------
MATCHES = [
    PAIR,
    f"a=1; {PAIR}",
    f"{PAIR}; b=2",
    f"a=1; {PAIR}; b=2",
    f"a=1;{PAIR};b=2",
    f"a=1;  {PAIR}",
    f"{PAIR} ",
    f"flagger-cookie=other; {PAIR}",
]
NEAR_MISSES = [
    f"x{PAIR}",  # another name that ends so
    f"{PAIR}x",  # another value that begins so
    f"flagger-cookie={VALUE[:-1]}",
    f"a={PAIR}",  # a cookie whose value holds it
    f"a=1, {PAIR}",  # a comma is no cookie separator
    f"flagger-cookie = {VALUE}",
    f"Flagger-cookie={VALUE}",  # names are case-sensitive
    f"flagger-cookie={VALUE.lower()}",
    f"flaggerXcookie={VALUE}",
    f'flagger-cookie="{VALUE}"',
    f"flagger-cookie={VALUE}={VALUE}",
    "",
]


@pytest.mark.parametrize("header", MATCHES)
def test_the_regex_matches_the_cookie_among_others(header: str) -> None:
    assert compile_regex(cookie_regex(PAIR)).fullmatch(header) is not None


@pytest.mark.parametrize("header", NEAR_MISSES)
def test_the_regex_refuses_near_misses(header: str) -> None:
    assert compile_regex(cookie_regex(PAIR)).fullmatch(header) is None


def test_flaggers_regex_takes_the_near_misses() -> None:
    """Why the rule has a regex of its own: Flagger's ``.*NAME.*VALUE.*``
    sends a cookie that only looks like it to the canary."""
    flaggers = compile_regex(f".*flagger-cookie.*{VALUE}.*")
    taken = [h for h in NEAR_MISSES if flaggers.fullmatch(h) is not None]
    assert taken == [
        f"x{PAIR}",
        f"{PAIR}x",
        f"a={PAIR}",
        f"a=1, {PAIR}",
        f"flagger-cookie = {VALUE}",
        f'flagger-cookie="{VALUE}"',
        f"flagger-cookie={VALUE}={VALUE}",
    ]


@pytest.mark.parametrize("name", ["a.b", "a+b", "!#$&'*+-.^_`|~", "x" * MAX_COOKIE_NAME])
def test_punctuation_in_a_name_is_itself(name: str) -> None:
    pattern = compile_regex(cookie_regex(f"{name}={VALUE}"))  # within Envoy's size limit
    assert pattern.fullmatch(f"a=1; {name}={VALUE}") is not None
    other = "".join("x" if not c.isalnum() else c for c in name)
    assert other == name or pattern.fullmatch(f"{other}={VALUE}") is None


# -- the state ---------------------------------------------------------------------------
def test_the_state_keeps_the_cookie() -> None:
    r = replace(STICKY, affinity=replace(A, primary_cookie="p", previous="c=McxKdLQoIN"))
    back = Rollout.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r
    assert r.to_json()["session_affinity"]["value"] == VALUE


def test_a_state_from_before_it_loads() -> None:
    old = WEIGHTED.to_json()
    del old["session_affinity"]
    assert Rollout.from_json(old) == WEIGHTED


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"value": VALUE}, "no 'cookie'"),
        ({"cookie": "c", "value": VALUE, "max_age": 0}, "max_age is not a positive integer"),
        ({"cookie": "c", "value": 7}, "value is not a string"),
        ("c=v", "not an object"),
        # what a Set-Cookie or the sticky regex is written from
        ({"cookie": "c", "value": "LpsIaLdoN"}, "value 'LpsIaLdoN' is not 10 letters"),
        ({"cookie": "c", "value": "LpsIaLdoNZx"}, "value 'LpsIaLdoNZx' is not 10 letters"),
        ({"cookie": "c", "value": "LpsIaLdo; "}, "value 'LpsIaLdo; ' is not 10 letters"),
        ({"cookie": "c", "value": "LpsIaLdoN."}, "is not 10 letters"),
        ({"cookie": "c", "value": "LpsIaLdoNé"}, "is not 10 letters"),
        ({"cookie": "", "value": VALUE}, "cookie '': not a cookie name"),
        ({"cookie": "a b", "value": VALUE}, "cookie 'a b': not a cookie name"),
        ({"cookie": "c; Path=/x", "value": VALUE}, "cookie 'c; Path=/x': not a cookie name"),
        ({"cookie": "x" * 51, "value": VALUE}, "51 characters; at most 50"),
        (
            {"cookie": "__Secure-c", "value": VALUE},
            "cookie '__Secure-c': a browser keeps a __Secure- cookie only with Secure: give "
            "--cookie-secure (or choose a name without that prefix)",
        ),
        (
            {"cookie": "c", "value": VALUE, "primary_cookie": "p=q"},
            "primary_cookie 'p=q': not a cookie name",
        ),
        ({"cookie": "c", "value": VALUE, "primary_cookie": "c"}, "primary_cookie is cookie's"),
        ({"cookie": "c", "value": VALUE, "previous": "c"}, "previous 'c' is not NAME=VALUE"),
        ({"cookie": "c", "value": VALUE, "previous": "c=short"}, "is not NAME=VALUE"),
        ({"cookie": "c", "value": VALUE, "previous": f"a b={VALUE}"}, "is not NAME=VALUE"),
        ({"cookie": "c", "value": VALUE, "previous": f"c={VALUE}; Path=/x"}, "is not NAME"),
        ({"cookie": "c", "value": VALUE, "previous": f"={VALUE}"}, "is not NAME=VALUE"),
    ],
    ids=[
        "no-cookie",
        "max-age-0",
        "value-not-text",
        "not-an-object",
        "value-short",
        "value-long",
        "value-attribute",
        "value-dot",
        "value-not-ascii",
        "cookie-empty",
        "cookie-space",
        "cookie-attribute",
        "cookie-too-long",
        "cookie-secure-prefix",
        "primary-equals",
        "primary-same-name",
        "previous-no-value",
        "previous-short-value",
        "previous-bad-name",
        "previous-attribute",
        "previous-no-name",
    ],
)
def test_a_bad_state_is_refused(bad: object, why: str) -> None:
    with pytest.raises(ValueError, match=f"bad state: session_affinity .*{re.escape(why)}"):
        Rollout.from_json({**STICKY.to_json(), "session_affinity": bad})


def test_the_state_keeps_the_attributes() -> None:
    a = replace(
        A,
        cookie="__Host-c",
        attributes=replace(EVERY, path="/", domain=""),
        previous=OLD,
        previous_attributes=EVERY,
    )
    data = json.loads(json.dumps(replace(STICKY, affinity=a).to_json()))
    assert data["session_affinity"]["previous_attributes"] == {
        "path": "/app",
        "domain": "example.com",
        "secure": True,
        "http_only": True,
        "same_site": "None",
        "partitioned": True,
    }
    assert Rollout.from_json(data) == replace(STICKY, affinity=a)


def test_a_state_from_before_the_attributes_deletes_with_path_only(tmp_path: pathlib.Path) -> None:
    """Its cookies were set with ``Path=/`` alone: so are their deletions."""
    for r, held in (
        (replace(STICKY, phase="rolled_back", weight=0), PAIR),
        (replace(MIRRORED, affinity=replace(A, previous=OLD)), OLD),
    ):
        data = r.to_json()
        del data["session_affinity"]["attributes"], data["session_affinity"]["previous_attributes"]
        back = Rollout.from_json(data)
        assert back == r
        assert back.affinity is not None and back.affinity.attributes == PATH_ONLY
        assert back.affinity.previous_attributes == PATH_ONLY
        assert _routed(_table(tmp_path, back), held).set_cookie == (
            ("bootcamp-v1", (f"{held}; Max-Age=0; Path=/",)),
        )


def _with(**fields: object) -> dict[str, object]:
    """A session affinity's state with *fields* (attributes among them)."""
    return {"cookie": "c", "value": VALUE, **fields}


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (
            _with(attributes={"path": "/; Domain=evil.example"}),
            "attributes {'path': '/; Domain=evil.example'}: --cookie-path "
            "'/; Domain=evil.example': not a cookie path: it starts with /",
        ),
        (_with(attributes={"path": "/a\r\nX-Evil: 1"}), "not a cookie path"),
        (_with(attributes={"path": "/a b"}), "not a cookie path"),
        (_with(attributes={"path": "app"}), "--cookie-path 'app': not a cookie path"),
        (_with(attributes={"path": ""}), "--cookie-path '': not a cookie path"),
        (
            _with(attributes={"path": "/" + "a" * 1024}),
            "--cookie-path: 1025 characters; at most 1024",
        ),
        (
            _with(attributes={"domain": "example.com; Secure"}),
            "--cookie-domain 'example.com; Secure': not a host name",
        ),
        (_with(attributes={"domain": "example.com\x00"}), "not a host name"),
        (_with(attributes={"same_site": "none"}), "--cookie-same-site 'none': not one of"),
        (
            _with(attributes={"same_site": "None"}),
            "--cookie-same-site None needs --cookie-secure",
        ),
        (_with(attributes={"partitioned": True}), "--cookie-partitioned needs --cookie-secure"),
        (_with(attributes={"secure": "true"}), "secure is not true or false"),
        (_with(attributes={"http_only": 1}), "http_only is not true or false"),
        (_with(attributes={"path": 7}), "path is not a string"),
        (_with(attributes={"samesite": "Lax"}), "no attribute 'samesite'"),
        (_with(attributes="Path=/"), "attributes 'Path=/': not an object"),
        (_with(attributes=None), "attributes None: not an object"),
        (
            _with(cookie="__Host-c", attributes={"secure": True, "path": "/x"}),
            "cookie '__Host-c': a browser keeps a __Host- cookie only with Secure, Path=/ and "
            "no Domain: drop --cookie-path /x (or choose a name without that prefix)",
        ),
        (
            _with(primary_cookie="__Secure-p"),
            "primary_cookie '__Secure-p': a browser keeps a __Secure- cookie only with Secure",
        ),
        (
            _with(previous=f"__Host-c={VALUE}", attributes={"secure": True}),
            "previous '__Host-c': a browser keeps a __Host- cookie only with Secure, Path=/ "
            "and no Domain: give --cookie-secure",
        ),
        (
            _with(previous=OLD, previous_attributes={"domain": ".example.com"}),
            "previous_attributes {'domain': '.example.com'}: --cookie-domain '.example.com': "
            "not a host name",
        ),
    ],
    ids=[
        "path-attribute",
        "path-crlf",
        "path-space",
        "path-relative",
        "path-empty",
        "path-too-long",
        "domain-attribute",
        "domain-nul",
        "same-site-case",
        "same-site-none-not-secure",
        "partitioned-not-secure",
        "secure-not-bool",
        "http-only-not-bool",
        "path-not-text",
        "unknown",
        "not-an-object",
        "null",
        "host-prefix-path",
        "secure-prefix-primary",
        "host-prefix-previous",
        "previous-attributes",
    ],
)
def test_a_state_with_attributes_a_run_would_refuse_is_refused(bad: object, why: str) -> None:
    with pytest.raises(ValueError, match=f"bad state: session_affinity .*{re.escape(why)}"):
        Rollout.from_json({**STICKY.to_json(), "session_affinity": bad})


def test_a_hand_edited_state_stops_the_command_before_it_writes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    state = tmp_path / ".canary-bootcamp.state.json"
    data = STICKY.to_json()
    data["session_affinity"]["value"] = f"{VALUE}; Domain=example.com"
    state.write_text(json.dumps(data))
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"l4proxy canary: {state}: bad state: session_affinity" in err
    assert "is not 10 letters" in err and "remove it to start over" in err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()


def test_session_affinity_needs_an_http_route_in_the_state() -> None:
    with pytest.raises(ValueError, match="without gateway"):
        Rollout.from_json({**STICKY.to_json(), "gateway": None})


def test_a_cookie_value_is_ten_letters_drawn_by_the_caller() -> None:
    one = new_cookie_value(random.Random(7).choice)
    assert one == new_cookie_value(random.Random(7).choice)
    assert len(one) == 10 and set(one) <= set(COOKIE_LETTERS)
    assert one != new_cookie_value(random.Random(8).choice)


# -- resume ------------------------------------------------------------------------------
DRAWN = SessionAffinity("flagger-cookie", "DrawnAgain", max_age=60, primary_max_age=5)


def _resume(
    saved: Rollout | None, affinity: SessionAffinity | None, restart: bool = False
) -> Rollout:
    return resume(
        P,
        "bootcamp",
        "bootcamp-v1",
        "bootcamp-v2",
        saved,
        1.0,
        restart=restart,
        gateway=WEIGHTED.gateway,
        affinity=affinity,
    ).rollout


def test_a_resume_keeps_the_cookie_and_takes_the_new_ages() -> None:
    r = _resume(Rollout.from_json(STICKY.to_json()), DRAWN)
    assert r.affinity == replace(A, max_age=60, primary_max_age=5)
    # and after an interval it still has it
    assert advance(P, r, check(P, GOOD), 2.0).rollout.affinity == r.affinity
    # the same attributes: resumed, with them
    kept = replace(STICKY, affinity=replace(A, attributes=EVERY))
    assert _resume(kept, replace(DRAWN, attributes=EVERY)).affinity == replace(
        A, max_age=60, primary_max_age=5, attributes=EVERY
    )


def test_a_new_rollout_takes_the_drawn_value_and_deletes_the_last_ones_cookie() -> None:
    assert _resume(None, DRAWN).affinity == DRAWN
    ended = replace(STICKY, phase="rolled_back", weight=0)
    again = _resume(ended, DRAWN, restart=True)
    assert again.affinity == replace(DRAWN, previous=PAIR)
    assert (again.phase, again.weight) == ("progressing", 5)
    # its cookie is deleted as it was set, whatever the new one's attributes
    ended = replace(ended, affinity=replace(A, attributes=EVERY))
    again = _resume(ended, DRAWN, restart=True)
    assert again.affinity == replace(DRAWN, previous=PAIR, previous_attributes=EVERY)


@pytest.mark.parametrize("previous", [OLD, ""], ids=["one-before", "none"])
def test_after_a_rollout_that_ended_mirrored_the_cookie_before_it_is_still_deleted(
    previous: str,
) -> None:
    """It handed none of its own out: the cookie its clients may hold is
    the one it was deleting (or none)."""
    ended = replace(
        MIRRORED,
        phase="rolled_back",
        affinity=replace(
            A,
            attributes=CookieAttributes(secure=True),
            previous=previous,
            previous_attributes=EVERY,
        ),
    )
    again = _resume(ended, DRAWN, restart=True)
    assert again.affinity == replace(DRAWN, previous=previous, previous_attributes=EVERY)


AT = "the rollout of bootcamp from bootcamp-v1 to bootcamp-v2 is at 25 % "
END = "resume it with the rollout's, or end it first (l4proxy canary promote|abort bootcamp)"


def held(given: str) -> str:
    """The conflict of a resume of A's rollout with the options *given*."""
    return (
        f"{AT}with --session-affinity flagger-cookie, whose cookie its clients hold; this "
        f"command gives {given}: {END}"
    )


@pytest.mark.parametrize(
    ("saved", "given", "message"),
    [
        (A, None, held("no --session-affinity")),
        (
            None,
            DRAWN,
            f"{AT}without --session-affinity; this command gives --session-affinity "
            f"flagger-cookie: {END} to start one with session affinity",
        ),
        (A, replace(DRAWN, cookie="other"), held("--session-affinity other")),
        (
            A,
            replace(DRAWN, primary_cookie="p"),
            held("--session-affinity flagger-cookie --primary-cookie p"),
        ),
        (
            A,
            replace(DRAWN, attributes=CookieAttributes(secure=True)),
            held("--session-affinity flagger-cookie --cookie-secure"),
        ),
        (
            replace(A, primary_cookie="p", attributes=EVERY),
            replace(DRAWN, primary_cookie="p", attributes=replace(EVERY, path="/")),
            f"{AT}with --session-affinity flagger-cookie --primary-cookie p {EVERY_OPTIONS}, "
            "whose cookie its clients hold; this command gives --session-affinity "
            f"flagger-cookie --primary-cookie p {EVERY_OPTIONS.removeprefix('--cookie-path /app ')}"
            f": {END}",
        ),
        (
            replace(A, attributes=CookieAttributes(domain="example.com")),
            DRAWN,
            f"{AT}with --session-affinity flagger-cookie --cookie-domain example.com, whose "
            f"cookie its clients hold; this command gives --session-affinity flagger-cookie: "
            f"{END}",
        ),
        (
            replace(A, cookie="a`id`b"),
            DRAWN,
            f"{AT}with --session-affinity 'a`id`b', whose cookie its clients hold; this "
            f"command gives --session-affinity flagger-cookie: {END}",
        ),
    ],
    ids=[
        "dropped",
        "added",
        "renamed",
        "primary-added",
        "attribute-added",
        "path-changed",
        "domain-dropped",
        "a-name-a-shell-reads",
    ],
)
def test_a_resume_with_other_cookies_is_refused(
    saved: SessionAffinity | None, given: SessionAffinity | None, message: str
) -> None:
    """One sentence, whole (no two parentheticals in a row)."""
    with pytest.raises(Conflict) as exc:
        _resume(replace(STICKY, affinity=saved), given)
    assert str(exc.value) == message


def test_a_mirrored_rollout_resumed_with_other_cookies_says_no_client_holds_one() -> None:
    with pytest.raises(Conflict) as exc:
        _resume(MIRRORED, None)
    assert str(exc.value) == (
        "the rollout of bootcamp from bootcamp-v1 to bootcamp-v2 is mirrored with "
        "--session-affinity flagger-cookie; this command gives no --session-affinity: "
        f"{END}"
    )


# -- the command -------------------------------------------------------------------------
STICKY_ARGS = [*GATEWAY_API, "--session-affinity", "flagger-cookie"]


def test_a_rollout_hands_out_one_cookie_and_deletes_it_at_promotion(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *STICKY_ARGS, "--metrics", admin, "--steps", "50,100")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    values = {e["session_affinity"]["value"] for e in events}
    assert len(values) == 1
    (value,) = values
    assert re.fullmatch(r"[A-Za-z]{10}", value)
    assert events[0]["session_affinity"] == {
        "cookie": "flagger-cookie",
        "value": value,
        "max_age": 86400,
        "primary_cookie": "",
        "primary_max_age": 1,  # the interval, 0.05 s, in whole seconds
        "previous": "",
        "attributes": PATH_ONLY.to_json(),
        "previous_attributes": PATH_ONLY.to_json(),
    }
    assert PATH_ONLY.to_json() == {
        "path": "/",
        "domain": "",
        "secure": False,
        "http_only": False,
        "same_site": "",
        "partitioned": False,
    }
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    expire = doc["spec"]["rules"][0]["filters"][0]["responseHeaderModifier"]["add"]
    assert expire == [{"name": "Set-Cookie", "value": f"flagger-cookie={value}; Max-Age=0; Path=/"}]


def test_prefixed_names_are_taken_with_secure_and_the_deletion_carries_the_attributes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secure = ["--cookie-secure", "--cookie-http-only", "--cookie-same-site", "None"]
    args = [*GATEWAY_API, "--session-affinity", "__Host-flagger", *secure, "--cookie-partitioned"]
    with _sidecar(tmp_path) as admin:
        code = _canary(
            tmp_path,
            *args,
            "--primary-cookie",
            "__Secure-p",
            "--metrics",
            admin,
            "--steps",
            "50,100",
        )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    a = events[0]["session_affinity"]
    assert (a["cookie"], a["primary_cookie"]) == ("__Host-flagger", "__Secure-p")
    assert a["attributes"] == {
        "path": "/",
        "domain": "",
        "secure": True,
        "http_only": True,
        "same_site": "None",
        "partitioned": True,
    }
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    expire = doc["spec"]["rules"][0]["filters"][0]["responseHeaderModifier"]["add"]
    assert expire == [
        {
            "name": "Set-Cookie",
            "value": f"__Host-flagger={a['value']}; Max-Age=0; HttpOnly; Partitioned; Path=/; "
            "SameSite=None; Secure",
        }
    ]


@pytest.mark.parametrize(
    ("name", "attributes", "message"),
    [
        (
            "__Http-c",
            CookieAttributes(secure=True),
            "a browser keeps a __Http- cookie only with Secure and HttpOnly: give "
            "--cookie-http-only",
        ),
        (
            "__http-c",
            CookieAttributes(http_only=True),
            "a browser keeps a __http- cookie only with Secure and HttpOnly: give --cookie-secure",
        ),
        (
            "__Host-Http-c",
            CookieAttributes(secure=True, path="/x", domain="a.example"),
            "a browser keeps a __Host-Http- cookie only with Secure, HttpOnly, Path=/ and no "
            "Domain: give --cookie-http-only, drop --cookie-path /x, drop --cookie-domain",
        ),
        ("__Http-c", CookieAttributes(secure=True, http_only=True), ""),
        ("__Host-Http-c", CookieAttributes(secure=True, http_only=True), ""),
    ],
)
def test_the_http_only_prefixes_need_http_only_too(
    name: str, attributes: CookieAttributes, message: str
) -> None:
    """The draft's ``__Http-`` and ``__Host-Http-`` prefixes (RFC 6265bis
    drafts; a browser that takes them drops such a cookie set without
    HttpOnly, as a ``__Secure-`` one without Secure)."""
    got = cookie_prefix_problem(name, attributes)
    assert got == (f"{message} (or choose a name without that prefix)" if message else ""), got


@pytest.mark.parametrize("name", ["__Host", "__secure", "__Hosted-c"])
def test_a_name_without_a_prefix_s_hyphen_needs_nothing(name: str) -> None:
    """A browser's prefixes are ``__Secure-`` and ``__Host-`` with their
    hyphen: ``__Host`` alone is a name as any other."""
    assert cookie_prefix_problem(name, CookieAttributes(path="/x", domain="a.example")) == ""


def test_a_domain_is_taken_as_a_browser_takes_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A leading dot dropped (RFC 6265, 5.2.3; old Flagger configurations
    write one) and any case the same name: written lowercase, so that a
    resume in another case is no conflict."""
    with _sidecar(tmp_path) as admin:
        code = _canary(
            tmp_path,
            *STICKY_ARGS,
            "--cookie-domain",
            ".Example.COM",
            "--metrics",
            admin,
            "--steps",
            "50,100",
        )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    assert events[0]["session_affinity"]["attributes"]["domain"] == "example.com"
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    expire = doc["spec"]["rules"][0]["filters"][0]["responseHeaderModifier"]["add"]
    assert expire[0]["value"].endswith("; Max-Age=0; Domain=example.com; Path=/")


def test_a_resumed_command_keeps_the_cookie(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = replace(STICKY, steps=(50, 100), step=0, weight=50, affinity=replace(A, max_age=86400))
    save_state(str(tmp_path / ".canary-bootcamp.state.json"), saved)
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *STICKY_ARGS, "--metrics", admin, "--steps", "50,100")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, events
    assert events[0]["event"] == "resume"
    assert {e["session_affinity"]["value"] for e in events} == {VALUE}
    assert f"flagger-cookie={VALUE}; Max-Age=0" in (tmp_path / "canary-bootcamp.yaml").read_text()


def test_status_shows_the_cookie(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    save_state(str(tmp_path / ".canary-bootcamp.state.json"), STICKY)
    assert main(["canary", "status", "bootcamp", "--rules", str(tmp_path)]) == 0
    assert f"sticky cookie {PAIR})" in capsys.readouterr().out
    assert main(["canary", "status", "bootcamp", "--rules", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["session_affinity"]["value"] == VALUE
    primary = replace(STICKY, affinity=replace(A, primary_cookie="p"))
    assert route_words(primary).endswith(f", sticky cookie {PAIR}, primary cookie p)")
    # the attributes, where they are not Path=/ alone; the options of a run ignored
    save_state(
        str(tmp_path / ".canary-bootcamp.state.json"),
        replace(primary, affinity=replace(A, primary_cookie="p", attributes=EVERY)),
    )
    status = ["canary", "status", "bootcamp", "--rules", str(tmp_path), "--cookie-path", "x"]
    assert main(status) == 0
    assert f", sticky cookie {PAIR}, primary cookie p, set with {EVERY_TAIL})" in (
        capsys.readouterr().out
    )
    assert main([*status, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["session_affinity"]["attributes"] == EVERY.to_json()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--stable", "v1", "--canary", "v2", "--session-affinity", "c"],
            "--session-affinity needs --gateway-api: a client gets the cookie from a "
            "Set-Cookie that the canary's answers carry, and Istio 0.7's RouteRule cannot "
            "add a response header",
        ),
        (
            [*STICKY_ARGS, "--match", "x-canary=insider"],
            "--session-affinity and --match: A/B testing sends every matching request",
        ),
        ([*GATEWAY_API, "--cookie-max-age", "60"], "--cookie-max-age goes with --session-affinity"),
        ([*GATEWAY_API, "--primary-cookie", "p"], "--primary-cookie goes with --session-affinity"),
        (
            [*GATEWAY_API, "--session-affinity", "a b"],
            "--session-affinity 'a b': not a cookie name",
        ),
        (
            [*GATEWAY_API, "--session-affinity", "a=b"],
            "--session-affinity 'a=b': not a cookie name",
        ),
        (
            [*GATEWAY_API, "--session-affinity", "a;b"],
            "--session-affinity 'a;b': not a cookie name",
        ),
        ([*GATEWAY_API, "--session-affinity", ""], "--session-affinity '': not a cookie name"),
        (
            # (a token, but Envoy-based gateways would write the pod's name)
            [*GATEWAY_API, "--session-affinity", "%HOSTNAME%"],
            "--session-affinity '%HOSTNAME%': not a cookie name (RFC 6265: letters, digits and "
            "!#$&'*+-.^_`|~; no space, nor any of ()<>@,;:\\\"/[]?={}, nor %, which "
            "Envoy-based gateways read as a formatter's)",
        ),
        ([*STICKY_ARGS, "--primary-cookie", "é"], "--primary-cookie 'é': not a cookie name"),
        (
            [*GATEWAY_API, "--session-affinity", "x" * (MAX_COOKIE_NAME + 1)],
            f"--session-affinity '{'x' * (MAX_COOKIE_NAME + 1)}': {MAX_COOKIE_NAME + 1} "
            f"characters; at most {MAX_COOKIE_NAME}",
        ),
        (
            [*GATEWAY_API, "--session-affinity", "__Host-c"],
            "--session-affinity '__Host-c': a browser keeps a __Host- cookie only with Secure, "
            "Path=/ and no Domain: give --cookie-secure (or choose a name without that prefix)",
        ),
        (
            [*STICKY_ARGS, "--primary-cookie", "__secure-p"],
            "--primary-cookie '__secure-p': a browser keeps a __secure- cookie only with "
            "Secure: give --cookie-secure (or choose a name without that prefix)",
        ),
        (
            [*STICKY_ARGS, "--primary-cookie", "flagger-cookie"],
            "--primary-cookie flagger-cookie: the same name as --session-affinity",
        ),
        ([*STICKY_ARGS, "--cookie-max-age", "0"], "--cookie-max-age 0: seconds from 1 to"),
        (
            [*STICKY_ARGS, "--cookie-max-age", str(400 * 86400 + 1)],
            "--cookie-max-age 34560001: seconds from 1 to 34560000",
        ),
    ],
    ids=[
        "routerule",
        "ab-testing",
        "max-age-alone",
        "primary-alone",
        "space",
        "equals",
        "semicolon",
        "empty",
        "percent",
        "not-ascii",
        "too-long",
        "host-prefix",
        "secure-prefix",
        "same-names",
        "max-age-0",
        "max-age-past-400-days",
    ],
)
def test_usage_errors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *extra, "--metrics", admin)
    assert code == 2
    assert f"l4proxy canary: {message}" in capsys.readouterr().err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()
    assert not (tmp_path / ".canary-bootcamp.state.json").exists()


NOT_A_PATH = (
    "not a cookie path: it starts with / and holds what a request's path may (letters, "
    "digits and -._~!$&'()*+,=:@/; no ;, space, ? or #, nor a %XX escape: Envoy-based "
    "gateways read % as a formatter's), e.g. /app"
)
NOT_A_HOST = (
    "not a host name (labels of letters, digits and -, joined by dots, 253 characters at "
    "most; no leading dot, port or IP address), e.g. example.com"
)
SECURE = "--cookie-secure"
HOST_NEEDS = "a browser keeps a __Host- cookie only with Secure, Path=/ and no Domain"
LABEL = "x" * 63


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        *[
            pytest.param(
                [*GATEWAY_API, *option],
                f"{option[0]} goes with --session-affinity COOKIE (the canary's cookie; "
                "Flagger's sessionAffinity.cookieName)",
                id=f"{option[0][2:]}-alone",
            )
            for option in (
                ["--cookie-path", "/"],
                ["--cookie-domain", "example.com"],
                [SECURE],
                ["--cookie-http-only"],
                ["--cookie-same-site", "Lax"],
                ["--cookie-partitioned"],
            )
        ],
        *[
            pytest.param(
                [*STICKY_ARGS, "--cookie-path", path], f"--cookie-path {path!r}: {NOT_A_PATH}", id=i
            )
            for path, i in (
                ("app", "path-relative"),
                ("", "path-empty"),
                ("/a;b", "path-semicolon"),
                ("/a; Domain=evil.example", "path-attribute"),
                ("/a b", "path-space"),
                ("/a\tb", "path-tab"),
                ("/a\x7fb", "path-del"),
                ("/a?b=1", "path-query"),
                ("/a#b", "path-fragment"),
                ('/a"b', "path-quote"),
                ("/é", "path-not-ascii"),
                ("/a%2", "path-bad-escape"),
                ("/a%2Fb", "path-escape"),  # (Envoy would read %2Fb% as a formatter)
            )
        ],
        pytest.param(
            [*STICKY_ARGS, "--cookie-path", "/" + "a" * 1024],
            "--cookie-path: 1025 characters; at most 1024 (RFC 6265bis: a browser ignores a "
            "longer attribute)",
            id="path-too-long",
        ),
        *[
            pytest.param(
                [*STICKY_ARGS, f"--cookie-domain={domain}"],  # -a.example.com too
                f"--cookie-domain {domain!r}: {NOT_A_HOST}",
                id=i,
            )
            for domain, i in (
                ("example.com.", "domain-trailing-dot"),
                ("example.com:8080", "domain-port"),
                ("198.18.0.1", "domain-ip"),
                ("[::1]", "domain-ipv6"),
                ("exa_mple.com", "domain-underscore"),
                ("-a.example.com", "domain-leading-hyphen"),
                ("a..example.com", "domain-empty-label"),
                ("example.com;Secure", "domain-attribute"),
                ("exa mple.com", "domain-space"),
                ("bücher.example", "domain-not-ascii"),
                (f"{LABEL}x.com", "domain-label-too-long"),
                (".".join([LABEL] * 4), "domain-too-long"),  # 255 characters
            )
        ],
        pytest.param(
            [*STICKY_ARGS, "--cookie-domain", ""],
            "--cookie-domain '': not a host name, e.g. example.com (without the option the "
            "cookies go back to the host that answered alone)",
            id="domain-empty",
        ),
        pytest.param(
            [*STICKY_ARGS, "--cookie-same-site", "None"],
            "--cookie-same-site None needs --cookie-secure: browsers drop a SameSite=None "
            "cookie without Secure",
            id="same-site-none-not-secure",
        ),
        pytest.param(
            [*STICKY_ARGS, "--cookie-partitioned", "--cookie-http-only"],
            "--cookie-partitioned needs --cookie-secure: browsers drop a Partitioned cookie "
            "without Secure",
            id="partitioned-not-secure",
        ),
        pytest.param(
            [*GATEWAY_API, "--session-affinity", "__Secure-c", "--cookie-domain", "example.com"],
            "--session-affinity '__Secure-c': a browser keeps a __Secure- cookie only with "
            "Secure: give --cookie-secure (or choose a name without that prefix)",
            id="secure-prefix-not-secure",
        ),
        pytest.param(
            [*GATEWAY_API, "--session-affinity", "__Host-c", SECURE, "--cookie-path", "/app"],
            f"--session-affinity '__Host-c': {HOST_NEEDS}: drop --cookie-path /app (or choose "
            "a name without that prefix)",
            id="host-prefix-path",
        ),
        pytest.param(
            [*GATEWAY_API, "--session-affinity", "__Host-c", SECURE, "--cookie-domain", "a.b"],
            f"--session-affinity '__Host-c': {HOST_NEEDS}: drop --cookie-domain (or choose a "
            "name without that prefix)",
            id="host-prefix-domain",
        ),
        pytest.param(
            [*GATEWAY_API, "--session-affinity", "__HOST-c", "--cookie-domain", "a.b"],
            "--session-affinity '__HOST-c': a browser keeps a __HOST- cookie only with Secure, "
            "Path=/ and no Domain: give --cookie-secure, drop --cookie-domain",
            id="host-prefix-any-case",
        ),
        pytest.param(
            [*STICKY_ARGS, SECURE, "--cookie-path", "/a", "--primary-cookie", "__Host-p"],
            f"--primary-cookie '__Host-p': {HOST_NEEDS}: drop --cookie-path /a",
            id="host-prefix-primary",
        ),
    ],
)
def test_attribute_usage_errors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """Each refused with exit 2, naming the option, before anything is
    written: nothing can be injected into the Set-Cookie, and no cookie is
    set that browsers would drop."""
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *extra, "--metrics", admin)
    assert code == 2
    assert f"l4proxy canary: {message}" in capsys.readouterr().err
    assert not (tmp_path / "canary-bootcamp.yaml").exists()
    assert not (tmp_path / ".canary-bootcamp.state.json").exists()


def test_same_site_is_one_of_flaggers_three(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _canary(tmp_path, *STICKY_ARGS, "--cookie-same-site", "lax", "--metrics", ADMIN)
    assert exc.value.code == 2
    assert "argument --cookie-same-site: invalid choice: 'lax'" in capsys.readouterr().err
    assert not (tmp_path / ".canary-bootcamp.state.json").exists()


ENDED = "this rollout had ended; --restart starts it again"


@pytest.mark.parametrize(
    ("saved", "given", "note"),
    [
        (
            A,
            ["--session-affinity", "other"],
            f"{ENDED} (it ran with --session-affinity flagger-cookie --cookie-max-age 21600; "
            "this command's --session-affinity other --cookie-max-age 86400 were not used)",
        ),
        (
            A,
            ["--session-affinity", "flagger-cookie", "--primary-cookie", "p"],
            f"{ENDED} (it ran with --session-affinity flagger-cookie --cookie-max-age 21600; "
            "this command's --session-affinity flagger-cookie --cookie-max-age 86400 "
            "--primary-cookie p were not used)",
        ),
        (
            A,
            [],
            f"{ENDED} (it ran with --session-affinity flagger-cookie --cookie-max-age 21600; "
            "this command gives no cookie options)",
        ),
        (
            None,
            ["--session-affinity", "flagger-cookie"],
            f"{ENDED} (it ran without --session-affinity; this command's --session-affinity "
            "flagger-cookie --cookie-max-age 86400 were not used)",
        ),
        (A, ["--session-affinity", "flagger-cookie", "--cookie-max-age", "21600"], ENDED),
        (None, [], ENDED),
        (
            replace(A, attributes=CookieAttributes(secure=True, same_site="Strict")),
            [
                "--session-affinity",
                "flagger-cookie",
                "--cookie-max-age",
                "21600",
                "--cookie-secure",
            ],
            f"{ENDED} (it ran with --session-affinity flagger-cookie --cookie-max-age 21600 "
            "--cookie-secure --cookie-same-site Strict; this command's --session-affinity "
            "flagger-cookie --cookie-max-age 21600 --cookie-secure were not used)",
        ),
        (
            replace(A, attributes=EVERY),
            [
                "--session-affinity",
                "flagger-cookie",
                "--cookie-max-age",
                "21600",
                *EVERY_OPTIONS.split(),
            ],
            ENDED,
        ),
    ],
    ids=[
        "renamed",
        "primary-added",
        "dropped",
        "added",
        "same",
        "none",
        "attributes",
        "same-every",
    ],
)
def test_a_finished_rollout_run_again_names_the_cookie_options_it_did_not_use(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    saved: SessionAffinity | None,
    given: list[str],
    note: str,
) -> None:
    ended = replace(STICKY, phase="rolled_back", weight=0, affinity=saved)
    save_state(str(tmp_path / ".canary-bootcamp.state.json"), ended)
    with _sidecar(tmp_path) as admin:
        code = _canary(tmp_path, *GATEWAY_API, *given, "--metrics", admin)
    (event,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1, event
    assert (event["event"], event["note"]) == ("rolled_back", note)
    # reported, and written, as it ended: its own cookie (if any) is the one deleted
    assert (tmp_path / "canary-bootcamp.yaml").read_text() == documents_text(ended)


@pytest.mark.parametrize(
    "option",
    [
        ["--session-affinity", "other"],
        ["--primary-cookie", "p"],
        ["--cookie-domain", "example.com", "--cookie-secure", "--cookie-path", "/x"],
        ["--cookie-same-site", "None", "--cookie-partitioned"],  # a run would refuse them
    ],
    ids=["cookie", "primary", "attributes", "refused-attributes"],
)
def test_an_abort_with_other_cookie_options_deletes_the_saved_cookie(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    """An abort acts on the saved rollout (an abort in a hurry, from a
    copied command line, must not fail on a run's options): it rolls back
    and deletes the cookie the rollout handed out, not the one given."""
    from l4proxy.cli import main

    save_state(str(tmp_path / ".canary-bootcamp.state.json"), STICKY)
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path), *option]) == 1
    text = (tmp_path / "canary-bootcamp.yaml").read_text()
    assert f'{STICKY.affinity.pair}; Max-Age=0; Path=/"' in text  # type: ignore[union-attr]
    assert "other=" not in text and "p=" not in text


def test_an_abort_deletes_the_cookie_with_the_attributes_it_was_set_with(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from l4proxy.cli import main

    save_state(
        str(tmp_path / ".canary-bootcamp.state.json"),
        replace(STICKY, affinity=replace(A, attributes=EVERY)),
    )
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
    doc = yaml.safe_load((tmp_path / "canary-bootcamp.yaml").read_text())
    expire = doc["spec"]["rules"][0]["filters"][0]["responseHeaderModifier"]["add"]
    assert expire == [{"name": "Set-Cookie", "value": f"{PAIR}; Max-Age=0; {EVERY_TAIL}"}]


def test_an_abort_while_mirrored_deletes_no_cookie_of_its_own(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its cookie was never handed out: the document it ends with has no
    rule for it (only the cookie before it, still deleted)."""
    from l4proxy.cli import main

    save_state(str(tmp_path / ".canary-bootcamp.state.json"), MIRRORED)
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
    text = (tmp_path / "canary-bootcamp.yaml").read_text()
    assert text == documents_text(replace(MIRRORED, phase="rolled_back", affinity=None))
    assert "Cookie" not in text
    save_state(
        str(tmp_path / ".canary-bootcamp.state.json"),
        replace(MIRRORED, affinity=replace(A, previous=OLD)),
    )
    assert main(["canary", "abort", "bootcamp", "--rules", str(tmp_path)]) == 1
    text = (tmp_path / "canary-bootcamp.yaml").read_text()
    assert VALUE not in text and f"{OLD}; Max-Age=0; Path=/" in text


# -- end to end: a real sidecar in namespaces ------------------------------------------
def _answers(mesh: Mesh, n: int, cookie: str | None = None) -> list[tuple[str, list[str]]]:
    """*n* requests to bootcamp from the client pod (curl, a connection
    each): (version, its Set-Cookie lines, whole as received but the CRLF)
    of each answer."""
    extra = ["-i", *(["-H", f"Cookie: {cookie}"] if cookie is not None else [])]
    text = "\n".join(mesh.curl(f"http://{VIP}:8080/", n, extra=extra))
    out = []
    for answer in re.split(r"(?m)^(?=HTTP/1\.1 )", text)[1:]:
        head = answer.split("\n\n", 1)[0].splitlines()
        versions, _ = tally(answer)
        assert sum(versions.values()) == 1, answer
        cookies = [h for h in head if h.lower().startswith("set-cookie:")]
        out.append((next(iter(versions)), cookies))
    assert len(out) == n, text
    return out


@pytest.mark.netns
@pytest.mark.parametrize(
    ("options", "name", "primary", "tail"),
    [
        (STICKY_ARGS, "flagger-cookie", "", "Path=/"),
        (
            [
                *GATEWAY_API,
                "--session-affinity",
                "__Secure-flagger",
                "--primary-cookie",
                "__Secure-primary",
                "--cookie-domain",
                "bootcamp.example",
                "--cookie-secure",
                "--cookie-http-only",
                "--cookie-same-site",
                "None",
                "--cookie-partitioned",
            ],
            "__Secure-flagger",
            "__Secure-primary",
            "Domain=bootcamp.example; HttpOnly; Partitioned; Path=/; SameSite=None; Secure",
        ),
    ],
    ids=["path-only", "every-attribute"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_sidecar_keeps_cookie_holders_on_the_canary_until_the_rollback(
    mesh: Mesh, impl: str, options: list[str], name: str, primary: str, tail: str
) -> None:
    """Each answer's Set-Cookie line as the sidecar sends it, byte for
    byte: the canary's (and the primary's), and after the rollback the
    canary's deletion, with the attributes it was set with."""
    mesh.start(impl, *per_version(mesh), run_args=PER_REQUEST)
    assert mesh.client is not None
    # every interval halts (a million requests wanted) and none rolls back
    # (--progress-deadline 0): the rollout stays at 50 % while we count
    p = canary(
        mesh,
        "bootcamp",
        *options,
        "--rules",
        mesh.rules_dir,
        "--steps",
        "50,100",
        "--interval",
        "0.5",
        "--min-requests",
        "1000000",
        "--progress-deadline",
        "0",
        "--wait-live",
        "10",
    )
    try:
        assert p.stdout is not None
        start = json.loads(p.stdout.readline())
        # the first interval's line: the 50 % document went live before it began
        first = json.loads(p.stdout.readline())
        assert (first["weight"], first["check"]["verdict"]) == (50, "halt"), first
        a = SessionAffinity.from_json(start["session_affinity"])
        assert a.cookie == name
        pair = f"{name}={a.value}"
        # stable's, with --primary-cookie: this step's value, for an interval (1 s)
        stable = [f"set-cookie: {primary}={a.primary_value(0)}; Max-Age=1; {tail}"]

        fresh = _answers(mesh, 60)
        # Set-Cookie on exactly the canary's answers, and stable's with
        # --primary-cookie (and both answered)
        assert {v for v, _ in fresh} == {"v1", "v2"}
        for version, cookies in fresh:
            expected = (
                [f"set-cookie: {pair}; Max-Age=86400; {tail}"]
                if version == "v2"
                else stable
                if primary
                else []
            )
            assert cookies == expected, (version, cookies)

        # the cookie holder: every one of 50 requests on the canary (a 50 %
        # split would do so once in 2**50)
        held = _answers(mesh, 50, f"session=1; {pair}")
        assert held == [("v2", [])] * 50

        r = mesh.client.run(
            [L4PROXY, "canary", "abort", "bootcamp", "--rules", mesh.rules_dir, "--metrics", ADMIN],
            check=False,
        )
        assert r.returncode == 1, r.stderr
        # rolled back: the holder reaches stable, and each answer deletes the cookie
        assert _answers(mesh, 20, pair) == [("v1", [f"set-cookie: {pair}; Max-Age=0; {tail}"])] * 20
        assert _answers(mesh, 20) == [("v1", [])] * 20
        code, events, err = finish(p)
        assert code == 1, err
        assert (events[-1]["event"], events[-1]["note"]) == ("rolled_back", "ended by hand")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
