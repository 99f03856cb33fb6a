"""Shared fixtures.

* ``netns``-marked tests need root and network namespaces. Without them they
  skip locally, and **fail** when ``CI=true`` (CI must run them).
* ``slow`` tests (soaks) run only with ``--soak`` (``make soak``).
* ``seed_dir`` is the Istio tutorial's manifests in ``../shared`` beside the
  checkout (``$L4PROXY_SHARED`` overrides). Users do not have it: tests that
  use it skip locally and **fail** under ``CI=true`` (CI provides it).
* Every skip goes through :func:`_skip_or_fail`: what CI must run, it runs.
* ``http_routing`` parametrizes a module's tests over both HTTP data planes
  (``--http-routing connection`` and ``request``, see ``tests.mesh.ROUTING_MODES``),
  module-scoped: pytest runs a module's tests mode by mode, so a module-scoped
  sidecar that depends on it starts once per mode.
* :func:`twin` parametrizes a test over the compiled and the pure-Python
  implementation of a module; a missing compiled build fails under CI.
* The process's own file descriptors are counted around each test
  (``tests._fd_audit``): the last test a process runs fails at teardown if
  the process used more than ``GUARD_MARGIN`` fd numbers above its start
  (open, or held by a thread blocked in accept()), naming the tests that
  left fds open. ``L4PROXY_FD_AUDIT=DIR`` writes each process's account
  of them to ``DIR``.
"""

from __future__ import annotations

import contextlib
import gc
import http.server
import importlib
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from types import ModuleType
from typing import Any

import pytest

from l4proxy.dataplane import _impl
from l4proxy.demo.podnet import PodNetwork
from tests._fd_audit import FdAudit
from tests.mesh import ROUTING_MODES, SEED_DIR, SHARED_DIR, Mesh

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests (make soak)")


def _skip_or_fail(reason: str, allow_module_level: bool = False) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def import_or_skip(name: str, reason: str) -> ModuleType:
    """``pytest.importorskip`` under the CI rule (call it at module level)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _skip_or_fail(f"{reason} ({exc})", allow_module_level=True)
        raise  # unreachable


@pytest.fixture(scope="session")
def seed_dir() -> str:
    """The tutorial's manifests, verbatim (``../shared/seed/istio-request-routing``)."""
    if not os.path.isdir(SEED_DIR):
        _skip_or_fail(
            f"no seed manifests at {SEED_DIR}: the project's shared material ({SHARED_DIR}) "
            "is not beside this checkout (CI provides it; L4PROXY_SHARED=DIR points elsewhere)"
        )
    return SEED_DIR


@pytest.fixture(scope="module", params=list(ROUTING_MODES))
def http_routing(request: pytest.FixtureRequest) -> str:
    """``connection`` or ``request``: the sidecar's ``--http-routing`` mode."""
    mode: str = request.param
    return mode


_netns_ok: tuple[bool, str] | None = None


def _check_netns() -> tuple[bool, str]:
    global _netns_ok
    if _netns_ok is None:
        if os.geteuid() != 0:
            _netns_ok = (False, "needs root (network namespaces, iptables)")
        elif not shutil.which("ip"):
            _netns_ok = (False, "needs iproute2's ip")
        else:
            name = f"l4probe{os.getpid()}"
            r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if r.returncode != 0:
                _netns_ok = (False, f"cannot create a network namespace: {r.stderr.strip()}")
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                why = _unreachable()
                _netns_ok = (not why, why)
    return _netns_ok


def _unreachable() -> str:
    """Why uid 1000 or 1337 cannot run this checkout's code ("" when both can).

    The netns tests run test servers and curl as uid 1000 and the sidecar as
    uid 1337 (its workers re-exec and import l4proxy from this checkout), and
    hand them paths in it. A checkout under a 0700 directory (root's home,
    ``mktemp -d``) or made with umask 077 is out of their reach: every such
    test would fail for that one reason, so say it once instead.
    """
    if not shutil.which("setpriv"):
        return "needs util-linux's setpriv"
    wanted = [
        (os.path.join(REPO, "l4proxy", "__init__.py"), "-r"),
        (os.path.join(REPO, "tests", "tools", "dial.py"), "-r"),
        (sys.executable, "-x"),
    ]
    for uid in (1000, 1337):
        for path, test in wanted:
            ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            if subprocess.run(["setpriv", *ids, "test", test, path]).returncode != 0:
                return (
                    f"uid {uid} cannot {'read' if test == '-r' else 'run'} {path} (a parent "
                    "directory is closed to other users, or the files are not world-readable); "
                    "run `make test`, which then runs the suite in a world-readable mirror"
                )
    return ""


# The longest test files (about a minute or more each on a 2-core host,
# longest first). Under ``make test`` the suite runs in TEST_JOBS processes,
# a file to each in turn (pytest-xdist's --dist loadfile, in collection
# order): a long file handed out last would run alone at the end. Every
# other file follows, in its usual order.
LONGEST_FILES = (
    "test_sidecar.py",
    "test_relay_retries_per_try_connect.py",
    "test_demo.py",
    "test_worker_hand_over.py",
    "test_relay_per_try_paths.py",
    "test_relay_twins.py",
    "test_per_request.py",
    "test_relay_retries_connect_backoff.py",
    "test_single_process_watchdog.py",
    "test_supervisor.py",
    "test_relay_timeout_body_connect.py",
    "test_relay_watchdog.py",
    "test_hardening_backends.py",
    "test_hardening_load.py",
    "test_drain_listener_queue.py",
    "test_init_netns.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the collection left (gc.freeze: the modules, every
    collected item, hypothesis's strategies) out of the collector's sight:
    a full collection walked all of it each time, 0.19 s here in a process
    that collected the whole suite (0.05 s with one file collected), and
    tests that collect before counting descriptors (test_relay_twins' every
    case, twice) spent minutes of the suite on it. The garbage made before
    this point is collected first; what a test makes is collected as
    before, and nothing frozen here is a test's."""
    gc.collect()
    gc.freeze()


_FD_AUDIT = FdAudit(detail=bool(os.environ.get("L4PROXY_FD_AUDIT")))
_fd_counted = ""  # the test whose descriptors were counted after it


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Count before the test's setup (and after its teardown, where
    pytest_runtest_teardown did not: a teardown that raised)."""
    global _fd_counted
    _FD_AUDIT.before()
    try:
        return (yield)
    finally:
        if _fd_counted != item.nodeid:
            _FD_AUDIT.after(item.nodeid)
        _fd_counted = ""


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Count after the fixtures' teardown (trylast: this runs after it);
    after the process's last test, write the account (L4PROXY_FD_AUDIT)
    and fail if the process used too many fd numbers."""
    global _fd_counted
    _FD_AUDIT.after(item.nodeid)
    _fd_counted = item.nodeid
    if nextitem is None:
        where = os.environ.get("L4PROXY_FD_AUDIT")
        if where:
            os.makedirs(where, exist_ok=True)
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            with open(os.path.join(where, f"fd-audit-{worker}.txt"), "w") as f:
                f.write(_FD_AUDIT.report())
        if why := _FD_AUDIT.over():
            pytest.fail(why, pytrace=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("slow") and not item.config.getoption("--soak"):
        pytest.skip("soak test: run with make soak (pytest --soak)")
    if item.get_closest_marker("netns"):
        ok, why = _check_netns()
        if not ok:
            _skip_or_fail(why)


# a relay's own answer's date line (local_response()'s: an IMF-fixdate of
# the second it went)
_DATE_LINE = re.compile(rb"\ndate: [A-Za-z]{3}, \d\d [A-Za-z]{3} \d{4} \d\d:\d\d:\d\d GMT\r\n")
EPOCH_DATE = b"Thu, 01 Jan 1970 00:00:00 GMT"


def undated(data: bytes) -> bytes:
    """*data* with the value of every relay answer's ``date:`` line the
    epoch's (its length kept): answers sent in different seconds, a
    twin's and the other's, or one and local_response()'s, compare equal
    where all else is."""
    return _DATE_LINE.sub(b"\ndate: " + EPOCH_DATE + b"\r\n", data)


def epoch_response(*args: Any, **kwargs: Any) -> bytes:
    """local_response() dated as undated() leaves an answer: what a relay's
    answer, undated, compares equal to."""
    from l4proxy.dataplane._exchange_py import local_response

    return local_response(*args, date=EPOCH_DATE.decode(), **kwargs)


def sent_up(request: bytes, n: int = 1) -> bytes:
    """*request* (a head, then its body's bytes) as the relays send it on its
    try *n* when nothing else of it changes: x-envoy-attempt-count after its
    lines, before its empty line (CR LF: a head with a bare LF is refused);
    see "x-envoy-attempt-count" in l4proxy/dataplane/_exchange_py.py."""
    from l4proxy.dataplane._exchange_py import attempt_counted, with_attempt_count

    end = request.index(b"\r\n\r\n") + 4
    out = with_attempt_count(request[:end]) + request[end:]
    return out if n == 1 else attempt_counted(out, n)


def reset_close(sock: socket.socket) -> None:
    """Close *sock* with a reset (SO_LINGER 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def dead_ports(n: int) -> Iterator[list[int]]:
    """*n* ports on 127.0.0.1 that refuse connections while the block runs.
    Each is bound by a socket that never listens: a connect to it is refused,
    and no listener (this process's, or a suite running beside it) can take
    the port meanwhile, as one could once a probe socket were closed (a
    request then waits on a server that never answers)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(s := socket.socket())
            s.bind(("127.0.0.1", 0))
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_ports(n: int) -> list[int]:
    """*n* distinct ports on 127.0.0.1 free now (bound together, so never
    the same one), for a process the test starts and dials before it says
    where it listens (``l4proxy run --admin``). Another may take one
    meanwhile: where the port can be read back, bind port 0 instead."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


ACCEPT_POLL = 0.1  # seconds a helper's accept loop waits before it looks again


def accept_until_closed(
    listener: socket.socket, on_accept: Callable[[socket.socket], None]
) -> threading.Thread:
    """A daemon thread handing each connection *listener* accepts to
    *on_accept*, until the listener is closed.

    It waits in poll() (a timeout on the listener), never in a blocking
    accept(): a close() from another thread does not wake a thread blocked
    in accept(), which then waits for good, holding the fd number the
    kernel took for the connection to come (``/proc/self/fd`` does not
    list it), so every later test's fds were numbered higher. Closed, the
    listener fails the next accept() within ACCEPT_POLL seconds. The
    connections come blocking, as a listener without a timeout gives them."""
    listener.settimeout(ACCEPT_POLL)

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            on_accept(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def readable(fileobj: Any, timeout: float) -> bool:
    """Whether *fileobj* (a socket, a pipe's file object) has bytes to read,
    or its end, within *timeout* seconds. epoll (selectors), not
    select.select(), which refuses an fd past 1023: a test process that
    has run half the suite may number its fds past that."""
    with selectors.DefaultSelector() as sel:
        sel.register(fileobj, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def running(pid: int) -> bool:
    """*pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def load_twin(name: str, which: str) -> ModuleType:
    """Import the ``which`` ("compiled" or "pure") twin of module *name*."""
    if which == "pure":
        return _impl.load_pure(name)
    try:
        return _impl.load_compiled(name)
    except ImportError as exc:
        _skip_or_fail(f"compiled l4proxy.dataplane._ext.{name} is not built ({exc})")
        raise  # unreachable


@pytest.fixture
def pod_network() -> Iterator[PodNetwork]:
    """A fresh bridge + node namespace; pods added by the test; always removed."""
    ok, why = _check_netns()
    if not ok:
        _skip_or_fail(why)
    with PodNetwork() as net:
        yield net


@pytest.fixture
def pod_network6() -> Iterator[PodNetwork]:
    ok, why = _check_netns()
    if not ok:
        _skip_or_fail(why)
    with PodNetwork(ipv6=True) as net:
        yield net


@pytest.fixture
def mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    """Bootcamp v1 ×2 + v2 ×1 in pods; the test starts the client (Mesh.start)."""
    with Mesh(pod_network) as m:
        m.start_backends()
        yield m


@contextlib.contextmanager
def serving(reply: Callable[[str], bytes | None]) -> Iterator[str]:
    """GETs answered with *reply(target)* (None: a 503), on 127.0.0.1 in a
    thread; yields HOST:PORT."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = reply(self.path)
            if body is None:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
