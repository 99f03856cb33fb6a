"""Where the proxies run: a loopback bed (gateway placement) and a pod bed (sidecar).

A *target* is one thing wrk measures: a URL, how to run wrk against it (on
the host, or inside a pod as some uid), and the process whose CPU it bills.
Targets come in groups; every ratio in the report is taken inside a group,
against that group's HAProxy and its direct run, so that both sides of a
ratio pay the same kernel path.

loopback
    nginx backends v1/v2 on 127.0.0.1; HAProxy, nginx stream, Envoy
    (tcp_proxy and HTTP weighted) and l4proxy as a gateway listener (Ingress
    → bootcamp, RouteRule 50/50), each on its own 127.0.0.1 port. Direct:
    wrk → the v1 backend.

sidecar
    A backend pod serving v1/v2, and two client pods where ``l4proxy-init -p
    15001 -u 1337`` installed the REDIRECT: one runs ``l4proxy run --uid
    1337``, the other HAProxy as uid 1337 on 15001, so both pay the same
    nat + loopback cost. wrk runs as uid 1000 against the VIP
    198.19.0.10:8080. Direct: wrk as uid 1337 (never redirected) → the
    backend pod.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from bench import peers, rules
from bench.peers import Address, Backend
from bench.process import Launcher, Process, free_port, on_host, wait_port
from l4proxy.demo.podnet import Pod, PodNetwork

VENV_BIN = os.path.dirname(sys.executable)
L4PROXY = os.path.join(VENV_BIN, "l4proxy")
# l4proxy as a pod runs it: see installed_l4proxy(). --editable: as make
# installed it for development (and the tests run it).
EDITABLE = False
INSTALLED = os.path.join(tempfile.gettempdir(), "l4proxy-bench", "installed")
L4PROXY_INIT = os.path.join(VENV_BIN, "l4proxy-init")
CLIENT_UID = 1000
PROXY_UID = 1337
SIDECAR_PORT = 15001

LOOPBACK_PEERS = (
    "direct",
    "haproxy",
    "haproxy-http",
    "nginx-stream",
    "envoy-tcp",
    "envoy-http",
    "l4proxy",
    "l4proxy-request",
)
SIDECAR_PEERS = ("direct", "haproxy", "haproxy-http", "l4proxy", "l4proxy-request")
# l4proxy-request: --http-routing request (the per-request relay and its pools)
L4PROXY_MODES = {"l4proxy": (), "l4proxy-request": ("--http-routing", "request")}
GROUPS = ("loopback", "sidecar")


class ScenarioError(RuntimeError):
    pass


@dataclass
class Target:
    group: str  # "loopback" | "sidecar"
    peer: str  # "direct", "haproxy", "l4proxy", ...
    url: str
    process: Process  # billed for CPU and RSS
    launcher: Launcher = on_host  # how wrk (and the probe) run
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.peer if self.group == "loopback" else f"{self.group}/{self.peer}"


def probe(target: Target, tries: int = 12) -> set[str]:
    """GET the target a few times (new connection each); the versions that answered."""
    argv = ["curl", "-sS", "--max-time", "5", "-H", "Connection: close"]
    argv += ["-w", "\\n"] + [target.url] * tries
    done = subprocess.run(
        target.launcher(argv), capture_output=True, text=True, timeout=60, check=False
    )
    versions = {
        line.rsplit("v=", 1)[1].strip()
        for line in done.stdout.splitlines()
        if "Hello Kubernetes bootcamp!" in line
    }
    if not versions:
        raise ScenarioError(
            f"{target.url} did not answer like bootcamp "
            f"(curl exit {done.returncode}): {done.stderr.strip() or done.stdout[-500:]}\n"
            f"{target.process.name} log:\n{target.process.log_tail()}"
        )
    return {f"v{v}" for v in versions}


@functools.cache  # (one venv check per run; EDITABLE is set before the first call)
def installed_l4proxy() -> tuple[str, ...]:
    """The command that runs l4proxy as it runs in a pod.

    ``make`` installs the project in editable mode, and setuptools' editable
    install puts an import hook in every process of the venv: at start-up it
    imports pathlib, re, urllib.parse and more, 0.9 MB of RSS in each of the
    sidecar's two processes that no pod pays (the image pip-installs it; the
    device's bench kit runs it from PYTHONPATH). So l4proxy runs from a venv
    of its own with the project and .venv's packages on its path (``.pth``
    path lines, which import nothing) and no hook: what an installed wheel
    costs. Without the hook in this interpreter (the kit), the plain command.
    """
    hooked = any(name.startswith("__editable__") for name in sys.modules)
    if EDITABLE or not hooked:
        return (L4PROXY,)
    python = os.path.join(INSTALLED, "bin", "python")
    old = os.umask(0o022)  # the sidecar placement runs it as uid 1337
    try:
        if not os.path.exists(python):
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", INSTALLED],
                check=True,
                capture_output=True,
            )
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        import l4proxy

        project = os.path.dirname(os.path.dirname(os.path.abspath(l4proxy.__file__)))
        with open(os.path.join(purelib, "l4proxy-bench.pth"), "w") as f:
            f.write(f"{project}\n{sysconfig.get_paths()['purelib']}\n")
    finally:
        os.umask(old)
    return (python, "-m", "l4proxy")


def l4proxy_command(
    rules_dir: str, extra: Sequence[str] = (), admin: Address | None = None
) -> list[str]:
    admin_arg = str(admin) if admin else "127.0.0.1:15000"
    return [
        *installed_l4proxy(),
        "run",
        "--rules",
        rules_dir,
        "--admin",
        admin_arg,
        "--workers",
        "1",
        "--drain-duration",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]


def in_pod(pod: Pod, user: int | None = None) -> Launcher:
    """A launcher that runs an argv inside *pod* (as *user*, when given)."""

    def launch(argv: Sequence[str]) -> list[str]:
        return pod.command(argv, user=user)

    return launch


class Bed:
    """A set of running processes and the targets they make; a context manager."""

    group = ""

    def __init__(self, workdir: str, backend_workers: int = 1) -> None:
        self.workdir = os.path.join(workdir, self.group)
        self.backend_workers = backend_workers  # nginx worker processes of the backends
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.processes: list[Process] = []
        self.targets: list[Target] = []
        self.failures: dict[str, str] = {}  # peer -> why it is not measured
        self._owner = os.getpid()  # a forked child must never tear the bed down

    def __enter__(self) -> Self:
        return self

    def start(self, selected: Sequence[str]) -> list[Target]:
        """Start the backends and the *selected* peers; the targets that answered."""
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _keep(self, proc: Process) -> Process:
        self.processes.append(proc)
        return proc

    def _try(self, peer: str, start: Callable[[str], Target]) -> None:
        """Start one peer and probe it; a peer that fails is reported, not fatal."""
        try:
            target = start(peer)
            target.notes["versions"] = ",".join(sorted(probe(target)))
        except Exception as exc:  # any failure to start: report it, measure the rest
            self.failures[peer] = str(exc)
            print(f"bench: {self.group}/{peer} not measured: {exc}", file=sys.stderr)
            return
        self.targets.append(target)

    def close(self) -> None:
        if os.getpid() != self._owner:
            return
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()


class LoopbackBed(Bed):
    """Every peer on 127.0.0.1, each on its own port."""

    group = "loopback"

    def start(self, selected: Sequence[str]) -> list[Target]:
        self.backends = [Backend("127.0.0.1", free_port(), v) for v in ("v1", "v2")]
        self.nginx = self._keep(
            peers.start_nginx_backends(self.workdir, self.backends, workers=self.backend_workers)
        )
        for b in self.backends:
            wait_port(b.host, b.port, proc=self.nginx)
        for peer in selected:
            self._try(peer, self._start_peer)
        return self.targets

    def _start_peer(self, peer: str) -> Target:
        backends, addr = self.backends, Address("127.0.0.1", free_port())
        if peer == "direct":
            v1 = backends[0]
            return Target(self.group, peer, f"http://{v1.host}:{v1.port}/", self.nginx)
        if peer in ("haproxy", "haproxy-http"):
            mode = "http" if peer == "haproxy-http" else "tcp"
            proc = peers.start_haproxy(self.workdir, addr, backends, name=peer, mode=mode)
        elif peer == "nginx-stream":
            proc = peers.start_nginx_stream(self.workdir, addr, backends)
        elif peer == "envoy-tcp":
            proc = peers.start_envoy(self.workdir, peer, peers.envoy_tcp_conf(addr, backends))
        elif peer == "envoy-http":
            proc = peers.start_envoy(self.workdir, peer, peers.envoy_http_conf(addr, backends))
        elif peer in L4PROXY_MODES:
            proc = self._start_l4proxy(addr, backends, peer)
        else:
            raise ScenarioError(f"unknown loopback peer {peer!r} (known: {LOOPBACK_PEERS})")
        self._keep(proc)
        wait_port(addr.host, addr.port, timeout=30, proc=proc)
        return Target(self.group, peer, f"http://{addr}/", proc)

    def _start_l4proxy(self, listen: Address, backends: list[Backend], peer: str) -> Process:
        rules_dir = rules.write_rules(os.path.join(self.workdir, "l4proxy-rules"), backends)
        admin = Address("127.0.0.1", free_port())
        extra = ["--no-transparent", "--listen", str(listen), *L4PROXY_MODES[peer]]
        argv = l4proxy_command(rules_dir, extra, admin)
        log = os.path.join(self.workdir, f"{peer}.log")
        return Process(peer, argv, log).start()


class SidecarBed(Bed):
    """Pods in network namespaces: traffic through l4proxy-init's REDIRECT."""

    group = "sidecar"

    def __init__(self, workdir: str, backend_workers: int = 1) -> None:
        super().__init__(workdir, backend_workers)
        self.net = PodNetwork(prefix=f"l4b{os.getpid() % 100000}")

    def close(self) -> None:
        if os.getpid() != self._owner:
            return
        super().close()
        self.net.close()

    def start(self, selected: Sequence[str]) -> list[Target]:
        if os.geteuid() != 0:
            raise ScenarioError("the sidecar scenarios need root (network namespaces, iptables)")
        self.net.open()
        backend_pod = self.net.add_pod("bk", labels={"app": "bootcamp"})
        self.backends = [
            Backend(backend_pod.ipv4, port, v) for port, v in ((8081, "v1"), (8082, "v2"))
        ]
        self.nginx = self._keep(
            peers.start_nginx_backends(
                self.workdir,
                self.backends,
                launcher=in_pod(backend_pod),
                workers=self.backend_workers,
            )
        )
        for b in self.backends:
            self._wait_pod_port(backend_pod, b.port, self.nginx)
        for peer in selected:
            self._try(peer, self._start_peer)
        return self.targets

    def _start_peer(self, peer: str) -> Target:
        vip_url = f"http://{rules.VIP}:{rules.SERVICE_PORT}/"
        if peer == "direct":
            # A pod without the REDIRECT: the same veth path, no proxy.
            pod = self.net.add_pod("cld")
            v1 = self.backends[0]
            url = f"http://{v1.host}:{v1.port}/"
            return Target(self.group, peer, url, self.nginx, in_pod(pod, CLIENT_UID))
        if peer in ("haproxy", "haproxy-http"):
            http = peer == "haproxy-http"
            pod = self._client_pod("chh" if http else "clh")
            proc = peers.start_haproxy(
                self.workdir,
                Address("0.0.0.0", SIDECAR_PORT),
                self.backends,
                name=f"{peer}-sidecar",
                launcher=in_pod(pod, PROXY_UID),
                mode="http" if http else "tcp",
            )
        elif peer in L4PROXY_MODES:
            pod = self._client_pod("clr" if L4PROXY_MODES[peer] else "cll")
            rules_dir = rules.write_rules(
                os.path.join(self.workdir, "l4proxy-rules"), self.backends
            )
            argv = l4proxy_command(rules_dir, ["--uid", str(PROXY_UID), *L4PROXY_MODES[peer]])
            log = os.path.join(self.workdir, f"{peer}-sidecar.log")
            proc = Process(f"{peer}-sidecar", argv, log, in_pod(pod)).start()
        else:
            raise ScenarioError(f"unknown sidecar peer {peer!r} (known: {SIDECAR_PEERS})")
        self._keep(proc)
        self._wait_pod_port(pod, SIDECAR_PORT, proc)
        return Target(self.group, peer, vip_url, proc, in_pod(pod, CLIENT_UID))

    def _client_pod(self, name: str) -> Pod:
        pod = self.net.add_pod(name, labels={"app": "client"})
        init = [L4PROXY_INIT, "--netns", pod.netns, "-p", str(SIDECAR_PORT), "-u", str(PROXY_UID)]
        done = subprocess.run(init, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ScenarioError(f"l4proxy-init failed ({done.returncode}): {done.stderr.strip()}")
        return pod

    @staticmethod
    def _wait_pod_port(pod: Pod, port: int, proc: Process, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise ScenarioError(f"{proc.name} exited {proc.returncode()}:\n{proc.log_tail()}")
            with contextlib.suppress(Exception):
                pod.wait_listening(port, timeout=0.5)
                return
            if time.monotonic() > deadline:
                raise ScenarioError(f"{proc.name} does not listen on {port}:\n{proc.log_tail()}")
