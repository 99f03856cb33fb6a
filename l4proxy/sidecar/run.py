"""``l4proxy run``: the sidecar process.

Binds the listeners (transparent outbound on 15001, an inbound port when it
differs, gateway listeners for Ingress), the admin endpoint, drops root if
asked, loads the rules and serves until SIGTERM, then drains.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import math
import os
import pwd
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from l4proxy import __version__
from l4proxy.cli import count, number, positive_seconds, seconds_or_zero
from l4proxy.dataplane.listener import Listener, bind_listener, check_port_free
from l4proxy.k8s_names import namespace_arg, pod_labels_arg, pod_labels_file_arg
from l4proxy.sidecar.access_log_file import open_access_log, reopen_access_log
from l4proxy.sidecar.admin import AdminServer, WorkerView, command_line_options
from l4proxy.sidecar.channel import serve_supervisor
from l4proxy.sidecar.lean import give_back_memory, import_uvloop, map_large_allocations
from l4proxy.sidecar.loglevels import apply_log_levels
from l4proxy.sidecar.signals import HeldSignals, done_with_signals, hold_signals, say_ignored
from l4proxy.sidecar.watchdog import DRAIN_GRACE_S, check_interval

if TYPE_CHECKING:
    from l4proxy.sidecar.worker import Worker

# The worker's modules (rule loader, peek, pump, routing, uvloop) are imported
# in _serve() only: the supervisor process never needs them, and it stays
# small (it is a second interpreter in every pod).

log = logging.getLogger("l4proxy")

EPILOG = """\
examples:
  # the sidecar in a pod whose traffic l4proxy-init redirects to 15001
  l4proxy run --rules /etc/l4proxy --uid 1337

  # a gateway on port 8080 that routes by the rule file's Ingress objects
  l4proxy run --rules rules/ --listen 0.0.0.0:8080 --no-transparent

  curl 127.0.0.1:15000/stats         # Prometheus counters
  curl 127.0.0.1:15000/config_dump   # the live route table
  kill -HUP <pid>                    # reload the rules now (they are polled anyway)

Every request is routed on its own (--http-routing request, the default), and
upstream connections are pooled (per worker and endpoint; idle for at most
min(--idle-timeout, 60) seconds). With --http-routing connection the first
request on a keep-alive connection picks the subset, and later ones follow.

SIGTERM drains: inbound stops at once (after --drain-inbound seconds, for a
gateway behind a load balancer); the app's outbound calls are still captured
and routed until none has been active for --drain-quiet seconds (the app is
gone) or --drain-duration ends; then connections in flight finish within
what is left of --drain-duration, and what is left then is cut (logged with
its count). Keep-alive clients are told to leave: from the SIGTERM on, each
answer on a gateway listener's connection says "Connection: close" and
closes it, and those between requests close at once (--drain-strategy
immediate, Istio's; gradual: one after another over the drain's first quarter);
the app's outbound ones so too once outbound stops. /ready answers 503 from
the SIGTERM on. POST /healthcheck/fail on the admin endpoint makes /ready
503 and each gateway answer say "Connection: close" (nothing else drains)
until POST /healthcheck/ok.

environment: each worker starts with PYTHONMALLOC=malloc and MALLOC_ARENA_MAX=1
unless it is set (glibc's malloc in one arena, which gives back the pages a
rule load freed; PYTHONMALLOC=pymalloc for Python's own allocator);
L4PROXY_NO_EXTENSIONS=1 runs the pure-Python twins of the compiled data plane.

exit codes: 0 drained and stopped, 1 runtime failure (with --single-process:
the relay's thread stuck for --watchdog-timeout, or at the stop's end), 2 usage
error (bad flags, a port that cannot be bound).
"""


def _hostport(value: str) -> tuple[str, int]:
    """HOST:PORT; an empty host (``:8080``) is every interface, 0.0.0.0."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port in {value!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port {p} out of range 0..65535")
    return host, p


def _admin_hostport(value: str) -> tuple[str, int]:
    """``--admin``'s HOST:PORT, the host given: ``:PORT`` took every
    interface (``_hostport``'s 0.0.0.0), an endpoint that drains the
    sidecar on a POST (/quitquitquit) open to whoever reaches the pod.
    Envoy's admin address names its host; Istio's is 127.0.0.1:15000."""
    host, sep, port = value.rpartition(":")
    if sep and not host.strip("[]"):
        raise argparse.ArgumentTypeError(
            f"{value!r} names no host: 127.0.0.1:{port} for loopback (as the default "
            f"and Istio's), 0.0.0.0:{port} for every interface (whoever reaches the pod "
            "can POST /quitquitquit: never in a pod)"
        )
    return _hostport(value)


def _poll_interval(value: str) -> float:
    v = number(value)
    if v < MIN_RELOAD_INTERVAL:  # 0 or 1e-6: a worker polling the files at 100 % CPU
        raise argparse.ArgumentTypeError(
            f"{value!r}: at least {MIN_RELOAD_INTERVAL:g} seconds (SIGHUP reloads at once)"
        )
    return v


def _workers(value: str) -> int:
    v = count(value)
    if not 1 <= v <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value!r}: from 1 to {MAX_WORKERS} workers")
    return v


def _port(value: str) -> int:
    v = count(value)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port {value!r} out of range 1..65535")
    return v


MIN_RELOAD_INTERVAL = 0.01
MAX_WORKERS = 256


def _requests_per_connection(value: str) -> int:
    """--pool-max-requests: a count the compiled relay's int holds."""
    from l4proxy.dataplane._pool_py import MAX_REQUESTS_LIMIT

    n = count(value)
    if n > MAX_REQUESTS_LIMIT:
        raise argparse.ArgumentTypeError(f"{value!r}: at most {MAX_REQUESTS_LIMIT} (0: no limit)")
    return n


def _trusted_proxies(value: str) -> int:
    """--trusted-proxies: a count the compiled relay's int holds."""
    n = count(value)
    if n > MAX_TRUSTED_PROXIES:
        raise argparse.ArgumentTypeError(f"{value!r}: at most {MAX_TRUSTED_PROXIES}")
    return n


MAX_TRUSTED_PROXIES = 2**31 - 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the sidecar",
        description="Run the l4proxy sidecar: accept redirected connections, route them "
        "by the rule file, relay the bytes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="PATH",
        help="rule file or directory (a ConfigMap mount); repeatable; reloaded on change "
        "(none: no rules, every redirected connection passes through as dialled, a "
        "--listen one is answered 404, and a warning says so)",
    )
    p.add_argument("--port", type=_port, default=15001, help="transparent outbound port (15001)")
    p.add_argument(
        "--inbound-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="transparent inbound port, when it differs from --port",
    )
    p.add_argument(
        "--no-transparent",
        action="store_true",
        help="do not open the transparent listener(s) (gateway only)",
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        type=_hostport,
        metavar="HOST:PORT",
        help="gateway listener, routed by the Ingress objects and the Gateway API's "
        "Gateways (a listener's port) and HTTPRoutes in the rules (:PORT: every "
        "interface, 0.0.0.0); repeatable",
    )
    p.add_argument(
        "--trusted-proxies",
        type=_trusted_proxies,
        default=0,
        metavar="N",
        help="gateway listeners: the proxies in front whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed, as Istio's gatewayTopology.numTrustedProxies "
        "(0, the default: X-Forwarded-Proto is set to http whatever a client says, "
        "x-envoy-external-address is the connection's peer; behind a load balancer "
        "that terminates TLS and says X-Forwarded-Proto: https, 1). Either way the "
        "peer's address is appended to X-Forwarded-For and each request gets a new "
        "x-request-id",
    )
    p.add_argument(
        "--admin",
        type=_admin_hostport,
        default=("127.0.0.1", 15000),
        metavar="HOST:PORT",
        help="admin endpoint (127.0.0.1:15000: loopback, as Istio's); the host is "
        "required (:PORT is refused: 127.0.0.1:PORT is loopback, 0.0.0.0:PORT every "
        "interface, which never belongs in a pod); port 0: a free port the kernel picks, "
        "which the start-up log line names ('admin HOST:PORT'). Port 0 used to turn the "
        "endpoint off: --no-admin does that now",
    )
    p.add_argument(
        "--no-admin",
        action="store_true",
        help="no admin endpoint: no /ready for a probe, no /stats, no /quitquitquit "
        "(--stats-listen still serves /stats and /ready, read-only)",
    )
    p.add_argument(
        "--stats-listen",
        type=_hostport,
        default=None,
        metavar="HOST:PORT",
        help="also serve GET /stats (and /stats/prometheus, /ready), read-only, here: "
        "for Prometheus or l4proxy canary --metrics from outside the pod, as Istio's "
        "0.0.0.0:15090 (off; :PORT: every interface, 0.0.0.0; the admin endpoint "
        "stays on loopback)",
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="time an upstream connect may take before the next endpoint is tried (10; a "
        "DestinationRule's connectionPool.tcp.connectTimeout sets it per endpoint)",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="time a client has to send the request head on an HTTP port (10)",
    )
    p.add_argument(
        "--idle-timeout",
        type=positive_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="close a relayed connection with no bytes either way for this long (3600)",
    )
    p.add_argument(
        "--drain-duration",
        type=seconds_or_zero,
        default=25.0,
        metavar="SECONDS",
        help="on SIGTERM, the most the drain may last: outbound connections are "
        "still accepted, and connections in flight finish, within it; keep it under "
        "the pod's terminationGracePeriodSeconds (Kubernetes: 30 by default), past "
        "which the kubelet kills the sidecar mid-drain (25)",
    )
    p.add_argument(
        "--drain-quiet",
        type=seconds_or_zero,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, keep capturing the app's outbound calls until no connection "
        "has been active for this long (the app is gone), or --drain-duration ends; "
        "inbound stops at once (but see --drain-inbound). 0: outbound stops at once too (5)",
    )
    p.add_argument(
        "--drain-inbound",
        type=seconds_or_zero,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, keep accepting inbound (gateway and --inbound-port listeners, "
        "connections to the pod's own address) for this long while /ready answers 503: "
        "a load balancer that has not yet seen the pod go (its health checks, the "
        "endpoints' lag) is served instead of refused. For a gateway behind one; within "
        "--drain-duration. 0: inbound stops at once (0)",
    )
    p.add_argument(
        "--drain-strategy",
        choices=["immediate", "gradual"],
        default="immediate",
        help="on SIGTERM, when the keep-alive connections between requests close (Envoy's "
        "option): immediate, all at once (what Istio runs Envoy with); gradual (Envoy's "
        "default), one after another over the first quarter of --drain-duration (the k-th "
        "of N at k/N of that quarter), so that clients that reconnect as soon as theirs "
        "closes come back spread out, at the cost of a drain that long (immediate)",
    )
    p.add_argument(
        "--outbound-policy",
        choices=["ALLOW_ANY", "REGISTRY_ONLY"],
        default="ALLOW_ANY",
        help="a destination no ServiceEntry names: passed through as it was dialled "
        "(ALLOW_ANY, the default, Istio's) or refused (REGISTRY_ONLY)",
    )
    p.add_argument(
        "--max-connections",
        type=count,
        default=0,
        metavar="N",
        help="client connections a worker holds at most; beyond, new ones are refused "
        "(0, the default: no limit)",
    )
    p.add_argument(
        "--max-pipes",
        type=count,
        default=None,
        metavar="N",
        help="splice pipes per worker, pooled, 2 fds each (default: --max-connections / 4, "
        "without it a quarter of the connections the fd limit leaves room for; 0: never "
        "splice)",
    )
    p.add_argument(
        "--http-routing",
        choices=["connection", "request"],
        default="request",
        help="on HTTP ports and gateway listeners: route every request on its own "
        "(request, the default: a canary split, a rule swap and path rules reach "
        "keep-alive connections at their next request; upstream connections are "
        "pooled, see --pool-*), or by the first request head of each connection "
        "(connection: the connection then goes to the L4 pump as it is, and a "
        "route's timeout, http[].timeout, httpReqTimeout or timeouts.request, is not "
        "enforced, nor a retry policy, http[].retries or httpReqRetries)",
    )
    p.add_argument(
        "--pool-max-idle",
        type=count,
        default=1024,
        metavar="N",
        help="--http-routing request: idle upstream connections kept per endpoint "
        "(1024; never more than the peak of requests in flight to it)",
    )
    p.add_argument(
        "--pool-idle-timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="--http-routing request: close an upstream connection idle this long "
        "(the smaller of --idle-timeout and 60; keep it below the servers' own "
        "keep-alive timeout; a DestinationRule's connectionPool.http.idleTimeout "
        "sets it per endpoint)",
    )
    p.add_argument(
        "--pool-max-requests",
        type=_requests_per_connection,
        default=0,
        metavar="N",
        help="--http-routing request: close an upstream connection after N requests "
        "(Envoy's max_requests_per_connection; 0: no limit, the default; a "
        "DestinationRule's connectionPool.http.maxRequestsPerConnection sets it per endpoint)",
    )
    p.add_argument(
        "--ejection-time",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="outlier detection: first ejection of an endpoint with 3 gateway failures in a "
        "row (failed connects; per request also responses that fail: closed or reset before or "
        "during the response, unframeable, or past the route's timeout); the n-th "
        "lasts n times as long, up to 300 s (or the base, if longer), and each such span "
        "healthy takes one off (10); "
        "the endpoints of a DestinationRule with outlierDetection take its settings instead "
        "(which also count the application's 5xx, as Istio's)",
    )
    p.add_argument(
        "--namespace",
        type=namespace_arg,
        default=os.environ.get("POD_NAMESPACE") or "default",
        help="namespace of short names in rules ($POD_NAMESPACE or default)",
    )
    p.add_argument("--domain", default="cluster.local", help="cluster domain (cluster.local)")
    p.add_argument(
        "--cluster-name",
        default="Kubernetes",
        metavar="NAME",
        help="the cluster's name in Istio's metrics, their source_cluster and destination_cluster "
        "(Istio's global.multiCluster.clusterName; Kubernetes)",
    )
    p.add_argument(
        "--pod-labels",
        type=pod_labels_arg,
        default={},
        metavar="K=V,...",
        help="this pod's labels (each over the same key of --pod-labels-file's), for "
        "RouteRule match.source / sourceLabels, Istio's metrics' source_* labels and the "
        "DestinationRules whose workloadSelector selects the pod; check rules against them "
        "with l4proxy validate --pod-labels",
    )
    p.add_argument(
        "--pod-labels-file",
        type=pod_labels_file_arg,
        default={},
        metavar="PATH",
        help="this pod's labels from a Downward API file (a downwardAPI volume's item with "
        "fieldPath: metadata.labels; l4proxy inject mounts one at "
        "/etc/l4proxy-pod/labels); read when a worker starts, not on a reload: a pod "
        "relabelled keeps its routes until its workers restart",
    )
    p.add_argument(
        "--reload-interval",
        type=_poll_interval,
        default=1.0,
        metavar="SECONDS",
        help="how often the rule files are checked for a change (1; SIGHUP: at once)",
    )
    p.add_argument(
        "--uid",
        type=str,
        default=None,
        help="drop to this user (name or number) after binding: the UID that "
        "l4proxy-init exempts from capture, 1337 in a pod (not given: stay as started)",
    )
    p.add_argument(
        "--gid",
        type=str,
        default=None,
        help="drop to this group after binding (not given: --uid's group, else stay)",
    )
    p.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop for the control path (uvloop)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help=f"worker processes sharing the listeners with SO_REUSEPORT, 1 to {MAX_WORKERS} (1)",
    )
    p.add_argument(
        "--single-process",
        action="store_true",
        help="no supervisor: serve in this process (debugging; nothing restarts it but "
        "its container's restart: it exits 1 where a worker would be restarted)",
    )
    p.add_argument(
        "--watchdog-timeout",
        type=seconds_or_zero,
        default=15.0,
        metavar="SECONDS",
        help="restart a worker that has not answered the supervisor for this long, or "
        "whose relay thread has not turned for this long; with --single-process, exit "
        "1 (for the container to be restarted) when the relay thread has not turned for "
        "this long; /ready answers 503 STALLED from a third of it, 1 s at least (15; 0: off)",
    )
    p.add_argument(
        "--watchdog-start-timeout",
        type=seconds_or_zero,
        default=120.0,
        metavar="SECONDS",
        help="the same for a worker that has not answered yet since it started: it "
        "answers once its rules are loaded, which a big rule set on a small CPU "
        "share can make slow (120; at least --watchdog-timeout)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the weighted-split RNG, where each round robin starts (and the "
        "gateway listeners' x-request-id stream) with N + the worker's index, so a "
        "run's choices repeat (tests, reproducing a report); default: OS entropy",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the log's level, every logger's (on stderr; the admin endpoint's /logging "
        "changes it at runtime) (info)",
    )
    p.add_argument(
        "--access-log",
        default=None,
        metavar="PATH",
        help="write one line per HTTP request the per-request relay ends, as Istio's "
        "sidecar with meshConfig.accessLogFile: when it started, method, path, status, "
        "response flags (UH no endpoint, UF connect failed, UO circuit breaker, NR no "
        "route, UT timeout, URX retries used up, UC upstream closed, DC client gone, FI/DI "
        "fault...), bytes, duration, the client's X-Forwarded-For, User-Agent and "
        "X-Request-ID, the upstream host and cluster outbound|PORT|SUBSET|HOST (the "
        "version that served it), the route; see the README's \"Access log\". '-' or "
        "/dev/stdout: standard output (kubectl logs POD -c l4proxy; the workers' lines "
        "never interleave), else a file opened for appending before privileges are "
        "dropped. Off by default, and then free; on, each line is formatted in the relay "
        "(no Python per request) and written by a thread of its own: a reader or disk "
        "slower than the requests loses lines (counted: l4proxy_access_log_dropped_total), "
        "never requests. SIGUSR1 reopens PATH (logrotate: rename, then signal). "
        "A connection routed at L4 (a TCP port's) gets a line when it ends, "
        "as Envoy's tcp_proxy writes it; with --http-routing connection nothing is logged",
    )
    p.add_argument(
        "--access-log-format",
        choices=["text", "json"],
        default="text",
        help="--access-log's lines: Istio's default TEXT format, or JSON, one object per "
        "line with Istio's keys (start_time, method, path, response_code, "
        "response_flags, upstream_cluster, ...) (text)",
    )
    # Internal: how the supervisor starts a worker.
    p.add_argument("--worker-fds", default=None, help=argparse.SUPPRESS)
    p.add_argument("--control-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--access-log-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--rules-last-good-fd", type=int, default=-1, help=argparse.SUPPRESS)
    # the supervisor's /healthcheck/fail flag, set when it started this worker
    p.add_argument("--health-check-failed", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _named_id(name: str, flag: str) -> int:
    """--uid's or --gid's *name*, as a number (ValueError naming it where
    this system has no such user or group: a KeyError said only
    "getpwnam(): name not found: 'x'", quoted)."""
    try:
        return pwd.getpwnam(name).pw_uid if flag == "--uid" else grp.getgrnam(name).gr_gid
    except KeyError:
        what = "user" if flag == "--uid" else "group"
        raise ValueError(
            f"{flag} {name}: no such {what} here (give its number, e.g. {flag} 1337)"
        ) from None


def _drop_privileges(uid: str | None, gid: str | None) -> None:
    g = None if gid is None else int(gid) if gid.isdigit() else _named_id(gid, "--gid")
    u = None if uid is None else int(uid) if uid.isdigit() else _named_id(uid, "--uid")
    if (
        os.geteuid() != 0
        and (g is None or os.getgid() == os.getegid() == g)
        and (u is None or os.getuid() == os.geteuid() == u)
    ):
        # Already that user and group (an image's USER 1337:1337, a pod's
        # runAsUser and runAsGroup): nothing to drop, and no right to call
        # setgroups, which failed: exit 2, a crash loop.
        return
    if g is not None:
        os.setgroups([])
        os.setgid(g)
    if u is not None:
        if os.getuid() == u:
            return
        if gid is None:  # the user's primary group (the uid's number when it has no entry)
            try:
                primary = pwd.getpwuid(u).pw_gid
            except KeyError:
                primary = u
            os.setgroups([])
            os.setgid(primary)
        os.setuid(u)


def _listener_specs(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    specs: list[tuple[str, int, str]] = []
    if not args.no_transparent:
        specs.append(("::", args.port, "outbound"))
        if args.inbound_port is not None and args.inbound_port != args.port:
            specs.append(("::", args.inbound_port, "inbound"))
    specs += [(host, port, "gateway") for host, port in args.listen]
    return specs


def _inherited_listeners(spec: str) -> list[Listener]:
    out = []
    for item in spec.split(","):
        fd, mode, rest = item.split(":", 2)
        host, _, port = rest.rpartition(":")
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        out.append(Listener(sock=sock, mode=mode, address=(host, int(port))))
    return out


def _event_loop_runner(name: str) -> Any:
    if name == "uvloop":
        return import_uvloop().run
    return asyncio.run


def run(args: argparse.Namespace) -> int:
    # Before anything else (signals; cli.main did it already): a SIGHUP while
    # starting is a reload request to remember, never the default action
    # (terminate), and a SIGTERM a stop to make once the loop runs.
    held = hold_signals()
    tag = f"[w{args.worker_index}] " if args.worker_fds else ""
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s %(levelname)s %(name)s: {tag}%(message)s",
        stream=sys.stderr,
    )
    if args.worker_fds:  # a worker started by the supervisor
        listeners = _inherited_listeners(args.worker_fds)
        control = socket.socket(fileno=args.control_fd)
        try:
            result: int = _event_loop_runner(args.loop)(_serve(args, listeners, control, held))
        except KeyboardInterrupt:
            return 0
        return result

    if args.no_transparent and not args.listen:
        log.error("--no-transparent needs at least one --listen HOST:PORT")
        return 2
    if args.access_log is not None:  # (before privileges drop: a root-owned log dir)
        try:
            args.access_log_fd = open_access_log(args.access_log)
        except OSError as exc:
            log.error("--access-log %s: cannot open it: %s", args.access_log, exc.strerror)
            return 2
        if args.http_routing == "connection":
            log.warning(
                "--access-log: with --http-routing connection no request is seen on its "
                "own, and no line is written (only per request, the default)"
            )
    missing = [path for path in args.rules if not os.path.lexists(path)]
    if missing:  # a typo is a usage error, not a sidecar that routes by no rules
        log.error("--rules %s: no such file or directory", missing[0])
        return 2
    for path in args.rules:
        with contextlib.suppress(OSError):  # (a dangling link: reported by the load)
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                # A pipe (<(...)) is read once; the sidecar reads its rules
                # again at every change, and waited for a writer for ever.
                log.error(
                    "--rules %s: not a regular file or a directory (the sidecar reads its "
                    "rules again at every change; write them to a file)",
                    path,
                )
                return 2
    specs = _listener_specs(args)
    sets: list[list[Listener]] = []
    shared = not args.single_process and args.workers > 1
    where = ""
    try:
        if shared:  # SO_REUSEPORT would share the port with whoever holds it
            for h, p, _ in specs:
                where = f" on {'[' + h + ']' if ':' in h else h}:{p}"
                check_port_free(h, p)
        for _ in range(1 if args.single_process else args.workers):
            group: list[Listener] = []
            sets.append(group)
            for i, (h, p, m) in enumerate(specs):
                if len(sets) > 1:  # port 0: the one the kernel gave the first worker's
                    p = sets[0][i].address[1]
                where = f" on {'[' + h + ']' if ':' in h else h}:{p}"
                group.append(bind_listener(h, p, m, reuse_port=shared))
    except OSError as exc:
        log.error("cannot bind a listener%s: %s", where, exc)
        for lst in (x for group in sets for x in group):
            lst.sock.close()
        return 2
    try:
        if args.single_process:
            return int(_event_loop_runner(args.loop)(_serve(args, sets[0], None, held)))
        return int(asyncio.run(_supervise(args, sets, held)))
    except KeyboardInterrupt:
        return 0


async def _start_admin(args: argparse.Namespace, source: Any, on_quit: Any) -> AdminServer | None:
    """The admin endpoint at ``--admin`` (port 0: one the kernel picks, as
    Envoy's admin address takes it; :func:`_admin_said` names the port
    bound), or None with ``--no-admin``."""
    if args.no_admin:
        return None
    admin = AdminServer(source, on_quit, options=command_line_options(args))
    try:
        await admin.start(*args.admin)
    except OSError as exc:
        log.error("cannot bind the admin endpoint %s:%d: %s", *args.admin, exc)
        raise SystemExit(2) from exc
    return admin


def _admin_said(admin: AdminServer | None) -> str:
    """The admin endpoint's address as the start-up line says it (``admin
    127.0.0.1:15000``, an IPv6 host in brackets; ``admin off``): the port
    bound, which a test or a tool that gave ``--admin HOST:0`` reads there.
    The supervisor's line says it, or with ``--single-process`` the
    worker's, the same way."""
    if admin is None:
        return "off"
    return _address_said(admin.address)


def _address_said(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _options_in_effect(
    admin: AdminServer | None, stats: AdminServer | None, listeners: list[Listener]
) -> None:
    """/server_info's ``command_line_options`` say the addresses bound:
    ``admin``, ``stats_listen`` and each ``listen`` with the port the
    kernel gave where port 0 was asked, as every other option says its
    value in effect (they said ``127.0.0.1:0``, which reaches nothing).
    What was asked is the command line's (the pod spec's)."""
    if admin is None:
        return
    admin.options["admin"] = _admin_said(admin)
    if stats is not None:
        admin.options["stats_listen"] = _address_said(stats.address)
    gateways = [lst for lst in listeners if lst.mode == "gateway"]  # (--listen's, in order)
    if gateways:
        admin.options["listen"] = [_address_said(lst.address) for lst in gateways]


async def _start_stats(args: argparse.Namespace, source: Any) -> AdminServer | None:
    """``--stats-listen``: the read-only scrape endpoint (see AdminServer)."""
    if args.stats_listen is None:
        return None
    stats = AdminServer(source, lambda: None, stats_only=True)
    try:
        await stats.start(*args.stats_listen)
    except OSError as exc:
        log.error("cannot bind the stats endpoint %s:%d: %s", *args.stats_listen, exc)
        raise SystemExit(2) from exc
    log.info("stats endpoint (read-only /stats, /ready) on %s:%d", *stats.address)
    return stats


async def _supervise(
    args: argparse.Namespace, sets: list[list[Listener]], held: HeldSignals | None = None
) -> int:
    from l4proxy.sidecar.supervisor import Supervisor  # the supervisor's only

    sup = Supervisor(args, sets)
    admin: AdminServer | None = None
    stats: AdminServer | None = None

    async def start_admin(source: Any, on_quit: Any) -> None:
        nonlocal admin, stats
        admin = await _start_admin(args, source, on_quit)
        stats = await _start_stats(args, source)
        _options_in_effect(admin, stats, sets[0])
        try:
            _drop_privileges(args.uid, args.gid)
        except (OSError, ValueError) as exc:
            log.error("cannot drop privileges to uid=%s gid=%s: %s", args.uid, args.gid, exc)
            raise SystemExit(2) from exc
        log.info(
            "l4proxy %s supervisor: %d worker(s); listening: %s; admin %s; uid %d",
            __version__,
            len(sets),
            ", ".join(lst.name for lst in sets[0]),
            _admin_said(admin),
            os.getuid(),
        )
        give_back_memory()  # what start-up freed (lean)
        map_large_allocations()  # a /stats page's buffer (lean)

    code = await sup.run(start_admin, held)
    for server in (admin, stats):
        if server:
            await server.close()
    return code


async def _serve(
    args: argparse.Namespace,
    listeners: list[Listener],
    control: socket.socket | None,
    held: HeldSignals,
) -> int:
    from l4proxy.dataplane import peek, pump, relay
    from l4proxy.dataplane._pool_py import PoolOptions
    from l4proxy.rules.watch import RuleWatcher
    from l4proxy.sidecar.worker import Worker, WorkerOptions

    loop = asyncio.get_running_loop()
    # The compiled relay hears SIGTERM and SIGINT on its own thread, before
    # it serves anything more (Worker.hear_stop_signals): blocked in every
    # thread, from before the first starts (each inherits the mask); one
    # that came before this was held (held.stop_requested: drain_first).
    relay_hears_stop = args.http_routing == "request" and relay.IMPLEMENTATION == "compiled"
    if relay_hears_stop:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    rules = RuleWatcher(
        args.rules,
        namespace=args.namespace,
        domain=args.domain,
        interval=args.reload_interval,
        seed=None if args.seed is None else args.seed + args.worker_index,
        # (the supervisor's memory file of the files' last good versions)
        last_good_fd=args.rules_last_good_fd if args.rules_last_good_fd >= 0 else None,
        pod_labels={**args.pod_labels_file, **args.pod_labels},
    )
    if args.rules:
        held.requested = False  # a reload asked for before now: this load is it
        rules.load_now()
    else:
        log.warning(
            "no --rules given: every redirected connection passes through to its destination%s",
            "; the gateway listeners (--listen) route nothing: each request is answered 404"
            if args.listen
            else "",
        )
    opts = WorkerOptions(
        connect_timeout=args.connect_timeout,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        outbound_policy=args.outbound_policy,
        source_labels={**args.pod_labels_file, **args.pod_labels},
        max_connections=args.max_connections,
        max_pipes=-1 if args.max_pipes is None else args.max_pipes,  # (-1: max_pipes_for's)
        http_routing=args.http_routing,
        ejection_time=args.ejection_time,
        access_log_fd=args.access_log_fd,
        access_log_json=args.access_log_format == "json",
        trusted_proxies=args.trusted_proxies,
        cluster_name=args.cluster_name,
        pool=PoolOptions(
            max_idle=args.pool_max_idle,
            idle_timeout=(
                min(args.idle_timeout, 60.0)
                if args.pool_idle_timeout is None
                else args.pool_idle_timeout
            ),
            max_requests=args.pool_max_requests,
        ),
    )
    # The rule watcher's counters (DNS lookups) are the worker's: one /stats.
    worker = Worker(listeners, rules, opts, counters=rules.counters)
    if args.health_check_failed:  # (before it accepts: see Supervisor.fail_health_check)
        worker.fail_health_check(True)
    stop = asyncio.Event()
    implementation = (
        f"peek={peek.IMPLEMENTATION} pump={pump.IMPLEMENTATION} relay={relay.IMPLEMENTATION}"
    )
    # /ready: STALLED from a third of the watchdog's timeout (admin.WorkerView)
    unready = max(args.watchdog_timeout * STALL_UNREADY, STALL_UNREADY_MIN_S)
    view = WorkerView(worker, implementation, stall_limit=unready if args.watchdog_timeout else 0)
    admin = stats = None
    if control is None:  # single process: the admin endpoint is ours
        map_large_allocations()  # a /stats page's buffer (lean)
        admin = await _start_admin(args, view, stop.set)
        stats = await _start_stats(args, view)
        _options_in_effect(admin, stats, listeners)
        try:
            _drop_privileges(args.uid, args.gid)
        except (OSError, ValueError) as exc:
            log.error("cannot drop privileges to uid=%s gid=%s: %s", args.uid, args.gid, exc)
            return 2

    if held.stop_requested:  # (before it accepts: see Worker.drain_first)
        worker.drain_first()
    leaving = _Leaving()
    leaving.withdraw = worker.stop_withdrawn
    leaving.reassert = worker.stop_signalled

    def stop_heard() -> None:
        leaving.stop_heard()  # (a stop's since its word: its stop handling stands)
        worker.stop_heard = True
        stop.set()

    if relay_hears_stop and not worker.hear_stop_signals(STOP_SIGNALS, stop_heard):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (no such relay after all)
        relay_hears_stop = False
    worker.start()
    if args.rules:
        rules.start()
    rules.after_load = give_back_memory  # a parse frees several times its table (lean)
    give_back_memory()  # and so did the first load and the imports
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_heard)
        _heard_first(sig, worker.stop_signalled)
    loop.add_signal_handler(signal.SIGHUP, rules.request_reload)
    # SIGUSR1: --access-log reopened (logrotate), as Envoy; the supervisor
    # reopened its own copy and said so (access_log_file), a lone process says it here
    said = log.info if control is None else log.debug

    def reopen() -> None:
        if reopen_access_log(args.access_log, worker.reopen_access_log, args.access_log_fd):
            said("SIGUSR1: --access-log %s reopened", args.access_log)

    loop.add_signal_handler(signal.SIGUSR1, reopen)
    say_ignored(loop)  # (SIGUSR2)
    if held.requested:  # SIGHUP during the first load: load again
        rules.request_reload()
    if held.reopen_requested:  # SIGUSR1 while starting
        reopen()
    if held.stop_requested:  # SIGTERM while starting: drain now
        worker.stop_heard = True
        stop.set()
    control_task = watch = None
    stop_came: list[float] = []  # (a stop signal taken late: when it came, _take_stop_signal)
    if control is not None:
        control_task = loop.create_task(_answer_supervisor(control, view, stop, leaving))
    else:  # no supervisor to watch this process: it watches itself
        watch = loop.create_task(_watch_alone(args, worker, stop, relay_hears_stop, stop_came))
    log.info(
        "l4proxy %s worker: listening: %s; %simplementation: %s; loop: %s; uid %d",
        __version__,
        ", ".join(lst.name for lst in listeners),
        "" if control is not None else f"admin {_admin_said(admin)}; ",  # (ours alone)
        implementation,
        args.loop,
        os.getuid(),
    )
    await stop.wait()
    close_by = overdue = None
    if control is not None and await leaving.handed_over(args.drain_duration):
        log.info("draining this worker's connections for up to %.1fs", args.drain_duration)
        forced = await worker.hand_over(
            args.drain_duration, gradual=args.drain_strategy == "gradual"
        )
        await _close_down(args, worker, rules, control_task, forced, leaving)
        log.info("stopped")
        return 0
    if watch is not None:  # (--single-process) the stop's deadline is ours to keep
        watch.cancel()
        deadline = min([time.monotonic(), *stop_came]) + args.drain_duration + DRAIN_GRACE_S
        overdue = _keep_stop_deadline(args, worker, deadline)
        close_by = deadline - CLOSE_MARGIN_S
    log.info(
        "draining for up to %.1fs: inbound served for %.1fs more; outbound served until "
        "%.1fs quiet",
        args.drain_duration,
        min(args.drain_inbound, args.drain_duration),
        args.drain_quiet,
    )
    forced = await worker.drain(
        args.drain_duration,
        quiet=args.drain_quiet,
        inbound=args.drain_inbound,
        gradual=args.drain_strategy == "gradual",
        close_by=close_by,
    )
    for server in (admin, stats):
        if server:
            await server.close()
    await _close_down(args, worker, rules, control_task, forced, leaving)
    left = worker.relay_stalled()  # (a relay thread its close gave up waiting for: stuck)
    if overdue is not None:
        overdue.cancel()
        if left:
            log.error(
                "stopped, but the relay thread did not end: it has not turned for %.1fs "
                "(stuck); exit status 1",
                left,
            )
            return 1
    log.info("stopped")
    return 0


async def _close_down(
    args: argparse.Namespace,
    worker: Any,
    rules: Any,
    control_task: asyncio.Task[None] | None,
    forced: int,
    leaving: _Leaving | None = None,
) -> None:
    """A drain's end (Worker.drain's, Worker.hand_over's): what it cut
    said, the worker closed, then its final counts given to the
    supervisor where it asked for them (_Leaving.finish) before the
    control channel goes: closed first, so that nothing counts after them
    (the connections the close cuts)."""
    if forced:
        log.warning(
            "drain deadline (--drain-duration %.1fs) passed: cut %d connection(s) still open",
            args.drain_duration,
            forced,
        )
    await rules.stop()
    worker.close()
    if leaving is not None:
        await leaving.finish(FINAL_COUNTS_WAIT_S)
    if control_task:
        control_task.cancel()
    done_with_signals(asyncio.get_running_loop())  # (a SIGHUP or SIGUSR1 now: no death by it)


# how long an exiting worker waits for its final counts to be asked for,
# built and written (_Leaving.finish; a big /stats takes a second or two)
FINAL_COUNTS_WAIT_S = 5.0

# --single-process: the watchdog a supervisor would be, in the process itself
# (_watch_alone), and the stop's deadline a supervisor would kill it at.
CLOSE_MARGIN_S = 1.0  # the relay's thread is waited for until this long before that deadline
STALL_UNREADY = 1 / 3  # /ready answers 503 STALLED from this share of --watchdog-timeout,
STALL_UNREADY_MIN_S = 1.0  # and not before four of the relay's idle turns (0.25 s each)
ALONE_TICK_S = 0.5  # how often a stop signal the relay's thread did not read is looked for
UNREAD_STOP_S = 1.0  # one pending that long was not read (the relay's loop turns each 0.25 s)


async def _watch_alone(
    args: argparse.Namespace,
    worker: Worker,
    stop: asyncio.Event,
    relay_hears_stop: bool,
    stop_came: list[float],
) -> None:
    """``--single-process``: this process watches its own relay as a
    supervisor's watchdog watches a worker's (Supervisor._watchdog, at its
    cadence: every fifth of ``--watchdog-timeout``), since nothing else
    does. A relay thread stuck (an endless loop, a deadlock) serves
    nothing while this event loop still answers the admin endpoint, so a
    liveness probe there passed and the pod was never restarted: past
    ``--watchdog-timeout`` without a turn (Worker.relay_stalled) the
    process says so and exits 1, and its container is restarted (/ready
    answers 503 ``STALLED`` meanwhile, from a third of it: WorkerView).

    A check after a sleep of this loop that overran its length by more than
    the length itself is not judged: the process was not running (stopped
    with SIGSTOP, and the relay's thread with it) or this thread was held
    (the GIL, for long Python work), and the relay's turn may just be due.

    And a stop signal the compiled relay's thread reads (its signalfd: the
    signals are blocked in every thread, Worker.hear_stop_signals) stays
    pending while that thread is stuck: one pending for ``UNREAD_STOP_S``
    is taken here (sigtimedwait), and the process stops all the same, by
    the stop's deadline counted from when it was first seen pending
    (*stop_came*; _keep_stop_deadline); before, it never did. Monotonic
    time throughout (the relay's turns are)."""
    limit = args.watchdog_timeout
    interval = check_interval(limit) if limit > 0 else math.inf
    tick = min(interval, ALONE_TICK_S) if relay_hears_stop else interval
    if tick == math.inf:
        return
    woke = time.monotonic()
    due = woke + interval  # the relay's next check
    unread: float | None = None  # since when a stop signal has been pending
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        held, woke = now - woke > 2 * tick, now
        if relay_hears_stop:
            if not signal.sigpending() & set(STOP_SIGNALS):
                unread = None
            elif unread is None:
                unread = now
            elif now - unread >= UNREAD_STOP_S and _take_stop_signal(worker, stop, now - unread):
                stop_came.append(unread)
                unread = None
        if now < due:
            continue
        due = now + interval
        stalled = worker.relay_stalled()
        if stalled >= limit and not held:
            log.error(
                "the relay thread has not turned for %.1fs (--watchdog-timeout %.1fs): stuck, it "
                "serves nothing; exiting (status 1) for the container to be restarted "
                "(--single-process: no supervisor restarts a worker)",
                stalled,
                limit,
            )
            os._exit(1)  # (as a supervisor's kill: nothing drains through a stuck relay)


def _take_stop_signal(worker: Worker, stop: asyncio.Event, unread: float) -> bool:
    """A stop signal pending for *unread* seconds that the compiled relay's
    thread did not read (_watch_alone): taken here, and the stop begins as
    its would have (Worker.stop_signalled, then the drain). False: none
    was pending any more (the relay's thread read it meanwhile)."""
    try:
        info = signal.sigtimedwait(STOP_SIGNALS, 0)
    except OSError:
        return False
    if info is None:
        return False
    log.warning(
        "%s: the relay thread, which reads it, has not for %.1fs (it has not turned for "
        "%.1fs); stopping all the same",
        signal.Signals(info.si_signo).name,
        unread,
        worker.relay_stalled(),
    )
    worker.stop_signalled()
    stop.set()
    return True


def _keep_stop_deadline(
    args: argparse.Namespace, worker: Worker, deadline: float
) -> threading.Timer:
    """``--single-process``: at the stop's *deadline* (monotonic:
    ``--drain-duration`` and ``DRAIN_GRACE_S`` from the stop on, where a
    supervisor kills a worker still draining) a process still there says
    so and exits 1, whatever holds it (its relay's thread stuck: its close
    waits until ``CLOSE_MARGIN_S`` before it, and :func:`_serve` exits 1
    then). A thread of its own: the event loop may be the one held.
    Cancel it once stopped."""
    grace = max(0.0, deadline - time.monotonic())

    def overdue() -> None:
        stalled = worker.relay_stalled()
        log.error(
            "still stopping at the stop's deadline (--drain-duration %.1fs + %.0fs)%s; "
            "exiting (status 1)",
            args.drain_duration,
            DRAIN_GRACE_S,
            f", the relay thread not turned for {stalled:.1f}s (stuck)" if stalled else "",
        )
        os._exit(1)

    timer = threading.Timer(grace, overdue)
    timer.daemon = True
    timer.start()
    return timer


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _heard_first(sig: int, heard: Callable[[], None]) -> None:
    """*heard()* as soon as *sig* comes, before the event loop's handler
    (add_signal_handler's, which runs a loop step or more later): chained
    before the loop's own handler at the Python level, which the
    interpreter runs on the main thread at its next instruction after the
    signal, before this thread accepts a connection or hands one on (the
    pure relay's worker: Worker.stop_signalled). SA_RESTART kept, as the
    loop set it."""
    previous = signal.getsignal(sig)

    def handler(signum: int, frame: FrameType | None) -> None:
        heard()
        if callable(previous):
            previous(signum, frame)

    signal.signal(sig, handler)
    signal.siginterrupt(sig, False)


class _Leaving:
    """What a supervised worker's SIGTERM is: the supervisor's stop
    (forwarded to every worker: a drain, Worker.drain), or one sent to this
    worker alone (someone recycling it: ``kill <worker pid>``), after which
    the slot's next worker takes its listeners before this one stops
    accepting (Envoy's and HAProxy's hand-over), where its drain retired
    them for every copy and the slot refused every client until it exited.

    The supervisor asks ``leaving`` of each worker as it starts, answered
    at its SIGTERM (:meth:`handed_over`), and says ``stopping`` to each
    before it forwards its own stop's SIGTERM: written first on the same
    stream, it is read before any answer to what the worker says next. A
    ``leaving`` that reaches a supervisor not stopping starts the slot's
    next worker at once, and ``handover`` comes once that one answers (it
    accepts from before it answers: _serve), or ``stopping`` if the
    supervisor's stop came meanwhile (a SIGTERM to the whole process
    group: a drain after all).

    Such a worker is also asked ``final`` (once it said that it leaves),
    and so is every worker told ``stopping`` (Supervisor._stop_one): it is
    answered as it exits, its drain done and the worker closed
    (:meth:`finish`), with its counters as a ``stats`` answer has them,
    so that what it counted since the supervisor's last scrape of it (the
    requests it finished in its drain) reaches /stats; the supervisor
    took its last scraped counts for its last before, and lost the rest."""

    def __init__(self) -> None:
        self.signalled = asyncio.Event()  # (answers the supervisor's "leaving")
        self.stopping = asyncio.Event()
        self.handover = asyncio.Event()
        self.gone = asyncio.Event()  # the control channel ended
        # The relay's stop handling (Worker.stop_signalled) has every answer
        # say ``connection: close`` from the signal on, a stop or not: it
        # cannot tell them apart then. The supervisor says ``serving`` once
        # it took this worker's word outside a stop (_wait_worker), and the
        # worker takes that back until its hand-over (Worker.stop_withdrawn)
        # where no stop signal came since its word (a stop's: ``stopping``
        # follows, and its drain).
        self.stop_signals = 0  # stop signals heard (run._serve's count)
        self.signals_at_word = 0
        self.withdraw: Callable[[], None] | None = None
        # The stop handling again (Worker.stop_signalled), where it was
        # taken back (:attr:`withdrawn`) and a stop comes after all
        # (:meth:`stop_heard`, :meth:`told_stopping`).
        self.reassert: Callable[[], None] | None = None
        self.withdrawn = False
        # ``final``: asked (its handler waits), the worker done (answer it
        # now), the answer written (the worker may exit)
        self.final_asked = False
        self.finished = asyncio.Event()
        self.final_sent = asyncio.Event()

    async def finish(self, wait: float) -> None:
        """The worker is done (drained and closed): answer the supervisor's
        ``final`` (the handler waits for this), and wait up to *wait* s for
        that answer to be written, where it was asked and the channel
        lives. Not asked: nothing to wait for."""
        self.finished.set()
        await asyncio.sleep(0)  # (a ``final`` just read: its handler's first step)
        if not self.final_asked or self.gone.is_set():
            return
        ends = {asyncio.ensure_future(e.wait()) for e in (self.final_sent, self.gone)}
        try:
            done, _ = await asyncio.wait(ends, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
        if not done:
            log.warning(
                "the final counts for the supervisor were not written within %.1fs: "
                "what this worker counted since its last scrape is not in /stats",
                wait,
            )

    def serving(self) -> bool:
        """The supervisor's ``serving``: the relay's stop handling taken
        back (:attr:`withdraw`), where nothing since says it stops."""
        if (
            self.withdraw is None
            or not self.signalled.is_set()
            or self.stopping.is_set()
            or self.gone.is_set()
            or self.handover.is_set()
            or self.stop_signals != self.signals_at_word
        ):
            return False
        self.withdraw()
        self.withdrawn = True
        log.info("SIGTERM to this worker alone: its answers keep their clients until it hands over")
        return True

    def stop_heard(self) -> None:
        """A stop signal, as the event loop hears it (run._serve's
        handler): counted (:meth:`serving` takes nothing back after it),
        and the stop handling set again where ``serving`` took it back.
        The signal reaches the relay first (its signalfd, the compiled
        one's; the handler's first half, the pure one's: both set the
        stop handling before this loop's handler runs), and a
        ``serving`` read in between, the supervisor's stop's SIGTERM
        having come just after it was written, took it back for good: a
        stop's answers kept their keep-alive clients until the drain's
        own step."""
        self.stop_signals += 1
        self._stop_wins()

    def told_stopping(self) -> None:
        """The supervisor's ``stopping`` (written before its stop's
        SIGTERM): the drain follows, and the stop handling is set again
        where ``serving`` took it back (:meth:`stop_heard`)."""
        self.stopping.set()
        self._stop_wins()

    def _stop_wins(self) -> None:
        if not self.withdrawn:
            return
        self.withdrawn = False
        if self.reassert is not None:
            self.reassert()

    async def handed_over(self, wait: float) -> bool:
        """After a SIGTERM: whether it was this worker's alone and its
        slot's next worker accepts now (this one hands its listeners over:
        Worker.hand_over); False: a stop (the supervisor's, or the
        supervisor gone), drained as ever. Serving meanwhile, as before the
        signal, for as long as its successor takes to answer: one that does
        not start (a broken --pod-labels-file, restarted after the slot's
        back-off) leaves this one serving its slot, said once after *wait*
        s (Envoy's hot restart, HAProxy's reload: the old process serves
        on where the new one fails), where it handed over to nobody and
        the slot served nothing until a successor started."""
        if self.stopping.is_set() or self.gone.is_set():
            return False
        self.signals_at_word = self.stop_signals
        self.signalled.set()
        ends = {asyncio.ensure_future(e.wait()) for e in (self.stopping, self.handover, self.gone)}
        try:
            done, _ = await asyncio.wait(ends, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                log.warning(
                    "SIGTERM to this worker alone: the supervisor's next worker for this slot "
                    "has not started within %.1fs; this one keeps serving until it does",
                    wait,
                )
                await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
        if self.stopping.is_set() or self.gone.is_set():
            return False
        log.info(
            "SIGTERM to this worker alone (the supervisor does not stop): the next worker "
            "of this slot accepts; its listeners are handed over to it"
        )
        return True


async def _answer_supervisor(
    control: socket.socket, view: WorkerView, stop: asyncio.Event, leaving: _Leaving | None = None
) -> None:
    """Serve the supervisor's requests (channel); the supervisor gone means: drain and exit.

    ``alive`` (the watchdog's ping) answers how many seconds the relay's
    thread has gone without a turn while it should be running (0.0: it
    turns, or there is none; Worker.relay_stalled): an event loop that
    answers says nothing of a relay thread that is stuck. ``leaving``,
    ``stopping`` and ``handover``: what a SIGTERM is (_Leaving); ``final``:
    its counts as it exits (_Leaving.finish)."""
    leaving = leaving if leaving is not None else _Leaving()

    async def handle(op: str) -> Any:
        if op == "leaving":  # (answered at a SIGTERM: channel.WAITING_OPS)
            await leaving.signalled.wait()
            return True
        if op == "stopping":
            leaving.told_stopping()
            return True
        if op == "handover":
            leaving.handover.set()
            return True
        if op == "serving":  # (the supervisor took its word outside a stop)
            return leaving.serving()
        if op == "final":  # (answered as it exits: _Leaving.finish)
            leaving.final_asked = True
            await leaving.finished.wait()
            return await view.stats_raw()
        if op == "ready":
            return await view.ready()
        if op == "alive":
            return view.worker.relay_stalled()
        if op == "stats":
            return await view.stats_raw()
        if op == "config_dump":
            return await view.config_dump()
        if op == "clusters":
            return await view.clusters()
        if op == "state":
            return await view.state()
        name, _, spec = op.partition(" ")
        if name == "logging":  # /logging: "logging NAME=LEVEL,..." sets, "logging" lists
            return apply_log_levels(spec)
        if name == "healthcheck" and spec in ("fail", "ok"):  # /healthcheck/fail, /ok
            await view.fail_health_check(spec == "fail")
            return True
        raise ValueError(f"unknown op {op!r}")

    def written(op: str) -> None:
        if op == "final":
            leaving.final_sent.set()

    why = await serve_supervisor(control, handle, written=written)
    log.warning("%s; draining", why)
    leaving.gone.set()
    stop.set()
