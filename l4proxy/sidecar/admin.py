"""The admin endpoint (127.0.0.1:15000 by default), Envoy-style.

=====================  ======================================================
``/help``              the endpoints, one line each (Envoy's text)
``/ready``             200 ``LIVE`` while serving; else 503 and the server
                       state: ``PRE_INITIALIZING``, ``INITIALIZING`` (the
                       first rules or DNS lookups), ``DRAINING`` (SIGTERM,
                       or ``/healthcheck/fail``), ``STALLED`` (a relay
                       thread stuck)
``/server_info``       JSON: version, server state, uptime, the options run
                       was given (Envoy's field names)
``/stats``             Prometheus text: connections, decisions, bytes, failures,
                       reloads, active connections (``?format=json`` for JSON;
                       also at ``/stats/prometheus``, Envoy's path;
                       ``?filter=REGEX``: the families whose name matches)
``/config_dump``       JSON: the live route table, its generation and sources,
                       the last rejected config's errors
``/clusters``          endpoints per service and their health (text; ``?format=json``)
``/logging``           the loggers' levels, in every process; POST
                       ``?level=L``, ``?paths=NAME:L,...`` or ``?NAME=L`` sets them
``/healthcheck/fail``  POST: ``/ready`` answers 503 ``DRAINING``, and the gateway
                       listeners' answers say ``connection: close``
``/healthcheck/ok``    POST: undoes ``/healthcheck/fail``
``/quitquitquit``      POST: drain and exit, as on SIGTERM
=====================  ======================================================

Only for operators on the loopback interface: it reads a request line, and
answers one request per connection. A request that changes something is a
POST (405 otherwise, with nothing changed), but a POST is no protection from
a browser's cross-site request or from anyone who can reach the port: the
port must stay on loopback (the ``--admin`` default), and ``--stats-listen``
serves what may face the network, read-only.

Server state
------------
Envoy's ``ServerInfo.State``, from the server's initialisation and its
health-check flag (Envoy's ``Utility::serverState``): the state of the
rules (:meth:`AdminSource.state`: ``PRE_INITIALIZING`` for a worker that
has not answered yet, ``INITIALIZING`` until the first rules loaded and each
DNS name had its first lookup, ``DRAINING`` once a drain began,
``STALLED`` while a worker's per-request relay thread has not turned for a
third of ``--watchdog-timeout``, else ``LIVE``), and a ``LIVE`` server whose health check was failed
(``/healthcheck/fail``) is ``DRAINING`` to ``/ready``, ``/server_info`` and
the kubelet, while it serves and accepts as before. The flag is the admin
process's and is kept until ``/healthcheck/ok`` (or the process's end): set
before the first rules loaded, it holds once they have; a real drain is
``DRAINING`` whatever the flag, and ``/healthcheck/ok`` does not end it.

While the flag is set the gateway listeners' keep-alive clients are told
to leave, as Envoy's listeners of the default drain type do while its
health check is failed (``DrainManagerImpl::drainClose()``): every answer
on such a connection says ``connection: close`` and the connection closes
after it (Worker.fail_health_check; with ``--http-routing connection``, a
connection's first request tells its upstream so). A connection between requests is
left open until its next answer (Envoy closes idle ones only in a drain
proper), and the app's outbound connections are left alone (Envoy's
advice for egress listeners, ``modify_only``). :meth:`AdminSource.fail_health_check`
sets the flag and tells the worker(s), and returns once they have been told.

Log levels
----------
``/logging`` sets the levels of l4proxy's Python loggers in the process that
serves the endpoint and in each worker, over its control channel
(loglevels).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from l4proxy import __version__
from l4proxy.sidecar._stats_wire import encode_sample, in_slices
from l4proxy.sidecar.access_log_file import REOPEN_FAILURES, reopen_failures
from l4proxy.sidecar.loglevels import apply_log_levels, log_spec, logging_changes, logging_text
from l4proxy.stats import START_TIME, START_TIME_HELP, Exposition, process_start_time

if TYPE_CHECKING:
    from l4proxy.sidecar.worker import Worker

# A request head, whole, within HEAD_TIMEOUT_S, in at most MAX_HEAD_LINES lines
# of at most LINE_LIMIT bytes, and at most MAX_CLIENTS at a time: the stats
# endpoint may face the network (--stats-listen 0.0.0.0:15090), and a client
# that trickles a line every few seconds must not hold a connection, or the
# memory of a 64 KiB line, for ever. At MAX_CLIENTS a new connection takes
# the place of the one that has waited longest for its head: 64 idle
# connections (any process in the pod can open them) turned every new one
# away, the kubelet's readiness probe included.
HEAD_TIMEOUT_S = 10.0
MAX_HEAD_LINES = 100
LINE_LIMIT = 8192
MAX_CLIENTS = 64
# The answer: a client must take some of it every SEND_STALL_S, or the
# connection is reset. Until it has taken the whole answer (to the kernel's
# buffers), a new connection at MAX_CLIENTS may take its place too, and
# answers waiting for their clients hold at most ANSWER_BYTES of memory (the
# connection that has waited longest is reset to make room; equal answers,
# 64 clients of one /config_dump, are held once). 64 clients that asked for
# an 8 MB /config_dump and did not read held every place for 30 s (the
# readiness probe was turned away) and 1.3 GB.
SEND_STALL_S = 5.0
ANSWER_BYTES = 32 << 20
CHUNK = 1 << 16  # written at a time, from the answer's bytes (no copy of a whole answer)
PAGE_SLICE = 1 << 18  # of a /stats page, rendered between two turns of the event loop
# After the answer: what a client still sends (a request body) is read and
# dropped, up to LINGER_BYTES within LINGER_S, so that the close is not an RST.
LINGER_BYTES = 1 << 20
LINGER_S = 2.0

log = logging.getLogger("l4proxy.admin")

# asyncio's accept out of fds (EMFILE, ENFILE) or memory: said once in so many seconds
ACCEPT_EXHAUSTED_SAID_S = 10.0
_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"


def _say_accept_exhaustion_once(loop: asyncio.AbstractEventLoop) -> None:
    """The event loop's report of an accept out of fds (asyncio's
    ``socket.accept() out of system resource``, its servers': the admin
    and stats endpoints') in one line per ACCEPT_EXHAUSTED_SAID_S, where it
    came with a traceback, a hundred times each time the listener was
    tried again, once a second (the accept loop of CPython 3.11 goes on
    after the error, CPython gh-151615): a supervisor at its fd limit wrote
    1,400 tracebacks in 7 s. The rest goes to the handler there was.
    Installed once per loop."""
    previous = loop.get_exception_handler()
    if getattr(previous, "says_accept_exhaustion", False):
        return
    said = -ACCEPT_EXHAUSTED_SAID_S

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal said
        if context.get("message") != _ACCEPT_EXHAUSTED:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - said >= ACCEPT_EXHAUSTED_SAID_S:
            said = now
            sock = context.get("socket")
            where = ""
            with contextlib.suppress(Exception):
                host, port = sock.getsockname()[:2]  # type: ignore[union-attr]
                where = f" on {host}:{port}"
            log.warning(
                "accept%s: %s; its connections wait, tried again each second (said once in %.0fs)",
                where,
                context.get("exception"),
                ACCEPT_EXHAUSTED_SAID_S,
            )

    handler.says_accept_exhaustion = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


# The endpoints as /help lists them (Envoy's "  /path: description"), in order.
ENDPOINTS = (
    ("/help", "print this list of the admin endpoints"),
    (
        "/ready",
        "LIVE (200) while serving; else 503 and the server state "
        "(PRE_INITIALIZING, INITIALIZING, DRAINING, STALLED)",
    ),
    ("/server_info", "JSON: version, server state, uptime, the command-line options"),
    (
        "/stats",
        "counters and gauges as Prometheus text (?format=json: JSON; "
        "?filter=REGEX: the families whose name matches, RE2)",
    ),
    ("/stats/prometheus", "the same as /stats (Envoy's and Istio's path)"),
    ("/config_dump", "JSON: the live route table, its sources, the last rejected rules' errors"),
    ("/clusters", "endpoints per service, their health and counts (?format=json: JSON)"),
    (
        "/logging",
        "the log level of each logger, per process; POST ?level=LEVEL, "
        "?paths=NAME:LEVEL,... or ?NAME=LEVEL sets them in every process",
    ),
    (
        "/healthcheck/fail",
        "POST: /ready answers 503 DRAINING; gateway answers say connection: close",
    ),
    ("/healthcheck/ok", "POST: undo /healthcheck/fail"),
    ("/quitquitquit", "POST: drain and exit, as on SIGTERM"),
)
_PATHS = " ".join(path for path, _ in ENDPOINTS)

# Envoy's ServerInfo.State names (see the module docstring)
LIVE = "LIVE"
DRAINING = "DRAINING"
PRE_INITIALIZING = "PRE_INITIALIZING"
INITIALIZING = "INITIALIZING"
# Not one of Envoy's: a worker whose relay thread has not turned for a third
# of --watchdog-timeout (stuck: it serves nothing; WorkerView.state)
STALLED = "STALLED"
_ORDER = (PRE_INITIALIZING, INITIALIZING, LIVE)  # the least advanced first


def least_state(states: Iterable[str | None]) -> str:
    """The state of several workers' as one: DRAINING where one drains,
    else STALLED where one is, else the least advanced, a worker that did
    not answer (None: starting, restarting, or hung until the watchdog
    replaces it) PRE_INITIALIZING."""
    seen = [PRE_INITIALIZING if s not in (*_ORDER, DRAINING, STALLED) else s for s in states]
    for state in (DRAINING, STALLED):
        if state in seen:
            return state
    return min(seen, key=_ORDER.index, default=PRE_INITIALIZING)


def served_state(state: str, health_check_failed: bool) -> str:
    """What /ready and /server_info say: a LIVE server whose health check
    was failed (/healthcheck/fail) is DRAINING, as Envoy's serverState() has
    it; before LIVE, the initialisation's state is said whatever the flag."""
    return DRAINING if state == LIVE and health_check_failed else state


# -- /stats?filter= ------------------------------------------------------------


def stats_filter(pattern: str) -> Callable[[str], bool]:
    """Envoy's ``/stats?filter=``: whether a stat's name has a match of
    *pattern* (a search, not a whole match: ``^...$`` for that). RE2, as
    Envoy's: its time is linear in the name, whatever the pattern, which
    matters on ``--stats-listen``'s port. ValueError with RE2's reason."""
    from l4proxy.rules._regex import re2_compile  # (RE2's ~2.5 MB of RSS: on first use)

    try:
        compiled = re2_compile(pattern)
    except ValueError as exc:
        raise ValueError(f"filter {pattern!r} is not a regular expression (RE2): {exc}") from None
    search = compiled.search
    return lambda name: search(name) is not None


async def _page(pieces: Iterable[str]) -> bytes:
    """The /stats page from its pieces (:meth:`Exposition.pieces`), encoded
    into one buffer as they come: the page is held once, as the bytes sent
    (``getvalue()`` hands over the buffer itself), never also as a list of
    its lines or one string. A turn of the event loop every PAGE_SLICE
    bytes: a /ready meanwhile waits for one slice, not for the page."""
    buf = io.BytesIO()
    mark = 0
    for piece in pieces:
        buf.write(piece.encode())
        if buf.tell() - mark >= PAGE_SLICE:
            mark = buf.tell()
            await asyncio.sleep(0)
    return buf.getvalue()


# -- /server_info ----------------------------------------------------------------

# run's arguments that say how the supervisor started a worker, not options
_INTERNAL = frozenset(
    {
        "func",
        "raw_argv",
        "command",
        "worker_fds",
        "control_fd",
        "worker_index",
        "access_log_fd",
        "rules_last_good_fd",
        "health_check_failed",
    }
)


def command_line_options(args: argparse.Namespace) -> dict[str, Any]:
    """/server_info's ``command_line_options``: each of ``run``'s options as
    parsed (defaults included), a HOST:PORT as written."""

    def value(v: Any) -> Any:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], int):
            host = f"[{v[0]}]" if ":" in str(v[0]) else v[0]
            return f"{host}:{v[1]}"
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        if isinstance(v, dict):
            return {str(k): value(x) for k, x in v.items()}
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return str(v)

    return {k: value(v) for k, v in sorted(vars(args).items()) if k not in _INTERNAL}


def _duration(seconds: float) -> str:
    """A protobuf Duration as JSON writes it (Envoy's uptime fields): '42s'."""
    return f"{max(0, int(seconds))}s"


class AdminSource(Protocol):
    """What the admin endpoint shows: one worker, or the supervisor's sum."""

    # /healthcheck/fail's flag (module docstring: Server state)
    health_check_failed: bool

    async def fail_health_check(self, failed: bool) -> None: ...
    async def ready(self) -> bool: ...
    async def state(self) -> str: ...
    async def stats(self) -> Exposition: ...
    async def stats_json(self) -> dict[str, Any]: ...
    async def config_dump(self) -> Any: ...
    async def clusters(self) -> Any: ...
    async def logging(self, spec: str) -> list[tuple[str, dict[str, str] | None]]: ...


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    """Read and drop until the client's end of stream, or *limit* bytes."""
    while limit > 0:
        data = await reader.read(65536)
        if not data:
            return
        limit -= len(data)


def _cut(writer: asyncio.StreamWriter, reset: bool) -> None:
    """Close at once; with *reset*, with an RST (SO_LINGER 0): an answer its
    client does not take is dropped from the kernel's buffers too, and the
    client learns at once that it will not get the rest."""
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _request_line(reader: asyncio.StreamReader) -> bytes:
    """The request line of a head read to its end (the headers are skipped);
    ValueError for a line over the reader's limit or a head over MAX_HEAD_LINES."""
    line = await reader.readline()
    for _ in range(MAX_HEAD_LINES):
        if await reader.readline() in (b"\r\n", b"\n", b""):
            return line
    raise ValueError(f"a request head of more than {MAX_HEAD_LINES} lines")


class AdminServer:
    """The admin endpoint; with ``stats_only``, the scrape endpoint.

    The admin endpoint stays on loopback: it can stop the sidecar
    (``/quitquitquit``) and shows the whole configuration. Prometheus (and
    ``l4proxy canary --metrics``) needs ``/stats`` from outside the pod, so
    ``--stats-listen`` serves a second, read-only endpoint with ``/stats``
    (also as ``/stats/prometheus``, Istio's path on its port 15090) and
    ``/ready``, and nothing else.
    """

    def __init__(
        self,
        source: AdminSource,
        on_quit: Callable[[], None],
        stats_only: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.on_quit = on_quit
        self.stats_only = stats_only
        self.options = options or {}  # /server_info's command_line_options
        self._server: asyncio.Server | None = None
        self.clients = 0  # connections being served
        self.turned_away = 0  # connections closed at once: MAX_CLIENTS were being served
        # connections closed for a new one (waiting for their head, or for their
        # client to take the answer), or for memory (an answer not taken)
        self.evicted = 0
        self.stalled = 0  # connections reset: the client took nothing for SEND_STALL_S
        self._reading: dict[int, asyncio.StreamWriter] = {}  # no head yet, oldest first
        self._sending: dict[int, asyncio.StreamWriter] = {}  # answer being taken, oldest first
        self._answers: dict[int, bytes] = {}  # the answer of each one in _sending
        self._lingering: dict[int, asyncio.StreamWriter] = {}  # answered, oldest first

    async def start(self, host: str, port: int) -> None:
        _say_accept_exhaustion_once(asyncio.get_running_loop())
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_address=True, limit=LINE_LIMIT
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sockname: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return sockname

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            # an answered one first (it is done), then the one that has waited
            # longest for its head, then one whose client is still taking its
            # answer (a slow download of /config_dump is not cut for a probe
            # while an idle connection can make room)
            waiting = self._lingering or self._reading or self._sending
            if not waiting:  # every one is being answered: this one waits its turn
                self.turned_away += 1
                writer.close()
                return
            oldest = next(iter(waiting))
            _cut(waiting.pop(oldest), reset=waiting is self._sending)
            self._answers.pop(oldest, None)
            self.evicted += 1
        self.clients += 1
        key = id(writer)
        self._reading[key] = writer
        try:
            try:
                line = await asyncio.wait_for(_request_line(reader), HEAD_TIMEOUT_S)
            except ValueError:  # a line over LINE_LIMIT, or too many
                line = b""
            if self._reading.pop(key, None) is None:
                return  # evicted meanwhile
            parts = line.decode("latin-1").split()
            body: str | bytes
            if len(parts) < 2:
                status, ctype, body = 400, "text/plain", "bad request\n"
            else:
                status, ctype, body = await self.dispatch(parts[0], parts[1])
            data = body if isinstance(body, bytes) else body.encode()
            del body  # the answer is held once, as bytes, while it is sent
            # (RFC 9110: a 405 says which methods the resource takes: the
            # read-only endpoint's GET and HEAD, /quitquitquit's POST)
            allow = ""
            if status == 405:
                allow = "allow: GET, HEAD\r\n" if self.stats_only else "allow: POST\r\n"
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(data)}\r\n{allow}"
                "connection: close\r\n\r\n"
            ).encode()
            if parts[:1] == ["HEAD"]:
                data = b""
            self._sending[key] = writer
            self._hold(key, data)
            del data  # held in _answers only: an evicted one's is freed at once
            try:
                await self._send(key, writer, head)
            except TimeoutError:
                self.stalled += 1
                raise
            if self._sending.pop(key, None) is None:
                return  # evicted meanwhile
            del self._answers[key]
            # Request bytes left unread (a body: only the head is read) make
            # the close an RST, which cuts the answer short at the client.
            # Read and drop them first, within limits; meanwhile a new
            # connection may take this one's place (before any waiting for its
            # head: this one has had its answer).
            writer.write_eof()
            self._lingering[key] = writer
            await asyncio.wait_for(_discard(reader, LINGER_BYTES), LINGER_S)
        except (TimeoutError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            self._reading.pop(key, None)
            self._sending.pop(key, None)
            self._answers.pop(key, None)
            self._lingering.pop(key, None)
            self.clients -= 1
            if writer.transport.get_write_buffer_size():
                # an answer not taken: close() would wait for the client for ever
                _cut(writer, reset=True)
            writer.close()

    async def _send(self, key: int, writer: asyncio.StreamWriter, head: bytes) -> None:
        """Write *head* and the answer held for *key*, a CHUNK at a time;
        return when all is with the kernel. TimeoutError when the client took
        nothing for SEND_STALL_S; ConnectionResetError when evicted."""
        size = len(self._answers[key])
        if size <= CHUNK:
            writer.write(head + self._answers[key])
        else:
            writer.write(head)
            for offset in range(0, size, CHUNK):
                if key not in self._answers:
                    raise ConnectionResetError("evicted")
                # a copy of the chunk only: no reference to the whole answer
                # is left here while the client takes its time
                writer.write(self._answers[key][offset : offset + CHUNK])
                async with asyncio.timeout(SEND_STALL_S):
                    await writer.drain()
        # drain() returns below the low-water mark; the rest, to the last byte
        writer.transport.set_write_buffer_limits(high=0)
        async with asyncio.timeout(SEND_STALL_S):
            await writer.drain()

    def _hold(self, key: int, data: bytes) -> None:
        """Hold *data* as the answer for *key*, or an equal answer already held
        for another connection; connections that have waited longest for
        their clients to take their answers are reset until the answers held
        come to ANSWER_BYTES at most (this one's included; never this one)."""
        held = {id(a): a for a in self._answers.values()}
        for answer in held.values():
            if len(answer) == len(data) and answer == data:
                self._answers[key] = answer
                return
        total = len(data) + sum(len(a) for a in held.values())
        for other in list(self._sending):
            if total <= ANSWER_BYTES:
                break
            if other == key or len(self._answers[other]) <= CHUNK:
                continue  # this one, or one that holds next to nothing
            answer = self._answers.pop(other, b"")
            if all(a is not answer for a in self._answers.values()):
                total -= len(answer)
            _cut(self._sending.pop(other), reset=True)
            self.evicted += 1
        self._answers[key] = data

    async def dispatch(self, method: str, target: str) -> tuple[int, str, str | bytes]:
        path, _, query = target.partition("?")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        fmt = params.get("format", [""])[-1]
        as_json = fmt == "json"
        src = self.source
        if self.stats_only:
            if method not in ("GET", "HEAD"):
                return 405, "text/plain", "read-only: GET /stats or /ready\n"
            if path == "/stats/prometheus":
                path = "/stats"
            if path not in ("/stats", "/ready"):
                return 404, "text/plain", "not found: /stats /stats/prometheus /ready\n"
        if path == "/stats/prometheus":  # (Envoy's admin path, and Istio's 15090 one)
            path = "/stats"
        # (Envoy's formats: /stats?format=prometheus is the text, the default)
        if path in ("/stats", "/clusters") and fmt not in ("", "json", "prometheus", "text"):
            return 400, "text/plain", f"format {fmt!r}: json, or none for the text\n"
        if path == "/ready":
            state = served_state(await src.state(), src.health_check_failed)
            if state == LIVE:
                return 200, "text/plain", "LIVE\n"
            return 503, "text/plain", f"{state}\n"
        if path == "/stats":
            # Envoy's filter: a regex over the stats' names (empty: none).
            # Envoy's usedonly is taken and ignored (as any other parameter):
            # no stat here keeps a mark of having been set.
            pattern = params.get("filter", [""])[-1]
            try:
                keep = stats_filter(pattern) if pattern else None
            except ValueError as exc:
                return 400, "text/plain", f"{exc}\n"
            if as_json:
                stats = await src.stats_json()
                if keep is not None:
                    stats = {k: v for k, v in stats.items() if keep(k)}
                return 200, "application/json", _json(stats)
            page = await _page((await src.stats()).pieces(keep))
            return 200, "text/plain; version=0.0.4", page
        if path == "/config_dump":
            dump = await src.config_dump()
            if dump is None:
                return 503, "text/plain", "no worker answered; try again\n"
            return 200, "application/json", _json(dump)
        if path == "/clusters":
            clusters = await src.clusters()
            if clusters is None:
                return 503, "text/plain", "no worker answered; try again\n"
            if as_json:
                return 200, "application/json", _json(clusters)
            return 200, "text/plain", clusters_text(clusters)
        if path == "/help":
            lines = "".join(f"  {p}: {what}\n" for p, what in ENDPOINTS)
            return 200, "text/plain", f"admin commands are:\n{lines}"
        if path == "/server_info":
            uptime = _duration(time.time() - process_start_time())
            info = {
                "version": __version__,
                "state": served_state(await src.state(), src.health_check_failed),
                "hot_restart_version": "disabled",  # (Envoy's word: there is none)
                "command_line_options": self.options,
                # one epoch: no hot restart (a worker's restart is not one)
                "uptime_current_epoch": uptime,
                "uptime_all_epochs": uptime,
            }
            return 200, "application/json", _json(info)
        if path == "/logging":
            # GET lists; POST sets what the query says (none: lists, as Envoy)
            try:
                changes = logging_changes(params)
            except ValueError as exc:
                return 400, "text/plain", f"{exc}\n"
            if changes and method != "POST":
                return 405, "text/plain", "use POST to set log levels\n"
            if changes:
                log.warning("admin: log levels set: %s", log_spec(changes))
            return 200, "text/plain", logging_text(await src.logging(log_spec(changes)))
        if path in ("/healthcheck/fail", "/healthcheck/ok", "/quitquitquit") and method != "POST":
            return 405, "text/plain", "use POST\n"
        if path == "/healthcheck/fail":
            if not src.health_check_failed:
                log.warning(
                    "admin: /healthcheck/fail: /ready answers 503 until /healthcheck/ok; "
                    "the gateway listeners' answers say connection: close meanwhile"
                )
            await src.fail_health_check(True)
            return 200, "text/plain", "OK\n"
        if path == "/healthcheck/ok":
            if src.health_check_failed:
                log.warning(
                    "admin: /healthcheck/ok: /ready answers as the server is again; "
                    "the gateway listeners' answers keep their connections again"
                )
            await src.fail_health_check(False)
            return 200, "text/plain", "OK\n"
        if path == "/quitquitquit":
            asyncio.get_running_loop().call_soon(self.on_quit)
            return 200, "text/plain", "OK\n"
        return 404, "text/plain", f"not found: {path}; GET /help says what each is: {_PATHS}\n"


# the reason phrases of the statuses the endpoint answers (RFC 9110)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1) + "\n"


def clusters_text(clusters: list[dict[str, Any]]) -> str:
    """Envoy's /clusters text form: service::address:port::key::value.

    From the supervisor (the workers' views merged: supervisor.merge_clusters)
    each endpoint also has ``ejected_in`` (the workers that eject it, ``-``
    for none), and a service ``unanswered_workers`` while some worker did
    not answer."""
    lines = []
    for c in clusters:
        if c.get("unanswered_workers"):
            workers = ",".join(str(i) for i in c["unanswered_workers"])
            lines.append(f"{c['service']}::unanswered_workers::{workers}")
        for ep in c["endpoints"]:
            flag = "healthy" if ep["healthy"] else "failed_outlier_check"
            base = f"{c['service']}::{ep['address']}:{ep['port']}"
            lines.append(f"{base}::health_flags::{flag}")
            if "ejected_in" in ep:
                lines.append(f"{base}::ejected_in::{','.join(map(str, ep['ejected_in'])) or '-'}")
            lines.append(f"{base}::connect_failures::{ep['connect_failures']}")
            lines.append(f"{base}::response_failures::{ep['response_failures']}")
            if "status_failures" in ep:
                lines.append(f"{base}::status_failures::{ep['status_failures']}")
            lines.append(f"{base}::ejections::{ep['ejections']}")
            if "rq_active" in ep:
                lines.append(f"{base}::rq_active::{ep['rq_active']}")
                lines.append(f"{base}::cx_idle::{ep['cx_idle']}")
            for name in ("rq_pending", "rq_pending_overflow", "cx_overflow"):
                if name in ep:
                    lines.append(f"{base}::{name}::{ep[name]}")
            if "cx_active" in ep:
                lines.append(f"{base}::cx_active::{ep['cx_active']}")
        for d in c.get("dns", ()):
            base = f"{c['service']}::dns::{d['name']}"
            lines.append(f"{base}::addresses::{','.join(d['addresses']) or '-'}")
            lines.append(f"{base}::last_error::{d['last_error'] or '-'}")
            lines.append(f"{base}::failures::{d['failures']}")
    return "\n".join(lines) + "\n"


class WorkerView:
    """The admin's view of one in-process worker (also served on its control socket)."""

    def __init__(self, worker: Worker, implementation: str, stall_limit: float = 0.0) -> None:
        self.worker = worker
        self.implementation = implementation
        self.health_check_failed = False  # (--single-process: this process serves /ready)
        # STALLED from this many seconds of the relay's thread without a turn (0: never)
        self.stall_limit = stall_limit

    async def fail_health_check(self, failed: bool) -> None:
        """/healthcheck/fail (*failed*) and /healthcheck/ok (--single-process)."""
        self.health_check_failed = failed
        self.worker.fail_health_check(failed)

    async def ready(self) -> bool:
        return await self.state() == LIVE

    async def state(self) -> str:
        # Not LIVE before the rules given were loaded once: a first load
        # refused (invalid, or unreadable by uid 1337) left a ready pod whose
        # every connection passed through unrouted (Envoy is not ready before
        # its first configuration either). Nor before every DNS endpoint name
        # had its first lookup and the table made with the answers (in a
        # thread) went live: until then the per-request relay answers 503
        # for its services (Envoy's readiness waits for its clusters' first
        # resolution too).
        if self.worker.draining:
            return DRAINING
        # A relay thread stuck serves nothing, while this loop answers: the
        # watchdog kills such a worker (a lone process exits) at the
        # timeout; meanwhile the pod leaves its Services' endpoints.
        if self.stall_limit and self.worker.relay_stalled() >= self.stall_limit:
            return STALLED
        rules = self.worker.rules
        loaded = rules.state.generation > 0 or not rules.paths
        return LIVE if loaded and rules.warmed() else INITIALIZING

    async def logging(self, spec: str) -> list[tuple[str, dict[str, str] | None]]:
        return [("", apply_log_levels(spec))]

    def clusters_now(self) -> list[dict[str, Any]]:
        out = []
        pools = self.worker.pool_snapshot()
        connections = self.worker.connection_snapshot() if pools is None else {}
        relay = self.worker.relay
        # the circuit breakers (a DestinationRule's connectionPool): requests
        # waiting for a connection, those refused, connections refused at L4
        pending = relay.pending() if relay is not None else {}
        overflows = relay.overflows() if relay is not None else {}
        cx_overflows = dict(self.worker.cx_overflows)
        for svc in self.worker.rules.state.table.services():
            eps = []
            for ep in svc.endpoints:
                d: dict[str, Any] = {
                    "address": ep.address,
                    "port": ep.port,
                    "labels": dict(ep.labels),
                }
                d.update(self.worker.health.describe(ep))
                key = (ep.address, ep.port)
                if pools is not None:  # --http-routing request: the upstream pool
                    active, idle = pools.get(key, (0, 0))
                    d["rq_active"] = active
                    d["cx_idle"] = idle
                    d["rq_pending"] = pending.get(key, 0)
                    d["rq_pending_overflow"] = overflows.get(key, 0)
                else:  # --http-routing connection: connections relayed (LEAST_REQUEST's count)
                    d["cx_active"] = connections.get(key, 0)
                d["cx_overflow"] = cx_overflows.get(key, 0)
                eps.append(d)
            cluster: dict[str, Any] = {"service": svc.host, "endpoints": eps}
            dns = self.worker.rules.dns.for_service(svc.host)
            if dns:  # ServiceEntry resolution DNS: each name's addresses and last error
                cluster["dns"] = dns
            out.append(cluster)
        return out

    async def clusters(self) -> list[dict[str, Any]]:
        return self.clusters_now()

    async def config_dump(self) -> dict[str, Any]:
        dump = self.worker.rules.state.to_json()
        dump["implementation"] = self.implementation
        return dump

    def gauges(self) -> dict[str, float]:
        w = self.worker
        ps = w.pump.stats()
        st = w.rules.state
        rs = w.relay.stats() if w.relay is not None else {}
        relay = {
            # --http-routing request: the per-request relay and its upstream pools
            "l4proxy_http_connections_total": rs.get("connections", 0),
            "l4proxy_http_requests_total": rs.get("requests", 0),
            "l4proxy_http_local_answers_total": rs.get("local_answers", 0),
            "l4proxy_http_spliced_bodies_total": rs.get("spliced", 0),
            # a route's retry policy's retries (Envoy's upstream_rq_retry)
            "l4proxy_upstream_rq_retry_total": rs.get("retries", 0),
            # request mirroring (a route's mirror, mirrors, RequestMirror): copies
            # started, dropped (over the replay limit, an answer or a give-up
            # before the request's end, a tunnel, the in-flight cap, no
            # endpoint: verdict.Mirror), failed (connect, I/O, deadline), in
            # flight now; the copies' own pool: connections opened, idle now
            "l4proxy_http_mirrored_total": rs.get("mirrored", 0),
            "l4proxy_http_mirror_dropped_total": rs.get("mirror_dropped", 0),
            "l4proxy_http_mirror_failed_total": rs.get("mirror_failed", 0),
            "l4proxy_http_mirror_active": rs.get("mirror_active", 0),
            "l4proxy_http_mirror_connects_total": rs.get("mirror_connects", 0),
            "l4proxy_http_mirror_idle": rs.get("mirror_idle", 0),
            # requests, decisions and mirrored copies the compiled relay's
            # table of metrics rows could not count (more distinct tags and
            # statuses in one flush than it holds): missing from
            # istio_requests_total, l4proxy_decisions_total and
            # l4proxy_mirror_requests_total (the pure relay drops none)
            "l4proxy_http_metrics_dropped_total": rs.get("metrics_dropped", 0),
            # --access-log: lines taken (one per request), dropped (the
            # buffer full: the log's reader or disk slower than the
            # requests; or a write that failed), and write()s that failed
            "l4proxy_access_log_lines_total": rs.get("access_log_lines", 0),
            "l4proxy_access_log_dropped_total": rs.get("access_log_dropped", 0),
            "l4proxy_access_log_write_errors_total": rs.get("access_log_write_errors", 0),
            # SIGUSR1's reopens of it that failed, this process's (access_log_file)
            REOPEN_FAILURES: reopen_failures(),
            "l4proxy_http_verdict_cache_hits_total": rs.get("verdict_cache_hits", 0),
            "l4proxy_http_verdict_cache_misses_total": rs.get("verdict_cache_misses", 0),
            "l4proxy_upstream_pool_opened_total": rs.get("pool_opened", 0),
            "l4proxy_upstream_pool_reused_total": rs.get("pool_reused", 0),
            # where pooled connections went: back to idle, or closed at check-in
            # (the exchange said not to reuse it; --pool-max-requests; the pool
            # was full), or evicted idle (the server closed it), or expired, or
            # closed because the route table no longer names its endpoint
            "l4proxy_upstream_pool_returned_total": rs.get("pool_returned", 0),
            "l4proxy_upstream_pool_closed_unreusable_total": rs.get("pool_closed_unreusable", 0),
            "l4proxy_upstream_pool_closed_max_requests_total": rs.get(
                "pool_closed_max_requests", 0
            ),
            "l4proxy_upstream_pool_closed_overflow_total": rs.get("pool_closed_overflow", 0),
            "l4proxy_upstream_pool_evicted_total": rs.get("pool_evicted", 0),
            "l4proxy_upstream_pool_expired_total": rs.get("pool_expired", 0),
            "l4proxy_upstream_pool_closed_removed_total": rs.get("pool_closed_removed", 0),
            "l4proxy_upstream_pool_idle": rs.get("pool_idle", 0),
        }
        return {
            **relay,
            # (what --max-connections bounds: Worker.connections_held, with
            # the connections a relay's thread handed to the loop)
            "l4proxy_active_connections": ps.get("active", 0)
            + len(w.handshakes)
            + w.in_transit()
            + rs.get("active", 0),
            "l4proxy_relayed_connections_total": ps.get("accepted", 0),
            "l4proxy_bytes_upstream_total": ps.get("bytes_upstream", 0),
            "l4proxy_bytes_downstream_total": ps.get("bytes_downstream", 0),
            "l4proxy_resets_total": ps.get("resets", 0),
            "l4proxy_idle_timeouts_total": ps.get("idle_timeouts", 0),
            "l4proxy_pump_errors_total": ps.get("errors", 0),
            "l4proxy_spliced_connections_total": ps.get("spliced", 0),
            "l4proxy_pipes_in_use": ps.get("pipes_used", 0),
            "l4proxy_pipes_pooled": ps.get("pipes_free", 0),
            "l4proxy_pipe_refusals_total": ps.get("pipe_refusals", 0),
            # urgent marks crossed by splice: the L4 pump's and the per-request relay's
            "l4proxy_urgent_marks_total": ps.get("urgent", 0) + rs.get("urgent", 0),
            "l4proxy_rules_generation": st.generation,
            "l4proxy_rules_digest": st.digest,
            "l4proxy_reloads_total": st.reloads,
            "l4proxy_reload_failures_total": st.reload_failures,
            "l4proxy_rules_valid": 0 if st.last_error else 1,
            "l4proxy_rules_warnings": st.warnings,
            START_TIME: process_start_time(),
        }

    async def stats(self) -> Exposition:
        """This worker's /stats (--single-process): the relay's rows handed
        over first (:meth:`Worker.flush_relay_reports`)."""
        w = self.worker
        await w.flush_relay_reports()
        help_ = {**w.counter_help(), START_TIME: START_TIME_HELP}
        return Exposition(w.counter_sample(), help_, self.gauges(), w.counter_labelled())

    async def stats_json(self) -> dict[str, Any]:
        out = (await self.stats()).json()
        out["implementation"] = self.implementation
        return out

    async def stats_raw(self) -> dict[str, Any]:
        """What the supervisor sums (its ``stats`` request): the counters
        compact (_stats_wire.encode_sample, a slice per turn of the event loop),
        the gauges read now, the families' HELP and TYPE, and which of
        them have labels (a family with no series is its HELP and TYPE
        alone, an unlabelled one's is also ``NAME 0``: stats.Exposition)."""
        w = self.worker
        await w.flush_relay_reports()
        sample = w.counter_sample()
        return {
            "sample": await in_slices(encode_sample(sample)),
            "gauges": self.gauges(),
            "help": {k: list(v) for k, v in w.counter_help().items()},
            "labelled": sorted(w.counter_labelled()),
        }
