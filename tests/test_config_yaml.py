"""The bounded YAML reader: hostile input is refused fast and in bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.rules import DEFAULT_MAX_NODES, ConfigError, load_rules
from l4proxy.rules._yaml import MAX_DEPTH, SourceProblem, parse_documents, read_file


def _billion_laughs(levels: int = 9) -> str:
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels + 1):
        refs = ", ".join([f"*l{i - 1}"] * 9)
        text += f"l{i}: &l{i} [{refs}]\n"
    return text


def _refused(path: Path, **kw: int) -> tuple[ConfigError, int]:
    """The load's error, and the most memory it held (what it built: a bomb
    expanded, or a file read, would show here, where a clock would only
    show a busy machine)."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load_rules([str(path)], **kw)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return info.value, peak


def test_50_megabyte_file_is_refused_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:  # sparse: 50 MB on paper, nothing on disk
        f.truncate(50 * 1024 * 1024)
    err, peak = _refused(big)
    (d,) = err.errors
    assert "file is 52428800 bytes, over the 16 MiB limit" in d.message
    assert peak < 1024 * 1024


def test_size_limit_is_a_parameter(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("# " + "x" * 100 + "\n")
    with pytest.raises(ConfigError, match="is 103 bytes, over the 50-byte limit"):
        load_rules([str(f)], max_bytes=50)
    load_rules([str(f)], max_bytes=200)


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    bomb = tmp_path / "lol.yaml"
    bomb.write_text(_billion_laughs())
    err, peak = _refused(bomb)
    (d,) = err.errors
    assert f"expands to more than {DEFAULT_MAX_NODES} YAML nodes" in d.message
    assert d.line == 1
    assert peak < 2 * 1024 * 1024


def test_a_document_over_the_budget_is_refused_while_it_is_composed(tmp_path: Path) -> None:
    """The budget was checked once a document was composed whole, as PyYAML
    nodes with two Mark objects each: a 1 MB ``[0,0,0,...]`` (500,000 items,
    a ConfigMap's worth) under a budget of 1,000,000 took a worker to 310 MiB
    peak (258 MiB traced), to be refused anyway. Here 200,000 items against
    a budget of 20,000: refused at the item that passes it, in memory for
    about that many."""
    big = tmp_path / "zeros.yaml"
    big.write_text("[" + "0," * 199_999 + "0]\n")
    err, peak = _refused(big, max_nodes=20_000)
    (d,) = err.errors
    assert d.message.startswith("document 1 has more than 20000 YAML nodes (")
    assert (d.line, d.column) == (1, 2 * 20_000)  # the 20,000th item: the list is the first
    assert peak < 6 * 1024 * 1024, peak  # was 55 MiB: 200,000 nodes composed (now 2.8)


def test_a_configmap_sized_list_is_refused_under_the_default_budget(tmp_path: Path) -> None:
    big = tmp_path / "zeros.yaml"
    big.write_text("[" + "0," * 500_000 + "0]\n")  # 1 MB: what a ConfigMap holds
    with pytest.raises(ConfigError, match=f"has more than {DEFAULT_MAX_NODES} YAML nodes"):
        load_rules([str(big)])


def _virtual_services_and_destination_rules(n: int) -> str:
    docs = []
    for i in range(n):
        host = f"svc{i}.default.svc.cluster.local"
        route = (
            f"    - destination:\n        host: {host}\n        subset: v1\n      weight: 90\n"
            f"    - destination:\n        host: {host}\n        subset: v2\n      weight: 10\n"
        )
        docs.append(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
            f"metadata:\n  name: svc{i}\n  namespace: default\nspec:\n  hosts:\n  - {host}\n"
            "  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n"
            f"    route:\n    - destination:\n        host: {host}\n        subset: v2\n"
            f"  - route:\n{route}"
        )
        docs.append(
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n"
            f"metadata:\n  name: svc{i}\n  namespace: default\nspec:\n  host: {host}\n"
            "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n"
            "  subsets:\n  - name: v1\n    labels:\n      version: v1\n"
            "  - name: v2\n    labels:\n      version: v2\n"
        )
    return "---\n".join(docs)


def test_the_default_budget_holds_twice_a_large_real_rule_set(tmp_path: Path) -> None:
    """The default budget is sized to a large rule set: 2,000 VirtualServices
    and 2,000 DestinationRules (1.7 MB, 190,000 nodes) load with half of it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_virtual_services_and_destination_rules(2000))
    result = load_rules([str(rules)], max_nodes=DEFAULT_MAX_NODES // 2)
    assert len(result.documents) == 4000


def test_moderate_aliases_are_fine_and_expanded() -> None:
    (doc,) = parse_documents("a: &x {k: v}\nb: *x\nc: [*x, *x]\n", "f.yaml")
    assert doc.value == {"a": {"k": "v"}, "b": {"k": "v"}, "c": [{"k": "v"}, {"k": "v"}]}


def test_alias_budget_counts_expansion_not_text() -> None:
    # 4 levels of 9 = 7380 nodes expanded: under 10,000, over 5,000.
    text = _billion_laughs(levels=3)
    assert len(list(parse_documents(text, "f.yaml", max_nodes=10_000))) == 1
    with pytest.raises(SourceProblem, match="expands to more than 5000"):
        list(parse_documents(text, "f.yaml", max_nodes=5_000))


def test_alias_budget_is_one_for_the_whole_load(tmp_path: Path) -> None:
    """Small bombs, each under the budget, in several documents and files:
    the budget was per document, so a 16 MiB file of 48,000 such documents
    was a day of CPU (startup hung, the reload thread stuck for good)."""
    text = _billion_laughs(levels=3)  # 8307 nodes, keys counted
    one = tmp_path / "one.yaml"
    one.write_text(text)
    two = tmp_path / "two.yaml"
    two.write_text(text + "---\n" + text)

    def budget_errors(paths: list[Path], max_nodes: int) -> list[str]:
        with pytest.raises(ConfigError) as info:  # (not rule objects: refused anyway)
            load_rules([str(p) for p in paths], max_nodes=max_nodes)
        return [f"{d.file}: {d.message}" for d in info.value.errors if "expands" in d.message]

    assert budget_errors([one], 10_000) == []  # one alone is within it
    (err,) = budget_errors([one, two], 20_000)  # three of them are not
    # 8307 nodes each: the second of two.yaml finds 20000 - 2 * 8307 left
    assert err.startswith(f"{two}: document 2 expands to more than 3386 YAML nodes, ")
    assert "what is left of the 20000 that a load may build (an alias bomb?" in err


@pytest.mark.parametrize(
    ("opener", "line", "column"),
    [
        ("[", 1, MAX_DEPTH + 1),
        ("{a: ", 1, 4 * MAX_DEPTH + 1),
        ("- ", MAX_DEPTH + 1, 2 * MAX_DEPTH + 1),
    ],
)
def test_deep_nesting_is_refused_at_the_limit(opener: str, line: int, column: int) -> None:
    """libyaml's own composer would recurse in C and crash the process here:
    the load stops at the first collection past MAX_DEPTH (its position in
    the error), not after the other 200,000."""
    if opener == "- ":
        text = "".join(" " * (2 * i) + "- \n" for i in range(5000))
    else:
        text = opener * 200_000
    with pytest.raises(SourceProblem, match="nesting is too deep") as info:
        list(parse_documents(text, "f.yaml"))
    assert (info.value.line, info.value.column) == (line, column)


def test_undefined_and_recursive_aliases() -> None:
    with pytest.raises(SourceProblem, match="alias \\*nope") as info:
        list(parse_documents("a: *nope\n", "f.yaml"))
    assert info.value.line == 1 and info.value.column == 4
    with pytest.raises(SourceProblem, match="alias \\*a"):
        list(parse_documents("a: &a [1, *a]\n", "f.yaml"))


def test_positions_point_at_keys_and_items() -> None:
    text = "kind: X\nspec:\n  route:\n  - labels: {v: 1}\n    weight: 50\n"
    (doc,) = parse_documents(text, "f.yaml")
    assert doc.line_of(("spec",)) == 2
    assert doc.line_of(("spec", "route", 0)) == 4
    assert doc.line_of(("spec", "route", 0, "weight")) == 5
    # A path the document lacks falls back to its nearest ancestor.
    assert doc.line_of(("spec", "route", 0, "missing", 3)) == 4


def test_documents_and_their_lines() -> None:
    text = "---\na: 1\n---\n---\n# comment only\n---\nb: 2\n...\n"
    docs = list(parse_documents(text, "f.yaml"))
    assert [(d.value, d.line) for d in docs] == [({"a": 1}, 2), ({"b": 2}, 7)]


def test_json_is_read_with_lines() -> None:
    (doc,) = parse_documents('{\n  "kind": "List",\n  "items": [\n    {"a": 1}\n  ]\n}\n', "f.json")
    assert doc.value == {"kind": "List", "items": [{"a": 1}]}
    assert doc.line_of(("items", 0)) == 4


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(SourceProblem, match="not UTF-8") as info:
        read_file(str(f))
    assert info.value.line == 2


def test_tags_we_cannot_construct_are_errors() -> None:
    with pytest.raises(SourceProblem, match=r"python/object:os\.system"):
        list(parse_documents("a: !!python/object:os.system ls\n", "f.yaml"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!,'\"\n #|>?%@`\t0\\")), max_size=80))
def test_arbitrary_text_parses_or_raises_our_error(text: str) -> None:
    """Fuzz invariant: a value, or SourceProblem; never another exception."""
    try:
        for doc in parse_documents(text, "f.yaml"):
            assert doc.line >= 1
    except SourceProblem as exc:
        assert exc.message
