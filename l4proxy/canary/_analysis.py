"""The canary analysis as a state machine, with no I/O (``l4proxy canary``).

Theory of operation
-------------------
This is Flagger's canary analysis, reduced to what it decides. A rollout of
SERVICE from a *stable* to a *canary* version walks a list of canary weights
(``--steps 5,10,25,50,100``, or ``--step-weight``/``--max-weight``). The
shell (:mod:`l4proxy.canary.command`) sets the weight, waits one ``interval``, and
hands this module a :class:`Sample` of the canary's requests in that
interval; :func:`check` grades it and :func:`advance` moves the
:class:`Rollout` on:

* **halt**: fewer than ``min_requests`` canary requests. Nothing is learnt,
  so nothing changes: no step, no failed check (Flagger #1035: too little
  traffic must neither pass nor promote). The next interval tries again;
  but a rollout that has judged nothing for ``progress_deadline`` seconds
  (Flagger's ``progressDeadlineSeconds``) is **rolled back**: a canary that
  gets no traffic is not left half-shifted, and its Job not running, for
  ever.
* **fail**: success rate (the % of requests neither 5xx nor 0, no response
  at all) below ``min_success_rate``, or p99 above ``max_p99_ms``
  (``math.inf``: beyond the largest histogram bucket), or p99 unknown
  although there were requests (no histogram to read: a
  Prometheus ``histogram_quantile`` that is NaN because only the +Inf
  bucket has data, or bucket series dropped; a canary is never promoted on
  a latency that could not be read). ``failed_checks`` goes up by one and is never reset
  by a later pass (as in Flagger: ``threshold`` failures over the whole
  analysis roll back); at ``threshold`` the rollout is **rolled back**:
  weight 0, every request to stable.
* **pass**: the next step's weight; a pass at the last step **promotes**:
  weight 100, every request to the canary.

**Mirroring** (``--mirror N``, Flagger's ``analysis.mirror``): the first N
stages of a rollout are *mirrored*: weight 0, every request to stable, and
the canary's RouteRule copies each of them to the canary, whose answers no
client sees. Such a stage is graded as any other, on the canary's answers
to the copies (and any request it served itself: testers pinned by a
header), and a pass goes on to the next stage. The stages are
``(0,) * mirror + steps`` (:attr:`Policy.stages`), stored in
:attr:`Rollout.steps` as the weights are, so that resume, ``status``,
``promote`` and ``abort`` need nothing more: a progressing rollout at
weight 0 is mirrored (weights are 1..100 otherwise). A rollback is weight 0
and no mirror. Blue/green mirroring is ``--mirror N --steps 100``: N
mirrored intervals, then every request to the canary.

**A/B testing** (``--match ... --iterations N``, Flagger's A/B testing
strategy): for N intervals only the requests that match one of the
:attr:`Policy.match` alternatives (a header's exact value, or a regex on
it) go to the canary, every other request to stable; no weight moves. The
stages are ``(0,) * iterations``, and :attr:`Rollout.match` holds the
alternatives, so that a progressing rollout at weight 0 with a match is
A/B testing (:attr:`Rollout.ab_testing`), never mirrored. Each interval is
graded on the canary's requests, which are the matching ones; a pass goes
on to the next interval, a pass at the N-th promotes (weight 100, the
match dropped), and ``threshold`` fails roll back (weight 0, no match). A
resume with other alternatives than the saved ones is a :class:`Conflict`:
which requests were judged would change under the count of intervals
passed.

**Gateway API** (``--gateway-api``, Flagger's Gateway API provider): the
same stages, and *stable* and *canary* name a backend Service each (one
Service per version) instead of a ``version`` label; the shell writes an
HTTPRoute instead of a RouteRule. :attr:`Rollout.gateway` holds what that
document needs besides (the port, the Gateways), and says the mode: a
progressing rollout is never resumed in the other mode (a
:class:`Conflict`), since its document would change kind under it.

**Session affinity** (``--session-affinity``, Flagger's
``analysis.sessionAffinity``; Gateway API mode only): the same stages, and
:attr:`Rollout.affinity` holds the cookie that pins a user to the canary
once a weighted draw sent them there: its name, its value (drawn by the
shell at the start, kept across resumes: the clients hold it), its
max-age, the primary cookie's name and age, the attributes both are set
with (:class:`CookieAttributes`), and the cookie the rollout before may
have handed out, with its own (deleted while this one is mirrored). A
rollout's own cookie is handed out once its canary has a weight, so only
such a rollout deletes it at its end (:attr:`Rollout.had_weight`). The
value of the primary cookie is a function of the rollout's and the step
(:meth:`SessionAffinity.primary_value`). A progressing rollout resumed
with other cookie names or attributes, or with none where it had one, is
a :class:`Conflict`. What the shell writes for each phase is
:func:`l4proxy.canary.command.http_route_document`.

**Webhooks** (Flagger's ``analysis.webhooks``; what they are and the POST:
:mod:`l4proxy.canary._webhooks`): their answers are handed in, as the
samples are, and decide no more than the numbers do. A rollout hook's
failure fails its interval's check (:func:`with_hook_failures`); a pass
that would raise the canary's live weight or make it 100 % goes through
its gates first (:func:`gates_of`, :func:`first_gates`), and a gate that
holds leaves the rollout at its stage, judged (``advance(held=...)``),
with a :class:`Hold` in it that ``status`` shows; a pre-rollout hook's
failure is a failed check of a rollout whose first stage is not written
yet, counted toward ``threshold`` as any; a rollback hook's 2xx is
:func:`roll_back`. A new rollout whose start its webhooks hold is
*waiting* (:func:`waiting`, then :func:`started`): its state records it,
and what holds it, with nothing routed, so that ``status`` and ``abort``
know it; it never *started* if it ends so (:attr:`Rollout.started`). Each
rollout has its ``checksum`` for the webhooks' payload
(:func:`rollout_checksum`).

A finished rollout (promoted, rolled back) stays as it ended: resuming it
(:func:`resume`) neither starts over at the first step nor routes anything
to the canary again, unless the caller asks for a fresh start. Times are
passed in (``now``), never read, so that every path is a table-driven test.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

# waiting: a new rollout whose webhooks hold its start; nothing is written
# for it but its state (what holds it, and the command that waits)
Phase = Literal["waiting", "progressing", "promoted", "rolled_back"]
Verdict = Literal["pass", "fail", "halt"]
PHASES: tuple[Phase, ...] = ("waiting", "progressing", "promoted", "rolled_back")


# The most intervals --mirror and --iterations take. Each is a stage kept in
# the state (Rollout.steps), which a ConfigMap holds in an annotation (all of
# an object's annotations: 256 KiB at most); --mirror 10000000 wrote a 50 MB
# state file and took 940 MB of memory. 1000 is about 17 hours at the
# default interval, more than any pre-stage or A/B test runs, in a few KiB.
MAX_INTERVALS = 1000


class PolicyError(ValueError):
    """The options do not make a rollout (the message names the option)."""


@dataclass(frozen=True)
class HeaderMatch:
    """One ``--match`` alternative: the request header *header* (lower
    case) whose value is *value* (``exact``) or matches the RE2 regex
    *value* whole (``regex``), as a RouteRule's ``match.request.headers``
    entry reads it."""

    header: str
    kind: Literal["exact", "regex"]
    value: str

    def __str__(self) -> str:
        """As the option is written: ``x-canary=insider``, ``cookie~REGEX``."""
        return f"{self.header}{'=' if self.kind == 'exact' else '~'}{self.value}"

    def to_json(self) -> dict[str, str]:
        """As the state file and ``--json`` hold it: ``{"header": NAME, "exact": VALUE}``."""
        return {"header": self.header, self.kind: self.value}

    @classmethod
    def from_json(cls, data: Any) -> HeaderMatch:
        if not isinstance(data, dict) or not isinstance(data.get("header"), str):
            raise ValueError(f"match {data!r}: not an object with a header")
        kinds = [k for k in ("exact", "regex") if isinstance(data.get(k), str)]
        if len(kinds) != 1 or set(data) != {"header", kinds[0]}:
            raise ValueError(f"match {data!r}: not a header with one of exact, regex")
        kind: Literal["exact", "regex"] = "exact" if kinds[0] == "exact" else "regex"
        return cls(data["header"], kind, data[kind])


def parse_match(text: str) -> HeaderMatch:
    """``--match HEADER=VALUE`` (exact) or ``HEADER~REGEX``: the name ends at
    the first ``=`` or ``~`` and is taken in lower case (header names are
    case-insensitive); whether it is a header name, and the regex valid,
    is for the rules loader to say (the command loads the documents)."""
    m = re.match(r"([^=~]*)([=~])(.*)", text, re.DOTALL)
    if m is None or not m.group(1).strip():
        raise PolicyError(
            f"--match {text}: expected HEADER=VALUE (the exact value) or HEADER~REGEX "
            "(RE2, the whole value), e.g. x-canary=insider"
        )
    return HeaderMatch(m.group(1).lower(), "exact" if m.group(2) == "=" else "regex", m.group(3))


@dataclass(frozen=True)
class Policy:
    steps: tuple[int, ...]  # canary weights, strictly increasing, 1..100
    interval: float = 60.0  # seconds per check
    threshold: int = 5  # failed checks that roll back
    min_success_rate: float = 99.0  # percent of requests that are neither 5xx nor 0
    max_p99_ms: float = 500.0  # math.inf: not checked (--max-p99 off)
    min_requests: int = 10  # canary requests per interval, fewer halts
    # halts only, for this long (two intervals at least): roll back; 0: never
    progress_deadline: float = 600.0
    mirror: int = 0  # mirrored intervals before the first step (weight 0, copies)
    # A/B testing: the alternatives whose requests go to the canary (any of
    # them), for this many intervals; (): weighted steps
    match: tuple[HeaderMatch, ...] = ()
    iterations: int = 0

    def __post_init__(self) -> None:
        if not self.steps:
            raise PolicyError("--steps: at least one weight")
        prev = 0
        for w in self.steps:
            if not 0 < w <= 100 or w <= prev:
                raise PolicyError(
                    f"--steps: weights must rise strictly within 1..100, got "
                    f"{','.join(map(str, self.steps))}"
                )
            prev = w
        if not 0 < self.interval < math.inf:
            # (inf: the first weight written, then a wait that never ends)
            raise PolicyError(f"--interval: must be > 0 seconds and finite, got {self.interval:g}")
        if self.threshold < 1:
            raise PolicyError(f"--threshold: must be >= 1, got {self.threshold}")
        if not 0 <= self.min_success_rate <= 100:
            raise PolicyError(f"--min-success-rate: a percentage, got {self.min_success_rate:g}")
        if not self.max_p99_ms > 0:
            raise PolicyError(f"--max-p99: must be > 0 ms, got {self.max_p99_ms:g}")
        if self.min_requests < 0:
            raise PolicyError(f"--min-requests: must be >= 0, got {self.min_requests}")
        if not 0 <= self.progress_deadline < math.inf:
            raise PolicyError(
                f"--progress-deadline: seconds >= 0 (0: none), got {self.progress_deadline:g}"
            )
        if not 0 <= self.mirror <= MAX_INTERVALS:
            raise PolicyError(
                f"--mirror: intervals from 0 (none) to {MAX_INTERVALS} (each is kept in the "
                f"rollout's state), got {self.mirror}"
            )
        if self.match and self.mirror:
            # Flagger's A/B testing has no mirroring either
            raise PolicyError("--match and --mirror: A/B testing routes no copies; give one")
        if self.match and not 1 <= self.iterations <= MAX_INTERVALS:
            raise PolicyError(
                f"--iterations: intervals from 1 to {MAX_INTERVALS} (each is kept in the "
                f"rollout's state), got {self.iterations}"
            )
        if self.iterations and not self.match:
            raise PolicyError(
                "--iterations needs --match HEADER=VALUE (or HEADER~REGEX): the requests "
                "that go to the canary for those intervals (Flagger's A/B testing)"
            )

    @property
    def stages(self) -> tuple[int, ...]:
        """The rollout's weights in turn: 0 for each mirrored interval, then the
        steps; A/B testing: 0 for each of its intervals."""
        if self.match:
            return (0,) * self.iterations
        return (0,) * self.mirror + self.steps


def mirrored_stages(steps: Sequence[int]) -> int:
    """How many of a rollout's stages (:attr:`Rollout.steps`) are mirrored:
    its leading zeros."""
    return next((i for i, w in enumerate(steps) if w), len(steps))


def steps_from(step_weight: int, max_weight: int) -> tuple[int, ...]:
    """Flagger's ``stepWeight``/``maxWeight``: step, 2·step, ... up to max."""
    if not 0 < step_weight <= 100:
        raise PolicyError(f"--step-weight: must be within 1..100, got {step_weight}")
    if not step_weight <= max_weight <= 100:
        raise PolicyError(f"--max-weight: must be within {step_weight}..100, got {max_weight}")
    out = list(range(step_weight, max_weight + 1, step_weight))
    if out[-1] != max_weight:
        out.append(max_weight)
    return tuple(out)


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError as exc:
        raise PolicyError(f"--steps: comma-separated integer weights, got {text!r}") from exc


@dataclass(frozen=True)
class Sample:
    """The canary's requests in one interval (deltas, not totals)."""

    requests: float
    errors: float  # failed among them: 5xx answers, or none (response code 0)
    p99_ms: float | None  # None: no histogram data; math.inf: beyond its largest bucket
    # a mirrored interval read from the sidecars: the copies they dropped
    # (l4proxy_http_mirror_dropped_total, of every mirror: it has no
    # version), shown beside the check, never judged; None: not known
    copies_dropped: float | None = None
    # the canary's percentage of the requests to stable and canary in the
    # interval (read from the sidecars at a weighted or A/B interval), shown
    # beside the check, never judged: what the routing did, whatever the
    # document says; None: not known
    share: float | None = None


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    requests: float | None  # None: not known (the metrics not read, a change not live)
    success_rate: float | None  # percent
    p99_ms: float | None
    reasons: tuple[str, ...] = ()  # why it failed or halted, for the display
    copies_dropped: float | None = None  # the sample's, for the display
    share: float | None = None  # the sample's, for the display


# Relative: the limits are compared to float arithmetic (Prometheus' ratio of
# two rates: (990/60)/(1000/60)*100 is 98.99999999999999), and a value on
# the limit passes; a part in a billion is far below any meaningful margin.
TOLERANCE = 1e-9


def success_ok(policy: Policy, rate: float) -> bool:
    """The success rate meets --min-success-rate (at it, give or take rounding)."""
    return rate >= policy.min_success_rate or math.isclose(
        rate, policy.min_success_rate, rel_tol=TOLERANCE
    )


def p99_ok(policy: Policy, p99: float) -> bool:
    """The p99 meets --max-p99 (at it, give or take rounding; +Inf never,
    unless the p99 is not checked)."""
    if policy.max_p99_ms == math.inf:
        return True
    return p99 <= policy.max_p99_ms or math.isclose(p99, policy.max_p99_ms, rel_tol=TOLERANCE)


def p99_limit(policy: Policy) -> str:
    """The latency check, as the rollout's first line says it."""
    if policy.max_p99_ms == math.inf:
        return "p99 not checked"
    return f"p99 <= {policy.max_p99_ms:g} ms"


def check(policy: Policy, sample: Sample, mirrored: bool = False) -> Check:
    """Grade one interval against the policy (*mirrored*: its sample is the
    canary's answers to copies, and its own requests; only the halt's
    words differ). The copies dropped and the share are carried along, not
    graded."""
    graded = _grade(policy, sample, mirrored)
    return replace(graded, copies_dropped=sample.copies_dropped, share=sample.share)


def _grade(policy: Policy, sample: Sample, mirrored: bool) -> Check:
    n = sample.requests
    rate = None if n <= 0 else 100.0 * (n - sample.errors) / n
    p99 = sample.p99_ms
    if n < max(policy.min_requests, 1):
        what = (
            count(n, "copy or canary request", "copies and canary requests")
            if mirrored
            else count(n, "canary request")
        )
        return Check("halt", n, rate, p99, (f"{what} < {policy.min_requests} (--min-requests)",))
    reasons: list[str] = []
    assert rate is not None
    if not success_ok(policy, rate):
        reasons.append(f"success rate {rate:.1f} % < {policy.min_success_rate:g} %")
    if policy.max_p99_ms == math.inf:
        pass  # --max-p99 off
    elif p99 is None:
        reasons.append(f"p99 unknown: no latency histogram for {count(n, 'request')}")
    elif p99 == math.inf:
        reasons.append(f"p99 beyond the largest latency bucket > {policy.max_p99_ms:g} ms")
    elif not p99_ok(policy, p99):
        reasons.append(f"p99 {p99:.0f} ms > {policy.max_p99_ms:g} ms")
    return Check("fail" if reasons else "pass", n, rate, p99, tuple(reasons))


def _num(x: float) -> str:
    return str(int(x)) if x == math.floor(x) else f"{x:.1f}"


def count(n: float, noun: str, plural: str = "") -> str:
    """*n* and *noun*, in the plural where *n* is not one (``1 failed
    check``, ``2 failed checks``, ``0 copies``, ``2.5 requests``: a count
    Prometheus extrapolated); *plural* where it is not *noun* + s."""
    shown = _num(n)
    return f"{shown} {noun if shown == '1' else plural or noun + 's'}"


@dataclass(frozen=True)
class GatewayRoute:
    """A rollout in Gateway API mode: its HTTPRoute's backendRefs (stable,
    canary) and its parentRefs (SERVICE's Service, then each Gateway)
    take *port*; *gateways* name the Gateways the route attaches to too."""

    port: int
    gateways: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "gateways": list(self.gateways)}

    @classmethod
    def from_json(cls, data: Any) -> GatewayRoute:
        if not isinstance(data, dict) or not isinstance(data.get("port"), int):
            raise ValueError(f"gateway_api {data!r}: not an object with a port")
        gateways = data.get("gateways") or []
        if not isinstance(gateways, list) or not all(isinstance(g, str) for g in gateways):
            raise ValueError(f"gateway_api {data!r}: gateways is not a list of names")
        return cls(data["port"], tuple(gateways))


# A session cookie's value: Flagger's (randSeq: ten ASCII letters, drawn once
# per rollout). Letters alone need no quoting in a cookie nor escaping in a
# regex, and 52**10 (about 2**57) values are more than any rollout can meet.
COOKIE_LETTERS = string.ascii_letters
COOKIE_VALUE_LENGTH = 10
# RFC 6265 (4.1.1): a cookie-name is an RFC 2616 token: visible ASCII but
# the separators ()<>@,;:\"/[]?={} (and no space or tab); less '%', which
# Envoy-based implementations of the Gateway API (Istio's, Envoy Gateway's)
# read in a header value as a formatter's (%HOSTNAME% is the pod's name, a
# lone % refuses the route configuration): the Set-Cookie would not be the
# one written
COOKIE_NAME = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")
# The sticky rule's regex (cookie_regex) grows by a character of program per
# character of the name: with 50 it stays within Envoy's limit of 100
# (l4proxy.rules._regex.MAX_PROGRAM_SIZE), so the rule loads in Istio too.
MAX_COOKIE_NAME = 50


# --cookie-same-site: Flagger's sameSite enum
SAME_SITE = ("Strict", "Lax", "None")
# RFC 6265bis: a user agent ignores an attribute value longer than 1024
# octets (a Domain, a host name, is 253 at most anyway).
MAX_COOKIE_ATTRIBUTE = 1024
MAX_COOKIE_DOMAIN = 253
# A Path is compared with the request's path as the browser sends it
# (RFC 6265, 5.1.4), which holds RFC 3986's characters alone: a Path with
# any other (a space, '"', a non-ASCII letter) could never match, and ';'
# or a CTL would end or break the attribute. Nor '?' or '#', which end a
# path. It starts with '/' (else the browser takes the default path). No
# %XX escape either: see COOKIE_NAME.
COOKIE_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
# A host name (RFC 1123 labels joined by dots), its last label not all
# digits (RFC 3696, 2: no top-level domain is, so no IPv4 address is
# taken); no leading dot (RFC 6265, 5.2.3, drops it: written without), no
# port, no trailing dot.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
COOKIE_DOMAIN = re.compile(rf"(?:{_HOST_LABEL}\.)*(?=[A-Za-z0-9-]*[A-Za-z]){_HOST_LABEL}")


@dataclass(frozen=True)
class CookieAttributes:
    """The attributes a session cookie is set with, after its Max-Age
    (``--cookie-path`` and the others; Flagger's ``sessionAffinity``
    fields of the same names), as its ``Set-Cookie`` and its deletion
    carry them (:meth:`__str__`).

    *path* is ``/`` by default where Flagger writes none: a cookie without
    a Path takes the directory of the request that set it (RFC 6265,
    5.1.4), so a user pinned by an answer to ``/api/x`` would be drawn
    again at ``/``, and a deletion from another directory would miss it.
    *domain* "" (none) makes a host-only cookie, *same_site* "" writes
    none (the browser's default). A deletion carries them all: a browser
    replaces only the cookie of the same name, domain and path (and, for
    a Partitioned one, partition), and applies to it the rules it applied
    to the cookie (a ``SameSite=None`` without ``Secure`` dropped, a
    ``Secure`` cookie not overwritten by one without)."""

    path: str = "/"
    domain: str = ""
    secure: bool = False
    http_only: bool = False
    same_site: str = ""  # "", or one of SAME_SITE
    partitioned: bool = False

    def __str__(self) -> str:
        """As the ``Set-Cookie`` writes them after Max-Age, in Flagger's
        order: ``Domain=example.com; HttpOnly; Partitioned; Path=/;
        SameSite=None; Secure`` (``Path=/`` alone by default)."""
        words = [f"Domain={self.domain}"] if self.domain else []
        words += ["HttpOnly"] if self.http_only else []
        words += ["Partitioned"] if self.partitioned else []
        words.append(f"Path={self.path}")
        words += [f"SameSite={self.same_site}"] if self.same_site else []
        words += ["Secure"] if self.secure else []
        return "; ".join(words)

    def options(self) -> str:
        """The options that give them, as a command line does ("" by default)."""
        words = [f"--cookie-path {shlex.quote(self.path)}"] if self.path != "/" else []
        # (a host name, a choice: nothing a shell reads otherwise)
        words += [f"--cookie-domain {self.domain}"] if self.domain else []
        words += ["--cookie-secure"] if self.secure else []
        words += ["--cookie-http-only"] if self.http_only else []
        words += [f"--cookie-same-site {self.same_site}"] if self.same_site else []
        words += ["--cookie-partitioned"] if self.partitioned else []
        return " ".join(words)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> CookieAttributes:
        """As :meth:`to_json` writes them; a field left out is the
        default's, one unknown refused (a misspelt one would be ignored).
        Checked by :func:`cookie_attributes_problem` too."""
        if not isinstance(data, dict):
            raise ValueError(f"{data!r}: not an object")
        if unknown := sorted(set(data) - {f.name for f in fields(cls)}):
            raise ValueError(f"{data!r}: no attribute {unknown[0]!r}")
        out = cls(**data)
        for name in ("path", "domain", "same_site"):
            if not isinstance(getattr(out, name), str):
                raise ValueError(f"{data!r}: {name} is not a string")
        for name in ("secure", "http_only", "partitioned"):
            if not isinstance(getattr(out, name), bool):
                raise ValueError(f"{data!r}: {name} is not true or false")
        if why := cookie_attributes_problem(out):
            raise ValueError(f"{data!r}: {why}")
        return out


# Today's (and a state file's from before the attributes): Path=/ alone.
PATH_ONLY = CookieAttributes()


def cookie_attributes_problem(a: CookieAttributes) -> str:
    """Why a session cookie cannot be set with *a* ("" it can), naming the
    options: a value that is not a path or a host name (nothing can be
    injected into the ``Set-Cookie``: no ``;``, CTL or space), too long,
    or a combination browsers drop (``SameSite=None`` or ``Partitioned``
    without ``Secure``). The options and the state are checked alike."""
    if len(a.path) > MAX_COOKIE_ATTRIBUTE:
        return (
            f"--cookie-path: {len(a.path)} characters; at most {MAX_COOKIE_ATTRIBUTE} (RFC "
            "6265bis: a browser ignores a longer attribute)"
        )
    if not COOKIE_PATH.fullmatch(a.path):
        return (
            f"--cookie-path {a.path!r}: not a cookie path: it starts with / and holds what a "
            "request's path may (letters, digits and -._~!$&'()*+,=:@/; no ;, space, ? or "
            "#, nor a %XX escape: Envoy-based gateways read % as a formatter's), e.g. /app"
        )
    if a.domain and (len(a.domain) > MAX_COOKIE_DOMAIN or not COOKIE_DOMAIN.fullmatch(a.domain)):
        return (
            f"--cookie-domain {a.domain!r}: not a host name (labels of letters, digits and -, "
            f"joined by dots, {MAX_COOKIE_DOMAIN} characters at most; no leading dot, port or "
            "IP address), e.g. example.com"
        )
    if a.same_site and a.same_site not in SAME_SITE:
        return f"--cookie-same-site {a.same_site!r}: not one of {', '.join(SAME_SITE)}"
    if a.same_site == "None" and not a.secure:
        return (
            "--cookie-same-site None needs --cookie-secure: browsers drop a SameSite=None "
            "cookie without Secure"
        )
    if a.partitioned and not a.secure:
        return (
            "--cookie-partitioned needs --cookie-secure: browsers drop a Partitioned cookie "
            "without Secure"
        )
    return ""


def cookie_name_problem(name: str) -> str:
    """Why *name* cannot be a session cookie's name ("" it can): not an
    RFC 6265 token, or too long for the sticky rule's regex (and what its
    prefix needs: :func:`cookie_prefix_problem`). The options and the state
    are checked alike: a hand-edited state must not write a ``Set-Cookie``
    the options would have refused."""
    if not COOKIE_NAME.fullmatch(name):
        return (
            "not a cookie name (RFC 6265: letters, digits and !#$&'*+-.^_`|~; no space, "
            'nor any of ()<>@,;:\\"/[]?={}, nor %, which Envoy-based gateways read as a '
            "formatter's), e.g. flagger-cookie"
        )
    if len(name) > MAX_COOKIE_NAME:
        return (
            f"{len(name)} characters; at most {MAX_COOKIE_NAME} (the sticky rule's regex "
            "holds it, within Envoy's size limit)"
        )
    return ""


def cookie_prefix_problem(name: str, attributes: CookieAttributes) -> str:
    """Why a cookie *name* cannot be set with *attributes* ("" it can): a
    browser keeps a ``__Secure-`` cookie only with ``Secure``, a ``__Host-``
    one only with ``Secure``, ``Path=/`` and no ``Domain`` (RFC 6265bis,
    the prefix in any case), and, where browsers take the newer prefixes
    (6265bis drafts since 2024), an ``__Http-`` one only with ``Secure``
    and ``HttpOnly``, a ``__Host-Http-`` one with both prefixes' needs; the
    message says which options to give or drop."""
    low = name.lower()
    prefixes = ("__host-http-", "__http-", "__secure-", "__host-")
    prefix = next((name[: len(p)] for p in prefixes if low.startswith(p)), "")
    host = prefix.lower() in ("__host-", "__host-http-")
    http = prefix.lower() in ("__http-", "__host-http-")
    fixes = []
    if prefix and not attributes.secure:
        fixes.append("give --cookie-secure")
    if http and not attributes.http_only:
        fixes.append("give --cookie-http-only")
    if host:
        if attributes.path != "/":
            fixes.append(f"drop --cookie-path {shlex.quote(attributes.path)}")
        if attributes.domain:
            fixes.append("drop --cookie-domain")
    if not fixes:
        return ""
    needs = ["Secure", *(["HttpOnly"] if http else []), *(["Path=/", "no Domain"] if host else [])]
    wanted = ", ".join(needs[:-1]) + f" and {needs[-1]}" if len(needs) > 1 else needs[0]
    return (
        f"a browser keeps a {prefix} cookie only with {wanted}: {', '.join(fixes)} (or choose "
        "a name without that prefix)"
    )


def is_cookie_value(value: object) -> bool:
    """Whether *value* is a cookie value as :func:`new_cookie_value` draws
    them (and so needs no quoting in a ``Set-Cookie`` nor escaping in a
    regex)."""
    return (
        isinstance(value, str)
        and len(value) == COOKIE_VALUE_LENGTH
        and all(c in COOKIE_LETTERS for c in value)
    )


def new_cookie_value(choice: Callable[[str], str]) -> str:
    """A fresh cookie value: :data:`COOKIE_VALUE_LENGTH` letters, each
    ``choice(COOKIE_LETTERS)`` (the shell passes ``secrets.choice``; a
    test, a seeded ``random.Random().choice``)."""
    return "".join(choice(COOKIE_LETTERS) for _ in range(COOKIE_VALUE_LENGTH))


@dataclass(frozen=True)
class SessionAffinity:
    """A rollout's session affinity (``--session-affinity``, Flagger's
    ``analysis.sessionAffinity``), as its state keeps it.

    While the canary has a weight, a response from the canary sets the
    cookie *cookie* = *value* (the rollout's own, drawn once at its start
    and kept across resumes: the clients hold it), *max_age* seconds, and
    every request that sends it back goes to the canary: a user who met the
    new version once stays on it. *primary_cookie* (``--primary-cookie``,
    Flagger's ``primaryCookieName``; "" none) is the same for stable, for
    *primary_max_age* seconds (the interval, as Flagger sets it) and with a
    value of its own at each step (:meth:`primary_value`): a user on stable
    stays there for the rest of a step, then is drawn again at the next
    step's weight, so the canary's share of users grows with the steps.
    Both are set with *attributes* (``--cookie-path`` and the others).
    *previous* (``NAME=VALUE``; "" none) is the cookie that clients of the
    rollout of SERVICE before this one may hold (its own, or, where its
    canary never had a weight, the one it was deleting), expired while
    this one hands out none yet (its mirrored intervals: Flagger's
    ``previousSessionAffinityCookie``), with the attributes it was set
    with, *previous_attributes* (a deletion must name its path and
    domain). :meth:`from_json` checks each as the options are checked: a
    hand-edited state cannot write a broken ``Set-Cookie``; a state from
    before the attributes has today's, ``Path=/`` alone."""

    cookie: str
    value: str
    max_age: int = 86400
    primary_cookie: str = ""
    primary_max_age: int = 60
    previous: str = ""
    attributes: CookieAttributes = PATH_ONLY
    previous_attributes: CookieAttributes = PATH_ONLY

    @property
    def pair(self) -> str:
        """``NAME=VALUE``: the cookie as a client sends it back."""
        return f"{self.cookie}={self.value}"

    def primary_value(self, step: int) -> str:
        """The primary cookie's value at the rollout's *step*: drawn from
        the rollout's value and the step (SHA-256), so that each step has
        its own (Flagger's documented behaviour: a client pinned to stable
        in one step is drawn again in the next), a resumed command writes
        the same one, and the state keeps nothing more. Knowing it tells
        nothing of :attr:`value` (no more than the cookie itself would: a
        client that sends the canary's cookie reaches the canary anyway)."""
        digest = hashlib.sha256(f"{self.value}/{step}".encode()).digest()
        return "".join(COOKIE_LETTERS[b % len(COOKIE_LETTERS)] for b in digest)[
            :COOKIE_VALUE_LENGTH
        ]

    def options(self, max_age: bool = False) -> str:
        """The options that made it, as a command line gives them (with
        ``--cookie-max-age`` where *max_age*; names shell-quoted)."""
        words = [f"--session-affinity {shlex.quote(self.cookie)}"]
        words += [f"--cookie-max-age {self.max_age}"] if max_age else []
        words += (
            [f"--primary-cookie {shlex.quote(self.primary_cookie)}"] if self.primary_cookie else []
        )
        return " ".join([*words, self.attributes.options()]).rstrip()

    def identity(self) -> tuple[str, str, CookieAttributes]:
        """What a resume must give again: (cookie, primary cookie,
        attributes). A browser tells cookies apart by name, domain and
        path: under another Path or Domain the clients would hold two
        cookies of the name, and the rollout's end delete one."""
        return self.cookie, self.primary_cookie, self.attributes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SessionAffinity:
        if not isinstance(data, dict):
            raise ValueError(f"session_affinity {data!r}: not an object")

        def attributes(key: str) -> CookieAttributes:
            try:  # left out: a state from before them (Path=/ alone)
                return CookieAttributes.from_json(data.get(key, {}))
            except ValueError as exc:
                raise ValueError(f"session_affinity {data!r}: {key} {exc}") from None

        try:
            out = cls(
                cookie=data["cookie"],
                value=data["value"],
                max_age=data.get("max_age", 86400),
                primary_cookie=data.get("primary_cookie", ""),
                primary_max_age=data.get("primary_max_age", 60),
                previous=data.get("previous", ""),
                attributes=attributes("attributes"),
                previous_attributes=attributes("previous_attributes"),
            )
        except KeyError as exc:
            raise ValueError(f"session_affinity {data!r}: no {exc}") from None
        for name in ("cookie", "value", "primary_cookie", "previous"):
            if not isinstance(getattr(out, name), str):
                raise ValueError(f"session_affinity {data!r}: {name} is not a string")
        for name in ("max_age", "primary_max_age"):
            value = getattr(out, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"session_affinity {data!r}: {name} is not a positive integer")
        # what a Set-Cookie and the sticky rule's regex are written from:
        # checked as the options are (a hand-edited state must not write
        # a broken header or a rule that matches what it should not)
        for name in ("cookie", "primary_cookie"):
            cookie = getattr(out, name)
            if name == "primary_cookie" and not cookie:
                continue  # none
            if why := cookie_name_problem(cookie) or cookie_prefix_problem(cookie, out.attributes):
                raise ValueError(f"session_affinity {data!r}: {name} {cookie!r}: {why}")
        if out.primary_cookie == out.cookie:
            raise ValueError(f"session_affinity {data!r}: primary_cookie is cookie's name")
        if not is_cookie_value(out.value):
            raise ValueError(
                f"session_affinity {data!r}: value {out.value!r} is not "
                f"{COOKIE_VALUE_LENGTH} letters (as drawn at a rollout's start)"
            )
        if out.previous:
            name, eq, value = out.previous.partition("=")
            if not eq or cookie_name_problem(name) or not is_cookie_value(value):
                raise ValueError(
                    f"session_affinity {data!r}: previous {out.previous!r} is not "
                    f"NAME=VALUE (a cookie name, {COOKIE_VALUE_LENGTH} letters)"
                )
            if why := cookie_prefix_problem(name, out.previous_attributes):
                raise ValueError(f"session_affinity {data!r}: previous {name!r}: {why}")
        return out


@dataclass(frozen=True)
class Owner:
    """The command that drives a progressing rollout, as its state says:
    the process (*pid* on *host*, in the pid namespace *pidns*, started at
    *started*, the kernel's clock ticks since boot: a pid used again is
    another process) and how long it holds it (*lease_until*, seconds since
    the epoch, on the owner's clock), renewed at each of its writes. A
    second command on the same host and pid namespace refuses the rollout
    while that process runs (the shell's :func:`l4proxy.canary.command.alive`);
    one elsewhere (a Job's next pod) waits while the lease lasts, which the
    owner renews every interval and gives up when it stops, and then takes
    the rollout over (:func:`l4proxy.canary.command.await_hold`)."""

    host: str
    pid: int
    pidns: str = ""
    started: int = 0  # 0: not known
    lease_until: float = 0.0

    def same_process(self, other: Owner) -> bool:
        return (self.host, self.pidns, self.pid, self.started) == (
            other.host,
            other.pidns,
            other.pid,
            other.started,
        )

    def same_host(self, other: Owner) -> bool:
        """Whether a pid of *other* names a process here."""
        return (self.host, self.pidns) == (other.host, other.pidns)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Owner:
        if not isinstance(data, dict):
            raise ValueError(f"owner {data!r}: not an object")
        return cls(
            str(data["host"]),
            int(data["pid"]),
            str(data.get("pidns", "")),
            int(data.get("started", 0)),
            float(data.get("lease_until", 0.0)),
        )


@dataclass(frozen=True)
class Hold:
    """What holds a rollout where it is, as its state records it for
    ``status`` (Flagger's Waiting and WaitingPromotion): the webhook type
    *gate* (``confirm-rollout``, ``pre-rollout``, ``confirm-traffic-increase``
    or ``confirm-promotion``), *why* (its answer, as the lines say it) and
    *since* when (seconds since the epoch: the first answer that held it;
    the same gate holding again keeps it)."""

    gate: str
    why: str
    since: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Hold:
        if not isinstance(data, dict):
            raise ValueError(f"hold {data!r}: not an object")
        return cls(str(data["gate"]), str(data["why"]), float(data["since"]))


def rollout_checksum(
    service: str, stable: str, canary: str, steps: Sequence[int], start: float | None
) -> str:
    """The webhooks' ``checksum`` of a rollout (Flagger's names a Canary's
    configuration: its TrackedConfigs and LastAppliedSpec): ten hex digits
    of SHA-256 over SERVICE, the versions, the stages it started with and
    when it started: every rollout has its own, kept in its state, so the
    same across resumes and for whichever command drives it."""
    text = json.dumps([service, stable, canary, list(steps), start])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def affinity_words(a: SessionAffinity | None) -> str:
    """The options that made *a*, for a :class:`Conflict`."""
    return "without --session-affinity" if a is None else f"with {a.options()}"


def mode_of(gateway: GatewayRoute | None) -> str:
    """The mode as the options say it: ``--gateway-api``, or the RouteRule's."""
    return "--gateway-api (an HTTPRoute)" if gateway else "a RouteRule (without --gateway-api)"


@dataclass(frozen=True)
class Rollout:
    """Where a rollout stands; what the state file holds."""

    service: str
    stable: str
    canary: str
    phase: Phase = "progressing"
    step: int = 0  # index into policy.steps while progressing
    weight: int = 0  # the canary's weight now
    failed_checks: int = 0
    checks: int = 0  # intervals graded (halts included)
    reason: str = ""  # why it ended (rolled back, or by hand)
    updated: float = 0.0  # the ``now`` of the last change (seconds since the epoch)
    steps: tuple[int, ...] = field(default=())  # the policy's, to resume with
    # the ``now`` of the start, a resume, or the last pass or fail (None: a
    # state file from before it was kept)
    judged: float | None = None
    # A/B testing: the policy's alternatives (kept once it ended, for
    # status); (): weighted steps (a state file from before it)
    match: tuple[HeaderMatch, ...] = ()
    # Gateway API mode (an HTTPRoute, stable and canary backend Services);
    # None: a RouteRule (a state file from before it)
    gateway: GatewayRoute | None = None
    # --session-affinity (Gateway API mode only); None: none (a state file
    # from before it)
    affinity: SessionAffinity | None = None
    # the command driving it while it progresses (None: none, or a state
    # file from before it); not part of what the rollout is: two states
    # that differ in it alone are the same rollout
    owner: Owner | None = field(default=None, compare=False)
    # the webhooks' checksum of this rollout (rollout_checksum), made at
    # its start and kept; "": a state from before it (see webhook_checksum)
    checksum: str = ""
    # whether its first stage was written (False: it waits, or it ended
    # before it started: nothing was routed to the canary)
    started: bool = True
    # what holds it where it is, while something does (a waiting
    # rollout's webhook, a confirm gate that holds a pass); None: nothing
    hold: Hold | None = None
    # whether a confirm-promotion webhook answered 2xx for the raise to
    # its weight of 100 (a last step of 100, or a first: --steps 100);
    # until one did (a run without one, a state from before the gate was
    # asked there), the pass at that step asks it (gates_of)
    promotion_confirmed: bool = False

    @property
    def mirrored(self) -> bool:
        """Every request goes to stable and is copied to the canary: a
        progressing rollout at weight 0 that is not A/B testing (a rollback
        is weight 0, not progressing, and copies nothing)."""
        return self.phase == "progressing" and self.weight == 0 and not self.match

    @property
    def had_weight(self) -> bool:
        """Whether the canary had a weight at some step of this rollout (and
        so, with session affinity, answers that handed its cookie out):
        progressing, whether it has one now; ended, whether the step it
        ended at had one. A rollout's weight only goes up until it ends (a
        resume never takes it back to its mirrored stages, :func:`resume`),
        so one that ended at a mirrored stage never had one, rolled back
        or promoted by hand alike; nor did one that never started. A step
        that is not one of its steps (a hand-edited state): as if it had."""
        if not self.started:
            return False
        if self.phase == "progressing":
            return self.weight > 0
        if 0 <= self.step < len(self.steps):
            return self.steps[self.step] > 0
        return True

    @property
    def webhook_checksum(self) -> str:
        """:attr:`checksum`; for a state from before it was kept, one of
        what the state has (the same at each read while its steps are)."""
        return self.checksum or rollout_checksum(
            self.service, self.stable, self.canary, self.steps, None
        )

    @property
    def ab_testing(self) -> bool:
        """The requests matching :attr:`match` go to the canary, every other
        to stable: a progressing rollout with a match."""
        return self.phase == "progressing" and bool(self.match)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = list(self.steps)
        d["match"] = [m.to_json() for m in self.match]
        d["gateway"] = None if self.gateway is None else self.gateway.to_json()
        del d["affinity"]
        d["session_affinity"] = None if self.affinity is None else self.affinity.to_json()
        d["owner"] = None if self.owner is None else self.owner.to_json()
        d["hold"] = None if self.hold is None else self.hold.to_json()
        return d

    @classmethod
    def from_json(cls, data: Any) -> Rollout:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            r = cls(
                service=str(data["service"]),
                stable=str(data["stable"]),
                canary=str(data["canary"]),
                phase=data["phase"],
                step=int(data["step"]),
                weight=int(data["weight"]),
                failed_checks=int(data["failed_checks"]),
                checks=int(data.get("checks", 0)),
                reason=str(data.get("reason", "")),
                updated=float(data.get("updated", 0.0)),
                steps=tuple(int(w) for w in data.get("steps", ())),
                judged=None if data.get("judged") is None else float(data["judged"]),
                match=tuple(HeaderMatch.from_json(m) for m in data.get("match") or ()),
                gateway=(
                    None if data.get("gateway") is None else GatewayRoute.from_json(data["gateway"])
                ),
                affinity=(
                    None
                    if data.get("session_affinity") is None
                    else SessionAffinity.from_json(data["session_affinity"])
                ),
                owner=None if data.get("owner") is None else Owner.from_json(data["owner"]),
                checksum=str(data.get("checksum") or ""),
                started=bool(data.get("started", True)),
                hold=None if data.get("hold") is None else Hold.from_json(data["hold"]),
                promotion_confirmed=bool(data.get("promotion_confirmed", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad state: {exc}") from exc
        if r.phase not in PHASES:
            raise ValueError(f"bad state: phase {r.phase!r}")

        if r.affinity is not None and r.gateway is None:
            raise ValueError("bad state: session_affinity without gateway (an HTTPRoute's)")
        return r


@dataclass(frozen=True)
class Event:
    """What one call did, for the display and ``--json``."""

    kind: Literal["start", "resume", "check", "promoted", "rolled_back"]
    rollout: Rollout
    check: Check | None = None
    previous_weight: int | None = None
    mirrored: bool = False  # the check was of a mirrored interval
    # a pass that did not move the rollout on: why its gate (a
    # confirm-traffic-increase or confirm-promotion webhook) holds it
    held: str = ""
    # the check was of the pre-rollout webhooks, before the rollout's
    # first stage was written (nothing routed to the canary yet)
    pre_rollout: bool = False
    # a resume whose options changed the stages: the ones it had (replan)
    replanned: tuple[int, ...] = ()


class Conflict(Exception):
    """Resuming would mix two rollouts (the message says what to do)."""


def resume(
    policy: Policy,
    service: str,
    stable: str,
    canary: str,
    saved: Rollout | None,
    now: float,
    restart: bool = False,
    gateway: GatewayRoute | None = None,
    affinity: SessionAffinity | None = None,
) -> Event:
    """The rollout to run: a new one, or the saved one where it stood.

    * nothing saved, or a finished rollout of other versions: a new rollout
      at the first stage;
    * the same versions A/B testing, and another ``--match`` (or none), or
      a weighted rollout resumed with ``--match``: :class:`Conflict`; the
      same alternatives in any order: resumed with the intervals it passed
      counted (at the last one when ``--iterations`` is now fewer);
    * the same versions, still progressing: resumed at its step and weight
      (never back at the first step, never rolled back); with options that
      change the stages ahead of it (``--steps``, ``--mirror``), at the
      stage it stands at (its weight, or its mirror), along the new stages
      after it (:func:`replan`): nothing moves unjudged, and the next raise
      asks its gates; the hold is dropped (asked anew);
    * the same versions, finished: returned as it ended (the caller reports
      it) unless *restart*: a rolled-back canary gets no traffic again
      without being asked; a promoted one is never started again
      (:class:`Conflict`): its first step would send most requests back to
      stable at once, unjudged, and a promotion stands (the other way
      round, a new rollout, is how to go back);
    * other versions still progressing: :class:`Conflict`;
    * a rollout waiting to start (``waiting``: its command was killed while
      its webhooks held it, or given up since; nothing of it was written
      but its state): resumed, still waiting, with its checksum, its
      failed checks and what holds it (the gates it passed are not asked
      again), where this run's plan is its own (:func:`_same_plan`) and
      not *restart*; else a new rollout, whatever its versions;
    * the same versions progressing in the other mode (*gateway* None or
      not, as the saved one's is not): :class:`Conflict`; in the same mode
      with another port or other Gateways: :class:`Conflict` too. A finished
      rollout of the other mode is another rollout.
    * *affinity* (``--session-affinity``, its value freshly drawn): a new
      rollout takes it, with the cookie that clients of the one before may
      hold as its :attr:`SessionAffinity.previous`, with the attributes it
      was set with: *saved*'s own if its canary ever had a weight
      (:attr:`Rollout.had_weight`), else the one *saved* was deleting (it
      handed none out); a progressing one keeps its own value (the clients
      hold it) and takes the new max ages, but another cookie name or
      other attributes, or none where it had one (or the other way round),
      is a :class:`Conflict`: its cookie holders would lose their version
      (or hold two cookies of the name), or the judged share would change
      kind mid-analysis.
    """
    if saved is not None and saved.phase == "waiting":
        if restart or not _same_plan(saved, policy, stable, canary, gateway, affinity):
            return _start(policy, service, stable, canary, saved, now, gateway, affinity)
        if saved.affinity is not None and affinity is not None:
            # (its value drawn at its start; no client holds it yet)
            ages = replace(
                saved.affinity, max_age=affinity.max_age, primary_max_age=affinity.primary_max_age
            )
            saved = replace(saved, affinity=ages)
        return Event("resume", replace(saved, judged=now))
    same = saved is not None and (saved.stable, saved.canary) == (stable, canary)
    if saved is not None and same and saved.phase == "progressing":
        if (saved.gateway is None) != (gateway is None):
            raise Conflict(
                f"the rollout of {saved.service} from {saved.stable} to {saved.canary} is "
                f"{_where(saved)} through {mode_of(saved.gateway)}: resume it that way, or "
                f"end it first (l4proxy canary promote|abort {saved.service})"
            )
        g, new = saved.gateway, gateway
        # Refused as the mode is: a new port or Gateway would move the
        # rollout's requests mid-analysis (another parent, another
        # listener), and its intervals were judged on the old ones.
        if (
            g is not None
            and new is not None
            and (g.port != new.port or set(g.gateways) != set(new.gateways))
        ):
            given = f"--port {g.port}" + "".join(f" --gateway {n}" for n in g.gateways)
            raise Conflict(
                f"the rollout of {saved.service} from {saved.stable} to {saved.canary} is "
                f"{_where(saved)} with {given}: resume it with those, or end it first "
                f"(l4proxy canary promote|abort {saved.service}) to route it otherwise"
            )
        had = None if saved.affinity is None else saved.affinity.identity()
        if had != (None if affinity is None else affinity.identity()):
            # its cookie holders would lose their version, or the canary's
            # share would change kind mid-analysis
            held = (
                ", whose cookie its clients hold"
                if saved.affinity is not None and saved.had_weight
                else ""
            )
            why = " to start one with session affinity" if saved.affinity is None else ""
            given = "no --session-affinity" if affinity is None else affinity.options()
            raise Conflict(
                f"the rollout of {saved.service} from {saved.stable} to {saved.canary} is "
                f"{_where(saved)} {affinity_words(saved.affinity)}{held}; this command "
                f"gives {given}: resume it with the rollout's, or end it first "
                f"(l4proxy canary promote|abort {saved.service}){why}"
            )
        if saved.affinity is not None and affinity is not None:
            # the value stays (the clients hold it); the ages are the options'
            saved = replace(
                saved,
                affinity=replace(
                    saved.affinity,
                    max_age=affinity.max_age,
                    primary_max_age=affinity.primary_max_age,
                ),
            )
    elif saved is not None and same and (saved.gateway is None) != (gateway is None):
        same = False  # finished in the other mode: a new rollout
    if saved is not None and not same and saved.phase == "progressing":
        raise Conflict(
            f"a rollout of {saved.service} from {saved.stable} to {saved.canary} is "
            f"{_where(saved)}: finish it first (l4proxy canary promote|abort {saved.service})"
        )
    if saved is not None and same and saved.phase == "progressing":
        if set(saved.match) != set(policy.match):
            ended = f"end it first (l4proxy canary promote|abort {saved.service})"
            if not saved.match:
                raise Conflict(
                    f"the rollout of {saved.service} from {saved.stable} to {saved.canary} is "
                    f"{_where(saved)}, not A/B testing: resume it without --match, or {ended}"
                )
            again = " ".join(f"--match '{m}'" for m in saved.match)
            raise Conflict(
                f"the rollout of {saved.service} from {saved.stable} to {saved.canary} is "
                f"{_where(saved)}: resume it with the same alternatives ({again}), or {ended}"
            )
        if saved.match:
            stages = policy.stages
            idx = min(saved.step, len(stages) - 1)
            r = replace(saved, step=idx, weight=0, steps=stages, judged=now)
            return Event("resume", r, previous_weight=saved.weight)
        steps = saved.steps or policy.stages
        if saved.steps:
            replanned, idx = replan(saved, policy)
            if replanned[idx:] != saved.steps[saved.step :]:
                # Options changed between runs: it goes on from where it
                # stands (nothing moves unjudged, no gate is skipped), along
                # the new stages; what held it held a pass toward the old
                # ones (a confirm-promotion hold would skip the next raise's
                # confirm-traffic-increase): the gates are asked anew.
                r = replace(
                    saved,
                    step=idx,
                    steps=replanned,
                    hold=None,
                    checksum=saved.webhook_checksum,  # (a state without one: as it was)
                    updated=now,
                    judged=now,
                )
                return Event("resume", r, previous_weight=saved.weight, replanned=saved.steps)
        # (the deadline counts time the analysis ran: not the time it was stopped)
        r = replace(saved, steps=steps, judged=now)
        return Event("resume", r, previous_weight=saved.weight)
    if saved is not None and same and restart and saved.phase == "promoted":
        # the canary is every user's version now: a restart would send
        # most requests back to stable at once, unjudged (as abort would)
        mode = " --gateway-api" if saved.gateway is not None else ""
        raise Conflict(
            f"the rollout of {saved.service} from {saved.stable} to {saved.canary} was "
            f"promoted ({saved.canary} takes 100 %); --restart would start it again at its "
            f"first step, sending {100 - policy.stages[0]} % of the requests back to "
            f"{saved.stable} at once, unjudged, and a promotion stands (abort refuses it "
            f"too): nothing written. To send {saved.service}'s requests back to {saved.stable}, "
            f"roll it out as a new canary: l4proxy canary {saved.service}{mode} --stable "
            f"{saved.canary} --canary {saved.stable} ..."
        )
    if saved is not None and same and not restart:
        return Event(saved.phase, saved)  # type: ignore[arg-type]
    return _start(policy, service, stable, canary, saved, now, gateway, affinity)


def replan(saved: Rollout, policy: Policy) -> tuple[tuple[int, ...], int]:
    """The stages a progressing, weighted or mirrored rollout *saved* goes
    on with under *policy*, and its index there. A resume moves nothing:
    the rollout stays at the stage it stands at, judged there, and a pass
    goes on to the next of the new stages, through the gates any raise
    asks (``confirm-traffic-increase``, ``confirm-promotion``). So:

    * at a weight: the new stages, with that weight put in its place where
      they lack it (``10,20,30,50,100`` at 30, resumed with ``25,50,75,100``:
      ``25,30,50,75,100`` at index 1: 30 % judged, then 50 %); never lower,
      never mirrored again, never raised unjudged (it was raised to the
      first new step at or above it, with no gate);
    * mirrored, having passed K mirrored intervals: at the (K+1)-th where
      the new ``--mirror`` N has one; else at the last (``(0,)`` before
      the steps where N is 0), still mirrored: the interval under way is
      judged on the copies, and its pass goes live at the first weight
      through ``confirm-traffic-increase`` (it went live at resume, ungated).

    Resumed with the same options, that is *saved*'s own stages and step;
    the caller takes the stages from the one it stands at on as the
    change (stages before it, passed or not, change nothing)."""
    stages = policy.stages
    if saved.mirrored:
        passed = saved.step
        if passed < policy.mirror:
            return stages, passed
        if policy.mirror:
            return stages, policy.mirror - 1
        return (0, *stages), 0
    w = saved.weight
    below = tuple(s for s in stages if s < w)
    return (*below, w, *(s for s in stages if s > w)), len(below)


def _same_plan(
    saved: Rollout,
    policy: Policy,
    stable: str,
    canary: str,
    gateway: GatewayRoute | None,
    affinity: SessionAffinity | None,
) -> bool:
    """Whether a run of *policy* (the versions, *gateway*, *affinity*
    given) would start the rollout *saved* waits to start: the same
    versions, mode, port and Gateways, stages, ``--match`` alternatives
    and cookies. Another plan is another rollout."""
    g = saved.gateway
    if (g is None) != (gateway is None):
        return False
    if (
        g is not None
        and gateway is not None
        and (g.port != gateway.port or set(g.gateways) != set(gateway.gateways))
    ):
        return False
    had = None if saved.affinity is None else saved.affinity.identity()
    return (
        (saved.stable, saved.canary) == (stable, canary)
        and saved.steps == policy.stages
        and set(saved.match) == set(policy.match)
        and had == (None if affinity is None else affinity.identity())
    )


def _start(
    policy: Policy,
    service: str,
    stable: str,
    canary: str,
    saved: Rollout | None,
    now: float,
    gateway: GatewayRoute | None,
    affinity: SessionAffinity | None,
) -> Event:
    """A new rollout at its first stage, after *saved* (None: none)."""
    stages = policy.stages
    if affinity is not None and saved is not None and saved.affinity is not None:
        # the cookie its clients may hold, as it was set: its own if it
        # ever had a weight, else the one it was deleting (it handed none out)
        a = saved.affinity
        if saved.had_weight:
            affinity = replace(affinity, previous=a.pair, previous_attributes=a.attributes)
        else:
            affinity = replace(
                affinity, previous=a.previous, previous_attributes=a.previous_attributes
            )
    r = Rollout(
        service,
        stable,
        canary,
        "progressing",
        0,
        stages[0],
        0,
        0,
        "",
        now,
        stages,
        now,
        policy.match,
        gateway,
        affinity,
        checksum=rollout_checksum(service, stable, canary, stages, now),
    )
    return Event("start", r, previous_weight=_share_before(saved, canary))


def _share_before(saved: Rollout | None, canary: str) -> int | None:
    """The weight *canary* had under the rollout *saved* that a new one
    follows (None: none saved): its canary's weight, or what its stable
    kept (after v2 was promoted, a rollout of v1 starts from 0), or 0: a
    version it did not route. One that never started routed nothing of
    its own, and the one before it is not known: None too."""
    if saved is None or not saved.started:
        return None
    if saved.canary == canary:
        return saved.weight
    if saved.stable == canary:
        return 100 - saved.weight
    return 0


def _where(r: Rollout) -> str:
    """Where a progressing rollout stands, for a :class:`Conflict`."""
    if r.phase == "waiting":
        return "waiting to start (nothing written for it yet)"
    if r.match:
        alts = " or ".join(str(m) for m in r.match)
        return f"A/B testing (requests with {alts}, {r.step}/{len(r.steps)} intervals passed)"
    return "mirrored" if r.mirrored else f"at {r.weight} %"


# The confirm webhooks a passing interval goes through before the rollout
# moves on: one before the canary's live weight goes up, one before its
# weight becomes 100 % (a promotion, or the last step's 100).
Gate = Literal["confirm-traffic-increase", "confirm-promotion"]


def gates_of(policy: Policy, rollout: Rollout, result: Check) -> tuple[Gate, ...]:
    """The gates that *result* passes through, in order, to move *rollout*
    on (none: a fail, a halt, a mirrored or A/B interval followed by
    another):

    * ``confirm-traffic-increase`` where the pass raises the canary's live
      weight: the next step's, the first after the mirrored intervals
      (where Flagger asks none: it is the first time clients get the
      canary's answers), and the promotion's 100 %, as Flagger asks it
      before its promotion too; not while ``confirm-promotion`` holds the
      rollout, which it passed (Flagger's WaitingPromotion); never for an
      A/B test, whose weight does not move before its promotion;
    * ``confirm-promotion`` where it makes the canary's weight 100 %: the
      promotion, or the raise to a last step of 100, which sends the
      canary every request: the promotion in all but name (asked after
      it, every request already the canary's, it approved nothing); the
      pass at such a step then promotes without a gate, where a
      confirm-promotion webhook confirmed the raise
      (:attr:`Rollout.promotion_confirmed`). Where none did (the raise
      made without one, or by a version that asked it only at the
      promotion: a state it wrote has no record of it), that pass asks
      it: a resumed rollout is never promoted past the gate.

    The shell asks the gates' webhooks, up to the first that holds, and
    hands :func:`advance` what it said."""
    if rollout.phase != "progressing" or result.verdict != "pass":
        return ()
    steps = rollout.steps or policy.stages
    last = rollout.step + 1 >= len(steps)
    if last and rollout.weight == 100 and not rollout.promotion_confirmed:
        return ("confirm-promotion",)
    weight = 100 if last else steps[rollout.step + 1]
    return _gates(rollout, rollout.weight, weight)


def first_gates(rollout: Rollout) -> tuple[Gate, ...]:
    """The gates before a new *rollout*'s first stage is written: its first
    weight is a raise of the canary's live weight (from 0), unless it is
    mirrored or A/B testing (no client is routed to the canary by weight),
    and a promotion where it is 100 % (``--steps 100``)."""
    return _gates(rollout, 0, rollout.steps[0] if rollout.steps else 0)


def _gates(rollout: Rollout, weight: int, to: int) -> tuple[Gate, ...]:
    out: list[Gate] = []
    promotion_held = rollout.hold is not None and rollout.hold.gate == "confirm-promotion"
    if to > weight and not rollout.match and not promotion_held:
        out.append("confirm-traffic-increase")
    if to == 100 and weight < 100:
        out.append("confirm-promotion")
    return tuple(out)


def with_hook_failures(graded: Check, reasons: Sequence[str]) -> Check:
    """*graded* with the rollout webhooks' failures of its interval
    (*reasons*, each a hook that did not answer 2xx): a failed check,
    whatever its numbers said (Flagger runs them before the metric checks,
    and one that fails fails the iteration). A halt's reason (too few
    requests) is dropped, a fail's kept after them; none: *graded* as it
    is."""
    if not reasons:
        return graded
    kept = graded.reasons if graded.verdict == "fail" else ()
    return replace(graded, verdict="fail", reasons=(*reasons, *kept))


def advance(
    policy: Policy,
    rollout: Rollout,
    result: Check,
    now: float,
    held: Hold | None = None,
    promotion_confirmed: bool = False,
) -> Event:
    """Apply one graded interval to a progressing rollout. *held*: the gate
    of :func:`gates_of` that holds it (None: none, or they passed): a pass
    is judged (and keeps the progress deadline away) but leaves the
    rollout at its stage, the hold recorded in it (since the first time
    that gate held it), and the event says why. A pass that moves on, or
    an end, clears the hold; a fail or a halt keeps it (the gate was not
    asked: Flagger's WaitingPromotion lasts through failed checks).
    *promotion_confirmed*: a confirm-promotion webhook answered 2xx for
    this pass; a raise to a last step of 100 records it
    (:attr:`Rollout.promotion_confirmed`)."""
    if rollout.phase != "progressing":
        return Event(rollout.phase, rollout)  # type: ignore[arg-type]
    r = replace(rollout, checks=rollout.checks + 1, updated=now)
    before = rollout.weight
    mirrored = rollout.mirrored
    steps = rollout.steps or policy.stages
    if result.verdict == "halt":
        since = rollout.updated if rollout.judged is None else rollout.judged
        # never less than two intervals: with --interval past the deadline,
        # one quiet interval rolled back
        limit = max(policy.progress_deadline, 2 * policy.interval)
        if policy.progress_deadline and now - since >= limit:
            r = replace(
                r,
                phase="rolled_back",
                weight=0,
                reason=f"nothing judged for {now - since:.0f} s (--progress-deadline "
                f"{policy.progress_deadline:g}, two intervals at least): "
                f"{'; '.join(result.reasons)}",
                hold=None,
            )
            return Event("rolled_back", r, result, before, mirrored)
        return Event("check", r, result, before, mirrored)
    r = replace(r, judged=now)
    if result.verdict == "fail":
        r = replace(r, failed_checks=r.failed_checks + 1)
        if r.failed_checks >= policy.threshold:
            why = "; ".join(result.reasons)
            r = replace(
                r,
                phase="rolled_back",
                weight=0,
                reason=f"{count(r.failed_checks, 'failed check')} (--threshold "
                f"{policy.threshold}): {why}",
                hold=None,
            )
            return Event("rolled_back", r, result, before, mirrored)
        return Event("check", r, result, before, mirrored)
    if held is not None:
        h = rollout.hold
        if h is not None and h.gate == held.gate:
            held = replace(held, since=h.since)
        r = replace(r, hold=held)
        return Event("check", r, result, before, mirrored, held=held.why)
    r = replace(r, hold=None)
    if r.step + 1 >= len(steps):
        r = replace(r, phase="promoted", weight=100, reason="every step passed")
        return Event("promoted", r, result, before, mirrored)
    r = replace(r, step=r.step + 1, weight=steps[r.step + 1])
    if r.weight == 100:
        r = replace(r, promotion_confirmed=promotion_confirmed)
    return Event("check", r, result, before, mirrored)


def promote(rollout: Rollout, now: float, why: str = "promoted by hand") -> Rollout:
    return replace(rollout, phase="promoted", weight=100, reason=why, updated=now, hold=None)


def roll_back(rollout: Rollout, now: float, why: str = "aborted by hand") -> Rollout:
    return replace(rollout, phase="rolled_back", weight=0, reason=why, updated=now, hold=None)


def fail_before_start(
    policy: Policy, rollout: Rollout, reasons: Sequence[str], now: float
) -> Event:
    """A failed pre-rollout check of a *waiting* rollout (*reasons*: its
    hooks that failed): counted toward ``threshold`` as any failed check,
    the rollout still waiting (nothing routed: weight 0, its previous 0),
    or at the threshold rolled back, never started."""
    going = replace(rollout, phase="progressing")
    ev = advance(policy, going, Check("fail", None, None, None, tuple(reasons)), now)
    r = ev.rollout if ev.kind == "rolled_back" else replace(ev.rollout, phase="waiting")
    return replace(ev, rollout=r, previous_weight=0, mirrored=False, pre_rollout=True)


def waiting(rollout: Rollout) -> Rollout:
    """A new *rollout* (:func:`resume`'s start) as its state holds it while
    its webhooks hold its start: nothing routed (weight 0), not started."""
    return replace(rollout, phase="waiting", weight=0, started=False)


def started(rollout: Rollout) -> Rollout:
    """A *waiting* rollout once its webhooks let it start: at its first
    stage, progressing, nothing holding it."""
    steps = rollout.steps
    return replace(rollout, phase="progressing", weight=steps[0], started=True, hold=None)


def run_table(
    policy: Policy, samples: Sequence[Sample], start: Rollout | None = None
) -> list[Event]:
    """Drive a rollout over *samples* (one per interval) until it ends: the
    whole analysis as a pure function, for tests and ``--simulate``."""
    ev = (
        resume(policy, "svc", "v1", "v2", None, 0.0)
        if start is None
        else Event("resume", start, previous_weight=start.weight)
    )
    out = [ev]
    for i, s in enumerate(samples):
        if ev.rollout.phase != "progressing":
            break
        graded = check(policy, s, ev.rollout.mirrored)
        ev = advance(policy, ev.rollout, graded, float(i + 1) * policy.interval)
        out.append(ev)
    return out
