"""The test topology itself: pods reach each other over the bridge."""

from __future__ import annotations

import sys

import pytest

from l4proxy.demo.podnet import PodNetwork

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
    import os

    assert not os.path.exists("/var/run/netns/l4tclose-node")
    assert not os.path.exists("/var/run/netns/l4tclose-x")
