"""Flagger's webhooks for ``l4proxy canary``: what they are, what their answers decide, the POST.

Theory of operation
-------------------
A webhook is a URL that the analysis POSTs a small JSON document to at a
given moment of a rollout, and whose answer's status code it acts on, as
Flagger's ``analysis.webhooks`` (fluxcd/flagger, pkg/controller/webhook.go
and scheduler_hooks.go). Each has a *type*, which says when it is called
and what its answer does:

* ``confirm-rollout``: asked before a new rollout writes anything, again
  every interval until it answers 2xx: a gate (manual approval).
* ``pre-rollout``: called once the rollout is confirmed, before any request
  goes to the canary. Not 2xx is a failed check (``--threshold`` of them
  roll back) and it is called again at the next interval, until it passes.
* ``rollout``: called at the start of every interval (a load test that
  sends the canary traffic for that interval), and its answer is part of
  the interval's verdict: not 2xx fails the check, whatever the numbers.
* ``confirm-traffic-increase``: asked after a check passes and before the
  canary's live weight goes up (the first weight of a new rollout, the
  first after its mirrored intervals, and the promotion's 100 %,
  included): not 2xx holds the weight where it is, and the next interval
  is judged at it again.
* ``confirm-promotion``: the same, after it, before the canary's weight
  becomes 100 %: a promotion, or the raise to a last step of 100 (which
  sends the canary every request: the promotion in all but name, asked
  there, not once it is done); while it holds, the checks and the
  rollout hooks go on every interval, and their failures count.
* ``rollback``: asked before each verdict (and while a gate holds): 2xx
  rolls the rollout back now, its interval cut short, never judged.
* ``post-rollout``: called once a rollout's end (promotion or rollback) is
  written; its failure is only logged.
* ``event``: every line the command prints is POSTed to it, as plain
  text (each event, and each warning or error on stderr, a ``Warning``);
  its failure is only logged. Sent in the background, as Flagger's
  events are (:class:`EventSender`): a slow or hanging receiver never
  holds the analysis; the gates and the other types are called in line,
  their answers awaited, as Flagger's are.

What an answer means is Flagger's too: a status of 200 to 202 passes
(Flagger's ``r.StatusCode > 202`` fails), anything else fails, and so does
no answer within the hook's *timeout* (10 s where none is given, as
Flagger's ``CallWebhook`` sets it), a refused connection or a body that
cannot be read. The timeout bounds the whole exchange, as Go's
``http.Client.Timeout`` does: connecting, each redirect, the answer's head
and its body, every read of which gets what is left of it
(:class:`_DeadlineReader`), so that an answer trickling in cannot hold the
analysis. A failed call's reason carries the answer's body (its first
line), as Flagger puts it in the failed check's event. Where the hook has
*retries*, a call with no answer, a 429 or a 5xx (but 501) is made again,
after 1, 2, 4 ... s (at most 30 s), as go-retryablehttp does. The client
is Go's in what urllib does otherwise: a user and password in the URL are
sent as ``Authorization: Basic`` (urllib takes them for part of the host),
and a 307 or 308 is followed with the POST and its body again (urllib
refuses it), at most 10 redirects (:class:`_Redirects`).

The body is Flagger's ``CanaryWebhookPayload``: ``name`` (SERVICE),
``namespace`` (the rules' namespace), ``phase`` (Flagger's words for where
the rollout is: :data:`PHASES`), ``checksum`` (the rollout's: a new
rollout has another, a resumed one the same) and ``metadata``, the hook's
own map (an ``event`` hook's: ``eventMessage``, ``eventType`` and
``timestamp``, with the hook's own keys added where they do not clash).

This module holds the webhooks as declared (:class:`Webhook`, from
``--webhook TYPE=URL`` or a file in Flagger's form: :func:`parse_file`),
the pure decisions on their answers (:func:`failures`, :func:`holding`,
:func:`rollback_asked`), and the POST itself (:func:`post`), which is the
only I/O. When each type is called and what its decision does to the
rollout is :mod:`l4proxy.canary._analysis` (:func:`gates_of`,
``advance(held=...)``, :func:`with_hook_failures`) and the command's loop.

The calls honour ``http_proxy``/``https_proxy``/``no_proxy`` (a hook may be
outside the cluster, a chat's incoming webhook behind a proxy), except to
a loopback address, as Go's ``ProxyFromEnvironment`` (Flagger's client)
never proxies one; the sidecars and Prometheus are read directly, always
(:mod:`l4proxy._http`).
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal, get_args

import yaml

HookType = Literal[
    "confirm-rollout",
    "pre-rollout",
    "rollout",
    "confirm-traffic-increase",
    "confirm-promotion",
    "post-rollout",
    "rollback",
    "event",
]
HOOK_TYPES: tuple[HookType, ...] = get_args(HookType)  # (the order above)
# The gates: asked again until they answer 2xx; nothing is counted meanwhile.
GATES: tuple[HookType, ...] = ("confirm-rollout", "confirm-traffic-increase", "confirm-promotion")

# Flagger's phases, as a payload's "phase" names them: a rollout not yet
# started (Initialized), held by confirm-rollout (Waiting), analysed
# (Progressing), its promotion held (WaitingPromotion), promoted
# (Succeeded), rolled back (Failed).
PHASES = ("Initialized", "Waiting", "Progressing", "WaitingPromotion", "Succeeded", "Failed")

# Flagger's CallWebhook: a hook without a timeout gets 10 s.
DEFAULT_TIMEOUT = 10.0
# go-retryablehttp's defaults, which Flagger's client keeps: a retry waits
# 1 s, doubled each time, at most 30 s.
RETRY_WAIT_MIN = 1.0
RETRY_WAIT_MAX = 30.0
# The most of an answer's body read (its first line goes into the reason).
BODY_LIMIT = 64 * 1024
# The most of that first line a reason quotes.
DETAIL_LIMIT = 200

# The events an event hook's sender keeps queued while it waits for an
# answer (EventSender); past that, the oldest is dropped.
EVENT_QUEUE = 64

# Go's time.ParseDuration, as Flagger reads a hook's timeout ("30s", "2m",
# "1m30s", "1.5s", "500ms").
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# The fields of a hook in Flagger's CanaryWebhook; muteAlert mutes
# Flagger's alerts, which this command has none of: accepted, ignored.
FIELDS = ("name", "type", "url", "timeout", "metadata", "retries", "disableTLS", "muteAlert")


class WebhookError(ValueError):
    """A webhook as declared cannot be used (the message names where and why)."""


@dataclass(frozen=True)
class Webhook:
    """One of ``analysis.webhooks``: its *name* ("" for ``--webhook TYPE=URL``),
    *type*, *url*, *timeout* in seconds, *metadata* (the payload's map, in
    the order given), *retries* (calls made again after no answer, a 429 or
    a 5xx) and *disable_tls* (an https URL's certificate not verified)."""

    name: str
    type: HookType
    url: str
    timeout: float = DEFAULT_TIMEOUT
    metadata: tuple[tuple[str, str], ...] = ()
    retries: int = 0
    disable_tls: bool = False

    def __str__(self) -> str:
        """As the lines name it: ``rollout "load test"``, or, without a
        name, ``rollout http://host/path`` (:attr:`shown_url`)."""
        return f'{self.type} "{self.name}"' if self.name else f"{self.type} {self.shown_url}"

    @property
    def shown_url(self) -> str:
        """The URL as the lines and ``--json`` show it: its scheme and host
        (and port), with the path where the hook has no name to tell it by;
        never a user, password, query or fragment. A chat's incoming
        webhook holds its secret in the path (Slack's
        ``/services/T.../B.../SECRET``) or the query (``?token=``), and a
        Job's log or a CI artifact is no place for it: a named hook shows
        its name instead."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{parts.scheme}://{host}" + ("" if self.name else parts.path)

    def to_json(self) -> dict[str, Any]:
        """As ``--json``'s start and resume events list it (never its
        metadata, which may hold a token; the URL as :attr:`shown_url`)."""
        return {
            "name": self.name,
            "type": self.type,
            "url": self.shown_url,
            "timeout": self.timeout,
        }


@dataclass(frozen=True)
class HookResult:
    """What one call of *hook* got: *status*, the answer's status code
    (None: no answer: refused, timed out, not HTTP), and *detail*: the
    answer's body's first line, or why there was no answer; *tries*, the
    calls made (more than one with retries)."""

    hook: Webhook
    status: int | None
    detail: str = ""
    tries: int = 1

    @property
    def ok(self) -> bool:
        """Passed: 200 to 202 (Flagger fails a status over 202)."""
        return self.status is not None and 200 <= self.status <= 202

    def __str__(self) -> str:
        """``rollout "load test": HTTP 500: the test failed`` or
        ``confirm-promotion http://gate/: no answer within 10 s``."""
        said = f"HTTP {self.status}" if self.status is not None else ""
        tail = ": ".join(x for x in (said, self.detail) if x)
        tries = f" ({self.tries} tries)" if self.tries > 1 else ""
        return f"{self.hook}: {tail}{tries}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.hook.name,
            "type": self.hook.type,
            "url": self.hook.shown_url,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "tries": self.tries,
        }


# -- declaring them -----------------------------------------------------------------
def parse_duration(text: str) -> float:
    """A timeout as Flagger takes it (Go's ``time.ParseDuration``: ``30s``,
    ``2m``, ``1m30s``, ``500ms``), in seconds; more than 0."""
    s = text.strip()
    if not s or _DURATION.sub("", s):
        raise WebhookError(f"timeout {text!r}: a duration, e.g. 30s, 2m or 1m30s")
    seconds = sum(float(n) * _UNIT[unit] for n, unit in _DURATION.findall(s))
    if not seconds > 0:
        raise WebhookError(f"timeout {text!r}: more than 0 (Flagger's 0 means none: give one)")
    return seconds


def check_url(url: str, where: str) -> str:
    """*url* as a hook's: http or https, with a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(
            f"{where}: url {url!r} is not an http:// or https:// URL with a host, "
            "e.g. http://flagger-loadtester.test/"
        )
    return url


def _type(value: object, where: str) -> HookType:
    # Flagger: a hook without a type is a rollout hook
    if value is None or value == "":
        return "rollout"
    if value not in HOOK_TYPES:
        raise WebhookError(f"{where}: type {value!r} is not one of {', '.join(HOOK_TYPES)}")
    return next(t for t in HOOK_TYPES if t == value)


def parse_option(text: str) -> Webhook:
    """``--webhook TYPE=URL``: a hook without a name, the default timeout
    and no metadata (a file gives those: :func:`parse_file`)."""
    kind, eq, url = text.partition("=")
    where = f"--webhook {text}"
    if not eq or kind.strip() not in HOOK_TYPES:
        raise WebhookError(f"{where}: expected TYPE=URL, TYPE one of {', '.join(HOOK_TYPES)}")
    return Webhook("", _type(kind.strip(), where), check_url(url.strip(), where))


def parse_file(text: str, source: str) -> tuple[Webhook, ...]:
    """The hooks of a YAML file in Flagger's form: a Canary (its
    ``spec.analysis.webhooks``, or ``spec.canaryAnalysis.webhooks`` as
    v1alpha3 named it), a mapping with ``analysis.webhooks`` or
    ``webhooks``, or the list itself. A file of several documents (a
    Canary saved with its HPA) gives the one of ``kind: Canary``; none, or
    several, is refused. Each entry is Flagger's
    ``CanaryWebhook``: ``name`` and ``url`` required, ``type`` (none:
    ``rollout``), ``timeout`` (a duration), ``metadata`` (strings),
    ``retries``, ``disableTLS``, ``muteAlert`` (ignored: no alerts here);
    any other field is refused, so that a misspelt one is not dropped in
    silence. Only the webhooks are read: the rest of a Canary's analysis
    is this command's options (``--interval``, ``--threshold``...)."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise WebhookError(f"{source}: not YAML: {exc}") from None
    data = documents[0] if documents else None
    if len(documents) > 1:
        # a Canary saved with what goes beside it (its HPA, its Deployment):
        # the Canary's webhooks, where there is one Canary
        canaries = [d for d in documents if isinstance(d, dict) and d.get("kind") == "Canary"]
        if len(canaries) != 1:
            found = "none is" if not canaries else f"{len(canaries)} are"
            raise WebhookError(
                f"{source}: {len(documents)} YAML documents, and {found} a Canary (kind: "
                "Canary): give a file with one Canary among its documents, or the webhooks alone"
            )
        data = canaries[0]
    hooks: object = data
    if isinstance(data, dict):
        spec = data["spec"] if isinstance(data.get("spec"), dict) else data
        analysis = spec.get("analysis", spec.get("canaryAnalysis", spec))
        if not isinstance(analysis, dict) or "webhooks" not in analysis:
            raise WebhookError(
                f"{source}: no webhooks: expected a list, or a mapping with webhooks, "
                "analysis.webhooks or a Canary's spec.analysis.webhooks"
            )
        hooks = analysis["webhooks"]
    if hooks is None:
        return ()
    if not isinstance(hooks, list):
        raise WebhookError(f"{source}: webhooks is not a list")
    return tuple(_entry(entry, f"{source}: webhooks[{i}]") for i, entry in enumerate(hooks))


def _entry(entry: object, where: str) -> Webhook:
    if not isinstance(entry, dict):
        raise WebhookError(f"{where}: not a mapping (name, type, url, timeout, metadata)")
    if unknown := [k for k in entry if k not in FIELDS]:
        raise WebhookError(f"{where}: no field {unknown[0]!r} (a webhook has {', '.join(FIELDS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise WebhookError(f"{where}: name is required (a string, as Flagger's CRD requires)")
    where = f'{where} ("{name}")'
    url = entry.get("url")
    if not isinstance(url, str):
        raise WebhookError(f"{where}: url is required (a string)")
    kind = _type(entry.get("type"), where)
    timeout = entry.get("timeout")
    seconds = DEFAULT_TIMEOUT
    if timeout is not None:
        if not isinstance(timeout, str):
            raise WebhookError(f"{where}: timeout {timeout!r}: a duration string, e.g. 30s")
        try:
            seconds = parse_duration(timeout)
        except WebhookError as exc:
            raise WebhookError(f"{where}: {exc}") from None
    metadata = entry.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise WebhookError(f"{where}: metadata is not a mapping of strings")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WebhookError(
                f"{where}: metadata {k!r}: {v!r} is not a string (Flagger's map of strings: "
                "quote it)"
            )
    retries = entry.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
        raise WebhookError(f"{where}: retries {retries!r}: a whole number from 0 to 10")
    for flag in ("disableTLS", "muteAlert"):
        if not isinstance(entry.get(flag, False), bool):
            raise WebhookError(f"{where}: {flag} {entry[flag]!r}: true or false")
    return Webhook(
        name,
        kind,
        check_url(url, where),
        seconds,
        tuple(metadata.items()),
        retries,
        bool(entry.get("disableTLS", False)),
    )


# -- the payload --------------------------------------------------------------------
def payload(
    hook: Webhook, service: str, namespace: str, phase: str, checksum: str
) -> dict[str, Any]:
    """Flagger's ``CanaryWebhookPayload`` for *hook*: *checksum* names the
    rollout (:func:`l4proxy.canary._analysis.rollout_checksum`), as
    Flagger's names a Canary's configuration; ``metadata`` always there,
    {} where the hook has none."""
    return {
        "name": service,
        "namespace": namespace,
        "phase": phase,
        "checksum": checksum,
        "metadata": dict(hook.metadata),
    }


def event_payload(
    hook: Webhook,
    service: str,
    namespace: str,
    phase: str,
    checksum: str,
    message: str,
    warning: bool,
    now: float,
) -> dict[str, Any]:
    """An ``event`` hook's payload (Flagger's ``CallEventWebhook``): the
    event's *message*, ``Warning`` or ``Normal``, the time in milliseconds
    since the epoch (a string), and the hook's own metadata where its keys
    are not those."""
    metadata = {
        "eventMessage": message,
        "eventType": "Warning" if warning else "Normal",
        "timestamp": str(int(now * 1000)),
    }
    for k, v in hook.metadata:
        metadata.setdefault(k, v)
    out = payload(hook, service, namespace, phase, checksum)
    return {**out, "metadata": metadata}


# -- what the answers decide (pure) -------------------------------------------------
def decided(result: HookResult) -> bool:
    """Whether the hooks of *result*'s type after it are left uncalled, as
    Flagger's loops stop: at the first that fails (a gate that holds, a
    pre-rollout or rollout hook that fails) or, for a rollback hook, the
    first that says roll back. Every post-rollout and event hook is called
    (Flagger stops its post-rollout hooks at a failure; a notification
    missed because another failed helps nobody)."""
    if result.hook.type in ("post-rollout", "event"):
        return False
    if result.hook.type == "rollback":
        return result.ok
    return not result.ok


def failures(results: Sequence[HookResult]) -> tuple[str, ...]:
    """Each failed call of *results* (pre-rollout, rollout hooks), as a
    failed check's reason says it."""
    return tuple(str(r) for r in results if not r.ok)


def holding(results: Sequence[HookResult]) -> str:
    """Why a gate holds ("" where every hook of it answered 2xx): the
    first that did not."""
    return next((str(r) for r in results if not r.ok), "")


def rollback_asked(results: Sequence[HookResult]) -> HookResult | None:
    """The rollback hook that says roll back now (2xx), if one does."""
    return next((r for r in results if r.ok), None)


def retryable(result: HookResult) -> bool:
    """Whether a call is made again, as go-retryablehttp's default policy
    decides: no answer, 429, or a 5xx but 501 (not implemented: a second
    call gets the same)."""
    s = result.status
    return s is None or s == 429 or (500 <= s <= 599 and s != 501)


# -- the POST -----------------------------------------------------------------------
Post = Callable[[Webhook, Mapping[str, Any]], HookResult]


def _loopback(host: str | None) -> bool:
    if host is None or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _left(deadline: float, timeout: float) -> float:
    """What is left of a call's *deadline* (monotonic); none left is a
    :class:`TimeoutError`, as a socket's own timeout would say it."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"no answer within {timeout:g} s")
    return left


class _DeadlineReader(io.RawIOBase):
    """A response's socket as http.client reads it (its head, then its
    body), each read given what is left of the call's deadline as the
    socket's timeout. A socket timeout alone bounds each read, not their
    sum: an answer that trickled in a byte a second held a call with a
    3 s timeout for 50 s. The reads go through the socket's own
    ``SocketIO``, which keeps it open once urllib closes the connection
    after the head (as the file http.client makes would)."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline
        self._timeout = timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_left(self._deadline, self._timeout))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _timed(
    base: type[http.client.HTTPConnection], deadline: float, timeout: float
) -> Callable[..., http.client.HTTPConnection]:
    """urllib's connection class *base* (HTTP or HTTPS) held to a call's
    *deadline*: it connects within what is left of it, and its response
    reads its head and body through :class:`_DeadlineReader`."""

    class Response(http.client.HTTPResponse):
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            self.fp.close()  # (http.client's own file; the socket stays open)
            self.fp = io.BufferedReader(_DeadlineReader(sock, deadline, timeout))

    def connection(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        kwargs["timeout"] = _left(deadline, timeout)
        conn = base(*args, **kwargs)
        conn.response_class = Response
        return conn

    return connection


class _TimedHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: float, timeout: float) -> None:
        super().__init__()
        self.connection = _timed(http.client.HTTPConnection, deadline, timeout)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.connection, req)


class _TimedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self.connection = _timed(http.client.HTTPSConnection, deadline, timeout)
        self.tls = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.connection, req, context=self.tls)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects as Go's ``http.Client`` (Flagger's) follows them: at most
    10; a 307 or 308 sends the POST again with its body (urllib refuses
    to), a 301, 302 or 303 becomes a GET without one (urllib's way and
    Go's); the credentials of the hook's URL (``Authorization``) go only
    to the same scheme, host and port (a relative Location, where Go
    sends them again); and only to http or https."""

    max_redirections = 10

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(
                req.full_url,
                code,
                f"{msg} - redirected to a URL that is not http or https",
                headers,
                fp,
            )
        if code in (307, 308) and req.get_method() == "POST":
            new: urllib.request.Request | None = urllib.request.Request(
                newurl.replace(" ", "%20"),
                data=req.data,
                headers=dict(req.headers),
                origin_req_host=req.origin_req_host,
                unverifiable=True,
                method="POST",
            )
        else:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _opener(hook: Webhook, deadline: float) -> urllib.request.OpenerDirector:
    """urllib with the environment's proxy (none to a loopback address),
    with disableTLS no certificate check, Go's redirects, and every
    connection held to the call's *deadline*."""
    context = None
    if hook.disable_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    handlers: list[urllib.request.BaseHandler] = [
        _TimedHTTP(deadline, hook.timeout),
        _TimedHTTPS(deadline, hook.timeout, context),
        _Redirects(),
    ]
    if _loopback(urllib.parse.urlsplit(hook.url).hostname):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def credentials(url: str) -> tuple[str, str]:
    """*url* without its user and password, and the ``Authorization``
    header they make ("" none): ``Basic`` of ``user:password``, each
    %-decoded, as Go's client sends a URL's userinfo (urllib would take
    it for part of the host, and fail every call)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, ""
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return bare, f"Basic {token}"


def _first_line(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    line = text.split("\n", 1)[0].strip()
    return line if len(line) <= DETAIL_LIMIT else line[: DETAIL_LIMIT - 3] + "..."


def _read(response: Any) -> bytes:
    """The body, up to :data:`BODY_LIMIT` (each read held to the call's
    deadline: :class:`_DeadlineReader`)."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LIMIT:
        chunk = response.read(min(8192, BODY_LIMIT - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _timed_out(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    return isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError)


def post_once(hook: Webhook, body: bytes) -> HookResult:
    """One POST of *body* (JSON) to *hook*: the whole exchange (connecting,
    each redirect, the answer's head and body) within its timeout, as Go's
    ``http.Client.Timeout`` bounds it."""
    url, authorization = credentials(hook.url)
    headers = {"Content-Type": "application/json", "User-Agent": "l4proxy-canary"}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    deadline = time.monotonic() + hook.timeout
    try:
        with _opener(hook, deadline).open(request) as response:
            status = int(response.status)
            try:
                return HookResult(hook, status, _first_line(_read(response)))
            except TimeoutError:
                # Go's client fails the same (its Timeout covers the body)
                return HookResult(
                    hook, None, f"HTTP {status}, but its body not read within {hook.timeout:g} s"
                )
    except urllib.error.HTTPError as exc:
        # not 2xx (or 3xx left): the status, and the body that says why
        said = str(exc.reason).split("\n", 1)[0]
        try:
            detail = _first_line(_read(exc)) or said
        except TimeoutError:
            detail = f"{said}; its body took more than {hook.timeout:g} s"
        except (OSError, http.client.HTTPException):
            detail = said
        return HookResult(hook, exc.code, detail)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if _timed_out(exc):
            return HookResult(hook, None, f"no answer within {hook.timeout:g} s")
        reason = getattr(exc, "reason", exc)
        return HookResult(hook, None, f"cannot reach it ({reason})")


def post(
    hook: Webhook,
    document: Mapping[str, Any],
    once: Callable[[Webhook, bytes], HookResult] = post_once,
    sleep: Callable[[float], None] = time.sleep,
) -> HookResult:
    """POST *document* to *hook*, again after no answer, a 429 or a 5xx
    while it has retries left (:func:`retryable`), waiting 1 s, 2 s ...
    (at most 30 s) between calls; the last call's result."""
    body = json.dumps(document).encode()
    tries = 1
    while True:
        result = once(hook, body)
        if tries > hook.retries or not retryable(result):
            return HookResult(hook, result.status, result.detail, tries)
        sleep(min(RETRY_WAIT_MAX, RETRY_WAIT_MIN * 2 ** (tries - 1)))
        tries += 1


# -- the events, in the background --------------------------------------------------
class EventSender:
    """The events of one ``event`` *hook*, POSTed by one thread of their own
    (named ``l4proxy-canary-event``), one at a time and in order, so that
    the analysis never waits for a receiver: Flagger sends its events
    without blocking the rollout. A receiver slower than the events come
    makes them wait in a queue of :data:`EVENT_QUEUE` at most; past that
    the oldest queued is dropped (:attr:`dropped` counts them), so a hook
    that hangs holds one thread and a bounded queue, never a thread or a
    connection per event. Each call is :func:`post`'s, within the hook's
    timeout (and retries). *done* hears each call's result, on the
    sender's thread. :meth:`close` waits, within a deadline, for what is
    queued; what it could not wait for is dropped."""

    def __init__(
        self,
        hook: Webhook,
        done: Callable[[HookResult], None],
        post: Callable[[Webhook, Mapping[str, Any]], HookResult] = post,
        limit: int = EVENT_QUEUE,
    ) -> None:
        self.hook = hook
        self.dropped = 0  # the oldest queued, dropped for a newer one
        self._done = done
        self._post = post
        self._limit = limit
        self._queue: deque[Mapping[str, Any]] = deque()
        self._busy = False  # a call under way
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def send(self, document: Mapping[str, Any]) -> bool:
        """Queue *document* for the hook, at once; False where the oldest
        queued was dropped to make room for it (or the sender is closed:
        nothing is sent after :meth:`close`)."""
        with self._cond:
            if self._closed:
                return False
            room = len(self._queue) < self._limit
            if not room:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(document)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"l4proxy-canary-event {self.hook}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return room

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed, and nothing left
                document = self._queue.popleft()
                self._busy = True
            try:
                result = self._post(self.hook, document)
            except Exception as exc:  # (post answers every failure; a bug must not end the thread)
                result = HookResult(self.hook, None, f"not sent ({type(exc).__name__}: {exc})")
            try:
                self._done(result)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def close(self, deadline: float) -> int:
        """Send nothing more once what is queued is sent, waiting for it
        until *deadline* (``time.monotonic()``'s); what is left then (the
        call under way, and the queue) is given up, and its count
        returned. A call under way goes on to its own timeout on the
        sender's thread, which then ends (a daemon: it never holds the
        process's exit)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            unsent = len(self._queue) + (1 if self._busy else 0)
            self._queue.clear()
            return unsent
