"""Log levels at runtime: the admin's ``/logging``, in every process.

Theory of operation
-------------------
The sidecar's processes log through Python's ``logging``, each to its own
standard error, at ``--log-level`` (the root logger's level), and the
loggers l4proxy names (:data:`LOGGERS`) follow it unless a level was set
for one by name. ``/logging`` takes Envoy's forms (``?level=``: every
logger; ``?paths=NAME:LEVEL,...`` and ``?NAME=LEVEL``: those loggers) and
turns them into changes, written ``NAME=LEVEL,...`` (``*`` for every
logger: :func:`log_spec`). The process that serves the endpoint applies
them (:func:`apply_log_levels`) and sends the same text to each worker as a
control request (``logging NAME=LEVEL,...``; channel): no new channel, and
one definition of what a change means. The supervisor keeps the changes made
so far, merged (:func:`merge_log_spec`), and sends them to each worker it
starts from then on, so a restarted worker logs as its predecessor did once
it answers its control channel (after its first rule load; its start-up
lines are at ``--log-level``).

Envoy's ``trace`` and ``off`` have no Python level and are refused; a name
must be one of :data:`LOGGERS`, so a typo is an error, not a logger made up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

# l4proxy's loggers, as the modules name them (a test checks the sources);
# a name set at runtime must be one of these
LOGGERS = (
    "l4proxy",
    "l4proxy.accesslog",
    "l4proxy.admin",
    "l4proxy.dns",
    "l4proxy.rules",
    "l4proxy.supervisor",
    "l4proxy.worker",
    "l4proxy.workerlink",
)
# Envoy's level names that Python's logging has (Envoy's trace and off have
# no Python level; warn is Envoy's other name for warning)
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
EVERY_LOGGER = "*"  # ?level=: the root logger, and no l4proxy logger set apart


def logging_changes(params: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """(logger, level) pairs from /logging's query, in the order they apply:
    ``level`` (every logger, EVERY_LOGGER) first, then ``paths``
    (``NAME:LEVEL,...``), then ``NAME=LEVEL`` (Envoy's forms). ValueError,
    in words for the operator, for a name or level that is not one."""
    changes: list[tuple[str, str]] = []
    for level in params.get("level", []):
        changes.append((EVERY_LOGGER, level))
    for paths in params.get("paths", []):
        for item in filter(None, paths.split(",")):
            name, sep, level = item.rpartition(":")
            if not sep:
                raise ValueError(f"paths item {item!r}: expected NAME:LEVEL")
            changes.append((name, level))
    for name, values in params.items():
        if name not in ("level", "paths"):
            changes += [(name, level) for level in values]
    for name, level in changes:
        if name != EVERY_LOGGER and name not in LOGGERS:
            raise ValueError(f"no logger {name!r}; the loggers: {', '.join(LOGGERS)}")
        if level.lower() not in LEVELS:
            raise ValueError(f"level {level!r}: one of {', '.join(LEVELS)}")
    return [(name, level.lower()) for name, level in changes]


def log_spec(changes: Iterable[tuple[str, str]]) -> str:
    """The changes as the control channel carries them: ``NAME=LEVEL,...``."""
    return ",".join(f"{name}={level}" for name, level in changes)


def merge_log_spec(before: str, spec: str) -> str:
    """The changes of *before* and then *spec* as one spec, the ones that
    still count: what a worker started later is given. A change of every
    logger makes every earlier one moot."""
    merged: dict[str, str] = {}
    for item in filter(None, f"{before},{spec}".split(",")):
        name, _, level = item.partition("=")
        if name == EVERY_LOGGER:
            merged.clear()
        merged.pop(name, None)
        merged[name] = level
    return log_spec(merged.items())


def apply_log_levels(spec: str) -> dict[str, str]:
    """Set this process's log levels as *spec* says (:func:`log_spec`; empty:
    none), and return every l4proxy logger's effective level. EVERY_LOGGER
    sets the root logger's level (what ``--log-level`` set) and takes back
    the levels of l4proxy's loggers set by name, which then follow it."""
    for item in filter(None, spec.split(",")):
        name, _, level = item.partition("=")
        if name == EVERY_LOGGER:
            logging.getLogger().setLevel(LEVELS[level])
            for each in LOGGERS:
                logging.getLogger(each).setLevel(logging.NOTSET)
        elif name in LOGGERS:
            logging.getLogger(name).setLevel(LEVELS[level])
        else:
            raise ValueError(f"no logger {name!r}")
    return {
        name: logging.getLevelName(logging.getLogger(name).getEffectiveLevel()).lower()
        for name in LOGGERS
    }


def logging_text(views: list[tuple[str, dict[str, str] | None]]) -> str:
    """/logging's text, Envoy's ``active loggers:`` list, one per process
    (named, where there are several; None: it did not answer)."""
    lines = []
    for who, levels in views:
        head = f"active loggers ({who}):" if who else "active loggers:"
        if levels is None:
            lines.append(f"{head} no answer")
            continue
        lines.append(head)
        lines += [f"  {name}: {level}" for name, level in levels.items()]
    return "\n".join(lines) + "\n"
