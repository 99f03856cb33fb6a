"""A request the drain's deadline cuts is logged as a close the proxy made.

An SRE review found such a request's access log line saying ``0 DC
downstream_remote_disconnect``, the words for a client that went away,
although the proxy had closed the connection itself. Envoy's words for a
downstream connection it closes are ``downstream_local_disconnect(REASON)``
(its ``ResponseCodeDetails::DownstreamLocalDisconnect``; for the
connections still open when a drain's time runs out the reason is
``filter_chain_is_being_removed``), and it sets DC on such a request too
(the flag of a request whose connection closed before its response, either
side's close: Istio's ``response_flags`` label says DC). Now both relay
twins write :data:`~l4proxy.dataplane.accesslog.DRAIN_CUT` there, and the
worker counts the cut connections in ``l4proxy_drain_cut_total``.

A real worker of each twin (tests/_worker.py: a gateway listener, a rule
file, real sockets) whose drain (1 s) finds a request held at the backend.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from l4proxy.dataplane import accesslog
from l4proxy.sidecar import istio_metrics as im
from tests._scripted import STALL, Scripted
from tests._worker import _worker_twin, gateway_service, gateway_worker
from tests.conftest import reset_close
from tests.test_access_log_worker import _fields, _read_lines
from tests.test_istio_response_flags import _rows

TWINS = ["pure", "compiled"]
HELD = b"GET /held HTTP/1.1\r\nHost: gw\r\n\r\n"


def _drained_with_one_held(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_resets: bool
) -> tuple[list[bytes], dict[str, Any], bytes | None]:
    """A request held at the backend while the worker drains (1 s), or
    whose client resets before the drain (*client_resets*): the access
    log's lines, the worker's counters (the event loop's and the relay's,
    once it closed), and what the client read (None: a reset)."""
    _worker_twin(which, monkeypatch)
    held = Scripted([STALL])
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(held.endpoint[1]))
    r, w = os.pipe()
    out: dict[str, Any] = {}

    async def main() -> None:
        async with gateway_worker(rules, http_routing="request", access_log_fd=w) as (
            _,
            worker,
            address,
        ):
            out["worker"] = worker
            client = socket.create_connection(address, 10)
            out["client"] = client
            client.sendall(HELD)
            deadline = time.monotonic() + 5
            while not held.requests:  # (in flight at the backend)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            if client_resets:
                reset_close(client)
                assert worker.relay is not None
                while worker.relay.stats()["requests"] < 1:  # (the relay saw it go)
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
        # (the drain's deadline passed, the relay closed: its rows handed over)

    try:
        asyncio.run(main())
    finally:
        os.close(w)
        held.close()
    read: bytes | None = None
    if not client_resets:
        try:
            read = out["client"].recv(65536)
        except ConnectionResetError:
            read = None
        out["client"].close()
    worker = out["worker"]
    counters = {**worker.counters.snapshot(), **worker.relay_counters.snapshot()}
    return _read_lines(r), counters, read


@pytest.mark.parametrize("which", TWINS)
def test_a_request_cut_at_the_drains_deadline_is_a_local_disconnect(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its line: ``0 DC downstream_local_disconnect(filter_chain_is_being_removed)``;
    Istio's series of it: 0 and DC, as Envoy's; the client reads a reset;
    l4proxy_drain_cut_total 1. Before: ``downstream_remote_disconnect``,
    and no such counter."""
    lines, counters, read = _drained_with_one_held(which, tmp_path, monkeypatch, False)
    assert read is None  # (cut: a reset)
    assert len(lines) == 1, lines
    f = _fields(lines[0])
    assert (f["code"], f["flags"], f["details"]) == (
        "0",
        "DC",
        "downstream_local_disconnect(filter_chain_is_being_removed)",
    ), f
    assert _rows(counters, im.REQUESTS) == {("0", "DC"): 1}
    assert counters["l4proxy_drain_cut_total"] == {(): 1}


@pytest.mark.parametrize("which", TWINS)
def test_a_client_gone_before_the_drain_is_still_a_remote_disconnect(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same request whose client resets first: ``0 DC
    downstream_remote_disconnect``, and the drain cut nothing."""
    lines, counters, _ = _drained_with_one_held(which, tmp_path, monkeypatch, True)
    assert len(lines) == 1, lines
    f = _fields(lines[0])
    assert (f["code"], f["flags"], f["details"]) == ("0", "DC", "downstream_remote_disconnect")
    assert _rows(counters, im.REQUESTS) == {("0", "DC"): 1}
    assert "l4proxy_drain_cut_total" not in counters or not counters["l4proxy_drain_cut_total"]


def test_the_pure_cores_details_of_a_drain_cut() -> None:
    """accesslog.details(), the pure twin's (the compiled relay's
    log_details() is checked through the worker above): a cut with
    LOCAL_CUT is the drain's; without, the client's."""
    cut = accesslog.final_flags(accesslog.CUT)
    assert accesslog.flags_text(cut) == "DC"
    local = accesslog.details(cut | accesslog.LOCAL_CUT, 0, False, accesslog.NO_TAG)
    assert local == accesslog.DRAIN_CUT
    assert accesslog.details(cut, 0, False, accesslog.NO_TAG) == "downstream_remote_disconnect"
