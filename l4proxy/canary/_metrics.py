"""Where ``l4proxy canary`` reads the canary's requests: sidecars or Prometheus.

Theory of operation
-------------------
Both sources answer one question per interval: how many requests did the
canary version of SERVICE get, how many failed (5xx, or response code 0:
no response at all, see :func:`failed`), and what was their p99?
(a :class:`~l4proxy.canary._analysis.Sample`). Parsing and arithmetic are pure
functions here; the only I/O is :func:`http_get`.

**Sidecars** (``--metrics URL``, repeatable). Each sidecar's ``/stats``
carries Istio's standard metrics when it runs ``l4proxy run --http-routing
request`` (per-connection routing has no requests to count):
``istio_requests_total{destination_service_name, destination_version,
response_code}`` and the cumulative histogram
``istio_request_duration_milliseconds_bucket{..., le}``. They are counters,
so a :class:`CounterWindow` keeps the last value of every series of every URL
and takes deltas. A sidecar that restarted starts again from 0: a new
``process_start_time_seconds``, or any series of a URL lower than last time
(or gone), means that sidecar restarted, and every one
of its series counts its new value whole (Prometheus' ``rate()`` decides per
series, which mixed a restart's fresh counts with old ones: a 503 series
from 40 to 45 across a restart counted 5 errors, not 45); a series seen
for the first time counts from 0 only after the first reading (the
baseline), never with its history.
Deltas are summed over URLs (a bucket's zero delta included: it is where
the next bucket's interpolation starts); p99 is :func:`histogram_quantile`
over the summed bucket deltas (linear inside the bucket, as Prometheus
does), and ``math.inf`` when it lies beyond the largest finite bucket.

**Mirrored intervals** (``--mirror``): the canary serves no client then;
what it is judged on is its answers to the copies of stable's requests,
which the calling sidecar counts as ``l4proxy_mirror_requests_total`` and
``l4proxy_mirror_request_duration_milliseconds_bucket`` (the labels and
buckets of Istio's two; ``response_code`` 0: the copy got no answer),
plus whatever requests it served itself (testers pinned to it by a header
rule): both families summed, with the same deltas and restarts. A sidecar
without the copies' family (an l4proxy from before it) cannot be read at a
mirrored interval (:data:`NO_MIRROR_METRICS`): judged on its pinned
requests alone, the canary would halt for ever or pass on a handful.

**Prometheus** (``--prometheus URL``): the PromQL Flagger runs for Istio
(request-success-rate and request-duration), with l4proxy's labels (the
sidecar reports as ``reporter="source"`` and names the version in
``destination_version``), plus ``increase()`` for the request count,
against ``/api/v1/query``. Their range is the interval, exactly
(:func:`window`). At a mirrored interval each family's ``rate()`` or
``increase()`` is taken on its own, then summed (:func:`both`). Which
rules each sidecar serves comes from the same Prometheus
(:func:`marks_query`): the sidecars' ``l4proxy_rules_digest`` and
``l4proxy_rules_generation`` as scraped, one
:class:`~l4proxy.stats.RulesMark` per scrape target (:func:`marks_of`).
"""

from __future__ import annotations

import http.client
import json
import math
import re
import urllib.error
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from l4proxy._http import urlopen as direct_urlopen
from l4proxy.canary._analysis import Sample, count
from l4proxy.rules.watch import FILE_HELD
from l4proxy.stats import DIGEST, GENERATION, START_TIME, RulesMark

REQUESTS = "istio_requests_total"
BUCKETS = "istio_request_duration_milliseconds_bucket"
# a mirrored copy's answer, as the calling sidecar counts it (the same labels)
MIRROR_REQUESTS = "l4proxy_mirror_requests_total"
MIRROR_BUCKETS = "l4proxy_mirror_request_duration_milliseconds_bucket"
# copies a sidecar dropped, of every mirror (no labels: not per version)
MIRROR_DROPPED = "l4proxy_http_mirror_dropped_total"
COUNTED = (REQUESTS, BUCKETS, MIRROR_REQUESTS, MIRROR_BUCKETS, MIRROR_DROPPED)

NO_REQUEST_METRICS = (
    "{url} has no {name}: l4proxy canary reads per-request metrics, which a sidecar "
    "reports only when it runs 'l4proxy run --http-routing request' (restart it with "
    "that option), or point --metrics at an l4proxy sidecar's admin endpoint"
)
NO_MIRROR_METRICS = (
    "{url} has no {name}: a mirrored interval judges the canary's answers to the copies "
    "of stable's requests, which only an l4proxy sidecar recent enough to report that "
    "family counts; upgrade the sidecar, or run without --mirror"
)


class MetricsError(Exception):
    """A source could not be read (the message names it and what to do)."""


# -- the Prometheus text format -------------------------------------------------
_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')

Series = tuple[str, tuple[tuple[str, str], ...]]  # name, sorted labels


def parse_text(text: str) -> tuple[dict[Series, float], set[str]]:
    """Prometheus text exposition -> ({(name, labels): value}, names declared
    by ``# TYPE``). Lines it cannot read are skipped, as a scraper does."""
    values: dict[Series, float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "TYPE":
                declared.add(parts[2])
            continue
        m = _LINE.match(line.strip())
        if not m:
            continue
        name, raw, value = m.groups()
        labels: list[tuple[str, str]] = []
        if raw:
            body = raw[1:-1]
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                if not lm:
                    break
                v = lm.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                labels.append((lm.group(1), v))
                pos = lm.end()
        try:
            values[(name, tuple(sorted(labels)))] = float(value)
        except ValueError:
            continue
    return values, declared


def is_service(labels: Mapping[str, str], service: str) -> bool:
    """SERVICE as the user names it: short name, or the host (FQDN)."""
    return service in (labels.get("destination_service_name"), labels.get("destination_service"))


@dataclass
class Totals:
    """One version's counters (or their deltas) for one service."""

    requests: float = 0.0
    errors: float = 0.0  # failed: 5xx, or 0
    buckets: dict[float, float] = field(default_factory=dict)  # le (ms) -> cumulative count

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n

    def sample(self) -> Sample:
        return Sample(self.requests, self.errors, histogram_quantile(0.99, self.buckets))


# The response codes of failed requests, as PromQL's regular expression
# (anchored, as PromQL's are) and in Python: a 5xx, or 0, a request that got
# no response at all (Envoy's and l4proxy's response_code for a request reset
# before its response: a canary that resets connections, or that its clients
# give up on, failed them). Flagger's Istio query (response_code!~"5.*")
# counts 0 as a success.
FAILED_CODES = "5.*|0"


def failed(code: str) -> bool:
    """Whether a ``response_code`` label is a failed request (FAILED_CODES)."""
    return code.startswith("5") or code == "0"


def totals_of(
    values: Mapping[Series, float], service: str, version: str, mirrored: bool = False
) -> Totals:
    """Sum the series of SERVICE's *version* (over response codes, workloads);
    *mirrored*: its answers to copies too."""
    t = Totals()
    wanted = COUNTED if mirrored else (REQUESTS, BUCKETS)
    for (name, labels), v in values.items():
        if name not in wanted:
            continue
        d = dict(labels)
        if not is_service(d, service) or d.get("destination_version") != version:
            continue
        if name in (REQUESTS, MIRROR_REQUESTS):
            t.requests += v
            if failed(d.get("response_code", "")):
                t.errors += v
        else:
            le = _le(d.get("le", ""))
            if le is not None:
                t.buckets[le] = t.buckets.get(le, 0.0) + v
    return t


def _le(text: str) -> float | None:
    if text in ("+Inf", "Inf", "inf"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        return None


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative buckets {le: count}.

    The rank q·total falls in the first bucket whose count reaches it; the
    value is interpolated linearly between that bucket's bounds (the first
    bucket starts at 0). None when there is no observation.

    A rank in the +Inf bucket answers ``math.inf``, where Prometheus answers
    the highest finite bound: all that is known is that the quantile is
    above every finite bound, so a number would be made up. It was 0 when
    no finite bucket had been seen (a canary slower than the largest one
    passed --max-p99), and the highest bound passes a --max-p99 above it
    however slow the canary is. inf fails every --max-p99.
    """
    if not buckets:
        return None
    les = sorted(buckets)
    total = buckets[les[-1]] if les[-1] == math.inf else max(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le in les:
        n = buckets[le]
        if n >= rank:
            if le == math.inf:
                return math.inf
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


class CounterWindow:
    """Deltas of counters read from several sidecars, with resets handled.

    :meth:`read` takes one reading of every URL's parsed ``/stats`` and
    returns what happened since the previous reading, summed; the first
    reading of a URL is the baseline and contributes nothing.
    """

    def __init__(self) -> None:
        self._last: dict[str, dict[Series, float]] = {}
        self._started: dict[str, float | None] = {}

    def read(self, readings: Mapping[str, Mapping[Series, float]]) -> dict[Series, float]:
        out: dict[Series, float] = {}
        for url, values in readings.items():
            last = self._last.get(url)
            now = {k: v for k, v in values.items() if k[0] in COUNTED}
            started = values.get((START_TIME, ()))
            if last is not None:
                # one series lower than last time, or gone (a live sidecar
                # never drops one), or a new process_start_time_seconds: the
                # sidecar restarted, and all its series count since then
                # (none may be taken as a delta). The start time tells a
                # restart whose every counter passed its old value; without
                # it (an older sidecar) such a restart reads as traffic.
                before = self._started.get(url)
                reset = any(now.get(key, 0.0) < v for key, v in last.items()) or (
                    started is not None and before is not None and started != before
                )
                for key, v in now.items():
                    delta = v if reset else v - last.get(key, 0.0)
                    # a bucket's 0 is kept: it bounds the next bucket from below
                    if delta or key[0] in (BUCKETS, MIRROR_BUCKETS):
                        out[key] = out.get(key, 0.0) + delta
            self._last[url] = now
            self._started[url] = started
        return out


# -- sidecars -----------------------------------------------------------------
def stats_url(url: str) -> str:
    """``127.0.0.1:15000`` or ``http://host:15000`` -> ``http://host:15000/stats``."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/stats"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def http_get(url: str, timeout: float = 3.0) -> str:
    try:
        with direct_urlopen(url, timeout=timeout) as r:  # never http_proxy
            body: bytes = r.read()
            return body.decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise MetricsError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # HTTPException: a port that does not speak HTTP (BadStatusLine)
        reason = getattr(exc, "reason", exc)
        raise MetricsError(f"{url}: cannot read it ({reason})") from exc


def read_sidecar(
    url: str, text: str, mirrored: bool = False
) -> tuple[dict[Series, float], RulesMark | None]:
    """Parse one sidecar's ``/stats``: (its series, which rules it serves).
    Raises :class:`MetricsError` when it has no per-request metrics, or
    (*mirrored*) no family for the copies' answers."""
    values, declared = parse_text(text)
    for name, missing in ((REQUESTS, NO_REQUEST_METRICS), (MIRROR_REQUESTS, NO_MIRROR_METRICS)):
        if name == MIRROR_REQUESTS and not mirrored:
            continue
        # declared with no series yet: a new sidecar writes "NAME 0"
        if name not in declared and not any(k[0] == name for k in values):
            raise MetricsError(missing.format(url=url, name=name))
    wanted = COUNTED if mirrored else (REQUESTS, BUCKETS)
    for (name, labels), v in values.items():
        # NaN compares false with every limit: a canary counted NaN passed
        if name in wanted and not (math.isfinite(v) and v >= 0):
            shown = ",".join(f'{k}="{val}"' for k, val in labels)
            raise MetricsError(f"{url}: {name}{{{shown}}} is {v:g}, not a count")
    return values, RulesMark.of({name: v for (name, labels), v in values.items() if not labels})


# -- Prometheus -----------------------------------------------------------------
def _selector(service: str, version: str, reporter: str, extra: str = "") -> str:
    sel = (
        f'reporter="{reporter}",destination_service_name="{_q(service)}",'
        f'destination_version="{_q(version)}"'
    )
    return sel + (f",{extra}" if extra else "")


def _q(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def window(interval: float) -> float:
    """The seconds a check's queries cover: the interval, to the millisecond."""
    return max(1, round(interval * 1000)) / 1000


def range_of(interval: float) -> str:
    """:func:`window` as a PromQL range: ``30s``, or ``1500ms`` (it was the
    interval rounded up to a second: 1.5 s covered 2 s, the last half
    second before the window, which after a change is traffic at the weight
    before it)."""
    ms = max(1, round(interval * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def promql(
    service: str,
    version: str,
    interval: float,
    reporter: str = "source",
    mirrored: bool = False,
) -> dict[str, str]:
    """The three queries of one check: requests, success rate (%), p99 (ms).

    Flagger's built-in Istio metrics ``request-success-rate`` and
    ``request-duration`` (a response code 0 failed too: FAILED_CODES),
    selecting the version by ``destination_version``
    (Flagger selects a Deployment by ``destination_workload``; the sidecar
    names both, the version is what the rules route on).

    *mirrored*: the same queries over both families, the requests and the
    copies' answers (:func:`both`: each family's ``rate()`` or
    ``increase()`` apart, then summed, so that the ratio and the quantile
    are of their sum), and a fourth, ``copies``, of the copies alone
    (:func:`copies_missing` reads it).
    """
    window = f"[{range_of(interval)}]"
    sel = _selector(service, version, reporter)
    ok = _selector(service, version, reporter, f'response_code!~"{FAILED_CODES}"')
    if not mirrored:
        return {
            "requests": f"sum(increase({REQUESTS}{{{sel}}}{window}))",
            "success_rate": (
                f"sum(rate({REQUESTS}{{{ok}}}{window})) / "
                f"sum(rate({REQUESTS}{{{sel}}}{window})) * 100"
            ),
            "p99": f"histogram_quantile(0.99, sum(rate({BUCKETS}{{{sel}}}{window})) by (le))",
        }
    requests = (REQUESTS, MIRROR_REQUESTS)
    buckets = (BUCKETS, MIRROR_BUCKETS)
    return {
        "requests": f"sum({both('increase', requests, sel, window)})",
        "success_rate": (
            f"sum({both('rate', requests, ok, window)}) / "
            f"sum({both('rate', requests, sel, window)}) * 100"
        ),
        "p99": f"histogram_quantile(0.99, sum({both('rate', buckets, sel, window)}) by (le))",
        "copies": f"sum(increase({MIRROR_REQUESTS}{{{sel}}}{window}))",
    }


# The label that tells the two families apart once rate() has dropped their
# names (see both); a name no scrape configuration is likely to add.
FAMILY = "l4proxy_canary_family"


def both(function: str, names: tuple[str, str], sel: str, window: str) -> str:
    """*function* (``rate``, ``increase``) of each family in *names* on its
    own, as one vector of both: each result labelled with its family.

    One selector for both (``{__name__=~"A|B",...}``) is refused by
    Prometheus as soon as a series of each has the same labels (the
    requests and the copies' answers have the same labels by design):
    ``rate()`` drops ``__name__``, and "vector cannot contain metrics with
    the same labelset" (prometheus#11397); the canary's own requests beside
    its copies (testers pinned by a header rule, or a version that was live
    earlier since the sidecar started) failed every mirrored check. Nor is
    ``rate(A) or rate(B)`` enough: ``or`` drops B's series whose labels A
    has. With :data:`FAMILY` set, no series of one family has the labels of
    one of the other, and ``or`` keeps them all; a family without any
    series leaves the other's, where ``+`` would be empty. The caller sums
    the result (``by (le)`` for the buckets), which drops :data:`FAMILY`."""
    parts = (
        f'label_replace({function}({name}{{{sel}}}{window}), "{FAMILY}", "{name}", "", "")'
        for name in names
    )
    return " or ".join(parts)


def stable_query(service: str, stable: str, interval: float, reporter: str = "source") -> str:
    """Stable's requests in a mirrored interval: each of them was copied."""
    return (
        f"sum(increase({REQUESTS}{{{_selector(service, stable, reporter)}}}[{range_of(interval)}]))"
    )


def copies_missing(
    copies: float | None, stable: float | None, min_requests: int, service: str, canary: str
) -> str:
    """Why a mirrored interval cannot be judged from Prometheus ("" if it can).

    Prometheus keeps no series of a family no sidecar has reported, so an
    older sidecar's missing copies read as none at all: *copies* is None
    (an empty vector, not 0). Where stable served enough requests to judge
    in that interval, every one of them was copied: no copies' series at
    all is then the family missing, not too little traffic (a halt, which
    went on for ever with --progress-deadline 0)."""
    if copies is not None or stable is None or stable < max(min_requests, 1):
        return ""
    return (
        f"Prometheus has no {MIRROR_REQUESTS} of {service} {canary}, although stable "
        f"served {count(round(stable), 'request')} in the interval, each copied to {canary}: "
        "the sidecars "
        "do not count their copies' answers (an l4proxy from before that family: upgrade "
        "them), or their /stats are not scraped"
    )


def query_url(base: str, query: str) -> str:
    if "://" not in base:
        base = "http://" + base
    return base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})


def parse_query_response(url: str, text: str) -> float | None:
    """One instant-vector answer -> its value; None when empty or NaN."""
    result = _result(url, text)
    if not result:
        return None
    try:
        v = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise MetricsError(f"{url}: unexpected answer ({result[0]!r})") from exc
    return None if math.isnan(v) or math.isinf(v) else v


def parse_query_vector(url: str, text: str) -> list[tuple[dict[str, str], float]]:
    """An instant-vector answer -> every series' (labels, value)."""
    rows: list[tuple[dict[str, str], float]] = []
    for row in _result(url, text):
        try:
            metric = row["metric"]
            v = float(row["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MetricsError(f"{url}: unexpected answer ({row!r})") from exc
        if not isinstance(metric, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in metric.items()
        ):
            raise MetricsError(f"{url}: unexpected answer ({row!r})")
        rows.append((metric, v))  # NaN kept: RulesMark.of takes it as absent
    return rows


def _result(url: str, text: str) -> list[Any]:
    """The ``data.result`` of an answer (a scalar as one row)."""
    try:
        doc: Any = json.loads(text)
    except ValueError as exc:
        raise MetricsError(f"{url}: not a Prometheus API answer (not JSON)") from exc
    if not isinstance(doc, dict) or doc.get("status") != "success":
        err = doc.get("error") if isinstance(doc, dict) else None
        raise MetricsError(f"{url}: Prometheus says: {err or 'no status success'}")
    data = doc.get("data") or {}
    if not isinstance(data, dict):
        raise MetricsError(f"{url}: unexpected answer (data is not an object)")
    result = data.get("result")
    if data.get("resultType") == "scalar" and isinstance(result, list):
        result = [{"value": result}]
    if not isinstance(result, list):
        raise MetricsError(f"{url}: unexpected answer (no data.result list)")
    return result


def marks_query(service: str | tuple[str, ...], reporter: str = "source") -> str:
    """The sidecars' rules marks, of the sidecars that route SERVICE, and
    the rule files each holds back (:data:`FILE_HELD`: :func:`held_of`).

    Only the scrape targets (``job``, ``instance``) that report requests to
    SERVICE: the traffic the checks judge is theirs, and a Prometheus that
    scrapes sidecars watching other rules (another namespace's ConfigMap)
    would have their marks never move. A caller that has sent SERVICE no
    request yet has no such series and is not waited for. Several names
    (Gateway API mode: SERVICE and the backends', which is what its
    requests report when a backend has a ServiceEntry of its own): any."""
    sel = _services_selector(service, reporter)
    names = f"{GENERATION}|{DIGEST}|{FILE_HELD}"
    return f'{{__name__=~"{names}"}} and on (job, instance) {REQUESTS}{{{sel}}}'


def _services_selector(service: str | tuple[str, ...], reporter: str) -> str:
    """The labels of the requests reported to SERVICE (or to any of
    several names), by *reporter*."""
    names = (service,) if isinstance(service, str) else service
    if len(names) == 1:
        return f'reporter="{_q(reporter)}",destination_service_name="{_q(names[0])}"'
    alts = "|".join(re.escape(n) for n in names)
    return f'reporter="{_q(reporter)}",destination_service_name=~"{_q(alts)}"'


def dropped_query(service: str | tuple[str, ...], interval: float, reporter: str = "source") -> str:
    """The copies dropped (:data:`MIRROR_DROPPED`, of every mirror: it has
    no labels) in the window, summed over the scrape targets that report
    requests to SERVICE (:func:`marks_query`'s: the sidecars whose traffic
    is mirrored), as the sidecars' own counters are with ``--metrics``."""
    sel = _services_selector(service, reporter)
    window = f"[{range_of(interval)}]"
    return f"sum(increase({MIRROR_DROPPED}{window}) and on (job, instance) {REQUESTS}{{{sel}}})"


def targets_query(targets: Iterable[str]) -> str:
    """``up`` and the rules marks of these targets (keys of :func:`marks_of`),
    whatever they report: where a target that :func:`marks_query` no longer
    answers has gone. A target whose scrape failed has ``up`` 0 and its
    other series marked stale (absent); one removed (a pod deleted) has no
    ``up`` either."""
    names = f'__name__=~"up|{GENERATION}|{DIGEST}"'
    return " or ".join("{" + names + ("," + t[1:-1] if t != "{}" else "") + "}" for t in targets)


def target_of(metric: Mapping[str, str]) -> str:
    """A series' scrape target: its labels but ``__name__`` (job, instance,
    and whatever the scrape configuration adds: pod, namespace), written as
    a PromQL selector (``up`` of the target has exactly these labels)."""
    labels = sorted((k, x) for k, x in metric.items() if k != "__name__")
    return "{" + ",".join(f'{k}="{_q(x)}"' for k, x in labels) + "}"


def marks_of(rows: Iterable[tuple[Mapping[str, str], float]]) -> dict[str, RulesMark | None]:
    """The rules marks among *rows* -> {target (:func:`target_of`): its mark}."""
    found: dict[str, dict[str, float | None]] = {}
    for metric, v in rows:
        name = metric.get("__name__")
        if name in (GENERATION, DIGEST):
            found.setdefault(target_of(metric), {})[name] = v
    return {key: RulesMark.of(values) for key, values in found.items()}


def held_of(rows: Iterable[tuple[Mapping[str, str], float]]) -> dict[str, tuple[str, ...]]:
    """The rule files each target among *rows* holds back -> {target
    (:func:`target_of`, the ``file`` label left out): the files, sorted}:
    its :data:`FILE_HELD` series of value 1 (0: a file held once, loaded as
    it is since)."""
    found: dict[str, set[str]] = {}
    for metric, v in rows:
        if metric.get("__name__") == FILE_HELD and v >= 1 and metric.get("file"):
            target = target_of({k: x for k, x in metric.items() if k != "file"})
            found.setdefault(target, set()).add(metric["file"])
    return {key: tuple(sorted(files)) for key, files in found.items()}


def held_files(values: Mapping[Series, float]) -> tuple[str, ...]:
    """The rule files one sidecar's ``/stats`` says it holds back, sorted:
    those whose text as it is was refused, served at their last good
    version or left out while the other files load (``l4proxy run``'s
    :data:`FILE_HELD`, 1 where any worker holds it; none from an l4proxy
    that loads its rules as a whole)."""
    return tuple(
        sorted(
            file
            for (name, labels), v in values.items()
            if name == FILE_HELD and v >= 1 and (file := dict(labels).get("file"))
        )
    )


def is_document(held: str, document: str) -> bool:
    """Whether a file a sidecar names (*held*: its path, as it watches it)
    is the canary's *document* (its path here, or a ConfigMap's key): by
    the name alone, since the two paths differ (a ConfigMap mounted in the
    pods, a directory read over NFS, a relative --rules)."""
    return bool(document) and held.rsplit("/", 1)[-1] == document.rsplit("/", 1)[-1]


def sample_from_prometheus(answers: Mapping[str, float | None]) -> Sample:
    """The three answers of :func:`promql` as a Sample."""
    n = answers.get("requests") or 0.0
    rate = answers.get("success_rate")
    if rate is None and n > 0:
        # Requests, but no non-5xx series to divide: the ratio is an empty
        # vector because nothing succeeded (a canary answering only 5xx),
        # not because nothing failed.
        rate = 0.0
    errors = 0.0 if rate is None else n * (100.0 - rate) / 100.0
    return Sample(n, max(0.0, errors), answers.get("p99"))


def sum_totals(parts: Iterable[Totals]) -> Totals:
    t = Totals()
    for p in parts:
        t.add(p)
    return t
