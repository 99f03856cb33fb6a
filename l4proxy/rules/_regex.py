"""Regular expressions in rules, as Envoy runs them: RE2.

Istio hands a VirtualService's ``regex`` (and the Gateway API's
``RegularExpression``) to Envoy, whose ``safe_regex`` is Google's RE2. Two
things follow that Python's ``re`` does not give:

- **time linear in the input.** A rule's regex runs on request headers, which
  the client writes: under ``re``, ``(a+)+b`` against 40 ``a``s holds a worker
  for hours (catastrophic backtracking). RE2 has no backtracking.
- **the same language.** POSIX classes (``[[:alpha:]]``) mean what they mean
  in RE2, not a set followed by a literal ``]``; lookarounds and
  backreferences, which RE2 has not, are refused here as Envoy refuses them,
  rather than accepted with a meaning Istio would never give them.

Envoy also refuses a regex whose compiled program is larger than 100 (the
``re2.max_program_size.error_level`` default), so a rule that loads here
loads in Istio, and no rule makes a huge automaton.
"""

from __future__ import annotations

from typing import Protocol

import re2

# Envoy's default re2.max_program_size.error_level
MAX_PROGRAM_SIZE = 100

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error is ours to report (file and line)


class Pattern(Protocol):
    pattern: str

    def fullmatch(self, text: str) -> object | None: ...


class RegexError(ValueError):
    """Why a regex is refused, in words for the user."""


def compile_regex(pattern: str) -> Pattern:
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        raise RegexError(f"{why} (rules use RE2's syntax, as Envoy does)") from None
    size = int(compiled.programsize)
    if size > MAX_PROGRAM_SIZE:
        raise RegexError(
            f"its program is too large ({size} > {MAX_PROGRAM_SIZE}, Envoy's limit): "
            "simplify it (fewer repetitions or alternatives)"
        )
    return compiled  # type: ignore[no-any-return]
