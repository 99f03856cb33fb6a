"""The test topology itself: pods reach each other over the bridge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from l4proxy.demo.podnet import PodNetwork, PodNetworkError, namespace_pids, unique_prefix
from tests.conftest import running

pytestmark = pytest.mark.netns

ECHO = (
    "import socket;"
    "s=socket.create_server(('',7000),family=socket.AF_INET6,dualstack_ipv6=True);"
    "c,_=s.accept();c.sendall(c.recv(100).upper());c.close()"
)
CALL = (
    "import socket,sys;c=socket.create_connection((sys.argv[1],7000),3);"
    "c.sendall(b'hi');print(c.recv(100).decode())"
)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pods_talk_over_the_bridge(pod_network6: PodNetwork, family: str) -> None:
    a = pod_network6.add_pod("a")
    b = pod_network6.add_pod("b")
    srv = b.popen([sys.executable, "-c", ECHO])
    try:
        b.wait_listening(7000)
        addr = b.ipv4 if family == "ipv4" else b.ipv6
        assert addr
        out = a.run([sys.executable, "-c", CALL, addr], user=1000).stdout
        assert out.strip() == "HI"
    finally:
        srv.kill()
        srv.wait()


def test_close_removes_namespaces() -> None:
    net = PodNetwork(prefix="l4tclose")
    with net:
        net.add_pod("x")
        assert net.pods["x"].run(["true"]).returncode == 0
    assert not os.path.exists("/var/run/netns/l4tclose-node")
    assert not os.path.exists("/var/run/netns/l4tclose-x")


def test_a_namespace_it_did_not_make_is_never_its_own(pod_network: PodNetwork) -> None:
    """A pod whose namespace exists already (another program's) is refused,
    and close() leaves that namespace alone."""
    theirs = f"{pod_network.prefix}-theirs"
    subprocess.run(["ip", "netns", "add", theirs], check=True)
    try:
        with pytest.raises(PodNetworkError, match="already exists"):
            pod_network.add_pod("theirs")
        pod_network.close()
        assert os.path.exists(f"/var/run/netns/{theirs}")
    finally:
        subprocess.run(["ip", "netns", "del", theirs], check=False)


def _ip_netns_pids(netns: str, n: int) -> list[int]:
    """``ip netns pids``, once *n* processes are in *netns* (a process started
    with ``ip netns exec`` is in it only once ip has entered it)."""
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        pids = sorted(int(line) for line in out.stdout.split())
        if len(pids) >= n or time.monotonic() > deadline:
            return pids
        time.sleep(0.02)


def test_close_stops_what_still_runs_in_its_namespaces() -> None:
    """Deleting a namespace's name does not stop its processes: close() kills
    what its owner left running, in a session of its own or orphaned (like a
    sidecar's worker whose supervisor was killed), before it deletes them."""
    net = PodNetwork(prefix=unique_prefix("l4k"))
    net.open()
    pod = net.add_pod("x")
    leader = pod.popen(["sleep", "600"], user=1000, start_new_session=True)
    orphan = int(pod.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], user=1000).stdout)
    try:
        assert _ip_netns_pids(pod.netns, 2) == sorted([leader.pid, orphan])
        assert namespace_pids([pod.netns]) == {pod.netns: sorted([leader.pid, orphan])}
        net.close()
        assert leader.wait(timeout=10) == -signal.SIGKILL
        assert not running(orphan)
        assert not os.path.exists(f"/var/run/netns/{pod.netns}")
    finally:
        for pid in (leader.pid, orphan):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        leader.wait()
        net.close()


def test_namespace_pids_agrees_with_ip_netns_pids(pod_network: PodNetwork) -> None:
    pod = pod_network.add_pod("x")
    procs = [pod.popen(["sleep", "600"], user=1000) for _ in range(2)]
    try:
        want = _ip_netns_pids(pod.netns, 2)
        assert want == sorted(p.pid for p in procs)
        assert namespace_pids([pod.netns, "l4-no-such-namespace"]) == {pod.netns: want}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_default_prefix_fits_any_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """l4t<pid> was 10 characters, over the limit, from pid 1,000,000 (pid_max
    is 4194304 on many systemd hosts): every test topology failed there."""
    seen = set()
    for pid in (1, 99_999, 1_000_000, 4_194_303, 4_194_304):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        net = PodNetwork()
        assert len(net.prefix) <= 9 and net.node_ns == f"{net.prefix}-node"
        seen.add(net.prefix)
    assert len(seen) == 5
