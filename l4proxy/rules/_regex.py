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

RE2 (the module, its library and libstdc++: about 2.5 MB of a process's RSS)
is imported by the first rule that has a regex, not by the worker at start:
most pods' rules have none, and every pod runs a sidecar.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

# Envoy's default re2.max_program_size.error_level
MAX_PROGRAM_SIZE = 100
# A pattern longer than this is refused before RE2 sees it: no regex within
# MAX_PROGRAM_SIZE needs it (a literal longer than 100 is over it already),
# and RE2 took 1 s and 195 MB to refuse a 5 MB one, its simplifier writing
# 24,000 lines to the process's stderr (absl's log, log_errors aside): in
# every worker at every reload of the file.
MAX_PATTERN = 1 << 16


class Pattern(Protocol):
    pattern: str

    def fullmatch(self, text: str) -> object | None: ...


class RegexError(ValueError):
    """Why a regex is refused, in words for the user."""


@functools.cache
def _re2() -> tuple[Any, Any]:
    """The re2 module and our options, imported on first use."""
    import re2

    options = re2.Options()
    options.log_errors = False  # the error is ours to report (file and line)
    return re2, options


def re2_compile(pattern: str) -> Any:
    """*pattern* compiled by RE2 (imported on first use), or ValueError with
    RE2's reason in words (its message, decoded) and no traceback chain."""
    re2, options = _re2()
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        raise ValueError(str(why)) from None


def shown(pattern: str, most: int = 80) -> str:
    """*pattern* quoted for a message, its middle left out when long (an
    error that quoted a 5 MB regex whole was a 5 MB log line)."""
    if len(pattern) <= most:
        return repr(pattern)
    return f"{pattern[: most - 20]!r}...{pattern[-10:]!r} ({len(pattern):,} characters)"


def compile_regex(pattern: str) -> Pattern:
    if len(pattern) > MAX_PATTERN:
        raise RegexError(
            f"it is {len(pattern):,} characters long, more than the {MAX_PATTERN:,} l4proxy "
            f"compiles (a regex within Envoy's program-size limit, {MAX_PROGRAM_SIZE}, is far "
            "shorter)"
        )
    try:
        compiled = re2_compile(pattern)
    except ValueError as exc:
        raise RegexError(f"{exc} (rules use RE2's syntax, as Envoy does)") from None
    size = int(compiled.programsize)
    if size > MAX_PROGRAM_SIZE:
        raise RegexError(
            f"its program is too large ({size} > {MAX_PROGRAM_SIZE}, Envoy's limit): "
            "simplify it (fewer repetitions or alternatives)"
        )
    return compiled  # type: ignore[no-any-return]


def check_rewrite(pattern: Pattern, rewrite: str) -> None:
    """Raise :class:`RegexError` unless *rewrite* is an RE2 rewrite string
    for *pattern* (``RE2::CheckRewriteString``): ``\\0`` to ``\\9`` name the
    whole match or a group it has, ``\\\\`` is a backslash, and a backslash
    before anything else is an error."""
    groups = int(getattr(pattern, "groups", 0))
    i = 0
    while i < len(rewrite):
        if rewrite[i] == "\\":
            nxt = rewrite[i + 1 : i + 2]
            if nxt.isdigit() and nxt.isascii():
                if int(nxt) > groups:
                    raise RegexError(
                        f"\\{nxt} names group {nxt}, but the regex has "
                        f"{groups} group{'s' if groups != 1 else ''}"
                    )
            elif nxt != "\\":
                raise RegexError(
                    "a backslash must be followed by a digit (a group) or another "
                    "backslash (RE2's rewrite syntax)"
                )
            i += 2
            continue
        i += 1


def global_replace(pattern: Pattern, rewrite: str, text: str) -> str:
    """*text* with every non-overlapping match of *pattern* replaced by
    *rewrite* (checked by :func:`check_rewrite`; ``\\N`` is group N, empty
    when it took no part), as Envoy's ``regex_rewrite`` runs
    ``RE2::GlobalReplace``: the search goes left to right, and an empty
    match right where the last match ended is skipped (one character is
    copied instead), so ``a*`` on ``baaac`` with ``-`` gives ``-b-c-``."""
    search = pattern.search  # type: ignore[attr-defined]
    out: list[str] = []
    pos = 0
    last_end = -1
    end = len(text)
    while pos <= end:
        m = search(text, pos)
        if m is None:
            break
        start, stop = m.span()
        out.append(text[pos:start])
        if start == stop and start == last_end:
            out.append(text[pos : pos + 1])
            pos += 1
            continue
        out.append(_expand(m, rewrite))
        pos = last_end = stop
    if pos < end:
        out.append(text[pos:])
    return "".join(out)


def _expand(m: Any, rewrite: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(rewrite):
        c = rewrite[i]
        if c == "\\" and i + 1 < len(rewrite):
            nxt = rewrite[i + 1]
            out.append(m.group(int(nxt)) or "" if nxt.isdigit() else nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)
