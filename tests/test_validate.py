"""``l4proxy validate``: exit codes, istioctl-style errors, the summary, --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l4proxy.cli import main
from tests.mesh import SEED_DIR as SEED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(__file__), "data", "rules")
REGISTRY = os.path.join(DATA, "registry.yaml")
EXAMPLES = os.path.join(REPO, "deploy", "examples", "rules")

# Skips without ../shared, fails under CI=true (conftest's seed_dir).
needs_seed = pytest.mark.usefixtures("seed_dir")


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


@needs_seed
def test_valid_seed_files_with_summary(capsys: pytest.CaptureFixture[str]) -> None:
    rule = os.path.join(SEED, "bootcamp-route-rule-50-v2.yaml")
    code, out, err = validate(
        capsys,
        rule,
        REGISTRY,
        os.path.join(SEED, "bootcamp.yaml"),
        os.path.join(SEED, "bootcamp-service.yaml"),
    )
    assert code == 0, err
    assert out.splitlines() == [
        "5 documents: 1 RouteRule, 1 ServiceEntry; 3 skipped "
        "(Deployment bootcamp-v1, Deployment bootcamp-v2, Service bootcamp)",
        "valid: 4 files",
    ]
    assert err == ""  # notes only with --verbose


@needs_seed
def test_verbose_prints_notes_and_the_route_table(capsys: pytest.CaptureFixture[str]) -> None:
    rule = os.path.join(SEED, "bootcamp-route-rule-50-v2.yaml")
    code, out, err = validate(
        capsys, "--verbose", rule, REGISTRY, os.path.join(SEED, "bootcamp.yaml")
    )
    assert code == 0
    assert "note: Deployment bootcamp-v1: skipped" in err
    assert "  service bootcamp.default.svc.cluster.local (also bootcamp, bootcamp.default, " in out
    assert "      198.18.0.13:8080  app=bootcamp,version=v2" in out
    assert "      1. bootcamp-default: any request" in out
    assert "50%  bootcamp.default.svc.cluster.local subset v1 (version=v1; ROUND_ROBIN)" in out
    # the rule has no match: it takes every request, none is left to the round robin
    assert "otherwise: nothing (a route takes every request)" in out


def test_verbose_says_what_a_request_no_route_matches_gets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A VirtualService's host answers such a request 404 (as the sidecar
    does), a RouteRule's spreads it over every endpoint."""
    vs = tmp_path / "vs.yaml"
    vs.write_text(
        textwrap.dedent("""\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bootcamp}
        spec:
          hosts: [bootcamp]
          http:
          - match: [{uri: {prefix: /api}}]
            route: [{destination: {host: bootcamp}}]
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(vs), REGISTRY)
    assert code == 0, err
    assert "      otherwise: 404 (no route matched)\n" in out
    rr = tmp_path / "rr.yaml"
    rr.write_text(
        textwrap.dedent("""\
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata: {name: api}
        spec:
          destination: {name: bootcamp}
          match: {request: {headers: {uri: {prefix: /api}}}}
          route: [{labels: {version: v2}}]
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(rr), REGISTRY)
    assert code == 0, err
    assert "      otherwise: round robin over all endpoints (route 'default')\n" in out


def test_a_tcp_route_on_an_http_port_is_a_warning_and_verbose_says_it_routes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A VirtualService of tcp routes only for bootcamp, whose one port is
    HTTP: 'validate -v' listed its route as if it took the port's
    requests, which the sidecar then did (all to v2). Istio's HTTP listener
    has the http routes alone: a warning at the route's line, and the
    route said to route nothing, the port's requests the round robin."""
    vs = tmp_path / "vs.yaml"
    vs.write_text(
        textwrap.dedent("""\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bootcamp}
        spec:
          hosts: [bootcamp]
          tcp:
          - route:
            - destination: {host: bootcamp}
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(vs), REGISTRY)
    assert code == 0, err
    assert err.splitlines() == [
        f"{vs}:7: warning: VirtualService bootcamp: this tcp route routes nothing: tcp routes "
        "serve TCP ports only; port 8080 of bootcamp.default.svc.cluster.local is HTTP: its "
        "requests take the whole service, the default route (this VirtualService has no http "
        "route)"
    ]
    assert "      1. bootcamp (tcp; not on HTTP port 8080: routes nothing): any request\n" in out
    assert "      otherwise: round robin over all endpoints (route 'default')\n" in out
    assert out.splitlines()[-1] == "valid: 2 files (1 warning)"


def test_verbose_says_the_ports_of_each_kind_of_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service with an HTTP and a TCP port, a VirtualService of both
    kinds: each route is its port's, said after its name; no warning."""
    rules = tmp_path / "db.yaml"
    rules.write_text(
        textwrap.dedent("""\
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: db}
        spec:
          hosts: [db]
          ports:
          - {number: 8080, name: http, protocol: HTTP}
          - {number: 5432, name: tcp-pg, protocol: TCP}
          resolution: STATIC
          endpoints: [{address: 198.18.0.21}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: db}
        spec:
          hosts: [db]
          http:
          - name: api
            route: [{destination: {host: db, port: {number: 8080}}}]
          tcp:
          - route: [{destination: {host: db, port: {number: 5432}}}]
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(rules))
    assert code == 0, err
    assert "warning" not in err
    assert "      1. db/api (not on TCP port 5432): any request\n" in out
    assert "      2. db (tcp; not on HTTP port 8080): any request\n" in out
    assert "      otherwise: nothing (a route takes every request)\n" in out


def test_verbose_shows_a_route_rule_timeout_and_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rr = tmp_path / "rr.yaml"
    rr.write_text(
        textwrap.dedent("""\
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata: {name: bootcamp-default}
        spec:
          destination: {name: bootcamp}
          route: [{labels: {version: v1}}]
          httpReqTimeout:
            simpleTimeout:
              timeout: 1500ms
          httpReqRetries:
            simpleRetry: {attempts: 3, perTryTimeout: 500ms}
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(rr), REGISTRY)
    assert code == 0, err
    assert "      1. bootcamp-default: any request\n" in out
    assert (
        "           timeout 1.5 s (then 504)\n"
        "           retries 3 on 5xx,connect-failure,refused-stream, 0.5 s per try\n"
    ) in out


def test_verbose_shows_a_retry_policy_and_warns_of_a_per_try_timeout_past_the_route_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vs = tmp_path / "vs.yaml"
    vs.write_text(
        textwrap.dedent("""\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bootcamp}
        spec:
          hosts: [bootcamp]
          http:
          - route: [{destination: {host: bootcamp}}]
            timeout: 1s
            retries:
              attempts: 3
              perTryTimeout: 2s
              retryOn: gateway-error,409
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(vs), REGISTRY)
    assert code == 0, err
    assert (
        "           retries 3 on gateway-error,retriable-status-codes (codes 409), 2 s per try\n"
        in out
    )
    assert "vs.yaml:11: warning: VirtualService bootcamp: spec.http[0].retries.perTryTimeout" in (
        out + err
    )
    # a backoff other than Envoy's default (25 ms) is said
    vs.write_text(vs.read_text() + "      backoff: 100ms\n")
    code, out, err = validate(capsys, "--verbose", str(vs), REGISTRY)
    assert code == 0, err
    assert (
        "           retries 3 on gateway-error,retriable-status-codes (codes 409), 2 s per try, "
        "backoff 100 ms\n" in out
    )
    # so is a retry that does not avoid the endpoints tried (true, the default, is not)
    vs.write_text(vs.read_text() + "      retryIgnorePreviousHosts: false\n")
    code, out, err = validate(capsys, "--verbose", str(vs), REGISTRY)
    assert code == 0, err
    assert (
        "           retries 3 on gateway-error,retriable-status-codes (codes 409), 2 s per try, "
        "backoff 100 ms, previous endpoints not avoided\n" in out
    )


@pytest.mark.parametrize(
    ("retries", "said"),
    [
        (
            "{attempts: 2, retryOn: 'refused-stream,unavailable'}",
            "retries 2 on refused-stream,unavailable: no effect here (none of these "
            "policies fires on HTTP/1.1 beyond the relay's own retries)",
        ),
        # a failed connect is retried (Envoy's), a per-try timeout or not
        (
            "{attempts: 2, retryOn: 'connect-failure,unavailable'}",
            "retries 2 on connect-failure,unavailable: only a failed connect is retried here",
        ),
        (
            "{attempts: 1, perTryTimeout: 2s, retryOn: reset-before-request}",
            "retries 1 on reset-before-request, 2 s per try: only a failed connect is retried here",
        ),
        (
            "{attempts: 2, perTryTimeout: 2s, retryOn: cancelled}",
            "retries 2 on cancelled, 2 s per try: only the per-try timeout has effect here "
            "(none of these policies fires on HTTP/1.1 beyond the relay's own retries)",
        ),
        # Istio's default fires (503)
        (
            "{attempts: 2}",
            "retries 2 on connect-failure,refused-stream,unavailable,cancelled,"
            "retriable-status-codes (codes 503)",
        ),
    ],
)
def test_verbose_says_when_a_retry_policy_has_no_effect_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], retries: str, said: str
) -> None:
    """A policy of retryOn words that never fire on HTTP/1.1 is shown as
    written, and said to do nothing (the relays take it as none, holding
    no request for a replay), or only its per-try timeout."""
    vs = tmp_path / "vs.yaml"
    vs.write_text(
        textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {{name: bootcamp}}
        spec:
          hosts: [bootcamp]
          http:
          - route: [{{destination: {{host: bootcamp}}}}]
            retries: {retries}
        """)
    )
    code, out, err = validate(capsys, "--verbose", str(vs), REGISTRY)
    assert code == 0, err
    assert f"           {said}\n" in out, out


def test_invalid_exits_1_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "bootcamp.yaml"
    f.write_text(
        textwrap.dedent("""\
        # tutorial step with a typo in the weights
        apiVersion: config.istio.io/v1alpha2
        kind: RouteRule
        metadata:
          name: bootcamp-default
        spec:
          destination:
            name: bootcamp
          precedence: 1
          match: {}
          # the weights
          route:
          - labels:
              version: v1
            weight: 40
          - labels:
              version: v2
            weight: 50
        """)
    )
    monkeypatch.chdir(tmp_path)  # relative paths are printed as given
    code, out, err = validate(capsys, "bootcamp.yaml", REGISTRY)
    assert code == 1
    assert err.splitlines() == [
        "bootcamp.yaml:12: RouteRule bootcamp-default: route weights total 90 (must total 100)",
        "invalid: 1 error",
    ]
    assert out.startswith("2 documents: 1 RouteRule, 1 ServiceEntry")


@pytest.mark.parametrize(
    ("port", "said"),
    [
        # Istio 0.8 to 1.3's PortSelector name
        (
            "{name: http}",
            "spec.http[0].route[0].destination.port.name is not implemented by l4proxy; remove "
            "it (the sidecar would not honour it); Istio removed it in 1.4: select the port by "
            "number (port: {number: N}); spec.http[0].route[0].destination.port.number is "
            "required",
        ),
        # a typo for number
        (
            "{numbr: 8080}",
            "unknown field spec.http[0].route[0].destination.port.numbr (expected one of: "
            "number); spec.http[0].route[0].destination.port.number is required",
        ),
    ],
    ids=["name", "typo"],
)
def test_a_destination_port_without_a_number_is_one_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    port: str,
    said: str,
) -> None:
    """``port: {name: http}`` (or a typo for number) is one error at its
    line that names both the field and the number it lacks, where it was
    two (the field refused, then port.number is required); the same of a
    DestinationRule's portLevelSettings entry and of a mirror."""
    (tmp_path / "vs.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata:
          name: bootcamp
        spec:
          hosts: [bootcamp]
          http:
          - route:
            - destination:
                host: bootcamp
                port: {port}
        """)
    )
    (tmp_path / "dr.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata:
          name: bootcamp
        spec:
          host: bootcamp
          trafficPolicy:
            portLevelSettings:
            - port: {port}
              loadBalancer: {{simple: RANDOM}}
        """)
    )
    (tmp_path / "mirror.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata:
          name: mirrored
        spec:
          hosts: [mirrored]
          http:
          - route:
            - destination: {{host: bootcamp}}
            mirror:
              host: bootcamp
              port: {port}
        """)
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = validate(capsys, "vs.yaml", "dr.yaml", "mirror.yaml", REGISTRY)
    assert code == 1
    dr_said = said.replace(
        "spec.http[0].route[0].destination", "spec.trafficPolicy.portLevelSettings[0]"
    )
    mirror_said = said.replace("route[0].destination", "mirror")
    assert err.splitlines() == [
        f"vs.yaml:11: VirtualService bootcamp: {said}",
        f"dr.yaml:9: DestinationRule bootcamp: {dr_said}",
        f"mirror.yaml:12: VirtualService mirrored: {mirror_said}",
        "invalid: 3 errors",
    ]


def test_yaml_syntax_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("kind: RouteRule\nspec: [unclosed\n")
    code, _, err = validate(capsys, str(f))
    assert code == 1
    assert err.startswith(f"{f}:3:1: YAML syntax error: ")


def test_unreadable_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = validate(capsys, str(tmp_path / "nope.yaml"), REGISTRY)
    assert code == 2
    assert f"{tmp_path / 'nope.yaml'}: no such file or directory" in err


def test_warnings_are_printed_but_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "rr.yaml"
    f.write_text(
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {name: r}\n"
        "spec: {destination: {name: reviews}}\n"
    )
    code, out, err = validate(capsys, str(f))
    assert code == 0
    assert "warning: RouteRule r: reviews.default.svc.cluster.local has no ServiceEntry" in err
    assert out.splitlines()[-1] == "valid: 1 file (1 warning)"


# A typo that drops a binding: the Gateway is in default, the
# VirtualService names it in istio-system (a warning; the host is then
# nobody's at the gateway)
TYPO = """\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: httpbin-gateway}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin.example.com]
  gateways: [istio-system/httpbin-gateway]
  http:
  - route:
    - destination: {host: bootcamp, port: {number: 8080}}
"""


def test_strict_fails_on_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --strict a warning passes (exit 0); with it, exit 1 as an
    error does, the warning printed and the reason said last."""
    f = tmp_path / "typo.yaml"
    f.write_text(TYPO)
    code, out, _ = validate(capsys, str(f), REGISTRY)
    assert (code, out.splitlines()[-1]) == (0, "valid: 2 files (1 warning)")
    code, out, err = validate(capsys, "--strict", str(f), REGISTRY)
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith(f"{f}:14: warning: VirtualService httpbin: unknown gateway: no ")
    assert lines[-1] == (
        "invalid under --strict: 1 warning (the sidecar would load 2 files and serve them as "
        "the warnings say)"
    )
    assert not out.splitlines()[-1].startswith("valid")


def test_strict_passes_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Notes (what -v prints: a Kubernetes object skipped) never fail."""
    f = tmp_path / "svc.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: bootcamp}\nspec: {}\n")
    code, out, err = validate(capsys, "--strict", "-v", str(f), REGISTRY)
    assert code == 0, err
    assert f"{f}:1: note: Service bootcamp: skipped" in err
    assert out.splitlines()[-1] == "valid: 2 files"


def test_namespace_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = validate(capsys, "-v", "-n", "shop", REGISTRY)
    assert code == 0
    # The registry names bootcamp.default...: from namespace shop, no short name.
    assert "(also bootcamp.default, bootcamp.default.svc)" in out
    assert "route table (namespace shop, domain cluster.local)" in out


def test_example_rules_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = validate(capsys, "-v", EXAMPLES)
    assert code == 0, err
    assert "1. bootcamp-default/tester: header x-tester exact 'yes'" in out
    # its last route matches anything: no request is left over
    assert "      otherwise: nothing (a route takes every request)\n" in out
    # the example's connectionPool: the service's line, its 3 endpoints, 3 destinations
    assert out.count("pool: 1000 requests per connection, idle timeout 30 s") == 1 + 3 + 3
    # its outlierDetection: the service's line and the 3 destinations
    said = "outlier detection: 5xx x5, gateway off, eject 30 s (x n, max 300 s), interval 10 s"
    assert out.count(said) == 1 + 3


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "l4proxy validate /etc/l4proxy/rules" in out
    assert "exit status:" in out and "2  a path does not exist" in out
    assert "--strict" in out and "with --strict,\n     valid but with warnings" in out
    assert "route weights total 90 (must total 100)" in out


def test_console_entry_point(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "l4proxy", "validate", REGISTRY],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "1 document: 1 ServiceEntry"


def test_errors_come_in_the_order_of_their_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks find a document's errors in their own order (a field's
    type, then the route's matches, then its regexes): printed in the
    order of the lines, each file's, the files as given."""
    vs = tmp_path / "vs.yaml"
    vs.write_text(
        textwrap.dedent(
            """\
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: vs}
            spec:
              hosts: [bootcamp]
              http:
              - match:
                - headers:
                    X-Tester: {exact: a}
                  uri: {}
                timeout: 5
                route:
                - destination: {host: bootcamp}
              - match:
                - uri: {regex: '([a-'}
                route:
                - destination: {host: bootcamp}
            """
        )
    )
    code, _, err = validate(capsys, str(vs), REGISTRY)
    assert code == 1, err
    lines = [int(x.split(":")[1]) for x in err.splitlines() if x.startswith(str(vs))]
    assert lines == sorted(lines) and len(lines) == 4, err


def test_verbose_names_what_a_rules_directory_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only its *.yaml, *.yml and *.json files are read: -v says so of
    every other name (a sub-directory, a README), dotfiles and a
    ConfigMap's ..data left out; without -v nothing is said."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "registry.yaml").write_text(Path(REGISTRY).read_text())
    (rules / "README.md").write_text("# notes\n")
    (rules / "old.yaml.bak").write_text("kind: RouteRule\n")
    (rules / "more").mkdir()
    (rules / "more.yaml").mkdir()
    (rules / "..data").mkdir()
    (rules / ".hidden.yaml").write_text("")
    code, _, err = validate(capsys, "-v", str(rules))
    assert code == 0, err
    skipped = sorted(line for line in err.splitlines() if "skipped" in line)
    assert skipped == [
        f"{rules / 'README.md'}: note: skipped (only *.yaml, *.yml and *.json files are read)",
        f"{rules / 'more.yaml'}: note: directory skipped (sub-directories are not read)",
        f"{rules / 'more'}: note: directory skipped (sub-directories are not read)",
        f"{rules / 'old.yaml.bak'}: note: skipped (only *.yaml, *.yml and *.json files are read)",
    ]
    code, _, err = validate(capsys, str(rules))
    assert code == 0 and "skipped" not in err


def test_verbose_notes_weights_that_do_not_total_100(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A VirtualService's weights are relative (Istio since 1.15: 30 and 30
    are half each), so a total other than 100 is no error; -v notes it with
    the shares, where a typo (30 and 3) shows; 100 gets no note."""
    registry = Path(REGISTRY).read_text()
    dr = textwrap.dedent(
        """\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: bootcamp}
        spec:
          host: bootcamp
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        """
    )
    for w1, w2, shares in ((30, 3, "90.91 %, 9.091 %"), (60, 40, None)):
        vs = tmp_path / f"vs-{w1}.yaml"
        vs.write_text(
            textwrap.dedent(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {{name: bootcamp}}
                spec:
                  hosts: [bootcamp]
                  http:
                  - route:
                    - destination: {{host: bootcamp, subset: v1}}
                      weight: {w1}
                    - destination: {{host: bootcamp, subset: v2}}
                      weight: {w2}
                """
            )
            + dr
        )
        reg = tmp_path / "registry.yaml"
        reg.write_text(registry)
        code, _, err = validate(capsys, "-v", str(vs), str(reg))
        assert code == 0, err
        notes = [line for line in err.splitlines() if "route weights total" in line]
        if shares is None:
            assert notes == []
        else:
            assert notes == [
                f"{vs}:7: note: VirtualService bootcamp: route weights total 33, not 100: the "
                f"destinations get {shares} of the requests (weight / total, as Istio since 1.15)"
            ]


@pytest.mark.parametrize("command", ["validate", "create", "replace", "delete", "canary"])
def test_a_namespace_that_is_no_namespace_name_exits_2(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """-n Bad_NS (upper case, an underscore) exits 2 naming the option, as
    run's --namespace does, where validate, create/replace/delete and canary
    took it (and resolved short names in a namespace no cluster can have)."""
    with pytest.raises(SystemExit) as exited:
        main([command, "-n", "Bad_NS", "x.yaml"])
    assert exited.value.code == 2
    _, err = capsys.readouterr()
    assert (
        f"l4proxy {command}: error: argument -n/--namespace: 'Bad_NS' is not a namespace name"
        in err
    )
