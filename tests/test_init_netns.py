"""l4proxy-init against the real kernel, in throwaway pod namespaces.

Every run of l4proxy-init here names its pod with ``--netns`` (or runs inside
``ip netns exec``): the root namespace's tables are never touched. Traffic
only goes to loopback, to the pods (198.18.0.0/16, 2001:2::/64) and to
addresses that a REDIRECT keeps inside the pod (198.19.0.0/16 VIPs).

Where a connection lands is observed with tests/tools/origdst_server.py: it
tells the client which listening port the connection reached and what
SO_ORIGINAL_DST says.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from l4proxy_init.plan import parse_save

from l4proxy.demo.podnet import Pod, PodNetwork

pytestmark = pytest.mark.netns

TOOLS = Path(__file__).parent / "tools"
PY = sys.executable
VIP4 = "198.19.0.10"
FAR6 = "2001:2::beef"  # in the pod /64, owned by nobody: only a REDIRECT answers it
PROXY_OUT, PROXY_IN = 15001, 15006


# -- helpers ------------------------------------------------------------------


def init(
    pod: Pod, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run l4proxy-init for *pod* from outside it (the node's view)."""
    return subprocess.run(
        [PY, "-m", "l4proxy_init", "--netns", pod.netns, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def init_ok(pod: Pod, *args: str) -> subprocess.CompletedProcess[str]:
    result = init(pod, *args)
    assert result.returncode == 0, result.stderr
    return result


def save(pod: Pod, tool: str) -> str:
    """*tool* (e.g. iptables-legacy-save) of the pod's nat table, stable across runs:
    no "# Generated on <date>" lines, counters zeroed."""
    out = pod.run([tool, "-t", "nat"]).stdout
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in lines)


def ours(pod: Pod, tool: str) -> list[str]:
    return parse_save(pod.run([tool, "-t", "nat"]).stdout).our_lines()


@contextlib.contextmanager
def listening(pod: Pod, label: str, *ports: int) -> Iterator[None]:
    proc = pod.popen(
        [PY, str(TOOLS / "origdst_server.py"), label, *map(str, ports)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for port in ports:
            pod.wait_listening(port)
        yield
    finally:
        proc.kill()
        proc.wait()


def dial(pod: Pod, host: str, port: int, user: int) -> dict[str, Any]:
    result = pod.run([PY, str(TOOLS / "dial.py"), host, str(port)], user=user, check=False)
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- who is captured and who is not (one pod network for the whole table) -----


@pytest.fixture(scope="module")
def mesh() -> Iterator[dict[str, Pod]]:
    """Pod a with l4proxy-init rules; b and c plain peers.

    a: -z 15006, proxy GID 2000, inbound 9090 excluded, c's address and port
    7001 excluded outbound. Listeners: a 15001 15006 8080 9090 22; b 7000 7001;
    c 7000.
    """
    with PodNetwork(prefix=f"i{os.getpid() % 100000}m") as net:
        a, b, c = net.add_pod("a"), net.add_pod("b"), net.add_pod("c")
        init_ok(
            a, "-p", str(PROXY_OUT), "-z", str(PROXY_IN), "-u", "1337", "-g", "2000",
            "-d", "9090", "-x", f"{c.ipv4}/32", "-o", "7001",
        )  # fmt: skip
        with (
            listening(a, "a", PROXY_OUT, PROXY_IN, 8080, 9090, 22),
            listening(b, "b", 7000, 7001),
            listening(c, "c", 7000),
        ):
            yield {"a": a, "b": b, "c": c}


# from pod, as user, to pod (or address), port -> label and port of the listener it reached
CASES = {
    "outbound to a VIP is captured": ("a", 1000, VIP4, 8080, "a", PROXY_OUT),
    "outbound to a pod is captured": ("a", 1000, "b", 7000, "a", PROXY_OUT),
    "proxy UID is not captured": ("a", 1337, "b", 7000, "b", 7000),
    "proxy GID is not captured": ("a", 2000, "b", 7000, "b", 7000),
    "localhost is not captured": ("a", 1000, "127.0.0.1", 8080, "a", 8080),
    "app calling its own pod IP reaches the app": ("a", 1000, "a", 8080, "a", 8080),
    # The sidecar forwards an inbound connection to its original destination
    # as UID 1337: the Istio 0.7.1 loop sent exactly this back to the proxy.
    "proxy forwarding inbound to the app is not looped back": (
        "a", 1337, "a", 8080, "a", 8080,
    ),
    "excluded CIDR passes": ("a", 1000, "c", 7000, "c", 7000),
    "excluded outbound port passes": ("a", 1000, "b", 7001, "b", 7001),
    "inbound is captured with its original destination": (
        "b", 1000, "a", 8080, "a", PROXY_IN,
    ),
    "excluded inbound port passes": ("b", 1000, "a", 9090, "a", 9090),
    "inbound SSH passes": ("b", 1000, "a", 22, "a", 22),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_capture(mesh: dict[str, Pod], case: str) -> None:
    src, user, dst, port, want_label, want_port = CASES[case]
    host = mesh[dst].ipv4 if dst in mesh else dst
    reply = dial(mesh[src], host, port, user)
    assert "error" not in reply, reply
    assert (reply["label"], reply["port"]) == (want_label, want_port), reply
    if want_port in (PROXY_OUT, PROXY_IN):
        assert reply["original_dst"] == addr(host, port), reply
    else:
        # Not redirected: conntrack (if the pod has nat rules at all) reports
        # the listener's own address, which is what was dialled.
        assert reply["original_dst"] in (None, addr(host, port)), reply


# -- the seed's arguments, IPv4 and IPv6, both backends -----------------------


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_seed_args_capture_ipv4_and_ipv6(pod_network6: PodNetwork, backend: str) -> None:
    a, b = pod_network6.add_pod("a"), pod_network6.add_pod("b")
    # No --ipv6: the pod has a global IPv6 address, so IPv6 is on by default.
    result = init_ok(a, "-p", "15001", "-u", "1337", "--backend", backend)
    assert "IPv6 nat" in result.stderr and "skipped" not in result.stderr, result.stderr
    assert b.ipv6 and a.ipv6
    with listening(a, "a", 15001, 8080), listening(b, "b", 7000):
        for host, port in ((VIP4, 8080), (FAR6, 9090), (b.ipv6, 7000)):
            reply = dial(a, host, port, user=1000)
            assert (reply.get("port"), reply.get("original_dst")) == (15001, addr(host, port))
        reply = dial(a, b.ipv6, 7000, user=1337)
        assert (reply.get("label"), reply.get("port")) == ("b", 7000), reply
        reply = dial(a, "::1", 8080, user=1000)
        assert reply.get("port") == 8080, reply
        # inbound from another pod: -z defaults to -p
        for host in (a.ipv4, a.ipv6):
            reply = dial(b, host, 8080, user=1000)
            assert (reply.get("label"), reply.get("port")) == ("a", 15001), reply
            assert reply.get("original_dst") == addr(host, 8080), reply


# -- idempotency, dry run, replacement, cleanup --------------------------------

SAVE = {
    "legacy": ("iptables-legacy-save", "ip6tables-legacy-save"),
    "nft": ("iptables-nft-save", "ip6tables-nft-save"),
}
OTHER = {"legacy": "nft", "nft": "legacy"}
RICH = (
    "-p", "15001", "-z", "15006", "-u", "1337,1338", "-g", "2000", "-b", "8080,9090,22",
    "-d", "9090", "-i", "198.19.0.0/16,2001:2::/64", "-x", "198.19.9.0/24,2001:2::9/128",
    "-o", "25,587",
)  # fmt: skip


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_run_twice_gives_identical_tables(pod_network6: PodNetwork, backend: str) -> None:
    pod = pod_network6.add_pod("a")
    init_ok(pod, "-p", "15001", "-u", "1337", "--backend", backend)
    first = [save(pod, tool) for tool in SAVE[backend]]
    second_run = init_ok(pod, "-p", "15001", "-u", "1337", "--backend", backend)
    assert [save(pod, tool) for tool in SAVE[backend]] == first
    assert second_run.stderr.count("unchanged") == 2, second_run.stderr
    assert all("L4PROXY_OUTPUT" in text for text in first)
    # and the rules went to the backend asked for, not the other one
    assert [ours(pod, tool) for tool in SAVE[OTHER[backend]]] == [[], []]


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_catch_all_and_mapped_cidrs_apply_and_rerun(pod_network6: PodNetwork, backend: str) -> None:
    """-i 0.0.0.0/0 (Istio's includeOutboundIPRanges value), -x ::/0 and an
    IPv4-mapped range: iptables-save prints them otherwise than Python does,
    so the check after apply found the kernel's table "differs from the
    plan" and exited 6 with the rules live, on every run."""
    pod = pod_network6.add_pod("a")
    args = ("-i", "0.0.0.0/0", "-x", "::/0,::ffff:10.0.0.0/104", "--ipv6", "--backend", backend)
    init_ok(pod, *args)
    again = init_ok(pod, *args)
    assert again.stderr.count("unchanged") == 2, again.stderr


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_dry_run_equals_what_apply_installs(pod_network6: PodNetwork, backend: str) -> None:
    pod = pod_network6.add_pod("a")
    before = [save(pod, tool) for tool in SAVE[backend]]
    dry = init_ok(pod, *RICH, "--dry-run", "--backend", backend)
    assert [save(pod, tool) for tool in SAVE[backend]] == before  # touched nothing
    sections = dry.stdout.split("# l4proxy-init --dry-run: ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == ["IPv4", "IPv6"]
    planned = [[ln for ln in s.splitlines()[1:] if ln not in ("*nat", "COMMIT")] for s in sections]

    applied = init_ok(pod, *RICH, "--backend", backend)
    assert [ours(pod, tool) for tool in SAVE[backend]] == planned
    # The ruleset printed on success is the table as the kernel has it.
    assert [parse_save(s).our_lines() for s in applied.stdout.split("# Completed")[:2]] == planned


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_changed_options_replace_our_chains(pod_network: PodNetwork, backend: str) -> None:
    pod = pod_network.add_pod("a")
    tool = SAVE[backend][0]
    init_ok(pod, "-p", "15001", "-u", "1337", "--backend", backend)
    new = ("-p", "15002", "-z", "15006", "-u", "1337", "-x", "198.19.9.0/24")
    init_ok(pod, *new, "--backend", backend)
    dry = init_ok(pod, *new, "--dry-run", "--no-ipv6")
    assert ours(pod, tool) == parse_save(dry.stdout).our_lines()
    assert (
        ours(pod, tool).count(
            '-A OUTPUT -p tcp -m comment --comment "l4proxy/outbound" -j L4PROXY_OUTPUT'
        )
        == 1
    )


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_ipv6_not_captured_keeps_no_stale_rules_of_ours(
    pod_network6: PodNetwork, backend: str
) -> None:
    """An earlier run captured IPv6; this one is told not to: its IPv6 rules
    stayed live with the old settings (redirecting to 15001 though the
    proxy now listens on 15002), and nothing said so."""
    pod = pod_network6.add_pod("a")
    v4, v6 = SAVE[backend]
    ipt6 = f"ip6tables-{backend}"
    pod.run([ipt6, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN"])
    foreign6 = save(pod, v6)
    init_ok(pod, "-p", "15001", "--backend", backend)
    assert "--to-ports 15001" in "\n".join(ours(pod, v6))
    result = init_ok(pod, "-p", "15002", "--no-ipv6", "--backend", backend)
    assert f"IPv6 nat ({ipt6}): removed: IPv6 is not captured (--no-ipv6)" in result.stderr
    assert save(pod, v6) == foreign6  # ours gone, the other tool's rule kept
    assert "--to-ports 15002" in "\n".join(ours(pod, v4))
    again = init_ok(pod, "-p", "15002", "--no-ipv6", "--backend", backend)
    assert f"IPv6 nat ({ipt6}): skipped: --no-ipv6" in again.stderr, again.stderr
    assert "unchanged" in again.stderr


@pytest.mark.parametrize("backend", ["legacy", "nft"])
@pytest.mark.parametrize("then", ["auto", "same"])
def test_ipv6_not_captured_cannot_block_ipv4(
    pod_network6: PodNetwork, backend: str, then: str
) -> None:
    """Another tool's rule jumps into our stale IPv6 chain: removing ours
    would break it, and --no-ipv6 refused the whole run (exit 5), IPv4
    included, though --no-ipv6 is the way out of a broken IPv6 table."""
    pod = pod_network6.add_pod("a")
    v4, v6 = SAVE[backend]
    ipt6 = f"ip6tables-{backend}"
    init_ok(pod, "-p", "15001", "-u", "1337", "--ipv6", "--backend", backend)
    backend = backend if then == "same" else "auto"
    pod.run([ipt6, "-t", "nat", "-I", "OUTPUT", "-p", "udp", "-j", "L4PROXY_OUTPUT"])
    before6 = save(pod, v6)
    result = init_ok(pod, "-p", "15002", "-u", "1337", "--no-ipv6", "--backend", backend)
    assert "--to-ports 15002" in "\n".join(ours(pod, v4))
    assert save(pod, v6) == before6  # left as it was: the other tool's rule needs our chain
    lines = result.stderr.splitlines()
    skipped = lines.index(f"l4proxy-init: IPv6 nat ({ipt6}): skipped: --no-ipv6")
    warning = lines[skipped + 1]
    assert warning.startswith(
        f"l4proxy-init: warning: IPv6 rules of ours from an earlier run "
        f"were left in {ipt6}, where they may still capture"
    ), warning
    assert "-A OUTPUT -p udp -j L4PROXY_OUTPUT" in warning
    assert "run this l4proxy-init command again to remove them" in warning
    # the other tool's rule gone, the same command removes ours
    pod.run([ipt6, "-t", "nat", "-D", "OUTPUT", "-p", "udp", "-j", "L4PROXY_OUTPUT"])
    again = init_ok(pod, "-p", "15002", "-u", "1337", "--no-ipv6", "--backend", backend)
    assert f"IPv6 nat ({ipt6}): removed: IPv6 is not captured (--no-ipv6)" in again.stderr
    assert ours(pod, v6) == []


def test_ipv6_auto_skipped_removes_stale_rules_too(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("a")  # no global IPv6 address: auto skips IPv6
    init_ok(pod, "--ipv6", "--backend", "nft")
    assert ours(pod, "ip6tables-nft-save")
    result = init_ok(pod)
    assert "IPv6 nat (ip6tables-nft): removed: IPv6 is not captured (the namespace has no " in (
        result.stderr
    )
    assert ours(pod, "ip6tables-nft-save") == []
    assert "IPv6 nat: skipped: the namespace has no global IPv6" in init_ok(pod).stderr


def test_auto_backend_stays_where_our_rules_are(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("a")
    init_ok(pod, "-p", "15001", "--backend", "nft", "--no-ipv6")
    result = init_ok(pod, "-p", "15002", "--no-ipv6")  # auto
    assert "iptables-nft" in result.stderr, result.stderr
    assert ours(pod, "iptables-legacy-save") == []
    assert "--to-ports 15002" in "\n".join(ours(pod, "iptables-nft-save"))


def test_auto_backend_goes_where_the_namespaces_nat_rules_are(pod_network: PodNetwork) -> None:
    """The pod's namespace already has nat rules in nft (a CNI, the
    runtime) and none in legacy: ours went to legacy, invisible to the
    image's iptables-save, and which table's hook runs first nobody sees."""
    pod = pod_network.add_pod("a")
    dnat = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "198.18.5.5"]
    pod.run(["iptables-nft", *dnat, "-j", "DNAT", "--to-destination", "198.18.6.6:80"])
    result = init_ok(pod, "-p", "15001", "--no-ipv6")  # auto
    assert "iptables-nft" in result.stderr, result.stderr
    assert ours(pod, "iptables-legacy-save") == []
    assert "--to-ports 15001" in "\n".join(ours(pod, "iptables-nft-save"))


def test_auto_backend_sees_nat_rules_written_with_nft_itself(pod_network: PodNetwork) -> None:
    """A base chain iptables-nft does not know (nft's own syntax, as a CNI
    writes it): iptables-nft-save prints no rule, only "# Table `nat'
    contains incompatible base-chains", and auto went to legacy beside it."""
    pod = pod_network.add_pod("a")
    pod.run(["nft", "add table ip nat"])
    pod.run(["nft", "add chain ip nat cni-post { type nat hook postrouting priority 100 ; }"])
    pod.run(["nft", "add rule ip nat cni-post ip daddr 198.18.9.9 masquerade"])
    assert "incompatible" in pod.run(["iptables-nft-save", "-t", "nat"]).stdout
    result = init_ok(pod, "-p", "15001", "--no-ipv6")  # auto
    assert "IPv4 nat (iptables-nft): installed" in result.stderr, result.stderr
    assert "--to-ports 15001" in "\n".join(ours(pod, "iptables-nft-save"))
    assert "cni-post" in pod.run(["nft", "list", "table", "ip", "nat"]).stdout
    assert "unchanged" in init_ok(pod, "-p", "15001", "--no-ipv6").stderr


def test_switching_backend_warns_about_rules_left_in_the_other(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("a")
    assert "warning" not in init_ok(pod, "--backend", "legacy", "--no-ipv6").stderr
    result = init_ok(pod, "--backend", "nft", "--no-ipv6")
    assert "warning: IPv4 rules of ours are also in iptables-legacy" in result.stderr
    # the command as the user can paste it: for the pod's namespace, not the node's
    assert f"l4proxy-init --netns {pod.netns} --cleanup --backend legacy" in result.stderr


def legacy_tables(pod: Pod, *families: int) -> list[str]:
    """The legacy x_tables tables that exist in *pod*'s namespace (default: both families)."""
    files = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
    names = pod.run(["cat", *(files[f] for f in families or (4, 6))], check=False)
    return names.stdout.split()


def test_nft_runs_create_no_legacy_table(pod_network6: PodNetwork) -> None:
    """Probing the legacy backend created an empty legacy nat table in the
    pod, and the image's iptables-save warned "iptables-legacy tables
    present" for the pod's life, though nothing of ours was ever there."""
    pod = pod_network6.add_pod("a")
    pod.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "198.18.5.5", "-j", "RETURN"])
    for args in (("--backend", "nft"), (), ("--cleanup",), ("--cleanup", "--backend", "nft")):
        result = init_ok(pod, *args)
        assert "iptables-legacy)" not in result.stderr or "nothing of ours" in result.stderr
    assert legacy_tables(pod) == []
    assert "legacy tables present" not in pod.run(["iptables-nft-save"]).stdout
    # where legacy is what auto picks, its table is made, as before; a family
    # that is not captured gets none, whatever the backend
    fresh = pod_network6.add_pod("b")
    assert "IPv4 nat (iptables-legacy): installed" in init_ok(fresh, "--no-ipv6").stderr
    result = init_ok(fresh, "--no-ipv6", "--backend", "legacy")
    assert "IPv6 nat (ip6tables-legacy): skipped: --no-ipv6" in result.stderr, result.stderr
    assert "nat" in legacy_tables(fresh, 4) and "nat" not in legacy_tables(fresh, 6)


FOREIGN = [
    ["-N", "OTHER"],
    ["-A", "OTHER", "-j", "RETURN"],
    ["-A", "OUTPUT", "-p", "udp", "-j", "OTHER"],
    ["-A", "PREROUTING", "-p", "tcp", "--dport", "5000", "-j", "REDIRECT", "--to-ports", "5001"],
    ["-A", "OUTPUT", "-p", "tcp", "-m", "comment", "--comment", "not-l4proxy", "-j", "RETURN"],
]


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_cleanup_removes_ours_and_only_ours(pod_network6: PodNetwork, backend: str) -> None:
    pod = pod_network6.add_pod("a")
    for prefix in ("iptables", "ip6tables"):
        for rule in FOREIGN:
            pod.run([f"{prefix}-{backend}", "-t", "nat", *rule])
    before = [save(pod, tool) for tool in SAVE[backend]]
    init_ok(pod, *RICH, "--backend", backend)
    installed = [save(pod, tool) for tool in SAVE[backend]]
    assert all("L4PROXY_OUTPUT" in text and "OTHER" in text for text in installed)

    result = init_ok(pod, "--cleanup")  # auto: visits both backends
    assert [save(pod, tool) for tool in SAVE[backend]] == before
    assert "removed" in result.stderr
    assert init_ok(pod, "--cleanup").stderr.count("nothing of ours") == 4


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_foreign_names_with_quotes_neither_block_install_nor_cleanup(
    pod_network: PodNetwork, backend: str
) -> None:
    """iptables-save prints names bare (``-A it's``); read as shell words,
    that line crashed every later run, --cleanup included."""
    pod = pod_network.add_pod("a")
    ipt = f"iptables-{backend}"
    comment = 'say "hi" \\ it\'s'
    pod.run([ipt, "-t", "nat", "-N", "it's"])
    pod.run([ipt, "-t", "nat", "-A", "it's", "-j", "RETURN"])
    pod.run([ipt, "-t", "nat", "-A", "OUTPUT", "-o", "e'0", "-m", "comment",
             "--comment", comment, "-j", "it's"])  # fmt: skip
    before = save(pod, SAVE[backend][0])
    dry = init_ok(pod, "--backend", backend, "--no-ipv6", "--dry-run")
    init_ok(pod, "--backend", backend, "--no-ipv6")
    assert ours(pod, SAVE[backend][0]) == parse_save(dry.stdout).our_lines()
    rules = parse_save(pod.run([SAVE[backend][0], "-t", "nat"]).stdout).rules
    assert next(r.comment for r in rules if r.chain == "OUTPUT") == comment
    init_ok(pod, "--cleanup", "--backend", backend, "--no-ipv6")
    assert save(pod, SAVE[backend][0]) == before


# -- errors: one line, a documented exit code, nothing touched ----------------


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_conflicting_chain_is_refused(pod_network: PodNetwork, backend: str) -> None:
    pod = pod_network.add_pod("a")
    ipt = f"iptables-{backend}"
    pod.run([ipt, "-t", "nat", "-N", "L4PROXY_OUTPUT"])
    pod.run([ipt, "-t", "nat", "-A", "L4PROXY_OUTPUT", "-j", "ACCEPT"])
    before = save(pod, SAVE[backend][0])
    for args in (("-p", "15001"), ("--cleanup",)):
        result = init(pod, *args, "--backend", backend, "--no-ipv6")
        assert result.returncode == 5, result.stderr
        assert "L4PROXY_OUTPUT" in result.stderr and "did not write" in result.stderr
        assert f"(see: {SAVE[backend][0]} -t nat)" in result.stderr  # where it is shown
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert save(pod, SAVE[backend][0]) == before


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_a_conflict_in_ipv6_is_found_before_ipv4_is_changed(
    pod_network6: PodNetwork, backend: str
) -> None:
    """Exit 5 says "nothing touched": IPv4 used to be applied (or cleaned)
    before IPv6's conflict was even read."""
    pod = pod_network6.add_pod("a")
    v4, v6 = SAVE[backend]
    init_ok(pod, "-p", "15001", "--backend", backend)
    # another tool jumps into our IPv6 chain
    pod.run([f"ip6tables-{backend}", "-t", "nat", "-I", "OUTPUT", "-p", "udp",
             "-j", "L4PROXY_OUTPUT"])  # fmt: skip
    before = [save(pod, v4), save(pod, v6)]
    for args in (("-p", "15002", "--backend", backend), ("--cleanup", "--backend", backend),
                 ("--cleanup",)):  # fmt: skip
        result = init(pod, *args)
        assert result.returncode == 5, result.stderr
        assert "IPv6 nat table" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert [save(pod, v4), save(pod, v6)] == before


def test_a_refused_run_creates_no_legacy_table(pod_network6: PodNetwork) -> None:
    """auto picks legacy for IPv4 (nft has no rules, legacy no table): the
    pass that only checks opened it, and so created the IPv4 legacy nat
    table, though IPv6's conflict then refused the run (exit 5: nothing
    touched)."""
    pod = pod_network6.add_pod("a")
    pod.run(["ip6tables-legacy", "-t", "nat", "-N", "L4PROXY_OUTPUT"])
    pod.run(["ip6tables-legacy", "-t", "nat", "-A", "L4PROXY_OUTPUT", "-j", "RETURN"])
    assert legacy_tables(pod, 4) == []
    result = init(pod, "-p", "15001", "-u", "1337", "--ipv6")
    assert result.returncode == 5, result.stderr
    assert "IPv6 nat table" in result.stderr
    assert legacy_tables(pod, 4) == []
    # once IPv6 is in order, the apply pass makes the IPv4 table, as before
    pod.run(["ip6tables-legacy", "-t", "nat", "-F", "L4PROXY_OUTPUT"])
    result = init_ok(pod, "-p", "15001", "-u", "1337", "--ipv6")
    assert "IPv4 nat (iptables-legacy): installed" in result.stderr, result.stderr
    assert "nat" in legacy_tables(pod, 4)


def test_cleanup_checks_every_backend_before_cleaning_any(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("a")
    init_ok(pod, "--backend", "legacy", "--no-ipv6")
    pod.run(["iptables-nft", "-t", "nat", "-N", "L4PROXY_OUTPUT"])
    pod.run(["iptables-nft", "-t", "nat", "-A", "L4PROXY_OUTPUT", "-j", "ACCEPT"])
    before = save(pod, "iptables-legacy-save")
    result = init(pod, "--cleanup")  # auto: legacy first, then nft
    assert result.returncode == 5, result.stderr
    assert save(pod, "iptables-legacy-save") == before


def test_each_family_is_reported_as_soon_as_it_is_done(pod_network6: PodNetwork) -> None:
    """If IPv6 then fails, IPv4's line is already out: the user sees what
    was applied. Here: IPv4's report arrives while IPv6 is untouched."""
    from l4proxy_init import CaptureOptions
    from l4proxy_init.apply import FamilyReport, run

    pod = pod_network6.add_pod("a")
    seen: list[tuple[int, list[str]]] = []

    def on_report(report: FamilyReport) -> None:
        seen.append((report.family, ours(pod, "ip6tables-nft-save")))

    run("apply", CaptureOptions(), pod.netns, "on", "nft", on_report=on_report)
    assert [family for family, _ in seen] == [4, 6]
    assert seen[0][1] == [] and seen[1][1] != []


def test_without_net_admin_nothing_is_touched(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("a")
    # Inside the pod (as an init container would run), as a UID without capabilities.
    result = pod.run(
        [PY, "-m", "l4proxy_init", "-p", "15001", "-u", "1337"], user=1000, check=False
    )
    assert result.returncode == 3, result.stderr
    assert "run the init container with NET_ADMIN and NET_RAW" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ours(pod, "iptables-legacy-save") == ours(pod, "iptables-nft-save") == []


def test_missing_libxtables_is_reported(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("a")
    # python-iptables looks for libxtables.so.<this>: a version that does not exist.
    result = subprocess.run(
        [PY, "-m", "l4proxy_init", "--netns", pod.netns, "--backend", "legacy", "--no-ipv6"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON_IPTABLES_XTABLES_VERSION": "999"},
    )
    assert result.returncode == 4, result.stderr
    assert "libxtables" in result.stderr and "install the iptables package" in result.stderr
    assert ours(pod, "iptables-legacy-save") == []
