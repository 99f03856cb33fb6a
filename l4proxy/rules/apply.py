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

Before touching anything, the directory as it would be afterwards is loaded
exactly as the sidecar loads it (the existing files minus those replaced or
removed, plus FILE): an invalid result is refused with the usual file:line
errors and the directory is left as it was. Writes are atomic (a temporary
file in DIR, fsync, rename over the target; hidden names are never read by
the sidecar), and an flock on ``DIR/.l4proxy.lock`` serializes concurrent
invocations. With ``--admin``, the command then polls the sidecar's
``/stats`` until every worker serves the files as they are now (the
``l4proxy_rules_digest`` they agree on has moved; from an older sidecar,
``l4proxy_rules_generation`` has moved past the value read before the
change), or fails after ``--timeout`` naming what the sidecar said
(``/config_dump``'s ``last_error``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from l4proxy._http import urlopen as direct_urlopen
from l4proxy.cli import positive_seconds
from l4proxy.rules import RULE_SUFFIXES, ConfigError, ConfigUnreadable, load_rules, rule_files
from l4proxy.rules._schema import Report
from l4proxy.rules._yaml import SourceProblem, Unreadable, parse_documents, read_file
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

exit status:
  0  done (and, with --admin, live in the sidecar)
  1  refused: the result would be invalid (errors printed as FILE:LINE: ...),
     an object already exists (create) or does not (replace, delete), or a
     file of DIR holds other objects too; DIR is unchanged
  2  usage: FILE or DIR cannot be read
  3  DIR was changed, but the sidecar at --admin did not report the new
     generation within --timeout (its last error is printed)
"""

ObjectKey = tuple[str, str, str]  # kind, namespace, name


class Refusal(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


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
        does + " The directory as it would be is loaded first, as the sidecar loads it: "
        "an invalid result is refused and DIR left as it was.",
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
        p.add_argument("-n", "--namespace", default="default", help="as for l4proxy validate")
        p.add_argument("--domain", default="cluster.local", help="as for l4proxy validate")
        p.set_defaults(func=run, verb=verb)


def objects_in(path: str) -> list[ObjectKey]:
    """The (kind, namespace, name) of every object document of *path*."""
    try:
        text = read_file(path)
    except (Unreadable, SourceProblem) as exc:
        raise Refusal(f"{path}: cannot read: {exc}", EXIT_USAGE) from exc
    out: list[ObjectKey] = []
    try:
        docs = list(parse_documents(text, path))
    except SourceProblem as exc:
        raise Refusal(f"{path}:{exc.line or ''}: {exc.message}") from exc
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
    keep: list[str]  # DIR's rule files that stay as they are


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
    for f in files:
        keys = _normalize(objects_in(f), namespace)
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
        return Plan([], target, files)
    if missing:
        k = missing[0]
        hint = f"use 'l4proxy create -f {source}'" if verb == "replace" else "nothing to delete"
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
        return Plan([], owners[0], [f for f in files if f != owners[0]])
    return Plan(owners, None, [f for f in files if f not in owners])


def _install(source: str, target: str) -> None:
    with open(source, "rb") as f:
        data = f.read()
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


def wait_live(admin: str, before: RulesMark, timeout: float) -> int:
    """Until the sidecar serves the files as they are now (every worker,
    one restarted meanwhile included: see RulesMark); its generation."""
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
                why = f"; its last error: {err}" if err else ""
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
            after = [*p.keep, *([args.filename] if verb != "delete" else [])]
            try:
                result = load_rules(after, namespace=args.namespace, domain=args.domain)
            except ConfigUnreadable as exc:
                raise Refusal(str(exc), EXIT_USAGE) from exc
            except ConfigError as exc:
                for d in exc.diagnostics:
                    if d.severity != "note":
                        print(str(d), file=err)
                raise Refusal(
                    f"refused: {directory} would be invalid after this {verb} "
                    f"({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''}); "
                    "nothing changed"
                ) from exc
            for d in result.notes:
                if d.severity == "warning":
                    print(str(d), file=err)
            # What the sidecar serves, read last before the change (after the
            # validation, which takes seconds on big rule sets, under the lock
            # every writer takes): a change another writer made meanwhile, live
            # after this read, would be taken for ours.
            before = rules_mark(args.admin) if args.admin else RulesMark(0)
            if p.write is not None:
                _install(args.filename, p.write)
                print(f"{verb}d {p.write}", file=out)
            for f in p.remove:
                os.unlink(f)
                print(f"deleted {f}", file=out)
        if args.admin:
            gen = wait_live(args.admin, before, args.timeout)
            print(f"live: {args.admin} serves rules generation {gen}", file=out)
    except Refusal as exc:
        print(f"l4proxy {verb}: {exc}", file=err)
        return exc.code
    except OSError as exc:
        print(f"l4proxy {verb}: {exc}", file=err)
        return EXIT_USAGE
    return EXIT_OK
