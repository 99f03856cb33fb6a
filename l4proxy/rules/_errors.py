"""Diagnostics: what the loader tells the user, with file, line and object."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class RouteParentRef:
    """One parentRef of a Gateway API route: the entry *index* of
    ``spec.parentRefs`` of the HTTPRoute *namespace*/*name*. What a finding
    of reason UNATTACHED is about, where its line cannot tell: several
    parentRefs of a flow sequence share one."""

    namespace: str
    name: str
    index: int

    def __str__(self) -> str:
        return f"HTTPRoute {self.namespace}/{self.name} spec.parentRefs[{self.index}]"


@dataclass(frozen=True, kw_only=True)
class Diagnostic:
    """One finding. ``str()`` is the istioctl-like one-line form::

        bootcamp.yaml:12: RouteRule bootcamp-default: route weights total 90 (must total 100)
        bootcamp.yaml:1: note: Deployment bootcamp-v1: skipped (a Kubernetes object, not a rule)

    Errors carry no severity word (they are what validate is about); warnings
    and notes say so after the location. ``line`` and ``column`` are 1-based.
    """

    file: str
    line: int | None = None
    column: int | None = None
    kind: str | None = None
    name: str | None = None
    message: str
    severity: Severity = "error"
    # what a program reading the finding may test, where the message is for
    # people (None: nothing): UNATTACHED, UNRESOLVED
    reason: str | None = None
    # reason UNATTACHED: the parentRef that attaches to nothing
    parent_ref: RouteParentRef | None = None

    def __str__(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f":{self.line}"
            if self.column is not None:
                loc += f":{self.column}"
        sev = "" if self.severity == "error" else f"{self.severity}: "
        if self.kind and self.name:
            what = f"{self.kind} {self.name}: "
        elif self.kind:
            what = f"{self.kind}: "
        else:
            what = ""
        return f"{loc}: {sev}{what}{self.message}"


@dataclass(frozen=True)
class ObjectSummary:
    """One document the loader understood (or skipped), for validate's summary."""

    kind: str
    name: str
    namespace: str
    file: str
    line: int | None
    skipped: bool = False


# A Gateway API route's parentRef that attaches to nothing (a Gateway not
# in the files, no listener of its sectionName or port, none that admits
# the route): a warning, the route not served through it
UNATTACHED = "unattached"
# A share of a route's requests sent to a host that no ServiceEntry
# describes (a VirtualService or RouteRule destination of weight above 0,
# an HTTPRoute backendRef, an Ingress backend): a warning, and those
# requests fail until one is loaded. A sidecar holding a broken file back
# does not serve a table with one that the table it serves has not
# (l4proxy.rules.watch: the held file may be what describes that host)
UNRESOLVED = "unresolved"


class ConfigError(Exception):
    """The rule set is invalid; nothing of it may be applied.

    ``diagnostics`` holds every finding in the order found (file by file,
    then the cross-document checks); ``str()`` is its errors and warnings,
    one per line. ``documents`` lists what was understood before failing.
    """

    def __init__(
        self, diagnostics: Sequence[Diagnostic], documents: Sequence[ObjectSummary] = ()
    ) -> None:
        self.diagnostics = list(diagnostics)
        self.documents = list(documents)
        super().__init__(str(self))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.diagnostics if d.severity != "note")


class ConfigUnreadable(ConfigError):
    """A path is missing or cannot be read (``l4proxy validate`` exits 2)."""
