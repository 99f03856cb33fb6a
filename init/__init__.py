"""l4proxy-init: capture a pod's TCP traffic with iptables nat REDIRECT rules.

The plan (:mod:`.plan`, pure) decides which rules one family's nat table must
hold; :mod:`.apply` is the only module that touches the kernel; :mod:`.cli`
is the ``l4proxy-init`` command. See docs/init.md.
"""

from __future__ import annotations

from .errors import ExitCode, InitError, UsageError
from .options import ALL, CaptureOptions
from .plan import (
    OUR_CHAINS,
    Change,
    Conflict,
    Rule,
    RuleSet,
    TableState,
    desired_ruleset,
    parse_save,
    plan_changes,
    restore_text,
)

__all__ = [
    "ALL",
    "OUR_CHAINS",
    "CaptureOptions",
    "Change",
    "Conflict",
    "ExitCode",
    "InitError",
    "Rule",
    "RuleSet",
    "TableState",
    "UsageError",
    "desired_ruleset",
    "parse_save",
    "plan_changes",
    "restore_text",
]
