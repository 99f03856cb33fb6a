"""A safe, bounded YAML reader that remembers where every value came from.

Theory of operation
-------------------
A rule file is untrusted input that a sidecar re-reads on every change, so
reading it must be cheap to refuse when hostile:

1. **Size first.** The file's size is checked with ``fstat`` before a byte is
   read, and at most ``max_bytes + 1`` bytes are read (a file that grows while
   we read is still bounded). A 50 MB file costs one syscall.
2. **Compose, don't construct.** We compose the parser's event stream (the C
   parser when available) into a node graph ourselves, with a nesting limit.
   An alias is a second reference to the *same* node, so a billion-laughs
   document composes to a few dozen nodes. Each node keeps its tag, value and
   (line, column), not the parser's two Mark objects, and composing stops as
   soon as a document has more nodes than the load may still build: a 1 MB
   ``[0,0,0,...]`` (500,000 nodes) composed in full took 134 MiB before the
   budget was checked.
3. **Measure the expansion.** Before building Python values we compute, with
   memoisation over that graph, how many nodes the document would expand to.
   This is linear in the composed size; a document over ``max_nodes`` (or a
   recursive alias) is refused before anything is expanded. The budget is
   one for a whole load (a :class:`NodeBudget` across documents and files):
   per document, a 16 MiB file of small bombs just under it each was a day
   of CPU, with the reload thread stuck in it.
4. **Build plain values** (dict, list, str, int, ...) with our own walker, which
   also records the 1-based line of every value by its path, e.g.
   ``("spec", "route", 0, "weight")``, so that later checks can point at the
   line of the field they complain about. Duplicate mapping keys (which PyYAML
   silently collapses) and merge keys are refused here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

try:
    _Loader: type[Any] = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# Nodes a load may build: twice a large real rule set (2,000 VirtualServices
# and 2,000 DestinationRules compose to 190,000 nodes, 1.7 MB; 2,000
# ServiceEntries and RouteRules to 154,000). A document over it is refused
# as it is composed, in about 110 bytes a node: 40 MiB at most. (It was
# 1,000,000: a refused 1 MB list of 500,000 zeros took a worker to 310 MiB.)
DEFAULT_MAX_NODES = 400_000
MAX_DEPTH = 64

Path = tuple[str | int, ...]
MERGE_TAG = "tag:yaml.org,2002:merge"
NULL_TAG = "tag:yaml.org,2002:null"


class Unreadable(Exception):
    """The file cannot be read at all (missing, permission, a directory...)."""


@dataclass(frozen=True)
class SourceProblem(Exception):
    """The file was read but is not acceptable YAML (or is too large)."""

    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class Document:
    """One YAML document: its plain value and where each part of it is."""

    file: str
    index: int
    line: int
    value: Any
    # the line of each value, by its path (no column: no check points at one,
    # and a (line, column) tuple per value was 47 MiB of a 500,000-item list)
    positions: dict[Path, int] = field(default_factory=dict, repr=False)

    def line_of(self, path: Path) -> int:
        """Line of *path*, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            line = self.positions.get(path[:end])
            if line is not None:
                return line
        return self.line


def read_file(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES, regular_only: bool = False) -> str:
    """The text of *path*, refusing oversized or non-UTF-8 files cheaply.

    *regular_only*: refuse anything but a regular file (after symlinks)
    without waiting on it: what a rules directory holds is read by the
    sidecar's reload thread, and opening a named pipe there waited for a
    writer forever (so would reading a device). A path named on its own is
    read as it is (``l4proxy validate <(kubectl get ...)`` reads a pipe).
    """
    try:
        with _open_regular(path) if regular_only else open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise SourceProblem(_too_big(size, max_bytes))
            # read(n) allocates n bytes up front: ask for what fstat promised,
            # then go on in small chunks only if the file grew meanwhile.
            data = f.read(size + 1)
            while len(data) <= max_bytes:
                more = f.read(65536)
                if not more:
                    break
                data += more
    except IsADirectoryError as exc:
        raise Unreadable("is a directory") from exc
    except OSError as exc:
        why = exc.strerror or str(exc)
        if isinstance(exc, FileNotFoundError):
            # (a dangling link: say where it points, not that the name is missing)
            with contextlib.suppress(OSError):
                why = f"a symbolic link to {os.readlink(path)}, which does not exist"
        raise Unreadable(why) from exc
    if len(data) > max_bytes:
        raise SourceProblem(_too_big(len(data), max_bytes))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceProblem(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8", line
        ) from exc


_NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _open_regular(path: str) -> BinaryIO:
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of
    # waiting for a writer; fstat then says what was opened. (It changes
    # nothing for a regular file.)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(mode):
            kind = _NOT_REGULAR.get(stat.S_IFMT(mode))
            raise Unreadable(
                (f"is {kind}, not a regular file" if kind else "not a regular file")
                + " (rules are read from regular files and symlinks to them)"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_big(size: int, limit: int) -> str:
    mib, rest = divmod(limit, 1024 * 1024)
    said = f"{mib} MiB" if mib and not rest else f"{limit}-byte"  # (not "0 MiB": --max-bytes 50)
    return (
        f"file is {size} bytes, over the {said} limit for rule files "
        "(split it into several files; a Kubernetes ConfigMap holds 1 MiB at most)"
    )


class NodeBudget:
    """Expanded YAML nodes a load may still build (shared by its files)."""

    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES) -> None:
        self.max_nodes = max_nodes
        self.left = max_nodes


def parse_documents(
    text: str,
    file: str,
    *,
    max_nodes: int = DEFAULT_MAX_NODES,
    budget: NodeBudget | None = None,
) -> Iterator[Document]:
    """Yield each non-empty document of *text*; raise :class:`SourceProblem`.
    *budget*: the load's, when this file is one of several (else one of
    *max_nodes* for this file)."""
    budget = budget if budget is not None else NodeBudget(max_nodes)
    builder = _Builder(budget)
    try:
        for index, root in enumerate(_compose(text, budget), start=1):
            yield builder.build(root, file, index)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if mark is not None and _char_at(text, mark.line, mark.column) == "\t":
            problem = "a tab: YAML indents with spaces, never tabs"
        elif exc.context:
            where = exc.context_mark
            if where is not None and mark is not None and where.line != mark.line:
                # (an unclosed [ or {, a quote: where it was opened, not where it is missed)
                problem = (
                    f"{problem} ({exc.context} begun at line {where.line + 1}, "
                    f"column {where.column + 1})"
                )
            else:
                problem = f"{problem} ({exc.context})"
        raise SourceProblem(
            f"YAML syntax error: {problem}",
            None if mark is None else mark.line + 1,
            None if mark is None else mark.column + 1,
        ) from exc
    except yaml.YAMLError as exc:
        raise SourceProblem(f"YAML error: {exc}") from exc


def _char_at(text: str, line: int, column: int) -> str:
    """The character of *text* at 0-based *line* and *column* ("" past it)."""
    lines = text.splitlines()
    if line >= len(lines) or column >= len(lines[line]):
        return ""
    return lines[line][column]


class _Node:
    """A composed YAML node: PyYAML's, less its two Mark objects (1-based
    line and column instead) and its style, in slots. 500,000 of PyYAML's
    took 130 MiB (56 bytes each, and 80 for each mark)."""

    __slots__ = ("column", "line", "tag", "value")

    def __init__(self, tag: str, value: Any, line: int, column: int) -> None:
        self.tag = tag
        self.value = value
        self.line = line
        self.column = column


class _Scalar(_Node):
    __slots__ = ()
    value: str


class _Sequence(_Node):
    __slots__ = ()
    value: list[_Node]


class _Mapping(_Node):
    __slots__ = ()
    value: list[tuple[_Node, _Node]]


def _too_many(index: int, left: int, budget: NodeBudget, what: str) -> str:
    whole = budget.max_nodes
    share = f", what is left of the {whole} that a load may build" if left < whole else ""
    return f"document {index} {what} more than {left} YAML nodes{share}"


def _compose(text: str, budget: NodeBudget) -> Iterator[_Node]:
    """PyYAML's composer, rewritten over the event stream with a depth limit.

    libyaml's own composer recurses in C and crashes the process on a
    ``[[[[...`` document a few hundred thousand levels deep, and its scanner
    is quadratic in flow depth; pulling events lazily and stopping at
    ``MAX_DEPTH`` keeps both cheap. Anchors are registered when their node is
    complete, so an alias cannot refer to its own ancestor (no cycles).

    Each node composed counts against what is left of *budget* (a document
    expands to at least as many nodes as it composes to), so a document
    too big to build is refused at the node that passes the budget, not
    after it is composed whole. Documents are composed one at a time, as
    the caller builds them: what is left is read at each document's start.
    """
    resolve: Any = Resolver().resolve
    anchors: dict[str, _Node] = {}
    # Each open collection, with (for a mapping) the key waiting for its value
    # and the anchor to register once the collection is complete.
    stack: list[tuple[_Sequence | _Mapping, list[_Node | None], str | None]] = []
    root: _Node | None = None
    index = 1  # of the next non-empty document, as parse_documents counts them
    left = budget.left
    composed = 0

    def attach(node: _Node) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        parent, pending, _ = stack[-1]
        if isinstance(parent, _Sequence):
            parent.value.append(node)
        elif pending[0] is None:
            pending[0] = node
        else:
            parent.value.append((pending[0], node))
            pending[0] = None

    ev: Any
    for ev in yaml.parse(text, Loader=_Loader):
        # Marks typed as Any: the C and the pure parser have different Mark classes.
        start: Any = ev.start_mark
        if isinstance(ev, yaml.DocumentStartEvent):
            anchors.clear()
            root = None
            left = budget.left
            composed = 0
            continue
        if isinstance(ev, yaml.DocumentEndEvent):
            if root is not None and not _is_empty(root):
                yield root
                index += 1
            root = None
            continue
        if isinstance(ev, yaml.ScalarEvent | yaml.SequenceStartEvent | yaml.MappingStartEvent):
            composed += 1
            if composed > left:
                raise SourceProblem(
                    _too_many(index, left, budget, "has")
                    + " (split the rules into fewer, smaller objects, or check it is the "
                    "right file)",
                    start.line + 1,
                    start.column + 1,
                )
        if isinstance(ev, yaml.AliasEvent):
            target = anchors.get(ev.anchor or "")
            if target is None:
                raise SourceProblem(
                    f"alias *{ev.anchor} refers to no complete anchor &{ev.anchor} before it",
                    start.line + 1,
                    start.column + 1,
                )
            attach(target)
        elif isinstance(ev, yaml.ScalarEvent):
            tag = ev.tag
            if tag is None or tag == "!":
                tag = resolve(ScalarNode, ev.value, ev.implicit)
            node: _Node = _Scalar(tag, ev.value, start.line + 1, start.column + 1)
            if ev.anchor:
                anchors[ev.anchor] = node
            attach(node)
        elif isinstance(ev, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise SourceProblem(
                    f"YAML nesting is too deep (more than {MAX_DEPTH} levels)",
                    start.line + 1,
                    start.column + 1,
                )
            coll: _Sequence | _Mapping
            if isinstance(ev, yaml.SequenceStartEvent):
                tag = ev.tag or resolve(SequenceNode, None, ev.implicit)
                coll = _Sequence(tag, [], start.line + 1, start.column + 1)
            else:
                tag = ev.tag or resolve(MappingNode, None, ev.implicit)
                coll = _Mapping(tag, [], start.line + 1, start.column + 1)
            attach(coll)
            stack.append((coll, [None], ev.anchor))
        elif isinstance(ev, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            done, _, anchor = stack.pop()
            if anchor:
                anchors[anchor] = done


def _is_empty(node: _Node) -> bool:
    return isinstance(node, _Scalar) and node.tag == NULL_TAG and node.value in ("", "~", "null")


STR_TAG = "tag:yaml.org,2002:str"


class _Builder:
    def __init__(self, budget: NodeBudget) -> None:
        self.budget = budget
        self.max_nodes = 0  # what is left of the budget, set by build()
        self.scalars = SafeConstructor()

    def build(self, root: _Node, file: str, index: int) -> Document:
        left = self.max_nodes = self.budget.left  # _expanded_size stops counting past it
        size = self._expanded_size(root, {}, set(), 0)
        if size > left:
            raise SourceProblem(
                _too_many(index, left, self.budget, "expands to")
                + " (an alias bomb? each alias repeats everything its anchor holds)",
                root.line,
            )
        self.budget.left -= size
        doc = Document(file, index, root.line, None)
        doc.positions[()] = root.line
        doc.value = self._value(root, (), doc)
        return doc

    def _expanded_size(
        self, node: _Node, memo: dict[int, int], active: set[int], depth: int
    ) -> int:
        key = id(node)
        done = memo.get(key)
        if done is not None:
            return done
        if key in active:
            raise SourceProblem("recursive YAML alias (a value contains itself)", node.line)
        if depth > MAX_DEPTH:
            raise SourceProblem(
                f"YAML nesting is too deep (more than {MAX_DEPTH} levels)", node.line
            )
        total = 1
        if isinstance(node, _Sequence | _Mapping):
            active.add(key)
            children: list[_Node] = (
                node.value
                if isinstance(node, _Sequence)
                else [n for pair in node.value for n in pair]
            )
            for child in children:
                total += self._expanded_size(child, memo, active, depth + 1)
                if total > self.max_nodes:
                    break  # enough to refuse; do not walk the rest
            active.discard(key)
        memo[key] = total
        return total

    def _scalar(self, node: _Scalar) -> Any:
        if node.tag == STR_TAG:
            return node.value  # what SafeConstructor makes of it, without a node
        # construct_document, not construct_object: that one keeps every node
        # it was given, and what it made of it, until the constructor goes.
        return self.scalars.construct_document(ScalarNode(node.tag, node.value, None, None))

    def _value(self, node: _Node, path: Path, doc: Document) -> Any:
        if isinstance(node, _Scalar):
            try:
                return self._scalar(node)
            except yaml.constructor.ConstructorError as exc:
                raise SourceProblem(
                    f"cannot read value: {exc.problem}", node.line, node.column
                ) from exc
            except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
                # an explicit tag the value does not fit (!!int abc, !!bool
                # maybe), or an integer past Python's 4300 digits
                raise SourceProblem(
                    f"cannot read value {node.value[:40]!r} as {node.tag.rsplit(':', 1)[-1]}: "
                    f"{exc}"[:300],
                    node.line,
                    node.column,
                ) from exc
        if isinstance(node, _Sequence):
            items = []
            for i, child in enumerate(node.value):
                sub = (*path, i)
                doc.positions[sub] = child.line
                items.append(self._value(child, sub, doc))
            return items
        if isinstance(node, _Mapping):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG:
                    raise SourceProblem(
                        "YAML merge keys (<<) are not supported; write the fields out",
                        key_node.line,
                        key_node.column,
                    )
                if not isinstance(key_node, _Scalar):
                    raise SourceProblem(
                        "mapping keys must be plain scalars", key_node.line, key_node.column
                    )
                key = self._value(key_node, path, doc)
                try:
                    hash(key)
                except TypeError:
                    key = str(key)
                if key in out:
                    raise SourceProblem(
                        f"duplicate key {key!r} in one mapping (YAML keeps only one; "
                        "remove the other)",
                        key_node.line,
                        key_node.column,
                    )
                sub = (*path, key if isinstance(key, str | int) else str(key))
                doc.positions[sub] = key_node.line
                out[key] = self._value(value_node, sub, doc)
            return out
        raise SourceProblem(f"unexpected YAML node {type(node).__name__}", node.line)
