"""Smoke test of the bench harness (bench/): config generation, wrk parsing, the report.

The real benchmark is ``make bench`` and is not part of ``make test``; this
only checks, in a few seconds, that the harness's pure parts are right and
(when nginx, HAProxy and wrk are installed) that a one-second run works.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest
import yaml

from bench import instructions, kernel, measure, peers, profile, report, rules, wrk
from bench.memory import MemoryResult
from bench.peers import Address, Backend

BACKENDS = [Backend("127.0.0.1", 18081, "v1"), Backend("127.0.0.1", 18082, "v2")]
LISTEN = Address("127.0.0.1", 18080)

WRK_KEEPALIVE = """\
Running 1s test @ http://127.0.0.1:18080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   449.44us  112.02us   5.59ms   91.66%
    Req/Sec    99.67k     6.06k  106.97k    80.00%
  Latency Distribution
     50%  426.00us
     75%  464.00us
     90%  521.00us
     99%    1.81ms
  198418 requests in 2.00s, 45.03MB read
Requests/sec:  99187.48
Transfer/sec:     22.51MB
"""

WRK_CLOSE_WITH_ERRORS = """\
Running 1m test @ http://198.19.0.10:8080/
  1 threads and 400 connections
  Latency Distribution
     50%    7.97ms
     75%   10.00ms
     90%   12.50ms
     99%    1.02s
  311914 requests in 1.00m, 70.00MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:   5191.40
Transfer/sec:      1.17MB
"""


def test_wrk_report_parsed_with_units() -> None:
    r = wrk.parse(WRK_KEEPALIVE)
    assert r.rps == pytest.approx(99187.48)
    assert r.requests == 198418
    assert r.duration_s == pytest.approx(2.0)
    assert r.p50_ms == pytest.approx(0.426)
    assert r.p99_ms == pytest.approx(1.81)
    assert r.errors == 0


def test_wrk_errors_and_minutes() -> None:
    r = wrk.parse(WRK_CLOSE_WITH_ERRORS)
    assert r.duration_s == pytest.approx(60.0)
    assert r.p99_ms == pytest.approx(1020.0)
    assert r.socket_errors == {"connect": 0, "read": 12, "write": 0, "timeout": 3}
    assert r.non_2xx == 5
    assert r.errors == 20


@pytest.mark.parametrize("text", ["", "Running 1s test\n", WRK_KEEPALIVE.replace("99%", "98%")])
def test_wrk_not_a_report_is_an_error(text: str) -> None:
    with pytest.raises(wrk.WrkError):
        wrk.parse(text)


def test_wrk_command() -> None:
    argv = wrk.command("http://127.0.0.1:1/", 1, 1.0, close=True, threads=2)
    assert "--threads=1" in argv  # never more threads than connections
    assert "--header=Connection: close" in argv and "--latency" in argv
    assert argv[-1] == "http://127.0.0.1:1/"


def test_wrk_request_scripts() -> None:
    argv = wrk.command("http://127.0.0.1:1/", 4, 1.0, paths=3)
    script = next(a.split("=", 1)[1] for a in argv if a.startswith("--script="))
    with open(script) as f:
        text = f.read()
    assert "n % 3 + 1" in text and '"/item/"' in text
    assert os.stat(script).st_mode & 0o004  # wrk in a pod runs as uid 1000
    assert not any(a.startswith("--script") for a in wrk.command("http://h/", 4, 1.0))
    for body, says in (("chunked", "chunked(path)"), ("length", '"POST"')):
        argv = wrk.command("http://h/", 4, 1.0, body=body)
        script = next(a.split("=", 1)[1] for a in argv if a.startswith("--script="))
        with open(script) as f:
            assert says in f.read()
    with pytest.raises(ValueError, match="body"):
        wrk.request_script(1, "gzip")


def test_pin_cpu_lists() -> None:
    from bench import pin

    have = sorted(os.sched_getaffinity(0))
    assert pin.cpu_list(str(have[0])) == {have[0]}
    assert pin.cpu_list(f"{have[0]}-{have[-1]}") == set(range(have[0], have[-1] + 1)) & set(have)
    for bad in ("x", "3-1", "1,", f"{have[-1] + 1}"):
        with pytest.raises(pin.PinError):
            pin.cpu_list(bad)
    with pytest.raises(pin.PinError, match="PROXY:LOAD"):
        pin.parse(str(have[0]))
    with pytest.raises(pin.PinError, match="overlap"):
        pin.parse(f"{have[0]}:{have[0]}")
    # every thread of this process, pinned where it already runs
    mask = frozenset(os.sched_getaffinity(0))
    assert pin.pin_tree([os.getpid()], mask) == len(os.listdir("/proc/self/task"))
    assert pin.pinned(lambda a: list(a), frozenset({0, 2}))(["wrk"]) == [
        "taskset",
        "-c",
        "0,2",
        "wrk",
    ]


def test_haproxy_config_tcp_roundrobin_one_thread() -> None:
    cfg = peers.haproxy_conf(LISTEN, BACKENDS)
    assert "mode tcp" in cfg and "balance roundrobin" in cfg and "nbthread 1" in cfg
    assert "bind 127.0.0.1:18080" in cfg and "http-reuse" not in cfg
    assert "server v1 127.0.0.1:18081" in cfg and "server v2 127.0.0.1:18082" in cfg


def test_haproxy_config_http_mode_reuses_upstream_connections() -> None:
    cfg = peers.haproxy_conf(LISTEN, BACKENDS, mode="http")
    assert "mode http" in cfg and "http-reuse always" in cfg and "balance roundrobin" in cfg
    with pytest.raises(ValueError, match="tcp or http"):
        peers.haproxy_conf(LISTEN, BACKENDS, mode="udp")


def test_nginx_configs() -> None:
    backend = peers.nginx_backend_conf("/tmp/x", BACKENDS)
    assert backend.count("listen 127.0.0.1:1808") == 2
    assert "worker_processes 1;" in backend and "v=2" in backend
    assert "worker_processes 6;" in peers.nginx_backend_conf("/tmp/x", BACKENDS, workers=6)
    stream = peers.nginx_stream_conf("/tmp/x", LISTEN, BACKENDS)
    assert stream.startswith(f"load_module {peers.NGINX_STREAM_MODULE};")
    assert "proxy_pass bootcamp;" in stream and "server 127.0.0.1:18082;" in stream


def _hcm(doc: dict[str, object]) -> dict[str, object]:
    listener = doc["static_resources"]["listeners"][0]  # type: ignore[index]
    return listener["filter_chains"][0]["filters"][0]  # type: ignore[no-any-return]


def test_envoy_configs() -> None:
    tcp = yaml.safe_load(peers.envoy_tcp_conf(LISTEN, BACKENDS))
    assert _hcm(tcp)["name"] == "envoy.filters.network.tcp_proxy"
    (cluster,) = tcp["static_resources"]["clusters"]
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2

    http = yaml.safe_load(peers.envoy_http_conf(LISTEN, BACKENDS))
    hcm = _hcm(http)["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]  # type: ignore[index]
    assert route["weighted_clusters"]["clusters"] == [
        {"name": "v1", "weight": 50},
        {"name": "v2", "weight": 50},
    ]
    assert [c["name"] for c in http["static_resources"]["clusters"]] == ["v1", "v2"]


def test_l4proxy_rules() -> None:
    docs = list(yaml.safe_load_all(rules.bootcamp_documents(BACKENDS)))
    assert [d["kind"] for d in docs] == ["ServiceEntry", "Ingress", "RouteRule"]
    se = docs[0]["spec"]
    assert se["addresses"] == ["198.19.0.10"]
    assert se["endpoints"][1] == {
        "address": "127.0.0.1",
        "ports": {"http": 18082},
        "labels": {"version": "v2"},
    }
    assert [r["weight"] for r in docs[2]["spec"]["route"]] == [50, 50]


def test_rules_load_in_l4proxy() -> None:
    """The bench's rule files are what the sidecar's own loader accepts, without notes."""
    from l4proxy.rules import load_rules

    with tempfile.TemporaryDirectory() as d:
        rules.write_rules(d, BACKENDS)
        result = load_rules([d])
    assert [o.kind for o in result.documents] == ["ServiceEntry", "Ingress", "RouteRule"]
    assert result.notes == []


def _summary(target: str, mode: str, rps: float, p99: float) -> measure.Summary:
    return measure.Summary(target, measure.Case(mode, 50), rps, p99 / 3, p99, 0.5, 0, 3)


def test_report_ratios_and_verdicts() -> None:
    summaries = [
        _summary("direct", "keepalive", 100_000, 2.0),
        _summary("haproxy", "keepalive", 50_000, 4.0),
        _summary("haproxy-http", "keepalive", 45_000, 4.0),
        _summary("haproxy-http", "close", 20_000, 8.0),
        _summary("l4proxy", "keepalive", 55_000, 4.4),
        _summary("l4proxy", "close", 19_000, 10.0),
        _summary("envoy-http", "keepalive", 12_000, 9.0),
        _summary("sidecar/haproxy", "keepalive", 40_000, 5.0),
        _summary("sidecar/l4proxy", "keepalive", 30_000, 7.0),
    ]
    all_rows = report.rows(summaries)
    rows = {r.summary.target: r for r in all_rows if r.summary.case.mode == "keepalive"}
    assert rows["l4proxy"].vs_haproxy["rps"] == pytest.approx(1.1)
    assert rows["l4proxy"].vs_direct["rps"] == pytest.approx(0.55)
    assert rows["sidecar/l4proxy"].vs_haproxy["rps"] == pytest.approx(0.75)  # own group
    assert rows["sidecar/l4proxy"].vs_direct["rps"] is None  # no sidecar/direct row

    mem = [
        MemoryResult("haproxy", 10_000, 5_000, 10 * report.MB, 30 * report.MB),
        MemoryResult("l4proxy", 10_000, 5_000, 20 * report.MB, 40 * report.MB),
    ]
    assert mem[0].rss_at_requested == pytest.approx(50 * report.MB)  # extrapolated

    verdicts = {(v.target, v.what): v.met for v in report.verdicts(all_rows, mem)}
    ka, close = "keepalive c50 {} ×best(haproxy/haproxy-http)", "close c50 {} ×best(haproxy-http)"
    assert verdicts[("l4proxy", ka.format("req/s"))] is True  # 55k vs the better, 50k
    assert verdicts[("l4proxy", ka.format("p99"))] is True  # 4.4 vs 4.0
    assert verdicts[("l4proxy", "keepalive c50 req/s ×envoy-http")] is True  # 55k vs 12k
    assert verdicts[("l4proxy", close.format("req/s"))] is False  # 19k vs 20k
    assert verdicts[("l4proxy", close.format("p99"))] is False  # 10 vs 8
    assert verdicts[("sidecar/l4proxy", ka.format("req/s"))] is False
    assert verdicts[("sidecar/l4proxy", close.format("req/s"))] is None  # not measured
    assert verdicts[("l4proxy", "RSS ×haproxy")] is False  # 60 MB vs 50 MB
    text = report.table(list(rows.values()), ["direct", "haproxy", "l4proxy"])
    assert "| keepalive | 50    | l4proxy" in text and "1.10 / 0.55" in text


def _rps_sample(target: str, mode: str, rnd: int, rps: float) -> measure.Sample:
    result = wrk.WrkResult(int(rps * 3), 3.0, rps, {"50": 1.0, "75": 1.0, "90": 1.0, "99": 2.0})
    return measure.Sample(target, measure.Case(mode, 50), rnd, result, 1.0)


def test_paired_ratios_round_by_round() -> None:
    """Each round's l4proxy req/s over the same round's peer; the interval
    decides ahead / behind / within noise."""
    ahead = [(100, 90), (80, 70), (120, 110), (95, 85)]  # slow spells hit both sides
    noisy = [(100, 90), (80, 95), (120, 110), (95, 100)]
    samples = []
    for rnd, ((mine, hap), (mine_c, hap_c)) in enumerate(zip(ahead, noisy, strict=True), 1):
        samples += [
            _rps_sample("l4proxy-request", "keepalive", rnd, mine * 1000),
            _rps_sample("haproxy", "keepalive", rnd, hap * 1000),
            _rps_sample("haproxy-http", "keepalive", rnd, hap * 1000 * 1.25),
            _rps_sample("envoy-http", "keepalive", rnd, hap * 1000 / 4.2),  # 4x is the goal
            _rps_sample("sidecar/l4proxy-request", "close", rnd, mine_c * 1000),
            _rps_sample("sidecar/haproxy-http", "close", rnd, hap_c * 1000),
            _rps_sample("haproxy", "close", rnd, 1.0),  # not a close-mode reference
        ]
    samples.append(_rps_sample("haproxy", "keepalive", 5, 50_000))  # no pair: left out
    got = {(p.target, p.case.mode, p.peer): p for p in report.paired(samples)}
    assert set(got) == {
        ("l4proxy-request", "keepalive", "haproxy"),
        ("l4proxy-request", "keepalive", "haproxy-http"),
        ("l4proxy-request", "keepalive", "envoy-http"),
        ("sidecar/l4proxy-request", "close", "haproxy-http"),
    }
    vs_tcp = got[("l4proxy-request", "keepalive", "haproxy")]
    assert vs_tcp.ratios == (100 / 90, 80 / 70, 120 / 110, 95 / 85)
    assert vs_tcp.reading == "ahead"  # every round 9-14 % ahead: a narrow interval above 1
    lo, hi = vs_tcp.interval or (0, 0)
    assert 1.0 < lo < vs_tcp.mean < hi
    assert got[("l4proxy-request", "keepalive", "haproxy-http")].reading == "behind"
    assert got[("sidecar/l4proxy-request", "close", "haproxy-http")].reading == "within noise"
    assert "n=4" in vs_tcp.line() and "ahead" in vs_tcp.line()
    vs_envoy = got[("l4proxy-request", "keepalive", "envoy-http")]
    assert vs_envoy.goal == 4.0 and vs_envoy.ratios[0] == 100 / 90 * 4.2
    # 4.6-4.8x every round: read against the goal of 4, not against 1
    assert vs_envoy.reading == "ahead" and "ahead of 4" in vs_envoy.line()
    near = [(4.3, 1), (3.7, 2), (4.1, 3), (3.8, 4)]  # about 3.97x: 4 lies inside the interval
    (p,) = report.paired(
        [_rps_sample("l4proxy-request", "keepalive", r, 1000 * x) for x, r in near]
        + [_rps_sample("envoy-http", "keepalive", r, 1000) for _, r in near]
    )
    assert p.peer == "envoy-http" and p.reading == "within noise" and "of 4" in p.line()
    two = report.paired(samples[:14])  # two rounds: no interval
    assert {p.reading for p in two} == {"too few rounds"}


def test_profile_summary_of_raw_stacks() -> None:
    loop = 'process 7:"l4proxy run";thread (0x7f3a): MainThread;_run (asyncio/events.py:80)'
    raw = (
        f"{loop};_serve (/x/l4proxy/sidecar/worker.py:300)"
        f";_connect (l4proxy/sidecar/worker.py:420) 30\n"
        f"{loop};_on_acceptable (l4proxy/sidecar/worker.py:250) 10\n"
        'process 7:"l4proxy run";thread (0x7f3b): l4proxy-pump;run (threading.py:975) 20\n'
    )
    p = profile.summarize(raw, expected_per_thread=50)
    assert p.samples == 40  # the event loop's; the pump counts only as busy
    assert p.busy == [("MainThread (pid 7)", 0.8), ("l4proxy-pump (pid 7)", 0.4)]
    assert p.self_share[0] == ("_connect (l4proxy/sidecar/worker.py)", 0.75)
    assert dict(p.inclusive_share) == {
        "_serve (l4proxy/sidecar/worker.py)": 0.75,
        "_connect (l4proxy/sidecar/worker.py)": 0.75,
        "_on_acceptable (l4proxy/sidecar/worker.py)": 0.25,
    }


@pytest.mark.skipif(
    not all(shutil.which(p) for p in ("nginx", "haproxy", "wrk", "curl")),
    reason="nginx, haproxy, wrk and curl are installed by make bench",
)
def test_one_second_run_direct_and_haproxy() -> None:
    from bench.scenarios import LoopbackBed

    with tempfile.TemporaryDirectory() as d, LoopbackBed(d) as bed:
        targets = bed.start(["direct", "haproxy"])
        assert bed.failures == {}
        assert [t.notes["versions"] for t in targets] == ["v1", "v1,v2"]
        samples = measure.run_rounds(
            targets, [measure.Case("keepalive", 4)], 1, 1.0, progress=lambda _: None
        )
    assert all(s.wrk.requests > 0 and s.wrk.errors == 0 for s in samples)
    assert all(s.cpu_s >= 0 for s in samples)


# -- python -m bench.instructions ------------------------------------------------------


def test_instruction_totals_read_from_a_toggled_dump(tmp_path: pathlib.Path) -> None:
    """A dump whose instrumentation was switched on mid-run says "summary: 0"
    and has the count in "totals:"; the report divides by wrk's requests and
    compares with HAProxy tcp's, the compiled loop's figure beside."""
    dump = tmp_path / "callgrind.out.7"
    dump.write_text(
        "version: 1\ncmd: haproxy\nevents: Ir\nsummary: 0\nfn=main\n5 10\ntotals: 4200000\n"
    )
    assert instructions.dump_total(str(dump)) == 4_200_000
    counts = [
        instructions.Count("l4proxy-request", 1000, 6_000_000, (), loop=5_000_000),
        instructions.Count("haproxy", 1000, 4_000_000, ()),
    ]
    text = instructions.report(counts)
    assert "6000           5000" in text
    assert "l4proxy-request: 1.50x HAProxy tcp's" in text
    assert "l4proxy-request, its compiled loop alone: 1.25x HAProxy tcp's" in text


@pytest.mark.skipif(
    not all(shutil.which(p) for p in ("nginx", "haproxy", "wrk", "curl", "valgrind")),
    reason="python -m bench.instructions installs valgrind; make bench the rest",
)
@pytest.mark.parametrize("dump_instr", [False, True])
def test_haproxy_instructions_counted_under_callgrind(dump_instr: bool) -> None:
    """(--dump-instr: the same count, the dump per machine instruction.)"""
    from bench.scenarios import LoopbackBed

    with tempfile.TemporaryDirectory() as d, LoopbackBed(os.path.join(d, "bed")) as bed:
        bed.start([])
        c = instructions.count(
            "haproxy", d, bed.backends, duration=1.0, connections=4, dump_instr=dump_instr
        )
        with open(c.dumps[0]) as f:
            positions = next(ln for ln in f if ln.startswith("positions:"))
    assert c.requests > 0 and len(c.dumps) == 1
    # a relayed request is thousands of instructions, not none and not millions
    assert 500 < c.per_request < 100_000, c
    assert positions.split() == (
        ["positions:", "instr", "line"] if dump_instr else ["positions:", "line"]
    )


# -- python -m bench.kernel ------------------------------------------------------------

PERF_REPORT = """\
# Samples: 3K of event 'cpu-clock:pppH'
#
# Overhead       Samples  Symbol
# ........  ............  .....................................
#
    12.50%           500  [k] tcp_ack
     5.00%           200  [.] run_tasks_from_lists
     2.50%           100  [k] __inet_lookup_established
     0.05%             2  [.] 0x00000000001aa430
"""

PERF_STAT = """\
# started on Sat Dec  5 19:30:00 2026

6000,,raw_syscalls:sys_enter,4000000000,100.00,,
2000,,syscalls:sys_enter_recvfrom,4000000000,100.00,,
<not counted>,,syscalls:sys_enter_splice,0,100.00,,
"""


def test_kernel_split_parsed_and_compared() -> None:
    """perf's rows become samples per (space, symbol); 1000 requests at 5 kHz
    make 5 samples 1 µs a request; the comparison shows each symbol's gap."""
    samples = kernel.parse_report(PERF_REPORT)
    assert samples == {
        ("k", "tcp_ack"): 500,
        ("u", "run_tasks_from_lists"): 200,
        ("k", "__inet_lookup_established"): 100,
        ("u", "0x00000000001aa430"): 2,
    }
    assert kernel.parse_stat(PERF_STAT) == {"all": 6000, "recvfrom": 2000}
    base = kernel.Split("haproxy", 1000, 2.0, samples, {"all": 6000}, sleeps=50, frequency=5000)
    other = kernel.Split(
        "l4proxy-request", 1000, 2.0, {("k", "tcp_ack"): 400}, {"all": 5000}, frequency=5000
    )
    assert base.space_us("k") == pytest.approx(120.0)
    assert base.space_us("u") == pytest.approx(40.4)
    text = kernel.report(kernel.by_peer([base, other]), top=10)
    assert "haproxy                 500  160.40  120.00  40.40" in text
    assert "l4proxy-request         500   80.00   80.00   0.00" in text
    assert "74.8%     6.00   0.050" in text  # syscalls and sleeps per request
    assert "-40.000  40.000  0.000  [u] run_tasks_from_lists" in text
    assert "-20.000  100.000 80.000  [k] tcp_ack" in text
    assert "haproxy            160.40" in text  # its one run
    # a run perf saw nothing of, its calls not counted: no figure, not a crash
    empty = kernel.report([kernel.Split("l4proxy-request", 1000, 5.0, {}, {})])
    assert "l4proxy-request         200    0.00    0.00   0.00     nan%      nan" in empty


@pytest.mark.skipif(
    not all(shutil.which(p) for p in ("nginx", "haproxy", "wrk", "curl", "perf")),
    reason="python -m bench.kernel installs perf; make bench the rest",
)
def test_haproxy_cpu_split_sampled_by_perf(tmp_path: pathlib.Path) -> None:
    from bench.scenarios import LoopbackBed

    perf = shutil.which("perf")
    assert perf is not None
    with LoopbackBed(str(tmp_path / "bed")) as bed:
        (target,) = bed.start(["haproxy"])
        split = kernel.measure(perf, target, 1.0, 4, 1, str(tmp_path))
    assert split.requests > 0 and split.samples
    # each relayed request receives and sends twice (client and server side)
    assert split.per_request(split.syscalls["recvfrom"]) == pytest.approx(2.0, abs=0.1)
    assert 0 < split.space_us("k") + split.space_us("u") < 1000
