"""Test support: the bootcamp service in pods, a client pod with init + sidecar.

``Mesh`` builds on :class:`l4proxy.demo.podnet.PodNetwork`: bootcamp pods (v1 ×2,
v2 ×1) running :mod:`l4proxy.demo.bootcamp`, a ServiceEntry for them with the VIP
198.19.0.10:8080, a client pod where ``l4proxy-init -p 15001 -u 1337`` has
run and ``l4proxy run`` serves as uid 1337. Requests are made as uid 1000.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from l4proxy.demo.bootcamp import tally
from l4proxy.demo.podnet import Pod, PodNetwork

VENV_BIN = os.path.dirname(sys.executable)
PYTHON = sys.executable
L4PROXY = os.path.join(VENV_BIN, "l4proxy")
L4PROXY_INIT = os.path.join(VENV_BIN, "l4proxy-init")
VIP = "198.19.0.10"

# The sidecar's two implementations as the tests run them: (environment, run args).
IMPLS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "compiled-uvloop": ({}, ()),
    "pure-asyncio": ({"L4PROXY_NO_EXTENSIONS": "1"}, ("--loop", "asyncio")),
}

# The two HTTP data planes (issue 11), as the suites that must pass in both
# run them: "connection" (the default: a connection's first request head
# routes it, the L4 pump relays) and "request" (the per-request relay routes
# every request head on its own, l4proxy/dataplane/_relay_py.py).
ROUTING_MODES: dict[str, tuple[str, ...]] = {
    "connection": ("--http-routing", "connection"),
    "request": ("--http-routing", "request"),
}

# The project's shared material (the Istio tutorial's manifests) lives in
# ``../shared`` beside the checkout, where CI puts it; users do not have it.
# L4PROXY_SHARED overrides: ``make`` sets it when it runs the suite in a
# mirror of the checkout (see the Makefile), so ``../shared`` still means
# beside the user's checkout. Tests reach it through conftest's ``seed_dir``.
SHARED_DIR = os.environ.get("L4PROXY_SHARED") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared"
)
SEED_DIR = os.path.join(SHARED_DIR, "seed", "istio-request-routing")


def service_entry(
    name: str,
    vip: str,
    port: int,
    endpoints: Iterable[tuple[str, dict[str, str]]],
    protocol: str = "HTTP",
    port_name: str = "http",
) -> str:
    eps = [{"address": addr, "labels": labels} for addr, labels in endpoints]
    doc = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "ServiceEntry",
        "metadata": {"name": name},
        "spec": {
            "hosts": [f"{name}.default.svc.cluster.local"],
            "addresses": [vip],
            "ports": [{"number": port, "name": port_name, "protocol": protocol}],
            "resolution": "STATIC",
            "endpoints": eps,
        },
    }
    return json.dumps(doc)


def route_rule(weights: dict[str, int], name: str = "bootcamp-default") -> str:
    return (
        "apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\n"
        f"metadata:\n  name: {name}\nspec:\n  destination:\n    name: bootcamp\n"
        "  precedence: 1\n  route:\n"
        + "".join(f"  - labels:\n      version: {v}\n    weight: {w}\n" for v, w in weights.items())
    )


class Sidecar:
    def __init__(self, pod: Pod, proc: subprocess.Popen[bytes], admin_port: int) -> None:
        self.pod = pod
        self.proc = proc
        self.admin_port = admin_port
        self.counted = ""  # what the last fd_count() counted, one fd per line

    def admin(self, path: str, method: str = "GET") -> str:
        """Query the admin endpoint inside the pod (it listens on the pod's loopback)."""
        # curl, not a Python one-liner: ~7 ms a query against ~45 ms (the
        # suite asks the admin endpoint hundreds of times). -f: an HTTP error
        # raises CalledProcessError, as urlopen did; no proxy, no globbing.
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        argv = ["curl", "-sS", "-f", "-g", "--noproxy", "*", "--max-time", "5", "-X", method, url]
        return self.pod.run(argv).stdout

    def stat(self, name: str) -> float:
        total = 0.0
        for line in self.admin("/stats").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (children of the sidecar process)."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def fd_count(self) -> int:
        """Open fds of the supervisor and all its workers, less what the bounded
        pools hold for reuse (splice pipes, 2 fds each, at most --max-pipes;
        idle upstream connections of --http-routing request) and less the
        admin endpoint's connections from the tests' own queries (the last
        one's closes once the supervisor reads curl's FIN, which a loaded host
        delays past the next count): what a leak grows."""
        admin = self._admin_connections()
        raw = 0
        counted = []
        for pid in [self.proc.pid, *self.worker_pids()]:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue  # closed meanwhile
                if target not in admin:
                    raw += 1
                    counted.append(f"{pid} {fd} {target}")
        self.counted = "\n".join(counted)
        gauges = self.stats(("l4proxy_pipes_pooled", "l4proxy_upstream_pool_idle"))
        return raw - int(2 * gauges["l4proxy_pipes_pooled"] + gauges["l4proxy_upstream_pool_idle"])

    def _admin_connections(self) -> set[str]:
        """``socket:[INODE]`` of each accepted connection on the admin port (the
        pod's /proc/net/tcp*, as the sidecar's network namespace shows them)."""
        port = f"{self.admin_port:04X}"
        found = set()
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{self.proc.pid}/net/{table}") as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                # local address is ADDR:PORT in hex; state 0A is LISTEN
                # (TIME_WAIT's inode is 0: no fd)
                if fields[1].rsplit(":", 1)[1] == port and fields[3] != "0A" and fields[9] != "0":
                    found.add(f"socket:[{fields[9]}]")
        return found

    def stats(self, names: Iterable[str]) -> dict[str, float]:
        """Several stats (each summed over its labels) from one /stats query."""
        totals = dict.fromkeys(names, 0.0)
        for line in self.admin("/stats").splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals

    def sockets(self) -> str:
        """The pod's TCP sockets with their owner and inode (``ss -tanpei``) and
        the sidecar's connection and pool gauges: what a failed fd check needs
        to tell a leak from a socket in passing."""
        gauges = [
            line
            for line in self.admin("/stats").splitlines()
            if line.startswith(("l4proxy_active", "l4proxy_upstream_pool", "l4proxy_pipes"))
        ]
        return "\n".join([*gauges, self.pod.run(["ss", "-tanpei"]).stdout])

    def open_fds(self) -> str:
        """Every open fd of the supervisor and its workers, one per line
        (``PID FD TARGET``), for a failed fd check's message."""
        lines = []
        for pid in [self.proc.pid, *self.worker_pids()]:
            try:
                fds = sorted(os.listdir(f"/proc/{pid}/fd"), key=int)
            except OSError:
                continue
            for fd in fds:
                try:
                    lines.append(f"{pid} {fd} {os.readlink(f'/proc/{pid}/fd/{fd}')}")
                except OSError:
                    pass
        return "\n".join(lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Mesh:
    """Bootcamp v1 ×2 + v2 ×1 and a client pod with l4proxy-init + l4proxy run."""

    def __init__(self, net: PodNetwork, env: dict[str, str] | None = None) -> None:
        self.net = net
        self.env = dict(os.environ, **(env or {}))
        self.rules_dir = tempfile.mkdtemp(prefix="l4mesh-")
        os.chmod(self.rules_dir, 0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bootcamp: list[Pod] = []
        self.client: Pod | None = None
        self.sidecar: Sidecar | None = None
        self.log_path = os.path.join(self.rules_dir, "sidecar.log")

    # -- building ------------------------------------------------------------
    def start_backends(self, v1: int = 2, v2: int = 1) -> None:
        for version, count in (("v1", v1), ("v2", v2)):
            for i in range(count):
                pod = self.net.add_pod(
                    f"bc-{version}-{i}", labels={"app": "bootcamp", "version": version}
                )
                self.serve_bootcamp(pod, f"bootcamp-{version}-{i}", version[1:])
                self.bootcamp.append(pod)
        for pod in self.bootcamp:
            pod.wait_listening(8080)

    def serve_bootcamp(self, pod: Pod, name: str, version: str, port: int = 8080) -> None:
        self.procs.append(
            pod.popen(
                [
                    PYTHON,
                    "-m",
                    "l4proxy.demo.bootcamp",
                    "--port",
                    str(port),
                    "--pod",
                    name,
                    "--version",
                    version,
                ],
                user=1000,
                env=self.env,
            )
        )

    def endpoints(self) -> list[tuple[str, dict[str, str]]]:
        return [(p.ipv4, p.labels) for p in self.bootcamp]

    def write_rules(self, *docs: str, name: str = "rules.yaml") -> str:
        """Atomically replace one rule file (write + rename, like a ConfigMap swap)."""
        path = os.path.join(self.rules_dir, name)
        tmp = os.path.join(self.rules_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write("\n---\n".join(docs))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def remove_rules(self, name: str) -> None:
        os.unlink(os.path.join(self.rules_dir, name))

    def start_client(
        self,
        init_args: Iterable[str] = (),
        run_args: Iterable[str] = (),
        prefix: Sequence[str] = (),
    ) -> Sidecar:
        """The client pod: l4proxy-init, then the sidecar (*prefix*: e.g. prlimit)."""
        self.client = self.net.add_pod("client", labels={"app": "client"})
        subprocess.run(
            [L4PROXY_INIT, "--netns", self.client.netns, "-p", "15001", "-u", "1337", *init_args],
            check=True,
            capture_output=True,
            env=self.env,
        )
        self.sidecar = self.start_sidecar(self.client, run_args, prefix)
        return self.sidecar

    def start(self, impl: str, *docs: str, run_args: Iterable[str] = ()) -> Sidecar:
        """Registry for the bootcamp pods, *docs* as rules.yaml, the client under *impl*."""
        env, args = IMPLS[impl]
        self.env.update(env)
        self.write_rules(
            service_entry("bootcamp", VIP, 8080, self.endpoints()), name="registry.yaml"
        )
        if docs:
            self.write_rules(*docs)
        return self.start_client(run_args=(*args, *run_args))

    def start_sidecar(
        self, pod: Pod, run_args: Iterable[str] = (), prefix: Sequence[str] = ()
    ) -> Sidecar:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        proc = pod.popen(
            [
                *prefix,
                L4PROXY,
                "run",
                "--rules",
                self.rules_dir,
                "--uid",
                "1337",
                "--reload-interval",
                "0.2",
                "--drain-duration",
                "5",
                "--drain-quiet",  # stop soon after the test's traffic (default 5 s)
                "0.1",
                "--seed",  # weighted splits repeat run after run (see ALPHA)
                "1",
                # The per-connection path unless a test asks for per-request
                # routing (the default of l4proxy run; the last flag wins).
                "--http-routing",
                "connection",
                *run_args,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        sidecar = Sidecar(pod, proc, 15000)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {proc.returncode}:\n{self.sidecar_log(5000)}")
            try:
                if "LIVE" in sidecar.admin("/ready"):
                    return sidecar
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"sidecar not ready:\n{self.sidecar_log(5000)}")

    def sidecar_log(self, tail: int | None = None) -> str:
        """The sidecar's log: whole for assertions (a storm of reload lines
        pushed what a test looked for out of a tail), or its last *tail*
        characters for a message."""
        try:
            with open(self.log_path) as f:
                text = f.read()
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    # -- traffic -------------------------------------------------------------
    def curl(
        self, url: str, n: int = 1, timeout: float = 60, extra: Iterable[str] = ()
    ) -> list[str]:
        """n requests with real curl as uid 1000, each on its own connection."""
        assert self.client is not None
        return self.client.curl(url, n, extra=tuple(extra), timeout=timeout)

    def split(
        self, url: str = f"http://{VIP}:8080/", n: int = 300
    ) -> tuple[Counter[str], Counter[str], list[str]]:
        """(requests per version, per pod, failures) for n curl requests."""
        lines = self.curl(url, n)
        versions, pods = tally("\n".join(lines))
        codes = [ln for ln in lines if re.fullmatch(r"\d{3}", ln)]
        failures = [c for c in codes if c != "200"]
        if len(codes) < n:
            failures += ["missing"] * (n - len(codes))
        return versions, pods, failures

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        """close(); a sidecar that died first says why (its log's tail, in
        the failed test's output)."""
        if self.sidecar and not self.sidecar.alive():
            print(self.sidecar_log(5000))
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pipe in (p.stdin, p.stdout, p.stderr):  # (a test's popen(stdout=PIPE))
                if pipe is not None:
                    pipe.close()
        shutil.rmtree(self.rules_dir, ignore_errors=True)


def client_mesh(pod_network: PodNetwork) -> Iterator[Mesh]:
    """A client pod's sidecar and the pods a test adds, closed after the
    test (the sidecar's log printed where it died): a fixture's body."""
    m = Mesh(pod_network)
    try:
        yield m
    finally:
        if m.sidecar and not m.sidecar.alive():
            print(m.sidecar_log(5000))
        m.close()


def through_a_sidecar(net: PodNetwork, impl: str, server: str, client: str) -> bytes:
    """What *client* printed: a Python script run as uid 1000 in a client
    pod (l4proxy-init, a sidecar of *impl* routing per request) whose
    requests go to the ServiceEntry echo (198.19.0.30:8080), served by
    *server*, a Python script serving port 8080 in pod "echo"."""
    with Mesh(net) as mesh:
        echo = net.add_pod("echo", labels={"app": "echo"})
        mesh.procs.append(echo.popen([PYTHON, "-c", server, "8080"], user=1000))
        echo.wait_listening(8080)
        mesh.write_rules(
            service_entry("echo", "198.19.0.30", 8080, [(echo.ipv4, echo.labels)]),
            name="registry.yaml",
        )
        env, args = IMPLS[impl]
        mesh.env.update(env)
        mesh.start_client(run_args=(*args, "--http-routing", "request"))
        assert mesh.client is not None
        out = mesh.client.run([PYTHON, "-c", client], user=1000, timeout=20, text=False).stdout
        assert isinstance(out, bytes)  # (text=False: Pod.run's type says str)
        return out


# False-failure budget. Every split the tests check is drawn by a seeded RNG
# (``l4proxy run --seed``, ``load_rules(seed=)``), so a run repeats exactly;
# the bounds are still set as if the draws were fresh, so that a seed (or an
# RNG change) cannot land on an unlucky one. Per assertion p < ALPHA = 1e-8;
# the whole suite makes 13 such assertions (test_routing_split 6 chi-square,
# test_sidecar 3, test_demo 4), so by the union bound a run fails by chance
# with p < 1.3e-7 < 1e-6.
ALPHA = 1e-8


def binomial_ok(k: int, n: int, p: float, alpha: float = ALPHA) -> bool:
    """True unless k of n is in either tail of Binomial(n, p) beyond alpha / 2
    (exact tails, no normal approximation: it is poor that far out)."""
    if p in (0.0, 1.0):
        return k == n * p
    return binomial_tail(k, n, p, lower=True) > alpha / 2 and (
        binomial_tail(k, n, p, lower=False) > alpha / 2
    )


def binomial_tail(k: int, n: int, p: float, *, lower: bool) -> float:
    """P(X <= k) (lower) or P(X >= k) for X ~ Binomial(n, p)."""
    ks = range(0, k + 1) if lower else range(k, n + 1)
    logp, logq = math.log(p), math.log1p(-p)
    return sum(
        math.exp(
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * logp
            + (n - i) * logq
        )
        for i in ks
    )


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body.decode()
