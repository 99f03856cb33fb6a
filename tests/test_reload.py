"""A reload does not stop the worker: connections are accepted and served while
2,000-object rule sets are parsed, and the swap is one assignment.

In-process: a real :class:`~l4proxy.sidecar.worker.Worker` with a gateway listener on
loopback and a real :class:`~l4proxy.rules.watch.RuleWatcher` over a generated
rule file. Each request gets a 404 (no Ingress): accept, peek, a table
lookup, an answer; that is the accept path a reload used to stop. With
``--http-routing request`` the head is read and the table looked up on the
relay's thread, the accept on the loop: both must go on during a parse.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

import l4proxy.rules.watch as rulewatch
from l4proxy.dataplane.listener import bind_listener
from l4proxy.rules import load_rules
from l4proxy.rules.watch import RuleWatcher
from l4proxy.sidecar.worker import Worker, WorkerOptions

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


def big_rules(n: int) -> str:
    """*n* ServiceEntries and *n* RouteRules (50/50 over two labelled endpoints)."""
    docs = []
    for i in range(n):
        docs.append(
            json.dumps(
                {
                    "apiVersion": "networking.istio.io/v1alpha3",
                    "kind": "ServiceEntry",
                    "metadata": {"name": f"svc{i}"},
                    "spec": {
                        "hosts": [f"svc{i}.default.svc.cluster.local"],
                        "addresses": [f"198.19.{100 + i // 250}.{i % 250 + 1}"],
                        "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                        "resolution": "STATIC",
                        "endpoints": [
                            {"address": "198.18.0.10", "labels": {"version": "v1"}},
                            {"address": "198.18.0.11", "labels": {"version": "v2"}},
                        ],
                    },
                }
            )
        )
    for i in range(n):
        docs.append(
            "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\n"
            f"metadata:\n  name: rr{i}\nspec:\n  destination:\n    name: svc{i}\n"
            "  precedence: 1\n  route:\n"
            "  - labels:\n      version: v1\n    weight: 50\n"
            "  - labels:\n      version: v2\n    weight: 50\n"
        )
    return "\n---\n".join(docs)


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_requests_are_served_while_a_big_rule_set_is_parsed(
    tmp_path: Path, loop: str, http_routing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Count the requests answered while the loader runs: before the fix the
    loader ran on the loop, which therefore answered exactly none (the client
    below runs on the same loop, so not even a connect completed), for about
    a second on every reload."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(big_rules(1000))
    # Instrumentation, not a stand-in: the real loader, with a flag around it.
    parsing = [False]

    def instrumented(*args: Any, **kw: Any) -> Any:
        parsing[0] = True
        try:
            return load_rules(*args, **kw)
        finally:
            parsing[0] = False

    monkeypatch.setattr(rulewatch, "load_rules", instrumented)
    counts = {"during": 0, "total": 0}

    async def main() -> None:
        watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
        assert watcher.load_now()
        lst = bind_listener("127.0.0.1", 0, "gateway")
        opts = WorkerOptions(header_timeout=30, http_routing=http_routing)
        worker = Worker([lst], watcher, opts)
        worker.start()
        watcher.start()
        done = asyncio.Event()

        async def client() -> None:
            while not done.is_set():
                r, w = await asyncio.open_connection(*lst.address)
                # Connection: close: in request mode a local answer keeps a
                # keep-alive connection open (the next request may route).
                w.write(b"GET / HTTP/1.1\r\nHost: nobody\r\nConnection: close\r\n\r\n")
                answer = await r.read()
                w.close()
                assert answer.startswith(b"HTTP/1.1 404 "), answer
                counts["total"] += 1
                if parsing[0]:
                    counts["during"] += 1

        task = asyncio.create_task(client())
        try:
            rules.write_text(big_rules(1000) + "\n")  # same rules, a new file
            watcher.request_reload()
            for _ in range(6000):
                await asyncio.sleep(0.01)
                if watcher.state.generation == 2:
                    break
            assert watcher.state.generation == 2
            assert watcher.state.last_error is None
            if worker.relay is not None:  # request mode: the relay answered them
                assert worker.relay.stats()["local_answers"] >= counts["total"] > 0
        finally:
            done.set()
            await task
            await watcher.stop()
            await worker.drain(1)
            worker.close()

    RUNNERS[loop](main())
    # The parse takes ~0.5 s here; a request costs ~1 ms idle and a few GIL
    # hand-offs (5 ms each) under the parse: dozens complete. One or more
    # proves the loop was not stopped; 5 leaves room for a slow CI machine.
    assert counts["during"] >= 5, counts


def test_a_parse_pauses_the_collector_and_leaves_no_cycles(tmp_path: Path) -> None:
    """Why pausing the cyclic GC during a parse is safe: the loader's objects
    form no reference cycles, so dropping a table (or the parser's
    intermediates) leaves nothing for the collector."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(big_rules(50))
    watcher = RuleWatcher([str(rules)])
    gc.collect()
    result = watcher._parse_without_gc()
    assert gc.isenabled()
    del result
    assert gc.collect() == 0


def test_the_fingerprint_ignores_hidden_files_and_sees_rule_files(tmp_path: Path) -> None:
    """A hidden temp file of an atomic write, or l4proxy canary's state file,
    must not reload unchanged rules (the generation would move, and a canary
    waiting for its own document to go live took that for it); a rule file
    added, replaced or removed must."""
    fingerprint = rulewatch.fingerprint
    rules = tmp_path / "rules.yaml"
    rules.write_text("a: 1\n")
    base = fingerprint([str(tmp_path)])
    (tmp_path / ".rules.yaml.tmp").write_text("half written")
    (tmp_path / ".canary-bootcamp.state.json").write_text("{}")
    (tmp_path / "README").write_text("not a rule file")
    assert fingerprint([str(tmp_path)]) == base
    replacement = tmp_path / ".next.tmp"
    replacement.write_text("a: 2\n")
    replacement.replace(rules)
    assert fingerprint([str(tmp_path)]) != base
    after = fingerprint([str(tmp_path)])
    (tmp_path / "more.yaml").write_text("b: 1\n")
    assert fingerprint([str(tmp_path)]) != after
