"""One broken rule file holds back that file alone: the others' changes go live.

A rules directory loaded as a whole: one invalid file kept the whole last
good table, so nothing else changed, a canary's rollback in its own file
included (a review: ``l4proxy canary`` rolled back while a typo in an
unrelated file kept 30 % of the traffic on the failing version). Now a load
that fails with every error in some files is tried again with each of those
files at its last good text, or left out where it never loaded, and that
combination goes live if it loads (l4proxy.rules.watch).

In-process: a real :class:`~l4proxy.rules.watch.RuleWatcher` loading real
files. Then real sidecars (``l4proxy run``, two workers, a gateway listener
on loopback, backends that answer their version): the digests of two
workers agree, a worker restarted while a file is broken serves that file's
last good version as the other does, and a canary's rollback goes live
beside an unrelated broken file, end to end with ``l4proxy canary``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import l4proxy.rules.watch as rulewatch
from l4proxy.rules import ConfigError
from l4proxy.rules._loader import RuleFiles
from l4proxy.rules.watch import Loaded, RuleWatcher
from tests._worker import gateway_service
from tests.conftest import free_ports, serving

L4PROXY = os.path.join(os.path.dirname(sys.executable), "l4proxy")
HOST = "svc.default.svc.cluster.local"
BROKEN = "kind: ConfigMap\ndata: [\n"  # a YAML syntax error at line 3


def route(v1: int, name: str = "svc-default") -> str:
    """A RouteRule of svc: *v1* % to version v1, the rest to v2."""
    return (
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\n"
        f"metadata: {{name: {name}}}\nspec:\n  destination: {{name: svc}}\n  precedence: 1\n"
        "  route:\n"
        f"  - labels: {{version: v1}}\n    weight: {v1}\n"
        f"  - labels: {{version: v2}}\n    weight: {100 - v1}\n"
    )


def other_service(n: int) -> str:
    """A ServiceEntry of its own: a change to a file no route depends on."""
    return (
        "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\n"
        f"metadata: {{name: other{n}}}\nspec:\n  hosts: [other{n}.example.com]\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n"
        f"  endpoints: [{{address: 198.18.0.{n}}}]\n"
    )


def weights(watcher: RuleWatcher) -> dict[str, int]:
    """svc's split in the served table, by version."""
    [r] = watcher.state.table.routes_for(HOST)
    return {d.subset.name: d.weight for d in r.destinations if d.subset is not None}


def write(path: Path, text: str) -> None:
    """As a writer should: a hidden temporary, renamed over the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    """svc's registry (v1 and v2 endpoints) and a route, 50/50."""
    d = tmp_path / "rules"
    d.mkdir()
    write(d / "registry.yaml", gateway_service(8081, 8082, labels=("v1", "v2")))
    write(d / "route.yaml", route(50))
    return d


def test_a_change_beside_an_unrelated_broken_file_goes_live(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """typo.yaml (never valid) and a new split saved together: the split is
    served, typo.yaml is left out, and its error is reported as any
    refused load's (the log with file and line, last_error, a failure
    counted, l4proxy_rules_files_held)."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now() and weights(watcher) == {"v1": 50, "v2": 50}
    write(rules / "typo.yaml", BROKEN)
    write(rules / "route.yaml", route(100))
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert watcher.load_now()
    assert weights(watcher) == {"v1": 100, "v2": 0}
    st = watcher.state
    typo = str(rules / "typo.yaml")
    assert (st.generation, st.reloads, st.reload_failures) == (2, 2, 1)
    assert st.last_error is not None and st.last_error.startswith(f"{typo}:3:1: YAML syntax")
    assert st.sources == [str(rules / "registry.yaml"), str(rules / "route.yaml")]
    [held] = st.to_json()["held"]
    assert (held["file"], held["served"], held["last_good"]) == (typo, "none (left out)", None)
    assert held["errors"] == [st.last_error]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"rules rejected, leaving out {typo} (no version of it was loaded): {st.last_error}"
    ]
    assert watcher.counters.get("l4proxy_rules_files_held") == 1
    assert watcher.counters.get("l4proxy_rules_file_held", file=typo) == 1


def test_a_broken_file_is_served_at_its_last_good_version_until_fixed(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """route.yaml loaded at 50/50, then saved broken beside a change of
    another file: the other file's change goes live with route.yaml as it
    was (50/50), and the log says which version of it is served (its size
    and mtime); fixed, route.yaml goes live as it is and nothing is held."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    os.utime(rules / "route.yaml", ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    assert watcher.load_now()  # (the version served: its mtime set)
    write(rules / "route.yaml", BROKEN)
    write(rules / "more.yaml", other_service(1))
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert watcher.load_now()
    assert weights(watcher) == {"v1": 50, "v2": 50}
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said.startswith(
        f"rules rejected, serving {rules / 'route.yaml'} as last loaded "
        f"({len(route(50))} bytes, modified 2023-11-14T22:13:20Z): {rules / 'route.yaml'}:3:1: "
    ), said
    assert watcher.state.table.service("other1.example.com") is not None
    [held] = watcher.state.to_json()["held"]
    assert held["file"] == str(rules / "route.yaml") and held["served"] == "last good version"
    assert held["last_good"]["size"] == len(route(50))
    write(rules / "route.yaml", route(0))
    assert watcher.load_now()
    assert weights(watcher) == {"v1": 0, "v2": 100}
    st = watcher.state
    assert (st.held, st.last_error, st.generation) == ([], None, 4)
    assert watcher.counters.get("l4proxy_rules_files_held") == 0
    assert watcher.counters.get("l4proxy_rules_file_held", file=str(rules / "route.yaml")) == 0


def test_a_held_file_deleted_has_its_series_dropped(rules: Path) -> None:
    """l4proxy_rules_file_held{file} of a held file: 1 while held, 0 once it
    loads as it is, and no series at all once it is deleted (a series per
    file name ever broken stayed at 0 for ever)."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    typo, other = rules / "typo.yaml", rules / "other.yaml"
    write(typo, BROKEN)
    write(other, BROKEN)
    write(rules / "more.yaml", other_service(1))
    assert watcher.load_now()

    def series() -> dict[str, float]:
        got = watcher.counters.snapshot().get("l4proxy_rules_file_held", {})
        return {dict(labels)["file"]: value for labels, value in got.items()}

    assert series() == {str(typo): 1, str(other): 1}
    write(other, other_service(2))
    typo.unlink()
    assert watcher.load_now()
    assert series() == {str(other): 0}
    assert f'file="{typo}"' not in watcher.counters.render()


def test_a_held_combination_that_does_not_load_keeps_the_whole_last_good_table(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The route moved to a new file and the old one saved broken: with the
    old file at its last good version the route is there twice (a duplicate
    name), so that combination is refused too and the last good table
    keeps serving, whole, as before per-file loading."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    table, digest = watcher.state.table, watcher.state.digest
    write(rules / "route.yaml", BROKEN)
    write(rules / "moved.yaml", route(100))
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert not watcher.load_now()
    st = watcher.state
    assert st.table is table and (st.generation, st.digest) == (1, digest)
    assert st.reload_failures == 1 and st.held == []
    route_file = str(rules / "route.yaml")
    assert st.last_error is not None and st.last_error.startswith(f"{route_file}:3:1: ")
    said = [r.getMessage() for r in caplog.records]
    assert f"rules rejected, keeping generation 1: {st.last_error}" in said
    assert any(
        m.startswith(f"rules: with {route_file} at the last good version or left out")
        and "duplicate name: RouteRule default/svc-default" in m
        for m in said
    ), said


def test_a_file_renamed_with_an_error_keeps_the_whole_last_good_table(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """route.yaml renamed to zz-route.yaml with a typo in it: left out, the
    new file took the route with it, and svc was served by neither the old
    split nor the new one. The route would be gone, so the whole last good
    table keeps serving (as before per-file loading), the log says which
    object and why; fixed, the new file loads."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    table, digest = watcher.state.table, watcher.state.digest
    write(rules / "zz-route.yaml", route(100) + "  - labels: {version: v2\n")
    (rules / "route.yaml").unlink()
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert not watcher.load_now()
    st = watcher.state
    assert st.table is table and (st.generation, st.digest, st.reload_failures) == (1, digest, 1)
    assert weights(watcher) == {"v1": 50, "v2": 50}
    zz, old = rules / "zz-route.yaml", rules / "route.yaml"
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said.startswith(
        f"rules: with {zz} left out, 1 object(s) served would be gone: "
        f"RouteRule default/svc-default (served from {old}, which is gone); "
        "the whole last good table keeps serving"
    ), said
    write(zz, route(100))
    assert watcher.load_now() and weights(watcher) == {"v1": 100, "v2": 0}


def test_an_object_moved_into_a_new_broken_file_keeps_the_whole_last_good_table(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The route moved out of a valid file (it holds another object still)
    into a new file with an error: the route would be gone, so the whole
    last good table keeps serving; the log says the route's file no longer
    holds it. A change to another file beside a broken one still goes live
    where nothing served would be gone (the other tests)."""
    write(rules / "route.yaml", route(50) + "---\n" + other_service(1))
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    table = watcher.state.table
    write(rules / "route.yaml", other_service(1))
    write(rules / "moved.yaml", route(100) + BROKEN)
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert not watcher.load_now()
    assert watcher.state.table is table and weights(watcher) == {"v1": 50, "v2": 50}
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        f"RouteRule default/svc-default (served from {rules / 'route.yaml'}, "
        "which no longer holds it)" in said[0]
    ), said


def test_a_first_load_with_the_others_texts_serves_what_they_keep_serving(rules: Path) -> None:
    """A worker restarted while the others keep their whole last good table
    (route.yaml renamed with a typo): its first load has no table of its
    own to keep, and served the files with the new one left out (no route,
    another digest). It serves the texts the others serve, whole: the same
    digest and split."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    write(rules / "zz-route.yaml", route(100) + "  - labels: {version: v2\n")
    (rules / "route.yaml").unlink()
    assert not watcher.load_now()
    restarted = RuleWatcher([str(rules)], interval=3600, settle=0)
    restarted.last_good = watcher.last_good  # (the shared memory file's, in a sidecar)
    assert restarted.load_now()
    assert restarted.state.digest == watcher.state.digest
    assert weights(restarted) == {"v1": 50, "v2": 50}
    assert restarted.state.last_error is not None  # (the files as they are: refused)


def test_a_first_load_of_the_others_texts_tries_an_unreadable_path_again(
    rules: Path, tmp_path: Path
) -> None:
    """A path the workers load is gone (unreadable: they keep their table and
    try again after RETRY_FIRST); a worker restarted then serves their
    texts, and tries the path again as they do (what fixes it may leave
    every stat as it was)."""
    extra = tmp_path / "extra.yaml"
    write(extra, other_service(3))
    watcher = RuleWatcher([str(rules), str(extra)], interval=3600, settle=0)
    assert watcher.load_now()
    extra.unlink()
    assert not watcher.load_now() and watcher._retry_at is not None
    restarted = RuleWatcher([str(rules), str(extra)], interval=3600, settle=0)
    restarted.last_good = watcher.last_good
    assert restarted.load_now() and restarted.state.digest == watcher.state.digest
    assert restarted._retry_at is not None


def test_a_new_broken_file_alone_changes_nothing_served_and_is_named(rules: Path) -> None:
    """A broken file beside no other change: no new generation (the table
    would be the one served), the digest as it was, the error reported and
    the file named as held; deleted, the files load as they are."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    table, digest = watcher.state.table, watcher.state.digest
    write(rules / "typo.yaml", BROKEN)
    assert not watcher.load_now()
    st = watcher.state
    assert st.table is table and (st.generation, st.digest, st.reload_failures) == (1, digest, 1)
    assert [h.path for h in st.held] == [str(rules / "typo.yaml")]
    (rules / "typo.yaml").unlink()
    assert watcher.load_now()
    assert (st.held, st.last_error, st.generation) == ([], None, 2)


def test_the_digest_moves_with_what_is_served_not_with_the_files_refused(rules: Path) -> None:
    """What `l4proxy canary` and `create --admin` wait on: a change refused
    in its own file leaves the digest as it was (the change is not live);
    a change of another file beside it moves it (that change is live)."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    first = watcher.state.digest
    write(rules / "route.yaml", route(120))  # weights total 120: refused
    assert not watcher.load_now()
    assert watcher.state.digest == first and weights(watcher) == {"v1": 50, "v2": 50}
    write(rules / "more.yaml", other_service(1))
    assert watcher.load_now()
    second = watcher.state.digest
    assert second not in (first, 0) and weights(watcher) == {"v1": 50, "v2": 50}
    # the same files loaded afresh, in another process (a watcher of its
    # own, route.yaml's last good version from the first: see _last_good)
    other = RuleWatcher([str(rules)], interval=3600, settle=0)
    other.last_good = watcher.last_good
    assert other.load_now() and other.state.digest == second


def test_a_first_load_with_a_broken_file_and_nothing_shared_is_refused(
    rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process's first load with route.yaml broken and no last good
    version of it anywhere (a sidecar starting): refused whole, as before
    per-file loading, and the reason said, where it went live without
    route.yaml (a pod ready that routes otherwise than the running ones).
    Fixed, it loads."""
    write(rules / "route.yaml", BROKEN)
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    with caplog.at_level(logging.INFO, logger=rulewatch.log.name):
        assert not watcher.load_now()
    st = watcher.state
    route_file = str(rules / "route.yaml")
    assert (st.generation, st.digest, st.held, st.reload_failures) == (0, 0, [], 1)
    assert st.last_error is not None and st.last_error.startswith(f"{route_file}:3:1: ")
    assert f"{route_file} not left out: no version of the rule files" in st.last_error
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said[0] == f"rules rejected, none loaded yet: {st.last_error.splitlines()[0]}"
    assert said[-1].startswith(f"rules rejected, none loaded yet: {route_file} not left out")
    write(rules / "route.yaml", route(100))
    assert watcher.load_now() and weights(watcher) == {"v1": 100, "v2": 0}


def _parse_garbage() -> dict[str, int]:
    """What a full collection finds unreachable of a parse (its files, its
    errors, the frames of the rules' modules), by type; the collector is
    left as it was."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(
            type(o).__name__
            for o in gc.garbage
            if isinstance(o, RuleFiles | ConfigError | Loaded)
            or (isinstance(o, types.FrameType) and "l4proxy/rules/" in o.f_code.co_filename)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


def test_refused_reloads_leave_nothing_for_the_cyclic_collector(
    rules: Path, tmp_path: Path
) -> None:
    """A held reload kept its refusal (Loaded.refused), and that exception's
    traceback the parse's frames, which held it: a cycle holding every
    file's text, freed by a full collection only (the worker freezes what
    it has before it collects: RSS grew 1.8 MB per 100 reloads); so did a
    refusal handed from reload's thread. Five rounds of a held load that
    goes live, one whose held combination is refused too, one that serves
    nothing new (in load_now and in reload's thread) and a refusal whole
    in the thread: a full collection then finds nothing of them."""
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0)
    assert watcher.load_now()
    alone = tmp_path / "alone"  # one broken file, never loaded: refused whole
    alone.mkdir()
    write(alone / "route.yaml", BROKEN)
    fresh = RuleWatcher([str(alone)], interval=3600, settle=0)

    async def reloads(i: int) -> None:
        write(rules / "more.yaml", other_service(1) + f"# {i}, again\n")
        assert await watcher.reload()  # held, the other file live
        assert not await watcher.reload()  # (nothing new to serve)
        assert not await fresh.reload()

    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for i in range(5):
            write(rules / "route.yaml", BROKEN + f"# {i}\n")
            write(rules / "more.yaml", other_service(1) + f"# {i}\n")
            assert watcher.load_now()  # held, the other file live
            write(rules / "moved.yaml", route(100))
            assert not watcher.load_now()  # held, the route is there twice: refused
            (rules / "moved.yaml").unlink()
            assert not fresh.load_now()
            asyncio.run(reloads(i))
        assert (watcher.state.reload_failures, fresh.state.reload_failures) == (20, 10)
        assert _parse_garbage() == {}
    finally:
        if was:
            gc.enable()


def _configmap(mount: Path, version: str, files: dict[str, str]) -> None:
    """A ConfigMap mount's next version, swapped in as the kubelet does."""
    (mount / version).mkdir()
    for key, text in files.items():
        (mount / version / key).write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(version, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    for key in files:
        if not (mount / key).is_symlink():
            os.symlink(f"..data/{key}", mount / key)
    if old is not None:
        shutil.rmtree(mount / old)


def test_a_configmap_swap_with_one_key_broken_keeps_that_keys_last_good_text(
    tmp_path: Path,
) -> None:
    """A ConfigMap update whose route key is broken: the other keys go live,
    and the route is served as it was, though the version directory it was
    read from is gone."""
    mount = tmp_path / "config"
    mount.mkdir()
    registry = gateway_service(8081, 8082, labels=("v1", "v2"))
    _configmap(
        mount, "..2024_01_01_00_00_00.1", {"registry.yaml": registry, "route.yaml": route(30)}
    )
    watcher = RuleWatcher([str(mount)], interval=3600, settle=0)
    assert watcher.load_now() and weights(watcher) == {"v1": 30, "v2": 70}
    _configmap(
        mount,
        "..2024_01_01_00_05_00.2",
        {"registry.yaml": registry + "---\n" + other_service(2), "route.yaml": BROKEN},
    )
    assert watcher.load_now()
    assert weights(watcher) == {"v1": 30, "v2": 70}
    assert watcher.state.table.service("other2.example.com") is not None
    assert [h.path for h in watcher.state.held] == [str(mount / "route.yaml")]


# -- real sidecars ---------------------------------------------------------------------


class Sidecar:
    """``l4proxy run`` as a gateway on loopback, its log read as it comes."""

    def __init__(self, rules: Path, workers: int, ready: bool = True) -> None:
        # (a port free now: the test dials it without reading the log line
        # that names the port ``--admin HOST:0`` binds)
        self.admin = f"127.0.0.1:{free_ports(1)[0]}"
        self.proc = subprocess.Popen(
            [
                *(L4PROXY, "run", "--no-transparent", "--listen", "127.0.0.1:0"),
                *("--admin", self.admin, "--workers", str(workers), "--seed", "7"),
                *("--rules", str(rules), "--reload-interval", "0.1"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.listening = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        assert self.listening.wait(30), "".join(self.log)
        if ready:
            self.until(lambda: self.get("/ready") == (200, "LIVE\n"), "ready")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if " supervisor: " in line and "listening: gateway:" in line:
                self.port = int(line.split("listening: gateway:")[1].split(";")[0].split(":")[1])
                self.listening.set()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/stats?format=json")[1]))

    def until(self, done: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                if done():
                    return
            assert time.monotonic() < deadline, f"never {what}:\n{''.join(self.log[-40:])}"
            time.sleep(0.05)

    def versions(self, n: int = 20) -> list[str]:
        """The answers of *n* requests, each on a new connection (spread
        over the workers)."""
        got = []
        for _ in range(n):
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                c.request("GET", "/", headers={"Host": "svc"})
                got.append(c.getresponse().read().decode())
            finally:
                c.close()
        return got

    def worker_pids(self) -> list[int]:
        return [
            int(line.split("(pid ")[1].split(")")[0]) for line in self.log if "started (pid" in line
        ]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _value(stats: dict[str, Any], name: str) -> float:
    """An unlabelled series of /stats?format=json: a gauge's value, or a
    counter's one sample."""
    got = stats[name]
    if isinstance(got, list):
        [sample] = [s for s in got if not s["labels"]]
        return float(sample["value"])
    return float(got)


@contextlib.contextmanager
def sidecar(rules: Path, workers: int = 2, ready: bool = True) -> Iterator[Sidecar]:
    s = Sidecar(rules, workers, ready)
    try:
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def backends(
    v2: Callable[[str], bytes | None] = lambda target: b"v2",
) -> Iterator[tuple[int, int]]:
    """v1 (answers "v1") and v2 (*v2*'s answers), their ports."""
    with serving(lambda target: b"v1") as one, serving(v2) as two:
        yield int(one.rsplit(":", 1)[1]), int(two.rsplit(":", 1)[1])


def test_two_workers_serve_a_change_beside_a_broken_file_and_a_restarted_one_agrees(
    tmp_path: Path,
) -> None:
    """Two workers: a new split saved beside a broken typo.yaml is served by
    both (every request of 20 connections) and their digests agree. Then
    route.yaml is saved broken beside another change, and worker 1 is
    killed: its successor had no version of route.yaml of its own, and
    takes the one the other worker serves (the supervisor's memory file),
    so the digest stays one and every request still gets v2."""
    rules = tmp_path / "rules"
    rules.mkdir()
    with backends() as (p1, p2):
        write(rules / "registry.yaml", gateway_service(p1, p2, labels=("v1", "v2")))
        write(rules / "route.yaml", route(100))
        with sidecar(rules) as sc:
            assert set(sc.versions()) == {"v1"}
            before = sc.stats()["l4proxy_rules_digest"]
            write(rules / "typo.yaml", BROKEN)
            write(rules / "route.yaml", route(0))

            def moved() -> bool:
                s = sc.stats()
                return (
                    s["l4proxy_rules_digest"] not in (before, -1)
                    and s["l4proxy_rules_generation"] >= 2
                )

            sc.until(moved, "served the new split")
            assert set(sc.versions()) == {"v2"}
            stats = sc.stats()
            assert stats["l4proxy_rules_valid"] == 0
            assert _value(stats, "l4proxy_reload_failures_total") >= 2
            assert _value(stats, "l4proxy_rules_files_held") == 1
            dump = json.loads(sc.get("/config_dump")[1])
            assert [h["file"] for h in dump["held"]] == [str(rules / "typo.yaml")]
            assert dump["last_error"].startswith(f"{rules / 'typo.yaml'}:3:1: ")

            # route.yaml broken, served at its last good version (v2 100)
            write(rules / "route.yaml", BROKEN)
            write(rules / "more.yaml", other_service(1))
            held_digest = 0

            def both_hold() -> bool:
                nonlocal held_digest
                dump = json.loads(sc.get("/config_dump")[1])
                held_digest = sc.stats()["l4proxy_rules_digest"]
                done = len(dump["held"]) == 2 and str(rules / "more.yaml") in dump["sources"]
                return done and held_digest not in (-1, 0)  # (-1: one worker not yet)

            sc.until(both_hold, "held route.yaml")
            [_, pid] = sc.worker_pids()
            os.kill(pid, signal.SIGKILL)
            sc.until(lambda: len(sc.worker_pids()) == 3, "restarted worker 1")
            sc.until(
                lambda: (
                    sc.stats()["l4proxy_workers"] == 2
                    and sc.stats()["l4proxy_rules_generation"] == 1
                ),
                "loaded the rules in the restarted worker",
            )
            assert sc.stats()["l4proxy_rules_digest"] == held_digest
            assert set(sc.versions()) == {"v2"}


def _last_good_memory(pid: int) -> str:
    """The path of the supervisor's memory file of last good texts."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        with contextlib.suppress(OSError):
            if "l4proxy-rules-last-good" in os.readlink(path):
                return path
    raise AssertionError(f"no memory file of last good texts in process {pid}")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_worker_restarted_while_the_shared_texts_are_damaged_agrees_once_repaired(
    tmp_path: Path, damage: str
) -> None:
    """route.yaml held at its last good version (v1 100) by both workers;
    the memory file they share is truncated to nothing or overwritten with
    garbage (a write that failed: both its versions lost; a writer killed
    mid-write leaves the one before: see test_last_good), and worker 1 is
    killed while worker 0 is stopped. The new
    worker 1 finds no last good text: its first load is refused (it used
    to leave route.yaml out, and write that). Worker 0, continued, finds
    the file damaged and writes its texts again; worker 1 then loads
    again with route.yaml at its last good version: one digest, every
    request v1."""
    rules = tmp_path / "rules"
    rules.mkdir()
    rng = random.Random(7)
    with backends() as (p1, p2):
        write(rules / "registry.yaml", gateway_service(p1, p2, labels=("v1", "v2")))
        write(rules / "route.yaml", route(100))
        with sidecar(rules) as sc:
            write(rules / "route.yaml", BROKEN)
            write(rules / "more.yaml", other_service(1))
            held_digest = 0

            def both_hold() -> bool:
                nonlocal held_digest
                dump = json.loads(sc.get("/config_dump")[1])
                held_digest = sc.stats()["l4proxy_rules_digest"]
                return len(dump["held"]) == 1 and held_digest not in (-1, 0)

            sc.until(both_hold, "held route.yaml")
            memory = _last_good_memory(sc.proc.pid)
            [survivor, victim] = sc.worker_pids()
            os.kill(survivor, signal.SIGSTOP)
            try:
                with open(memory, "r+b") as f:
                    size = len(f.read())
                    if damage == "truncated":
                        f.truncate(0)
                    else:
                        f.seek(0)
                        f.write(rng.randbytes(size))
                os.kill(victim, signal.SIGKILL)
                sc.until(
                    lambda: sum(" worker: listening: " in line for line in sc.log) == 3,
                    "the new worker 1 through its first load",
                )
                assert any("[w1] rules rejected, none loaded yet" in line for line in sc.log)
            finally:
                os.kill(survivor, signal.SIGCONT)
            sc.until(
                lambda: (
                    sc.stats()["l4proxy_workers"] == 2
                    and sc.stats()["l4proxy_rules_digest"] == held_digest
                ),
                "both workers serving route.yaml's last good version",
            )
            assert set(sc.versions()) == {"v1"}
            dump = json.loads(sc.get("/config_dump")[1])
            assert [h["served"] for h in dump["held"]] == ["last good version"]


def test_a_file_renamed_with_an_error_is_served_as_before_by_every_worker(
    tmp_path: Path,
) -> None:
    """The review's rename: route.yaml renamed to zz-route.yaml with a typo
    dropped the route in both workers (every request split v1/v2). Both
    keep their whole last good table (every request v1), and a worker
    killed meanwhile comes back serving the same texts: the same digest,
    every request v1."""
    rules = tmp_path / "rules"
    rules.mkdir()
    with backends() as (p1, p2):
        write(rules / "registry.yaml", gateway_service(p1, p2, labels=("v1", "v2")))
        write(rules / "route.yaml", route(100))
        with sidecar(rules) as sc:
            assert set(sc.versions()) == {"v1"}
            digest = sc.stats()["l4proxy_rules_digest"]
            write(rules / "zz-route.yaml", route(100) + "  - labels: {version: v2\n")
            (rules / "route.yaml").unlink()
            sc.until(
                lambda: sum("object(s) served would be gone" in line for line in sc.log) == 2,
                "both workers kept their table",
            )
            assert set(sc.versions()) == {"v1"}
            assert sc.stats()["l4proxy_rules_digest"] == digest
            [_, pid] = sc.worker_pids()
            os.kill(pid, signal.SIGKILL)
            sc.until(  # (a worker says so after its first load)
                lambda: (
                    sum(" worker: listening: " in line for line in sc.log) == 3
                    and sc.stats()["l4proxy_workers"] == 2
                ),
                "the restarted worker loaded",
            )
            assert sc.stats()["l4proxy_rules_digest"] == digest
            assert set(sc.versions()) == {"v1"}


def test_a_sidecar_started_while_a_file_is_broken_is_not_ready_until_it_loads(
    tmp_path: Path,
) -> None:
    """The review's fleet split: a pod started while route.yaml is broken
    went ready serving without it (its requests split v1/v2 where the
    running pods' went 100 % to v1). Both workers refuse their first load:
    /ready stays 503 and /config_dump says why; once route.yaml is fixed
    the sidecar is ready and routes by it."""
    rules = tmp_path / "rules"
    rules.mkdir()
    with backends() as (p1, p2):
        write(rules / "registry.yaml", gateway_service(p1, p2, labels=("v1", "v2")))
        write(rules / "route.yaml", route(100) + "  - labels: {version: v2\n")
        with sidecar(rules, ready=False) as sc:
            sc.until(  # (each says so after its first load)
                lambda: sum(" worker: listening: " in line for line in sc.log) == 2,
                "both workers through their first load",
            )
            assert sc.get("/ready")[0] == 503
            dump = json.loads(sc.get("/config_dump")[1])
            route_file = str(rules / "route.yaml")
            assert dump["generation"] == 0 and dump["held"] == []
            assert dump["last_error"].startswith(f"{route_file}:13:1: YAML syntax error")
            assert f"{route_file} not left out" in dump["last_error"]
            write(rules / "route.yaml", route(100))
            sc.until(lambda: sc.get("/ready") == (200, "LIVE\n"), "ready once fixed")
            assert set(sc.versions()) == {"v1"}


def test_a_canarys_rollback_goes_live_beside_an_unrelated_broken_file(tmp_path: Path) -> None:
    """The review's case, end to end: ``l4proxy canary`` at 50 % to a v2
    that fails every request; as v2 takes its first request once that weight
    is written someone saves a broken typo.yaml. The rollback is written, served (every request gets
    v1), and seen live by the canary: no "not live" warning. Before, the
    sidecar refused the rollback with the whole directory, and v2 kept its
    50 %."""
    rules = tmp_path / "rules"
    rules.mkdir()
    broke = threading.Event()

    def v2(target: str) -> bytes | None:
        # (before the canary's weight is written, svc's requests go to
        # either version: no route yet)
        if not broke.is_set() and (rules / "canary-svc.yaml").exists():
            write(rules / "typo.yaml", BROKEN)
            broke.set()
        return None  # 503: every request fails

    with backends(v2) as (p1, p2):
        write(rules / "registry.yaml", gateway_service(p1, p2, labels=("v1", "v2")))
        with sidecar(rules) as sc:
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    with contextlib.suppress(OSError, http.client.HTTPException):
                        sc.versions(1)

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            try:
                canary = subprocess.run(
                    [
                        *(L4PROXY, "canary", "svc", "--stable", "v1", "--canary", "v2"),
                        *("--rules", str(rules), "--metrics", sc.admin, "--steps", "50,100"),
                        *("--interval", "1", "--threshold", "1", "--min-requests", "3"),
                        *("--wait-live", "10"),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
            finally:
                stop.set()
                loader.join(timeout=30)
            assert broke.is_set()
            out = canary.stdout + canary.stderr
            assert canary.returncode == 1, out  # rolled back
            assert "ROLLED BACK: 100 % to v1" in out and "not live" not in out, out
            assert set(sc.versions()) == {"v1"}
            dump = json.loads(sc.get("/config_dump")[1])
            assert [h["file"] for h in dump["held"]] == [str(rules / "typo.yaml")]
