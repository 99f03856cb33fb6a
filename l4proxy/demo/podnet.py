"""Pods as network namespaces on one bridge: the demo's and the tests' topology.

Theory of operation
-------------------
A :class:`PodNetwork` owns one "node" namespace holding a Linux bridge, and
any number of pod namespaces, each joined to the bridge by a veth pair
(``eth0`` inside the pod). Pods get addresses in 198.18.0.0/16 (RFC 2544
benchmarking range: it routes nowhere outside these namespaces) and, when
asked, in 2001:2::/64 (the IPv6 benchmarking range). Every pod has a default
route via the bridge, so that a connect() to a Service VIP in 198.19.0.0/16
finds a route and reaches the pod's nat OUTPUT chain, where l4proxy-init's
REDIRECT takes it; nothing answers on a VIP otherwise.

Everything created is removed by :meth:`PodNetwork.close` (deleting a
namespace deletes the veth ends inside it), also when a test fails halfway.
Deleting a namespace's name does not stop the processes in it (they run on in
a namespace nobody can name), so close() first kills whatever still runs in
its namespaces (:func:`stop_processes`): a sidecar's worker that outlived its
supervisor, a server a test did not stop;
names carry the creating process id (:func:`unique_prefix`) so that parallel
runs never collide.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

IFA_F_NODAD = 0x02  # linux/if_addr.h: skip duplicate address detection
POD_NET4 = ipaddress.ip_network("198.18.0.0/16")
POD_NET6 = ipaddress.ip_network("2001:2::/64")
VIP_NET4 = ipaddress.ip_network("198.19.0.0/16")
# A pod's veth ends are "<prefix>p<host>" and "<prefix>b<host>": interface
# names are at most 15 characters (IFNAMSIZ - 1), a host number has 3 digits.
MAX_PREFIX = 9
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class PodNetworkError(RuntimeError):
    pass


def unique_prefix(stem: str, pid: int | None = None) -> str:
    """*stem* followed by this process's id (or *pid*) in base 36: a prefix no
    other running process makes. A pid is below 2**22 (the kernel's highest
    pid_max), at most 5 base-36 digits, so a stem of up to 4 characters keeps
    the prefix within :data:`MAX_PREFIX`."""
    n = os.getpid() if pid is None else pid
    digits = ""
    while True:
        n, d = divmod(n, 36)
        digits = _BASE36[d] + digits
        if not n:
            break
    prefix = stem + digits
    if len(prefix) > MAX_PREFIX:
        raise PodNetworkError(f"prefix {prefix!r} too long (max {MAX_PREFIX}: interface names)")
    return prefix


def namespace_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")


def namespace_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes in each named network namespace, as ``ip netns pids``
    finds them: those whose /proc/PID/ns/net is the namespace's file (the
    same device and inode). A zombie is in none; a name that does not exist
    is left out."""
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(f"/var/run/netns/{name}")
            wanted[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in wanted.values()}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone meanwhile, or a zombie
            continue
        owner = wanted.get((st.st_dev, st.st_ino))
        if owner is not None:
            found[owner].append(int(entry))
    return {name: sorted(pids) for name, pids in found.items()}


def stop_processes(names: Iterable[str], grace: float = 0.0) -> int:
    """Stop every process in the named namespaces: SIGTERM, and SIGKILL for
    any still there after *grace* seconds (at once when *grace* is 0), until
    none is left (one may fork meanwhile). Returns how many there were."""
    names = list(names)

    def running() -> list[int]:
        return [pid for pids in namespace_pids(names).values() for pid in pids]

    def send(pids: list[int], signum: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    first = left = running()
    if grace > 0 and left:
        send(left, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = running()
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:
        send(left, signal.SIGKILL)
        time.sleep(0.02)
        left = running()
    return len(first)


@dataclass
class Pod:
    """One pod: a network namespace with ``eth0`` on the bridge."""

    name: str
    netns: str
    ipv4: str
    ipv6: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def command(self, argv: Sequence[str], user: int | None = None) -> list[str]:
        """The argv that runs *argv* inside this pod, as *user* if given."""
        cmd = ["ip", "netns", "exec", self.netns]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
        return cmd + list(argv)

    def popen(
        self, argv: Sequence[str], user: int | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(argv, user), **kwargs)

    def run(
        self,
        argv: Sequence[str],
        user: int | None = None,
        check: bool = True,
        timeout: float = 30,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv, user), check=check, timeout=timeout, **kwargs)

    def curl(
        self,
        url: str,
        n: int = 1,
        user: int | None = 1000,
        extra: Sequence[str] = (),
        timeout: float = 120,
    ) -> list[str]:
        """*n* requests with real curl (one process), each on its own connection
        (``Connection: close``). Returns the output lines: each body, then the
        status code on a line of its own ("000" for a failed request)."""
        argv = ["curl", "-sS", "--max-time", "10", "-H", "Connection: close", *extra]
        argv += ["-w", "\\n%{http_code}\\n", *([url] * n)]
        return self.run(argv, user=user, check=False, timeout=timeout).stdout.splitlines()

    def set_hosts(self, entries: dict[str, list[str]]) -> None:
        """Give the pod its own /etc/hosts (``ip netns exec`` bind-mounts
        /etc/netns/<ns>/hosts over /etc/hosts), so that curl inside the pod
        resolves service names like ``bootcamp`` the way cluster DNS would."""
        d = f"/etc/netns/{self.netns}"
        os.makedirs(d, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"{ip} {' '.join(names)}" for ip, names in entries.items()]
        with open(os.path.join(d, "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(os.path.join(d, "hosts"), 0o644)

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        """Block until something in this pod listens on TCP *port*."""
        deadline = time.monotonic() + timeout
        needle = f":{port:04X} "
        while time.monotonic() < deadline:
            out = self.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"], check=False).stdout
            for line in out.splitlines()[1:]:
                parts = line.split()
                # local_address is parts[1]; state 0A is LISTEN
                if len(parts) > 3 and (parts[1] + " ").endswith(needle) and parts[3] == "0A":
                    return
            time.sleep(0.05)
        raise PodNetworkError(f"nothing listens on port {port} in pod {self.name} after {timeout}s")


class PodNetwork:
    """A bridge in a node namespace plus pod namespaces; a context manager."""

    def __init__(
        self,
        prefix: str | None = None,
        ipv6: bool = False,
        on_namespace: Callable[[str], None] | None = None,
    ) -> None:
        """*on_namespace* is called with each namespace's name before it is
        created (the demo records it where ``l4proxy demo --down`` finds it)."""
        self.prefix = prefix or unique_prefix("l4t")
        if len(self.prefix) > MAX_PREFIX:
            raise PodNetworkError(
                f"prefix {self.prefix!r} too long (max {MAX_PREFIX}: interface names)"
            )
        self.ipv6 = ipv6
        self.node_ns = f"{self.prefix}-node"
        self._on_namespace = on_namespace
        self.pods: dict[str, Pod] = {}
        self._namespaces: list[str] = []
        self._next_host = 10
        self._bridge_index = 0
        self._open = False

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> PodNetwork:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if namespace_exists(self.node_ns):
            raise PodNetworkError(
                f"network namespace {self.node_ns} already exists "
                f"(a previous run left it? remove it with: ip netns del {self.node_ns})"
            )
        self._create_ns(self.node_ns)
        self._open = True
        with NetNS(self.node_ns) as ns:
            self._link_up(ns, "lo")
            ns.link("add", ifname="br0", kind="bridge")
            self._bridge_index = ns.link_lookup(ifname="br0")[0]
            ns.link("set", index=self._bridge_index, state="up")
            ns.addr("add", index=self._bridge_index, address="198.18.0.1", prefixlen=16)
            if self.ipv6:
                ns.addr(
                    "add",
                    index=self._bridge_index,
                    address="2001:2::1",
                    prefixlen=64,
                    flags=IFA_F_NODAD,
                )

    def close(self) -> None:
        stop_processes(self._namespaces)
        for name in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                netns.remove(name)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        self._namespaces.clear()
        self.pods.clear()
        self._open = False

    # -- pods ------------------------------------------------------------
    def add_pod(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        ipv4: str | None = None,
    ) -> Pod:
        if not self._open:
            raise PodNetworkError("PodNetwork is not open")
        if name in self.pods:
            raise PodNetworkError(f"pod {name} exists")
        host = self._next_host
        self._next_host += 1
        addr4 = ipv4 or str(POD_NET4.network_address + host)
        addr6 = str(POD_NET6.network_address + host) if self.ipv6 else None
        ns_name = f"{self.prefix}-{name}"
        self._create_ns(ns_name)
        inner, outer = f"{self.prefix}p{host}", f"{self.prefix}b{host}"
        with IPRoute() as ipr:
            ipr.link(
                "add", ifname=inner, kind="veth", peer={"ifname": outer, "net_ns_fd": self.node_ns}
            )
            idx = ipr.link_lookup(ifname=inner)[0]
            ipr.link("set", index=idx, net_ns_fd=ns_name)
        with NetNS(self.node_ns) as ns:
            port = ns.link_lookup(ifname=outer)[0]
            ns.link("set", index=port, master=self._bridge_index, state="up")
        with NetNS(ns_name) as ns:
            self._link_up(ns, "lo")
            idx = ns.link_lookup(ifname=inner)[0]
            ns.link("set", index=idx, ifname="eth0")
            ns.addr("add", index=idx, address=addr4, prefixlen=16)
            if addr6:
                ns.addr("add", index=idx, address=addr6, prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=idx, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway="198.18.0.1")
            if addr6:
                ns.route("add", dst="::/0", gateway="2001:2::1", family=socket.AF_INET6)
        pod = Pod(name=name, netns=ns_name, ipv4=addr4, ipv6=addr6, labels=dict(labels or {}))
        self.pods[name] = pod
        return pod

    # -- helpers ---------------------------------------------------------
    def _create_ns(self, name: str) -> None:
        if namespace_exists(name):  # not ours: neither recorded nor ever removed
            raise PodNetworkError(f"network namespace {name} already exists")
        if self._on_namespace is not None:
            self._on_namespace(name)
        # Known before it exists: close() removes it even if an exception (a
        # signal's KeyboardInterrupt) comes between its creation and the next line.
        self._namespaces.append(name)
        netns.create(name)

    @staticmethod
    def _link_up(ns: Any, ifname: str) -> None:
        idx = ns.link_lookup(ifname=ifname)[0]
        ns.link("set", index=idx, state="up")
