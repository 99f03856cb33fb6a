"""Empty lines (CRLF or a bare LF) before a request line, which both relay
twins skip (RFC 9112 §2.2), on the routes that read the head again as it
is staged for upstream: a path rewrite, header edits, a mirror. The head
the backend and the mirror read starts with the request line, as Envoy
sends it; the relay serves on. Before the fix, the compiled twin's
``edit_request()`` read before its buffer (its first LF at index 1: no SP
before it) and the worker died of SIGSEGV; the pure twin's edits raised
ValueError and reset the connection; a mirror's copy took the first empty
line for its request line and sent the request's body as a request of its
own; and every route sent the empty lines upstream inside the head.

The relays run in a child process (a worker on a gateway listener, with
its forwarding headers; a bare relay, the sidecar's head without them):
a crash there fails these tests instead of ending pytest. One child per
twin for the module, started again when a test finds it dead.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane.verdict import HeadEdits, PathRewrite
from tests._scripted import Scripted, _response, _status
from tests._worker import GATEWAY_HOST, gateway_routes, gateway_subsets

HOST = GATEWAY_HOST
ROOT = Path(__file__).resolve().parents[1]

ROUTES = gateway_subsets("v1", "v2") + gateway_routes(
    f"""\
  - match: [{{uri: {{prefix: /rw}}}}]
    rewrite: {{uri: /rewritten}}
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - match: [{{uri: {{prefix: /hdr}}}}]
    headers: {{request: {{set: {{x-a: b}}, remove: [x-rm]}}}}
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - match: [{{uri: {{prefix: /moved}}}}]
    redirect: {{uri: /new}}
  - match: [{{uri: {{prefix: /mir}}}}]
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
    mirror: {{host: {HOST}, subset: v2}}
    mirrorPercentage: {{value: 100.0}}
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"""
)

LEADS = {"crlf": b"\r\n", "lf": b"\n", "two-crlf": b"\r\n\r\n"}
# a request the mirror would take for one of its own, were the POST's
# body sent as a request
INNER = b"GET /admin/inner HTTP/1.1\r\nHost: internal\r\n\r\n"
# the request ahead of the case's on its connection (pipelined: one write)
AHEAD = b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n"
REQUESTS = {
    "rewrite": b"GET /rw/a HTTP/1.1\r\nHost: gw\r\nX-Rm: 1\r\n\r\n",
    "header-edit": b"GET /hdr/a HTTP/1.1\r\nHost: gw\r\nX-Rm: 1\r\n\r\n",
    "mirror": b"POST /mir/a HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s"
    % (len(INNER), INNER),
}


def _child(spec_text: str) -> None:
    """The child's body: serve as *spec_text* (JSON) says, print the port
    to connect to, and go on until stdin closes."""
    spec = json.loads(spec_text)
    if spec["kind"] == "worker":
        from tests._worker import _worker_twin, gateway_worker

        _worker_twin(spec["which"], pytest.MonkeyPatch())

        async def main() -> None:
            async with gateway_worker(Path(spec["rules"]), http_routing="request") as (
                _,
                _,
                address,
            ):
                print(address[1], flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

        asyncio.run(main())
        return
    from l4proxy.dataplane.verdict import Mirror
    from tests.test_relay_edges import ORIGIN
    from tests.test_relay_mirror import _mirror_relay

    primary, mirror = (("127.0.0.1", port) for port in spec["ports"])
    relay = _mirror_relay(
        tuple(spec["mode"]), (primary,), (Mirror((mirror,)),), edits=RELAY_EDITS, only="/api/a"
    )
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            relay.add(conn, ORIGIN)

    threading.Thread(target=accept, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    sys.stdin.read()
    relay.close()


class Child:
    """A child process serving as *spec* says (see _child()), started on
    demand and again once it died."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def port_alive(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            self._close_pipes()  # (the child that died: its Popen is dropped)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, json.dumps(self.spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert line, f"the child did not start: exit {self.proc.wait()}"
            self.port = int(line)
        return self.port

    def died(self, wait: bool) -> int | None:
        """Its exit status when it ended (waited for a little when *wait*:
        a client saw its connection end), else None."""
        assert self.proc is not None
        if wait:
            try:
                return self.proc.wait(5)
            except subprocess.TimeoutExpired:
                return None
        return self.proc.poll()

    def close(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        """Close this process's ends of the child's stdin and stdout, which
        stayed open until the garbage collector freed the Popen."""
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()


_CHILD = (
    "import sys\nfrom tests.test_worker_leading_empty_lines import _child\n_child(sys.argv[1])\n"
)


def _ask(child: Child, data: bytes, answers: int) -> list[bytes]:
    """*data* in one write on a new connection to *child*, and the
    *answers* answers read back; the child alive after it (a failure says
    its exit status)."""
    port = child.port_alive()
    got: list[bytes] = []
    why: BaseException | None = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            for _ in range(answers):
                got.append(_response(s))
    except (AssertionError, OSError) as exc:  # (its end: _response's assert, a reset)
        why = exc
    status = child.died(wait=why is not None)
    assert status is None, f"the relay's process died (exit {status}) on {data!r}"
    assert why is None, f"{why!r} on {data!r}"
    return got


def _new_requests(backend: Scripted, before: int, n: int) -> list[bytes]:
    """The requests *backend* read after its first *before*, once it read
    *n* of them (or 10 s passed: fewer)."""
    deadline = time.monotonic() + 10
    while len(backend.requests) < before + n and time.monotonic() < deadline:
        time.sleep(0.01)
    with backend.lock:
        return backend.requests[before:]


# -- a worker on a gateway listener ------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """v1 (every route's) and v2 (the mirror's) backends, and a worker child
    per twin on the rules ROUTES (made on first use)."""
    from tests._worker import gateway_service

    v1, v2 = Scripted([]), Scripted([])
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(gateway_service(v1.endpoint[1], v2.endpoint[1], labels=("v1", "v2")) + ROUTES)
    children = {
        which: Child({"kind": "worker", "which": which, "rules": str(rules)})
        for which in ("pure", "compiled")
    }
    try:
        yield {"v1": v1, "v2": v2, "children": children}
    finally:
        for child in children.values():
            child.close()
        v1.close()
        v2.close()


@pytest.mark.parametrize("route", list(REQUESTS))
@pytest.mark.parametrize("pipelined", [False, True], ids=["first", "pipelined"])
@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_worker_sends_the_head_from_its_request_line(
    gateway: dict[str, Any], which: str, lead: str, pipelined: bool, route: str
) -> None:
    """The head the route's backend reads starts with its request line
    (edited as the route says), the mirror's copy is one request (its
    Host -shadow, the body as sent), and the worker answers each request."""
    from tests.conftest import load_twin

    if which == "compiled":
        load_twin("relay", which)  # (skipped, or failed under CI, when not built)
    v1: Scripted = gateway["v1"]
    v2: Scripted = gateway["v2"]
    request = LEADS[lead] + REQUESTS[route]
    data = AHEAD + request if pipelined else request
    before, copies_before = len(v1.requests), len(v2.requests)
    answers = _ask(gateway["children"][which], data, 2 if pipelined else 1)
    assert [_status(a) for a in answers] == [200] * len(answers)
    seen = _new_requests(v1, before, len(answers))
    assert len(seen) >= len(answers), seen
    if pipelined:
        assert seen[0].startswith(b"GET /other HTTP/1.1\r\n"), seen
    sent = seen[len(answers) - 1]  # (the empty lines sent ahead: a request of their own)
    if route == "rewrite":
        assert sent.startswith(b"GET /rewritten/a HTTP/1.1\r\nHost: gw\r\nX-Rm: 1\r\n"), sent
    elif route == "header-edit":
        assert sent.startswith(b"GET /hdr/a HTTP/1.1\r\nHost: gw\r\n"), sent
        assert b"\r\nx-a: b\r\n" in sent and b"x-rm" not in sent.lower(), sent
    else:
        assert sent.startswith(b"POST /mir/a HTTP/1.1\r\n"), sent
        assert sent.endswith(b"\r\n\r\n" + INNER), sent
        copies = _new_requests(v2, copies_before, 1)
        assert len(copies) == 1, copies
        assert copies[0].startswith(b"POST /mir/a HTTP/1.1\r\nHost: gw-shadow\r\n"), copies
        assert copies[0].endswith(b"\r\n\r\n" + INNER), copies


@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_a_local_answer_behind_empty_lines_keeps_the_next_head_whole(
    gateway: dict[str, Any], which: str, lead: str
) -> None:
    """A redirect answered by the relay itself, empty lines before it and
    before the request after it, all in one write: the answer drops its
    head, and no byte more or less, so the next head is read whole and
    sent from its request line."""
    from tests.conftest import load_twin

    if which == "compiled":
        load_twin("relay", which)
    v1: Scripted = gateway["v1"]
    moved = b"GET /moved/a HTTP/1.1\r\nHost: gw\r\n\r\n"
    data = LEADS[lead] + moved + LEADS[lead] + REQUESTS["rewrite"]
    before = len(v1.requests)
    answers = _ask(gateway["children"][which], data, 2)
    assert [_status(a) for a in answers] == [301, 200], answers
    seen = _new_requests(v1, before, 1)
    assert len(seen) == 1 and seen[0].startswith(b"GET /rewritten/a HTTP/1.1\r\n"), seen


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_empty_lines_count_towards_the_head_limit(gateway: dict[str, Any], which: str) -> None:
    """The empty lines are read as part of the head (the parser judges the
    stream's first max_head bytes, 64 KiB): a head that ends at the
    limit's last byte after them goes (without them), one a byte longer
    is answered 431, and so is a client that sends nothing but empty
    lines (then its connection is closed)."""
    from tests.conftest import load_twin

    if which == "compiled":
        load_twin("relay", which)
    v1: Scripted = gateway["v1"]
    child = gateway["children"][which]
    request = b"GET /rw/limit HTTP/1.1\r\nHost: gw\r\n\r\n"
    fill = 65536 - len(request)  # (even: whole CR LF pairs)
    before = len(v1.requests)
    answers = _ask(child, b"\r\n" * (fill // 2) + request, 1)
    assert _status(answers[0]) == 200
    assert _new_requests(v1, before, 1)[-1].startswith(b"GET /rewritten/limit HTTP/1.1\r\n")
    answers = _ask(child, b"\n" + b"\r\n" * (fill // 2) + request, 1)
    assert _status(answers[0]) == 431, answers
    # nothing but empty lines, 16 times the limit: answered 431 and closed
    got, how = b"", "EOF"
    with socket.create_connection(("127.0.0.1", child.port_alive()), timeout=5) as s:
        try:
            s.sendall(b"\r\n" * (1 << 19))
            while data := s.recv(65536):
                got += data
        except OSError as exc:
            how = type(exc).__name__
    assert child.died(wait=False) is None
    assert (got[:13], how) == (b"HTTP/1.1 431 ", "EOF"), got


# -- a bare relay: the sidecar's head, no forwarding headers ------------------

RELAY_EDITS = HeadEdits(
    path=PathRewrite(4, "/v2"), request_set=(("x-a", "b"),), request_remove=("x-rm",)
)
RELAY_REQUEST = b"POST /api/a HTTP/1.1\r\nHost: a\r\nX-Rm: 1\r\nContent-Length: %d\r\n\r\n%s" % (
    len(INNER),
    INNER,
)
RELAY_AHEAD = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture(scope="module")
def bare() -> Iterator[dict[str, Any]]:
    """A primary and a mirror backend, and a relay child per mode (made on
    first use): every request edited (RELAY_EDITS), /api/a's mirrored."""
    primary, mirror = Scripted([]), Scripted([])
    ports = [primary.endpoint[1], mirror.endpoint[1]]
    children = {
        mode: Child({"kind": "relay", "mode": mode, "ports": ports})
        for mode in (("pure", "decide"), ("compiled", "decide"), ("compiled", "resolve"))
    }
    try:
        yield {"primary": primary, "mirror": mirror, "children": children}
    finally:
        for child in children.values():
            child.close()
        primary.close()
        mirror.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["first", "pipelined"])
@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize(
    "mode",
    [("pure", "decide"), ("compiled", "decide"), ("compiled", "resolve")],
    ids=["pure", "compiled", "compiled-verdict"],
)
def test_a_relay_sends_the_head_from_its_request_line(
    bare: dict[str, Any], mode: tuple[str, str], lead: str, pipelined: bool
) -> None:
    """Byte for byte: the primary reads the edited head from its request
    line (path rewritten, a line removed, one set), the mirror one copy
    of it (its Host -shadow) with the body as sent."""
    from tests.conftest import load_twin

    if mode[0] == "compiled":
        load_twin("relay", "compiled")
    primary: Scripted = bare["primary"]
    mirror: Scripted = bare["mirror"]
    request = LEADS[lead] + RELAY_REQUEST
    data = RELAY_AHEAD + request if pipelined else request
    before, copies_before = len(primary.requests), len(mirror.requests)
    answers = _ask(bare["children"][mode], data, 2 if pipelined else 1)
    assert [_status(a) for a in answers] == [200] * len(answers)
    head = (
        b"POST /v2/a HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
        b"x-envoy-attempt-count: 1\r\nx-a: b\r\n\r\n"
    )
    seen = _new_requests(primary, before, len(answers))
    assert seen[len(answers) - 1 :] == [head % (b"a", len(INNER)) + INNER], seen
    assert _new_requests(mirror, copies_before, 1) == [head % (b"a-shadow", len(INNER)) + INNER]
