"""``l4proxy create|replace|delete -f FILE --rules DIR``: istioctl's verbs on a rules directory.

Theory of operation
-------------------
The tutorial shifts traffic with ``istioctl create|replace|delete -f FILE``.
Here the "cluster" is the directory the sidecars watch, and an object is a
document in one of its files, known by kind, namespace and name:

* **create** installs FILE as ``DIR/<basename>``; refused if any object of
  FILE is already in DIR, or that file name is taken.
* **replace** needs every object of FILE in DIR, all in one file that holds
  nothing else; FILE's text replaces that file (same name).
* **delete** needs every object of FILE in DIR; the files holding them must
  hold nothing else, and are removed.

Before touching anything, the directory as it would be afterwards (the
existing files minus those replaced or removed, plus FILE) is loaded as
the sidecar would load it, and the change judged by what the sidecar
would serve (:func:`judge`). The sidecar holds back a file that does not
load, at its last good version or left out where it has none, and serves
the others (:mod:`~l4proxy.rules.watch`): so a file of DIR that is
invalid already (someone else's typo) does not refuse a change of
another; it is left out of the check and said as a warning, file and
line. Apply cannot read the last good versions (they are in the sidecar's
memory; ``/config_dump``'s ``held`` says which files are held back and
whether at a last good version, not their text, which would change no
verdict here, so it is not asked): leaving a file out is the one version
of it apply can judge by. Refused, with the usual file:line errors and why, and the directory left
as it was: a change whose own file is invalid (the sidecar would hold
FILE back); one that makes another file invalid (a route left naming a
subset deleted: held back at the same text, refused again, the sidecar
would keep its whole last good table); one that, with the invalid files
left out, adds errors to what the files already lack of them (a route
naming a subset no file left defines: whether the last good version of
the broken file defines it, apply cannot tell); and, while a file is held
back, one that sends requests to a host no ServiceEntry describes where
the files before it did not (the sidecar keeps its whole last good table
then: the held file may be what describes that host).

Writes are atomic (a temporary file in DIR, fsync, rename over the
target; hidden names are never read by the sidecar), and an flock on
``DIR/.l4proxy.lock`` serializes concurrent invocations. With
``--admin``, the command then polls the sidecar's
``/stats`` until every worker serves the files as they are now (the
``l4proxy_rules_digest`` they agree on has moved; from an older sidecar,
``l4proxy_rules_generation`` has moved past the value read before the
change), or fails after ``--timeout`` naming what the sidecar said
(``/config_dump``'s ``last_error``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from l4proxy._http import urlopen as direct_urlopen
from l4proxy.cli import positive_seconds
from l4proxy.k8s_names import namespace_arg
from l4proxy.rules import (
    RULE_SUFFIXES,
    ConfigError,
    ConfigUnreadable,
    Diagnostic,
    LoadResult,
    load_rules,
    rule_files,
)
from l4proxy.rules._loader import RuleFiles, read_rules
from l4proxy.rules._schema import Report
from l4proxy.rules._yaml import SourceProblem, Unreadable, parse_documents, read_file
from l4proxy.rules.watch import broken_files, new_unresolved, unresolved_of
from l4proxy.stats import DIGEST_DISAGREE, GENERATION, RulesMark

EXIT_OK = 0
EXIT_REFUSED = 1  # invalid, exists (create), missing (replace, delete): DIR unchanged
EXIT_USAGE = 2  # bad arguments, FILE or DIR unreadable
EXIT_NOT_LIVE = 3  # installed, but the sidecar did not report it within --timeout

VERBS = ("create", "replace", "delete")
LOCK_NAME = ".l4proxy.lock"

EPILOG = """\
examples (the tutorial's istioctl commands, one to one):
  l4proxy create  -f httproute-all-v1.yaml --rules /etc/l4proxy
  l4proxy replace -f httproute-50-v2.yaml  --rules /etc/l4proxy --admin 127.0.0.1:15000
  l4proxy delete  -f httproute-all-v2.yaml --rules /etc/l4proxy

a file of DIR that is invalid already (someone else's typo) does not refuse
a change of another: the sidecar holds it back (at its last good version,
or left out) and serves the others, so it is left out of the check and said
as a warning (FILE:LINE: warning: ...). A change is still refused where its
own file is invalid, where it makes another file invalid, where it needs
more of an invalid file than the files needed before (a subset, a host:
apply cannot read the version of that file the sidecar serves; fix it
first), and, while a file is held back, where it sends requests to a host
that no ServiceEntry describes (the sidecar keeps its whole last good
table then).

exit status:
  0  done (and, with --admin, live in the sidecar)
  1  refused: the change would not be served as it is (errors printed as
     FILE:LINE: ..., and why), an object already exists (create) or does
     not (replace, delete), or a file of DIR holds other objects too; DIR
     is unchanged
  2  usage: FILE or DIR cannot be read
  3  DIR was changed, but the sidecar at --admin did not report the new
     generation within --timeout (its last error is printed)
"""

ObjectKey = tuple[str, str, str]  # kind, namespace, name


class Refusal(Exception):
    """The verb must not be done: *message* says why, after *shown* (the
    findings it is for, printed first, a line each)."""

    def __init__(
        self, message: str, code: int = EXIT_REFUSED, shown: Sequence[Diagnostic] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.shown = list(shown)


def _admin_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (an admin endpoint), got {value!r}")
    if any(c.isspace() or c in "/?#@" for c in host):
        raise argparse.ArgumentTypeError(f"{host!r} is not a host name or address")
    return value


# what each verb does to DIR, as its --help says it (istioctl's verbs)
_DOES = {
    "create": "Install FILE's objects into DIR as DIR/<FILE's name>, as istioctl create "
    "adds them to a cluster: refused if any of them is already in DIR or that name is "
    "taken.",
    "replace": "Replace the file of DIR that holds FILE's objects (and nothing else) with "
    "FILE's text, as istioctl replace does in a cluster.",
    "delete": "Remove from DIR the files that hold FILE's objects (and nothing else), as "
    "istioctl delete does in a cluster.",
}
_DESCRIPTIONS = {
    verb: textwrap.fill(
        does + " The directory as it would be is loaded first, as the sidecar loads it, "
        "with its files that are invalid already left out (each said as a warning): a "
        "change that the sidecar would not serve is refused, and DIR left as it was.",
        79,
    )
    for verb, does in _DOES.items()
}


def add_parser(sub: Any) -> None:
    for verb in VERBS:
        if verb in sub.choices:
            continue  # one module, three subcommands: added once each
        p = sub.add_parser(
            verb,
            help=f"{verb} the objects of a rule file in a watched rules directory",
            description=_DESCRIPTIONS[verb],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("-f", "--filename", required=True, metavar="FILE", help="the rule file")
        p.add_argument(
            "--rules", required=True, metavar="DIR", help="the directory the sidecars watch"
        )
        p.add_argument(
            "--admin",
            type=_admin_address,
            metavar="HOST:PORT",
            help="wait until this sidecar admin endpoint serves the new rules",
        )
        p.add_argument(
            "--timeout",
            type=positive_seconds,
            default=20.0,
            metavar="SECONDS",
            help="how long to wait for --admin (default: %(default)s: a reload can take"
            " the watcher's poll and settle, seconds to compile, and up to 10 s for the"
            " first lookups of DNS names it adds)",
        )
        p.add_argument(
            "-n",
            "--namespace",
            default="default",
            type=namespace_arg,
            help="as for l4proxy validate",
        )
        p.add_argument("--domain", default="cluster.local", help="as for l4proxy validate")
        p.set_defaults(func=run, verb=verb)


def objects_in(path: str) -> list[ObjectKey]:
    """The (kind, namespace, name) of every object document of *path*."""
    try:
        text = read_file(path)
    except (Unreadable, SourceProblem) as exc:
        raise Refusal(f"{path}: cannot read: {exc}", EXIT_USAGE) from exc
    try:
        return _objects_of(text, path)
    except SourceProblem as exc:
        raise Refusal(f"{path}:{exc.line or ''}: {exc.message}") from exc


def _objects_of(text: str, path: str) -> list[ObjectKey]:
    """The (kind, namespace, name) of every object document of *text*
    (*path*'s); SourceProblem where it does not parse."""
    out: list[ObjectKey] = []
    docs = list(parse_documents(text, path))
    for doc in docs:
        stack: list[Any] = [doc.value]
        while stack:
            v = stack.pop()
            if not isinstance(v, dict):
                continue
            if v.get("kind") == "List" and isinstance(v.get("items"), list):
                stack.extend(reversed(v["items"]))
                continue
            raw_meta = v.get("metadata")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            out.append((str(v.get("kind")), str(meta.get("namespace", "")), str(meta.get("name"))))
    return out


def _normalize(keys: Sequence[ObjectKey], namespace: str) -> list[ObjectKey]:
    return [(k, ns or namespace, n) for k, ns, n in keys]


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class Plan:
    """What the verb does: files removed, and the file written (name, source)."""

    remove: list[str]
    write: str | None  # target path in DIR


def plan(verb: str, source: str, directory: str, namespace: str) -> Plan:
    """Decide what *verb* does; raise :class:`Refusal` when it must not."""
    wanted = _normalize(objects_in(source), namespace)
    if not wanted:
        raise Refusal(f"{source}: no objects in it (nothing to {verb})")
    files, unreadable = rule_files([directory], Report())
    if unreadable:
        raise Refusal(f"{directory}: {unreadable[0].message}", EXIT_USAGE)
    where: dict[ObjectKey, str] = {}
    held: dict[str, list[ObjectKey]] = {}
    # DIR's files that cannot be read as YAML (a syntax error, not UTF-8):
    # which objects they hold is not known. The sidecar holds such a file
    # back, and so does the check of the change (see judge): not a refusal
    unparsed: list[str] = []
    for f in files:
        try:
            text = read_file(f)
        except Unreadable as exc:
            raise Refusal(f"{f}: cannot read: {exc}", EXIT_USAGE) from exc
        try:
            keys = _normalize(_objects_of(text, f), namespace)
        except SourceProblem as exc:
            unparsed.append(f"{f} cannot be parsed ({_at(exc)}{exc.message})")
            keys = []
        held[f] = keys
        for k in keys:
            where.setdefault(k, f)
    present = [k for k in wanted if k in where]
    missing = [k for k in wanted if k not in where]
    if verb == "create":
        if present:
            k = present[0]
            raise Refusal(
                f"{k[0]} {k[1]}/{k[2]} already exists in {where[k]}; "
                f"use 'l4proxy replace -f {source}' to change it"
            )
        name = os.path.basename(source)
        if name.startswith(".") or not name.endswith(RULE_SUFFIXES):
            # the sidecar reads visible *.yaml, *.yml and *.json only (case
            # matters): installed as route-v1.YAML, it was never read
            raise Refusal(
                f"{source}: the sidecars would not read {name!r} in {directory} (they read "
                f"names ending in {', '.join(RULE_SUFFIXES)}, not starting with '.'); "
                "copy it to such a name first",
                EXIT_USAGE,
            )
        target = os.path.join(directory, name)
        if target in held or os.path.lexists(target):
            raise Refusal(f"{target} exists (holding other objects); rename {source} first")
        return Plan([], target)
    if missing:
        k = missing[0]
        hint = f"use 'l4proxy create -f {source}'" if verb == "replace" else "nothing to delete"
        if unparsed:
            hint += (
                f", unless a file whose objects cannot be read holds it: {'; '.join(unparsed)}"
                "; fix that file first"
            )
        raise Refusal(f"{k[0]} {k[1]}/{k[2]} is not in {directory}; {hint}")
    owners = sorted({where[k] for k in wanted})
    for f in owners:
        extra = [k for k in held[f] if k not in wanted]
        if extra:
            k = extra[0]
            raise Refusal(
                f"{f} also holds {k[0]} {k[1]}/{k[2]}, which {source} does not name; "
                f"{verb} works on whole files: move it to a file of its own first"
            )
    if verb == "replace":
        if len(owners) != 1:
            raise Refusal(
                f"the objects of {source} are spread over {', '.join(owners)}; "
                "replace works on one file: delete them, then create"
            )
        return Plan([], owners[0])
    return Plan(owners, None)


def _at(exc: SourceProblem) -> str:
    """Where *exc* is, as a message says it before its text ('' unknown)."""
    if exc.line is None:
        return ""
    return f"line {exc.line}" + (f", column {exc.column}" if exc.column else "") + ": "


@dataclass
class Verdict:
    """What :func:`judge` found: the change is served as it is."""

    notes: list[Diagnostic]  # the warnings and notes of the files as they would be served
    held: list[str]  # DIR's files invalid already, held back by the sidecar (left out here)
    held_errors: list[Diagnostic]  # their errors, as warnings
    # the errors of the files with those left out, each one the files had
    # before the change too (they need what the held files hold)
    unmet: int = 0


def _load(read: RuleFiles, namespace: str, domain: str) -> LoadResult | ConfigError:
    """*read* loaded; its refusal returned, not raised (a path unreadable: a
    Refusal, EXIT_USAGE: the sidecar keeps its whole table, tried again)."""
    try:
        return load_rules([], namespace=namespace, domain=domain, read=read)
    except ConfigUnreadable as exc:
        raise Refusal(str(exc), EXIT_USAGE) from exc
    except ConfigError as exc:
        return exc


def _files(paths: Sequence[str]) -> str:
    return ", ".join(paths)


def judge(
    verb: str,
    before: RuleFiles,
    after: RuleFiles,
    changed: str | None,
    replaces: str | None = None,
    *,
    namespace: str = "default",
    domain: str = "cluster.local",
) -> Verdict:
    """Whether the sidecar would serve the change from *before* (DIR as it
    is) to *after* (as it would be; *changed*: the path FILE is loaded
    under in *after*, None for a delete; *replaces*: the file of *before*
    whose text it replaces, if any) as it is. Raises Refusal where it
    would not, with the findings why.

    The sidecar loads *after*; where that fails with every error in some
    files (:func:`~l4proxy.rules.watch.broken_files`), it loads it again
    with each of those held back, at its last good version or left out,
    and keeps its whole last good table where that fails too. So: *after*
    loads: served. Its files that do not load are judged by
    :func:`_refuse_the_changes_doing`: FILE among them, or a file that
    loads in *before*, is the change's doing, and refused. The rest did
    not load before the change either: invalid already, and held back by
    the sidecar. Their last good versions are in its memory, which apply
    cannot read, so they are left out here. Where *after* does not load
    without them, and *before* does, what fails is the change's doing
    again. Where *before* does not either, the files need what they hold
    (which their last good versions hold, where the sidecar serves): the
    change is judged by what it adds to what is unmet without them, an
    error of *after* that *before* has too (by file, object and message,
    not line) counting as met. A rollback that names the subsets its
    route named before is done; one that names another is refused. Where
    *after* loads without them, a share of requests sent to a host no
    ServiceEntry describes that *before* (without them) did not send is
    refused, as the sidecar keeps its whole last good table then (a held
    file may describe that host). Else the change is served, and each
    held file's errors are said as warnings."""
    first = _load(after, namespace, domain)
    if isinstance(first, LoadResult):
        return Verdict(first.notes, [], [])
    was = _load(before, namespace, domain)
    invalid = set() if isinstance(was, LoadResult) else {d.file for d in was.errors}
    _refuse_the_changes_doing(verb, first, after, changed, invalid)
    others = broken_files(first, after)  # (each invalid before the change)
    held = _as_warnings(first, others)
    without = {f: None for f in others}
    left = after.replaced(without)
    second = _load(left, namespace, domain)
    base = _load(before.replaced(without), namespace, domain)
    if isinstance(second, ConfigError):
        if isinstance(base, LoadResult):  # (it raises: every file was valid then)
            _refuse_the_changes_doing(verb, second, left, changed, set(), held)
        # The files need what the held ones hold, before the change as after
        # it: judged by what the change adds to what is unmet without them
        unmet = set() if isinstance(base, LoadResult) else {_unmet_key(d) for d in base.errors}
        added = [d for d in second.errors if _unmet_key(d, {changed: replaces}) not in unmet]
        if added:
            one = len(others) == 1
            raise Refusal(
                f"refused: with {_files(others)} left out (invalid already: the sidecar "
                f"holds {'it' if one else 'them'} back) the files do not load, before this "
                f"{verb} either, and this {verb} adds {_count(len(added), 'error')}: it "
                f"needs more of what {_files(others)} held than they did, or something "
                "else. The sidecar serves the last good version of a file it holds back, "
                f"which apply cannot read: fix {_files(others)} first; nothing changed",
                shown=[*held, *added],
            )
        return Verdict([], others, held, len(second.errors))
    new = new_unresolved(
        second.notes, unresolved_of(base.notes) if isinstance(base, LoadResult) else frozenset()
    )
    if new:
        one = len(new) == 1
        raise Refusal(
            f"refused: with {_files(others)} held back (invalid already), this {verb} "
            f"would send requests to {'a host' if one else 'hosts'} that no ServiceEntry "
            "describes; the sidecar keeps its whole last good table then (a held file "
            f"may be what describes {'it' if one else 'them'}): add the ServiceEntry "
            f"first, or fix {_files(others)}; nothing changed",
            shown=held + new,
        )
    return Verdict(second.notes, others, held)


def _refuse_the_changes_doing(
    verb: str,
    error: ConfigError,
    read: RuleFiles,
    changed: str | None,
    invalid: set[str],
    shown: Sequence[Diagnostic] = (),
) -> None:
    """Refuse what *error* (of *read*, the files after the change) says
    the change does: an error of no one file (the sidecar keeps its whole
    last good table), FILE (*changed*) invalid (the sidecar would hold it
    back: nothing of it served), or another file invalid that was not
    before the change (not in *invalid*: the sidecar would hold it back at
    the same text, refused again, and keep its whole last good table).
    Returns where every file that does not load was invalid before."""
    broken = broken_files(error, read)
    if not broken:
        raise Refusal(
            f"refused: the rules would be invalid after this {verb} "
            f"({_count(len(error.errors), 'error')}); nothing changed",
            shown=[*shown, *error.diagnostics],
        )
    others = [f for f in broken if f != changed]
    if changed in broken:
        own = [d for d in error.diagnostics if d.file == changed]
        errors = [d for d in own if d.severity == "error"]
        raise Refusal(
            f"refused: {changed} is invalid ({_count(len(errors), 'error')}); nothing changed",
            shown=[*shown, *own, *_as_warnings(error, others)],
        )
    made = [f for f in others if f not in invalid]
    if made:
        one = len(made) == 1
        raise Refusal(
            f"refused: this {verb} makes {_files(made)} invalid; the sidecar would keep its "
            f"whole last good table ({'it' if one else 'they'}, held back, would be refused "
            f"again at the same text): nothing of this {verb} would be served; nothing changed",
            shown=[
                *shown,
                *(d for d in error.diagnostics if d.file in made),
                *_as_warnings(error, [f for f in others if f not in made]),
            ],
        )


Unmet = tuple[str | None, str | None, str | None, str]  # file, kind, name, message


def _unmet_key(d: Diagnostic, renamed: Mapping[str | None, str | None] | None = None) -> Unmet:
    """*d* as the errors of two loads are compared: by file (FILE's as the
    file it replaces: *renamed*), object and message, not by line."""
    return ((renamed or {}).get(d.file, d.file), d.kind, d.name, d.message)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _as_warnings(error: ConfigError, files: Sequence[str]) -> list[Diagnostic]:
    """The errors of *error* in *files*, as warnings: a file held back."""
    return [dataclasses.replace(d, severity="warning") for d in error.errors if d.file in files]


def _after(p: Plan, before: RuleFiles, source: str, text: str) -> RuleFiles:
    """DIR's files as *p* would leave them: FILE's *text* (under its own
    path, as its errors say it) where it is written, in the place the
    sidecar reads its name at (name order)."""
    files = [(path, got) for path, got in before.files if path not in p.remove]
    if p.write is not None:
        if any(path == p.write for path, _ in files):
            files = [(source, text) if path == p.write else (path, got) for path, got in files]
        else:
            name = os.path.basename(p.write)
            at = next(
                (i for i, (path, _) in enumerate(files) if os.path.basename(path) > name),
                len(files),
            )
            files.insert(at, (source, text))
    return RuleFiles(files, list(before.unreadable), list(before.notes))


def _install(data: bytes, target: str) -> None:
    """*data* into *target*, whole or not at all (a temporary file renamed)."""
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _warn(verb: str, verdict: Verdict, err: TextIO) -> None:
    """Say what *verdict* found that the user should know: the files held
    back (their errors, as warnings, and what that means), what the files
    need of them, and the warnings of the files as they would be served."""
    for d in verdict.held_errors:
        print(str(d), file=err)
    held = _files(verdict.held)
    one = len(verdict.held) == 1
    if verdict.held:
        it = "it" if one else "them"
        print(
            f"l4proxy {verb}: warning: {held} {'is' if one else 'are'} invalid and not part "
            f"of this {verb}: left out of its check; the sidecar holds {it} back (at the last "
            f"good version, or left out) and serves this change beside {it}; fix {it}",
            file=err,
        )
    if verdict.unmet:
        print(
            f"l4proxy {verb}: warning: with {held} left out the files do not load "
            f"({_count(verdict.unmet, 'error')}), before this {verb} as after it: "
            f"they need what {'it holds' if one else 'those hold'}, which the sidecar serves "
            f"at the last good version (where it has none, it keeps its whole last good "
            f"table, and --admin says so); this {verb} adds no error",
            file=err,
        )
    for d in verdict.notes:
        if d.severity == "warning":
            print(str(d), file=err)


def _read_source(path: str) -> str:
    try:
        return read_file(path)
    except (Unreadable, SourceProblem) as exc:
        raise Refusal(f"{path}: cannot read: {exc}", EXIT_USAGE) from exc


def _admin_get(admin: str, path: str) -> str:
    with direct_urlopen(f"http://{admin}{path}", timeout=2) as r:  # never http_proxy
        body: bytes = r.read()
        return body.decode()


MARK_TRIES = 50  # x 0.1 s: a /stats no worker answered (one restarting) is asked again


def rules_mark(admin: str) -> RulesMark:
    """What the sidecar serves now. A /stats without it is asked again for a
    few seconds: no worker answered that round (one was restarting), and a
    refusal (exit 1, as for invalid rules) said nothing true."""
    for attempt in range(MARK_TRIES):
        if attempt:
            time.sleep(0.1)
        mark = RulesMark.parse(_admin_get(admin, "/stats"))
        if mark is not None:
            return mark
    raise Refusal(f"{admin}/stats has no {GENERATION} (is it l4proxy?)")


def wait_live(admin: str, before: RulesMark, timeout: float, directory: str = "") -> int:
    """Until the sidecar serves the files as they are now (every worker,
    one restarted meanwhile included: see RulesMark); its generation.
    *directory*: the one changed, named where the sidecar says no error."""
    deadline = time.monotonic() + timeout
    last = before
    while True:
        with contextlib.suppress(OSError):
            # (no mark: no worker answered, one restarting; ask again)
            last = RulesMark.parse(_admin_get(admin, "/stats")) or last
        if last.past(before):
            return last.generation
        if time.monotonic() >= deadline:
            why = ""
            with contextlib.suppress(OSError, ValueError):
                err = json.loads(_admin_get(admin, "/config_dump")).get("last_error")
                why = (
                    f"; its last error: {err}"
                    if err
                    else f"; it reports no error: is it watching {directory}? (its "
                    "/config_dump's sources name the files it loads)"
                    if directory
                    else ""
                )
            if last.digest == DIGEST_DISAGREE:
                why += "; its workers serve different files"
            raise Refusal(
                f"the sidecar at {admin} still serves generation {last.generation} "
                f"after {timeout:g} s" + why,
                EXIT_NOT_LIVE,
            )
        time.sleep(0.05)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    verb: str = args.verb
    directory: str = args.rules
    try:
        if not os.path.isdir(directory):
            raise Refusal(f"{directory} is not a directory", EXIT_USAGE)
        with _locked(directory):
            p = plan(verb, args.filename, directory, args.namespace)
            present = read_rules([directory], read_pipes=False)
            if present.unreadable:
                raise Refusal(str(ConfigUnreadable(present.unreadable)), EXIT_USAGE)
            changed = None if verb == "delete" else args.filename
            text = "" if changed is None else _read_source(args.filename)
            verdict = judge(
                verb,
                present,
                _after(p, present, args.filename, text),
                changed,
                p.write,
                namespace=args.namespace,
                domain=args.domain,
            )
            _warn(verb, verdict, err)
            # What the sidecar serves, read last before the change (after the
            # validation, which takes seconds on big rule sets, under the lock
            # every writer takes): a change another writer made meanwhile, live
            # after this read, would be taken for ours.
            before = rules_mark(args.admin) if args.admin else RulesMark(0)
            if p.write is not None:
                # the text judged, not the file read again: one saved
                # meanwhile would go live unchecked
                _install(text.encode(), p.write)
                print(f"{verb}d {p.write}", file=out)
            for f in p.remove:
                os.unlink(f)
                print(f"deleted {f}", file=out)
        if args.admin:
            gen = wait_live(args.admin, before, args.timeout, directory)
            print(f"live: {args.admin} serves rules generation {gen}", file=out)
    except Refusal as exc:
        for d in exc.shown:
            if d.severity != "note":
                print(str(d), file=err)
        print(f"l4proxy {verb}: {exc}", file=err)
        return exc.code
    except OSError as exc:
        print(f"l4proxy {verb}: {exc}", file=err)
        return EXIT_USAGE
    return EXIT_OK
