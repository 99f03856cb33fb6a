"""What a VirtualService match block holds that does nothing here, said
at its line: ``ignoreUriCase`` where there is no exact or prefix uri for
it to apply to (a warning: the match is not what it reads as), and
``statPrefix`` (a note: a migrated config keeps it, and the stats are
named as /stats names them). Each was silent (ignoreUriCase, said only by
``validate -v``) or refused (statPrefix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from l4proxy.rules import load_rules

REGISTRY = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 198.18.0.14}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - match:
    - %s
    route: [{destination: {host: echo}}]
"""


@pytest.mark.parametrize(
    ("block", "severity", "message"),
    [
        (
            "{uri: {regex: /Foo.*}, ignoreUriCase: true}",
            "warning",
            "ignoreUriCase does nothing here: it applies to an exact or prefix uri, and this "
            "block's uri is a regex, matched case-sensitively as written (write (?i) in it to "
            "ignore case)",
        ),
        (
            "{queryParams: {c: {}}, ignoreUriCase: true}",
            "warning",
            "ignoreUriCase does nothing here: this block has no uri match, and it applies to an "
            "exact or prefix uri",
        ),
        (
            "{name: m, uri: {prefix: /sp}, statPrefix: foo}",
            "note",
            "statPrefix is not applied: /stats counts a route's decisions under the route's name",
        ),
    ],
    ids=["ignoreUriCase with a regex", "ignoreUriCase without a uri", "statPrefix"],
)
def test_a_field_that_does_nothing_is_said_at_its_line(
    tmp_path: Path, block: str, severity: str, message: str
) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(REGISTRY % block)
    result = load_rules([str(f)])
    found = [d for d in result.notes if message in d.message]
    assert found, "\n".join(map(str, result.notes))
    assert (found[0].severity, found[0].line) == (severity, 16), str(found[0])


@pytest.mark.parametrize(
    "block",
    ["{uri: {prefix: /Foo}, ignoreUriCase: true}", "{uri: {exact: /Foo}, ignoreUriCase: true}"],
)
def test_ignore_uri_case_where_it_applies_says_nothing(tmp_path: Path, block: str) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(REGISTRY % block)
    assert load_rules([str(f)]).notes == []
