"""Where a round robin starts: a new round-robin counter (one per balance
key) starts at an offset drawn for it (verdict.rr_start), in both twins,
where every worker started each subset at its first endpoint, and again at
each rule load (the pure twin's RouteTable._rr is the table's) or table
sweep (the compiled relay's slots): with N workers and low-rate clients,
or a canary reloading its weights every step, endpoint 0 took more than its
share. Envoy starts each worker's round robin at a seed it draws (its
EdfLoadBalancerBase's seed_). With --seed the start is the seed's, in both
twins alike, run after run; without one, the OS's. The draw takes nothing
from the RNGs whose sequences other features depend on (the weights'
draws, the backoffs' jitter)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.dataplane.verdict import rr_salt, rr_start
from l4proxy.rules.routing import Labels, Match, Route, RouteTable, StringMatch
from tests._round_robin import rotated, rotation
from tests._worker import _worker_twin, connected, gateway_service, gateway_worker
from tests.mesh import binomial_ok
from tests.test_gateway_session_persistence import _get
from tests.test_least_request import Backend
from tests.test_routing import BOOTCAMP, HOST, V1, V1A, V1B, V2, V2S, req, to

EVERY = [V1A, V1B, V2]
ON_V1 = Match(uri=StringMatch("prefix", "/v1"))
SEEDS = 300


def test_a_new_tables_round_robin_starts_where_its_seed_says() -> None:
    """Over 300 seeds (--seed plus the worker's index: 300 workers), the
    first pick of a table's round robin is spread over the three endpoints,
    where every one was V1A; from there each goes round robin, the same
    for the same seed (a table made anew, or one reseeded as the watcher
    reseeds each table it publishes)."""
    firsts: Counter[object] = Counter()
    for seed in range(SEEDS):
        t = RouteTable([BOOTCAMP], seed=seed)
        picks = [t.decide(BOOTCAMP, 8080, req()).endpoints[0] for _ in range(4)]
        k = rotation(picks, EVERY)
        firsts[picks[0]] += 1
        # the same seed, the same start: a new table, and this one reseeded
        assert (
            RouteTable([BOOTCAMP], seed=seed).decide(BOOTCAMP, 8080, req()).endpoints[0]
            == (picks[0])
        )
        t.reseed(seed)
        assert t.decide(BOOTCAMP, 8080, req()).endpoints == rotated(EVERY, k)
    assert all(binomial_ok(firsts[e], SEEDS, 1 / 3) for e in EVERY), firsts


def test_without_a_seed_each_table_draws_its_start() -> None:
    """Without --seed, each table's start is the OS's: 300 tables (300
    reloads of a canary's weights) spread their first picks over the three
    endpoints, where each began at V1A."""
    firsts = Counter(
        RouteTable([BOOTCAMP]).decide(BOOTCAMP, 8080, req()).endpoints[0] for _ in range(SEEDS)
    )
    assert all(binomial_ok(firsts[e], SEEDS, 1 / 3) for e in EVERY), firsts


def test_each_balance_key_starts_at_its_own_offset() -> None:
    """Two subsets' round robins (two balance keys) of one table start
    each at its own offset: over 300 seeds, the first picks of a v1 route
    (V1A, V1B) and of the host's own round robin (three endpoints) are
    independent enough that every pair turns up."""
    pairs: Counter[tuple[object, object]] = Counter()
    for seed in range(SEEDS):
        t = RouteTable([BOOTCAMP], {HOST: [Route("v1", (to(V1),), (ON_V1,))]}, seed=seed)
        on_v1 = t.decide(BOOTCAMP, 8080, req("/v1")).endpoints[0]
        own = t.decide(BOOTCAMP, 8080, req("/")).endpoints[0]  # (no route: the host's)
        pairs[(on_v1, own)] += 1
    assert len(pairs) == 6, pairs


def test_the_weights_draws_stay_as_seeded() -> None:
    """Starting a round robin draws nothing from the table's RNG: a 50/50
    split over two round-robin subsets draws its subsets exactly as
    random.Random(seed) does, its round robins starting where they may."""
    t = RouteTable([BOOTCAMP], {HOST: [Route("split", (to(V1, 50), to(V2S, 50)))]}, seed=11)
    got = [t.decide(BOOTCAMP, 8080, req()).subset for _ in range(200)]
    ref = random.Random(11)
    assert got == ["v1" if ref.randrange(100) < 50 else "v2" for _ in range(200)]


def test_the_start_is_the_same_in_every_process() -> None:
    """The start hashes the balance key's text, never hash() of a str
    (PYTHONHASHSEED randomizes it per process), nor a label set's insertion
    order: two interpreters of different hash seeds agree with this one."""
    key = (HOST, 8080, "v1", Labels({"version": "v1", "app": "bootcamp"}))
    here = rr_start(rr_salt(5), key)
    assert here == rr_start(
        rr_salt(5), (HOST, 8080, "v1", Labels({"app": "bootcamp", "version": "v1"}))
    )
    assert here != rr_start(rr_salt(6), key)
    code = (
        "from l4proxy.dataplane.verdict import rr_salt, rr_start\n"
        "from l4proxy.rules.routing import Labels\n"
        "labels = Labels({'version': 'v1', 'app': 'bootcamp'})\n"
        f"print(rr_start(rr_salt(5), ({HOST!r}, 8080, 'v1', labels)))\n"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert int(out.stdout) == here


# -- both twins, real sockets ---------------------------------------------

NAMES = "abc"


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    out = [Backend(n) for n in NAMES]
    yield out
    for b in out:
        b.close()


def _picks(
    which: str, rules: Path, seed: int | None, n: int, reload_after: int | None = None
) -> list[str]:
    """Who answered *n* GETs on one keep-alive connection to a real worker
    of relay twin *which* routing per request (round robin over the three
    backends), seeded with *seed*; the rules reloaded (a comment added: a new
    table, the same routing) after *reload_after* of them."""
    names: list[str] = []

    async def main() -> None:
        options = {"seed": seed} if seed is not None else {}
        async with gateway_worker(rules, http_routing="request", watcher_options=options) as (
            watcher,
            _,
            address,
        ):
            loop = asyncio.get_running_loop()
            async with connected(address) as s:
                for i in range(n):
                    if i == reload_after:
                        rules.write_text(rules.read_text() + f"# reloaded {i}\n")
                        assert await watcher.reload()
                    names.append((await loop.run_in_executor(None, _get, s))[0])

    with pytest.MonkeyPatch.context() as mp:
        _worker_twin(which, mp)
        asyncio.run(main())
    return names


def test_both_twins_start_where_the_seed_says(backends: list[Backend], tmp_path: Path) -> None:
    """Per seed (--seed plus the worker's index), both twins (the pure one's
    route table, the compiled one's slot) start the round robin at the same
    backend and go round robin from there, the same run after run; over
    24 seeds (24 workers) the first request goes to each backend its share,
    where all of them went to a."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(*(b.endpoint[1] for b in backends)))
    firsts: Counter[str] = Counter()
    for seed in range(24):
        pure = _picks("pure", rules, seed, 4)
        compiled = _picks("compiled", rules, seed, 4)
        rotation(pure, list(NAMES))
        assert compiled == pure, (seed, pure, compiled)
        assert _picks("compiled", rules, seed, 4) == compiled  # (deterministic)
        firsts[pure[0]] += 1
    assert all(binomial_ok(firsts[n], 24, 1 / 3) for n in NAMES), firsts


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_without_a_seed_the_start_is_drawn(
    which: str, backends: list[Backend], tmp_path: Path
) -> None:
    """Without --seed each worker draws its start: nine workers' first
    requests do not all go to one backend (all nine did: a; the chance
    that nine draws agree is 3^-8), and each goes round robin."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(*(b.endpoint[1] for b in backends)))
    firsts: Counter[str] = Counter()
    for _ in range(9):
        picks = _picks(which, rules, None, 3)
        rotation(picks, list(NAMES))
        firsts[picks[0]] += 1
    assert len(firsts) > 1, firsts


def test_a_reload_keeps_the_compiled_slot_and_starts_the_pure_table_anew(
    backends: list[Backend], tmp_path: Path
) -> None:
    """A reload (a canary's step: a new table) keeps the compiled relay's
    slot for the same balance key, which goes on counting: eight requests,
    one round robin across the reload. The pure twin's counters are the
    table's: the new table's starts where the seed says, as the first did."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(gateway_service(*(b.endpoint[1] for b in backends)))
    compiled = _picks("compiled", rules, 3, 8, reload_after=4)
    rotation(compiled, list(NAMES))
    rules.write_text(gateway_service(*(b.endpoint[1] for b in backends)))
    pure = _picks("pure", rules, 3, 8, reload_after=4)
    rotation(pure[:4], list(NAMES))
    assert pure[4:] == pure[:4]
    assert pure[0] == compiled[0]
