"""``l4proxy demo``: Istio's request-routing tutorial, on one machine.

Theory of operation
-------------------
The tutorial (bootcamp v1 ×2 and v2 ×1 behind Service ``bootcamp:8080``, an
Ingress for ``/bootcamp``, three RouteRules applied in turn) needs a cluster
with Istio. Here every pod is a network namespace on one bridge
(:mod:`l4proxy.demo.podnet`):

* one pod per replica of each Deployment, labelled from its pod template,
  running :mod:`l4proxy.demo.bootcamp` (answers like the real image) behind its own
  inbound sidecar (``l4proxy-init`` + ``l4proxy run`` as uid 1337);
* a client pod with ``l4proxy-init -p 15001 -u 1337`` and ``l4proxy run``, and
  an /etc/hosts that resolves ``bootcamp`` to the Service VIP (198.19.0.0/16),
  which exists only as a REDIRECT target, as a ClusterIP does;
* a gateway pod running ``l4proxy run --listen 0.0.0.0:80`` that routes by
  the Ingress.

The Service and Deployments become a ServiceEntry (the rule file's service
registry, as a control plane would write it) next to the Ingress and the
current RouteRule in a rules directory that both sidecars watch. Each step
swaps the RouteRule file, waits until both sidecars serve the new
generation, and makes requests with real curl as uid 1000 (a connection per
request) and with the keep-alive client (:mod:`l4proxy.demo.keepalive`: one
connection per path, opened at the first step and kept to the last, many
requests per step on it). Every sidecar runs ``--http-routing request``, so
each request is routed on its own: a weighted rule splits the requests of
that one connection, and each swap reaches it at its next request. After the
steps the routing sidecars' /stats show how few upstream connections their
pools opened for all those requests.

What a run creates it first records in ``/run/l4proxy-demo/PREFIX/state.json``
(the namespaces, before each is made; the rules and logs directories; the
process that made them). Making that directory claims the prefix: a second
run of it refuses. ``--down`` removes what the record lists, and nothing
else: the processes still in those namespaces, the namespaces, the
directories; so a demo that died without cleaning up (SIGKILL, a crash)
is removed as one left by ``--keep``, and no namespace of the same prefix that
the run did not make (another program's, another run's) is touched. The one
exception: a demo that an l4proxy before the record left with ``--keep``
(``/run/l4proxy-demo/pids``, and ``rules`` and ``logs`` links beside it) is
removed as that l4proxy's ``--down`` did, every ``l4demo-*`` namespace with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from l4proxy.demo.bootcamp import tally
from l4proxy.demo.podnet import (
    MAX_PREFIX,
    Pod,
    PodNetwork,
    PodNetworkError,
    namespace_exists,
    namespace_pids,
    stop_processes,
    unique_prefix,
)
from l4proxy.stats import RulesMark

# The command's namespaces are PREFIX-*, unless --prefix names others (a second
# demo beside the first, the tests). A Tutorial made by other code gets a
# prefix of its own process (default_prefix): it never meets the user's demo.
PREFIX = "l4demo"
# default_prefix's stem: not the start of PREFIX, so that no pid makes PREFIX
# ("l4d" + 18960 in base 36 was "l4demo").
STEM = "l4x"
# One directory per prefix: state.json (see the module's docstring), and the
# links to the rules and logs of a topology left by --keep.
STATE_DIR = "/run/l4proxy-demo"
STATE_FILE = "state.json"
# What --keep wrote before there was a record (l4proxy before --prefix), in
# STATE_DIR itself: "pids", the sessions it started, one a line, and the links
# "rules" and "logs" to its directories; its namespaces were every l4demo-*.
OLD_PIDS = "pids"
OLD_LINKS = ("rules", "logs")
TEMP_PREFIX = "l4proxy-demo-"  # the rules and logs directories (tempfile.mkdtemp)
VIP_BASE = "198.19.0."
TUTORIAL_ORDER = ["all-v1", "50-v2", "all-v2"]
BLOCKS = " ▏▎▍▌▋▊▉█"

# The l4proxy package's directory (this module is l4proxy/demo/tutorial.py).
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MANIFESTS = os.path.join(os.path.dirname(HERE), "deploy", "examples", "bootcamp")
# ``--api gateway``: the same steps as HTTPRoutes (httproute-STEP.yaml), the
# gateway as a Gateway, and httproute-base.yaml for "no-rule" and "delete".
GATEWAY_API_MANIFESTS = os.path.join(os.path.dirname(HERE), "deploy", "examples", "gateway-api")
BASE_STEP = "base"


class DemoError(Exception):
    pass


class DemoBusy(DemoError):
    """The prefix is taken: a run of it is up, or left something behind."""


# -- manifests ----------------------------------------------------------------
@dataclass
class Deployment:
    name: str
    replicas: int
    labels: dict[str, str]
    port: int


@dataclass
class ServiceDef:
    name: str
    port: int
    port_name: str
    target_port: int
    selector: dict[str, str]


@dataclass
class Manifests:
    directory: str
    deployments: list[Deployment] = field(default_factory=list)
    services: list[ServiceDef] = field(default_factory=list)
    ingress_docs: list[str] = field(default_factory=list)
    ingress_paths: list[tuple[str, str]] = field(default_factory=list)  # (path, service)
    rules: dict[str, tuple[str, str]] = field(default_factory=dict)  # step -> (file, text)
    gateway_docs: list[str] = field(default_factory=list)  # Gateway API Gateways
    # HTTPRoute "no traffic shifting" (file, text): installed where a RouteRule is deleted
    base_rule: tuple[str, str] | None = None


def _step_name(filename: str) -> str:
    base = os.path.splitext(os.path.basename(filename))[0]
    m = re.search(r"(?:route-rule|httproute)-(.+)$", base)
    return m.group(1) if m else base


def read_manifests(directory: str) -> Manifests:
    """Read the tutorial's objects from a directory of Kubernetes/Istio YAML."""
    if not os.path.isdir(directory):
        raise DemoError(f"manifest directory {directory} does not exist")
    man = Manifests(directory=directory)
    files = sorted(f for f in os.listdir(directory) if f.endswith((".yaml", ".yml")))
    for fname in files:
        path = os.path.join(directory, fname)
        with open(path) as f:
            text = f.read()
        try:
            docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except yaml.YAMLError as exc:
            raise DemoError(f"{path}: {exc}") from exc
        for doc in docs:
            kind = doc.get("kind")
            meta = doc.get("metadata") or {}
            spec = doc.get("spec") or {}
            if kind == "Deployment":
                tmpl = spec.get("template") or {}
                labels = (tmpl.get("metadata") or {}).get("labels") or {}
                containers = (tmpl.get("spec") or {}).get("containers") or [{}]
                ports = containers[0].get("ports") or [{"containerPort": 8080}]
                man.deployments.append(
                    Deployment(
                        name=meta["name"],
                        replicas=int(spec.get("replicas", 1)),
                        labels={str(k): str(v) for k, v in labels.items()},
                        port=int(ports[0]["containerPort"]),
                    )
                )
            elif kind == "Service":
                port = (spec.get("ports") or [{}])[0]
                man.services.append(
                    ServiceDef(
                        name=meta["name"],
                        port=int(port.get("port", 80)),
                        port_name=str(port.get("name", "")),
                        target_port=int(port.get("targetPort", port.get("port", 80))),
                        selector={str(k): str(v) for k, v in (spec.get("selector") or {}).items()},
                    )
                )
            elif kind == "Ingress":
                man.ingress_docs.append(yaml.safe_dump(doc, sort_keys=False))
                for rule in spec.get("rules") or []:
                    for p in (rule.get("http") or {}).get("paths") or []:
                        backend = p.get("backend") or {}
                        svc = backend.get("serviceName") or (backend.get("service") or {}).get(
                            "name", ""
                        )
                        man.ingress_paths.append((str(p.get("path", "/")), str(svc)))
            elif kind == "RouteRule":
                man.rules[_step_name(fname)] = (fname, text)
            elif kind == "Gateway":
                man.gateway_docs.append(yaml.safe_dump(doc, sort_keys=False))
            elif kind == "HTTPRoute":
                step = _step_name(fname)
                if step == BASE_STEP:
                    man.base_rule = (fname, text)
                    for rule in spec.get("rules") or []:
                        for m in rule.get("matches") or []:
                            value = (m.get("path") or {}).get("value")
                            if value and not man.ingress_paths:
                                man.ingress_paths.append((str(value), ""))
                else:
                    man.rules[step] = (fname, text)
    if not man.deployments or not man.services:
        raise DemoError(f"{directory}: needs at least one Deployment and one Service")
    return man


def steps_of(man: Manifests) -> list[str]:
    named = [s for s in TUTORIAL_ORDER if s in man.rules]
    others = sorted(s for s in man.rules if s not in TUTORIAL_ORDER)
    return ["no-rule", *named, *others, "delete"]


# -- the topology -------------------------------------------------------------
# The demo's sidecars stop with their pods (down(), Ctrl-C): no app outlives
# them, so the drain does not wait for one to go quiet (l4proxy run --drain-quiet).
QUICK_STOP = ("--drain-quiet", "0")
# Every sidecar routes each request on its own (issue 11), as `l4proxy inject
# --http-routing request` makes them: the keep-alive client's one connection
# follows the rule of the moment. (The app pods' sidecars only forward inbound
# connections, at L4 either way.)
PER_REQUEST = ("--http-routing", "request")


def _exe(name: str) -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", name.replace("-", "_")]


@dataclass
class PodInfo:
    pod: Pod
    version: str = ""


class Tutorial:
    def __init__(
        self,
        man: Manifests,
        requests: int = 100,
        out: Any = sys.stdout,
        seed: int | None = None,
        keepalive: int = 0,
        prefix: str | None = None,
    ) -> None:
        self.man = man
        self.requests = requests
        # Requests per step on the keep-alive client's one connection per path
        # (l4proxy.demo.keepalive); 0: no keep-alive client.
        self.keepalive = keepalive
        self._keepalive_proc: subprocess.Popen[bytes] | None = None
        self._keepalive_last: dict[str, dict[str, Any]] = {}  # path label -> last batch
        self._keepalive_since: dict[str, int] = {}  # path label -> step of its first batch
        # --seed for the client and gateway sidecars: their weighted splits repeat.
        self.seed_args = [] if seed is None else ["--seed", str(seed)]
        self.out = out
        self.prefix = prefix or default_prefix()
        self.state_dir = state_dir(self.prefix)
        # What this run made, as state.json lists it; None until claim().
        self._state: dict[str, Any] | None = None
        self.net = PodNetwork(prefix=self.prefix, on_namespace=self._record_namespace)
        self.rules_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "rules-")
        os.chmod(self.rules_dir, 0o755)
        self.log_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "logs-")
        os.chmod(self.log_dir, 0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.app_pods: list[PodInfo] = []
        self.client: Pod | None = None
        self.gateway: Pod | None = None
        self.vips: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def claim(self) -> None:
        """Take the prefix: make its state directory (of two runs, one does)
        and record this process and the rules and logs directories in it;
        each namespace is recorded before it is made (:meth:`_record_namespace`)."""
        if self._state is not None:
            return
        os.makedirs(STATE_DIR, mode=0o755, exist_ok=True)
        try:
            os.mkdir(self.state_dir, 0o755)
        except FileExistsError:
            raise DemoBusy(
                f"{self.state_dir} exists: a demo of these namespaces ({self.prefix}-*) is "
                f"running or was left behind; remove it with: {_down_command(self.prefix)}"
            ) from None
        self._state = {
            "owner": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "namespaces": [],
            "dirs": [self.rules_dir, self.log_dir],
        }
        self._save_state()

    def _record_namespace(self, name: str) -> None:
        if self._state is not None:
            self._state["namespaces"].append(name)
            self._save_state()

    def _save_state(self) -> None:
        path = os.path.join(self.state_dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self._state, f, indent=1)
        os.replace(path + ".tmp", path)

    def _release(self) -> None:
        """Drop the record once what it lists is gone: a namespace that the
        network did not know (a signal between the record and its creation)
        is removed here. Kept, listing what is left, for --down."""
        if self._state is None:
            return
        _remove_namespaces(self._state["namespaces"], grace=0)
        left = [n for n in self._state["namespaces"] if namespace_exists(n)]
        if left:
            self._state["namespaces"] = left
            self._save_state()
            print(
                f"l4proxy demo: could not remove {', '.join(left)}; "
                f"{_down_command(self.prefix)} will",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self._state = None

    def up(self) -> None:
        self.claim()
        self.net.open()
        svc = self.man.services[0]
        for i, s in enumerate(self.man.services):
            self.vips[s.name] = f"{VIP_BASE}{10 + i}"
        # Application pods, each with its inbound sidecar.
        for dep in self.man.deployments:
            for r in range(dep.replicas):
                pod = self.net.add_pod(f"{dep.name}-{r}", labels=dep.labels)
                self.app_pods.append(PodInfo(pod, dep.labels.get("version", "")))
                self._init(pod)
                self._spawn(
                    pod,
                    [
                        sys.executable,
                        "-m",
                        "l4proxy.demo.bootcamp",
                        "--port",
                        str(dep.port),
                        "--pod",
                        pod.name,
                        "--version",
                        dep.labels.get("version", "v1").lstrip("v"),
                    ],
                    f"{pod.name}.app",
                    user=1000,
                )
                sidecar = [*_exe("l4proxy"), "run", "--uid", "1337", *QUICK_STOP, *PER_REQUEST]
                self._spawn(pod, sidecar, f"{pod.name}.sidecar")
        self._write_registry(self.man.services)
        for doc_i, doc in enumerate(self.man.ingress_docs):
            self._write(f"ingress-{doc_i}.yaml", doc)
        for doc_i, doc in enumerate(self.man.gateway_docs):
            self._write(f"gateway-{doc_i}.yaml", doc)
        if self.man.base_rule is not None:
            self._write("route-rule.yaml", self.man.base_rule[1])
        # The client pod: what the tutorial's curl runs in.
        self.client = self.net.add_pod("client", labels={"app": "client"})
        hosts = {
            vip: [name, f"{name}.default", f"{name}.default.svc.cluster.local"]
            for name, vip in self.vips.items()
        }
        self.client.set_hosts(hosts)
        self._init(self.client)
        self._spawn(
            self.client,
            [
                *_exe("l4proxy"),
                "run",
                "--rules",
                self.rules_dir,
                "--uid",
                "1337",
                "--reload-interval",
                "0.2",
                "--access-log",
                self.access_log_path,
                *QUICK_STOP,
                *PER_REQUEST,
                *self.seed_args,
            ],
            "client.sidecar",
        )
        # The ingress gateway.
        self.gateway = self.net.add_pod("gateway", labels={"app": "ingressgateway"})
        self._spawn(
            self.gateway,
            [
                *_exe("l4proxy"),
                "run",
                "--rules",
                self.rules_dir,
                "--no-transparent",
                "--listen",
                "0.0.0.0:80",
                "--uid",
                "1337",
                "--reload-interval",
                "0.2",
                *QUICK_STOP,
                *PER_REQUEST,
                *self.seed_args,
            ],
            "gateway.sidecar",
        )
        for info in self.app_pods:
            info.pod.wait_listening(svc.target_port)
        self.client.wait_listening(15001)
        self.gateway.wait_listening(80)
        for pod in (self.client, self.gateway):
            self._wait_ready(pod)
        if self.keepalive > 0:
            self._start_keepalive()

    def down(self) -> None:
        self.stop_keepalive(wait=0)  # still in a batch (Ctrl-C, an error): terminated below
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # its session (start_new_session): a sidecar's workers too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            if p.stdout is not None:  # (the keep-alive client's: a pipe to this process)
                p.stdout.close()
        self.net.close()  # and whatever still runs in the pods (podnet.stop_processes)
        shutil.rmtree(self.rules_dir, ignore_errors=True)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        self._release()

    # -- helpers ---------------------------------------------------------
    def _init(self, pod: Pod) -> None:
        r = subprocess.run(
            [*_exe("l4proxy-init"), "--netns", pod.netns, "-p", "15001", "-u", "1337"],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise DemoError(f"l4proxy-init in {pod.name} failed: {r.stderr.strip()}")

    def _spawn(self, pod: Pod, argv: list[str], logname: str, user: int | None = None) -> None:
        with open(os.path.join(self.log_dir, logname + ".log"), "ab") as log:
            self.procs.append(
                pod.popen(
                    argv, user=user, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _start_keepalive(self) -> None:
        """The keep-alive client, as uid 1000 in the client pod like curl."""
        assert self.client is not None
        urls = [url for _, url in self.urls()]
        with open(os.path.join(self.log_dir, "client.keepalive.log"), "ab") as log:
            self._keepalive_proc = self.client.popen(
                [sys.executable, "-m", "l4proxy.demo.keepalive", *urls],
                user=1000,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.procs.append(self._keepalive_proc)

    def stop_keepalive(self, wait: float = 5) -> None:
        """Close the keep-alive connections (the client exits at end of input)."""
        proc, self._keepalive_proc = self._keepalive_proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if wait:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)

    def _write(self, name: str, text: str) -> None:
        tmp = os.path.join(self.rules_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(self.rules_dir, name))

    def _write_registry(self, services: list[ServiceDef]) -> None:
        """One ServiceEntry per Service that selects pods (bootcamp; with the
        Gateway API also bootcamp-v1 and bootcamp-v2, the backends)."""
        entries = [e for e in (self._service_entry(s) for s in services) if e is not None]
        self._write("registry.yaml", yaml.safe_dump_all(entries, sort_keys=False))

    def _service_entry(self, svc: ServiceDef) -> dict[str, Any] | None:
        endpoints = [
            {
                "address": info.pod.ipv4,
                "ports": {svc.port_name or "tcp": svc.target_port},
                "labels": info.pod.labels,
            }
            for info in self.app_pods
            if all(info.pod.labels.get(k) == v for k, v in svc.selector.items())
        ]
        if not endpoints:
            return None
        protocol = "HTTP" if svc.port_name == "http" or svc.port_name.startswith("http-") else "TCP"
        entry = {
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "ServiceEntry",
            "metadata": {"name": svc.name},
            "spec": {
                "hosts": [f"{svc.name}.default.svc.cluster.local"],
                "addresses": [self.vips[svc.name]],
                "ports": [
                    {"number": svc.port, "name": svc.port_name or "tcp", "protocol": protocol}
                ],
                "resolution": "STATIC",
                "endpoints": endpoints,
            },
        }
        return entry

    def _admin(self, pod: Pod, path: str) -> str:
        r = pod.run(["curl", "-s", "--max-time", "2", f"http://127.0.0.1:15000{path}"], check=False)
        return r.stdout

    def _rules_mark(self, pod: Pod) -> RulesMark:
        return RulesMark.parse(self._admin(pod, "/stats")) or RulesMark(-1)

    def _wait_ready(self, pod: Pod, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._admin(pod, "/ready").strip() == "LIVE":
                return
            time.sleep(0.1)
        raise DemoError(f"the sidecar in {pod.name} is not ready; logs in {self.log_dir}")

    def _rule_errors(self, pod: Pod) -> str | None:
        try:
            dump = json.loads(self._admin(pod, "/config_dump"))
        except ValueError:
            return None
        err = dump.get("last_error")
        return str(err) if err else None

    # -- the tutorial ------------------------------------------------------
    def apply(self, step: str) -> str:
        """Make *step* the live rule; returns a line describing it."""
        assert self.client is not None and self.gateway is not None
        before = [self._rules_mark(p) for p in (self.client, self.gateway)]
        rule_path = os.path.join(self.rules_dir, "route-rule.yaml")
        if step in ("no-rule", "delete") and self.man.base_rule is not None:
            # Gateway API: a gateway serves nothing without a route, so the
            # base HTTPRoute (gateway → bootcamp, no split) stands for "no rule".
            fname, text = self.man.base_rule
            what = f"HTTPRoute from {fname}: no traffic shifting (round robin)"
            with open(rule_path) as f:
                if f.read() == text:
                    return what
            self._write("route-rule.yaml", text)
        elif step in ("no-rule", "delete"):
            if not os.path.exists(rule_path):
                return "no RouteRule: round robin over every bootcamp pod"
            os.unlink(rule_path)
            what = "RouteRule deleted: round robin over every bootcamp pod again"
        else:
            fname, text = self.man.rules[step]
            self._write("route-rule.yaml", text)
            kind = "HTTPRoute" if "kind: HTTPRoute" in text else "RouteRule"
            what = f"{kind} from {fname}: " + _describe_rule(text)
        deadline = time.monotonic() + 10
        for pod, mark in zip((self.client, self.gateway), before, strict=True):
            while not self._rules_mark(pod).past(mark):
                err = self._rule_errors(pod)
                if err:
                    raise DemoError(f"the sidecar in {pod.name} rejected the rule:\n{err}")
                if time.monotonic() > deadline:
                    raise DemoError(f"the sidecar in {pod.name} did not load the new rule")
                time.sleep(0.05)
        return what

    def measure(self, url: str) -> tuple[Counter[str], Counter[str], int]:
        assert self.client is not None
        lines = self.client.curl(url, self.requests)
        versions, pods = tally("\n".join(lines))
        return versions, pods, self.requests - sum(versions.values())

    def urls(self) -> list[tuple[str, str]]:
        assert self.gateway is not None
        svc = self.man.services[0]
        out = [("mesh", f"http://{svc.name}:{svc.port}/")]
        if self.man.ingress_paths:
            path = self.man.ingress_paths[0][0].replace(".*", "")
            out.append(("gateway", f"http://{self.gateway.ipv4}{path}"))
        return out

    def measure_keepalive(self, timeout: float = 120) -> dict[str, dict[str, Any]]:
        """``self.keepalive`` requests on each path's one keep-alive connection
        (the same connection at every step): {path label: the client's answer}."""
        proc = self._keepalive_proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"%d\n" % self.keepalive)
        proc.stdin.flush()
        # (poll, not select: select() refuses an fd past 1023, which a
        # process with many open already hands out)
        poller = select.poll()
        poller.register(proc.stdout, select.POLLIN)
        ready = poller.poll(timeout * 1000)
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise DemoError(
                f"the keep-alive client did not answer (exit status {proc.poll()}); "
                f"logs in {self.log_dir}"
            )
        answers = json.loads(line)
        return {label: a for (label, _), a in zip(self.urls(), answers, strict=True)}

    def run_step(self, index: int, total: int, step: str) -> dict[str, Any]:
        self.say(f"== step {index}/{total}: {step}")
        self.say(f"   {self.apply(step)}")
        result: dict[str, Any] = {"step": step}
        # The keep-alive connections send the first requests after the swap
        # (a fixed order: with --seed the sidecars' draws repeat), shown after curl.
        kept = self.measure_keepalive() if self._keepalive_proc is not None else {}
        for label, url in self.urls():
            versions, pods, failed = self.measure(url)
            result[label] = {"versions": dict(versions), "pods": dict(pods), "failed": failed}
            self.say(
                f"   {label:8s}{url}  (curl: {self.requests} requests, one connection each, "
                f"{failed} failed)"
            )
            self._say_split(versions, pods, self.requests)
            if label in kept:
                self._say_keepalive(index, label, kept[label], last=index >= total)
        if kept:
            result["keepalive"] = kept
        self.say()
        return result

    def _say_split(self, versions: Counter[str], pods: Counter[str], n: int) -> None:
        for v in sorted({info.version for info in self.app_pods}):
            pct = 100.0 * versions.get(v, 0) / n if n else 0.0
            per_pod = ", ".join(
                f"{p}: {c}" for p, c in sorted(pods.items()) if _pod_version(p) == v
            )
            self.say(f"     {v} {bar(pct)} {pct:5.1f} %  {per_pod}")

    def _say_keepalive(
        self, index: int, label: str, got: dict[str, Any], last: bool = False
    ) -> None:
        prev = self._keepalive_last.get(label)
        self._keepalive_last[label] = got
        since = self._keepalive_since.setdefault(label, index)
        if got["connections"] != 1:
            which = f"{got['connections']} connections so far (the far side closed one)"
        elif since == index and last:  # (a one-step run: no step follows)
            which = "1 connection"
        elif since == index:
            which = "1 connection (kept open for the steps that follow)"
        else:
            which = f"1 connection (the same since step {since})"
        self.say(
            f"{'':11s}keep-alive: {got['requests']} requests on {which}, {got['failed']} failed"
        )
        self._say_split(Counter(got["versions"]), Counter(got["pods"]), got["requests"])
        old = sorted(prev["versions"]) if prev else []
        first = got["first"]
        if len(old) == 1 and first and _pod_version(first) not in old:
            self.say(
                f"{'':11s}its next request went to {first} (all {old[0]} a step ago): the swap "
                f"reached this\n{'':11s}open connection at once; routed per connection it "
                f"would still be on {old[0]} (Istio #13908)"
            )

    def pool_summary(self) -> list[str]:
        """The upstream pools at work: requests served vs upstream connections
        opened, from each routing sidecar's /stats."""
        assert self.client is not None and self.gateway is not None
        lines = ["== the upstream pools: requests vs upstream connections (each sidecar's /stats)"]
        for name, pod in (("client", self.client), ("gateway", self.gateway)):
            stats = _metrics(self._admin(pod, "/stats"))
            requests = stats.get("l4proxy_http_requests_total", 0)
            clients = stats.get("l4proxy_http_connections_total", 0)
            opened = stats.get("l4proxy_upstream_pool_opened_total", 0)
            reused = stats.get("l4proxy_upstream_pool_reused_total", 0)
            lines.append(
                f"   {name:8s}{requests:,} requests on {clients:,} client connections: "
                f"{opened:,} upstream connections opened, {reused:,} reuses"
            )
        lines += [
            "   (curl's Connection: close ends its own connection, not the pooled upstream one;",
            "   l4proxy_http_requests_total, l4proxy_http_connections_total,",
            "   l4proxy_upstream_pool_opened_total, l4proxy_upstream_pool_reused_total)",
        ]
        return lines

    @property
    def access_log_path(self) -> str:
        """The client sidecar's access log (``--access-log``), in the logs."""
        return os.path.join(self.log_dir, "client.access.log")

    def access_log_summary(self) -> list[str]:
        """The client sidecar's access log: its lines, a request's or a
        connection routed at L4's (curl to the gateway pod's address, which
        is no service: PassthroughCluster), and the last request each
        version's subset served (Istio's cluster name,
        ``outbound|PORT|SUBSET|HOST``, says which). Its writer thread lags
        the requests a little, and a connection's line comes at its end:
        read once it has every request and passthrough connection the
        sidecar's /stats counts (or after 2 s, as far as it got)."""
        assert self.client is not None
        stats = _metrics(self._admin(self.client, "/stats"))
        served = stats.get("l4proxy_http_requests_total", 0)
        passed = stats.get("l4proxy_passthrough_total", 0)
        deadline = time.monotonic() + 2
        while True:
            try:
                with open(self.access_log_path, "rb") as f:
                    lines = f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                return []
            l4 = [line for line in lines if '] "- - -" ' in line]
            requests = len(lines) - len(l4)
            if (requests >= served and len(l4) >= passed) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        last: dict[str, str] = {}
        for line in lines:
            m = re.search(r" (outbound\|\d+\|[^| ]*\|\S+) ", line)
            if m and '] "- - -" ' not in line:
                last[m.group(1)] = line
        out = [
            "== the access log: one line per request, Istio's format (l4proxy run --access-log)",
            f"   client  {requests:,} requests; {len(l4):,} connections at L4 (curl to the "
            "gateway pod's address, no service's: PassthroughCluster)",
            "   the last request of each cluster (outbound|PORT|SUBSET|HOST: the version):",
        ]
        out += [f"   {last[cluster]}" for cluster in sorted(last)]
        return out


def _metrics(text: str) -> dict[str, int]:
    """Unlabelled samples of Prometheus text: {name: value}."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.e+]+)$", text, re.M):
        out[m.group(1)] = int(float(m.group(2)))
    return out


def _pod_version(pod_name: str) -> str:
    m = re.search(r"-(v\d+)-", pod_name)
    return m.group(1) if m else ""


def _describe_rule(text: str) -> str:
    try:
        doc = next(d for d in yaml.safe_load_all(text) if isinstance(d, dict))
        if doc.get("kind") == "HTTPRoute":
            refs = [b for r in doc["spec"].get("rules") or [] for b in r.get("backendRefs") or []]
            return ", ".join(f"{b['name']} {b.get('weight', 1)}" for b in refs)
        routes = doc["spec"].get("route") or []
        return ", ".join(
            f"{'/'.join(str(v) for v in (r.get('labels') or {}).values())} {r.get('weight', 100)}"
            for r in routes
        )
    except (StopIteration, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return "(unreadable)"


def bar(pct: float, width: int = 25) -> str:
    """A horizontal bar of *width* cells for 0..100 %, in eighths."""
    eighths = round(pct / 100 * width * 8)
    full, part = divmod(eighths, 8)
    s = "█" * full + (BLOCKS[part] if part else "")
    return s.ljust(width)


# -- the command ----------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the request-routing tutorial in network namespaces",
        description=__doc__.split("\n\n")[0].replace("``", "") if __doc__ else None,
        epilog="""\
examples:
  l4proxy demo                         # all five steps: per path 100 curl requests, and
                                       # 200 on the keep-alive client's one connection
  l4proxy demo --requests 300 --step 50-v2
  l4proxy demo --manifests ../shared/seed/istio-request-routing
  l4proxy demo --keep                  # leave the pods up and show how to curl them
  l4proxy demo --down                  # remove what --keep (or a killed demo) left
  l4proxy demo --prefix l4demo2        # a second demo beside the first, in namespaces
                                       # l4demo2-*: l4proxy demo --down --prefix l4demo2

needs root (network namespaces, iptables). Exit codes: 0 done, 1 a step
failed or the topology could not be built, 2 usage (not root, already up).""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--manifests",
        default=DEFAULT_MANIFESTS,
        metavar="DIR",
        help="Deployments, Service, Ingress and RouteRules (default: the bundled bootcamp example)",
    )
    p.add_argument(
        "--requests", type=int, default=100, metavar="N", help="requests per step and path (100)"
    )
    p.add_argument(
        "--keepalive",
        type=int,
        default=200,
        metavar="N",
        help="requests per step and path on the keep-alive client's one connection "
        "(200; 0: no keep-alive client)",
    )
    p.add_argument(
        "--step",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this step (no-rule, all-v1, 50-v2, all-v2, delete); repeatable",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the sidecars' weighted splits (l4proxy run --seed): the same "
        "counts every run (tests); default: random",
    )
    p.add_argument(
        "--no-canary",
        dest="canary",
        action="store_false",
        help="skip the two l4proxy canary rollouts after the tutorial's steps",
    )
    p.add_argument("--keep", action="store_true", help="leave the topology running")
    p.add_argument(
        "--down",
        action="store_true",
        help="remove a topology left by --keep or by a demo that was killed: what that run "
        f"recorded in {STATE_DIR}/PREFIX/, nothing else",
    )
    p.add_argument(
        "--prefix",
        type=_prefix,
        default=PREFIX,
        metavar="NAME",
        help=f"the network namespaces' names begin NAME- ({PREFIX}); up to {MAX_PREFIX} "
        "lowercase letters and digits",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--api",
        choices=("istio", "gateway"),
        default="istio",
        help="istio: RouteRules and an Ingress (the tutorial); gateway: the same steps as "
        "Gateway API HTTPRoutes, mesh (Service parentRef) and gateway (a Gateway); "
        "default --manifests becomes deploy/examples/gateway-api",
    )
    p.set_defaults(func=_run_with_api)


def _prefix(value: str) -> str:
    if not re.fullmatch(rf"[a-z][a-z0-9]{{0,{MAX_PREFIX - 1}}}", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a letter, then letters and digits, {MAX_PREFIX} at most (lowercase)"
        )
    return value


def _run_with_api(args: argparse.Namespace) -> int:
    """``--api gateway`` picks the Gateway API manifests unless --manifests is given."""
    if getattr(args, "api", "istio") == "gateway" and args.manifests == DEFAULT_MANIFESTS:
        args.manifests = GATEWAY_API_MANIFESTS
    return run(args)


def default_prefix(pid: int | None = None) -> str:
    """The prefix of a Tutorial made without one: this process's (or *pid*'s),
    never :data:`PREFIX`."""
    return unique_prefix(STEM, pid)


def state_dir(prefix: str) -> str:
    return os.path.join(STATE_DIR, prefix)


def _start_time(pid: int) -> str | None:
    """When *pid* started (clock ticks since boot; None: no such process):
    with the pid, names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_state(directory: str) -> dict[str, Any] | None:
    """The record in *directory*; None when there is none. A record that
    cannot be read is an error: guessing could remove what it does not list."""
    try:
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DemoError(f"cannot read {directory}/{STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict):
        raise DemoError(f"{directory}/{STATE_FILE}: not a demo's record")
    return state


def _remove_namespaces(names: list[str], grace: float) -> int:
    """Delete the namespaces of *names* that exist; how many did. Deleting a
    namespace's name stops nothing in it: the sidecars (their workers too),
    apps and clients are stopped first (SIGTERM, SIGKILL after *grace* s)."""
    stop_processes(names, grace=grace)
    removed = 0
    for name in reversed(names):
        if namespace_exists(name):
            subprocess.run(["ip", "netns", "del", name], check=False)
            removed += 1
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
    return removed


def _down(prefix: str) -> int:
    """Remove what the run of *prefix* recorded (see the module's docstring),
    and, for the default prefix, a demo an earlier l4proxy left with --keep
    (:func:`_down_old_layout`)."""
    if prefix == PREFIX and os.path.exists(os.path.join(STATE_DIR, OLD_PIDS)):
        recorded = os.path.exists(os.path.join(state_dir(prefix), STATE_FILE))
        code = _down_recorded(prefix) if recorded else 0
        return code or _down_old_layout(prefix)
    return _down_recorded(prefix)


def _down_old_layout(prefix: str) -> int:
    """Remove a demo that an l4proxy before the record left with --keep, as
    its --down did: SIGTERM to the sessions listed in STATE_DIR/pids, then
    whatever still runs in the *prefix*-* namespaces is stopped and the
    namespaces deleted, and the rules and logs directories its links point
    to are removed with the links and the list."""
    pids_file = os.path.join(STATE_DIR, OLD_PIDS)
    netns_dir = "/var/run/netns"
    names = sorted(
        n
        for n in (os.listdir(netns_dir) if os.path.isdir(netns_dir) else [])
        if n.startswith(prefix + "-")
    )
    # A pid that is in none of the namespaces any more is another process's now.
    inside = {pid for pids in namespace_pids(names).values() for pid in pids}
    try:
        with open(pids_file) as f:
            listed = [int(line) for line in f if line.strip().isdigit()]
    except OSError as exc:
        print(f"l4proxy demo: cannot read {pids_file}: {exc}; nothing removed", file=sys.stderr)
        return 1
    for pid in listed:
        if pid in inside:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
    removed = _remove_namespaces(names, grace=5)
    for name in OLD_LINKS:
        link = os.path.join(STATE_DIR, name)
        if os.path.islink(link):
            target = os.path.realpath(link)
            if os.path.basename(target).startswith(TEMP_PREFIX):
                shutil.rmtree(target, ignore_errors=True)
            os.unlink(link)
    left = [n for n in names if namespace_exists(n)]
    if left:
        print(f"l4proxy demo: could not remove {', '.join(left)}", file=sys.stderr)
        return 1
    os.unlink(pids_file)
    with contextlib.suppress(OSError):  # an empty record directory (a run that died early)
        os.rmdir(state_dir(prefix))
    print(f"removed {removed} namespace(s) (a demo left by an earlier l4proxy)")
    return 0


def _down_recorded(prefix: str) -> int:
    """Remove what the run of *prefix* recorded in its state directory."""
    directory = state_dir(prefix)
    try:
        state = _read_state(directory)
    except DemoError as exc:
        print(f"l4proxy demo: {exc}; nothing removed", file=sys.stderr)
        return 1
    if state is None:
        # Nothing recorded (a run that died before its first record left at
        # most an empty directory): a namespace of this prefix is not ours.
        shutil.rmtree(directory, ignore_errors=True)
        netns_dir = "/var/run/netns"
        names = sorted(os.listdir(netns_dir)) if os.path.isdir(netns_dir) else []
        others = [n for n in names if n.startswith(prefix + "-")]
        if others:
            print(
                f"l4proxy demo: no demo recorded in {directory}, so nothing was removed; "
                f"{', '.join(others)} exist, made by another program (or an older "
                "l4proxy): remove them with ip netns del NAME",
                file=sys.stderr,
            )
            return 1
        print("removed 0 namespace(s)")
        return 0
    owner = state.get("owner")
    started = _start_time(owner) if isinstance(owner, int) else None
    if started is not None and started == state.get("owner_start"):
        # (the pid and its start time: that very process, not one given its pid since)
        print(
            f"l4proxy demo: the demo that made {prefix}-* is still running (pid {owner}): "
            f"stop it (Ctrl-C, or kill {owner}) and it removes them itself",
            file=sys.stderr,
        )
        return 2
    names = [
        n
        for n in state.get("namespaces") or []
        if isinstance(n, str) and n.startswith(prefix + "-")
    ]
    removed = _remove_namespaces(names, grace=5)
    for path in state.get("dirs") or []:
        if isinstance(path, str) and os.path.basename(path).startswith(TEMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
    left = [n for n in names if namespace_exists(n)]
    if left:
        print(f"l4proxy demo: could not remove {', '.join(left)}", file=sys.stderr)
        return 1
    shutil.rmtree(directory, ignore_errors=True)
    print(f"removed {removed} namespace(s)")
    return 0


# Ctrl-C, kill (SIGTERM) and a closed terminal (SIGHUP) all stop the demo. Its
# pods run in sessions of their own (start_new_session: the terminal's signals
# do not reach them), so only the demo's own cleanup stops them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """What the stop signals did (_signals_as_exceptions)."""

    def __init__(self) -> None:
        self.came = False  # a stop signal came (its KeyboardInterrupt raised)
        self.cleaning = False

    def checkpoint(self) -> None:
        """Raise again a stop signal's KeyboardInterrupt that Python dropped:
        one raised in an at-fork callback (logging's, while a pod's process
        starts) is printed and lost, and the demo went on. Called where the
        demo runs on normally, so only a lost one is raised here."""
        if self.came and not self.cleaning:
            raise KeyboardInterrupt

    def cleanup_begins(self) -> bool:
        """From now on signals are only noted; whether one came."""
        self.cleaning = True
        return self.came


@contextlib.contextmanager
def _signals_as_exceptions() -> Iterator[StopSignals]:
    """The first of STOP_SIGNALS raises KeyboardInterrupt, so that the demo
    unwinds into its cleanup; any later one, and any once the cleanup has
    begun, is only noted: a second Ctrl-C never cuts the cleanup short and
    leaves pods behind. A first one's raise that was lost is raised again
    at the demo's next checkpoint (StopSignals.checkpoint)."""
    owner = os.getpid()
    stop = StopSignals()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # pyroute2 forks helpers that inherit this handler and are stopped
            # with SIGTERM: only the demo process itself may unwind and clean up.
            if signum == signal.SIGTERM:
                os._exit(0)
            return
        if stop.came or stop.cleaning:
            with contextlib.suppress(OSError):  # (SIGHUP: the terminal may be gone)
                os.write(2, b"l4proxy demo: cleaning up, a moment\n")
            return
        stop.came = True
        raise KeyboardInterrupt

    old = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print(
            "l4proxy demo: needs root (network namespaces and iptables); "
            "run it as root, e.g. sudo make demo",
            file=sys.stderr,
        )
        return 2
    if args.down:
        return _down(args.prefix)
    why = _unreachable()
    if why:
        print(f"l4proxy demo: {why}", file=sys.stderr)
        return 2
    if namespace_exists(f"{args.prefix}-node"):
        print(
            f"l4proxy demo: namespace {args.prefix}-node exists: a demo is running or was left "
            f"behind; remove it with: {_down_command(args.prefix)}",
            file=sys.stderr,
        )
        return 2
    try:
        man = read_manifests(args.manifests)
    except DemoError as exc:
        print(f"l4proxy demo: {exc}", file=sys.stderr)
        return 2
    steps = steps_of(man)
    for s in args.step:
        if s not in steps:
            print(
                f"l4proxy demo: unknown step {s!r}; steps are: {', '.join(steps)}", file=sys.stderr
            )
            return 2
    chosen = [s for s in steps if not args.step or s in args.step]
    tut = Tutorial(
        man,
        requests=args.requests,
        seed=args.seed,
        keepalive=args.keepalive,
        prefix=args.prefix,
    )
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    code = 0
    with _signals_as_exceptions() as stop:
        try:
            tut.claim()
            tut.say(f"building the topology from {man.directory} ...")
            tut.up()
            stop.checkpoint()
            tut.say(_topology_summary(tut))
            for i, step in enumerate(chosen, 1):
                results.append(tut.run_step(i, len(chosen), step))
                stop.checkpoint()
            tut.stop_keepalive()
            for line in tut.pool_summary():
                tut.say(line)
            tut.say()
            for line in tut.access_log_summary():
                tut.say(line)
            tut.say()
            # issue 13: two automated rollouts after the full tutorial (l4proxy.demo.canary)
            if not args.step and getattr(args, "api", "istio") == "istio" and args.canary:
                from l4proxy.demo import canary as demo_canary

                code = demo_canary.rollouts(tut, _exe, QUICK_STOP)
            stop.checkpoint()
            tut.say(f"done in {time.monotonic() - started:.1f} s")
            if any(_failures(r) for r in results):
                code = 1
        except DemoBusy as exc:
            print(f"l4proxy demo: {exc}", file=sys.stderr)
            code = 2
        except (DemoError, PodNetworkError, OSError, subprocess.SubprocessError) as exc:
            print(f"l4proxy demo: {exc}", file=sys.stderr)
            code = 1
        except Exception as exc:  # one line, never a traceback: what failed, and how
            print(f"l4proxy demo: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            with contextlib.suppress(OSError):  # (SIGHUP: the terminal may be gone)
                print("\ninterrupted; cleaning up", file=sys.stderr)
            code = 130
        finally:
            if stop.cleanup_begins() and code == 0:
                code = 130  # (its KeyboardInterrupt lost after the last checkpoint)
            if args.keep and code == 0:
                _keep(tut)
            else:
                tut.down()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return code


def _down_command(prefix: str) -> str:
    """How the user removes the demo of *prefix*."""
    if prefix == PREFIX:
        return "l4proxy demo --down (in a checkout: make demo DEMO_ARGS=--down)"
    return f"l4proxy demo --down --prefix {prefix}"


def _failures(result: dict[str, Any]) -> int:
    """Failed requests of one step: curl's per path and the keep-alive client's."""
    paths = [v for k, v in result.items() if k not in ("step", "keepalive")]
    paths += list(result.get("keepalive", {}).values())
    return sum(int(p["failed"]) for p in paths)


def _unreachable() -> str:
    """Why the demo's users cannot run this installation ("" when they can).

    The pods' apps and curl run as uid 1000 and the sidecars as uid 1337,
    from this interpreter and these sources: under a directory closed to
    other users (root's 0700 home, ``mktemp -d``) every pod would fail to
    start, so say so before building anything. ``make demo`` avoids it by
    running from a world-readable mirror of the checkout.
    """
    if not shutil.which("setpriv"):
        return "setpriv is missing (the pods run as uid 1000 and 1337): apt-get install util-linux"
    need = [(HERE, "-x"), (os.path.join(HERE, "__init__.py"), "-r"), (sys.executable, "-x")]
    for uid in (1000, 1337):
        for path, test in need:
            ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            if subprocess.run(["setpriv", *ids, "test", test, path]).returncode != 0:
                return (
                    f"uid {uid} cannot {'run' if test == '-x' else 'read'} {path} (a parent "
                    "directory is closed to other users, or the files are not world-readable): "
                    "run make demo, which then runs from a world-readable mirror, or install "
                    "l4proxy where every user can read it"
                )
    return ""


def _topology_summary(tut: Tutorial) -> str:
    lines = ["pods:"]
    for info in tut.app_pods:
        labels = ",".join(f"{k}={v}" for k, v in info.pod.labels.items())
        lines.append(f"  {info.pod.name:16s} {info.pod.ipv4:14s} {labels}")
    assert tut.client is not None and tut.gateway is not None
    clients = "curl and the keep-alive client" if tut.keepalive > 0 else "curl"
    lines.append(
        f"  {'client':16s} {tut.client.ipv4:14s} "
        f"(l4proxy-init + l4proxy run, {clients} as uid 1000)"
    )
    lines.append(f"  {'gateway':16s} {tut.gateway.ipv4:14s} (l4proxy run --listen 0.0.0.0:80)")
    for name, vip in tut.vips.items():
        lines.append(f"service {name}: VIP {vip} (REDIRECTed by l4proxy-init in the client pod)")
    lines.append(
        f"every sidecar: l4proxy run {' '.join(PER_REQUEST)} (each request routed on its own)"
    )
    return "\n".join(lines) + "\n"


def _keep(tut: Tutorial) -> None:
    """Leave the topology up: its record stays for --down, with links to its
    rules and logs beside it."""
    for name, path in (("rules", tut.rules_dir), ("logs", tut.log_dir)):
        link = os.path.join(tut.state_dir, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(path, link)
    assert tut.client is not None
    url = tut.urls()[0][1]
    print(f"""
the topology is up. Try:
  ip netns exec {tut.client.netns} setpriv --reuid=1000 --regid=1000 --clear-groups curl -s {url}
  ip netns exec {tut.client.netns} curl -s 127.0.0.1:15000/stats
  rules (edit to shift traffic): {tut.state_dir}/rules/   logs: {tut.state_dir}/logs/
remove it with: {_down_command(tut.prefix)}""")
